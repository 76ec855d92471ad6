"""One failing source never takes the others, the scrape or the agent down."""

from __future__ import annotations

import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from agent.config import Config
from agent.exposition import MetricsServer, make_registry
from agent.loop import Agent, Source
from agent.sources import build_runtime

START = 1767225600.0


class Boom:
    def __init__(self, name: str, exc: BaseException):
        self.name, self.exc, self.calls = name, exc, 0

    def collect(self, now: float):
        self.calls += 1
        raise self.exc

    def close(self) -> None:
        pass


class Hang:
    name = "hang"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def collect(self, now: float) -> int:
        self.calls += 1
        self.release.wait(10)
        return 1

    def close(self) -> None:
        self.release.set()


def _sample(reg, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_raising_collector_leaves_everything_else(tmp_path) -> None:
    rt = build_runtime(Config(), simulate="demo", realtime=False, start=START)
    try:
        rt.agent.sources["inference"].collector = Boom("inference", RuntimeError("parser exploded"))
        rt.agent.run_until(rt.clock, START + 120, 10)
        reg = make_registry(lambda: rt.agent.state)
        node = rt.node_name
        assert _sample(reg, "gpucap_collector_success", node=node, collector="inference") == 0
        for ok in ("nvml", "podresources", "kubernetes", "processes"):
            assert _sample(reg, "gpucap_collector_success", node=node, collector=ok) == 1
        assert _sample(reg, "gpucap_collector_errors_total", node=node, collector="inference", kind="exception") > 1
        ups = [s for f in text_string_to_metric_families(_scrape(rt)) if f.name == "gpucap_gpu_up" for s in f.samples]
        assert len(ups) == 8 and all(s.value == 1 for s in ups)
        # attribution (kubelet + metadata) still there
        assert any(s.labels["workload"] == "notebook-alice" for f in text_string_to_metric_families(_scrape(rt))
                   if f.name == "gpucap_gpu_allocation_ratio" for s in f.samples)
    finally:
        rt.close()


def _scrape(rt) -> str:
    server = MetricsServer("127.0.0.1", 0, lambda: rt.agent.state, lambda: time.monotonic()).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200
            return r.read().decode()
    finally:
        server.stop()


def test_nvml_missing_at_start_is_retried_with_backoff_and_recovers(tmp_path) -> None:
    sc = tmp_path / "nodriver.yaml"
    sc.write_text("extends: demo\nfaults:\n  - {kind: nvml_init_failure, at: 0s, until: 5m}\n")
    rt = build_runtime(Config(), simulate=str(sc), realtime=False, start=START)
    try:
        rt.agent.run_until(rt.clock, START + 4 * 60, 10)
        st = rt.agent.state
        nvml = next(c for c in st.collectors if c.name == "nvml")
        assert not nvml.success and "no NVIDIA driver" in nvml.last_error
        assert st.devices == ()
        assert next(c for c in st.collectors if c.name == "podresources").success
        attempts = dict(next(c for c in st.collectors if c.name == "nvml").errors)["unavailable"]
        assert 3 <= attempts < 24 // 1, "retried, but with backoff rather than every 10 s cycle"
        rt.agent.run_until(rt.clock, START + 12 * 60, 10)
        st = rt.agent.state
        assert next(c for c in st.collectors if c.name == "nvml").success
        assert len([d for d in st.devices if d.up]) == 8
    finally:
        rt.close()


def test_hanging_collector_times_out_and_scrapes_stay_fast() -> None:
    from agent.clock import WallClock as Clock

    hang = Hang()
    ok = Boom("ok", RuntimeError("x"))
    calls = []

    def evaluate(snap):
        calls.append(snap.time)
        from agent.model import AgentState, Attribution, NodeView

        return AgentState(snap.time, NodeView("n", "", "", ()), "", (), Attribution(()), (), (), (), (),
                          snap.statuses())

    agent = Agent([Source(hang, interval=0.2, timeout=0.3), Source(ok, interval=0.2, timeout=0.3)], evaluate, Clock())
    agent.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            st = agent.state
            if st and any(c.name == "hang" and dict(c.errors).get("timeout", 0) >= 2 for c in st.collectors):
                break
            time.sleep(0.05)
        st = agent.state
        status = {c.name: c for c in st.collectors}
        assert not status["hang"].success and dict(status["hang"].errors)["timeout"] >= 2
        assert hang.calls == 1, "no second call is started while the first one hangs"
        assert ok.calls >= 3, "the other source kept its own schedule"
        reg = make_registry(lambda: agent.state)
        t0 = time.monotonic()
        assert reg.get_sample_value("gpucap_collector_success", {"node": "n", "collector": "hang"}) == 0
        assert time.monotonic() - t0 < 1.0
    finally:
        hang.release.set()
        agent.stop()
