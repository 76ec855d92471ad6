"""The simulated node at run time: who holds which device, and how busy everything is at time t.

Every simulated source (NVML, kubelet, metadata, inference endpoints) reads this one object, so
they agree. Values are pure functions of (scenario, seed, t) except inference queues, which are
integrated forward in time (monotonically) by the traffic models.
"""

from __future__ import annotations

import bisect
import math
import threading
import zlib
from dataclasses import dataclass
from typing import Any

from collectors.schema import InputError
from collectors.simulated.catalog import MigProfile
from collectors.simulated.scenario import ContainerSpec, LoadSpec, PodSpec, Scenario


@dataclass(frozen=True, slots=True)
class SimAllocation:
    pod: PodSpec
    container: ContainerSpec
    resource: str
    device_id: str  # as the device plugin reports it
    gpu: int
    mig_index: int | None  # index into the GPU's MIG instances
    replica: int | None
    pid: int


@dataclass(frozen=True, slots=True)
class SimMig:
    gpu: int
    index: int
    gi: int
    ci: int
    profile: MigProfile
    uuid: str


def _pinned_shares(sc: Scenario) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(pod index, container index) → its pinned (gpu, replica) shares, each checked and taken once."""
    shareable = {g.index for g in sc.gpus if g.mig is None} if sc.replicas > 1 else set()
    taken: set[tuple[int, int]] = set()
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for pi, pod in enumerate(sc.pods):
        for ci, c in enumerate(pod.containers):
            for k, (gpu, rep) in enumerate(c.shares):
                where = f"pods[{pi}].containers[{ci}].shares[{k}]"
                got = {"gpu": gpu, "replica": rep}
                if gpu not in shareable:
                    expected = (f"a time-sliced GPU of this node (index 0-{len(sc.gpus) - 1}, MIG disabled)"
                                if sc.replicas > 1 else "gpus.time_slicing.replicas > 1 (this node has no shares)")
                    raise InputError(sc.path, where, expected, got)
                if rep >= sc.replicas:
                    raise InputError(sc.path, where, f"a replica between 0 and {sc.replicas - 1}", got)
                if (gpu, rep) in taken:
                    raise InputError(sc.path, where, "a share no other container holds", got)
                taken.add((gpu, rep))
                out.setdefault((pi, ci), []).append((gpu, rep))
    return out


def _at(pod: PodSpec) -> str:
    return f" when it starts ({pod.start:g}s)" if pod.start else ""


def allocate(sc: Scenario) -> tuple[SimAllocation, ...]:
    """Pinned shares first, then first-fit like the device plugin; an impossible request is a scenario error.

    The scenario loader runs this to check a node is possible, so it also checks the MIG ids.
    """
    mig_layout(sc)
    pinned = _pinned_shares(sc)
    held = {share for shares in pinned.values() for share in shares}
    pinned_gpus = {g for g, _ in held}
    free_full = [g.index for g in sc.gpus if g.mig is None and g.index not in pinned_gpus]
    free_replicas = [(g.index, r) for r in range(sc.replicas) for g in sc.gpus
                     if g.mig is None and (g.index, r) not in held]
    free_replicas.sort()
    free_mig = [(g.index, j, m.profile) for g in sc.gpus if g.mig for j, m in enumerate(g.mig)]
    out = []
    # A pod that ends gives its devices back at once, each marked free from the pod's end: only a pod
    # that starts at or after that time may take it (a churning node), whatever their order in the
    # file. A scenario without lifetimes allocates exactly as before (first fit in device order).
    free_from: dict[tuple[str, Any], float] = {}

    def take(pool: str, items: list[Any], pod: PodSpec, n: int, match: Any = None) -> list[Any] | None:
        ready = [x for x in items if (match is None or match(x)) and free_from.get((pool, x), -math.inf) <= pod.start]
        # a device an ended pod gave back goes first (longest free first), never-used ones after:
        # the never-used stay for pods whose time overlaps everyone's (packing, as a scheduler would)
        ready.sort(key=lambda x: (0, free_from[(pool, x)]) if (pool, x) in free_from else (1, 0.0))
        free_now[0] = len(ready)
        if len(ready) < n:
            return None
        for x in ready[:n]:
            items.remove(x)
        return ready[:n]

    free_now = [0]  # what the last `take` found free at its pod's start (for the error message)

    def give_back(pool: str, items: list[Any], pod: PodSpec, token: Any) -> None:
        if pod.end is not None:
            items.append(token)
            free_from[(pool, token)] = pod.end

    for pi, pod in enumerate(sc.pods):
        for ci, c in enumerate(pod.containers):
            where = f"pods[{pi}].containers[{ci}]"
            pid = 1000 + zlib.crc32(f"{pod.uid}/{c.name}".encode()) % 4_000_000
            for gi, rep in pinned.get((pi, ci), ()):
                dev = f"{sc.gpus[gi].uuid}::{rep}"
                out.append(SimAllocation(pod, c, sc.shared_resource, dev, gi, None, rep, pid))
            if c.devices:
                for d in c.devices:
                    if d >= len(sc.gpus) or sc.gpus[d].mig is not None or \
                            take("full", free_full, pod, 1, lambda x, d=d: x == d) is None:
                        raise InputError(sc.path, f"{where}.devices", "free full GPUs of this node", d)
                    free_replicas = [fr for fr in free_replicas if fr[0] != d]
                    out.append(SimAllocation(pod, c, "nvidia.com/gpu", sc.gpus[d].uuid, d, None, None, pid))
            elif c.gpus:
                if sc.replicas > 1:
                    got = take("share", free_replicas, pod, c.gpus)
                    if got is None:
                        raise InputError(sc.path, f"{where}.gpus", f"at most {free_now[0]} free shares{_at(pod)}", c.gpus)
                    for gi, rep in got:
                        if gi in free_full:
                            free_full.remove(gi)  # a shared GPU is no longer free as a whole
                        dev = f"{sc.gpus[gi].uuid}::{rep}"
                        out.append(SimAllocation(pod, c, sc.shared_resource, dev, gi, None, rep, pid))
                        give_back("share", free_replicas, pod, (gi, rep))
                else:
                    got = take("full", free_full, pod, c.gpus)
                    if got is None:
                        raise InputError(sc.path, f"{where}.gpus", f"at most {free_now[0]} free GPUs{_at(pod)}", c.gpus)
                    for gi in got:
                        out.append(SimAllocation(pod, c, "nvidia.com/gpu", sc.gpus[gi].uuid, gi, None, None, pid))
                        give_back("full", free_full, pod, gi)
            for prof, n in c.mig:
                got = take("mig", free_mig, pod, n, lambda x, prof=prof: x[2] == prof)
                if got is None:
                    raise InputError(sc.path, f"{where}.mig.{prof}", f"a free {prof} MIG instance on this node{_at(pod)}", n)
                for slot in got:
                    gi, j, _ = slot
                    mig = sc.gpus[gi].mig[j]  # type: ignore[index]
                    out.append(SimAllocation(pod, c, f"nvidia.com/mig-{prof}", mig.uuid, gi, j, None, pid))
                    give_back("mig", free_mig, pod, slot)
    return tuple(out)


def mig_layout(sc: Scenario) -> dict[int, tuple[SimMig, ...]]:
    """MIG instances per GPU with their GPU-instance and compute-instance ids.

    Unpinned ids are NVML-like (small, not contiguous: gi 1, 3, 5, …; ci 0). A default that lands
    on an id pinned elsewhere on the same GPU is an error naming the pin: two instances of one
    GPU never share a GPU-instance id.
    """
    out: dict[int, tuple[SimMig, ...]] = {}
    for g in sc.gpus:
        if g.mig is None:
            continue
        migs = []
        for j, m in enumerate(g.mig):
            prof = sc.model.mig_profile(m.profile)
            gi = m.gi if m.gi is not None else 1 + 2 * j
            migs.append(SimMig(g.index, j, gi=gi, ci=m.ci if m.ci is not None else 0,
                               profile=prof, uuid=m.uuid))  # type: ignore[arg-type]
        for j, mig in enumerate(migs):
            clash = next((o for o in migs[:j] if o.gi == mig.gi), None)
            if clash is not None:
                pin = j if g.mig[j].gi is not None else clash.index
                raise InputError(sc.path, f"gpus.mig.{g.index}[{pin}].gi",
                                 "a GPU-instance id unique on this GPU (unpinned instances take 1, 3, 5, …)",
                                 mig.gi)
        out[g.index] = tuple(migs)
    return out


def _noise(seed: int, key: str, t: float, amplitude: float) -> float:
    if amplitude <= 0:
        return 0.0
    bucket = int(t // 10)
    h = zlib.crc32(f"{seed}/{key}/{bucket}".encode()) / 0xFFFFFFFF
    return (h * 2 - 1) * amplitude


def load_at(spec: LoadSpec, t: float, seed: int, key: str) -> float:
    """The load shape at time t (unclamped for request rates; callers clamp utilization)."""
    p = spec.pattern
    if p == "idle":
        v = 0.0
    elif p == "constant":
        v = spec.level
    elif p == "diurnal":
        phase = 2 * math.pi * ((t - spec.peak_at) / spec.period)
        v = spec.minimum + (spec.maximum - spec.minimum) * (0.5 + 0.5 * math.cos(phase))
    elif p == "bursty":
        v = spec.burst_level if (t % spec.burst_every) < spec.burst_duration else spec.level
    elif p == "ramp":
        frac = min(1.0, max(0.0, t / spec.ramp_duration))
        v = spec.start_level + (spec.end_level - spec.start_level) * frac
    else:  # trace: step function, repeating after the last point
        pts = spec.trace
        # the last row lasts as long as the step before it, then the trace repeats
        step = pts[-1][0] - pts[-2][0] if len(pts) > 1 else 60.0
        span = pts[-1][0] + (step if step > 0 else 60.0)
        tt = t % span if t >= span else t
        v = pts[0][1]
        for ts, val in pts:
            if ts <= tt:
                v = val
            else:
                break
    if spec.noise and p != "idle":
        v += _noise(seed, key, t, spec.noise)
    return max(0.0, v)


class SimNode:
    """Scenario + time → device activity, memory, processes, traffic."""

    def __init__(self, sc: Scenario):
        from collectors.simulated.inference import TrafficModel
        from collectors.simulated.traffic import WARMUP_S

        self.sc = sc
        self.allocations = allocate(sc)
        self.migs = mig_layout(sc)
        self._lock = threading.Lock()
        self._traffic: dict[str, TrafficModel] = {}
        for p in sc.pods:
            if p.inference is not None:
                inf = p.inference
                self._traffic[p.uid] = TrafficModel(
                    server=inf.server, model=inf.model, capacity_rps=inf.capacity_rps,
                    mean_prompt_tokens=inf.prompt_tokens, mean_generated_tokens=inf.generated_tokens,
                    max_running=inf.max_running, seed=sc.seed + zlib.crc32(p.uid.encode()) % 1000,
                    warmup_s=WARMUP_S,  # the first screen shows the scenario's story (traffic.py)
                )
        self._traffic_t = 0.0
        for p in sc.pods:  # warm start at t=0 (traffic.py): the first render is already the steady state
            tm0 = self._traffic.get(p.uid)
            if tm0 is not None and p.inference is not None and p.alive(0.0):
                tm0.advance(0.0, load_at(p.inference.traffic, 0.0, sc.seed, p.uid))
        # Who holds what changes only when a pod starts or ends: index it per epoch (the span between
        # two such times), not per t, so GPM's intermediate points and a week of steps reuse it.
        self._changes = sorted({p.start for p in sc.pods} | {p.end for p in sc.pods if p.end is not None})
        self._by_epoch: dict[int, tuple[list[SimAllocation], dict[tuple[int, int | None], list[SimAllocation]]]] = {}

    def epoch(self, t: float) -> int:
        """Which span between pod starts/ends t falls in: the pod set is the same for equal epochs."""
        return bisect.bisect_right(self._changes, t)

    def pod_changes(self) -> tuple[float, ...]:
        """Scenario times at which some pod starts or ends (the kubelet's and the API's answers change)."""
        return tuple(self._changes)

    def _epoch_index(self, t: float) -> tuple[list[SimAllocation], dict[tuple[int, int | None], list[SimAllocation]]]:
        e = self.epoch(t)
        cached = self._by_epoch.get(e)
        if cached is None:
            live = [a for a in self.allocations if a.pod.alive(t)]
            index: dict[tuple[int, int | None], dict[tuple[str, str], SimAllocation]] = {}
            for a in live:
                index.setdefault((a.gpu, a.mig_index), {}).setdefault((a.pod.uid, a.container.name), a)
            if len(self._by_epoch) >= 16:  # bounded: a scenario with many pod changes keeps only recent spans
                self._by_epoch.clear()
            cached = self._by_epoch[e] = (live, {k: list(v.values()) for k, v in index.items()})
        return cached

    # --- time-dependent state -------------------------------------------------------------
    def advance(self, t: float) -> None:
        """Integrate inference queues forward to t (never backwards)."""
        with self._lock:
            if t <= self._traffic_t:
                return
            for p in self.sc.pods:
                tm = self._traffic.get(p.uid)
                if tm is None:
                    continue
                # integrate in chunks so diurnal traffic changes along the way
                cur = self._traffic_t
                while cur < t:
                    nxt = min(t, cur + 60.0)
                    rate = load_at(p.inference.traffic, nxt, self.sc.seed, p.uid) if p.alive(nxt) else 0.0  # type: ignore[union-attr]
                    tm.advance(nxt, rate)
                    cur = nxt
            self._traffic_t = t

    def traffic(self, pod_uid: str):  # -> TrafficModel | None
        return self._traffic.get(pod_uid)

    def live_allocations(self, t: float) -> list[SimAllocation]:
        return list(self._epoch_index(t)[0])

    def container_load(self, a: SimAllocation, t: float) -> float:
        """Utilization (0–1) the container drives on one of its devices."""
        if not a.pod.alive(t):
            return 0.0
        tm = self._traffic.get(a.pod.uid)
        if tm is not None:
            self.advance(t)
            return min(1.0, max(0.0, tm.utilization))
        return min(1.0, load_at(a.container.load, t, self.sc.seed, f"{a.pod.uid}/{a.container.name}"))

    def holders(self, gpu: int, mig_index: int | None, t: float) -> list[SimAllocation]:
        """One entry per container on the device: a container holding several shares of one GPU
        runs one process there, not one per share. Indexed once per epoch (it is asked often)."""
        return self._epoch_index(t)[1].get((gpu, mig_index), [])

    def device_util(self, gpu: int, mig_index: int | None, t: float) -> float:
        """NVML-style utilization: time a kernel ran. Shares add up (time-slicing), capped at 1."""
        total = sum(self.container_load(a, t) for a in self.holders(gpu, mig_index, t))
        for hp in self.sc.host_processes:
            if hp.gpu == gpu and mig_index is None:
                total += load_at(hp.load, t, self.sc.seed, f"host/{hp.pid}")
        return min(1.0, total)

    def efficiency(self, gpu: int, mig_index: int | None, t: float) -> tuple[float, float]:
        """(SM efficiency, tensor ratio) of the device's first holder: SM active = util × the first."""
        hs = self.holders(gpu, mig_index, t)
        if not hs:
            return 0.85, 0.5
        return hs[0].container.load.sm_efficiency, hs[0].container.load.tensor_ratio

    def sm_active(self, gpu: int, mig_index: int | None, t: float) -> float:
        if mig_index is None and gpu in self.migs:
            # parent of MIG instances: SM activity is the slice-weighted sum of its instances
            return sum(self.sm_active(gpu, m.index, t) * m.profile.compute_slices / 7 for m in self.migs[gpu])
        eff, _ = self.efficiency(gpu, mig_index, t)
        return self.device_util(gpu, mig_index, t) * eff

    def tensor_active(self, gpu: int, mig_index: int | None, t: float) -> float:
        _, ratio = self.efficiency(gpu, mig_index, t)
        return self.sm_active(gpu, mig_index, t) * ratio

    def memory_used(self, gpu: int, mig_index: int | None, t: float) -> int:
        cap = self.memory_total(gpu, mig_index)
        used = 0
        for a in self.holders(gpu, mig_index, t):
            if a.container.memory_bytes is not None:
                used += a.container.memory_bytes
            elif a.pod.inference is not None:
                used += int(cap * 0.9 / max(1, self.sc.replicas))  # vLLM-style preallocation
            else:
                used += int(cap * 0.1 + cap * 0.6 * self.container_load(a, t))
        for hp in self.sc.host_processes:
            if hp.gpu == gpu and mig_index is None:
                used += hp.memory_bytes
        if mig_index is None and gpu in self.migs:
            used = sum(self.memory_used(gpu, m.index, t) for m in self.migs[gpu])
        return min(cap, used)

    def memory_total(self, gpu: int, mig_index: int | None) -> int:
        if mig_index is not None:
            return self.migs[gpu][mig_index].profile.memory_mib * 1024 * 1024
        return self.sc.model.memory_bytes

    def processes(self, gpu: int, mig_index: int | None, t: float) -> list[tuple[int, int, int | None, int | None]]:
        """(pid, used memory bytes, gi, ci) of compute processes; the parent lists its instances' too."""
        out = []
        targets = [mig_index]
        if mig_index is None and gpu in self.migs:
            targets = [m.index for m in self.migs[gpu]]
        for mi in targets:
            mig = self.migs[gpu][mi] if mi is not None else None
            hs = self.holders(gpu, mi, t)
            for a in hs:
                if a.container.memory_bytes is not None or a.pod.inference is not None or self.container_load(a, t) > 0:
                    mem = self._proc_memory(a, t)
                    out.append((a.pid, mem, mig.gi if mig else None, mig.ci if mig else None))
        if mig_index is None:
            for hp in self.sc.host_processes:
                if hp.gpu == gpu:
                    out.append((hp.pid, hp.memory_bytes, None, None))
        return out

    def _proc_memory(self, a: SimAllocation, t: float) -> int:
        cap = self.memory_total(a.gpu, a.mig_index)
        if a.container.memory_bytes is not None:
            return a.container.memory_bytes
        if a.pod.inference is not None:
            return int(cap * 0.9 / max(1, self.sc.replicas))
        return int(cap * 0.1 + cap * 0.6 * self.container_load(a, t))

    def process_sm_util(self, gpu: int, t: float) -> list[tuple[int, float]]:
        """Per-process SM utilization on a full GPU (time-sliced sharers split the device's)."""
        loads = [(a.pid, self.container_load(a, t)) for a in self.holders(gpu, None, t)]
        for hp in self.sc.host_processes:
            if hp.gpu == gpu:
                loads.append((hp.pid, load_at(hp.load, t, self.sc.seed, f"host/{hp.pid}")))
        total = sum(v for _, v in loads)
        scale = min(1.0, total) / total if total > 0 else 0.0
        return [(pid, v * scale) for pid, v in loads if v > 0]

    # --- faults ---------------------------------------------------------------------------
    def fault(self, kind: str, t: float, *, gpu: int | None = None, field: str = "", source: str = ""):
        for f in self.sc.faults:
            if f.kind != kind or not f.active(t):
                continue
            if gpu is not None and f.gpu is not None and f.gpu != gpu:
                continue
            if field and f.field != field:
                continue
            if source and f.source != source:
                continue
            return f
        return None

    def xid_events(self, gpu: int, t0: float, t1: float) -> list[int]:
        """Xid errors whose time falls in (t0, t1]."""
        return [f.xid for f in self.sc.faults if f.kind == "xid" and t0 < f.at <= t1 and f.gpu in (None, gpu)]
