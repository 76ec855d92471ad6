"""Stateful derivations over successive evaluations: idle state machine, cost accrual, saturation,
cost per successful outcome. Time comes in as `now`, so 30 idle minutes pass instantly in tests.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from agent.config import IdleConfig, SaturationConfig
from agent.model import NO_OWNER, Accrual, InferenceView, Owner, UnitRow, UnitView

# how long the cost counters of a series no longer live are kept, should it come back (a kubelet blip,
# a restart: no counter reset); a deleted pod's never comes back, so pod churn leaves nothing behind
DORMANT_KEEP_S = 86400.0
DORMANT_MAX = 20000  # and never more than this many, whatever their age


def unit_key(row: UnitRow) -> tuple[str, str]:
    return (row.uuid, row.owner.pod_uid or f"{row.owner.namespace}/{row.owner.pod}")


@dataclass
class _UnitTrack:
    streak_start: float | None
    state: str
    row: UnitRow
    labels: tuple[str, ...]


class IdleTracker:
    """The state of every unit (DESIGN §4): lost, unknown, unallocated, idle_reserved or active.

    `now` is the monotonic clock: a wall-clock step neither ends nor lengthens an idle streak.
    """

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
            if row.lost:
                state, streak = "lost", None  # waste whoever holds it, never activity
            elif not row.device_fresh or not row.holders_known:
                state, streak = "unknown", None  # no fresh evidence: neither free, busy nor idle
            elif not row.allocated:
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
            out.append(UnitView(row, state, (now - streak) if streak is not None else 0.0, streak))
        self._tracks = tracks  # units/pods that are gone are forgotten
        return out


class CostLedger:
    """Accrues price × time per (unit, owner, state); the interval (last, now] is charged at the
    state and price observed at `last`, so a change is never charged backwards.

    `now` is the monotonic clock, so a wall-clock step never charges or skips money. An interval
    longer than `max_gap` (the agent stalled, or the process was suspended) had no evidence at all:
    it is charged to the unit as `unknown` with no owner, not as the last state.
    """

    def __init__(self, max_gap: float = float("inf")) -> None:
        self.max_gap = max_gap
        self._last: float | None = None
        self._last_wall: float | None = None
        self._prev: list[tuple[tuple[str, ...], Owner, str, float, UnitView]] = []
        self.totals: dict[tuple[tuple[str, ...], Owner, str], float] = defaultdict(float)
        self.by_pod: dict[str, float] = defaultdict(float)  # pod uid (or ns/pod) → dollars, monotonic
        self.restored = False
        # totals of series not live now (restored, or gone for a moment) and since when (monotonic; None:
        # restored, counted from the first update): a series that comes back within DORMANT_KEEP_S
        # continues from here, so a kubelet blip or a restart is never a counter reset. Older ones are
        # forgotten (a deleted pod's series never comes back; one that does starts from zero, which
        # rate() and increase() read as the reset it is), so pod churn cannot grow this map.
        self._dormant: dict[tuple[tuple[str, ...], Owner, str], tuple[float, float | None]] = {}
        self._untimed = False

    def restore(self, totals: dict[tuple[tuple[str, ...], Owner, str], float]) -> None:
        """Counters continue where the ledger says they stopped (no reset seen by Prometheus): restored
        totals wait, dormant, until their series is live again (the kubelet may answer after NVML)."""
        for k, v in totals.items():
            self._dormant[k] = (max(self._dormant.get(k, (0.0, None))[0], v), None)
        self._untimed = True
        self.restored = True

    def _add(self, key: tuple[tuple[str, ...], Owner, str], dollars: float) -> None:
        if key not in self.totals and key in self._dormant:
            self.totals[key] = self._dormant.pop(key)[0]
        self.totals[key] += dollars

    def update(self, views: Sequence[UnitView], node: str, now: float, wall: float | None = None) -> list[Accrual]:
        """Charge (last, now]; returns what was charged, for the ledger. `now` is monotonic."""
        accruals: list[Accrual] = []
        wall = now if wall is None else wall
        if self._last is not None and now > self._last:
            elapsed = now - self._last
            hours = elapsed / 3600.0
            gap = elapsed > self.max_gap
            start = wall - elapsed  # the interval on the wall clock, ending at this evaluation
            for labels, owner, state, hourly, view in self._prev:
                dollars = hourly * hours
                if gap:
                    self._add((labels, NO_OWNER, "unknown"), dollars)
                    accruals.append(Accrual(replace(view, row=replace(view.row, allocations=())), "unknown",
                                            start, wall, elapsed, dollars))
                    continue
                self._add((labels, owner, state), dollars)
                accruals.append(Accrual(view, state, start, wall, elapsed, dollars,
                                        view.streak if state == "active" else None))
                if owner.pod:
                    self.by_pod[owner.pod_uid or f"{owner.namespace}/{owner.pod}"] += dollars
        if self._last is None or now >= self._last:
            self._last = now
            self._prev = [(v.row.unit_labels(node), v.row.owner, v.state, v.row.hourly_price, v) for v in views]
        live = {(labels, owner) for labels, owner, _, _, _ in self._prev}
        live_units = {labels for labels, _, _, _, _ in self._prev}
        # series of units/pods that are gone disappear (their dollars stay in the ledger); a unit's
        # owner-less series (free, or unknown holder) lives as long as the unit
        for k in [k for k in self.totals
                  if (k[0], k[1]) not in live and not (k[1] == NO_OWNER and k[0] in live_units)]:
            self._dormant[k] = (self.totals.pop(k), now)
        self._forget(now)
        return accruals

    def _forget(self, now: float) -> None:
        """Drop dormant totals gone longer than DORMANT_KEEP_S, and beyond DORMANT_MAX the oldest
        whatever their age (insertion order is age order: restored ones first, timed from now)."""
        if self._untimed:
            self._dormant = {k: (v, now if since is None else since) for k, (v, since) in self._dormant.items()}
            self._untimed = False
        while self._dormant:
            key = next(iter(self._dormant))
            if now - self._dormant[key][1] <= DORMANT_KEEP_S and len(self._dormant) <= DORMANT_MAX:
                break
            del self._dormant[key]

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
    sliding window. No successes in the window → no figure (absent, never 0 or infinity).

    No dollar is counted twice (DESIGN §4): a pod's GPU cost is split evenly between the servers
    (target URLs) it runs, and a server's share between its models by generated tokens in the window
    (else successful requests, else evenly). A pod that holds no GPU gets no cost at all.
    `now` is the monotonic clock.
    """

    def __init__(self, window: float, sat: SaturationConfig):
        self.window = window
        self.sat = sat
        self._points: dict[tuple[str, str, str, str], deque[_Point]] = {}

    def update(self, stats: Sequence, owners: Sequence[Owner], pod_cost: dict[str, float],
               pod_hourly: dict[str, float], pod_sm_active: dict[str, float | None], now: float) -> list[InferenceView]:
        keep = max(self.window, self.sat.window)
        live = set()
        rows = []
        for s, owner in zip(stats, owners):
            pod_key = _pod_key(owner)
            key = (pod_key, s.server, s.model, s.url)
            live.add(key)
            pts = self._points.setdefault(key, deque())
            pts.append(_Point(now, pod_cost.get(pod_key, 0.0), s.successful_requests_total or 0.0,
                              s.generated_tokens_total or 0.0, s.queue_requests or 0.0))
            while len(pts) > 2 and pts[1].t <= now - keep:
                pts.popleft()
            first, last = _at_or_before(pts, now - self.window), pts[-1]
            rows.append((s, owner, pod_key, pts, first, last))
        fractions = _cost_fractions(rows)
        out = []
        for (s, owner, pod_key, pts, first, last), frac in zip(rows, fractions):
            span = last.t - first.t
            has_gpu = bool(owner.pod) and (pod_key in pod_hourly or last.cost > first.cost)
            window_cost = (last.cost - first.cost) * frac if has_gpu else None
            own_succ = last.successes - first.successes
            own_tok = last.tokens - first.tokens
            per_1k = per_m = None
            if window_cost is not None and span > 0:
                per_1k = window_cost / own_succ * 1000.0 if own_succ > 0 else None
                per_m = window_cost / own_tok * 1e6 if own_tok > 0 else None
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
                hourly_cost=pod_hourly.get(pod_key, 0.0) * frac if has_gpu else 0.0,
                window_cost=window_cost,
            ))
        for k in [k for k in self._points if k not in live]:
            del self._points[k]
        return out


def _pod_key(owner: Owner) -> str:
    return owner.pod_uid or f"{owner.namespace}/{owner.pod}"


def _cost_fractions(rows: Sequence[tuple]) -> list[float]:
    """Each entry's share of its pod's cost: 1/servers of the pod × the model's share of its server."""
    servers: dict[str, set[str]] = defaultdict(set)
    tokens: dict[tuple[str, str], float] = defaultdict(float)
    succ: dict[tuple[str, str], float] = defaultdict(float)
    models: dict[tuple[str, str], int] = defaultdict(int)
    for s, _owner, pod_key, _pts, first, last in rows:
        servers[pod_key].add(s.url)
        tokens[(pod_key, s.url)] += max(0.0, last.tokens - first.tokens)
        succ[(pod_key, s.url)] += max(0.0, last.successes - first.successes)
        models[(pod_key, s.url)] += 1
    out = []
    for s, _owner, pod_key, _pts, first, last in rows:
        server = (pod_key, s.url)
        if tokens[server] > 0:
            model_frac = max(0.0, last.tokens - first.tokens) / tokens[server]
        elif succ[server] > 0:
            model_frac = max(0.0, last.successes - first.successes) / succ[server]
        else:
            model_frac = 1.0 / models[server]
        out.append(model_frac / len(servers[pod_key]))
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
