"""Fleet-wide reports from gpucap's own series in a PromQL store (Prometheus, Thanos, Mimir,
VictoriaMetrics) over the standard HTTP API.

Range queries are aligned to their step (start and end rounded down to a multiple of it, so every
store answers the same points and caches them) and batched per node (one query per node and
metric), so a 200-node fleet never asks one huge query that times out the store.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from agent.cost import CostReport
from agent.model import STATES
from collectors.redact import redact_url

Series = tuple[dict[str, str], list[tuple[float, float]]]


class FleetError(Exception):
    """The store could not be asked or answered with an error (the CLI exits 1 with this message)."""


class PromClient:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise FleetError("expected an http:// or https:// URL of a Prometheus-compatible API, got "
                             f"{redact_url(url)!r}")
        parts = urllib.parse.urlsplit(url)
        self._auth: str | None = None
        if parts.username is not None:  # user:password in the URL: sent as basic auth, never printed
            import base64

            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(cred.encode()).decode()
            parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
        self.base = urllib.parse.urlunsplit(parts._replace(query="", fragment="")).rstrip("/")
        self.shown = redact_url(self.base)
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        query = urllib.parse.urlencode(params)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if self._auth:
            headers["Authorization"] = self._auth
        req = urllib.request.Request(f"{self.base}{path}", data=query.encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                doc = json.loads(e.read())
            except ValueError:
                raise FleetError(f"{self.shown}{path}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise FleetError(f"{self.shown}: {type(e).__name__}") from None
        if doc.get("status") != "success":
            raise FleetError(f"{self.shown}{path}: {doc.get('errorType', 'error')}: {doc.get('error', '')}")
        return doc["data"]

    def query(self, expr: str, at: float) -> list[tuple[dict[str, str], float]]:
        data = self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})
        return [(r["metric"], float(r["value"][1])) for r in data.get("result", [])]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        start, end = aligned(start, step), aligned(end, step)
        data = self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.0f}", "end": f"{end:.0f}",
                                                  "step": f"{step:g}"})
        return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data.get("result", [])]

    def nodes(self, at: float, lookback: float) -> list[str]:
        found = self.query(f"max by (node) (max_over_time(gpucap_gpu_hourly_price_dollars[{_dur(lookback)}]))", at)
        return sorted({m.get("node", "") for m, _ in found if m.get("node")})

    def per_node(self, template: str, at: float, lookback: float,
                 on_progress: Callable[[float], None] | None = None) -> list[tuple[dict[str, str], float]]:
        """Run an instant query once per node (`$NODE` in the template is the node's label matcher)."""
        nodes = self.nodes(at, lookback)
        out = []
        for i, node in enumerate(nodes):
            out.extend(self.query(template.replace("$NODE", f'node="{node}"'), at))
            if on_progress is not None:
                on_progress((i + 1) / max(1, len(nodes)))
        return out


def aligned(t: float, step: float) -> float:
    return math.floor(t / step) * step


def _dur(seconds: float) -> str:
    return f"{int(max(1, round(seconds)))}s"


_BY_LABELS = {"team": "team", "namespace": "namespace", "workload": "workload", "unit": "uuid", "node": "node",
              "feature": None, "model": None}


def report_from_prometheus(url: str, start: float, end: float, by: Sequence[str],
                           on_progress: Callable[[float], None] | None = None) -> CostReport:
    """Dollars by the keys and state from the counters' increase over the window (series of pods that went
    away count up to their last sample), GPU-hours from the per-unit price series, observed hours from the
    agents' own scrapes (`gpucap_evaluation_success` samples)."""
    unsupported = [k for k in by if _BY_LABELS.get(k) is None]
    if unsupported:
        raise FleetError(f"--by {', '.join(unsupported)} needs a ledger (--history): the fleet's series carry no "
                         "such label on the cost counter")
    client = PromClient(url)
    window = end - start
    labels = [_BY_LABELS[k] for k in by]
    group = ", ".join(["node", *labels, "state"])
    w = _dur(window)
    dollars = client.per_node(f"sum by ({group}) (increase(gpucap_cost_dollars_total{{$NODE}}[{w}]))", end, window,
                              on_progress)
    rows: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for m, v in dollars:
        rows[tuple(m.get(lb, "") for lb in labels) + (m.get("state", ""),)][1] += v
    # time: each series' dollars ÷ its unit's $/h (unit-hours: a MIG slice or a share counts as one unit)
    hours = client.per_node(
        f"sum by ({group}) (increase(gpucap_cost_dollars_total{{$NODE}}[{w}]) / on (node, uuid) group_left "
        f"max by (node, uuid) (avg_over_time(gpucap_gpu_hourly_price_dollars{{$NODE}}[{w}]) > 0))", end, window)
    for m, v in hours:
        rows[tuple(m.get(lb, "") for lb in labels) + (m.get("state", ""),)][0] += v
    observed: dict[str, float] = {}
    node_dollars = 0.0
    for m, v in client.query(f"sum by (node) (increase(gpucap_cost_dollars_total[{_dur(window)}]))", end):
        node_dollars += v
        observed.setdefault(m.get("node", ""), 0.0)
    # Observed hours: the node's dollars ÷ its price per hour (the units' prices add up to the node's,
    # MIG remainder and shares included), averaged only where the node was scraped, so hours an agent
    # was down are not counted as observed (the span of its scrapes would count them).
    sub = _dur(max(1.0, math.ceil(window / 2000.0)))
    price = {m.get("node", ""): v for m, v in client.query(
        f"avg_over_time((sum by (node) (gpucap_gpu_hourly_price_dollars))[{_dur(window)}:{sub}])", end) if v > 0}
    per_node = {m.get("node", ""): v for m, v in client.query(
        f"sum by (node) (increase(gpucap_cost_dollars_total[{_dur(window)}]))", end)}
    for node, rate in price.items():
        observed[node] = per_node.get(node, 0.0) / rate * 3600.0
    out = []
    for key, (h, d) in sorted(rows.items()):
        row = dict(zip(by, key[:-1]))
        row.update(state=key[-1], gpu_hours=h, cost_dollars=d)
        out.append(row)
    return CostReport(start, end, tuple(by), out, observed, node_dollars, source=f"prometheus {client.shown}")


def states_total(report: CostReport) -> dict[str, float]:
    out = dict.fromkeys(STATES, 0.0)
    for r in report.rows:
        out[r["state"]] = out.get(r["state"], 0.0) + r["cost_dollars"]
    return out


# ------------------------------------------------------------------------------ recommend --prometheus
MINUTE = 60.0
MAX_POINTS = 10_000  # per series and query: under Prometheus' 11,000 and VictoriaMetrics' 30,000

# Per-minute statistics of a range query at a 60 s step: the value at t covers (t - 60 s, t], the
# ledger's minute t - 60. Each is one query per node and chunk of the window.
_UNIT_QUERIES = {
    "held": "max_over_time(gpucap_allocated_cost_dollars_per_hour{$NODE}[60s])",  # present: a holder
    "act_p95": "quantile_over_time(0.95, gpucap_unit_activity_ratio{$NODE}[60s])",
    "act_mean": "avg_over_time(gpucap_unit_activity_ratio{$NODE}[60s])",
    "act_max": "max_over_time(gpucap_unit_activity_ratio{$NODE}[60s])",
    "act_samples": "count_over_time(gpucap_unit_activity_ratio{$NODE}[60s])",
}
# one series per unit (HA Prometheus pairs, two scrape jobs or an agent restart give a unit several):
# the per-GPU sum of prices must count each unit once
_PRICE_QUERY = ("max by (uuid, gpu, gpu_instance, mig_profile, model, instance_type) "
                "(max_over_time(gpucap_gpu_hourly_price_dollars{$NODE}[60s]))")
_DEVICE_MEMORY = "max_over_time(gpucap_gpu_memory_used_bytes{$NODE}[60s])"
_CONTAINER_MEMORY = "max_over_time(gpucap_container_gpu_memory_used_bytes{$NODE}[60s])"  # time-sliced GPUs
_SERVER_QUERIES = {
    "queue_mean": "avg_over_time(gpucap_inference_queue_requests{$NODE}[60s])",
    "queue_max": "max_over_time(gpucap_inference_queue_requests{$NODE}[60s])",
    "saturated": "avg_over_time(gpucap_inference_saturated{$NODE}[60s])",
    "samples": "count_over_time(gpucap_inference_saturated{$NODE}[60s])",
}
_HOLDER = ("uuid", "namespace", "pod", "container")


def _chunks(start: float, end: float) -> list[tuple[float, float]]:
    """[start, end] in pieces of at most MAX_POINTS steps, each aligned to the minute."""
    out, t = [], aligned(start, MINUTE) + MINUTE
    last = aligned(end, MINUTE)
    while t <= last:
        stop = min(last, t + (MAX_POINTS - 1) * MINUTE)
        out.append((t, stop))
        t = stop + MINUTE
    return out


def _minutes(client: PromClient, template: str, node: str, chunks: list[tuple[float, float]],
             start: float, end: float) -> list[tuple[dict[str, str], int, float]]:
    """(labels, minute, value) of a per-minute statistic, minutes inside [start, end)."""
    expr = template.replace("$NODE", f'node="{node}"')
    out = []
    for a, b in chunks:
        for metric, values in client.query_range(expr, a, b, MINUTE):
            for t, v in values:
                minute = int(t - MINUTE)
                if start <= minute < end and not math.isnan(v):
                    out.append((metric, minute, v))
    return out


def node_minutes(client: PromClient, node: str, start: float, end: float) -> tuple[list[dict[str, Any]],
                                                                                list[dict[str, Any]]]:
    """One node's unit and server minute rows (the columns agent/recommend.py reads), rebuilt from
    gpucap's own series: one range query per statistic and chunk of at most MAX_POINTS minutes.

    Prices are per minute, as the ledger books them: a unit's price from its own price series (also
    while its state is unknown), its GPU fraction its price over the summed prices of the units on
    the same GPU in that minute (MIG instances and the remainder, time-sliced shares), so a MIG
    layout or a replica count that changes inside the window is priced as it was. A time-sliced
    share's memory is its pod's memory on the device over the pod's shares there, as the agent's.
    The list price is the price paid: a spot discount is not in the series (ratio 1)."""
    chunks = _chunks(start, end)
    info: dict[str, dict[str, str]] = {}
    price: dict[tuple[str, int], float] = {}
    parent: dict[tuple[str, int], float] = defaultdict(float)
    for m, minute, v in _minutes(client, _PRICE_QUERY, node, chunks, start, end):
        uuid = m.get("uuid", "")
        info.setdefault(uuid, m)
        price[(uuid, minute)] = v
        parent[(m.get("gpu", ""), minute)] += v
    mem_total = {m.get("uuid", ""): v for m, v in client.query(
        f'max by (uuid) (max_over_time(gpucap_gpu_memory_total_bytes{{node="{node}"}}[{_dur(end - start)}]))', end)}
    device_mem = {(m.get("uuid", ""), minute): v
                  for m, minute, v in _minutes(client, _DEVICE_MEMORY, node, chunks, start, end)}
    pod_mem: dict[tuple[str, str, str, int], float] = {}
    for m, minute, v in _minutes(client, _CONTAINER_MEMORY, node, chunks, start, end):
        key = (m.get("uuid", ""), m.get("namespace", ""), m.get("pod", ""), minute)
        pod_mem[key] = max(pod_mem.get(key, 0.0), v)
    stats: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name, template in _UNIT_QUERIES.items():
        for m, minute, v in _minutes(client, template, node, chunks, start, end):
            key = (minute,) + tuple(m.get(k, "") for k in _HOLDER)
            row = stats.get(key)
            if row is None:
                row = stats[key] = {"minute": minute, "node": node, **{k: m.get(k, "") for k in _HOLDER},
                                    "workload": m.get("workload", ""), "workload_kind": m.get("workload_kind", ""),
                                    "team": m.get("team", ""), "mig_profile": m.get("mig_profile", ""),
                                    "gpu_instance": m.get("gpu_instance", ""), "gpu": m.get("gpu", "")}
            row[name] = v
    shares_held: dict[tuple[str, str, str, int], int] = defaultdict(int)  # a pod's shares of one GPU
    for row in stats.values():
        if "::" in row["uuid"] and "held" in row:
            shares_held[(row["uuid"].split("::")[0], row["namespace"], row["pod"], row["minute"])] += 1
    units = []
    for row in stats.values():
        if "held" not in row or not row["namespace"]:
            continue  # no holder (unallocated): nothing to right-size
        del row["held"]
        uuid, minute = row["uuid"], row["minute"]
        device = uuid.split("::")[0]
        meta = info.get(uuid, {})
        p = price.get((uuid, minute), 0.0)
        whole = parent.get((row["gpu"], minute), 0.0)
        n = int(row.pop("act_samples", 0) or 0)
        mean = row.pop("act_mean", None)
        if "::" in uuid:
            key = (device, row["namespace"], row["pod"], minute)
            used = pod_mem.get(key)
            mem = used // max(1, shares_held.get(key, 1)) if used is not None else None
        else:
            mem = device_mem.get((uuid, minute))
        total = mem_total.get(uuid, mem_total.get(device))
        row.update(
            model=meta.get("model", ""), instance_type=meta.get("instance_type", ""),
            kind="mig" if row["gpu_instance"] else ("share" if "::" in uuid else "gpu"),
            hourly_price=p, list_hourly_price=p, gpu_fraction=p / whole if whole > 0 and p > 0 else 1.0,
            act_samples=n, act_sum=(mean or 0.0) * n if n else None,
            act_p95=row.get("act_p95") if n else None, act_max=row.get("act_max") if n else None,
            mem_max=int(mem) if mem is not None else None, mem_total=int(total) if total is not None else None)
        units.append(row)
    sstats: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name, template in _SERVER_QUERIES.items():
        for m, minute, v in _minutes(client, template, node, chunks, start, end):
            key = (minute, m.get("namespace", ""), m.get("pod", ""), m.get("server", ""), m.get("model", ""))
            row = sstats.setdefault(key, {"minute": minute, "node": node, "namespace": key[1], "pod": key[2],
                                          "server": key[3], "model": key[4], "workload": m.get("workload", ""),
                                          "workload_kind": m.get("workload_kind", ""), "team": m.get("team", "")})
            row[name] = v
    servers = []
    for row in sstats.values():
        n = int(row.pop("samples", 0) or 0)
        row.update(samples=n, queue_sum=row.pop("queue_mean", 0.0) * n,
                   saturated_seconds=row.pop("saturated", 0.0) * MINUTE)
        servers.append(row)
    return units, servers


def fleet_minutes(client: PromClient, start: float, end: float,
                  on_progress: Callable[[float], None] | None = None) -> tuple[list[dict[str, Any]],
                                                                               list[dict[str, Any]]]:
    """Every node's minutes (tests and small fleets; `recommend_from_prometheus` streams them)."""
    units: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    for u, srv in _per_node(client, start, end, on_progress):
        units += u
        servers += srv
    return units, servers


def _per_node(client: PromClient, start: float, end: float,
              on_progress: Callable[[float], None] | None) -> Iterator[tuple[list[dict[str, Any]],
                                                                            list[dict[str, Any]]]]:
    nodes = client.nodes(end, end - start)
    for i, node in enumerate(nodes):
        yield node_minutes(client, node, start, end)
        if on_progress is not None:
            on_progress((i + 1) / max(1, len(nodes)))


def recommend_from_prometheus(url: str, start: float, end: float, settings: Any = None, prices: Any = None,
                              pricing: Any = None, with_series: bool = False,
                              on_progress: Callable[[float], None] | None = None) -> list[Any]:
    """`gpucap recommend --prometheus`: the node's engine (agent/recommend.py) over the fleet's minutes;
    a workload on several nodes is one row."""
    from agent.recommend import Prices, Settings, recommend

    client = PromClient(url)
    servers: list[dict[str, Any]] = []

    def units() -> Iterator[dict[str, Any]]:
        # one node's rows in memory at a time: the engine folds them into workloads as they come
        # (server rows are few; the engine reads them after every unit row)
        for u, srv in _per_node(client, start, end, on_progress):
            servers.extend(srv)
            yield from u

    return recommend(units(), servers, start, end, settings or Settings(),
                     prices if prices is not None else Prices.from_pricing(pricing), with_series)
