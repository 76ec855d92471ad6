"""Scenario files: a simulated GPU node described in YAML, validated with exact error messages.

A scenario is the single source of truth for every simulated source (NVML, kubelet, Kubernetes
metadata, inference endpoints), so they always agree with each other. See docs/scenarios.md.
"""

from __future__ import annotations

import csv
import io
import math
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from collectors.schema import (
    MAX_DURATION,
    InputError,
    Problem,
    Reader,
    did_you_mean,
    load_yaml_file,
    read_text_file,
)
from collectors.simulated.catalog import MODELS, GpuModel

PATTERNS = ("idle", "constant", "diurnal", "bursty", "ramp", "trace")
FAULT_KINDS = ("gpu_lost", "xid", "not_supported", "nvml_init_failure", "slow", "source_down")
FIELDS = (
    "utilization", "power", "power_limit", "energy", "temperature", "clocks", "pcie", "nvlink",
    "memory_v2", "gpm", "processes", "process_utilization", "events",
)
SOURCES = ("nvml", "kubelet", "kubernetes", "inference")
SERVERS = ("vllm", "triton", "tgi", "sglang")
OWNER_KINDS = ("Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet", "ReplicaSet", "Pod")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """GPU utilization (0–1) over time; for inference traffic the same shapes in requests/s."""

    pattern: str = "idle"
    level: float = 0.0
    minimum: float = 0.0
    maximum: float = 0.0
    period: float = 86400.0
    peak_at: float = 14 * 3600.0
    burst_level: float = 0.0
    burst_every: float = 600.0
    burst_duration: float = 60.0
    start_level: float = 0.0
    end_level: float = 0.0
    ramp_duration: float = 3600.0
    trace: tuple[tuple[float, float], ...] = ()
    noise: float = 0.0
    sm_efficiency: float = 0.85
    tensor_ratio: float = 0.5


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    name: str
    gpus: int = 0
    mig: tuple[tuple[str, int], ...] = ()
    devices: tuple[int, ...] = ()
    load: LoadSpec = LoadSpec()
    memory_bytes: int | None = None
    shares: tuple[tuple[int, int], ...] = ()  # pinned (gpu index, replica) of a time-sliced GPU


@dataclass(frozen=True, slots=True)
class InferenceSpec:
    server: str
    model: str
    capacity_rps: float
    traffic: LoadSpec
    prompt_tokens: int = 512
    generated_tokens: int = 256
    max_running: int = 64
    old_names: bool = False


@dataclass(frozen=True, slots=True)
class PodSpec:
    namespace: str
    name: str
    uid: str
    owner_kind: str
    owner_name: str
    labels: tuple[tuple[str, str], ...]
    annotations: tuple[tuple[str, str], ...]
    containers: tuple[ContainerSpec, ...]
    inference: InferenceSpec | None = None
    start: float = 0.0
    end: float | None = None

    def alive(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)


@dataclass(frozen=True, slots=True)
class MigInstanceSpec:
    profile: str
    uuid: str
    gi: int | None = None  # pinned GPU-instance id (None: NVML-like default)
    ci: int | None = None  # pinned compute-instance id (None: 0)


@dataclass(frozen=True, slots=True)
class GpuSpec:
    index: int
    uuid: str
    mig: tuple[MigInstanceSpec, ...] | None = None  # None: MIG disabled
    minor: int | None = None  # NVML minor number (/dev/nvidia<minor>); None: the index


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: str
    at: float = 0.0
    until: float | None = None
    gpu: int | None = None  # None: every GPU
    xid: int = 79
    field: str = ""
    source: str = "nvml"
    delay: float = 0.0

    def active(self, t: float) -> bool:
        return self.at <= t and (self.until is None or t < self.until)


@dataclass(frozen=True, slots=True)
class HostProcessSpec:
    """A GPU process outside any pod (e.g. a stray process on the host): shows up as unattributed use."""

    gpu: int
    pid: int
    load: LoadSpec
    memory_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    seed: int
    node_name: str
    node_labels: tuple[tuple[str, str], ...]
    node_annotations: tuple[tuple[str, str], ...]
    model: GpuModel
    gpus: tuple[GpuSpec, ...]
    replicas: int
    shared_resource: str
    namespaces: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    pods: tuple[PodSpec, ...]
    faults: tuple[FaultSpec, ...]
    host_processes: tuple[HostProcessSpec, ...] = ()
    driver_version: str = "570.133.20"
    cuda_version: int = 12080
    path: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def builtin_dir() -> str:
    return str(resources.files("collectors.simulated") / "scenarios")


def builtin_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(builtin_dir()) if f.endswith(".yaml"))


def resolve(name_or_path: str, where: str | None = None, key: str = "") -> str:
    """A built-in scenario name or a path to a YAML file → the file path. `where`/`key` locate
    the name when it comes from another file (`extends:`)."""
    if os.path.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    path = os.path.join(builtin_dir(), f"{name_or_path}.yaml")
    if not os.path.exists(path):
        names = builtin_names()
        hint = did_you_mean(name_or_path, names)
        expected = f"a built-in scenario ({', '.join(names)}) or a path to a YAML file"
        if where is None:
            detail = (f"not a built-in scenario ({', '.join(names)}{'; ' + hint if hint else ''}) "
                      "nor a path to a YAML file (one with a / or ending in .yaml)")
            raise InputError.of([Problem(name_or_path, "", expected, name_or_path, detail=detail)])
        raise InputError.of([Problem(where, key, expected, name_or_path, hint=hint)])
    return path


def load_scenario(name_or_path: str) -> Scenario:
    """Read and validate a scenario: every mistake of the file is reported at once."""
    path = resolve(name_or_path)
    data = _load_with_extends(path, seen=())
    return _parse(data, path)


def _load_with_extends(path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    """The file merged over its `extends:` chain. Fatal problems only (missing file, bad YAML,
    cycle): without the data there is nothing to validate further."""
    data = load_yaml_file(path, "scenario")
    if not isinstance(data, dict):
        # the type only: the file may be anything the user pointed `extends:` at; never echo it
        raise InputError.of([Problem(path, "", "a mapping at the top level of the scenario",
                                     detail=f"not a scenario: expected a mapping at the top level, "
                                     f"got {type(data).__name__ if data is not None else 'an empty file'}")])
    parent_name = data.get("extends")
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise InputError(path, "extends", "the name or path of another scenario", parent_name)
    parent_path = resolve(parent_name, path, "extends")
    if not os.path.isabs(parent_path) and os.path.sep in parent_name:
        parent_path = os.path.join(os.path.dirname(path), parent_name)
    if os.path.abspath(parent_path) in seen:
        raise InputError(path, "extends", "no cycle of extends", parent_name)
    parent = _load_with_extends(parent_path, seen + (os.path.abspath(path),))
    merged = dict(parent)
    merged.update({k: v for k, v in data.items() if k != "extends"})
    if "faults" in data and "faults" in parent:
        merged["faults"] = list(parent.get("faults") or []) + list(data.get("faults") or [])
    return merged


def _uuid(seed: int, *parts: object) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, "/".join(str(p) for p in (seed, *parts))))


def _parse(data: dict[str, Any], path: str) -> Scenario:
    r = Reader(data, path)
    r.raw("extends", None)
    name = r.str("name", os.path.splitext(os.path.basename(path))[0])
    description = r.str("description", "")
    seed = r.number("seed", 1, integer=True)
    driver = r.str("driver_version", "570.133.20")

    node = r.section("node")
    node_name = node.str("name", "sim-node-1")
    node_labels = node.str_map("labels")
    node_annotations = node.str_map("annotations")
    node.done()

    g = r.section("gpus")
    model_key = g.str("model", choices=tuple(sorted(MODELS)))
    model = MODELS.get(model_key)  # None after a mistake: the checks that need the model are skipped
    count = g.number("count", 1, integer=True, minimum=1, maximum=16)
    uuids = g.list("uuids", [])
    if uuids and (len(uuids) != count or not all(isinstance(u, str) and u.startswith("GPU-") for u in uuids)):
        g.problem("uuids", f"a list of {count} strings starting with GPU-", uuids)
        uuids = []
    minors = g.list("minor_numbers", [])
    if minors and (len(minors) != count or len(set(map(str, minors))) != count
                   or not all(isinstance(m, int) and not isinstance(m, bool) and 0 <= m < 256 for m in minors)):
        g.problem("minor_numbers", f"a list of {count} distinct integers between 0 and 255", minors)
        minors = []
    mig_raw = g.mapping("mig")
    ts = g.section("time_slicing")
    replicas = ts.number("replicas", 1, integer=True, minimum=1, maximum=64)
    rename = ts.bool("rename", False)
    ts.done()
    g.done()

    gpus: list[GpuSpec] = []
    for i in range(count):
        gid = uuids[i] if uuids else f"GPU-{_uuid(seed, node_name, 'gpu', i)}"
        mig = None
        if model is not None and (i in mig_raw or str(i) in mig_raw):
            mig = _parse_mig(g, mig_raw.get(i, mig_raw.get(str(i))), model, f"mig.{i}", seed, gid)
        gpus.append(GpuSpec(i, gid, mig, minors[i] if minors else None))
    for k in mig_raw:
        if not (isinstance(k, int) or (isinstance(k, str) and k.isdigit())) or int(k) >= count:
            g.problem(f"mig.{k}", f"a GPU index between 0 and {count - 1}", k)
    if replicas > 1 and any(gs.mig is not None for gs in gpus):
        g.problem("time_slicing.replicas", "1 when MIG is enabled on a GPU of the node", replicas)

    namespaces = []
    ns_section = r.section("namespaces")
    for ns_name in ns_section.data:
        nr = ns_section.section(ns_name)
        namespaces.append((str(ns_name), tuple(sorted(nr.str_map("labels").items()))))
        nr.done()

    pods = tuple(_parse_pod(pr, seed, node_name, model) for pr in r.items("pods"))
    seen_pods: set[tuple[str, str]] = set()
    for i, p in enumerate(pods):
        if (p.namespace, p.name) in seen_pods:
            r.problem(f"pods[{i}].name", "a pod name unique in its namespace", p.name)
        seen_pods.add((p.namespace, p.name))

    faults = tuple(_parse_fault(fr, count) for fr in r.items("faults"))
    host = []
    for hr in r.items("host_processes"):
        gi = hr.number("gpu", integer=True, minimum=0, maximum=count - 1)
        host.append(HostProcessSpec(gi, hr.number("pid", 4242, integer=True, minimum=1),
                                    _parse_load(hr.section("load"), hr.where),
                                    hr.size("memory", 0)))
        hr.done()
    r.done()
    r.raise_problems()

    model = MODELS[model_key]  # no problem recorded, so the model key was valid
    shared_resource = "nvidia.com/gpu.shared" if replicas > 1 and rename else "nvidia.com/gpu"
    sc = Scenario(
        name=name, description=description, seed=seed, node_name=node_name,
        node_labels=tuple(sorted(node_labels.items())), node_annotations=tuple(sorted(node_annotations.items())),
        model=model, gpus=tuple(gpus), replicas=replicas, shared_resource=shared_resource,
        namespaces=tuple(namespaces), pods=pods, faults=faults, host_processes=tuple(host),
        driver_version=driver, path=path,
    )
    _check_capacity(sc)  # first-fit over the whole node: only meaningful on a scenario without mistakes
    return sc


def _parse_mig(g: Reader, raw: Any, model: GpuModel, key: str, seed: int,
               gpu_uuid: str) -> tuple[MigInstanceSpec, ...] | None:
    """One GPU's MIG layout (`gpus.mig.<i>`); None after a mistake (recorded on `g`)."""
    if not model.mig_profiles:
        g.problem(key, f"no MIG layout: {model.key} does not support MIG", raw)
        return None
    if not isinstance(raw, list):
        g.problem(key, "a list of MIG profiles, e.g. [3g.40gb, 2g.20gb]", raw)
        return None
    mark = g.mark()
    out = []
    compute = memory = 0
    counts: dict[str, int] = {}
    for j, item in enumerate(raw):
        u = None
        gi = ci = None
        if isinstance(item, dict):
            ir = g.at(f"{key}[{j}]", item)
            item_mark = ir.mark()
            prof_name = ir.str("profile")
            u = ir.str("uuid", None)
            gi = ir.number("gi", None, integer=True, minimum=0, maximum=14)
            ci = ir.number("ci", None, integer=True, minimum=0, maximum=7)
            ir.done()
            if u is not None and not u.startswith("MIG-"):
                ir.problem("uuid", "a MIG UUID starting with MIG-", u)
            if not ir.ok_since(item_mark):
                continue
        else:
            prof_name = item
        prof = model.mig_profile(str(prof_name))
        if prof is None:
            names = ", ".join(p.name for p in model.mig_profiles)
            g.problem(f"{key}[{j}]", f"a MIG profile of {model.key} ({names})", prof_name,
                      hint=did_you_mean(prof_name, [p.name for p in model.mig_profiles]))
            continue
        compute += prof.compute_slices
        memory += prof.memory_slices
        counts[prof.name] = counts.get(prof.name, 0) + 1
        if compute > 7 or memory > 8 or counts[prof.name] > prof.max_instances:
            g.problem(key, f"a MIG layout that fits one {model.key} (at most 7 compute and 8 memory slices, "
                      f"{prof.name} at most {prof.max_instances}×)", raw)
            return None
        if gi is not None and any(o.gi == gi for o in out):
            g.problem(f"{key}[{j}].gi", "a GPU-instance id unique on this GPU", gi)
        out.append(MigInstanceSpec(prof.name, u or f"MIG-{_uuid(seed, gpu_uuid, 'mig', j)}", gi, ci))
    return tuple(out) if g.ok_since(mark) else None


def _parse_load(r: Reader, path: str) -> LoadSpec:
    mark = r.mark()
    pattern = r.str("pattern", "idle", choices=PATTERNS)
    if not r.ok_since(mark):
        r.ignore_rest()  # which keys belong here depends on the pattern: no guessing at unknown ones
        return LoadSpec()
    unit = {"minimum": 0.0}
    kw: dict[str, Any] = {"pattern": pattern}
    kw["noise"] = r.number("noise", 0.0, minimum=0.0, maximum=1.0)
    kw["sm_efficiency"] = r.number("sm_efficiency", 0.85, minimum=0.0, maximum=1.0)
    kw["tensor_ratio"] = r.number("tensor_ratio", 0.5, minimum=0.0, maximum=1.0)
    if pattern == "constant":
        kw["level"] = r.number("level", **unit)
    elif pattern == "diurnal":
        kw["minimum"] = r.number("min", **unit)
        kw["maximum"] = r.number("max", **unit)
        kw["period"] = r.duration("period", "24h")
        kw["peak_at"] = r.duration("peak_at", "14h", positive=False)
    elif pattern == "bursty":
        kw["level"] = r.number("level", 0.0, **unit)
        kw["burst_level"] = r.number("burst_level", **unit)
        kw["burst_every"] = r.duration("every", "10m")
        kw["burst_duration"] = r.duration("duration", "1m")
    elif pattern == "ramp":
        kw["start_level"] = r.number("from", **unit)
        kw["end_level"] = r.number("to", **unit)
        kw["ramp_duration"] = r.duration("over", "1h")
    elif pattern == "trace":
        kw["trace"] = _read_trace(r, path)
    r.done()
    return LoadSpec(**kw)


def _read_trace(r: Reader, path: str) -> tuple[tuple[float, float], ...]:
    """A CSV load trace; the first bad row of it is reported (one broken file, one line)."""
    mark = r.mark()
    f = r.str("file", nonempty=True)
    if not r.ok_since(mark):
        return ()
    full = f if os.path.isabs(f) else os.path.join(os.path.dirname(path), f)
    points: list[tuple[float, float]] = []
    try:
        text = read_text_file(full, "trace")
    except InputError as e:
        r.problems.extend(e.problems)
        return ()
    try:
        for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
            if not row or row[0].startswith("#") or row[0].strip() in ("seconds", "t", "time"):
                continue
            try:
                t, v = float(row[0]), float(row[1])
            except (ValueError, IndexError):
                r.problem("file", "CSV rows 'seconds,value'", ",".join(row)[:40], where=f"{full}:{n}")
                return ()
            if not math.isfinite(t) or t < 0 or t > MAX_DURATION:
                r.problem("file", "a time in seconds from the pod's start (0 or more, finite)", row[0][:40],
                          where=f"{full}:{n}")
                return ()
            if not math.isfinite(v) or v < 0:
                r.problem("file", "a non-negative, finite load", row[1][:40], where=f"{full}:{n}")
                return ()
            points.append((t, v))
    except csv.Error as e:
        r.problem("file", f"a CSV trace file ({e})", f)
        return ()
    if not points:
        r.problem("file", "a trace with at least one 'seconds,value' row", f)
    return tuple(sorted(points))


def _parse_pod(r: Reader, seed: int, node_name: str, model: GpuModel | None) -> PodSpec:
    ns = r.str("namespace", "default")
    name = r.str("name")
    uid = r.str("uid", _uuid(seed, node_name, ns, name))
    owner = r.section("owner")
    kind = owner.str("kind", "Pod", choices=OWNER_KINDS)
    owner_name = owner.str("name", name)
    owner.done()
    labels = r.str_map("labels")
    annotations = r.str_map("annotations")
    mark = r.mark()
    start = r.duration("start", 0.0, positive=False)
    end = r.duration("end", None)
    times_ok = r.ok_since(mark)
    containers = []
    for cr in r.items("containers"):
        cname = cr.str("name", "main")
        gpus = cr.number("gpus", 0, integer=True, minimum=0, maximum=16)
        mig = []
        for prof, n in cr.mapping("mig").items():
            if model is not None and model.mig_profile(str(prof)) is None:
                cr.problem(f"mig.{prof}", f"a MIG profile of {model.key}", prof,
                           hint=did_you_mean(prof, [p.name for p in model.mig_profiles]))
                continue
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                cr.problem(f"mig.{prof}", "a positive integer count", n)
                continue
            mig.append((str(prof), n))
        devices = cr.list("devices", [])
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices):
            cr.problem("devices", "a list of GPU indices", devices)
            devices = []
        shares = []
        for sr in cr.items("shares"):
            shares.append((sr.number("gpu", integer=True, minimum=0, maximum=15),
                           sr.number("replica", integer=True, minimum=0, maximum=63)))
            sr.done()
        load = _parse_load(cr.section("load"), r.where)
        mem = cr.size("memory", None)
        cr.done()
        if shares and gpus:
            cr.problem("shares", "either gpus (first-fit) or shares (pinned), not both", [list(x) for x in shares])
        containers.append(ContainerSpec(cname, gpus, tuple(mig), tuple(devices), load, mem, tuple(shares)))
    inf = None
    if r.has("inference"):
        ir = r.section("inference")
        server = ir.str("server", choices=SERVERS)
        inf = InferenceSpec(
            server=server,
            model=ir.str("model", "" if server == "tgi" else "model"),
            capacity_rps=ir.number("capacity_rps", minimum=0.0, exclusive_minimum=True),
            traffic=_parse_load(ir.section("traffic"), r.where),
            prompt_tokens=ir.number("prompt_tokens", 512, integer=True, minimum=1),
            generated_tokens=ir.number("generated_tokens", 256, integer=True, minimum=1),
            max_running=ir.number("max_running", 64, integer=True, minimum=1),
            old_names=ir.bool("old_metric_names", False),
        )
        ir.done()
    else:
        r.raw("inference", None)  # a known key, also when absent (for "did you mean")
    r.done()
    if times_ok and end is not None and end <= start:
        r.problem("end", "a time after start", end)
    return PodSpec(ns, name, uid, kind, owner_name, tuple(sorted(labels.items())),
                   tuple(sorted(annotations.items())), tuple(containers), inf, start, end)


def _parse_fault(r: Reader, count: int) -> FaultSpec:
    mark = r.mark()
    kind = r.str("kind", choices=FAULT_KINDS)
    if not r.ok_since(mark):
        r.ignore_rest()  # which keys belong here depends on the kind
        return FaultSpec(kind="gpu_lost")
    kw: dict[str, Any] = {"kind": kind, "at": r.duration("at", 0.0, positive=False), "until": r.duration("until", None)}
    times_ok = r.ok_since(mark)
    if kind in ("gpu_lost", "xid", "not_supported"):
        gpu = r.raw("gpu", "all")
        if gpu != "all":
            gpu = r.number("gpu", integer=True, minimum=0, maximum=count - 1)
            kw["gpu"] = gpu
    if kind == "xid":
        kw["xid"] = r.number("xid", 79, integer=True, minimum=1)
    if kind == "not_supported":
        kw["field"] = r.str("field", choices=FIELDS)
    if kind in ("slow", "source_down"):
        kw["source"] = r.str("source", choices=SOURCES)
    if kind == "slow":
        kw["delay"] = r.duration("delay")
    r.done()
    if times_ok and kw["until"] is not None and kw["until"] <= kw["at"]:
        r.problem("until", "a time after 'at'", kw["until"])
    return FaultSpec(**kw)


def _check_capacity(sc: Scenario) -> None:
    """Allocation must be possible: run the first-fit and report the pod that does not fit."""
    from collectors.simulated.node import allocate

    allocate(sc)
