"""What a person sees at a terminal: tables that fit, no escape codes in pipes, failures in sight.

The 80-column checks run twice: through `COLUMNS=80` (how most terminals, CI and `watch` tell a
program their width) and in a real 80-column tmux pane, where the program sees a TTY and must find the
width itself. "Fits" means no line longer than the pane, i.e. nothing wraps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ESC = re.compile(r"\x1b\[")
# the subprocesses get a clean environment: no GPUCAP_* setting or width from the developer's shell
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("GPUCAP_") and k not in ("COLUMNS", "NO_COLOR")}


def gpucap(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed command as a user runs it, its stdout a pipe (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], check=False, capture_output=True, text=True, cwd=REPO,
                          env={**BASE_ENV, **env}, timeout=120)


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def too_long(text: str, width: int) -> list[str]:
    return [line for line in text.splitlines() if len(line) > width]


def test_snapshot_fits_80_columns_with_the_first_columns() -> None:
    out = ok(gpucap("snapshot", "--simulate", "demo", COLUMNS="80"))
    assert too_long(out, 80) == []
    header = next(line for line in out.splitlines() if line.startswith("GPU"))
    assert header.split() == ["GPU", "STATE", "HELD", "BY", "TEAM", "ACT", "MEM", "$/H"]
    assert "catalog_instance_type" in out and out.count("catalog_instance_type") == 1  # said once, not per row
    assert "serving/notebook" not in out and "research/notebook-alice" in out
    assert "yes (queue+kv)" in out  # warm start: the saturated vLLM is saturated on the first screen


def test_mig_table_fits_and_free_slices_sort_last() -> None:
    out = ok(gpucap("snapshot", "--simulate", "mig", COLUMNS="80"))
    assert too_long(out, 80) == []
    gpu1 = [line.split()[0] for line in out.splitlines() if line.startswith("1/")]
    assert gpu1[-1] == "1/free" and gpu1[0] == "1/gi1"
    wide = ok(gpucap("snapshot", "--simulate", "mig", "--wide"))
    row = next(line for line in wide.splitlines() if line.startswith("0/gi1 "))
    assert "H100 80GB HBM3" in row and "3g.40gb" in row  # model and profile each in their own column


def test_wide_shows_every_column() -> None:
    out = ok(gpucap("snapshot", "--simulate", "demo", "--wide", COLUMNS="80"))
    header = next(line for line in out.splitlines() if line.startswith("GPU"))
    for column in ("GPU", "MODEL", "PROFILE", "STATE", "ACTIVITY", "UTIL", "SM", "MEM GiB", "POWER", "POD",
                   "KIND", "WORKLOAD", "TEAM", "$/H", "$/MONTH", "PRICE SOURCE", "UUID"):
        assert column in header, column
    assert "training/finetune-llama-8b-0-worker-0" in out and "…" not in out  # nothing is cut
    for column in ("RUNNING", "REQ/S", "$/1M TOK", "URL"):
        assert column in out


def test_filters_sort_and_no_headers() -> None:
    out = ok(gpucap("snapshot", "--simulate", "demo", "--filter", "team=research"))
    rows = [line for line in out.splitlines() if re.match(r"^\d ", line)]
    assert len(rows) == 2 and all("research" in r for r in rows)
    assert "showing 2 of 8 units (team=research)" in out
    free = ok(gpucap("snapshot", "--simulate", "demo", "--no-headers", "--filter", "state=unallocated"))
    assert free.splitlines() == [free.splitlines()[0]] and free.split()[0] == "7"
    by_activity = ok(gpucap("snapshot", "--simulate", "demo", "--no-headers", "--sort", "activity"))
    assert [line.split()[0] for line in by_activity.splitlines()][:4] == ["2", "4", "5", "6"]  # busiest first


def test_a_bad_filter_names_the_value_and_the_choices() -> None:
    p = gpucap("snapshot", "--simulate", "demo", "--filter", "tema=research")
    assert p.returncode == 2
    assert "'tema'" in p.stderr and "did you mean 'team'" in p.stderr and "Traceback" not in p.stderr
    p = gpucap("snapshot", "--simulate", "demo", "--filter", "state=sleeping")
    assert p.returncode == 2 and "'sleeping'" in p.stderr and "idle_reserved" in p.stderr


@pytest.mark.parametrize("env", [{}, {"NO_COLOR": "1"}])
def test_piped_and_no_color_output_has_no_escape_codes(env: dict[str, str]) -> None:
    out = ok(gpucap("snapshot", "--simulate", "demo-lost-gpu", "--at", "20m", **env))
    assert "GPU LOST" in out and not ESC.search(out)


def test_no_color_on_a_terminal_has_no_escape_codes() -> None:
    """A TTY would get colour; NO_COLOR wins (the check that colour is there at all is the tmux test)."""
    from agent.tables import Out

    class Tty:
        def isatty(self) -> bool:
            return True

    os.environ["NO_COLOR"] = "1"
    try:
        assert Out.detect(stream=Tty()).colour is False
    finally:
        del os.environ["NO_COLOR"]
    assert Out.detect(stream=Tty()).colour is True


def test_a_refused_inference_target_is_in_the_footer_and_in_json(tmp_path: Path) -> None:
    closed = _closed_port()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("inference:\n  targets:\n"
                   f"    - {{url: 'http://user:s3cret@127.0.0.1:{closed}/metrics?token=abc', namespace: serving, "
                   "pod: my-llm-0}\n")
    out = ok(gpucap("snapshot", "--simulate", "demo", "--config", str(cfg), COLUMNS="80"))
    assert too_long(out, 80) == []
    footer = out[out.index("sources:"):]
    assert "inference serving/my-llm-0: connection" in footer
    assert f"127.0.0.1:{closed}/metrics" in footer and "refused" in footer.lower()
    assert "s3cret" not in out and "token=abc" not in out
    data = json.loads(ok(gpucap("snapshot", "--simulate", "demo", "--config", str(cfg), "--format", "json")))
    bad = [t for t in data["targets"] if not t["ok"]]
    assert len(bad) == 1
    assert bad[0]["pod"] == "my-llm-0" and bad[0]["error_kind"] == "connection" and bad[0]["failing_since"]
    assert bad[0]["url"].endswith(f"127.0.0.1:{closed}/metrics") and "s3cret" not in json.dumps(data)
    assert "token=abc" not in json.dumps(data)
    inference = next(c for c in data["collectors"] if c["name"] == "inference")
    assert inference["targets_failing"] == 1  # "success" alone would hide it: the other targets answer
    assert all(t["ok"] for t in data["targets"] if t["pod"] != "my-llm-0")


def test_xid_history_and_unattributed_use_per_gpu() -> None:
    lost = json.loads(ok(gpucap("snapshot", "--simulate", "demo-lost-gpu", "--at", "20m", "--format", "json")))
    gpu5 = next(u for u in lost["units"] if u["gpu"] == 5)
    assert {"xid": 79, "count": 1} in gpu5["xid_errors"]
    table = ok(gpucap("snapshot", "--simulate", "demo-lost-gpu", "--at", "20m"))
    assert "GPU 5: Xid 79 x1 (GPU has fallen off the bus)" in table
    shared = ok(gpucap("snapshot", "--simulate", "timeslice", COLUMNS="80"))
    assert re.search(r"GPU 0: \d+% activity and [\d.]+ GiB used by processes\s+outside any pod", shared)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (Debian package tmux)")
def test_snapshot_fits_a_real_80_column_tmux_pane(tmp_path: Path) -> None:
    """A real terminal: gpucap sees a TTY of 80 columns (no COLUMNS), and every line fits it."""
    sock = f"gpucap-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "done"
    env = " ".join(f"{k}={v}" for k, v in {"TERM": "xterm-256color"}.items())
    cmd = (f"cd {REPO} && unset COLUMNS NO_COLOR && {env} {sys.executable} -m agent.cli snapshot --simulate demo; "
           f"echo $? > {done}; sleep 60")
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "50", "sh", "-c", cmd], check=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists() and done.read_text().strip() == "0"
        width = subprocess.run([*tmux, "display", "-p", "#{pane_width}"], check=False, capture_output=True,
                               text=True).stdout
        assert width.strip() == "80"
        # -J joins wrapped lines: a line that did not fit comes back longer than 80
        joined = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-100"], capture_output=True,
                                text=True, check=True).stdout
        coloured = subprocess.run([*tmux, "capture-pane", "-p", "-e", "-S", "-100"], capture_output=True,
                                  text=True, check=True).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, capture_output=True)
    assert "GPU" in joined and "research/notebook-alice" in joined
    assert too_long(joined, 80) == []
    assert ESC.search(coloured)  # on a terminal the states are coloured


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (Debian package)")
def test_playground_fires_idle_reserved_alert_through_prometheus() -> None:
    """`gpucap playground`: a real Prometheus with the chart's rules pages on the demo's idle notebook."""
    import signal
    import urllib.request

    port = _closed_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "playground", "--speed", "150", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=BASE_ENV)
    try:
        banner = []
        while not banner or "Ctrl-C" not in banner[-1]:
            banner.append(proc.stdout.readline())  # type: ignore[union-attr]
            assert banner[-1], "".join(banner)  # the playground ended before its banner
        assert max(len(line.rstrip("\n")) for line in banner) <= 80, banner
        alerts_url = re.search(r"alerts\s+(http://\S+/alerts)", "".join(banner))
        assert alerts_url and alerts_url.group(1).startswith(f"http://127.0.0.1:{port}/"), "".join(banner)
        with urllib.request.urlopen(alerts_url.group(1), timeout=5) as r:  # the printed page opens
            assert r.status == 200 and b"<html" in r.read(2000).lower()
        deadline = time.monotonic() + 110
        firing: list[dict] = []
        while time.monotonic() < deadline and not firing:
            time.sleep(2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=2) as r:
                alerts = json.load(r)["data"]["alerts"]
            firing = [a for a in alerts if a["labels"]["alertname"] == "GpucapIdleReservedGpu"
                      and a["state"] == "firing"]
        assert firing, alerts
        assert firing[0]["labels"]["workload"] == "notebook-alice"
        # both simulated nodes run the notebook: the page sums the workload's idle dollars over the fleet
        assert re.search(r"costing \$(13\.76|27\.52)/h", firing[0]["annotations"]["summary"]), firing[0]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0


def test_shell_completion_completes_scenario_names() -> None:
    env = {**BASE_ENV, "COMP_WORDS": "gpucap snapshot --simulate de", "COMP_CWORD": "3",
           "_GPUCAP_COMPLETE": "bash_complete"}
    p = subprocess.run([sys.executable, "-c", "from agent.cli import main; main(prog_name='gpucap')"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False)
    assert "plain,demo\n" in p.stdout and "plain,demo-lost-gpu\n" in p.stdout and "mig" not in p.stdout


def test_an_installed_gpucap_finds_the_playgrounds_alert_rules(tmp_path: Path) -> None:
    """`pip install .` (not only a checkout) ships the chart's alert rules where `gpucap playground`
    looks for them: <prefix>/share/gpucap/rules, from the wheel's data files."""
    import importlib.util
    import sysconfig
    import zipfile

    from agent import playground

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here: the wheel cannot be built offline")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("gpucap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    installed = playground.RULES_CANDIDATES[1].relative_to(sysconfig.get_path("data")).as_posix()
    assert installed in shipped, shipped
    assert (REPO / "deploy/helm/gpucap/rules/gpucap-alerts.yaml").read_bytes() == \
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("share/gpucap/rules/gpucap-alerts.yaml")))


GOAWAY = """
import os, sys
os.environ.pop("GRPC_VERBOSITY", None)
import agent.cli  # the command's process: what it sets before gRPC starts
from collectors.podresources import PodResourcesCollector
from collectors.simulated.clock import SimClock
from collectors.simulated.environment import SimEnvironment
from collectors.simulated.scenario import load_scenario
env = SimEnvironment(load_scenario("demo"), SimClock(start=1767225600.0, realtime=False))
c = PodResourcesCollector(env.kubelet_socket)
c.collect(0.0)
env.kubelet.stop()  # the kubelet restarts while the agent's channel is open
import time; time.sleep(0.5)
c.close(); env.close()
print("done")
"""


def test_a_kubelet_going_away_prints_no_grpc_log_lines() -> None:
    """gRPC's core prints its INFO lines ("Got goaway ...") to stderr unless told otherwise: in a
    terminal they broke `snapshot`'s table, and on a node they flooded the log."""
    out = subprocess.run([sys.executable, "-c", GOAWAY], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "done", out.stderr
    assert "goaway" not in out.stderr.lower(), out.stderr
