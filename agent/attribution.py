"""Pure join: devices × kubelet allocations × pod metadata × process owners × prices → unit rows.

One row per allocatable unit: a full GPU, a MIG instance, a time-sliced share (its own unit with
uuid `GPU-…::<n>` and price parent ÷ replicas), and the unpartitioned slices of a MIG-enabled GPU
(always unallocated), so the rows' prices add up to the node's GPU price exactly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from agent.model import Allocation, Attribution, ContainerUse, ForeignUse, Owner, UnitRow
from collectors.kubernetes import KubeMetadata, PodMeta
from collectors.nvml import DeviceSample, NvmlReading
from collectors.podresources import ContainerDevice, PodResourcesReading
from collectors.pricing import KIND_MIG, KIND_SHARE, PriceBook, canonical_model, unit_price
from collectors.processes import CgroupOwner

MIG_SLICES = 7


def owner_for(namespace: str, pod: str, container: str, meta: KubeMetadata | None) -> Owner:
    pm = meta.pod_by_name(namespace, pod) if meta is not None else None
    if pm is None:
        return Owner(namespace, pod, container)
    return Owner(namespace, pod, container, pm.workload_kind, pm.workload, pm.team, pm.uid)


def _device_key(cd: ContainerDevice, devices: Sequence[DeviceSample]) -> tuple[str, int | None] | None:
    """(NVML device uuid, replica) that a kubelet device ID names, or None when it matches nothing."""
    ref = cd.ref
    if ref is None:
        return None
    if ref.kind in ("gpu", "mig"):
        return ref.uuid, ref.replica
    if ref.kind == "mig_legacy":
        for d in devices:
            if d.parent_uuid == ref.parent_uuid and d.gpu_instance == ref.gi and d.compute_instance in (ref.ci, None):
                return d.uuid, ref.replica
        return None
    if ref.gpu_index is not None:
        for d in devices:
            if d.gpu == ref.gpu_index and (ref.gi is None and not d.is_mig or d.gpu_instance == ref.gi):
                return d.uuid, ref.replica if ref.replica is not None else ref.vgpu
    return None


def attribute(
    node_name: str,
    nvml: NvmlReading | None,
    kubelet: PodResourcesReading | None,
    meta: KubeMetadata | None,
    owners: Mapping[int, CgroupOwner] | None,
    prices: PriceBook,
    mig_basis: str = "compute",
) -> Attribution:
    devices = nvml.devices if nvml is not None else ()
    node = meta.node if meta is not None else None
    instance_type = node.instance_type if node else ""
    capacity_type = node.capacity_type if node else "on-demand"
    annotations = dict(node.annotations) if node else {}

    # kubelet allocations by (device uuid, replica)
    held: dict[tuple[str, int | None], list[Allocation]] = defaultdict(list)
    replicas_seen: dict[str, set[int]] = defaultdict(set)
    unknown = 0
    for cd in kubelet.devices if kubelet is not None else ():
        key = _device_key(cd, devices)
        if key is None:
            unknown += 1
            continue
        owner = owner_for(cd.namespace, cd.pod, cd.container, meta)
        held[key].append(Allocation(owner, 1.0, cd.resource, cd.device_id))
        if key[1] is not None:
            replicas_seen[key[0]].add(key[1])
    for resource, device_id in kubelet.allocatable if kubelet is not None else ():
        uuid, sep, rep = device_id.partition("::")
        if sep and rep.isdigit():
            replicas_seen[uuid].add(int(rep))

    rows: list[UnitRow] = []
    container_use: list[ContainerUse] = []
    unattributed: list[tuple[int, str, float, int]] = []
    foreign: list[ForeignUse] = []
    parents = {d.uuid: d for d in devices if not d.is_mig}

    for d in devices:
        model = d.model or (parents[d.parent_uuid].model if d.parent_uuid in parents else "")
        price = prices.gpu_price(node_name, instance_type, capacity_type, annotations, canonical_model(model))
        base = {"gpu": d.gpu, "model": model, "up": d.up, "device": d, "parent_hourly_price": price.hourly_dollars,
                    "price_source": price.source, "instance_type": instance_type, "capacity_type": capacity_type}
        if d.mig_enabled:
            used = sum(c.compute_slices or 0 for c in devices if c.parent_uuid == d.uuid)
            free = max(0, MIG_SLICES - used)
            if free:
                rows.append(UnitRow(kind="mig_free", gpu_instance="", mig_profile="unpartitioned", uuid=d.uuid,
                                    device_uuid=d.uuid, allocations=(), activity=None, memory_used_bytes=None,
                                    memory_total_bytes=None,
                                    hourly_price=unit_price(price, KIND_MIG, compute_slices=free, basis="compute"),
                                    **base))
            continue
        if d.is_mig:
            allocs = tuple(held.get((d.uuid, None), ()))
            slices = d.compute_slices or _slices_from_profile(d.mig_profile)
            mem_slices = _memory_slices(d, parents.get(d.parent_uuid))
            hourly = unit_price(price, KIND_MIG, compute_slices=slices, memory_slices=mem_slices, basis=mig_basis)
            rows.append(UnitRow(kind="mig", gpu_instance=str(d.gpu_instance), mig_profile=d.mig_profile, uuid=d.uuid,
                                device_uuid=d.uuid, allocations=allocs, activity=_activity(d),
                                memory_used_bytes=d.memory_used_bytes, memory_total_bytes=d.memory_total_bytes,
                                hourly_price=hourly, processes=len(d.processes), **base))
            continue
        reps = replicas_seen.get(d.uuid)
        if not reps:
            allocs = tuple(held.get((d.uuid, None), ()))
            rows.append(UnitRow(kind="gpu", gpu_instance="", mig_profile="", uuid=d.uuid, device_uuid=d.uuid,
                                allocations=allocs, activity=_activity(d), memory_used_bytes=d.memory_used_bytes,
                                memory_total_bytes=d.memory_total_bytes, hourly_price=price.hourly_dollars,
                                processes=len(d.processes), **base))
            holders = {a.owner.pod_uid for a in allocs if a.owner.pod_uid}
            foreign.extend(_foreign(d, holders, owners, meta))
            continue
        # time-sliced: one unit per replica; split the device's use between the pods by their processes
        n = max(reps) + 1
        by_pod = _process_use(d, owners)
        shares_of: dict[str, int] = defaultdict(int)
        for r in range(n):
            for a in held.get((d.uuid, r), ()):
                shares_of[a.owner.pod_uid] += 1
        attributed_act = 0.0
        attributed_mem = 0
        seen_owner: set[tuple[str, str]] = set()
        for r in range(n):
            allocs = tuple(
                Allocation(a.owner, 1.0 / n, a.resource, a.device_id) for a in held.get((d.uuid, r), ())
            )
            act: float | None = None
            mem: int | None = None
            if allocs:
                o = allocs[0].owner
                use = by_pod.get(o.pod_uid) if o.pod_uid else None
                k = max(1, shares_of[o.pod_uid])
                act = (use[0] / k) if use else (0.0 if owners is not None else None)
                mem = (use[1] // k) if use else 0
                if (o.pod_uid, o.container) not in seen_owner and use:
                    seen_owner.add((o.pod_uid, o.container))
                    container_use.append(ContainerUse(d.gpu, d.uuid, o, use[0], use[1]))
                    attributed_act += use[0]
                    attributed_mem += use[1]
            rows.append(UnitRow(kind="share", gpu_instance="", mig_profile="", uuid=f"{d.uuid}::{r}",
                                device_uuid=d.uuid, allocations=allocs, activity=act, memory_used_bytes=mem,
                                memory_total_bytes=d.memory_total_bytes,  # time-slicing does not partition memory
                                hourly_price=unit_price(price, KIND_SHARE, replicas=n), replica=r, replicas=n,
                                processes=len(d.processes), **base))
        if d.up:
            dev_act = d.activity or 0.0
            unattributed.append((d.gpu, d.uuid, max(0.0, dev_act - attributed_act),
                                 max(0, (d.memory_used_bytes or 0) - attributed_mem)))
        holders = {a.owner.pod_uid for r in range(n) for a in held.get((d.uuid, r), ()) if a.owner.pod_uid}
        foreign.extend(_foreign(d, holders, owners, meta))
    return Attribution(tuple(rows), tuple(container_use), tuple(unattributed), tuple(foreign), unknown)


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
        if o is None or not o.pod_uid:
            continue
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
        if uid and uid in holders:
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
