"""Monthly GPU budgets per team (`cost.budgets`): budget, month to date and projection in `gpucap cost`.

Why here and not only in alerts: the PrometheusRule (deploy/helm/gpucap, `budgets` value) pages when
the run rate of the last day would exceed a team's budget, but a FinOps lead asks "where do we
stand this month": dollars booked so far (from the ledger, or Prometheus fleet-wide) plus the
observed run rate over the hours left. Hours the agent did not observe are not guessed: month to
date counts what was booked, and the projection extends only the observed rate over the future.

Budgets are per calendar month (UTC), like the bill. A report whose window spans two months cannot
be compared with a monthly budget; `budget_status` says so instead of pro-rating.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WARN_RATIO = 0.9  # "near" a budget: projected past 90% of it (the chart's alert fires at budgetAlerts.projectedRatio)


def month_bounds(t: float) -> tuple[float, float]:
    """[start, end) of the calendar month (UTC) holding t."""
    d = dt.datetime.fromtimestamp(t, dt.UTC)
    start = dt.datetime(d.year, d.month, 1, tzinfo=dt.UTC).timestamp()
    return start, start + calendar.monthrange(d.year, d.month)[1] * 86400.0


def month_to_date_window(end: float) -> tuple[float, float]:
    """The window a budget compares with: from the start of end's month to end. `end` exactly at a
    month boundary means the whole previous month (a `--month` report's end)."""
    start, _ = month_bounds(end - 1e-6)
    return start, end


@dataclass(frozen=True, slots=True)
class BudgetLine:
    team: str
    budget: float  # dollars per month
    month_to_date: float  # dollars booked in the month so far (all states the team's pods held)
    idle_reserved: float  # of which idle reserved
    projected: float  # month to date + observed run rate × hours left in the month
    status: str  # ok | near | projected_over | over

    @property
    def projected_ratio(self) -> float:
        return self.projected / self.budget

    def to_json(self) -> dict[str, Any]:
        return {"team": self.team, "budget_dollars": self.budget,
                "month_to_date_dollars": round(self.month_to_date, 6),
                "idle_reserved_dollars": round(self.idle_reserved, 6),
                "projected_dollars": round(self.projected, 6),
                "projected_share_of_budget": round(self.projected_ratio, 6), "status": self.status}


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    month: str  # YYYY-MM
    start: float
    end: float  # the report's end: month to date runs to here
    observed_hours: float  # per node, in the month so far
    hours_left: float
    lines: tuple[BudgetLine, ...]
    unbudgeted_dollars: float  # spent by holders of teams without a budget (and by no team)
    problem: str = ""  # why no comparison is possible ("" when lines are meaningful)

    def to_json(self) -> dict[str, Any]:
        return {"month": self.month, "observed_hours": round(self.observed_hours, 6),
                "hours_left": round(self.hours_left, 6), "problem": self.problem or None,
                "unbudgeted_dollars": round(self.unbudgeted_dollars, 6),
                "teams": [x.to_json() for x in self.lines]}


def _status(month_to_date: float, projected: float, budget: float) -> str:
    if month_to_date > budget:
        return "over"
    if projected > budget:
        return "projected_over"
    if projected > WARN_RATIO * budget:
        return "near"
    return "ok"


def budget_status(report: Any, budgets: Mapping[str, float] | Iterable[tuple[str, float]],
                  now: float | None = None) -> BudgetStatus:
    """Compare a cost report (agent/cost.py `CostReport`: rows with a `team` key, `cost_dollars`,
    `state`; `start`, `end`, `observed_seconds`) with monthly budgets. `now` bounds the projection's
    future (default: the report's end)."""
    budgets = dict(budgets)
    month_start, month_end = month_bounds(report.end - 1e-6)
    month = dt.datetime.fromtimestamp(month_start, dt.UTC).strftime("%Y-%m")
    nodes = max(1, len(report.observed_seconds))
    observed_h = sum(report.observed_seconds.values()) / 3600.0 / nodes
    end = min(report.end, now) if now is not None else report.end
    hours_left = max(0.0, (month_end - end) / 3600.0)
    problem = ""
    if report.start < month_start - 1e-6:
        problem = (f"the report starts before {month} (budgets are per calendar month): "
                   f"use --month {month} or a --window inside the month")
    elif report.rows and "team" not in report.rows[0]:
        problem = "budgets are per team: add team to --by"
    spent: dict[str, float] = {}
    idle: dict[str, float] = {}
    for r in report.rows:
        team = r.get("team", "") or ""
        spent[team] = spent.get(team, 0.0) + r["cost_dollars"]
        if r["state"] == "idle_reserved":
            idle[team] = idle.get(team, 0.0) + r["cost_dollars"]
    lines = []
    for team, budget in sorted(budgets.items()):
        mtd = spent.get(team, 0.0)
        rate = mtd / observed_h if observed_h > 0 else 0.0
        projected = mtd + rate * hours_left
        lines.append(BudgetLine(team, float(budget), mtd, idle.get(team, 0.0), projected,
                                _status(mtd, projected, float(budget))))
    unbudgeted = sum(v for k, v in spent.items() if k not in budgets)
    return BudgetStatus(month, month_start, end, observed_h, hours_left, tuple(lines), unbudgeted, problem)


def _money(v: float) -> str:
    return f"${v:,.0f}"  # budgets are whole dollars; the cost table above has the cents


_LABEL = {"ok": "ok", "near": "near budget", "projected_over": "PROJECTED OVER", "over": "OVER BUDGET"}


def budget_lines(report: Any, budgets: Mapping[str, float] | Iterable[tuple[str, float]],
                 now: float | None = None) -> list[str]:
    """The budget block of the `gpucap cost` table (80 columns): per budgeted team, budget, month to
    date, projected month and its share of the budget, idle reserved dollars so far, and a status."""
    return render_budget(budget_status(report, budgets, now))


def render_budget(st: BudgetStatus) -> list[str]:
    """The budget block's lines for a computed status."""
    out = [(f"BUDGETS {st.month}: {st.observed_hours:,.1f} h observed, {st.hours_left:,.1f} h left "
            "(projected = month to date"),
           "  + observed rate × hours left)"]
    if st.problem:
        return out + [f"  not compared: {st.problem}"]
    out.append(f"{'TEAM':<18} {'BUDGET':>9} {'TO DATE':>9} {'PROJECTED':>9} {'OF BGT':>6} {'IDLE RSV':>8}  STATUS")
    for x in st.lines:
        out.append(f"{x.team[:18]:<18} {_money(x.budget):>9} {_money(x.month_to_date):>9} "
                   f"{_money(x.projected):>9} {x.projected_ratio:>6.0%} {_money(x.idle_reserved):>8}  "
                   f"{_LABEL[x.status]}")
    if st.unbudgeted_dollars > 0.5:
        out.append(f"{'(no budget)':<18} {'':>9} {_money(st.unbudgeted_dollars):>9}")
    return out
