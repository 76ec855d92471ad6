"""The whole simulated node: NVML, a real gRPC kubelet on a temp unix socket, a real Kubernetes API
server and real HTTP inference endpoints on loopback, and a procfs of cgroup files, all driven by one
scenario.

Only the hardware and the cluster are simulated: the agent reads them through the same collectors
it uses on a real node (NVML collector over the simulated `pynvml`, PodResources gRPC client,
`KubernetesCollector` over the `kubernetes` client, process resolver over a procfs folder, inference
scraper over HTTP). Every simulated server answers from the scenario at the simulated time of the
request, so pods start and end, and sources go down, while the servers keep running.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from collectors.kubernetes import KubernetesCollector
from collectors.simulated import apiserver as api
from collectors.simulated.clock import SimClock
from collectors.simulated.inference import InferenceHTTPServer, render
from collectors.simulated.kubelet import KubeletUnavailable, SimulatedKubelet
from collectors.simulated.node import SimNode
from collectors.simulated.nvml import SimulatedNVML
from collectors.simulated.procfs import cgroup_line, container_id, write_fake_proc
from collectors.simulated.scenario import PodSpec, Scenario

log = logging.getLogger("gpucap.simulated")

# Loopback answers in milliseconds; a request still waiting after this is a hung server, not a slow one.
API_REQUEST_TIMEOUT = 2.0


def _controllers(p: PodSpec) -> tuple[tuple[str, str] | None, tuple[str, str, tuple[str, str] | None] | None]:
    """The pod's controller reference, and the intermediate object the API must serve for it.

    As the controllers name them: a Deployment's pods belong to a ReplicaSet `<deployment>-<hash>`,
    a CronJob's to a Job `<cronjob>-<n>`; the other kinds own their pods directly, and a bare pod
    has no owner (its workload is its own name).
    """
    kind, name = p.owner_kind, p.owner_name
    digest = hashlib.sha256(f"{p.namespace}/{kind}/{name}".encode()).hexdigest()
    if kind == "Deployment":
        rs = f"{name}-{digest[:10]}"
        return ("ReplicaSet", rs), ("ReplicaSet", rs, (kind, name))
    if kind == "CronJob":
        job = f"{name}-{int(digest[:8], 16) % 10**8:08d}"
        return ("Job", job), ("Job", job, (kind, name))
    if kind in ("ReplicaSet", "Job"):
        return (kind, name), (kind, name, None)
    if kind == "Pod":
        return None, None
    return (kind, name), None  # StatefulSet, DaemonSet: no intermediate object is read


class SimEnvironment:
    """Starts the simulated node's servers and hands the agent the real collectors' endpoints.

    `metadata` is a real `KubernetesCollector` on the simulated API server, so the simulation tests
    the owner resolution, caching and stale-on-outage behaviour a real node runs. `close()` stops
    every server (no thread is left) and removes the temp dir (sockets, procfs).
    """

    def __init__(self, sc: Scenario, clock: SimClock, *, kubelet: bool = True, inference: bool = True,
                 team_label_keys: tuple[str, ...] = ("team", "app.kubernetes.io/part-of"),
                 resync_seconds: float = 60.0):
        self.sc = sc
        self.clock = clock
        self.node = SimNode(sc)
        self.nvml = SimulatedNVML(self.node, clock)
        self.team_label_keys = team_label_keys
        self._applied: dict[str, object] = {}
        self._sync_lock = threading.Lock()
        self.tmp = tempfile.mkdtemp(prefix="gpucap-sim-")
        self.kubelet: SimulatedKubelet | None = None
        self.inference_servers: dict[str, InferenceHTTPServer] = {}
        self.inference_ports: dict[str, int] = {}
        self.api: api.SimulatedApiServer | None = None
        self._api_client: Any = None
        try:
            self._start(kubelet, inference, resync_seconds)
        except BaseException:
            self.close()  # a server that failed to start must not leave the others running
            raise

    def _start(self, kubelet: bool, inference: bool, resync_seconds: float) -> None:
        sc = self.sc
        self.procfs = os.path.join(self.tmp, "proc")
        os.makedirs(self.procfs)
        for a in self.node.allocations:
            write_fake_proc(self.procfs, a.pid, cgroup_line(a.pod.uid, a.container.name))
        for hp in sc.host_processes:
            write_fake_proc(self.procfs, hp.pid, "0::/system.slice/stray-training.service\n")
        self.kubelet_socket = os.path.join(self.tmp, "kubelet.sock")
        if kubelet:
            self.kubelet = SimulatedKubelet(self.kubelet_socket, self._list, self._allocatable)
            self.kubelet.start()
        if inference:
            for p in sc.pods:
                if p.inference is None:
                    continue
                srv = InferenceHTTPServer(self._renderer(p.uid, p.inference.old_names),
                                          before_request=self._sync_now)
                srv.start()
                self.inference_servers[p.uid] = srv
                self.inference_ports[p.uid] = int(srv.url.rsplit(":", 1)[1].split("/")[0])
        self._pod_objects = {p.uid: self._pod_object(p) for p in sc.pods}
        self._served: frozenset[str] = frozenset()
        self.api = api.SimulatedApiServer(on_request=self._serve_cluster)
        self._load_cluster(self.api)
        self.api.start()
        try:
            self._api_client = api.api_client_for(self.api.url)
        except ImportError:
            # Without the package the collector itself reports the source unavailable (and, with no
            # client, it stops at the import: it never looks for a real cluster).
            self._api_client = None
        self.metadata = KubernetesCollector(sc.node_name, team_label_keys=self.team_label_keys,
                                            api_client=self._api_client, resync_seconds=resync_seconds,
                                            request_timeout=API_REQUEST_TIMEOUT)

    # --- Kubernetes API ------------------------------------------------------------------------
    def _pod_object(self, p: PodSpec) -> dict[str, Any]:
        annotations = dict(p.annotations)
        port = self.inference_ports.get(p.uid)
        if port is not None:
            annotations.setdefault("gpucap.io/metrics-port", str(port))
        owner, _ = _controllers(p)
        return api.pod(p.namespace, p.name, self.sc.node_name, uid=p.uid, labels=dict(p.labels),
                       annotations=annotations, owner=owner, pod_ip="127.0.0.1",
                       containers=[(c.name, f"containerd://{container_id(p.uid, c.name)}") for c in p.containers])

    def _load_cluster(self, server: api.SimulatedApiServer) -> None:
        """What does not change over simulated time: the node, namespaces, ReplicaSets and Jobs."""
        sc = self.sc
        server.add_node(api.node(sc.node_name, dict(sc.node_labels), dict(sc.node_annotations)))
        ns_labels = {name: dict(labels) for name, labels in sc.namespaces}
        for p in sc.pods:
            ns_labels.setdefault(p.namespace, {})
        for name, labels in ns_labels.items():
            server.add_namespace(api.namespace(name, labels))
        for p in sc.pods:
            _, served = _controllers(p)
            if served is None:
                continue
            kind, name, parent = served
            if kind == "ReplicaSet":
                server.add_replicaset(api.replicaset(p.namespace, name, owner=parent))
            else:
                server.add_job(api.job(p.namespace, name, owner=parent))

    def _serve_cluster(self) -> None:
        """Called by the API server at each request: pods alive now, and the scenario's outage."""
        server = self.api
        if server is None:
            return
        t = self._t()
        down = self.node.fault("source_down", t, source="kubernetes") is not None
        if down != self._applied.get("kubernetes", False):
            # only changes are applied, so a test may also take the API down by hand
            if down and server.mode == api.UP:
                server.set_down(api.UNAVAILABLE)
            elif not down and server.mode == api.UNAVAILABLE:
                server.set_up()
            self._applied["kubernetes"] = down
        alive = frozenset(p.uid for p in self.sc.pods if p.alive(t))
        if alive == self._served:
            return
        for p in self.sc.pods:
            if p.uid in alive and p.uid not in self._served:
                server.add_pod(self._pod_objects[p.uid])
            elif p.uid in self._served and p.uid not in alive:
                server.remove_pod(p.namespace, p.name)
        self._served = alive

    # --- kubelet ----------------------------------------------------------------------------
    def _t(self) -> float:
        return self.clock.scenario_time()

    def _list(self) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
        t = self._t()
        self._kubelet_fault(t)
        slow = self.node.fault("slow", t, source="kubelet")
        if slow is not None and self.clock.realtime:
            time.sleep(slow.delay)
        rows: dict[tuple[str, str, str, str], list[str]] = {}
        for p in self.sc.pods:
            if not p.alive(t):
                continue
            for c in p.containers:
                rows.setdefault((p.namespace, p.name, c.name, ""), [])
        for a in self.node.live_allocations(t):
            rows.setdefault((a.pod.namespace, a.pod.name, a.container.name, a.resource), []).append(a.device_id)
        return [(ns, pod, c, res, tuple(ids)) for (ns, pod, c, res), ids in rows.items()
                if res or not any(k[:3] == (ns, pod, c) and k[3] for k in rows)]

    def _kubelet_fault(self, t: float) -> None:
        """The scenario's kubelet outage, checked at each call: the client sees UNAVAILABLE."""
        if self.node.fault("source_down", t, source="kubelet") is not None:
            raise KubeletUnavailable("simulated kubelet outage (scenario fault source_down)")

    def _allocatable(self) -> list[tuple[str, tuple[str, ...]]]:
        self._kubelet_fault(self._t())
        by_res: dict[str, list[str]] = {}
        for g in self.sc.gpus:
            if g.mig is not None:
                for m in g.mig:
                    by_res.setdefault(f"nvidia.com/mig-{m.profile}", []).append(m.uuid)
            elif self.sc.replicas > 1:
                by_res.setdefault(self.sc.shared_resource, []).extend(f"{g.uuid}::{r}" for r in range(self.sc.replicas))
            else:
                by_res.setdefault("nvidia.com/gpu", []).append(g.uuid)
        return [(k, tuple(v)) for k, v in by_res.items()]

    # --- fast-forward --------------------------------------------------------------------------
    def answer_key(self, source: str) -> tuple[int, str] | None:
        """A fingerprint of what the kubelet's (`source="kubelet"`) or the API server's
        (`"kubernetes"`) answer depends on right now, or None when nothing can be promised.

        Both answer from the scenario's pod set and node, which change only when a pod starts or
        ends (the SimNode's epoch): equal keys mean a real read would return the same reading, so
        fast-forward may serve the last one again. While a scenario fault of that source is active,
        or a test has taken its server down or slowed it by hand, the answer is None: every read is
        a real one and the outage is seen exactly as a fine-step run sees it.
        """
        t = self._t()
        if any(f.source == source and f.active(t) for f in self.sc.faults if f.kind in ("source_down", "slow")):
            return None
        if source == "kubelet":
            k = self.kubelet
            if k is None or k._down or k._delay > 0 or k._padding:
                return None
        elif source == "kubernetes":
            if self.api is None or self.api.mode != api.UP:
                return None
        else:
            return None
        return (self.node.epoch(t), source)

    # --- inference ----------------------------------------------------------------------------
    def _renderer(self, uid: str, old_names: bool) -> Callable[[], str]:
        def fn() -> str:
            self.node.advance(self._t())
            tm = self.node.traffic(uid)
            return render(tm.state, vllm_old_names=old_names)
        return fn

    def _sync_now(self) -> None:
        self.sync(self._t())

    def sync(self, t: float) -> None:
        """Apply the scenario's inference faults at scenario time t (each server calls this per request)."""
        # only changes are applied, so a test (or a person) may also set faults by hand
        down = self.node.fault("source_down", t, source="inference") is not None
        slow = self.node.fault("slow", t, source="inference") is not None
        mode = "http_500" if down else "hang" if slow else "ok"
        with self._sync_lock:
            if mode != self._applied.get("inference", "ok"):
                for srv in self.inference_servers.values():
                    srv.fault = mode
            self._applied["inference"] = mode

    def close(self) -> None:
        """Stop every server and remove the temp dir; safe to call twice and after a failed start."""
        metadata = getattr(self, "metadata", None)
        if metadata is not None:
            metadata.close()
        if self._api_client is not None:
            self._api_client.close()
            self._api_client = None
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.kubelet is not None:
            self.kubelet.stop()
        for srv in self.inference_servers.values():
            srv.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
