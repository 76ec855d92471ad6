"""The collector protocol and the errors a source may raise.

A collector owns one source. `collect(now)` returns one immutable typed value
or raises a `SourceError`; the agent loop catches everything else too, but a
collector that raises `SourceError` gets a clean log line instead of a
traceback. "No data" is not an error: return an empty value.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


class SourceError(Exception):
    """A source failed for this cycle; the cause is kept for the log."""

    def __init__(self, source: str, message: str, cause: BaseException | None = None):
        super().__init__(f"{source}: {message}")
        self.source = source
        self.cause = cause


class SourceUnavailable(SourceError):
    """The source cannot be reached at all (no driver, no socket, no API server)."""


@runtime_checkable
class Collector(Protocol):
    name: str

    def collect(self, now: float) -> Any: ...

    def close(self) -> None: ...
