"""Pure join: devices × kubelet allocations × pod metadata × process owners × prices → unit rows.

One row per allocatable unit: a full GPU, a MIG instance, a time-sliced share (its own unit with
uuid `GPU-…::<n>` and price parent ÷ replicas), and the unpartitioned slices of a MIG-enabled GPU
(always unallocated), so the rows' prices add up to the node's GPU price exactly.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from agent.model import Allocation, Attribution, ContainerUse, ForeignUse, Owner, UnitRow
from collectors.kubernetes import KubeMetadata, PodMeta
from collectors.nvml import DeviceSample, NvmlReading
from collectors.podresources import DeviceRef, PodResourcesReading
from collectors.pricing import KIND_MIG, KIND_SHARE, Price, PriceBook, canonical_model, unit_price
from collectors.processes import CgroupOwner

log = logging.getLogger("gpucap.attribution")

MIG_SLICES = 7


def owner_for(namespace: str, pod: str, container: str, meta: KubeMetadata | None) -> Owner:
    pm = meta.pod_by_name(namespace, pod) if meta is not None else None
    if pm is None:
        return Owner(namespace, pod, container)
    return Owner(namespace, pod, container, pm.workload_kind, pm.workload, pm.team, pm.uid, pm.feature)


class _Devices:
    """Lookups of kubelet device IDs against NVML's devices: UUIDs compare case-insensitively (the
    device plugin and NVML have been seen to disagree on case), GKE's nvidia<N> is the minor number."""

    def __init__(self, devices: Sequence[DeviceSample]):
        self.by_uuid = {d.uuid.lower(): d for d in devices if d.uuid}
        self.by_minor = {d.minor_number: d for d in devices if not d.is_mig and d.minor_number is not None}
        self.devices = devices

    def key(self, ref: DeviceRef | None) -> tuple[str, int | None] | None:
        """(NVML device uuid, replica) that a kubelet device ID names, or None when it matches nothing."""
        if ref is None:
            return None
        if ref.kind in ("gpu", "mig"):
            d = self.by_uuid.get(ref.uuid.lower())
            return (d.uuid, ref.replica) if d is not None else None
        if ref.kind == "mig_legacy":
            parent = ref.parent_uuid.lower()
            for d in self.devices:
                if (d.parent_uuid.lower() == parent and d.gpu_instance == ref.gi
                        and d.compute_instance in (ref.ci, None)):
                    return d.uuid, ref.replica
            return None
        if ref.gpu_index is not None:
            gpu = self.by_minor.get(ref.gpu_index)
            if gpu is None:
                return None
            if ref.gi is None:
                return gpu.uuid, ref.replica if ref.replica is not None else ref.vgpu
            for d in self.devices:
                if d.parent_uuid == gpu.uuid and d.gpu_instance == ref.gi:
                    return d.uuid, ref.replica if ref.replica is not None else ref.vgpu
        return None


def attribute(
    node_name: str,
    nvml: NvmlReading | Sequence[DeviceSample] | None,
    kubelet: PodResourcesReading | None,
    meta: KubeMetadata | None,
    owners: Mapping[int, CgroupOwner] | None,
    prices: PriceBook,
    mig_basis: str = "compute",
    *,
    stale_devices: frozenset[str] = frozenset(),
    replicas_hint: Mapping[str, int] | None = None,
) -> Attribution:
    """`kubelet=None` means who holds what is unknown (never "free"); `stale_devices` are units known
    only from the last inventory (their NVML reading expired). One device, price or allocation that
    fails is skipped and counted in `Attribution.skipped`; the others are still attributed."""
    devices = tuple(nvml.devices if isinstance(nvml, NvmlReading) else (nvml or ()))
    node = meta.node if meta is not None else None
    instance_type = node.instance_type if node else ""
    capacity_type = node.capacity_type if node else "on-demand"
    annotations = dict(node.annotations) if node else {}
    skipped: Counter[str] = Counter()
    holders_known = kubelet is not None

    # kubelet allocations by (device uuid, replica)
    lookup = _Devices(devices)
    held: dict[tuple[str, int | None], list[Allocation]] = defaultdict(list)
    replicas_seen: dict[str, set[int]] = defaultdict(set)
    unknown = 0
    for cd in kubelet.devices if kubelet is not None else ():
        key = lookup.key(cd.ref)
        if key is None:
            unknown += 1
            continue
        owner = owner_for(cd.namespace, cd.pod, cd.container, meta)
        held[key].append(Allocation(owner, 1.0, cd.resource, cd.device_id))
        if key[1] is not None:
            replicas_seen[key[0]].add(key[1])
    for resource, device_id in kubelet.allocatable if kubelet is not None else ():
        base, sep, rep = device_id.partition("::")
        d = lookup.by_uuid.get(base.lower())
        if sep and rep.isdigit() and d is not None:
            replicas_seen[d.uuid].add(int(rep))
    if unknown:
        skipped["unmatched_device_id"] += unknown
    replicas: dict[str, int] = {u: max(r) + 1 for u, r in replicas_seen.items() if r}
    if not holders_known:
        replicas = dict(replicas_hint or {})  # keep the last known share layout while the kubelet is unknown

    out = _Out(skipped)
    parents = {d.uuid: d for d in devices if not d.is_mig}
    for d in devices:
        try:
            _attribute_device(out, d, devices, parents, held, replicas.get(d.uuid, 0), owners, meta, prices,
                              node_name, instance_type, capacity_type, annotations, mig_basis,
                              fresh=d.uuid not in stale_devices and d.parent_uuid not in stale_devices,
                              holders_known=holders_known)
        except Exception:
            log.debug("attribution of device %s failed", d.uuid, exc_info=True)
            skipped["device_error"] += 1
    return Attribution(tuple(out.rows), tuple(out.container_use), tuple(out.unattributed), tuple(out.foreign),
                       unknown, tuple(sorted(skipped.items())), tuple(sorted(replicas.items())))


class _Out:
    def __init__(self, skipped: Counter[str]):
        self.rows: list[UnitRow] = []
        self.container_use: list[ContainerUse] = []
        self.unattributed: list[tuple[int, str, float, int]] = []
        self.foreign: list[ForeignUse] = []
        self.skipped = skipped


def _attribute_device(out: _Out, d: DeviceSample, devices: Sequence[DeviceSample],
                      parents: Mapping[str, DeviceSample], held: Mapping[tuple[str, int | None], list[Allocation]],
                      n_replicas: int, owners: Mapping[int, CgroupOwner] | None, meta: KubeMetadata | None,
                      prices: PriceBook, node_name: str, instance_type: str, capacity_type: str,
                      annotations: Mapping[str, str], mig_basis: str, *, fresh: bool, holders_known: bool) -> None:
    """The unit rows of one NVML device; raises on anything unexpected (the caller skips and counts)."""
    if d.mig_enabled is False and d.is_mig and d.parent_uuid not in parents:
        out.skipped["orphan_mig_instance"] += 1
        return
    model = d.model or (parents[d.parent_uuid].model if d.parent_uuid in parents else "")
    price = prices.gpu_price(node_name, instance_type, capacity_type, annotations, canonical_model(model))
    base = {"gpu": d.gpu, "model": model, "up": d.up, "device": d, "parent_hourly_price": price.hourly_dollars,
            "price_source": price.source, "instance_type": instance_type, "capacity_type": capacity_type,
            "device_fresh": fresh, "holders_known": holders_known, "list_parent_price": price.list_hourly}
    if d.mig_enabled:
        # the unpartitioned remainder is the parent's price minus its instances' prices, so the node
        # adds up exactly on either MIG cost basis
        instances = [c for c in devices if c.parent_uuid == d.uuid]
        used = sum(_mig_price(c, d, price, mig_basis) for c in instances)
        free = price.hourly_dollars - used
        if free > 1e-12:
            out.rows.append(UnitRow(kind="mig_free", gpu_instance="", mig_profile="unpartitioned", uuid=d.uuid,
                                    device_uuid=d.uuid, allocations=(), activity=None, memory_used_bytes=None,
                                    memory_total_bytes=None, hourly_price=free, **base))
        return
    allocs_of = (lambda key: tuple(held.get(key, ()))) if holders_known else (lambda key: ())
    if d.is_mig:
        parent = parents[d.parent_uuid]
        base["up"] = d.up and parent.up
        out.rows.append(UnitRow(kind="mig", gpu_instance=str(d.gpu_instance), mig_profile=d.mig_profile, uuid=d.uuid,
                                device_uuid=d.uuid, allocations=allocs_of((d.uuid, None)),
                                activity=_activity(d) if fresh else None,
                                memory_used_bytes=d.memory_used_bytes if fresh else None,
                                memory_total_bytes=d.memory_total_bytes,
                                hourly_price=_mig_price(d, parent, price, mig_basis),
                                processes=len(d.processes) if fresh else 0, **base))
        return
    if not n_replicas:
        allocs = allocs_of((d.uuid, None))
        out.rows.append(UnitRow(kind="gpu", gpu_instance="", mig_profile="", uuid=d.uuid, device_uuid=d.uuid,
                                allocations=allocs, activity=_activity(d) if fresh else None,
                                memory_used_bytes=d.memory_used_bytes if fresh else None,
                                memory_total_bytes=d.memory_total_bytes, hourly_price=price.hourly_dollars,
                                processes=len(d.processes) if fresh else 0, **base))
        if fresh and holders_known:  # without the kubelet nobody is known to hold it: no process is "foreign"
            out.foreign.extend(_foreign(d, {a.owner.pod_uid for a in allocs if a.owner.pod_uid}, owners, meta))
        return
    # time-sliced: one unit per replica; split the device's use between the pods by their processes
    n = n_replicas
    by_pod = _process_use(d, owners) if fresh else {}
    shares_of: dict[str, int] = defaultdict(int)
    for r in range(n):
        for a in allocs_of((d.uuid, r)):
            shares_of[a.owner.pod_uid] += 1
    attributed_act = 0.0
    attributed_mem = 0
    seen_owner: set[tuple[str, str]] = set()
    share_price = unit_price(price, KIND_SHARE, replicas=n)
    for r in range(n):
        allocs = tuple(Allocation(a.owner, 1.0 / n, a.resource, a.device_id) for a in allocs_of((d.uuid, r)))
        act: float | None = None
        dev_act: float | None = None
        mem: int | None = None
        if allocs and fresh:
            o = allocs[0].owner
            use = by_pod.get(o.pod_uid) if o.pod_uid else None
            k = max(1, shares_of[o.pod_uid])
            dev_act = (use[0] / k) if use else (0.0 if owners is not None else None)
            # entitlement-relative: a share whose pod uses its whole 1/n slot is busy (DESIGN §4)
            act = None if dev_act is None else min(1.0, dev_act * n)
            mem = (use[1] // k) if use else 0
            if (o.pod_uid, o.container) not in seen_owner and use:
                seen_owner.add((o.pod_uid, o.container))
                out.container_use.append(ContainerUse(d.gpu, d.uuid, o, use[0], use[1]))
                attributed_act += use[0]
                attributed_mem += use[1]
        out.rows.append(UnitRow(kind="share", gpu_instance="", mig_profile="", uuid=f"{d.uuid}::{r}",
                                device_uuid=d.uuid, allocations=allocs, activity=act, memory_used_bytes=mem,
                                memory_total_bytes=d.memory_total_bytes,  # time-slicing does not partition memory
                                hourly_price=share_price, replica=r, replicas=n,
                                processes=len(d.processes) if fresh else 0, device_activity=dev_act, **base))
    if d.up and fresh and holders_known:
        dev_act_total = d.activity or 0.0
        out.unattributed.append((d.gpu, d.uuid, max(0.0, dev_act_total - attributed_act),
                                 max(0, (d.memory_used_bytes or 0) - attributed_mem)))
        holders = {a.owner.pod_uid for r in range(n) for a in allocs_of((d.uuid, r)) if a.owner.pod_uid}
        out.foreign.extend(_foreign(d, holders, owners, meta))


def _mig_price(d: DeviceSample, parent: DeviceSample | None, price: Price, basis: str) -> float:
    slices = d.compute_slices or _slices_from_profile(d.mig_profile)
    return unit_price(price, KIND_MIG, compute_slices=slices, memory_slices=_memory_slices(d, parent), basis=basis)


def _activity(d: DeviceSample) -> float | None:
    """GPM SM active, else utilization; a device with no compute process at all is idle by evidence."""
    if not d.up:
        return None
    act = d.activity
    if act is None and not d.processes:
        return 0.0
    return act


def _process_use(d: DeviceSample, owners: Mapping[int, CgroupOwner] | None) -> dict[str, tuple[float, int]]:
    """pod uid → (SM utilization, memory bytes) of its processes on this device."""
    out: dict[str, tuple[float, int]] = {}
    if owners is None:
        return out
    for p in d.processes:
        o = owners.get(p.pid)
        if o is None or not o.pod_uid or o.monitor:
            continue  # a runtime monitor (conmon) is pod overhead, not the pod's GPU use
        act, mem = out.get(o.pod_uid, (0.0, 0))
        out[o.pod_uid] = (act + (p.sm_util or 0.0), mem + (p.used_memory_bytes or 0))
    return out


def _foreign(d: DeviceSample, holders: set[str], owners: Mapping[int, CgroupOwner] | None,
             meta: KubeMetadata | None) -> list[ForeignUse]:
    if owners is None:
        return []
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for p in d.processes:
        o = owners.get(p.pid)
        uid = o.pod_uid if o is not None else ""
        if (uid and uid in holders) or (o is not None and o.monitor):
            continue
        pm: PodMeta | None = meta.pod_by_uid(uid) if (meta is not None and uid) else None
        counts[(pm.namespace if pm else "", pm.name if pm else (uid or ""))] += 1
    return [ForeignUse(d.gpu, d.uuid, ns, pod, c) for (ns, pod), c in sorted(counts.items())]


def _slices_from_profile(profile: str) -> int:
    head = profile.split("g.", 1)[0]
    return int(head) if head.isdigit() else 1


def _memory_slices(d: DeviceSample, parent: DeviceSample | None) -> int:
    if d.memory_total_bytes and parent is not None and parent.memory_total_bytes:
        return max(1, min(8, round(8 * d.memory_total_bytes / parent.memory_total_bytes)))
    return 1
