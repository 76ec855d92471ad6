"""Shared fixtures: a simulated NVML on a virtual clock, and scenario files written for one test.

Simulated time starts at a fixed instant so that every reading (noise included) is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from collectors.simulated.clock import SimClock
from collectors.simulated.node import SimNode
from collectors.simulated.nvml import SimulatedNVML
from collectors.simulated.scenario import load_scenario

SIM_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class SimNvml(NamedTuple):
    nvml: SimulatedNVML
    clock: SimClock

    def at(self, seconds: float) -> float:
        """Move the virtual clock to `seconds` of scenario time (forward only); returns `now`."""
        step = seconds - (self.clock.now() - self.clock.start)
        assert step >= 0, f"simulated time only moves forward (asked for {seconds}s, already past it)"
        self.clock.advance(step)
        return self.clock.now()


@pytest.fixture
def sim_nvml() -> Callable[..., SimNvml]:
    """`sim_nvml("demo")` or `sim_nvml(path)`: a fresh simulated driver (not yet initialised) and its clock."""

    def make(scenario: str | Path, start: float = SIM_START) -> SimNvml:
        clock = SimClock(start=start, realtime=False)
        return SimNvml(SimulatedNVML(SimNode(load_scenario(str(scenario))), clock), clock)

    return make


@pytest.fixture
def scenario_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """`scenario_file("name", yaml_text)` → the path of a scenario file in this test's tmp_path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return path

    return write
