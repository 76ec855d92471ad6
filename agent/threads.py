"""Native thread names, so `top -H`, `ps -L` and `/proc/<pid>/task/*/comm` tell gpucap's threads apart.

Python (before 3.14) names threads only for itself: every thread's `comm` reads `python3`, and a
CPU figure per thread group cannot be read from outside. `name_native_threads()` gives every
thread started afterwards its Python name as its kernel name (15 bytes, the kernel's limit; the
common `gpucap-` prefix is dropped to fit). Request threads of a `socketserver` threading server
are named after the thread that serves it plus `-req` (the simulator's HTTP servers start one per
request). Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from typing import Any

PR_SET_NAME = 15
_libc: Any = None
_installed = False
_servers: dict[int, str] = {}  # id(socketserver) -> the name of the thread running its serve_forever


def native_name(python_name: str) -> str:
    """The kernel name for a Python thread name: without the `gpucap-` prefix, 15 bytes at most."""
    name = python_name.removeprefix("gpucap-")
    return name.encode("ascii", "replace")[:15].decode("ascii")


def set_native_name(name: str) -> None:
    """Name the calling thread for the kernel (what /proc/<pid>/task/<tid>/comm shows)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.prctl(PR_SET_NAME, native_name(name).encode(), 0, 0, 0)


def _name_thread() -> None:
    t = threading.current_thread()
    target = getattr(t, "_target", None)
    owner = getattr(target, "__self__", None)
    func = getattr(target, "__name__", "")
    if owner is not None and func == "serve_forever":
        _servers[id(owner)] = t.name
    elif owner is not None and func == "process_request_thread" and t.name.startswith("Thread-"):
        t.name = f"{_servers.get(id(owner), type(owner).__name__)}-req"
    set_native_name(t.name)


def _hook(frame: Any, event: str, arg: Any) -> None:
    sys.setprofile(None)  # once, at the thread's first call: no profiling cost afterwards
    try:
        _name_thread()
    except Exception:  # noqa: BLE001, S110 - a name is never worth a failed thread
        pass


def name_native_threads() -> None:
    """Name the calling thread now and every thread started from here on (idempotent)."""
    global _installed
    set_native_name(threading.current_thread().name)
    if not _installed:
        threading.setprofile(_hook)
        _installed = True
