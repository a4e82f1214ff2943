"""Tier discovery: what memory and storage this machine has for KV blocks.

INTERFACE (filled in by the discovery work): discover() returns tiers sorted by rank (0 = fastest).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tier:
    name: str                 # e.g. "gpu0", "dram", "cxl0", "nvme0"
    kind: str                 # "hbm" | "dram" | "cxl" | "nvme"
    rank: int                 # 0 = fastest
    capacity_bytes: int
    free_bytes: int
    nodes: list[int] = field(default_factory=list)   # NUMA nodes (memory tiers)
    paths: list[str] = field(default_factory=list)   # directories (nvme) or device names (hbm)


def discover(nvme_dirs=(), sysfs_root="/sys") -> list[Tier]:
    raise NotImplementedError
