"""Builds the collectors for a real node or a simulated one, and the Agent that runs them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from agent.config import Config
from agent.loop import Agent, Source
from agent.pipeline import Evaluator
from collectors.inference import InferenceCollector, Target, targets_from_pod
from collectors.nvml import NvmlCollector
from collectors.podresources import PodResourcesCollector
from collectors.processes import ProcessesCollector
from agent.clock import Clock, WallClock

log = logging.getLogger("gpucap.sources")


@dataclass
class Runtime:
    agent: Agent
    evaluator: Evaluator
    clock: Clock
    config: Config
    node_name: str
    env: Any = None  # SimEnvironment when simulating

    def close(self) -> None:
        self.agent.close()
        if self.env is not None:
            self.env.close()


def build_runtime(config: Config, *, simulate: str | None = None, speed: float = 1.0, realtime: bool = True,
                  start: float | None = None, nvml_module: Any = None, on_state: Any = None) -> Runtime:
    env = None
    if simulate:
        from collectors.simulated.environment import SimEnvironment
        from collectors.simulated.scenario import load_scenario

        from collectors.simulated.clock import SimClock

        scenario = load_scenario(simulate)
        clock: Clock = SimClock(start=start, speed=speed, realtime=realtime)
        env = SimEnvironment(scenario, clock, kubelet=not config.kubelet.explicit,  # type: ignore[arg-type]
                             team_label_keys=config.kubernetes.team_label_keys)
        node_name = config.node_name or scenario.node_name
        nvml = env.nvml
    else:
        clock = WallClock()
        node_name = config.resolved_node_name()
        if nvml_module is None:
            import pynvml as nvml_module
        nvml = nvml_module

    holder: dict[str, Agent] = {}

    def latest(name: str) -> Any:
        a = holder.get("agent")
        return a.sources[name].value if a is not None and name in a.sources else None

    def gpu_pids() -> list[int]:
        reading = latest("nvml")
        return [p.pid for d in reading.devices for p in d.processes] if reading is not None else []

    static = tuple(Target(t.url, t.namespace, t.pod, "static") for t in config.inference.targets)

    def targets() -> list[Target]:
        out = list(static)
        meta = latest("kubernetes")
        if config.inference.discover and meta is not None:
            for p in meta.pods:
                t = targets_from_pod(p.namespace, p.name, p.pod_ip, dict(p.annotations))
                if t is not None:
                    out.append(t)
        return out

    socket = env.kubelet_socket if env is not None and not config.kubelet.explicit else config.kubelet.socket
    sources = [
        Source(NvmlCollector(nvml), config.nvml.interval, config.nvml.timeout),
        Source(PodResourcesCollector(socket, timeout=config.kubelet.timeout), config.kubelet.interval,
               config.kubelet.timeout + 1.0),
    ]
    if env is not None:
        sources.append(Source(env.metadata, config.kubernetes.interval, 10.0))
    elif config.kubernetes.enabled:
        from collectors.kubernetes import KubernetesCollector

        sources.append(Source(KubernetesCollector(node_name, config.kubernetes.team_label_keys,
                                                  kubeconfig=config.kubernetes.kubeconfig or None,
                                                  resync_seconds=config.kubernetes.resync),
                              config.kubernetes.interval, 10.0))
    if config.processes.enabled:
        procfs = env.procfs if env is not None else config.processes.procfs
        sources.append(Source(ProcessesCollector(gpu_pids, procfs), config.nvml.interval, 5.0))
    sources.append(Source(InferenceCollector(targets, timeout=config.inference.timeout,
                                             max_bytes=config.inference.max_bytes),
                          config.inference.interval, config.inference.timeout + 1.0))
    evaluator = Evaluator(config, node_name)
    agent = Agent(sources, evaluator, clock, on_state=on_state)
    holder["agent"] = agent
    return Runtime(agent, evaluator, clock, config, node_name, env)
