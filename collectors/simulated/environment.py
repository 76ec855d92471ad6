"""The whole simulated node: NVML, a real gRPC kubelet on a temp unix socket, pod metadata, a
procfs of cgroup files, and real HTTP inference endpoints on loopback, all driven by one scenario.

Only the hardware and the cluster are simulated: the agent reads them through the same collectors
it uses on a real node (NVML collector over the simulated `pynvml`, PodResources gRPC client,
process resolver over a procfs folder, inference scraper over HTTP).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Self

from collectors.base import SourceUnavailable
from collectors.kubernetes import KubeMetadata, PodMeta, build_metadata
from collectors.processes import write_fake_proc
from collectors.simulated.clock import SimClock
from collectors.simulated.inference import InferenceHTTPServer, render
from collectors.simulated.kubelet import SimulatedKubelet
from collectors.simulated.node import SimNode
from collectors.simulated.nvml import SimulatedNVML
from collectors.simulated.scenario import Scenario

log = logging.getLogger("gpucap.simulated")


def _cgroup_line(pod_uid: str, container_key: str) -> str:
    """A cgroup v2 line as containerd with the systemd driver writes it."""
    import hashlib

    cid = hashlib.sha256(container_key.encode()).hexdigest()
    uid = pod_uid.replace("-", "_")
    return (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/"
            f"cri-containerd-{cid}.scope\n")


class SimulatedMetadata:
    """The Kubernetes API's view of the node, from the scenario (no HTTP in simulation)."""

    name = "kubernetes"

    def __init__(self, env: SimEnvironment):
        self.env = env
        self._last: KubeMetadata | None = None

    def collect(self, now: float) -> KubeMetadata:
        env = self.env
        t = env.clock.scenario_time()
        env.sync(t)
        if env.node.fault("source_down", t, source="kubernetes"):
            if self._last is None:
                raise SourceUnavailable("kubernetes", "simulated API server down")
            return KubeMetadata(self._last.node, self._last.pods, True, self._last.refreshed_at)
        sc = env.sc
        ns_labels = dict(sc.namespaces)
        pods = []
        for p in sc.pods:
            if not p.alive(t):
                continue
            labels = dict(p.labels)
            annotations = dict(p.annotations)
            port = env.inference_ports.get(p.uid)
            if port is not None:
                annotations.setdefault("gpucap.io/metrics-port", str(port))
            team = ""
            for key in env.team_label_keys:
                team = labels.get(key) or ""
                if team:
                    break
            if not team:
                nsl = dict(ns_labels.get(p.namespace, ()))
                team = next((nsl[k] for k in env.team_label_keys if nsl.get(k)), "")
            pods.append(PodMeta(
                uid=p.uid, namespace=p.namespace, name=p.name, phase="Running", node_name=sc.node_name,
                labels=tuple(sorted(labels.items())), annotations=tuple(sorted(annotations.items())),
                workload_kind=p.owner_kind, workload=p.owner_name, team=team, pod_ip="127.0.0.1",
                containers=tuple((c.name, "") for c in p.containers),
            ))
        self._last = build_metadata(sc.node_name, dict(sc.node_labels), dict(sc.node_annotations), pods, now)
        return self._last

    def close(self) -> None:
        pass


class SimEnvironment:
    def __init__(self, sc: Scenario, clock: SimClock, *, kubelet: bool = True, inference: bool = True,
                 team_label_keys: tuple[str, ...] = ("team", "app.kubernetes.io/part-of")):
        self.sc = sc
        self.clock = clock
        self.node = SimNode(sc)
        self.nvml = SimulatedNVML(self.node, clock)
        self.team_label_keys = team_label_keys
        self.tmp = tempfile.mkdtemp(prefix="gpucap-sim-")
        self.procfs = os.path.join(self.tmp, "proc")
        os.makedirs(self.procfs)
        for a in self.node.allocations:
            write_fake_proc(self.procfs, a.pid, _cgroup_line(a.pod.uid, f"{a.pod.uid}/{a.container.name}"))
        for hp in sc.host_processes:
            write_fake_proc(self.procfs, hp.pid, "0::/system.slice/stray-training.service\n")
        self.kubelet_socket = os.path.join(self.tmp, "kubelet.sock")
        self.kubelet: SimulatedKubelet | None = None
        if kubelet:
            self.kubelet = SimulatedKubelet(self.kubelet_socket, self._list, self._allocatable)
            self.kubelet.start()
        self.inference_servers: dict[str, InferenceHTTPServer] = {}
        self.inference_ports: dict[str, int] = {}
        if inference:
            for p in sc.pods:
                if p.inference is None:
                    continue
                srv = InferenceHTTPServer(self._renderer(p.uid, p.inference.old_names))
                srv.start()
                self.inference_servers[p.uid] = srv
                self.inference_ports[p.uid] = int(srv.url.rsplit(":", 1)[1].split("/")[0])
        self.metadata = SimulatedMetadata(self)
        self._applied: dict[str, object] = {}

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
        """The scenario's kubelet outage, checked at each call (a gRPC error reaches the client)."""
        if self.node.fault("source_down", t, source="kubelet") is not None:
            raise ConnectionError("simulated kubelet outage (scenario fault source_down)")

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

    # --- inference ----------------------------------------------------------------------------
    def _renderer(self, uid: str, old_names: bool):
        def fn() -> str:
            self.node.advance(self._t())
            tm = self.node.traffic(uid)
            return render(tm.state, vllm_old_names=old_names)
        return fn

    def sync(self, t: float) -> None:
        """Apply the scenario's source faults at scenario time t."""
        # only changes are applied, so a test (or a person) may also set faults by hand
        down = self.node.fault("source_down", t, source="inference") is not None
        slow = self.node.fault("slow", t, source="inference") is not None
        mode = "http_500" if down else "hang" if slow else "ok"
        if mode != self._applied.get("inference", "ok"):
            for srv in self.inference_servers.values():
                srv.fault = mode
        self._applied["inference"] = mode

    def close(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop()
        for srv in self.inference_servers.values():
            srv.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
