"""Simulated GPU models with their real figures.

Figures are what NVML reports on the real parts (memory as `nvmlDeviceGetMemoryInfo().total`,
SM count, enforced power limit, max SM clock) and the MIG profiles of
`shared/reference/gpu-facts.md` §2. GPM (`nvmlGpmQueryDeviceSupport`) is Hopper and newer only.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MigProfile:
    name: str  # e.g. "3g.40gb"
    compute_slices: int  # of 7
    memory_slices: int  # of 8
    max_instances: int
    memory_mib: int
    sm_count: int


@dataclass(frozen=True, slots=True)
class GpuModel:
    key: str  # scenario name, e.g. "H100-SXM-80GB"
    nvml_name: str  # what nvmlDeviceGetName returns
    memory_mib: int
    reserved_mib: int  # driver-reserved memory (memory v2 "reserved")
    sm_count: int
    power_limit_w: float
    idle_power_w: float
    max_sm_clock_mhz: int
    idle_sm_clock_mhz: int
    architecture: str
    gpm: bool
    nvlinks: int
    pcie_gen: int
    mig_profiles: tuple[MigProfile, ...] = ()
    compute_capability: tuple[int, int] = (9, 0)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    def mig_profile(self, name: str) -> MigProfile | None:
        for p in self.mig_profiles:
            if p.name == name:
                return p
        return None


def _profiles(per_slice_sm: int, table: list[tuple[str, int, int, int, int]]) -> tuple[MigProfile, ...]:
    return tuple(MigProfile(n, c, m, mx, mib, c * per_slice_sm) for n, c, m, mx, mib in table)


_H100_MIG = _profiles(
    16,
    [
        ("1g.10gb", 1, 1, 7, 9856),
        ("1g.20gb", 1, 2, 4, 19968),
        ("2g.20gb", 2, 2, 3, 19968),
        ("3g.40gb", 3, 4, 2, 40192),
        ("4g.40gb", 4, 4, 1, 40192),
        ("7g.80gb", 7, 8, 1, 80384),
    ],
)
_A100_80_MIG = _profiles(
    14,
    [
        ("1g.10gb", 1, 1, 7, 9728),
        ("1g.20gb", 1, 2, 4, 19968),
        ("2g.20gb", 2, 2, 3, 19968),
        ("3g.40gb", 3, 4, 2, 40192),
        ("4g.40gb", 4, 4, 1, 40192),
        ("7g.80gb", 7, 8, 1, 80384),
    ],
)
_A100_40_MIG = _profiles(
    14,
    [
        ("1g.5gb", 1, 1, 7, 4864),
        ("1g.10gb", 1, 2, 4, 9856),
        ("2g.10gb", 2, 2, 3, 9856),
        ("3g.20gb", 3, 4, 2, 19968),
        ("4g.20gb", 4, 4, 1, 19968),
        ("7g.40gb", 7, 8, 1, 40192),
    ],
)
_H200_MIG = _profiles(
    16,
    [
        ("1g.18gb", 1, 1, 7, 16384),
        ("1g.35gb", 1, 2, 4, 32768),
        ("2g.35gb", 2, 2, 3, 32768),
        ("3g.71gb", 3, 4, 2, 69632),
        ("4g.71gb", 4, 4, 1, 69632),
        ("7g.141gb", 7, 8, 1, 143360),
    ],
)

MODELS: dict[str, GpuModel] = {
    m.key: m
    for m in (
        GpuModel("H100-SXM-80GB", "NVIDIA H100 80GB HBM3", 81559, 555, 132, 700.0, 70.0, 1980, 345,
                 "hopper", True, 18, 5, _H100_MIG),
        GpuModel("H200-141GB", "NVIDIA H200", 143771, 601, 132, 700.0, 75.0, 1980, 345,
                 "hopper", True, 18, 5, _H200_MIG),
        GpuModel("A100-SXM-40GB", "NVIDIA A100-SXM4-40GB", 40960, 477, 108, 400.0, 55.0, 1410, 210,
                 "ampere", False, 12, 4, _A100_40_MIG, (8, 0)),
        GpuModel("A100-SXM-80GB", "NVIDIA A100-SXM4-80GB", 81920, 511, 108, 400.0, 60.0, 1410, 210,
                 "ampere", False, 12, 4, _A100_80_MIG, (8, 0)),
        GpuModel("L4", "NVIDIA L4", 23034, 353, 58, 72.0, 16.0, 2040, 210, "ada", False, 0, 4, (), (8, 9)),
        GpuModel("L40S", "NVIDIA L40S", 46068, 455, 142, 350.0, 35.0, 2520, 210, "ada", False, 0, 4, (), (8, 9)),
        GpuModel("A10G", "NVIDIA A10G", 23028, 353, 80, 300.0, 25.0, 1710, 210, "ampere", False, 0, 4, (), (8, 6)),
    )
}


def model_names() -> list[str]:
    return sorted(MODELS)
