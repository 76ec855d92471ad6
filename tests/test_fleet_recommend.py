"""`gpucap recommend --prometheus`: the same recommendations fleet-wide from gpucap's own series in a
real Prometheus and a real VictoriaMetrics (Debian packages, started here on loopback) as from the
nodes' ledgers.

Two simulated nodes (`demo` and `timeslice`, each with half an hour of NVML outage) run 6 simulated
hours headless, each with its ledger;
at every evaluation the agent's real /metrics text (agent/exposition.py) is recorded with the
simulated time as the sample's timestamp, then loaded into each store the way each documents for
history: `promtool tsdb create-blocks-from openmetrics` for Prometheus, `/api/v1/import/prometheus`
for VictoriaMetrics. Scraping agents at speed cannot stand in here: a store stamps samples with
real time, so hours of simulated behaviour would take hours (tests/test_fleet_cost.py does scrape
live agents, for the cost counters)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import Config
from agent.exposition import render
from agent.fleet import PromClient, fleet_minutes, recommend_from_prometheus
from agent.history import History
from agent.recommend import COLUMNS, Prices, Settings, recommend
from agent.simulate import fast_forward
from agent.sources import build_runtime
from tests.helpers import builtin_scenario, write_scenario
from tests.test_prometheus import _free_port, _get, _wait

HOURS = 6
FAMILIES = ("gpucap_allocated_cost_dollars_per_hour", "gpucap_unit_activity_ratio", "gpucap_gpu_memory_used_bytes",
            "gpucap_gpu_memory_total_bytes", "gpucap_gpu_hourly_price_dollars", "gpucap_inference_queue_requests",
            "gpucap_inference_saturated", "gpucap_container_gpu_memory_used_bytes")
NODES = {"node-demo": "demo", "node-ts": "timeslice"}


class Fleet:
    def __init__(self, root: Path, start: float) -> None:
        self.root, self.start, self.end = root, start, start + HOURS * 3600
        self.samples: dict[str, list[str]] = defaultdict(list)  # family → "series value timestamp" lines
        self.ledgers: list[str] = []


def _record(fleet: Fleet, node: str, scenario: str) -> None:
    path = str(fleet.root / f"{node}.db")
    rt = build_runtime(Config(node_name=node), simulate=scenario, realtime=False, start=fleet.start, history=path)

    def on_state(state: Any) -> None:
        ts = f"{state.time:.3f}"
        for line in render(state).splitlines():
            if line.startswith(FAMILIES):
                name = line[:line.find("{")] if "{" in line else line.split(" ")[0]
                if name in FAMILIES:
                    fleet.samples[name].append(f"{line} {ts}")

    try:
        fast_forward(rt, HOURS * 3600.0, on_state=on_state)
    finally:
        rt.close()
    fleet.ledgers.append(path)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    # the simulated hours end 10 minutes ago: a store accepts them as recent history
    f = Fleet(tmp_path_factory.mktemp("fleet"), (time.time() - HOURS * 3600 - 600) // 60 * 60)
    for node, scenario in NODES.items():
        sc = builtin_scenario(scenario)
        # half an hour of NVML outage: the units are unknown but still held and priced (the store's
        # allocated-cost series reads 0 then; the price comes from the unit's own price series)
        sc["faults"] = list(sc.get("faults") or []) + [{"kind": "source_down", "source": "nvml", "at": "2h",
                                                         "until": "150m"}]
        _record(f, node, write_scenario(f.root, f"{scenario}-outage", sc))
    # an HA pair of Prometheus servers (or two scrape jobs) gives every unit a second price series:
    # the fleet must count each unit once in its GPU's price
    price = f.samples["gpucap_gpu_hourly_price_dollars"]
    price += [line.replace("{", '{replica="b",', 1) for line in price]
    return f


def _ledger_recommendations(fleet: Fleet) -> list[Any]:
    units: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    for path in fleet.ledgers:
        h = History(path)
        units += list(h.unit_minutes(fleet.start, fleet.end))
        servers += list(h.server_minutes(fleet.start, fleet.end))
        h.close()
    return recommend(units, servers, fleet.start, fleet.end, Settings(), Prices.from_pricing())


def _same(fleet_recs: list[Any], ledger_recs: list[Any]) -> None:
    def key(r: Any) -> tuple[str, str]:
        return r.namespace, r.workload

    got = {key(r): r for r in fleet_recs}
    want = {key(r): r for r in ledger_recs}
    assert set(got) == set(want)
    actions = {k: r.action for k, r in want.items()}
    assert {"release", "downsize_mig", "scale_up", "keep"} <= set(actions.values()), actions
    for k, r in want.items():
        g = got[k]
        assert (g.action, g.target) == (r.action, r.target), (k, g.reason, r.reason)
        assert g.units == r.units and g.node == r.node, k
        assert g.monthly_savings_dollars == pytest.approx(r.monthly_savings_dollars, rel=0.02, abs=0.5), k
        assert g.current_monthly_cost_dollars == pytest.approx(r.current_monthly_cost_dollars, rel=0.02), k
        assert r.memory_peak_bytes, k  # shares too: their pod's memory on the device, as the agent's
        assert g.memory_peak_bytes == pytest.approx(r.memory_peak_bytes, rel=0.01), k


def _serve(cmd: list[str], url: str, what: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: b"gpucap" in _get(f"{url}/api/v1/label/__name__/values", 5), 60, what)
    except BaseException:
        proc.kill()
        raise
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def prometheus(fleet: Fleet) -> Iterator[str]:
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("prometheus not installed (make test installs Debian's package)")
    data = fleet.root / "prom-data"
    om = fleet.root / "fleet.om"
    with om.open("w") as f:
        for family, lines in fleet.samples.items():  # OpenMetrics: each family once, its samples together
            f.write(f"# TYPE {family} gauge\n")
            f.write("\n".join(lines) + "\n")
        f.write("# EOF\n")
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(om), str(data)], check=True,
                   capture_output=True, timeout=300)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(["prometheus", f"--config.file={_empty_config(fleet.root)}", f"--storage.tsdb.path={data}",
                   "--storage.tsdb.retention.time=10y", f"--web.listen-address=127.0.0.1:{port}"], url, "Prometheus")
    yield url
    _stop(proc)


def _empty_config(root: Path) -> Path:
    cfg = root / "prometheus.yml"
    cfg.write_text("global: {scrape_interval: 15s}\nscrape_configs: []\n")
    return cfg


@pytest.fixture(scope="module")
def victoria(fleet: Fleet) -> Iterator[str]:
    if shutil.which("victoria-metrics") is None:
        pytest.skip("victoria-metrics not installed (make test installs Debian's package)")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(["victoria-metrics", f"-storageDataPath={fleet.root / 'vm-data'}", "-retentionPeriod=10y",
                             f"-httpListenAddr=127.0.0.1:{port}", "-search.latencyOffset=0s",
                             "-loggerLevel=ERROR"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _get(f"{url}/health", 2) == b"OK", 60, "VictoriaMetrics")
        for lines in fleet.samples.values():  # the Prometheus text format, timestamps in ms
            body = "\n".join(_ms(line) for line in lines) + "\n"
            req = urllib.request.Request(f"{url}/api/v1/import/prometheus", data=body.encode(), method="POST")
            with urllib.request.urlopen(req, timeout=60):
                pass
        _get(f"{url}/internal/force_flush", 30)
        _wait(lambda: b"gpucap" in _get(f"{url}/api/v1/label/__name__/values", 5), 60, "VictoriaMetrics import")
        yield url
    finally:
        _stop(proc)


def _ms(line: str) -> str:
    head, ts = line.rsplit(" ", 1)
    return f"{head} {round(float(ts) * 1000)}"


@pytest.mark.parametrize("store", ["prometheus", "victoria"])
def test_fleet_recommendations_match_the_nodes_ledgers(store: str, fleet: Fleet, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(store)
    recs = recommend_from_prometheus(url, fleet.start, fleet.end, Settings(), Prices.from_pricing())
    _same(recs, _ledger_recommendations(fleet))


@pytest.mark.parametrize("store", ["prometheus", "victoria"])
def test_fleet_minutes_rebuild_the_ledgers_shares_and_prices(store: str, fleet: Fleet,
                                                             request: pytest.FixtureRequest) -> None:
    """The store's minutes carry what the engine reads: a time-sliced share is 1/replicas of its GPU,
    the dollars per minute are the ledger's, and every held unit-minute of the ledger is there."""
    url = request.getfixturevalue(store)
    units, _ = fleet_minutes(PromClient(url), fleet.start, fleet.end)
    shares = {round(r["gpu_fraction"], 6) for r in units if r["kind"] == "share"}
    assert shares and all(0 < f < 1 for f in shares)
    ledger = 0
    unknown = 0.0
    for path in fleet.ledgers:
        h = History(path)
        held = [r for r in h.unit_minutes(fleet.start, fleet.end) if r["namespace"]]
        ledger += len(held)
        unknown += sum(r["s_unknown"] or 0.0 for r in held)
        h.close()
    assert unknown > 0, "the NVML outage left held units unknown"
    assert all(r["hourly_price"] > 0 for r in units), "held units are priced while unknown too"
    assert len(units) == pytest.approx(ledger, rel=0.01), "every held unit-minute, once"


def test_recommend_prometheus_cli_prints_the_design_columns(prometheus: str, fleet: Fleet) -> None:
    res = CliRunner().invoke(main, ["recommend", "--prometheus", prometheus, "--window", f"{HOURS + 1}h",
                                    "--format", "csv"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert any(",release," in line for line in lines[1:]) and any("node-demo" in line for line in lines[1:])
