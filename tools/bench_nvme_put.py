#!/usr/bin/env python3
"""Durable NvmeTier.put_many of one block vs `dd oflag=direct,dsync`, in-process (no daemon): the
store's own cost per block size, with the device's flushes and writes per op read from
/sys/dev/block/M:m/stat around each pass.

Each round, per size: a fresh store gets `count` new keys (pass "new": includes the data file's
growth steps), then the same keys again (pass "overwrite": the steady state), then dd writes as many
blocks of the same size to a fresh file, each O_DSYNC (the baseline, same run, same filesystem).
--baseline FILE also times another version of kvtier/store/nvme.py in the same rounds (e.g. the file
from `git show HEAD:userspace/kvtier/store/nvme.py`), so before/after compare under one load.
Per pass the median and the mean per-op time (the mean carries the growth steps), each the median over
the rounds; ratios are dd time / put time (>1: the put is faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from kvtier.errors import InputError


def device_stat(path: str) -> tuple[int, int] | None:
    """(write requests, flush requests) completed by the block device holding `path`."""
    st = os.stat(path)
    try:
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat") as f:
            fields = f.read().split()
    except OSError:
        return None
    return (int(fields[4]), int(fields[15])) if len(fields) >= 16 else None


def load_tier_class(path: str | None):
    if path is None:
        from kvtier.store.nvme import NvmeTier
        return NvmeTier
    spec = importlib.util.spec_from_file_location("kvtier.store._nvme_baseline", path)
    if spec is None:
        raise InputError(f"--baseline {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        return mod.NvmeTier
    except Exception as e:   # noqa: BLE001 - any failure to load is the option's fault
        raise InputError(f"--baseline {path}: cannot load an NvmeTier from it ({type(e).__name__}: {e})") from None


class Timed:
    """Per-op seconds and device writes / flushes per op of one pass."""

    def __init__(self, where: str):
        self.where, self.times = where, []

    def __enter__(self):
        self.stat0 = device_stat(self.where)
        return self

    def __exit__(self, *exc):
        s1 = device_stat(self.where)
        n = max(1, len(self.times))
        self.per_op = None if s1 is None or self.stat0 is None else \
            ((s1[0] - self.stat0[0]) / n, (s1[1] - self.stat0[1]) / n)


def put_pass(tier, keys: list[bytes], src, where: str) -> Timed:
    with Timed(where) as t:
        for k in keys:
            t0 = time.perf_counter()
            tier.put_many([(k, src)])
            t.times.append(time.perf_counter() - t0)
    return t


def dd_pass(directory: str, size: int, count: int) -> Timed:
    f = os.path.join(directory, "dd.bin")
    with Timed(directory) as t:
        t0 = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={f}", f"bs={size}", f"count={count}", "oflag=direct,dsync",
                        "status=none"], check=True)
        t.times = [(time.perf_counter() - t0) / count] * count
    os.unlink(f)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="65536,1048576,8388608", help="block sizes in bytes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib-per-pass", type=int, default=64, help="bytes written per pass (at least 8 blocks)")
    ap.add_argument("--baseline", metavar="FILE", help="another nvme.py to time in the same rounds")
    ap.add_argument("--dir", default=os.environ.get("KVTIER_BENCH_DIR", "/var/tmp"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        if not sizes or min(sizes) <= 0 or args.rounds <= 0 or args.mib_per_pass <= 0:
            raise ValueError
        impls = {"current": load_tier_class(None)}
        if args.baseline:
            if not os.path.isfile(args.baseline):
                raise InputError(f"--baseline {args.baseline}: no such file")
            impls = {"baseline": load_tier_class(args.baseline), **impls}
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError:
        print("error: --sizes takes positive byte counts (65536,1048576); --rounds and --mib-per-pass "
              "positive integers", file=sys.stderr)
        sys.exit(2)
    root = tempfile.mkdtemp(prefix="kvbench-nvme-", dir=args.dir)
    results = []
    try:
        for size in sizes:
            count = max(8, (args.mib_per_pass << 20) // size)
            src = mmap.mmap(-1, size)   # page-aligned, like a daemon arena slot: no bounce copy
            src[:] = os.urandom(size)
            keys = [i.to_bytes(16, "little") for i in range(count)]
            runs: dict[str, list[Timed]] = {}
            for _ in range(args.rounds):
                for name, cls in impls.items():
                    d = os.path.join(root, name)
                    tier = cls("bench", d, max(2 << 30, 3 * count * size))
                    try:
                        runs.setdefault(name + " new", []).append(put_pass(tier, keys, src, d))
                        runs.setdefault(name + " overwrite", []).append(put_pass(tier, keys, src, d))
                    finally:
                        tier.close()
                        shutil.rmtree(d)
                runs.setdefault("dd", []).append(dd_pass(root, size, count))
            src.close()
            dd_s = statistics.median(statistics.median(t.times) for t in runs["dd"])
            for name, timed in runs.items():
                med = statistics.median(statistics.median(t.times) for t in timed)
                mean = statistics.median(statistics.fmean(t.times) for t in timed)   # growth steps show here
                per = [t.per_op for t in timed if t.per_op is not None]
                results.append({"block_bytes": size, "what": name, "median_us": med * 1e6,
                                "mean_us": mean * 1e6, "dd_over_put": dd_s / med, "dd_over_put_mean": dd_s / mean,
                                "writes_per_op": statistics.median(p[0] for p in per) if per else None,
                                "flushes_per_op": statistics.median(p[1] for p in per) if per else None})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    from kvtier.cli.common import human_bytes, table
    rows = [["block", "what", "median us", "dd/put", "mean us", "dd/put (mean)", "dev writes/op", "dev flushes/op"]]
    for r in results:
        rows.append([human_bytes(r["block_bytes"]), r["what"], f"{r['median_us']:.0f}", f"{r['dd_over_put']:.2f}",
                     f"{r['mean_us']:.0f}", f"{r['dd_over_put_mean']:.2f}",
                     "-" if r["writes_per_op"] is None else f"{r['writes_per_op']:.2f}",
                     "-" if r["flushes_per_op"] is None else f"{r['flushes_per_op']:.2f}"])
    print("Durable put_many of one block vs dd oflag=direct,dsync (same run; dd/put > 1: the put is faster):")
    print(table(rows))


if __name__ == "__main__":
    main()
