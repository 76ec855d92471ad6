"""Stateful derivations over successive evaluations: idle state machine, cost accrual, saturation,
cost per successful outcome. Time comes in as `now`, so 30 idle minutes pass instantly in tests.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import IdleConfig, SaturationConfig
from agent.model import InferenceView, Owner, UnitRow, UnitView


def unit_key(row: UnitRow) -> tuple[str, str]:
    return (row.uuid, row.owner.pod_uid or f"{row.owner.namespace}/{row.owner.pod}")


@dataclass
class _UnitTrack:
    streak_start: float | None
    state: str
    row: UnitRow
    labels: tuple[str, ...]


class IdleTracker:
    """active / idle_reserved / unallocated per unit (DESIGN §4)."""

    def __init__(self, cfg: IdleConfig):
        self.cfg = cfg
        self._tracks: dict[tuple[str, str], _UnitTrack] = {}

    def update(self, rows: Sequence[UnitRow], now: float) -> list[UnitView]:
        out: list[UnitView] = []
        tracks: dict[tuple[str, str], _UnitTrack] = {}
        for row in rows:
            key = unit_key(row)
            prev = self._tracks.get(key)
            streak = prev.streak_start if prev else None
            if not row.allocated:
                state, streak = "unallocated", None
            else:
                act = row.activity
                if act is not None and act <= self.cfg.threshold:
                    streak = now if streak is None else streak
                else:
                    streak = None  # busy, or no signal: never call a unit idle without evidence
                idle_for = now - streak if streak is not None else 0.0
                state = "idle_reserved" if streak is not None and idle_for >= self.cfg.window else "active"
            tracks[key] = _UnitTrack(streak, state, row, ())
            out.append(UnitView(row, state, (now - streak) if streak is not None else 0.0))
        self._tracks = tracks  # units/pods that are gone are forgotten
        return out


class CostLedger:
    """Accrues price × time per (unit, owner, state); the interval (last, now] is charged at the
    state and price observed at `last`, so a change is never charged backwards."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._prev: list[tuple[tuple[str, ...], Owner, str, float]] = []
        self.totals: dict[tuple[tuple[str, ...], Owner, str], float] = defaultdict(float)
        self.by_pod: dict[str, float] = defaultdict(float)  # pod uid (or ns/pod) → dollars, monotonic
        self.restored = False

    def update(self, views: Sequence[UnitView], node: str, now: float) -> None:
        if self._last is not None and now > self._last:
            hours = (now - self._last) / 3600.0
            for labels, owner, state, hourly in self._prev:
                dollars = hourly * hours
                self.totals[(labels, owner, state)] += dollars
                if owner.pod:
                    self.by_pod[owner.pod_uid or f"{owner.namespace}/{owner.pod}"] += dollars
        if self._last is None or now >= self._last:
            self._last = now
            self._prev = [(v.row.unit_labels(node), v.row.owner, v.state, v.row.hourly_price) for v in views]
        live = {(labels, owner) for labels, owner, _, _ in self._prev}
        # series of units/pods that are gone disappear (their dollars stay in the history)
        for k in [k for k in self.totals if (k[0], k[1]) not in live]:
            del self.totals[k]

    def rows(self) -> list[tuple[tuple[str, ...], Owner, str, float]]:
        return [(labels, owner, state, v) for (labels, owner, state), v in sorted(self.totals.items(), key=_sort)]


def _sort(item: tuple[tuple[tuple[str, ...], Owner, str], float]) -> tuple:
    (labels, owner, state), _ = item
    return (labels, owner.labels(), state)


@dataclass
class _Point:
    t: float
    cost: float
    successes: float
    tokens: float
    queue: float


class OutcomeTracker:
    """Per (pod, server, model): saturation over its window and cost per successful outcome over a
    sliding window. No successes in the window → no figure (absent, never 0 or infinity)."""

    def __init__(self, window: float, sat: SaturationConfig):
        self.window = window
        self.sat = sat
        self._points: dict[tuple[str, str, str, str], deque[_Point]] = {}

    def update(self, stats: Sequence, owners: Sequence[Owner], pod_cost: dict[str, float],
               pod_hourly: dict[str, float], pod_sm_active: dict[str, float | None], now: float) -> list[InferenceView]:
        keep = max(self.window, self.sat.window)
        live = set()
        rows = []
        pod_succ: dict[str, float] = defaultdict(float)
        pod_tok: dict[str, float] = defaultdict(float)
        for s, owner in zip(stats, owners):
            pod_key = owner.pod_uid or f"{owner.namespace}/{owner.pod}"
            key = (pod_key, s.server, s.model, s.url)
            live.add(key)
            pts = self._points.setdefault(key, deque())
            pts.append(_Point(now, pod_cost.get(pod_key, 0.0), s.successful_requests_total or 0.0,
                              s.generated_tokens_total or 0.0, s.queue_requests or 0.0))
            while len(pts) > 2 and pts[1].t <= now - keep:
                pts.popleft()
            first, last = _at_or_before(pts, now - self.window), pts[-1]
            pod_succ[pod_key] += max(0.0, last.successes - first.successes)
            pod_tok[pod_key] += max(0.0, last.tokens - first.tokens)
            rows.append((s, owner, pod_key, pts, first, last))
        out = []
        for s, owner, pod_key, pts, first, last in rows:
            # a pod serving several models: its cost is split by each model's share of the outcomes,
            # so every model of the pod shows the pod's cost per outcome and nothing is counted twice
            d_cost = last.cost - first.cost
            span = last.t - first.t
            succ, tok = pod_succ[pod_key], pod_tok[pod_key]
            own_succ = last.successes - first.successes
            own_tok = last.tokens - first.tokens
            per_1k = d_cost / succ * 1000.0 if own_succ > 0 and span > 0 else None
            per_m = d_cost / tok * 1e6 if own_tok > 0 and span > 0 else None
            sat_pts = [p for p in pts if p.t > now - self.sat.window] or [last]
            queued = sum(1 for p in sat_pts if p.queue > 0) / len(sat_pts)
            reasons = []
            if queued >= self.sat.queue_fraction and (s.queue_requests or 0) > 0:
                reasons.append("queue")
            if s.kv_cache_usage_ratio is not None and s.kv_cache_usage_ratio >= self.sat.kv_cache_threshold:
                reasons.append("kv_cache")
            sm = pod_sm_active.get(pod_key)
            if sm is not None and sm >= self.sat.sm_active_threshold and (s.queue_requests or 0) > 0:
                reasons.append("sm_active")
            tok_rate = s.generated_tokens_per_second
            succ_rate = None
            prev = _at_or_before(pts, now - 60.0)
            if last.t > prev.t:
                succ_rate = (last.successes - prev.successes) / (last.t - prev.t)
                if tok_rate is None:
                    tok_rate = (last.tokens - prev.tokens) / (last.t - prev.t)
            out.append(InferenceView(
                owner=owner, server=s.server, model=s.model, url=s.url, queue_requests=s.queue_requests,
                running_requests=s.running_requests, kv_cache_usage_ratio=s.kv_cache_usage_ratio,
                successful_requests_total=s.successful_requests_total, failed_requests_total=s.failed_requests_total,
                generated_tokens_total=s.generated_tokens_total, prompt_tokens_total=s.prompt_tokens_total,
                generated_tokens_per_second=tok_rate, successful_requests_per_second=succ_rate,
                saturated=bool(reasons), saturation_reason=",".join(reasons),
                cost_per_1k_successful_requests=per_1k, cost_per_million_generated_tokens=per_m,
                hourly_cost=pod_hourly.get(pod_key, 0.0),
            ))
        for k in [k for k in self._points if k not in live]:
            del self._points[k]
        return out


def _at_or_before(pts: deque[_Point], t: float) -> _Point:
    """The newest point at or before t, else the oldest (a window not yet full)."""
    best = pts[0]
    for p in pts:
        if p.t <= t:
            best = p
        else:
            break
    return best
