"""Simulated time: every simulated source reads `now()` from here, so simulated days pass in
milliseconds. Its `monotonic()` is simulated time too; `step_wall()` moves only the wall clock,
as NTP or a resumed VM would, so tests can prove that money follows the monotonic clock.
"""

from __future__ import annotations

import threading
import time


class SimClock:
    """Virtual (advanced by hand) or running `speed`× faster than real time."""

    def __init__(self, start: float | None = None, speed: float = 1.0, realtime: bool = False):
        self.start = float(int(time.time()) if start is None else start)
        self.speed = speed
        self.realtime = realtime
        self._t = self.start
        self._real0 = time.monotonic()
        self._wall_offset = 0.0
        self._lock = threading.Lock()

    def _sim(self) -> float:
        if self.realtime:
            return self._t + (time.monotonic() - self._real0) * self.speed
        return self._t

    def now(self) -> float:
        """Wall time of the simulated node (may be stepped by `step_wall`)."""
        return self._sim() + self._wall_offset

    def monotonic(self) -> float:
        """Elapsed simulated time since an arbitrary origin (never stepped)."""
        return self._sim()

    def scenario_time(self) -> float:
        """Seconds since the scenario started (the scenario's own time axis; ignores wall steps)."""
        return self._sim() - self.start

    def advance(self, seconds: float) -> float:
        with self._lock:
            if self.realtime:
                self._t = self._sim()
                self._real0 = time.monotonic()
            self._t += seconds
            return self._t + self._wall_offset

    def step_wall(self, seconds: float) -> None:
        """Jump the wall clock (not simulated time) by `seconds`, either way."""
        self._wall_offset += seconds

    def sleep(self, seconds: float) -> None:
        """Simulated sleep: real sleep scaled by speed when running live, instant otherwise."""
        if self.realtime:
            time.sleep(seconds / self.speed)
        else:
            self.advance(seconds)
