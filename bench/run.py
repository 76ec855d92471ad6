#!/usr/bin/env python3
"""Measures what gpucap costs a node: CPU time per collection cycle, per evaluation, per scrape,
and resident memory, on simulated nodes of growing size. Prints medians and ratios.

    python bench/run.py            # full run (about a minute)
    python bench/run.py --quick    # fewer repetitions

Record the figures in docs/performance.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil

from agent.config import Config
from agent.exposition import render
from agent.sources import build_runtime

START = 1767225600.0
SCENARIOS = {
    "demo (8 GPUs, 6 pods)": "demo",
    "mig (8 GPUs, 10 MIG instances)": "mig",
    "timeslice (4 L4 x 4 shares)": "timeslice",
}

BIG = """
name: big
seed: 3
node: {{name: big-node, labels: {{node.kubernetes.io/instance-type: p5.48xlarge}}}}
gpus:
  model: H100-SXM-80GB
  count: 8
  mig: {mig}
namespaces: {{serving: {{labels: {{team: ml}}}}}}
pods:
{pods}
"""


def big_scenario(path: str) -> str:
    """8 H100s, all 7 x 1g.10gb MIG instances each (56 units), one pod per instance."""
    mig = "{" + ", ".join(f"{i}: [1g.10gb, 1g.10gb, 1g.10gb, 1g.10gb, 1g.10gb, 1g.10gb, 1g.10gb]" for i in range(8)) + "}"
    pods = "\n".join(
        f"  - {{namespace: serving, name: worker-{i}, owner: {{kind: Deployment, name: worker-{i % 7}}}, "
        f"containers: [{{name: main, mig: {{1g.10gb: 1}}, memory: 5GiB, load: {{pattern: constant, level: 0.3, noise: 0.1}}}}]}}"
        for i in range(56)
    )
    with open(path, "w") as f:
        f.write(BIG.format(mig=mig, pods=pods))
    return path


def cpu() -> float:
    """Process CPU time, high resolution (includes the simulated sources' server threads)."""
    return time.process_time()


def measure(simulate: str, cycles: int) -> dict[str, float]:
    rt = build_runtime(Config(), simulate=simulate, realtime=False, start=START)
    try:
        agent = rt.agent
        agent.step(rt.clock.now())
        collect, evaluate, scrape = [], [], []
        size = 0
        for _ in range(cycles):
            rt.clock.advance(10.0)
            now = rt.clock.now()
            for s in agent.sources.values():
                s.next_due = 0.0
            c0 = cpu()
            for s in agent.sources.values():
                agent.collect_now(s, now)
            c1 = cpu()
            state = agent.evaluate_now(now)
            c2 = cpu()
            text = render(state)
            c3 = cpu()
            collect.append(c1 - c0)
            evaluate.append(c2 - c1)
            scrape.append(c3 - c2)
            size = len(text)
        per_source = {name: s.duration for name, s in agent.sources.items()}
        gc.collect()
        return {
            "collect_ms": statistics.median(collect) * 1000,
            "evaluate_ms": statistics.median(evaluate) * 1000,
            "scrape_ms": statistics.median(scrape) * 1000,
            "series": sum(1 for ln in text.splitlines() if ln and not ln.startswith("#")),
            "bytes": size,
            "rss_mib": psutil.Process().memory_info().rss / 2**20,
            **{f"src_{k}_ms": v * 1000 for k, v in per_source.items()},
        }
    finally:
        rt.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cycles = 10 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        scenarios = dict(SCENARIOS)
        scenarios["big (8 GPUs, 56 MIG instances, 56 pods)"] = big_scenario(os.path.join(tmp, "big.yaml"))
        print(f"gpucap bench: {cycles} cycles per scenario, CPU time (user+sys) medians; python {sys.version.split()[0]}")
        print(f"{'scenario':44s} {'collect':>9s} {'evaluate':>9s} {'scrape':>8s} {'series':>7s} {'KiB':>6s} {'RSS MiB':>8s}")
        results = {}
        for label, sc in scenarios.items():
            r = measure(sc, cycles)
            results[label] = r
            print(f"{label:44s} {r['collect_ms']:7.2f}ms {r['evaluate_ms']:7.2f}ms {r['scrape_ms']:6.2f}ms "
                  f"{r['series']:7d} {r['bytes'] / 1024:6.0f} {r['rss_mib']:8.1f}")
        base = results["demo (8 GPUs, 6 pods)"]
        big = results["big (8 GPUs, 56 MIG instances, 56 pods)"]
        print()
        print("ratio big/demo: collect x{:.1f}, evaluate x{:.1f}, scrape x{:.1f}, series x{:.1f}".format(
            big["collect_ms"] / base["collect_ms"], big["evaluate_ms"] / base["evaluate_ms"],
            big["scrape_ms"] / base["scrape_ms"], big["series"] / base["series"]))
        print("per-source wall time of the last demo cycle (ms): " + ", ".join(
            f"{k[4:-3]} {v:.1f}" for k, v in base.items() if k.startswith("src_")))
        cyc = (base["collect_ms"] + base["evaluate_ms"]) / 1000
        print(f"demo at the default 10 s interval + one 15 s scrape: ~{(cyc / 10 + base['scrape_ms'] / 1000 / 15) * 1000:.1f} "
              "millicores (simulated sources; real NVML calls add their driver time, see docs/hardware)")


if __name__ == "__main__":
    main()
