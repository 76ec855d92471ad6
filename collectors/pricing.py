"""What one GPU (and one MIG slice or time-sliced share of it) costs per hour, and why.

The price of a GPU is a chain of guesses from the most to the least specific: an explicit node
annotation, the operator's config, the bundled catalog by instance type then by GPU model, and
finally a flat default. Every answer carries the name of the rule that produced it (`source`)
so that a dashboard can show how much of the bill rests on the default. docs/pricing.md is the
user-facing description; the bundled figures live in collectors/data/prices.yaml.

Pure module: no Kubernetes or NVML calls. The lead's config loader turns `PricingConfigError`
into exit code 2; `PriceBook` never raises at lookup time.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from collectors.schema import InputError, Problem, Reader, parse_yaml, read_text_file

log = logging.getLogger(__name__)

PRICE_ANNOTATION = "gpucap.io/gpu-hourly-price"
DEFAULT_GPU_HOURLY = 0.95  # OpenCost's built-in default GPU price, $/GPU-hour
MIG_COMPUTE_SLICES = 7
MIG_MEMORY_SLICES = 8
KIND_GPU, KIND_MIG, KIND_SHARE = "gpu", "mig", "share"
MIG_BASES = ("compute", "memory")
# Values of Price.source, in precedence order (also the `price_source` label).
SOURCES = ("node_annotation", "config_instance_type", "config_model", "catalog_instance_type",
           "catalog_model", "default")
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_CACHE_LIMIT = 4096


class PricingConfigError(InputError, ValueError):
    """A bad pricing config or price file: the same `InputError` as every user file (file,
    dotted key, value, expectation; every problem listed), kept as a name for its callers and
    still a ValueError as it always was."""

    @property
    def key_path(self) -> str:
        return self.path


# --------------------------------------------------------------------------- GPU model names
_SHARED_SUFFIX = re.compile(r"-SHARED$", re.IGNORECASE)
_MIG_SUFFIX = re.compile(r"[-_ ]MIG[-_ ]\d+g\.\d+gb$", re.IGNORECASE)
_MEMORY_TOKEN = re.compile(r"^(\d+)GB$")


def canonical_model(name: str) -> str:
    """One key per GPU model whatever spelled it (NVML, GPU Feature Discovery, GKE), so that prices,
    labels and recommendations join. Unknown names pass through minus the vendor prefix: a
    wrong-but-stable label beats an exception in the scrape path."""
    raw = (name or "").strip()
    tokens = [t for t in re.split(r"[\s_\-]+", _MIG_SUFFIX.sub("", _SHARED_SUFFIX.sub("", raw)).upper()) if t]
    words = {t for t in tokens if t not in ("NVIDIA", "TESLA")}
    memory = {int(m.group(1)) for t in words if (m := _MEMORY_TOKEN.match(t))}
    key: str | None = None
    if "H200" in words and memory <= {141}:
        key = "H200-141GB"
    elif "H100" in words and "NVL" not in words and memory <= {80}:
        key = "H100-80GB"  # SXM5 (HBM3), PCIe and GKE's mega all carry 80 GB; the NVL has 94 GB
    elif "A100" in words and memory <= {40, 80}:
        key = "A100-80GB" if 80 in memory else "A100-40GB"  # GKE "nvidia-tesla-a100" is the 40 GB part
    elif "L40S" in words:
        key = "L40S"
    elif "L4" in words:
        key = "L4"
    elif "A10G" in words:
        key = "A10G"
    elif "T4" in words:
        key = "T4"
    if key is not None:
        return key
    for prefix in ("NVIDIA ", "NVIDIA-"):
        if raw.upper().startswith(prefix):
            return raw[len(prefix):].strip()
    return raw


# --------------------------------------------------------------------------- catalog
@dataclass(frozen=True, slots=True)
class InstanceTypePrice:
    instance_type: str
    gpus: int
    gpu_model: str
    gpu_hourly: float  # per GPU: the instance's hourly / gpus, or the file's explicit gpu_hourly
    source: str
    date: str


@dataclass(frozen=True, slots=True)
class ModelPrice:
    gpu_model: str
    gpu_hourly: float
    source: str
    date: str


@dataclass(frozen=True, slots=True)
class Catalog:
    instance_types: Mapping[str, InstanceTypePrice]  # keyed by casefolded instance type
    gpu_models: Mapping[str, ModelPrice]  # keyed by canonical model
    default: ModelPrice | None = None

    def merged_over(self, base: Catalog) -> Catalog:
        """This catalog's rows replace the base's rows with the same key, whole rows at a time."""
        return Catalog(MappingProxyType({**base.instance_types, **self.instance_types}),
                       MappingProxyType({**base.gpu_models, **self.gpu_models}),
                       self.default or base.default)


_EMPTY_CATALOG = Catalog(_EMPTY, _EMPTY)


def parse_catalog(text: str, where: str, *, allow_default: bool = True) -> Catalog:
    """Parse and validate a price file. Pure, so that it is tested on literal strings; every
    mistake of the file is reported at once."""
    problems: list[Problem] = []
    catalog = read_catalog(text, where, problems, allow_default=allow_default)
    if problems:
        raise PricingConfigError.of(problems)
    return catalog


def read_catalog(text: str, where: str, problems: list[Problem], *, allow_default: bool = True) -> Catalog:
    """Like `parse_catalog`, but mistakes go to `problems` (the config file's list, when the
    price file is named by `pricing.catalog_path`) and the rows that are fine are kept."""
    try:
        data = parse_yaml(text, where, "price")
    except InputError as exc:
        problems.extend(exc.problems)
        return _EMPTY_CATALOG
    r = Reader(data, where, "", problems)
    instances: dict[str, InstanceTypePrice] = {}
    rows = r.section("instance_types")
    for raw_key, row_data in rows.data.items():
        name = _entry_key(rows, raw_key)
        row = rows.at(name if name is not None else raw_key, row_data)
        mark = row.mark()
        gpus = row.number("gpus", integer=True, minimum=1, expected="a positive whole number")
        model = row.str("gpu_model", nonempty=True, expected="a GPU model name")
        hourly = row.number("hourly", None, minimum=0.0)
        gpu_hourly = row.number("gpu_hourly", None, minimum=0.0)
        if row.ok_since(mark) and (hourly is None) == (gpu_hourly is None):
            row.problem("", "exactly one of hourly (instance $/h) or gpu_hourly ($/GPU-h)", dict(row.data))
        source, date = row.text("source"), row.text("date")
        row.done()
        if name is None or not row.ok_since(mark):
            continue
        per_gpu = hourly / gpus if hourly is not None else gpu_hourly
        if name.casefold() in instances:
            rows.problem(raw_key, "one row per instance type (case is ignored)", raw_key)
            continue
        instances[name.casefold()] = InstanceTypePrice(name, gpus, canonical_model(model), float(per_gpu),
                                                       source, date)
    models: dict[str, ModelPrice] = {}
    rows = r.section("gpu_models")
    for raw_key, row_data in rows.data.items():
        name = _entry_key(rows, raw_key)
        model_row = _model_row(rows.at(raw_key, row_data), name, canonical=True)
        if model_row is None:
            continue
        if model_row.gpu_model in models:
            rows.problem(raw_key, f"one row per GPU model ({model_row.gpu_model} twice)", raw_key)
            continue
        models[model_row.gpu_model] = model_row
    default = None
    if allow_default and r.raw("default", None) is not None:
        default = _model_row(r.section("default"), "default", canonical=False)
    r.done()
    return Catalog(MappingProxyType(instances), MappingProxyType(models), default)


def _entry_key(r: Reader, raw_key: object) -> str | None:
    """A row's name (an instance type or a GPU model) must be a non-empty string."""
    if not isinstance(raw_key, str) or not raw_key.strip():
        r.problem(raw_key, "a non-empty string key", raw_key)
        return None
    return raw_key.strip()


def _model_row(row: Reader, name: str | None, *, canonical: bool) -> ModelPrice | None:
    mark = row.mark()
    hourly = row.number("gpu_hourly", minimum=0.0)
    source, date = row.text("source"), row.text("date")
    row.done()
    if name is None or not row.ok_since(mark):
        return None
    return ModelPrice(canonical_model(name) if canonical else name, float(hourly), source, date)


def load_catalog(path: str, *, where_config: str = "config", key_path: str = "pricing.catalog_path") -> Catalog:
    """An operator's extra price file; errors inside it name the file itself."""
    problems: list[Problem] = []
    catalog = read_catalog_file(path, Reader({}, where_config, "", problems), key_path)
    if problems:
        raise PricingConfigError.of(problems)
    return catalog


def read_catalog_file(path: str, config: Reader, key_path: str = "pricing.catalog_path") -> Catalog:
    """Read the price file named at `key_path` of the config file `config` reads; an unreadable
    file is the config's mistake (at that key), a bad row the price file's own."""
    try:
        # size-capped, regular files only (/dev/zero is refused at once), UTF-8; never echoes content
        text = read_text_file(path, "price")
    except InputError as exc:
        first = exc.problems[0]
        reason = "no such file" if first.detail.startswith("no such") else (first.detail or first.expected)
        config.problems.append(Problem(config.where, key_path, f"a readable price file ({reason})", path))
        return _EMPTY_CATALOG
    return read_catalog(text, path, config.problems, allow_default=False)


@cache
def bundled_catalog() -> Catalog:
    """Read once per process: the file ships inside the package and never changes at run time."""
    text = resources.files("collectors").joinpath("data/prices.yaml").read_text(encoding="utf-8")
    return parse_catalog(text, "collectors/data/prices.yaml")


# --------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class PricingConfig:
    """The `pricing:` section of the agent config. Prices are on-demand $/GPU-hour."""

    gpu_hourly_by_instance_type: Mapping[str, float] = field(default_factory=lambda: _EMPTY)  # per GPU
    gpu_hourly_by_model: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    default_gpu_hourly: float = DEFAULT_GPU_HOURLY
    spot_ratio: float = 0.35
    reserved_ratio: float = 0.6
    mig_cost_basis: str = "compute"
    catalog_path: str | None = None

    def __post_init__(self) -> None:
        # Mappings are frozen too, so a PricingConfig can be shared between threads safely.
        object.__setattr__(self, "gpu_hourly_by_instance_type",
                           MappingProxyType(dict(self.gpu_hourly_by_instance_type)))
        object.__setattr__(self, "gpu_hourly_by_model", MappingProxyType(dict(self.gpu_hourly_by_model)))


def pricing_config_from_dict(data: Mapping[str, Any] | None, where: str,
                             *, base_dir: str | None = None) -> PricingConfig:
    """Validate the `pricing:` mapping of the config file named `where`, reporting every
    mistake at once (`PricingConfigError`). See `read_pricing_config`."""
    r = Reader(data, where, "pricing")
    config = read_pricing_config(r, base_dir=base_dir)
    r.raise_problems(PricingConfigError)
    return config


def read_pricing_config(r: Reader, *, base_dir: str | None = None) -> PricingConfig:
    """Read the `pricing:` section through the config file's Reader, so that its mistakes join
    the config file's list. A relative `catalog_path` is resolved against `base_dir` (the config
    file's directory) when given, and the file is read now so that `gpucap check-config` catches
    a bad price file."""
    by_type: dict[str, float] = {}
    seen: set[str] = set()
    m = r.section("gpu_hourly_by_instance_type")
    for raw_key in m.data:
        name = _entry_key(m, raw_key)
        value = m.number(raw_key, minimum=0.0)
        if name is None:
            continue
        if name.casefold() in seen:
            m.problem(raw_key, "one entry per instance type (case is ignored)", raw_key)
            continue
        seen.add(name.casefold())
        by_type[name] = float(value)
    by_model: dict[str, float] = {}
    m = r.section("gpu_hourly_by_model")
    for raw_key in m.data:
        name = _entry_key(m, raw_key)
        value = m.number(raw_key, minimum=0.0)
        if name is None:
            continue
        model = canonical_model(name)
        if model in by_model:
            m.problem(raw_key, f"one entry per GPU model ({model} twice)", raw_key)
            continue
        by_model[model] = float(value)
    kwargs: dict[str, Any] = {
        "default_gpu_hourly": float(r.number("default_gpu_hourly", DEFAULT_GPU_HOURLY, minimum=0.0)),
        "spot_ratio": float(r.number("spot_ratio", 0.35, minimum=0.0, maximum=1.0, exclusive_minimum=True)),
        "reserved_ratio": float(r.number("reserved_ratio", 0.6, minimum=0.0, maximum=1.0, exclusive_minimum=True)),
        "mig_cost_basis": r.str("mig_cost_basis", "compute", choices=MIG_BASES),
    }
    raw = r.str("catalog_path", None, nonempty=True, expected="a file path")
    if raw:
        catalog_path = Path(raw.strip()).expanduser()
        if base_dir is not None and not catalog_path.is_absolute():
            catalog_path = Path(base_dir) / catalog_path
        read_catalog_file(str(catalog_path), r, r.key("catalog_path"))
        kwargs["catalog_path"] = str(catalog_path)
    r.done()
    return PricingConfig(by_type, by_model, **kwargs)


# --------------------------------------------------------------------------- resolution
@dataclass(frozen=True, slots=True)
class Price:
    hourly_dollars: float  # one full GPU, after the spot/reserved ratio
    source: str  # one of SOURCES
    instance_type: str
    capacity_type: str
    gpu_model: str
    list_hourly_dollars: float = -1.0  # the on-demand price before the spot/reserved ratio (-1: same)

    @property
    def list_hourly(self) -> float:
        return self.hourly_dollars if self.list_hourly_dollars < 0 else self.list_hourly_dollars


class PriceBook:
    """Resolves GPU prices by the precedence in docs/pricing.md. Lookups never raise: the worst
    case is the default price, counted in `unknown_lookups` so that it can be alerted on."""

    def __init__(self, config: PricingConfig):
        self.config = config
        catalog = bundled_catalog()
        if config.catalog_path:
            catalog = load_catalog(config.catalog_path).merged_over(catalog)
        self.catalog = catalog
        self._by_type = {k.strip().casefold(): v for k, v in config.gpu_hourly_by_instance_type.items()}
        self._by_model = {canonical_model(k): v for k, v in config.gpu_hourly_by_model.items()}
        self._cache: dict[tuple[str, str, str, str | None, str], Price] = {}
        self._warned: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()
        self.unknown_lookups = 0  # every lookup answered by the default, cached or not

    def gpu_price(self, node_name: str, instance_type: str, capacity_type: str,
                  node_annotations: Mapping[str, str], gpu_model: str) -> Price:
        annotation = (node_annotations or _EMPTY).get(PRICE_ANNOTATION)
        key = (node_name, instance_type or "", capacity_type or "", annotation, gpu_model or "")
        with self._lock:
            price = self._cache.get(key)
            if price is None:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                price = self._cache[key] = self._resolve(*key)
            if price.source == "default":
                self.unknown_lookups += 1
            return price

    def _ratio(self, capacity_type: str) -> float:
        kind = capacity_type.strip().lower()
        return {"spot": self.config.spot_ratio, "reserved": self.config.reserved_ratio}.get(kind, 1.0)

    def _resolve(self, node: str, instance_type: str, capacity_type: str, annotation: str | None,
                 gpu_model: str) -> Price:
        itype = instance_type.strip()
        model = canonical_model(gpu_model) if gpu_model.strip() else ""
        row = self.catalog.instance_types.get(itype.casefold()) if itype else None
        shown_model = model or (row.gpu_model if row else "")

        def priced(hourly: float, source: str, ratio: float = 1.0) -> Price:
            return Price(hourly, source, itype, capacity_type, shown_model, hourly / ratio if ratio > 0 else hourly)

        if annotation is not None:
            explicit = _parse_annotation(annotation)
            if explicit is not None:
                return priced(explicit, "node_annotation")  # the node's own price: no spot/reserved ratio
            if ("annotation", node, annotation) not in self._warned:
                self._warned.add(("annotation", node, annotation))
                log.warning("node %s: ignoring annotation %s=%r (expected a non-negative number of dollars "
                            "per GPU-hour); using the next price rule", node, PRICE_ANNOTATION, annotation)
        ratio = self._ratio(capacity_type)
        if itype and itype.casefold() in self._by_type:
            return priced(self._by_type[itype.casefold()] * ratio, "config_instance_type", ratio)
        if model and model in self._by_model:
            return priced(self._by_model[model] * ratio, "config_model", ratio)
        if row is not None:
            return priced(row.gpu_hourly * ratio, "catalog_instance_type", ratio)
        if model and model in self.catalog.gpu_models:
            return priced(self.catalog.gpu_models[model].gpu_hourly * ratio, "catalog_model", ratio)
        if ("unknown", itype, model) not in self._warned:
            self._warned.add(("unknown", itype, model))
            log.warning("no price known for instance type %r, GPU model %r: using the default $%.4g per "
                        "GPU-hour (set pricing.gpu_hourly_by_instance_type or pricing.gpu_hourly_by_model)",
                        itype, model, self.config.default_gpu_hourly)
        return priced(self.config.default_gpu_hourly * ratio, "default", ratio)


def _parse_annotation(value: str) -> float | None:
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


# --------------------------------------------------------------------------- units
def unit_price(parent: Price, kind: str, *, compute_slices: int = 0, memory_slices: int = 0,
               replicas: int = 1, basis: str = "compute") -> float:
    """$/hour of one unit. A MIG instance costs its share of the parent (compute slices of 7, or
    memory slices of 8); a time-sliced share costs parent / replicas. A time-sliced MIG instance
    (kind "mig" with replicas > 1) is both. Raises ValueError on impossible shapes: those are
    bugs or corrupt device data, which the caller skips and counts."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if kind == KIND_GPU:
        return parent.hourly_dollars
    if kind == KIND_SHARE:
        return parent.hourly_dollars / replicas
    if kind != KIND_MIG:
        raise ValueError(f"unit kind must be one of {KIND_GPU}, {KIND_MIG}, {KIND_SHARE}; got {kind!r}")
    if basis == "compute":
        if not 1 <= compute_slices <= MIG_COMPUTE_SLICES:
            raise ValueError(f"MIG compute slices must be 1..{MIG_COMPUTE_SLICES}, got {compute_slices}")
        share = parent.hourly_dollars * compute_slices / MIG_COMPUTE_SLICES
    elif basis == "memory":
        if not 1 <= memory_slices <= MIG_MEMORY_SLICES:
            raise ValueError(f"MIG memory slices must be 1..{MIG_MEMORY_SLICES}, got {memory_slices}")
        share = parent.hourly_dollars * memory_slices / MIG_MEMORY_SLICES
    else:
        raise ValueError(f"MIG cost basis must be one of {', '.join(MIG_BASES)}; got {basis!r}")
    return share if replicas == 1 else share / replicas


_MIG_PROFILE = re.compile(r"(?:^|[/-])(\d+)g\.(\d+)gb$", re.IGNORECASE)


def mig_memory_slices(instance_memory: float, parent_memory: float) -> int:
    """Memory slices (of 8) from sizes in any one unit: NVML's MiB are not round numbers
    (a 1g.10gb instance on an H100 has ~9.8 GB of ~79.6), so round to the nearest slice."""
    if parent_memory <= 0:
        raise ValueError(f"parent memory must be positive, got {parent_memory}")
    return max(1, min(MIG_MEMORY_SLICES, round(MIG_MEMORY_SLICES * instance_memory / parent_memory)))


def mig_profile_slices(profile: str, parent_memory_gb: float) -> tuple[int, int]:
    """(compute slices, memory slices) of a profile name like "3g.40gb", "mig-3g.40gb" or
    "nvidia.com/mig-3g.40gb" on a parent GPU with that much memory (GB, as in the model key)."""
    match = _MIG_PROFILE.search(profile.strip())
    if match is None or not 1 <= int(match.group(1)) <= MIG_COMPUTE_SLICES:
        raise ValueError(f"not a MIG profile: {profile!r}")
    return int(match.group(1)), mig_memory_slices(int(match.group(2)), parent_memory_gb)
