"""The `gpucap` command as a user meets it: what `snapshot` prints, and how bad input is refused.

Commands run in-process through click's CliRunner (real simulated node: gRPC kubelet on a temp
socket, HTTP inference endpoints on loopback); one test runs the installed `gpucap` entry point in a
subprocess, on this machine's real (absent) NVIDIA driver.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from agent.cli import main
from tests.helpers import has_nvidia_driver

PROMTOOL = shutil.which("promtool")
# No GPUCAP_* setting from the developer's shell may leak into a test.
CLEAN_ENV: dict[str, str | None] = {k: None for k in os.environ if k.startswith("GPUCAP_")}

TOP_KEYS = {"time", "node", "units", "workloads", "inference", "summary"}
NODE_KEYS = {"name", "instance_type", "capacity_type", "labels"}
UNIT_KEYS = {"gpu", "gpu_instance", "mig_profile", "uuid", "model", "up", "activity", "memory_used_bytes",
             "memory_total_bytes", "state", "hourly_price_dollars", "price_source", "allocations"}
ALLOCATION_KEYS = {"namespace", "pod", "container", "workload_kind", "workload", "team", "ratio"}
INFERENCE_KEYS = {"namespace", "pod", "workload", "team", "server", "model", "queue_requests", "running_requests",
                  "kv_cache_usage_ratio", "saturated", "cost_per_1k_successful_requests_dollars",
                  "cost_per_million_generated_tokens_dollars"}
STATES = {"active", "idle_reserved", "unallocated"}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`gpucap` configures the root logger for its own stderr; give other tests theirs back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def gpucap(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={**CLEAN_ENV, **(env or {})})


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result.stdout


def table_rows(text: str) -> list[str]:
    """Unit rows of the snapshot table: they start with the GPU index."""
    return [line for line in text.splitlines() if re.match(r"^\d+(/\S+)?(::\d+)?\s", line)]


# --- snapshot -----------------------------------------------------------------------------------

def test_snapshot_of_demo_shows_eight_h100s() -> None:
    rows = table_rows(ok(gpucap("snapshot", "--simulate", "demo")))
    assert len(rows) == 8
    assert [r.split()[0] for r in rows] == [str(i) for i in range(8)]
    assert all("active" in r or "unallocated" in r for r in rows)


def test_simulate_can_come_from_the_environment() -> None:
    out = ok(gpucap("snapshot", env={"GPUCAP_SIMULATE": "demo", "GPUCAP_FORMAT": "json"}))
    doc = json.loads(out)
    assert doc["node"]["name"] == "gpu-node-a1" and len(doc["units"]) == 8


def test_snapshot_json_of_mig_has_the_fixed_keys_and_the_mig_instances() -> None:
    doc = json.loads(ok(gpucap("snapshot", "--simulate", "mig", "--format", "json")))
    assert TOP_KEYS <= doc.keys()
    assert dt.datetime.fromisoformat(doc["time"]).tzinfo is not None
    assert NODE_KEYS <= doc["node"].keys()
    assert (doc["node"]["name"], doc["node"]["instance_type"], doc["node"]["capacity_type"]) == (
        "gpu-node-mig1", "p5.48xlarge", "on-demand")
    assert doc["node"]["labels"]["nvidia.com/mig.strategy"] == "mixed"
    assert isinstance(doc["summary"], dict) and isinstance(doc["workloads"], list)
    for u in doc["units"]:
        assert UNIT_KEYS <= u.keys(), UNIT_KEYS - u.keys()
        assert u["state"] in STATES
        assert u["activity"] is None or 0.0 <= u["activity"] <= 1.0
        assert u["hourly_price_dollars"] > 0 and u["price_source"]
        for a in u["allocations"]:
            assert ALLOCATION_KEYS <= a.keys(), ALLOCATION_KEYS - a.keys()
            assert 0 < a["ratio"] <= 1
    instances = [u for u in doc["units"] if u["uuid"].startswith("MIG-")]
    by_gpu: dict[int, list[str]] = {}
    for u in instances:
        assert u["gpu_instance"] not in ("", None)
        by_gpu.setdefault(u["gpu"], []).append(u["mig_profile"])
    assert by_gpu == {0: ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], 1: ["1g.10gb"] * 6}
    full = [u for u in doc["units"] if u["uuid"].startswith("GPU-") and not u["mig_profile"]]
    assert sorted(u["gpu"] for u in full) == [2, 3, 4, 5, 6, 7]
    rerank = next(u for u in instances if u["mig_profile"] == "3g.40gb")
    assert [(a["namespace"], a["workload"], a["team"]) for a in rerank["allocations"]] == [
        ("serving", "rerank-7b", "ml-platform")]
    assert doc["inference"], "the triton server on the 3g.40gb slice"
    for i in doc["inference"]:
        assert INFERENCE_KEYS <= i.keys(), INFERENCE_KEYS - i.keys()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'); CI installs it")
@pytest.mark.parametrize("scenario", ["demo", "mig", "timeslice"])
def test_snapshot_prometheus_output_passes_promtool(scenario: str) -> None:
    text = ok(gpucap("snapshot", "--simulate", scenario, "--format", "prometheus"))
    assert "gpucap_gpu_up{" in text
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=60, check=False)
    assert (check.returncode, check.stdout + check.stderr) == (0, "")


def test_lost_gpu_is_down_and_the_other_seven_still_report() -> None:
    doc = json.loads(ok(gpucap("snapshot", "--simulate", "demo-lost-gpu", "--at", "20m", "--format", "json")))
    up = {u["gpu"]: u["up"] for u in doc["units"]}
    assert up == {i: i != 5 for i in range(8)}
    assert doc["summary"]["gpus_up"] == 7
    text = ok(gpucap("snapshot", "--simulate", "demo-lost-gpu", "--at", "20m", "--format", "prometheus"))
    samples = {s.labels["gpu"]: s.value for f in text_string_to_metric_families(text) if f.name == "gpucap_gpu_up"
               for s in f.samples}
    assert samples == {str(i): (0.0 if i == 5 else 1.0) for i in range(8)}


def test_scenarios_lists_the_built_ins() -> None:
    names = {line.split()[0] for line in ok(gpucap("scenarios")).splitlines() if line.strip()}
    assert {"demo", "mig", "timeslice"} <= names


# --- bad input: exit 2, the file and the key named, no traceback --------------------------------

SCENARIO_HEAD = "name: bad\ngpus: {model: H100-SXM-80GB, count: 8"
BAD_CONFIGS = {
    "unknown-config-key": ("idel:\n  threshold: 0.1\n", "idel"),
    "wrong-type": ("idle:\n  threshold: high\n", "idle.threshold"),
    "negative-threshold": ("idle:\n  threshold: -0.1\n", "idle.threshold"),
    "bad-duration": ("idle:\n  window: 30 minutes\n", "idle.window"),
    "bad-pricing-value": ("pricing:\n  default_gpu_hourly: -1\n", "pricing.default_gpu_hourly"),
    "bad-yaml": ("idle:\n  threshold: [0.1\n", "valid YAML"),
}
BAD_SCENARIOS = {
    "unknown-scenario-key": (SCENARIO_HEAD + ", colour: red}\n", "gpus.colour"),
    "mig-layout-does-not-fit": (SCENARIO_HEAD + ", mig: {0: [7g.80gb, 1g.10gb]}}\n", "gpus.mig.0"),
    "mig-profile-not-on-model": (SCENARIO_HEAD + ", mig: {0: [3g.20gb]}}\n", "gpus.mig.0[0]"),
    "negative-load-level": (
        SCENARIO_HEAD + "}\npods:\n  - name: p\n"
        "    containers: [{name: c, gpus: 1, load: {pattern: constant, level: -0.5}}]\n",
        "pods[0].containers[0].load.level"),
    "unknown-gpu-model": ("name: bad\ngpus: {model: H100-PCIE-999GB, count: 2}\n", "gpus.model"),
    "bad-yaml": ("name: bad\ngpus: {model: H100-SXM-80GB\n", "valid YAML"),
}


def refused(result: Result, *mentions: str) -> str:
    """Exit 2 with a one-line error naming what was wrong; never an exception escaping to the user."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for m in mentions:
        assert m in result.output, f"{m!r} not in {result.output!r}"
    return result.output


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_naming_file_and_key(case: str, tmp_path: Path) -> None:
    text, key = BAD_CONFIGS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    out = refused(gpucap("check-config", str(path)), str(path), key)
    assert "expected" in out or "unknown key" in out
    assert out.startswith("gpucap: error: ")
    refused(gpucap("snapshot", "--config", str(path), "--simulate", "demo"), str(path), key)


def test_run_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("idle:\n  threshold: 2\n")
    refused(gpucap("run", "--config", str(path), "--simulate", "demo", "--listen", "127.0.0.1:0"),
            str(path), "idle.threshold", "between 0 and 1")


@pytest.mark.parametrize("case", sorted(BAD_SCENARIOS))
def test_bad_scenario_exits_2_naming_file_and_key(case: str, tmp_path: Path) -> None:
    text, key = BAD_SCENARIOS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    out = refused(gpucap("snapshot", "--simulate", str(path)), str(path), key)
    assert "expected" in out or "unknown key" in out
    refused(gpucap("check-scenario", str(path)), str(path), key)


def test_missing_files_exit_2_naming_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.yaml")
    refused(gpucap("check-config", missing), missing)
    refused(gpucap("snapshot", "--config", missing, "--simulate", "demo"), missing)
    refused(gpucap("snapshot", "--simulate", missing), missing)


def test_unknown_builtin_scenario_exits_2_listing_the_built_ins() -> None:
    refused(gpucap("snapshot", "--simulate", "deom"), "deom", "demo", "mig", "timeslice")


def test_at_needs_simulate_and_a_duration() -> None:
    refused(gpucap("snapshot", "--at", "45m"), "--simulate")
    refused(gpucap("snapshot", "--simulate", "demo", "--at", "soon"), "duration")
    # a bare number is not silently seconds: the hint names the units
    refused(gpucap("snapshot", "--simulate", "demo", "--at", "45"), "'45' has no unit", "45m")
    refused(gpucap("cost", "--simulate", "demo", "--window", "7"), "'7' has no unit", "7d")


# --- the installed entry point, on this machine's real NVML -------------------------------------



def _entry_point() -> str:
    local = Path(sys.executable).parent / "gpucap"
    found = str(local) if local.exists() else shutil.which("gpucap")
    assert found, "the gpucap console script is not installed (pip install -e .)"
    return found


@pytest.mark.skipif(has_nvidia_driver(), reason="this machine has an NVIDIA driver")
def test_installed_gpucap_without_a_driver_exits_1_and_suggests_the_simulator(tmp_path: Path) -> None:
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("GPUCAP_")}
    env["KUBECONFIG"] = str(tmp_path / "no-kubeconfig")  # nothing to reach: this is about NVML
    result = subprocess.run([_entry_point(), "snapshot"], capture_output=True, text=True, timeout=60,
                            env=env, cwd=tmp_path, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "no NVIDIA driver" in out and "--simulate demo" in out
    assert "Traceback" not in out
