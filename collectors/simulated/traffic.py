"""The simulated inference servers' traffic: a queueing model and the `/metrics` text it renders to.

Split from `collectors/simulated/inference.py` so the model and the rendering stay pure (no sockets,
no threads): the simulated node drives the GPUs' activity from `TrafficModel.utilization` without an
HTTP server, and tests render a state to literal text. The state is rendered with each server's real
metric names, types and labels, so the scraper in `collectors/inference.py` reads exactly what it
would read from vLLM, Triton, TGI or SGLang. A server *restart* (counters back to zero) is
`TrafficModel.restart()`: the next render starts its counters from zero.

A model built with `warmup_s` (the simulated node passes `WARMUP_S`) starts *warm*: its first advance
puts it in the state it would have after that long at the first arrival rate (a full batch and a
grown queue when over-loaded, counters and rates as after the warm-up), so the first snapshot or
scrape of a simulated node already tells its story. Only the traffic is warm: scenario times (faults,
pod lifetimes) and the agent's idle window still count from the start.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SERVERS = ("vllm", "triton", "tgi", "sglang")

# Closed form per step, so the step only bounds how coarse the arrival noise is; 7 days = 10 080 steps.
MAX_STEP_S = 60.0
# How long the simulated servers have been serving when the simulation starts (see the module docstring).
WARMUP_S = 600.0
FAILURE_FRACTION = 0.005
# How much of the KV cache a full batch uses, the rest filling with queue pressure (prefill of waiting work).
_KV_RUNNING_SHARE = 0.85


@dataclass(frozen=True, slots=True)
class TrafficState:
    """One model on one server at one instant, as the server itself would count it."""

    server: str
    model: str
    queue_requests: float
    running_requests: float
    kv_cache_usage_ratio: float
    prompt_tokens_total: float
    generated_tokens_total: float
    successful_requests_total: float
    failed_requests_total: float
    generated_tokens_per_second: float
    at: float | None


class TrafficModel:
    """A fluid queue: arrivals at a rate, service at a capacity, requests in excess wait.

    Running requests follow Little's law (a full batch, `max_running`, is what `capacity_rps` serves),
    so an under-loaded server runs `max_running × arrival/capacity` requests with an empty queue and an
    over-loaded one runs a full batch while its queue grows by the excess. Arrivals carry Poisson-sized
    noise from a seeded generator: the same seed and the same calls give the same numbers.
    """

    def __init__(
        self,
        server: str,
        model: str,
        capacity_rps: float,
        mean_prompt_tokens: int,
        mean_generated_tokens: int,
        max_running: int,
        seed: int,
        warmup_s: float = 0.0,
    ):
        if server not in SERVERS:
            raise ValueError(f"unknown server {server!r}; expected one of {', '.join(SERVERS)}")
        if capacity_rps <= 0 or max_running <= 0:
            raise ValueError("capacity_rps and max_running must be positive")
        self.server = server
        self.model = model
        self.capacity_rps = capacity_rps
        self.mean_prompt_tokens = mean_prompt_tokens
        self.mean_generated_tokens = mean_generated_tokens
        self.max_running = max_running
        self._rng = random.Random(seed)
        self._last: float | None = None
        self._backlog = 0.0
        self._served_rate = 0.0
        self._effective_capacity = capacity_rps
        self._served = 0.0  # since the last restart: what the server's counters show
        self._failed = 0.0
        self.warmup_s = max(0.0, warmup_s)

    def _warm_up(self, now: float, arrival_rps: float, capacity: float) -> None:
        """The steady state after `warmup_s` at this arrival rate, in closed form (no noise): served at
        min(arrival, capacity), the excess queued, counters as if the server had run that long."""
        served_rate = min(arrival_rps, capacity)
        self._effective_capacity = capacity
        self._served_rate = served_rate
        self._backlog = max(0.0, arrival_rps - capacity) * self.warmup_s
        self._served = served_rate * self.warmup_s
        self._failed = self._served * FAILURE_FRACTION

    def advance(self, now: float, arrival_rps: float, capacity_factor: float = 1.0) -> TrafficState:
        """Integrate from the previous `now` at a constant arrival rate. Time going backwards is ignored."""
        if self._last is None:  # the first call fixes where simulated time starts (and warms up)
            self._last = now
            if self.warmup_s > 0:
                self._warm_up(now, max(0.0, arrival_rps), max(0.0, self.capacity_rps * capacity_factor))
            return self.state
        if now <= self._last:
            return self.state
        capacity = max(0.0, self.capacity_rps * capacity_factor)
        arrival_rps = max(0.0, arrival_rps)
        self._effective_capacity = capacity
        t = self._last
        served_in_call = 0.0
        while t < now:
            dt = min(MAX_STEP_S, now - t)
            served_in_call += self._step(dt, arrival_rps, capacity)
            t += dt
        self._served_rate = served_in_call / (now - self._last)
        self._last = now
        return self.state

    def _step(self, dt: float, arrival_rps: float, capacity: float) -> float:
        expected = arrival_rps * dt
        noise = self._rng.gauss(0.0, math.sqrt(expected)) if expected > 0 else 0.0
        arrived = max(0.0, expected + noise)
        rate_in = arrived / dt
        if rate_in >= capacity:
            served = capacity * dt
            self._backlog += arrived - served
        else:
            drain = self._backlog / (capacity - rate_in)  # time until the backlog is gone
            if drain >= dt:
                served = capacity * dt
                self._backlog -= (capacity - rate_in) * dt
            else:
                served = capacity * drain + rate_in * (dt - drain)
                self._backlog = 0.0
        failed = served * FAILURE_FRACTION
        self._served += served
        self._failed += failed
        return served

    def restart(self) -> None:
        """The server process restarted: its counters start again from zero, its queue is lost."""
        self._served = 0.0
        self._failed = 0.0
        self._backlog = 0.0

    @property
    def utilization(self) -> float:
        """Served ÷ capacity over the last advance, 0-1: what drives the simulated GPU's activity."""
        if self._effective_capacity <= 0:
            return 0.0
        return min(1.0, self._served_rate / self._effective_capacity)

    @property
    def state(self) -> TrafficState:
        running = min(float(self.max_running), self.max_running * self.utilization)
        pressure = min(1.0, self._backlog / self.max_running)
        kv = min(1.0, _KV_RUNNING_SHARE * running / self.max_running + (1 - _KV_RUNNING_SHARE) * pressure)
        return TrafficState(
            server=self.server,
            model=self.model,
            queue_requests=self._backlog,
            running_requests=running,
            kv_cache_usage_ratio=kv,
            prompt_tokens_total=self._served * self.mean_prompt_tokens,
            generated_tokens_total=(self._served - self._failed) * self.mean_generated_tokens,
            successful_requests_total=self._served - self._failed,
            failed_requests_total=self._failed,
            generated_tokens_per_second=self._served_rate * self.mean_generated_tokens,
            at=self._last,
        )


# ------------------------------------------------------------------------------------------- rendering
# Counters are floored from monotonic floats, so every rendered counter is monotonic too; splits by
# reason use fixed fractions of a total for the same reason (floor(total × f) never goes down).

_VLLM_OK = (("stop", 0.8), ("length", 0.2), ("repetition", 0.0))
_VLLM_FAILED = (("abort", 0.8), ("error", 0.2))
_TRITON_FAILED = (("REJECTED", 0.3), ("CANCELED", 0.0), ("BACKEND", 0.5), ("OTHER", 0.2))
_TGI_FAILED = (("validation", 0.5), ("generation", 0.3), ("overloaded", 0.2))
_TOKEN_BUCKETS = ((10.0, 0.02), (100.0, 0.25), (1000.0, 0.9), (10000.0, 1.0))


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped, strict=True)) + "}"


def _n(value: float) -> str:
    return repr(float(math.floor(value)))


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str | None) -> None:
        if help_text is not None:
            self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: str) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {value}")

    def histogram(self, name: str, labels: dict[str, str], count: float, total: float) -> None:
        for bound, fraction in _TOKEN_BUCKETS:
            self.sample(f"{name}_bucket", {**labels, "le": repr(bound)}, _n(count * fraction))
        self.sample(f"{name}_bucket", {**labels, "le": "+Inf"}, _n(count))
        self.sample(f"{name}_sum", labels, _n(total))
        self.sample(f"{name}_count", labels, _n(count))


def _vllm(out: _Out, states: Sequence[TrafficState], old_names: bool) -> None:
    def each(name: str, kind: str, help_text: str, value: Callable[[TrafficState], str]) -> None:
        out.family(name, kind, help_text)
        for s in states:
            labels = {"model_name": s.model} if old_names else {"engine": "0", "model_name": s.model}
            out.sample(name, labels, value(s))

    each(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        lambda s: repr(float(round(s.running_requests))),
    )
    each(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        lambda s: repr(float(round(s.queue_requests))),
    )
    if old_names:
        each(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            lambda s: repr(s.kv_cache_usage_ratio),
        )
    else:
        each(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            lambda s: repr(s.kv_cache_usage_ratio),
        )
    each(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        lambda s: _n(s.prompt_tokens_total),
    )
    each(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        lambda s: _n(s.generated_tokens_total),
    )
    out.family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    for s in states:
        base = {"model_name": s.model} if old_names else {"engine": "0", "model_name": s.model}
        for reason, fraction in _VLLM_OK:
            out.sample(
                "vllm:request_success_total",
                {**base, "finished_reason": reason},
                _n(s.successful_requests_total * fraction),
            )
        for reason, fraction in _VLLM_FAILED:
            out.sample(
                "vllm:request_success_total",
                {**base, "finished_reason": reason},
                _n(s.failed_requests_total * fraction),
            )


def _triton(out: _Out, states: Sequence[TrafficState]) -> None:
    def labels(s: TrafficState, **extra: str) -> dict[str, str]:
        return {"model": s.model, **extra, "version": "1"}

    def each(name: str, kind: str, help_text: str, value: Callable[[TrafficState], str]) -> None:
        out.family(name, kind, help_text)
        for s in states:
            out.sample(name, labels(s), value(s))

    each("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes",
         lambda s: _n(s.successful_requests_total))
    out.family(
        "nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes"
    )
    for s in states:
        for reason, fraction in _TRITON_FAILED:
            out.sample(
                "nv_inference_request_failure",
                labels(s, reason=reason),
                _n(s.failed_requests_total * fraction),
            )
    each("nv_inference_count", "counter", "Number of inferences performed (does not include cached requests)",
         lambda s: _n(s.successful_requests_total))
    each("nv_inference_exec_count", "counter",
         "Number of model executions performed (does not include cached requests)",
         lambda s: _n(s.successful_requests_total))
    each("nv_inference_pending_request_count", "gauge",
         "Instantaneous number of pending requests awaiting execution per-model.",
         lambda s: repr(float(round(s.queue_requests))))


def _tgi(out: _Out, state: TrafficState) -> None:
    # TGI's Rust exporter writes TYPE lines without HELP, and counters without `_total`.
    requests = state.successful_requests_total + state.failed_requests_total
    out.family("tgi_request_count", "counter", None)
    out.sample("tgi_request_count", {}, _n(requests))
    out.family("tgi_request_success", "counter", None)
    out.sample("tgi_request_success", {}, _n(state.successful_requests_total))
    out.family("tgi_request_failure", "counter", None)
    for err, fraction in _TGI_FAILED:
        out.sample("tgi_request_failure", {"err": err}, _n(state.failed_requests_total * fraction))
    out.family("tgi_queue_size", "gauge", None)
    out.sample("tgi_queue_size", {}, repr(float(round(state.queue_requests))))
    out.family("tgi_batch_current_size", "gauge", None)
    out.sample("tgi_batch_current_size", {}, repr(float(round(state.running_requests))))
    out.family("tgi_request_input_length", "histogram", None)
    out.histogram("tgi_request_input_length", {}, requests, state.prompt_tokens_total)
    out.family("tgi_request_generated_tokens", "histogram", None)
    out.histogram(
        "tgi_request_generated_tokens", {}, state.successful_requests_total, state.generated_tokens_total
    )


def _sglang(out: _Out, states: Sequence[TrafficState]) -> None:
    def scheduler(s: TrafficState) -> dict[str, str]:
        return {"model_name": s.model, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}

    gauges = (
        (
            "sglang:num_running_reqs",
            "The number of running requests.",
            lambda s: float(round(s.running_requests)),
        ),
        (
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue.",
            lambda s: float(round(s.queue_requests)),
        ),
        ("sglang:token_usage", "The token usage.", lambda s: s.kv_cache_usage_ratio),
        (
            "sglang:gen_throughput",
            "The generation throughput (token/s).",
            lambda s: s.generated_tokens_per_second,
        ),
    )
    for name, help_text, value in gauges:
        out.family(name, "gauge", help_text)
        for s in states:
            out.sample(name, scheduler(s), repr(value(s)))
    counters = (
        (
            "sglang:prompt_tokens_total",
            "Number of prefill tokens processed.",
            lambda s: s.prompt_tokens_total,
        ),
        (
            "sglang:generation_tokens_total",
            "Number of generation tokens processed.",
            lambda s: s.generated_tokens_total,
        ),
        (
            "sglang:num_requests_total",
            "Number of requests processed.",
            lambda s: s.successful_requests_total + s.failed_requests_total,
        ),
        (
            "sglang:num_aborted_requests_total",
            "Number of requests aborted.",
            lambda s: s.failed_requests_total,
        ),
    )
    for name, help_text, total in counters:
        out.family(name, "counter", help_text)
        for s in states:
            out.sample(name, {"model_name": s.model}, _n(total(s)))


def render(model_state: TrafficState | Sequence[TrafficState], *, vllm_old_names: bool = False) -> str:
    """The `/metrics` body of one server serving these models (all of the same server type).

    `vllm_old_names` renders the pre-0.9.2 vLLM shape: `vllm:gpu_cache_usage_perc`, no `engine` label.
    TGI serves exactly one model and has no model label.
    """
    states = [model_state] if isinstance(model_state, TrafficState) else list(model_state)
    if not states:
        return ""
    kinds = {s.server for s in states}
    if len(kinds) != 1:
        raise ValueError(f"one server renders one server type, got {sorted(kinds)}")
    out = _Out()
    server = kinds.pop()
    if server == "vllm":
        _vllm(out, states, vllm_old_names)
    elif server == "triton":
        _triton(out, states)
    elif server == "tgi":
        if len(states) != 1:
            raise ValueError("TGI serves one model")
        _tgi(out, states[0])
    else:
        _sglang(out, states)
    return "\n".join(out.lines) + "\n"
