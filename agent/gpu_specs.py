"""GPU models the right-sizing engine can size against: memory, dense BF16/FP16 tensor throughput and
MIG profiles, from the vendors' datasheets.

Why a table of our own: recommendations compare a workload's need (peak memory, p95 activity) with
what a *different* unit would offer, and that needs the other unit's figures, which no running node
can report. Keys are `collectors.pricing.canonical_model` keys, so specs and prices join.

Throughput is the dense (no structured sparsity) BF16 tensor figure, FP16 where the part has no
BF16 (T4). Datasheets quote the sparse figure as the headline; dense is half of it. Memory is what
NVML reports as total on the part (slightly under the marketing GB). MIG profile memory is what the
driver gives the instance (NVIDIA MIG user guide; `shared/reference/gpu-facts.md` §2).

Sources (retrieved for gpucap; re-check before relying on a new figure):
- H100 SXM5 80GB: NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity → 989.5 dense.
  (The H100 PCIe is 756 dense; canonical_model folds both into H100-80GB, so PCIe parts are
  overestimated by ~25%: a downsize target from one is still conservative in memory.)
- H200 SXM 141GB: NVIDIA H200 datasheet: BF16 1,979 sparse → 989.5 dense.
- A100 40GB / 80GB SXM: NVIDIA A100 datasheet: BF16 312 dense (624 sparse).
- L40S 48GB: NVIDIA L40S datasheet: BF16 362.05 dense (733 sparse).
- L4 24GB: NVIDIA L4 datasheet: BF16 121 dense (242 sparse).
- A10G 24GB: no NVIDIA datasheet of its own (an AWS variant of the A10); the A10 datasheet's BF16
  125 dense (250 sparse) is used.
- T4 16GB: NVIDIA T4 datasheet: FP16 mixed precision 65 TFLOPS (no BF16).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True, slots=True)
class MigSpec:
    name: str  # e.g. "2g.20gb"
    compute_slices: int  # of 7
    memory_slices: int  # of 8
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class GpuSpec:
    model: str  # canonical model key (collectors.pricing.canonical_model)
    memory_bytes: int
    dense_tflops: float  # BF16 (FP16 where no BF16), no sparsity
    mig: tuple[MigSpec, ...] = ()
    source: str = ""


def _mig(rows: list[tuple[str, int, int, int]]) -> tuple[MigSpec, ...]:
    return tuple(MigSpec(n, c, m, mib * MIB) for n, c, m, mib in rows)


_H100_MIG = _mig([("1g.10gb", 1, 1, 9856), ("1g.20gb", 1, 2, 19968), ("2g.20gb", 2, 2, 19968),
                  ("3g.40gb", 3, 4, 40192), ("4g.40gb", 4, 4, 40192), ("7g.80gb", 7, 8, 80384)])
_A100_40_MIG = _mig([("1g.5gb", 1, 1, 4864), ("1g.10gb", 1, 2, 9856), ("2g.10gb", 2, 2, 9856),
                     ("3g.20gb", 3, 4, 19968), ("4g.20gb", 4, 4, 19968), ("7g.40gb", 7, 8, 40192)])
_H200_MIG = _mig([("1g.18gb", 1, 1, 16384), ("1g.35gb", 1, 2, 32768), ("2g.35gb", 2, 2, 32768),
                  ("3g.71gb", 3, 4, 69632), ("4g.71gb", 4, 4, 69632), ("7g.141gb", 7, 8, 143360)])

SPECS: dict[str, GpuSpec] = {s.model: s for s in (
    GpuSpec("H100-80GB", 81559 * MIB, 989.5, _H100_MIG, "NVIDIA H100 datasheet (SXM5), BF16 dense"),
    GpuSpec("H200-141GB", 143771 * MIB, 989.5, _H200_MIG, "NVIDIA H200 datasheet, BF16 dense"),
    GpuSpec("A100-80GB", 81920 * MIB, 312.0, _H100_MIG, "NVIDIA A100 datasheet, BF16 dense"),
    GpuSpec("A100-40GB", 40960 * MIB, 312.0, _A100_40_MIG, "NVIDIA A100 datasheet, BF16 dense"),
    GpuSpec("L40S", 46068 * MIB, 362.05, (), "NVIDIA L40S datasheet, BF16 dense"),
    GpuSpec("L4", 23034 * MIB, 121.0, (), "NVIDIA L4 datasheet, BF16 dense"),
    GpuSpec("A10G", 23028 * MIB, 125.0, (), "NVIDIA A10 datasheet (A10G has none), BF16 dense"),
    GpuSpec("T4", 15360 * MIB, 65.0, (), "NVIDIA T4 datasheet, FP16 mixed precision"),
)}


def spec(model: str) -> GpuSpec | None:
    """The spec of a model by any spelling (NVML name, GPU Feature Discovery label, canonical key)."""
    from collectors.pricing import canonical_model

    return SPECS.get(canonical_model(model))


def mig_spec(model: str, profile: str) -> MigSpec | None:
    s = spec(model)
    for p in s.mig if s else ():
        if p.name == profile:
            return p
    return None
