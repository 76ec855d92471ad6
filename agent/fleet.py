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
from collections.abc import Callable, Sequence
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
