"""The ledger (issue 10): per-minute history that reconciles exactly, survives restarts, SIGKILL, full and
corrupt disks, books a confirmed idle streak as idle from its first idle sample, and feeds `gpucap cost`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import Config, HistoryConfig
from agent.cost import report_from_history
from agent.history import History
from agent.model import STATES
from agent.sources import build_runtime
from tests.helpers import START, builtin_scenario, collected, total, write_scenario

H100 = 55.04 / 8


def _run(scenario: str, path: str, seconds: float, start: float = START, config: Config | None = None,
         step: float = 10.0):
    rt = build_runtime(config or Config(), simulate=scenario, realtime=False, start=start, history=path)
    try:
        st = rt.agent.run_until(rt.clock, start + seconds, step)
        m = collected(st)
    finally:
        rt.close()
    return m


def _by_state(rows) -> dict[str, float]:
    out = dict.fromkeys(STATES, 0.0)
    for r in rows:
        out[r.state] += r.dollars
    return out


def churn_scenario(tmp_path: Path) -> str:
    sc = builtin_scenario("demo")
    sc["name"] = "churn"
    sc["pods"][0]["end"] = "17m"  # the notebook leaves at an odd time
    sc["pods"].append({"namespace": "research", "name": "late-nb", "owner": {"kind": "Pod"},
                       "labels": {"team": "research", "gpucap.io/feature": "search"}, "start": 2473,
                       "containers": [{"name": "main", "gpus": 1, "load": {"pattern": "constant", "level": 0.5}}]})
    return write_scenario(tmp_path, "churn", sc)


@pytest.mark.parametrize("scenario", ["demo", "mig", "timeslice", "churn"])
def test_ledger_reconciles_exactly(scenario: str, tmp_path: Path) -> None:
    name = churn_scenario(tmp_path) if scenario == "churn" else scenario
    path = str(tmp_path / "h.db")
    _run(name, path, 90 * 60)
    h = History(path)
    start, end = h.span()
    rows = list(h.hour_rows(start, end))
    observed = h.observed_seconds(start, end)
    ((_node, secs),) = observed.items()
    assert secs == pytest.approx(90 * 60, abs=60)
    dollars = sum(r.dollars for r in rows)
    # every row: its own price × its own seconds; all rows: the node's price × observed hours
    assert sum(r.hourly_price * r.seconds / 3600 for r in rows) == pytest.approx(dollars, abs=1e-6)
    assert h.node_dollars(start, end) == pytest.approx(dollars, abs=1e-6)
    node_price = 55.04 if scenario != "timeslice" else None
    if node_price is not None:
        assert dollars == pytest.approx(node_price * secs / 3600, abs=1e-6)
    # any window: the report's rows add up to the node price × observed hours of that window
    for a, b in ((start + 600, start + 1860), (start + 17 * 60, start + 47 * 60)):
        rep = report_from_history(h, a, b, ("team", "workload"))
        assert rep.total_dollars == pytest.approx(rep.node_dollars, abs=1e-6)
    if scenario == "churn":
        pods = {r.pod for r in rows}
        assert {"notebook-alice-7d9f8-x2x9k", "late-nb"} <= pods, "a pod that existed in the window is missing"
        late = [r for r in rows if r.pod == "late-nb"]
        assert sum(r.seconds for r in late) == pytest.approx(90 * 60 - (41 * 60 + 13), abs=11)
        assert {r.feature for r in late} == {"search"}
    h.close()


def test_idle_from_the_start_is_booked_idle_once_confirmed(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    m = _run("demo", path, 2 * 3600)
    h = History(path)
    nb = [r for r in h.hour_rows(*h.span()) if r.pod.startswith("notebook")]
    by = _by_state(nb)
    assert by["idle_reserved"] == pytest.approx(2 * H100 * 2, rel=1e-9), "all of its 2 h on 2 GPUs is idle"
    assert by["active"] == pytest.approx(0.0, abs=1e-9)
    # the live counters wait for the 30 min window before they call it idle: the ledger is the record
    live_active = total(m, "gpucap_cost_dollars_total", pod="notebook-alice-7d9f8-x2x9k", state="active")
    assert live_active == pytest.approx(2 * H100 * 0.5, rel=1e-6)


def test_a_twenty_minute_lull_is_not_idle(tmp_path: Path) -> None:
    trace = tmp_path / "lull.csv"
    trace.write_text("seconds,value\n0,0.8\n600,0.0\n1800,0.8\n3600,0.8\n")
    sc = {"node": {"name": "n1", "labels": {"node.kubernetes.io/instance-type": "p5.48xlarge"}},
          "gpus": {"model": "H100-SXM-80GB", "count": 1},
          "pods": [{"namespace": "ml", "name": "trainer", "labels": {"team": "ml"},
                    "containers": [{"name": "main", "gpus": 1, "load": {"pattern": "trace", "file": str(trace)}}]}]}
    path = str(tmp_path / "h.db")
    _run(write_scenario(tmp_path, "lull", sc), path, 50 * 60)
    h = History(path)
    by = _by_state(h.hour_rows(*h.span()))
    assert by["idle_reserved"] == 0.0 and by["active"] > 0


def test_restart_continues_counters_and_reports_cover_the_window(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    first = _run("demo", path, 3600)
    before = total(first, "gpucap_cost_dollars_total", state="active", pod="finetune-llama-8b-0-worker-0")
    second = _run("demo", path, 3600, start=START + 3600)  # the agent comes back on the same node
    after = total(second, "gpucap_cost_dollars_total", state="active", pod="finetune-llama-8b-0-worker-0")
    assert before > 0 and after == pytest.approx(before * 2, rel=1e-3), "the counter continued, no reset"
    h = History(path)
    start, end = h.span()
    (secs,) = h.observed_seconds(start, end).values()
    assert secs == pytest.approx(7200, abs=30), "no gap beyond the restart itself"


def test_retention_and_size_bound(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    cfg = Config(history=HistoryConfig(retention=3600.0, max_bytes=2**30))
    _run("demo", path, 3 * 3600, config=cfg, step=60)
    h = History(path)
    start, end = h.span()
    assert end - start <= 3600 + 120, "minutes older than the retention are deleted"
    h.close()
    small = str(tmp_path / "small.db")
    _run("demo", small, 6 * 3600, config=Config(history=HistoryConfig(max_bytes=400 * 1024)), step=60)
    conn = sqlite3.connect(small)
    pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count",
                                                                             "page_size"))
    assert (pages - free) * size <= 400 * 1024
    assert conn.execute("SELECT count(*) FROM unit_minutes").fetchone()[0] > 0, "the newest minutes are kept"
    # and on disk: the file gives freed pages back (incremental vacuum), the WAL is cut back
    on_disk = sum(os.path.getsize(small + x) for x in ("", "-wal") if os.path.exists(small + x))
    assert on_disk <= 400 * 1024 * 1.05, f"file and WAL {on_disk} bytes, over the 400 KiB bound"


def test_a_fast_forward_faster_than_the_disk_loses_no_minute(tmp_path: Path, monkeypatch) -> None:
    """A simulated week produces minutes far faster than a disk writes them: the headless run waits
    for the writer (a daemon would drop and count instead, never blocking /metrics)."""
    from agent import history

    monkeypatch.setattr(history, "QUEUE_ITEMS", 2)
    slow = history.HistoryWriter._write

    def slower(self, batch):
        time.sleep(0.002)
        return slow(self, batch)

    monkeypatch.setattr(history.HistoryWriter, "_write", slower)
    path = str(tmp_path / "h.db")
    rt = build_runtime(Config(), simulate="demo", realtime=False, start=START, history=path)
    try:
        rt.agent.run_until(rt.clock, START + 4 * 3600, 60)
        writer = rt.history.writer
    finally:
        rt.close()
    assert writer.dropped == 0 and writer.write_errors == 0
    h = History(path)
    (secs,) = h.observed_seconds(START, START + 4 * 3600).values()
    assert secs == pytest.approx(4 * 3600, abs=120), "every simulated minute is in the ledger"
    assert h.node_dollars(START, START + 4 * 3600) == pytest.approx(55.04 * secs / 3600, rel=1e-6)


def test_a_deleted_pods_counters_are_forgotten_after_a_day(tmp_path: Path) -> None:
    """Under pod churn the ledger's counters (kept so a restart is no counter reset) hold the live pods
    and those gone less than a day, not every pod ever seen."""
    sc = builtin_scenario("demo")
    sc["pods"][0]["end"] = "20m"
    scenario = write_scenario(tmp_path, "gone", sc)
    gone = sc["pods"][0]["name"]
    path = str(tmp_path / "h.db")
    rt = build_runtime(Config(), simulate=scenario, realtime=False, start=START, history=path)
    try:
        rt.agent.run_until(rt.clock, START + 3600, 60)
        rt.history.flush()
        rt.history.writer.wait_idle()
        pods = {k[1].pod for k in rt.history.writer.restore_counters()}
        assert gone in pods, "an hour after it left, a pod's counters are still kept"
        rt.agent.run_until(rt.clock, START + 26 * 3600, 300)
        rt.history.flush()
        rt.history.writer.wait_idle()
        pods = {k[1].pod for k in rt.history.writer.restore_counters()}
    finally:
        rt.close()
    assert gone not in pods and pods, "a day after, they are gone; the live pods' stay"


def test_a_forward_wall_clock_jump_does_not_wipe_the_ledger(tmp_path: Path) -> None:
    """An RTC set ten years ahead must not make every stored minute look older than the retention."""
    path = str(tmp_path / "h.db")
    one_day = Config(history=HistoryConfig(retention=86400.0))
    rt = build_runtime(one_day, simulate="demo", realtime=False, start=START, history=path)
    try:
        rt.agent.run_until(rt.clock, START + 1800, 10)
        rt.clock.step_wall(10 * 365 * 86400.0)
        now = rt.clock.now()
        rt.agent.run_until(rt.clock, now + 3 * 3600, 60)  # hours of writes after the jump, not one batch
        rt.history.writer.wait_idle()
    finally:
        rt.close()
    h = History(path)
    assert h.observed_seconds(START, START + 1800), "the half hour before the jump is still in the ledger"
    h.close()


def test_corrupt_file_at_start_is_moved_aside(tmp_path: Path, caplog) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(b"this is not a database" * 100)
    _run("demo", str(path), 600)
    assert list(tmp_path.glob("h.db.corrupt-*")), "the unreadable file is kept aside for a person"
    h = History(str(path))
    assert h.span() is not None
    assert any("moved aside" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("failure", ["database or disk is full", "attempt to write a readonly database"])
def test_disk_full_is_counted_and_metrics_keep_serving(tmp_path: Path, failure: str) -> None:
    """A full disk or a file made read-only under the running agent (a remount)."""
    path = str(tmp_path / "h.db")
    rt = build_runtime(Config(), simulate="demo", realtime=False, start=START, history=path)
    try:
        rt.agent.run_until(rt.clock, START + 300, 10)
        writer = rt.history.writer

        class Full:
            def __init__(self, conn):
                self.conn = conn

            def __getattr__(self, name):
                return getattr(self.conn, name)

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

            def executemany(self, *a):
                raise sqlite3.OperationalError(failure)

        writer._conn = Full(writer._conn)
        st = rt.agent.run_until(rt.clock, START + 900, 10)
        rt.history.flush()
        writer.wait_idle(2.0)
        st = rt.agent.step()
        m = collected(st)
        assert total(m, "gpucap_history_write_errors_total") >= 1
        assert total(m, "gpucap_cost_dollars_total") > 0
        assert len(m["gpucap_gpu_up"]) == 8
        writer._conn = writer._conn.conn  # the disk has room again: the kept minutes are written
    finally:
        rt.close()
    h = History(path)
    (secs,) = h.observed_seconds(*h.span()).values()
    assert secs == pytest.approx(900, abs=70), "the minutes held while the disk was full were written after"


def test_unopenable_history_runs_without_a_ledger(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rt = build_runtime(Config(), simulate="demo", realtime=False, start=START,
                       history=str(blocker / "sub" / "h.db"))
    try:
        st = rt.agent.run_until(rt.clock, START + 60, 10)
        assert rt.history is None and len(st.units) == 8
    finally:
        rt.close()


def test_sigkill_mid_write_leaves_a_readable_database(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    proc = subprocess.Popen([sys.executable, "-c", "from agent.cli import main; main()", "run", "--simulate", "demo", "--speed", "600",
                             "--listen", "127.0.0.1:0", "--history", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        minutes = 0
        while time.monotonic() < deadline and minutes < 5:
            time.sleep(0.5)
            if path.exists():
                try:
                    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as c:
                        minutes = c.execute("SELECT count(DISTINCT minute) FROM node_minutes").fetchone()[0]
                except sqlite3.Error:
                    pass
        assert minutes >= 5, proc.stderr.read1().decode() if proc.poll() is not None else "no minutes written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    h = History(str(path))
    assert h.span() is not None


def test_cost_command_reconciles_and_splits_by_model(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    res = CliRunner().invoke(main, ["cost", "--simulate", "demo", "--window", "2h", "--by", "team,model",
                                    "--format", "json", "--output", str(out), "--start", str(START)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc) >= {"window", "observed_hours", "total_dollars", "rows"}
    assert doc["total_dollars"] == pytest.approx(55.04 * doc["observed_hours"], abs=0.01)
    assert sum(r["cost_dollars"] for r in doc["rows"]) == pytest.approx(doc["total_dollars"], abs=1e-4)
    models = {r["model"] for r in doc["rows"]}
    assert {"meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", ""} <= models
    chat = sum(r["cost_dollars"] for r in doc["rows"] if r["model"] == "meta-llama/Llama-3.1-70B-Instruct")
    assert chat == pytest.approx(H100 * doc["observed_hours"], rel=0.02), "one GPU's worth, counted once"
    assert all(r["cost_dollars"] >= -1e-9 for r in doc["rows"])


def test_by_unit_and_model_spreads_a_two_gpu_server_over_both_units(tmp_path: Path) -> None:
    """A tensor-parallel vLLM on 2 GPUs: each unit's model row holds that unit's dollars, none negative."""
    sc = builtin_scenario("demo")
    sc["name"] = "tp2"
    chat = next(p for p in sc["pods"] if p["name"].startswith("chat-llama-70b"))
    chat["containers"][0]["gpus"] = 2
    sc["pods"] = [p for p in sc["pods"] if not p["name"].startswith("finetune")]
    name = write_scenario(tmp_path, "tp2", sc)
    res = CliRunner().invoke(main, ["cost", "--simulate", name, "--window", "2h", "--by", "unit,model",
                                    "--format", "json", "--start", str(START)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert all(r["cost_dollars"] >= -1e-9 and r["gpu_hours"] >= -1e-9 for r in doc["rows"])
    model = "meta-llama/Llama-3.1-70B-Instruct"
    units = {r["unit"]: r["cost_dollars"] for r in doc["rows"] if r["model"] == model}
    assert len(units) == 2, "both GPUs of the server carry its model's dollars"
    for dollars in units.values():
        assert dollars == pytest.approx(H100 * doc["observed_hours"], rel=0.02)
    assert sum(r["cost_dollars"] for r in doc["rows"]) == pytest.approx(doc["total_dollars"], abs=1e-4)


def test_cost_table_reads_like_a_finops_report(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["cost", "--simulate", "demo", "--window", "1h", "--start", str(START)])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "research" in text and "IDLE RSV" in text and "(node: unallocated)" in text
    assert "= node price × observed hours" in text
    assert max(len(line) for line in text.splitlines()) <= 80, "CliRunner's width: 80 columns"


def test_cost_table_sorts_and_prints_bare_rows(tmp_path: Path) -> None:
    args = ["cost", "--simulate", "demo", "--window", "1h", "--start", str(START)]
    bare = CliRunner().invoke(main, args + ["--no-headers", "--sort", "idle"])
    assert bare.exit_code == 0, bare.output
    lines = bare.output.splitlines()
    assert lines[0].startswith("research") and lines[-1].startswith("(node: unallocated)")
    assert not any("total" in line or "TEAM" in line for line in lines)
    names = [line.split()[0] for line in CliRunner().invoke(main, args + ["--no-headers", "--sort", "name"]).output
             .splitlines() if not line.startswith("(node")]
    assert names == sorted(names)


def test_cost_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["cost", "--history", str(tmp_path / "nope.db")])
    assert r.exit_code == 2 and "no such ledger" in r.output
    r = CliRunner().invoke(main, ["cost", "--simulate", "demo", "--by", "tem"])
    assert r.exit_code == 2 and "team" in r.output
    r = CliRunner().invoke(main, ["cost", "--simulate", "demo", "--window", "120d"])
    assert r.exit_code == 2 and "90d" in r.output
    r = CliRunner().invoke(main, ["cost"])
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert os.path.exists(str(tmp_path)) and not list(tmp_path.iterdir())


def test_simulate_with_history_keeps_the_simulated_ledger_for_more_reports(tmp_path: Path) -> None:
    path = tmp_path / "week.db"
    args = ["--window", "2h", "--format", "json"]
    # simulated from now on (no --start): a later `--history` report's window ends at the ledger's end
    first = CliRunner().invoke(main, ["cost", "--simulate", "demo", "--history", str(path)] + args)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["cost", "--history", str(path)] + args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["total_dollars"] == pytest.approx(json.loads(first.output)["total_dollars"])
    recs = CliRunner().invoke(main, ["recommend", "--history", str(path), "--window", "2h", "--format", "csv"])
    assert recs.exit_code == 0 and ",release," in recs.output
    # a second simulation never goes into an existing ledger
    clash = CliRunner().invoke(main, ["cost", "--simulate", "demo", "--history", str(path)] + args)
    assert clash.exit_code == 2 and "already exists" in clash.output


def test_minutes_before_the_owner_metadata_arrived_get_the_pods_owner(tmp_path: Path) -> None:
    """The agent's first cycles (or an API outage at its start) book a pod before its owner is known:
    reports give those minutes the owner the pod has later, so a workload is not listed twice."""
    from agent.recommend import from_history

    path = str(tmp_path / "h.db")
    _run("demo", path, 3 * 3600, step=60)
    conn = sqlite3.connect(path)
    with conn:  # the first ten minutes as a restarted agent without metadata books them
        conn.execute("UPDATE unit_minutes SET workload='', workload_kind='', team='', feature='' WHERE minute < ?",
                     (START + 600,))
        conn.execute("UPDATE server_minutes SET workload='', workload_kind='', team='', feature='' WHERE minute < ?",
                     (START + 600,))
    conn.close()
    h = History(path)
    try:
        recs = from_history(h, START, START + 3 * 3600)
        first = [r for r in h.unit_minutes(START, START + 600) if r["pod"].startswith("notebook-alice")]
    finally:
        h.close()
    assert {r.workload for r in recs} == {"notebook-alice", "assist-llama-1b", "chat-llama-70b", "finetune-llama-8b"}
    assert first and all((r["workload"], r["workload_kind"], r["team"]) == ("notebook-alice", "Deployment", "research")
                         for r in first)


def test_a_ledger_that_could_not_shrink_is_converted_once_and_keeps_its_minutes(tmp_path: Path) -> None:
    """Ledgers written before incremental vacuum was really on (auto_vacuum 0) never gave freed pages
    back to the disk: opened again, they are rewritten once, with every minute kept."""
    from agent.history import open_store

    path = str(tmp_path / "old.db")
    _run("demo", path, 1800)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA auto_vacuum=NONE")
    conn.execute("VACUUM")  # as the old code left it
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    minutes = conn.execute("SELECT count(*) FROM unit_minutes").fetchone()[0]
    conn.close()
    store = open_store(path)
    try:
        assert store.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        assert store.execute("SELECT count(*) FROM unit_minutes").fetchone()[0] == minutes
    finally:
        store.close()
