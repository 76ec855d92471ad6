"""The README, run as written: every ```sh block, line by line, as a newcomer would type it.

So the README cannot drift from the product again. Rules, each for a reason:
- a ```yaml block whose first line is `# NAME` is the file NAME the next blocks use: it is written first;
- `pip install .` and `make test` are skipped (the suite runs inside them);
- `gpucap run` and `gpucap playground` / `make playground` are servers: started in the background,
  waited for (healthz, or the printed URLs), kept up for the block's next lines, then stopped;
- a `gpucap` subcommand that `gpucap --help` does not list is being built: its block is skipped, not
  failed, so the README can describe it before it lands (it runs from the day it exists);
- `helm install` and `kubectl` need a cluster and are skipped; other lines need their tools (promtool,
  curl) and skip without them;
- commands run in a scratch folder (with the repo's docs/ and deploy/ linked in) at COLUMNS=80, and a
  default snapshot table must fit those 80 columns.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
SERVERS = ("gpucap run", "gpucap playground", "make playground")
NEEDS_CLUSTER = ("helm install", "kubectl")


NEEDS = re.compile(r"<!-- readme-test: needs ([\w.]+) -->\s*$")


def _blocks() -> list[tuple[str, str, str, str]]:
    """(id, language, body, needed module) of every fenced block, named after the heading above it.
    `<!-- readme-test: needs agent.focus -->` (invisible on GitHub) right before a block: the block
    runs once that module exists."""
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        heading = re.findall(r"^#+ (.+)$", FENCE.sub("", text[: m.start()]), re.MULTILINE)
        name = re.sub(r"[^a-z0-9]+", "-", (heading[-1] if heading else "top").lower()).strip("-")[:40]
        needs = NEEDS.search(text[: m.start()].rstrip("\n"))
        out.append((f"{name}-{len(out)}", m.group(1), m.group(2), needs.group(1) if needs else ""))
    return out


BLOCKS = _blocks()
SH = [b for b in BLOCKS if b[1] == "sh"]


def _commands() -> set[str]:
    help_text = subprocess.run([sys.executable, "-m", "agent.cli", "--help"], capture_output=True, text=True,
                               check=True, cwd=REPO).stdout
    return set(re.findall(r"^  ([a-z][a-z-]+)\s", help_text.split("Commands:", 1)[1], re.MULTILINE))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    for name in ("docs", "deploy"):
        (d / name).symlink_to(REPO / name)
    bin_dir = d / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "gpucap"  # the code of this checkout, whatever is installed
    shim.write_text(f'#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} '
                    '-m agent.cli "$@"\n')
    shim.chmod(0o755)
    for lang, body in ((b[1], b[2]) for b in BLOCKS):
        first = body.splitlines()[0] if body.strip() else ""
        if lang == "yaml" and re.match(r"^# [\w.-]+\.ya?ml$", first):
            (d / first[2:]).write_text(body)
    return d


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCAP_") and k != "NO_COLOR"}
    env.update(COLUMNS="80", PATH=f"{workdir / 'bin'}{os.pathsep}{os.path.dirname(sys.executable)}"
               f"{os.pathsep}{env.get('PATH', '')}")
    return env


def _lines(body: str) -> list[str]:
    return [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _tools(line: str) -> list[str]:
    """The programs a line runs (first word of each pipeline stage)."""
    stages = re.split(r"\|\||&&|[|;&]", re.sub(r"\$\(.*?\)", "", line))
    return [s.split()[0] for s in stages if s.split() and "=" not in s.split()[0]]


def _start_server(line: str, workdir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=workdir, env=_env(workdir), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return _wait_server(proc, line)
    except BaseException:  # a server that did not come up must not outlive the test (nor hold its port)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        raise


def _wait_server(proc: subprocess.Popen[str], line: str) -> tuple[subprocess.Popen[str], str]:
    deadline = time.monotonic() + 90
    if "playground" in line:
        seen = ""
        while time.monotonic() < deadline and "/alerts" not in seen:
            seen += proc.stdout.readline()  # type: ignore[union-attr]
            if proc.poll() is not None:
                break
        url = re.search(r"(http://[^/\s]+)\S*/alerts", seen)  # /alerts or /classic/alerts
        assert url, f"{line}: no URLs printed\n{seen}"
        probe = url.group(1) + "/-/ready"
    else:
        port = re.search(r"--listen \S*:(\d+)", line)
        probe = f"http://127.0.0.1:{port.group(1) if port else 9470}/healthz"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{line} exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(probe, timeout=1):
                break
        except OSError:
            time.sleep(0.3)
    else:
        raise AssertionError(f"{line}: {probe} did not answer in 90 s")
    if "gpucap run" in line:
        time.sleep(3)  # a few evaluations, so the curl that follows reads figures
    return proc, probe


def _stop(proc: subprocess.Popen[str], line: str) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{line} did not stop on Ctrl-C") from None
    out = proc.stdout.read() if proc.stdout else ""  # type: ignore[union-attr]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("block", SH, ids=[b[0] for b in SH])
def test_readme_block_runs_as_written(block: tuple[str, str, str, str], workdir: Path) -> None:
    _, _, body, needs = block
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs {needs}, not built yet")
    commands = _commands()
    lines = _lines(body)
    for line in lines:
        words = line.split()
        if words[0] == "gpucap" and len(words) > 1 and not words[1].startswith("-") and words[1] not in commands:
            pytest.skip(f"`gpucap {words[1]}` is not built yet (not in gpucap --help)")
    servers: list[tuple[subprocess.Popen[str], str]] = []
    ran = 0
    try:
        for line in lines:
            if line.startswith(("pip install", "make test")) or line.startswith(NEEDS_CLUSTER):
                continue
            missing = [t for t in _tools(line) if t not in ("eval", "cd") and shutil.which(t, path=_env(workdir)["PATH"]) is None]
            if missing:
                continue
            if line.startswith(SERVERS):
                servers.append((_start_server(line, workdir)[0], line))
                ran += 1
                continue
            p = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=workdir, env=_env(workdir),
                               capture_output=True, text=True, timeout=900, check=False)
            assert p.returncode == 0, f"{line}\nexit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            assert "Traceback" not in p.stderr, p.stderr[-3000:]
            if words_are_default_table(line):
                long = [x for x in p.stdout.splitlines() if len(x) > 80]
                assert not long, f"{line}: lines wider than 80 columns:\n" + "\n".join(long)
            ran += 1
    finally:
        for proc, line in servers:
            _stop(proc, line)
    if not ran:
        pytest.skip("every line of this block needs a cluster or a tool that is not installed")


def words_are_default_table(line: str) -> bool:
    first = line.split("|")[0].split("#")[0]
    return first.startswith("gpucap snapshot") and "--format" not in first and "--wide" not in first


def test_readme_examples_say_what_they_show(workdir: Path) -> None:
    """The SRE path's promise: the idle notebook, its team and its monthly dollars."""
    p = subprocess.run(["bash", "-c", "gpucap snapshot --simulate demo --at 45m --filter state=idle_reserved"],
                       cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300, check=True)
    assert "research/notebook-alice" in p.stdout and "idle reserved" in p.stdout
    assert re.search(r"idle reserved: 2 units, \$13\.76/h, \$10,044\.80/month", p.stdout), p.stdout


def test_alert_runbook_urls_point_at_existing_sections() -> None:
    """Each alert's runbook_url lands on its own section of docs/alerts.md (GitHub's heading anchors)."""
    import yaml

    doc = (REPO / "docs" / "alerts.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", doc, re.MULTILINE)}
    rules = yaml.safe_load((REPO / "deploy/helm/gpucap/rules/gpucap-alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            url = rule["annotations"].get("runbook_url", "")
            assert url.split("#")[0].endswith("docs/alerts.md"), rule["alert"]
            assert url.split("#")[1] == rule["alert"].lower() and url.split("#")[1] in anchors, url
