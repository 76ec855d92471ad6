"""Process → pod: which pod and container a GPU process belongs to, from its cgroup.

NVML reports PIDs; the kubelet reports devices. The cgroup path joins the two,
which is the only way to split a time-sliced GPU between the pods sharing it
and to catch GPU use by processes holding no allocation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from collectors.base import SourceUnavailable

# A pod UID as the kubelet writes it in cgroup names: dashes (cgroupfs) or
# underscores (systemd, where "-" separates slice levels). Static pods use a
# 32-hex config hash as UID instead.
_UID = r"[0-9a-fA-F]{8}(?:[-_][0-9a-fA-F]{4}){3}[-_][0-9a-fA-F]{12}|[0-9a-fA-F]{32}"
# The pod level, whatever the QoS class or driver:
#   kubepods-burstable-pod<uid_>.slice, kubepods-pod<uid_>.slice (guaranteed),
#   kubelet-kubepods-besteffort-pod<uid_>.slice (kind), pod<uid-> (cgroupfs).
_POD_SEGMENT = re.compile(rf"(?:[\w.-]*-)?pod(?P<uid>{_UID})(?:\.slice)?")
_HEX64 = r"[0-9a-f]{64}"
_CONTAINER_SEGMENTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"cri-containerd-(?P<id>{_HEX64})\.scope"), "containerd"),
    (re.compile(rf"crio-(?P<id>{_HEX64})(?:\.scope)?"), "crio"),
    (re.compile(rf"docker-(?P<id>{_HEX64})\.scope"), "docker"),
    (re.compile(rf"(?P<id>{_HEX64})"), ""),  # cgroupfs driver: the bare ID, runtime not named
)
# CRI-O's per-container monitor lives beside the container; it is pod overhead, not the container.
_CRIO_CONMON = re.compile(rf"crio-conmon-{_HEX64}(?:\.scope)?")


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    pod_uid: str  # with dashes, lower-case (static pods: the 32-hex config hash)
    container_id: str  # 64 hex, "" when the process sits in the pod but in no container (e.g. conmon)
    runtime: str  # containerd | crio | docker | "" (cgroupfs driver names none)
    monitor: bool = False  # a runtime's monitor (CRI-O's conmon): pod overhead, never the pod's GPU use


def _parse_path(path: str) -> CgroupOwner | None:
    """Find the pod and container levels anywhere: the path is relative to the reader's cgroup namespace."""
    segments = path.split("/")
    for i, seg in enumerate(segments):
        m = _POD_SEGMENT.fullmatch(seg)
        if m is None:
            continue
        uid = m["uid"].replace("_", "-").lower()
        for child in segments[i + 1:]:
            if _CRIO_CONMON.fullmatch(child):
                return CgroupOwner(pod_uid=uid, container_id="", runtime="crio", monitor=True)
            for pattern, runtime in _CONTAINER_SEGMENTS:
                c = pattern.fullmatch(child)
                if c:
                    return CgroupOwner(pod_uid=uid, container_id=c["id"], runtime=runtime)
        return CgroupOwner(pod_uid=uid, container_id="", runtime="")
    return None


def parse_cgroup(text: str) -> CgroupOwner | None:
    """Parse /proc/<pid>/cgroup (v1 `id:controllers:path` lines or the v2 `0::path` line).

    v1 lists one path per hierarchy and some may stop at the pod level, so the
    most specific answer wins: one naming the container over one naming only the pod.
    """
    best: CgroupOwner | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        owner = _parse_path(parts[2])
        if owner is None:
            continue
        if owner.container_id:
            return owner
        if best is None or (owner.monitor and not best.monitor):
            best = owner
    return best


def _start_time(procfs: str, pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): tells a reused PID from the old process."""
    try:
        with open(os.path.join(procfs, str(pid), "stat"), encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    fields = data[data.rfind(")") + 1:].split()
    try:
        return int(fields[19])  # fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


class ProcessResolver:
    """Resolves PIDs to pods through `<procfs>/<pid>/cgroup`, caching by (pid, start time).

    A process never changes pod, so the answer holds for the process's life;
    the start time detects PID reuse. Without a readable start time nothing is
    cached, since reuse could not be told apart.
    """

    def __init__(self, procfs: str = "/proc", max_cache: int = 4096):
        self.procfs = procfs
        self.max_cache = max_cache
        self.errors = 0  # PIDs whose cgroup could not be read (gone, or no permission)
        self._cache: dict[int, tuple[int, CgroupOwner | None]] = {}

    def owner(self, pid: int) -> CgroupOwner | None:
        start = _start_time(self.procfs, pid)
        cached = self._cache.get(pid)
        if start is not None and cached is not None and cached[0] == start:
            return cached[1]
        try:
            with open(os.path.join(self.procfs, str(pid), "cgroup"), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            self.errors += 1
            self._cache.pop(pid, None)
            return None
        owner = parse_cgroup(text)
        # Cache only if the same process was there before and after the read.
        if start is not None and _start_time(self.procfs, pid) == start:
            if pid not in self._cache and len(self._cache) >= self.max_cache:
                del self._cache[next(iter(self._cache))]  # oldest entry
            self._cache[pid] = (start, owner)
        else:
            self._cache.pop(pid, None)
        return owner


@dataclass(frozen=True, slots=True)
class ProcessOwners:
    """pid → owner of the GPU processes NVML reported last; pids with no readable cgroup are absent."""

    owners: tuple[tuple[int, CgroupOwner], ...]
    unresolved: int

    def as_dict(self) -> dict[int, CgroupOwner]:
        return dict(self.owners)

    def skipped_items(self) -> tuple[tuple[str, int], ...]:
        return (("unresolved_pid", self.unresolved),) if self.unresolved else ()


class ProcessesCollector:
    """Resolves the GPU processes' pids to pods, on its own timer. The pids come from the latest
    fresh NVML reading, which the loop passes in (`needs`): no reach into another collector."""

    name = "processes"
    needs = ("nvml",)

    def __init__(self, procfs: str = "/proc"):
        self.resolver = ProcessResolver(procfs)

    def collect(self, now: float, inputs: Mapping[str, Any] | None = None) -> ProcessOwners:
        if not os.path.isdir(self.resolver.procfs):
            raise SourceUnavailable("processes", f"procfs {self.resolver.procfs!r} is not a directory")
        owners = []
        unresolved = 0
        for pid in sorted(gpu_pids((inputs or {}).get("nvml"))):
            o = self.resolver.owner(pid)
            if o is None:
                unresolved += 1
            else:
                owners.append((pid, o))
        return ProcessOwners(tuple(owners), unresolved)

    def close(self) -> None:
        pass


def gpu_pids(nvml_reading: Any) -> set[int]:
    """Every pid NVML reported on any device (a reading with `devices` of `processes`), or none."""
    if nvml_reading is None:
        return set()
    return {p.pid for d in nvml_reading.devices for p in d.processes}
