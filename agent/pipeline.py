"""One evaluation: a Snapshot of every source → attribution → analytics → AgentState.

Only fresh readings count (the loop drops readings older than their max age). While NVML's
reading is missing the units are still known from the last inventory (so the node's dollars still
add up) but carry no gauges and are `unknown`; while the kubelet's reading is missing nobody is
known to hold them, and they are `unknown` too, never free. A lost GPU keeps its MIG layout from
the inventory so every slice of it is `lost`, and its holders keep paying.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace

from agent.analytics import CostLedger, IdleTracker, OutcomeTracker
from agent.attribution import attribute, owner_for
from agent.config import Config
from agent.model import AgentState, Attribution, NodeView, PodInfo, Snapshot, UnitView
from collectors.nvml import DeviceSample
from collectors.pricing import PriceBook

log = logging.getLogger("gpucap.evaluate")

_IDENTITY = ("gpu", "uuid", "model", "gpu_instance", "compute_instance", "mig_profile", "parent_uuid", "mig_enabled",
             "pci_bus_id", "minor_number", "sm_count", "compute_slices", "memory_slices", "memory_total_bytes")


def _identity(d: DeviceSample) -> DeviceSample:
    """What stays true of a device while NVML is silent: who it is, not how it is doing."""
    return DeviceSample(**{k: getattr(d, k) for k in _IDENTITY})


class Evaluator:
    def __init__(self, config: Config, node_name: str, prices: PriceBook | None = None):
        self.config = config
        self.node_name = node_name
        self.prices = prices or PriceBook(config.pricing)
        self.idle = IdleTracker(config.idle)
        self._max_gap = config.max_age("nvml", config.nvml.interval)
        self.ledger = CostLedger(max_gap=self._max_gap)
        self.outcomes = OutcomeTracker(config.outcome_window, config.saturation)
        self._inventory: dict[int, tuple[DeviceSample, ...]] = {}
        self._replicas: dict[str, int] = {}
        self.skipped: Counter[tuple[str, str]] = Counter()
        self.history_errors: Callable[[], int] | None = None  # set when a ledger records the states
        self.rightsizing: Callable[[], tuple] | None = None  # set when the live right-sizing runs

    def observe_step(self, step: float) -> None:
        """Fast-forward samples every `step` seconds: like an agent with that interval, whose max age
        is 3× it, an interval of up to 3 steps is observed time, not a gap."""
        self.ledger.max_gap = max(self._max_gap, 3.0 * step)

    # --- devices: fresh reading merged with the last inventory --------------------------------
    def _devices(self, snap: Snapshot) -> tuple[tuple[DeviceSample, ...], frozenset[str]]:
        reading = snap.nvml.value
        if reading is None:
            known = tuple(d for inv in self._inventory.values() for d in inv)
            return known, frozenset(d.uuid for d in known)
        by_gpu: dict[int, list[DeviceSample]] = defaultdict(list)
        for d in reading.devices:
            by_gpu[d.gpu].append(d)
        merged: list[DeviceSample] = []
        for gpu, samples in by_gpu.items():
            head = samples[0]
            inv = self._inventory.get(gpu)
            if head.up or not inv or (head.uuid and head.uuid != inv[0].uuid):
                merged.extend(samples)
                if head.up:
                    self._inventory[gpu] = tuple(_identity(d) for d in samples)
                continue
            # lost: keep its layout (MIG instances included) so every unit of it is lost, not gone
            merged.append(replace(inv[0], up=False, error=head.error, xid_errors=head.xid_errors))
            merged.extend(replace(d, up=False, error=head.error) for d in inv[1:])
        for gpu in [g for g in self._inventory if g not in by_gpu]:
            del self._inventory[gpu]
        return tuple(merged), frozenset()

    def __call__(self, snap: Snapshot) -> AgentState:
        kubelet = snap.podresources.value
        meta = snap.kubernetes.value
        procs = snap.processes.value
        inference = snap.inference.value
        devices, stale = self._devices(snap)
        att = attribute(self.node_name, devices, kubelet, meta, procs.as_dict() if procs is not None else None,
                        self.prices, self.config.pricing.mig_cost_basis, stale_devices=stale,
                        replicas_hint=self._replicas)
        if kubelet is not None:
            self._replicas = dict(att.replicas)
        for reason, n in att.skipped:
            self.skipped[("attribution", reason)] += n
        mono = snap.mono
        views = self.idle.update(att.rows, mono)
        accruals = self.ledger.update(views, self.node_name, mono, snap.time)
        inf_views = self._inference(views, inference, meta, mono)

        node = meta.node if meta is not None else None
        node_view = NodeView(
            name=self.node_name, instance_type=node.instance_type if node else "",
            capacity_type=node.capacity_type if node else "", labels=node.labels if node else (),
            stale=bool(meta.stale) if meta is not None else snap.kubernetes.expired,
        )
        allow = self.config.kubernetes.pod_label_allowlist
        pods = ()
        if meta is not None:
            pods = tuple(
                PodInfo(owner_for(p.namespace, p.name, "", meta),
                        tuple((k, v) for k, v in p.labels if k in allow))
                for p in meta.pods
            )
        nvml = snap.nvml.value
        return AgentState(
            time=snap.time, node=node_view, driver_version=nvml.driver_version if nvml else "",
            units=tuple(views), attribution=att, devices=nvml.devices if nvml else (),
            costs=tuple(self.ledger.rows()), inference=inf_views, pods=pods, collectors=snap.statuses(),
            evaluation_success=True, skipped=self._skipped_rows(), mono=mono, accruals=tuple(accruals),
            history_write_errors=self.history_errors() if self.history_errors is not None else None,
            rightsizing=self.rightsizing() if self.rightsizing is not None else (),
        )

    def _inference(self, views: tuple[UnitView, ...] | list[UnitView], inference, meta, mono: float) -> tuple:
        if inference is None:
            return ()
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
        stats = inference.servers
        owners = [owner_for(s.namespace, s.pod, "", meta) for s in stats]
        try:
            return tuple(self.outcomes.update(stats, owners, self.ledger.by_pod, pod_hourly, pod_sm, mono))
        except Exception:
            log.debug("outcome evaluation failed", exc_info=True)
            self.skipped[("analytics", "outcome_error")] += 1
            return ()

    def _skipped_rows(self) -> tuple[tuple[str, str, int], ...]:
        return tuple((stage, reason, n) for (stage, reason), n in sorted(self.skipped.items()))

    def fallback(self, snap: Snapshot, error: BaseException) -> AgentState:
        """The evaluation failed as a whole: publish what is certain (the sources' status) and no
        number without evidence, rather than freezing the last state."""
        self.skipped[("evaluation", type(error).__name__)] += 1
        return AgentState(
            time=snap.time, node=NodeView(self.node_name, "", "", ()), driver_version="", units=(),
            attribution=Attribution(()), devices=(), costs=(), inference=(), pods=(), collectors=snap.statuses(),
            evaluation_success=False, skipped=self._skipped_rows(), mono=snap.mono,
        )
