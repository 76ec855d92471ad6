"""Inference-server scraping: real exposition text, real loopback servers, and the traffic model."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from collectors.base import SourceError
from collectors.inference import (
    MAX_REDIRECTS,
    CounterTracker,
    InferenceCollector,
    InferenceReading,
    ModelStats,
    ParseError,
    Target,
    UnknownServerError,
    parse_exposition,
    targets_from_pod,
)
from collectors.simulated.inference import InferenceHTTPServer, TrafficModel, render

# --------------------------------------------------------------------------- literal exposition text

VLLM_V1 = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 9.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.62
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.97
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.2e+06
vllm:prompt_tokens_total{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 800000.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 300000.0
vllm:generation_tokens_total{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 200000.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B-Instruct"} 900.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="meta-llama/Llama-3.1-8B-Instruct"} 50.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:request_success_total{engine="0",finished_reason="error",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
vllm:request_success_total{engine="0",finished_reason="repetition",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
vllm:request_success_total{engine="1",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B-Instruct"} 600.0
vllm:request_success_total{engine="1",finished_reason="length",model_name="meta-llama/Llama-3.1-8B-Instruct"} 40.0
vllm:request_success_total{engine="1",finished_reason="abort",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 10.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 960.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 960.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4500.2
"""

VLLM_V0_OLD_NAMES = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="mistral-7b"} 4.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="mistral-7b"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="mistral-7b"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="mistral-7b"} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="mistral-7b"} 51234.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="mistral-7b"} 20480.0
# HELP vllm:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.01",model_name="mistral-7b"} 100.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="mistral-7b"} 20000.0
vllm:time_per_output_token_seconds_count{model_name="mistral-7b"} 20000.0
vllm:time_per_output_token_seconds_sum{model_name="mistral-7b"} 410.5
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="mistral-7b"} 97.0
vllm:request_success_total{finished_reason="length",model_name="mistral-7b"} 3.0
"""

TRITON = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="densenet_onnx",version="1"} 120
nv_inference_request_success{model="densenet_onnx",version="2"} 30
nv_inference_request_success{model="bert",version="1"} 55
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="densenet_onnx",reason="OTHER",version="1"} 1
nv_inference_request_failure{model="densenet_onnx",reason="BACKEND",version="1"} 4
nv_inference_request_failure{model="densenet_onnx",reason="CANCELED",version="1"} 0
nv_inference_request_failure{model="densenet_onnx",reason="REJECTED",version="1"} 2
nv_inference_request_failure{model="densenet_onnx",reason="REJECTED",version="2"} 3
nv_inference_request_failure{model="bert",reason="OTHER",version="1"} 0
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="densenet_onnx",version="1"} 240
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="densenet_onnx",version="1"} 6
nv_inference_pending_request_count{model="densenet_onnx",version="2"} 1
nv_inference_pending_request_count{model="bert",version="1"} 0
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-6f2b4c57-1a2b-3c4d-5e6f-7a8b9c0d1e2f"} 0.42
"""

# TGI's Rust exporter: TYPE without HELP, counters without `_total`.
TGI = """\
# TYPE tgi_request_count counter
tgi_request_count 1013
# TYPE tgi_request_success counter
tgi_request_success 1000
# TYPE tgi_request_failure counter
tgi_request_failure{err="validation"} 9
tgi_request_failure{err="generation"} 4
# TYPE tgi_queue_size gauge
tgi_queue_size 7
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 16
# TYPE tgi_request_input_length histogram
tgi_request_input_length_bucket{le="100"} 200
tgi_request_input_length_bucket{le="+Inf"} 1013
tgi_request_input_length_sum 456789
tgi_request_input_length_count 1013
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_bucket{le="100"} 300
tgi_request_generated_tokens_bucket{le="+Inf"} 1000
tgi_request_generated_tokens_sum 234567
tgi_request_generated_tokens_count 1000
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen3",engine_type="unified",tp_rank="0",pp_rank="0"} 7.0
sglang:num_running_reqs{model_name="qwen3",engine_type="unified",tp_rank="1",pp_rank="0"} 7.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen3",engine_type="unified",tp_rank="0",pp_rank="0"} 3.0
sglang:num_queue_reqs{model_name="qwen3",engine_type="unified",tp_rank="1",pp_rank="0"} 3.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen3",engine_type="unified",tp_rank="0",pp_rank="0"} 0.66
sglang:token_usage{model_name="qwen3",engine_type="unified",tp_rank="1",pp_rank="0"} 0.66
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="qwen3",engine_type="unified",tp_rank="0",pp_rank="0"} 294.5
sglang:gen_throughput{model_name="qwen3",engine_type="unified",tp_rank="1",pp_rank="0"} 294.5
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="qwen3",is_streaming="true"} 8.0e+06
sglang:prompt_tokens_total{model_name="qwen3",is_streaming="false"} 1.0e+06
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="qwen3"} 2.5e+06
# HELP sglang:num_requests_total Number of requests processed.
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{model_name="qwen3"} 5000.0
# HELP sglang:num_aborted_requests_total Number of requests aborted.
# TYPE sglang:num_aborted_requests_total counter
sglang:num_aborted_requests_total{model_name="qwen3"} 25.0
"""


def _one(text: str) -> ModelStats:
    (stats,) = parse_exposition(text)
    return stats


def test_vllm_new_names_sum_engines_and_split_outcomes_by_finished_reason():
    s = _one(VLLM_V1)
    assert (s.server, s.model) == ("vllm", "meta-llama/Llama-3.1-8B-Instruct")
    assert s.queue_requests == 4.0 and s.running_requests == 21.0
    assert s.kv_cache_usage_ratio == 0.97  # the fullest engine, where requests wait; not a sum over engines
    assert s.prompt_tokens_total == 2_000_000.0 and s.generated_tokens_total == 500_000.0
    assert s.successful_requests_total == 900 + 50 + 2 + 600 + 40  # stop, length, repetition
    assert s.failed_requests_total == 7 + 1 + 2  # abort, error
    assert s.generated_tokens_per_second is None


def test_vllm_old_names_are_read_too():
    s = _one(VLLM_V0_OLD_NAMES)
    assert (s.server, s.model) == ("vllm", "mistral-7b")
    assert s.kv_cache_usage_ratio == 0.25
    assert (s.running_requests, s.queue_requests) == (4.0, 0.0)
    assert s.successful_requests_total == 100.0
    assert s.failed_requests_total == 0.0  # the counter exists, nothing failed: zero, not unknown
    assert s.prompt_tokens_total == 51234.0


def test_triton_sums_versions_and_failure_reasons_and_has_no_token_counts():
    stats = {s.model: s for s in parse_exposition(TRITON)}
    assert set(stats) == {"densenet_onnx", "bert"}
    dense = stats["densenet_onnx"]
    assert dense.server == "triton"
    assert dense.successful_requests_total == 150.0
    assert dense.failed_requests_total == 1 + 4 + 0 + 2 + 3
    assert dense.queue_requests == 7.0
    assert dense.generated_tokens_total is None and dense.prompt_tokens_total is None
    assert dense.kv_cache_usage_ratio is None
    assert stats["bert"].failed_requests_total == 0.0


@pytest.mark.parametrize("typed", [True, False], ids=["typed-counter", "untyped"])
def test_tgi_counters_without_total_typed_or_not(typed: bool):
    text = TGI if typed else "\n".join(line for line in TGI.splitlines() if "counter" not in line) + "\n"
    s = _one(text)
    assert (s.server, s.model) == ("tgi", "")
    assert s.queue_requests == 7.0 and s.running_requests == 16.0
    assert s.successful_requests_total == 1000.0
    assert s.failed_requests_total == 13.0
    assert s.generated_tokens_total == 234567.0
    assert s.prompt_tokens_total == 456789.0
    assert s.kv_cache_usage_ratio is None


def test_sglang_does_not_count_tensor_parallel_ranks_twice():
    s = _one(SGLANG)
    assert (s.server, s.model) == ("sglang", "qwen3")
    assert s.running_requests == 7.0 and s.queue_requests == 3.0  # ranks repeat one value
    assert s.kv_cache_usage_ratio == 0.66
    assert s.generated_tokens_per_second == 294.5
    assert s.prompt_tokens_total == 9.0e6  # streaming and non-streaming add up
    assert s.successful_requests_total == 4975.0 and s.failed_requests_total == 25.0


def test_triton_with_vllm_backend_reports_both_servers():
    servers = sorted({s.server for s in parse_exposition(TRITON + VLLM_V0_OLD_NAMES)})
    assert servers == ["triton", "vllm"]


def test_unknown_server_and_malformed_text_are_told_apart():
    with pytest.raises(UnknownServerError, match="not a known inference server"):
        parse_exposition("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n")
    with pytest.raises(ParseError) as malformed:
        parse_exposition('vllm:num_requests_running{model_name="x" 3\n')
    assert not isinstance(malformed.value, UnknownServerError)
    with pytest.raises(ParseError):
        parse_exposition("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")


@pytest.mark.parametrize("server", ["vllm", "triton", "tgi", "sglang"])
def test_simulated_servers_render_what_the_scraper_reads(server: str):
    model = "" if server == "tgi" else "m"
    traffic = TrafficModel(
        server,
        model,
        capacity_rps=10,
        mean_prompt_tokens=400,
        mean_generated_tokens=100,
        max_running=32,
        seed=3,
    )
    traffic.advance(0.0, 8.0)
    traffic.advance(600.0, 8.0)
    state = traffic.state
    s = _one(render(state))
    assert (s.server, s.model) == (server, model)
    assert s.successful_requests_total == pytest.approx(state.successful_requests_total, abs=2)
    assert s.failed_requests_total == pytest.approx(state.failed_requests_total, abs=2)
    assert s.queue_requests == round(state.queue_requests)
    if server != "triton":
        assert s.generated_tokens_total == pytest.approx(state.generated_tokens_total, abs=1)


def test_simulated_vllm_old_names():
    traffic = TrafficModel("vllm", "m", 10, 400, 100, 32, seed=3)
    traffic.advance(0.0, 8.0)
    traffic.advance(60.0, 8.0)
    text = render(traffic.state, vllm_old_names=True)
    assert "vllm:gpu_cache_usage_perc" in text and "engine=" not in text
    assert _one(text).kv_cache_usage_ratio == pytest.approx(traffic.state.kv_cache_usage_ratio)


# ---------------------------------------------------------------------------------------- counter resets


def test_counter_tracker_keeps_growing_across_a_reset():
    tracker = CounterTracker()
    key = ("http://10.0.0.1:8000/metrics", "vllm", "m", "successful_requests_total")
    totals = [tracker.update(key, raw, now) for now, raw in enumerate([100, 150, 20, 40, 5])]
    assert totals == [100, 150, 170, 190, 195]
    other = ("http://10.0.0.2:8000/metrics", "vllm", "m", "successful_requests_total")
    assert tracker.update(other, 7, 10.0) == 7  # per key


def test_counter_totals_survive_a_server_restart():
    traffic = TrafficModel("vllm", "m", 10, 400, 100, 32, seed=5)
    traffic.advance(0.0, 5.0)
    with InferenceHTTPServer(lambda: render(traffic.state)) as server:
        target = Target(server.url, "ml", "vllm-0", "static")
        collector = InferenceCollector(lambda _: [target], timeout=2.0)
        try:
            totals = []
            for now in (60.0, 120.0):
                traffic.advance(now, 5.0)
                totals.append(collector.collect(now).servers[0].successful_requests_total)
            traffic.restart()  # the process restarted: its counters begin again from zero
            traffic.advance(180.0, 5.0)
            raw_after = _one(render(traffic.state)).successful_requests_total
            after = collector.collect(180.0).servers[0]
        finally:
            collector.close()
    assert totals[0] < totals[1]
    assert raw_after < totals[1]  # what a naive scraper would see: a drop
    assert after.successful_requests_total == totals[1] + raw_after


# ---------------------------------------------------------------------------------------- bad targets


@pytest.fixture(scope="module")
def healthy() -> Iterator[InferenceHTTPServer]:
    with InferenceHTTPServer(lambda: VLLM_V1) as server:
        yield server


def _collect(targets: list[Target], **kw: float) -> tuple[InferenceCollector, InferenceReading]:
    collector = InferenceCollector(lambda _: targets, **kw)  # type: ignore[arg-type]
    try:
        return collector, collector.collect(1000.0)
    finally:
        collector.close()


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ("garbage", "parse"),
        ("html", "parse"),
        ("truncated", "truncated"),
        ("http_500", "http_status"),
        ("redirect_loop", "redirect"),
        ("huge", "too_large"),
        ("hang", "timeout"),
        ("trickle", "timeout"),
    ],
)
def test_a_bad_target_is_counted_by_url_and_the_others_are_unaffected(
    healthy: InferenceHTTPServer, fault: str, kind: str
):
    with InferenceHTTPServer(lambda: VLLM_V0_OLD_NAMES, fault=fault, huge_bytes=2**20) as bad:
        targets = [
            Target(bad.url, "ml", "bad-0", "annotation"),
            Target(healthy.url, "ml", "good-0", "static"),
        ]
        collector, reading = _collect(targets, timeout=0.5, max_bytes=64 * 1024)
    assert reading.errors == ((bad.url, kind),)
    assert [(s.pod, s.model) for s in reading.servers] == [("good-0", "meta-llama/Llama-3.1-8B-Instruct")]
    assert collector.errors_total == {(bad.url, kind): 1}
    if fault == "redirect_loop":
        assert bad.requests == 1 + MAX_REDIRECTS


def test_not_a_known_server_and_a_closed_port(healthy: InferenceHTTPServer):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/metrics"
    with InferenceHTTPServer(lambda: "# TYPE up gauge\nup 1\n") as other:
        targets = [Target(u, "ml", "p", "static") for u in (other.url, closed, healthy.url)]
        _, reading = _collect(targets, timeout=1.0)
    assert dict(reading.errors) == {other.url: "unknown_server", closed: "connection"}
    assert len(reading.servers) == 1


class _Redirect(BaseHTTPRequestHandler):
    to = ""

    def do_GET(self) -> None:
        self.send_response(307)
        self.send_header("Location", self.to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_redirects_are_followed_on_the_same_host_only(healthy: InferenceHTTPServer):
    port = healthy.url.split(":")[2].split("/")[0]
    same_host = type("SameHost", (_Redirect,), {"to": healthy.url})
    other_host = type("OtherHost", (_Redirect,), {"to": f"http://localhost:{port}/metrics"})
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (same_host, other_host)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        follow, refuse = (f"http://127.0.0.1:{s.server_address[1]}/metrics" for s in servers)
        bad_url = "http://127.0.0.1:99999/metrics"  # a typo in static config
        targets = [Target(u, "ml", "p", "static") for u in (follow, refuse, bad_url)]
        _, reading = _collect(targets, timeout=1.0)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert [s.url for s in reading.servers] == [follow]  # stats are filed under the URL that was asked for
    assert dict(reading.errors) == {refuse: "redirect", bad_url: "unexpected"}


def test_hanging_targets_do_not_delay_the_healthy_one(healthy: InferenceHTTPServer):
    timeout = 0.5
    with (
        InferenceHTTPServer(lambda: "", fault="hang") as hang,
        InferenceHTTPServer(lambda: "", fault="trickle") as trickle,
    ):
        targets = [Target(u, "ml", "p", "static") for u in (hang.url, trickle.url, healthy.url)]
        collector = InferenceCollector(lambda _: targets, timeout=timeout)
        try:
            started = time.monotonic()
            reading = collector.collect(0.0)
            elapsed = time.monotonic() - started
            assert {s.url for s in reading.servers} == {healthy.url}
            assert dict(reading.errors) == {hang.url: "timeout", trickle.url: "timeout"}
            assert elapsed < timeout + 0.75
            # Next cycle is just as bounded: nothing left over from the first one blocks the pool.
            started = time.monotonic()
            assert collector.collect(15.0).servers
            assert time.monotonic() - started < timeout + 0.75
        finally:
            collector.close()


def test_all_targets_failing_raises_source_error_but_still_counts():
    with InferenceHTTPServer(lambda: "", fault="http_500") as bad:
        collector = InferenceCollector(lambda _: [Target(bad.url, "ml", "p", "static")], timeout=1.0)
        try:
            with pytest.raises(SourceError, match="all 1 targets failed"):
                collector.collect(0.0)
        finally:
            collector.close()
    assert collector.errors_total == {(bad.url, "http_status"): 1}
    nothing = InferenceCollector(list)  # no targets is not a failure
    assert nothing.collect(0.0) == InferenceReading(servers=(), errors=(), at=0.0)
    nothing.close()


def test_failures_are_logged_with_the_url_at_most_every_five_minutes(caplog: pytest.LogCaptureFixture):
    with InferenceHTTPServer(lambda: "", fault="http_500") as bad, InferenceHTTPServer(lambda: TGI) as good:
        targets = [Target(bad.url, "ml", "p", "static"), Target(good.url, "ml", "q", "static")]
        collector = InferenceCollector(lambda _: targets, timeout=1.0)
        try:
            with caplog.at_level(logging.WARNING, logger="collectors.inference"):
                for now in (0.0, 15.0, 120.0, 301.0):
                    collector.collect(now)
        finally:
            collector.close()
    logged = [r.getMessage() for r in caplog.records if bad.url in r.getMessage()]
    assert len(logged) == 2 and "http_status" in logged[0]
    assert collector.errors_total == {(bad.url, "http_status"): 4}


# --------------------------------------------------------------------------------------------- targets


def test_targets_from_pod_annotations():
    gpucap = {"gpucap.io/metrics-port": "8000", "prometheus.io/port": "9000"}
    assert targets_from_pod("ml", "vllm-0", "10.1.2.3", gpucap) == Target(
        "http://10.1.2.3:8000/metrics", "ml", "vllm-0", "annotation"
    )
    custom = {"gpucap.io/metrics-port": "8000", "gpucap.io/metrics-path": "stats/prom"}
    assert targets_from_pod("ml", "p", "10.1.2.3", custom).url == "http://10.1.2.3:8000/stats/prom"
    prom = {"prometheus.io/port": "8002", "prometheus.io/path": "/m", "prometheus.io/scheme": "https"}
    assert targets_from_pod("ml", "triton", "fd00::5", prom).url == "https://[fd00::5]:8002/m"
    opted_out = {"prometheus.io/port": "9000", "prometheus.io/scrape": "false"}
    assert targets_from_pod("ml", "p", "10.1.2.3", opted_out) is None
    assert targets_from_pod("ml", "p", "10.1.2.3", {"prometheus.io/port": "http"}) is None
    assert targets_from_pod("ml", "p", "10.1.2.3", {"app": "x"}) is None
    assert targets_from_pod("ml", "p", "", gpucap) is None  # not scheduled yet: no IP


# ------------------------------------------------------------------------------------------ traffic model


def _model(seed: int = 7) -> TrafficModel:
    return TrafficModel(
        "vllm",
        "m",
        capacity_rps=10.0,
        mean_prompt_tokens=500,
        mean_generated_tokens=200,
        max_running=64,
        seed=seed,
    )


def test_overload_grows_the_queue_over_time():
    traffic = _model()
    traffic.advance(0.0, 15.0)
    queues = [traffic.advance(t, 15.0).queue_requests for t in (600.0, 1200.0, 1800.0)]
    assert queues[0] < queues[1] < queues[2]
    assert queues[2] == pytest.approx(5.0 * 1800, rel=0.05)  # the excess, 5 req/s, piles up
    state = traffic.state
    assert state.running_requests == 64 and state.kv_cache_usage_ratio == 1.0
    assert traffic.utilization == pytest.approx(1.0)


def test_underload_keeps_the_queue_empty_and_utilization_at_arrival_over_capacity():
    traffic = _model()
    traffic.advance(0.0, 4.0)
    state = traffic.advance(3600.0, 4.0)
    assert state.queue_requests < 1.0
    assert traffic.utilization == pytest.approx(0.4, abs=0.02)
    assert state.running_requests == pytest.approx(64 * 0.4, abs=2)
    assert state.successful_requests_total == pytest.approx(4.0 * 3600 * 0.995, rel=0.02)
    assert state.generated_tokens_total == pytest.approx(state.successful_requests_total * 200)


def test_traffic_is_deterministic_for_a_seed_and_seven_days_is_one_call():
    def run(seed: int) -> list[float]:
        traffic = _model(seed)
        traffic.advance(0.0, 9.5)
        out = [traffic.advance(t, 9.5 + (t % 7)).successful_requests_total for t in range(15, 3600, 15)]
        traffic.advance(3600.0 + 7 * 86400.0, 9.5)
        return [*out, traffic.state.successful_requests_total, traffic.state.queue_requests]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_error_counts_of_targets_that_are_gone_are_folded_not_lost() -> None:
    from collectors.inference import FORGET_AFTER_S, GONE, InferenceCollector, Target

    targets = [Target("http://127.0.0.1:9/metrics", "ns", "old-pod", "static")]
    c = InferenceCollector(lambda _: targets, timeout=0.5)
    try:
        for t in (0.0, 15.0):
            with pytest.raises(SourceError):
                c.collect(t)
        assert c.errors_total == {("http://127.0.0.1:9/metrics", "connection"): 2}
        targets[:] = [Target("http://127.0.0.1:10/metrics", "ns", "new-pod", "static")]
        with pytest.raises(SourceError):
            c.collect(FORGET_AFTER_S + 100)
        totals = c.errors_total
        assert totals[(GONE, "connection")] == 2, "the old pod's URL is folded, its count kept"
        assert not any(url == "http://127.0.0.1:9/metrics" for url, _ in totals)
        assert sum(totals.values()) == 3
    finally:
        c.close()
