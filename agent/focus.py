"""`gpucap cost --format focus`: the ledger as a FinOps FOCUS 1.0 cost-and-usage file (CSV).

Why FOCUS: Finance already loads the cloud bill in this shape (AWS, Azure, GCP and OCI all export
it), so gpucap's file can sit next to it and be queried with the same SQL. One row per UTC hour ×
unit × holder × state, straight from the ledger's hour rows (agent/history.py `HourRow`): the rows'
`BilledCost` add up to the ledger's dollars for the window exactly, and no row spans more than one
hour, so a report over any whole-hour window reconciles with the node price × observed hours.

What a node cannot know (the billing account, who provides and who invoices the GPUs) comes from
config, `cost.focus.*` (`FocusSettings`, defaults in docs/configuration.md). gpucap's own columns are
prefixed `x_` as FOCUS asks of custom columns (docs/cost.md says what each holds).

The FinOps Foundation's `focus-validator` 1.0.0 (the current PyPI release) still checks five columns
under their 1.0-preview names (`InvoiceIssuer`, `Provider`, `Publisher`, `ResourceID`, and `ChargeType`
in its SkuPriceId rule), while FOCUS 1.0 itself names them `InvoiceIssuerName`, `ProviderName`,
`PublisherName`, `ResourceId`, `ChargeCategory`. The file carries both, with the same values, so it
loads in FOCUS 1.0 tools and passes the validator.
"""

from __future__ import annotations

import calendar
import csv
import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

FOCUS_VERSION = "1.0"
GPU_HOURS = "GPU-Hours"  # PricingUnit and ConsumedUnit: whole-GPU hours (a MIG slice or a share is a fraction)

RESOURCE_TYPES = {
    "gpu": "GPU",
    "mig": "MIG instance",
    "share": "GPU share",
    "mig_free": "MIG unpartitioned capacity",  # the remainder of a MIG GPU that no instance covers
}

# FOCUS PricingCategory from the node's capacity type: spot is priced by the market ("Dynamic"); a
# reserved or committed node is discounted by a commitment gpucap cannot name, so "Other" rather
# than "Committed" (which FOCUS ties to a CommitmentDiscountId).
_PRICING_CATEGORY = {"on-demand": "Standard", "ondemand": "Standard", "on_demand": "Standard", "": "Standard",
                     "spot": "Dynamic", "preemptible": "Dynamic"}

# Tags: the holder and where it ran, as the cloud bills tag resources (DESIGN §6); empty values left out.
TAG_KEYS = ("namespace", "workload_kind", "workload", "team", "feature", "pod", "container", "node",
            "instance_type", "state")

COLUMNS = (
    # FOCUS 1.0, alphabetical as the spec lists them
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription",
    "ChargeFrequency", "ChargePeriodEnd", "ChargePeriodStart", "CommitmentDiscountCategory",
    "CommitmentDiscountId", "CommitmentDiscountName", "CommitmentDiscountStatus", "CommitmentDiscountType",
    "ConsumedQuantity", "ConsumedUnit", "ContractedCost", "ContractedUnitPrice", "EffectiveCost",
    "InvoiceIssuerName", "ListCost", "ListUnitPrice", "PricingCategory", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "RegionId", "RegionName", "ResourceId", "ResourceName", "ResourceType",
    "ServiceCategory", "ServiceName", "SkuId", "SkuPriceId", "SubAccountId", "SubAccountName", "Tags",
    # the same five under the names focus-validator 1.0.0 checks (see the module docstring)
    "ChargeType", "InvoiceIssuer", "Provider", "Publisher", "ResourceID",
    # gpucap's own
    "x_State", "x_ActivityMean", "x_ActivityP95", "x_MemoryPeakBytes", "x_PriceSource", "x_Node",
    "x_Namespace", "x_Workload", "x_Team", "x_Feature", "x_UnitKind", "x_GpuFraction", "x_CapacityType",
    "x_StateSeconds",
)


@dataclass(frozen=True, slots=True)
class FocusSettings:
    """`cost.focus.*`: the FOCUS columns a node cannot know. Set them to what your bill says (e.g.
    provider "AWS", your payer account) so the file joins the cloud bill on the same keys."""

    billing_account_id: str = "gpucap"
    billing_account_name: str = "gpucap GPU showback"
    sub_account_id: str = ""  # e.g. the cluster; empty = column left empty (FOCUS allows null)
    sub_account_name: str = ""
    provider_name: str = "gpucap"
    publisher_name: str = "gpucap"
    invoice_issuer_name: str = "gpucap"
    billing_currency: str = "USD"
    service_name: str = "GPU compute"
    region_id: str = ""
    region_name: str = ""
    availability_zone: str = ""


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def billing_period(hour: int) -> tuple[int, int]:
    """The calendar month (UTC) holding the hour: FOCUS billing periods are the invoice's month."""
    d = dt.datetime.fromtimestamp(hour, dt.UTC)
    start = dt.datetime(d.year, d.month, 1, tzinfo=dt.UTC)
    days = calendar.monthrange(d.year, d.month)[1]
    return int(start.timestamp()), int(start.timestamp()) + days * 86400


def _num(x: float) -> str:
    """Decimals at a fixed 10 places: enough that the rows sum to the ledger to 1e-6 over a month of
    rows, and never in exponent notation (which some bill loaders read as text)."""
    return f"{x:.10f}"


def _opt(x: float | None, integer: bool = False) -> str:
    if x is None:
        return ""
    return str(int(x)) if integer else _num(float(x))


def _resource_name(row: Any) -> str:
    where = f"{row.node}/GPU {row.gpu}" if row.gpu != "" else row.node
    if row.kind == "mig":
        return f"{where} MIG {row.mig_profile} (GI {row.gpu_instance})"
    if row.kind == "mig_free":
        return f"{where} unpartitioned MIG capacity"
    if row.kind == "share":
        return f"{where} share {row.uuid.rpartition('::')[2]}"
    return where


def _sku(row: Any) -> str:
    return f"{row.model} {row.mig_profile}" if row.mig_profile else row.model


def _description(row: Any) -> str:
    holder = f"held by {row.namespace}/{row.pod}" if row.pod else "not held by any pod"
    state = row.state.replace("_", " ")
    return f"{RESOURCE_TYPES.get(row.kind, 'GPU')} {row.model} on {row.node}, {state}, {holder}"


def focus_row(row: Any, settings: FocusSettings) -> dict[str, str]:
    """One FOCUS row from one ledger hour row; raises ValueError for a row that is not one UTC hour."""
    if row.hour % 3600 or not 0 < row.seconds <= 3600.0 + 1e-6:
        raise ValueError(f"ledger hour row {row.uuid} at {row.hour}: expected one UTC hour and 0 < seconds "
                         f"<= 3600, got hour % 3600 = {row.hour % 3600}, seconds = {row.seconds}")
    fraction = float(row.gpu_fraction or 1.0)
    gpu_hours = row.seconds / 3600.0 * fraction
    list_cost = row.list_hourly_price * row.seconds / 3600.0
    period_start, period_end = billing_period(row.hour)
    tags = {k: str(getattr(row, k)) for k in TAG_KEYS if getattr(row, k, "")}
    values = {
        "AvailabilityZone": settings.availability_zone,
        "BilledCost": _num(row.dollars),
        "BillingAccountId": settings.billing_account_id,
        "BillingAccountName": settings.billing_account_name,
        "BillingCurrency": settings.billing_currency,
        "BillingPeriodEnd": _utc(period_end),
        "BillingPeriodStart": _utc(period_start),
        "ChargeCategory": "Usage",
        "ChargeClass": "",
        "ChargeDescription": _description(row),
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodEnd": _utc(row.hour + 3600),
        "ChargePeriodStart": _utc(row.hour),
        "CommitmentDiscountCategory": "", "CommitmentDiscountId": "", "CommitmentDiscountName": "",
        "CommitmentDiscountStatus": "", "CommitmentDiscountType": "",
        "ConsumedQuantity": _num(gpu_hours),
        "ConsumedUnit": GPU_HOURS,
        "ContractedCost": _num(row.dollars),
        "ContractedUnitPrice": _num(row.hourly_price / fraction),
        "EffectiveCost": _num(row.dollars),
        "InvoiceIssuerName": settings.invoice_issuer_name,
        "ListCost": _num(list_cost),
        "ListUnitPrice": _num(row.list_hourly_price / fraction),
        "PricingCategory": _PRICING_CATEGORY.get(row.capacity_type.lower(), "Other"),
        "PricingQuantity": _num(gpu_hours),
        "PricingUnit": GPU_HOURS,
        "ProviderName": settings.provider_name,
        "PublisherName": settings.publisher_name,
        "RegionId": settings.region_id,
        "RegionName": settings.region_name,
        "ResourceId": row.uuid,
        "ResourceName": _resource_name(row),
        "ResourceType": RESOURCE_TYPES.get(row.kind, "GPU"),
        "ServiceCategory": "AI and Machine Learning",
        "ServiceName": settings.service_name,
        "SkuId": _sku(row),
        "SkuPriceId": "|".join((_sku(row), row.instance_type, row.capacity_type or "on-demand", row.price_source)),
        "SubAccountId": settings.sub_account_id,
        "SubAccountName": settings.sub_account_name,
        "Tags": json.dumps(tags, sort_keys=True, separators=(",", ":")),
        "x_State": row.state,
        "x_ActivityMean": _opt(row.activity_mean),
        "x_ActivityP95": _opt(row.activity_p95),
        "x_MemoryPeakBytes": _opt(row.memory_max_bytes, integer=True),
        "x_PriceSource": row.price_source,
        "x_Node": row.node,
        "x_Namespace": row.namespace,
        "x_Workload": row.workload or row.pod,
        "x_Team": row.team,
        "x_Feature": row.feature,
        "x_UnitKind": row.kind,
        "x_GpuFraction": _num(fraction),
        "x_CapacityType": row.capacity_type,
        "x_StateSeconds": _num(row.seconds),
    }
    values["ChargeType"] = values["ChargeCategory"]
    values["InvoiceIssuer"] = values["InvoiceIssuerName"]
    values["Provider"] = values["ProviderName"]
    values["Publisher"] = values["PublisherName"]
    values["ResourceID"] = values["ResourceId"]
    return values


def write_focus(rows: Iterable[Any], out: TextIO, settings: FocusSettings | None = None) -> int:
    """Write the header and one FOCUS row per ledger hour row, streaming (a month of a large node is
    a few hundred thousand rows); returns the number of rows written."""
    settings = settings or FocusSettings()
    w = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    n = 0
    for row in rows:
        w.writerow(focus_row(row, settings))
        n += 1
    return n
