"""One evaluation: the latest value of every source → attribution → analytics → AgentState."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from agent.analytics import CostLedger, IdleTracker, OutcomeTracker
from agent.attribution import attribute, owner_for
from agent.config import Config
from agent.model import AgentState, CollectorStatus, NodeView, PodInfo
from collectors.kubernetes import KubeMetadata
from collectors.nvml import NvmlReading
from collectors.podresources import PodResourcesReading
from collectors.pricing import PriceBook
from collectors.processes import ProcessOwners


class Evaluator:
    def __init__(self, config: Config, node_name: str, prices: PriceBook | None = None):
        self.config = config
        self.node_name = node_name
        self.prices = prices or PriceBook(config.pricing)
        self.idle = IdleTracker(config.idle)
        self.ledger = CostLedger()
        self.outcomes = OutcomeTracker(config.outcome_window, config.saturation)

    def __call__(self, values: dict[str, Any], statuses: Sequence[CollectorStatus], now: float) -> AgentState:
        nvml: NvmlReading | None = values.get("nvml")
        kubelet: PodResourcesReading | None = values.get("podresources")
        meta: KubeMetadata | None = values.get("kubernetes")
        procs: ProcessOwners | None = values.get("processes")
        inference = values.get("inference")
        att = attribute(self.node_name, nvml, kubelet, meta, procs.as_dict() if procs is not None else None,
                        self.prices, self.config.pricing.mig_cost_basis)
        views = self.idle.update(att.rows, now)
        self.ledger.update(views, self.node_name, now)

        pod_hourly: dict[str, float] = defaultdict(float)
        pod_sm: dict[str, float | None] = {}
        for v in views:
            o = v.row.owner
            if not o.pod:
                continue
            key = o.pod_uid or f"{o.namespace}/{o.pod}"
            pod_hourly[key] += v.row.hourly_price
            act = v.row.activity
            if act is not None:
                pod_sm[key] = max(pod_sm.get(key) or 0.0, act)
        inf_views = ()
        if inference is not None:
            stats = inference.servers
            owners = [owner_for(s.namespace, s.pod, "", meta) for s in stats]
            inf_views = tuple(self.outcomes.update(stats, owners, self.ledger.by_pod, pod_hourly, pod_sm, now))

        node = meta.node if meta is not None else None
        node_view = NodeView(
            name=self.node_name, instance_type=node.instance_type if node else "",
            capacity_type=node.capacity_type if node else "", labels=node.labels if node else (),
            stale=bool(meta.stale) if meta is not None else False,
        )
        allow = self.config.kubernetes.pod_label_allowlist
        pods = ()
        if meta is not None:
            pods = tuple(
                PodInfo(owner_for(p.namespace, p.name, "", meta),
                        tuple((k, v) for k, v in p.labels if k in allow))
                for p in meta.pods
            )
        return AgentState(
            time=now, node=node_view, driver_version=nvml.driver_version if nvml else "",
            units=tuple(views), attribution=att, devices=nvml.devices if nvml else (),
            costs=tuple(self.ledger.rows()), inference=inf_views, pods=pods, collectors=tuple(statuses),
        )
