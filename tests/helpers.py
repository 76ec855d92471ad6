"""Shared helpers for the end-to-end tests: a simulated agent at a fixed start, scenario files of our
own, and reading samples back from the Prometheus text the agent serves (so the tests see what a
scrape sees, not the agent's internals)."""

from __future__ import annotations

import copy
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.config import Config
from agent.exposition import make_registry
from agent.model import AgentState
from agent.sources import Runtime, build_runtime
from collectors.simulated.scenario import builtin_dir

START = 1_700_000_000.0  # a fixed simulated start: the same samples on every run

Sample = tuple[dict[str, str], float]


@contextmanager
def simulated(scenario: str, config: Config | None = None, start: float = START) -> Iterator[Runtime]:
    """The full agent on a simulated node (real gRPC kubelet, real HTTP inference servers), virtual clock."""
    rt = build_runtime(config or Config(), simulate=scenario, realtime=False, start=start)
    try:
        yield rt
    finally:
        rt.close()


def run_to(rt: Runtime, seconds: float, step: float = 10.0) -> AgentState:
    """Evaluate every `step` simulated seconds until `seconds` after the start; the last state."""
    return rt.agent.run_until(rt.clock, rt.clock.start + seconds, step)


def walk(rt: Runtime, seconds: float, step: float) -> Iterator[AgentState]:
    """Every evaluation from now to `seconds` after the start, one per `step`."""
    yield rt.agent.step(rt.clock.now())
    while rt.clock.now() + 1e-9 < rt.clock.start + seconds:
        rt.clock.advance(step)
        yield rt.agent.step(rt.clock.now())


def builtin_scenario(name: str) -> dict[str, Any]:
    """A fresh, mutable copy of a built-in scenario's YAML, to derive our own from."""
    with open(os.path.join(builtin_dir(), f"{name}.yaml"), encoding="utf-8") as f:
        return copy.deepcopy(yaml.safe_load(f))


def write_scenario(tmp_path: Path, name: str, data: dict[str, Any]) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **data}, sort_keys=False), encoding="utf-8")
    return str(path)


def parse(text: str) -> dict[str, list[Sample]]:
    """Exposition text → sample name (with _total etc.) → [(labels, value)]."""
    out: dict[str, list[Sample]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def collected(state: AgentState | None) -> dict[str, list[Sample]]:
    """Like parse(render(state)), straight from the exposition's collector: for loops over many evaluations,
    where parsing the text would dominate the test's time."""
    out: dict[str, list[Sample]] = {}
    for fam in make_registry(lambda: state).collect():
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def samples(text: str | dict[str, list[Sample]], name: str, **labels: str) -> list[Sample]:
    """Samples of `name` whose labels include every given label (pass label="" to demand an empty one)."""
    parsed = parse(text) if isinstance(text, str) else text
    return [(lb, v) for lb, v in parsed.get(name, []) if all(lb.get(k) == want for k, want in labels.items())]


def value(text: str | dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample of `name` matching `labels`; fails naming what matched when not exactly one."""
    found = samples(text, name, **labels)
    assert len(found) == 1, f"{name}{labels}: expected one sample, got {len(found)}: {found[:4]}"
    return found[0][1]


def total(text: str | dict[str, list[Sample]], name: str, **labels: str) -> float:
    return sum(v for _, v in samples(text, name, **labels))


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def has_nvidia_driver() -> bool:
    """True where real NVML initialises (a GPU node); the no-driver tests skip there."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True
