"""The live right-sizing metric: `gpucap_rightsizing_monthly_savings_dollars{action,target}` per
workload, recomputed from the node's own ledger every `recommend.refresh` (default 1 h) over the last
`recommend.window` (default 7 d), by the same engine as `gpucap recommend --history`.

The computation reads up to a week of minutes, so it never runs on the scrape or evaluation path: an
evaluation that finds it due starts it on a daemon thread and goes on; scrapes serve the last
result. Until the first result (and with no ledger) the family is empty, never a guess. A failure
is logged once per cause and the previous result is kept until the next try. While the ledger is
younger than the window and has no result yet, it is tried every 10 minutes instead of every refresh.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

Row = tuple[tuple[tuple[str, str], ...], str, str, float]
EMPTY_RETRY_S = 600.0


class LiveRightsizing:
    def __init__(self, path: str, config: Any) -> None:
        from agent.recommend import Prices, settings_from_config

        self.path = path
        self.window = config.recommend.window
        self.refresh = config.recommend.refresh
        self.settings = settings_from_config(config)
        self.prices = Prices.from_pricing(config.pricing)
        self.latest: tuple[Row, ...] = ()
        self.computed_at: float | None = None  # the monotonic time of the last attempt
        self._first: float | None = None  # the monotonic time of the first state seen
        self._running = threading.Lock()
        self._last_error = ""

    def __call__(self, state: Any) -> None:
        """`on_state` hook: start a recomputation when one is due and none is running."""
        # due by the monotonic clock (a wall clock stepped back must not stall the metric); while there
        # is no result yet (a new ledger), tried again every 10 minutes instead of every refresh
        if self._first is None:
            self._first = state.mono
        young = state.mono - self._first < self.window  # the ledger is still filling its first window
        every = self.refresh if self.latest or not young else min(self.refresh, EMPTY_RETRY_S)
        if self.computed_at is not None and state.mono - self.computed_at < every:
            return
        if not self._running.acquire(blocking=False):
            return
        self.computed_at = state.mono
        threading.Thread(target=self._run, args=(state.time,), name="gpucap-rightsizing", daemon=True).start()

    def _run(self, now: float) -> None:
        try:
            self.compute(now)
        finally:
            self._running.release()

    def compute(self, now: float) -> tuple[Row, ...]:
        """Recompute synchronously (the thread's body; tests call it directly)."""
        from agent.history import History
        from agent.recommend import live_savings

        try:
            history = History(self.path)
            try:
                rows = live_savings(history, now, self.window, self.settings, self.prices)
            finally:
                history.close()
        except Exception as e:  # noqa: BLE001 - a failed recomputation keeps the last result
            cause = f"{type(e).__name__}: {e}"
            if cause != self._last_error:
                log.warning("right-sizing from %s failed (%s); keeping the last result", self.path, cause)
                self._last_error = cause
            return self.latest
        self._last_error = ""
        self.latest = tuple((tuple(sorted(owner.items())), action, target, savings)
                            for owner, action, target, savings in rows)
        return self.latest
