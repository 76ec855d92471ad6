"""Issue 13's defects, one test each: hostile files, values that passed check-config and then killed
a collector, unbounded --at, secrets in every output channel, counting failures once, a changed
failure cause logged at once, dead or stalled collector threads, and shutdown while NVML hangs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.clock import WallClock
from agent.config import config_from_dict, load_config
from agent.loop import Agent, Source
from agent.model import AgentState, Attribution, NodeView
from collectors.schema import InputError
from collectors.simulated.scenario import load_scenario
from tests.helpers import collected, simulated

ROOT = Path(__file__).resolve().parent.parent
SECRET_PASSWORD, SECRET_TOKEN = "pa55w0rd-x9", "t0ps3cret-q7"
FILE_SECRET = "root:$6$SECRET-FILE-CONTENT"


def billion_laughs() -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


HOSTILE_CONFIGS = {
    "invalid-utf8": b"nvml:\n  interval: \xff\xfe10s\n",
    "deep-nesting": ("x: " + "[" * 20000 + "]" * 20000 + "\n").encode(),
    "deep-mapping": ("".join(" " * i + f"k{i}:\n" for i in range(300)) + " " * 300 + "v: 1\n").encode(),
    "huge-integer": ("inference:\n  max_bytes: " + "9" * 5000 + "\n").encode(),
    "billion-laughs": billion_laughs().encode(),
    "interval-1e308": b"nvml:\n  interval: 1.0e+308\n",
    "interval-string-digits": ("nvml:\n  interval: " + "9" * 400 + "s\n").encode(),
    "timeout-zero-ish": b"kubelet:\n  timeout: 1ms\n",
    "window-forever": b"idle:\n  window: 100000d\n",
    "catalog-dev-zero": b"pricing:\n  catalog_path: /dev/zero\n",
    "too-large": b"# " + b"x" * (5 * 2**20) + b"\n",
    "nul-bytes": b"node_name: \x00\x00\x00\n",
    "tab-garbage": b"\t\t: : : [\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_a_hostile_config_is_exit_2_naming_the_file_never_a_traceback(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(HOSTILE_CONFIGS[name])
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert lines and all(line.startswith(f"gpucap: error: {path}") for line in lines), result.output
    assert len(result.output) < 2000  # no 190 KB traceback, no file echoed


def test_two_pod_labels_with_one_prometheus_name_are_refused_not_silently_dropped(tmp_path: Path) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text("kubernetes:\n  pod_label_allowlist: [app.kubernetes.io/name, app_kubernetes_io/name, tier]\n")
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "kubernetes.pod_label_allowlist" in result.output and "label_app_kubernetes_io_name" in result.output
    path.write_text("kubernetes:\n  pod_label_allowlist: [app.kubernetes.io/name, tier]\n")
    assert CliRunner().invoke(main, ["check-config", str(path)]).exit_code == 0


def test_a_config_directory_or_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for p in (tmp_path, fifo):
        with pytest.raises(InputError) as e:
            load_config(str(p))
        assert str(p) in str(e.value)


def test_the_interval_that_killed_the_nvml_thread_no_longer_passes_check_config() -> None:
    with pytest.raises(InputError) as e:
        config_from_dict({"nvml": {"interval": 1.0e308}}, "cfg.yaml")
    assert str(e.value) == "cfg.yaml: nvml.interval: expected a duration between 1s and 1d, got 1e+308"
    for key, value in (("interval", "0.5s"), ("interval", "2d"), ("timeout", "2h")):
        with pytest.raises(InputError) as e:
            config_from_dict({"kubelet": {key: value}}, "cfg.yaml")
        assert f"kubelet.{key}: expected a duration between" in str(e.value)


def test_catalog_path_to_another_file_never_echoes_its_content(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text(f"{FILE_SECRET}\n{FILE_SECRET}:more\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"pricing:\n  catalog_path: {secret}\n")
    result = CliRunner().invoke(main, ["check-config", str(cfg)])
    assert result.exit_code == 2 and FILE_SECRET not in result.output and "SECRET" not in result.output


def test_extends_to_another_file_never_echoes_its_content(tmp_path: Path) -> None:
    secret = tmp_path / "shadow.yaml"
    secret.write_text(f"{FILE_SECRET}\n")
    sc = tmp_path / "sc.yaml"
    sc.write_text(f"extends: {secret}\n")
    result = CliRunner().invoke(main, ["check-scenario", str(sc)])
    assert result.exit_code == 2 and "SECRET" not in result.output, result.output
    assert str(secret) in result.output and "not a scenario" in result.output


@pytest.mark.parametrize("rows, expected", [
    ("-10,0.5\n0,0.2\n", "a time in seconds from the pod's start"),
    ("0,0.5\nnan,0.2\n", "a time in seconds from the pod's start"),
    ("0,0.5\n10,inf\n", "a non-negative, finite load"),
])
def test_a_trace_with_negative_or_infinite_times_fails_check_scenario_with_file_and_line(
        tmp_path: Path, rows: str, expected: str) -> None:
    (tmp_path / "t.csv").write_text(rows)
    sc = tmp_path / "sc.yaml"
    sc.write_text("extends: demo\npods:\n  - name: p\n"
                  "    containers: [{gpus: 1, load: {pattern: trace, file: t.csv}}]\n")
    with pytest.raises(InputError) as e:
        load_scenario(str(sc))
    assert f"{tmp_path / 't.csv'}:" in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", ("a: " + "[" * 5000 + "]" * 5000).encode(),
                                     billion_laughs().encode()])
def test_a_hostile_scenario_is_exit_2(tmp_path: Path, content: bytes) -> None:
    sc = tmp_path / "sc.yaml"
    sc.write_bytes(content)
    result = CliRunner().invoke(main, ["check-scenario", str(sc)])
    assert result.exit_code == 2 and result.output.startswith(f"gpucap: error: {sc}"), result.output


@pytest.mark.parametrize("at, message", [("91d", "at most 90d"), ("9" * 10 + "d", "at most 90d"),
                                         ("1e14d", "expected a duration"), ("9" * 400 + "d", "expected a duration")])
def test_at_is_bounded(at: str, message: str) -> None:
    result = CliRunner().invoke(main, ["snapshot", "--simulate", "demo", "--at", at])
    assert result.exit_code == 2 and message in result.output


# ------------------------------------------------------------------------------------------ secrets
def _secret_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("inference:\n  targets:\n"
                   f"    - url: http://alice:{SECRET_PASSWORD}@127.0.0.1:1/metrics?token={SECRET_TOKEN}\n"
                   "      namespace: ml\n      pod: leaky\n")
    return cfg


def test_no_secret_in_any_output_channel(tmp_path: Path) -> None:
    """Logs (text and JSON), /metrics, snapshot JSON/table/prometheus, the ledger file: grepped for
    the planted password and token."""
    cfg = _secret_config(tmp_path)
    outputs: dict[str, str] = {}
    runner = CliRunner()
    for fmt in ("json", "table", "prometheus"):
        r = runner.invoke(main, ["snapshot", "--simulate", "demo", "--config", str(cfg), "--format", fmt])
        assert r.exit_code == 0, r.output
        outputs[f"snapshot {fmt}"] = r.output
    assert "alice:***@127.0.0.1:1/metrics" in outputs["snapshot json"]
    port = _free_port()
    history = tmp_path / "history.db"
    for log_format in ("text", "json"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--simulate", "demo", "--config", str(cfg), "--listen",
             f"127.0.0.1:{port}", "--history", str(history), "--log-format", log_format, "--log-level", "debug"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        try:
            _wait_http(f"http://127.0.0.1:{port}/healthz")
            deadline = time.monotonic() + 20
            metrics = ""
            while time.monotonic() < deadline and 'collector="inference"' not in metrics:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                time.sleep(0.5)
            time.sleep(1.0)
            outputs[f"metrics {log_format}"] = metrics
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        outputs[f"log {log_format}"] = out
        assert "inference target failed" in out and "alice:***@" in out
    with sqlite3.connect(history) as db:
        outputs["ledger"] = "\n".join(line for line in db.iterdump())
    for channel, text in outputs.items():
        assert SECRET_PASSWORD not in text, channel
        assert SECRET_TOKEN not in text, channel


def test_a_bad_target_url_in_config_is_reported_without_its_password() -> None:
    with pytest.raises(InputError) as e:
        config_from_dict({"inference": {"targets": [{"url": f"ftp://bob:{SECRET_PASSWORD}@h/x?t={SECRET_TOKEN}"}]}},
                         "cfg.yaml")
    assert SECRET_PASSWORD not in str(e.value) and SECRET_TOKEN not in str(e.value)
    assert "bob:***@h/x" in str(e.value)


def test_inference_failures_are_counted_once(tmp_path: Path) -> None:
    cfg = load_config(str(_secret_config(tmp_path)))
    from dataclasses import replace

    cfg = replace(cfg, inference=replace(cfg.inference, discover=False))
    with simulated("demo", cfg) as rt:
        st = rt.agent.run_until(rt.clock, rt.clock.start + 120, 15)
        errs = {s[0]["kind"]: s[1] for s in collected(st)["gpucap_collector_errors_total"]
                if s[0]["collector"] == "inference"}
        cycles = rt.agent.sources["inference"].failures
    assert set(errs) == {"connection"}, errs  # not also an "error" for the same cycle
    assert errs["connection"] == cycles


# ------------------------------------------------------------------------------------------ the loop
def _evaluate(snap):
    return AgentState(snap.time, NodeView("n", "", "", ()), "", (), Attribution(()), (), (), (), (), snap.statuses())


class _Fails:
    def __init__(self, name: str = "src"):
        self.name, self.n = name, 0

    def collect(self, now: float):
        self.n += 1
        raise RuntimeError(f"cause {'A' if self.n < 3 else 'B'}")

    def close(self) -> None:
        pass


def test_a_changed_failure_cause_is_logged_at_once(caplog) -> None:
    agent = Agent([Source(_Fails(), interval=1.0, timeout=1.0)], _evaluate, WallClock())
    s = agent.sources["src"]
    with caplog.at_level(logging.WARNING, logger="gpucap.loop"):
        for _ in range(4):
            agent.collect_now(s, time.time())
    causes = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(causes) == 2 and "cause A" in causes[0] and "cause B" in causes[1]


class _Ok:
    name = "src"

    def __init__(self):
        self.calls = 0

    def collect(self, now: float):
        self.calls += 1
        return {"n": self.calls}

    def close(self) -> None:
        pass


class _Die(BaseException):
    """Escapes every `except Exception`: what killed the NVML thread (OverflowError in a wait) did too."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_collector_thread_is_marked_stalled_and_restarted() -> None:
    ok = _Ok()
    agent = Agent([Source(ok, interval=1.0, timeout=1.0)], _evaluate, WallClock())
    original = agent._collect_with_timeout
    killed = []

    def once_dies(s):
        if not killed:
            killed.append(1)
            raise _Die()
        original(s)

    agent._collect_with_timeout = once_dies  # type: ignore[method-assign]
    agent.start()
    try:
        s = agent.sources["src"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (s.restarts and ok.calls and s.success):  # recorded, not only called
            time.sleep(0.1)
        assert s.restarts == 1 and s.errors["stalled"] == 1
        assert ok.calls >= 1 and s.success  # collecting again after the restart
        assert agent.alive() == (True, "")
    finally:
        agent.stop()


def test_a_stalled_collector_thread_is_replaced_and_reported() -> None:
    agent = Agent([Source(_Ok(), interval=1.0, timeout=1.0)], _evaluate, WallClock())
    s = agent.sources["src"]
    agent._start_source(s)
    try:
        s._beat_by = time.monotonic() - 1  # it stopped looping
        assert agent.check_sources() == ["src"]
        st = agent.evaluate_now()
        status = next(c for c in st.collectors if c.name == "src")
        # the restarted thread may already have collected again (success 1): the stall stays counted
        assert dict(status.errors).get("stalled", 0) >= 1
        errors = {lb["kind"]: v for lb, v in collected(st)["gpucap_collector_errors_total"]}
        assert errors.get("stalled", 0) >= 1
        assert s._thread is not None and s._thread.is_alive() if hasattr(s, "_thread") else True
    finally:
        agent.stop()


def test_readiness_needs_fresh_nvml_and_kubelet_readings() -> None:
    with simulated("demo") as rt:
        assert rt.agent.ready()[0] is False  # nothing collected yet
        rt.agent.run_until(rt.clock, rt.clock.start + 20, 10)
        ok, detail = rt.agent.ready()
        assert ok and detail == "nvml ok; podresources ok"


# ------------------------------------------------------------------------------------------ signals
def _hang_scenario(tmp_path: Path) -> Path:
    sc = tmp_path / "hang.yaml"
    sc.write_text("extends: demo\nname: hang\nfaults:\n  - {kind: slow, source: nvml, delay: 120s, at: 0s}\n")
    return sc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT])
def test_any_stop_signal_exits_promptly_while_nvml_hangs_and_leaves_no_temp_dir(tmp_path: Path, sig) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--simulate", str(_hang_scenario(tmp_path)), "--listen",
         f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp)})
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz")
        assert os.listdir(tmp), "the simulation's temp dir exists while running"
        time.sleep(1.0)  # NVML's first call is now hung for 120 s
        proc.send_signal(sig)
        proc.wait(timeout=15)  # far before the hang ends (it took a SIGKILL before)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, err
    assert f"shutting down ({signal.Signals(sig).name})" in err and "Traceback" not in err
    assert os.listdir(tmp) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)
