"""`gpucap playground`: see gpucap's alerts fire without a cluster.

A real Prometheus (Debian's `prometheus` binary) on loopback loads the chart's alert rules — the same
file the Helm chart ships and promtool tests, not a copy — and scrapes two simulated agents running at
`--speed`, so hours of simulated time pass in a minute: at 120× the demo's idle notebook is idle
reserved after 15 s and `GpucapIdleReservedGpu` (two hours idle) fires after about a minute.

Everything runs as child processes in a temporary folder and goes away on Ctrl-C. Ports are loopback
only; 0 picks a free one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# In a checkout (and an editable install) the chart's own file; `pip install .` ships the same file
# as data under <prefix>/share/gpucap/rules (pyproject.toml: tool.setuptools.data-files).
def _data_dirs() -> list[Path]:
    """Where pip puts data files: the environment's prefix, and the user's (`pip install --user`)."""
    out = [Path(sysconfig.get_path("data"))]
    try:
        out.append(Path(sysconfig.get_path("data", f"{os.name}_user")))
    except KeyError:
        pass
    return out


RULES_CANDIDATES = (REPO / "deploy" / "helm" / "gpucap" / "rules" / "gpucap-alerts.yaml",
                    *(d / "share" / "gpucap" / "rules" / "gpucap-alerts.yaml" for d in _data_dirs()))
RULES = next((p for p in RULES_CANDIDATES if p.is_file()), RULES_CANDIDATES[0])
NODES = ("playground-node-a", "playground-node-b")
# Sources read once a simulated minute: at 120x that is twice a second, which a laptop keeps up with
# (at the default 10 s a loaded machine misses max ages, units go `unknown` and no idle streak lasts).
AGENT_CONFIG = """\
nvml: {interval: 60s}
kubelet: {interval: 60s}
kubernetes: {interval: 60s}
inference: {interval: 60s}
"""


class PlaygroundError(Exception):
    """Something the user can fix (no prometheus binary, a port in use): the CLI prints it, exit 1."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 1.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


@dataclass
class Playground:
    scenarios: Sequence[str] = ("demo", "demo-lost-gpu")
    speed: float = 120.0
    port: int = 9090
    agent_ports: Sequence[int] = ()
    rules: Path = RULES
    prometheus: str = "prometheus"
    workdir: Path | None = None
    ui: str = ""  # the web UI's path prefix ("" or "/classic"), found once Prometheus is up
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def agent_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}/metrics" for p in self.agent_ports]

    def start(self, ready_timeout: float = 60.0) -> None:
        binary = shutil.which(self.prometheus)
        if binary is None:
            raise PlaygroundError(f"no {self.prometheus!r} on PATH: install Debian's package "
                                  "(apt-get install prometheus) or pass --prometheus PATH")
        self.rules = Path(self.rules).resolve()  # Prometheus reads it from its own folder
        if not self.rules.is_file():
            raise PlaygroundError(f"{self.rules}: no alert rules there (looked in "
                                  f"{', '.join(str(p) for p in RULES_CANDIDATES)}); pass --rules FILE, e.g. "
                                  "deploy/helm/gpucap/rules/gpucap-alerts.yaml of a gpucap checkout")
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gpucap-playground-")
            self.workdir = Path(self._tmp.name)
        self.port = self.port or free_port()
        self.agent_ports = [p or free_port() for p in (self.agent_ports or [0] * len(self.scenarios))]
        try:
            for scenario, node, port in zip(self.scenarios, NODES, self.agent_ports, strict=False):
                cfg = self.workdir / f"{node}.yaml"
                cfg.write_text(f"node_name: {node}\n{AGENT_CONFIG}")
                log = open(self.workdir / f"{node}.log", "wb")  # noqa: SIM115 - lives as long as the child
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "run", "--simulate", scenario, "--speed", f"{self.speed:g}",
                     "--listen", f"127.0.0.1:{port}", "--config", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
            targets = ", ".join(f"'127.0.0.1:{p}'" for p in self.agent_ports)
            (self.workdir / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                f"rule_files: ['{self.rules}']\n"
                "scrape_configs:\n"
                f"  - job_name: gpucap\n    static_configs: [{{targets: [{targets}]}}]\n")
            self._procs.append(subprocess.Popen(
                [binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=open(self.workdir / "prometheus.log", "wb"), stderr=subprocess.STDOUT))  # noqa: SIM115
            self._wait_ready(ready_timeout)
            self.ui = self._ui_prefix()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [f"{self.prometheus_url}/-/ready"] + [u.replace("/metrics", "/healthz") for u in self.agent_urls()]
        while pending and time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise PlaygroundError(f"{' '.join(map(str, p.args[:4]))}... exited with {p.returncode}; "
                                          f"see the logs in {self.workdir}")
            try:
                _get(pending[0])
                pending.pop(0)
            except OSError:
                time.sleep(0.25)
        if pending:
            raise PlaygroundError(f"{pending[0]} did not answer within {timeout:g}s; see the logs in {self.workdir}")

    def _ui_prefix(self) -> str:
        """Where the alerts page is: `/alerts` on Prometheus builds with the web UI, `/classic/alerts`
        on Debian's package (built without the React UI: its `/alerts` is a 404)."""
        for prefix in ("", "/classic"):
            try:
                _get(f"{self.prometheus_url}{prefix}/alerts", timeout=2.0)
                return prefix
            except OSError:
                continue
        return ""

    def stop(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def banner(self) -> str:
        ui = f"{self.prometheus_url}{self.ui}"
        lines = [f"gpucap playground: {len(self.agent_ports)} simulated nodes at {self.speed:g}x, Prometheus with",
                 f"the chart's alert rules ({self.rules.name})",
                 f"  alerts  {ui}/alerts",
                 f"  graph   {ui}/graph",
                 "          try: sum by (team, state) (gpucap_cost_dollars_total)"]
        for scenario, url in zip(self.scenarios, self.agent_urls(), strict=False):
            lines.append(f"  agent   {url}  ({scenario})")
        minutes = 2 * 3600 / self.speed / 60
        lines.append(f"GpucapIdleReservedGpu fires after 2 simulated hours of idle (about {minutes:.1f} min")
        lines.append("at this speed). Ctrl-C stops everything.")
        return "\n".join(lines)
