"""The Kubernetes metadata source, driven through the real client against a loopback API server."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collectors.base import SourceError, SourceUnavailable
from collectors.kubernetes import (
    KubeMetadata,
    KubernetesCollector,
    PodMeta,
    capacity_type_from_labels,
    metadata_from_objects,
    node_meta,
    resolve_owner,
    team_of,
)
from tests import fake_apiserver as fake

NODE = "gpu-node-1"
CID = "0123456789abcdef" * 4


# ---- pure functions -------------------------------------------------------------------

@pytest.mark.parametrize("labels, expected", [
    ({}, "on-demand"),
    ({"karpenter.sh/capacity-type": "spot"}, "spot"),
    ({"karpenter.sh/capacity-type": "on-demand"}, "on-demand"),
    ({"karpenter.sh/capacity-type": "reserved"}, "reserved"),
    ({"eks.amazonaws.com/capacityType": "SPOT"}, "spot"),
    ({"eks.amazonaws.com/capacityType": "ON_DEMAND"}, "on-demand"),
    ({"cloud.google.com/gke-spot": "true"}, "spot"),
    ({"cloud.google.com/gke-preemptible": "true"}, "spot"),
    ({"cloud.google.com/gke-spot": "false"}, "on-demand"),
    ({"kubernetes.azure.com/scalesetpriority": "spot"}, "spot"),
    ({"kubernetes.azure.com/scalesetpriority": "regular"}, "on-demand"),
    ({"karpenter.sh/capacity-type": "reserved", "eks.amazonaws.com/capacityType": "ON_DEMAND"}, "reserved"),
])
def test_capacity_type_is_normalized_across_providers(labels: dict[str, str], expected: str) -> None:
    assert capacity_type_from_labels(labels) == expected


def test_team_prefers_pod_label_then_namespace_label_then_nothing() -> None:
    keys = ("team", "app.kubernetes.io/part-of")
    assert team_of({"team": "search"}, {"team": "ml"}, keys) == "search"
    assert team_of({"app.kubernetes.io/part-of": "ranking"}, {"team": "ml"}, keys) == "ranking"
    assert team_of({}, {"team": "ml"}, keys) == "ml"
    assert team_of({"team": ""}, {"app.kubernetes.io/part-of": "infra"}, keys) == "infra"
    assert team_of({"other": "x"}, {}, keys) == ""


def test_resolve_owner_without_a_server() -> None:
    rs_refs = {("ml", "web-7f9c"): [{"kind": "Deployment", "name": "web", "controller": True}]}

    def lookup_rs(ns: str, name: str) -> list[dict[str, object]] | None:
        return rs_refs.get((ns, name))

    def lookup_job(ns: str, name: str) -> list[dict[str, object]] | None:
        return None

    def refs(kind: str, name: str) -> list[dict[str, object]]:
        # a non-controller reference listed first must not win over the controller
        return [{"kind": "ConfigMap", "name": "x"}, {"kind": kind, "name": name, "controller": True}]

    assert resolve_owner("ml", refs("ReplicaSet", "web-7f9c"), lookup_rs, lookup_job) == ("Deployment", "web")
    assert resolve_owner("ml", refs("ReplicaSet", "gone"), lookup_rs, lookup_job) == ("ReplicaSet", "gone")
    assert resolve_owner("ml", refs("Job", "once"), lookup_rs, lookup_job) == ("Job", "once")
    assert resolve_owner("ml", refs("LeaderWorkerSet", "lws"), lookup_rs, lookup_job) == ("LeaderWorkerSet", "lws")
    assert resolve_owner("ml", [], lookup_rs, lookup_job, pod_name="solo") == ("Pod", "solo")


def test_value_types_without_a_server() -> None:
    pod = PodMeta(uid="u1", namespace="ml", name="p", phase="Running", node_name=NODE, labels=(("team", "a"),),
                  annotations=(), workload_kind="Deployment", workload="web", team="a", pod_ip="10.0.0.1",
                  containers=(("main", CID),))
    node = node_meta(NODE, {"node.kubernetes.io/instance-type": "p5.48xlarge", "karpenter.sh/capacity-type": "spot",
                            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, {})
    meta = KubeMetadata(node=node, pods=(pod,), stale=False, refreshed_at=100.0)
    assert meta.node.instance_type == "p5.48xlarge"
    assert meta.node.capacity_type == "spot"
    assert meta.node.gpu_product == "NVIDIA-H100-80GB-HBM3"
    assert meta.pods == (pod,) and not meta.stale and meta.refreshed_at == 100.0
    assert meta.pod_by_uid("u1") is pod and pod.label("team") == "a" and pod.container_id("main") == CID


def test_metadata_from_objects_matches_api_shapes() -> None:
    meta = metadata_from_objects(
        fake.node(NODE, {"nvidia.com/gpu.sharing-strategy": "time-slicing"}),
        [fake.pod("ml", "web-7f9c-abcde", NODE, owner=("ReplicaSet", "web-7f9c")),
         fake.pod("ml", "done", NODE, phase="Succeeded")],
        [fake.namespace("ml", {"team": "ml"})],
        {("ml", "ReplicaSet", "web-7f9c"): [{"kind": "Deployment", "name": "web", "controller": True}]},
        ("team",), now=5.0)
    assert [(p.name, p.workload_kind, p.workload, p.team) for p in meta.pods] == [
        ("web-7f9c-abcde", "Deployment", "web", "ml")]
    assert meta.node.sharing_strategy == "time-slicing"


def test_module_imports_without_the_kubernetes_package() -> None:
    code = ("import sys; sys.modules['kubernetes'] = None\n"
            "from collectors.kubernetes import node_meta, KubernetesCollector\n"
            "from collectors.base import SourceUnavailable\n"
            "print(node_meta('n', {}, {}).capacity_type)\n"
            "try:\n    KubernetesCollector('n').collect(0.0)\nexcept SourceUnavailable as e:\n    print('unavailable')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == ["on-demand", "unavailable"]


# ---- through the loopback API server ---------------------------------------------------

@pytest.fixture
def api() -> Iterator[fake.FakeApiServer]:
    pytest.importorskip("kubernetes")
    server = fake.FakeApiServer()
    server.add_node(fake.node(NODE, {"node.kubernetes.io/instance-type": "p5.48xlarge",
                                     "eks.amazonaws.com/capacityType": "SPOT",
                                     "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                              {"gpucap.io/gpu-hourly-price": "3.10"}))
    server.add_namespace(fake.namespace("ml", {"team": "ml-platform"}))
    server.add_namespace(fake.namespace("infra"))
    server.add_replicaset(fake.replicaset("ml", "web-7f9c", owner=("Deployment", "web")))
    server.add_replicaset(fake.replicaset("ml", "loose-55d", owner=None))
    server.add_job(fake.job("ml", "nightly-2890", owner=("CronJob", "nightly")))
    server.add_job(fake.job("ml", "oneoff", owner=None))
    pods = [
        fake.pod("ml", "web-7f9c-x1", NODE, uid="uid-web", owner=("ReplicaSet", "web-7f9c"),
                 labels={"team": "search"}, containers=[("vllm", "containerd://" + CID), ("sidecar", "")]),
        fake.pod("ml", "loose-55d-x2", NODE, uid="uid-loose", owner=("ReplicaSet", "loose-55d")),
        fake.pod("ml", "nightly-2890-x3", NODE, uid="uid-cron", owner=("Job", "nightly-2890")),
        fake.pod("ml", "oneoff-x4", NODE, uid="uid-job", owner=("Job", "oneoff")),
        fake.pod("ml", "db-0", NODE, uid="uid-sts", owner=("StatefulSet", "db")),
        fake.pod("infra", "gpucap-abcde", NODE, uid="uid-ds", owner=("DaemonSet", "gpucap"),
                 labels={"app.kubernetes.io/part-of": "observability"}),
        fake.pod("infra", "notebook", NODE, uid="uid-bare"),
        fake.pod("ml", "finished", NODE, uid="uid-done", phase="Succeeded", owner=("Job", "oneoff")),
        fake.pod("ml", "crashed", NODE, uid="uid-failed", phase="Failed"),
        fake.pod("ml", "elsewhere", "gpu-node-2", uid="uid-other"),
    ]
    for p in pods:
        server.add_pod(p)
    with server:
        yield server


def collector(api: fake.FakeApiServer, **kwargs: float) -> KubernetesCollector:
    return KubernetesCollector(NODE, api_client=fake.api_client_for(api.url), **kwargs)


def by_name(meta: KubeMetadata) -> dict[str, PodMeta]:
    return {p.name: p for p in meta.pods}


def test_owner_chain_and_team_resolved_through_the_api(api: fake.FakeApiServer) -> None:
    pods = by_name(collector(api).collect(now=0.0))
    got = {name: (p.workload_kind, p.workload, p.team) for name, p in pods.items()}
    assert got == {
        "web-7f9c-x1": ("Deployment", "web", "search"),  # pod label beats the namespace's
        "loose-55d-x2": ("ReplicaSet", "loose-55d", "ml-platform"),
        "nightly-2890-x3": ("CronJob", "nightly", "ml-platform"),  # namespace label
        "oneoff-x4": ("Job", "oneoff", "ml-platform"),
        "db-0": ("StatefulSet", "db", "ml-platform"),
        "gpucap-abcde": ("DaemonSet", "gpucap", "observability"),  # second team key
        "notebook": ("Pod", "notebook", ""),  # no label anywhere
    }
    web = pods["web-7f9c-x1"]
    assert web.uid == "uid-web" and web.node_name == NODE and web.phase == "Running"
    assert web.containers == (("vllm", CID), ("sidecar", ""))


def test_node_labels_become_node_meta(api: fake.FakeApiServer) -> None:
    node = collector(api).collect(now=0.0).node
    assert (node.name, node.instance_type, node.capacity_type, node.gpu_product) == (
        NODE, "p5.48xlarge", "spot", "NVIDIA-H100-80GB-HBM3")
    assert node.annotation("gpucap.io/gpu-hourly-price") == "3.10"


def test_only_this_nodes_pods_are_listed(api: fake.FakeApiServer) -> None:
    meta = collector(api).collect(now=0.0)
    assert "elsewhere" not in by_name(meta)
    selectors = [q.get("fieldSelector") for path, q in api.queries if path == "/api/v1/pods"]
    assert selectors == [[f"spec.nodeName={NODE}"]]


def test_finished_pods_are_excluded(api: fake.FakeApiServer) -> None:
    names = by_name(collector(api).collect(now=0.0))
    assert "finished" not in names and "crashed" not in names


def test_deleted_pod_is_gone_at_the_next_collect(api: fake.FakeApiServer) -> None:
    kc = collector(api)
    assert "db-0" in by_name(kc.collect(now=0.0))
    api.delete_pod("ml", "db-0")
    api.add_pod(fake.pod("ml", "db-1", NODE, owner=("StatefulSet", "db")))
    names = by_name(kc.collect(now=1.0))
    assert "db-0" not in names and "db-1" in names


@pytest.mark.parametrize("mode", [fake.REFUSED, fake.UNAVAILABLE])
def test_api_down_serves_last_known_metadata_as_stale(api: fake.FakeApiServer, mode: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    kc = collector(api)
    fresh = kc.collect(now=10.0)
    api.set_down(mode)
    with caplog.at_level(logging.WARNING, logger="collectors.kubernetes"):
        first, second = kc.collect(now=20.0), kc.collect(now=30.0)
    for stale in (first, second):
        assert stale.stale and stale.refreshed_at == 10.0
        assert stale.pods == fresh.pods and stale.node == fresh.node
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # logged once, not per cycle
    api.set_up()
    again = kc.collect(now=40.0)
    assert not again.stale and again.refreshed_at == 40.0


def test_api_down_with_nothing_known_raises_unavailable(api: fake.FakeApiServer) -> None:
    kc = collector(api)
    api.set_down(fake.REFUSED)
    with pytest.raises(SourceUnavailable, match="kubernetes"):
        kc.collect(now=0.0)


def test_a_hanging_api_server_does_not_hang_the_collector(api: fake.FakeApiServer) -> None:
    kc = collector(api, request_timeout=0.3)
    kc.collect(now=0.0)
    api.set_down(fake.HANG)
    started = time.monotonic()
    meta = kc.collect(now=1.0)
    assert meta.stale and time.monotonic() - started < 3.0
    api.set_up()


def test_owner_and_namespace_caches_avoid_refetching_every_cycle(api: fake.FakeApiServer) -> None:
    kc = collector(api, resync_seconds=60.0)
    rs_path = "/apis/apps/v1/namespaces/ml/replicasets/web-7f9c"
    job_path = "/apis/batch/v1/namespaces/ml/jobs/nightly-2890"
    for now in (0.0, 15.0, 30.0, 45.0):
        kc.collect(now=now)
    assert api.count("/api/v1/pods") == 4  # the pod set is exact every cycle
    assert api.count(rs_path) == 1 and api.count(job_path) == 1
    assert api.count("/api/v1/namespaces/ml") == 1 and api.count(f"/api/v1/nodes/{NODE}") == 1
    kc.collect(now=61.0)  # entries expired: fetched again, so a re-parented ReplicaSet is noticed
    assert api.count(rs_path) == 2 and api.count("/api/v1/namespaces/ml") == 2


def test_missing_namespace_and_owner_degrade_to_unknown(api: fake.FakeApiServer) -> None:
    api.add_pod(fake.pod("ghost-ns", "orphan", NODE, owner=("ReplicaSet", "deleted-rs")))
    pods = by_name(collector(api).collect(now=0.0))
    assert (pods["orphan"].workload_kind, pods["orphan"].workload, pods["orphan"].team) == (
        "ReplicaSet", "deleted-rs", "")


def test_a_malformed_pod_is_skipped_and_counted(api: fake.FakeApiServer) -> None:
    bad = fake.pod("ml", "bad", NODE)
    del bad["metadata"]["uid"]
    api.add_pod(bad)
    meta = collector(api).collect(now=0.0)
    assert "bad" not in by_name(meta) and meta.skipped == 1 and "db-0" in by_name(meta)


def test_unknown_node_name_is_an_error_not_an_empty_node(api: fake.FakeApiServer) -> None:
    kc = KubernetesCollector("no-such-node", api_client=fake.api_client_for(api.url))
    with pytest.raises(SourceError, match="no-such-node"):
        kc.collect(now=0.0)


def test_explicit_kubeconfig_is_used(api: fake.FakeApiServer, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{api.url}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    kc = KubernetesCollector(NODE, kubeconfig=str(path))
    assert "db-0" in by_name(kc.collect(now=0.0))
    kc.close()


def test_no_cluster_config_at_all_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kube_config = pytest.importorskip("kubernetes.config.kube_config")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing"))
    with pytest.raises(SourceUnavailable, match="kubeconfig"):
        KubernetesCollector(NODE).collect(now=0.0)
