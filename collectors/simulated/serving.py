"""The simulated node's HTTP servers wait for connections instead of polling for a stop.

`serve_forever(poll_interval)` wakes every `poll_interval` to look for a shutdown request: at the
0.05 s the servers had, nine of them (8 inference servers and the API server of `large`) cost about
0.8% of a core doing nothing, more than the agent they serve (docs/performance.md). Each now serves
with `IDLE_POLL_S`, and `stop_serving` makes the shutdown prompt anyway by connecting to the server
until its loop has seen the request: the connection wakes the loop's select, the loop handles it
(an empty request, closed at once) and then sees the shutdown.
"""

from __future__ import annotations

import socket
import threading
import time
from socketserver import BaseServer

IDLE_POLL_S = 3600.0


def stop_serving(httpd: BaseServer, timeout: float = 5.0) -> None:
    """`httpd.shutdown()` for a loop started with `serve_forever(IDLE_POLL_S)`, returning promptly."""
    stopper = threading.Thread(target=httpd.shutdown, name="sim-http-stop", daemon=True)
    stopper.start()
    host, port = httpd.server_address[:2]  # type: ignore[misc]
    deadline = time.monotonic() + timeout
    while stopper.is_alive() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pass
        except OSError:
            pass
        stopper.join(0.02)
