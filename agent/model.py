"""Frozen values shared by the agent's stages: the Snapshot of all sources, attributed units, the state.

Collector outputs are defined next to their collectors (`collectors.*`); these are the agent's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from collectors.inference import InferenceReading
from collectors.kubernetes import KubeMetadata
from collectors.nvml import DeviceSample, NvmlReading
from collectors.podresources import PodResourcesReading
from collectors.processes import ProcessOwners

T = TypeVar("T")

UNIT_LABELS = ("node", "gpu", "gpu_instance", "mig_profile", "uuid", "model")
OWNER_LABELS = ("namespace", "pod", "container", "workload_kind", "workload", "team")
# DESIGN §4: exactly one per unit at a time. lost beats unknown beats the rest: a GPU NVML calls lost is
# waste whoever holds it; a unit whose holder or activity has no fresh evidence is never free or busy.
STATES = ("active", "idle_reserved", "lost", "unallocated", "unknown")


@dataclass(frozen=True, slots=True)
class Owner:
    namespace: str = ""
    pod: str = ""
    container: str = ""
    workload_kind: str = ""
    workload: str = ""
    team: str = ""
    pod_uid: str = ""
    feature: str = ""  # on gpucap_pod_info and in the ledger, never on every series

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
    device_activity: float | None = None  # shares: the pod's fraction of the whole device
    device_fresh: bool = True  # False: NVML's reading expired; the unit is known from the last inventory
    holders_known: bool = True  # False: no fresh kubelet reading; allocations are empty because unknown
    list_parent_price: float = 0.0  # the parent GPU's on-demand price (FOCUS ListCost)

    @property
    def lost(self) -> bool:
        return self.device_fresh and not self.up

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
    skipped: tuple[tuple[str, int], ...] = ()  # (reason, count) this evaluation
    replicas: tuple[tuple[str, int], ...] = ()  # (device uuid, replicas) of time-sliced GPUs in use


@dataclass(frozen=True, slots=True)
class UnitView:
    row: UnitRow
    state: str
    idle_seconds: float
    streak: float | None = None  # held and at or below the idle threshold: the streak's id (its monotonic start)


@dataclass(frozen=True, slots=True)
class Accrual:
    """Dollars one unit × holder accrued in one state over the interval that ended at this evaluation
    (charged at the state and price seen at its start). The ledger books these per minute."""

    view: UnitView  # the unit as seen at the start of the interval
    state: str
    start: float  # wall time
    end: float
    seconds: float
    dollars: float
    streak: float | None = None  # id of the idle streak this active time belongs to (rebooked if confirmed)


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
    window_cost: float | None = None  # GPU dollars of this entry over the outcome window; None: no GPU
    target_error: str = ""


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
    enabled: bool = True
    data_age: float | None = None  # seconds since the reading in use was taken; None: none in use
    max_age: float = 0.0
    skipped: tuple[tuple[str, int], ...] = ()  # (reason, count since start)
    last_error_kind: str = ""
    failing_since: float | None = None  # wall time of the first failure of the current streak


@dataclass(frozen=True, slots=True)
class SourceReading(Generic[T]):
    """One source as the evaluation sees it: its value only while it is fresh (DESIGN §4 Freshness)."""

    status: CollectorStatus
    value: T | None = None  # None: never read, or older than the source's max age (dropped)
    at: float | None = None  # wall time the value was taken
    expired: bool = False  # a value existed but is older than max age

    @property
    def fresh(self) -> bool:
        return self.value is not None


def _none(name: str) -> SourceReading[Any]:
    return SourceReading(CollectorStatus(name, False, 0.0, None, "not configured", enabled=False))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The loop's only output: every source's reading with its time, status and skip counts.

    `time` is wall time (timestamps only); `mono` is the monotonic clock that money and idle streaks
    are measured on, so a wall-clock step never charges or skips a dollar.
    """

    time: float
    mono: float
    nvml: SourceReading[NvmlReading] = field(default_factory=lambda: _none("nvml"))
    podresources: SourceReading[PodResourcesReading] = field(default_factory=lambda: _none("podresources"))
    kubernetes: SourceReading[KubeMetadata] = field(default_factory=lambda: _none("kubernetes"))
    processes: SourceReading[ProcessOwners] = field(default_factory=lambda: _none("processes"))
    inference: SourceReading[InferenceReading] = field(default_factory=lambda: _none("inference"))
    others: tuple[SourceReading[Any], ...] = ()  # collectors the evaluation does not read (tests, plugins)

    def readings(self) -> tuple[SourceReading[Any], ...]:
        known = (self.nvml, self.podresources, self.kubernetes, self.processes, self.inference)
        return tuple(r for r in known if r.status.enabled) + self.others

    def statuses(self) -> tuple[CollectorStatus, ...]:
        return tuple(r.status for r in self.readings())


SNAPSHOT_SOURCES = ("nvml", "podresources", "kubernetes", "processes", "inference")


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
    evaluation_success: bool = True
    skipped: tuple[tuple[str, str, int], ...] = ()  # (stage, reason, count since start), e.g. attribution
    mono: float = 0.0
    accruals: tuple[Accrual, ...] = ()  # what this evaluation charged, for the ledger
    history_write_errors: int | None = None  # None: no ledger configured
    # (owner labels, action, target, monthly savings) per workload, from the ledger (agent/rightsizing.py)
    rightsizing: tuple[tuple[tuple[tuple[str, str], ...], str, str, float], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
