#!/usr/bin/env python3
"""What gpucap costs a node, measured on the real agent against a simulated node: simulated NVML,
the real gRPC kubelet server on a unix socket, the loopback Kubernetes API server, real HTTP
inference endpoints, and /metrics over loopback HTTP, scraped from a separate process (so the
scraper's CPU is not the agent's).

    python bench/run.py                 # full run on `large` (about 8 minutes)
    python bench/run.py --quick         # one repetition of each, shorter (about 2 minutes)
    python bench/run.py --json out.json # also write every figure

Figures (each a median over `--runs` repetitions with the min–max spread):
- scrape p50/p99 over 1000 sequential scrapes and with 10 concurrent scrapers, beside the floor:
  prometheus_client encoding the same series from static families (no state, no HTTP);
- bytes per scrape, plain and gzip; series count;
- CPU as a fraction of one core per thread group at default intervals with a scrape every 15 s,
  read from /proc/self/task/*/schedstat in nanoseconds (every thread is named, see
  agent/threads.py); simulator threads are reported apart from the agent's, and so is the CPU the
  simulated NVML spends inside the agent's NVML thread (on a node that time is the driver's);
- RSS over many cycles (virtual clock, in a fresh process), NVML calls per cycle per unit, CPU per cycle;
- the scale series (1, 8, 64, 256 units) and its slope in ms of CPU per unit.
Record the figures in docs/performance.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The image installs gpucap's runtime dependencies only. A development checkout also has the test
# extra, and `kubernetes` imports `kubernetes_validate` (with jsonschema: 3 MiB, 50 modules) whenever
# it is importable; gpucap never uses it. Blocked here so RSS is what the agent's image holds.
TEST_ONLY = ("kubernetes_validate",)
for _mod in TEST_ONLY:
    sys.modules.setdefault(_mod, None)  # type: ignore[assignment]

from agent.threads import name_native_threads

name_native_threads()  # before any thread starts, so every thread is named

_EXITED: list[tuple[int, str, float]] = []  # (native id, kernel name, CPU seconds) of threads that ended
_RECORDING = threading.Event()  # set during a CPU window only: outside one the list would grow per collection
_run = threading.Thread.run


def _counted_run(self: threading.Thread) -> None:
    """Thread.run, recording the thread's CPU when it ends: the loop starts a thread per collection
    and the simulated HTTP servers one per request, so their CPU would otherwise vanish."""
    try:
        _run(self)
    finally:
        if _RECORDING.is_set():
            with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
                _EXITED.append((threading.get_native_id(), f.read().strip(), time.thread_time()))


threading.Thread.run = _counted_run  # type: ignore[method-assign]

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from agent import exposition
from agent.config import Config
from agent.sources import build_runtime

try:  # the hardened server (agent/web.py) where present, else the exposition's own
    from agent.web import MetricsServer
except ImportError:  # pragma: no cover - older trees
    from agent.exposition import MetricsServer  # type: ignore[assignment]

START = 1767225600.0
PROMETHEUS = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
              "Accept-Encoding": "gzip"}


# --- the scraper (a separate process) -----------------------------------------------------------
def scraper(port: int, n: int, concurrency: int, every: float, prometheus: bool) -> None:
    """Scrape /metrics n times per scraper thread; print the latencies (ms) as JSON."""
    out: list[float] = []
    lock = threading.Lock()
    headers = PROMETHEUS if prometheus else {}

    def one() -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("GET", "/metrics", headers=headers)
            r = c.getresponse()
            r.read()
            c.close()
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                out.append(dt)
            if every:
                time.sleep(max(0.0, every - dt / 1000))

    threads = [threading.Thread(target=one) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out))


def scrape_from_process(port: int, n: int, concurrency: int = 1, every: float = 0.0,
                        prometheus: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--scraper", str(port), str(n),
                             str(concurrency), str(every), "1" if prometheus else "0"],
                            stdout=subprocess.PIPE, text=True)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


# --- a running agent --------------------------------------------------------------------------
class Running:
    """The agent as `gpucap run --simulate` runs it: its threads, real time, /metrics on loopback."""

    def __init__(self, scenario: str):
        self.rt = build_runtime(Config(), simulate=scenario, realtime=True, start=START)
        self.rt.agent.sources["nvml"].collector.call_clock = time.thread_time  # CPU inside NVML calls
        self.rt.agent.start()
        deadline = time.monotonic() + 60
        while self.rt.agent.state is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.server = MetricsServer("127.0.0.1", 0, lambda: self.rt.agent.state,
                                    lambda: self.rt.agent.last_evaluation_real).start()
        self.port = self.server.port

    def warm(self) -> None:
        """Past start-up: every source has run, GPM has two samples, and start-up's objects are
        frozen out of the GC (that one full collection is start-up's cost, not the steady state's)."""
        time.sleep(12.0)
        deadline = time.monotonic() + 60
        while not getattr(self.rt.agent, "gc_frozen", True) and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self.server.stop()
        self.rt.close()


def floor(state: Any, reps: int) -> list[float]:
    """prometheus_client encoding the same series from families built once: the encode floor."""
    fams = list(exposition.make_registry(lambda: state).collect())

    class Static:
        def collect(self) -> Any:
            return iter(fams)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Static())
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        generate_latest(reg)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure_scrapes(scenario: str, n: int, floor_reps: int) -> dict[str, float]:
    a = Running(scenario)
    try:
        a.warm()
        state = a.rt.agent.state
        body, _ = exposition.encode_for(state)
        gz, _ = exposition.encode_for(state, "", "gzip")
        fl = floor(state, floor_reps)
        seq = json.loads(scrape_from_process(a.port, n).communicate()[0])
        conc = json.loads(scrape_from_process(a.port, n // 10, concurrency=10).communicate()[0])
        return {
            "scrape_p50_ms": pct(seq, 0.5), "scrape_p99_ms": pct(seq, 0.99),
            "concurrent10_p50_ms": pct(conc, 0.5), "concurrent10_p99_ms": pct(conc, 0.99),
            "floor_p50_ms": pct(fl, 0.5), "floor_p99_ms": pct(fl, 0.99),
            "ratio_p99": pct(seq, 0.99) / pct(fl, 0.99),
            "bytes_plain": len(body), "bytes_gzip": len(gz),
            "series": sum(1 for ln in body.splitlines() if ln and not ln.startswith(b"#")),
        }
    finally:
        a.close()


# --- CPU per thread group ---------------------------------------------------------------------
def thread_cpu() -> dict[str, float]:
    """CPU seconds per live thread, by kernel name (tid appended so two threads never merge), from
    schedstat's nanoseconds on CPU: /proc/*/stat counts in clock ticks (10 ms), too coarse for
    threads that run a few milliseconds a minute."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
        out[f"{comm}#{tid}"] = ns / 1e9
    return out


def sim_nvml_cpu(a: Running) -> float:
    """CPU seconds spent inside (simulated) NVML calls so far, on the agent's NVML thread."""
    return sum(st.total for st in a.rt.agent.sources["nvml"].collector.calls.values())


def group(comm: str) -> str:
    name = comm.rsplit("#", 1)[0]
    if name.startswith(("sim-", "Thread-")) or name.endswith("-req"):
        # Thread-N (_serve): grpc's Python server loop, which only the simulated kubelet runs
        return "simulator: HTTP/gRPC servers"
    if name.startswith(("loop-", "nvml", "podresources", "kubernetes", "processes", "inference", "infer-get")):
        return "agent: collectors"
    if name.startswith("evaluate"):
        return "agent: evaluation"
    if name.startswith("http"):
        return "agent: HTTP /metrics"
    if name.startswith("history"):
        return "agent: history"
    if name == "MainThread":
        return "bench driver (sleeps)"
    return "shared: gRPC core and other native threads"


def measure_cpu(scenario: str, seconds: float) -> dict[str, float]:
    a = Running(scenario)
    try:
        a.warm()
        scr = scrape_from_process(a.port, n=int(seconds // 15) + 2, every=15.0, prometheus=True)
        proc = psutil.Process()
        _EXITED.clear()
        _RECORDING.set()
        t0, w0, p0, n0 = thread_cpu(), time.monotonic(), proc.cpu_times(), sim_nvml_cpu(a)
        time.sleep(seconds)
        t1, w1, p1, n1 = thread_cpu(), time.monotonic(), proc.cpu_times(), sim_nvml_cpu(a)
        _RECORDING.clear()
        exited = list(_EXITED)
        scr.kill()
        wall = w1 - w0
        groups: Counter = Counter()
        for k, v in t1.items():
            groups[group(k)] += v - t0.get(k, 0.0)
        for tid, comm, cpu in exited:
            key = f"{comm}#{tid}"
            if key not in t1:
                groups[group(key)] += max(0.0, cpu - t0.get(key, 0.0))
        # the simulated NVML answers inside the agent's NVML thread: simulator time, not the agent's
        groups["agent: collectors"] -= n1 - n0
        groups["simulator: NVML (in the agent's NVML thread)"] += n1 - n0
        total = (p1.user + p1.system) - (p0.user + p0.system)
        groups["unaccounted (native threads that ended)"] += max(0.0, total - sum(groups.values()))
        out = {f"cpu% {g}": 100 * v / wall for g, v in groups.items()}
        out["cpu% process"] = 100 * total / wall
        agent = sum(v for g, v in groups.items() if g.startswith("agent"))
        out["cpu% agent threads"] = 100 * agent / wall
        return out
    finally:
        a.close()


# --- cycles on a virtual clock: RSS, NVML calls, cost per cycle --------------------------------
def cycles(scenario: str, n: int, checkpoints: int = 5) -> dict[str, Any]:
    rt = build_runtime(Config(), simulate=scenario, realtime=False, start=START)
    try:
        agent = rt.agent
        nv = agent.sources["nvml"].collector
        agent.step(rt.clock.now())
        for _ in range(3):
            rt.clock.advance(10.0)
            agent.step(rt.clock.now())
        calls0 = sum(s.count for s in nv.calls.values())
        rss, cpu = [], []
        for i in range(1, n + 1):
            rt.clock.advance(10.0)
            c0 = time.process_time()
            state = agent.step(rt.clock.now())
            exposition.encode_for(state, "", "gzip")  # what one scrape per cycle costs
            cpu.append((time.process_time() - c0) * 1000)
            if i % max(1, n // checkpoints) == 0:
                rss.append(psutil.Process().memory_info().rss / 2**20)
        calls = sum(s.count for s in nv.calls.values()) - calls0
        units = len(agent.state.units) if agent.state else 0
        return {"units": units, "cycle_cpu_ms": statistics.median(cpu), "nvml_calls_per_cycle": calls / n,
                "nvml_calls_per_unit": calls / n / max(units, 1), "rss_mib": rss}
    finally:
        rt.close()


def cycles_in_a_fresh_process(scenario: str, n: int) -> dict[str, Any]:
    """`cycles` in a process of its own, so its RSS is an agent's that did only that, not one that
    also ran the scrape and CPU measurements' agents before it (their heap stays fragmented)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--cycles-child", scenario, str(n)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


SCALE = """name: scale-{units}
seed: 5
node: {{name: scale-node, labels: {{node.kubernetes.io/instance-type: g6e.48xlarge}}}}
gpus: {{model: L40S, count: {gpus}, time_slicing: {{replicas: {replicas}}}}}
namespaces: {{apps: {{labels: {{team: product}}}}}}
pods:
{pods}
"""


def scale_scenario(tmp: str, units: int) -> str:
    gpus, replicas = (units, 1) if units <= 16 else (16, units // 16)
    pods = "\n".join(f"  - {{namespace: apps, name: app-{i}, owner: {{kind: Deployment, name: app-{i % 8}}}, "
                     f"containers: [{{name: app, gpus: 1, memory: 1GiB, load: {{pattern: constant, level: 0.05}}}}]}}"
                     for i in range(units))
    path = os.path.join(tmp, f"scale-{units}.yaml")
    with open(path, "w") as f:
        f.write(SCALE.format(units=units, gpus=gpus, replicas=replicas, pods=pods))
    return path


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return b, my - b * mx


# --- report -------------------------------------------------------------------------------------
def spread(runs: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    xs = [r[key] for r in runs]
    return statistics.median(xs), min(xs), max(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repetition, shorter CPU window and fewer cycles")
    ap.add_argument("--scenario", default="large")
    ap.add_argument("--runs", type=int, default=None, help="repetitions of the scrape and CPU runs (3; quick 1)")
    ap.add_argument("--scrapes", type=int, default=1000)
    ap.add_argument("--cpu-seconds", type=float, default=None, help="CPU window per run (90; quick 30)")
    ap.add_argument("--cycles", type=int, default=None, help="virtual-clock cycles for RSS (10000; quick 500)")
    ap.add_argument("--skip", default="", help="comma-separated: scrape,cpu,cycles,scale")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--scraper", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--cycles-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scraper:
        port, n, conc, every, prom = args.scraper
        scraper(int(port), int(n), int(conc), float(every), prom == "1")
        return
    if args.cycles_child:
        print(json.dumps(cycles(args.cycles_child[0], int(args.cycles_child[1]))))
        return
    runs = args.runs or (1 if args.quick else 3)
    cpu_s = args.cpu_seconds or (30.0 if args.quick else 90.0)
    ncycles = args.cycles or (500 if args.quick else 10000)
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {"scenario": args.scenario, "python": sys.version.split()[0],
                              "cpus": os.cpu_count(), "runs": runs}
    print(f"gpucap bench on `{args.scenario}`: python {result['python']}, {os.cpu_count()} CPUs, {runs} run(s)")

    if "scrape" not in skip:
        sr = [measure_scrapes(args.scenario, args.scrapes, 200 if not args.quick else 50) for _ in range(runs)]
        result["scrape"] = sr
        print(f"\nscrapes ({args.scrapes} sequential; {args.scrapes // 10} each by 10 concurrent scrapers), "
              "median [min-max] over runs:")
        for key in ("scrape_p50_ms", "scrape_p99_ms", "concurrent10_p50_ms", "concurrent10_p99_ms",
                    "floor_p50_ms", "floor_p99_ms", "ratio_p99", "bytes_plain", "bytes_gzip", "series"):
            m, lo, hi = spread(sr, key)
            print(f"  {key:22s} {m:12.3f}   [{lo:.3f} - {hi:.3f}]")

    if "cpu" not in skip:
        cr = [measure_cpu(args.scenario, cpu_s) for _ in range(runs)]
        result["cpu"] = cr
        print(f"\nCPU, % of one core, default intervals, a Prometheus-like scrape every 15 s, {cpu_s:g} s per run:")
        for key in sorted({k for r in cr for k in r}):
            m, lo, hi = spread([{key: r.get(key, 0.0)} for r in cr], key)
            print(f"  {key[5:]:46s} {m:7.3f}   [{lo:.3f} - {hi:.3f}]")

    if "cycles" not in skip:
        t0 = time.monotonic()
        cy = cycles_in_a_fresh_process(args.scenario, ncycles)
        result["cycles"] = cy
        print(f"\n{ncycles} cycles on a virtual clock ({time.monotonic() - t0:.0f} s): {cy['units']} units, "
              f"{cy['cycle_cpu_ms']:.2f} ms CPU per cycle (collect + evaluate + encode), "
              f"{cy['nvml_calls_per_cycle']:.1f} NVML calls per cycle = {cy['nvml_calls_per_unit']:.2f} per unit; "
              f"RSS MiB at checkpoints: {', '.join(f'{x:.1f}' for x in cy['rss_mib'])}")

    if "scale" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            pts = []
            for units in (1, 8, 64, 256):
                c = cycles(scale_scenario(tmp, units), 10 if args.quick else 30, checkpoints=1)
                pts.append((units, c["cycle_cpu_ms"]))
        b, a0 = slope([float(u) for u, _ in pts], [ms for _, ms in pts])
        result["scale"] = {"points": pts, "slope_ms_per_unit": b, "intercept_ms": a0}
        print("\nscale series (time-sliced L40S, one pod per unit), CPU per cycle: "
              + ", ".join(f"{u} units {ms:.2f} ms" for u, ms in pts)
              + f"; least-squares slope {b:.3f} ms per unit, intercept {a0:.2f} ms")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
