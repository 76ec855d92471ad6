"""gpucap's configuration: one frozen dataclass tree, read through the one validation layer.

Every key is optional; defaults are documented in docs/configuration.md. Each mistake names the
file, the dotted key, the value and what was expected; all mistakes of a file come back in one
`InputError` (collectors/schema.py), which the CLI turns into exit code 2.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, replace
from typing import Any

from agent.focus import FocusSettings
from collectors.pricing import PricingConfig, pricing_config_from_dict, read_pricing_config
from collectors.redact import redact_url
from collectors.schema import Reader, load_yaml_file

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
MAX_EXTRA_POD_LABELS = 10  # gpucap_pod_info: 7 own labels + these + job/instance = 19, under 20


def pod_label_name(key: str) -> str:
    """The Prometheus label a pod label from `kubernetes.pod_label_allowlist` becomes on gpucap_pod_info."""
    return "label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    interval: float
    timeout: float


@dataclass(frozen=True, slots=True)
class KubeletConfig:
    socket: str = DEFAULT_SOCKET
    interval: float = 10.0
    timeout: float = 5.0
    explicit: bool = False  # set in the config file: wins over the simulated kubelet


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    enabled: bool = True
    kubeconfig: str = ""
    resync: float = 60.0
    interval: float = 15.0
    team_label_keys: tuple[str, ...] = ("team", "app.kubernetes.io/part-of")
    pod_label_allowlist: tuple[str, ...] = ()
    feature_label_keys: tuple[str, ...] = ("gpucap.io/feature", "app.kubernetes.io/component")


@dataclass(frozen=True, slots=True)
class ProcessesConfig:
    enabled: bool = True
    procfs: str = "/proc"


@dataclass(frozen=True, slots=True)
class InferenceTargetConfig:
    url: str
    namespace: str = ""
    pod: str = ""


@dataclass(frozen=True, slots=True)
class InferenceConfig:
    discover: bool = True
    interval: float = 15.0
    timeout: float = 2.0
    max_bytes: int = 10 * 2**20
    targets: tuple[InferenceTargetConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class IdleConfig:
    threshold: float = 0.05
    window: float = 1800.0


@dataclass(frozen=True, slots=True)
class SaturationConfig:
    window: float = 300.0
    queue_fraction: float = 0.5
    kv_cache_threshold: float = 0.95
    sm_active_threshold: float = 0.95


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """The node's ledger (agent/history.py). `path` "" means the default: DEFAULT_HISTORY_PATH for
    `gpucap run` on a node, a temporary file in simulation."""

    path: str = ""
    interval: float = 60.0  # how often finished minutes are written
    retention: float = 35 * 86400.0
    max_bytes: int = 512 * 2**20
    enabled: bool = True


DEFAULT_HISTORY_PATH = "/var/lib/gpucap/history.db"


@dataclass(frozen=True, slots=True)
class RecommendConfig:
    """`recommend:` thresholds of right-sizing (agent/recommend.py, docs/recommend.md)."""

    headroom: float = 0.2
    target_utilization: float = 0.8
    idle_share: float = 0.95
    saturated_share: float = 0.1
    min_coverage: float = 0.5
    min_samples: int = 60
    window: float = 7 * 86400.0  # the live metric's window
    refresh: float = 3600.0  # how often the live metric is recomputed from the ledger


# --- cost: (budgets and the FOCUS export; agent/budgets.py, agent/focus.py, docs/cost.md) --------------
@dataclass(frozen=True, slots=True)
class CostConfig:
    """`cost:`: monthly GPU budgets per team (for `gpucap cost`; the chart's `budgets` value renders
    the same figures into alerts) and the FOCUS columns a node cannot know (`cost.focus.*`).
    Budgets are (team, dollars) pairs, sorted, so the tree stays frozen and hashable."""

    budgets: tuple[tuple[str, float], ...] = ()
    focus: FocusSettings = field(default_factory=FocusSettings)

    def budget_map(self) -> dict[str, float]:
        return dict(self.budgets)


_FOCUS_KEYS = tuple(FocusSettings.__dataclass_fields__)


def _read_cost(r: Reader) -> CostConfig:
    """`cost.budgets: {team: monthly dollars}` and `cost.focus.<column setting>: string`."""
    budgets = []
    bd = r.section("budgets")
    for team in list(bd.data) if isinstance(bd.data, dict) else []:
        if not isinstance(team, str) or not team:
            bd.problem(team, "a team name (a non-empty string, the value of the team label)", team)
            bd.ignore_rest()
            continue
        dollars = bd.number(team, minimum=0.0, exclusive_minimum=True,
                            expected="monthly dollars, a number > 0")
        if dollars:
            budgets.append((team, float(dollars)))
    bd.done()
    fc = r.section("focus")
    values = {k: fc.str(k, getattr(FocusSettings(), k)) for k in _FOCUS_KEYS}
    if fc.has("billing_currency") and not (len(values["billing_currency"]) == 3
                                           and values["billing_currency"].isalpha()
                                           and values["billing_currency"].isupper()):
        fc.problem("billing_currency", "an ISO 4217 currency code such as USD", values["billing_currency"])
        values["billing_currency"] = "USD"
    fc.done()
    r.done()
    return CostConfig(budgets=tuple(sorted(budgets)), focus=FocusSettings(**values))
# --- end cost: ---------------------------------------------------------------------------------------


# Bounds on every timer setting (checked by check-config too): a value past them is a mistake that
# would otherwise pass validation and then kill a loop thread (1e308 s) or spin a core (1 ms).
_INTERVAL = {"minimum": 1.0, "maximum": 86400.0}
_TIMEOUT = {"minimum": 0.1, "maximum": 3600.0}
_WINDOW = {"minimum": 1.0, "maximum": 30 * 86400.0}

COLLECTOR_NAMES = ("nvml", "podresources", "kubernetes", "processes", "inference")


@dataclass(frozen=True, slots=True)
class CollectorSettings:
    """`collectors.<name>`: whether the collector runs, and how old its last good value may be
    before it counts as stale (None: 3 × its interval, so one slow cycle is not an outage)."""

    enabled: bool = True
    max_age: float | None = None


_DEFAULT_COLLECTORS = tuple((name, CollectorSettings()) for name in COLLECTOR_NAMES)


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str = ""
    listen: str = ":9470"
    log_format: str = "text"
    log_level: str = "info"
    nvml: SourceConfig = SourceConfig(10.0, 5.0)
    kubelet: KubeletConfig = KubeletConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    processes: ProcessesConfig = ProcessesConfig()
    inference: InferenceConfig = InferenceConfig()
    idle: IdleConfig = IdleConfig()
    saturation: SaturationConfig = SaturationConfig()
    outcome_window: float = 900.0
    pricing: PricingConfig = field(default_factory=lambda: pricing_config_from_dict(None, "defaults"))
    history: HistoryConfig = HistoryConfig()
    recommend: RecommendConfig = RecommendConfig()
    cost: CostConfig = CostConfig()
    collectors: tuple[tuple[str, CollectorSettings], ...] = _DEFAULT_COLLECTORS
    path: str = ""

    def resolved_node_name(self) -> str:
        return self.node_name or os.environ.get("NODE_NAME") or socket.gethostname()

    def with_overrides(self, **kw: Any) -> Config:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def collector(self, name: str) -> CollectorSettings:
        """The settings of one collector by its name (the same name as in gpucap_collector_*)."""
        for known, settings in self.collectors:
            if known == name:
                return settings
        raise KeyError(f"no collector {name!r} (known: {', '.join(COLLECTOR_NAMES)})")

    def max_age(self, name: str, interval: float) -> float:
        """Seconds after which the collector's last good value is stale: configured, or 3 × interval."""
        configured = self.collector(name).max_age
        return configured if configured is not None else 3.0 * interval


def load_config(path: str | None) -> Config:
    """Read and validate a config file; no file → all defaults. Every mistake of the file is
    reported at once, in one InputError."""
    if not path:
        return Config()
    return config_from_dict(load_yaml_file(path, "config"), path)


def config_from_dict(data: Any, where: str) -> Config:
    r = Reader(data, where)
    config = _read_config(r)
    r.raise_problems()
    return config


def _read_config(r: Reader) -> Config:
    """Every section through the same Reader (its problem list is the file's)."""
    where = r.where
    node_name = r.str("node_name", "")
    listen = r.str("listen", ":9470")
    if parse_listen(listen) is None:
        r.problem("listen", "HOST:PORT or :PORT (e.g. :9470)", listen)
        listen = ":9470"
    lg = r.section("log")
    log_format = lg.str("format", "text", choices=("text", "json"))
    log_level = lg.str("level", "info", choices=("debug", "info", "warning", "error"))
    lg.done()

    nv = r.section("nvml")
    nvml = SourceConfig(nv.duration("interval", 10.0, **_INTERVAL), nv.duration("timeout", 5.0, **_TIMEOUT))
    nv.done()

    kl = r.section("kubelet")
    kubelet = KubeletConfig(
        socket=kl.str("socket", DEFAULT_SOCKET), interval=kl.duration("interval", 10.0, **_INTERVAL),
        timeout=kl.duration("timeout", 5.0, **_TIMEOUT), explicit=kl.has("socket"),
    )
    kl.done()

    k8 = r.section("kubernetes")
    kube = KubernetesConfig(
        enabled=k8.bool("enabled", True), kubeconfig=k8.str("kubeconfig", ""), resync=k8.duration("resync", 60.0, **_INTERVAL),
        interval=k8.duration("interval", 15.0, **_INTERVAL),
        team_label_keys=_str_list(k8, "team_label_keys", ["team", "app.kubernetes.io/part-of"]),
        feature_label_keys=_str_list(k8, "feature_label_keys", ["gpucap.io/feature", "app.kubernetes.io/component"]),
        pod_label_allowlist=_str_list(k8, "pod_label_allowlist", []),
    )
    seen: dict[str, str] = {}
    for key in kube.pod_label_allowlist:
        name = pod_label_name(key)
        if name in seen and seen[name] != key:
            k8.problem("pod_label_allowlist", f"labels whose Prometheus names differ: {seen[name]!r} and {key!r} "
                       f"both become {name} on gpucap_pod_info (keep one)", list(kube.pod_label_allowlist))
        seen.setdefault(name, key)
    if len(kube.pod_label_allowlist) > MAX_EXTRA_POD_LABELS:
        k8.problem("pod_label_allowlist", f"at most {MAX_EXTRA_POD_LABELS} labels (gpucap_pod_info has 6 "
                   "labels of its own and every series stays under 20)", list(kube.pod_label_allowlist))
    k8.done()

    pr = r.section("processes")
    procs = ProcessesConfig(enabled=pr.bool("enabled", True), procfs=pr.str("procfs", "/proc"))
    pr.done()

    inf = r.section("inference")
    targets = []
    for tr in inf.items("targets"):
        mark = tr.mark()
        url = tr.str("url")
        if tr.ok_since(mark) and not url.startswith(("http://", "https://")):
            tr.problem("url", "an http:// or https:// URL", redact_url(url))
        targets.append(InferenceTargetConfig(url, tr.str("namespace", ""), tr.str("pod", "")))
        tr.done()
    inference = InferenceConfig(
        discover=inf.bool("discover", True), interval=inf.duration("interval", 15.0, **_INTERVAL),
        timeout=inf.duration("timeout", 2.0, **_TIMEOUT), max_bytes=inf.number("max_bytes", 10 * 2**20, integer=True, minimum=1024),
        targets=tuple(targets),
    )
    inf.done()

    idl = r.section("idle")
    idle = IdleConfig(idl.number("threshold", 0.05, minimum=0.0, maximum=1.0), idl.duration("window", 1800.0, **_WINDOW))
    idl.done()

    sat = r.section("saturation")
    saturation = SaturationConfig(
        window=sat.duration("window", 300.0, **_WINDOW),
        queue_fraction=sat.number("queue_fraction", 0.5, minimum=0.0, maximum=1.0),
        kv_cache_threshold=sat.number("kv_cache_threshold", 0.95, minimum=0.0, maximum=1.0),
        sm_active_threshold=sat.number("sm_active_threshold", 0.95, minimum=0.0, maximum=1.0),
    )
    sat.done()

    out = r.section("outcome")
    outcome_window = out.duration("window", 900.0, **_WINDOW)
    out.done()

    pricing = read_pricing_config(r.section("pricing"), base_dir=os.path.dirname(os.path.abspath(where)))

    hs = r.section("history")
    history = HistoryConfig(hs.str("path", ""), hs.duration("interval", 60.0, **_INTERVAL),
                            hs.duration("retention", "35d", minimum=3600.0, maximum=3660 * 86400.0),
                            hs.size("max_size", 512 * 2**20), hs.bool("enabled", True))
    hs.done()

    recommend = _read_recommend(r.section("recommend"))
    cost = _read_cost(r.section("cost"))

    collectors = _read_collectors(r.section("collectors"), {"kubernetes": kube.enabled, "processes": procs.enabled})
    # The old per-section switches and collectors.<name>.enabled are one setting: false in either wins
    # (the Helm chart writes processes.enabled: false without hostPID, whatever the user's values say).
    kube = replace(kube, enabled=dict(collectors)["kubernetes"].enabled)
    procs = replace(procs, enabled=dict(collectors)["processes"].enabled)
    r.done()
    return Config(
        node_name=node_name, listen=listen, log_format=log_format, log_level=log_level, nvml=nvml, kubelet=kubelet,
        kubernetes=kube, processes=procs, inference=inference, idle=idle, saturation=saturation,
        outcome_window=outcome_window, pricing=pricing, history=history, collectors=collectors, path=where,
        recommend=recommend, cost=cost,
    )


def _read_recommend(r: Reader) -> RecommendConfig:
    """`recommend:`: every threshold of right-sizing, each a ratio in its range."""
    rc = RecommendConfig(
        headroom=r.number("headroom", 0.2, minimum=0.0, maximum=4.0),
        target_utilization=r.number("target_utilization", 0.8, minimum=0.05, maximum=1.0),
        idle_share=r.number("idle_share", 0.95, minimum=0.5, maximum=1.0),
        saturated_share=r.number("saturated_share", 0.1, minimum=0.0, maximum=1.0),
        min_coverage=r.number("min_coverage", 0.5, minimum=0.0, maximum=1.0),
        min_samples=r.number("min_samples", 60, integer=True, minimum=1),
        window=r.duration("window", 7 * 86400.0), refresh=r.duration("refresh", 3600.0),
    )
    r.done()
    return rc


def _read_collectors(r: Reader, legacy_enabled: dict[str, bool]) -> tuple[tuple[str, CollectorSettings], ...]:
    """`collectors.<name>: {enabled, max_age}` for every collector, defaults filled in; an
    unknown name is an unknown key (the message lists the known ones)."""
    out = []
    for name in COLLECTOR_NAMES:
        c = r.section(name)
        enabled = c.bool("enabled", True) and legacy_enabled.get(name, True)
        out.append((name, CollectorSettings(enabled, c.duration("max_age", None, minimum=1.0, maximum=7 * 86400.0))))
        c.done()
    r.done(aliases={"kubelet": "podresources"})
    return tuple(out)


def _str_list(r: Reader, key: str, default: list[str]) -> tuple[str, ...]:
    v = r.list(key, default)
    if not all(isinstance(x, str) and x for x in v):
        r.problem(key, "a list of non-empty strings", v)
        return tuple(default)
    return tuple(v)


def parse_listen(listen: str) -> tuple[str, int] | None:
    """':9470' → ('', 9470); '127.0.0.1:0' → ('127.0.0.1', 0); '[::1]:9470' → ('::1', 9470)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)
