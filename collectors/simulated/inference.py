"""Simulated inference servers: real HTTP endpoints serving the traffic model's `/metrics` text.

The traffic model and the per-server rendering live in `collectors/simulated/traffic.py`; their names
are re-exported here because the simulated node, the environment and the tests import them from this
module.

Fault modes of `InferenceHTTPServer` reproduce what breaks scrapers in the field: 500s, HTML error
pages, bodies cut short, a server that never answers, one that trickles bytes, endless redirects,
oversized bodies and garbage. A server *restart* (counters back to zero) is not an HTTP fault: the
test calls `TrafficModel.restart()` and the next render starts its counters from zero.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from collectors.simulated.serving import IDLE_POLL_S, stop_serving
from collectors.simulated.traffic import (
    FAILURE_FRACTION,
    MAX_STEP_S,
    SERVERS,
    TrafficModel,
    TrafficState,
    render,
)

__all__ = [
    "FAILURE_FRACTION",
    "FAULTS",
    "MAX_STEP_S",
    "SERVERS",
    "InferenceHTTPServer",
    "TrafficModel",
    "TrafficState",
    "render",
]

FAULTS = ("ok", "http_500", "html", "truncated", "hang", "trickle", "huge", "redirect_loop", "garbage")


# ---------------------------------------------------------------------------------------------- HTTP

_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><h1>502 Bad Gateway</h1><p>upstream connect error</p></body></html>\n"
)
_GARBAGE = b'\x00\x01this is { not prometheus text ]]\nmetric{label="unterminated 12\n'


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests read results, not access logs

    def do_GET(self) -> None:
        owner = self.server.owner
        if owner.before_request is not None:
            owner.before_request()
        fault = owner.fault
        owner.requests += 1
        try:
            if fault == "hang":
                owner.stopping.wait()
            elif fault == "http_500":
                self._reply(500, b"internal server error\n", "text/plain")
            elif fault == "html":
                self._reply(200, _HTML, "text/html; charset=utf-8")
            elif fault == "garbage":
                self._reply(200, _GARBAGE, "text/plain")
            elif fault == "redirect_loop":
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif fault == "truncated":
                body = owner.render_fn().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body) + 4096))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            elif fault == "huge":
                self._stream_huge(owner.huge_bytes)
            elif fault == "trickle":
                self._trickle(owner.stopping)
            else:
                self._reply(200, owner.render_fn().encode(), "text/plain; version=0.0.4; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the scraper gave up on us, which is the point of most faults

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream_huge(self, size: int) -> None:
        # No Content-Length: the scraper has to count, not trust a header.
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        line = b'vllm:num_requests_running{engine="0",model_name="padding"} 1.0\n'
        block = line * max(1, 65536 // len(line))
        sent = 0
        while sent < size:
            self.wfile.write(block)
            sent += len(block)

    def _trickle(self, stopping: threading.Event) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(b"# HELP vllm:num_requests_running x\n")
        self.wfile.flush()
        while not stopping.wait(0.05):
            self.wfile.write(b"#")
            self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hanging handler must not hold up stop()
    owner: InferenceHTTPServer


class InferenceHTTPServer:
    """A real HTTP server on 127.0.0.1 (port chosen by the OS) serving `render_fn()` at any path.

    Set `.fault` to one of `FAULTS` at any time; `huge_bytes` sizes the `huge` body (make it larger than
    the scraper's cap). `before_request`, when given, runs at the start of every request, before the
    fault is read: the simulated node applies its scenario's faults there, at the request's time.
    """

    def __init__(self, render_fn: Callable[[], str], fault: str = "ok", huge_bytes: int = 11 * 2**20,
                 before_request: Callable[[], None] | None = None):
        self.render_fn = render_fn
        self.before_request = before_request
        self.fault = fault
        self.huge_bytes = huge_bytes
        self.requests = 0
        self.stopping = threading.Event()
        self._httpd: _Server | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def fault(self) -> str:
        return self._fault

    @fault.setter
    def fault(self, mode: str) -> None:
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; expected one of {', '.join(FAULTS)}")
        self._fault = mode

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._port}/metrics"  # still valid after stop(), for assertions

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        self.stopping.clear()
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": IDLE_POLL_S},  # no polling: stop() wakes the loop
            name=f"sim-inference-{httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Returns promptly even with handlers hanging or trickling: they are released first."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.stopping.set()
        stop_serving(httpd)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
