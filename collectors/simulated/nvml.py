"""A simulated NVML that speaks the `pynvml` API.

`SimulatedNVML` is used exactly where the `pynvml` module is: same function names, same return
structs (real `pynvml` ctypes structs where the caller fills or reads them), and the real
`pynvml.NVMLError_*` exceptions built with `pynvml.NVMLError(code)`, so `except
pynvml.NVMLError_NotSupported` behaves identically. Constants and struct types not defined here
come from the real `pynvml`; an NVML function that is not simulated raises `FunctionNotFound`,
as an old driver would. It reproduces the behaviour real GPUs show: no utilization rates on
MIG-enabled GPUs or MIG devices, GPM only on Hopper and newer, `NotFound` from process
utilization when there are no samples, `GpuIsLost` from the moment of a "lost" fault, Xid events.
"""

from __future__ import annotations

import ctypes
import threading
from types import SimpleNamespace
from typing import Any

import pynvml

from collectors.simulated.clock import SimClock as Clock
from collectors.simulated.node import SimNode

_NO_INSTANCE = 0xFFFFFFFF


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


# Fake device addresses: high enough to look like heap pointers, one 256-byte slot per device.
_HANDLE_BASE = 0x7E5100000000


class _Handle(ctypes.c_void_p):
    """A device handle that is a ctypes pointer value, as real `pynvml` handles are.

    Code that keys handles by address (`ctypes.cast(h, ctypes.c_void_p).value`) works unchanged
    on the simulator: each device has its own stable, nonzero address. Nothing dereferences it.
    """

    __slots__ = ("gpu", "mig")

    def __init__(self, gpu: int, mig: int | None):
        super().__init__(_HANDLE_BASE + (gpu << 8) + (0 if mig is None else mig + 1))
        self.gpu, self.mig = gpu, mig

    def __repr__(self) -> str:
        return f"<simulated nvmlDevice {self.gpu}{'' if self.mig is None else f'/mig{self.mig}'}>"


class _EventSet:
    def __init__(self, since: float):
        self.gpus: set[int] = set()
        self.since = since
        self.pending: list[tuple[int, int]] = []


class SimulatedNVML:
    """One simulated driver instance (a module-like object) over a SimNode and a clock."""

    def __init__(self, node: SimNode, clock: Clock):
        self._node = node
        self._clock = clock
        self._init = 0
        self._lock = threading.Lock()
        self._samples: dict[int, tuple[Any, tuple[int, int | None, float] | None]] = {}
        self._integrals: dict[tuple[str, int], tuple[float, float]] = {}
        self._handles = {g.index: _Handle(g.index, None) for g in node.sc.gpus}
        self._mig_handles = {
            (gi, m.index): _Handle(gi, m.index) for gi, ms in node.migs.items() for m in ms
        }
        self.calls = 0  # every simulated NVML call, so tests can prove scrapes make none

    # --- module emulation -----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        attr = getattr(pynvml, name)
        if callable(attr) and name.startswith("nvml") and not isinstance(attr, type):
            def missing(*_a: Any, **_k: Any) -> Any:
                raise _err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            return missing
        return attr

    @property
    def scenario_time(self) -> float:
        return self._clock.scenario_time()

    def _t(self) -> float:
        self.calls += 1
        if not self._init:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
        t = self.scenario_time
        if self._node.fault("source_down", t, source="nvml"):
            # the driver stopped answering (unloaded or reset): every call fails, for every GPU
            raise _err(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        return t

    def _dev(self, h: Any, field: str = "") -> tuple[float, int, int | None]:
        t = self._t()
        if not isinstance(h, _Handle):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self._node.fault("gpu_lost", t, gpu=h.gpu):
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        if field and self._node.fault("not_supported", t, gpu=h.gpu, field=field):
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return t, h.gpu, h.mig

    def _mig_enabled(self, gpu: int) -> bool:
        return gpu in self._node.migs

    # --- init / system --------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.calls += 1
        if self._node.fault("nvml_init_failure", self.scenario_time):
            raise _err(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self._node.fault("source_down", self.scenario_time, source="nvml"):
            raise _err(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        self._init += 1

    nvmlInitWithFlags = lambda self, flags=0: self.nvmlInit()

    def nvmlShutdown(self) -> None:
        self._t()
        self._init -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._t()
        return self._node.sc.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._t()
        return self._node.sc.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        t = self._t()
        slow = self._node.fault("slow", t, source="nvml")
        if slow is not None and self._clock.realtime:
            import time

            time.sleep(slow.delay)
        return len(self._node.sc.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        t = self._t()
        if index not in self._handles:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self._node.fault("gpu_lost", t, gpu=index):
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        return self._handles[index]

    # --- identity -------------------------------------------------------------------------
    def nvmlDeviceGetUUID(self, h: _Handle) -> str:
        _, g, m = self._dev(h)
        return self._node.migs[g][m].uuid if m is not None else self._node.sc.gpus[g].uuid

    def nvmlDeviceGetName(self, h: _Handle) -> str:
        _, g, m = self._dev(h)
        name = self._node.sc.model.nvml_name
        return f"{name} MIG {self._node.migs[g][m].profile.name}" if m is not None else name

    def nvmlDeviceGetIndex(self, h: _Handle) -> int:
        _, g, _ = self._dev(h)
        return g

    def nvmlDeviceGetMinorNumber(self, h: _Handle) -> int:
        """/dev/nvidia<minor>: the scenario's pin, else the index. A MIG device has no device node of
        its own (it is reached through its parent's and /dev/nvidia-caps), so NVML does not answer."""
        _, g, m = self._dev(h)
        if m is not None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        minor = self._node.sc.gpus[g].minor
        return g if minor is None else minor

    def nvmlDeviceGetArchitecture(self, h: _Handle) -> int:
        self._dev(h)
        arch = self._node.sc.model.architecture
        return {"ampere": pynvml.NVML_DEVICE_ARCH_AMPERE, "ada": pynvml.NVML_DEVICE_ARCH_ADA,
                "hopper": pynvml.NVML_DEVICE_ARCH_HOPPER}.get(arch, pynvml.NVML_DEVICE_ARCH_UNKNOWN)

    def nvmlDeviceGetCudaComputeCapability(self, h: _Handle) -> tuple[int, int]:
        self._dev(h)
        return self._node.sc.model.compute_capability

    def nvmlDeviceGetPciInfo(self, h: _Handle) -> Any:
        _, g, _ = self._dev(h)
        bus = f"00000000:{0x18 + g * 0x10:02X}:00.0"
        return SimpleNamespace(busId=bus, busIdLegacy=bus[4:], domain=0, bus=0x18 + g * 0x10, device=0,
                               pciDeviceId=0x233010DE, pciSubSystemId=0x16C110DE)

    # --- MIG ------------------------------------------------------------------------------
    def nvmlDeviceGetMigMode(self, h: _Handle) -> list[int]:
        t, g, m = self._dev(h)
        slow = self._node.fault("slow", t, source="nvml")
        if slow is not None and self._clock.realtime and g == 0 and m is None:
            import time

            time.sleep(slow.delay)  # once per cycle: the collector asks every GPU's MIG mode each cycle
        if m is not None or not self._node.sc.model.mig_profiles:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = 1 if self._mig_enabled(g) else 0
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: _Handle) -> int:
        _, _g, m = self._dev(h)
        if m is not None or not self._node.sc.model.mig_profiles:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: _Handle, index: int) -> _Handle:
        _, g, m = self._dev(h)
        if m is not None or not self._mig_enabled(g):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT if m is not None else pynvml.NVML_ERROR_NOT_FOUND)
        if index >= 7:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if index >= len(self._node.migs[g]):
            raise _err(pynvml.NVML_ERROR_NOT_FOUND)
        return self._mig_handles[(g, index)]

    def nvmlDeviceIsMigDeviceHandle(self, h: _Handle) -> int:
        self._t()
        return int(h.mig is not None)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: _Handle) -> _Handle:
        _, g, m = self._dev(h)
        if m is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._handles[g]

    def nvmlDeviceGetGpuInstanceId(self, h: _Handle) -> int:
        _, g, m = self._dev(h)
        if m is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._node.migs[g][m].gi

    def nvmlDeviceGetComputeInstanceId(self, h: _Handle) -> int:
        _, g, m = self._dev(h)
        if m is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._node.migs[g][m].ci

    def nvmlDeviceGetAttributes(self, h: _Handle) -> Any:
        _, g, m = self._dev(h)
        model = self._node.sc.model
        if m is None:
            return SimpleNamespace(multiprocessorCount=model.sm_count, gpuInstanceSliceCount=7 if model.mig_profiles else 0,
                                   computeInstanceSliceCount=7 if model.mig_profiles else 0,
                                   memorySizeMB=model.memory_mib, sharedCopyEngineCount=0, sharedDecoderCount=0,
                                   sharedEncoderCount=0, sharedJpegCount=0, sharedOfaCount=0)
        p = self._node.migs[g][m].profile
        return SimpleNamespace(multiprocessorCount=p.sm_count, gpuInstanceSliceCount=p.compute_slices,
                               computeInstanceSliceCount=p.compute_slices, memorySizeMB=p.memory_mib,
                               sharedCopyEngineCount=p.compute_slices, sharedDecoderCount=0, sharedEncoderCount=0,
                               sharedJpegCount=0, sharedOfaCount=0)

    # --- memory, utilization, power, clocks ------------------------------------------------
    def nvmlDeviceGetMemoryInfo(self, h: _Handle, version: int | None = None) -> Any:
        t, g, m = self._dev(h)
        total = self._node.memory_total(g, m)
        used = self._node.memory_used(g, m, t)
        reserved = 0 if m is not None else self._node.sc.model.reserved_mib * 1024 * 1024
        if version:
            if self._node.fault("not_supported", t, gpu=g, field="memory_v2"):
                raise _err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            mem = pynvml.c_nvmlMemory_v2_t()
            mem.version, mem.total, mem.reserved = version, total, reserved
            mem.used = used
            mem.free = max(0, total - reserved - used)
            return mem
        mem1 = pynvml.c_nvmlMemory_t()
        mem1.total, mem1.used = total, min(total, used + reserved)
        mem1.free = max(0, total - mem1.used)
        return mem1

    def nvmlDeviceGetUtilizationRates(self, h: _Handle) -> Any:
        t, g, m = self._dev(h, "utilization")
        if m is not None or self._mig_enabled(g):
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        u = pynvml.c_nvmlUtilization_t()
        util = self._node.device_util(g, None, t)
        u.gpu = round(util * 100)
        u.memory = round(util * 55)
        return u

    def _full_only(self, h: _Handle, field: str) -> tuple[float, int]:
        t, g, m = self._dev(h, field)
        if m is not None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return t, g

    def _power_w(self, g: int, t: float) -> float:
        model = self._node.sc.model
        util = self._node.device_util(g, None, t) if not self._mig_enabled(g) else self._node.sm_active(g, None, t)
        return model.idle_power_w + (model.power_limit_w * 0.92 - model.idle_power_w) * util

    def nvmlDeviceGetPowerUsage(self, h: _Handle) -> int:
        t, g = self._full_only(h, "power")
        return int(self._power_w(g, t) * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: _Handle) -> int:
        _, _ = self._full_only(h, "power_limit")
        return int(self._node.sc.model.power_limit_w * 1000)

    nvmlDeviceGetPowerManagementLimit = nvmlDeviceGetEnforcedPowerLimit

    def _integral(self, key: str, g: int, t: float, rate: Any) -> float:
        """∫ rate dt from scenario start, advanced monotonically in ≤60 s trapezoids."""
        with self._lock:
            t0, acc = self._integrals.get((key, g), (0.0, 0.0))
            if t > t0:
                cur = t0
                while cur < t:
                    nxt = min(t, cur + 60.0)
                    acc += (rate(cur) + rate(nxt)) / 2 * (nxt - cur)
                    cur = nxt
                self._integrals[(key, g)] = (t, acc)
            return acc

    def nvmlDeviceGetTotalEnergyConsumption(self, h: _Handle) -> int:
        t, g = self._full_only(h, "energy")
        # the counter starts at driver load: a node that has been up ~3 days at scenario start
        base = 3 * 86400 * self._node.sc.model.idle_power_w
        return int((base + self._integral("energy", g, t, lambda x: self._power_w(g, x))) * 1000)

    def nvmlDeviceGetClockInfo(self, h: _Handle, clock_type: int) -> int:
        t, g = self._full_only(h, "clocks")
        model = self._node.sc.model
        util = self._node.device_util(g, None, t) if not self._mig_enabled(g) else self._node.sm_active(g, None, t)
        if util <= 0:
            return model.idle_sm_clock_mhz
        return int(model.max_sm_clock_mhz * (0.93 - 0.06 * util))

    def nvmlDeviceGetMaxClockInfo(self, h: _Handle, clock_type: int) -> int:
        _, _ = self._full_only(h, "clocks")
        return self._node.sc.model.max_sm_clock_mhz

    def nvmlDeviceGetTemperature(self, h: _Handle, sensor: int) -> int:
        t, g = self._full_only(h, "temperature")
        util = self._node.device_util(g, None, t) if not self._mig_enabled(g) else self._node.sm_active(g, None, t)
        return int(31 + 42 * util)

    def nvmlDeviceGetPcieThroughput(self, h: _Handle, counter: int) -> int:
        t, g = self._full_only(h, "pcie")
        util = self._node.device_util(g, None, t) if not self._mig_enabled(g) else self._node.sm_active(g, None, t)
        gen_kbps = {4: 25_000_000, 5: 50_000_000}.get(self._node.sc.model.pcie_gen, 25_000_000)
        frac = 0.04 if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else 0.08
        return int(gen_kbps * frac * util + 1200)

    def nvmlDeviceGetFieldValues(self, h: _Handle, field_ids: list[int]) -> Any:
        t, g, m = self._dev(h)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        model = self._node.sc.model
        nvlink_off = model.nvlinks == 0 or m is not None or self._node.fault("not_supported", t, gpu=g, field="nvlink")
        for i, fid in enumerate(field_ids):
            v = values[i]
            v.fieldId = fid
            v.timestamp = int((self._clock.start + t) * 1e6)
            v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            if fid in (138, 139, 140, 141) and not nvlink_off:
                per_s = 450_000_000 * (1.0 if fid in (138, 139) else 1.08)  # KiB/s at full NVLink4 load
                kib = self._integral(f"nvlink{fid}", g, t, lambda x, k=per_s: k * 0.3 * self._node.sm_active(g, None, x))
                v.nvmlReturn = pynvml.NVML_SUCCESS
                v.value.ullVal = int(kib)
            else:
                v.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    # --- processes ------------------------------------------------------------------------
    def nvmlDeviceGetComputeRunningProcesses(self, h: _Handle) -> list[Any]:
        t, g, m = self._dev(h, "processes")
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=mem, gpuInstanceId=_NO_INSTANCE if gi is None else gi,
                            computeInstanceId=_NO_INSTANCE if ci is None else ci)
            for pid, mem, gi, ci in self._node.processes(g, m, t)
        ]

    nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses

    def nvmlDeviceGetProcessUtilization(self, h: _Handle, last_seen_us: int) -> list[Any]:
        t, g, m = self._dev(h, "process_utilization")
        if m is not None or self._mig_enabled(g):
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        now_us = int((self._clock.start + t) * 1e6)
        samples = []
        if now_us > last_seen_us:
            for pid, sm in self._node.process_sm_util(g, t):
                s = pynvml.c_nvmlProcessUtilizationSample_t()
                s.pid, s.timeStamp, s.smUtil, s.memUtil = pid, now_us, round(sm * 100), round(sm * 60)
                samples.append(s)
        if not samples:
            raise _err(pynvml.NVML_ERROR_NOT_FOUND)
        return samples

    # --- GPM ------------------------------------------------------------------------------
    def nvmlGpmQueryDeviceSupport(self, h: _Handle) -> Any:
        t, g, m = self._dev(h)
        s = pynvml.c_nvmlGpmSupport_t()
        s.version = pynvml.NVML_GPM_SUPPORT_VERSION
        gpm = self._node.sc.model.gpm and m is None and not self._node.fault("not_supported", t, gpu=g, field="gpm")
        s.isSupportedDevice = 1 if gpm else 0
        return s

    def nvmlGpmSampleAlloc(self) -> Any:
        self._t()
        struct = pynvml.struct_c_nvmlGpmSample_t()
        ptr = ctypes.pointer(struct)
        self._samples[ctypes.addressof(struct)] = (struct, None)
        return ptr

    def _gpm_check(self, g: int, t: float) -> None:
        if not self._node.sc.model.gpm or self._node.fault("not_supported", t, gpu=g, field="gpm"):
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def _sample_key(self, sample: Any) -> int:
        try:
            key = ctypes.addressof(sample.contents)
        except (ValueError, AttributeError):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT) from None
        if key not in self._samples:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return key

    def nvmlGpmSampleGet(self, h: _Handle, sample: Any) -> Any:
        t, g, m = self._dev(h)
        if m is not None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._gpm_check(g, t)
        key = self._sample_key(sample)
        self._samples[key] = (self._samples[key][0], (g, None, t))
        return sample

    def nvmlGpmMigSampleGet(self, h: _Handle, gpu_instance_id: int, sample: Any) -> Any:
        t, g, m = self._dev(h)
        self._gpm_check(g, t)
        mig = next((x for x in self._node.migs.get(g, ()) if x.gi == gpu_instance_id), None)
        if m is not None or mig is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        key = self._sample_key(sample)
        self._samples[key] = (self._samples[key][0], (g, mig.index, t))
        return sample

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        self._t()
        self._samples.pop(self._sample_key(sample), None)

    def nvmlGpmMetricsGet(self, mg: Any) -> Any:
        self._t()
        s1 = self._samples[self._sample_key(mg.sample1)][1]
        s2 = self._samples[self._sample_key(mg.sample2)][1]
        if s1 is None or s2 is None or s1[:2] != s2[:2] or s2[2] <= s1[2]:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        g, mi, t1, t2 = s1[0], s1[1], s1[2], s2[2]
        if self._node.fault("gpu_lost", t2, gpu=g):
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        pts = [t1 + (t2 - t1) * k / 4 for k in range(5)]
        n = self._node
        # Each signal is a mean over five points of the interval; every point's SM activity is
        # computed once and the other signals derived from it (five metrics used to ask 25 times).
        sm = [n.sm_active(g, mi, x) for x in pts]
        parent_of_migs = mi is None and g in n.migs

        def graphics() -> list[float]:
            return sm if parent_of_migs else [n.device_util(g, mi, x) for x in pts]

        signals = {
            pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: graphics,
            pynvml.NVML_GPM_METRIC_SM_UTIL: lambda: sm,
            pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: lambda: [v * 0.55 for v in sm],
            pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: lambda: [v * n.efficiency(g, mi, x)[1] for v, x in zip(sm, pts)],
            pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: lambda: [v * 0.7 for v in sm],
        }
        for i in range(mg.numMetrics):
            metric = mg.metrics[i]
            f = signals.get(metric.metricId)
            if f is None:
                metric.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            metric.nvmlReturn = pynvml.NVML_SUCCESS
            values = f()
            metric.value = min(100.0, sum(values) / len(values) * 100.0)
        return mg

    # --- events (Xid) ---------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> _EventSet:
        return _EventSet(self._t())

    def nvmlDeviceGetSupportedEventTypes(self, h: _Handle) -> int:
        self._dev(h)
        return pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeSingleBitEccError

    def nvmlDeviceRegisterEvents(self, h: _Handle, event_types: int, es: _EventSet) -> None:
        _, g, m = self._dev(h, "events")
        if m is not None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        es.gpus.add(g)

    def nvmlEventSetWait_v2(self, es: _EventSet, timeout_ms: int) -> Any:
        t = self._t()
        if t > es.since:
            for g in sorted(es.gpus):
                es.pending.extend((g, x) for x in self._node.xid_events(g, es.since, t))
            es.since = t
        if not es.pending:
            raise _err(pynvml.NVML_ERROR_TIMEOUT)
        g, xid = es.pending.pop(0)
        return SimpleNamespace(device=self._handles[g], eventType=pynvml.nvmlEventTypeXidCriticalError,
                               eventData=xid, gpuInstanceId=_NO_INSTANCE, computeInstanceId=_NO_INSTANCE)

    nvmlEventSetWait = nvmlEventSetWait_v2

    def nvmlEventSetFree(self, es: _EventSet) -> None:
        self._t()
        es.gpus.clear()
