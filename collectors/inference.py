"""Inference servers' own `/metrics`: queue, running requests, KV cache, tokens and outcomes per model.

The servers are other people's processes on the node, so every scrape is treated as hostile input:
a hard deadline per collect (a target that trickles bytes forever is cut), a body cap, at most three
redirects, and one bad target never hides the others. The text itself is read by the pure parsers in
`collectors/inference_parse.py`, re-exported here so callers import one module for this source.

Counters restart from zero when a server restarts; `CounterTracker` applies Prometheus' reset rule so
cost-per-outcome never sees a negative increase.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from collectors.base import SourceError

# Re-exported: `from collectors.inference import parse_exposition, ModelStats, ...` is the public path.
from collectors.inference_parse import (
    COUNTER_FIELDS,
    SOURCE,
    ModelStats,
    ParseError,
    UnknownServerError,
    parse_exposition,
)
from collectors.redact import redact_text, redact_url

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
LOG_EVERY_S = 300.0
# What the worker may overrun the deadline by before collect stops waiting and aborts its socket.
_ABORT_GRACE_S = 0.1
_CHUNK = 64 * 1024
FORGET_AFTER_S = 3600.0  # a target URL unseen this long has its error counts folded into GONE
GONE = "(gone)"
# What `InferenceReading.errors` and `errors_total` name a failed scrape by.
ERROR_KINDS = (
    "timeout",  # no complete answer before the deadline (includes never answering, trickling)
    "connection",  # refused, reset, TLS or HTTP protocol failure
    "http_status",  # an answer other than 200
    "redirect",  # more than MAX_REDIRECTS, or to another host
    "too_large",  # body over max_bytes
    "truncated",  # fewer bytes than Content-Length, or a broken chunked body
    "parse",  # HTML, garbage, not UTF-8, not Prometheus text
    "unknown_server",  # valid text from no known inference server
    "unexpected",  # anything else (a malformed URL in config); still one target's problem only
)


# ------------------------------------------------------------------------------------ counter resets


class CounterTracker:
    """Raw counter readings → totals that never go down, per (target, server, model, counter).

    Prometheus' reset rule: a reading below the previous one means the process restarted from zero,
    so the new reading is added on top of what was already counted. Keys unseen for `ttl_s` are
    forgotten so pods that went away do not accumulate forever.
    """

    def __init__(self, ttl_s: float = 3600.0):
        self._ttl_s = ttl_s
        # key -> (last raw reading, total counted before the last reset, last seen)
        self._state: dict[tuple[str, ...], tuple[float, float, float]] = {}

    def update(self, key: tuple[str, ...], raw: float, now: float) -> float:
        last = self._state.get(key)
        if last is None:
            base = 0.0
        else:
            last_raw, base, _ = last
            if raw < last_raw:
                base += last_raw
        self._state[key] = (raw, base, now)
        return base + raw

    def forget_older_than(self, cutoff: float) -> None:
        for key in [k for k, (_, _, seen) in self._state.items() if seen < cutoff]:
            del self._state[key]

    def prune(self, now: float) -> None:
        self.forget_older_than(now - self._ttl_s)


# -------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    namespace: str
    pod: str
    source: str  # "annotation" | "static"


def _port(value: str | None) -> int | None:
    try:
        port = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def targets_from_pod(
    namespace: str, pod: str, pod_ip: str | None, annotations: Mapping[str, str]
) -> Target | None:
    """The scrape target a pod's annotations ask for, or None.

    `gpucap.io/metrics-port` wins so a pod can point gpucap at a port other than the one its
    Prometheus scrapes; otherwise the common `prometheus.io/*` convention, honouring
    `prometheus.io/scrape: "false"`. A malformed port is no target rather than an error.
    """
    if not pod_ip:
        return None
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    port = _port(annotations.get("gpucap.io/metrics-port"))
    if port is not None:
        scheme, path = "http", annotations.get("gpucap.io/metrics-path") or "/metrics"
    else:
        if annotations.get("prometheus.io/scrape", "").strip().lower() == "false":
            return None
        port = _port(annotations.get("prometheus.io/port"))
        if port is None:
            return None
        scheme = (annotations.get("prometheus.io/scheme") or "http").strip().lower()
        path = annotations.get("prometheus.io/path") or "/metrics"
        if scheme not in ("http", "https"):
            return None
    if not path.startswith("/"):
        path = "/" + path
    return Target(url=f"{scheme}://{host}:{port}{path}", namespace=namespace, pod=pod, source="annotation")


# -------------------------------------------------------------------------------------------- fetching


class _FetchError(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class _Failure:
    kind: str
    detail: str


class _Handle:
    """Lets collect() cut a worker's socket when the deadline passes, whatever the worker is blocked in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.aborted = False

    def attach(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._conn = conn

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _get_once(
    url: str, deadline: float, max_bytes: int, handle: _Handle, tls: ssl.SSLContext
) -> tuple[int, str | None, str | None, bytes | None]:
    """(status, content type, location, body if 200) of one GET, within the deadline and the cap."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _FetchError("connection", f"unsupported URL {url!r}")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _FetchError("timeout", "deadline passed before connecting")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=remaining, context=tls)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=remaining)
    handle.attach(conn)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # No Accept-Encoding: a compressed body would defeat the size cap. Ask for the classic text format.
        conn.request("GET", path, headers={"Accept": "text/plain;version=0.0.4", "User-Agent": "gpucap"})
        if handle.aborted:
            raise _FetchError("timeout", "aborted at the deadline")
        resp = conn.getresponse()
        ctype, location = resp.getheader("Content-Type"), resp.getheader("Location")
        if resp.status != 200:
            return resp.status, ctype, location, None
        declared = resp.getheader("Content-Length")
        length = int(declared) if declared and declared.strip().isdigit() else None
        if length is not None and length > max_bytes:
            raise _FetchError("too_large", f"Content-Length {length} over the {max_bytes}-byte cap")
        chunks: list[bytes] = []
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or handle.aborted:
                raise _FetchError("timeout", f"body not complete at the deadline ({total} bytes read)")
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            chunk = resp.read1(_CHUNK)  # one recv at most, so the deadline is checked between reads
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise _FetchError("too_large", f"body over the {max_bytes}-byte cap")
            chunks.append(chunk)
        if handle.aborted:  # a shut-down socket reads as a clean end of body
            raise _FetchError("timeout", "aborted at the deadline")
        if length is not None and total < length:
            raise _FetchError("truncated", f"connection closed after {total} of {length} declared bytes")
        return 200, ctype, location, b"".join(chunks)
    finally:
        conn.close()


def _fetch(url: str, deadline: float, max_bytes: int, handle: _Handle, tls: ssl.SSLContext) -> str:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        status, ctype, location, body = _get_once(current, deadline, max_bytes, handle, tls)
        if status in (301, 302, 303, 307, 308) and location:
            following = urljoin(current, location)
            if urlsplit(following).hostname != urlsplit(url).hostname:
                # A pod's annotation must not be able to point the node agent at other hosts.
                raise _FetchError("redirect", f"redirect to another host refused: {following}")
            current = following
            continue
        if status != 200 or body is None:
            raise _FetchError("http_status", f"HTTP {status}")
        if ctype and ctype.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
            raise _FetchError("parse", f"HTML page ({ctype}), not metrics")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _FetchError("parse", f"body is not UTF-8: {exc}") from exc
    raise _FetchError("redirect", f"more than {MAX_REDIRECTS} redirects")


def _scrape(
    url: str, deadline: float, max_bytes: int, handle: _Handle, tls: ssl.SSLContext
) -> tuple[ModelStats, ...] | _Failure:
    """Stats, or why not. Never raises: one target's trouble is data, not an exception."""
    try:
        return parse_exposition(_fetch(url, deadline, max_bytes, handle, tls))
    except _FetchError as exc:
        return _Failure(exc.kind, str(exc))
    except UnknownServerError as exc:
        return _Failure("unknown_server", str(exc))
    except ParseError as exc:
        return _Failure("parse", str(exc))
    except http.client.IncompleteRead as exc:
        return _Failure("truncated", f"incomplete chunked body: {exc!r}")
    except TimeoutError as exc:
        return _Failure("timeout", f"no answer before the deadline: {exc}")
    except (OSError, http.client.HTTPException) as exc:
        if handle.aborted:
            return _Failure("timeout", "cut at the deadline")
        return _Failure("connection", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bad URL in config, a library surprise: one target only
        return _Failure("unexpected", f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------ collector


@dataclass(frozen=True, slots=True)
class ServerStats:
    namespace: str
    pod: str
    url: str
    server: str
    model: str
    queue_requests: float | None
    running_requests: float | None
    kv_cache_usage_ratio: float | None
    prompt_tokens_total: float | None  # counters here are after reset handling: they never go down
    generated_tokens_total: float | None
    successful_requests_total: float | None
    failed_requests_total: float | None
    generated_tokens_per_second: float | None


@dataclass(frozen=True, slots=True)
class InferenceReading:
    servers: tuple[ServerStats, ...]
    errors: tuple[tuple[str, str], ...]  # (target url, error kind), this collect only
    at: float


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """One scrape target's latest outcome, so `gpucap snapshot` can show a failing target (a refused
    connection is otherwise only a count in `gpucap_inference_target_errors_total`)."""

    url: str
    namespace: str
    pod: str
    source: str
    ok: bool
    error_kind: str = ""
    error: str = ""
    failing_since: float | None = None  # collect time of the first failure of the current streak
    last_success: float | None = None


class TargetsFailed(SourceError):
    """Every target failed this cycle. Each failure is already counted per target and kind in
    `errors_total`; the loop must not count the cycle again (it did: one refused connection read
    as two errors in gpucap_collector_errors_total)."""

    already_counted = True


class InferenceCollector:
    """Scrapes every target concurrently; the slowest target costs at most `timeout`, never more."""

    name = "inference"
    needs = ("kubernetes",)  # pod annotations name the targets to discover

    def __init__(
        self,
        targets_fn: Callable[[Mapping[str, Any]], Sequence[Target]],
        timeout: float = 2.0,
        max_bytes: int = 10 * 2**20,
        max_workers: int = 8,
        verify_tls: bool = False,
    ):
        # TLS is not verified by default: targets are pod IPs, which no serving certificate names.
        self._targets_fn = targets_fn
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="gpucap-infer-get")
        self._tracker = CounterTracker()
        self._errors_total: dict[tuple[str, str], int] = defaultdict(int)
        self._last_logged: dict[tuple[str, str], float] = {}
        self._seen: dict[str, float] = {}  # url -> last time it was a target
        self._status: dict[str, TargetStatus] = {}  # url -> latest outcome (current targets only)
        self._tls = ssl.create_default_context()
        if not verify_tls:
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE

    @property
    def errors_total(self) -> dict[tuple[str, str], int]:
        """Cumulative failed scrapes per (target url, error kind), for a `..._errors_total` counter."""
        return dict(self._errors_total)

    def collect(self, now: float, inputs: Mapping[str, Any] | None = None) -> InferenceReading:
        try:
            targets = _unique(self._targets_fn(inputs or {}))
        except Exception as exc:
            raise SourceError(SOURCE, f"listing targets failed: {exc}", exc) from exc
        if not targets:
            return InferenceReading(servers=(), errors=(), at=now)
        deadline = time.monotonic() + self._timeout
        handles = [_Handle() for _ in targets]
        futures: list[Future[tuple[ModelStats, ...] | _Failure]] = [
            self._pool.submit(_scrape, t.url, deadline, self._max_bytes, h, self._tls)
            for t, h in zip(targets, handles, strict=True)
        ]
        wait(futures, timeout=max(0.0, deadline - time.monotonic()) + _ABORT_GRACE_S)
        servers: list[ServerStats] = []
        errors: list[tuple[str, str]] = []
        for target, handle, future in zip(targets, handles, futures, strict=True):
            if future.done() and not future.cancelled():
                outcome = future.result()
            else:
                future.cancel()
                handle.abort()
                outcome = _Failure("timeout", "no answer before the deadline")
            if isinstance(outcome, _Failure):  # a library's message may quote a URL, credentials and all
                outcome = _Failure(outcome.kind, redact_text(outcome.detail, (target.url,)))
            self._note_status(target, outcome, now)
            if isinstance(outcome, _Failure):
                errors.append((target.url, outcome.kind))
                self._record_error(target.url, outcome.kind, outcome.detail, now)
                continue
            servers.extend(self._totals(target, stats, now) for stats in outcome)
        self._tracker.prune(now)
        self._forget_gone_targets({t.url for t in targets}, now)
        current = {t.url for t in targets}
        for url in [u for u in self._status if u not in current]:
            del self._status[url]
        if errors and len(errors) == len(targets):
            summary = "; ".join(f"{redact_url(url)}: {kind}" for url, kind in errors[:5])
            raise TargetsFailed(SOURCE, f"all {len(targets)} targets failed: {summary}")
        return InferenceReading(servers=tuple(servers), errors=tuple(errors), at=now)

    def _totals(self, target: Target, stats: ModelStats, now: float) -> ServerStats:
        counters = {}
        for field in COUNTER_FIELDS:
            raw = getattr(stats, field)
            key = (target.url, stats.server, stats.model, field)
            counters[field] = None if raw is None else self._tracker.update(key, raw, now)
        return ServerStats(
            namespace=target.namespace,
            pod=target.pod,
            url=target.url,
            server=stats.server,
            model=stats.model,
            queue_requests=stats.queue_requests,
            running_requests=stats.running_requests,
            kv_cache_usage_ratio=stats.kv_cache_usage_ratio,
            generated_tokens_per_second=stats.generated_tokens_per_second,
            **counters,
        )

    def target_status(self) -> tuple[TargetStatus, ...]:
        """Every current target's latest outcome (a URL may hold credentials: redact before showing)."""
        return tuple(self._status.values())

    def _note_status(self, target: Target, outcome: object, now: float) -> None:
        prev = self._status.get(target.url)
        if isinstance(outcome, _Failure):
            since = prev.failing_since if prev is not None and not prev.ok else now
            self._status[target.url] = TargetStatus(
                target.url, target.namespace, target.pod, target.source, False, outcome.kind, outcome.detail,
                since, prev.last_success if prev is not None else None)
        else:
            self._status[target.url] = TargetStatus(target.url, target.namespace, target.pod, target.source,
                                                    True, last_success=now)

    def _forget_gone_targets(self, current: set[str], now: float) -> None:
        """Pods come and go: fold the error counts of URLs gone for a while into one "(gone)" entry
        per kind, so memory stays bounded and the per-kind totals never go down."""
        for url in current:
            self._seen[url] = now
        for url in [u for u, t in self._seen.items() if u not in current and now - t > FORGET_AFTER_S]:
            del self._seen[url]
            for key in [k for k in self._errors_total if k[0] == url]:
                self._errors_total[(GONE, key[1])] += self._errors_total.pop(key)
                self._last_logged.pop(key, None)

    def _record_error(self, url: str, kind: str, detail: str, now: float) -> None:
        key = (url, kind)
        self._errors_total[key] += 1
        last = self._last_logged.get(key)
        if last is None or now - last >= LOG_EVERY_S or now < last:
            self._last_logged[key] = now
            log.warning("inference target failed: url=%s kind=%s detail=%s", redact_url(url), kind,
                        redact_text(detail, (url,)))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _unique(targets: Iterable[Target]) -> list[Target]:
    """One scrape per URL even when a pod is both annotated and listed in config (first wins)."""
    seen: dict[str, Target] = {}
    for target in targets:
        seen.setdefault(target.url, target)
    return list(seen.values())
