"""Clocks: every stage takes `now` from one of these, so simulated days pass in milliseconds."""

from __future__ import annotations

import threading
import time


class Clock:
    """Wall clock (the real node)."""

    start: float = 0.0
    realtime = True

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class SimClock(Clock):
    """Simulated time: virtual (advanced by hand) or running `speed`× faster than real time."""

    def __init__(self, start: float | None = None, speed: float = 1.0, realtime: bool = False):
        self.start = float(int(time.time()) if start is None else start)
        self.speed = speed
        self.realtime = realtime
        self._t = self.start
        self._real0 = time.monotonic()
        self._lock = threading.Lock()

    def now(self) -> float:
        if self.realtime:
            return self._t + (time.monotonic() - self._real0) * self.speed
        return self._t

    def advance(self, seconds: float) -> float:
        with self._lock:
            if self.realtime:
                self._t = self.now()
                self._real0 = time.monotonic()
            self._t += seconds
            return self._t

    def sleep(self, seconds: float) -> None:
        """Simulated sleep: real sleep scaled by speed when running live, instant otherwise."""
        if self.realtime:
            time.sleep(seconds / self.speed)
        else:
            self.advance(seconds)
