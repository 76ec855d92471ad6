"""A simulated kubelet: a real gRPC PodResources v1 server on a unix socket.

It is real so that the collector under test and under `--simulate` runs the
same code path as on a node: the channel, the socket, message size limits,
deadlines and status codes. The answers come from callables read at each
call, so a scenario can move pods without restarting the server; a callable
that raises `KubeletUnavailable` makes that call answer UNAVAILABLE, the way
a restarting kubelet does, without a server-side traceback.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from types import TracebackType
from typing import Self, TypeVar

import grpc

from collectors.proto import podresources_pb2 as pb
from collectors.proto import podresources_pb2_grpc as pb_grpc

# (namespace, pod, container, resource, device_ids); resource "" lists a container holding no devices.
ListRow = tuple[str, str, str, str, tuple[str, ...]]
# (resource, device_ids)
AllocatableRow = tuple[str, tuple[str, ...]]

PADDING_NAMESPACE = "gpucap-padding"
PADDING_RESOURCE = "sim.gpucap.io/padding"
# Each padding pod carries ~10 KiB (100 IDs of ~100 bytes): 600 pods make a ~6 MiB List reply.
_PADDING_IDS_PER_POD = 100
_PADDING_ID_LEN = 100

T = TypeVar("T")


class KubeletUnavailable(Exception):
    """Raised by `list_fn`/`allocatable_fn` for an outage: the call is answered UNAVAILABLE.

    Any other exception is a bug in the callable, and grpc reports it (traceback and UNKNOWN);
    an outage is an expected answer and must look like one on both ends.
    """


def _group(rows: Sequence[ListRow]) -> list[pb.PodResources]:
    """Rows in kubelet shape: one PodResources per pod, one ContainerResources per container."""
    pods: dict[tuple[str, str], dict[str, dict[str, list[str]]]] = {}
    for namespace, pod, container, resource, device_ids in rows:
        containers = pods.setdefault((namespace, pod), {})
        resources = containers.setdefault(container, {})
        if resource:
            resources.setdefault(resource, []).extend(device_ids)
    return [
        pb.PodResources(
            namespace=namespace, name=pod,
            containers=[
                pb.ContainerResources(
                    name=container,
                    devices=[pb.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in res.items()])
                for container, res in containers.items()
            ])
        for (namespace, pod), containers in pods.items()
    ]


def _padding(n: int) -> list[pb.PodResources]:
    return [
        pb.PodResources(
            namespace=PADDING_NAMESPACE, name=f"padding-{i}",
            containers=[pb.ContainerResources(name="main", devices=[pb.ContainerDevices(
                resource_name=PADDING_RESOURCE,
                device_ids=[f"pad-{i}-{j}-".ljust(_PADDING_ID_LEN, "x") for j in range(_PADDING_IDS_PER_POD)],
            )])])
        for i in range(n)
    ]


def _answer(fn: Callable[[], T], context: grpc.ServicerContext) -> T:
    try:
        return fn()
    except KubeletUnavailable as e:
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e) or "simulated kubelet is unavailable")
        raise  # not reached: abort raises


class _Servicer(pb_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: SimulatedKubelet):
        self._k = kubelet

    def List(self, request: pb.ListPodResourcesRequest, context: grpc.ServicerContext
             ) -> pb.ListPodResourcesResponse:
        self._k._fault(context)
        rows = _answer(self._k.list_fn, context)
        return pb.ListPodResourcesResponse(pod_resources=_group(rows) + self._k._padding)

    def GetAllocatableResources(self, request: pb.AllocatableResourcesRequest, context: grpc.ServicerContext
                                ) -> pb.AllocatableResourcesResponse:
        self._k._fault(context)
        if self._k.allocatable_fn is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "GetAllocatableResources not served (old kubelet)")
        rows = _answer(self._k.allocatable_fn, context)
        return pb.AllocatableResourcesResponse(
            devices=[pb.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in rows])

    def Get(self, request: pb.GetPodResourcesRequest, context: grpc.ServicerContext
            ) -> pb.GetPodResourcesResponse:
        self._k._fault(context)
        for pod in _group(_answer(self._k.list_fn, context)):
            if pod.name == request.pod_name and pod.namespace == request.pod_namespace:
                return pb.GetPodResourcesResponse(pod_resources=pod)
        context.abort(grpc.StatusCode.NOT_FOUND, f"pod {request.pod_namespace}/{request.pod_name} not found")


class SimulatedKubelet:
    """PodResourcesLister served from callables, with the faults a real kubelet shows.

    `allocatable_fn=None` answers GetAllocatableResources with UNIMPLEMENTED,
    as kubelets before 1.21 do.
    """

    def __init__(self, socket_path: str, list_fn: Callable[[], Sequence[ListRow]],
                 allocatable_fn: Callable[[], Sequence[AllocatableRow]] | None = None):
        self.socket_path = socket_path
        self.list_fn = list_fn
        self.allocatable_fn = allocatable_fn
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._down = False
        self._delay = 0.0
        self._padding: list[pb.PodResources] = []
        # Set on stop() so a handler sleeping for set_delay() returns at once.
        self._stopping = threading.Event()

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._stopping.clear()
        executor = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="sim-kubelet")
        server = grpc.server(executor)
        pb_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)
        try:
            server.add_insecure_port(f"unix://{os.path.abspath(self.socket_path)}")
        except RuntimeError as e:
            executor.shutdown(wait=False)
            raise OSError(f"simulated kubelet cannot listen on {self.socket_path}: {e}") from e
        server.start()
        self._server, self._executor = server, executor
        return self

    def stop(self) -> None:
        """Stop serving and remove the socket, as a kubelet that went away leaves none behind."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        if self._executor is not None:
            # grpc does not own the pool it was given: its worker threads would outlive the server
            self._executor.shutdown(wait=True)
            self._executor = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def set_down(self, down: bool) -> None:
        """While down, every call is answered UNAVAILABLE (the socket stays)."""
        self._down = down

    def set_delay(self, seconds: float) -> None:
        """Each call waits this long (real time) before answering: proves a slow kubelet blocks no scrape."""
        self._delay = max(0.0, seconds)

    def set_padding_pods(self, n: int) -> None:
        """Add n synthetic pods (~10 KiB each, non-GPU resource) to List; 600 make the reply exceed 5 MiB."""
        self._padding = _padding(max(0, n))

    def _fault(self, context: grpc.ServicerContext) -> None:
        if self._delay > 0:
            self._stopping.wait(self._delay)
        if self._down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated kubelet is down")
