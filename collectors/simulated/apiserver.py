"""A loopback HTTP server that answers the handful of Kubernetes API reads gpucap makes.

The simulated node serves its scenario from it (`SimEnvironment`), and tests drive the real
`kubernetes` client against it instead of mocking the client, so the field selector, the 404
Status objects, the 503s and the transport failures are the ones a real API server would
produce, and the real `KubernetesCollector` runs the same code in simulation as on a node.
State is plain dicts shaped like the API's JSON and can be changed while the server runs
(`on_request` lets an owner bring it up to date at each request, e.g. to a simulated clock);
every request is counted per path so tests can prove what was (not) fetched again.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid as uuidlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from collectors.simulated.serving import IDLE_POLL_S, stop_serving

# Modes for `SimulatedApiServer.set_down`.
UP = "up"
REFUSED = "refused"  # listening socket closed: clients get ECONNREFUSED
UNAVAILABLE = "503"  # server answers every request with a 503 Status
HANG = "hang"  # server accepts and never answers (until set back up)


# Keep the last requests only (tests read them): a simulated node may serve for days, and the bench
# measures its memory beside the agent's (with 10,000 kept it grew about 2 MiB per 3,000 cycles).
MAX_QUERIES = 1_000


def object_uid(kind: str, namespace: str | None, name: str) -> str:
    """Deterministic UIDs, so an ownerReference's uid is its owner's uid, as in a real cluster."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"gpucap-sim/{kind}/{namespace or ''}/{name}"))


def _meta(kind: str, name: str, namespace: str | None, labels: Mapping[str, str] | None,
          annotations: Mapping[str, str] | None, owner: tuple[str, str] | None,
          uid: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid or object_uid(kind, namespace, name),
                            "labels": dict(labels or {}), "annotations": dict(annotations or {})}
    if namespace is not None:
        meta["namespace"] = namespace
    if owner is not None:
        owner_kind, owner_name = owner
        api = {"ReplicaSet": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1",
               "Deployment": "apps/v1", "Job": "batch/v1", "CronJob": "batch/v1"}.get(owner_kind, "v1")
        meta["ownerReferences"] = [{"apiVersion": api, "kind": owner_kind, "name": owner_name,
                                    "uid": object_uid(owner_kind, namespace, owner_name), "controller": True,
                                    "blockOwnerDeletion": True}]
    return meta


def pod(namespace: str, name: str, node: str, *, uid: str | None = None,
        labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None,
        owner: tuple[str, str] | None = None, phase: str = "Running", pod_ip: str = "10.0.0.10",
        containers: Iterable[tuple[str, str]] = (("main", "containerd://" + "a" * 64),)) -> dict[str, Any]:
    """A Pod object as the API serves it; `containers` is (name, status containerID or "")."""
    containers = list(containers)
    statuses = [{"name": n, "containerID": cid, "ready": True, "restartCount": 0,
                 "image": "example/image:1", "imageID": ""} for n, cid in containers if cid]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _meta("Pod", name, namespace, labels, annotations, owner, uid),
        "spec": {"nodeName": node,
                 "containers": [{"name": n, "image": "example/image:1"} for n, _ in containers]},
        "status": {"phase": phase, "podIP": pod_ip, "containerStatuses": statuses},
    }


def node(name: str, labels: Mapping[str, str] | None = None,
         annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": _meta("Node", name, None, labels, annotations, None),
            "spec": {}, "status": {}}


def namespace(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    labels = {"kubernetes.io/metadata.name": name, **(labels or {})}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta("Namespace", name, None, labels, None, None),
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def replicaset(ns: str, name: str, owner: tuple[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": _meta("ReplicaSet", name, ns, None, None, owner),
            "spec": {"replicas": 1}, "status": {"replicas": 1}}


def job(ns: str, name: str, owner: tuple[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta("Job", name, ns, None, None, owner),
            "spec": {}, "status": {}}


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason, "code": code}
    if details:
        out["details"] = details
    return out


def _field(obj: Mapping[str, Any], path: str) -> str | None:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return None if cur is None else str(cur)


_POD_FIELDS = {"spec.nodeName", "metadata.name", "metadata.namespace", "status.phase"}


def _match_fields(obj: Mapping[str, Any], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if (_field(obj, key) or "") == value:
                return False
        else:
            key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            if (_field(obj, key) or "") != value:
                return False
    return True


class _Server(ThreadingHTTPServer):
    """Keeps track of open connections, so stop() can end kept-alive ones and join every handler."""

    daemon_threads = False
    block_on_close = True  # server_close() joins the handler threads

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Wake handlers waiting for a kept-alive connection's next request: they see EOF and end."""
        with self.connections_lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the client


class SimulatedApiServer:
    """Thread-safe mutable cluster state behind a real `ThreadingHTTPServer` on 127.0.0.1.

    `on_request`, when given, is called at the start of every request (under the state lock,
    before the outage mode is checked), so its owner can make the state and the mode follow a
    clock at request time: what a client reads is what the cluster holds at that instant.
    """

    def __init__(self, on_request: Callable[[], None] | None = None) -> None:
        self.on_request = on_request
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.replicasets: dict[tuple[str, str], dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()
        self.queries: deque[tuple[str, dict[str, list[str]]]] = deque(maxlen=MAX_QUERIES)
        self._rv = 1000
        self._lock = threading.RLock()
        self._mode = UP
        self._release = threading.Event()
        self._port = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> Self:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = _Server(("127.0.0.1", self._port), handler)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(IDLE_POLL_S,), name="sim-apiserver",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and wait for the requests in flight (a hanging one is released first)."""
        self._release.set()
        if self._httpd is not None:
            stop_serving(self._httpd)
            self._httpd.drop_connections()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_down(self, mode: str = REFUSED) -> None:
        """Make the API unavailable; `set_up()` restores it on the same port."""
        with self._lock:
            self._mode = mode
            if mode == HANG:
                self._release.clear()
        if mode == REFUSED:
            self.stop()

    def set_up(self) -> None:
        with self._lock:
            previous, self._mode = self._mode, UP
        self._release.set()
        if previous == REFUSED:
            self.start()

    @property
    def mode(self) -> str:
        return self._mode

    # ---- state -----------------------------------------------------------------------
    def _bump(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        return obj

    def remove_pod(self, ns: str, name: str) -> None:
        """Like delete_pod, but a pod that is not there is not an error."""
        with self._lock:
            if self.pods.pop((ns, name), None) is not None:
                self._rv += 1

    def add_pod(self, obj: dict[str, Any]) -> None:
        with self._lock:
            m = obj["metadata"]
            self.pods[(m["namespace"], m["name"])] = self._bump(obj)

    def delete_pod(self, ns: str, name: str) -> None:
        with self._lock:
            del self.pods[(ns, name)]
            self._rv += 1

    def add_node(self, obj: dict[str, Any]) -> None:
        with self._lock:
            self.nodes[obj["metadata"]["name"]] = self._bump(obj)

    def add_namespace(self, obj: dict[str, Any]) -> None:
        with self._lock:
            self.namespaces[obj["metadata"]["name"]] = self._bump(obj)

    def add_replicaset(self, obj: dict[str, Any]) -> None:
        with self._lock:
            m = obj["metadata"]
            self.replicasets[(m["namespace"], m["name"])] = self._bump(obj)

    def add_job(self, obj: dict[str, Any]) -> None:
        with self._lock:
            m = obj["metadata"]
            self.jobs[(m["namespace"], m["name"])] = self._bump(obj)

    def count(self, path: str) -> int:
        with self._lock:
            return self.counts[path]

    # ---- routing ---------------------------------------------------------------------
    def handle(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self.on_request is not None:
                self.on_request()
            self.counts[path] += 1
            self.queries.append((path, query))
            if self._mode == UNAVAILABLE:
                return 503, _status(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            parts = [p for p in path.split("/") if p]
            if query.get("watch", [""])[0] in ("true", "1"):
                return 400, _status(400, "BadRequest", "watch is not supported by the simulated API server")
            if parts == ["api", "v1", "pods"]:
                return self._list_pods(None, query)
            if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
                return self._list_pods(parts[3], query)
            if len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]:
                return self._get(self.nodes.get(parts[3]), "nodes", parts[3])
            if parts == ["api", "v1", "namespaces"]:
                return 200, self._list("NamespaceList", "v1", self.namespaces.values())
            if len(parts) == 4 and parts[:3] == ["api", "v1", "namespaces"]:
                return self._get(self.namespaces.get(parts[3]), "namespaces", parts[3])
            if len(parts) == 7 and parts[:4] == ["apis", "apps", "v1", "namespaces"] and parts[5] == "replicasets":
                return self._get(self.replicasets.get((parts[4], parts[6])), "replicasets", parts[6], "apps")
            if len(parts) == 7 and parts[:4] == ["apis", "batch", "v1", "namespaces"] and parts[5] == "jobs":
                return self._get(self.jobs.get((parts[4], parts[6])), "jobs", parts[6], "batch")
            return 404, _status(404, "NotFound", "the server could not find the requested resource")

    def _list(self, kind: str, api_version: str, items: Iterable[dict[str, Any]]) -> dict[str, Any]:
        stripped = [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items]
        return {"kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": str(self._rv)}, "items": json.loads(json.dumps(stripped))}

    def _list_pods(self, ns: str | None, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        selector = query.get("fieldSelector", [""])[0]
        for term in filter(None, selector.split(",")):
            key = term.split("!=")[0].split("=")[0]
            if key not in _POD_FIELDS:
                return 400, _status(400, "BadRequest", f'field label not supported: {key}')
        items = [p for (pns, _), p in sorted(self.pods.items())
                 if (ns is None or pns == ns) and _match_fields(p, selector)]
        return 200, self._list("PodList", "v1", items)

    def _get(self, obj: dict[str, Any] | None, plural: str, name: str,
             group: str = "") -> tuple[int, dict[str, Any]]:
        if obj is None:
            details = {"name": name, "kind": plural, **({"group": group} if group else {})}
            what = f"{plural}.{group}" if group else plural
            return 404, _status(404, "NotFound", f'{what} "{name}" not found', details)
        return 200, json.loads(json.dumps(obj))


class _Handler(BaseHTTPRequestHandler):
    api: SimulatedApiServer
    # Keep-alive, as a real API server speaks: a new connection (and thread) per request would be
    # most of the cost of a simulated collect. Whole replies in one write, no Nagle delay.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 30.0  # an idle kept-alive connection ends after this (stop() ends it at once)

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        if self.api._mode == HANG:
            self.api._release.wait(timeout=30)
        code, body = self.api.handle(split.path, parse_qs(split.query))
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout test): nothing to answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def api_client_for(url: str) -> Any:
    """A real `kubernetes.client.ApiClient` aimed at `url`, without urllib3's silent retries.

    No proxy: the client would otherwise take one from HTTP(S)_PROXY, and a loopback server is
    never behind one. Raises ImportError without the `kubernetes` package.
    """
    from kubernetes import client

    cfg = client.Configuration(host=url)
    cfg.retries = False
    cfg.proxy = None
    return client.ApiClient(configuration=cfg)
