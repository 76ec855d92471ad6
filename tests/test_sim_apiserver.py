"""The simulated node's Kubernetes API: the real `KubernetesCollector`, through the real `kubernetes`
client, reads the scenario from a loopback API server that follows simulated time."""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from collectors.kubernetes import KubeMetadata, KubernetesCollector, PodMeta
from collectors.podresources import PodResourcesCollector
from collectors.processes import parse_cgroup
from collectors.simulated.clock import SimClock
from collectors.simulated.environment import SimEnvironment
from collectors.simulated.scenario import load_scenario
from tests.conftest import SIM_START

pytest.importorskip("kubernetes")

Write = Callable[[str, str], Path]
# Loopback is never proxied, whatever HTTP_PROXY says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

OWNERS = """
name: owners
node:
  name: sim-owners
  labels: {node.kubernetes.io/instance-type: g6.12xlarge, karpenter.sh/capacity-type: spot}
  annotations: {gpucap.io/gpu-hourly-price: "1.25"}
gpus: {model: L4, count: 4}
namespaces:
  ml: {labels: {team: ml-platform}}
pods:
  - namespace: ml
    name: web-6b8c9-k7s2p
    owner: {kind: Deployment, name: web}
    labels: {team: search}
    containers: [{name: vllm, gpus: 1, load: {pattern: constant, level: 0.5}}]
    inference: {server: vllm, capacity_rps: 10, traffic: {pattern: constant, level: 2}}
  - namespace: ml
    name: train-0-worker-0
    owner: {kind: Job, name: train}
    containers: [{name: trainer, gpus: 1, load: {pattern: constant, level: 0.9}}]
  - namespace: ml
    name: nightly-28461-5xk2q
    owner: {kind: CronJob, name: nightly}
    containers: [{name: eval, gpus: 1}]
  - namespace: infra
    name: db-0
    owner: {kind: StatefulSet, name: db}
    containers: [{name: main}]
  - namespace: infra
    name: exporter-abcde
    owner: {kind: DaemonSet, name: exporter}
    containers: [{name: main}]
  - namespace: infra
    name: loose-55d-x2
    owner: {kind: ReplicaSet, name: loose-55d}
    containers: [{name: main}]
  - namespace: infra
    name: notebook
    owner: {kind: Pod, name: ignored}
    containers: [{name: main, gpus: 1}]
    start: 0s
    end: 10m
  - namespace: infra
    name: late
    containers: [{name: main}]
    start: 20m
faults:
  - {kind: source_down, source: kubernetes, at: 30m, until: 40m}
"""


@contextmanager
def environment(path: Path, **kw: bool) -> Iterator[SimEnvironment]:
    env = SimEnvironment(load_scenario(str(path)), SimClock(start=SIM_START, realtime=False), **kw)
    try:
        yield env
    finally:
        env.close()


def at(env: SimEnvironment, seconds: float) -> float:
    """Move the virtual clock to `seconds` of scenario time; returns `now` for collect()."""
    env.clock.advance(seconds - env.clock.scenario_time())
    return env.clock.now()


def by_name(meta: KubeMetadata) -> dict[str, PodMeta]:
    return {p.name: p for p in meta.pods}


def test_the_real_collector_resolves_owner_chains_from_the_simulated_api(scenario_file: Write) -> None:
    with environment(scenario_file("owners", OWNERS)) as env:
        assert isinstance(env.metadata, KubernetesCollector)
        pods = by_name(env.metadata.collect(at(env, 60)))
        got = {name: (p.workload_kind, p.workload, p.team) for name, p in pods.items()}
        assert got == {
            "web-6b8c9-k7s2p": ("Deployment", "web", "search"),  # not its ReplicaSet
            "train-0-worker-0": ("Job", "train", "ml-platform"),
            "nightly-28461-5xk2q": ("CronJob", "nightly", "ml-platform"),  # not its Job
            "db-0": ("StatefulSet", "db", ""),
            "exporter-abcde": ("DaemonSet", "exporter", ""),
            "loose-55d-x2": ("ReplicaSet", "loose-55d", ""),
            "notebook": ("Pod", "notebook", ""),  # a bare pod is its own workload
        }
        # the owner chain as a real cluster serves it: the pod names its ReplicaSet, which names the Deployment
        pod = _get(env, "/api/v1/namespaces/ml/pods")
        web = next(p for p in pod["items"] if p["metadata"]["name"] == "web-6b8c9-k7s2p")
        (ref,) = web["metadata"]["ownerReferences"]
        assert ref["kind"] == "ReplicaSet" and re.fullmatch(r"web-[0-9a-f]{10}", ref["name"])
        rs = _get(env, f"/apis/apps/v1/namespaces/ml/replicasets/{ref['name']}")
        assert rs["metadata"]["uid"] == ref["uid"]
        assert [(o["kind"], o["name"]) for o in rs["metadata"]["ownerReferences"]] == [("Deployment", "web")]

        web_meta = pods["web-6b8c9-k7s2p"]
        assert web_meta.pod_ip == "127.0.0.1" and web_meta.phase == "Running"
        assert web_meta.annotation("gpucap.io/metrics-port") == str(env.inference_ports[web_meta.uid])
        node = env.metadata.collect(at(env, 70)).node
        assert (node.name, node.instance_type, node.capacity_type) == ("sim-owners", "g6.12xlarge", "spot")
        assert node.annotation("gpucap.io/gpu-hourly-price") == "1.25"


def test_container_ids_are_the_ones_in_the_simulated_cgroups(scenario_file: Write) -> None:
    with environment(scenario_file("owners", OWNERS), inference=False) as env:
        pods = {p.uid: p for p in env.metadata.collect(at(env, 60)).pods}
        checked = 0
        for a in env.node.allocations:
            with open(os.path.join(env.procfs, str(a.pid), "cgroup"), encoding="utf-8") as f:
                owner = parse_cgroup(f.read())
            assert owner is not None and owner.pod_uid == a.pod.uid
            assert pods[a.pod.uid].container_id(a.container.name) == owner.container_id
            checked += 1
        assert checked == 4


def test_pods_start_and_end_with_simulated_time(scenario_file: Write) -> None:
    with environment(scenario_file("owners", OWNERS), kubelet=False, inference=False) as env:
        kc = env.metadata
        early = by_name(kc.collect(at(env, 5 * 60)))
        assert "notebook" in early and "late" not in early
        gone = by_name(kc.collect(at(env, 10 * 60)))  # end is exclusive: gone at 10m sharp
        assert "notebook" not in gone and "late" not in gone and "db-0" in gone
        assert "late" in by_name(kc.collect(at(env, 20 * 60)))


def test_a_kubernetes_outage_serves_the_last_metadata_as_stale(scenario_file: Write) -> None:
    with environment(scenario_file("owners", OWNERS), kubelet=False, inference=False) as env:
        kc = env.metadata
        fresh = kc.collect(at(env, 29 * 60))
        assert not fresh.stale
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(env, "/api/v1/pods", scenario_seconds=31 * 60)
        assert e.value.code == 503
        stale = kc.collect(env.clock.now())
        assert stale.stale and stale.refreshed_at == fresh.refreshed_at and stale.pods == fresh.pods
        back = kc.collect(at(env, 40 * 60))
        assert not back.stale and back.refreshed_at == env.clock.now()


def test_an_outage_before_any_read_is_unavailable(scenario_file: Write) -> None:
    from collectors.base import SourceUnavailable

    text = OWNERS.replace("at: 30m, until: 40m", "at: 0s, until: 5m")
    with environment(scenario_file("down-first", text), kubelet=False, inference=False) as env:
        with pytest.raises(SourceUnavailable, match="503"):
            env.metadata.collect(at(env, 60))
        assert len(env.metadata.collect(at(env, 5 * 60)).pods) == 7


def test_close_stops_the_servers_and_leaves_no_thread_or_temp_dir(scenario_file: Write) -> None:
    path = scenario_file("owners", OWNERS)
    before = {t.ident for t in threading.enumerate()}
    env = SimEnvironment(load_scenario(str(path)), SimClock(start=SIM_START, realtime=False))
    url = env.api.url if env.api is not None else ""
    kubelet = PodResourcesCollector(env.kubelet_socket, timeout=5.0)
    for t in (60, 120, 180):
        env.metadata.collect(at(env, t))  # keep-alive connections are open now
        kubelet.collect(env.clock.now())
        for srv in env.inference_servers.values():
            _OPENER.open(srv.url, timeout=5).close()
    kubelet.close()
    env.close()
    env.close()  # twice is fine
    assert not os.path.exists(env.tmp)
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert left == [], left
    with pytest.raises(OSError):
        _OPENER.open(url + "/api/v1/nodes/sim-owners", timeout=2)


def _get(env: SimEnvironment, path: str, scenario_seconds: float | None = None) -> dict:
    if scenario_seconds is not None:
        at(env, scenario_seconds)
    assert env.api is not None
    with _OPENER.open(env.api.url + path, timeout=5) as r:
        return json.loads(r.read())
