"""The alert rules are what an SRE gets paged by: they must load in Prometheus, fire on the cases in
deploy/rules-tests/, stay quiet on the near-misses there, and agree with docs/alerts.md.

promtool is the judge (`promtool check rules`, `promtool test rules`); CI installs it, and the tests skip
with that reason where it is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.test_dashboard import PROMTOOL, exposed_metric_names, promql_metric_names, run_promtool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "helm" / "gpucap" / "rules" / "gpucap-alerts.yaml"
RULE_TESTS = sorted((ROOT / "deploy" / "rules-tests").glob("*.yaml"))
ALERTS_DOC = ROOT / "docs" / "alerts.md"
# Same pattern as templates/prometheusrule.yaml uses to replace a threshold from Helm values.
THRESHOLD_MARKER = re.compile(r"[-+]?[0-9][0-9.eE+-]* # threshold")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'); CI installs it")


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _alert_tests() -> list[dict]:
    return [case for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]
            for case in test["alert_rule_test"]]


@needs_promtool
def test_rules_file_loads_in_prometheus() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "deploy/rules-tests/*.yaml missing"
    result = run_promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


BLIP = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'gpucap_gpu_up{{node="n1",gpu="4",uuid="GPU-ddd4",model="NVIDIA H100 80GB HBM3"}}'
        values: '1x10 0 1x19'
      - series: 'gpucap_idle_reserved_cost_dollars_per_hour{{node="n1",gpu="0",uuid="GPU-a",namespace="ml",pod="nb-0",container="c",workload_kind="StatefulSet",workload="nb",team="research"}}'
        values: '6.88x150'
      - series: 'gpucap_gpu_idle_reserved_seconds{{node="n1",gpu="0",uuid="GPU-a",namespace="ml",pod="nb-0",container="c",workload_kind="StatefulSet",workload="nb",team="research"}}'
        values: '1800+60x150'
      # node n2's L4 is unknown for 9 minutes (kubelet reading stale), then known again
      - series: 'gpucap_gpu_state{{node="n2",gpu="0",uuid="GPU-u",model="NVIDIA L4",state="unknown"}}'
        values: '0x5 1x9 0x136'
      - series: 'gpucap_unknown_cost_dollars_per_hour{{node="n2",gpu="0",uuid="GPU-u",model="NVIDIA L4"}}'
        values: '0x5 0.8x9 0x136'
      # GPU 5 is lost from minute 60 and no pod holds it
      - series: 'gpucap_gpu_up{{node="n1",gpu="5",uuid="GPU-ddd5",model="NVIDIA H100 80GB HBM3"}}'
        values: '1x59 0x91'
      - series: 'gpucap_lost_cost_dollars_per_hour{{node="n1",gpu="5",uuid="GPU-ddd5",model="NVIDIA H100 80GB HBM3"}}'
        values: '0x59 6.88x91'
    alert_rule_test:
{case}
"""

BROKEN_EXPECTATIONS = {
    # a one-minute NVML blip must not page anyone: expecting it to proves nothing unless promtool objects
    "alert that must not fire": """
      - eval_time: 13m
        alertname: GpucapGpuLost
        exp_alerts:
          - exp_labels: {severity: critical, node: n1, gpu: "4", uuid: GPU-ddd4, model: NVIDIA H100 80GB HBM3}
""",
    # the dollars in the page are part of the contract: a wrong figure must fail
    "wrong $/h in the annotation": """
      - eval_time: 90m
        alertname: GpucapIdleReservedGpu
        exp_alerts:
          - exp_labels: {severity: warning, namespace: ml, workload_kind: StatefulSet, workload: nb, team: research}
            exp_annotations:
              runbook_url: 'https://github.com/gpucap/gpucap/blob/main/docs/alerts.md#gpucapidlereservedgpu'
              summary: 'ml/nb holds idle reserved GPUs costing $6.00/h'
              description: 'StatefulSet ml/nb (team "research") holds 1 idle reserved GPU unit(s), idle for 2h 0m 0s at $6.88/h ($5022/month). Release the GPUs or scale the workload down.'
""",
    # unknown for 9 minutes is a stale reading that came back, not a page
    "units unknown for less than the hold time": """
      - eval_time: 15m
        alertname: GpucapUnitsUnknown
        exp_alerts:
          - exp_labels: {severity: warning, node: n2}
""",
    # a lost GPU nobody holds has no holder to blame: naming one must fail
    "a holder named for an unheld lost GPU": """
      - eval_time: 70m
        alertname: GpucapGpuLost
        exp_alerts:
          - exp_labels: {severity: critical, node: n1, gpu: "5", uuid: GPU-ddd5, model: NVIDIA H100 80GB HBM3}
            exp_annotations:
              runbook_url: 'https://github.com/gpucap/gpucap/blob/main/docs/alerts.md#gpucapgpulost'
              summary: 'GPU 5 on node n1 is lost'
              description: 'NVML reports GPU 5 (GPU-ddd5, NVIDIA H100 80GB HBM3) on node n1 as lost ($6.88/h). Held by ml/nb-0 (StatefulSet nb, team "research", $6.88/h): the holders keep paying for a GPU that cannot run, and that spend is waste. Cordon and drain the node; the GPU usually needs a reset or the node a reboot.'
""",
}

# How each broken case above is right: it fails only because of what it gets wrong.
FIXES = {
    "wrong $/h in the annotation": ("$6.00/h'", "$6.88/h'"),
    "a holder named for an unheld lost GPU": (
        ('Held by ml/nb-0 (StatefulSet nb, team "research", $6.88/h): the holders keep paying for a GPU that '
         'cannot run, and that spend is waste.'), "No pod holds it."),
}


@needs_promtool
@pytest.mark.parametrize("name", sorted(BROKEN_EXPECTATIONS))
def test_a_wrong_expectation_fails(tmp_path: Path, name: str) -> None:
    path = tmp_path / "broken.test.yaml"
    path.write_text(BLIP.format(rules=RULES, case=BROKEN_EXPECTATIONS[name]))
    result = run_promtool("test", "rules", str(path))
    assert result.returncode != 0, result.stdout
    assert "FAILED" in result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("name", sorted(FIXES))
def test_the_broken_case_is_right_once_fixed(tmp_path: Path, name: str) -> None:
    """The annotation cases above fail only because of what they get wrong (the figure, the holder)."""
    old, new = FIXES[name]
    assert old in BROKEN_EXPECTATIONS[name]
    case = BROKEN_EXPECTATIONS[name].replace(old, new)
    path = tmp_path / "fixed.test.yaml"
    path.write_text(BLIP.format(rules=RULES, case=case))
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    cases = _alert_tests()
    for rule in _rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no case where it must stay quiet"


def test_every_alert_is_complete_and_thresholds_are_overridable() -> None:
    names = [r["alert"] for r in _rules()]
    assert len(names) == len(set(names))
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert re.fullmatch(r"[0-9]+[smhd]", rule["for"]), rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
        # A marker that YAML swallowed as a comment, or two markers, would make a Helm override a no-op
        # or ambiguous.
        assert len(THRESHOLD_MARKER.findall(rule["expr"])) == ("# threshold" in rule["expr"]), rule["alert"]


def test_rules_select_only_metrics_gpucap_exposes() -> None:
    exposed = exposed_metric_names() | {"up"}
    for rule in _rules():
        texts = [rule["expr"]] + re.findall(r"printf `([^`]*)`", " ".join(rule["annotations"].values()))
        for text in texts:
            assert promql_metric_names(text) <= exposed, (rule["alert"], promql_metric_names(text) - exposed)


def _doc_table() -> dict[str, list[str]]:
    rows = {}
    for line in ALERTS_DOC.read_text().splitlines():
        cells = [c.replace("`", "").strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith("Gpucap"):
            rows[cells[0]] = cells
    return rows


def test_docs_table_matches_the_rules() -> None:
    """docs/alerts.md is the runbook: its severity, threshold and for must be the ones that page."""
    table = _doc_table()
    assert set(table) == {r["alert"] for r in _rules()}
    for rule in _rules():
        _, severity, threshold, hold = table[rule["alert"]][:4]
        assert severity == rule["labels"]["severity"], rule["alert"]
        assert hold == rule["for"], rule["alert"]
        marker = THRESHOLD_MARKER.search(rule["expr"])
        if marker:
            assert threshold.split()[0] == marker.group(0).split()[0], rule["alert"]
        else:
            assert threshold == "-", rule["alert"]
        assert f"### {rule['alert']}" in ALERTS_DOC.read_text(), f"no runbook section for {rule['alert']}"
