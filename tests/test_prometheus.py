"""A real Prometheus server scrapes a real `gpucap run --simulate demo` over loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus not installed (make test installs Debian's package)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def test_prometheus_scrapes_gpucap(tmp_path) -> None:
    agent_port, prom_port = _free_port(), _free_port()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--simulate", "demo", "--speed", "60",
         "--listen", f"127.0.0.1:{agent_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: gpucap\n    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n"
    )
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: b"ok" in _get(f"http://127.0.0.1:{agent_port}/healthz"), 30, "gpucap /healthz")

        def query(q: str) -> list:
            body = _get(f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": q}))
            return json.loads(body)["data"]["result"]

        result = _wait(lambda: len(query("gpucap_gpu_up == 1")) == 8 and query("gpucap_gpu_up"), 60,
                       "8 GPUs up in Prometheus")
        assert {r["metric"]["model"] for r in result} == {"NVIDIA H100 80GB HBM3"}
        assert all(r["metric"]["job"] == "gpucap" for r in result)
        # the idle notebook's two GPUs become idle reserved within 30 simulated minutes (30 s at 60x)
        idle = _wait(lambda: query('sum by (workload) (gpucap_idle_reserved_cost_dollars_per_hour) > 0'), 60,
                     "idle reserved cost")
        assert {r["metric"]["workload"] for r in idle} >= {"notebook-alice"}
        assert float(next(r for r in idle if r["metric"]["workload"] == "notebook-alice")["value"][1]) == \
            pytest.approx(2 * 6.88)
    finally:
        prom.terminate()
        agent.terminate()
        prom.wait(10)
        _, err = agent.communicate(timeout=10)
    assert agent.returncode in (0, -15), err.decode()[-2000:]
