"""Kubelet PodResources: device-ID parsing, and the collector against a real gRPC server on a unix socket."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from collectors.base import SourceError, SourceUnavailable
from collectors.podresources import (
    ContainerDevice,
    DeviceRef,
    KubeletRpcError,
    PodResourcesCollector,
    is_gpu_resource,
    parse_device_id,
)
from collectors.proto import podresources_pb2 as pb
from collectors.proto import podresources_pb2_grpc as pb_grpc
from collectors.simulated.kubelet import KubeletUnavailable, SimulatedKubelet

GPU0 = "GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61"
GPU1 = "GPU-c1a9e3f2-6d0b-4a8e-91f7-3b2d5e6f7a80"
MIG0 = "MIG-4f5e6d7c-8b9a-5c1d-a2e3-f4a5b6c7d8e9"


def ref(kind: str, resource: str, uuid: str = "", *, parent: str = "", index: int | None = None,
        gi: int | None = None, ci: int | None = None, replica: int | None = None, vgpu: int | None = None,
        profile: str = "", shared: bool = False) -> DeviceRef:
    return DeviceRef(kind=kind, uuid=uuid, parent_uuid=parent, gpu_index=index, gi=gi, ci=ci, replica=replica,
                     vgpu=vgpu, resource=resource, mig_profile=profile, shared=shared)


@pytest.mark.parametrize(("resource", "device_id", "expected"), [
    # full GPU, UUID strategy (the device plugin's default)
    ("nvidia.com/gpu", "GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61",
     ref("gpu", "nvidia.com/gpu", "GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61")),
    # MIG, mixed strategy, R470+ UUIDs
    ("nvidia.com/mig-3g.40gb", "MIG-4f5e6d7c-8b9a-5c1d-a2e3-f4a5b6c7d8e9",
     ref("mig", "nvidia.com/mig-3g.40gb", "MIG-4f5e6d7c-8b9a-5c1d-a2e3-f4a5b6c7d8e9", profile="3g.40gb")),
    # MIG, single strategy: the resource is plain nvidia.com/gpu
    ("nvidia.com/gpu", "MIG-4f5e6d7c-8b9a-5c1d-a2e3-f4a5b6c7d8e9",
     ref("mig", "nvidia.com/gpu", "MIG-4f5e6d7c-8b9a-5c1d-a2e3-f4a5b6c7d8e9")),
    # legacy MIG (R450/R460 drivers)
    ("nvidia.com/mig-1g.5gb", "MIG-GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61/7/0",
     ref("mig_legacy", "nvidia.com/mig-1g.5gb", "MIG-GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61/7/0",
         parent="GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61", gi=7, ci=0, profile="1g.5gb")),
    # time-slicing replicas, without and with renameByDefault
    ("nvidia.com/gpu", "GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61::3",
     ref("gpu", "nvidia.com/gpu", "GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61", replica=3, shared=True)),
    ("nvidia.com/gpu.shared", "GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61::0",
     ref("gpu", "nvidia.com/gpu.shared", "GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61", replica=0, shared=True)),
    # a time-sliced MIG instance
    ("nvidia.com/mig-1g.10gb.shared", "MIG-4f5e6d7c-8b9a-5c1d-a2e3-f4a5b6c7d8e9::1",
     ref("mig", "nvidia.com/mig-1g.10gb.shared", "MIG-4f5e6d7c-8b9a-5c1d-a2e3-f4a5b6c7d8e9", replica=1,
         profile="1g.10gb", shared=True)),
    # GKE's own device plugin
    ("nvidia.com/gpu", "nvidia0", ref("gke_gpu", "nvidia.com/gpu", index=0)),
    ("nvidia.com/gpu", "nvidia3/gi2", ref("gke_mig", "nvidia.com/gpu", index=3, gi=2)),
    ("nvidia.com/gpu", "nvidia1/vgpu4", ref("gke_vgpu", "nvidia.com/gpu", index=1, vgpu=4, shared=True)),
    ("nvidia.com/gpu", "nvidia2/gi1/vgpu0",
     ref("gke_vgpu", "nvidia.com/gpu", index=2, gi=1, vgpu=0, shared=True)),
])
def test_parse_device_id_formats(resource: str, device_id: str, expected: DeviceRef) -> None:
    assert parse_device_id(resource, device_id) == expected


@pytest.mark.parametrize("device_id", [
    "", "0", "GPU-", "MIG-", "MIG-GPU-5b4e0e43-8bb5-2dd7-2c5e-8e4d1c9f0a61", "MIG-GPU-5b4e0e43/7",
    "GPU-5b4e0e43::", "GPU-5b4e0e43::x", "nvidia", "nvidiaX", "nvidia0/gpu1", "gpu-5b4e0e43", "GPU-5b4e/0",
])
def test_parse_device_id_rejects_unknown(device_id: str) -> None:
    assert parse_device_id("nvidia.com/gpu", device_id) is None


def test_is_gpu_resource() -> None:
    for name in ("nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-2g.20gb"):
        assert is_gpu_resource(name)
    for name in ("cpu", "amd.com/gpu", "example.com/nvidia.com/gpu", "intel.com/sriov"):
        assert not is_gpu_resource(name)


# --- end to end through a real gRPC server -------------------------------------------------------

Row = tuple[str, str, str, str, tuple[str, ...]]  # (namespace, pod, container, resource, device_ids)

ROWS: list[Row] = [
    ("ml", "train-0", "trainer", "nvidia.com/gpu", (GPU0, GPU1)),
    ("ml", "train-0", "trainer", "example.com/nic", ("nic-0",)),
    ("ml", "train-0", "sidecar", "", ()),
    ("serve", "vllm-a", "vllm", "nvidia.com/mig-3g.40gb", (MIG0,)),
    ("serve", "chat-1", "server", "nvidia.com/gpu.shared", ("GPU-aaaaaaaa-0000-1111-2222-333333333333::2",)),
    ("kube-system", "coredns", "coredns", "", ()),
]
ALLOCATABLE = [
    ("nvidia.com/gpu", (GPU0, GPU1)),
    ("nvidia.com/mig-3g.40gb", (MIG0,)),
    ("example.com/nic", ("nic-0", "nic-1")),
]


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be too long.
    d = tempfile.mkdtemp(prefix="gpk", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rows() -> list[Row]:
    """The pods the kubelet serves, read at each call: tests edit it in place."""
    return list(ROWS)


@pytest.fixture
def kubelet(sock_dir: str, rows: list[Row]) -> Iterator[SimulatedKubelet]:
    with SimulatedKubelet(os.path.join(sock_dir, "kubelet.sock"), lambda: rows, lambda: ALLOCATABLE) as k:
        yield k


@pytest.fixture
def collector(kubelet: SimulatedKubelet) -> Iterator[PodResourcesCollector]:
    c = PodResourcesCollector(kubelet.socket_path, timeout=2.0)
    yield c
    c.close()


def test_list_maps_gpu_devices_to_containers(collector: PodResourcesCollector) -> None:
    reading = collector.collect(now=0.0)
    got = {(d.namespace, d.pod, d.container, d.resource, d.device_id): d.ref for d in reading.devices}
    assert set(got) == {
        ("ml", "train-0", "trainer", "nvidia.com/gpu", GPU0),
        ("ml", "train-0", "trainer", "nvidia.com/gpu", GPU1),
        ("serve", "vllm-a", "vllm", "nvidia.com/mig-3g.40gb", MIG0),
        ("serve", "chat-1", "server", "nvidia.com/gpu.shared", "GPU-aaaaaaaa-0000-1111-2222-333333333333::2"),
    }
    mig = got[("serve", "vllm-a", "vllm", "nvidia.com/mig-3g.40gb", MIG0)]
    assert mig is not None and (mig.kind, mig.uuid, mig.mig_profile) == ("mig", MIG0, "3g.40gb")
    share = got[("serve", "chat-1", "server", "nvidia.com/gpu.shared",
                 "GPU-aaaaaaaa-0000-1111-2222-333333333333::2")]
    assert share is not None and share.shared and share.replica == 2
    assert reading.unknown_ids == 0


def test_allocatable_lists_gpu_capacity_only(collector: PodResourcesCollector) -> None:
    reading = collector.collect(now=0.0)
    assert reading.allocatable == (
        ("nvidia.com/gpu", GPU0), ("nvidia.com/gpu", GPU1), ("nvidia.com/mig-3g.40gb", MIG0))


def test_old_kubelet_without_allocatable_is_not_an_error(sock_dir: str) -> None:
    with SimulatedKubelet(os.path.join(sock_dir, "old.sock"), lambda: ROWS, allocatable_fn=None) as k:
        c = PodResourcesCollector(k.socket_path, timeout=2.0)
        try:
            reading = c.collect(now=0.0)
        finally:
            c.close()
    assert reading.allocatable == ()
    assert len(reading.devices) == 4


def test_kubelet_down_then_back(kubelet: SimulatedKubelet, collector: PodResourcesCollector) -> None:
    kubelet.set_down(True)
    with pytest.raises(SourceError) as info:
        collector.collect(now=0.0)
    assert isinstance(info.value, KubeletRpcError) and info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.source == "podresources" and "UNAVAILABLE" in str(info.value)
    kubelet.set_down(False)
    assert len(collector.collect(now=10.0).devices) == 4


def test_kubelet_restart_is_seen_on_the_same_collector(kubelet: SimulatedKubelet, rows: list[Row],
                                                       collector: PodResourcesCollector) -> None:
    assert len(collector.collect(now=0.0).devices) == 4
    kubelet.stop()
    with pytest.raises(SourceUnavailable):
        collector.collect(now=10.0)
    rows.append(("ml", "new", "c", "nvidia.com/gpu", ("GPU-bbbbbbbb-0000-1111-2222-333333333333",)))
    kubelet.start()
    assert len(collector.collect(now=20.0).devices) == 5


def test_pods_leaving_disappear(rows: list[Row], collector: PodResourcesCollector) -> None:
    rows[:] = [r for r in ROWS if r[1] != "train-0"]
    assert {d.pod for d in collector.collect(now=0.0).devices} == {"vllm-a", "chat-1"}


def test_reply_over_5mib_is_received_and_over_default_4mib_limit(kubelet: SimulatedKubelet,
                                                                 collector: PodResourcesCollector) -> None:
    kubelet.set_padding_pods(600)
    with grpc.insecure_channel(f"unix://{kubelet.socket_path}",
                               options=[("grpc.max_receive_message_length", 2**30)]) as ch:
        size = pb_grpc.PodResourcesListerStub(ch).List(pb.ListPodResourcesRequest(), timeout=5).ByteSize()
    assert size > 5 * 2**20

    assert len(collector.collect(now=0.0).devices) == 4  # padding pods hold no nvidia.com resources

    small = PodResourcesCollector(kubelet.socket_path, timeout=2.0, max_message_bytes=4 * 2**20)
    try:
        with pytest.raises(SourceError) as info:
            small.collect(now=0.0)
    finally:
        small.close()
    assert isinstance(info.value, KubeletRpcError) and info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_socket_missing_is_unavailable(sock_dir: str) -> None:
    c = PodResourcesCollector(os.path.join(sock_dir, "absent.sock"))
    with pytest.raises(SourceUnavailable, match="not found"):
        c.collect(now=0.0)
    plain = os.path.join(sock_dir, "plain-file")
    open(plain, "w").close()
    with pytest.raises(SourceUnavailable, match="not a unix socket"):
        PodResourcesCollector(plain).collect(now=0.0)
    c.close()


@pytest.mark.parametrize("reply", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", os.urandom(4096), b""])
def test_garbage_on_the_kubelet_socket_is_a_clear_failure_within_the_deadline(sock_dir: str, reply: bytes) -> None:
    """Something that is not the kubelet's gRPC server on the socket (an HTTP/1 server, random bytes,
    a peer that closes at once): the collection fails with an error, in time, never hangs or crashes."""
    import socket
    import threading

    path = os.path.join(sock_dir, "garbage.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            try:
                conn.recv(65536)
                conn.sendall(reply)
            except OSError:
                pass
            finally:
                conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = PodResourcesCollector(path, timeout=1.0)
    start = time.monotonic()
    try:
        with pytest.raises(SourceError):
            c.collect(now=0.0)
    finally:
        c.close()
        stop.set()
        t.join(2)
        srv.close()
    assert time.monotonic() - start < 10


def test_slow_kubelet_times_out_within_the_deadline(kubelet: SimulatedKubelet, sock_dir: str) -> None:
    kubelet.set_delay(5.0)
    c = PodResourcesCollector(kubelet.socket_path, timeout=0.2)
    start = time.monotonic()
    try:
        with pytest.raises(KubeletRpcError) as info:
            c.collect(now=0.0)
    finally:
        c.close()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2.0


def test_unknown_ids_are_counted_logged_once_and_not_fatal(
        rows: list[Row], collector: PodResourcesCollector, caplog: pytest.LogCaptureFixture) -> None:
    rows.append(("ml", "odd", "c", "nvidia.com/gpu", ("weird-0", "weird-1", GPU0)))
    caplog.set_level(logging.WARNING, logger="collectors.podresources")
    for now in (0.0, 10.0):
        reading = collector.collect(now=now)
        assert reading.unknown_ids == 2
        odd = {d.device_id: d.ref for d in reading.devices if d.pod == "odd"}
        assert odd["weird-0"] is None and odd["weird-1"] is None and odd[GPU0] is not None
        assert len(reading.devices) == 7
    logged = [r for r in caplog.records if "weird-" in r.getMessage()]
    assert len(logged) == 2
    assert all(getattr(r, "collector", None) == "podresources" for r in logged)


def test_reading_is_immutable(collector: PodResourcesCollector) -> None:
    reading = collector.collect(now=0.0)
    assert isinstance(reading.devices, tuple) and isinstance(reading.devices[0], ContainerDevice)
    with pytest.raises(AttributeError):
        reading.unknown_ids = 5  # type: ignore[misc]


def test_simulated_get_answers_one_pod(kubelet: SimulatedKubelet) -> None:
    with grpc.insecure_channel(f"unix://{kubelet.socket_path}") as ch:
        stub = pb_grpc.PodResourcesListerStub(ch)
        request = pb.GetPodResourcesRequest(pod_name="train-0", pod_namespace="ml")
        pod = stub.Get(request, timeout=5).pod_resources
        with pytest.raises(grpc.RpcError) as info:
            stub.Get(pb.GetPodResourcesRequest(pod_name="nope", pod_namespace="ml"), timeout=5)
    assert [c.name for c in pod.containers] == ["trainer", "sidecar"]
    assert {d.resource_name: list(d.device_ids) for d in pod.containers[0].devices} == {
        "nvidia.com/gpu": [GPU0, GPU1], "example.com/nic": ["nic-0"]}
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _outage_is_quiet(k: SimulatedKubelet, capfd: pytest.CaptureFixture[str],
                     caplog: pytest.LogCaptureFixture) -> None:
    """Each call answers UNAVAILABLE and nothing is printed or logged with a traceback on the server."""
    with caplog.at_level(logging.DEBUG):
        c = PodResourcesCollector(k.socket_path, timeout=2.0)
        try:
            with pytest.raises(KubeletRpcError) as info:
                c.collect(now=0.0)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        finally:
            c.close()
        with grpc.insecure_channel(f"unix://{k.socket_path}") as ch:
            stub = pb_grpc.PodResourcesListerStub(ch)
            for call, request in ((stub.List, pb.ListPodResourcesRequest()),
                                  (stub.GetAllocatableResources, pb.AllocatableResourcesRequest()),
                                  (stub.Get, pb.GetPodResourcesRequest(pod_name="x", pod_namespace="y"))):
                with pytest.raises(grpc.RpcError) as e:
                    call(request, timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, call
                assert "outage" in (e.value.details() or "")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception calling application" not in err, err
    noisy = [r for r in caplog.records if r.exc_info or "Exception calling application" in r.getMessage()]
    assert noisy == [], [r.getMessage() for r in noisy]


def test_an_outage_raised_by_the_callables_is_unavailable_without_a_traceback(
        sock_dir: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    def down() -> list[Row]:
        raise KubeletUnavailable("simulated kubelet outage")

    with SimulatedKubelet(os.path.join(sock_dir, "kubelet.sock"), down, down) as k:
        _outage_is_quiet(k, capfd, caplog)


def test_a_scenario_kubelet_outage_is_unavailable_without_a_traceback(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from collectors.simulated.clock import SimClock
    from collectors.simulated.environment import SimEnvironment
    from collectors.simulated.scenario import load_scenario

    path = tmp_path / "down.yaml"
    path.write_text("name: down\nextends: demo\nfaults: [{kind: source_down, source: kubelet, at: 0s, until: 5m}]\n")
    with SimEnvironment(load_scenario(str(path)), SimClock(start=1_767_225_600.0), inference=False) as env:
        assert env.kubelet is not None
        _outage_is_quiet(env.kubelet, capfd, caplog)
        env.clock.advance(300)  # the fault ends: the same server answers again
        c = PodResourcesCollector(env.kubelet_socket, timeout=2.0)
        try:
            assert c.collect(now=env.clock.now()).devices
        finally:
            c.close()
