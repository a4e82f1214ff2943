#!/usr/bin/env python3
"""bench_gpu: the GPU tier's prefetch bandwidth against cudaMemcpy of pinned memory, measured in the same run.

    .venv/bin/python tools/bench_gpu.py [--sizes 64MiB,256MiB,1GiB] [--reps 5] [--device 0] [--json] [--standin]

For each size S, on one GPU:
  memcpy h2d / d2h     cudaMemcpyAsync between pinned host memory (cudaMallocHost) and device memory
                       (cudaMalloc) of S bytes: the baseline.
  prefetch h2d         the GPU tier's promotion (kvtier.cuda.uvm.ManagedArena.to_device: cudaMemPrefetchAsync,
                       then SetPreferredLocation advice; SetAccessedBy was set once, at allocation) of S bytes of
                       managed memory whose pages are on the host; the advice call is inside the timed window.
  prefetch d2h         the tier's demotion (to_host: SetPreferredLocation host, prefetch to the host).
  copy d2h             cudaMemcpyAsync from the GPU-resident managed pages into the pinned buffer: what the link
                       gives from managed memory without UVM's page migration (host pages allocated per move).
All five are timed with CUDA events on the stream doing the work; the median of --reps runs (after one warm-up)
is reported with the ratio prefetch / memcpy (target: >= 0.8).

It never asks for more than the GPU has free: sizes above a quarter of free memory are skipped (the managed
buffer and the device buffer are both on the GPU at once). Without a GPU (or driver, or cuda-python) it prints
why on one line and exits 0, measuring nothing; --standin runs the same code against kvtier.cuda.standin (host
memory: checks the script, the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from kvtier.cuda import runtime as runtime_mod
from kvtier.cuda.uvm import ManagedArena

TARGET = 0.8


def parse_size(text: str) -> int:
    from kvtier.daemon.config import parse_size as ps
    from kvtier.errors import InputError
    try:
        return ps(text, "--sizes")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def timed(rt, stream, fn) -> float:
    """Seconds between two events recorded around fn() on `stream`."""
    start, end = rt.event_create(timing=True), rt.event_create(timing=True)
    try:
        rt.event_record(start, stream)
        fn()
        rt.event_record(end, stream)
        rt.event_synchronize(end)
        return rt.event_elapsed_ms(start, end) / 1e3
    finally:
        rt.event_destroy(start)
        rt.event_destroy(end)


def bench_size(rt, device: int, size: int, reps: int) -> dict:
    arena = ManagedArena(rt, device, size, host_node=None)
    pinned = dev = 0
    try:
        pinned = rt.malloc_host(size)
        dev = rt.malloc(size)
        stream = arena.h2d
        # touch every managed page from the CPU (first-touch allocation is not what is measured)
        np.asarray(arena.view)[:] = 0x5A
        times = {"memcpy_h2d": [], "memcpy_d2h": [], "prefetch_h2d": [], "prefetch_d2h": [], "copy_d2h": []}
        for rep in range(reps + 1):
            t = {"memcpy_h2d": timed(rt, stream, lambda: rt.memcpy(dev, pinned, size, stream)),
                 "memcpy_d2h": timed(rt, stream, lambda: rt.memcpy(pinned, dev, size, stream))}
            arena.wait(arena.to_host(0, size))   # pages on the host before the timed promotion
            t["prefetch_h2d"] = timed(rt, arena.h2d, lambda: arena.to_device(0, size))
            arena.wait_all()
            # the copy engine reading the same GPU-resident managed pages: the link, without UVM's migration
            t["copy_d2h"] = timed(rt, stream, lambda: rt.memcpy(pinned, arena.ptr, size, stream))
            t["prefetch_d2h"] = timed(rt, arena.d2h, lambda: arena.to_host(0, size))
            arena.wait_all()
            if rep:   # the first run warms up
                for k, v in t.items():
                    times[k].append(v)
        if bytes(arena.view[:64]) != b"\x5a" * 64 or bytes(arena.view[-64:]) != b"\x5a" * 64:
            raise RuntimeError("managed memory changed across prefetches")
        out = {"size_bytes": size}
        for k, v in times.items():
            out[k + "_gbps"] = size / statistics.median(v) / 1e9 if statistics.median(v) > 0 else float("inf")
        out["ratio_h2d"] = out["prefetch_h2d_gbps"] / out["memcpy_h2d_gbps"]
        out["ratio_d2h"] = out["prefetch_d2h_gbps"] / out["memcpy_d2h_gbps"]
        out["ratio_copy_d2h"] = out["copy_d2h_gbps"] / out["memcpy_d2h_gbps"]
        return out
    finally:
        if dev:
            rt.free(dev)
        if pinned:
            rt.free_host(pinned)
        arena.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64MiB,256MiB,1GiB",
                    type=lambda s: [parse_size(x) for x in s.split(",") if x])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--standin", action="store_true", help="run against the recording stand-in (no GPU)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps: at least 1")

    if args.standin:
        from kvtier.cuda import standin
        standin.reset(total_bytes=max(args.sizes) * 8)
        rt = runtime_mod.load(standin=True)
        name = standin.NAME + " (host memory: numbers mean nothing)"
    else:
        from kvtier.cuda.discover import discover_gpus
        report = discover_gpus()
        if not report.present or args.device >= len(report.gpus):
            why = report.reason if not report.present else f"no GPU {args.device}"
            print(f"bench_gpu: skipped: {why}")
            return 0
        name = report.gpus[args.device].name
        try:
            rt = runtime_mod.load(standin=False)
        except ImportError as e:
            print(f"bench_gpu: skipped: cuda-python not installed ({e})")
            return 0
    rt.set_device(args.device)
    rows, skipped = [], []
    for size in args.sizes:
        free, _ = rt.mem_get_info()
        if size * 4 > free:   # managed + device buffer on the GPU, with room to spare
            skipped.append({"size_bytes": size, "reason": f"more than a quarter of the {free} bytes free"})
            continue
        rows.append(bench_size(rt, args.device, size, args.reps))
    result = {"device": args.device, "name": name, "reps": args.reps, "target_ratio": TARGET, "rows": rows,
              "skipped": skipped, "standin": args.standin}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from kvtier.cli.common import human_bytes, table
    print(f"GPU {args.device}: {name}; median of {args.reps} runs; ratio = prefetch / memcpy of pinned memory "
          f"(target >= {TARGET})")
    t = [["SIZE", "MEMCPY H2D GB/s", "PREFETCH H2D GB/s", "RATIO H2D", "MEMCPY D2H GB/s", "PREFETCH D2H GB/s",
          "RATIO D2H", "COPY D2H RATIO", "MEETS"]]
    for r in rows:
        ok = r["ratio_h2d"] >= TARGET and r["ratio_d2h"] >= TARGET
        t.append([human_bytes(r["size_bytes"]), f"{r['memcpy_h2d_gbps']:.2f}", f"{r['prefetch_h2d_gbps']:.2f}",
                  f"{r['ratio_h2d']:.2f}", f"{r['memcpy_d2h_gbps']:.2f}", f"{r['prefetch_d2h_gbps']:.2f}",
                  f"{r['ratio_d2h']:.2f}", f"{r['ratio_copy_d2h']:.2f}", "yes" if ok else "no"])
    print(table(t, right={1, 2, 3, 4, 5, 6, 7}))
    for s in skipped:
        print(f"skipped {human_bytes(s['size_bytes'])}: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
