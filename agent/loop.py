"""Schedules collectors (own interval + timeout), catches everything, publishes an AgentState.

Each collector runs on its own thread through a one-slot executor: a call that outlives its
timeout is reported as failed (`timeout`) and no second call is started while it still hangs, so
one stuck source can never pile up threads or delay the others. Scrapes only read `state`.
In simulation (and tests) `run_until` drives the same code synchronously over simulated time.

Every evaluation gets a `Snapshot`: each source's value only while it is younger than the
source's max age (older readings are dropped, never served as current), with its status and skip
counts. A collector that needs another's reading (processes needs NVML's pids, inference needs
the pods) declares it in `needs` and gets the fresh value passed in.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from agent.clock import Clock
from agent.model import SNAPSHOT_SOURCES, AgentState, CollectorStatus, Snapshot, SourceReading
from collectors.base import Collector, SourceError, SourceUnavailable
from collectors.redact import redact_text

log = logging.getLogger("gpucap.loop")

MAX_BACKOFF = 60.0  # an unreachable source is retried at least once a minute: it comes back quickly
MAX_WAIT = 3600.0  # real seconds a source thread sleeps at most between loops
STALL_SLACK = 30.0  # real seconds past its next expected loop before a source thread counts as stalled
FREEZE_AFTER = 5  # evaluations before start-up's objects are frozen out of the cyclic GC (every source has read)
SETTLE_S = 0.5  # seconds an evaluation waits after the first new reading, for the others landing with it
MIN_GAP_S = 0.2  # real seconds between evaluations at least
WATCHDOG_PERIOD = 1.0


@dataclass
class Source:
    collector: Collector
    interval: float
    timeout: float
    max_age: float = 0.0  # 0: 3× the interval
    enabled: bool = True
    value: Any = None
    at: float | None = None  # wall time of the value
    at_mono: float | None = None  # monotonic time of the value (freshness is judged on this)
    success: bool = False
    duration: float = 0.0
    last_success: float | None = None
    last_error: str = ""
    last_kind: str = ""
    failing_since: float | None = None
    errors: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    failures: int = 0
    next_due: float = 0.0  # monotonic
    _future: Future | None = None
    _last_log: float = -1e18
    _last_logged_cause: str = ""
    _thread: threading.Thread | None = None
    _generation: int = 0  # bumped when the watchdog replaces a dead or stalled source thread
    _beat_by: float = 0.0  # real monotonic time by which the source thread must loop again
    restarts: int = 0

    def __post_init__(self) -> None:
        if self.max_age <= 0:
            self.max_age = 3.0 * self.interval

    @property
    def name(self) -> str:
        return self.collector.name

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(getattr(self.collector, "needs", ()) or ())

    def age(self, mono: float) -> float | None:
        return None if self.at_mono is None else max(0.0, mono - self.at_mono)

    def fresh_value(self, mono: float) -> Any:
        age = self.age(mono)
        return self.value if age is not None and age <= self.max_age else None

    def status(self, mono: float) -> CollectorStatus:
        extra = getattr(self.collector, "errors_total", None)
        errs = Counter(self.errors)
        if isinstance(extra, dict):
            for k, v in extra.items():
                errs[k if isinstance(k, str) else (k[1] if isinstance(k, tuple) and len(k) > 1 else str(k))] += v
        age = self.age(mono)
        return CollectorStatus(
            self.name, self.success, self.duration, self.last_success, self.last_error,
            tuple(sorted(errs.items())), enabled=self.enabled,
            data_age=age if age is not None and age <= self.max_age else None, max_age=self.max_age,
            skipped=tuple(sorted(self.skipped.items())), last_error_kind=self.last_kind,
            failing_since=self.failing_since,
        )

    def reading(self, mono: float) -> SourceReading[Any]:
        value = self.fresh_value(mono)
        return SourceReading(self.status(mono), value, self.at if value is not None else None,
                             expired=value is None and self.value is not None)


Evaluate = Callable[[Snapshot], AgentState]


class Agent:
    def __init__(self, sources: list[Source], evaluate: Evaluate, clock: Clock, *,
                 on_state: Callable[[AgentState], None] | None = None,
                 fallback: Callable[[Snapshot, BaseException], AgentState] | None = None):
        self.sources = {s.name: s for s in sources}
        self.evaluate = evaluate
        self.fallback = fallback
        self.clock = clock
        self.on_state = on_state
        self.state: AgentState | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self.gc_frozen = False  # start-up's objects are out of the cyclic GC (after FREEZE_AFTER evaluations)
        self._threads: list[threading.Thread] = []
        self.evaluations = 0
        self.evaluation_errors = 0
        self.last_evaluation_real = 0.0
        self._watchdog_beat = time.monotonic()
        self._last_eval_error = ""

    # --- one collection --------------------------------------------------------------------
    def _record(self, s: Source, now: float, mono: float, value: Any = None, error: BaseException | None = None,
                duration: float = 0.0, kind: str = "") -> None:
        s.duration = duration
        if error is None:
            if s.failing_since is not None:
                log.info("collector %s recovered", s.name, extra={"collector": s.name})
            s.value, s.at, s.at_mono, s.success, s.last_success = value, now, mono, True, now
            s.last_error, s.last_kind, s.failures, s.failing_since = "", "", 0, None
            s.next_due = mono + s.interval
            skipped = getattr(value, "skipped_items", None)
            if callable(skipped):
                for reason, n in skipped():
                    s.skipped[reason] += n
            return
        s.success = False
        s.failures += 1
        kind = kind or ("unavailable" if isinstance(error, SourceUnavailable)
                        else "error" if isinstance(error, SourceError) else "exception")
        if not getattr(error, "already_counted", False):  # a collector that counts its own failures
            s.errors[kind] += 1
        s.last_error = redact_text(str(error) or type(error).__name__)  # shown in logs, JSON and the table
        s.last_kind = kind
        if s.failing_since is None:
            s.failing_since = now
        backoff = min(MAX_BACKOFF, s.interval * (2 ** min(s.failures - 1, 6))) if kind == "unavailable" else s.interval
        s.next_due = mono + backoff
        # rate-limited: once a minute of real time per source, with the collector named
        real = time.monotonic()
        cause = f"{kind}: {s.last_error}"
        if real - s._last_log >= 60.0 or s.failures == 1 or cause != s._last_logged_cause:
            s._last_log, s._last_logged_cause = real, cause
            exc_info = error if kind == "exception" else None
            log.warning("collector %s failed (%s): %s", s.name, kind, s.last_error,
                        extra={"collector": s.name}, exc_info=exc_info)

    def _inputs(self, s: Source, mono: float) -> Mapping[str, Any] | None:
        if not s.needs:
            return None
        return {n: (self.sources[n].fresh_value(mono) if n in self.sources else None) for n in s.needs}

    def _call(self, s: Source, now: float, mono: float) -> Any:
        inputs = self._inputs(s, mono)
        return s.collector.collect(now) if inputs is None else s.collector.collect(now, inputs)

    def collect_now(self, s: Source, now: float, mono: float | None = None) -> None:
        """Synchronous collection (snapshot, simulation fast-forward, tests): no timeout thread."""
        mono = self.clock.monotonic() if mono is None else mono
        t0 = time.perf_counter()
        try:
            value = self._call(s, now, mono)
        except Exception as e:  # noqa: BLE001 - a source never takes the agent down
            self._record(s, now, mono, error=e, duration=time.perf_counter() - t0)
        else:
            self._record(s, now, mono, value=value, duration=time.perf_counter() - t0)

    def _collect_with_timeout(self, s: Source) -> None:
        now, mono = self.clock.now(), self.clock.monotonic()
        if s._future is not None and not s._future.done():
            self._record(s, now, mono, error=TimeoutError(f"previous call still running after {s.timeout:g}s"),
                         kind="timeout", duration=s.timeout)
            return
        t0 = time.perf_counter()
        s._future = _run_in_daemon(f"gpucap-{s.name}", self._call, s, now, mono)
        try:
            value = s._future.result(timeout=s.timeout)
        except (FutureTimeout, TimeoutError):
            self._record(s, now, mono, error=TimeoutError(f"no answer within {s.timeout:g}s"), kind="timeout",
                         duration=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            self._record(s, now, mono, error=e, duration=time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - SystemExit & co. from a collector fail its cycle only
            self._record(s, now, mono, error=RuntimeError(f"{type(e).__name__}: {e}"), kind="exception",
                         duration=time.perf_counter() - t0)
        else:
            self._record(s, now, mono, value=value, duration=time.perf_counter() - t0)
        self._dirty.set()

    # --- evaluation ------------------------------------------------------------------------
    def snapshot(self, now: float, mono: float) -> Snapshot:
        readings = {name: s.reading(mono) for name, s in self.sources.items() if s.enabled}
        known = {k: readings[k] for k in SNAPSHOT_SOURCES if k in readings}
        others = tuple(r for k, r in readings.items() if k not in SNAPSHOT_SOURCES)
        return Snapshot(time=now, mono=mono, others=others, **known)

    def evaluate_now(self, now: float | None = None) -> AgentState:
        with self._lock:
            mono = self.clock.monotonic()
            now = self.clock.now() if now is None else now
            snap = self.snapshot(now, mono)
            self.last_evaluation_real = time.monotonic()
            try:
                state = self.evaluate(snap)
                if self._last_eval_error:
                    log.info("evaluation succeeds again")
                self._last_eval_error = ""
            except Exception as e:
                self.evaluation_errors += 1
                cause = f"{type(e).__name__}: {e}"
                if cause != self._last_eval_error:
                    log.error("evaluation failed: %s", cause, exc_info=e)
                self._last_eval_error = cause
                if self.fallback is None:
                    raise
                state = self.fallback(snap, e)
            self.state = state
            self.evaluations += 1
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                log.exception("history write failed")
        return state

    def step(self, now: float | None = None) -> AgentState:
        """Run every due collector synchronously, then evaluate."""
        now = self.clock.now() if now is None else now
        mono = self.clock.monotonic()
        for s in self.sources.values():
            if s.enabled and mono >= s.next_due:
                self.collect_now(s, now, mono)
        return self.evaluate_now(now)

    def run_until(self, clock: Any, until: float, step: float,
                  on_progress: Callable[[float], None] | None = None) -> AgentState:
        """Fast-forward a virtual SimClock to wall time `until` in `step`s (snapshot --at, recommend).

        Stepping every `step` seconds is sampling as an agent whose interval is `step` would: the
        evaluator is told, so an interval of `step` counts as observed, not as a gap.
        `on_progress(fraction done)` is called about every 1% of the way and once at the end."""
        observe = getattr(self.evaluate, "observe_step", None)
        if callable(observe):
            observe(step)
        start = clock.now()
        span = until - start
        every = max(1, int(span / step / 100)) if span > 0 else 1
        state = self.step(start)
        n = 0
        while clock.now() + 1e-9 < until:
            clock.advance(min(step, until - clock.now()))
            state = self.step(clock.now())
            n += 1
            if on_progress is not None and n % every == 0:
                on_progress(min(1.0, (clock.now() - start) / span))
        if on_progress is not None:
            on_progress(1.0)
        return state

    # --- daemon ----------------------------------------------------------------------------
    def start(self) -> None:
        for s in self.sources.values():
            if s.enabled:
                self._start_source(s)
        for target, name in ((self._eval_loop, "gpucap-evaluate"), (self._watchdog, "gpucap-watchdog")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _start_source(self, s: Source) -> None:
        s._generation += 1
        s._beat_by = time.monotonic() + s.timeout + STALL_SLACK
        t = threading.Thread(target=self._source_loop, args=(s, s._generation), name=f"gpucap-loop-{s.name}",
                             daemon=True)
        s._thread = t
        t.start()

    def _speed(self) -> float:
        """Simulated seconds per real second (1 on a node; `run --simulate --speed N`)."""
        speed = getattr(self.clock, "speed", 1.0) if getattr(self.clock, "realtime", True) else 1.0
        return max(speed, 1e-9)

    def _source_loop(self, s: Source, generation: int) -> None:
        while not self._stop.is_set() and s._generation == generation:
            try:
                self._collect_with_timeout(s)
            except Exception:
                log.exception("collector %s loop error", s.name)
            wait = max(0.0, s.next_due - self.clock.monotonic())
            # capped: a huge interval (or a clock gone wrong) must not overflow the wait and kill the thread
            real_wait = min(MAX_WAIT, max(0.05, wait / self._speed()))
            s._beat_by = time.monotonic() + real_wait + s.timeout + STALL_SLACK
            self._stop.wait(real_wait)

    def _watchdog(self) -> None:
        """A source thread that died or stopped looping is a failed collection of kind `stalled`,
        and it is replaced: the agent heals itself instead of serving a frozen reading as fresh."""
        while not self._stop.wait(WATCHDOG_PERIOD):
            try:
                self.check_sources()
            except Exception:
                log.exception("watchdog check failed")
            self._watchdog_beat = time.monotonic()

    def check_sources(self) -> list[str]:
        """Restart every dead or stalled source thread; returns the names restarted."""
        restarted = []
        real = time.monotonic()
        for s in self.sources.values():
            if not s.enabled or s._thread is None:
                continue
            dead = not s._thread.is_alive()
            if not dead and real <= s._beat_by:
                continue
            why = "its thread died" if dead else "its thread stopped looping"
            self._record(s, self.clock.now(), self.clock.monotonic(), kind="stalled",
                         error=RuntimeError(f"collector loop stalled ({why}); restarted"))
            s.restarts += 1
            restarted.append(s.name)
            self._start_source(s)
            self._dirty.set()
        return restarted

    def alive(self) -> tuple[bool, str]:
        """Liveness (/healthz): the evaluation thread and the watchdog run. A failing source is not
        a reason to restart the pod (the watchdog heals it); a wedged agent is."""
        if self._threads:
            dead = [t.name for t in self._threads if not t.is_alive()]
            if dead and not self._stop.is_set():
                return False, f"thread(s) {', '.join(dead)} died"
            if time.monotonic() - self._watchdog_beat > 10 * WATCHDOG_PERIOD + 30.0:
                return False, "watchdog stopped"
        return True, ""

    def ready(self, names: tuple[str, ...] = ("nvml", "podresources")) -> tuple[bool, str]:
        """Readiness (/readyz): NVML and the kubelet answered within their max age."""
        mono = self.clock.monotonic()
        parts, ok = [], True
        for name in names:
            s = self.sources.get(name)
            if s is None or not s.enabled:
                continue
            fresh = s.fresh_value(mono) is not None
            ok = ok and fresh
            parts.append(f"{name} {'ok' if fresh else 'no fresh reading' + (': ' + s.last_error if s.last_error else '')}")
        return ok, "; ".join(parts)

    def _eval_loop(self) -> None:
        evaluations = 0
        while not self._stop.is_set():
            self._dirty.wait(timeout=5.0)
            # collections that finish together (each source's timer, processes after NVML, inference
            # after Kubernetes) make one evaluation, not one each: on `large` 3.5 evaluations per
            # 10 s became 2.0 (four collection moments and two 5 s refreshes per 30 s)
            if self._stop.wait(SETTLE_S / self._speed()):
                return
            self._dirty.clear()
            try:
                self.evaluate_now()
            except Exception:
                log.exception("evaluation failed")
            evaluations += 1
            if evaluations == FREEZE_AFTER:
                # what start-up built (modules, clients, the first readings: ~160,000 objects) lives as
                # long as the process: kept out of the cyclic collector, whose full passes over it cost
                # ~130 ms each, triggered by the allocations of encoding /metrics (docs/performance.md)
                gc.collect()
                gc.freeze()
                self.gc_frozen = True
            self._stop.wait(MIN_GAP_S)  # a sped-up simulation evaluates at most 5 times a real second

    def stop(self, deadline: float = 1.0) -> None:
        """Stop every loop without waiting past `deadline` seconds in total: a collector call that
        hangs (a wedged GPU in an NVML call) runs on a daemon thread and is abandoned, never joined."""
        self._stop.set()
        self._dirty.set()
        end = time.monotonic() + deadline
        threads = self._threads + [s._thread for s in self.sources.values() if s._thread is not None]
        for t in threads:
            t.join(timeout=max(0.0, end - time.monotonic()))

    def close(self, deadline: float = 1.0) -> None:
        """Stop, then close each collector, each close bounded too (closing NVML may hang like any call)."""
        self.stop(deadline)
        self.close_collectors(deadline)

    def close_collectors(self, deadline: float = 1.0) -> None:
        """Close each collector (after `stop`), within `deadline` seconds in total."""
        end = time.monotonic() + deadline
        for s in self.sources.values():
            left = end - time.monotonic()
            if left <= 0:
                log.warning("not closing collector %s: shutdown deadline passed", s.name)
                continue
            done = _run_in_daemon(f"gpucap-close-{s.name}", s.collector.close)
            try:
                done.result(timeout=left)
            except (FutureTimeout, TimeoutError):
                log.warning("closing collector %s did not finish in time; abandoned", s.name)
            except Exception:
                log.debug("close of %s failed", s.name, exc_info=True)


def _run_in_daemon(name: str, fn: Callable[..., Any], *args: Any) -> Future:
    """Run `fn` on a new daemon thread: a call that never returns cannot block the interpreter's
    exit (ThreadPoolExecutor's workers are joined at exit, which kept a SIGTERMed agent alive for as
    long as its NVML call hung). One thread per call is cheap at collection rates."""
    future: Future = Future()
    future.set_running_or_notify_cancel()

    def body() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(e)

    threading.Thread(target=body, name=name, daemon=True).start()
    return future
