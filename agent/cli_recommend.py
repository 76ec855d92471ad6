"""`gpucap recommend`: right-sizing per workload from the node's ledger (`--history`), a simulated
node fast-forwarded over the window (`--simulate`), or a whole fleet's PromQL store (`--prometheus`),
as a table, CSV or JSON with the DESIGN §6 columns, or a self-contained HTML report."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shutil
import time
from collections.abc import Sequence
from typing import Any

import click

from agent.cli_cost import (
    _config,
    _duration,
    _fail,
    _progress,
    check_sources,
    fill_simulated_ledger,
    setup_logging,
    simulated_ledger,
)
from agent.recommend import COLUMNS, Prices, Recommendation, Settings, settings_from_config

MAX_WINDOW = 90 * 86400.0


FILTER_KEYS = ("team", "namespace", "action", "workload", "node")
SORTS = ("savings", "cost", "workload", "team", "confidence", "action")


@click.command()
@click.option("--history", "history_path", envvar="GPUCAP_HISTORY", show_envvar=True,
              type=click.Path(dir_okay=False),
              help="The node's ledger (history.db). With --simulate: where to keep the simulated ledger, "
              "for more reports on the same run (a new file).")
@click.option("--simulate", envvar="GPUCAP_SIMULATE", show_envvar=True, default=None, metavar="SCENARIO",
              help="Fast-forward a simulated node over the window (headless) and recommend on it.")
@click.option("--prometheus", "prometheus_url", envvar="GPUCAP_PROMETHEUS", show_envvar=True, default=None,
              metavar="URL", help="A Prometheus-compatible store (Prometheus, VictoriaMetrics, Thanos, Mimir) with "
              "gpucap's series: one row per workload across the fleet.")
@click.option("--window", envvar="GPUCAP_WINDOW", show_envvar=True, callback=_duration, default="7d",
              show_default=True, help="How much behaviour to size on, back from now (or the end of the simulation).")
@click.option("--format", "fmt", envvar="GPUCAP_FORMAT", show_envvar=True,
              type=click.Choice(["table", "csv", "json", "html"]), default="table", show_default=True)
@click.option("--output", "output", envvar="GPUCAP_OUTPUT", show_envvar=True, type=click.Path(dir_okay=False),
              default=None, help="Write to this file instead of standard output.")
@click.option("--wide", "-w", is_flag=True, envvar="GPUCAP_WIDE", help="Table: every column, never cut.")
@click.option("--no-headers", is_flag=True, help="Table: only the workload rows, no header, summary or reasons.")
@click.option("--sort", type=click.Choice(SORTS), default="savings", show_default=True,
              help="Order of the workloads (every format).")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Only workloads with team=, namespace=, action=, workload= or node= (repeatable; the same "
              "key twice means either; every format).")
@click.option("--config", "config_path", envvar="GPUCAP_CONFIG", show_envvar=True, type=click.Path(dir_okay=False))
@click.option("--start", "start", type=float, default=None, hidden=True,
              help="With --simulate: the simulated clock's start (Unix seconds), for reproducible output.")
def recommend(history_path: str | None, simulate: str | None, prometheus_url: str | None, window: float,
              fmt: str, output: str | None, wide: bool, no_headers: bool, sort: str, filters: tuple[str, ...],
              config_path: str | None, start: float | None) -> None:
    """Per workload: release, downsize to a MIG slice or a cheaper GPU, consolidate, scale up or keep,
    with the target, the monthly savings and the confidence."""
    from agent.report import parse_filters

    check_sources(history_path, simulate, prometheus_url)
    try:
        chosen = _actions_checked(parse_filters(filters, FILTER_KEYS))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--filter") from None
    if window > MAX_WINDOW:
        raise click.BadParameter(f"expected at most 90d, got {window / 86400:g}d", param_hint="--window")
    if window < 3600:
        raise click.BadParameter(f"expected at least 1h, got {window:g}s", param_hint="--window")
    config = _config(config_path)
    setup_logging("text", "error")
    settings = settings_from_config(config)
    prices = Prices.from_pricing(config.pricing)
    html = fmt == "html"
    tmp = None
    try:
        if prometheus_url:
            from agent.fleet import FleetError, recommend_from_prometheus

            end = time.time()
            try:
                recs = recommend_from_prometheus(prometheus_url, end - window, end, settings, prices,
                                                 config.pricing, with_series=html, on_progress=_progress(1.0, "querying the fleet"))
            except FleetError as e:
                _fail(str(e), 1)
            source = f"prometheus {prometheus_url}"
        else:
            if simulate:
                history_path, tmp = simulated_ledger(history_path, "gpucap-recommend-")
                fill_simulated_ledger(config, simulate, window, history_path, start)
                source = f"simulated {simulate}"
            else:
                source = f"ledger {history_path}"
            recs = _from_ledger(str(history_path), window, settings, prices, html)
        recs = select(recs, chosen, sort)
        text = render(recs, fmt, source=source, settings=settings, wide=wide, headers=not no_headers)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if output:
        try:
            with open(output, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        except OSError as e:
            _fail(f"{output}: cannot write: {e.strerror}", 2)
        click.echo(f"wrote {output} ({len(recs)} workloads)", err=True)
    else:
        click.echo(text, nl=False)


def _from_ledger(path: str, window: float, settings: Settings, prices: Prices,
                 with_series: bool) -> list[Recommendation]:
    from agent.history import History
    from agent.recommend import from_history

    try:
        history = History(path)
    except FileNotFoundError:
        _fail(f"{path}: no such ledger (run the agent with --history {path}, or history.path in the config)", 2)
    try:
        span = history.span()
        if span is None:
            _fail(f"{path}: the ledger holds no minute yet", 1)
        assert span is not None
        end = span[1] + 60.0  # the window ends at the ledger's last minute: an old ledger still answers
        return from_history(history, end - window, end, settings, prices, with_series)
    finally:
        history.close()


# ------------------------------------------------------------------------------ rendering
def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cells(r: Recommendation) -> dict[str, Any]:
    row = r.row()
    row["window_start"] = _rfc3339(r.window_start)
    row["window_end"] = _rfc3339(r.window_end)
    return row


def to_csv(recs: Sequence[Recommendation]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in recs:
        row = _cells(r)
        w.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
    return buf.getvalue()


def summary(recs: Sequence[Recommendation]) -> dict[str, Any]:
    """What a finance review reads first: spend, savings by action and by team."""
    by_action: dict[str, float] = {}
    by_team: dict[str, float] = {}
    for r in recs:
        if r.monthly_savings_dollars > 0:
            by_action[r.action] = round(by_action.get(r.action, 0.0) + r.monthly_savings_dollars, 2)
            by_team[r.team or "(none)"] = round(by_team.get(r.team or "(none)", 0.0) + r.monthly_savings_dollars, 2)
    return {"workloads": len(recs),
            "current_monthly_cost_dollars": round(sum(r.current_monthly_cost_dollars for r in recs), 2),
            "monthly_savings_dollars": round(sum(max(0.0, r.monthly_savings_dollars) for r in recs), 2),
            "scale_up_monthly_cost_dollars": round(sum(-r.monthly_savings_dollars for r in recs
                                                       if r.action == "scale_up"), 2),
            "savings_by_action": by_action, "savings_by_team": by_team}


def to_json(recs: Sequence[Recommendation], source: str = "", settings: Settings | None = None) -> str:
    start = min((r.window_start for r in recs), default=0.0)
    end = max((r.window_end for r in recs), default=0.0)
    doc = {"window": {"start": _rfc3339(start), "end": _rfc3339(end)}, "source": source,
           "settings": {k: getattr(settings, k) for k in Settings.__slots__} if settings else {},
           "summary": summary(recs), "columns": list(COLUMNS), "recommendations": [_cells(r) for r in recs]}
    return json.dumps(doc, indent=2) + "\n"


_NARROW = 120  # below this many columns the table leaves out P95, MEM PEAK and SAT (the reasons give them)
_ACTION_STYLE = {"release": "idle_reserved", "scale_up": "saturated"}


def to_table(recs: Sequence[Recommendation], wide: bool = False, out: Any = None, headers: bool = True) -> str:
    """The workloads, the summary and one reason per workload, fitted to the terminal (agent/tables.py);
    names are cut with an ellipsis, numbers never; `--wide` shows every column at any width."""
    from rich.text import Text

    from agent.tables import Column, Out, styled, table

    out = out if out is not None else Out.detect(wide)
    full = wide or out.width >= _NARROW
    columns = [Column("WORKLOAD", shrink=True, min_width=16), Column("GPUS", justify="right")]
    if full:
        columns += [Column("P95", justify="right"), Column("MEM PEAK", justify="right"),
                    Column("SAT", justify="right")]
    columns += [Column("ACTION"), Column("TARGET", shrink=True, min_width=8), Column("NOW $/MO", justify="right"),
                Column("SAVES $/MO", justify="right"), Column("CONF", justify="right")]
    rows = []
    for r in recs:
        cells: list[Any] = [f"{r.namespace}/{r.workload}", f"{r.allocation:g}"]
        if full:
            cells += ["-" if r.activity_p95 is None else f"{r.activity_p95:.2f}",
                      "-" if r.memory_peak_bytes is None else f"{r.memory_peak_bytes / 2**30:.1f}G",
                      "-" if r.saturated_ratio is None else f"{r.saturated_ratio:.0%}"]
        cells += [styled(r.action, _ACTION_STYLE.get(r.action, "")), r.target or "-",
                  f"{r.current_monthly_cost_dollars:,.0f}", f"{r.monthly_savings_dollars:,.0f}",
                  f"{r.confidence:.2f}"]
        rows.append(cells)
    out.add(table(columns, rows, width=out.width, headers=headers))
    if not headers:  # for awk: the rows and nothing else
        return out.render()
    s = summary(recs)
    out.text("")
    out.add(Text(f"{s['workloads']} workloads, ${s['current_monthly_cost_dollars']:,.0f}/month now; "
                 f"${s['monthly_savings_dollars']:,.0f}/month of savings available"
                 + (f"; scaling up adds ${s['scale_up_monthly_cost_dollars']:,.0f}/month"
                    if s["scale_up_monthly_cost_dollars"] else "") + " (730 h a month)."))
    import textwrap

    wrap = None if wide else max(40, out.width)
    for r in recs:
        line = f"  {r.namespace}/{r.workload}: {r.reason}"
        # a hanging indent: each reason reads as one item, not as lines that start at the margin
        out.add(Text(line if wrap is None else textwrap.fill(line, wrap, subsequent_indent="      ")))
    return out.render()


def _actions_checked(filters: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """`action=scale-up` means scale_up; an action that does not exist is an error, not an empty list."""
    from agent.recommend import ACTIONS

    out = []
    for k, v in filters:
        if k == "action":
            v = v.replace("-", "_").lower()
            if v not in ACTIONS:
                raise ValueError(f"unknown action {v!r}; expected one of {', '.join(ACTIONS)}")
        out.append((k, v))
    return tuple(out)


def select(recs: Sequence[Recommendation], filters: Sequence[tuple[str, str]], sort: str) -> list[Recommendation]:
    """The workloads `--filter` keeps (a key given twice means either), in `--sort` order."""
    wanted: dict[str, set[str]] = {}
    for k, v in filters:
        wanted.setdefault(k, set()).add(v.lower())

    def values(r: Recommendation, k: str) -> set[str]:
        v = str(getattr(r, k) or "").lower()
        return set(v.split(",")) if k == "node" else {v}  # a workload on several nodes lists them all

    kept = [r for r in recs if all(values(r, k) & vals for k, vals in wanted.items())]
    keys = {"savings": lambda r: (-r.monthly_savings_dollars, r.namespace, r.workload),
            "cost": lambda r: (-r.current_monthly_cost_dollars, r.namespace, r.workload),
            "workload": lambda r: (r.namespace, r.workload),
            "team": lambda r: (r.team, -r.monthly_savings_dollars, r.namespace, r.workload),
            "confidence": lambda r: (-r.confidence, -r.monthly_savings_dollars, r.namespace, r.workload),
            "action": lambda r: (r.action, -r.monthly_savings_dollars, r.namespace, r.workload)}
    return sorted(kept, key=keys[sort])


def render(recs: Sequence[Recommendation], fmt: str, source: str = "", settings: Settings | None = None,
           wide: bool = False, headers: bool = True) -> str:
    if fmt == "csv":
        return to_csv(recs)
    if fmt == "json":
        return to_json(recs, source, settings)
    if fmt == "html":
        try:
            from agent.report_html import render_html
        except ImportError as e:
            _fail(f"--format html needs the report extra, matplotlib (pip install 'gpucap[report]', or "
                  f"'.[report]' in a checkout): {e}", 2)
        return render_html(recs, source=source, summary=summary(recs))
    return to_table(recs, wide, headers=headers)
