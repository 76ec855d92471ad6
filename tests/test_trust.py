"""Trustworthy numbers (issue 9): no unit is shown free, busy or idle without fresh evidence, the dollars
by state add up to the node's price, and money follows the monotonic clock. Each test here failed on the
code before the fix it names."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.attribution import attribute
from agent.config import Config, IdleConfig
from agent.exposition import render
from agent.model import STATES, AgentState
from agent.pipeline import Evaluator
from collectors.nvml import DeviceSample, NvmlReading, ProcessSample
from collectors.podresources import ContainerDevice, PodResourcesReading, parse_device_id
from collectors.pricing import PriceBook, pricing_config_from_dict
from collectors.processes import CgroupOwner
from tests.helpers import START, collected, run_to, samples, simulated, total, value, walk, write_scenario

H100 = 55.04 / 8  # p5.48xlarge per GPU-hour (bundled catalog)


def _by_state(st: AgentState) -> dict[str, float]:
    out = dict.fromkeys(STATES, 0.0)
    for v in st.units:
        out[v.state] += v.row.hourly_price
    return out


def _node_price(st: AgentState) -> float:
    """The node's GPU price: each physical GPU's price once, whatever units it is split into."""
    return sum({v.row.gpu: v.row.parent_hourly_price for v in st.units}.values())


# --- freshness: kubelet -----------------------------------------------------------------------------
def test_kubelet_down_mid_run_turns_units_unknown_after_the_max_age_and_back(tmp_path: Path) -> None:
    sc = {"extends": "demo", "faults": [{"kind": "source_down", "source": "kubelet", "at": "5m", "until": "55m"}]}
    with simulated(write_scenario(tmp_path, "kubelet-outage", sc)) as rt:
        before = run_to(rt, 4 * 60 + 50)
        assert {v.state for v in before.units} == {"active", "unallocated"}
        # 30 s (3× the 10 s interval) after the last good reading: nothing is known about holders
        during = run_to(rt, 6 * 60)
        assert {v.state for v in during.units} == {"unknown"}, "allocations from before the outage served"
        m = collected(during)
        assert samples(m, "gpucap_gpu_allocation_ratio") == []
        assert total(m, "gpucap_unallocated_cost_dollars_per_hour") == 0.0, "unknown shown as free capacity"
        assert total(m, "gpucap_unknown_cost_dollars_per_hour") == pytest.approx(55.04)
        assert value(m, "gpucap_collector_success", collector="podresources") == 0.0
        assert samples(m, "gpucap_collector_data_age_seconds", collector="podresources") == []
        assert value(m, "gpucap_collector_data_age_seconds", collector="nvml") <= 30.0
        # NVML is fine all along: device gauges stay
        assert len(samples(m, "gpucap_gpu_utilization_ratio")) == 8
        late = run_to(rt, 50 * 60)
        assert {v.state for v in late.units} == {"unknown"}, "50 minutes into the outage"
        back = None
        for st in walk(rt, 62 * 60, 10):
            if st.time > START + 55 * 60 and "unknown" not in {v.state for v in st.units}:
                back = st
                break
        assert back is not None, "states did not return after the kubelet came back"
        assert {v.state for v in back.units} >= {"active", "unallocated"}
        assert _node_price(back) == pytest.approx(55.04)


def test_kubelet_socket_missing_at_start_is_unknown_never_free() -> None:
    cfg = Config()
    from dataclasses import replace

    cfg = replace(cfg, kubelet=replace(cfg.kubelet, socket="/nonexistent/kubelet.sock", explicit=True))
    with simulated("demo", cfg) as rt:
        st = run_to(rt, 60)
    assert {v.state for v in st.units} == {"unknown"}
    m = collected(st)
    assert total(m, "gpucap_unallocated_cost_dollars_per_hour") == 0.0
    assert total(m, "gpucap_unknown_cost_dollars_per_hour") == pytest.approx(55.04)
    assert value(m, "gpucap_gpu_state", state="unallocated", gpu="7") == 0.0


# --- freshness: NVML -----------------------------------------------------------------------------------
class _Hanging:
    """An NVML collector stuck in a driver call (the loop's timeout thread gives up on it)."""

    name = "nvml"

    def __init__(self) -> None:
        self.release = threading.Event()

    def collect(self, now: float) -> NvmlReading:
        self.release.wait(30)
        raise RuntimeError("released")

    def close(self) -> None:
        self.release.set()


def test_nvml_hanging_drops_its_gauges_and_units_are_unknown() -> None:
    with simulated("demo") as rt:
        run_to(rt, 60)
        src = rt.agent.sources["nvml"]
        real, hang = src.collector, _Hanging()
        src.collector, src.timeout = hang, 0.2
        try:
            rt.clock.advance(20)
            rt.agent._collect_with_timeout(src)  # times out after 0.2 s of real time
            still = rt.agent.evaluate_now()
            assert {v.state for v in still.units} <= {"active", "unallocated"}, "20 s old: still fresh"
            rt.clock.advance(20)  # 40 s since the last good reading > 30 s max age
            rt.agent._collect_with_timeout(src)
            rt.agent.collect_now(rt.agent.sources["podresources"], rt.clock.now())  # the kubelet answers
            st = rt.agent.evaluate_now()
        finally:
            hang.release.set()
            src.collector = real
    m = collected(st)
    assert value(m, "gpucap_collector_success", collector="nvml") == 0.0
    for name in ("gpucap_gpu_up", "gpucap_gpu_utilization_ratio", "gpucap_gpu_memory_used_bytes",
                 "gpucap_gpu_power_watts", "gpucap_unit_activity_ratio"):
        assert samples(m, name) == [], f"{name} served from an expired NVML reading"
    assert {v.state for v in st.units} == {"unknown"}
    assert len(st.units) == 8, "the units are still known from the inventory"
    assert total(m, "gpucap_unknown_cost_dollars_per_hour") == pytest.approx(55.04)
    # who holds them is still known from the fresh kubelet reading
    assert len(samples(m, "gpucap_gpu_allocation_ratio")) == 7


# --- lost --------------------------------------------------------------------------------------------
def test_lost_gpu_held_by_a_pod_is_lost_with_its_holder_and_dollars() -> None:
    with simulated("demo-lost-gpu") as rt:
        st = run_to(rt, 20 * 60)
    m = collected(st)
    (lost,) = [v for v in st.units if v.state == "lost"]
    assert lost.row.gpu == 5 and lost.row.owner.pod, "GPU 5 is held by the training job"
    labels = {"gpu": "5", "pod": lost.row.owner.pod, "workload": lost.row.owner.workload}
    assert value(m, "gpucap_lost_cost_dollars_per_hour", **labels) == pytest.approx(H100)
    assert value(m, "gpucap_gpu_state", state="lost", **labels) == 1.0
    assert value(m, "gpucap_gpu_state", state="active", **labels) == 0.0
    assert value(m, "gpucap_allocated_cost_dollars_per_hour", **labels) == pytest.approx(H100)
    assert total(m, "gpucap_cost_dollars_total", state="lost", gpu="5") > 0
    assert value(m, "gpucap_gpu_up", gpu="5") == 0.0


# --- the identity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("basis", ["compute", "memory"])
def test_mig_node_adds_up_exactly_on_both_cost_bases(basis: str) -> None:
    cfg = Config(pricing=pricing_config_from_dict({"mig_cost_basis": basis}, "test"))
    with simulated("mig", cfg) as rt:
        for st in walk(rt, 5 * 60, 60):
            assert sum(_by_state(st).values()) == pytest.approx(_node_price(st), abs=1e-9)
    assert any(v.row.kind == "mig" for v in st.units)
    assert _node_price(st) == pytest.approx(55.04), "8 H100s of a p5.48xlarge, MIG or not"


def test_poisoned_price_lookup_skips_one_unit_and_serves_the_rest() -> None:
    with simulated("demo") as rt:
        book = rt.evaluator.prices
        calls = {"n": 0}
        real = book.gpu_price

        def poisoned(*a, **k):
            calls["n"] += 1
            if calls["n"] % 8 == 4:  # the fourth device of every evaluation
                raise ValueError("poisoned price row")
            return real(*a, **k)

        book.gpu_price = poisoned  # type: ignore[method-assign]
        st = run_to(rt, 120)
    m = collected(st)
    assert value(m, "gpucap_evaluation_success") == 1.0
    assert len(st.units) == 7, "one unit skipped, seven still served"
    assert value(m, "gpucap_collector_skipped_total", collector="attribution", reason="device_error") >= 2
    assert len(samples(m, "gpucap_gpu_hourly_price_dollars")) == 7


def test_an_evaluation_that_fails_whole_never_freezes_the_state() -> None:
    with simulated("demo") as rt:
        good = run_to(rt, 60)
        assert good.units
        rt.evaluator.idle.update = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore
        bad = run_to(rt, 120)
    m = collected(bad)
    assert value(m, "gpucap_evaluation_success") == 0.0
    assert bad.units == () and samples(m, "gpucap_gpu_state") == [], "no number without evidence"
    assert value(m, "gpucap_collector_success", collector="nvml") == 1.0


# --- money on a monotonic clock ------------------------------------------------------------------------
@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_wall_clock_step_charges_and_skips_nothing(step: float) -> None:
    with simulated("demo") as rt:
        run_to(rt, 10 * 60)
        before = total(collected(rt.agent.state), "gpucap_cost_dollars_total")
        rt.clock.step_wall(step)  # NTP or a resumed VM moves the wall clock only
        rt.clock.advance(10)
        after = total(collected(rt.agent.step()), "gpucap_cost_dollars_total")
    assert after - before == pytest.approx(55.04 * 10 / 3600, rel=1e-9)


def test_a_gap_longer_than_the_max_age_accrues_as_unknown() -> None:
    with simulated("demo") as rt:
        run_to(rt, 10 * 60)
        m0 = collected(rt.agent.state)
        rt.clock.advance(600)  # the agent was suspended for 10 minutes
        m1 = collected(rt.agent.step())
    unknown = total(m1, "gpucap_cost_dollars_total", state="unknown") - total(m0, "gpucap_cost_dollars_total",
                                                                              state="unknown")
    assert unknown == pytest.approx(55.04 * 600 / 3600, rel=1e-9)
    for state in ("active", "unallocated"):
        assert total(m1, "gpucap_cost_dollars_total", state=state) == pytest.approx(
            total(m0, "gpucap_cost_dollars_total", state=state), rel=1e-12)


# --- time-sliced shares ---------------------------------------------------------------------------------
def test_share_activity_is_relative_to_its_entitlement(tmp_path: Path) -> None:
    sc = {
        "node": {"name": "l4-node", "labels": {"node.kubernetes.io/instance-type": "g6.xlarge"}},
        "gpus": {"model": "L4", "count": 1, "time_slicing": {"replicas": 10}},
        "pods": [{"namespace": "ml", "name": "small-infer", "labels": {"team": "ml"},
                  "containers": [{"name": "main", "gpus": 1,
                                  "load": {"pattern": "constant", "level": 0.04}}]}],
    }
    with simulated(write_scenario(tmp_path, "ten-way", sc)) as rt:
        st = run_to(rt, 40 * 60, 60)
    (held,) = [v for v in st.units if v.row.allocated]
    assert held.row.device_activity == pytest.approx(0.04, abs=0.005)  # of the whole L4
    assert held.row.activity == pytest.approx(0.4, abs=0.05)  # of its 1/10 slot
    assert held.state == "active", "a pod using 40% of its share is not idle"
    m = collected(st)
    labels = {"pod": "small-infer", "uuid": held.row.uuid}
    assert value(m, "gpucap_gpu_share_device_activity_ratio", **labels) == pytest.approx(0.04, abs=0.005)
    assert value(m, "gpucap_unit_activity_ratio", **labels) == pytest.approx(0.4, abs=0.05)


# --- attribution fixes (pure, on literal readings) ----------------------------------------------------------
UUID = "GPU-3f1c0e2b-4d6f-8091-a2b3-c4d5e6f70819"


def _dev(gpu: int, uuid: str, minor: int | None = None, processes: tuple[ProcessSample, ...] = (),
         util: float = 0.5) -> DeviceSample:
    return DeviceSample(gpu=gpu, uuid=uuid, model="NVIDIA H100 80GB HBM3", minor_number=minor, utilization=util,
                        memory_total_bytes=80 * 2**30, memory_used_bytes=2**30, processes=processes)


def _kubelet(*ids: tuple[str, str]) -> PodResourcesReading:
    return PodResourcesReading(
        devices=tuple(ContainerDevice("ml", f"pod-{i}", "main", res, did, parse_device_id(res, did))
                      for i, (res, did) in enumerate(ids)),
        allocatable=(), unknown_ids=0)


BOOK = PriceBook(pricing_config_from_dict(None, "test"))


def test_uuid_differing_only_in_case_is_matched() -> None:
    att = attribute("n", NvmlReading("", "", (_dev(0, UUID),)), _kubelet(("nvidia.com/gpu", UUID.upper())),
                    None, None, BOOK)
    (row,) = att.rows
    assert row.allocated and row.owner.pod == "pod-0"
    assert att.unknown_devices == 0


def test_an_id_that_matches_no_device_is_counted_not_dropped() -> None:
    att = attribute("n", NvmlReading("", "", (_dev(0, UUID),)),
                    _kubelet(("nvidia.com/gpu", "GPU-00000000-0000-0000-0000-000000000000")), None, None, BOOK)
    assert att.unknown_devices == 1 and dict(att.skipped) == {"unmatched_device_id": 1}
    assert not att.rows[0].allocated


def test_gke_nvidia_n_is_the_minor_number_not_the_index() -> None:
    devices = (_dev(0, "GPU-aaaaaaaa-0000-0000-0000-000000000000", minor=3),
               _dev(1, "GPU-bbbbbbbb-0000-0000-0000-000000000000", minor=0))
    att = attribute("n", NvmlReading("", "", devices), _kubelet(("nvidia.com/gpu", "nvidia0")), None, None, BOOK)
    held = {r.gpu: r.owner.pod for r in att.rows if r.allocated}
    assert held == {1: "pod-0"}, "nvidia0 is /dev/nvidia0, the GPU whose minor number is 0"


def test_crio_conmon_is_not_the_pods_gpu_use() -> None:
    uid = "1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d"
    procs = (ProcessSample(100, 2**30, None, None, 0.3), ProcessSample(101, 2**20, None, None, 0.2))
    reading = NvmlReading("", "", (_dev(0, UUID, processes=procs),))
    kubelet = PodResourcesReading(
        devices=(ContainerDevice("ml", "p", "main", "nvidia.com/gpu", f"{UUID}::0",
                                 parse_device_id("nvidia.com/gpu", f"{UUID}::0")),),
        allocatable=(("nvidia.com/gpu", f"{UUID}::0"), ("nvidia.com/gpu", f"{UUID}::1")), unknown_ids=0)
    from collectors.kubernetes import KubeMetadata, NodeMeta, PodMeta

    meta = KubeMetadata(NodeMeta("n", (), (), "", "on-demand", "", ""),
                        (PodMeta(uid, "ml", "p", "Running", "n", (), (), "Deployment", "d", "t", "", ()),), False, 0.0)
    owners = {100: CgroupOwner(uid, "a" * 64, "crio"), 101: CgroupOwner(uid, "", "crio", monitor=True)}
    att = attribute("n", reading, kubelet, meta, owners, BOOK)
    (share,) = [r for r in att.rows if r.allocated]
    assert share.device_activity == pytest.approx(0.3), "conmon's 0.2 is not the pod's"
    assert att.foreign == (), "nor is it a stray process"


def test_kubelet_taking_3s_per_call_keeps_every_allocation() -> None:
    from collectors.podresources import PodResourcesCollector

    with simulated("demo") as rt:
        rt.env.kubelet.set_delay(3.0)
        reading = PodResourcesCollector(rt.env.kubelet_socket, timeout=5.0).collect(0.0)
    assert len(reading.devices) == 7 and len(reading.allocatable) == 8


# --- the identity over random nodes --------------------------------------------------------------------
def test_evaluator_identity_holds_for_every_state_mix() -> None:
    """A hand-made node where every state occurs at once: the states still add up to the node price."""
    from agent.model import CollectorStatus as CS
    from agent.model import Snapshot, SourceReading

    lost = DeviceSample(gpu=1, uuid="GPU-bbbbbbbb-0000-0000-0000-000000000000", model="NVIDIA H100 80GB HBM3",
                        up=False, error="gpu_is_lost")
    devices = (_dev(0, UUID, util=0.0), lost, _dev(2, "GPU-cccccccc-0000-0000-0000-000000000000", util=0.9))
    kubelet = _kubelet(("nvidia.com/gpu", UUID), ("nvidia.com/gpu", lost.uuid))
    ev = Evaluator(Config(idle=IdleConfig(0.05, 60.0)), "n")
    ok = CS("x", True, 0.0, 0.0)
    for t in range(0, 180, 10):
        snap = Snapshot(time=START + t, mono=float(t),
                        nvml=SourceReading(ok, NvmlReading("", "", devices), START + t),
                        podresources=SourceReading(ok, kubelet, START + t))
        st = ev(snap)
        assert sum(_by_state(st).values()) == pytest.approx(_node_price(st), abs=1e-12)
        assert _node_price(st) > 0
    assert {v.state for v in st.units} == {"idle_reserved", "lost", "unallocated"}
    assert "lost" in render(st)


def test_nvml_driver_gone_expires_the_reading_and_nothing_is_called_lost(tmp_path: Path) -> None:
    sc = {"extends": "demo", "faults": [{"kind": "source_down", "source": "nvml", "at": "2m", "until": "10m"}]}
    with simulated(write_scenario(tmp_path, "nvml-down", sc)) as rt:
        down = run_to(rt, 5 * 60)
        m = collected(down)
        assert value(m, "gpucap_collector_success", collector="nvml") == 0.0
        assert {v.state for v in down.units} == {"unknown"}, "a driver outage is not 8 lost GPUs"
        assert samples(m, "gpucap_gpu_up") == []
        back = run_to(rt, 12 * 60)
    assert {v.state for v in back.units} == {"active", "unallocated"}
    assert len(samples(collected(back), "gpucap_gpu_up")) == 8
