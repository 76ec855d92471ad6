"""Headless fast-forward of a simulated node: a week of history in seconds, through the real collectors.

`snapshot --at`, `cost --simulate` and `recommend --simulate` all need the agent to have run for
days of simulated time. Stepping it every NVML interval (10 s) costs 60,480 full cycles a week,
about six minutes here. Fast-forward instead:

- steps every `FAST_STEP` (60 s) and tells the evaluator, which then samples like an agent whose
  interval is 60 s (an interval of up to 3 steps is observed time, not a gap). Every source whose
  interval is shorter is simply read once per step; one with a longer interval keeps its own.
- reads the slow sources (the kubelet's PodResources and the Kubernetes API) for real, through
  their own collectors, sockets and parsers, whenever the simulator says their answer may have
  changed (a pod started or ended, a fault of that source is active) and at least every
  `REPOLL` seconds; in between, the collector's last reading is served again. The simulator's
  answers are pure functions of the pod set and the faults, so a real read there would return
  the same value: this is the only shortcut, and it is taken only when the simulator proves it.
- scrapes the inference servers every 5 minutes instead of every 15 s (`FAST_INTERVALS`; their
  counters are cumulative, so the 15-minute outcome windows still get their deltas), with the max
  age scaled alike (3× the interval).
- keeps everything else unchanged: NVML over the simulated driver, /proc, the inference HTTP
  scrapes, the evaluation and its `on_state` hooks run at every step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from agent.model import AgentState

log = logging.getLogger("gpucap.simulate")

FAST_STEP = 60.0  # the finest default step; longer runs step coarser so they stay within MAX_STEPS
MAX_STEPS = 3000
MAX_STEP = 300.0
REPOLL = 3600.0
# Up to this long, fast-forward samples exactly as the daemon would (every NVML interval, every
# source at its own interval, no reuse): short runs are cheap and stay bit-for-bit comparable.
FINE_UP_TO = 3600.0
# Sources read less often than every step in fast-forward: an inference scrape is an HTTP request
# per server (~0.6 ms each here) whose counters are cumulative, so reading them every 5 minutes
# still gives every 15-minute outcome window its deltas.
FAST_INTERVALS = {"inference": 300.0}
# The slow sources, by collector name → the simulator's name for the source whose faults affect them.
SLOW_SOURCES = {"podresources": "kubelet", "kubernetes": "kubernetes"}


class ReusedReading:
    """A collector wrapper that serves the last reading again while the simulator proves it unchanged.

    `key()` is the simulator's fingerprint of everything the answer depends on, or None when it
    cannot promise anything (a fault of the source is active): then every call is a real one.
    Attributes other than `collect` (name, needs, errors_total, close) are the collector's own.
    """

    def __init__(self, collector: Any, key: Callable[[], Hashable | None], repoll: float = REPOLL):
        self.inner = collector
        self._key = key
        self._repoll = repoll
        self._last: tuple[Hashable, float, Any] | None = None  # (key, real read time, value)
        self.real = 0
        self.reused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def collect(self, now: float, inputs: Mapping[str, Any] | None = None) -> Any:
        key = self._key()
        last = self._last
        if key is not None and last is not None and last[0] == key and 0 <= now - last[1] < self._repoll:
            self.reused += 1
            return last[2]
        self._last = None
        value = self.inner.collect(now) if inputs is None else self.inner.collect(now, inputs)
        self.real += 1
        if key is not None:
            self._last = (key, now, value)
        return value


def default_step(seconds: float) -> float:
    """60 s, coarser for long runs so a run is at most MAX_STEPS cycles, never coarser than 5 min.

    7 d: 202 s, 30 d: 300 s. Why not always 60 s: a cycle costs 6-8 ms here (NVML over the
    simulated driver, /proc, the evaluation, an inference scrape every 5 min), so a week at 60 s
    would take over a minute; why at most 5 min: the step stays a sixth of the 30-minute idle window."""
    return float(min(MAX_STEP, max(FAST_STEP, math.ceil(seconds / MAX_STEPS))))


def fast_forward(runtime: Any, seconds: float, step: float | None = None,
                 on_progress: Callable[[float], None] | None = None,
                 on_state: Callable[[AgentState], None] | None = None, *, reuse: bool = True) -> AgentState:
    """Run a simulated runtime's agent `seconds` of simulated time forward; return the last state.

    `on_state(state)` runs after every evaluation (after the runtime's own hooks, e.g. the ledger);
    `on_progress(fraction)` about every 1% of the way. `reuse=False` reads every source at its
    own interval, for real (for comparisons). Intervals, max ages and collectors are restored
    afterwards, so the runtime can go on (e.g. a final snapshot). Without a `step`, a run of up to
    an hour samples exactly as the daemon would (`FINE_UP_TO`); longer runs use `default_step`.
    """
    agent = runtime.agent
    clock = runtime.clock
    if step is None:
        config = getattr(runtime, "config", None)
        if seconds <= FINE_UP_TO and config is not None:
            step, reuse = config.nvml.interval, False
        else:
            step = default_step(seconds)
    if step <= 0:
        raise ValueError(f"fast-forward step must be > 0, got {step!r}")
    env = getattr(runtime, "env", None)
    wrapped: dict[str, Any] = {}
    saved = {name: (s.interval, s.max_age) for name, s in agent.sources.items()}
    if reuse and env is not None and hasattr(env, "answer_key"):
        for name, sim_source in SLOW_SOURCES.items():
            s = agent.sources.get(name)
            if s is None or isinstance(s.collector, ReusedReading):
                continue
            wrapped[name] = s.collector
            s.collector = ReusedReading(s.collector, lambda src=sim_source: env.answer_key(src))
    for name, every in FAST_INTERVALS.items() if reuse else ():
        s = agent.sources.get(name)
        if s is not None and s.interval < every:
            s.interval = max(every, step)
            s.max_age = max(s.max_age, 3.0 * s.interval)
    previous = agent.on_state
    if on_state is not None:
        def both(state: AgentState) -> None:
            if previous is not None:
                try:
                    previous(state)
                except Exception:  # the ledger's failure is counted there; the caller's hook still runs
                    log.exception("history write failed")
            on_state(state)
        agent.on_state = both
    try:
        return agent.run_until(clock, clock.now() + seconds, step, on_progress=on_progress)
    finally:
        agent.on_state = previous
        for name, (interval, max_age) in saved.items():
            agent.sources[name].interval, agent.sources[name].max_age = interval, max_age
        for name, collector in wrapped.items():
            agent.sources[name].collector = collector
