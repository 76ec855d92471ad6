"""`gpucap snapshot` output: a table for a person, JSON with a fixed top level for programs."""

from __future__ import annotations

import datetime as dt
import difflib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.padding import Padding
from rich.text import Text

from agent.model import STATES, AgentState, UnitView
from agent.tables import Column, Out, styled, table

HOURS_PER_MONTH = 730.0


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def summary(st: AgentState) -> dict[str, Any]:
    by_state: dict[str, float] = defaultdict(float)
    idle_by_team: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for v in st.units:
        by_state[v.state] += v.row.hourly_price
        count[v.state] += 1
        if v.state == "idle_reserved":
            idle_by_team[v.row.owner.team or "(no team)"] += v.row.hourly_price
    total = sum(v.row.hourly_price for v in st.units)
    allocated = sum(v.row.hourly_price for v in st.units
                    if v.row.allocated and v.state in ("active", "idle_reserved", "lost"))
    return {
        "units": len(st.units),
        "gpus": sum(1 for d in st.devices if not d.is_mig),
        "gpus_up": sum(1 for d in st.devices if not d.is_mig and d.up),
        "node_hourly_dollars": round(total, 6),
        "allocated_hourly_dollars": round(allocated, 6),
        "active_units": count["active"],
        "idle_reserved_units": count["idle_reserved"],
        "idle_reserved_hourly_dollars": round(by_state["idle_reserved"], 6),
        "idle_reserved_monthly_dollars": round(by_state["idle_reserved"] * HOURS_PER_MONTH, 2),
        "unallocated_units": count["unallocated"],
        "unallocated_hourly_dollars": round(by_state["unallocated"], 6),
        "lost_units": count["lost"],
        "lost_hourly_dollars": round(by_state["lost"], 6),
        "unknown_units": count["unknown"],
        "unknown_hourly_dollars": round(by_state["unknown"], 6),
        "hourly_dollars_by_state": {k: round(by_state[k], 6) for k in STATES},
        "evaluation_success": st.evaluation_success,
        "idle_reserved_hourly_dollars_by_team": {k: round(v, 6) for k, v in sorted(idle_by_team.items())},
        "saturated_servers": sum(1 for i in st.inference if i.saturated),
        "failing_collectors": sorted(c.name for c in st.collectors if not c.success),
    }


def _unit_json(v: UnitView) -> dict[str, Any]:
    r = v.row
    d = r.device
    return {
        "gpu": r.gpu, "gpu_instance": r.gpu_instance, "mig_profile": r.mig_profile, "uuid": r.uuid,
        "kind": r.kind, "model": r.model, "up": r.up if r.device_fresh else None, "activity": r.activity,
        "device_activity": r.device_activity if r.kind == "share" else r.activity,
        "utilization": d.utilization if d else None, "sm_active": d.sm_active if d else None,
        "memory_used_bytes": r.memory_used_bytes, "memory_total_bytes": r.memory_total_bytes,
        "power_watts": d.power_watts if d and not d.is_mig else None,
        "state": v.state, "idle_seconds": v.idle_seconds,
        "hourly_price_dollars": r.hourly_price, "monthly_price_dollars": round(r.hourly_price * HOURS_PER_MONTH, 2),
        "price_source": r.price_source, "instance_type": r.instance_type, "capacity_type": r.capacity_type,
        "replica": r.replica, "replicas": r.replicas,
        "allocations": [
            {"namespace": a.owner.namespace, "pod": a.owner.pod, "container": a.owner.container,
             "workload_kind": a.owner.workload_kind, "workload": a.owner.workload, "team": a.owner.team,
             "ratio": a.ratio, "resource": a.resource, "device_id": a.device_id}
            for a in r.allocations
        ],
    }


def _target_json(t: Any) -> dict[str, Any]:
    return {"url": redact_url(t.url), "namespace": t.namespace, "pod": t.pod, "source": t.source, "ok": t.ok,
            "error_kind": t.error_kind or None, "error": redact_text(t.error, t.url) or None,
            "failing_since": _rfc3339(t.failing_since) if t.failing_since is not None else None,
            "last_success": _rfc3339(t.last_success) if t.last_success is not None else None}


def _unit_extra(st: AgentState, out: dict[str, Any], v: UnitView) -> dict[str, Any]:
    """Per GPU what the gauges hide: its Xid history and the use no pod accounts for."""
    r = v.row
    d = r.device
    if r.kind == "gpu" or r.kind == "share":
        out["xid_errors"] = [{"xid": x, "count": n} for x, n in (d.xid_errors if d else ())]
        un = next(((a, m) for g, u, a, m in st.attribution.unattributed if u == r.device_uuid), None)
        out["unattributed"] = None if un is None else {"activity": un[0], "memory_used_bytes": un[1]}
    return out


def to_json(st: AgentState, targets: Sequence[Any] = ()) -> dict[str, Any]:
    """DESIGN §6's fixed top level; fields are only ever added. `targets`: the inference collector's
    per-target status (`InferenceCollector.target_status()`), so a refused target is visible here too."""
    workloads: dict[tuple[str, str, str], dict[str, Any]] = {}
    for v in st.units:
        o = v.row.owner
        if not o.pod:
            continue
        key = (o.namespace, o.workload_kind, o.workload or o.pod)
        w = workloads.setdefault(key, {"namespace": o.namespace, "workload_kind": o.workload_kind,
                                       "workload": o.workload or o.pod, "team": o.team, "pods": [],
                                       "units": 0, "hourly_dollars": 0.0, "idle_reserved_hourly_dollars": 0.0})
        if o.pod not in w["pods"]:
            w["pods"].append(o.pod)
        w["units"] += 1
        w["hourly_dollars"] += v.row.hourly_price
        if v.state == "idle_reserved":
            w["idle_reserved_hourly_dollars"] += v.row.hourly_price
    return {
        "time": _rfc3339(st.time),
        "node": {"name": st.node.name, "instance_type": st.node.instance_type,
                 "capacity_type": st.node.capacity_type, "labels": dict(st.node.labels),
                 "driver_version": st.driver_version, "metadata_stale": st.node.stale},
        "units": [_unit_extra(st, _unit_json(v), v) for v in st.units],
        "workloads": list(workloads.values()),
        "inference": [
            {"namespace": i.owner.namespace, "pod": i.owner.pod, "workload": i.owner.workload,
             "workload_kind": i.owner.workload_kind, "team": i.owner.team, "server": i.server, "model": i.model,
             "url": redact_url(i.url), "queue_requests": i.queue_requests, "running_requests": i.running_requests,
             "kv_cache_usage_ratio": i.kv_cache_usage_ratio, "saturated": i.saturated,
             "saturation_reason": i.saturation_reason,
             "generated_tokens_per_second": i.generated_tokens_per_second,
             "successful_requests_per_second": i.successful_requests_per_second,
             "successful_requests_total": i.successful_requests_total,
             "generated_tokens_total": i.generated_tokens_total,
             "hourly_cost_dollars": i.hourly_cost,
             "window_cost_dollars": i.window_cost,
             "cost_per_1k_successful_requests_dollars": i.cost_per_1k_successful_requests,
             "cost_per_million_generated_tokens_dollars": i.cost_per_million_generated_tokens}
            for i in st.inference
        ],
        "collectors": [{"name": c.name, "success": c.success, "duration_seconds": c.duration,
                        "last_error": c.last_error, "error_kind": c.last_error_kind,
                        "failing_since": _rfc3339(c.failing_since) if c.failing_since is not None else None,
                        "data_age_seconds": c.data_age, "max_age_seconds": c.max_age,
                        "skipped": dict(c.skipped),
                        **({"targets": len(targets), "targets_failing": sum(1 for t in targets if not t.ok)}
                           if c.name == "inference" and targets else {})} for c in st.collectors],
        "targets": [_target_json(t) for t in targets],
        "gpu_notes": gpu_notes(st),
        "summary": summary(st),
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _gib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**30:.1f}"


def _money(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"${v:,.{digits}f}"


def _dur(s: float) -> str:
    if s < 60:
        return ""
    m = int(s // 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


# ------------------------------------------------------------------------------------- the table
# Columns a person scans first fit 80 columns; `--wide` adds the rest. Rendering goes through
# agent/tables.py (rich): the width is the terminal's, colour only on a TTY, plain when piped.

SORT_KEYS = ("gpu", "state", "cost", "activity", "memory", "team", "holder")
FILTER_KEYS = ("team", "namespace", "state", "workload", "gpu")
STATE_ORDER = {"lost": 0, "unknown": 1, "idle_reserved": 2, "active": 3, "unallocated": 4}
_KIND_ORDER = {"gpu": 0, "mig": 1, "share": 1, "mig_free": 2}  # a MIG GPU's free slices come last

# what an operator does about it; https://docs.nvidia.com/deploy/xid-errors/ has the full list
XID_MEANING = {
    13: "graphics engine exception", 31: "GPU memory page fault", 43: "GPU stopped processing",
    45: "preemptive cleanup", 48: "double-bit ECC error", 61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt", 63: "ECC page retirement", 64: "ECC page retirement failed",
    74: "NVLink error", 79: "GPU has fallen off the bus", 92: "high single-bit ECC rate",
    94: "contained ECC error", 95: "uncontained ECC error", 119: "GSP RPC timeout", 120: "GSP error",
}


@dataclass(frozen=True)
class TableOptions:
    wide: bool = False
    headers: bool = True
    sort: str = "gpu"
    filters: tuple[tuple[str, str], ...] = ()  # (key, value); same key: any value; keys: all


def parse_filters(values: Sequence[str], keys: Sequence[str] = FILTER_KEYS) -> tuple[tuple[str, str], ...]:
    """`team=research` → ("team", "research"); a bad one raises ValueError naming it and the choices."""
    out = []
    for raw in values:
        key, sep, value = raw.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise ValueError(f"expected KEY=VALUE with KEY one of {', '.join(keys)}, got {raw!r}")
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown filter key {key!r} in {raw!r}{hint}; expected one of {', '.join(keys)}")
        value = value.strip()
        if key == "state":
            value = value.replace("-", "_").replace(" ", "_").lower()
            value = {"idle": "idle_reserved", "free": "unallocated"}.get(value, value)
            if value not in STATES:
                raise ValueError(f"unknown state {raw.partition('=')[2]!r} in {raw!r}; expected one of {', '.join(STATES)}")
        out.append((key, value))
    return tuple(out)


def _matches(v: UnitView, filters: tuple[tuple[str, str], ...]) -> bool:
    by_key: dict[str, set[str]] = defaultdict(set)
    for k, val in filters:
        by_key[k].add(val.lower())
    o = v.row.owner
    have = {"team": o.team, "namespace": o.namespace, "state": v.state, "workload": o.workload or o.pod,
            "gpu": str(v.row.gpu)}
    return all(have[k].lower() in vals for k, vals in by_key.items())


def _sort_key(sort: str) -> Any:
    def unit_order(v: UnitView) -> tuple:
        r = v.row
        gi = int(r.gpu_instance) if r.gpu_instance.isdigit() else 0
        return (r.gpu, _KIND_ORDER.get(r.kind, 1), gi, r.replica or 0)

    def key(v: UnitView) -> tuple:
        o = v.row.owner
        first: tuple = {
            "gpu": (), "state": (STATE_ORDER.get(v.state, 9),), "cost": (-v.row.hourly_price,),
            "activity": (1.0 if v.row.activity is None else -v.row.activity,),  # busiest first, no signal last
            "memory": (-(v.row.memory_used_bytes or 0),), "team": (o.team or "\uffff",),
            "holder": (f"{o.namespace}/{o.workload or o.pod}" if o.pod else "\uffff",),
        }[sort]
        return first + unit_order(v)
    return key


def _unit_name(r: Any, wide: bool) -> str:
    name = str(r.gpu) + (f"/gi{r.gpu_instance}" if r.gpu_instance else "") + (
        f"::{r.replica}" if r.replica is not None else "")
    if r.kind == "mig_free":
        name += "/free"
    if not wide and r.mig_profile and r.kind != "mig_free":
        name += f" {r.mig_profile}"
    return name


def _state_text(v: UnitView) -> str:
    if v.state == "lost":
        return "GPU LOST"
    if v.state == "unknown":
        return "unknown"
    if v.state == "idle_reserved":
        return f"idle reserved {_dur(v.idle_seconds)}".rstrip()
    if v.state == "active" and _dur(v.idle_seconds):
        return f"active (idle {_dur(v.idle_seconds)})"
    return v.state


def _mem(used: int | None, total: int | None, wide: bool) -> str:
    if wide:
        return f"{_gib(used)}/{_gib(total)}"
    if total is None:
        return "-"
    return f"{'-' if used is None else f'{used / 2**30:.0f}'}/{total / 2**30:.0f}G"


def _unit_rows(st: AgentState, views: Sequence[UnitView], wide: bool) -> list[list[Any]]:
    power = {d.uuid: d.power_watts for d in st.devices if not d.is_mig}
    rows = []
    for v in views:
        r = v.row
        o = r.owner
        d = r.device if r.kind != "mig_free" else None
        act = "LOST" if v.state == "lost" else _pct(r.activity)
        state = styled(_state_text(v), v.state)
        if not wide:
            holder = f"{o.namespace}/{o.workload or o.pod}" if o.pod else "-"
            rows.append([_unit_name(r, False), state, holder, o.team or "-", act,
                         _mem(r.memory_used_bytes, r.memory_total_bytes, False), _money(r.hourly_price)])
            continue
        p = power.get(r.device_uuid)
        rows.append([
            _unit_name(r, True), _short(r.model), r.mig_profile or "-", state, act,
            "-" if d is None or d.utilization is None else _pct(d.utilization),
            "-" if d is None or d.sm_active is None else _pct(d.sm_active),
            _mem(r.memory_used_bytes, r.memory_total_bytes, True),
            "-" if p is None or r.kind != "gpu" else f"{p:.0f}W",
            f"{o.namespace}/{o.pod}" if o.pod else "-", o.workload_kind or "-", o.workload or "-", o.team or "-",
            _money(r.hourly_price), _money(r.hourly_price * HOURS_PER_MONTH, 0), r.price_source, r.uuid,
        ])
    return rows


UNIT_COLUMNS = (Column("GPU"), Column("STATE"), Column("HELD BY", shrink=True, min_width=12),
                Column("TEAM", shrink=True, min_width=6), Column("ACT", "right"), Column("MEM", "right"),
                Column("$/H", "right"))
WIDE_UNIT_COLUMNS = (
    Column("GPU"), Column("MODEL"), Column("PROFILE"), Column("STATE"), Column("ACTIVITY", "right"),
    Column("UTIL", "right"), Column("SM", "right"), Column("MEM GiB", "right"), Column("POWER", "right"),
    Column("POD"), Column("KIND"), Column("WORKLOAD"), Column("TEAM"), Column("$/H", "right"),
    Column("$/MONTH", "right"), Column("PRICE SOURCE"), Column("UUID"))
SERVING_COLUMNS = (Column("WORKLOAD", shrink=True, min_width=12), Column("MODEL", shrink=True, min_width=8),
                   Column("QUEUE", "right"), Column("KV", "right"), Column("TOK/S", "right"),
                   Column("$/1K REQ", "right"), Column("SATURATED"))
WIDE_SERVING_COLUMNS = (
    Column("POD"), Column("SERVER"), Column("MODEL"), Column("QUEUE", "right"), Column("RUNNING", "right"),
    Column("KV", "right"), Column("TOK/S", "right"), Column("REQ/S", "right"), Column("$/H", "right"),
    Column("$/1K REQ", "right"), Column("$/1M TOK", "right"), Column("SATURATED"), Column("URL"))


def _serving_rows(st: AgentState, wide: bool, filters: tuple[tuple[str, str], ...]) -> list[list[Any]]:
    rows = []
    keys = {k for k, _ in filters}
    for i in st.inference:
        have = {"team": i.owner.team, "namespace": i.owner.namespace, "workload": i.owner.workload or i.owner.pod}
        if any(k in have and have[k].lower() not in {v.lower() for kk, v in filters if kk == k} for k in keys):
            continue
        reason = i.saturation_reason.replace(",", ", ") if wide else (
            i.saturation_reason.replace("kv_cache", "kv").replace("sm_active", "sm").replace(",", "+"))
        sat = styled(f"yes ({reason})", "saturated") if i.saturated else "no"
        queue = "-" if i.queue_requests is None else f"{i.queue_requests:,.0f}"
        tok = "-" if i.generated_tokens_per_second is None else f"{i.generated_tokens_per_second:,.0f}"
        if not wide:
            rows.append([i.owner.workload or i.owner.pod, i.model.rpartition("/")[2] or "-",
                         queue, _pct(i.kv_cache_usage_ratio), tok, _money(i.cost_per_1k_successful_requests, 3), sat])
            continue
        rows.append([
            f"{i.owner.namespace}/{i.owner.pod}", i.server, i.model or "-", queue,
            "-" if i.running_requests is None else f"{i.running_requests:.0f}", _pct(i.kv_cache_usage_ratio), tok,
            "-" if i.successful_requests_per_second is None else f"{i.successful_requests_per_second:,.1f}",
            _money(i.hourly_cost), _money(i.cost_per_1k_successful_requests, 3),
            _money(i.cost_per_million_generated_tokens), sat, redact_url(i.url),
        ])
    return rows


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    stamp = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%SZ")
    age = _dur(max(0.0, now - t)) or f"{max(0.0, now - t):.0f}s"
    return f"{stamp} ({age} ago)"


def source_failures(st: AgentState, targets: Sequence[Any]) -> list[tuple[str, str]]:
    """Every failing source and inference target as (headline, detail): what, which, why, since when.
    URLs are shown without user:password or query string."""
    out: list[tuple[str, str]] = []
    for c in st.collectors:
        if c.enabled and not c.success:
            out.append((f"{c.name}: {c.last_error_kind or 'error'} since {_ago(c.failing_since, st.time)}",
                        c.last_error))
    for t in targets:
        if not t.ok:
            who = f"{t.namespace}/{t.pod}" if t.pod else "(static target)"
            out.append((f"inference {who}: {t.error_kind} since {_ago(t.failing_since, st.time)}",
                        f"{redact_url(t.url)}: {redact_text(t.error, t.url)}"))
    return out


def gpu_notes(st: AgentState) -> list[str]:
    """What a device gauge alone hides: Xid history, GPU use by processes outside any pod."""
    notes = []
    for d in st.devices:
        if d.is_mig or not d.xid_errors:
            continue
        xids = ", ".join(f"Xid {x} x{n}" + (f" ({XID_MEANING[x]})" if x in XID_MEANING else "")
                         for x, n in d.xid_errors)
        notes.append(f"GPU {d.gpu}: {xids} since the agent started")
    for gpu, _uuid, act, mem in st.attribution.unattributed:
        if act >= 0.01 or mem >= 2**28:
            notes.append(f"GPU {gpu}: {act * 100:.0f}% activity and {mem / 2**30:.1f} GiB used by processes "
                         "outside any pod (host processes; gpucap_gpu_unattributed_*)")
    for f in st.attribution.foreign:
        if not f.pod:
            continue
        notes.append(f"GPU {f.gpu}: {_n(f.processes, 'process')} of pod {f.namespace}/{f.pod}, which holds "
                     "no allocation on it")
    return notes


def to_table(st: AgentState, options: TableOptions | None = None, targets: Sequence[Any] = (),
             out: Out | None = None) -> str:
    """The node as a person reads it: units, serving, failures, then the money."""
    opt = options or TableOptions()
    out = out or Out.detect(wide=opt.wide)
    views = sorted((v for v in st.units if _matches(v, opt.filters)), key=_sort_key(opt.sort))
    if not opt.headers:
        out.add(table(WIDE_UNIT_COLUMNS if opt.wide else UNIT_COLUMNS, _unit_rows(st, views, opt.wide),
                      headers=False, width=out.width))
        return out.render()
    s = summary(st)
    out.text(f"node {st.node.name}  {st.node.instance_type or '(instance type unknown)'}  "
             f"{st.node.capacity_type or ''}  driver {st.driver_version or '?'}", "bold")
    sources = sorted({v.row.price_source for v in st.units})
    prices = f"  prices: {', '.join(sources)}" if sources and not opt.wide else ""
    out.text(f"at {_rfc3339(st.time)}{prices}")
    if opt.filters:
        shown = " ".join(f"{k}={v}" for k, v in opt.filters)
        out.text(f"showing {len(views)} of {_n(len(st.units), 'unit')} ({shown})")
    out.text()
    out.add(table(WIDE_UNIT_COLUMNS if opt.wide else UNIT_COLUMNS, _unit_rows(st, views, opt.wide), width=out.width))
    out.text(LEGEND if opt.wide else SHORT_LEGEND, "dim")
    serving = _serving_rows(st, opt.wide, opt.filters)
    if serving:
        out.text()
        out.text("serving:", "bold")
        out.add(table(WIDE_SERVING_COLUMNS if opt.wide else SERVING_COLUMNS, serving, width=out.width))
    failing = source_failures(st, targets)
    if failing:
        out.text()
        out.text(f"sources: {_n(len(failing), 'failure')} (the rest is served)", "bold")
        for headline, detail in failing:
            out.add(Padding(styled(headline, "failing"), (0, 0, 0, 2)))
            out.add(Padding(Text(detail, overflow="fold"), (0, 0, 0, 4)))
    notes = gpu_notes(st)
    if notes:
        out.text()
        out.text("gpu notes:", "bold")
        for line in notes:
            out.add(Padding(Text(line, overflow="fold"), (0, 0, 0, 2)))
    out.text()
    out.text(f"node ${s['node_hourly_dollars']:.2f}/h: allocated ${s['allocated_hourly_dollars']:.2f}/h, "
             f"unallocated ${s['unallocated_hourly_dollars']:.2f}/h ({_n(s['unallocated_units'], 'unit')})")
    out.add(styled(f"idle reserved: {_n(s['idle_reserved_units'], 'unit')}, "
                   f"${s['idle_reserved_hourly_dollars']:.2f}/h, ${s['idle_reserved_monthly_dollars']:,.2f}/month",
                   "idle_reserved" if s["idle_reserved_units"] else ""))
    if s["lost_units"]:
        out.add(styled(f"lost: {_n(s['lost_units'], 'unit')}, ${s['lost_hourly_dollars']:.2f}/h still paid", "lost"))
    if s["unknown_units"]:
        out.add(styled(f"unknown: {_n(s['unknown_units'], 'unit')}, ${s['unknown_hourly_dollars']:.2f}/h "
                       "(no fresh kubelet or NVML reading: who holds them or how busy they are is not known)",
                       "unknown"))
    for team, v in s["idle_reserved_hourly_dollars_by_team"].items():
        out.text(f"  team {team}: ${v:.2f}/h idle reserved (${v * HOURS_PER_MONTH:,.2f}/month)")
    return out.render()


SHORT_LEGEND = ("ACT: SM active (GPM), else utilization. idle reserved: held, ACT at or below the "
                "threshold for the whole idle window. --wide: every column.")
LEGEND = (
    "ACTIVITY: what idle detection uses (SM active where the GPU has GPM, else utilization; a time-sliced "
    "share: its pod's processes). UTIL: NVML utilization of the whole device. SM: GPM SM active. "
    "idle reserved: held by a pod with ACTIVITY at or below the threshold for the whole idle window."
)


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _short(model: str) -> str:
    return model.replace("NVIDIA ", "")


# ------------------------------------------------------------------------------------- redaction
def redact_url(url: str) -> str:
    """A URL without user:password and query string (either may hold a secret)."""
    try:
        from collectors import redact  # written beside this; prefer it when present

        fn = getattr(redact, "redact_url", None)
        if callable(fn):
            return str(fn(url))
    except ImportError:
        pass
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "") if parts.username or parts.password else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str, url: str) -> str:
    return text.replace(url, redact_url(url)) if url else text
