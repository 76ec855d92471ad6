"""Right-sizing: per workload, what to change, to what, what it saves per month and how sure we are.

Pure functions over a window of per-minute rows, the ledger's (`History.unit_minutes` /
`server_minutes`) or the same dicts rebuilt from a fleet's PromQL store (agent/fleet.py), so the
node and the fleet give the same answer for the same behaviour. Why these rules (docs/recommend.md):

- memory is sized to the **peak** plus headroom, never the mean (an OOM is an outage, a slow
  minute is not); compute to the **p95** activity over the target utilization;
- a workload saturated for a meaningful share of the window is never downsized or released,
  whatever its average: it needs more, not less (`scale_up`), and any saturation at all keeps it;
- too little history (coverage of the window, sample count) gives `keep` with low confidence,
  never a guess;
- in-place changes (release, a MIG slice of the same GPU, fewer replicas) come before moving to
  another GPU model, which needs another node type.

Savings use the prices the node actually charged (catalog, override, spot/reserved ratio) and
730 hours a month.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.gpu_specs import SPECS, MigSpec, mig_spec, spec

HOURS_PER_MONTH = 730.0
ACTIONS = ("release", "downsize_mig", "downsize_gpu", "consolidate", "scale_up", "keep")
# DESIGN §6 (fixed order)
COLUMNS = ("namespace", "workload_kind", "workload", "team", "node", "instance_type", "gpu_model", "allocation",
           "replicas", "window_start", "window_end", "samples", "activity_p50", "activity_p95", "memory_peak_bytes",
           "queue_p95", "saturated_ratio", "action", "target", "current_monthly_cost_dollars",
           "recommended_monthly_cost_dollars", "monthly_savings_dollars", "confidence", "reason")


@dataclass(frozen=True, slots=True)
class Settings:
    """The `recommend:` config section (docs/configuration.md); idle threshold and MIG cost basis
    come from `idle.threshold` and `pricing.mig_cost_basis` so the report agrees with the agent."""

    headroom: float = 0.2  # memory target ≥ peak × (1 + headroom)
    target_utilization: float = 0.8  # compute target ≥ p95 activity ÷ this
    idle_share: float = 0.95  # release when idle this share of the held, observed time
    saturated_share: float = 0.1  # scale_up when saturated this share of the window
    saturated_guard: float = 0.01  # above this (and below saturated_share): keep, never downsize
    min_coverage: float = 0.5  # of the window observed, else keep with low confidence
    min_samples: int = 60
    idle_threshold: float = 0.05
    mig_cost_basis: str = "compute"


@dataclass(frozen=True, slots=True)
class Prices:
    """On-demand $/GPU-hour per canonical model for targets on another GPU model: config overrides
    by model over the bundled catalog's `gpu_models`."""

    by_model: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_pricing(cls, pricing: Any = None) -> Prices:
        from collectors.pricing import bundled_catalog, canonical_model

        out = {k: m.gpu_hourly for k, m in bundled_catalog().gpu_models.items()}
        for k, v in dict(getattr(pricing, "gpu_hourly_by_model", {}) or {}).items():
            out[canonical_model(k)] = float(v)
        return cls(out)


@dataclass
class Recommendation:
    namespace: str
    workload_kind: str
    workload: str
    team: str
    node: str
    instance_type: str
    gpu_model: str
    allocation: float  # GPU-equivalents held (a MIG slice or share counts its fraction)
    replicas: int
    window_start: float
    window_end: float
    samples: int
    activity_p50: float | None
    activity_p95: float | None
    memory_peak_bytes: int | None
    queue_p95: float | None
    saturated_ratio: float | None
    action: str
    target: str
    current_monthly_cost_dollars: float
    recommended_monthly_cost_dollars: float
    monthly_savings_dollars: float
    confidence: float
    reason: str
    units: int = 0
    idle_ratio: float = 0.0  # share of the observed unit-minutes at or under the idle threshold
    target_memory_bytes: int | None = None
    series: dict[str, list[Any]] = field(default_factory=dict)  # hourly, for the HTML report

    def row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in COLUMNS}


# ------------------------------------------------------------------------------ aggregation
@dataclass
class _Minute:
    uuids: set[str] = field(default_factory=set)
    pods: set[str] = field(default_factory=set)
    price: float = 0.0
    alloc: float = 0.0
    need: float = 0.0  # Σ p95 activity × compute fraction (GPU-equivalents)
    used: float = 0.0  # Σ mean activity × compute fraction
    sampled: bool = False
    observed: bool = False  # activity known this minute: sampled, or booked active/idle between samples
    mem: int = 0


@dataclass
class _Workload:
    key: tuple[str, str, str]
    team: str = ""
    nodes: set[str] = field(default_factory=set)
    instance_types: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    minutes: dict[int, _Minute] = field(default_factory=lambda: defaultdict(_Minute))
    unit_p95: list[float] = field(default_factory=list)  # per unit-minute, relative to the unit
    unit_mean: list[float] = field(default_factory=list)
    unit_need: list[float] = field(default_factory=list)  # per unit-minute, in fractions of the GPU
    idle_unit_minutes: int = 0
    sampled_unit_minutes: int = 0
    samples: int = 0
    mem_peak: int | None = None
    mem_total: int | None = None
    unit_prices: list[float] = field(default_factory=list)
    gpu_prices: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)
    profiles: set[str] = field(default_factory=set)
    fractions: list[float] = field(default_factory=list)
    server: dict[int, list[float]] = field(default_factory=dict)  # minute → [queue mean, saturated share]


def _compute_fraction(row: Mapping[str, Any]) -> float:
    """The unit's share of its GPU's compute: MIG slices ÷ 7, a share 1/replicas, a full GPU 1."""
    profile = row.get("mig_profile") or ""
    if profile:
        m = mig_spec(str(row.get("model") or ""), profile)
        if m is not None:
            return m.compute_slices / 7.0
    return float(row.get("gpu_fraction") or 1.0)


def aggregate(unit_rows: Iterable[Mapping[str, Any]], server_rows: Iterable[Mapping[str, Any]] = (),
              idle_threshold: float = 0.05) -> dict[tuple[str, str, str], _Workload]:
    """Fold minutes into workloads: (namespace, kind, name) over all their units, replicas and nodes."""
    out: dict[tuple[str, str, str], _Workload] = {}
    for r in unit_rows:
        if not r.get("namespace"):
            continue  # unallocated capacity: no workload to right-size (the cost report shows it)
        key = (str(r["namespace"]), str(r.get("workload_kind") or "Pod"), str(r.get("workload") or r.get("pod")))
        w = out.get(key) or out.setdefault(key, _Workload(key))
        w.team = str(r.get("team") or w.team)
        w.nodes.add(str(r.get("node") or ""))
        w.instance_types.add(str(r.get("instance_type") or ""))
        w.models.add(str(r.get("model") or ""))
        w.kinds.add(str(r.get("kind") or "gpu"))
        if r.get("mig_profile"):
            w.profiles.add(str(r["mig_profile"]))
        frac = _compute_fraction(r)
        price = float(r.get("hourly_price") or 0.0)
        gpu_fraction = float(r.get("gpu_fraction") or 1.0)
        m = w.minutes[int(r["minute"])]
        m.uuids.add(str(r["uuid"]))
        m.pods.add(str(r.get("pod") or ""))
        m.price += price
        m.alloc += frac
        w.unit_prices.append(price)
        w.gpu_prices.append(price / gpu_fraction if gpu_fraction > 0 else price)
        lst = float(r.get("list_hourly_price") or 0.0)
        w.ratios.append(price / lst if lst > 0 else 1.0)
        w.fractions.append(frac)
        if r.get("mem_total"):
            w.mem_total = min(w.mem_total or int(r["mem_total"]), int(r["mem_total"]))
        if r.get("mem_max") is not None:
            w.mem_peak = max(w.mem_peak or 0, int(r["mem_max"]))
            m.mem = max(m.mem, int(r["mem_max"]))  # per unit: what one unit must hold
        if float(r.get("s_active") or 0.0) + float(r.get("s_idle_reserved") or 0.0) > 0:
            m.observed = True  # a state from activity: the agent watched it (a coarse step samples less often)
        n = int(r.get("act_samples") or 0)
        if n <= 0 or r.get("act_p95") is None:
            continue  # a minute with no activity sample is not evidence of anything
        p95 = float(r["act_p95"])
        mean = float(r.get("act_sum") or 0.0) / n
        w.samples += n
        w.sampled_unit_minutes += 1
        if float(r.get("act_max") if r.get("act_max") is not None else p95) <= idle_threshold:
            w.idle_unit_minutes += 1
        w.unit_p95.append(p95)
        w.unit_mean.append(mean)
        w.unit_need.append(p95 * frac)
        m.sampled = m.observed = True
        m.need += p95 * frac
        m.used += mean * frac
    for r in server_rows:
        key = (str(r["namespace"]), str(r.get("workload_kind") or "Pod"), str(r.get("workload") or r.get("pod")))
        w = out.get(key)
        if w is None:
            continue  # a server whose pod holds no GPU: nothing to right-size
        n = int(r.get("samples") or 0)
        queue = float(r.get("queue_sum") or 0.0) / n if n else float(r.get("queue_max") or 0.0)
        sat = min(1.0, float(r.get("saturated_seconds") or 0.0) / 60.0)
        cur = w.server.get(int(r["minute"]))
        w.server[int(r["minute"])] = [max(cur[0], queue), max(cur[1], sat)] if cur else [queue, sat]
    return out


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest rank, as the ledger's per-minute p95 (an observed value, never an interpolated one)."""
    xs = sorted(values)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


# ------------------------------------------------------------------------------ decisions
def recommend(unit_rows: Iterable[Mapping[str, Any]], server_rows: Iterable[Mapping[str, Any]],
              start: float, end: float, settings: Settings = Settings(), prices: Prices | None = None,
              with_series: bool = False) -> list[Recommendation]:
    """One recommendation per workload seen in the window [start, end), most savings first."""
    prices = prices if prices is not None else Prices.from_pricing()
    workloads = aggregate(unit_rows, server_rows, settings.idle_threshold)
    out = [decide(w, start, end, settings, prices, with_series) for w in workloads.values()]
    out.sort(key=lambda r: (-r.monthly_savings_dollars, r.namespace, r.workload))
    return out


def _money(x: float) -> float:
    return round(x + 0.0, 2)


def _label(model: str, kind: str, profile: str, fraction: float) -> str:
    from collectors.pricing import canonical_model

    m = canonical_model(model)
    if kind == "mig" and profile:
        return f"{m} {profile}"
    if kind == "share":
        return f"{m} share 1/{round(1 / fraction) if fraction > 0 else '?'}"
    return m


def _times(n: int, label: str) -> str:
    return label if n == 1 else f"{n}x {label}"


def _gib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**30:.1f} GiB"


def decide(w: _Workload, start: float, end: float, s: Settings, prices: Prices,
           with_series: bool = False) -> Recommendation:
    from collectors.pricing import canonical_model

    covered = [m for m in w.minutes.values() if m.observed]
    window_minutes = max(1.0, (end - start) / 60.0)
    coverage = min(1.0, len(covered) / window_minutes)
    held = list(w.minutes.values())
    hourly = sum(m.price for m in held) / len(held) if held else 0.0
    units = max((len(m.uuids) for m in held), default=0)
    replicas = max((len(m.pods) for m in held), default=0)
    alloc = max((m.alloc for m in held), default=0.0)
    unit_price = sum(w.unit_prices) / len(w.unit_prices) if w.unit_prices else 0.0
    gpu_price = sum(w.gpu_prices) / len(w.gpu_prices) if w.gpu_prices else 0.0
    ratio = sum(w.ratios) / len(w.ratios) if w.ratios else 1.0
    frac = sum(w.fractions) / len(w.fractions) if w.fractions else 1.0
    model = min(w.models) if w.models else ""
    kind = "mig" if "mig" in w.kinds else ("share" if "share" in w.kinds else "gpu")
    profile = min(w.profiles) if w.profiles else ""
    unit_label = _label(model, kind, profile, frac)
    p50 = percentile(w.unit_mean, 0.5)
    p95 = percentile(w.unit_p95, 0.95)
    need_unit = percentile(w.unit_need, 0.95) or 0.0  # of one GPU of the current model
    mem_need = (w.mem_peak or 0) * (1.0 + s.headroom)
    sat_values = [v[1] for v in w.server.values()]
    saturated = sum(sat_values) / len(sat_values) if sat_values else None
    queue_p95 = percentile([v[0] for v in w.server.values()], 0.95) if w.server else None
    current = hourly * HOURS_PER_MONTH
    confidence = round(coverage * min(1.0, w.samples / max(1, s.min_samples)), 2)
    idle = w.idle_unit_minutes / w.sampled_unit_minutes if w.sampled_unit_minutes else 0.0
    numbers = (f"p95 activity {_f(p95)} of {_times(units, unit_label)}, memory peak {_gib(w.mem_peak)}")

    action, target, recommended, target_mem = "keep", "", current, None
    if coverage < s.min_coverage or w.samples < s.min_samples:
        reason = (f"Too little history to recommend: activity for {len(covered) / 60:.1f} h of the "
                  f"{window_minutes / 60:.0f} h window ({coverage:.0%}, {w.samples} samples; needs "
                  f"{s.min_coverage:.0%} and {s.min_samples}).")
        confidence = min(confidence, 0.49)
    elif saturated is not None and saturated >= s.saturated_share:
        action = "scale_up"
        target = _times(units + 1, unit_label)
        recommended = current * (units + 1) / max(1, units)
        reason = (f"Saturated {saturated:.0%} of the window (queue p95 {_f(queue_p95)}): add capacity, at least "
                  f"one more {unit_label}; never downsized whatever its average (p50 activity {_f(p50)}).")
    elif saturated is not None and saturated > s.saturated_guard:
        reason = (f"Saturated {saturated:.0%} of the window: not downsized (below the {s.saturated_share:.0%} "
                  f"that asks for more capacity); {numbers}.")
    elif idle >= s.idle_share:
        action, target, recommended = "release", "none", 0.0
        reason = (f"Idle (activity ≤ {s.idle_threshold:g}) {idle:.0%} of its observed time over "
                  f"{len(covered) / 60:.0f} h: release {_times(units, unit_label)}.")
    else:
        options = _in_place(w, s, model, kind, units, unit_price, gpu_price, need_unit, mem_need, unit_label)
        if not options and kind == "gpu":
            options = _other_gpu(s, prices, model, units, unit_price, ratio, need_unit, mem_need)
        if options:
            action, target, rec_hourly, target_mem, why = max(options, key=lambda o: current - o[2] * HOURS_PER_MONTH)
            recommended = rec_hourly * HOURS_PER_MONTH
            reason = f"{why}; {numbers} (needs {_gib(mem_need)} with {s.headroom:.0%} headroom)."
        else:
            reason = (f"No smaller target fits: {numbers}, needs {_gib(mem_need)} of memory and "
                      f"{need_unit / s.target_utilization:.2f} of a GPU at {s.target_utilization:.0%} target "
                      "utilization.")
    rec = Recommendation(
        namespace=w.key[0], workload_kind=w.key[1], workload=w.key[2], team=w.team,
        node=",".join(sorted(x for x in w.nodes if x)), instance_type=",".join(sorted(x for x in w.instance_types if x)),
        gpu_model=canonical_model(model), allocation=round(alloc, 4), replicas=replicas,
        window_start=start, window_end=end, samples=w.samples,
        activity_p50=_r(p50), activity_p95=_r(p95), memory_peak_bytes=w.mem_peak, queue_p95=_r(queue_p95),
        saturated_ratio=_r(saturated), action=action, target=target,
        current_monthly_cost_dollars=_money(current), recommended_monthly_cost_dollars=_money(recommended),
        monthly_savings_dollars=_money(current - recommended), confidence=confidence, reason=reason,
        units=units, idle_ratio=round(idle, 4), target_memory_bytes=target_mem)
    if with_series:
        rec.series = _series(w)
    return rec


def _f(x: float | None) -> str:
    """Ratios with two decimals; counts (a queue of 1.5 million requests) as whole numbers."""
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


Option = tuple[str, str, float, "int | None", str]  # action, target, recommended $/h, target memory, why


def _in_place(w: _Workload, s: Settings, model: str, kind: str, units: int, unit_price: float, gpu_price: float,
              need_unit: float, mem_need: float, unit_label: str) -> list[Option]:
    """Changes on the same node type: a smaller MIG slice of the same GPU, or fewer units."""
    out: list[Option] = []
    sp = spec(model)
    if sp is not None and sp.mig and kind in ("gpu", "mig"):
        fits = [p for p in sp.mig if p.memory_bytes >= mem_need and p.compute_slices / 7.0 >= need_unit /
                s.target_utilization]
        priced = sorted(((_mig_price(p, gpu_price, s.mig_cost_basis), p) for p in fits),
                        key=lambda x: (x[0], x[1].compute_slices, x[1].memory_bytes))
        if priced and priced[0][0] < unit_price - 1e-9 and priced[0][1].name not in w.profiles:
            price, p = priced[0]
            out.append(("downsize_mig", _times(units, p.name), price * units, p.memory_bytes,
                        (f"Fits a {p.name} MIG slice ({p.compute_slices}/7 of the compute, {_gib(p.memory_bytes)}): "
                        f"${price:.2f}/h instead of ${unit_price:.2f}/h per unit")))
    if units > 1:
        need_total = percentile([m.need for m in w.minutes.values() if m.sampled], 0.95) or 0.0
        frac = sum(w.fractions) / len(w.fractions)
        needed = max(1, math.ceil(need_total / s.target_utilization / frac - 1e-9))
        mem_ok = w.mem_total is None or mem_need <= w.mem_total
        if needed < units and mem_ok:
            out.append(("consolidate", _times(needed, unit_label), unit_price * needed, w.mem_total,
                        (f"The {units} units' summed p95 need is {need_total:.2f} GPU-equivalents: {needed} "
                        f"{'unit holds' if needed == 1 else 'units hold'} it at {s.target_utilization:.0%} target "
                        "utilization")))
    return out


def _mig_price(p: MigSpec, gpu_price: float, basis: str) -> float:
    return gpu_price * (p.memory_slices / 8.0 if basis == "memory" else p.compute_slices / 7.0)


def _other_gpu(s: Settings, prices: Prices, model: str, units: int, unit_price: float, ratio: float,
               need_unit: float, mem_need: float) -> list[Option]:
    """A cheaper GPU model whose memory and dense throughput fit, priced at the node's capacity ratio."""
    cur = spec(model)
    if cur is None:
        return []
    out: list[Option] = []
    for other in SPECS.values():
        price = prices.by_model.get(other.model)
        if other.model == cur.model or price is None:
            continue
        price *= ratio
        rel = other.dense_tflops / cur.dense_tflops
        if other.memory_bytes >= mem_need and rel >= need_unit / s.target_utilization and price < unit_price - 1e-9:
            out.append(("downsize_gpu", _times(units, other.model), price * units, other.memory_bytes,
                        (f"Fits a {other.model} ({_gib(other.memory_bytes)}, {rel:.2f}× the dense BF16 throughput "
                        f"of a {cur.model}): ${price:.2f}/h instead of ${unit_price:.2f}/h per GPU")))
    return out


def _series(w: _Workload) -> dict[str, list[Any]]:
    """Hourly points for the report's charts: allocated capacity, used activity (p50/p95 over the hour's
    minutes, in GPU-equivalents), memory peak, queue and saturation."""
    hours: dict[int, list[_Minute]] = defaultdict(list)
    for minute, m in w.minutes.items():
        hours[minute // 3600 * 3600].append(m)
    out: dict[str, list[Any]] = {k: [] for k in ("hour", "allocated", "used_p50", "used_p95", "memory_peak",
                                                  "queue_p95", "saturated")}
    for h in sorted(hours):
        ms = hours[h]
        out["hour"].append(h)
        out["allocated"].append(max(m.alloc for m in ms))
        out["used_p50"].append(percentile([m.used for m in ms if m.sampled], 0.5))
        out["used_p95"].append(percentile([m.need for m in ms if m.sampled], 0.95))
        out["memory_peak"].append(max(m.mem for m in ms))
        srv = [w.server[x] for x in range(h, h + 3600, 60) if x in w.server]
        out["queue_p95"].append(percentile([v[0] for v in srv], 0.95) if srv else None)
        out["saturated"].append(sum(v[1] for v in srv) / len(srv) if srv else None)
    return out


def from_history(history: Any, start: float, end: float, settings: Settings = Settings(),
                 prices: Prices | None = None, with_series: bool = False) -> list[Recommendation]:
    """Recommendations from the node's ledger over [start, end)."""
    return recommend(history.unit_minutes(start, end), history.server_minutes(start, end), start, end, settings,
                     prices, with_series)


def settings_from_config(config: Any) -> Settings:
    """The engine's thresholds: `recommend:` plus the agent's own idle threshold and MIG cost basis,
    so a report agrees with the live states and prices."""
    rc = config.recommend
    return Settings(headroom=rc.headroom, target_utilization=rc.target_utilization, idle_share=rc.idle_share,
                    saturated_share=rc.saturated_share, min_coverage=rc.min_coverage, min_samples=rc.min_samples,
                    idle_threshold=config.idle.threshold, mig_cost_basis=config.pricing.mig_cost_basis)


def live_savings(history: Any, now: float, window: float = 7 * 86400.0, settings: Settings = Settings(),
                 prices: Prices | None = None) -> list[tuple[dict[str, str], str, str, float]]:
    """For `gpucap_rightsizing_monthly_savings_dollars{action,target}`: (owner labels, action, target,
    savings) per workload from the agent's own ledger over the last `window`. Run it off the scrape
    path (a timer, e.g. hourly): it reads a week of minutes."""
    out = []
    for r in from_history(history, now - window, now, settings, prices):
        owner = {"namespace": r.namespace, "workload_kind": r.workload_kind, "workload": r.workload, "team": r.team}
        out.append((owner, r.action, r.target, r.monthly_savings_dollars))
    return out
