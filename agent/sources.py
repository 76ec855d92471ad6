"""The collector registry, and the Agent built from it for a real node or a simulated one.

In the spirit of node_exporter's `registerCollector(name, defaultEnabled, factory)`: every source
is registered once with its name, whether it runs by default, and a factory. The name is the key
everywhere: config (`collectors.<name>.enabled`, `collectors.<name>.max_age`), logs, and
`gpucap_collector_*{collector="<name>"}`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.clock import Clock, WallClock
from agent.config import DEFAULT_HISTORY_PATH, Config
from agent.loop import Agent, Source
from agent.pipeline import Evaluator
from collectors.base import Collector
from collectors.inference import InferenceCollector, Target, targets_from_pod
from collectors.nvml import NvmlCollector
from collectors.podresources import PodResourcesCollector
from collectors.processes import ProcessesCollector

log = logging.getLogger("gpucap.sources")


@dataclass
class BuildContext:
    config: Config
    node_name: str
    nvml: Any  # a pynvml-compatible module
    env: Any = None  # SimEnvironment when simulating


@dataclass(frozen=True)
class CollectorSpec:
    name: str
    default_enabled: bool
    # → (collector, interval, timeout of one call)
    factory: Callable[[BuildContext], tuple[Collector, float, float]]


REGISTRY: dict[str, CollectorSpec] = {}
DEFAULT_LEDGER = "default"  # build_runtime(history=DEFAULT_LEDGER): history.path, else the default place


def register(name: str, default_enabled: bool = True) -> Callable[[Callable], Callable]:
    def deco(factory: Callable[[BuildContext], tuple[Collector, float, float]]) -> Callable:
        REGISTRY[name] = CollectorSpec(name, default_enabled, factory)
        return factory
    return deco


@register("nvml")
def _nvml(ctx: BuildContext) -> tuple[Collector, float, float]:
    c = ctx.config.nvml
    return NvmlCollector(ctx.nvml), c.interval, c.timeout


@register("podresources")
def _podresources(ctx: BuildContext) -> tuple[Collector, float, float]:
    k = ctx.config.kubelet
    env = ctx.env
    socket = env.kubelet_socket if env is not None and not k.explicit else k.socket
    # List and GetAllocatableResources each get `timeout`: the loop allows both, plus a second
    return PodResourcesCollector(socket, timeout=k.timeout), k.interval, 2 * k.timeout + 1.0


@register("kubernetes")
def _kubernetes(ctx: BuildContext) -> tuple[Collector, float, float]:
    k = ctx.config.kubernetes
    if ctx.env is not None:
        return ctx.env.metadata, k.interval, 10.0
    from collectors.kubernetes import KubernetesCollector

    kc = KubernetesCollector(ctx.node_name, k.team_label_keys, kubeconfig=k.kubeconfig or None,
                             resync_seconds=k.resync)
    kc.feature_label_keys = k.feature_label_keys
    return kc, k.interval, 10.0


@register("processes")
def _processes(ctx: BuildContext) -> tuple[Collector, float, float]:
    procfs = ctx.env.procfs if ctx.env is not None else ctx.config.processes.procfs
    return ProcessesCollector(procfs), ctx.config.nvml.interval, 5.0


@register("inference")
def _inference(ctx: BuildContext) -> tuple[Collector, float, float]:
    c = ctx.config.inference
    static = tuple(Target(t.url, t.namespace, t.pod, "static") for t in c.targets)
    discover = c.discover

    def targets(inputs: Mapping[str, Any]) -> list[Target]:
        """Configured targets, plus the annotated pods of the latest fresh pod list (passed in)."""
        out = list(static)
        meta = inputs.get("kubernetes")
        if discover and meta is not None:
            for p in meta.pods:
                t = targets_from_pod(p.namespace, p.name, p.pod_ip, dict(p.annotations))
                if t is not None:
                    out.append(t)
        return out

    return (InferenceCollector(targets, timeout=c.timeout, max_bytes=c.max_bytes), c.interval,
            c.timeout + 1.0)


def enabled(config: Config, name: str) -> bool:
    """`collectors.<name>.enabled`; the older `kubernetes.enabled`/`processes.enabled` still switch off."""
    legacy = {"kubernetes": config.kubernetes.enabled, "processes": config.processes.enabled}.get(name, True)
    return REGISTRY[name].default_enabled and config.collector(name).enabled and legacy


@dataclass
class Runtime:
    agent: Agent
    evaluator: Evaluator
    clock: Clock
    config: Config
    node_name: str
    env: Any = None  # SimEnvironment when simulating

    history: Any = None  # HistoryRecorder when a ledger is kept

    def close(self) -> None:
        """Stop the loops, flush the ledger, then close the collectors: the ledger goes first, so
        a collector whose close hangs (and the hard exit after it) cannot cost the last minutes."""
        self.agent.stop(0.5)
        if self.history is not None:
            self.history.close()
            self.history = None
        self.agent.close_collectors(0.6)
        if self.env is not None:
            self.env.close()


def build_runtime(config: Config, *, simulate: str | None = None, speed: float = 1.0, realtime: bool = True,
                  start: float | None = None, nvml_module: Any = None, on_state: Any = None,
                  history: str | None = None) -> Runtime:
    """`history`: the ledger's file (None: no ledger). The counters resume from it."""
    env = None
    if simulate:
        from collectors.simulated.clock import SimClock
        from collectors.simulated.environment import SimEnvironment
        from collectors.simulated.scenario import load_scenario

        scenario = load_scenario(simulate)
        clock: Clock = SimClock(start=start, speed=speed, realtime=realtime)
        env = SimEnvironment(scenario, clock, kubelet=not config.kubelet.explicit,  # type: ignore[arg-type]
                             team_label_keys=config.kubernetes.team_label_keys,
                             resync_seconds=config.kubernetes.resync)
        node_name = config.node_name or scenario.node_name
        nvml = env.nvml
    else:
        clock = WallClock()
        node_name = config.resolved_node_name()
        if nvml_module is None:
            import pynvml as nvml_module
        nvml = nvml_module

    ctx = BuildContext(config, node_name, nvml, env)
    sources = []
    try:
        for name, spec in REGISTRY.items():
            if not enabled(config, name):
                log.info("collector %s disabled in config", name, extra={"collector": name})
                continue
            collector, interval, timeout = spec.factory(ctx)
            sources.append(Source(collector, interval, timeout, max_age=config.max_age(name, interval)))
    except BaseException:
        if env is not None:
            env.close()
        raise
    if env is not None and hasattr(env.metadata, "feature_label_keys"):
        env.metadata.feature_label_keys = config.kubernetes.feature_label_keys
    evaluator = Evaluator(config, node_name)
    recorder = None
    hooks = [on_state] if on_state is not None else []
    if history == DEFAULT_LEDGER:
        # the configured path; on a node the hostPath default, in simulation a file that goes with the run
        history = config.history.path or (os.path.join(env.tmp, "history.db") if env is not None
                                          else DEFAULT_HISTORY_PATH) if config.history.enabled else None
    if history:
        from agent.history import HistoryRecorder

        try:
            recorder = HistoryRecorder(history, node_name, retention=config.history.retention,
                                       max_bytes=config.history.max_bytes, block=not realtime)
        except (OSError, sqlite3.Error) as e:
            # a ledger that cannot be opened must not stop the agent: it serves /metrics without one
            log.error("history %s cannot be opened (%s): running without a ledger", history, e)
        except BaseException:
            if env is not None:
                env.close()
            raise
        if recorder is not None:
            evaluator.ledger.restore(recorder.writer.restore_counters())
            evaluator.history_errors = lambda: recorder.write_errors
            hooks.insert(0, recorder)
            if realtime:  # a daemon (not a headless fast-forward): the live right-sizing metric
                from agent.rightsizing import LiveRightsizing

                live = LiveRightsizing(history, config)
                evaluator.rightsizing = lambda: live.latest
                hooks.append(live)

    def on_each(state: Any) -> None:
        for hook in hooks:
            hook(state)

    agent = Agent(sources, evaluator, clock, on_state=on_each if hooks else None, fallback=evaluator.fallback)
    return Runtime(agent, evaluator, clock, config, node_name, env, history=recorder)
