"""`gpucap cost --format focus`: a FOCUS 1.0 file Finance loads next to the cloud bill. The judge is the
FinOps Foundation's own validator (PyPI `focus-validator`, the `focus` extra), run as Finance would
run it on our file; the money must be the ledger's to the micro-dollar, one UTC hour per row.

The validator pins numpy < 2 and needs multimethod < 1.11, which clash with other tools here, so
`make deps` installs it apart, into build/focus-validator (`pip install --target`); an interpreter
that has `focus_validator` importable works too. Without either the validator tests skip, saying so.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import io
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from agent.focus import COLUMNS, FocusSettings, focus_row, write_focus
from agent.history import HourRow

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR_DIR = ROOT / "build" / "focus-validator"
WEEK_START = int(dt.datetime(2026, 10, 28, tzinfo=dt.UTC).timestamp())  # crosses into November
NODE = "gpu-node-a1"
H100 = "NVIDIA H100 80GB HBM3"


def _validator_path() -> Path | None:
    """The directory holding the focus_validator package (it must also be the working directory: the
    validator 1.0.0 opens its currency list by a path relative to it)."""
    if (VALIDATOR_DIR / "focus_validator").is_dir():
        return VALIDATOR_DIR
    spec = importlib.util.find_spec("focus_validator")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent.parent
    return None


needs_validator = pytest.mark.skipif(
    _validator_path() is None,
    reason="focus-validator not installed: `make deps` puts it in build/focus-validator (pyproject extra `focus`)")


def run_validator(csv_path: Path, tmp_path: Path) -> dict[str, Any]:
    """focus-validator --validate-version 1.0 on the file; the counts of its JUnit report."""
    where = _validator_path()
    assert where is not None
    report = tmp_path / "focus-validator.xml"
    env = {**os.environ, "PYTHONPATH": str(where)}
    cmd = [sys.executable, "-c", "import sys; from focus_validator.main import main; sys.exit(main())",
           "--data-file", str(csv_path), "--validate-version", "1.0", "--output-type", "unittest",
           "--output-destination", str(report)]
    result = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert report.exists(), result.stdout + result.stderr
    root = ET.parse(report).getroot()
    failed = [case.get("name") for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"tests": int(root.get("tests", 0)), "failures": int(root.get("failures", 0)),
            "errors": int(root.get("errors", 0)), "skipped": int(root.get("skipped", 0)), "failed": failed,
            "output": result.stdout + result.stderr}


# -- a simulated week of ledger hour rows ------------------------------------------------------------

def _unit(gpu: str, kind: str = "gpu", uuid: str | None = None, price: float = 6.88, fraction: float = 1.0,
          mig_profile: str = "", gpu_instance: str = "", list_price: float | None = None,
          capacity_type: str = "on-demand") -> dict[str, Any]:
    return {"gpu": gpu, "kind": kind, "uuid": uuid or f"GPU-{gpu}000000-0000-0000-0000-000000000000",
            "hourly_price": price, "list_hourly_price": price if list_price is None else list_price,
            "gpu_fraction": fraction, "mig_profile": mig_profile, "gpu_instance": gpu_instance,
            "capacity_type": capacity_type}


def _holder(namespace: str, pod: str, workload_kind: str, workload: str, team: str, feature: str = "") -> dict[str, str]:
    return {"namespace": namespace, "pod": pod, "container": "main" if pod else "", "workload_kind": workload_kind,
            "workload": workload, "team": team, "feature": feature}


NOBODY = _holder("", "", "", "", "")


def _row(hour: int, unit: dict[str, Any], holder: dict[str, str], state: str, seconds: float,
         activity: float | None = None) -> HourRow:
    return HourRow(
        hour=hour, node=NODE, gpu=unit["gpu"], gpu_instance=unit["gpu_instance"], mig_profile=unit["mig_profile"],
        uuid=unit["uuid"], model=H100, kind=unit["kind"], instance_type="p5.48xlarge",
        capacity_type=unit["capacity_type"], price_source="catalog_instance_type",
        hourly_price=unit["hourly_price"], list_hourly_price=unit["list_hourly_price"], state=state,
        seconds=seconds, dollars=unit["hourly_price"] * seconds / 3600.0, activity_mean=activity,
        activity_p95=None if activity is None else min(1.0, activity * 1.2),
        memory_max_bytes=None if activity is None else int(40e9 * (0.2 + activity)),
        gpu_fraction=unit["gpu_fraction"], **holder)


def simulated_week() -> list[HourRow]:
    """168 hours of an 8-GPU node: a training job (2 GPUs, starts at 01:17 on day 1), a notebook that
    goes idle reserved, an unallocated GPU, a GPU lost on day 4 with its holder still paying, an hour
    of unknown (kubelet stale), a MIG GPU (two 3g.40gb instances + the unpartitioned remainder) and a
    time-sliced GPU of 4 shares with two holders."""
    train = _holder("training", "finetune-0-worker-0", "Job", "finetune", "foundation-models", "pretraining")
    nb = _holder("research", "notebook-alice-0", "StatefulSet", "notebook-alice", "research")
    chat = _holder("serving", "chat-7d9f-a", "Deployment", "chat", "serving", "chatbot")
    search = _holder("serving", "search-5c4b-b", "Deployment", "search", "serving", "search")
    batch = _holder("batch", "embed-0", "Job", "embed", "data", "embeddings")
    gpus = [_unit(str(i)) for i in range(6)]
    mig_parent = "GPU-6000000-0000-0000-0000-000000000000"
    mig_a = _unit("6", "mig", "MIG-6a000000-0000-0000-0000-000000000000", 6.88 * 3 / 7, 3 / 7, "3g.40gb", "1")
    mig_b = _unit("6", "mig", "MIG-6b000000-0000-0000-0000-000000000000", 6.88 * 3 / 7, 3 / 7, "3g.40gb", "2")
    mig_free = _unit("6", "mig_free", mig_parent, 6.88 / 7, 1 / 7)
    shares = [_unit("7", "share", f"GPU-7000000-0000-0000-0000-000000000000::{n}", 6.88 / 4, 0.25) for n in range(4)]
    rows: list[HourRow] = []
    for h in range(168):
        hour = WEEK_START + h * 3600
        for g in gpus[:2]:  # training from 01:17 on
            if h == 1:
                rows += [_row(hour, g, NOBODY, "unallocated", 1020.0), _row(hour, g, train, "active", 2580.0, 0.9)]
            elif h == 0:
                rows.append(_row(hour, g, NOBODY, "unallocated", 3600.0))
            else:
                rows.append(_row(hour, g, train, "active", 3600.0, 0.9))
        # notebook: busy 8 hours a day, idle reserved the rest
        rows.append(_row(hour, gpus[2], nb, "active" if h % 24 < 8 else "idle_reserved", 3600.0,
                         0.6 if h % 24 < 8 else 0.0))
        rows.append(_row(hour, gpus[3], NOBODY, "unallocated", 3600.0))
        rows.append(_row(hour, gpus[4], batch, "lost" if h >= 80 else "active", 3600.0, None if h >= 80 else 0.7))
        if h == 50:  # kubelet reading stale for 25 minutes
            rows += [_row(hour, gpus[5], chat, "active", 2100.0, 0.5), _row(hour, gpus[5], NOBODY, "unknown", 1500.0)]
        else:
            rows.append(_row(hour, gpus[5], chat, "active", 3600.0, 0.5))
        rows.append(_row(hour, mig_a, chat, "active", 3600.0, 0.4))
        rows.append(_row(hour, mig_b, search, "idle_reserved" if h % 24 >= 20 else "active", 3600.0, 0.1))
        rows.append(_row(hour, mig_free, NOBODY, "unallocated", 3600.0))
        rows.append(_row(hour, shares[0], search, "active", 3600.0, 0.8))
        rows.append(_row(hour, shares[1], batch, "active", 3600.0, 0.3))
        rows += [_row(hour, s, NOBODY, "unallocated", 3600.0) for s in shares[2:]]
    return rows


def _write(rows: list[HourRow], path: Path, settings: FocusSettings | None = None) -> list[dict[str, str]]:
    with path.open("w", encoding="utf-8", newline="") as f:
        n = write_focus(rows, f, settings or FocusSettings())
    assert n == len(rows)
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _t(text: str) -> dt.datetime:
    assert text.endswith("Z"), text
    return dt.datetime.fromisoformat(text)


# -- the validator --------------------------------------------------------------------------------------

@needs_validator
def test_focus_validator_accepts_a_simulated_week(tmp_path: Path) -> None:
    path = tmp_path / "gpucap-focus.csv"
    _write(simulated_week(), path)
    result = run_validator(path, tmp_path)
    assert result["failures"] == 0 and result["errors"] == 0 and not result["failed"], result
    assert result["skipped"] == 0, result
    assert result["tests"] >= 100, result  # the validator really checked the FOCUS 1.0 rule set


@needs_validator
def test_focus_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    """The judge is live: the same file with a lower-case currency and no BilledCost fails its rules."""
    rows = _write(simulated_week()[:50], tmp_path / "good.csv", FocusSettings(billing_currency="usd"))
    broken = tmp_path / "broken.csv"
    with broken.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in COLUMNS if c != "BilledCost"], lineterminator="\n",
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    result = run_validator(broken, tmp_path)
    assert any("BillingCurrency" in name for name in result["failed"]), result
    assert any("BilledCost" in name for name in result["failed"]), result


# -- the money and the hours ----------------------------------------------------------------------------

def test_billed_and_effective_cost_sum_to_the_ledger(tmp_path: Path) -> None:
    rows = simulated_week()
    out = _write(rows, tmp_path / "focus.csv")
    ledger = sum(r.dollars for r in rows)
    assert sum(float(r["BilledCost"]) for r in out) == pytest.approx(ledger, abs=1e-6)
    assert sum(float(r["EffectiveCost"]) for r in out) == pytest.approx(ledger, abs=1e-6)
    # node price × hours: 7 full-price GPUs' worth + the MIG GPU's pieces, 168 h
    assert ledger == pytest.approx(8 * 6.88 * 168, abs=1e-6)
    by_state: dict[str, float] = {}
    for r in out:
        by_state[r["x_State"]] = by_state.get(r["x_State"], 0.0) + float(r["BilledCost"])
    assert by_state["lost"] == pytest.approx(6.88 * 88, abs=1e-6)  # its holder kept paying from hour 80
    assert by_state["unknown"] == pytest.approx(6.88 * 1500 / 3600, abs=1e-6)


def test_every_row_is_one_utc_hour_inside_its_billing_month(tmp_path: Path) -> None:
    out = _write(simulated_week(), tmp_path / "focus.csv")
    months = set()
    for r in out:
        start, end = _t(r["ChargePeriodStart"]), _t(r["ChargePeriodEnd"])
        assert end - start == dt.timedelta(hours=1)
        assert start.minute == start.second == 0 and start.utcoffset() == dt.timedelta(0)
        bstart, bend = _t(r["BillingPeriodStart"]), _t(r["BillingPeriodEnd"])
        assert bstart.day == 1 and bstart.hour == 0 and bend.day == 1 and bstart <= start and end <= bend
        months.add(r["BillingPeriodStart"])
    assert months == {"2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z"}


def test_quantities_are_gpu_hours_and_list_cost_is_at_the_list_price(tmp_path: Path) -> None:
    spot = _unit("0", price=6.88 * 0.4, list_price=6.88, capacity_type="spot")
    share = _unit("7", "share", "GPU-7::1", 6.88 / 4, 0.25)
    holder = _holder("ml", "p", "Job", "j", "t")
    a, b = (focus_row(_row(WEEK_START, spot, holder, "active", 1800.0, 0.5), FocusSettings()),
            focus_row(_row(WEEK_START, share, holder, "active", 3600.0, 0.5), FocusSettings()))
    assert a["PricingCategory"] == "Dynamic" and float(a["ListCost"]) == pytest.approx(6.88 / 2)
    assert float(a["BilledCost"]) == pytest.approx(6.88 * 0.4 / 2)
    assert float(a["BilledCost"]) < float(a["ListCost"])
    assert float(a["PricingQuantity"]) == float(a["ConsumedQuantity"]) == pytest.approx(0.5)
    # a quarter share for an hour is a quarter GPU-hour, priced per whole GPU-hour
    assert float(b["ConsumedQuantity"]) == pytest.approx(0.25) and b["ConsumedUnit"] == "GPU-Hours"
    assert float(b["ListUnitPrice"]) == pytest.approx(6.88)
    assert float(b["ListUnitPrice"]) * float(b["PricingQuantity"]) == pytest.approx(float(b["ListCost"]))
    assert b["ResourceType"] == "GPU share" and b["ResourceId"] == b["ResourceID"] == "GPU-7::1"


def test_tags_and_x_columns_name_the_holder(tmp_path: Path) -> None:
    out = _write(simulated_week(), tmp_path / "focus.csv")
    held = next(r for r in out if r["x_Workload"] == "chat" and r["ResourceType"] == "MIG instance")
    tags = json.loads(held["Tags"])
    assert tags == {"namespace": "serving", "workload_kind": "Deployment", "workload": "chat", "team": "serving",
                    "feature": "chatbot", "pod": "chat-7d9f-a", "container": "main", "node": NODE,
                    "instance_type": "p5.48xlarge", "state": "active"}
    assert held["x_State"] == "active" and held["x_Team"] == "serving" and held["x_PriceSource"]
    assert float(held["x_ActivityMean"]) == pytest.approx(0.4) and int(held["x_MemoryPeakBytes"]) > 0
    free = next(r for r in out if r["x_UnitKind"] == "mig_free")
    assert json.loads(free["Tags"]) == {"node": NODE, "instance_type": "p5.48xlarge", "state": "unallocated"}
    assert free["x_ActivityMean"] == "" and free["ResourceType"] == "MIG unpartitioned capacity"
    assert all(r["ChargeCategory"] == "Usage" and r["ServiceCategory"] == "AI and Machine Learning" for r in out)


def test_what_a_node_cannot_know_comes_from_settings() -> None:
    s = FocusSettings(billing_account_id="123456789012", billing_account_name="payer", provider_name="AWS",
                      publisher_name="AWS", invoice_issuer_name="AWS", sub_account_id="prod-eks", region_id="us-east-1")
    r = focus_row(simulated_week()[0], s)
    assert (r["BillingAccountId"], r["ProviderName"], r["Provider"], r["InvoiceIssuerName"], r["InvoiceIssuer"],
            r["SubAccountId"], r["RegionId"]) == ("123456789012", "AWS", "AWS", "AWS", "AWS", "prod-eks", "us-east-1")


def test_a_row_that_is_not_one_hour_is_refused() -> None:
    row = simulated_week()[0]
    with pytest.raises(ValueError, match="one UTC hour"):
        focus_row(HourRow(**{**{f: getattr(row, f) for f in row.__slots__}, "hour": row.hour + 60}), FocusSettings())
    with pytest.raises(ValueError, match="seconds"):
        focus_row(HourRow(**{**{f: getattr(row, f) for f in row.__slots__}, "seconds": 7200.0}), FocusSettings())


def test_config_cost_focus_reaches_the_settings() -> None:
    from agent.config import config_from_dict

    cfg = config_from_dict({"cost": {"focus": {"provider_name": "Google Cloud", "billing_account_id": "0A1B"}}}, "c.yaml")
    assert cfg.cost.focus.provider_name == "Google Cloud" and cfg.cost.focus.billing_account_id == "0A1B"
    assert cfg.cost.focus.billing_currency == "USD"


# -- from a real simulated run of the agent ---------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, float, float]:
    """Three simulated hours of `demo` through the whole agent into a real ledger, starting mid-hour."""
    from agent.config import Config
    from agent.history import History
    from agent.sources import build_runtime

    path = str(tmp_path_factory.mktemp("ledger") / "history.db")
    start = float(WEEK_START + 1234)
    rt = build_runtime(Config(), simulate="demo", realtime=False, start=start, history=path)
    try:
        rt.agent.run_until(rt.clock, rt.clock.start + 3 * 3600.0, 60.0)
    finally:
        rt.close()
    history = History(path)
    yield history, start, start + 3 * 3600.0
    history.close()


def test_simulated_ledger_exports_every_dollar(demo_ledger: tuple[Any, float, float], tmp_path: Path) -> None:
    history, start, end = demo_ledger
    begin, finish = start // 3600 * 3600, (end // 3600 + 1) * 3600
    rows = list(history.hour_rows(begin, finish))
    out = _write(rows, tmp_path / "demo.csv")
    assert len({r["ResourceId"] for r in out}) >= 8
    assert {r["x_State"] for r in out} >= {"active", "unallocated"}
    billed = sum(float(r["BilledCost"]) for r in out)
    assert billed == pytest.approx(sum(r.dollars for r in rows), abs=1e-6)
    assert billed == pytest.approx(history.node_dollars(begin, finish), abs=1e-6)  # node price × observed
    for r in out:
        assert _t(r["ChargePeriodEnd"]) - _t(r["ChargePeriodStart"]) == dt.timedelta(hours=1)


@needs_validator
def test_focus_validator_accepts_a_simulated_ledger(demo_ledger: tuple[Any, float, float], tmp_path: Path) -> None:
    history, start, end = demo_ledger
    buf = io.StringIO()
    write_focus(history.hour_rows(start // 3600 * 3600, end), buf, FocusSettings())
    path = tmp_path / "demo.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    result = run_validator(path, tmp_path)
    assert result["failures"] == 0 and result["errors"] == 0 and result["tests"] >= 100, result


@pytest.mark.slow
@needs_validator
@pytest.mark.skipif(not os.environ.get("GPUCAP_SLOW"), reason="a simulated week takes ~75 s here: GPUCAP_SLOW=1")
def test_gpucap_cost_focus_of_a_simulated_week_passes_the_validator(tmp_path: Path) -> None:
    """The documented command, end to end: `gpucap cost --simulate demo --window 7d --format focus`."""
    from click.testing import CliRunner

    from agent.cli import main

    path = tmp_path / "week.csv"
    start = WEEK_START + 3 * 86400  # 2026-10-31: the week crosses into November
    res = CliRunner().invoke(main, ["cost", "--simulate", "demo", "--window", "7d", "--format", "focus",
                                    "--start", str(start), "--output", str(path)])
    assert res.exit_code == 0, res.output
    with path.open(encoding="utf-8", newline="") as f:
        out = list(csv.DictReader(f))
    per_hour: dict[str, float] = {}
    for r in out:
        per_hour[r["ChargePeriodStart"]] = per_hour.get(r["ChargePeriodStart"], 0.0) + float(r["BilledCost"])
    assert len(per_hour) == 168
    # the node's price every hour: no hour and no dollar missing (demo holds its pods all week)
    assert max(per_hour.values()) - min(per_hour.values()) < 1e-6
    result = run_validator(path, tmp_path)
    assert result["failures"] == 0 and result["errors"] == 0 and result["tests"] >= 100, result
