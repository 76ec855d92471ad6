"""The `gpucap` command: run, snapshot, scenarios, check-config.

Exit codes: 0 ok, 2 usage or config/scenario error (the message names file and key), 1 runtime
failure (e.g. no NVIDIA driver). Every option can also be set as a GPUCAP_* environment variable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any

# gRPC's core logs at INFO straight to stderr (absl, before anything initialises it): a kubelet
# restart printed "Got goaway ... Cancelling all calls" into `snapshot`'s table and the daemon's log,
# where the collector already reports the kubelet's state once per cause. Errors still print, and a
# GRPC_VERBOSITY set by the user wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import click

from agent import __version__
from agent.config import Config, load_config, parse_listen
from collectors.schema import InputError, parse_duration

log = logging.getLogger("gpucap")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if hasattr(record, "collector"):
            out["collector"] = record.collector  # type: ignore[attr-defined]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("grpc").setLevel(logging.WARNING)


def _fail(message: str, code: int) -> None:
    """One `gpucap: error:` line per problem: a file with three mistakes prints three lines, each
    one naming its file and key, so that each can be grepped and fixed on its own."""
    for line in message.splitlines() or [""]:
        click.echo(f"gpucap: error: {line}", err=True)
    sys.exit(code)


def _config(path: str | None) -> Config:
    try:
        return load_config(path)
    except InputError as e:
        _fail(str(e), 2)
        raise  # unreachable


def _duration(ctx: Any, param: Any, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]*)?\s*", value):
        n = value.strip()
        raise click.BadParameter(f"{value!r} has no unit: write {n}s, {n}m, {n}h or {n}d")
    d = parse_duration(value)
    if d is None or d < 0:
        raise click.BadParameter(f"expected a duration like 30s, 45m, 2h or 7d, got {value!r}")
    if d > MAX_DURATION_S:
        raise click.BadParameter(f"expected a duration of at most 90d, got {value!r}")
    return d


MAX_DURATION_S = 90 * 86400.0  # DESIGN §6: --at, --window and friends are bounded
SHUTDOWN_DEADLINE_S = 1.9  # SIGTERM to exit, whatever a source is doing (a pod must not stay Terminating)


def _build(config: Config, simulate: str | None, **kw: Any) -> Any:
    from agent.sources import build_runtime

    try:
        return build_runtime(config, simulate=simulate, **kw)
    except InputError as e:
        _fail(str(e), 2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpucap")
def main() -> None:
    """gpucap: GPU capacity and cost agent for Kubernetes nodes.

    Try it without a GPU: gpucap snapshot --simulate demo
    """


@main.command()
@click.option("--config", "config_path", envvar="GPUCAP_CONFIG", show_envvar=True, type=click.Path(dir_okay=False),
              help="YAML config file (see docs/configuration.md).")
@click.option("--listen", envvar="GPUCAP_LISTEN", show_envvar=True, default=None, help="Address of /metrics and /healthz [:9470].")
@click.option("--interval", envvar="GPUCAP_INTERVAL", show_envvar=True, callback=_duration, default=None,
              help="NVML collection interval, e.g. 10s (overrides nvml.interval).")
@click.option("--simulate", envvar="GPUCAP_SIMULATE", show_envvar=True, default=None, metavar="SCENARIO",
              help="Run on a simulated node: a built-in scenario name (gpucap scenarios) or a YAML file.")
@click.option("--speed", envvar="GPUCAP_SPEED", show_envvar=True, type=click.FloatRange(min=0.001), default=1.0, show_default=True,
              help="With --simulate: simulated time runs this many times faster.")
@click.option("--history", "history_path", envvar="GPUCAP_HISTORY", show_envvar=True, type=click.Path(dir_okay=False),
              default=None, help="The node's ledger [history.path, else /var/lib/gpucap/history.db; a temp file "
              "with --simulate].")
@click.option("--log-format", envvar="GPUCAP_LOG_FORMAT", show_envvar=True, type=click.Choice(["text", "json"]), default=None)
@click.option("--log-level", envvar="GPUCAP_LOG_LEVEL", show_envvar=True, type=click.Choice(["debug", "info", "warning", "error"]),
              default=None)
@click.option("--web.config.file", "web_config_path", envvar="GPUCAP_WEB_CONFIG_FILE", show_envvar=True,
              type=click.Path(dir_okay=False), default=None,
              help="TLS and basic auth for /metrics, in the Prometheus exporter-toolkit format "
              "(tls_server_config, basic_auth_users with bcrypt hashes); /healthz and /readyz stay open.")
def run(config_path: str | None, listen: str | None, interval: float | None, simulate: str | None, speed: float,
        history_path: str | None, log_format: str | None, log_level: str | None,
        web_config_path: str | None) -> None:
    """Run the agent: collect in the background, serve /metrics, /healthz and /readyz.

    SIGTERM, SIGINT, SIGHUP and SIGQUIT all stop it the same way: stop accepting, answer the
    scrapes in flight, flush the ledger, remove simulation files, exit within 2 s even while a
    source call hangs."""
    from dataclasses import replace

    from agent.web import MetricsServer, load_web_config

    if interval is not None and not 1.0 <= interval <= 86400.0:
        raise click.BadParameter("expected a duration between 1s and 1d", param_hint="--interval")
    config = _config(config_path)
    web_config = None
    if web_config_path:
        try:
            web_config = load_web_config(web_config_path)
        except InputError as e:
            _fail(str(e), 2)
    if listen is not None:
        if parse_listen(listen) is None:
            raise click.BadParameter(f"expected HOST:PORT or :PORT, got {listen!r}", param_hint="--listen")
        config = replace(config, listen=listen)
    if interval is not None:
        config = replace(config, nvml=replace(config.nvml, interval=interval))
    setup_logging(log_format or config.log_format, log_level or config.log_level)
    from agent.sources import DEFAULT_LEDGER
    from agent.threads import name_native_threads

    name_native_threads()  # top -H / ps -L tell the agent's threads apart
    # States are encoded on demand, by the first scrape that asks (agent/exposition.py caches the
    # bytes): evaluations outnumber scrapes several times, so encoding each one ahead would
    # multiply the agent's largest cost for no scrape.
    rt = _build(config, simulate, speed=speed, realtime=True, history=history_path or DEFAULT_LEDGER)
    host, port = parse_listen(config.listen)  # type: ignore[misc]
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    for sig in SHUTDOWN_SIGNALS:  # before anything is started: a signal now still cleans up
        signal.signal(sig, on_signal)
    try:
        server = MetricsServer(host, port, lambda: rt.agent.state, lambda: rt.agent.last_evaluation_real,
                               stale_after=max(120.0, 6 * config.nvml.interval / max(speed, 1.0)),
                               ready=rt.agent.ready, alive=rt.agent.alive, web_config=web_config)
    except (OSError, ValueError) as e:
        rt.close()
        _fail(f"cannot listen on {config.listen}: {e}", 1)
    rt.agent.evaluate_now(rt.clock.now())
    rt.agent.start()
    server.start()
    log.info("gpucap %s serving on %s%s (node %s%s)", __version__, f"{host or '0.0.0.0'}:{server.port}",
             " (TLS)" if web_config is not None and web_config.tls else "",
             rt.node_name, f", simulated scenario {simulate} at {speed:g}x" if simulate else "")
    while not stop.wait(1.0):
        pass
    _shutdown(server, rt, received[0] if received else signal.SIGTERM)


SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _shutdown(server: Any, rt: Any, signum: int) -> None:
    """Graceful but bounded: the scrapes in flight finish, the ledger is flushed and simulation
    files removed; a hard exit after SHUTDOWN_DEADLINE_S covers a source that never returns (a
    hung NVML call cannot be interrupted from Python; its daemon thread is abandoned)."""
    name = signal.Signals(signum).name
    log.info("shutting down (%s)", name)
    hard = threading.Timer(SHUTDOWN_DEADLINE_S, _hard_exit, args=(name,))
    hard.daemon = True
    hard.start()
    try:
        server.stop(deadline=0.7)
        rt.close()
    except Exception:
        log.exception("shutdown step failed")
    log.info("stopped")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the interpreter's exit would wait for non-daemon threads a library started.
    os._exit(0)


def _hard_exit(signal_name: str) -> None:
    log.warning("shutdown after %s took longer than %.1fs; exiting now", signal_name, SHUTDOWN_DEADLINE_S)
    logging.shutdown()
    os._exit(0)


def complete_scenario(ctx: Any, param: Any, incomplete: str) -> list[Any]:
    """Shell completion for --simulate: the built-in scenario names, then YAML files."""
    from click.shell_completion import CompletionItem

    from collectors.simulated.scenario import builtin_names

    names = [CompletionItem(n) for n in builtin_names() if n.startswith(incomplete)]
    return names + [CompletionItem(incomplete, type="file")]


MAX_AT_S = 90 * 86400.0  # DESIGN §6: fast-forwards are bounded


@main.command()
@click.option("--config", "config_path", envvar="GPUCAP_CONFIG", show_envvar=True, type=click.Path(dir_okay=False))
@click.option("--simulate", envvar="GPUCAP_SIMULATE", show_envvar=True, default=None, metavar="SCENARIO",
              shell_complete=complete_scenario,
              help="A built-in scenario name or a YAML file instead of this node's GPUs.")
@click.option("--at", "at", envvar="GPUCAP_AT", show_envvar=True, callback=_duration, default=None,
              help="With --simulate: run the simulated clock forward first, e.g. 45m (at most 90d).")
@click.option("--format", "fmt", envvar="GPUCAP_FORMAT", show_envvar=True, type=click.Choice(["table", "json", "prometheus"]),
              default="table", show_default=True)
@click.option("--wide", "-w", is_flag=True, envvar="GPUCAP_WIDE", help="Table: every column, never cut.")
@click.option("--no-headers", is_flag=True, help="Table: only the unit rows, no headers or summary (for awk).")
@click.option("--sort", type=click.Choice(["gpu", "state", "cost", "activity", "memory", "team", "holder"]),
              default="gpu", show_default=True, help="Table: order of the unit rows.")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Table: only units with team=, namespace=, state=, workload= or gpu= (repeatable; "
              "the same key twice means either).")
@click.option("--start", "start", envvar="GPUCAP_START", show_envvar=True, type=float, default=None, hidden=True,
              help="With --simulate: the simulated clock's start (Unix seconds), for reproducible output.")
def snapshot(config_path: str | None, simulate: str | None, at: float | None, fmt: str, wide: bool,
             no_headers: bool, sort: str, filters: tuple[str, ...], start: float | None) -> None:
    """Collect once from every source and print the node: every GPU, who holds it, how busy, what it costs.

    The table fits the terminal (COLUMNS, else its width, else 80); colour only on a terminal and
    never with NO_COLOR. Failing sources and inference targets are listed under "sources".
    """
    from agent.exposition import render
    from agent.report import TableOptions, parse_filters, to_json, to_table

    if at is not None and not simulate:
        raise click.UsageError("--at needs --simulate (a real node cannot be fast-forwarded)")
    if at is not None and at > MAX_AT_S:
        raise click.BadParameter(f"at most 90d, got {at / 86400:g}d", param_hint="--at")
    try:
        options = TableOptions(wide=wide, headers=not no_headers, sort=sort, filters=parse_filters(filters))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--filter") from None
    config = _config(config_path)
    setup_logging("text", "error")
    rt = _build(config, simulate, realtime=False, start=start)
    try:
        state = take_snapshot(rt, at or 0.0, simulate is not None)
        targets = target_status(rt)
    finally:
        rt.close()
    nvml = next((c for c in state.collectors if c.name == "nvml"), None)
    if nvml is not None and not nvml.success and not state.devices:
        _fail(f"{nvml.last_error}", 1)
    if fmt == "json":
        click.echo(json.dumps(to_json(state, targets), indent=2))
    elif fmt == "prometheus":
        click.echo(render(state), nl=False)
    else:
        click.echo(to_table(state, options, targets), nl=False)


def target_status(rt: Any) -> tuple[Any, ...]:
    """Each inference target's latest outcome, for the table's "sources" footer and JSON `targets`."""
    source = rt.agent.sources.get("inference")
    fn = getattr(getattr(source, "collector", None), "target_status", None)
    return tuple(fn()) if callable(fn) else ()


def take_snapshot(rt: Any, at: float, simulated: bool) -> Any:
    """Two collections 1 s apart (GPM needs two samples); with --at, first the simulated time (with a
    progress bar on a terminal)."""
    from agent.tables import Progress

    agent = rt.agent
    if simulated:
        # fast-forward (agent/simulate.py): up to an hour exactly as the daemon samples, longer
        # runs at a coarser step with the slow sources read only when their answer can change
        from agent.simulate import fast_forward

        if at > 0:
            with Progress(f"simulating {at / 3600:.1f} h") as progress:
                fast_forward(rt, at, on_progress=progress)
        else:
            fast_forward(rt, 0.0)
        rt.clock.advance(1.0)
    else:
        agent.step(rt.clock.now())
        time.sleep(1.0)
    for s in agent.sources.values():
        s.next_due = 0.0
    return agent.step(rt.clock.now())


@main.command()
@click.option("--speed", type=click.FloatRange(min=1.0, max=1000.0), default=120.0, show_default=True,
              help="Simulated time runs this many times faster (at 120x two idle hours take a minute).")
@click.option("--port", type=click.IntRange(0, 65535), default=9090, show_default=True,
              help="Prometheus' loopback port (0: a free one).")
@click.option("--simulate", "scenarios_", multiple=True, metavar="SCENARIO", shell_complete=complete_scenario,
              help="The simulated nodes (repeatable) [demo, demo-lost-gpu].")
@click.option("--prometheus", "prometheus_bin", default="prometheus", show_default=True,
              help="The Prometheus server binary.")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Alert rules file [the chart's deploy/helm/gpucap/rules/gpucap-alerts.yaml].")
def playground(speed: float, port: int, scenarios_: tuple[str, ...], prometheus_bin: str, rules: str | None) -> None:
    """Prometheus with gpucap's alert rules, scraping two simulated nodes at speed: watch alerts fire."""
    from pathlib import Path

    from agent.playground import RULES, Playground, PlaygroundError
    from collectors.simulated.scenario import load_scenario

    for name in scenarios_:
        try:
            load_scenario(name)
        except InputError as e:
            _fail(str(e), 2)
    pg = Playground(scenarios=scenarios_ or ("demo", "demo-lost-gpu"), speed=speed, port=port,
                    rules=Path(rules) if rules else RULES, prometheus=prometheus_bin)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        pg.start()
    except PlaygroundError as e:
        _fail(str(e), 1)
    click.echo(pg.banner())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        pg.stop()


@main.command()
def scenarios() -> None:
    """List the built-in simulated scenarios."""
    from agent.tables import Column, Out, table
    from collectors.simulated.scenario import builtin_names, load_scenario

    out = Out.detect()
    rows = []
    for name in builtin_names():
        sc = load_scenario(name)
        rows.append([name, f"{len(sc.gpus)}x {sc.model.key}", sc.description])
    # the description wraps under its column instead of running past the terminal's edge
    out.add(table([Column("SCENARIO"), Column("GPUS"), Column("DESCRIPTION", wrap=True)], rows, width=out.width))
    click.echo(out.render(), nl=False)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file: exit 0 if good, 2 with the file, key and expectation if not."""
    cfg = _config(path)
    click.echo(f"{path}: ok\n  node {cfg.node_name or '$NODE_NAME, else the hostname'}, listen {cfg.listen}, "
               f"idle threshold {cfg.idle.threshold:g} for {cfg.idle.window:g}s")


@main.command("check-scenario")
@click.argument("scenario")
def check_scenario(scenario: str) -> None:
    """Validate a scenario file (or built-in name): exit 0 if good, 2 naming the key if not."""
    from collectors.simulated.scenario import load_scenario

    try:
        sc = load_scenario(scenario)
    except InputError as e:
        _fail(str(e), 2)
    click.echo(f"{scenario}: ok ({len(sc.gpus)}x {sc.model.key}, {len(sc.pods)} pods, {len(sc.faults)} faults)")


from agent.cli_cost import cost as _cost

main.add_command(_cost)
from agent.cli_recommend import recommend as _recommend

main.add_command(_recommend)

if __name__ == "__main__":
    main()
