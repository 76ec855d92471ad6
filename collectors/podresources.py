"""Kubelet PodResources v1: which container holds which GPU, MIG instance or share.

The kubelet is polled on the collector's own timer over one long-lived gRPC
channel, so a scrape never dials the kubelet (dcgm-exporter's per-scrape dial
cost cores on MIG nodes). The receive limit is raised because big nodes answer
`List` with more than gRPC's default 4 MiB.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass

import grpc

from collectors.base import SourceError, SourceUnavailable
from collectors.proto import podresources_pb2 as pb
from collectors.proto import podresources_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

NAME = "podresources"
DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

# IDs logged as unrecognised; bounded so a kubelet full of odd IDs cannot grow it forever.
_MAX_LOGGED_IDS = 1024


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """One parsed NVIDIA device-plugin device ID.

    kind: gpu | mig | mig_legacy | gke_gpu | gke_mig | gke_vgpu.
    uuid: the NVML UUID with its prefix ("GPU-…", "MIG-…", or the whole legacy
    "MIG-GPU-…/<gi>/<ci>"), without any "::<n>" replica suffix; "" for GKE IDs,
    which name devices by index instead.
    """

    kind: str
    uuid: str
    parent_uuid: str  # legacy MIG only: the parent "GPU-…"
    gpu_index: int | None  # GKE nvidia<N>
    gi: int | None
    ci: int | None
    replica: int | None  # from "<id>::<n>"
    vgpu: int | None  # GKE time-sharing
    resource: str
    mig_profile: str  # from nvidia.com/mig-<profile>[.shared], else ""
    shared: bool  # time-sliced: a .shared resource, a replica suffix or a GKE vgpu


@dataclass(frozen=True, slots=True)
class ContainerDevice:
    namespace: str
    pod: str
    container: str
    resource: str
    device_id: str
    ref: DeviceRef | None  # None: an nvidia.com/* ID we could not parse (counted in unknown_ids)


@dataclass(frozen=True, slots=True)
class PodResourcesReading:
    devices: tuple[ContainerDevice, ...]
    allocatable: tuple[tuple[str, str], ...]  # (resource, device_id); empty on kubelets without the RPC
    unknown_ids: int  # distinct nvidia.com/* device IDs that did not parse, this reading

    def skipped_items(self) -> tuple[tuple[str, int], ...]:
        return (("unparsed_device_id", self.unknown_ids),) if self.unknown_ids else ()


_UUID_BODY = r"[0-9A-Za-z][0-9A-Za-z-]*"
_GPU_RE = re.compile(rf"GPU-{_UUID_BODY}")
# "MIG-GPU-…" without /gi/ci is malformed, not a new-style MIG UUID.
_MIG_RE = re.compile(rf"MIG-(?!GPU-){_UUID_BODY}")
_MIG_LEGACY_RE = re.compile(rf"MIG-(?P<parent>GPU-{_UUID_BODY})/(?P<gi>\d+)/(?P<ci>\d+)")
_GKE_RE = re.compile(r"nvidia(?P<index>\d+)(?:/gi(?P<gi>\d+))?(?:/vgpu(?P<vgpu>\d+))?")
_REPLICA_RE = re.compile(r"(?P<base>.+)::(?P<replica>\d+)")


def is_gpu_resource(name: str) -> bool:
    """Every NVIDIA device-plugin resource: nvidia.com/gpu, gpu.shared, mig-<profile>[.shared]."""
    return name.startswith("nvidia.com/")


def _mig_profile(resource: str) -> str:
    if not resource.startswith("nvidia.com/mig-"):
        return ""
    profile = resource.removeprefix("nvidia.com/mig-")
    return profile.removesuffix(".shared")


def parse_device_id(resource: str, device_id: str) -> DeviceRef | None:
    """Parse one device ID as the NVIDIA device plugin (or GKE's) writes it; None if unknown."""
    base, replica = device_id, None
    m = _REPLICA_RE.fullmatch(device_id)
    if m:
        base, replica = m["base"], int(m["replica"])
    profile = _mig_profile(resource)
    shared = resource.endswith(".shared") or replica is not None

    def ref(kind: str, uuid: str = "", parent: str = "", index: int | None = None, gi: int | None = None,
            ci: int | None = None, vgpu: int | None = None) -> DeviceRef:
        return DeviceRef(kind=kind, uuid=uuid, parent_uuid=parent, gpu_index=index, gi=gi, ci=ci,
                         replica=replica, vgpu=vgpu, resource=resource, mig_profile=profile,
                         shared=shared or vgpu is not None)

    if _GPU_RE.fullmatch(base):
        return ref("gpu", uuid=base)
    if m := _MIG_LEGACY_RE.fullmatch(base):
        return ref("mig_legacy", uuid=base, parent=m["parent"], gi=int(m["gi"]), ci=int(m["ci"]))
    if _MIG_RE.fullmatch(base):
        return ref("mig", uuid=base)
    if m := _GKE_RE.fullmatch(base):
        gi = int(m["gi"]) if m["gi"] is not None else None
        vgpu = int(m["vgpu"]) if m["vgpu"] is not None else None
        kind = "gke_vgpu" if vgpu is not None else "gke_mig" if gi is not None else "gke_gpu"
        return ref(kind, index=int(m["index"]), gi=gi, vgpu=vgpu)
    return None


class PodResourcesCollector:
    """Reads device allocations from the kubelet's PodResources socket.

    One channel for the collector's life: gRPC reconnects it by itself when
    the kubelet restarts; the reconnect backoff is capped so a restarted
    kubelet is seen again within a poll or two rather than after minutes.
    """

    name = NAME

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 5.0,
                 max_message_bytes: int = 64 * 2**20):
        self.socket_path = socket_path
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.PodResourcesListerStub | None = None
        self._logged_ids: set[str] = set()

    def _connect(self) -> pb_grpc.PodResourcesListerStub:
        if self._stub is None:
            self._channel = grpc.insecure_channel(
                f"unix://{os.path.abspath(self.socket_path)}",
                options=[
                    ("grpc.max_receive_message_length", self.max_message_bytes),
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ],
            )
            self._stub = pb_grpc.PodResourcesListerStub(self._channel)
        return self._stub

    def _check_socket(self) -> None:
        try:
            mode = os.stat(self.socket_path).st_mode
        except FileNotFoundError as e:
            raise SourceUnavailable(NAME, f"kubelet socket {self.socket_path} not found", e) from e
        except OSError as e:
            raise SourceUnavailable(NAME, f"kubelet socket {self.socket_path}: {e.strerror}", e) from e
        if not stat.S_ISSOCK(mode):
            raise SourceUnavailable(NAME, f"{self.socket_path} is not a unix socket")

    def collect(self, now: float) -> PodResourcesReading:
        self._check_socket()
        stub = self._connect()
        # Each call gets its own deadline: a kubelet answering each in 3 s of a 5 s timeout must not
        # lose every allocation because the first call used up a shared budget.
        try:
            listed = stub.List(pb.ListPodResourcesRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _rpc_error("List", e) from e
        try:
            alloc = stub.GetAllocatableResources(pb.AllocatableResourcesRequest(), timeout=self.timeout)
            alloc_devices = list(alloc.devices)
        except grpc.RpcError as e:
            # Kubelets before 1.21 (or with the gate off) lack the RPC: capacity unknown, not a failure.
            if _code(e) != grpc.StatusCode.UNIMPLEMENTED:
                raise _rpc_error("GetAllocatableResources", e) from e
            alloc_devices = []

        unknown: set[str] = set()
        devices: list[ContainerDevice] = []
        for pod in listed.pod_resources:
            for container in pod.containers:
                for dev in container.devices:
                    if not is_gpu_resource(dev.resource_name):
                        continue
                    for device_id in dev.device_ids:
                        ref = self._parse(dev.resource_name, device_id, unknown)
                        devices.append(ContainerDevice(
                            namespace=pod.namespace, pod=pod.name, container=container.name,
                            resource=dev.resource_name, device_id=device_id, ref=ref))
        allocatable: list[tuple[str, str]] = []
        for dev in alloc_devices:
            if not is_gpu_resource(dev.resource_name):
                continue
            for device_id in dev.device_ids:
                self._parse(dev.resource_name, device_id, unknown)
                allocatable.append((dev.resource_name, device_id))
        return PodResourcesReading(devices=tuple(devices), allocatable=tuple(allocatable),
                                   unknown_ids=len(unknown))

    def _parse(self, resource: str, device_id: str, unknown: set[str]) -> DeviceRef | None:
        ref = parse_device_id(resource, device_id)
        if ref is None:
            unknown.add(device_id)
            if device_id not in self._logged_ids and len(self._logged_ids) < _MAX_LOGGED_IDS:
                self._logged_ids.add(device_id)
                log.warning("unrecognised device id %r for resource %s; not attributed", device_id,
                            resource, extra={"collector": NAME})
        return ref

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None


def _code(e: grpc.RpcError) -> grpc.StatusCode | None:
    return e.code() if isinstance(e, grpc.Call) else None


class KubeletRpcError(SourceError):
    """A gRPC error from the kubelet; `code` tells down (UNAVAILABLE) from slow (DEADLINE_EXCEEDED)."""

    def __init__(self, method: str, code: grpc.StatusCode | None, details: str, cause: BaseException):
        self.code = code
        code_name = code.name if code is not None else "UNKNOWN"
        super().__init__(NAME, f"{method} failed: {code_name}: {details}", cause)


def _rpc_error(method: str, e: grpc.RpcError) -> KubeletRpcError:
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
    return KubeletRpcError(method, _code(e), details, e)
