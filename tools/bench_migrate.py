#!/usr/bin/env python3
"""bench_migrate: kvtier.ko's block migration rate next to move_pages(2) and a userspace memcpy.

Run in a guest with two NUMA nodes (the driver needs the module loaded; the script insmods kmod/kvtier.ko
when it is not):

    tools/vmtest --topology numa -- .venv/bin/python tools/bench_migrate.py
    tools/vmtest --topology tiered -- .venv/bin/python tools/bench_migrate.py --size-mib 64 --repeats 5

All are measured in the same run on the same amount of memory (default 64 MiB):
  driver          KVTIER_IOC_MIGRATE of a populated region's every block, node 0 -> 1 -> 0, `--repeats` times
  move_pages      move_pages(2) of the pages of an anonymous mapping of the same size (base pages, as the
                  driver's; MADV_NOHUGEPAGE), 0 -> 1 -> 0; the page and node arrays are built before the clock
                  starts, so only the syscalls are timed (with retries of transiently busy pages)
  move_pages_thp  the same on a MADV_HUGEPAGE mapping (2 MiB pages where the kernel has them)
  memcpy          numpy.copyto of the same size between two pre-faulted buffers (no page allocation)
Content is checked after every migration. Prints one table (median and best MiB/s per direction) and the
ratios driver/move_pages(_thp) and driver/memcpy; --json prints the same as one JSON object.
Target: driver >= move_pages.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "userspace"))

from kvtier import kmod, numa  # noqa: E402
from kvtier._native import ffi, lib  # noqa: E402

MIB = 1 << 20


def ensure_module() -> None:
    if not kmod.module_loaded():
        ko = REPO / "kmod" / "kvtier.ko"
        if not ko.exists():
            sys.exit(f"bench_migrate: {ko} is not built and kvtier.ko is not loaded")
        subprocess.run(["insmod", str(ko)], check=True)


@contextlib.contextmanager
def numa_balancing_off():
    """Pause automatic NUMA balancing while measuring.

    Its scanner marks a task's PTEs PROT_NONE to sample accesses; on 6.1, move_pages(2) then sees those
    pages as absent (-ENOENT) until they are touched again, and the scanner's own migrations would move
    pages under the benchmark's feet. Restored afterwards.
    """
    path = Path("/proc/sys/kernel/numa_balancing")
    try:
        old = path.read_text().strip()
        path.write_text("0")
    except OSError:
        old = None
    try:
        yield old
    finally:
        if old is not None and old != "0":
            path.write_text(old)


def bench_driver(dev, size_bytes: int, block_bytes: int, repeats: int, src: int, dst: int) -> dict:
    region = dev.create_region(size_bytes, block_bytes, node=src, flags=kmod.CREATE_POPULATE,
                               tags=kmod.Tags(tenant_id=1, session_id=1))
    buf = dev.mmap(region)
    view = np.frombuffer(buf, dtype=np.uint64)
    view[:] = np.arange(view.size, dtype=np.uint64)   # faults every page in, and a pattern to check
    times = {f"{src}->{dst}": [], f"{dst}->{src}": []}
    try:
        for _ in range(repeats):
            for a, b in ((src, dst), (dst, src)):
                start = time.perf_counter()
                moved, blocks = dev.migrate(region.id, 0, region.nr_blocks, node=b)
                times[f"{a}->{b}"].append(time.perf_counter() - start)
                if moved != size_bytes or blocks != region.nr_blocks:
                    raise SystemExit(f"bench_migrate: driver moved {moved} bytes in {blocks} blocks, "
                                     f"expected {size_bytes} in {region.nr_blocks}")
                if dev.info(region.id)["node_bytes"] != {b: size_bytes}:
                    raise SystemExit(f"bench_migrate: region not on node {b} after migrating")
                if not (view[:: 4096] == np.arange(0, view.size, 4096, dtype=np.uint64)).all():
                    raise SystemExit("bench_migrate: content changed by the driver's migration")
    finally:
        del view
        buf.close()
        dev.release(region.id)
    return times


def bench_move_pages(size_bytes: int, repeats: int, src: int, dst: int, thp: bool) -> dict:
    page = numa.PAGE_SIZE
    buf = mmap.mmap(-1, size_bytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # kvtier.ko allocates regions page by page: base pages are the like-for-like baseline; THPs (where
    # the kernel gives them) move 2 MiB at a time and are shown as a second row.
    buf.madvise(mmap.MADV_HUGEPAGE if thp else mmap.MADV_NOHUGEPAGE)
    addr = numa.address_of(buf)
    numa.mbind(addr, size_bytes, numa.MPOL_BIND, [src])
    view = np.frombuffer(buf, dtype=np.uint64)
    view[:] = np.arange(view.size, dtype=np.uint64)
    count = size_bytes // page
    pages = ffi.new("void *[]", [ffi.cast("void *", addr + i * page) for i in range(count)])
    targets = {n: ffi.new("int[]", [n] * count) for n in (src, dst)}
    status = ffi.new("int[]", count)
    status_retry = ffi.new("int[]", count)
    # Clear the bind policy so pages may leave src (move_pages obeys nodes[], not the VMA policy).
    numa.mbind(addr, size_bytes, numa.MPOL_DEFAULT)
    times = {f"{src}->{dst}": [], f"{dst}->{src}": []}
    retries = collections.Counter()
    try:
        for _ in range(repeats):
            for a, b in ((src, dst), (dst, src)):
                start = time.perf_counter()
                ret = lib.kvt_move_pages(0, count, pages, targets[b], status, numa.MPOL_MF_MOVE)
                # A few pages can be transiently busy (-EBUSY: an extra reference, e.g. still in a per-CPU
                # LRU batch); an application would retry those, so the retries count in the time.
                for _ in range(5):
                    busy = [i for i in range(count) if status[i] == -errno.EBUSY]
                    if ret < 0 or not busy:
                        break
                    retries[f"{a}->{b}"] += len(busy)
                    ret = lib.kvt_move_pages(0, len(busy), ffi.new("void *[]", [pages[i] for i in busy]),
                                             ffi.new("int[]", [b] * len(busy)), status_retry, numa.MPOL_MF_MOVE)
                    for j, i in enumerate(busy):
                        status[i] = status_retry[j]
                times[f"{a}->{b}"].append(time.perf_counter() - start)
                if ret < 0:
                    raise SystemExit(f"bench_migrate: move_pages: {os.strerror(-ret)}")
                # Ask where the pages are now: with THPs, move_pages reports -EBUSY for the tail pages of a
                # huge page it already moved through its head.
                lib.kvt_move_pages(0, count, pages, ffi.NULL, status, 0)
                where = collections.Counter(status[i] for i in range(count))
                if where[b] != count:
                    raise SystemExit(f"bench_migrate: move_pages to node {b}: page statuses {dict(where)}")
        if not (view[:: 4096] == np.arange(0, view.size, 4096, dtype=np.uint64)).all():
            raise SystemExit("bench_migrate: content changed by move_pages")
    finally:
        del view
        buf.close()
    return times, dict(retries)


def bench_memcpy(size_bytes: int, repeats: int) -> dict:
    src = np.ones(size_bytes, dtype=np.uint8)
    dst = np.zeros(size_bytes, dtype=np.uint8)   # np.zeros may be lazily mapped: fault it in first
    np.copyto(dst, src)
    times = {"local": []}
    for _ in range(2 * repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times["local"].append(time.perf_counter() - start)
    return times


def rates(times: dict, size_bytes: int) -> dict:
    out = {}
    for direction, ts in times.items():
        mibps = [size_bytes / MIB / t for t in ts]
        out[direction] = {"median_mibps": statistics.median(mibps), "best_mibps": max(mibps), "runs": len(ts)}
    return out


def overall(rate: dict) -> float:
    return statistics.median([r["median_mibps"] for r in rate.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--block-kib", type=int, default=2048, help="region block size (default 2 MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="round trips per method")
    parser.add_argument("--src", type=int, default=0)
    parser.add_argument("--dst", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size_bytes = args.size_mib * MIB
    missing = {args.src, args.dst} - numa.allowed_nodes()
    if missing:
        sys.exit(f"bench_migrate: node(s) {sorted(missing)} not available; run under --topology numa or tiered")
    ensure_module()

    with numa_balancing_off():
        with kmod.Device() as dev:
            driver = rates(bench_driver(dev, size_bytes, args.block_kib * 1024, args.repeats, args.src,
                                        args.dst), size_bytes)
        move_pages_times, move_pages_retries = bench_move_pages(size_bytes, args.repeats, args.src, args.dst,
                                                                thp=False)
        move_pages = rates(move_pages_times, size_bytes)
        thp_times, _ = bench_move_pages(size_bytes, args.repeats, args.src, args.dst, thp=True)
        move_pages_thp = rates(thp_times, size_bytes)
        memcpy = rates(bench_memcpy(size_bytes, args.repeats), size_bytes)
    result = {
        "size_bytes": size_bytes, "block_bytes": args.block_kib * 1024, "repeats": args.repeats,
        "topology": os.environ.get("KVTIER_GUEST_TOPOLOGY"),
        "driver": driver, "move_pages": move_pages, "move_pages_thp": move_pages_thp, "memcpy": memcpy,
        "move_pages_busy_retries": move_pages_retries,
        "ratio_driver_to_move_pages": overall(driver) / overall(move_pages),
        "ratio_driver_to_move_pages_thp": overall(driver) / overall(move_pages_thp),
        "ratio_driver_to_memcpy": overall(driver) / overall(memcpy),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"migrating {args.size_mib} MiB between node {args.src} and node {args.dst}, {args.repeats} round trips"
          f" (topology {result['topology'] or 'host'}, block {args.block_kib} KiB)")
    rows = [("METHOD", "DIRECTION", "MEDIAN MiB/s", "BEST MiB/s", "RUNS")]
    for method in ("driver", "move_pages", "move_pages_thp", "memcpy"):
        for direction, r in result[method].items():
            rows.append((method, direction, f"{r['median_mibps']:.0f}", f"{r['best_mibps']:.0f}", str(r["runs"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"driver / move_pages: {result['ratio_driver_to_move_pages']:.2f}x   "
          f"driver / move_pages_thp: {result['ratio_driver_to_move_pages_thp']:.2f}x   "
          f"driver / memcpy: {result['ratio_driver_to_memcpy']:.2f}x   "
          f"(target: driver / move_pages >= 1)")
    if move_pages_retries:
        print(f"move_pages: pages retried after -EBUSY (time included): {move_pages_retries}")


if __name__ == "__main__":
    main()
