#!/usr/bin/env python3
"""tools/bench_probes.py: what the eBPF probes (bpf/kvheat.bpf.c) cost per fault and per migration.

Runs in the guest (kvtier.ko loaded, bcc, two NUMA nodes):

    tools/vmtest --topology tiered -- .venv/bin/python tools/bench_probes.py [--pages N] [--rounds R]

Each case is timed with the probes detached, then attached, then detached again (the baseline is the mean
of the two detached runs, which brackets drift); the table shows time per event and the attached/detached
ratio. Cases:
  kvtier first-touch fault   a page of a kvtier.ko region touched for the first time (allocation + map)
  kvtier re-fault            a touch after KVTIER_IOC_ACCESS_RESET (minor fault: what heat sampling costs)
  anon fault, in a range     an anonymous page's first touch inside a range the probes watch
  anon fault, no range       the same outside any range (every process on the machine pays this)
  kvtier migrate (block)     KVTIER_IOC_MIGRATE of one 1-page block between nodes
  move_pages (call)          move_pages(2) of 64 anonymous pages between nodes
Timings under TCG are noisy; compare ratios, not absolute numbers.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "userspace"))

from kvtier import kmod, numa, probes  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def nodes() -> list[int]:
    out = []
    for part in open("/sys/devices/system/node/has_memory").read().strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


class Cases:
    def __init__(self, dev: kmod.Device, pages: int, far: int, watch=None):
        self.dev, self.pages, self.far = dev, pages, far
        self.watch = watch   # Probes while attached: anonymous ranges to register

    def kvtier_first_touch(self) -> tuple[float, int]:
        r = self.dev.create_region(self.pages * PAGE, PAGE, node=0)
        buf = self.dev.mmap(r)
        t = time.perf_counter()
        for i in range(self.pages):
            buf[i * PAGE] = 1
        dt = time.perf_counter() - t
        buf.close()
        self.dev.release(r.id)
        return dt, self.pages

    def kvtier_refault(self) -> tuple[float, int]:
        r = self.dev.create_region(self.pages * PAGE, PAGE, node=0, flags=kmod.CREATE_POPULATE)
        buf = self.dev.mmap(r)
        for i in range(self.pages):
            buf[i * PAGE] = 1
        self.dev.access_reset(r.id)
        t = time.perf_counter()
        for i in range(self.pages):
            buf[i * PAGE] = 2
        dt = time.perf_counter() - t
        buf.close()
        self.dev.release(r.id)
        return dt, self.pages

    def _anon(self, in_range: bool) -> tuple[float, int]:
        m = mmap.mmap(-1, self.pages * PAGE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        rid = None
        if in_range and self.watch is not None:
            rid = self.watch.add_range(os.getpid(), addr, self.pages * PAGE, 64 * PAGE)
        t = time.perf_counter()
        for i in range(self.pages):
            m[i * PAGE] = 1
        dt = time.perf_counter() - t
        if rid is not None:
            self.watch.remove_range(rid)
        m.close()
        return dt, self.pages

    def anon_in_range(self):
        return self._anon(True)

    def anon_no_range(self):
        return self._anon(False)

    def kvtier_migrate(self) -> tuple[float, int]:
        n = min(self.pages, 256)
        r = self.dev.create_region(n * PAGE, PAGE, node=0, flags=kmod.CREATE_POPULATE)
        t = time.perf_counter()
        moved = 0
        for b in range(n):
            moved += self.dev.migrate(r.id, b, 1, self.far)[1]
        dt = time.perf_counter() - t
        self.dev.release(r.id)
        assert moved == n, (moved, n)
        return dt, n

    def move_pages(self) -> tuple[float, int]:
        calls, per = 16, 64
        m = mmap.mmap(-1, calls * per * PAGE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        for i in range(calls * per):
            m[i * PAGE] = 1
        t = time.perf_counter()
        for c in range(calls):
            numa.move_pages([addr + (c * per + i) * PAGE for i in range(per)], [self.far] * per)
        dt = time.perf_counter() - t
        m.close()
        return dt, calls


CASES = [("kvtier first-touch fault", "kvtier_first_touch", "fault"),
         ("kvtier re-fault (sampling)", "kvtier_refault", "fault"),
         ("anon fault, in a range", "anon_in_range", "fault"),
         ("anon fault, no range", "anon_no_range", "fault"),
         ("kvtier migrate (1 block)", "kvtier_migrate", "block"),
         ("move_pages (64 pages)", "move_pages", "call")]


def measure(cases: Cases, rounds: int) -> dict[str, float]:
    """Median seconds per event of each case over `rounds` runs."""
    out = {}
    for _, fn, _ in CASES:
        per = []
        for _ in range(rounds):
            dt, n = getattr(cases, fn)()
            per.append(dt / n)
        out[fn] = statistics.median(per)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pages", type=int, default=2048, help="pages per fault case (default 2048)")
    ap.add_argument("--rounds", type=int, default=5, help="runs per case, median taken (default 5)")
    a = ap.parse_args()
    if a.pages < 64 or a.rounds < 1:
        ap.error("--pages must be >= 64 and --rounds >= 1")
    if not kmod.module_loaded():
        print("bench_probes: kvtier.ko is not loaded (run in the guest: tools/vmtest)", file=sys.stderr)
        return 1
    ns = nodes()
    far = ns[-1]
    dev = kmod.Device()
    plain = Cases(dev, a.pages, far)
    measure(plain, 1)   # warm up
    before = measure(plain, a.rounds)
    t = time.perf_counter()
    p = probes.Probes(heat_pages=True)
    load_s = time.perf_counter() - t
    attached = measure(Cases(dev, a.pages, far, watch=p), a.rounds)
    counted = p.counters()
    p.close()
    after = measure(plain, a.rounds)
    dev.close()
    print(f"probes: {', '.join(p.attached)}; compile+attach {load_s:.1f} s; nodes 0 -> {far}; "
          f"{a.pages} pages, median of {a.rounds}")
    print(f"events counted while attached: {counted}")
    rows = [("case", "unit", "detached us", "attached us", "ratio")]
    for label, fn, unit in CASES:
        base = (before[fn] + after[fn]) / 2
        rows.append((label, unit, f"{base * 1e6:.2f}", f"{attached[fn] * 1e6:.2f}", f"{attached[fn] / base:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
