"""Cost and idle reserved capacity end to end (issue 4): idle transitions on the injected clock, exact cost
accrual across a scrape gap, hourly rates adding up to the node's bill, the snapshot summary, and price
precedence through the whole agent — all read back from what a scrape or `gpucap snapshot` shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import config_from_dict
from agent.exposition import render
from agent.report import HOURS_PER_MONTH
from tests.helpers import (
    START,
    builtin_scenario,
    collected,
    parse,
    run_to,
    samples,
    simulated,
    total,
    value,
    walk,
    write_scenario,
)

NOTEBOOK = "notebook-alice-7d9f8-x2x9k"
H100 = 6.88  # p5.48xlarge $55.04/h ÷ 8 (shared/reference/gpu-facts.md)
L4_SPOT = 4.6016 / 4 * 0.35  # g6.12xlarge ÷ 4 GPUs × the default spot ratio
REL = 1e-9


def _state(m: dict, **unit: str) -> str:
    on = [lb["state"] for lb, v in samples(m, "gpucap_gpu_state", **unit) if v == 1.0]
    assert len(on) == 1, (unit, on)
    return on[0]


# --- idle state machine ------------------------------------------------------------------------------------
def test_idle_notebook_turns_idle_reserved_after_the_30m_window() -> None:
    with simulated("demo") as rt:
        m29 = parse(render(run_to(rt, 29 * 60, 60)))
        m31 = parse(render(run_to(rt, 31 * 60, 60)))
        m45 = parse(render(run_to(rt, 45 * 60, 60)))
    held = [lb["uuid"] for lb, _ in samples(m29, "gpucap_gpu_allocation_ratio", pod=NOTEBOOK)]
    assert len(held) == 2
    for uuid in held:
        assert _state(m29, uuid=uuid) == "active"
        assert _state(m31, uuid=uuid) == "idle_reserved"
        assert _state(m45, uuid=uuid) == "idle_reserved"
        secs = [value(m, "gpucap_gpu_idle_reserved_seconds", uuid=uuid, pod=NOTEBOOK) for m in (m29, m31, m45)]
        assert secs[1] - secs[0] == 120 and secs[2] - secs[1] == 14 * 60  # grows with simulated time
        assert secs[1] >= 30 * 60 > secs[0]
        assert value(m29, "gpucap_idle_reserved_cost_dollars_per_hour", uuid=uuid) == 0.0
        assert value(m31, "gpucap_idle_reserved_cost_dollars_per_hour", uuid=uuid, pod=NOTEBOOK) == H100
    # the busy training job never goes idle
    for lb, _ in samples(m45, "gpucap_gpu_allocation_ratio", pod="finetune-llama-8b-0-worker-0"):
        assert _state(m45, uuid=lb["uuid"]) == "active"
        assert value(m45, "gpucap_gpu_idle_reserved_seconds", uuid=lb["uuid"]) == 0.0


def test_gpu_no_pod_holds_is_unallocated_never_idle_reserved() -> None:
    with simulated("demo") as rt:
        m = parse(render(run_to(rt, 45 * 60, 60)))
    held = {lb["uuid"] for lb, _ in samples(m, "gpucap_gpu_allocation_ratio")}
    (free,) = {lb["uuid"] for lb, _ in samples(m, "gpucap_gpu_info")} - held
    assert _state(m, uuid=free) == "unallocated"
    assert value(m, "gpucap_unallocated_cost_dollars_per_hour", uuid=free) == H100
    assert value(m, "gpucap_allocated_cost_dollars_per_hour", uuid=free) == 0.0
    assert value(m, "gpucap_idle_reserved_cost_dollars_per_hour", uuid=free) == 0.0
    assert samples(m, "gpucap_gpu_idle_reserved_seconds", uuid=free) == []


def test_flapping_never_idle_reserved_and_busy_again_is_active_at_once(tmp_path: Path) -> None:
    # idle 0–40m, then busy: idle reserved from 30m, active again at the first busy sample
    (tmp_path / "wake.csv").write_text("seconds,value\n0,0\n2400,0.8\n86400,0.8\n", encoding="utf-8")
    sc = {
        "extends": "demo",
        "pods": [
            {"namespace": "research", "name": "flapper", "containers": [{
                "name": "main", "gpus": 1,
                # 1 busy minute in every 10: idle most of the time, but never 30 minutes in a row
                "load": {"pattern": "bursty", "level": 0.0, "burst_level": 0.5, "every": "10m", "duration": "1m"},
            }]},
            {"namespace": "research", "name": "sleeper", "containers": [{
                "name": "main", "gpus": 1, "load": {"pattern": "trace", "file": "wake.csv"},
            }]},
        ],
    }
    flapper: list[tuple[str, float]] = []
    sleeper: list[tuple[float, str, float, float]] = []
    with simulated(write_scenario(tmp_path, "flapping", sc)) as rt:
        for st in walk(rt, 90 * 60, 30):
            m = collected(st)
            flapper.append((_state(m, pod="flapper"), value(m, "gpucap_gpu_idle_reserved_seconds", pod="flapper")))
            sleeper.append((st.time - START, _state(m, pod="sleeper"),
                            value(m, "gpucap_gpu_idle_reserved_seconds", pod="sleeper"),
                            value(m, "gpucap_idle_reserved_cost_dollars_per_hour", pod="sleeper")))
    assert {s for s, _ in flapper} == {"active"}
    assert 0 < max(secs for _, secs in flapper) < 30 * 60  # it was below the threshold, in streaks
    assert sum(1 for _, secs in flapper if secs > 0) > len(flapper) / 2  # idle most of the 90 minutes
    for t, state, secs, idle_cost in sleeper:
        if t < 30 * 60:
            assert state == "active"
        elif t < 40 * 60:
            assert (state, idle_cost) == ("idle_reserved", H100) and secs >= 30 * 60
        else:  # busy from 40m: active at once, streak and idle dollars back to 0
            assert (state, secs, idle_cost) == ("active", 0.0, 0.0), t


# --- accrual -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eval_step", [60.0, 7200.0], ids=["agent-evaluating", "agent-paused-too"])
def test_cost_counter_grows_by_price_times_time_across_a_scrape_gap(eval_step: float) -> None:
    with simulated("demo") as rt:
        first = parse(render(run_to(rt, 10 * 60, 60)))  # scraped at 10m
        run_to(rt, 10 * 60 + 7200, eval_step)  # no scrape for 2 hours
        second = parse(render(rt.agent.state))
    held = {lb["uuid"] for lb, _ in samples(first, "gpucap_gpu_allocation_ratio")}
    (free,) = {lb["uuid"] for lb, _ in samples(first, "gpucap_gpu_info")} - held
    (busy,) = {lb["uuid"] for lb, _ in samples(first, "gpucap_gpu_allocation_ratio", gpu="4")}
    for uuid, state in ((free, "unallocated"), (busy, "active")):
        a = value(first, "gpucap_cost_dollars_total", uuid=uuid, state=state)
        b = value(second, "gpucap_cost_dollars_total", uuid=uuid, state=state)
        assert a == pytest.approx(H100 * 10 / 60, rel=REL)
        assert b - a == pytest.approx(H100 * 2, rel=REL)
        assert len(samples(second, "gpucap_cost_dollars_total", uuid=uuid)) == 1  # one state all along


def test_idle_reserved_dollars_accrue_only_after_the_window() -> None:
    with simulated("demo") as rt:
        m29 = parse(render(run_to(rt, 29 * 60, 60)))
        m45 = parse(render(run_to(rt, 45 * 60, 60)))
    for lb, _ in samples(m29, "gpucap_gpu_allocation_ratio", pod=NOTEBOOK):
        uuid = lb["uuid"]
        assert total(m29, "gpucap_cost_dollars_total", uuid=uuid, state="idle_reserved") == 0.0
        assert value(m29, "gpucap_cost_dollars_total", uuid=uuid, state="active") == pytest.approx(
            H100 * 29 / 60, rel=REL)
        assert value(m45, "gpucap_cost_dollars_total", uuid=uuid, state="active", pod=NOTEBOOK) == pytest.approx(
            H100 * 30 / 60, rel=REL)
        assert value(m45, "gpucap_cost_dollars_total", uuid=uuid, state="idle_reserved",
                     pod=NOTEBOOK, team="research") == pytest.approx(H100 * 15 / 60, rel=REL)


# --- rates add up ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("scenario", "node_hourly"), [("demo", 8 * H100), ("mig", 8 * H100),
                                                      ("timeslice", 4 * L4_SPOT)])
def test_hourly_rates_add_up_to_the_node_price(scenario: str, node_hourly: float) -> None:
    with simulated(scenario) as rt:
        m = parse(render(run_to(rt, 31 * 60, 60)))
    allocated = total(m, "gpucap_allocated_cost_dollars_per_hour")
    unallocated = total(m, "gpucap_unallocated_cost_dollars_per_hour")
    idle = total(m, "gpucap_idle_reserved_cost_dollars_per_hour")
    assert allocated + unallocated == pytest.approx(node_hourly, rel=REL)
    assert total(m, "gpucap_gpu_hourly_price_dollars") == pytest.approx(node_hourly, rel=REL)
    assert allocated > 0 and unallocated > 0 and 0 < idle <= allocated  # every scenario has all three
    # idle ⊂ allocated, unit by unit: each rate is the unit's price or 0, by its state
    expect = {"active": (0, 1, 0), "idle_reserved": (1, 1, 0), "unallocated": (0, 0, 1)}
    units = samples(m, "gpucap_gpu_hourly_price_dollars")
    assert len(units) == len(samples(m, "gpucap_idle_reserved_cost_dollars_per_hour"))
    for lb, price in units:
        unit = {k: lb[k] for k in ("gpu", "gpu_instance", "mig_profile", "uuid")}
        idle_f, alloc_f, unalloc_f = expect[_state(m, **unit)]
        assert value(m, "gpucap_idle_reserved_cost_dollars_per_hour", **unit) == idle_f * price
        assert value(m, "gpucap_allocated_cost_dollars_per_hour", **unit) == alloc_f * price
        assert value(m, "gpucap_unallocated_cost_dollars_per_hour", **unit) == unalloc_f * price


# --- snapshot -----------------------------------------------------------------------------------------
def test_snapshot_at_45m_shows_the_idle_notebook_with_owner_price_and_monthly_figure() -> None:
    res = CliRunner().invoke(main, ["snapshot", "--simulate", "demo", "--at", "45m", "--format", "json",
                                    "--start", str(START)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    mine = [u for u in doc["units"] if any(a["pod"] == NOTEBOOK for a in u["allocations"])]
    assert len(mine) == 2
    for u in mine:
        assert u["state"] == "idle_reserved"
        assert u["hourly_price_dollars"] == H100 and u["price_source"] == "catalog_instance_type"
        (a,) = u["allocations"]
        assert (a["namespace"], a["workload_kind"], a["workload"], a["team"]) == (
            "research", "Deployment", "notebook-alice", "research")
    idle = [u for u in doc["units"] if u["state"] == "idle_reserved"]
    s = doc["summary"]
    assert s["idle_reserved_units"] == len(idle)
    assert s["idle_reserved_monthly_dollars"] == pytest.approx(
        sum(u["hourly_price_dollars"] for u in idle) * HOURS_PER_MONTH, abs=0.005)
    assert s["idle_reserved_monthly_dollars"] >= 2 * H100 * 730 - 0.005
    assert s["idle_reserved_hourly_dollars_by_team"]["research"] == pytest.approx(2 * H100, rel=REL)
    assert s["node_hourly_dollars"] == pytest.approx(8 * H100, rel=REL)


# --- price precedence through the whole agent ---------------------------------------------------------------
def _demo_with_annotation(tmp_path: Path, price: str) -> str:
    node = builtin_scenario("demo")["node"]
    node["annotations"] = {"gpucap.io/gpu-hourly-price": price}
    return write_scenario(tmp_path, "annotated", {"extends": "demo", "node": node})


def _prices(scenario: str, config: object = None) -> set[tuple[float, str]]:
    with simulated(scenario, config) as rt:  # type: ignore[arg-type]
        m = parse(render(run_to(rt, 10)))
    return {(v, lb["price_source"]) for lb, v in samples(m, "gpucap_gpu_hourly_price_dollars")}


def test_node_annotation_price_wins(tmp_path: Path) -> None:
    path = _demo_with_annotation(tmp_path, "3.5")
    assert _prices(path) == {(3.5, "node_annotation")}
    by_model = config_from_dict({"pricing": {"gpu_hourly_by_model": {"H100-80GB": 5.0}}}, "test-config")
    assert _prices(path, by_model) == {(3.5, "node_annotation")}  # over any config override


def test_config_override_by_model_beats_the_catalog() -> None:
    cfg = config_from_dict({"pricing": {"gpu_hourly_by_model": {"NVIDIA H100 80GB HBM3": 5.0}}}, "test-config")
    assert _prices("demo", cfg) == {(5.0, "config_model")}
    assert _prices("demo") == {(H100, "catalog_instance_type")}


def test_malformed_annotation_is_ignored_for_the_catalog_price(tmp_path: Path) -> None:
    assert _prices(_demo_with_annotation(tmp_path, "cheap")) == {(H100, "catalog_instance_type")}
