"""The Grafana dashboard must only ask for series gpucap serves, in PromQL Prometheus accepts.

A dashboard panel over a misspelled metric shows "No data" forever and nobody notices; these tests
catch that before a user does. Each expression is parsed by the real promtool (wrapped in a
recording rule), and every metric name in it is checked against the names gpucap exposes.
Helpers here (`promql_metric_names`, `exposed_metric_names`, `PROMTOOL`) are reused by test_rules.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "helm" / "gpucap" / "dashboards" / "gpucap.json"
GOLDEN = ROOT / "tests" / "golden" / "demo.metrics"
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)

# The contract's names that gpucap serves today, as they appear in samples (counters with _total); the
# right-sizing metric joins when right-sizing lands. exposed_metric_names() reads tests/golden/demo.metrics
# when it exists; this list is the fallback before it does.
CONTRACT_METRICS = frozenset({
    "gpucap_gpu_up", "gpucap_gpu_info", "gpucap_gpu_utilization_ratio", "gpucap_gpu_sm_active_ratio",
    "gpucap_gpu_sm_occupancy_ratio", "gpucap_gpu_tensor_active_ratio", "gpucap_gpu_memory_used_bytes",
    "gpucap_gpu_memory_total_bytes", "gpucap_gpu_power_watts", "gpucap_gpu_energy_joules_total",
    "gpucap_gpu_xid_errors_total", "gpucap_gpu_allocation_ratio", "gpucap_pod_info",
    "gpucap_gpu_hourly_price_dollars", "gpucap_gpu_state", "gpucap_gpu_idle_reserved_seconds",
    "gpucap_idle_reserved_cost_dollars_per_hour", "gpucap_allocated_cost_dollars_per_hour",
    "gpucap_unallocated_cost_dollars_per_hour", "gpucap_cost_dollars_total",
    "gpucap_inference_queue_requests", "gpucap_inference_running_requests",
    "gpucap_inference_kv_cache_usage_ratio", "gpucap_inference_saturated",
    "gpucap_inference_successful_requests_total", "gpucap_inference_generated_tokens_total",
    "gpucap_cost_per_1k_successful_requests_dollars", "gpucap_cost_per_million_generated_tokens_dollars",
    "gpucap_collector_success",
    "gpucap_collector_duration_seconds", "gpucap_collector_last_success_timestamp_seconds",
    "gpucap_collector_errors_total", "gpucap_build_info",
})

# Grafana's variables, replaced by something of the same PromQL type before parsing.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$node": ".*", "$team": ".*",
}

_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
    "bool", "inf", "nan",
})


def exposed_metric_names() -> frozenset[str]:
    """Sample names gpucap serves: from the golden /metrics when there is one, else the contract list."""
    if not GOLDEN.exists():
        return CONTRACT_METRICS
    names: set[str] = set()
    suffix = {"counter": ("_total",), "info": ("_info",), "histogram": ("_bucket", "_sum", "_count"),
              "summary": ("_sum", "_count")}
    for line in GOLDEN.read_text().splitlines():
        if line.startswith("# TYPE "):
            # A family with no sample at the golden's moment (no Xid yet) is still served.
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            names.update(name + s for s in suffix.get(kind.strip(), ()))
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return frozenset(names)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (a lexer's worth of PromQL, enough for our own queries)."""
    text = re.sub(r"#[^\n]*", " ", expr)                              # comments
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', text)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)                            # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                           # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![0-9.a-zA-Z_:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL with Grafana variables substituted) for every target of every panel."""
    found = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            found.append((f"panel {panel['id']} {panel['title']!r} target {target['refId']}", expr))
    return found


def _check_as_recording_rules(tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess[str]:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"gpucap_dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return run_promtool("check", "rules", str(path))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_grafana_json_with_unique_panels_on_the_grid(dashboard: dict) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique or Grafana drops panels"
    assert dashboard["uid"] == "gpucap"
    for p in panels:
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "node", "team"}
    used = {v for _, e in _queries(dashboard) for v in re.findall(r"\$\w+", e)}
    assert not used, f"Grafana variables not substituted by the test (add to GRAFANA_VARIABLES): {used}"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'); CI installs it")
def test_every_dashboard_query_parses(dashboard: dict, tmp_path: Path) -> None:
    queries = _queries(dashboard)
    result = _check_as_recording_rules(tmp_path, [e for _, e in queries])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'); CI installs it")
def test_query_check_rejects_a_broken_query(tmp_path: Path) -> None:
    """The harness above can fail: one unbalanced query makes promtool refuse the file."""
    result = _check_as_recording_rules(tmp_path, ["sum(gpucap_gpu_up", "gpucap_gpu_up"])
    assert result.returncode != 0
    assert '"gpucap_dashboard:query_0": could not parse expression' in result.stdout + result.stderr


def chart_recorded_names() -> set[str]:
    """Series the chart's own recording rules produce (the budget rules): the dashboard may read them."""
    root = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "gpucap"
    names = set(re.findall(r"record:\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", (root / "rules" / "gpucap-budgets.yaml").read_text()))
    names |= set(re.findall(r"record:\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", (root / "templates" / "prometheusrule.yaml").read_text()))
    return names


def test_dashboard_queries_only_names_gpucap_exposes(dashboard: dict) -> None:
    """Checked against the golden /metrics, not a list: a panel for a metric gpucap does not serve yet
    (right-sizing) goes in with the feature that serves it."""
    assert GOLDEN.exists(), f"{GOLDEN} is missing: regenerate it (make golden)"
    # served only with a ledger, after its first computation (tests/test_rightsizing_live.py shows it served)
    exposed = exposed_metric_names() | chart_recorded_names() | {"gpucap_rightsizing_monthly_savings_dollars"}
    unknown = {}
    for where, expr in _queries(dashboard):
        bad = promql_metric_names(expr) - exposed
        if bad:
            unknown[where] = sorted(bad)
    assert not unknown, f"queries select metrics gpucap does not expose: {unknown}"
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"]).group(1)
            assert metric in exposed, var["name"]


def test_name_extraction_sees_through_promql_syntax() -> None:
    expr = ('sum by (team) (gpucap_a{node=~"x|y"} and on (uuid) gpucap_b offset 5m) * 730 > 1e+06 # gpucap_c\n'
            '+ rate(gpucap_d_total[$__rate_interval]) / time()')
    assert promql_metric_names(expr.replace("$__rate_interval", "5m")) == {"gpucap_a", "gpucap_b", "gpucap_d_total"}


@pytest.mark.parametrize("need", [
    "gpucap_idle_reserved_cost_dollars_per_hour", "gpucap_unallocated_cost_dollars_per_hour", "gpucap_gpu_state",
    "gpucap_gpu_sm_active_ratio", "gpucap_gpu_utilization_ratio", "gpucap_inference_saturated",
    "gpucap_inference_queue_requests", "gpucap_cost_per_1k_successful_requests_dollars",
    "gpucap_cost_per_million_generated_tokens_dollars", "gpucap_cost_dollars_total",
    "gpucap:team_budget_monthly_dollars", "gpucap:team_cost_dollars:projected_month",
    "gpucap_rightsizing_monthly_savings_dollars",
])
def test_dashboard_shows_what_the_deploy_issue_asks_for(dashboard: dict, need: str) -> None:
    assert any(need in promql_metric_names(e) for _, e in _queries(dashboard))
