"""Parsing inference servers' `/metrics` text into per-model stats, apart from the fetching.

Split from `collectors/inference.py` so the parsers stay pure functions over strings, tested on literal
text from real servers without any HTTP, and so the collector module stays about scraping. The server
type is recognised from its metric names because annotations rarely say which server a pod runs;
each known server (vLLM, Triton, TGI, SGLang) has one helper mapping its names and labels onto
`ModelStats`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from collectors.base import SourceError

SOURCE = "inference"
_VLLM_FAILED_REASONS = frozenset({"abort", "error"})
# SGLang repeats the scheduler's gauges once per tensor/pipeline rank: the same value, not more load.
_SGLANG_REPLICA_LABELS = frozenset({"tp_rank", "pp_rank", "moe_ep_rank", "attn_tp_rank"})
_SERVER_PREFIXES = (("vllm", "vllm:"), ("triton", "nv_inference_"), ("tgi", "tgi_"), ("sglang", "sglang:"))


class ParseError(SourceError):
    """A body that is not Prometheus text (an HTML error page, garbage, a cut-off line)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(SOURCE, message, cause)


class UnknownServerError(ParseError):
    """Valid exposition text, but from no inference server gpucap knows (no vllm:/nv_inference_/tgi_/sglang:)."""


@dataclass(frozen=True, slots=True)
class ModelStats:
    server: str  # "vllm" | "triton" | "tgi" | "sglang"
    model: str  # "" for TGI, which has no model label
    queue_requests: float | None
    running_requests: float | None
    kv_cache_usage_ratio: float | None  # 0-1
    prompt_tokens_total: float | None
    generated_tokens_total: float | None
    successful_requests_total: float | None
    failed_requests_total: float | None
    generated_tokens_per_second: float | None  # only where the server exports a gauge (sglang:gen_throughput)


COUNTER_FIELDS = (
    "prompt_tokens_total",
    "generated_tokens_total",
    "successful_requests_total",
    "failed_requests_total",
)


# --------------------------------------------------------------------------------------------- parsing

_Index = dict[str, list[tuple[Mapping[str, str], float]]]


def _index(text: str) -> _Index:
    """Samples by name, with `_total` taken off counters so typed and untyped counters look the same.

    prometheus_client appends `_total` to samples of a family typed `counter` even when the server
    (TGI, Triton) wrote none, and leaves untyped samples as written; stripping it on both sides gives
    one name per counter whichever way a server declares it.
    """
    index: _Index = defaultdict(list)
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:
        # The parser raises ValueError mostly; from untrusted input any exception means "not text".
        raise ParseError(f"not Prometheus text: {exc}", exc) from exc
    for family in families:
        strip = family.type in ("counter", "unknown", "untyped")
        for sample in family.samples:
            if not math.isfinite(sample.value):
                continue
            name = sample.name[:-6] if strip and sample.name.endswith("_total") else sample.name
            index[name].append((sample.labels, float(sample.value)))
    return index


def _per_model(
    index: _Index,
    name: str,
    model_label: str | None,
    *,
    where: Callable[[Mapping[str, str]], bool] | None = None,
    ratio: bool = False,
    replica_labels: frozenset[str] = frozenset(),
) -> dict[str, float] | None:
    """One value per model: series summed (engines, versions, reasons), replicas of one value de-duplicated.

    A ratio is never summed: the fullest engine is reported, because that is where requests wait.
    None when the server does not export the metric at all, so "absent" stays distinct from zero.
    """
    samples = index.get(name)
    if samples is None:
        return None
    groups: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for labels, value in samples:
        model = labels.get(model_label, "") if model_label else ""
        series = groups.setdefault(model, {})
        if where is not None and not where(labels):
            continue
        key = tuple(sorted((k, v) for k, v in labels.items() if k != model_label and k not in replica_labels))
        series[key] = max(series.get(key, value), value)
    combine = max if ratio else sum
    return {model: combine(series.values()) if series else 0.0 for model, series in groups.items()}


def _build(server: str, **fields: dict[str, float] | None) -> list[ModelStats]:
    models = sorted({m for values in fields.values() if values for m in values})
    all_fields = {f.name: None for f in dataclasses.fields(ModelStats) if f.name not in ("server", "model")}
    return [
        ModelStats(
            server=server,
            model=model,
            **{**all_fields, **{f: (values.get(model) if values else None) for f, values in fields.items()}},
        )
        for model in models
    ]


def _vllm(index: _Index) -> list[ModelStats]:
    label = "model_name"
    kv = _per_model(index, "vllm:kv_cache_usage_perc", label, ratio=True)
    if kv is None:
        kv = _per_model(index, "vllm:gpu_cache_usage_perc", label, ratio=True)
    ok = _per_model(
        index,
        "vllm:request_success",
        label,
        where=lambda lb: lb.get("finished_reason") not in _VLLM_FAILED_REASONS,
    )
    failed = _per_model(
        index,
        "vllm:request_success",
        label,
        where=lambda lb: lb.get("finished_reason") in _VLLM_FAILED_REASONS,
    )
    return _build(
        "vllm",
        queue_requests=_per_model(index, "vllm:num_requests_waiting", label),
        running_requests=_per_model(index, "vllm:num_requests_running", label),
        kv_cache_usage_ratio=kv,
        prompt_tokens_total=_per_model(index, "vllm:prompt_tokens", label),
        generated_tokens_total=_per_model(index, "vllm:generation_tokens", label),
        successful_requests_total=ok,
        failed_requests_total=failed,
    )


def _triton(index: _Index) -> list[ModelStats]:
    label = "model"
    return _build(
        "triton",
        queue_requests=_per_model(index, "nv_inference_pending_request_count", label),
        successful_requests_total=_per_model(index, "nv_inference_request_success", label),
        failed_requests_total=_per_model(index, "nv_inference_request_failure", label),
    )


def _tgi(index: _Index) -> list[ModelStats]:
    return _build(
        "tgi",
        queue_requests=_per_model(index, "tgi_queue_size", None),
        running_requests=_per_model(index, "tgi_batch_current_size", None),
        prompt_tokens_total=_per_model(index, "tgi_request_input_length_sum", None),
        generated_tokens_total=_per_model(index, "tgi_request_generated_tokens_sum", None),
        successful_requests_total=_per_model(index, "tgi_request_success", None),
        failed_requests_total=_per_model(index, "tgi_request_failure", None),
    )


def _sglang(index: _Index) -> list[ModelStats]:
    label = "model_name"

    def get(name: str, ratio: bool = False) -> dict[str, float] | None:
        return _per_model(index, name, label, ratio=ratio, replica_labels=_SGLANG_REPLICA_LABELS)

    requests = get("sglang:num_requests")
    aborted = get("sglang:num_aborted_requests")
    ok = None
    if requests is not None:
        ok = {m: max(0.0, n - (aborted or {}).get(m, 0.0)) for m, n in requests.items()}
    return _build(
        "sglang",
        queue_requests=get("sglang:num_queue_reqs"),
        running_requests=get("sglang:num_running_reqs"),
        kv_cache_usage_ratio=get("sglang:token_usage", ratio=True),
        prompt_tokens_total=get("sglang:prompt_tokens"),
        generated_tokens_total=get("sglang:generation_tokens"),
        successful_requests_total=ok,
        failed_requests_total=aborted,
        generated_tokens_per_second=get("sglang:gen_throughput"),
    )


_PARSERS: dict[str, Callable[[_Index], list[ModelStats]]] = {
    "vllm": _vllm,
    "triton": _triton,
    "tgi": _tgi,
    "sglang": _sglang,
}


def parse_exposition(text: str) -> tuple[ModelStats, ...]:
    """Per-model stats of every known server in one `/metrics` body.

    More than one server may appear (Triton's vLLM backend exports both `nv_inference_` and `vllm:`).
    Raises `ParseError` for text that is not Prometheus exposition, `UnknownServerError` for valid text
    from no known server.
    """
    index = _index(text)
    servers = [s for s, prefix in _SERVER_PREFIXES if any(name.startswith(prefix) for name in index)]
    if not servers:
        raise UnknownServerError(
            "no vllm:, nv_inference_, tgi_ or sglang: metrics: not a known inference server"
        )
    return tuple(stats for server in servers for stats in _PARSERS[server](index))
