"""One set of NVML-collector assertions, run against every backend the collector can sit on.

The simulator (three built-in scenarios: full H100s, MIG on H100, time-sliced L4s) always; real
`pynvml` under `@pytest.mark.gpu`, skipped when no driver answers `nvmlInit`. Every assertion here
must also hold on a real GPU node: a simulator that drifts from the hardware fails these tests on the
GPU machine, and a collector that mishandles real hardware fails them there too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pynvml
import pytest

from collectors.nvml import DeviceSample, NvmlCollector, NvmlReading
from collectors.simulated.clock import SimClock
from collectors.simulated.node import SimNode
from collectors.simulated.nvml import SimulatedNVML
from collectors.simulated.scenario import load_scenario
from tests.conftest import SIM_START
from tests.helpers import has_nvidia_driver

CYCLES = 3
RATIO_FIELDS = ("utilization", "memory_utilization", "sm_active", "sm_occupancy", "tensor_active", "dram_active")
GPM_FIELDS = ("sm_active", "sm_occupancy", "tensor_active", "dram_active")
# GPM (nvmlGpmQueryDeviceSupport) exists on Hopper and newer.
GPM_MODELS = re.compile(r"\b(G?H(100|200|20|800)|G?B(100|200|300))\b")
MIG_PROFILE = re.compile(r"^\d+g\.\d+gb")  # real names may carry a suffix, e.g. 1g.10gb+me


@dataclass
class Run:
    """Three collection cycles on one backend, and what that backend is known to contain."""

    backend: str
    collector: NvmlCollector
    readings: list[NvmlReading]
    gpus: int | None = None  # expected GPU count (None: whatever the real node has)
    mig_instances: int | None = None
    processes: bool = False  # at least one compute process is running somewhere

    @property
    def last(self) -> NvmlReading:
        return self.readings[-1]


# (scenario, GPUs, MIG instances, processes running)
SIMULATED = {"demo": (8, 0, True), "mig": (8, 10, True), "timeslice": (4, 0, True)}


def _simulated(name: str) -> Iterator[Run]:
    clock = SimClock(start=SIM_START, realtime=False)
    collector = NvmlCollector(SimulatedNVML(SimNode(load_scenario(name)), clock))
    clock.advance(1800)  # 30 minutes in: loads, traffic and counters are under way
    readings = []
    for _ in range(CYCLES):
        readings.append(collector.collect(clock.now()))
        clock.advance(10)
    gpus, migs, procs = SIMULATED[name]
    yield Run(f"simulated:{name}", collector, readings, gpus, migs, procs)
    collector.close()




def _real() -> Iterator[Run]:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA driver on this machine (pynvml.nvmlInit: {e}); runs on a GPU node")
    try:
        collector = NvmlCollector(pynvml)
        readings = []
        for i in range(CYCLES):
            if i:
                time.sleep(1.0)  # real hardware: GPM needs two samples apart in real time
            readings.append(collector.collect(time.time()))
        yield Run("pynvml", collector, readings)
        collector.close()
    finally:
        pynvml.nvmlShutdown()


@pytest.fixture(scope="module", params=[
    *(f"simulated:{name}" for name in SIMULATED),
    pytest.param("pynvml", marks=pytest.mark.gpu),
])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    if request.param == "pynvml":
        yield from _real()
    else:
        yield from _simulated(request.param.split(":", 1)[1])


def gpus(r: NvmlReading) -> list[DeviceSample]:
    return [d for d in r.devices if not d.is_mig]


def migs(r: NvmlReading) -> list[DeviceSample]:
    return [d for d in r.devices if d.is_mig]


def each_cycle(run: Run, check: Callable[[DeviceSample], None]) -> None:
    for n, reading in enumerate(run.readings, 1):
        for d in reading.devices:
            try:
                check(d)
            except AssertionError as e:
                raise AssertionError(f"{run.backend} cycle {n} GPU {d.gpu} {d.uuid}: {e}") from None


# --- identity ------------------------------------------------------------------------------------

def test_every_gpu_has_a_uuid_and_a_model(run: Run) -> None:
    full = gpus(run.last)
    assert full, "no GPU reported"
    if run.gpus is not None:
        assert len(full) == run.gpus
    assert sorted(d.gpu for d in full) == list(range(len(full)))
    for d in full:
        assert d.up, d.error
        assert d.uuid.startswith("GPU-"), d.uuid
        assert d.model.strip(), f"GPU {d.gpu} has no model name"
    assert len({d.uuid for d in full}) == len(full), "UUIDs are not unique"
    assert run.last.driver_version


def test_mig_instances_name_their_profile_instance_and_parent(run: Run) -> None:
    instances = migs(run.last)
    if run.mig_instances is not None:
        assert len(instances) == run.mig_instances
    parents = {d.uuid: d for d in gpus(run.last)}
    for m in instances:
        assert m.uuid.startswith("MIG-"), m.uuid
        assert MIG_PROFILE.match(m.mig_profile), m.mig_profile
        assert isinstance(m.gpu_instance, int)
        assert m.parent_uuid in parents, f"{m.uuid}: parent {m.parent_uuid!r} is not a GPU of this node"
        parent = parents[m.parent_uuid]
        assert parent.mig_enabled and parent.gpu == m.gpu
        assert m.model == parent.model
    for parent in (d for d in gpus(run.last) if d.mig_enabled):
        gis = [m.gpu_instance for m in instances if m.parent_uuid == parent.uuid]
        assert len(gis) == len(set(gis)), f"GPU {parent.gpu}: GPU instance ids repeat: {gis}"
    assert len({m.uuid for m in instances}) == len(instances)


# --- readings ------------------------------------------------------------------------------------

def test_memory_used_is_within_total(run: Run) -> None:
    def check(d: DeviceSample) -> None:
        assert d.memory_total_bytes is not None and d.memory_used_bytes is not None
        assert d.memory_total_bytes > d.memory_used_bytes >= 0
        if d.memory_reserved_bytes is not None:
            assert 0 <= d.memory_reserved_bytes < d.memory_total_bytes
    each_cycle(run, check)


def test_power_is_positive_and_within_the_limit(run: Run) -> None:
    def check(d: DeviceSample) -> None:
        if d.is_mig:
            assert d.power_watts is None  # power is per board, not per instance
            return
        assert d.power_watts is not None and d.power_limit_watts is not None
        # 1-second average against the enforced cap: a few percent of overshoot is real on hardware
        assert 0 < d.power_watts <= d.power_limit_watts * 1.05, (d.power_watts, d.power_limit_watts)
    each_cycle(run, check)


def test_sm_clock_is_at_most_its_maximum(run: Run) -> None:
    def check(d: DeviceSample) -> None:
        if d.is_mig:
            return
        assert d.sm_clock_hz is not None and d.sm_clock_max_hz is not None
        assert 0 < d.sm_clock_hz <= d.sm_clock_max_hz
    each_cycle(run, check)


def test_ratios_are_fractions_or_absent(run: Run) -> None:
    def check(d: DeviceSample) -> None:
        for f in RATIO_FIELDS:
            v = getattr(d, f)
            assert v is None or 0.0 <= v <= 1.0, f"{f}={v}"
        if d.is_mig or d.mig_enabled:  # NVML has no utilization rates there: absent, not an error
            assert d.utilization is None
        else:
            assert d.utilization is not None
    each_cycle(run, check)
    assert not any(r.field_errors for r in run.readings), [r.field_errors for r in run.readings]


def test_counters_never_go_backwards(run: Run) -> None:
    first, last = ({d.uuid: d for d in gpus(r)} for r in (run.readings[0], run.last))
    for uuid, d in last.items():
        for f in ("energy_joules", "nvlink_tx_bytes", "nvlink_rx_bytes"):
            a, b = getattr(first[uuid], f), getattr(d, f)
            if a is not None and b is not None:
                assert b >= a, f"GPU {d.gpu} {f}: {a} then {b}"
    assert all(d.energy_joules for d in last.values()), "energy counter missing"


def test_gpm_metrics_appear_from_the_second_cycle_on_hopper(run: Run) -> None:
    for d in run.readings[0].devices:
        assert all(getattr(d, f) is None for f in GPM_FIELDS), "GPM needs two samples: none in cycle 1"
    for reading in run.readings[1:]:
        for d in reading.devices:
            if not GPM_MODELS.search(d.model):
                assert d.sm_active is None, f"{d.model} has no GPM"
                continue
            if d.mig_enabled:
                continue  # whole-GPU GPM on a MIG parent is optional
            for f in GPM_FIELDS:
                v = getattr(d, f)
                assert v is not None and 0.0 <= v <= 1.0, f"GPU {d.gpu} {d.mig_profile} {f}={v}"
            assert d.activity == d.sm_active


def test_processes_have_pids(run: Run) -> None:
    procs = [(d, p) for d in run.last.devices for p in d.processes]
    if run.processes:
        assert procs, "no compute process found"
    for d, p in procs:
        assert isinstance(p.pid, int) and p.pid > 0
        assert p.sm_util is None or 0.0 <= p.sm_util <= 1.0
        if p.used_memory_bytes is not None and d.memory_total_bytes is not None:
            assert 0 <= p.used_memory_bytes <= d.memory_total_bytes
        if d.is_mig and p.gpu_instance is not None:
            assert p.gpu_instance == d.gpu_instance


def test_every_nvml_call_is_timed_by_function(run: Run) -> None:
    calls = run.collector.calls
    n = len(gpus(run.last))
    for fn in ("nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID",
               "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPowerUsage"):
        assert fn in calls, f"{fn} not recorded: {sorted(calls)}"
    assert all(fn.startswith("nvml") for fn in calls), sorted(calls)
    # discovery happens once, readings every cycle
    assert calls["nvmlInit"].count == 1
    assert calls["nvmlDeviceGetCount"].count == 1
    assert calls["nvmlDeviceGetHandleByIndex"].count == n
    assert calls["nvmlDeviceGetPowerUsage"].count == CYCLES * n
    for fn, st in calls.items():
        assert st.count >= 1, fn
        assert 0.0 <= st.worst <= st.total, (fn, st)


# --- scripts/gpu-check, the hardware check built on the same collector ---------------------------

GPU_CHECK = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"


def gpu_check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, check=False)


def test_gpu_check_reports_every_device_call_and_cycle(tmp_path: Path) -> None:
    """A dry run on the simulator (this machine has no GPU): the report a GPU node's run will produce."""
    out = tmp_path / "report.json"
    result = gpu_check("--simulate", "mig", "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert len(report["devices"]) == 18  # 8 GPUs + 10 MIG instances
    assert [c["cycle"] for c in report["cycles"]] == [1, 2, 3] and all(c["error"] is None for c in report["cycles"])
    mem = report["latency"]["nvmlDeviceGetMemoryInfo"]
    assert mem["count"] == 3 * 18 and 0 < mem["median_us"] <= mem["max_us"]
    # MIG slots are enumerated once (static facts), not every cycle: GPU 0's 3 empty slots, GPU 1's one
    assert report["latency"]["nvmlDeviceGetMigDeviceHandleByIndex"]["errors"] == {"NVMLError_NotFound": 4}
    assert "NotFound" in report["probe"]["devices"]["0/slot4"]["handle"]  # GPU 0 has 4 instances
    assert report["probe"]["devices"]["2"]["power_usage_mw"]["value"] > 0
    for text in ("MIG-", "3g.40gb", "nvmlGpmMetricsGet", "cycle 3:"):
        assert text in result.stdout


@pytest.mark.skipif(has_nvidia_driver(), reason="this machine has an NVIDIA driver")
def test_gpu_check_without_a_driver_exits_1(tmp_path: Path) -> None:
    result = gpu_check(cwd=tmp_path)
    assert result.returncode == 1
    assert "no NVIDIA driver" in result.stderr and "Traceback" not in result.stderr
