"""Monthly GPU budgets per team: what a FinOps lead sets once (`budgets: {research: 20000}` in the chart,
`cost.budgets` in the agent's config) and then relies on to page before the month is over, and to
read in `gpucap cost`. The alerts are judged by promtool on the rules Helm actually renders.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.budgets import budget_lines, budget_status, month_bounds, month_to_date_window
from agent.config import config_from_dict
from collectors.schema import InputError
from tests.test_dashboard import PROMTOOL, run_promtool

ROOT = Path(__file__).resolve().parent.parent
BUDGET_TEST = ROOT / "deploy" / "rules-tests" / "budgets" / "two-teams.test.yaml"
TWO_TEAMS = {"research": 20000, "serving": 5000}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'); CI installs it")


# -- the chart: budgets rendered into the PrometheusRule and the agent's config -------------------------

def _render(values: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    from tests.test_helm import render

    return render(values)


def _groups(values: dict[str, Any]) -> list[dict[str, Any]]:
    objects = _render({"prometheusRule": {"enabled": True}, **values})
    [rule] = [o for (kind, _), o in objects.items() if kind == "PrometheusRule"]
    return rule["spec"]["groups"]


def _budget_group(values: dict[str, Any]) -> list[dict[str, Any]]:
    found = [g for g in _groups(values) if g["name"] == "gpucap-budgets"]
    return found[0]["rules"] if found else []


def _promtool_test(tmp_path: Path, values: dict[str, Any], test: dict[str, Any] | None = None):
    """Run the budget promtool test (or a changed copy) against the rules rendered from `values`."""
    (tmp_path / "rendered-budgets.yaml").write_text(
        yaml.safe_dump({"groups": _groups(values)}, sort_keys=False))
    path = tmp_path / BUDGET_TEST.name
    path.write_text(yaml.safe_dump(test, sort_keys=False) if test else BUDGET_TEST.read_text())
    return run_promtool("test", "rules", str(path))


@needs_promtool
def test_rendered_budget_rules_load_in_prometheus(tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump({"groups": _groups({"budgets": TWO_TEAMS})}, sort_keys=False))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_team_over_budget_fires_and_team_under_budget_does_not(tmp_path: Path) -> None:
    """deploy/rules-tests/budgets/two-teams.test.yaml on the rules rendered for research $20k, serving $5k."""
    result = _promtool_test(tmp_path, {"budgets": TWO_TEAMS})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_the_quiet_team_fires_once_its_budget_is_below_its_spend(tmp_path: Path) -> None:
    """Serving stays quiet only because of its budget: at $1,000 its $1,198 projection pages too."""
    test = yaml.safe_load(BUDGET_TEST.read_text())
    cases = test["tests"][0]["alert_rule_test"]
    cases[:] = [c for c in cases if c["alertname"] == "GpucapTeamBudgetProjectedOver"]  # its idle share fires too
    case = next(c for c in cases
                if c["alertname"] == "GpucapTeamBudgetProjectedOver" and c.get("exp_alerts"))
    serving = copy.deepcopy(case["exp_alerts"][0])
    serving["exp_labels"]["team"] = "serving"
    serving["exp_annotations"]["summary"] = 'Team "serving" is on course to spend 119.8% of its monthly GPU budget'
    serving["exp_annotations"]["description"] = (
        serving["exp_annotations"]["description"].replace('"research"', '"serving"')
        .replace("$25594", "$1198").replace("$20000", "$1000").replace("(128%)", "(119.8%)"))
    case["exp_alerts"].append(serving)
    test["tests"][0]["promql_expr_test"][0]["exp_samples"][1]["value"] = 1000
    result = _promtool_test(tmp_path, {"budgets": {"research": 20000, "serving": 1000}}, test)
    assert result.returncode == 0, result.stdout + result.stderr
    # and the committed expectations (serving quiet) now fail: the test can tell the two apart
    result = _promtool_test(tmp_path, {"budgets": {"research": 20000, "serving": 1000}})
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_no_budgets_no_budget_rules_and_no_cost_config() -> None:
    from tests.test_helm import gpucap_config

    assert _budget_group({}) == []
    assert "cost" not in gpucap_config(_render({}))


def test_one_budget_series_per_team_and_both_alerts() -> None:
    rules = _budget_group({"budgets": {"serving": 5000, "research": 20000.5}})
    budgets = [(r["labels"]["team"], r["expr"]) for r in rules if r.get("record") == "gpucap:team_budget_monthly_dollars"]
    assert budgets == [("research", "vector(20000.5)"), ("serving", "vector(5000)")]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert set(alerts) == {"GpucapTeamBudgetProjectedOver", "GpucapTeamIdleBudgetShareHigh"}
    # the projection sums every node's counters by team, and leaves out units no pod holds
    projected = next(r for r in rules if r.get("record") == "gpucap:team_cost_dollars:projected_month")
    assert "sum by (team) (increase(gpucap_cost_dollars_total{team!=\"\"}" in projected["expr"]


def test_budget_alert_settings_flow_from_values() -> None:
    rules = _budget_group({"budgets": TWO_TEAMS, "prometheusRule": {"enabled": True, "runbookBaseUrl": "https://rb"},
                           "budgetAlerts": {"projectedRatio": 0.9, "idleShare": 0.1, "for": "3h",
                                            "severity": "critical"}})
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert "> 0.9 # threshold" in alerts["GpucapTeamBudgetProjectedOver"]["expr"]
    assert "> 0.1 # threshold" in alerts["GpucapTeamIdleBudgetShareHigh"]["expr"]
    for a in alerts.values():
        assert a["for"] == "3h" and a["labels"]["severity"] == "critical"
        assert a["annotations"]["runbook_url"].startswith("https://rb#gpucapteam")
    quiet = _budget_group({"budgets": TWO_TEAMS, "budgetAlerts": {"enabled": False}})
    assert quiet and not any("alert" in r for r in quiet)  # budgets stay visible as series for the dashboard


@pytest.mark.parametrize("values, complaint", [
    ({"budgets": {"research": -5}}, "research"),
    ({"budgets": {"research": "20k"}}, "research"),
    ({"budgetAlerts": {"projectedRatio": 0}}, "projectedRatio"),
    ({"budgetAlerts": {"for": "an hour"}}, "for"),
    ({"budgetAlert": {"for": "1h"}}, "budgetAlert"),
])
def test_schema_rejects_bad_budget_values(values: dict[str, Any], complaint: str) -> None:
    from tests.test_helm import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=complaint):
        _render(values)


def test_the_agent_accepts_the_rendered_budgets(tmp_path: Path) -> None:
    """The chart's budgets reach the agent as cost.budgets, in a config check-config accepts."""
    objects = _render({"budgets": TWO_TEAMS, "config": {"cost": {"focus": {"provider_name": "AWS"}}}})
    cm = next(o for (k, _), o in objects.items() if k == "ConfigMap" and "config.yaml" in o["data"])
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = config_from_dict(yaml.safe_load(path.read_text()), str(path))
    assert cfg.cost.budget_map() == {"research": 20000.0, "serving": 5000.0}
    assert cfg.cost.focus.provider_name == "AWS"


# -- config: cost.budgets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cost, complaint", [
    ({"budgets": {"research": -1}}, "cost.budgets.research: expected monthly dollars, a number > 0, got -1"),
    ({"budgets": {"research": "lots"}}, "cost.budgets.research: expected monthly dollars"),
    ({"budgets": [20000]}, "cost.budgets: expected a mapping"),
    ({"budgts": {}}, "did you mean 'budgets'"),
    ({"focus": {"billing_currency": "dollars"}}, "cost.focus.billing_currency: expected an ISO 4217 currency code"),
])
def test_bad_cost_config_names_key_value_and_expectation(cost: dict[str, Any], complaint: str) -> None:
    with pytest.raises(InputError, match=complaint.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        config_from_dict({"cost": cost}, "gpucap.yaml")


def test_bad_budget_exits_2_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "gpucap.yaml"
    path.write_text("cost:\n  budgets:\n    research: -20000\n")
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "cost.budgets.research" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


# -- gpucap cost: budget, month to date, projection per team ----------------------------------------------

class _Report:
    """The parts of agent.cost.CostReport that budgets read."""

    def __init__(self, start: float, end: float, rows: list[dict[str, Any]], observed_hours: float,
                 nodes: int = 1) -> None:
        self.start, self.end, self.rows = start, end, rows
        self.observed_seconds = {f"n{i}": observed_hours * 3600.0 for i in range(nodes)}


NOV = dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()  # a 30-day month
DAY = 86400.0


def _rows(**spend: tuple[float, float]) -> list[dict[str, Any]]:
    """team=(active dollars, idle reserved dollars) → report rows by team and state."""
    out = []
    for team, (active, idle) in spend.items():
        out.append({"team": team, "state": "active", "gpu_hours": 0.0, "cost_dollars": active})
        out.append({"team": team, "state": "idle_reserved", "gpu_hours": 0.0, "cost_dollars": idle})
    return out


def test_projection_is_month_to_date_plus_the_observed_rate_over_the_hours_left() -> None:
    # ten days into November: research spent $8,000 (of which $1,000 idle), serving $1,000
    report = _Report(NOV, NOV + 10 * DAY, _rows(research=(7000.0, 1000.0), serving=(900.0, 100.0),
                                                 adhoc=(50.0, 0.0)), observed_hours=240.0)
    st = budget_status(report, {"research": 20000, "serving": 5000, "newteam": 1000})
    lines = {x.team: x for x in st.lines}
    assert st.month == "2026-11" and st.hours_left == pytest.approx(480.0)
    assert lines["research"].month_to_date == pytest.approx(8000.0)
    assert lines["research"].idle_reserved == pytest.approx(1000.0)
    assert lines["research"].projected == pytest.approx(24000.0)  # $800/day × 30 days
    assert lines["research"].status == "projected_over"
    assert lines["serving"].projected == pytest.approx(3000.0) and lines["serving"].status == "ok"
    assert lines["newteam"].month_to_date == 0.0 and lines["newteam"].status == "ok"
    assert st.unbudgeted_dollars == pytest.approx(50.0)
    text = "\n".join(budget_lines(report, (("research", 20000.0), ("serving", 5000.0))))
    assert "BUDGETS 2026-11" in text
    research = next(line for line in text.splitlines() if line.startswith("research"))
    assert "$20,000" in research and "$8,000" in research and "$24,000" in research
    assert "120%" in research and "PROJECTED OVER" in research
    assert "(no budget)" in text and "$50" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_hours_not_observed_are_not_guessed() -> None:
    """The agent ran 5 of the 10 days: the rate is over the 5 observed days, month to date is what was booked."""
    report = _Report(NOV, NOV + 10 * DAY, _rows(research=(5000.0, 0.0)), observed_hours=120.0)
    [line] = budget_status(report, {"research": 20000}).lines
    assert line.month_to_date == pytest.approx(5000.0)
    assert line.projected == pytest.approx(5000.0 + 1000.0 * 20)  # $1,000/observed day over 20 days left


def test_over_budget_already_and_near_budget() -> None:
    report = _Report(NOV, NOV + 29 * DAY, _rows(research=(21000.0, 0.0), serving=(4400.0, 0.0)), 696.0)
    status = {x.team: x.status for x in budget_status(report, {"research": 20000, "serving": 5000}).lines}
    assert status == {"research": "over", "serving": "near"}


def test_a_window_across_two_months_is_not_compared() -> None:
    report = _Report(NOV - 5 * DAY, NOV + 5 * DAY, _rows(research=(1.0, 0.0)), 240.0)
    text = "\n".join(budget_lines(report, {"research": 20000}))
    assert "not compared" in text and "--month 2026-11" in text
    no_team = _Report(NOV, NOV + DAY, [{"namespace": "ml", "state": "active", "gpu_hours": 1.0, "cost_dollars": 1.0}],
                      24.0)
    assert "add team to --by" in "\n".join(budget_lines(no_team, {"research": 20000}))


def test_month_windows() -> None:
    assert month_bounds(NOV + 3 * DAY) == (NOV, NOV + 30 * DAY)
    dec = NOV + 30 * DAY
    assert month_to_date_window(dec) == (NOV, dec)  # a --month 2026-11 report ends on Dec 1
    assert month_to_date_window(dec + 3600) == (dec, dec + 3600)


def test_the_documented_cost_section_is_the_default() -> None:
    """docs/configuration.md's `cost:` block is a valid config equal to the defaults it claims."""
    import re

    from agent.config import CostConfig

    text = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(r"```yaml\n(cost:\n.*?)```", text, re.DOTALL)
    assert block is not None
    assert config_from_dict(yaml.safe_load(block.group(1)), "docs").cost == CostConfig()


def test_gpucap_cost_compares_the_month_to_date_whatever_the_window(tmp_path: Path) -> None:
    """A 36-hour report from Nov 30 to Dec 2 still says where each team stands in December: the
    budget block reads the ledger again for the month so far (one day), not the report's window."""
    from click.testing import CliRunner

    from agent.cli import main

    cfg = tmp_path / "budgets.yaml"
    cfg.write_text("cost:\n  budgets:\n    research: 3000\n    ml-platform: 20000\n")
    dec = NOV + 30 * DAY
    ledger = tmp_path / "sim.db"  # simulated once (36 h from Nov 30 12:00), then read twice
    sim = CliRunner().invoke(main, ["cost", "--simulate", "demo", "--window", "36h", "--start", str(dec - 0.5 * DAY),
                                    "--history", str(ledger), "--config", str(cfg)])
    assert sim.exit_code == 0, sim.output
    args = ["cost", "--history", str(ledger), "--window", "36h", "--config", str(cfg)]
    res = CliRunner().invoke(main, args + ["--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    budget = data["budgets"]
    assert budget["month"] == "2026-12" and budget["problem"] is None
    assert budget["observed_hours"] == pytest.approx(24.0, abs=0.1)
    research = next(t for t in budget["teams"] if t["team"] == "research")
    # the notebook team holds 2 idle GPUs: one December day of them, not three days of the window
    assert research["month_to_date_dollars"] == pytest.approx(24 * 2 * 55.04 / 8, rel=0.01)
    assert research["idle_reserved_dollars"] == pytest.approx(research["month_to_date_dollars"])
    assert research["status"] == "projected_over"  # $330/day × 31 days > $3,000
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and "BUDGETS 2026-12" in table.output and "not compared" not in table.output
