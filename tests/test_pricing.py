"""Price catalog, precedence, ratios, MIG/share pricing and config validation (collectors/pricing.py)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import yaml

from collectors.pricing import (
    DEFAULT_GPU_HOURLY,
    PRICE_ANNOTATION,
    SOURCES,
    Price,
    PriceBook,
    PricingConfig,
    PricingConfigError,
    bundled_catalog,
    canonical_model,
    mig_memory_slices,
    mig_profile_slices,
    parse_catalog,
    pricing_config_from_dict,
    unit_price,
)

H100_NVML = "NVIDIA H100 80GB HBM3"
L4_NVML = "NVIDIA L4"


def book(**pricing: object) -> PriceBook:
    return PriceBook(pricing_config_from_dict(pricing, "config.yaml"))


def price(b: PriceBook, instance_type: str = "", model: str = "", capacity: str = "on-demand",
          annotations: dict[str, str] | None = None, node: str = "node-a") -> Price:
    return b.gpu_price(node, instance_type, capacity, annotations or {}, model)


# --------------------------------------------------------------------------- catalog data
def test_p5_48xlarge_per_gpu_is_exactly_6_88() -> None:
    p = price(book(), "p5.48xlarge", H100_NVML)
    assert p.hourly_dollars == 6.88
    assert (p.source, p.gpu_model, p.instance_type) == ("catalog_instance_type", "H100-80GB", "p5.48xlarge")


@pytest.mark.parametrize(("instance_type", "per_gpu"), [
    ("p5en.48xlarge", 63.296 / 8), ("p4d.24xlarge", 21.957642 / 8), ("p4de.24xlarge", 27.44705 / 8),
    ("g5.12xlarge", 5.672 / 4), ("g6.48xlarge", 13.3504 / 8), ("g6e.12xlarge", 10.49264 / 4),
    ("a3-highgpu-8g", 87.83 / 8), ("a2-highgpu-1g", 0.73948 + 2.93391),
    ("Standard_ND96isr_H100_v5", 12.29), ("standard_nd96asr_v4", 27.197 / 8),  # Azure: case ignored
])
def test_catalog_instance_rows_give_instance_price_per_gpu(instance_type: str, per_gpu: float) -> None:
    assert price(book(), instance_type).hourly_dollars == pytest.approx(per_gpu, rel=1e-12)


@pytest.mark.parametrize(("model", "instance_type"), [
    ("H100-80GB", "p5.48xlarge"), ("H200-141GB", "p5en.48xlarge"), ("A100-40GB", "p4d.24xlarge"),
    ("A100-80GB", "p4de.24xlarge"), ("A10G", "g5.xlarge"), ("L4", "g6.xlarge"), ("L40S", "g6e.xlarge"),
])
def test_model_price_is_the_aws_on_demand_per_gpu_figure(model: str, instance_type: str) -> None:
    catalog = bundled_catalog()
    assert catalog.gpu_models[model].gpu_hourly == catalog.instance_types[instance_type].gpu_hourly
    assert catalog.instance_types[instance_type].gpu_model == model


def test_every_bundled_row_is_sourced_and_dated_and_default_matches_config() -> None:
    catalog = bundled_catalog()
    rows = [*catalog.instance_types.values(), *catalog.gpu_models.values(), catalog.default]
    assert all(row is not None and row.source and row.date for row in rows)
    assert catalog.default is not None and catalog.default.gpu_hourly == DEFAULT_GPU_HOURLY == 0.95
    assert PricingConfig().default_gpu_hourly == 0.95
    assert "T4" not in catalog.gpu_models  # no sourced figure


def test_docs_list_every_catalog_row() -> None:
    text = (Path(__file__).parent.parent / "docs" / "pricing.md").read_text()
    catalog = bundled_catalog()
    for row in catalog.instance_types.values():
        assert f"`{row.instance_type}`" in text
    for model in catalog.gpu_models:
        assert f"`{model}`" in text
    for source in SOURCES:
        assert f"`{source}`" in text


# --------------------------------------------------------------------------- canonical_model
@pytest.mark.parametrize(("name", "canonical"), [
    ("NVIDIA H100 80GB HBM3", "H100-80GB"), ("NVIDIA H100 PCIe", "H100-80GB"), ("NVIDIA H200", "H200-141GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB"), ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
    ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G"), ("Tesla T4", "T4"),
    # GPU Feature Discovery product labels
    ("NVIDIA-H100-80GB-HBM3", "H100-80GB"), ("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "A100-40GB"),
    ("A100-SXM4-40GB-MIG-1g.5gb", "A100-40GB"), ("NVIDIA-H100-80GB-HBM3-MIG-3g.40gb", "H100-80GB"),
    ("NVIDIA-L4-SHARED", "L4"), ("NVIDIA-A100-SXM4-80GB-SHARED", "A100-80GB"), ("NVIDIA-H200", "H200-141GB"),
    # GKE accelerator labels
    ("nvidia-a100-80gb", "A100-80GB"), ("nvidia-tesla-a100", "A100-40GB"), ("nvidia-l4", "L4"),
    ("nvidia-h100-80gb", "H100-80GB"), ("nvidia-h100-mega-80gb", "H100-80GB"), ("nvidia-tesla-t4", "T4"),
    # canonical keys map to themselves
    ("H100-80GB", "H100-80GB"), ("A100-40GB", "A100-40GB"), ("H200-141GB", "H200-141GB"),
    # unknown: the input minus the vendor prefix, never an exception
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA L40", "L40"), ("NVIDIA A10", "A10"),
    ("NVIDIA GH200 480GB", "GH200 480GB"), ("Radeon Instinct MI300X", "Radeon Instinct MI300X"), ("", ""),
])
def test_canonical_model(name: str, canonical: str) -> None:
    assert canonical_model(name) == canonical


# --------------------------------------------------------------------------- precedence
def test_each_rule_alone() -> None:
    b = book(gpu_hourly_by_instance_type={"custom.8x": 4.0}, gpu_hourly_by_model={"NVIDIA L40S": 1.5},
             default_gpu_hourly=0.5)
    cases = [
        ({"annotations": {PRICE_ANNOTATION: "3.25"}}, 3.25, "node_annotation"),
        ({"instance_type": "custom.8x"}, 4.0, "config_instance_type"),
        ({"model": "NVIDIA-L40S-SHARED"}, 1.5, "config_model"),
        ({"instance_type": "g6.12xlarge"}, 4.6016 / 4, "catalog_instance_type"),
        ({"model": "nvidia-h100-80gb"}, 6.88, "catalog_model"),
        ({"instance_type": "m5.large", "model": "NVIDIA A10"}, 0.5, "default"),
    ]
    for kwargs, dollars, source in cases:
        p = price(b, **kwargs)
        assert (p.hourly_dollars, p.source) == (pytest.approx(dollars), source), kwargs


def test_each_rule_beats_the_next() -> None:
    # Every lookup below also matches the next rule down; the higher rule must win.
    b = book(gpu_hourly_by_instance_type={"g6.12xlarge": 2.0}, gpu_hourly_by_model={"L4": 1.0})
    assert price(b, "g6.12xlarge", L4_NVML, annotations={PRICE_ANNOTATION: "9"}).source == "node_annotation"
    assert price(b, "g6.12xlarge", L4_NVML).hourly_dollars == 2.0  # instance override over model override
    b = book(gpu_hourly_by_model={"L4": 1.0})
    p = price(b, "g6.12xlarge", L4_NVML)  # model override over the catalog's instance row
    assert (p.hourly_dollars, p.source) == (1.0, "config_model")
    p = price(book(), "g6.12xlarge", L4_NVML)  # catalog instance row (1.1504) over catalog model (0.8048)
    assert (p.hourly_dollars, p.source) == (pytest.approx(1.1504), "catalog_instance_type")
    p = price(book(default_gpu_hourly=2.5), "unknown.type", L4_NVML)  # catalog model over default
    assert (p.hourly_dollars, p.source) == (0.8048, "catalog_model")


def test_instance_row_fills_the_model_when_none_is_known() -> None:
    assert price(book(), "p4de.24xlarge").gpu_model == "A100-80GB"


# --------------------------------------------------------------------------- capacity types
@pytest.mark.parametrize(("capacity", "ratio"), [("spot", 0.35), ("SPOT", 0.35), ("reserved", 0.6),
                                                  ("on-demand", 1.0), ("", 1.0)])
def test_default_spot_and_reserved_ratios(capacity: str, ratio: float) -> None:
    p = price(book(), "p5.48xlarge", H100_NVML, capacity=capacity)
    assert p.hourly_dollars == pytest.approx(6.88 * ratio)
    assert (p.source, p.capacity_type) == ("catalog_instance_type", capacity)


def test_configured_ratios_apply_to_every_rule_but_the_annotation() -> None:
    b = book(spot_ratio=0.5, reserved_ratio=0.25, gpu_hourly_by_model={"L4": 2.0}, default_gpu_hourly=4.0)
    assert price(b, model=L4_NVML, capacity="spot").hourly_dollars == 1.0
    assert price(b, model="NVIDIA A10", capacity="reserved").hourly_dollars == 1.0
    p = price(b, "p5.48xlarge", H100_NVML, capacity="spot", annotations={PRICE_ANNOTATION: "2.5"})
    assert (p.hourly_dollars, p.source) == (2.5, "node_annotation")  # explicit node price: taken as is


# --------------------------------------------------------------------------- bad annotations, unknowns
@pytest.mark.parametrize("bad", ["abc", "-1", "nan", "inf", "", "$6.88"])
def test_malformed_annotation_falls_back_with_one_warning(bad: str, caplog: pytest.LogCaptureFixture) -> None:
    b = book()
    with caplog.at_level(logging.WARNING, logger="collectors.pricing"):
        for _ in range(3):
            p = price(b, "p5.48xlarge", H100_NVML, capacity="spot", annotations={PRICE_ANNOTATION: bad},
                      node="gpu-node-7")
    assert (p.source, p.hourly_dollars) == ("catalog_instance_type", pytest.approx(6.88 * 0.35))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gpu-node-7" in warnings[0] and repr(bad) in warnings[0]


def test_unknown_model_and_instance_use_the_default_and_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    b = book()
    with caplog.at_level(logging.WARNING, logger="collectors.pricing"):
        for _ in range(3):
            p = price(b, "weird.metal", "NVIDIA B200")
        price(b, "other.metal", "NVIDIA B200")
        price(b, "p5.48xlarge", H100_NVML)  # known: not counted
    assert (p.source, p.hourly_dollars, p.gpu_model) == ("default", 0.95, "B200")
    assert b.unknown_lookups == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per (instance type, model)
    assert "weird.metal" in warnings[0] and "B200" in warnings[0]


def test_lookups_are_cached_per_arguments() -> None:
    b = book()
    first = price(b, "p5.48xlarge", H100_NVML)
    assert price(b, "p5.48xlarge", H100_NVML) is first
    assert price(b, "p5.48xlarge", H100_NVML, capacity="spot") is not first


# --------------------------------------------------------------------------- units
H100 = Price(6.88, "catalog_instance_type", "p5.48xlarge", "on-demand", "H100-80GB")


def test_unit_prices_full_mig_and_share() -> None:
    assert unit_price(H100, "gpu") == 6.88
    assert unit_price(H100, "mig", compute_slices=3, memory_slices=4) == 6.88 * 3 / 7  # 3g.40gb
    assert unit_price(H100, "mig", compute_slices=1, memory_slices=1, basis="memory") == 6.88 * 1 / 8  # 1g.10gb
    assert unit_price(H100, "mig", compute_slices=7, memory_slices=8) == pytest.approx(6.88)
    assert unit_price(H100, "share", replicas=4) == 6.88 / 4
    assert unit_price(H100, "mig", compute_slices=1, replicas=2) == 6.88 / 7 / 2


def test_mig_slices_of_a_full_layout_sum_to_the_parent_price() -> None:
    layout = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]  # 7 compute, 8 memory slices on an H100
    for basis in ("compute", "memory"):
        total = 0.0
        for profile in layout:
            compute, memory = mig_profile_slices(profile, 80)
            total += unit_price(H100, "mig", compute_slices=compute, memory_slices=memory, basis=basis)
        assert total == pytest.approx(6.88)


@pytest.mark.parametrize(("kwargs"), [
    {"kind": "mig", "compute_slices": 0}, {"kind": "mig", "compute_slices": 8},
    {"kind": "mig", "memory_slices": 9, "basis": "memory"}, {"kind": "mig", "compute_slices": 1, "basis": "sm"},
    {"kind": "share", "replicas": 0}, {"kind": "vgpu"},
])
def test_impossible_units_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        unit_price(H100, **kwargs)  # type: ignore[arg-type]


def test_mig_profile_slices() -> None:
    assert mig_profile_slices("3g.40gb", 80) == (3, 4)
    assert mig_profile_slices("nvidia.com/mig-1g.20gb", 80) == (1, 2)
    assert mig_profile_slices("1g.5gb", 40) == (1, 1)
    assert mig_profile_slices("1g.35gb", 141) == (1, 2)
    assert mig_profile_slices("7g.141gb", 141) == (7, 8)
    assert mig_memory_slices(9856, 81559) == 1  # NVML MiB of a 1g.10gb on an H100
    with pytest.raises(ValueError):
        mig_profile_slices("gpu", 80)


# --------------------------------------------------------------------------- config and price files
def test_config_from_yaml_with_defaults_and_overrides(tmp_path: Path) -> None:
    assert pricing_config_from_dict(None, "config.yaml") == PricingConfig()
    extra = tmp_path / "extra.yaml"
    extra.write_text("instance_types:\n  p5.48xlarge: {gpus: 8, gpu_model: H100-80GB, hourly: 40}\n"
                     "  onprem-dgx: {gpus: 8, gpu_model: NVIDIA A100-SXM4-80GB, gpu_hourly: 1.2}\n"
                     "gpu_models:\n  nvidia-tesla-t4: {gpu_hourly: 0.3, source: our contract, date: 2026-01-01}\n")
    section = yaml.safe_load("""
pricing:
  gpu_hourly_by_instance_type: {p4d.24xlarge: 2.0}
  gpu_hourly_by_model: {NVIDIA H100 80GB HBM3: 5.5}
  default_gpu_hourly: 1
  spot_ratio: 0.3
  reserved_ratio: 1
  mig_cost_basis: memory
  catalog_path: extra.yaml
""")["pricing"]
    cfg = pricing_config_from_dict(section, "config.yaml", base_dir=str(tmp_path))
    assert cfg.gpu_hourly_by_model == {"H100-80GB": 5.5}
    assert (cfg.default_gpu_hourly, cfg.spot_ratio, cfg.reserved_ratio, cfg.mig_cost_basis) == (1.0, 0.3, 1.0,
                                                                                                "memory")
    assert cfg.catalog_path == str(extra)
    with pytest.raises(TypeError):
        cfg.gpu_hourly_by_model["L4"] = 1.0  # type: ignore[index]
    b = PriceBook(cfg)
    assert price(b, "P4D.24XLARGE").hourly_dollars == 2.0
    assert price(b, "onprem-dgx").hourly_dollars == 1.2 and price(b, "onprem-dgx").gpu_model == "A100-80GB"
    assert (price(b, model="Tesla T4").hourly_dollars, price(b, model="Tesla T4").source) == (0.3, "catalog_model")
    assert price(b, "p5en.48xlarge").hourly_dollars == 7.912  # bundled rows stay
    b2 = PriceBook(pricing_config_from_dict({"catalog_path": str(extra)}, "config.yaml"))
    assert price(b2, "p5.48xlarge").hourly_dollars == 5.0  # the extra file's row replaces the bundled one


BAD_CONFIGS = [
    ({"gpu_hourly_by_model": {"H100-80GB": -1}}, "pricing.gpu_hourly_by_model.H100-80GB",
     "expected a non-negative number, got -1"),
    ({"gpu_hourly_by_model": {"H100-80GB": "abc"}}, "pricing.gpu_hourly_by_model.H100-80GB",
     "expected a non-negative number, got 'abc'"),
    ({"gpu_hourly_by_instance_type": {"p5.48xlarge": True}}, "pricing.gpu_hourly_by_instance_type.p5.48xlarge",
     "expected a non-negative number, got True"),
    ({"gpu_hourly_by_instance_type": {"p5.48xlarge": float("nan")}},
     "pricing.gpu_hourly_by_instance_type.p5.48xlarge", "expected a non-negative number, got nan"),
    ({"gpu_hourly_by_instance_type": ["p5.48xlarge"]}, "pricing.gpu_hourly_by_instance_type",
     "expected a mapping"),
    ({"default_gpu_hourly": "cheap"}, "pricing.default_gpu_hourly", "expected a non-negative number"),
    ({"spot_ration": 0.3}, "pricing.spot_ration", ("unknown key (known here: catalog_path, default_gpu_hourly, "
     "gpu_hourly_by_instance_type, gpu_hourly_by_model, mig_cost_basis, reserved_ratio, spot_ratio; "
     "did you mean 'spot_ratio'?)")),
    ({"mig_cost_basis": "sm"}, "pricing.mig_cost_basis", "expected one of compute, memory, got 'sm'"),
    ({"spot_ratio": 0}, "pricing.spot_ratio", "expected a number in (0, 1], got 0"),
    ({"reserved_ratio": 1.5}, "pricing.reserved_ratio", "expected a number in (0, 1], got 1.5"),
    ({"spot_ratio": -0.2}, "pricing.spot_ratio", "expected a number in (0, 1]"),
    ({"gpu_hourly_by_model": {"H100-80GB": 1, "NVIDIA H100 80GB HBM3": 2}},
     "pricing.gpu_hourly_by_model.NVIDIA H100 80GB HBM3",
     "expected one entry per GPU model (H100-80GB twice), got 'NVIDIA H100 80GB HBM3'"),
    ({"catalog_path": 3}, "pricing.catalog_path", "expected a file path, got 3"),
    ({"catalog_path": "/nonexistent/prices.yaml"}, "pricing.catalog_path", "expected a readable price file"),
]


@pytest.mark.parametrize(("section", "key_path", "expectation"), BAD_CONFIGS)
def test_bad_config_names_file_key_and_expectation(section: dict[str, object], key_path: str,
                                                    expectation: str) -> None:
    with pytest.raises(PricingConfigError) as err:
        pricing_config_from_dict(section, "config.yaml")
    assert str(err.value).startswith(f"config.yaml: {key_path}: ")
    assert expectation in str(err.value)
    assert (err.value.where, err.value.key_path) == ("config.yaml", key_path)


def test_message_format_matches_the_documented_example() -> None:
    with pytest.raises(PricingConfigError) as err:
        pricing_config_from_dict({"gpu_hourly_by_model": {"H100-80GB": "abc"}}, "config.yaml")
    assert str(err.value) == "config.yaml: pricing.gpu_hourly_by_model.H100-80GB: expected a non-negative " \
                             "number, got 'abc'"


BAD_CATALOGS = [
    ("instance_types:\n  x.large: {gpus: 8, gpu_model: L4, hourly: -3}\n", "instance_types.x.large.hourly",
     "expected a non-negative number, got -3"),
    ("instance_types:\n  x.large: {gpus: 0, gpu_model: L4, hourly: 3}\n", "instance_types.x.large.gpus",
     "expected a positive whole number, got 0"),
    ("instance_types:\n  x.large: {gpus: 1, hourly: 3}\n", "instance_types.x.large.gpu_model",
     "expected a GPU model name"),
    ("instance_types:\n  x.large: {gpus: 1, gpu_model: L4, hourly: 3, gpu_hourly: 3}\n", "instance_types.x.large",
     "expected exactly one of hourly"),
    ("instance_types:\n  x.large: {gpus: 1, gpu_model: L4, hourly: 3, price: 3}\n",
     "instance_types.x.large.price", "unknown key (known here: date, gpu_hourly, gpu_model, gpus, hourly, source)"),
    ("gpu_models:\n  L4: {gpu_hourly: lots}\n", "gpu_models.L4.gpu_hourly", "expected a non-negative number"),
    ("gpu_models:\n  L4: {source: x}\n", "gpu_models.L4.gpu_hourly", "expected a non-negative number"),
    ("gpu_models: [L4]\n", "gpu_models", "expected a mapping"),
    ("prices: {}\n", "prices", "unknown key (known here: gpu_models, instance_types)"),
    ("default: {gpu_hourly: 1}\n", "default", "unknown key (known here: gpu_models, instance_types)"),
    ("- just\n- a list\n", "", "expected a mapping at the top level, got list (content not shown)"),
]


@pytest.mark.parametrize(("text", "key_path", "expectation"), BAD_CATALOGS)
def test_bad_price_file_names_its_own_file_key_and_expectation(tmp_path: Path, text: str, key_path: str,
                                                               expectation: str) -> None:
    extra = tmp_path / "my-prices.yaml"
    extra.write_text(text)
    with pytest.raises(PricingConfigError) as err:
        pricing_config_from_dict({"catalog_path": "my-prices.yaml"}, "config.yaml", base_dir=str(tmp_path))
    assert str(err.value).startswith(f"{extra}: {key_path}: " if key_path else f"{extra}: ")
    assert expectation in str(err.value)


def test_unparseable_price_file_is_a_config_error(tmp_path: Path) -> None:
    extra = tmp_path / "broken.yaml"
    extra.write_text("instance_types: {p5: [\n")
    with pytest.raises(PricingConfigError) as err:
        pricing_config_from_dict({"catalog_path": str(extra)}, "config.yaml")
    assert str(err.value).startswith(f"{extra}:2: expected valid YAML in a price file")


def test_parse_catalog_accepts_an_empty_file_and_unquoted_dates() -> None:
    assert len(parse_catalog("", "empty.yaml").instance_types) == 0
    row = parse_catalog("gpu_models:\n  L4: {gpu_hourly: 1, date: 2026-07-20}\n", "x.yaml").gpu_models["L4"]
    assert row.date == "2026-07-20" and not math.isnan(row.gpu_hourly)
