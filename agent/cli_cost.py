"""`gpucap cost`: GPU spend by team, namespace, workload, unit, feature, model and state, from the
node's ledger (`--history`), a simulated node fast-forwarded into a temporary ledger (`--simulate`),
or a fleet's Prometheus (`--prometheus`)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import click

from agent.cost import MAX_WINDOW, month_window, parse_by, report_from_history, to_csv, to_table


# agent.cli registers this command at its end: import its helpers when called, so `python -m agent.cli`
# (where agent.cli runs as __main__) has no import cycle
def _duration(ctx: Any, param: Any, value: Any) -> float | None:
    from agent.cli import _duration as parse

    return parse(ctx, param, value)


def _fail(message: str, code: int) -> None:
    from agent.cli import _fail as fail

    fail(message, code)


def _config(path: str | None) -> Any:
    from agent.cli import _config as load

    return load(path)


def setup_logging(fmt: str, level: str) -> None:
    from agent.cli import setup_logging as setup

    setup(fmt, level)


def check_sources(history_path: str | None, simulate: str | None, prometheus_url: str | None) -> None:
    """Exactly one input; `--simulate` with `--history PATH` keeps the simulated ledger at PATH."""
    sources = [x for x in (None if simulate else history_path, simulate, prometheus_url) if x]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --history PATH, --simulate SCENARIO or --prometheus URL")


def simulated_ledger(history_path: str | None, prefix: str) -> tuple[str, str | None]:
    """(ledger file to fill, temporary folder to remove or None): `--history PATH` with `--simulate`
    keeps it at PATH, which must not exist yet (a simulated week is never mixed into a ledger)."""
    if history_path:
        if os.path.exists(history_path):
            _fail(f"{history_path}: already exists; --simulate with --history writes a new ledger there "
                  "(remove it, or read it with --history alone)", 2)
        return history_path, None
    tmp = tempfile.mkdtemp(prefix=prefix)
    return os.path.join(tmp, "history.db"), tmp


def fill_simulated_ledger(config: Any, scenario: str, seconds: float, path: str, start: float | None) -> None:
    """Fill a new ledger at `path` by simulation; only a complete run appears there (an interrupted or
    failed one leaves nothing that a later `--history` would read as a short week)."""
    import sqlite3

    partial = path + ".partial"
    for leftover in (partial, partial + "-wal", partial + "-shm"):
        if os.path.exists(leftover):
            os.remove(leftover)
    try:
        fill_simulated_history(config, scenario, seconds, partial, start)
        # every committed minute into the file itself before it moves (a WAL left behind would be lost)
        conn = sqlite3.connect(partial)
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
        wal = partial + "-wal"
        if busy or (os.path.exists(wal) and os.path.getsize(wal) > 0):
            _fail(f"{path}: the simulated ledger could not be completed (its write-ahead log is still busy)", 1)
        os.replace(partial, path)
    finally:
        for leftover in (partial, partial + "-wal", partial + "-shm"):
            if os.path.exists(leftover):
                os.remove(leftover)


def fill_simulated_history(config: Any, scenario: str, seconds: float, path: str, start: float | None = None) -> None:
    """Run the whole agent on the simulated node for `seconds` of simulated time, recording the ledger."""
    from agent.sources import build_runtime
    from collectors.schema import InputError

    try:
        rt = build_runtime(config, simulate=scenario, realtime=False, start=start, history=path)
    except InputError as e:
        _fail(str(e), 2)
    try:
        from agent.simulate import fast_forward

        fast_forward(rt, seconds, on_progress=_progress(seconds))
    finally:
        rt.close()


def _progress(total: float, label: str = "simulating") -> Any:
    """A progress callback (fraction done) drawing a bar on stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from rich.progress import Progress
    except ImportError:
        return None
    bar = Progress(transient=True)
    task = bar.add_task(label, total=1.0)
    bar.start()

    def update(fraction: float) -> None:
        bar.update(task, completed=fraction)
        if fraction >= 1.0:
            bar.stop()
    return update


@click.command()
@click.option("--history", "history_path", envvar="GPUCAP_HISTORY", show_envvar=True,
              type=click.Path(dir_okay=False),
              help="The node's ledger (history.db). With --simulate: where to keep the simulated ledger, "
              "for more reports on the same run (a new file).")
@click.option("--simulate", envvar="GPUCAP_SIMULATE", show_envvar=True, default=None, metavar="SCENARIO",
              help="Fast-forward a simulated node over the window (headless) and report on it.")
@click.option("--prometheus", "prometheus_url", envvar="GPUCAP_PROMETHEUS", show_envvar=True, default=None,
              metavar="URL", help="A Prometheus-compatible store with gpucap's series (fleet-wide report).")
@click.option("--window", envvar="GPUCAP_WINDOW", show_envvar=True, callback=_duration, default=None,
              help="How far back from now (or from the end of the simulation), e.g. 7d [30d; 7d with --simulate].")
@click.option("--month", envvar="GPUCAP_MONTH", show_envvar=True, default=None, metavar="YYYY-MM",
              help="A calendar month (UTC) instead of --window.")
@click.option("--by", "by", envvar="GPUCAP_BY", show_envvar=True, default="team", show_default=True,
              help="Comma-separated: team, namespace, workload, unit, feature, model, node (state is always a key).")
@click.option("--format", "fmt", envvar="GPUCAP_FORMAT", show_envvar=True,
              type=click.Choice(["table", "csv", "json", "focus"]), default="table", show_default=True)
@click.option("--output", "output", envvar="GPUCAP_OUTPUT", show_envvar=True, type=click.Path(dir_okay=False),
              default=None, help="Write to this file instead of standard output.")
@click.option("--sort", type=click.Choice(["total", "name", "idle"]), default="total", show_default=True,
              help="Table: order of the rows (most dollars, the --by name, or most idle reserved dollars).")
@click.option("--no-headers", is_flag=True, help="Table: only the rows, no header, totals or budgets (for awk).")
@click.option("--config", "config_path", envvar="GPUCAP_CONFIG", show_envvar=True, type=click.Path(dir_okay=False))
@click.option("--start", "start", type=float, default=None, hidden=True,
              help="With --simulate: the simulated clock's start (Unix seconds), for reproducible output.")
def cost(history_path: str | None, simulate: str | None, prometheus_url: str | None, window: float | None,
         month: str | None, by: str, fmt: str, output: str | None, sort: str, no_headers: bool,
         config_path: str | None, start: float | None) -> None:
    """GPU spend split into active, idle reserved, lost, unknown and unallocated; reconciles to the cent."""
    check_sources(history_path, simulate, prometheus_url)
    if window is not None and month is not None:
        raise click.UsageError("give --window or --month, not both")
    try:
        keys = parse_by(by)
        month_range = month_window(month) if month else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if window is not None and window > MAX_WINDOW:
        raise click.BadParameter(f"expected at most 90d, got {window / 86400:g}d", param_hint="--window")
    config = _config(config_path)
    setup_logging("text", "error")
    tmp = None
    try:
        if prometheus_url:
            from agent.fleet import FleetError, report_from_prometheus

            end = month_range[1] if month_range else time.time()
            begin = month_range[0] if month_range else end - (window or 30 * 86400.0)
            if fmt == "focus":
                raise click.UsageError("--format focus needs a ledger (--history or --simulate), not --prometheus")
            try:
                report = report_from_prometheus(prometheus_url, begin, min(end, time.time()), keys,
                                                on_progress=_progress(1.0, "querying the fleet"))
            except FleetError as e:
                _fail(str(e), 1)
        else:
            if simulate:
                seconds = window or 7 * 86400.0
                history_path, tmp = simulated_ledger(history_path, "gpucap-cost-")
                fill_simulated_ledger(config, simulate, seconds, history_path, start)
            report = _from_ledger(history_path, window, month_range, keys, bool(simulate), fmt, config)
        budget = None
        budgets = getattr(getattr(config, "cost", None), "budgets", None)
        if budgets and not isinstance(report, str) and fmt in ("table", "json"):
            budget = _budget(report, budgets, prometheus_url, history_path, simulate)
        text = report if isinstance(report, str) else _render(report, fmt, config, budget, sort, not no_headers)
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if output:
        with open(output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def _from_ledger(path: str | None, window: float | None, month_range: tuple[float, float] | None,
                 keys: tuple[str, ...], simulated: bool, fmt: str = "table", config: Any = None) -> Any:
    from agent.history import History

    assert path is not None
    try:
        history = History(path)
    except FileNotFoundError:
        _fail(f"{path}: no such ledger (run the agent with --history {path}, or history.path in the config)", 2)
    try:
        span = history.span()
        if span is None:
            _fail(f"{path}: the ledger holds no minute yet", 1)
        if month_range:
            begin, end = month_range
        else:
            end = span[1] if simulated else max(span[1], _minute_now())
            begin = span[0] if simulated and window is None else end - (window or 30 * 86400.0)
        if fmt == "focus":
            import io

            from agent.focus import FocusSettings, write_focus

            settings = getattr(getattr(config, "cost", None), "focus", None) or FocusSettings()
            buf = io.StringIO()
            write_focus(history.hour_rows(begin, end), buf, settings)
            return buf.getvalue()
        return report_from_history(history, begin, end, keys)
    finally:
        history.close()


def _minute_now() -> float:
    return float(int(time.time() // 60) * 60)


def _budget(report: Any, budgets: Any, prometheus_url: str | None, history_path: str | None,
            simulate: str | None) -> Any:
    """Budgets compare the month to date of the report's end, whatever window the report shows:
    a 7-day table still says where each team stands this month (the ledger or the store is read
    again for the month so far, by team; a simulated node's ledger holds only what was simulated)."""
    from agent.budgets import budget_status, month_to_date_window

    begin, end = month_to_date_window(report.end)
    if (begin, report.by[:1]) != (report.start, ("team",)):
        if prometheus_url:
            from agent.fleet import FleetError, report_from_prometheus

            try:
                report = report_from_prometheus(prometheus_url, begin, end, ("team",))
            except FleetError as e:
                _fail(str(e), 1)
        else:
            from agent.history import History

            history = History(history_path)  # type: ignore[arg-type]
            try:
                span = history.span()
                if simulate and span is not None:
                    begin = max(begin, span[0])
                report = report_from_history(history, begin, end, ("team",))
            finally:
                history.close()
    return budget_status(report, budgets)


def _render(report: Any, fmt: str, config: Any, budget: Any = None, sort: str = "total",
            headers: bool = True) -> str:
    if fmt == "json":
        data = report.to_json()
        if budget is not None:
            data["budgets"] = budget.to_json()
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt == "focus":
        raise click.UsageError("--format focus needs a ledger (--history or --simulate), not --prometheus")
    text = to_table(report, sort=sort, headers=headers)
    if budget is not None and headers:
        from agent.budgets import render_budget

        text += "\n" + "\n".join(render_budget(budget)) + "\n"
    return text
