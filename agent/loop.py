"""Schedules collectors (own interval + timeout), catches everything, publishes an AgentState.

Each collector runs on its own thread through a one-slot executor: a call that outlives its
timeout is reported as failed (`timeout`) and no second call is started while it still hangs, so
one stuck source can never pile up threads or delay the others. Scrapes only read `state`.
In simulation (and tests) `run_until` drives the same code synchronously over simulated time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from agent.model import AgentState, CollectorStatus
from collectors.base import Collector, SourceError, SourceUnavailable
from agent.clock import Clock

log = logging.getLogger("gpucap.loop")

MAX_BACKOFF = 300.0


@dataclass
class Source:
    collector: Collector
    interval: float
    timeout: float
    value: Any = None
    at: float | None = None
    success: bool = False
    duration: float = 0.0
    last_success: float | None = None
    last_error: str = ""
    errors: Counter = field(default_factory=Counter)
    failures: int = 0
    next_due: float = 0.0
    _future: Future | None = None
    _executor: ThreadPoolExecutor | None = None
    _last_log: float = -1e18

    @property
    def name(self) -> str:
        return self.collector.name

    def status(self) -> CollectorStatus:
        extra = getattr(self.collector, "errors_total", None)
        errs = Counter(self.errors)
        if isinstance(extra, dict):
            for k, v in extra.items():
                errs[k if isinstance(k, str) else (k[1] if isinstance(k, tuple) and len(k) > 1 else str(k))] += v
        return CollectorStatus(self.name, self.success, self.duration, self.last_success, self.last_error,
                               tuple(sorted(errs.items())))


Evaluate = Callable[[dict[str, Any], list[CollectorStatus], float], AgentState]


class Agent:
    def __init__(self, sources: list[Source], evaluate: Evaluate, clock: Clock, *,
                 on_state: Callable[[AgentState], None] | None = None):
        self.sources = {s.name: s for s in sources}
        self.evaluate = evaluate
        self.clock = clock
        self.on_state = on_state
        self.state: AgentState | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._threads: list[threading.Thread] = []
        self.evaluations = 0
        self.last_evaluation_real = 0.0

    # --- one collection --------------------------------------------------------------------
    def _record(self, s: Source, now: float, value: Any = None, error: BaseException | None = None,
                duration: float = 0.0, kind: str = "") -> None:
        s.duration = duration
        if error is None:
            s.value, s.at, s.success, s.last_success, s.last_error, s.failures = value, now, True, now, "", 0
            s.next_due = now + s.interval
            return
        s.success = False
        s.failures += 1
        kind = kind or ("unavailable" if isinstance(error, SourceUnavailable)
                        else "error" if isinstance(error, SourceError) else "exception")
        s.errors[kind] += 1
        s.last_error = str(error) or type(error).__name__
        backoff = min(MAX_BACKOFF, s.interval * (2 ** min(s.failures - 1, 6))) if kind == "unavailable" else s.interval
        s.next_due = now + backoff
        # rate-limited: once a minute of real time per source, with the collector named
        real = time.monotonic()
        if real - s._last_log >= 60.0 or s.failures == 1:
            s._last_log = real
            exc_info = error if kind == "exception" else None
            log.warning("collector %s failed (%s): %s", s.name, kind, s.last_error,
                        extra={"collector": s.name}, exc_info=exc_info)

    def collect_now(self, s: Source, now: float) -> None:
        """Synchronous collection (snapshot, simulation fast-forward, tests): no timeout thread."""
        t0 = time.perf_counter()
        try:
            value = s.collector.collect(now)
        except Exception as e:  # noqa: BLE001 - a source never takes the agent down
            self._record(s, now, error=e, duration=time.perf_counter() - t0)
        else:
            self._record(s, now, value=value, duration=time.perf_counter() - t0)

    def _collect_with_timeout(self, s: Source) -> None:
        now = self.clock.now()
        if s._executor is None:
            s._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gpucap-{s.name}")
        if s._future is not None and not s._future.done():
            self._record(s, now, error=TimeoutError(f"previous call still running after {s.timeout:g}s"),
                         kind="timeout", duration=s.timeout)
            return
        t0 = time.perf_counter()
        s._future = s._executor.submit(s.collector.collect, now)
        try:
            value = s._future.result(timeout=s.timeout)
        except FutureTimeout:
            self._record(s, now, error=TimeoutError(f"no answer within {s.timeout:g}s"), kind="timeout",
                         duration=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            self._record(s, now, error=e, duration=time.perf_counter() - t0)
        else:
            self._record(s, now, value=value, duration=time.perf_counter() - t0)
        self._dirty.set()

    # --- evaluation ------------------------------------------------------------------------
    def evaluate_now(self, now: float) -> AgentState:
        with self._lock:
            values = {name: s.value for name, s in self.sources.items()}
            statuses = [s.status() for s in self.sources.values()]
            state = self.evaluate(values, statuses, now)
            self.state = state
            self.evaluations += 1
            self.last_evaluation_real = time.monotonic()
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                log.exception("history write failed")
        return state

    def step(self, now: float) -> AgentState:
        """Run every due collector synchronously at `now`, then evaluate."""
        for s in self.sources.values():
            if now >= s.next_due:
                self.collect_now(s, now)
        return self.evaluate_now(now)

    def run_until(self, clock: Any, until: float, step: float) -> AgentState:
        """Fast-forward a virtual SimClock to `until` in `step`s (simulation: snapshot --at, recommend)."""
        state = self.step(clock.now())
        while clock.now() + 1e-9 < until:
            clock.advance(min(step, until - clock.now()))
            state = self.step(clock.now())
        return state

    # --- daemon ----------------------------------------------------------------------------
    def start(self) -> None:
        for s in self.sources.values():
            t = threading.Thread(target=self._source_loop, args=(s,), name=f"gpucap-loop-{s.name}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._eval_loop, name="gpucap-evaluate", daemon=True)
        t.start()
        self._threads.append(t)

    def _source_loop(self, s: Source) -> None:
        while not self._stop.is_set():
            try:
                self._collect_with_timeout(s)
            except Exception:
                log.exception("collector %s loop error", s.name)
            wait = max(0.0, s.next_due - self.clock.now())
            speed = getattr(self.clock, "speed", 1.0) if getattr(self.clock, "realtime", True) else 1.0
            self._stop.wait(max(0.05, wait / max(speed, 1e-9)))

    def _eval_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(timeout=5.0)
            self._dirty.clear()
            if self._stop.is_set():
                return
            try:
                self.evaluate_now(self.clock.now())
            except Exception:
                log.exception("evaluation failed")
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        for s in self.sources.values():
            if s._executor is not None:
                s._executor.shutdown(wait=False, cancel_futures=True)
        for t in self._threads:
            t.join(timeout=2.0)

    def close(self) -> None:
        self.stop()
        for s in self.sources.values():
            try:
                s.collector.close()
            except Exception:
                log.debug("close of %s failed", s.name, exc_info=True)
