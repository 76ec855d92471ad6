"""Saturation and cost per successful outcome: arithmetic against hand calculations, then end to end."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from agent.analytics import OutcomeTracker
from agent.cli import main, take_snapshot
from agent.config import Config, SaturationConfig
from agent.exposition import make_registry
from agent.model import Owner
from agent.sources import build_runtime
from collectors.inference import ServerStats

START = 1767225600.0
OWNER = Owner("serving", "vllm-0", "", "Deployment", "vllm", "ml", "uid-1")


def stats(succ: float, tokens: float, queue: float = 0.0, kv: float = 0.2, model: str = "m") -> ServerStats:
    return ServerStats("serving", "vllm-0", "http://x/metrics", "vllm", model, queue, 4.0, kv, None, tokens,
                       succ, 0.0, None)


def run_minutes(tracker: OutcomeTracker, minutes: int, make, hourly: float = 6.88):
    views = []
    for m in range(minutes + 1):
        now = START + 60 * m
        cost = hourly * m / 60
        views = tracker.update(make(m), [OWNER] * len(make(m)), {"uid-1": cost}, {"uid-1": hourly},
                               {"uid-1": 0.5}, now)
    return views


def test_cost_per_outcome_matches_hand_calculation() -> None:
    t = OutcomeTracker(window=15 * 60, sat=SaturationConfig())
    (v,) = run_minutes(t, 20, lambda m: [stats(100 * m, 25_000 * m)])
    # window [5m, 20m]: $6.88/h for 15 min = $1.72; 1500 successes; 375k tokens
    assert v.cost_per_1k_successful_requests == pytest.approx(1.72 / 1500 * 1000, rel=1e-12)
    assert v.cost_per_million_generated_tokens == pytest.approx(1.72 / 375_000 * 1e6, rel=1e-12)
    assert v.successful_requests_per_second == pytest.approx(100 / 60)
    assert v.hourly_cost == 6.88


def test_window_not_yet_full_uses_what_there_is() -> None:
    t = OutcomeTracker(window=15 * 60, sat=SaturationConfig())
    (v,) = run_minutes(t, 4, lambda m: [stats(10 * m, 1000 * m)])
    assert v.cost_per_1k_successful_requests == pytest.approx(6.88 * 4 / 60 / 40 * 1000)


def test_no_successes_means_no_figure_not_zero_or_infinity() -> None:
    t = OutcomeTracker(window=15 * 60, sat=SaturationConfig())
    (v,) = run_minutes(t, 20, lambda m: [stats(500, 0)])  # counters flat: nothing succeeded in the window
    assert v.cost_per_1k_successful_requests is None
    assert v.cost_per_million_generated_tokens is None


def test_two_models_on_one_server_split_its_cost_by_tokens() -> None:
    t = OutcomeTracker(window=15 * 60, sat=SaturationConfig())
    # model a: few requests, long answers (3/4 of the tokens); model b: many short requests
    a, b = run_minutes(t, 20, lambda m: [stats(100 * m, 30_000 * m, model="a"), stats(300 * m, 10_000 * m, model="b")])
    # the server's $1.72 over the window is split 3:1 by generated tokens: nothing counted twice
    assert a.window_cost == pytest.approx(1.72 * 0.75) and b.window_cost == pytest.approx(1.72 * 0.25)
    assert a.window_cost + b.window_cost == pytest.approx(1.72, abs=1e-12)
    assert a.cost_per_1k_successful_requests == pytest.approx(1.29 / 1500 * 1000)
    assert b.cost_per_1k_successful_requests == pytest.approx(0.43 / 4500 * 1000)
    assert a.cost_per_million_generated_tokens == pytest.approx(b.cost_per_million_generated_tokens)
    assert a.hourly_cost + b.hourly_cost == pytest.approx(6.88)


def test_two_servers_in_one_pod_split_its_cost_evenly() -> None:
    t = OutcomeTracker(window=15 * 60, sat=SaturationConfig())

    def two_servers(m: int) -> list[ServerStats]:
        one = stats(100 * m, 10_000 * m)
        other = ServerStats("serving", "vllm-0", "http://x:9000/metrics", "vllm", "m2", 0.0, 1.0, 0.1, None,
                            1_000 * m, 10 * m, 0.0, None)
        return [one, other]

    a, b = run_minutes(t, 20, two_servers)
    # before the fix each server was charged the whole pod: $3.44 for a pod that cost $1.72
    assert a.window_cost == pytest.approx(0.86) and b.window_cost == pytest.approx(0.86)
    assert a.cost_per_1k_successful_requests == pytest.approx(0.86 / 1500 * 1000)
    assert b.cost_per_1k_successful_requests == pytest.approx(0.86 / 150 * 1000)


def test_a_server_whose_pod_holds_no_gpu_gets_no_cost() -> None:
    t = OutcomeTracker(window=15 * 60, sat=SaturationConfig())
    owner = Owner("serving", "cpu-proxy", "", "Deployment", "proxy", "ml", "uid-2")
    v = None
    for m in range(21):
        (v,) = t.update([stats(100 * m, 1000 * m)], [owner], {"uid-1": 1.0}, {"uid-1": 6.88}, {}, START + 60 * m)
    assert v.cost_per_1k_successful_requests is None, "never 0.0: the pod holds no GPU"
    assert v.cost_per_million_generated_tokens is None and v.window_cost is None
    assert v.hourly_cost == 0.0


@pytest.mark.parametrize(
    ("make", "saturated", "reason"),
    [
        (lambda m: [stats(m, m, queue=5 if m % 2 == 0 else 0)], True, "queue"),  # queued in over half the samples
        (lambda m: [stats(m, m, queue=5 if m % 5 == 0 else 0)], False, ""),  # a queue now and then
        (lambda m: [stats(m, m, queue=0, kv=0.97)], True, "kv_cache"),
        (lambda m: [stats(m, m, queue=0, kv=0.5)], False, ""),
    ],
)
def test_saturation_on_and_off(make, saturated: bool, reason: str) -> None:
    t = OutcomeTracker(window=15 * 60, sat=SaturationConfig())
    (v,) = run_minutes(t, 10, make)
    assert v.saturated is saturated
    assert v.saturation_reason == reason


def test_demo_at_30m_saturated_vllm_and_costs_on_metrics() -> None:
    rt = build_runtime(Config(), simulate="demo", realtime=False, start=START)
    try:
        st20 = take_snapshot(rt, 20 * 60, True)
        q20 = {i.owner.workload: i.queue_requests for i in st20.inference}
        st = take_snapshot(rt, 10 * 60, True)
        by = {i.owner.workload: i for i in st.inference}
        chat, small = by["chat-llama-70b"], by["assist-llama-1b"]
        assert chat.saturated and "queue" in chat.saturation_reason
        assert chat.queue_requests > q20["chat-llama-70b"] > 0, "the queue keeps growing"
        assert not small.saturated and small.queue_requests == 0
        for v in (chat, small):
            assert v.cost_per_1k_successful_requests and v.cost_per_1k_successful_requests > 0
            assert v.cost_per_million_generated_tokens and v.cost_per_million_generated_tokens > 0
        # the saturated server's GPU is busy, so its cost per request is above the small model's
        assert chat.cost_per_1k_successful_requests > small.cost_per_1k_successful_requests
        reg = make_registry(lambda: st)
        labels = {"node": rt.node_name, "namespace": "serving", "pod": chat.owner.pod, "container": "",
                  "workload_kind": "Deployment", "workload": "chat-llama-70b", "team": "ml-platform",
                  "server": "vllm", "model": chat.model}
        assert reg.get_sample_value("gpucap_inference_saturated", labels) == 1
        assert reg.get_sample_value("gpucap_cost_per_1k_successful_requests_dollars", labels) == \
            chat.cost_per_1k_successful_requests
        assert reg.get_sample_value("gpucap_inference_queue_requests", labels) == chat.queue_requests
    finally:
        rt.close()


def test_snapshot_table_has_a_serving_section() -> None:
    res = CliRunner().invoke(main, ["snapshot", "--simulate", "demo", "--at", "30m"])
    assert res.exit_code == 0, res.output
    serving = res.output.split("serving:", 1)[1]
    line = next(ln for ln in serving.splitlines() if "chat-llama-70b" in ln)
    assert "yes" in line.lower() and "$" in line
