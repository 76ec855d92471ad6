"""The only module that speaks Prometheus: renders the latest AgentState (served by agent/web.py).

Scrapes read the state the loop last published and never call NVML, the kubelet or the API
server, so a stuck source cannot slow a scrape. Families are built fresh from each new state, so
series of deleted pods disappear as soon as the state no longer has them; the encoded bytes
(text, OpenMetrics, and their gzip) are then kept for that state, because the state changes once
per evaluation while Prometheus, a second Prometheus and a curl may scrape many times: a scrape of
an unchanged state costs a dictionary lookup, not a re-encoding of every family. A new state's
body re-encodes only the families that changed since the last one (`_Families`).
"""

from __future__ import annotations

import gzip
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from agent import __version__
from agent.model import OWNER_LABELS, STATES, UNIT_LABELS, AgentState

DEVICE_GAUGES = (
    ("utilization", "gpu_utilization_ratio", "Fraction of time a kernel ran (NVML utilization)", 1.0),
    ("memory_utilization", "gpu_memory_utilization_ratio", "Fraction of time memory was read or written", 1.0),
    ("sm_active", "gpu_sm_active_ratio", "Fraction of SMs active (GPM, Hopper+)", 1.0),
    ("sm_occupancy", "gpu_sm_occupancy_ratio", "Resident warps over the maximum (GPM, Hopper+)", 1.0),
    ("tensor_active", "gpu_tensor_active_ratio", "Fraction of time tensor cores were active (GPM)", 1.0),
    ("dram_active", "gpu_dram_active_ratio", "DRAM bandwidth used over the maximum (GPM)", 1.0),
    ("memory_used_bytes", "gpu_memory_used_bytes", "Device memory in use", 1.0),
    ("memory_total_bytes", "gpu_memory_total_bytes", "Device memory in total", 1.0),
    ("memory_reserved_bytes", "gpu_memory_reserved_bytes", "Device memory reserved by the driver", 1.0),
    ("power_watts", "gpu_power_watts", "Power draw", 1.0),
    ("power_limit_watts", "gpu_power_limit_watts", "Enforced power limit", 1.0),
    ("temperature_celsius", "gpu_temperature_celsius", "GPU temperature", 1.0),
    ("sm_clock_hz", "gpu_sm_clock_hertz", "Current SM clock", 1.0),
    ("sm_clock_max_hz", "gpu_sm_clock_max_hertz", "Maximum SM clock", 1.0),
    ("pcie_tx_bytes_per_second", "gpu_pcie_transmit_bytes_per_second", "PCIe transmit throughput", 1.0),
    ("pcie_rx_bytes_per_second", "gpu_pcie_receive_bytes_per_second", "PCIe receive throughput", 1.0),
)
DEVICE_COUNTERS = (
    ("energy_joules", "gpu_energy_joules", "Energy consumed since the driver loaded"),
    ("nvlink_tx_bytes", "gpu_nvlink_transmit_bytes", "NVLink data transmitted since the driver loaded"),
    ("nvlink_rx_bytes", "gpu_nvlink_receive_bytes", "NVLink data received since the driver loaded"),
)
INFERENCE_LABELS = ("node",) + OWNER_LABELS + ("server", "model")


def _g(name: str, doc: str, labels: Iterable[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"gpucap_{name}", doc, labels=list(labels))


def _c(name: str, doc: str, labels: Iterable[str]) -> CounterMetricFamily:
    return CounterMetricFamily(f"gpucap_{name}", doc, labels=list(labels))


class StateCollector:
    """A prometheus_client custom collector over the agent's latest published state."""

    def __init__(self, get_state: Callable[[], AgentState | None]):
        self.get_state = get_state

    def collect(self) -> Iterator[Metric]:
        build = _g("build_info", "gpucap version", ["version"])
        build.add_metric([__version__], 1)
        yield build
        st = self.get_state()
        if st is None:
            return
        yield from self._collectors(st)
        yield from self._devices(st)
        yield from self._units(st)
        yield from self._sharing(st)
        yield from self._inference(st)

    # --- collectors -----------------------------------------------------------------------
    def _collectors(self, st: AgentState) -> Iterator[Metric]:
        node = st.node.name
        ok = _g("collector_success", "1 if the source's last collection succeeded", ["node", "collector"])
        dur = _g("collector_duration_seconds", "Duration of the source's last collection", ["node", "collector"])
        last = _g("collector_last_success_timestamp_seconds", "Time of the source's last success",
                  ["node", "collector"])
        errs = _c("collector_errors", "Failures of a source by kind since the agent started",
                  ["node", "collector", "kind"])
        age = _g("collector_data_age_seconds", "Age of the source's reading in use (absent: none fresh enough; "
                 "a reading older than its max age is dropped)", ["node", "collector"])
        skipped = _c("collector_skipped", "Items skipped inside a source or an evaluation stage, by reason",
                     ["node", "collector", "reason"])
        for c in st.collectors:
            ok.add_metric([node, c.name], 1.0 if c.success else 0.0)
            dur.add_metric([node, c.name], c.duration)
            if c.last_success is not None:
                last.add_metric([node, c.name], c.last_success)
            for kind, n in c.errors:
                errs.add_metric([node, c.name, kind], n)
            if c.data_age is not None:
                age.add_metric([node, c.name], c.data_age)
            for reason, n in c.skipped:
                skipped.add_metric([node, c.name, reason], n)
        for stage, reason, n in st.skipped:
            skipped.add_metric([node, stage, reason], n)
        evaluation = _g("evaluation_success", "1 if the last evaluation ran (0: only source status is served)",
                        ["node"])
        evaluation.add_metric([node], 1.0 if st.evaluation_success else 0.0)
        history = _c("history_write_errors", "Failed or dropped writes to the node's ledger (disk full, "
                     "read-only, queue full); /metrics keeps serving", ["node"])
        if st.history_write_errors is not None:
            history.add_metric([node], st.history_write_errors)
        stale = _g("kubernetes_metadata_stale", "1 while pod metadata is the last known (API server unreachable)",
                   ["node"])
        stale.add_metric([node], 1.0 if st.node.stale else 0.0)
        unknown = _g("default_priced_units", "Units priced by the default price (no catalog row, override or "
                     "annotation matched: set pricing overrides)", ["node"])
        unknown.add_metric([node], sum(1 for v in st.units if v.row.price_source == "default"))
        unknown_dev = _g("podresources_unmatched_devices", "Kubelet device IDs that match no NVML device",
                         ["node"])
        unknown_dev.add_metric([node], st.attribution.unknown_devices)
        yield from (ok, dur, last, errs, age, skipped, evaluation, history, stale, unknown, unknown_dev)

    # --- devices --------------------------------------------------------------------------
    def _devices(self, st: AgentState) -> Iterator[Metric]:
        node = st.node.name
        info = _g("gpu_info", "GPU or MIG instance present on the node", UNIT_LABELS + ("driver_version", "pci_bus_id"))
        up = _g("gpu_up", "1 if NVML answers for the GPU, 0 if it is lost or failing", UNIT_LABELS)
        procs = _g("gpu_processes", "Compute processes running on the device", UNIT_LABELS)
        gauges = {attr: _g(name, doc, UNIT_LABELS) for attr, name, doc, _ in DEVICE_GAUGES}
        counters = {attr: _c(name, doc, UNIT_LABELS) for attr, name, doc in DEVICE_COUNTERS}
        xid = _c("gpu_xid_errors", "Xid errors reported by the driver since the agent started", UNIT_LABELS + ("xid",))
        for d in st.devices:
            labels = [node, str(d.gpu), "" if d.gpu_instance is None else str(d.gpu_instance), d.mig_profile,
                      d.uuid, d.model]
            info.add_metric(labels + [st.driver_version, d.pci_bus_id], 1)
            up.add_metric(labels, 1.0 if d.up else 0.0)
            if not d.up:
                for x, n in d.xid_errors:
                    xid.add_metric(labels + [str(x)], n)
                continue
            procs.add_metric(labels, len(d.processes))
            for attr, _, _, scale in DEVICE_GAUGES:
                v = getattr(d, attr)
                if v is not None:
                    gauges[attr].add_metric(labels, v * scale)
            for attr, fam in counters.items():
                v = getattr(d, attr)
                if v is not None:
                    fam.add_metric(labels, v)
            if not d.is_mig:
                for x, n in d.xid_errors:
                    xid.add_metric(labels + [str(x)], n)
        yield from (info, up, procs, *gauges.values(), *counters.values(), xid)

    # --- units: allocation, price, state, cost --------------------------------------------
    def _units(self, st: AgentState) -> Iterator[Metric]:
        node = st.node.name
        ul = UNIT_LABELS
        uo = UNIT_LABELS + OWNER_LABELS
        alloc = _g("gpu_allocation_ratio", "Share of the device a container holds (1 whole unit, 1/replicas a share)", uo)
        price = _g("gpu_hourly_price_dollars", "Hourly price of the unit",
                   ul + ("instance_type", "capacity_type", "price_source"))
        state = _g("gpu_state", "1 for the unit's current state: active, idle_reserved, lost, unallocated or "
                   "unknown", uo + ("state",))
        idle_s = _g("gpu_idle_reserved_seconds", "Length of the current idle streak of an allocated unit", uo)
        activity = _g("unit_activity_ratio", "Activity used for idle detection (SM active, else utilization; "
                      "a share: its pod's processes)", uo)
        share_act = _g("gpu_share_device_activity_ratio", "A time-sliced share's pod's fraction of the whole "
                       "device's activity (unit_activity_ratio is relative to the share's entitlement)", uo)
        idle_cost = _g("idle_reserved_cost_dollars_per_hour", "Hourly price of units held by pods and idle", uo)
        alloc_cost = _g("allocated_cost_dollars_per_hour", "Hourly price of units held by pods (active, idle "
                        "reserved, or lost)", uo)
        unalloc_cost = _g("unallocated_cost_dollars_per_hour", "Hourly price of units no pod holds (known from a "
                          "fresh kubelet reading)", ul)
        lost_cost = _g("lost_cost_dollars_per_hour", "Hourly price of lost units (NVML: GPU lost or failing), "
                       "with their holder if a pod holds them", uo)
        unknown_cost = _g("unknown_cost_dollars_per_hour", "Hourly price of units whose holder or activity is "
                          "not known now (kubelet or NVML reading missing or too old)", uo)
        cost = _c("cost_dollars", "Dollars accrued by the unit in each state while the agent ran", uo + ("state",))
        for v in st.units:
            r = v.row
            u = list(r.unit_labels(node))
            o = list(r.owner.labels())
            for a in r.allocations:
                alloc.add_metric(u + list(a.owner.labels()), a.ratio)
            price.add_metric(u + [r.instance_type, r.capacity_type, r.price_source], r.hourly_price)
            for s in STATES:
                state.add_metric(u + o + [s], 1.0 if v.state == s else 0.0)
            if r.allocated and v.state in ("active", "idle_reserved"):
                idle_s.add_metric(u + o, v.idle_seconds)
            if r.activity is not None:
                activity.add_metric(u + o, r.activity)
            if r.device_activity is not None:
                share_act.add_metric(u + o, r.device_activity)
            idle_cost.add_metric(u + o, r.hourly_price if v.state == "idle_reserved" else 0.0)
            alloc_cost.add_metric(u + o, r.hourly_price if r.allocated and v.state != "unknown" else 0.0)
            unalloc_cost.add_metric(u, r.hourly_price if v.state == "unallocated" else 0.0)
            lost_cost.add_metric(u + o, r.hourly_price if v.state == "lost" else 0.0)
            unknown_cost.add_metric(u + o, r.hourly_price if v.state == "unknown" else 0.0)
        for labels, owner, s, dollars in st.costs:
            cost.add_metric(list(labels) + list(owner.labels()) + [s], dollars)
        pod = _g("pod_info", "Pods on the node with their workload and team (join with group_left)",
                 ("node", "namespace", "pod", "workload_kind", "workload", "team", "feature"))
        extra_keys = sorted({k for p in st.pods for k, _ in p.extra_labels})
        if extra_keys:
            pod = _g("pod_info", "Pods on the node with their workload and team (join with group_left)",
                     ("node", "namespace", "pod", "workload_kind", "workload", "team", "feature")
                     + tuple(_label_name(k) for k in extra_keys))
        for p in st.pods:
            o = p.owner
            extra = dict(p.extra_labels)
            pod.add_metric([node, o.namespace, o.pod, o.workload_kind, o.workload, o.team, o.feature]
                           + [extra.get(k, "") for k in extra_keys], 1)
        yield from (alloc, price, state, idle_s, activity, share_act, idle_cost, alloc_cost, unalloc_cost,
                    lost_cost, unknown_cost, cost, pod)
        if st.rightsizing:  # only with a ledger, once the first recomputation is done (agent/rightsizing.py)
            rs = _g("rightsizing_monthly_savings_dollars", "Monthly savings of the workload's right-sizing "
                    "recommendation over the ledger's last window (negative: scale_up's extra cost; 0: keep)",
                    ("node", "namespace", "workload_kind", "workload", "team", "action", "target"))
            for owner, action, target, savings in st.rightsizing:
                o = dict(owner)
                rs.add_metric([node, o.get("namespace", ""), o.get("workload_kind", ""), o.get("workload", ""),
                               o.get("team", ""), action, target], savings)
            yield rs

    # --- time-sliced sharing --------------------------------------------------------------
    def _sharing(self, st: AgentState) -> Iterator[Metric]:
        node = st.node.name
        dev_labels = {d.uuid: [node, str(d.gpu), "", "", d.uuid, d.model] for d in st.devices if not d.is_mig}
        uo = UNIT_LABELS + OWNER_LABELS
        act = _g("container_gpu_activity_ratio", "A container's share of a time-sliced GPU's SM activity", uo)
        mem = _g("container_gpu_memory_used_bytes", "Memory a container's processes use on a time-sliced GPU", uo)
        u_act = _g("gpu_unattributed_activity_ratio", "Activity of a shared GPU no pod's processes account for",
                   UNIT_LABELS)
        u_mem = _g("gpu_unattributed_memory_used_bytes", "Memory of a shared GPU no pod's processes account for",
                   UNIT_LABELS)
        foreign = _g("gpu_unallocated_processes", "Processes using a device their pod holds no allocation on "
                     "(namespace and pod empty: not a pod)", UNIT_LABELS + ("namespace", "pod"))
        att = st.attribution
        for c in att.container_use:
            labels = dev_labels.get(c.device_uuid)
            if labels:
                act.add_metric(labels + list(c.owner.labels()), c.activity)
                mem.add_metric(labels + list(c.owner.labels()), c.memory_used_bytes)
        for _gpu, uuid, a, m in att.unattributed:
            labels = dev_labels.get(uuid)
            if labels:
                u_act.add_metric(labels, a)
                u_mem.add_metric(labels, m)
        for f in att.foreign:
            labels = dev_labels.get(f.device_uuid)
            if labels:
                foreign.add_metric(labels + [f.namespace, f.pod], f.processes)
        yield from (act, mem, u_act, u_mem, foreign)

    # --- inference ------------------------------------------------------------------------
    def _inference(self, st: AgentState) -> Iterator[Metric]:
        node = st.node.name
        L = INFERENCE_LABELS
        fams: dict[str, Any] = {
            "queue": _g("inference_queue_requests", "Requests waiting", L),
            "running": _g("inference_running_requests", "Requests being processed", L),
            "kv": _g("inference_kv_cache_usage_ratio", "KV-cache usage", L),
            "sat": _g("inference_saturated", "1 if the server is saturated (queue, KV cache or SM active)", L),
            "succ": _c("inference_successful_requests", "Successful requests (server restarts folded in)", L),
            "fail": _c("inference_failed_requests", "Failed requests (server restarts folded in)", L),
            "gen": _c("inference_generated_tokens", "Generated tokens (server restarts folded in)", L),
            "prompt": _c("inference_prompt_tokens", "Prompt tokens (server restarts folded in)", L),
            "tps": _g("inference_generated_tokens_per_second", "Generation throughput", L),
            "rps": _g("inference_successful_requests_per_second", "Successful requests per second", L),
            "p1k": _g("cost_per_1k_successful_requests_dollars",
                      "GPU cost of the workload per 1000 successful requests over the outcome window", L),
            "p1m": _g("cost_per_million_generated_tokens_dollars",
                      "GPU cost of the workload per million generated tokens over the outcome window", L),
            "win": _g("inference_window_cost_dollars",
                      "GPU dollars attributed to the server and model over the outcome window (its share of the "
                      "pod's units; absent when the pod holds no GPU)", L),
        }
        for v in st.inference:
            labels = [node, *v.owner.labels(), v.server, v.model]
            for key, val in (("queue", v.queue_requests), ("running", v.running_requests),
                             ("kv", v.kv_cache_usage_ratio), ("succ", v.successful_requests_total),
                             ("fail", v.failed_requests_total), ("gen", v.generated_tokens_total),
                             ("prompt", v.prompt_tokens_total), ("tps", v.generated_tokens_per_second),
                             ("rps", v.successful_requests_per_second),
                             ("p1k", v.cost_per_1k_successful_requests),
                             ("p1m", v.cost_per_million_generated_tokens), ("win", v.window_cost)):
                if val is not None:
                    fams[key].add_metric(labels, val)
            fams["sat"].add_metric(labels, 1.0 if v.saturated else 0.0)
        yield from fams.values()


def _label_name(key: str) -> str:
    from agent.config import pod_label_name

    return pod_label_name(key)


def make_registry(get_state: Callable[[], AgentState | None]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StateCollector(get_state))
    return reg


CACHE_STATES = 2  # states whose encodings are kept: the published one and the one before (scrapes in flight)
GZIP_LEVEL = 6


class _Encodings:
    """Every encoding asked for of one state; the state is held so its id cannot be reused."""

    __slots__ = ("bodies", "lock", "state")

    def __init__(self, state: AgentState | None):
        self.state = state
        self.bodies: dict[tuple[str, bool], bytes] = {}
        self.lock = threading.RLock()  # the gzip form encodes the plain one under the same lock


_cache: OrderedDict[int, _Encodings] = OrderedDict()
_cache_lock = threading.Lock()
_stats = {"encodings": 0, "hits": 0}


def _entry(state: AgentState | None) -> _Encodings:
    key = id(state)
    with _cache_lock:
        e = _cache.get(key)
        if e is not None and e.state is state:
            _cache.move_to_end(key)
            return e
        e = _Encodings(state)
        _cache[key] = e
        while len(_cache) > CACHE_STATES:
            _cache.popitem(last=False)
        return e


class _Families:
    """Each family's encoded bytes per content type, reused while the family is unchanged.

    On `large` two thirds of the samples (prices, capacity, identity, most cost counters between
    accruals) are the same from one state to the next, and prometheus_client's encoder spends most
    of its time escaping label names and values sample by sample. So a new state's body is
    prometheus_client's own encoding of each changed family, joined with the kept encodings of the
    unchanged ones: an exposition is a sequence of families, and the library encodes each on its own
    (OpenMetrics' `# EOF` is written once, at the end). A family is unchanged when its name, help,
    type, unit and samples compare equal (Python equality: 0.0 and -0.0, 1 and 1.0 are equal, and
    Prometheus reads each pair as one value). Only the families of the last encoding are kept, so a
    deleted pod's series leave with it.
    """

    def __init__(self) -> None:
        self._kept: dict[str, dict[str, tuple[tuple[Any, ...], bytes]]] = {}  # content type -> name -> (key, bytes)
        self._lock = threading.Lock()
        self.reused = self.encoded = 0  # families, for the tests and the bench

    def encode(self, families: Iterable[Metric], content_type: str,
               encoder: Callable[[CollectorRegistry], bytes]) -> bytes:
        with self._lock:
            trailer = encoder(CollectorRegistry(auto_describe=False))  # b"" for text, b"# EOF\n" for OpenMetrics
            kept = self._kept.get(content_type, {})
            fresh: dict[str, tuple[tuple[Any, ...], bytes]] = {}
            chunks = []
            for fam in families:
                key = (fam.documentation, fam.type, fam.unit, fam.samples)
                hit = kept.get(fam.name)
                if hit is not None and hit[0] == key:
                    chunk = hit[1]
                    self.reused += 1
                else:
                    reg = CollectorRegistry(auto_describe=False)
                    reg.register(_Static(fam))
                    chunk = encoder(reg)
                    if trailer and chunk.endswith(trailer):
                        chunk = chunk[:-len(trailer)]
                    self.encoded += 1
                fresh[fam.name] = (key, chunk)
                chunks.append(chunk)
            self._kept[content_type] = fresh
            return b"".join(chunks) + trailer


class _Static:
    def __init__(self, fam: Metric) -> None:
        self.fam = fam

    def collect(self) -> Iterator[Metric]:
        yield self.fam


_families = _Families()


def _body(state: AgentState | None, content_type: str, encoder: Callable[[CollectorRegistry], bytes],
          compress: bool) -> bytes:
    """The bytes of one encoding of one state, built once (concurrent scrapes of a new state wait
    for the first one's encoding instead of each encoding it again)."""
    e = _entry(state)
    k = (content_type, compress)
    body = e.bodies.get(k)
    if body is not None:
        _stats["hits"] += 1
        return body
    with e.lock:
        body = e.bodies.get(k)
        if body is None:
            if compress:
                body = gzip.compress(_body(state, content_type, encoder, False), compresslevel=GZIP_LEVEL)
            else:
                body = _families.encode(StateCollector(lambda: state).collect(), content_type, encoder)
                _stats["encodings"] += 1
            e.bodies[k] = body
        else:
            _stats["hits"] += 1
    return body


def cache_stats() -> dict[str, int]:
    """How many encodings were built and how many scrapes were served from the cache (the bench reads it)."""
    return dict(_stats)


def render(state: AgentState | None) -> str:
    """The Prometheus text exposition of a state (cached with the state, like a scrape's)."""
    encoder, content_type = choose_encoder("")
    return _body(state, content_type, encoder, False).decode()


def encode_for(state: AgentState | None, accept: str = "", accept_encoding: str = "") -> tuple[bytes, list[tuple[str, str]]]:
    """The /metrics response body and headers for one state, negotiated as Prometheus does
    (text or OpenMetrics by `Accept`, gzip by `Accept-Encoding`). The one entry point an HTTP server
    uses, so the encoding is cached per state here without the server knowing."""
    encoder, content_type = choose_encoder(accept)
    compress = "gzip" in (accept_encoding or "").lower()
    body = _body(state, content_type, encoder, compress)
    headers = [("Content-Type", content_type)]
    if compress:
        headers.append(("Content-Encoding", "gzip"))
    return body, headers


def prepare(state: AgentState | None) -> None:
    """Encode a newly published state ahead of its first scrape (text and its gzip, what Prometheus
    asks for), so that even the first scrape after an evaluation is served from bytes."""
    encode_for(state, "", "gzip")


# The HTTP server moved to agent/web.py (bounded pool, timeouts, TLS and basic auth); kept importable
# from here for the callers that know it by this path.
from agent.web import MetricsServer  # noqa: F401 - re-exported
