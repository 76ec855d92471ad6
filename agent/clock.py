"""The agent's clocks. Money and idle streaks are measured on `monotonic()`, which never jumps;
`now()` (wall time) only stamps readings, series and reports. A wall-clock step (NTP, a VM
resumed) therefore never charges or skips a dollar.

The simulated node brings its own clock (`collectors.simulated.clock.SimClock`) with the same
methods, so the agent runs identically on simulated time.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    start: float
    realtime: bool

    def now(self) -> float: ...

    def monotonic(self) -> float: ...


class WallClock:
    """The real node: wall time for timestamps, the OS monotonic clock for elapsed time."""

    start: float = 0.0
    realtime = True
    speed = 1.0

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
