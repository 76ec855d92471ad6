"""Right-sizing: the engine's rules on literal minutes (one test per action, the boundaries, the
savings arithmetic), the demo node after simulated days, the CLI's formats and errors, the HTML
report in headless Chromium, and fleet mode against a real Prometheus and a real VictoriaMetrics."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.gpu_specs import MIB, mig_spec
from agent.recommend import COLUMNS, HOURS_PER_MONTH, Prices, Recommendation, Settings, recommend

START = 1_767_225_600.0
H100 = "NVIDIA H100 80GB HBM3"
GIB = 2**30
DEFAULTS = Settings()
PRICES = Prices({"H100-80GB": 6.88, "A100-80GB": 3.431, "A100-40GB": 2.745, "L40S": 1.861, "L4": 0.805})


def _minutes(workload: str, *, hours: float = 24.0, act: float | list[float] = 0.5, mem: float = 10 * GIB,
             units: int = 1, pods: int = 1, price: float = 6.88, model: str = H100, kind: str = "gpu",
             fraction: float = 1.0, profile: str = "", samples: int = 6, list_price: float | None = None,
             start_hour: float = 0.0, namespace: str = "ns", every: int = 1) -> Iterator[dict[str, Any]]:
    """Per-minute ledger rows of one workload (the columns agent/history.py writes)."""
    n = int(hours * 60)
    acts = act if isinstance(act, list) else [act]
    for i in range(0, n, every):
        a = acts[i % len(acts)]
        for u in range(units):
            yield {"minute": int(START + start_hour * 3600 + i * 60), "uuid": f"GPU-{workload}-{u}",
                   "namespace": namespace, "pod": f"{workload}-{u % pods}", "container": "c", "node": "node-a",
                   "model": model, "kind": kind, "mig_profile": profile, "workload_kind": "Deployment",
                   "workload": workload, "team": "team-a", "instance_type": "p5.48xlarge",
                   "hourly_price": price, "list_hourly_price": list_price or price, "gpu_fraction": fraction,
                   "act_sum": a * samples, "act_samples": samples, "act_max": a, "act_p95": a,
                   "mem_max": int(mem), "mem_total": 81559 * MIB}


def _servers(workload: str, *, hours: float = 24.0, saturated_minutes: int = 0, queue: float = 0.0,
             namespace: str = "ns") -> Iterator[dict[str, Any]]:
    for i in range(int(hours * 60)):
        yield {"minute": int(START + i * 60), "namespace": namespace, "pod": f"{workload}-0", "server": "vllm",
               "model": "m", "workload_kind": "Deployment", "workload": workload, "team": "team-a",
               "queue_max": queue, "queue_sum": queue * 4, "samples": 4,
               "saturated_seconds": 60.0 if i < saturated_minutes else 0.0}


def _one(units: Any, servers: Any = (), hours: float = 24.0, settings: Settings = DEFAULTS) -> Recommendation:
    recs = recommend(list(units), list(servers), START, START + hours * 3600, settings, PRICES)
    assert len(recs) == 1
    return recs[0]


# ------------------------------------------------------------------------------ engine: one per action
def test_idle_nearly_all_the_window_is_released_with_all_its_cost_saved() -> None:
    r = _one(_minutes("nb", act=0.0, units=2, mem=6 * GIB))
    assert (r.action, r.target) == ("release", "none")
    assert r.current_monthly_cost_dollars == pytest.approx(2 * 6.88 * HOURS_PER_MONTH)
    assert r.monthly_savings_dollars == r.current_monthly_cost_dollars
    assert "100%" in r.reason and "2x H100-80GB" in r.reason


def test_small_model_on_a_whole_h100_gets_the_smallest_mig_slice_that_fits_memory_and_compute() -> None:
    r = _one(_minutes("small", act=0.1, mem=7 * GIB))
    # 7 GiB × 1.2 = 8.4 GiB fits 1g.10gb's 9856 MiB; p95 0.1 / 0.8 = 0.125 ≤ 1/7
    assert (r.action, r.target) == ("downsize_mig", "1g.10gb")
    assert r.target_memory_bytes is not None and r.target_memory_bytes >= 7 * GIB * 1.2
    assert r.recommended_monthly_cost_dollars == pytest.approx(6.88 / 7 * HOURS_PER_MONTH, abs=0.01)
    assert r.monthly_savings_dollars == pytest.approx(6.88 * 6 / 7 * HOURS_PER_MONTH, abs=0.01)


def test_more_compute_picks_a_bigger_slice_not_the_smallest_memory_fit() -> None:
    r = _one(_minutes("mid", act=0.2, mem=7 * GIB))  # 0.2 / 0.8 = 0.25 > 1/7 → 2g (2/7)
    assert (r.action, r.target) == ("downsize_mig", "2g.20gb")


def test_memory_exactly_at_headroom_fits_and_one_byte_more_does_not() -> None:
    cap = mig_spec(H100, "1g.10gb").memory_bytes  # type: ignore[union-attr]
    at = cap / 1.2
    assert _one(_minutes("edge", act=0.05 + 1e-3, mem=int(at))).target == "1g.10gb"
    assert _one(_minutes("edge", act=0.05 + 1e-3, mem=int(at) + 2)).target == "1g.20gb"


def test_a_gpu_without_mig_moves_to_a_cheaper_model_whose_memory_and_throughput_fit() -> None:
    # an L40S at p95 0.2 with 9 GiB: an L4 has 121/362 = 0.33 of its dense BF16 ≥ 0.2 / 0.8, 22.5 GiB ≥ 10.8
    r = _one(_minutes("l40s", act=0.2, mem=9 * GIB, model="NVIDIA L40S", price=1.861))
    assert (r.action, r.target) == ("downsize_gpu", "L4")
    assert r.monthly_savings_dollars == pytest.approx((1.861 - 0.805) * HOURS_PER_MONTH, abs=0.01)
    assert "L4" in r.reason and "dense BF16" in r.reason


def test_target_gpu_keeps_the_nodes_spot_ratio() -> None:
    # the node pays 35% of list (spot): the L4 target is priced at 35% of its list price too
    r = _one(_minutes("spot", act=0.2, mem=9 * GIB, model="NVIDIA L40S", price=1.861 * 0.35, list_price=1.861))
    assert r.target == "L4"
    assert r.recommended_monthly_cost_dollars == pytest.approx(0.805 * 0.35 * HOURS_PER_MONTH, abs=0.01)


def test_replicas_whose_summed_p95_fits_fewer_units_are_consolidated() -> None:
    # 4 replicas × 0.3 = 1.2 GPU-equivalents / 0.8 = 1.5 → 2 GPUs; 50 GiB each fits no slice nor cheaper GPU
    r = _one(_minutes("api", act=0.3, mem=50 * GIB, units=4, pods=4))
    assert (r.action, r.target, r.replicas) == ("consolidate", "2x H100-80GB", 4)
    assert r.monthly_savings_dollars == pytest.approx(2 * 6.88 * HOURS_PER_MONTH, abs=0.01)


def test_saturated_server_scales_up_by_at_least_one_unit_and_the_cost_shows_as_negative_savings() -> None:
    r = _one(_minutes("chat", act=0.9, mem=70 * GIB), _servers("chat", saturated_minutes=1440, queue=30))
    assert (r.action, r.target) == ("scale_up", "2x H100-80GB")
    assert r.monthly_savings_dollars == pytest.approx(-6.88 * HOURS_PER_MONTH)
    assert r.saturated_ratio == 1.0 and r.queue_p95 == 30


def test_busy_training_job_is_kept_and_says_why() -> None:
    r = _one(_minutes("train", act=0.93, mem=71 * GIB, units=3))
    assert (r.action, r.target, r.monthly_savings_dollars) == ("keep", "", 0.0)
    assert "No smaller target fits" in r.reason and "71.0 GiB" in r.reason


# ------------------------------------------------------------------------------ engine: guards and boundaries
@pytest.mark.parametrize("act", [0.0, 0.02, 0.1])
def test_saturated_but_low_average_is_never_downsized_or_released(act: float) -> None:
    # the queue is full a fifth of the day even though the GPU averages ≤ 10%
    r = _one(_minutes("bursty", act=act, mem=5 * GIB), _servers("bursty", saturated_minutes=288, queue=12))
    assert r.action == "scale_up"
    assert r.monthly_savings_dollars < 0


def test_a_little_saturation_keeps_a_workload_that_would_otherwise_be_downsized() -> None:
    r = _one(_minutes("almost", act=0.1, mem=5 * GIB), _servers("almost", saturated_minutes=60))  # 4% of the day
    assert r.action == "keep" and "not downsized" in r.reason


def test_scale_up_threshold_is_the_configured_share() -> None:
    servers = list(_servers("s", saturated_minutes=144))  # exactly 10% of the day
    assert _one(_minutes("s", act=0.1), servers).action == "scale_up"
    assert _one(_minutes("s", act=0.1), servers, settings=Settings(saturated_share=0.2)).action == "keep"


def test_idle_share_boundary() -> None:
    # 95% of minutes idle, 5% busy: release at the default 0.95, keep-or-downsize above it
    acts = [0.0] * 95 + [0.5] * 5
    assert _one(_minutes("half", act=acts, mem=5 * GIB)).action == "release"
    assert _one(_minutes("half", act=acts, mem=5 * GIB), settings=Settings(idle_share=0.96)).action != "release"


def test_too_little_history_is_kept_with_low_confidence_not_guessed() -> None:
    # idle, but seen for only 2 hours of a 7-day window
    r = recommend(list(_minutes("new", act=0.0, hours=2)), [], START, START + 7 * 86400, Settings(), PRICES)[0]
    assert r.action == "keep" and r.confidence < 0.5
    assert "Too little history" in r.reason and "2.0 h" in r.reason


def test_missing_samples_count_as_no_evidence() -> None:
    rows = list(_minutes("gaps", act=0.0))
    for i, row in enumerate(rows):
        if i % 4:  # three minutes in four have no activity sample (the NVML reading expired)
            row.update(act_samples=0, act_sum=None, act_p95=None, act_max=None)
    r = _one(rows)
    assert r.samples == 6 * 360
    assert r.action == "keep" and r.confidence < 0.5  # 25% coverage: under min_coverage


def test_minutes_booked_from_activity_between_coarse_samples_are_observed() -> None:
    """A fast-forward samples every 202 s over a week: the minutes between are booked active or idle
    reserved from those samples (the agent watched them), so they cover the window."""
    rows = list(_minutes("coarse", act=0.0))
    for i, row in enumerate(rows):
        row["s_idle_reserved"] = 60.0
        if i % 4:
            row.update(act_samples=0, act_sum=None, act_p95=None, act_max=None)
    r = _one(rows)
    assert r.action == "release" and r.confidence == 1.0


def test_confidence_follows_coverage() -> None:
    full = _one(_minutes("a", act=0.0))
    most = recommend(list(_minutes("a", act=0.0, hours=18)), [], START, START + 86400, Settings(), PRICES)[0]
    assert full.confidence == 1.0 and most.confidence == pytest.approx(0.75, abs=0.01)


def test_savings_arithmetic_uses_730_hours_and_the_node_prices() -> None:
    r = _one(_minutes("x", act=0.0, price=3.431, model="NVIDIA A100-SXM4-80GB"))
    assert r.current_monthly_cost_dollars == pytest.approx(3.431 * 730, abs=0.005)
    assert r.current_monthly_cost_dollars - r.recommended_monthly_cost_dollars == r.monthly_savings_dollars


def test_mig_memory_cost_basis_prices_the_slice_by_memory() -> None:
    r = _one(_minutes("small", act=0.1, mem=7 * GIB), settings=Settings(mig_cost_basis="memory"))
    assert r.recommended_monthly_cost_dollars == pytest.approx(6.88 / 8 * HOURS_PER_MONTH, abs=0.01)


def test_a_workload_on_two_nodes_is_one_row() -> None:
    a = list(_minutes("api", act=0.3, mem=50 * GIB, units=2, pods=2))
    b = [dict(r, node="node-b", uuid=r["uuid"] + "-b", pod=r["pod"] + "-b") for r in a]
    r = _one(a + b)
    assert r.node == "node-a,node-b" and r.replicas == 4 and r.action == "consolidate"


def test_columns_are_the_design_columns_in_order() -> None:
    assert list(_one(_minutes("x")).row()) == list(COLUMNS)
    # the README points planners at docs/recommend.md for the CSV's exact columns
    doc = (Path(__file__).resolve().parents[1] / "docs" / "recommend.md").read_text()
    listed = re.search(r"\(CSV header, JSON `columns`\):\n\n(.+)\n", doc)
    assert listed and re.findall(r"`(\w+)`", listed.group(1)) == list(COLUMNS)


# ------------------------------------------------------------------------------ the demo node
@pytest.fixture(scope="module")
def demo_day(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agent.cli_cost import fill_simulated_history
    from agent.config import Config

    path = tmp_path_factory.mktemp("demo") / "history.db"
    fill_simulated_history(Config(), "demo", 7 * 86400.0, str(path), start=START)  # a week: ~25 s here
    return path


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _check_demo(rows: list[dict[str, str]]) -> None:
    by = {r["workload"]: r for r in rows}
    assert by["notebook-alice"]["action"] == "release"
    assert by["chat-llama-70b"]["action"] == "scale_up"
    assert by["finetune-llama-8b"]["action"] == "keep"
    small = by["assist-llama-1b"]
    assert small["action"] == "downsize_mig"
    profile = mig_spec(H100, small["target"])
    assert profile is not None and profile.memory_bytes >= int(small["memory_peak_bytes"]) * 1.2
    assert float(small["monthly_savings_dollars"]) > 3000
    for r in rows:
        assert float(r["current_monthly_cost_dollars"]) - float(r["recommended_monthly_cost_dollars"]) == \
            pytest.approx(float(r["monthly_savings_dollars"]), abs=0.011)
        assert r["reason"] and float(r["confidence"]) >= 0.9


def test_demo_over_the_last_simulated_day(demo_day: Path) -> None:
    res = CliRunner().invoke(main, ["recommend", "--history", str(demo_day), "--window", "1d", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == ",".join(COLUMNS)
    _check_demo(_csv(res.output))


def test_demo_after_seven_simulated_days(demo_day: Path) -> None:
    res = CliRunner().invoke(main, ["recommend", "--history", str(demo_day), "--window", "7d", "--format", "csv"])
    assert res.exit_code == 0, res.output
    _check_demo(_csv(res.output))


MULTI = """
name: replicas
seed: 3
node:
  name: gpu-node-r1
  labels: {node.kubernetes.io/instance-type: p5.48xlarge, karpenter.sh/capacity-type: on-demand}
gpus: {model: H100-SXM-80GB, count: 4}
namespaces:
  serving: {labels: {team: ml-platform}}
pods:
"""
for _i in range(4):
    MULTI += f"""  - namespace: serving
    name: embed-api-5c4d-{_i}
    owner: {{kind: Deployment, name: embed-api}}
    containers:
      - {{name: server, gpus: 1, memory: 50GiB, load: {{pattern: constant, level: 0.3, noise: 0.02}}}}
"""


def test_simulated_replicas_are_consolidated(tmp_path: Path) -> None:
    sc = tmp_path / "replicas.yaml"
    sc.write_text(MULTI)
    res = CliRunner().invoke(main, ["recommend", "--simulate", str(sc), "--window", "3h", "--format", "json",
                                    "--start", str(START)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    (r,) = doc["recommendations"]
    assert (r["workload"], r["replicas"], r["action"]) == ("embed-api", 4, "consolidate")
    assert r["target"] in ("2x H100-80GB", "3x H100-80GB")
    assert doc["summary"]["savings_by_action"]["consolidate"] == r["monthly_savings_dollars"] > 0


# ------------------------------------------------------------------------------ CLI
def test_table_and_json_formats(demo_day: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["recommend", "--history", str(demo_day), "--window", "1d"])
    assert res.exit_code == 0, res.output
    assert "release" in res.output and "downsize_mig" in res.output and "savings available" in res.output
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["recommend", "--history", str(demo_day), "--window", "1d", "--format", "json",
                                    "--output", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["columns"] == list(COLUMNS)
    assert doc["summary"]["savings_by_team"]["research"] > 0
    assert set(doc["recommendations"][0]) == set(COLUMNS)


@pytest.mark.parametrize("args, message", [
    (["--window", "91d", "--history", "x.db"], "at most 90d"),
    (["--window", "soon", "--history", "x.db"], "expected a duration"),
    ([], "exactly one of"),
    (["--prometheus", "http://x", "--simulate", "demo"], "exactly one of"),
    (["--format", "xml", "--history", "a.db"], "xml"),
])
def test_bad_options_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    res = CliRunner().invoke(main, ["recommend", *args])
    assert res.exit_code == 2 and message in res.output
    assert "Traceback" not in res.output


def test_missing_ledger_and_bad_config_exit_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["recommend", "--history", str(tmp_path / "none.db")])
    assert res.exit_code == 2 and "no such ledger" in res.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recommend: {headroom: -1, target_utilization: high}\n")
    res = CliRunner().invoke(main, ["recommend", "--history", "x.db", "--config", str(cfg)])
    assert res.exit_code == 2
    assert "recommend.headroom" in res.output and "recommend.target_utilization" in res.output


# ------------------------------------------------------------------------------ the HTML report
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (Debian package chromium)")
def test_html_report_renders_offline_in_headless_chromium(demo_day: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "report.html"
    res = CliRunner().invoke(main, ["recommend", "--history", str(demo_day), "--window", "1d", "--format", "html",
                                    "--output", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    # self-contained: nothing to fetch (namespace URIs inside SVG are identifiers, not requests)
    assert not re.search(r"<(script|link|img)\b[^>]*(src|href)=['\"]https?:", text)
    charts = re.findall(r"<div class='chart' id='([^']+)'><svg", text)
    assert {"chart-by-action", "chart-by-team"} <= set(charts)
    # every workload has its capacity and memory charts; the two servers have a queue chart too
    assert sum(c.endswith("-capacity") for c in charts) == 4 and sum(c.endswith("-queue") for c in charts) == 2
    for svg in re.findall(r"<svg.*?</svg>", text, flags=re.DOTALL):
        assert svg.count("<path") >= 5  # axes, ticks and at least one data line or bar: not an empty frame
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--proxy-server=http://127.0.0.1:9",
                    f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={shot}", "--window-size=1280,2400",
                    out.as_uri()], check=True, timeout=120, capture_output=True)
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # charts drawn, not a blank page
    # the action colours of the bars and badges are on screen (release red, downsize_mig orange)
    near = {c for _, c in colours}
    assert any(abs(r - 0xC0) < 12 and abs(g - 0x39) < 12 and abs(b - 0x2B) < 12 for r, g, b in near)
    assert any(abs(r - 0xE6) < 12 and abs(g - 0x7E) < 12 and abs(b - 0x22) < 12 for r, g, b in near)


def test_table_fits_80_columns_and_wide_shows_every_column(demo_day: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(main, ["recommend", "--history", str(demo_day), "--window", "1d"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "\x1b[" not in res.output, "piped: no escape codes"
    assert "ACTION" in lines[0] and "P95" not in lines[0]  # the reasons carry p95 and memory at 80 columns
    assert any(line.startswith("research/notebook") and "release" in line for line in lines)
    wide = CliRunner().invoke(main, ["recommend", "--history", str(demo_day), "--window", "1d", "--wide"])
    head = wide.output.splitlines()[0].split()
    assert head[:4] == ["WORKLOAD", "GPUS", "P95", "MEM"] and "…" not in wide.output


def test_filter_sort_and_no_headers(demo_day: Path) -> None:
    base = ["recommend", "--history", str(demo_day), "--window", "1d"]
    rows = CliRunner().invoke(main, base + ["--filter", "team=ml-platform", "--sort", "workload", "--no-headers"])
    assert rows.exit_code == 0, rows.output
    lines = rows.output.splitlines()
    assert [line.split()[0] for line in lines] == ["serving/assist-llama-1b", "serving/chat-llama-70b"]
    csv_rows = _csv(CliRunner().invoke(main, base + ["--filter", "action=release", "--format", "csv"]).output)
    assert [r["workload"] for r in csv_rows] == ["notebook-alice"]  # filters apply to every format
    by_cost = _csv(CliRunner().invoke(main, base + ["--sort", "cost", "--format", "csv"]).output)
    costs = [float(r["current_monthly_cost_dollars"]) for r in by_cost]
    assert costs == sorted(costs, reverse=True) and by_cost[0]["workload"] == "finetune-llama-8b"
    bad = CliRunner().invoke(main, base + ["--filter", "tem=research"])
    assert bad.exit_code == 2 and "did you mean 'team'" in bad.output


def test_filter_node_matches_a_workload_on_several_nodes_and_actions_are_checked() -> None:
    from agent.cli_recommend import _actions_checked, select

    two = _one(list(_minutes("spread", units=2, pods=2)))
    two = type(two)(**{**{f: getattr(two, f) for f in two.__dataclass_fields__}, "node": "node-a,node-b"})
    assert select([two], [("node", "node-b")], "savings") == [two]
    assert select([two], [("node", "node-c")], "savings") == []
    assert _actions_checked([("action", "scale-up")]) == (("action", "scale_up"),)
    with pytest.raises(ValueError, match="unknown action"):
        _actions_checked([("action", "shrink")])
