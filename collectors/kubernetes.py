"""Kubernetes metadata for this node: its labels, its pods, their owners and teams.

Periodic list rather than a watch: one field-selected pod list per cycle is cheap when
served from the API server's watch cache (`resourceVersion=0`), makes the pod set exact
after every collect (a deleted pod is gone at the next one), and leaves no thread to
babysit through reconnects and 410 Gone. Everything that changes rarely (the node,
namespaces, ReplicaSets, Jobs) is cached and refetched at most every `resync_seconds`.

The `kubernetes` package is imported lazily: the value types and the pure functions work
without it (GPU test machines), and the collector then reports the source unavailable.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from collectors.base import SourceError, SourceUnavailable

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
Pairs = tuple[tuple[str, str], ...]
# Returns the ownerReferences of the named object, or None when it does not exist.
OwnerLookup = Callable[[str, str], Sequence[Mapping[str, Any]] | None]

INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
SHARING_STRATEGY_LABEL = "nvidia.com/gpu.sharing-strategy"
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
DEFAULT_FEATURE_LABEL_KEYS = ("gpucap.io/feature", "app.kubernetes.io/component")


@dataclass(frozen=True, slots=True)
class PodMeta:
    uid: str
    namespace: str
    name: str
    phase: str
    node_name: str
    labels: Pairs
    annotations: Pairs
    workload_kind: str
    workload: str
    team: str
    pod_ip: str
    containers: Pairs  # (container name, runtime container id without the "containerd://" scheme)
    feature: str = ""  # product feature (kubernetes.feature_label_keys: pod label, then namespace label)

    def label(self, key: str, default: str = "") -> str:
        return dict(self.labels).get(key, default)

    def annotation(self, key: str, default: str = "") -> str:
        return dict(self.annotations).get(key, default)

    def container_id(self, name: str) -> str:
        return dict(self.containers).get(name, "")


@dataclass(frozen=True, slots=True)
class NodeMeta:
    name: str
    labels: Pairs
    annotations: Pairs
    instance_type: str
    capacity_type: str  # "on-demand" | "spot" | "reserved"
    gpu_product: str
    sharing_strategy: str  # GFD's label value; "" when GFD does not label the node

    def label(self, key: str, default: str = "") -> str:
        return dict(self.labels).get(key, default)

    def annotation(self, key: str, default: str = "") -> str:
        return dict(self.annotations).get(key, default)


@dataclass(frozen=True, slots=True)
class KubeMetadata:
    node: NodeMeta
    pods: tuple[PodMeta, ...]
    stale: bool  # True: the API is unreachable and this is the last metadata that was fetched
    refreshed_at: float  # `now` of the collect that fetched this metadata
    skipped: int = 0  # malformed pod objects left out
    lookup_errors: int = 0  # namespace/owner reads the API refused this refresh (owner or team unknown)

    def skipped_items(self) -> tuple[tuple[str, int], ...]:
        out = (("malformed_pod", self.skipped), ("lookup_failed", self.lookup_errors))
        return tuple((k, n) for k, n in out if n)

    def pod_by_uid(self, uid: str) -> PodMeta | None:
        return next((p for p in self.pods if p.uid == uid), None)

    def pod_by_name(self, namespace: str, name: str) -> PodMeta | None:
        return next((p for p in self.pods if p.namespace == namespace and p.name == name), None)


# ---- pure functions ------------------------------------------------------------------

def _pairs(mapping: Mapping[str, Any] | None) -> Pairs:
    return tuple(sorted((str(k), str(v)) for k, v in (mapping or {}).items()))


def capacity_type_from_labels(labels: Mapping[str, str]) -> str:
    """Each provisioner names spot capacity differently; pricing needs one vocabulary."""
    karpenter = labels.get("karpenter.sh/capacity-type", "").strip().lower()
    if karpenter in ("spot", "on-demand", "reserved"):
        return karpenter
    eks = labels.get("eks.amazonaws.com/capacityType", "").strip().upper()
    if eks == "SPOT":
        return "spot"
    if eks == "ON_DEMAND":
        return "on-demand"
    for key in ("cloud.google.com/gke-spot", "cloud.google.com/gke-preemptible"):
        if labels.get(key, "").strip().lower() == "true":
            return "spot"
    if labels.get("kubernetes.azure.com/scalesetpriority", "").strip().lower() == "spot":
        return "spot"
    return "on-demand"


def team_of(pod_labels: Mapping[str, str], namespace_labels: Mapping[str, str], keys: Sequence[str]) -> str:
    """A pod's own label wins so one shared namespace can still bill several teams."""
    for source in (pod_labels, namespace_labels):
        for key in keys:
            value = source.get(key)
            if value:
                return value
    return ""


def _controller_ref(owner_refs: Sequence[Mapping[str, Any]] | None) -> Mapping[str, Any] | None:
    refs = [r for r in (owner_refs or ()) if isinstance(r, Mapping) and r.get("kind") and r.get("name")]
    return next((r for r in refs if r.get("controller")), refs[0] if refs else None)


def resolve_owner(namespace: str, owner_refs: Sequence[Mapping[str, Any]] | None,
                  lookup_rs: OwnerLookup, lookup_job: OwnerLookup, pod_name: str = "") -> tuple[str, str]:
    """The workload a person would name: the Deployment, not its current ReplicaSet.

    A ReplicaSet or Job that cannot be found is reported as itself: an honest
    intermediate owner beats a guess from the name.
    """
    ref = _controller_ref(owner_refs)
    if ref is None:
        return "Pod", pod_name
    kind, name = str(ref["kind"]), str(ref["name"])
    lookup = {"ReplicaSet": lookup_rs, "Job": lookup_job}.get(kind)
    if lookup is None:
        return kind, name
    parent = _controller_ref(lookup(namespace, name))
    if parent is not None and parent["kind"] in ("Deployment", "CronJob"):
        return str(parent["kind"]), str(parent["name"])
    return kind, name


def _strip_scheme(container_id: str) -> str:
    return container_id.split("://", 1)[1] if "://" in container_id else container_id


def pod_meta(obj: Mapping[str, Any], namespace_labels: Mapping[str, str], owner: tuple[str, str],
             team_label_keys: Sequence[str], feature_label_keys: Sequence[str] = ()) -> PodMeta:
    """Raises KeyError/TypeError/AttributeError on a malformed object; callers skip and count."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    ids = {s["name"]: _strip_scheme(s.get("containerID") or "")
           for s in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])}
    names = [c["name"] for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])]
    labels = meta.get("labels") or {}
    return PodMeta(
        uid=str(meta["uid"]), namespace=str(meta["namespace"]), name=str(meta["name"]),
        phase=str(status.get("phase") or ""), node_name=str(spec.get("nodeName") or ""),
        labels=_pairs(labels), annotations=_pairs(meta.get("annotations")),
        workload_kind=owner[0], workload=owner[1], team=team_of(labels, namespace_labels, team_label_keys),
        pod_ip=str(status.get("podIP") or ""), containers=tuple((n, ids.get(n, "")) for n in names),
        feature=team_of(labels, namespace_labels, feature_label_keys),
    )


def node_meta(name: str, labels: Mapping[str, str], annotations: Mapping[str, str]) -> NodeMeta:
    return NodeMeta(
        name=name, labels=_pairs(labels), annotations=_pairs(annotations),
        instance_type=next((labels[k] for k in INSTANCE_TYPE_LABELS if labels.get(k)), ""),
        capacity_type=capacity_type_from_labels(labels),
        gpu_product=labels.get(GPU_PRODUCT_LABEL, ""),
        sharing_strategy=labels.get(SHARING_STRATEGY_LABEL, ""),
    )


def _assemble(node: Mapping[str, Any], pods: Sequence[Mapping[str, Any]],
              namespace_labels: Mapping[str, Mapping[str, str]], lookup_rs: OwnerLookup,
              lookup_job: OwnerLookup, team_label_keys: Sequence[str], now: float,
              feature_label_keys: Sequence[str] = ()) -> KubeMetadata:
    out: list[PodMeta] = []
    skipped = 0
    for obj in pods:
        try:
            if (obj.get("status") or {}).get("phase") in FINISHED_PHASES:
                continue
            meta = obj["metadata"]
            owner = resolve_owner(meta["namespace"], meta.get("ownerReferences"), lookup_rs, lookup_job,
                                  meta["name"])
            out.append(pod_meta(obj, namespace_labels.get(meta["namespace"], {}), owner, team_label_keys,
                                feature_label_keys))
        except (KeyError, TypeError, AttributeError, ValueError):
            skipped += 1  # one malformed object must not hide the node's other pods
    meta = node.get("metadata") or {}
    return KubeMetadata(
        node=node_meta(str(meta.get("name", "")), meta.get("labels") or {}, meta.get("annotations") or {}),
        pods=tuple(sorted(out, key=lambda p: (p.namespace, p.name))), stale=False, refreshed_at=now,
        skipped=skipped)


def metadata_from_objects(node: Mapping[str, Any], pods: Sequence[Mapping[str, Any]],
                          namespaces: Sequence[Mapping[str, Any]],
                          owners: Mapping[tuple[str, str, str], Sequence[Mapping[str, Any]] | None],
                          team_label_keys: Sequence[str], now: float) -> KubeMetadata:
    """Assemble from API-shaped dicts; `owners` maps (namespace, kind, name) to ownerReferences."""
    ns_labels = {n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in namespaces}

    def lookup(kind: str) -> OwnerLookup:
        return lambda ns, name: owners.get((ns, kind, name))

    return _assemble(node, pods, ns_labels, lookup("ReplicaSet"), lookup("Job"), team_label_keys, now)


# ---- the collector -------------------------------------------------------------------

class _Expiring:
    """A cache whose entries die after `ttl` seconds of the caller's clock."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any, now: float, fetch: Callable[[], Any]) -> Any:
        hit = self._items.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        value = fetch()
        self._items[key] = (now + self.ttl, value)
        return value

    def prune(self, now: float) -> None:
        self._items = {k: v for k, v in self._items.items() if now < v[0]}


def _load_api_client(kubeconfig: str | None) -> Any:
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig:
        # persist_config=False: the agent runs on a read-only root filesystem
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg, persist_config=False)
    cfg.retries = False  # the next cycle is the retry; urllib3's would multiply the timeout
    return client.ApiClient(configuration=cfg)


class KubernetesCollector:
    name = SOURCE

    def __init__(self, node_name: str, team_label_keys: Sequence[str] = ("team", "app.kubernetes.io/part-of"),
                 kubeconfig: str | None = None, api_client: Any | None = None,
                 resync_seconds: float = 60.0, request_timeout: float = 5.0) -> None:
        self.node_name = node_name
        self.team_label_keys = tuple(team_label_keys)
        self.feature_label_keys: tuple[str, ...] = DEFAULT_FEATURE_LABEL_KEYS
        self.kubeconfig = kubeconfig
        self.request_timeout = request_timeout
        self._client = api_client
        self._owns_client = api_client is None
        self._node = _Expiring(resync_seconds)
        self._namespaces = _Expiring(resync_seconds)
        self._owners = _Expiring(resync_seconds)
        self._last: KubeMetadata | None = None
        self._failing = False
        self._lock = threading.Lock()
        self.lookup_errors = 0  # namespace/owner reads refused by the API (e.g. RBAC), degraded to "unknown"

    def collect(self, now: float) -> KubeMetadata:
        with self._lock:
            try:
                fresh = self._refresh(now)
            except SourceError as err:
                if not self._failing:
                    log.warning("collector=%s API request failed, serving %s: %s", SOURCE,
                                "last known metadata" if self._last else "nothing", err)
                self._failing = True
                if self._last is None:
                    raise
                return _stale(self._last)
            if self._failing:
                log.info("collector=%s API reachable again", SOURCE)
            self._failing = False
            self._last = fresh
            return fresh

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    # ---- internals ---------------------------------------------------------------------
    def _api(self) -> Any:
        if self._client is None:
            try:
                import kubernetes  # noqa: F401
            except ImportError as err:
                raise SourceUnavailable(SOURCE, "the kubernetes package is not installed", err) from err
            try:
                self._client = _load_api_client(self.kubeconfig)
            except Exception as err:  # ConfigException, missing file, bad YAML: all mean "no cluster"
                raise SourceUnavailable(SOURCE, f"no in-cluster config or kubeconfig: {err}", err) from err
        return self._client

    def _get(self, what: str, path: str, *, query: Sequence[tuple[str, str]] = (),
             missing_ok: bool = False, **path_params: str) -> Any:
        """One GET through the client's ApiClient (its configuration, credentials, TLS and connection
        pool), JSON-decoded; transport and API errors become SourceErrors.

        Not through the generated CoreV1Api/AppsV1Api/BatchV1Api: importing those classes and
        building their pydantic validators costs about 28 MiB of the agent's memory for five GETs
        whose JSON the collector reads itself (docs/architecture.md, "The Kubernetes client").
        """
        api = self._api()  # SourceUnavailable without the package
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            request = api.param_serialize("GET", path, path_params=path_params or None,
                                          query_params=list(query), header_params={"Accept": "application/json"},
                                          auth_settings=["BearerToken"])
            resp = api.call_api(*request, _request_timeout=self.request_timeout)
            status, body = resp.status, resp.read()
        except ApiException as err:  # the REST layer's own: TLS and proxy failures (status 0)
            raise SourceUnavailable(SOURCE, f"{what}: HTTP {err.status} {err.reason}", err) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise SourceUnavailable(SOURCE, f"{what}: {type(err).__name__}: {err}", err) from err
        if not 200 <= status <= 299:
            if missing_ok and status == 404:
                return None
            cls = SourceUnavailable if status == 429 or status >= 500 else SourceError
            raise cls(SOURCE, f"{what}: HTTP {status} {resp.reason}")
        try:
            return json.loads(body)
        except ValueError as err:
            raise SourceError(SOURCE, f"{what}: response is not JSON", err) from err

    def _soft_get(self, what: str, path: str, **path_params: str) -> Any:
        """For enrichment reads: not found or forbidden means "unknown", only an outage fails the cycle."""
        try:
            return self._get(what, path, missing_ok=True, **path_params)
        except SourceUnavailable:
            raise
        except SourceError as err:
            self.lookup_errors += 1
            log.debug("collector=%s %s", SOURCE, err)
            return None

    def _refresh(self, now: float) -> KubeMetadata:
        lookup_errors = self.lookup_errors
        pod_list = self._get("list pods", "/api/v1/pods",
                             query=(("fieldSelector", f"spec.nodeName={self.node_name}"), ("resourceVersion", "0")))
        node = self._node.get(self.node_name, now, lambda: self._get(
            f"read node {self.node_name}", "/api/v1/nodes/{name}", name=self.node_name))
        if not isinstance(pod_list, Mapping) or not isinstance(node, Mapping):
            raise SourceError(SOURCE, "API answered with something that is not a Kubernetes object")
        pods = [p for p in (pod_list.get("items") or []) if isinstance(p, Mapping)]
        ns_labels: dict[str, Mapping[str, str]] = {}
        for ns in {(p.get("metadata") or {}).get("namespace") for p in pods} - {None}:
            obj = self._namespaces.get(ns, now, lambda ns=ns: self._soft_get(
                f"read namespace {ns}", "/api/v1/namespaces/{name}", name=ns))
            ns_labels[ns] = ((obj or {}).get("metadata") or {}).get("labels") or {}

        def lookup(kind: str, path: str) -> OwnerLookup:
            def owner_refs(ns: str, name: str) -> Sequence[Mapping[str, Any]] | None:
                def fetch() -> Sequence[Mapping[str, Any]] | None:
                    obj = self._soft_get(f"read {kind} {ns}/{name}", path, namespace=ns, name=name)
                    return None if obj is None else (obj.get("metadata") or {}).get("ownerReferences") or []
                return self._owners.get((ns, kind, name), now, fetch)
            return owner_refs

        meta = _assemble(node, pods, ns_labels,
                         lookup("ReplicaSet", "/apis/apps/v1/namespaces/{namespace}/replicasets/{name}"),
                         lookup("Job", "/apis/batch/v1/namespaces/{namespace}/jobs/{name}"), self.team_label_keys, now,
                         self.feature_label_keys)
        for cache in (self._node, self._namespaces, self._owners):
            cache.prune(now)
        return replace(meta, lookup_errors=self.lookup_errors - lookup_errors)


def _stale(last: KubeMetadata) -> KubeMetadata:
    return KubeMetadata(node=last.node, pods=last.pods, stale=True, refreshed_at=last.refreshed_at,
                        skipped=last.skipped)
