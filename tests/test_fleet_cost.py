"""`gpucap cost --prometheus`: a real Prometheus scrapes two simulated agents (each with its own ledger); the
fleet report gives the same per-team dollars as the two nodes' ledgers, within one scrape interval's worth."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.cost import report_from_history, totals_by
from agent.history import History
from tests.test_prometheus import _free_port, _get, _wait

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus not installed (make test installs Debian's package)")
SPEED = 120.0
SCRAPE = 1.0


def _agent(tmp: Path, name: str, port: int) -> subprocess.Popen:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(f"node_name: {name}\n")
    return subprocess.Popen(
        [sys.executable, "-c", "from agent.cli import main; main()", "run", "--simulate", "demo", "--speed",
         str(SPEED), "--listen", f"127.0.0.1:{port}", "--config", str(cfg), "--history", str(tmp / f"{name}.db")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_fleet_cost_matches_the_nodes_ledgers(tmp_path: Path) -> None:
    ports = [_free_port(), _free_port()]
    prom_port = _free_port()
    agents = [_agent(tmp_path, f"node-{i}", p) for i, p in enumerate(ports)]
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
    (tmp_path / "prometheus.yml").write_text(
        f"global: {{scrape_interval: {SCRAPE:g}s, evaluation_interval: 1s}}\n"
        f"scrape_configs:\n  - job_name: gpucap\n    static_configs: [{{targets: [{targets}]}}]\n")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{prom_port}"
    try:
        for p in ports:
            _wait(lambda p=p: b"ok" in _get(f"http://127.0.0.1:{p}/healthz"), 30, "gpucap /healthz")

        def up() -> int:
            body = _get(f"{url}/api/v1/query?query=count(gpucap_evaluation_success)")
            res = json.loads(body)["data"]["result"]
            return int(float(res[0]["value"][1])) if res else 0

        _wait(lambda: up() == 2, 60, "both agents scraped")
        t0 = time.time()
        time.sleep(25)  # ~50 simulated minutes per node
        # stop the agents first (SIGTERM flushes the ledger), then read Prometheus over the whole run
        for a in agents:
            a.send_signal(signal.SIGTERM)
        for a in agents:
            a.wait(20)
        window = f"{int(time.time() - t0 + 30)}s"
        res = CliRunner().invoke(main, ["cost", "--prometheus", url, "--window", window, "--by", "team",
                                        "--format", "json"])
        assert res.exit_code == 0, res.output
        fleet = json.loads(res.output)
        # the simulated time each node's first and last scrape saw: the window Prometheus observed
        seen = {}
        for fn in ("min", "max"):
            q = f'{fn}_over_time(gpucap_collector_last_success_timestamp_seconds{{collector="nvml"}}[{window}])'
            body = _get(f"{url}/api/v1/query?query=" + urllib.parse.quote(q))
            for r in json.loads(body)["data"]["result"]:
                seen.setdefault(r["metric"]["node"], []).append(float(r["value"][1]))
    finally:
        prom.terminate()
        for a in agents:
            if a.poll() is None:
                a.kill()
        prom.wait(10)
    ledger: dict[str, float] = {}
    for i in range(2):
        h = History(str(tmp_path / f"node-{i}.db"))
        first, last = seen[f"node-{i}"]
        # observed hours are the node's own: what its scrapes cover (simulated time), not the window
        assert fleet["nodes"][f"node-{i}"]["observed_hours"] == pytest.approx((last - first) / 3600, abs=0.1)
        # the ledger's minutes inside what Prometheus saw (minutes: up to a minute more at each end)
        span = (first // 60 * 60 + 60, last // 60 * 60)
        for team, d in totals_by(report_from_history(h, *span, ("team",)).rows, "team").items():
            ledger[team] = ledger.get(team, 0.0) + d
        h.close()
    fleet_team = totals_by(fleet["rows"], "team")
    assert set(fleet_team) >= {"research", "ml-platform", "foundation-models"}
    # per node: the ledger window is whole minutes inside what was scraped, plus a scrape at each end
    slack_per_gpu = 2 * (60 + SCRAPE * SPEED) / 3600 * 55.04 / 8
    gpus = {"research": 2, "ml-platform": 2, "foundation-models": 3, "": 1}
    for team, dollars in ledger.items():
        assert fleet_team.get(team, 0.0) == pytest.approx(dollars, abs=slack_per_gpu * gpus.get(team, 1) * 2), team
    assert fleet["total_dollars"] == pytest.approx(sum(ledger.values()), abs=slack_per_gpu * 8 * 2)
