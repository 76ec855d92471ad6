"""Frozen values shared by the agent's stages: the Snapshot of all sources, attributed units, the state.

Collector outputs are defined next to their collectors (`collectors.*`); these are the agent's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from collectors.nvml import DeviceSample

UNIT_LABELS = ("node", "gpu", "gpu_instance", "mig_profile", "uuid", "model")
OWNER_LABELS = ("namespace", "pod", "container", "workload_kind", "workload", "team")
STATES = ("active", "idle_reserved", "unallocated")


@dataclass(frozen=True, slots=True)
class Owner:
    namespace: str = ""
    pod: str = ""
    container: str = ""
    workload_kind: str = ""
    workload: str = ""
    team: str = ""
    pod_uid: str = ""

    def labels(self) -> tuple[str, ...]:
        return (self.namespace, self.pod, self.container, self.workload_kind, self.workload, self.team)

    def as_dict(self) -> dict[str, str]:
        return dict(zip(OWNER_LABELS, self.labels()))


NO_OWNER = Owner()


@dataclass(frozen=True, slots=True)
class Allocation:
    owner: Owner
    ratio: float  # of the physical device: 1 for a whole unit, 1/replicas for a share
    resource: str
    device_id: str


@dataclass(frozen=True, slots=True)
class UnitRow:
    """One allocatable unit (full GPU, MIG instance, time-sliced share, or a MIG parent's free slices)."""

    kind: str  # gpu | mig | share | mig_free
    gpu: int
    gpu_instance: str
    mig_profile: str
    uuid: str  # unit id: GPU-…, MIG-…, GPU-…::<n> for a share
    device_uuid: str  # the NVML device (GPU-… or MIG-…)
    model: str
    up: bool
    device: DeviceSample | None
    allocations: tuple[Allocation, ...]
    activity: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    hourly_price: float  # of this unit
    parent_hourly_price: float
    price_source: str
    instance_type: str
    capacity_type: str
    replica: int | None = None
    replicas: int = 1
    processes: int = 0

    @property
    def owner(self) -> Owner:
        return self.allocations[0].owner if self.allocations else NO_OWNER

    @property
    def allocated(self) -> bool:
        return bool(self.allocations)

    def unit_labels(self, node: str) -> tuple[str, ...]:
        return (node, str(self.gpu), self.gpu_instance, self.mig_profile, self.uuid, self.model)


@dataclass(frozen=True, slots=True)
class ContainerUse:
    """Per-container use of a shared (time-sliced) GPU, from its processes."""

    gpu: int
    device_uuid: str
    owner: Owner
    activity: float
    memory_used_bytes: int


@dataclass(frozen=True, slots=True)
class ForeignUse:
    """GPU use by a process whose pod holds no allocation on that device (or no pod: a host process)."""

    gpu: int
    device_uuid: str
    namespace: str
    pod: str
    processes: int


@dataclass(frozen=True, slots=True)
class Attribution:
    rows: tuple[UnitRow, ...]
    container_use: tuple[ContainerUse, ...] = ()
    unattributed: tuple[tuple[int, str, float, int], ...] = ()  # (gpu, device uuid, activity, memory bytes)
    foreign: tuple[ForeignUse, ...] = ()
    unknown_devices: int = 0


@dataclass(frozen=True, slots=True)
class UnitView:
    row: UnitRow
    state: str
    idle_seconds: float


@dataclass(frozen=True, slots=True)
class InferenceView:
    owner: Owner
    server: str
    model: str
    url: str
    queue_requests: float | None
    running_requests: float | None
    kv_cache_usage_ratio: float | None
    successful_requests_total: float | None
    failed_requests_total: float | None
    generated_tokens_total: float | None
    prompt_tokens_total: float | None
    generated_tokens_per_second: float | None
    successful_requests_per_second: float | None
    saturated: bool
    saturation_reason: str
    cost_per_1k_successful_requests: float | None
    cost_per_million_generated_tokens: float | None
    hourly_cost: float


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    instance_type: str
    capacity_type: str
    labels: tuple[tuple[str, str], ...]
    stale: bool = False


@dataclass(frozen=True, slots=True)
class CollectorStatus:
    name: str
    success: bool
    duration: float
    last_success: float | None
    last_error: str = ""
    errors: tuple[tuple[str, int], ...] = ()  # (kind, count since start)


@dataclass(frozen=True, slots=True)
class PodInfo:
    owner: Owner
    extra_labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AgentState:
    """Everything a scrape, a snapshot or the history needs: computed once per evaluation."""

    time: float
    node: NodeView
    driver_version: str
    units: tuple[UnitView, ...]
    attribution: Attribution
    devices: tuple[DeviceSample, ...]
    costs: tuple[tuple[tuple[str, ...], Owner, str, float], ...]  # (unit labels, owner, state, dollars total)
    inference: tuple[InferenceView, ...]
    pods: tuple[PodInfo, ...]
    collectors: tuple[CollectorStatus, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
