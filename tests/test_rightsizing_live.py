"""`gpucap_rightsizing_monthly_savings_dollars{action,target}`: the live agent's right-sizing per
workload, from its own ledger, off the scrape path (agent/rightsizing.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import Config, RecommendConfig
from agent.exposition import render
from agent.rightsizing import LiveRightsizing
from agent.simulate import fast_forward
from agent.sources import build_runtime
from tests.helpers import START
from tests.test_dashboard import PROMTOOL
from tests.test_prometheus import _free_port, _get, _wait

FAMILY = "gpucap_rightsizing_monthly_savings_dollars"


def _series(text: str) -> dict[str, tuple[str, str, float]]:
    """workload → (action, target, savings) from an exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(FAMILY + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[labels["workload"]] = (labels["action"], labels["target"], float(line.rsplit(" ", 1)[1]))
    return out


def test_the_metric_carries_each_workloads_action_target_and_savings(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    config = Config(recommend=RecommendConfig(window=6 * 3600.0))
    rt = build_runtime(config, simulate="demo", realtime=False, start=START, history=path)
    try:
        assert FAMILY not in render(rt.agent.evaluate_now()), "no ledger result yet: no series, not a guess"
        fast_forward(rt, 6 * 3600.0)
        rt.history.writer.wait_idle()
        live = LiveRightsizing(path, config)
        live.compute(rt.clock.now())
        rt.evaluator.rightsizing = lambda: live.latest
        text = render(rt.agent.evaluate_now())
    finally:
        rt.close()
    got = _series(text)
    assert got["notebook-alice"] == ("release", "none", pytest.approx(2 * 6.88 * 730, rel=1e-3))
    assert got["assist-llama-1b"][0] == "downsize_mig" and got["assist-llama-1b"][2] > 3000
    assert got["chat-llama-70b"][0] == "scale_up" and got["chat-llama-70b"][2] < 0
    assert got["finetune-llama-8b"][0] == "keep" and got["finetune-llama-8b"][2] == 0
    if PROMTOOL:
        res = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stdout + res.stderr


def test_a_broken_ledger_keeps_the_last_result(tmp_path: Path) -> None:
    live = LiveRightsizing(str(tmp_path / "missing.db"), Config())
    live.latest = (((("namespace", "ns"), ("workload", "w")), "release", "none", 5.0),)
    assert live.compute(START) == live.latest


def test_a_running_agent_serves_the_metric_from_its_ledger(tmp_path: Path) -> None:
    cfg = tmp_path / "gpucap.yaml"
    cfg.write_text("recommend:\n  window: 1h\n")  # the default hourly refresh; a new ledger is retried every 10m
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from agent.cli import main; main()", "run", "--simulate", "demo", "--speed", "600",
         "--listen", f"127.0.0.1:{port}", "--config", str(cfg), "--history", str(tmp_path / "h.db")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # refreshed every 10 simulated minutes: the first result may predate the pods' owner metadata
        # (its minutes name the pod), a later one names the workloads
        got = _wait(lambda: {"notebook-alice", "chat-llama-70b"} <= set(
            _series(_get(f"http://127.0.0.1:{port}/metrics").decode())), 60, FAMILY)
    finally:
        proc.terminate()
        proc.wait(10)
    assert got
