"""`gpucap cost`: the ledger as a report a FinOps lead can reconcile.

Rows are GPU-hours and dollars by the requested keys and always by state. The report states the
hours it observed and the hours of the window it did not (never guessed), and its dollars add up to
the node's price × observed hours exactly: both come from the same ledger minutes.
"""

from __future__ import annotations

import calendar
import csv
import datetime as dt
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.model import STATES

BY_KEYS = ("team", "namespace", "workload", "unit", "state", "feature", "model", "node")
HOURS_PER_MONTH = 730.0
MAX_WINDOW = 90 * 86400.0


@dataclass
class CostReport:
    start: float
    end: float
    by: tuple[str, ...]
    rows: list[dict[str, Any]]
    observed_seconds: dict[str, float]  # per node
    node_dollars: float  # Σ node price × observed seconds, from the ledger's node minutes
    source: str = "ledger"
    budgets: dict[str, float] = field(default_factory=dict)

    @property
    def observed_hours(self) -> float:
        return sum(self.observed_seconds.values()) / 3600.0

    @property
    def window_hours(self) -> float:
        return (self.end - self.start) / 3600.0 * max(1, len(self.observed_seconds))

    @property
    def total_dollars(self) -> float:
        return sum(r["cost_dollars"] for r in self.rows)

    def by_state(self) -> dict[str, float]:
        out = dict.fromkeys(STATES, 0.0)
        for r in self.rows:
            out[r["state"]] += r["cost_dollars"]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "window": {"start": _rfc3339(self.start), "end": _rfc3339(self.end)},
            "observed_hours": round(self.observed_hours, 6),
            "unobserved_hours": round(max(0.0, self.window_hours - self.observed_hours), 6),
            "total_dollars": round(self.total_dollars, 6),
            "node_price_times_observed_hours_dollars": round(self.node_dollars, 6),
            "dollars_by_state": {k: round(v, 6) for k, v in self.by_state().items()},
            "nodes": {n: {"observed_hours": round(s / 3600.0, 6)} for n, s in sorted(self.observed_seconds.items())},
            "source": self.source,
            "rows": [{**r, "gpu_hours": round(r["gpu_hours"], 6), "cost_dollars": round(r["cost_dollars"], 6)}
                     for r in self.rows],
        }


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def month_window(month: str) -> tuple[float, float]:
    """'2026-11' → [Nov 1, Dec 1) UTC; raises ValueError naming the expected form."""
    try:
        year, mon = (int(x) for x in month.split("-"))
        start = dt.datetime(year, mon, 1, tzinfo=dt.UTC)
    except (ValueError, TypeError):
        raise ValueError(f"expected a month like 2026-11, got {month!r}") from None
    days = calendar.monthrange(year, mon)[1]
    return start.timestamp(), start.timestamp() + days * 86400.0


def parse_by(value: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in keys if k not in BY_KEYS]
    if bad or not keys:
        raise ValueError(f"expected a comma-separated list of {', '.join(BY_KEYS)}, got {value!r}")
    return tuple(k for k in keys if k != "state")


def _key(row: Any, by: Sequence[str]) -> tuple[str, ...]:
    out = []
    for k in by:
        if k == "unit":
            out.append(row.uuid)
        elif k == "workload":
            out.append(row.workload or row.pod)
        else:
            out.append(getattr(row, k, "") or "")
    return tuple(out)


def report_from_history(history: Any, start: float, end: float, by: Sequence[str]) -> CostReport:
    """Group the ledger's hour rows; `model` splits inference dollars as DESIGN §4 (the rest is model "")."""
    by = tuple(by)
    groups: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
    model_mode = "model" in by
    unit_by = tuple(k for k in by if k != "model")
    hour_rows = list(history.hour_rows(start, end))
    for r in hour_rows:
        g = groups[_key(r, unit_by) + (("",) if model_mode else ()) + (r.state,)]
        g[0] += r.seconds * r.gpu_fraction / 3600.0
        g[1] += r.dollars
    if model_mode:
        # Move each model's share of its pod's dollars out of the pod's "" model row. A pod on several
        # units (a tensor-parallel server on 2 GPUs) has its model dollars spread over those units in
        # proportion to what each unit booked for the pod in that state and hour, so `--by unit,model` puts
        # them where the money was and no unit's row goes negative.
        parts: dict[tuple[str, str, str, int], dict[tuple[str, ...], list[float]]] = defaultdict(dict)
        for r in hour_rows:  # per hour: a pod name that moves to another unit takes its model along
            if r.pod and r.dollars > 0:
                part = parts[(r.namespace, r.pod, r.state, r.hour)].setdefault(
                    _key(r, unit_by), [0.0, r.hourly_price / max(r.gpu_fraction, 1e-12)])
                part[0] += r.dollars
        for m in history.server_minutes(start, end):
            for state in STATES:
                d = m.get(f"d_{state}") or 0.0
                pod_parts = parts.get((m["namespace"], m["pod"], state, int(m["minute"]) // 3600 * 3600))
                if d <= 0 or not pod_parts:
                    continue
                booked = sum(p[0] for p in pod_parts.values())
                for base, (dollars, hourly) in pod_parts.items():
                    dd = d * dollars / booked
                    hours = dd / hourly if hourly > 0 else 0.0
                    share = groups[base + ("",) + (state,)]
                    share[1] -= dd
                    share[0] -= hours
                    g = groups[base + (m["model"],) + (state,)]
                    g[1] += dd
                    g[0] += hours
    keys = unit_by + (("model",) if model_mode else ())
    rows = []
    for key, (hours, dollars) in sorted(groups.items()):
        if abs(dollars) < 1e-12 and abs(hours) < 1e-12:
            continue
        row = dict(zip(keys, key[:-1]))
        row.update(state=key[-1], gpu_hours=hours, cost_dollars=dollars)
        rows.append(row)
    return CostReport(start, end, by, rows, history.observed_seconds(start, end), history.node_dollars(start, end))


# ------------------------------------------------------------------------------------ output
def to_csv(report: CostReport) -> str:
    buf = io.StringIO()
    keys = [k for k in report.by] + ["state", "gpu_hours", "cost_dollars"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in report.rows:
        w.writerow([r.get(k, "") if k not in ("gpu_hours", "cost_dollars") else f"{r[k]:.6f}" for k in keys])
    return buf.getvalue()


def to_json_text(report: CostReport) -> str:
    return json.dumps(report.to_json(), indent=2)


def _money(v: float) -> str:
    return f"${v:,.2f}"


def to_table(report: CostReport, now: float | None = None, out: Any = None, sort: str = "total",
             headers: bool = True) -> str:
    """Per team (or the first --by key): GPU-hours and dollars by state; the node's unallocated dollars;
    observed and unobserved hours. Fits the terminal (agent/tables.py: COLUMNS, else the TTY, else
    80; names are cut, money never), colour for idle reserved, lost and unknown dollars on a TTY."""
    from rich.text import Text

    from agent.tables import Column, Out, styled, table

    out = out if out is not None else Out.detect()
    key = report.by[0] if report.by else "team"
    per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in report.rows:
        name = r.get(key, "") if key in r else ""
        if r["state"] in ("unallocated",) or (r["state"] == "unknown" and not name):
            name = f"(node: {r['state']})"
        per[name or "(no " + key + ")"][r["state"]] += r["cost_dollars"]
        per[name or "(no " + key + ")"]["hours"] += r["gpu_hours"]
    if headers:
        out.text(f"GPU cost {_rfc3339(report.start)} .. {_rfc3339(report.end)} ({report.source})")
        unobserved = report.window_hours - report.observed_hours
        out.add(Text(f"observed {report.observed_hours:,.2f} h of {report.window_hours:,.2f} h"
                     + (f" ({unobserved:,.2f} h not observed: not counted, never guessed)"
                        if unobserved > 0.01 else "")))
        out.text("")
    orders = {"total": lambda n: -sum(v for k, v in per[n].items() if k != "hours"),
              "idle": lambda n: -per[n]["idle_reserved"], "name": lambda n: n}
    order = sorted(per, key=lambda n: (n.startswith("(node"), orders[sort](n), n))
    rows = []
    for name in order:
        v = per[name]
        total = sum(x for k, x in v.items() if k != "hours")
        cells: list[Any] = [name, f"{v['hours']:,.1f}", _money(v["active"])]
        for state in ("idle_reserved", "lost", "unknown"):
            cells.append(styled(_money(v[state]), state) if v[state] > 0.005 else _money(v[state]))
        cells.append(_money(total))
        rows.append(cells)
    columns = [Column(key.upper(), shrink=True, min_width=12)] + [
        Column(h, justify="right") for h in ("GPU-H", "ACTIVE", "IDLE RSV", "LOST", "UNKNOWN", "TOTAL")]
    out.add(table(columns, rows, width=out.width, headers=headers))
    if not headers:
        return out.render()
    s = report.by_state()
    out.text("")
    out.add(Text(f"total {_money(report.total_dollars)} = node price × observed hours {_money(report.node_dollars)}"))
    out.add(Text("by state: " + ", ".join(f"{k.replace('_', ' ')} {_money(v)}" for k, v in s.items())))
    if report.observed_hours > 0:
        rate = report.total_dollars / (report.observed_hours / max(1, len(report.observed_seconds)))
        out.add(Text(f"run rate {_money(rate)}/h, {_money(rate * HOURS_PER_MONTH)}/month (730 h)"))
    return out.render()


def reconcile(report: CostReport) -> float:
    """Difference between the rows' dollars and node price × observed hours (0 for a ledger report)."""
    return report.total_dollars - report.node_dollars


def totals_by(rows: Iterable[dict[str, Any]], key: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        out[r.get(key, "")] += r["cost_dollars"]
    return dict(out)
