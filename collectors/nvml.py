"""The NVML source: every GPU and MIG instance of the node, through an injected `pynvml`-compatible module.

The same code runs on real `pynvml` and on `collectors.simulated.nvml.SimulatedNVML`. A field
that is `NotSupported` is simply absent (None); one lost GPU reports `up=False` while the others
keep reporting; a driver that cannot be loaded is `SourceUnavailable` (the loop retries with
backoff). GPM metrics need two samples, so they appear from the second cycle on.

Cheap by construction (an agent on every GPU node is overhead on the most expensive machines
there are): facts that do not change while the driver is loaded (name, UUID, PCI bus, minor
number, power limit, max clock, SM count, MIG slots with their instance IDs and profiles) are
read once per device and again only after a re-init, a GPU coming back, a MIG mode change, a
failing MIG handle, or every `REDISCOVER_CYCLES` cycles (a MIG reconfiguration shows as new
UUIDs then); power, energy and NVLink counters come in one `nvmlDeviceGetFieldValues` call (a
field the driver does not offer that way falls back to its own call, remembered per GPU); GPM
samples are allocated once per unit and reused, so each unit costs one sample read and one
`nvmlGpmMetricsGet` per cycle. `calls` counts every NVML call by function (the bench reads it).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collectors.base import SourceError, SourceUnavailable

log = logging.getLogger("gpucap.collectors.nvml")

NO_INSTANCE = 0xFFFFFFFF
NVLINK_TX_KIB, NVLINK_RX_KIB = 138, 139  # NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX, KiB since driver load
FI_POWER_INSTANT, FI_TOTAL_ENERGY = 186, 83  # NVML_FI_DEV_POWER_INSTANT (mW), _TOTAL_ENERGY_CONSUMPTION (mJ)
FIELDS = (FI_POWER_INSTANT, FI_TOTAL_ENERGY, NVLINK_TX_KIB, NVLINK_RX_KIB)
GPM_METRICS = {
    "sm_active": "NVML_GPM_METRIC_SM_UTIL",
    "sm_occupancy": "NVML_GPM_METRIC_SM_OCCUPANCY",
    "tensor_active": "NVML_GPM_METRIC_ANY_TENSOR_UTIL",
    "dram_active": "NVML_GPM_METRIC_DRAM_BW_UTIL",
}
REDISCOVER_CYCLES = 30  # MIG slots re-enumerated at least this often (5 minutes at the default 10 s)
MAX_EVENTS_PER_CYCLE = 256


@dataclass(frozen=True, slots=True)
class ProcessSample:
    pid: int
    used_memory_bytes: int | None
    gpu_instance: int | None
    compute_instance: int | None
    sm_util: float | None  # 0–1, from per-process utilization samples (full GPUs only)


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One full GPU, a MIG-enabled parent, or one MIG instance (gpu_instance set)."""

    gpu: int
    uuid: str
    model: str
    up: bool = True
    error: str = ""
    gpu_instance: int | None = None
    compute_instance: int | None = None
    mig_profile: str = ""
    parent_uuid: str = ""
    mig_enabled: bool = False
    pci_bus_id: str = ""
    minor_number: int | None = None  # /dev/nvidia<minor>: what GKE's device plugin calls nvidia<N>
    sm_count: int | None = None
    compute_slices: int | None = None
    memory_slices: int | None = None
    utilization: float | None = None
    memory_utilization: float | None = None
    sm_active: float | None = None
    sm_occupancy: float | None = None
    tensor_active: float | None = None
    dram_active: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    temperature_celsius: float | None = None
    sm_clock_hz: float | None = None
    sm_clock_max_hz: float | None = None
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    nvlink_tx_bytes: float | None = None
    nvlink_rx_bytes: float | None = None
    processes: tuple[ProcessSample, ...] = ()
    xid_errors: tuple[tuple[int, int], ...] = ()  # (xid, count since the agent started)

    @property
    def is_mig(self) -> bool:
        return self.gpu_instance is not None

    @property
    def activity(self) -> float | None:
        """SM active (GPM) where available, else NVML utilization."""
        return self.sm_active if self.sm_active is not None else self.utilization


@dataclass(frozen=True, slots=True)
class NvmlReading:
    driver_version: str
    cuda_version: str
    devices: tuple[DeviceSample, ...]
    field_errors: tuple[tuple[str, int], ...] = ()  # (function, count) of unexpected errors this cycle

    def units(self) -> tuple[DeviceSample, ...]:
        """What can be allocated: full GPUs and MIG instances (not MIG-enabled parents)."""
        return tuple(d for d in self.devices if not d.mig_enabled)

    def skipped_items(self) -> tuple[tuple[str, int], ...]:
        """(reason, count) of what this cycle left out: NVML calls that failed unexpectedly."""
        return tuple((f"nvml_error:{fn}", n) for fn, n in self.field_errors)


@dataclass
class _CallStats:
    count: int = 0
    total: float = 0.0
    worst: float = 0.0


@dataclass
class _Mig:
    """Static facts of one MIG instance, read when the GPU's MIG slots are enumerated."""

    handle: Any
    uuid: str
    gi: int
    ci: int | None
    profile: str
    sm_count: int | None
    compute_slices: int | None


@dataclass
class _Gpu:
    index: int
    handle: Any = None
    uuid: str = ""
    model: str = ""
    pci: str = ""
    minor: int | None = None
    gpm: bool = False
    mig_enabled: bool = False
    proc_ts: int = 0
    failing: bool = False  # logged once per failure streak, not every cycle
    xids: Counter = field(default_factory=Counter)
    gpm_prev: dict[Any, Any] = field(default_factory=dict)  # (gi or None) -> the last sample read
    gpm_spare: dict[Any, Any] = field(default_factory=dict)  # (gi or None) -> a sample to read into next
    static: dict[str, Any] | None = None  # power limit, max clock, SM count, MIG slot count: read once
    migs: list[_Mig] | None = None  # None: enumerate the MIG slots this cycle
    migs_at: int = 0  # the cycle they were enumerated
    field_fallback: frozenset[int] = frozenset()  # field IDs this GPU does not offer through field values


class NvmlCollector:
    name = "nvml"

    def __init__(self, nvml: Any, *, clock: Callable[[], float] = time.perf_counter):
        self.nvml = nvml
        self.call_clock = clock  # times each call into `calls` (the bench sets time.thread_time: CPU inside NVML)
        self._ready = False
        self._gpus: dict[int, _Gpu] = {}
        self._events: Any = None
        self._driver = ""
        self._cuda = ""
        self.calls: dict[str, _CallStats] = {}
        self.cycles = 0
        self._errors: Counter = Counter()

    # --- plumbing -------------------------------------------------------------------------
    def _call(self, fn: str, *args: Any, **kw: Any) -> Any:
        t0 = self.call_clock()
        try:
            return getattr(self.nvml, fn)(*args, **kw)
        finally:
            dt = self.call_clock() - t0
            st = self.calls.get(fn)
            if st is None:
                st = self.calls[fn] = _CallStats()
            st.count += 1
            st.total += dt
            st.worst = max(st.worst, dt)

    def _opt(self, fn: str, *args: Any, **kw: Any) -> Any:
        """A field read: NotSupported/NotFound/FunctionNotFound/NoPermission → None; GpuIsLost and a
        driver that went away propagate (the GPU, or every GPU, is gone: not a missing field)."""
        n = self.nvml
        try:
            return self._call(fn, *args, **kw)
        except n.NVMLError as e:
            if isinstance(e, (n.NVMLError_GpuIsLost, *_driver_gone(n))):
                raise
            if not isinstance(e, (n.NVMLError_NotSupported, n.NVMLError_NotFound,
                                  n.NVMLError_FunctionNotFound, n.NVMLError_NoPermission)):
                self._errors[fn] += 1
            return None

    def _init(self) -> None:
        n = self.nvml
        try:
            self._call("nvmlInit")
        except n.NVMLError as e:
            missing = (n.NVMLError_LibraryNotFound, n.NVMLError_DriverNotLoaded)
            if isinstance(e, missing):
                raise SourceUnavailable(
                    "nvml", "no NVIDIA driver found (libnvidia-ml.so could not be loaded or the driver is not "
                    "running); on a machine without a GPU, try: gpucap snapshot --simulate demo", e,
                ) from None
            raise SourceUnavailable("nvml", f"nvmlInit failed: {e}", e) from None
        self._driver = _text(self._opt("nvmlSystemGetDriverVersion") or "")
        cuda = self._opt("nvmlSystemGetCudaDriverVersion")
        self._cuda = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else ""
        try:
            count = self._call("nvmlDeviceGetCount")
        except n.NVMLError as e:
            raise SourceError("nvml", f"nvmlDeviceGetCount failed: {e}", e) from None
        self._gpus = {i: _Gpu(i) for i in range(count)}
        try:
            self._events = self._call("nvmlEventSetCreate")
        except n.NVMLError:
            self._events = None
        for g in self._gpus.values():
            self._discover(g)
        self._ready = True
        log.info("nvml ready: driver %s, %d GPUs", self._driver or "?", count)

    def _discover(self, g: _Gpu) -> None:
        """Static facts of one GPU; a GPU lost at start is retried every cycle."""
        n = self.nvml
        try:
            h = self._call("nvmlDeviceGetHandleByIndex", g.index)
            g.uuid = _text(self._call("nvmlDeviceGetUUID", h))
            g.model = _text(self._call("nvmlDeviceGetName", h))
            pci = self._opt("nvmlDeviceGetPciInfo", h)
            g.pci = _text(getattr(pci, "busId", "")) if pci is not None else ""
            minor = self._opt("nvmlDeviceGetMinorNumber", h)
            g.minor = int(minor) if isinstance(minor, int) else None
            sup = self._opt("nvmlGpmQueryDeviceSupport", h)
            g.gpm = bool(sup is not None and sup.isSupportedDevice)
            self._free_gpm(g)
            g.static, g.migs, g.field_fallback = None, None, frozenset()
            g.handle = h
            if self._events is not None:
                try:
                    self._call("nvmlDeviceRegisterEvents", h, n.nvmlEventTypeXidCriticalError, self._events)
                except n.NVMLError as e:
                    if isinstance(e, n.NVMLError_GpuIsLost):
                        raise
        except n.NVMLError as e:
            g.handle = None
            if not g.failing:
                g.failing = True
                log.warning("nvml: GPU %d not usable: %s", g.index, e)

    def close(self) -> None:
        if self._ready:
            for g in self._gpus.values():
                self._free_gpm(g)
            try:
                if self._events is not None:
                    self._opt("nvmlEventSetFree", self._events)
                self._opt("nvmlShutdown")
            except self.nvml.NVMLError:
                pass  # the driver went away first
            self._ready = False

    # --- the cycle ------------------------------------------------------------------------
    def collect(self, now: float) -> NvmlReading:
        if not self._ready:
            self._init()
        self._errors.clear()
        self.cycles += 1
        self._drain_events()
        devices: list[DeviceSample] = []
        for g in self._gpus.values():
            if g.handle is None:
                self._discover(g)
            if g.handle is None:
                devices.append(DeviceSample(gpu=g.index, uuid=g.uuid, model=g.model, up=False, error="unavailable"))
                continue
            try:
                devices.extend(self._sample_gpu(g))
                if g.failing:
                    g.failing = False
                    log.info("nvml: GPU %d (%s) answers again", g.index, g.uuid)
            except self.nvml.NVMLError as e:
                if isinstance(e, _driver_gone(self.nvml)):
                    # the whole driver went away (unloaded, reset): no GPU is known, none is "lost"
                    self._ready = False
                    raise SourceUnavailable("nvml", f"the NVIDIA driver stopped answering: {e}", e) from None
                lost = isinstance(e, self.nvml.NVMLError_GpuIsLost)
                if not lost:
                    self._errors["device"] += 1
                if not g.failing:
                    g.failing = True
                    log.warning("nvml: GPU %d (%s) %s: %s", g.index, g.uuid, "is lost" if lost else "failed", e)
                devices.append(DeviceSample(gpu=g.index, uuid=g.uuid, model=g.model, pci_bus_id=g.pci,
                                            minor_number=g.minor, up=False,
                                            error="gpu_is_lost" if lost else "error",
                                            xid_errors=tuple(sorted(g.xids.items()))))
                self._free_gpm(g)
                g.migs = None  # enumerate again once it answers
        return NvmlReading(self._driver, self._cuda, tuple(devices), tuple(sorted(self._errors.items())))

    def _drain_events(self) -> None:
        n = self.nvml
        if self._events is None:
            return
        by_handle = {_handle_key(g.handle): g for g in self._gpus.values() if g.handle is not None}
        for _ in range(MAX_EVENTS_PER_CYCLE):
            try:
                ev = self._call("nvmlEventSetWait", self._events, 0)
            except n.NVMLError_Timeout:
                return
            except n.NVMLError as e:
                self._errors["nvmlEventSetWait"] += 1
                log.debug("nvml: event wait failed: %s", e)
                return
            if not ev.eventType & n.nvmlEventTypeXidCriticalError:
                continue
            # by handle, not UUID: after Xid 79 the GPU is off the bus and answers nothing
            g = by_handle.get(_handle_key(ev.device))
            if g is not None:
                g.xids[int(ev.eventData)] += 1
                log.warning("nvml: Xid %d on GPU %d (%s)", ev.eventData, g.index, g.uuid)

    def _static(self, g: _Gpu) -> dict[str, Any]:
        """What does not change while the driver is loaded: read on the first cycle after discovery."""
        if g.static is None:
            n, h = self.nvml, g.handle
            attrs = self._opt("nvmlDeviceGetAttributes", h)
            g.static = {
                "power_limit_watts": _scale(self._opt("nvmlDeviceGetEnforcedPowerLimit", h), 1e-3),
                "sm_clock_max_hz": _scale(self._opt("nvmlDeviceGetMaxClockInfo", h, n.NVML_CLOCK_SM), 1e6),
                "sm_count": getattr(attrs, "multiprocessorCount", None) if attrs is not None else None,
                "max_migs": None,  # read when MIG is first seen enabled
            }
        return g.static

    def _sample_gpu(self, g: _Gpu) -> list[DeviceSample]:
        n = self.nvml
        h = g.handle
        mode = self._opt("nvmlDeviceGetMigMode", h)
        mig_enabled = bool(mode and mode[0] == n.NVML_DEVICE_MIG_ENABLE)
        if mig_enabled != g.mig_enabled:
            g.migs = None
        g.mig_enabled = mig_enabled
        static = self._static(g)
        mem = self._memory(h)
        common: dict[str, Any] = {
            "gpu": g.index, "uuid": g.uuid, "model": g.model, "pci_bus_id": g.pci, "minor_number": g.minor,
            "mig_enabled": g.mig_enabled,
            "memory_used_bytes": mem[0], "memory_total_bytes": mem[1], "memory_reserved_bytes": mem[2],
            "xid_errors": tuple(sorted(g.xids.items())),
            "power_limit_watts": static["power_limit_watts"], "sm_clock_max_hz": static["sm_clock_max_hz"],
            "sm_count": static["sm_count"],
        }
        fields = self._fields(g)
        power = fields.get(FI_POWER_INSTANT)
        if FI_POWER_INSTANT in g.field_fallback:
            power = self._opt("nvmlDeviceGetPowerUsage", h)
        energy = fields.get(FI_TOTAL_ENERGY)
        if FI_TOTAL_ENERGY in g.field_fallback:
            energy = self._opt("nvmlDeviceGetTotalEnergyConsumption", h)
        clock = self._opt("nvmlDeviceGetClockInfo", h, n.NVML_CLOCK_SM)
        temp = self._opt("nvmlDeviceGetTemperature", h, n.NVML_TEMPERATURE_GPU)
        tx = self._opt("nvmlDeviceGetPcieThroughput", h, n.NVML_PCIE_UTIL_TX_BYTES)
        rx = self._opt("nvmlDeviceGetPcieThroughput", h, n.NVML_PCIE_UTIL_RX_BYTES)
        common.update(
            power_watts=_scale(power, 1e-3), energy_joules=_scale(energy, 1e-3),
            sm_clock_hz=_scale(clock, 1e6), temperature_celsius=_scale(temp, 1),
            pcie_tx_bytes_per_second=_scale(tx, 1024), pcie_rx_bytes_per_second=_scale(rx, 1024),
            nvlink_tx_bytes=_scale(fields.get(NVLINK_TX_KIB), 1024),
            nvlink_rx_bytes=_scale(fields.get(NVLINK_RX_KIB), 1024),
        )
        util = None if g.mig_enabled else self._opt("nvmlDeviceGetUtilizationRates", h)
        gpm = self._gpm(g, None)
        procs = self._processes(g, h, full=not g.mig_enabled)
        out = [DeviceSample(
            **common,
            utilization=util.gpu / 100.0 if util is not None else None,
            memory_utilization=util.memory / 100.0 if util is not None else None,
            processes=procs, **gpm,
        )]
        if g.mig_enabled:
            out.extend(self._sample_migs(g))
        return out

    def _memory(self, h: Any) -> tuple[int | None, int | None, int | None]:
        mem = self._opt("nvmlDeviceGetMemoryInfo", h, version=self.nvml.nvmlMemory_v2)
        if mem is not None:
            return int(mem.used), int(mem.total), int(mem.reserved)
        mem = self._opt("nvmlDeviceGetMemoryInfo", h)
        if mem is not None:
            return int(mem.used), int(mem.total), None
        return None, None, None

    def _fields(self, g: _Gpu) -> dict[int, int]:
        """Power, energy and NVLink counters in one call. A field the driver answers NotSupported
        for through field values (older drivers) is read by its own function from then on; the
        NVLink fields have no such function, so they are simply absent."""
        values = self._opt("nvmlDeviceGetFieldValues", g.handle, list(FIELDS))
        out: dict[int, int] = {}
        if values is None:
            g.field_fallback = frozenset((FI_POWER_INSTANT, FI_TOTAL_ENERGY))
            return out
        fallback = set(g.field_fallback)
        for fid, v in zip(FIELDS, values):
            if v.nvmlReturn == self.nvml.NVML_SUCCESS:
                out[fid] = _field_value(self.nvml, v)
                fallback.discard(fid)
            elif fid in (FI_POWER_INSTANT, FI_TOTAL_ENERGY):
                fallback.add(fid)
        g.field_fallback = frozenset(fallback)
        return out

    def _enumerate_migs(self, g: _Gpu) -> list[_Mig]:
        """Every MIG slot's handle and static facts; a freed or new instance shows as a changed UUID."""
        n = self.nvml
        static = self._static(g)
        if static["max_migs"] is None:
            static["max_migs"] = self._opt("nvmlDeviceGetMaxMigDeviceCount", g.handle) or 0
        migs = []
        for i in range(static["max_migs"]):
            try:
                mh = self._call("nvmlDeviceGetMigDeviceHandleByIndex", g.handle, i)
            except (n.NVMLError_NotFound, n.NVMLError_InvalidArgument):
                continue  # an empty slot
            name = _text(self._opt("nvmlDeviceGetName", mh) or "")
            attrs = self._opt("nvmlDeviceGetAttributes", mh)
            migs.append(_Mig(
                handle=mh, uuid=_text(self._call("nvmlDeviceGetUUID", mh)),
                gi=self._call("nvmlDeviceGetGpuInstanceId", mh), ci=self._opt("nvmlDeviceGetComputeInstanceId", mh),
                profile=mig_profile_from(name, attrs),
                sm_count=getattr(attrs, "multiprocessorCount", None) if attrs is not None else None,
                compute_slices=getattr(attrs, "gpuInstanceSliceCount", None) if attrs is not None else None,
            ))
        gone = {k for k in g.gpm_prev if k is not None} - {m.gi for m in migs}
        for gi in gone:  # a destroyed instance's samples are freed, not carried to a new one with its id
            self._free_gpm(g, gi)
        g.migs, g.migs_at = migs, self.cycles
        return migs

    def _sample_migs(self, g: _Gpu) -> list[DeviceSample]:
        n = self.nvml
        if g.migs is None or self.cycles - g.migs_at >= REDISCOVER_CYCLES:
            self._enumerate_migs(g)
        out = []
        for m in g.migs or ():
            try:
                mem = self._memory_strict(m.handle)
                gpm = self._gpm(g, m.gi)
                procs = self._processes(g, m.handle, full=False)
            except (n.NVMLError_NotFound, n.NVMLError_InvalidArgument):
                g.migs = None  # the instance went away under its handle: enumerate again next cycle
                continue
            out.append(DeviceSample(
                gpu=g.index, uuid=m.uuid, model=g.model, pci_bus_id=g.pci, minor_number=g.minor,
                gpu_instance=m.gi, compute_instance=m.ci, mig_profile=m.profile, parent_uuid=g.uuid,
                sm_count=m.sm_count, compute_slices=m.compute_slices,
                memory_used_bytes=mem[0], memory_total_bytes=mem[1], memory_reserved_bytes=mem[2],
                processes=procs, **gpm,
            ))
        return out

    def _memory_strict(self, h: Any) -> tuple[int | None, int | None, int | None]:
        """Memory of a cached MIG handle: NotFound/InvalidArgument propagate (the handle is stale)."""
        n = self.nvml
        try:
            mem = self._call("nvmlDeviceGetMemoryInfo", h, version=n.nvmlMemory_v2)
            return int(mem.used), int(mem.total), int(mem.reserved)
        except (n.NVMLError_NotFound, n.NVMLError_InvalidArgument, n.NVMLError_GpuIsLost):
            raise
        except n.NVMLError:
            return self._memory(h)

    def _free_gpm(self, g: _Gpu, gi: Any = ...) -> None:
        """Free the GPM samples of one unit (gi) or of the whole GPU (no gi)."""
        for pool in (g.gpm_prev, g.gpm_spare):
            keys = list(pool) if gi is ... else [gi] if gi in pool else []
            for k in keys:
                try:
                    self._call("nvmlGpmSampleFree", pool.pop(k))
                except self.nvml.NVMLError:
                    pass  # the driver is gone or the GPU lost: nothing left to free

    def _gpm(self, g: _Gpu, gi: int | None) -> dict[str, float | None]:
        """SM active/occupancy, tensor and DRAM activity between the previous cycle's sample and now.

        Two samples per unit, allocated once and swapped: one sample read and one metrics call a cycle."""
        n = self.nvml
        if not g.gpm:
            return {}
        sample = g.gpm_spare.pop(gi, None)
        if sample is None:
            sample = self._call("nvmlGpmSampleAlloc")
        try:
            if gi is None:
                self._call("nvmlGpmSampleGet", g.handle, sample)
            else:
                self._call("nvmlGpmMigSampleGet", g.handle, gi, sample)
        except n.NVMLError as e:
            g.gpm_spare[gi] = sample
            if isinstance(e, (n.NVMLError_GpuIsLost, *_driver_gone(n))):
                raise
            return {}
        prev = g.gpm_prev.get(gi)
        g.gpm_prev[gi] = sample
        if prev is None:
            return {}
        g.gpm_spare[gi] = prev  # read into next cycle
        mg = n.c_nvmlGpmMetricsGet_t()
        mg.version = n.NVML_GPM_METRICS_GET_VERSION
        mg.numMetrics = len(GPM_METRICS)
        mg.sample1, mg.sample2 = prev, sample
        for i, attr in enumerate(GPM_METRICS.values()):
            mg.metrics[i].metricId = getattr(n, attr)
        try:
            self._call("nvmlGpmMetricsGet", mg)
        except n.NVMLError as e:
            if isinstance(e, (n.NVMLError_GpuIsLost, *_driver_gone(n))):
                raise
            self._errors["nvmlGpmMetricsGet"] += 1
            return {}
        out: dict[str, float | None] = {}
        for i, key in enumerate(GPM_METRICS):
            m = mg.metrics[i]
            if m.nvmlReturn == n.NVML_SUCCESS:
                out[key] = max(0.0, min(1.0, float(m.value) / 100.0))
        return out

    def _processes(self, g: _Gpu, h: Any, *, full: bool) -> tuple[ProcessSample, ...]:
        procs = self._opt("nvmlDeviceGetComputeRunningProcesses", h) or []
        sm: dict[int, float] = {}
        sampled = False  # NotFound = no process ran a kernel (0); NotSupported = unknown (absent)
        if full:
            n = self.nvml
            try:
                samples = self._call("nvmlDeviceGetProcessUtilization", h, g.proc_ts)
                sampled = True
            except n.NVMLError as e:
                if isinstance(e, n.NVMLError_GpuIsLost):
                    raise
                samples = []
                sampled = isinstance(e, n.NVMLError_NotFound)
                if not isinstance(e, (n.NVMLError_NotFound, n.NVMLError_NotSupported, n.NVMLError_FunctionNotFound,
                                      n.NVMLError_NoPermission)):
                    self._errors["nvmlDeviceGetProcessUtilization"] += 1
            for s in samples:
                sm[int(s.pid)] = max(sm.get(int(s.pid), 0.0), s.smUtil / 100.0)
                g.proc_ts = max(g.proc_ts, int(s.timeStamp))
        out = []
        seen = set()
        for p in procs:
            pid = int(p.pid)
            seen.add(pid)
            gi = getattr(p, "gpuInstanceId", NO_INSTANCE)
            ci = getattr(p, "computeInstanceId", NO_INSTANCE)
            mem = getattr(p, "usedGpuMemory", None)
            out.append(ProcessSample(pid, int(mem) if mem is not None else None,
                                     None if gi in (None, NO_INSTANCE) else int(gi),
                                     None if ci in (None, NO_INSTANCE) else int(ci),
                                     sm.get(pid, 0.0 if sampled else None)))
        for pid, v in sm.items():
            if pid not in seen:
                out.append(ProcessSample(pid, None, None, None, v))
        return tuple(out)


def _driver_gone(n: Any) -> tuple[type, ...]:
    return (n.NVMLError_DriverNotLoaded, n.NVMLError_Uninitialized, n.NVMLError_LibraryNotFound)


def mig_profile_from(name: str, attrs: Any) -> str:
    """'NVIDIA A100-SXM4-40GB MIG 1g.5gb' → '1g.5gb'; else from the instance's slices and memory."""
    if " MIG " in name:
        return name.rsplit(" MIG ", 1)[1].strip()
    if attrs is not None and getattr(attrs, "gpuInstanceSliceCount", 0):
        gb = round(getattr(attrs, "memorySizeMB", 0) / 1024)
        return f"{attrs.gpuInstanceSliceCount}g.{gb}gb"
    return ""


def _handle_key(h: Any) -> Any:
    """Handles are ctypes pointers: equal by address, not by identity."""
    return ctypes.cast(h, ctypes.c_void_p).value


def _field_value(n: Any, v: Any) -> int:
    """A field value by its declared type (power is an unsigned int, energy and NVLink unsigned long long)."""
    t = v.valueType
    if t == n.NVML_VALUE_TYPE_UNSIGNED_INT:
        return int(v.value.uiVal)
    if t == n.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return int(v.value.ulVal)
    if t == n.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return int(v.value.sllVal)
    return int(v.value.ullVal)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _scale(v: Any, factor: float) -> float | None:
    return None if v is None else float(v) * factor
