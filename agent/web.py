"""The agent's HTTP server: /metrics, /healthz, /readyz, hardened for a port open on every GPU node.

Why not wsgiref's ThreadingWSGIServer (what prometheus_client offers): it starts one thread per
connection with no read timeout and a listen backlog of 5, so 1500 slow connections became 1525
threads and 400 honest scrapes over 200 workers timed out. Here:

- a **bounded worker pool** (`workers`): the accept loop hands each connection to a pool thread
  and waits (briefly, then sheds the connection) when every worker is busy, so threads are flat
  whatever the clients do; the kernel backlog (`backlog`, 128) holds bursts meanwhile;
- a **deadline for the request head** (`read_timeout`): a slow-loris client that trickles a byte
  every few seconds is cut off when the deadline passes, not when it stops sending; an idle
  keep-alive connection is closed after `idle_timeout`;
- a **maximum request size** (`max_request_bytes` for the request line and headers; bodies are
  refused: every route is a GET);
- **TLS and basic auth** from `--web.config.file` in the Prometheus exporter-toolkit format
  (the file node_exporter takes): `tls_server_config: {cert_file, key_file, client_ca_file,
  client_auth_type, min_version}` and `basic_auth_users: {user: bcrypt hash}`. The TLS handshake
  runs on the worker under the same deadline, so a client that never finishes it ties up no
  accept loop. `/healthz` and `/readyz` stay open (kubelet probes carry no credentials);
  `/metrics` and `/` need the password when users are configured;
- **graceful stop**: `stop()` closes the listening socket first, then waits (up to a deadline)
  for the scrapes in flight to finish, so the last scrape during a SIGTERM still gets its answer.

The /metrics body comes from `agent.exposition.encode_for` (the one place that speaks Prometheus);
scrapes only read the last published state and never call a source.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from agent.model import AgentState
from collectors.schema import InputError, Problem, Reader, load_yaml_file

log = logging.getLogger("gpucap.web")

CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
OPEN_PATHS = ("/healthz", "/readyz")  # probes carry no credentials


# --------------------------------------------------------------------------- web config file
@dataclass(frozen=True)
class WebConfig:
    """The exporter-toolkit web config. `users` maps a user name to its bcrypt hash (bytes)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)

    def ssl_context(self) -> ssl.SSLContext:
        """The server context; files are read here, so a bad key is reported at start (exit 2)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            ctx.load_verify_locations(cafile=self.client_ca_file)
        ctx.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        return ctx


def load_web_config(path: str) -> WebConfig:
    """Read and check a web config file: every mistake at once, each naming the file and key;
    the certificate and key are loaded here so that a wrong one fails at start, not at the first
    scrape. A password in clear text is refused (the format stores bcrypt hashes only)."""
    data = load_yaml_file(path, "web config")
    r = Reader(data, path)
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        return p if not p or os.path.isabs(p) else os.path.join(base, p)

    tls = r.section("tls_server_config")
    cert = resolve(tls.str("cert_file", ""))
    key = resolve(tls.str("key_file", ""))
    ca = resolve(tls.str("client_ca_file", ""))
    auth_type = tls.str("client_auth_type", "RequireAndVerifyClientCert" if ca else "NoClientCert",
                        choices=tuple(CLIENT_AUTH_TYPES))
    min_version = tls.str("min_version", "TLS12", choices=tuple(TLS_VERSIONS))
    for ignored in ("max_version", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites"):
        tls.raw(ignored, None)  # accepted for compatibility; Python's defaults apply
    tls.done()
    if bool(cert) != bool(key):
        tls.problem("cert_file" if not cert else "key_file", "cert_file and key_file together")
    if auth_type.startswith("Require") and "Verify" in auth_type and not ca and cert:
        tls.problem("client_ca_file", f"a CA file: client_auth_type {auth_type} verifies client certificates")

    http = r.section("http_server_config")
    http.raw("http2", None)
    headers = http.str_map("headers")
    http.done()

    users: dict[str, bytes] = {}
    for name, hashed in r.mapping("basic_auth_users").items():
        if not isinstance(name, str) or not name or ":" in name:
            r.problem(f"basic_auth_users.{name}", "a user name without ':'", name)
            continue
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")) or len(hashed) != 60:
            # never show the value: it may be a password pasted by mistake
            r.problem(f"basic_auth_users.{name}", "a bcrypt hash ($2y$…, 60 characters; e.g. from "
                      "htpasswd -nBC 10 USER), not a password", detail="expected a bcrypt hash ($2y$…, 60 "
                      "characters, e.g. from `htpasswd -nBC 10 USER`), got something else (not shown)")
            continue
        users[name] = hashed.encode()
    r.done()
    r.raise_problems()
    cfg = WebConfig(cert, key, ca, auth_type, min_version, users, headers, path)
    if cfg.tls:
        try:
            cfg.ssl_context()
        except (OSError, ssl.SSLError, ValueError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or type(e).__name__
            raise InputError.of([Problem(path, "tls_server_config", "a readable certificate and matching key",
                                         detail=f"cannot load the certificate/key ({reason})")]) from None
    return cfg


class BasicAuth:
    """bcrypt is slow on purpose (~50 ms at cost 10); a scrape every 15 s should not pay it each
    time, so a verified (user, password) pair is remembered by its SHA-256 digest, never in clear."""

    def __init__(self, users: dict[str, bytes]):
        self.users = users
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        digest = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        with self._lock:
            if any(hmac.compare_digest(digest, d) for d in self._ok):
                return True
        import bcrypt

        try:
            ok = bcrypt.checkpw(password.encode()[:72], hashed)
        except ValueError:
            return False
        if ok:
            with self._lock:
                if len(self._ok) > 1000:
                    self._ok.clear()
                self._ok.add(digest)
        return ok


# --------------------------------------------------------------------------- the server
class _RequestTooLarge(Exception):
    pass


class _HeadReader:
    """The request head is read through this: at most `limit` bytes and no later than `deadline`
    (a socket timeout alone resets on every byte, which is what a slow-loris client exploits)."""

    def __init__(self, raw: Any, limit: int, deadline: float):
        self.raw, self.left, self.deadline = raw, limit, deadline

    def readline(self, size: int = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise TimeoutError("request head not received in time")
        if self.left <= 0:
            raise _RequestTooLarge()
        line = self.raw.readline(min(size, self.left + 1) if size and size > 0 else self.left + 1)
        self.left -= len(line)
        if self.left < 0:
            raise _RequestTooLarge()
        return line

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for Prometheus; idle connections time out
    server_version = "gpucap"
    sys_version = ""
    app: MetricsServer  # set on the per-server subclass

    def setup(self) -> None:
        super().setup()
        self._first = True

    def handle_one_request(self) -> None:
        app = self.app
        timeout = app.read_timeout if self._first else app.idle_timeout
        self._first = False
        self.connection.settimeout(timeout)
        raw = self.rfile
        self.rfile = _HeadReader(raw, app.max_request_bytes, time.monotonic() + timeout)  # type: ignore[assignment]
        try:
            super().handle_one_request()
        except _RequestTooLarge:
            self.close_connection = True
            self._plain(431, "request head too large\n")
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            self.close_connection = True
        finally:
            self.rfile = raw

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass

    def _plain(self, code: int, text: str, extra: list[tuple[str, str]] | None = None) -> None:
        body = text.encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra or []:
                self.send_header(k, v)
            for k, v in self.app.web.headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def _reply(self, code: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        for k, v in self.app.web.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self.close_connection = True
        self._plain(405, "only GET\n", [("Allow", "GET, HEAD")])

    do_PUT = do_DELETE = do_PATCH = do_POST

    def do_GET(self) -> None:
        app = self.app
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._plain(413, "no request body is accepted\n")
            return
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ok, detail = app.health()
            self._plain(200 if ok else 503, "ok\n" if ok else f"unhealthy: {detail}\n")
            return
        if path == "/readyz":
            ok, detail = app.ready()
            self._plain(200 if ok else 503, f"{'ok' if ok else 'not ready'}: {detail}\n" if detail else "ok\n")
            return
        if not app.auth.check(self.headers.get("Authorization")):
            self._plain(401, "unauthorized\n", [("WWW-Authenticate", 'Basic realm="gpucap"')])
            return
        if path == "/metrics":
            from agent.exposition import encode_for

            body, headers = encode_for(app.get_state(), self.headers.get("Accept", ""),
                                       self.headers.get("Accept-Encoding", ""))
            self._reply(200, body, headers)
            return
        if path == "/":
            self._reply(200, b'<html><body><h1>gpucap</h1><a href="/metrics">/metrics</a> '
                        b'<a href="/healthz">/healthz</a> <a href="/readyz">/readyz</a></body></html>',
                        [("Content-Type", "text/html")])
            return
        self._plain(404, "not found\n")


class MetricsServer:
    """/metrics, /healthz (liveness: the loop evaluates) and /readyz (NVML and the kubelet
    answered recently), served by a bounded pool; see the module docstring for why each limit."""

    def __init__(self, host: str, port: int, get_state: Callable[[], AgentState | None],
                 last_evaluation: Callable[[], float], stale_after: float = 120.0, *,
                 ready: Callable[[], tuple[bool, str]] | None = None,
                 alive: Callable[[], tuple[bool, str]] | None = None,
                 web_config: WebConfig | None = None, workers: int = 16, backlog: int = 128,
                 read_timeout: float = 10.0, idle_timeout: float = 30.0, max_request_bytes: int = 16384,
                 busy_wait: float = 0.25):
        self.get_state = get_state
        self._last_evaluation = last_evaluation
        self.stale_after = stale_after
        self._ready = ready
        self._alive = alive
        self.web = web_config or WebConfig()
        self.auth = BasicAuth(self.web.users)
        self.read_timeout, self.idle_timeout = read_timeout, idle_timeout
        self.max_request_bytes = max_request_bytes
        self.workers, self.busy_wait = workers, busy_wait
        self._ssl = self.web.ssl_context() if self.web.tls else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
            self._sock.listen(backlog)
        except OSError:
            self._sock.close()
            raise
        self.port = self._sock.getsockname()[1]
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpucap-http")
        self._slots = threading.BoundedSemaphore(workers)
        self._inflight = 0
        self._inflight_lock = threading.Condition()
        self._closing = threading.Event()
        self.shed = 0  # connections closed unanswered because every worker stayed busy
        self._handler = type("Handler", (_Handler,), {"app": self})
        self._thread = threading.Thread(target=self._accept_loop, name="gpucap-http-accept", daemon=True)

    # ------------------------------------------------------------------ probes
    def health(self) -> tuple[bool, str]:
        """Liveness: the evaluation loop published recently (and, when given, the loop's own check)."""
        if self.get_state() is None:
            return False, "no state published yet"
        age = time.monotonic() - self._last_evaluation()
        if age >= self.stale_after:
            return False, f"last evaluation {age:.0f}s ago"
        if self._alive is not None:
            return self._alive()
        return True, ""

    def ready(self) -> tuple[bool, str]:
        if self._ready is None:
            return self.health()
        return self._ready()

    # ------------------------------------------------------------------ serving
    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        # A blocking accept: an idle agent's HTTP thread sleeps in the kernel instead of waking five
        # times a second (0.06 % of a core on `large`); stop() wakes it by shutting the socket down.
        while not self._closing.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)
                continue
            deadline = time.monotonic() + self.busy_wait
            while not self._slots.acquire(timeout=0.1):
                if self._closing.is_set() or time.monotonic() > deadline:
                    break
            else:
                with self._inflight_lock:
                    self._inflight += 1
                self._pool.submit(self._serve, conn, addr)
                continue
            self.shed += 1
            _close(conn)

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        try:
            conn.settimeout(self.read_timeout)
            if self._ssl is not None:
                try:
                    conn = self._ssl.wrap_socket(conn, server_side=True)  # handshake under the timeout
                except (OSError, ssl.SSLError) as e:
                    log.debug("TLS handshake from %s failed: %s", addr, e)
                    _close(conn)
                    return
            self._handler(conn, addr, self)
        except Exception:  # one bad connection never takes the server down
            log.debug("connection from %s failed", addr, exc_info=True)
        finally:
            _close(conn)
            self._slots.release()
            with self._inflight_lock:
                self._inflight -= 1
                self._inflight_lock.notify_all()

    @property
    def in_flight(self) -> int:
        return self._inflight

    def stop(self, deadline: float = 1.5) -> None:
        """Stop accepting, then let the requests in flight finish (up to `deadline` seconds):
        the scrape that was running when SIGTERM came still gets its answer."""
        self._closing.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (EINVAL on Linux)
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        _close(self._sock)
        end = time.monotonic() + deadline
        with self._inflight_lock:
            while self._inflight > 0 and time.monotonic() < end:
                self._inflight_lock.wait(timeout=max(0.0, end - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)


def _close(conn: socket.socket) -> None:
    try:
        conn.close()
    except OSError:
        pass
