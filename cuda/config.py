"""The `kind = "gpu"` entries of kvtierd's [[tiers]] (kvtier.daemon.config calls gpu_tier for each).

    [[tiers]]
    name = "gpu0"
    kind = "gpu"
    device = 0            # CUDA device index (default 0)
    capacity = "40%"      # bytes, "N GiB", or "N%" of the GPU's free memory; never more than it has free
    optional = false      # true: without this GPU kvtierd starts without the tier (a warning; kvctl status says why)

GPU tiers come first and need a dram or cxl tier after them. With no GPU (or no driver, or no cuda-python) a
required gpu tier is a config error naming the key (kvtierd exits 2); an optional one is left out and listed
in Config.absent_tiers with the reason.
"""
from __future__ import annotations

from kvtier.errors import InputError

KEYS = {"name", "kind", "device", "capacity", "optional"}


def gpu_tier(t: dict, where: str, tc, parse_size, absent: list) -> bool:
    """Fill TierConfig `tc` from table `t` (where: "source: tiers[i]."); False when the GPU is absent and the
    tier is optional (then appended to `absent` as {name, kind, device, reason})."""
    bad = set(t) - KEYS
    if bad:
        raise InputError(f"{where}{sorted(bad)[0]}: not a key of a gpu tier; valid: {', '.join(sorted(KEYS))}")
    device = t.get("device", 0)
    if not isinstance(device, int) or isinstance(device, bool) or device < 0:
        raise InputError(f"{where}device: expected a CUDA device index (0, 1, ...), got {device!r}")
    optional = t.get("optional", False)
    if not isinstance(optional, bool):
        raise InputError(f"{where}optional: expected true or false")
    from kvtier.cuda.discover import discover_gpus
    report = discover_gpus()
    reason = None
    if not report.present:
        reason = report.reason
    elif device >= len(report.gpus):
        reason = f"no GPU {device} (this machine has {len(report.gpus)})"
    if reason is not None:
        if optional:
            absent.append({"name": tc.name, "kind": "gpu", "device": device, "reason": reason})
            return False
        raise InputError(f"{where}kind: a gpu tier needs GPU {device}, but {reason} "
                         f"(set optional = true to start without it)")
    from kvtier.cuda.tier import held_bytes
    free = report.gpus[device].free_bytes + held_bytes(device)   # a SIGHUP counts what this daemon holds
    n = parse_size(t["capacity"], f"{where}capacity", free)
    if n > free:
        raise InputError(f"{where}capacity: {n} bytes is more than GPU {device} has free ({free} bytes)")
    tc.capacity_bytes, tc.device, tc.optional = n, device, optional
    return True
