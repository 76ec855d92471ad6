"""Fault injection against the whole agent (issue 13, item 6). Each fault asserts the same four
things: the agent keeps serving (a render of the state, which is all a scrape does), the right
`gpucap_collector_*` series show the fault, nothing unrelated changes, and recovery is automatic.
Misbehaving servers (inference bodies garbage, HTML, huge, cut short, redirecting, flapping; the API
server 503 or refusing; a huge kubelet reply) are set by hand on the simulator's real servers; faults
that need real time (hangs) or one collector's view are tested beside their collectors;
docs/reliability.md has the table."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent.exposition import render
from tests.helpers import START, builtin_scenario, collected, simulated, write_scenario

ROOT = Path(__file__).resolve().parents[2]
SOURCE_COLLECTOR = {"nvml": "nvml", "kubelet": "podresources", "kubernetes": "kubernetes", "inference": "inference"}


def _success(state) -> dict[str, float]:
    return {labels["collector"]: v for labels, v in collected(state)["gpucap_collector_success"]}


def _scenario(tmp_path: Path, faults: list[dict]) -> str:
    sc = builtin_scenario("demo")
    sc["faults"] = faults
    return write_scenario(tmp_path, "faulty", sc)


def _shown_isolated(during, collector: str) -> None:
    """Still serving; the faulty source shows it (success 0 and errors by kind, or for the API server
    the last known metadata flagged stale); every other source is unaffected."""
    assert render(during)  # still serving
    ok = _success(during)
    if collector == "kubernetes":
        # by design the last known metadata is served, flagged stale, rather than nothing
        assert collected(during)["gpucap_kubernetes_metadata_stale"][0][1] == 1.0
    else:
        assert ok[collector] == 0.0
        errors = {labels["kind"] for labels, v in collected(during)["gpucap_collector_errors_total"]
                  if labels["collector"] == collector and v > 0}
        assert errors, "the failure is counted by kind"
    assert all(v == 1.0 for k, v in ok.items() if k != collector), ok  # nothing unrelated


@pytest.mark.parametrize("source", sorted(SOURCE_COLLECTOR))
def test_a_source_down_is_shown_isolated_and_recovers(tmp_path: Path, source: str) -> None:
    path = _scenario(tmp_path, [{"kind": "source_down", "source": source, "at": "2m", "until": "5m"}])
    collector = SOURCE_COLLECTOR[source]
    with simulated(path) as rt:
        before = rt.agent.run_until(rt.clock, START + 110, 10)
        assert set(_success(before).values()) == {1.0}
        during = rt.agent.run_until(rt.clock, START + 240, 10)
        _shown_isolated(during, collector)
        after = rt.agent.run_until(rt.clock, START + 8 * 60, 10)
        assert _success(after)[collector] == 1.0  # recovered, nobody restarted anything
        assert collected(after)["gpucap_kubernetes_metadata_stale"][0][1] == 0.0


def _set_inference(rt, mode: str) -> None:
    for srv in rt.env.inference_servers.values():
        srv.fault = mode


# Faults set by hand on the simulator's real servers, through the whole agent: (collector, set, clear).
HAND_FAULTS = {
    **{f"inference-{mode}": ("inference", lambda rt, m=mode: _set_inference(rt, m),
                             lambda rt: _set_inference(rt, "ok"))
       for mode in ("garbage", "html", "huge", "truncated", "redirect_loop")},
    "api-503": ("kubernetes", lambda rt: rt.env.api.set_down("503"), lambda rt: rt.env.api.set_up()),
    "api-refused": ("kubernetes", lambda rt: rt.env.api.set_down("refused"), lambda rt: rt.env.api.set_up()),
}


@pytest.mark.parametrize("fault", sorted(HAND_FAULTS))
def test_a_misbehaving_server_is_shown_isolated_and_recovers(fault: str) -> None:
    """Bodies that are garbage, HTML, 50 MiB, cut short or redirect in a loop; an API server that
    answers 503 or refuses connections: the agent serves, shows that source only, and recovers."""
    collector, set_fault, clear = HAND_FAULTS[fault]
    with simulated("demo") as rt:
        before = rt.agent.run_until(rt.clock, START + 110, 10)
        assert set(_success(before).values()) == {1.0}
        set_fault(rt)
        during = rt.agent.run_until(rt.clock, START + 240, 10)
        _shown_isolated(during, collector)
        if collector == "kubernetes":
            owners = {l["workload"] for l, _ in collected(during)["gpucap_pod_info"]}
            assert "notebook-alice" in owners, "the last known metadata is served"
        assert len([v for _, v in collected(during)["gpucap_gpu_up"] if v == 1.0]) == 8
        clear(rt)
        after = rt.agent.run_until(rt.clock, START + 8 * 60, 10)
        assert _success(after)[collector] == 1.0
        assert collected(after)["gpucap_kubernetes_metadata_stale"][0][1] == 0.0


def test_a_flapping_inference_target_never_breaks_the_rest() -> None:
    with simulated("demo") as rt:
        rt.agent.run_until(rt.clock, START + 60, 10)
        for i in range(12):  # up, down, up, … every 20 s
            _set_inference(rt, "http_500" if i % 2 else "ok")
            st = rt.agent.run_until(rt.clock, START + 60 + 20 * (i + 1), 10)
            assert render(st)
            assert {k: v for k, v in _success(st).items() if k != "inference"} == \
                {"nvml": 1.0, "podresources": 1.0, "kubernetes": 1.0, "processes": 1.0}
        _set_inference(rt, "ok")
        after = rt.agent.run_until(rt.clock, START + 8 * 60, 10)
    assert _success(after)["inference"] == 1.0
    assert any(v > 0 for _, v in collected(after)["gpucap_inference_successful_requests_per_second"])


def test_a_kubelet_reply_over_5mib_through_the_whole_agent() -> None:
    with simulated("demo") as rt:
        rt.env.kubelet.set_padding_pods(1000)  # a thousand other pods: a ~10 MiB reply
        st = rt.agent.run_until(rt.clock, START + 120, 10)
    assert _success(st)["podresources"] == 1.0
    held = {l["pod"] for l, v in collected(st)["gpucap_allocated_cost_dollars_per_hour"] if l["pod"]}
    assert "notebook-alice-7d9f8-x2x9k" in held and len(held) == 4


def test_gpu_lost_and_xid_79_touch_that_gpu_only(tmp_path: Path) -> None:
    with simulated("demo-lost-gpu") as rt:
        before = collected(rt.agent.run_until(rt.clock, START + 9 * 60, 10))
        after_state = rt.agent.run_until(rt.clock, START + 12 * 60, 10)
        after = collected(after_state)
    up = {l["gpu"]: v for l, v in after["gpucap_gpu_up"]}
    assert up["5"] == 0.0 and all(v == 1.0 for g, v in up.items() if g != "5")
    xid = {(l["gpu"], l.get("xid")): v for l, v in after["gpucap_gpu_xid_errors_total"]}
    assert any(g == "5" and v >= 1 for (g, _), v in xid.items())
    lost = {l["gpu"] for l, v in after["gpucap_gpu_state"] if l["state"] == "lost" and v == 1}
    assert lost == {"5"}
    assert _success(after_state)["nvml"] == 1.0  # one lost GPU is not a failed source
    others_before = {l["gpu"]: v for l, v in before["gpucap_gpu_memory_total_bytes"] if l["gpu"] != "5"}
    others_after = {l["gpu"]: v for l, v in after["gpucap_gpu_memory_total_bytes"] if l["gpu"] != "5"}
    assert others_before == others_after


def test_nvml_init_failing_then_succeeding_recovers_by_itself(tmp_path: Path) -> None:
    path = _scenario(tmp_path, [{"kind": "nvml_init_failure", "at": "0s", "until": "3m"}])
    with simulated(path) as rt:
        during = rt.agent.run_until(rt.clock, START + 120, 10)
        assert _success(during)["nvml"] == 0.0 and render(during)
        assert {l["state"] for l, v in collected(during).get("gpucap_gpu_state", []) if v == 1} <= {"unknown"}
        after = rt.agent.run_until(rt.clock, START + 6 * 60, 10)
        assert _success(after)["nvml"] == 1.0
        assert len([v for _, v in collected(after)["gpucap_gpu_up"] if v == 1.0]) == 8


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
def test_a_wall_clock_jump_charges_no_negative_cost_and_no_giant_accrual(jump: float) -> None:
    with simulated("demo") as rt:
        st = rt.agent.run_until(rt.clock, START + 600, 10)
        node_price = sum(v for _, v in collected(st)["gpucap_gpu_hourly_price_dollars"])
        total0 = sum(v for _, v in collected(st)["gpucap_cost_dollars_total"])
        rt.clock.step_wall(jump)
        for _ in range(6):  # one simulated minute after the step
            rt.clock.advance(10)
            st = rt.agent.step(rt.clock.now())
        total1 = sum(v for _, v in collected(st)["gpucap_cost_dollars_total"])
    assert total1 >= total0  # never backwards
    # a minute of the node's price (units' prices double-count nothing: shares and MIG add up)
    assert total1 - total0 <= node_price * 61 / 3600 + 1e-6


def test_sigterm_during_history_writes_leaves_the_ledger_intact(tmp_path: Path) -> None:
    history = tmp_path / "history.db"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--simulate", "demo", "--speed", "600",
                             "--listen", f"127.0.0.1:{port}", "--history", str(history)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        time.sleep(3)  # at 600x, minutes are being booked continuously
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    with sqlite3.connect(history) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert tables
        assert any(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] > 0 for t in tables)
    assert not [f for f in os.listdir(tmp_path) if f.endswith("-journal")]
