"""`gpucap snapshot` output: a table for a person, JSON with a fixed top level for programs."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

from agent.model import STATES, AgentState, UnitView

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


def to_json(st: AgentState) -> dict[str, Any]:
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
        "units": [_unit_json(v) for v in st.units],
        "workloads": list(workloads.values()),
        "inference": [
            {"namespace": i.owner.namespace, "pod": i.owner.pod, "workload": i.owner.workload,
             "workload_kind": i.owner.workload_kind, "team": i.owner.team, "server": i.server, "model": i.model,
             "url": i.url, "queue_requests": i.queue_requests, "running_requests": i.running_requests,
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
                        "skipped": dict(c.skipped)} for c in st.collectors],
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


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def to_table(st: AgentState) -> str:
    s = summary(st)
    out = [
        (f"node {st.node.name}  {st.node.instance_type or '(instance type unknown)'}  "
        f"{st.node.capacity_type or ''}  driver {st.driver_version or '?'}  at {_rfc3339(st.time)}"),
        "",
    ]
    power = {d.uuid: d.power_watts for d in st.devices if not d.is_mig}
    rows = []
    for v in st.units:
        r = v.row
        unit = str(r.gpu) + (f"/gi{r.gpu_instance}" if r.gpu_instance else "") + (
            f"::{r.replica}" if r.replica is not None else "")
        if r.kind == "mig_free":
            unit += "/free"
        o = r.owner
        d = r.device if r.kind != "mig_free" else None
        act = "LOST" if v.state == "lost" else _pct(r.activity)
        sm = "-" if d is None or d.sm_active is None else _pct(d.sm_active)
        util = "-" if d is None or d.utilization is None else _pct(d.utilization)
        p = power.get(r.device_uuid if r.kind != "mig" else (d.parent_uuid if d else ""))
        if v.state == "lost":
            state = "GPU LOST"
        elif v.state == "unknown":
            state = "unknown (no fresh data)"
        elif v.state == "idle_reserved":
            state = f"idle reserved {_dur(v.idle_seconds)}"
        elif v.state == "active" and _dur(v.idle_seconds):
            state = f"active (idle {_dur(v.idle_seconds)})"
        else:
            state = v.state
        rows.append([
            unit, (r.mig_profile or _short(r.model)), act, util, sm,
            f"{_gib(r.memory_used_bytes)}/{_gib(r.memory_total_bytes)}",
            "-" if p is None or r.kind in ("mig", "share", "mig_free") else f"{p:.0f}W",
            f"{o.namespace}/{o.pod}" if o.pod else "-", o.workload or "-", o.team or "-",
            state, _money(r.hourly_price), r.price_source,
        ])
    out.append(_table(["GPU", "MODEL", "ACTIVITY", "UTIL", "SM", "MEM GiB", "POWER", "HELD BY", "WORKLOAD",
                       "TEAM", "STATE", "$/H", "PRICE SOURCE"], rows))
    out.append(LEGEND)
    if st.inference:
        out += ["", "serving:"]
        irows = []
        for i in st.inference:
            irows.append([
                f"{i.owner.namespace}/{i.owner.pod}", i.server, i.model or "-",
                "-" if i.queue_requests is None else f"{i.queue_requests:.0f}",
                "-" if i.running_requests is None else f"{i.running_requests:.0f}", _pct(i.kv_cache_usage_ratio),
                "-" if i.generated_tokens_per_second is None else f"{i.generated_tokens_per_second:,.0f}",
                _money(i.cost_per_1k_successful_requests, 3), _money(i.cost_per_million_generated_tokens),
                "YES (" + i.saturation_reason + ")" if i.saturated else "no",
            ])
        out.append(_table(["POD", "SERVER", "MODEL", "QUEUE", "RUNNING", "KV", "TOK/S", "$/1K REQ", "$/1M TOK",
                           "SATURATED"], irows))
    out += [
        "",
        (f"node ${s['node_hourly_dollars']:.2f}/h: allocated ${s['allocated_hourly_dollars']:.2f}/h, "
        f"unallocated ${s['unallocated_hourly_dollars']:.2f}/h ({_n(s['unallocated_units'], 'unit')})"),
        (f"idle reserved: {_n(s['idle_reserved_units'], 'unit')}, ${s['idle_reserved_hourly_dollars']:.2f}/h, "
        f"${s['idle_reserved_monthly_dollars']:,.2f}/month"),
    ]
    if s["lost_units"]:
        out.append(f"lost: {_n(s['lost_units'], 'unit')}, ${s['lost_hourly_dollars']:.2f}/h still paid")
    if s["unknown_units"]:
        out.append(f"unknown: {_n(s['unknown_units'], 'unit')}, ${s['unknown_hourly_dollars']:.2f}/h "
                   "(no fresh kubelet or NVML reading: who holds them or how busy they are is not known)")
    for team, v in s["idle_reserved_hourly_dollars_by_team"].items():
        out.append(f"  team {team}: ${v:.2f}/h idle reserved (${v * HOURS_PER_MONTH:,.2f}/month)")
    failing = [c for c in st.collectors if not c.success]
    for c in failing:
        out.append(f"collector {c.name} failing: {c.last_error}")
    return "\n".join(out) + "\n"


LEGEND = (
    "ACTIVITY: what idle detection uses (SM active where the GPU has GPM, else utilization; a time-sliced\n"
    "share: its pod's processes). UTIL: NVML utilization of the whole device. SM: GPM SM active.\n"
    "idle reserved: held by a pod with ACTIVITY at or below the threshold for the whole idle window."
)


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _short(model: str) -> str:
    return model.replace("NVIDIA ", "")
