#!/usr/bin/env python3
"""How long headless fast-forward takes: `snapshot --at`, `cost --simulate`, `recommend --simulate`.

Builds the simulated runtime as the CLI does, fast-forwards it, and prints wall and CPU seconds,
the step, the cycles and the per-source cost per cycle. The runtime's start-up (imports, servers)
is reported apart. Usage:

    python bench/simspeed.py                 # demo, 1d and 7d
    python bench/simspeed.py --days 30 --scenario demo
    python bench/simspeed.py --days 1 --step 10   # the old way: every NVML interval
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent.config import Config
from agent.simulate import default_step, fast_forward
from agent.sources import build_runtime

START = 1_800_000_000.0


def run(scenario: str, days: float, step: float | None) -> dict[str, float]:
    t0 = time.perf_counter()
    rt = build_runtime(Config(), simulate=scenario, realtime=False, start=START)
    setup = time.perf_counter() - t0
    agent = rt.agent
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    collect, evaluate = agent.collect_now, agent.evaluate_now

    def timed_collect(s, now, mono=None):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        collect(s, now, mono)
        spent[s.name] += time.perf_counter() - t
        calls[s.name] += 1

    def timed_evaluate(now=None):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        state = evaluate(now)
        spent["evaluate"] += time.perf_counter() - t
        calls["evaluate"] += 1
        return state

    agent.collect_now, agent.evaluate_now = timed_collect, timed_evaluate  # type: ignore[method-assign]
    seconds = days * 86400
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        fast_forward(rt, seconds, step=step)
    finally:
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rt.close()
    cycles = calls["evaluate"]
    per = {k: 1000 * v / max(1, cycles) for k, v in spent.items()}
    return {"setup": setup, "wall": wall, "cpu": cpu, "cycles": cycles, **{f"ms_{k}": v for k, v in per.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="demo")
    ap.add_argument("--days", type=float, action="append", help="repeatable (default: 1 and 7)")
    ap.add_argument("--step", type=float, default=None, help="seconds per cycle (default: fast-forward's own)")
    args = ap.parse_args()
    print(f"# {args.scenario}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| days | step s | cycles | setup s | wall s | CPU s | ms/cycle | per source (ms/cycle) |")
    print("|---|---|---|---|---|---|---|---|")
    for days in args.days or [1.0, 7.0]:
        step = args.step if args.step is not None else default_step(days * 86400)
        r = run(args.scenario, days, args.step)
        parts = ", ".join(f"{k[3:]} {v:.2f}" for k, v in r.items() if k.startswith("ms_"))
        print(f"| {days:g} | {step:g} | {r['cycles']:.0f} | {r['setup']:.1f} | {r['wall']:.1f} | {r['cpu']:.1f} | "
              f"{1000 * r['wall'] / max(1, r['cycles']):.2f} | {parts} |", flush=True)


if __name__ == "__main__":
    main()
