"""Fast-forward (agent/simulate.py) gives the numbers a fine-step run gives, only sooner.

The comparisons run the same scenario twice: once stepped every NVML interval (10 s, every source
read for real at its own interval, as the daemon samples) and once fast-forwarded (60 s steps,
slow sources re-served while the simulator proves them unchanged, inference every 5 minutes).
Dollars by state must agree within 0.5%.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.simulate import MAX_STEP, MAX_STEPS, ReusedReading, default_step, fast_forward
from tests.helpers import collected, run_to, simulated, total, write_scenario

STATES = ("active", "idle_reserved", "lost", "unallocated", "unknown")
HOURS = 4


def dollars_by_state(state: object) -> dict[str, float]:
    got = collected(state)  # type: ignore[arg-type]
    return {s: total(got, "gpucap_cost_dollars_total", state=s) for s in STATES}


def fine_and_fast(scenario: str, seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    with simulated(scenario) as rt:
        fine = dollars_by_state(run_to(rt, seconds, 10.0))
    with simulated(scenario) as rt:
        fast = dollars_by_state(fast_forward(rt, seconds, step=60.0))
    return fine, fast


def assert_close(fine: dict[str, float], fast: dict[str, float], slack: float) -> None:
    for s in STATES:
        # 0.5% of the state's dollars, or `slack` dollars for a state with almost none
        assert fast[s] == pytest.approx(fine[s], rel=0.005, abs=slack), s


def test_fast_forward_books_the_same_dollars_by_state_as_ten_second_steps() -> None:
    fine, fast = fine_and_fast("demo", HOURS * 3600)
    node = sum(fine.values())
    assert sum(fast.values()) == pytest.approx(node, rel=1e-6)  # no time lost or double counted
    assert fine["idle_reserved"] > 0.2 * node  # the notebook's two GPUs, idle all along
    assert fine["active"] > 0.5 * node  # the training job and the servers
    assert_close(fine, fast, 0.001 * node)


def test_a_kubelet_outage_is_seen_as_in_a_fine_run(tmp_path: Path) -> None:
    # while the kubelet is down no reading is re-served: its units go unknown exactly as often
    path = write_scenario(tmp_path, "kubelet-out", {
        "extends": "demo", "faults": [{"kind": "source_down", "source": "kubelet", "at": "1h", "until": "2h"}]})
    fine, fast = fine_and_fast(path, 3 * 3600)
    node = sum(fine.values())
    assert fine["unknown"] > 0.2 * node
    # The only difference is where each edge of the outage falls: a fine run keeps the last kubelet
    # reading for its max age (30 s) into the outage, a 60 s step sees it gone at the next step.
    one_step = node / 3 * 60 / 3600
    for s in STATES:
        assert abs(fast[s] - fine[s]) <= one_step, s


def test_hooks_see_every_evaluation_and_the_runtime_is_left_as_found() -> None:
    with simulated("demo") as rt:
        before = {n: (s.interval, s.max_age, s.collector) for n, s in rt.agent.sources.items()}
        states: list[object] = []
        progress: list[float] = []
        evaluations = rt.agent.evaluations
        last = fast_forward(rt, 2 * 3600, step=60.0, on_state=states.append, on_progress=progress.append)
        assert len(states) == rt.agent.evaluations - evaluations == 2 * 60 + 1
        assert states[-1] is last
        assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) >= 50
        after = {n: (s.interval, s.max_age, s.collector) for n, s in rt.agent.sources.items()}
        assert after == before
        assert not any(isinstance(s.collector, ReusedReading) for s in rt.agent.sources.values())


def test_slow_sources_are_read_for_real_only_when_their_answer_can_change() -> None:
    with simulated("demo") as rt:
        reused: dict[str, ReusedReading] = {}
        original = ReusedReading.collect

        def spy(self: ReusedReading, now: float, inputs: object = None) -> object:
            reused[self.inner.name] = self
            return original(self, now, inputs)  # type: ignore[arg-type]

        ReusedReading.collect = spy  # type: ignore[method-assign]
        try:
            state = fast_forward(rt, 4 * 3600, step=60.0)
        finally:
            ReusedReading.collect = original  # type: ignore[method-assign]
        # demo's pods never change: one real read per hour (REPOLL), the rest re-served
        assert reused["podresources"].real <= 5 and reused["podresources"].reused >= 230
        assert reused["kubernetes"].real <= 5
        assert all(c.success for c in state.collectors)


def test_long_runs_step_coarser_but_never_past_five_minutes() -> None:
    assert default_step(3600) == 60.0
    assert default_step(7 * 86400) == 202.0  # 7 d in ≤ MAX_STEPS cycles
    assert 7 * 86400 / default_step(7 * 86400) <= MAX_STEPS
    assert default_step(30 * 86400) == MAX_STEP == 300.0
    with simulated("demo") as rt, pytest.raises(ValueError, match="step"):
        fast_forward(rt, 60, step=0)
