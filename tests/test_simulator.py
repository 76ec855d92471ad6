"""Simulator fidelity: the simulated NVML behaves like a real driver, through the `pynvml` API.

Every check calls the simulator the way the collector (or any pynvml program) would, and catches the
real `pynvml.NVMLError_*` classes, so code written against the simulator keeps working on a GPU node.
Time is the scenario's virtual clock: `sim.at(seconds)` jumps there, nothing sleeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pynvml
import pytest

from agent.config import Config
from agent.sources import build_runtime
from collectors.base import SourceUnavailable
from collectors.nvml import DeviceSample, NvmlCollector, NvmlReading
from tests.conftest import SIM_START, SimNvml

Sim = Callable[..., SimNvml]
Write = Callable[[str, str], Path]

A100 = """
name: a100
gpus: {model: A100-SXM-80GB, count: 2}
pods:
  - name: train
    containers: [{name: main, gpus: 1, load: {pattern: constant, level: 0.6}}]
"""


def started(sim: Sim, scenario: str | Path) -> SimNvml:
    s = sim(scenario)
    s.nvml.nvmlInit()
    return s


def collect(s: SimNvml, *times: float) -> list[NvmlReading]:
    """One collector over the scenario, one cycle at each scenario time."""
    c = NvmlCollector(s.nvml)
    return [c.collect(s.at(t)) for t in times]


def by_gpu(r: NvmlReading) -> dict[int, DeviceSample]:
    return {d.gpu: d for d in r.devices if not d.is_mig}


# --- MIG ----------------------------------------------------------------------------------------

def test_mig_enabled_parent_and_mig_devices_have_no_utilization_rates(sim_nvml: Sim) -> None:
    s = started(sim_nvml, "mig")
    n = s.nvml
    s.at(600)
    parent = n.nvmlDeviceGetHandleByIndex(0)
    assert n.nvmlDeviceGetMigMode(parent)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
    with pytest.raises(pynvml.NVMLError_NotSupported) as e:
        n.nvmlDeviceGetUtilizationRates(parent)
    assert e.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED
    mig = n.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        n.nvmlDeviceGetUtilizationRates(mig)
    # a full GPU of the same node answers (pretrain-13b runs at 91% ± 3%)
    assert 88 <= n.nvmlDeviceGetUtilizationRates(n.nvmlDeviceGetHandleByIndex(2)).gpu <= 94


def test_empty_mig_slots_raise_not_found_and_are_skipped(sim_nvml: Sim) -> None:
    s = started(sim_nvml, "mig")
    n = s.nvml
    layout = {0: ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], 1: ["1g.10gb"] * 6}
    for gpu, profiles in layout.items():
        h = n.nvmlDeviceGetHandleByIndex(gpu)
        assert n.nvmlDeviceGetMaxMigDeviceCount(h) == 7
        for slot in range(7):
            if slot < len(profiles):
                mh = n.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
                assert n.nvmlDeviceGetName(mh).endswith(f"MIG {profiles[slot]}")
                assert n.nvmlDeviceGetUUID(mh).startswith("MIG-")
            else:
                with pytest.raises(pynvml.NVMLError_NotFound):
                    n.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
    s2 = sim_nvml("mig")
    reading = collect(s2, 600)[0]
    for gpu, profiles in layout.items():
        assert [d.mig_profile for d in reading.devices if d.is_mig and d.gpu == gpu] == profiles
    assert reading.field_errors == ()


# --- GPM ----------------------------------------------------------------------------------------

def test_gpm_is_supported_on_h100_only_and_a100_falls_back_to_utilization(sim_nvml: Sim,
                                                                          scenario_file: Write) -> None:
    h100 = started(sim_nvml, "demo").nvml
    assert h100.nvmlGpmQueryDeviceSupport(h100.nvmlDeviceGetHandleByIndex(0)).isSupportedDevice == 1

    a100_path = scenario_file("a100", A100)
    s = started(sim_nvml, a100_path)
    n = s.nvml
    h = n.nvmlDeviceGetHandleByIndex(0)
    assert n.nvmlGpmQueryDeviceSupport(h).isSupportedDevice == 0
    sample = n.nvmlGpmSampleAlloc()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        n.nvmlGpmSampleGet(h, sample)
    n.nvmlGpmSampleFree(sample)

    last = collect(sim_nvml(a100_path), 60, 70, 80)[-1]
    busy = by_gpu(last)[0]
    assert busy.model == "NVIDIA A100-SXM4-80GB"
    assert busy.sm_active is None and busy.utilization == pytest.approx(0.6)
    assert busy.activity == pytest.approx(0.6)


# --- processes ----------------------------------------------------------------------------------

def test_process_utilization_raises_not_found_without_samples(sim_nvml: Sim) -> None:
    s = started(sim_nvml, "demo")
    n = s.nvml
    s.at(1800)
    for idle in (0, 7):  # GPU 0: a notebook that runs nothing; GPU 7: nobody
        with pytest.raises(pynvml.NVMLError_NotFound):
            n.nvmlDeviceGetProcessUtilization(n.nvmlDeviceGetHandleByIndex(idle), 0)
    busy = n.nvmlDeviceGetHandleByIndex(4)
    samples = n.nvmlDeviceGetProcessUtilization(busy, 0)
    running = [p.pid for p in n.nvmlDeviceGetComputeRunningProcesses(busy)]
    assert [s.pid for s in samples] == running and samples[0].smUtil > 50
    # nothing newer than the last sample seen: NotFound again, as on a real driver
    with pytest.raises(pynvml.NVMLError_NotFound):
        n.nvmlDeviceGetProcessUtilization(busy, max(x.timeStamp for x in samples))

    reading = collect(sim_nvml("demo"), 1800)[0]
    assert by_gpu(reading)[7].processes == ()
    assert reading.field_errors == ()


# --- lost GPU, Xid events -----------------------------------------------------------------------

PER_GPU_CALLS: list[tuple[str, tuple]] = [
    ("nvmlDeviceGetUUID", ()), ("nvmlDeviceGetName", ()), ("nvmlDeviceGetPciInfo", ()),
    ("nvmlDeviceGetMemoryInfo", ()), ("nvmlDeviceGetUtilizationRates", ()), ("nvmlDeviceGetPowerUsage", ()),
    ("nvmlDeviceGetEnforcedPowerLimit", ()), ("nvmlDeviceGetTotalEnergyConsumption", ()),
    ("nvmlDeviceGetTemperature", (pynvml.NVML_TEMPERATURE_GPU,)), ("nvmlDeviceGetClockInfo", (pynvml.NVML_CLOCK_SM,)),
    ("nvmlDeviceGetMaxClockInfo", (pynvml.NVML_CLOCK_SM,)), ("nvmlDeviceGetComputeRunningProcesses", ()),
    ("nvmlDeviceGetMigMode", ()), ("nvmlGpmQueryDeviceSupport", ()), ("nvmlDeviceGetFieldValues", ([138, 139],)),
    ("nvmlDeviceGetPcieThroughput", (pynvml.NVML_PCIE_UTIL_TX_BYTES,)),
]


def test_lost_gpu_raises_gpu_is_lost_from_t_on_and_the_others_answer(sim_nvml: Sim) -> None:
    s = started(sim_nvml, "demo-lost-gpu")  # GPU 5 lost at 10m
    n = s.nvml
    lost, fine = n.nvmlDeviceGetHandleByIndex(5), n.nvmlDeviceGetHandleByIndex(4)
    s.at(599)
    for fn, args in PER_GPU_CALLS:
        getattr(n, fn)(lost, *args)  # not yet
    for t in (600, 601, 7 * 86400):
        s.at(t)
        for fn, args in PER_GPU_CALLS:
            with pytest.raises(pynvml.NVMLError_GpuIsLost):
                getattr(n, fn)(lost, *args)
            getattr(n, fn)(fine, *args)
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            n.nvmlDeviceGetHandleByIndex(5)


def test_collector_reports_the_lost_gpu_down_and_the_other_seven_up(sim_nvml: Sim) -> None:
    before, after = collect(sim_nvml("demo-lost-gpu"), 300, 1200)
    assert all(d.up for d in before.devices) and len(before.devices) == 8
    gpus = by_gpu(after)
    assert sorted(gpus) == list(range(8))
    assert not gpus[5].up and gpus[5].error == "gpu_is_lost"
    assert gpus[5].uuid == by_gpu(before)[5].uuid
    assert (79, 1) in gpus[5].xid_errors  # the Xid that announced it is kept
    for i in (0, 1, 2, 3, 4, 6, 7):
        assert gpus[i].up and gpus[i].memory_total_bytes and gpus[i].power_watts


XIDS = """
name: xids
extends: demo
faults:
  - {kind: xid, gpu: 2, xid: 48, at: 5m}
  - {kind: xid, xid: 13, at: 10m}
"""


def test_xid_events_arrive_through_event_set_wait(sim_nvml: Sim, scenario_file: Write) -> None:
    s = started(sim_nvml, scenario_file("xids", XIDS))
    n = s.nvml
    handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    es = n.nvmlEventSetCreate()
    for h in handles:
        n.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, es)
    for t in (0, 299):
        s.at(t)
        with pytest.raises(pynvml.NVMLError_Timeout):
            n.nvmlEventSetWait(es, 0)
    s.at(301)
    ev = n.nvmlEventSetWait(es, 0)
    assert (ev.eventType & pynvml.nvmlEventTypeXidCriticalError, ev.eventData) == (
        pynvml.nvmlEventTypeXidCriticalError, 48)
    assert ev.device is handles[2]
    with pytest.raises(pynvml.NVMLError_Timeout):
        n.nvmlEventSetWait(es, 0)
    s.at(900)
    got = []
    for _ in range(8):
        ev = n.nvmlEventSetWait(es, 0)
        got.append((handles.index(ev.device), ev.eventData))
    assert sorted(got) == [(i, 13) for i in range(8)]
    with pytest.raises(pynvml.NVMLError_Timeout):
        n.nvmlEventSetWait(es, 0)
    n.nvmlEventSetFree(es)

    readings = collect(sim_nvml(scenario_file("xids", XIDS)), 60, 400, 900)
    assert [by_gpu(r)[2].xid_errors for r in readings] == [(), ((48, 1),), ((13, 1), (48, 1))]
    assert by_gpu(readings[-1])[0].xid_errors == ((13, 1),)


# --- driver missing -----------------------------------------------------------------------------

NO_DRIVER = """
name: no-driver
extends: demo
faults:
  - {kind: nvml_init_failure, until: 5m}
"""


def test_init_failure_is_library_not_found_and_the_collector_says_no_driver(sim_nvml: Sim,
                                                                          scenario_file: Write) -> None:
    s = sim_nvml(scenario_file("no-driver", NO_DRIVER))
    n = s.nvml
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        n.nvmlInit()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        n.nvmlDeviceGetCount()
    c = NvmlCollector(n)
    with pytest.raises(SourceUnavailable) as e:
        c.collect(s.at(60))
    assert e.value.source == "nvml"
    assert "no NVIDIA driver" in str(e.value) and "--simulate demo" in str(e.value)
    # the driver comes back (the loop retries): the same collector now sees the node
    reading = c.collect(s.at(600))
    assert len(reading.devices) == 8 and all(d.up for d in reading.devices)


# --- field faults -------------------------------------------------------------------------------

NOT_SUPPORTED = """
name: ns-{field}
extends: demo
faults:
  - {{kind: not_supported, field: {field}, gpu: 3}}
"""

FIELD_ATTRS = {
    "utilization": ("utilization", "memory_utilization"),
    "power": ("power_watts",),
    "power_limit": ("power_limit_watts",),
    "energy": ("energy_joules",),
    "temperature": ("temperature_celsius",),
    "clocks": ("sm_clock_hz", "sm_clock_max_hz"),
    "pcie": ("pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second"),
    "nvlink": ("nvlink_tx_bytes", "nvlink_rx_bytes"),
    "gpm": ("sm_active", "sm_occupancy", "tensor_active", "dram_active"),
}


@pytest.mark.parametrize("field", sorted(FIELD_ATTRS))
def test_a_not_supported_field_is_absent_and_nothing_else_is_lost(field: str, sim_nvml: Sim,
                                                                  scenario_file: Write) -> None:
    times = (1800, 1810)
    base = collect(sim_nvml("demo"), *times)[-1]
    faulted = collect(sim_nvml(scenario_file(f"ns-{field}", NOT_SUPPORTED.format(field=field))), *times)[-1]
    assert faulted.field_errors == ()
    blank = dict.fromkeys(FIELD_ATTRS[field])
    for gpu, d in by_gpu(faulted).items():
        b = by_gpu(base)[gpu]
        if gpu != 3:
            assert d == b
            continue
        assert d.up
        for attr in FIELD_ATTRS[field]:
            assert getattr(d, attr) is None, attr
            assert getattr(b, attr) is not None, f"{attr} was already absent without the fault"
        assert dataclasses.replace(d, **blank) == dataclasses.replace(b, **blank)
    if field == "gpm":  # activity falls back to NVML utilization
        assert by_gpu(faulted)[3].activity == by_gpu(faulted)[3].utilization is not None


def test_unsupported_process_utilization_leaves_process_sm_absent(sim_nvml: Sim, scenario_file: Write) -> None:
    """Not 0.0: a time-sliced share whose processes read 0% would be billed as idle reserved."""
    path = scenario_file("ns-pu", NOT_SUPPORTED.format(field="process_utilization"))
    d = by_gpu(collect(sim_nvml(path), 1800)[0])[3]
    assert d.processes, "the vLLM process is still listed"
    assert all(p.sm_util is None for p in d.processes), d.processes


def test_memory_v2_unsupported_falls_back_to_v1(sim_nvml: Sim, scenario_file: Write) -> None:
    base = by_gpu(collect(sim_nvml("demo"), 1800)[0])
    s = sim_nvml(scenario_file("ns-mem", NOT_SUPPORTED.format(field="memory_v2")))
    s.nvml.nvmlInit()
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        s.nvml.nvmlDeviceGetMemoryInfo(s.nvml.nvmlDeviceGetHandleByIndex(3), version=pynvml.nvmlMemory_v2)
    s.nvml.nvmlShutdown()
    reading = collect(s, 1800)[0]
    d = by_gpu(reading)[3]
    assert base[3].memory_reserved_bytes
    assert d.memory_total_bytes == base[3].memory_total_bytes
    assert d.memory_reserved_bytes is None
    # v1 "used" counts the driver's reservation; v2 reports it apart
    assert d.memory_used_bytes == base[3].memory_used_bytes + base[3].memory_reserved_bytes
    assert {g: x for g, x in by_gpu(reading).items() if g != 3} == {g: x for g, x in base.items() if g != 3}
    assert reading.field_errors == ()


# --- module emulation ---------------------------------------------------------------------------

def test_an_nvml_function_the_simulator_lacks_raises_function_not_found(sim_nvml: Sim) -> None:
    n = started(sim_nvml, "demo").nvml
    h = n.nvmlDeviceGetHandleByIndex(0)
    assert hasattr(pynvml, "nvmlDeviceGetFanSpeed")
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        n.nvmlDeviceGetFanSpeed(h)
    with pytest.raises(AttributeError):
        n.nvmlNoSuchFunction  # noqa: B018 - what `pynvml.nvmlNoSuchFunction` does
    assert n.NVML_CLOCK_SM == pynvml.NVML_CLOCK_SM and n.NVMLError is pynvml.NVMLError


# --- determinism --------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["demo", "mig", "timeslice"])
def test_same_scenario_seed_and_times_give_identical_readings(scenario: str, sim_nvml: Sim) -> None:
    times = (0, 600, 610, 3600, 3610)
    a = collect(sim_nvml(scenario), *times)
    b = collect(sim_nvml(scenario), *times)
    assert a == b


def test_another_seed_gives_another_node(sim_nvml: Sim, scenario_file: Write) -> None:
    other = scenario_file("seed8", "name: seed8\nextends: demo\nseed: 8\n")
    a, b = (collect(sim_nvml(x), 600)[0] for x in ("demo", other))
    assert {d.uuid for d in a.devices}.isdisjoint({d.uuid for d in b.devices})


# --- load patterns ------------------------------------------------------------------------------

PATTERNS = """
name: patterns
gpus: {{model: L4, count: 6}}
pods:
  - {{name: idle, containers: [{{name: c, devices: [0], load: {{pattern: idle}}}}]}}
  - {{name: constant, containers: [{{name: c, devices: [1], load: {{pattern: constant, level: 0.4}}}}]}}
  - name: diurnal
    containers: [{{name: c, devices: [2], load: {{pattern: diurnal, min: 0.1, max: 0.9, period: 24h, peak_at: 14h}}}}]
  - name: bursty
    containers:
      - {{name: c, devices: [3], load: {{pattern: bursty, level: 0.1, burst_level: 0.8, every: 10m, duration: 1m}}}}
  - {{name: ramp, containers: [{{name: c, devices: [4], load: {{pattern: ramp, from: 0.2, to: 0.8, over: 1h}}}}]}}
  - {{name: trace, containers: [{{name: c, devices: [5], load: {{pattern: trace, file: {trace}}}}}]}}
"""
TRACE_CSV = "seconds,value\n0,0.1\n600,0.5\n1200,0.9\n1800,0.3\n"
H, M = 3600, 60

# GPU → [(scenario seconds, utilization %)]
EXPECTED = {
    0: [(0, 0), (14 * H, 0), (3 * 86400, 0)],
    1: [(0, 40), (5 * H, 40), (3 * 86400, 40)],
    2: [(2 * H, 10), (8 * H, 50), (14 * H, 90), (20 * H, 50), (26 * H, 10), (38 * H, 90)],
    3: [(30, 80), (90, 10), (5 * M, 10), (10 * M + 30, 80), (20 * M + 59, 80), (21 * M + 1, 10)],
    4: [(0, 20), (30 * M, 50), (1 * H, 80), (5 * H, 80)],
    # the last row (1800 s) lasts one step (600 s) like the others, then the trace repeats from 2400 s
    5: [(300, 10), (900, 50), (1500, 90), (2100, 30), (2400 + 300, 10), (2400 + 900, 50)],
}


def test_load_patterns_shape_utilization_over_simulated_time(sim_nvml: Sim, scenario_file: Write,
                                                             tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text(TRACE_CSV)
    s = started(sim_nvml, scenario_file("patterns", PATTERNS.format(trace="trace.csv")))
    n = s.nvml
    handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(6)]
    points = sorted((t, gpu, pct) for gpu, pts in EXPECTED.items() for t, pct in pts)
    got = []
    for t, gpu, _ in points:
        s.at(t)
        got.append((t, gpu, n.nvmlDeviceGetUtilizationRates(handles[gpu]).gpu))
    assert got == points


def test_diurnal_load_peaks_at_peak_at(sim_nvml: Sim, scenario_file: Write, tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text(TRACE_CSV)
    s = started(sim_nvml, scenario_file("patterns", PATTERNS.format(trace="trace.csv")))
    h = s.nvml.nvmlDeviceGetHandleByIndex(2)
    by_hour = []
    for hour in range(24):
        s.at(hour * H)
        by_hour.append(s.nvml.nvmlDeviceGetUtilizationRates(h).gpu)
    assert by_hour.index(max(by_hour)) == 14 and by_hour.index(min(by_hour)) == 2


# --- long runs ----------------------------------------------------------------------------------

def test_seven_simulated_days_of_demo_run_through_the_whole_agent() -> None:
    rt = build_runtime(Config(), simulate="demo", realtime=False, start=SIM_START)
    try:
        state = rt.agent.run_until(rt.clock, SIM_START + 7 * 86400, 3600)
    finally:
        rt.close()
    assert rt.clock.now() == SIM_START + 7 * 86400
    assert all(c.success for c in state.collectors), [(c.name, c.last_error) for c in state.collectors]
    states = {v.row.gpu: v.state for v in state.units}
    assert states[0] == states[1] == "idle_reserved"  # the notebook that holds two GPUs and runs nothing
    assert states[7] == "unallocated"
    assert {states[g] for g in (2, 3, 4, 5, 6)} == {"active"}


# --- pinning a real node's layout ---------------------------------------------------------------

PINNED = """
name: pinned
gpus:
  model: H100-SXM-80GB
  count: 3
  minor_numbers: [4, 0, 2]
  mig:
    1: [{profile: 3g.40gb, gi: 2, ci: 0}, {profile: 2g.20gb, gi: 9, ci: 1}, 1g.10gb]
pods:
  - name: infer
    containers: [{name: main, mig: {2g.20gb: 1}, load: {pattern: constant, level: 0.5}}]
"""


def test_pinned_minor_numbers_come_back_from_nvml(sim_nvml: Sim, scenario_file: Write) -> None:
    n = started(sim_nvml, scenario_file("pinned", PINNED)).nvml
    assert [n.nvmlDeviceGetMinorNumber(n.nvmlDeviceGetHandleByIndex(i)) for i in range(3)] == [4, 0, 2]
    # a MIG device has no /dev/nvidia<N> of its own: NVML does not answer for it
    mig = n.nvmlDeviceGetMigDeviceHandleByIndex(n.nvmlDeviceGetHandleByIndex(1), 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        n.nvmlDeviceGetMinorNumber(mig)
    # unpinned: the minor number is the index
    d = started(sim_nvml, "demo").nvml
    assert [d.nvmlDeviceGetMinorNumber(d.nvmlDeviceGetHandleByIndex(i)) for i in range(8)] == list(range(8))


def test_pinned_gpu_and_compute_instance_ids_come_back_from_nvml(sim_nvml: Sim, scenario_file: Write) -> None:
    s = started(sim_nvml, scenario_file("pinned", PINNED))
    n = s.nvml
    parent = n.nvmlDeviceGetHandleByIndex(1)
    migs = [n.nvmlDeviceGetMigDeviceHandleByIndex(parent, j) for j in range(3)]
    ids = [(n.nvmlDeviceGetGpuInstanceId(m), n.nvmlDeviceGetComputeInstanceId(m)) for m in migs]
    assert ids == [(2, 0), (9, 1), (5, 0)]  # the unpinned third keeps the NVML-like default 1 + 2·j
    s.at(600)
    procs = n.nvmlDeviceGetComputeRunningProcesses(migs[1])
    assert [(p.gpuInstanceId, p.computeInstanceId) for p in procs] == [(9, 1)]
    sample = n.nvmlGpmSampleAlloc()
    n.nvmlGpmMigSampleGet(parent, 9, sample)  # GPM addresses the instance by its pinned id
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        n.nvmlGpmMigSampleGet(parent, 3, sample)  # the default id the pin replaced is not there
    n.nvmlGpmSampleFree(sample)


def test_a_pinned_gi_that_clashes_with_a_default_names_the_pin(scenario_file: Write) -> None:
    from collectors.schema import InputError
    from collectors.simulated.scenario import load_scenario

    clash = PINNED.replace("{profile: 2g.20gb, gi: 9, ci: 1}", "{profile: 2g.20gb, gi: 5, ci: 1}")
    with pytest.raises(InputError) as e:
        load_scenario(str(scenario_file("clash", clash)))
    assert e.value.path == "gpus.mig.1[1].gi" and e.value.got == 5


def test_handles_are_ctypes_pointers_with_a_stable_distinct_address(sim_nvml: Sim) -> None:
    """What real pynvml handles are: code keying them by address needs no simulator branch."""
    import ctypes

    n = started(sim_nvml, "mig").nvml
    handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(n.nvmlDeviceGetCount())]
    handles += [n.nvmlDeviceGetMigDeviceHandleByIndex(handles[0], j) for j in range(4)]
    keys = [ctypes.cast(h, ctypes.c_void_p).value for h in handles]
    assert all(keys) and len(set(keys)) == len(keys)
    assert ctypes.cast(n.nvmlDeviceGetHandleByIndex(2), ctypes.c_void_p).value == keys[2]
    parent = n.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handles[-1])
    assert ctypes.cast(parent, ctypes.c_void_p).value == keys[0]


SHARED = """
name: shared-pins
gpus: {{model: L4, count: 2, time_slicing: {{replicas: 4}}}}
pods:
  - name: a
    containers: [{{name: main, shares: [{{gpu: 1, replica: 3}}, {{gpu: 0, replica: 2}}]}}]
  - name: b
    containers: [{{name: main, gpus: 2}}]
  - name: c
    containers: [{{name: main, shares: [{share}]}}]
"""


def test_a_pinned_share_is_the_replica_the_kubelet_lists(scenario_file: Write) -> None:
    import grpc

    from collectors.proto import podresources_pb2 as pb
    from collectors.proto import podresources_pb2_grpc as pb_grpc
    from collectors.simulated.clock import SimClock
    from collectors.simulated.environment import SimEnvironment
    from collectors.simulated.scenario import load_scenario

    sc = load_scenario(str(scenario_file("shared-pins", SHARED.format(share="{gpu: 0, replica: 0}"))))
    g0, g1 = (g.uuid for g in sc.gpus)
    with (SimEnvironment(sc, SimClock(start=SIM_START), inference=False) as env,
          grpc.insecure_channel(f"unix://{env.kubelet_socket}") as ch):
        reply = pb_grpc.PodResourcesListerStub(ch).List(pb.ListPodResourcesRequest(), timeout=10)
    ids = {p.name: [i for c in p.containers for d in c.devices for i in d.device_ids] for p in reply.pod_resources}
    assert ids["a"] == [f"{g1}::3", f"{g0}::2"]  # pinned, in the order given
    assert ids["c"] == [f"{g0}::0"]
    assert ids["b"] == [f"{g0}::1", f"{g0}::3"]  # first fit takes what the pins left


@pytest.mark.parametrize(("share", "key", "expected"), [
    ("{gpu: 1, replica: 3}", "pods[2].containers[0].shares[0]", "no other container"),  # pod a holds it
    ("{gpu: 0, replica: 4}", "pods[2].containers[0].shares[0]", "replica between 0 and 3"),
    ("{gpu: 2, replica: 0}", "pods[2].containers[0].shares[0]", "time-sliced GPU of this node"),
])
def test_a_conflicting_pin_is_an_input_error_naming_the_share(share: str, key: str, expected: str,
                                                             scenario_file: Write) -> None:
    from collectors.schema import InputError
    from collectors.simulated.scenario import load_scenario

    with pytest.raises(InputError) as e:
        load_scenario(str(scenario_file("bad-pin", SHARED.format(share=share))))
    assert e.value.path == key and expected in e.value.expected, str(e.value)
    assert key in str(e.value)


def test_a_share_pinned_on_a_node_without_time_slicing_is_an_input_error(scenario_file: Write) -> None:
    from collectors.schema import InputError
    from collectors.simulated.scenario import load_scenario

    text = "name: x\ngpus: {model: L4, count: 2}\npods:\n  - {name: a, containers: [{name: m, shares: [{gpu: 0, replica: 0}]}]}\n"
    with pytest.raises(InputError) as e:
        load_scenario(str(scenario_file("no-ts", text)))
    assert e.value.path == "pods[0].containers[0].shares[0]" and "replicas" in e.value.expected


# --- simulated servers follow simulated time ------------------------------------------------------

def test_an_inference_outage_is_applied_at_request_time(scenario_file: Write) -> None:
    """No collector has to run first: each server applies the scenario's faults when it is asked."""
    import urllib.error
    import urllib.request

    from collectors.simulated.clock import SimClock
    from collectors.simulated.environment import SimEnvironment
    from collectors.simulated.scenario import load_scenario

    path = scenario_file("inf-down", "name: inf-down\nextends: demo\n"
                                     "faults: [{kind: source_down, source: inference, at: 1m, until: 2m}]\n")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    clock = SimClock(start=SIM_START)
    with SimEnvironment(load_scenario(str(path)), clock, kubelet=False) as env:
        url = next(iter(env.inference_servers.values())).url
        codes = []
        for t in (30, 90, 150):
            clock.advance(t - clock.scenario_time())
            try:
                with opener.open(url, timeout=5) as r:
                    codes.append(r.status)
            except urllib.error.HTTPError as e:
                codes.append(e.code)
    assert codes == [200, 500, 200]


def test_a_device_freed_by_an_ended_pod_goes_to_a_pod_that_starts_later(tmp_path: Path) -> None:
    """A churning node: one GPU, three pods one after another. Before, the scenario was refused
    (each pod needed a device of its own for the whole run); now each holds the GPU in its turn."""
    from tests.helpers import run_to, simulated, write_scenario

    sc = {"node": {"name": "n1", "labels": {"node.kubernetes.io/instance-type": "p5.48xlarge"}},
          "gpus": {"model": "H100-SXM-80GB", "count": 1},
          "pods": [{"namespace": "batch", "name": f"job-{i}", "owner": {"kind": "Job", "name": f"job-{i}"},
                    "start": i * 1200, "end": i * 1200 + 1080,
                    "containers": [{"name": "main", "gpus": 1, "load": {"pattern": "constant", "level": 0.5}}]}
                   for i in range(3)]}
    with simulated(write_scenario(tmp_path, "churn1", sc)) as rt:
        holders = []
        for t in (600, 1800, 3000):
            st = run_to(rt, t)
            (unit,) = st.units
            holders.append(unit.row.allocations[0].owner.pod if unit.row.allocations else "")
    assert holders == ["job-0", "job-1", "job-2"]


def test_a_device_is_never_given_to_a_pod_that_starts_before_its_holder_ends(tmp_path: Path) -> None:
    """Listed out of time order: job-b (5-8 min) comes after a pod starting at 20 min. The GPU job-a
    holds until 10 min is not free for job-b, so the node is refused, never doubly allocated."""
    from collectors.schema import InputError
    from collectors.simulated.scenario import load_scenario
    from tests.helpers import write_scenario

    def pod(name: str, start: int, end: int | None, gpus: int) -> dict:
        p = {"namespace": "batch", "name": name, "start": start,
             "containers": [{"name": "main", "gpus": gpus, "load": {"pattern": "constant", "level": 0.5}}]}
        if end is not None:
            p["end"] = end
        return p

    sc = {"node": {"name": "n1", "labels": {"node.kubernetes.io/instance-type": "p5.48xlarge"}},
          "gpus": {"model": "H100-SXM-80GB", "count": 2},
          "pods": [pod("job-a", 0, 600, 1), pod("server", 0, None, 1), pod("cpu-only", 1200, None, 0),
                   pod("job-b", 300, 480, 1)]}
    with pytest.raises(InputError) as e:
        load_scenario(write_scenario(tmp_path, "overlap", sc))
    assert "pods[3].containers[0].gpus" in str(e.value) and "when it starts (300s)" in str(e.value)
    sc["pods"][3] = pod("job-b", 600, 900, 1)  # once job-a has ended, its GPU is job-b's
    assert load_scenario(write_scenario(tmp_path, "after", sc))
