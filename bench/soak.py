#!/usr/bin/env python3
"""Soak: 7 simulated days of `large` with pod churn, through the whole agent and its ledger.

The 8 vLLM servers of `large` stay; its other 48 slices each see a stream of short-lived batch pods
(about 10,000 pods created and deleted over the week, one Job each, so every pod is a new workload,
namespace label and ledger key). Every simulated 6 hours it records what must stay flat or bounded:

- series on /metrics (the real exposition of the state) against the live pods: deleted pods' series
  disappear, so the count follows the live pods, never the pods seen;
- RSS of the process (psutil), and its threads;
- the ledger's size on disk (file and WAL) against `history.max_bytes`, and that it lost no minute.

It exits 1 if a bound does not hold. Usage (about 3-6 minutes here; figures in docs/reliability.md):

    python bench/soak.py                       # 7 days, ~10,000 pods
    python bench/soak.py --days 1 --pods 1500  # a quicker look
    python bench/soak.py --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import yaml

from agent.config import Config, HistoryConfig
from agent.exposition import render
from agent.simulate import fast_forward
from agent.sources import build_runtime
from collectors.simulated.scenario import _parse, resolve

START = 1_800_000_000.0
SLOTS = 48  # the slices of `large` that are not vLLM servers


def churn_scenario(days: float, pods: int, folder: Path) -> Path:
    """`large` with its 48 batch slices turned into streams of short-lived pods (a minute apart)."""
    sc = yaml.safe_load(Path(resolve("large")).read_text())
    servers = [p for p in sc["pods"] if p.get("inference")]
    per_slot = max(1, pods // SLOTS)
    life = days * 86400.0 / per_slot
    churn = []
    for slot in range(SLOTS):
        for n in range(per_slot):
            begin = n * life + (slot * 7) % 60  # staggered, so pods do not all change in one step
            churn.append({
                "namespace": "batch" if slot % 2 else "research",
                "name": f"job-{slot}-{n}-x{n % 97:02d}",
                "owner": {"kind": "Job", "name": f"job-{slot}-{n}"},
                "start": round(begin), "end": round(begin + life - 60),
                "containers": [{"name": "main", "mig": {"1g.10gb": 1}, "memory": "4GiB",
                                "load": {"pattern": "constant", "level": 0.3 if n % 3 else 0.0}}],
            })
    sc["name"] = "large-churn"
    sc["pods"] = servers + churn
    path = folder / "large-churn.yaml"
    path.write_text(yaml.safe_dump(sc, sort_keys=False))  # kept for a look; loaded below without YAML
    return path


def load_big(path: Path) -> Any:
    """The churn scenario through the loader's own validation (`_parse`), but not through its file
    reader: 10,000 pods are more values than a scenario *file* may hold (200,000, a cap against
    hostile files), and this one is generated here."""
    data = yaml.safe_load(path.read_text())
    return _parse(data, str(path))


def _ledger_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def soak(days: float, pods: int, max_bytes: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="gpucap-soak-"))
    scenario = churn_scenario(days, pods, folder)
    ledger = str(folder / "history.db")
    config = Config(history=HistoryConfig(max_bytes=max_bytes))
    proc = psutil.Process()
    import collectors.simulated.scenario as loader

    real_load = loader.load_scenario
    loader.load_scenario = lambda name: load_big(scenario) if name == str(scenario) else real_load(name)
    try:
        rt = build_runtime(config, simulate=str(scenario), realtime=False, start=START, history=ledger)
    finally:
        loader.load_scenario = real_load
    samples: list[dict[str, Any]] = []
    next_sample = [START]
    seen_pods: set[str] = set()

    def on_state(state: Any) -> None:
        seen_pods.update(p.owner.pod for p in state.pods)
        if state.time < next_sample[0]:
            return
        next_sample[0] += 6 * 3600.0
        text = render(state)
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        samples.append({"hours": round((state.time - START) / 3600.0, 1), "live_pods": len(state.pods),
                        "series": series, "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                        "threads": threading.active_count(), "os_threads": proc.num_threads(),
                        "ledger_mib": round(_ledger_bytes(ledger) / 2**20, 2)})
        print("  ".join(f"{k} {v}" for k, v in samples[-1].items()), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        fast_forward(rt, days * 86400.0, on_state=on_state)
        rt.history.writer.wait_idle(30.0)
        dropped = rt.history.writer.dropped
        write_errors = rt.history.writer.write_errors
    finally:
        rt.close()
    wall = time.perf_counter() - t0
    return {"days": days, "pods_created": len(seen_pods), "wall_seconds": round(wall, 1), "samples": samples,
            "max_bytes_mib": round(max_bytes / 2**20, 2), "ledger_mib_final": round(_ledger_bytes(ledger) / 2**20, 2),
            "ledger_minutes_dropped": dropped, "ledger_write_errors": write_errors}


def check(result: dict[str, Any]) -> list[str]:
    """The bounds the soak must hold; [] when every one does."""
    s = result["samples"][1:]  # the first sample is start-up
    if len(s) < 2:
        return ["too few samples: run at least 12 simulated hours"]
    problems = []
    # the same live pods throughout (56 while the churn runs): the series may not grow with the pods seen
    busy = [x for x in s if x["live_pods"] == s[0]["live_pods"]]
    if max(x["series"] for x in busy) > 1.05 * min(x["series"] for x in busy) + 20:
        problems.append(f"series grow with the pods seen, not the live ones: {[x['series'] for x in busy]}")
    if s[-1]["live_pods"] < s[0]["live_pods"] and s[-1]["series"] >= s[0]["series"]:
        problems.append("deleted pods' series stayed: fewer live pods at the end, no fewer series")
    day1 = s[min(3, len(s) - 1)]["rss_mib"]
    if s[-1]["rss_mib"] > day1 * 1.15 + 5:
        problems.append(f"RSS grows: {day1} MiB after a day, {s[-1]['rss_mib']} MiB at the end")
    if max(x["os_threads"] for x in s) - min(x["os_threads"] for x in s) > 4:
        problems.append(f"threads not flat: {[x['os_threads'] for x in s]}")
    if result["ledger_minutes_dropped"] or result["ledger_write_errors"]:
        problems.append(f"the ledger lost minutes: {result['ledger_minutes_dropped']} dropped, "
                        f"{result['ledger_write_errors']} write errors")
    if max(x["ledger_mib"] for x in s) > result["max_bytes_mib"] * 1.05 + 1:
        problems.append(f"ledger reached {max(x['ledger_mib'] for x in s)} MiB, over its bound")
    if result["ledger_mib_final"] > result["max_bytes_mib"] * 1.05 + 1:
        problems.append(f"ledger {result['ledger_mib_final']} MiB over its bound {result['max_bytes_mib']} MiB")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--pods", type=int, default=10_000, help="batch pods created and deleted over the run")
    ap.add_argument("--max-mib", type=float, default=64.0,
                    help="history.max_bytes for the run (small, so the size bound is exercised)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    result = soak(args.days, args.pods, int(args.max_mib * 2**20))
    result["problems"] = check(result)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main()
