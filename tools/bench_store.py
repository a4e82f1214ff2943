#!/usr/bin/env python3
"""bench_store: kvtier.store tier backends against their baselines, measured in the same run.

    .venv/bin/python tools/bench_store.py --dir /var/tmp [--total-mib 256] [--json]

  nvme put / get   NvmeTier (O_DIRECT, checksum, durable before put returns: one device flush on ext4/xfs)
                   from and into a page-aligned buffer (as from a memfd arena slot: no bounce copy), on the
                   same filesystem, 64 KiB .. 64 MiB blocks (target >= 0.9 for large). Baselines, fairly:
                     put      vs `dd oflag=direct,dsync` (every block durable before the next, like put)
                     put_many vs `dd oflag=direct conv=fdatasync` (one sync for the lot, like a group commit
                              of all N blocks)
                     get_into vs `dd iflag=direct`
                   `dd oflag=direct` without any sync is shown too (put_vs_dd_nosync: not durable, unfair).
  memory put/get   MemoryTier (memfd arena, pre-faulted, checksum="lazy" unless --memory-checksum commit)
                   put / get_into vs numpy.copyto of the same bytes
  codecs           zstd / lz4 ratio and MB/s on KV-like fp16 blocks; int8 / int4 size and error
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from kvtier.store import Codec, KVLayout, MemoryTier, NvmeTier, measure_error

SIZES = [64 << 10, 1 << 20, 8 << 20, 64 << 20]


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(repeats: int, fn) -> float:
    return min(timed(fn) for _ in range(repeats))


def dd_seconds(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return time.perf_counter() - t0


def bench_nvme(directory: str, total: int, repeats: int) -> list[dict]:
    rows = []
    for size in SIZES:
        n = max(4, min(2000, total // size))
        # page-aligned, like a memfd arena slot the daemon spills from / fills into
        src = mmap.mmap(-1, size)
        src[:] = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8).tobytes()
        out = mmap.mmap(-1, size)
        data, outv = memoryview(src), memoryview(out)
        work = tempfile.mkdtemp(prefix="bench-store-", dir=directory)
        try:
            ddfile = os.path.join(work, "dd")
            dd = ["if=/dev/zero", f"of={ddfile}", f"bs={size}", f"count={n}"]
            dd_w = best_of(repeats, lambda: dd_seconds(dd + ["oflag=direct"]))
            dd_dsync = best_of(repeats, lambda: dd_seconds(dd + ["oflag=direct,dsync"]))
            dd_fsync = best_of(repeats, lambda: dd_seconds(dd + ["oflag=direct", "conv=fdatasync"]))
            dd_r = best_of(repeats, lambda: dd_seconds([f"if={ddfile}", "of=/dev/null", f"bs={size}",
                                                       f"count={n}", "iflag=direct"]))
            os.unlink(ddfile)
            cap = n * (size + 4096) + (1 << 20)
            put_s, many_s, get_s = [], [], []
            for r in range(repeats):
                d = os.path.join(work, f"s{r}")
                t = NvmeTier("bench", d, cap)
                put_s.append(timed(lambda: [t.put(key(i), data) for i in range(n)]))
                get_s.append(timed(lambda: [t.get_into(key(i), outv) for i in range(n)]))
                assert out[:] == src[:]
                t.close()
                shutil.rmtree(d)
                t = NvmeTier("bench", d, cap)
                many_s.append(timed(lambda: t.put_many([(key(i), data) for i in range(n)])))
                assert t.get(key(n - 1)) == src[:]
                t.close()
                shutil.rmtree(d)
            put, many, get = min(put_s), min(many_s), min(get_s)
            mib = n * size / (1 << 20)
            rows.append({"block_bytes": size, "blocks": n, "put_mib_s": mib / put,
                         "dd_dsync_mib_s": mib / dd_dsync, "put_vs_dd_dsync": dd_dsync / put,
                         "put_many_mib_s": mib / many, "dd_fdatasync_mib_s": mib / dd_fsync,
                         "put_many_vs_dd_fdatasync": dd_fsync / many,
                         "dd_nosync_mib_s": mib / dd_w, "put_vs_dd_nosync": dd_w / put,
                         "get_mib_s": mib / get, "dd_read_mib_s": mib / dd_r, "get_vs_dd": dd_r / get})
        finally:
            shutil.rmtree(work, ignore_errors=True)
            data.release()   # the mmaps close only with no view exported
            outv.release()
            src.close()
            out.close()
    return rows


def bench_memory(total: int, repeats: int, checksum: str = "lazy") -> list[dict]:
    rows = []
    for size in SIZES:
        n = max(4, min(2000, total // size))
        src = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
        t = MemoryTier("bench", "dram", [0], n * (size + 64), backend="memfd", checksum=checksum)
        try:
            for i in range(n):  # fault the arena in: measure copies, not page allocation
                t.put(key(i), src)
            dst = np.empty(n * size, np.uint8)
            dst[:] = 1
            memcpy = best_of(repeats, lambda: [np.copyto(dst[i * size:(i + 1) * size], src) for i in range(n)])
            put = best_of(repeats, lambda: [t.put(key(i), src) for i in range(n)])
            out = np.empty(size, np.uint8)
            get = best_of(repeats, lambda: [t.get_into(key(i), out) for i in range(n)])
            assert np.array_equal(out, src)
            mib = n * size / (1 << 20)
            rows.append({"block_bytes": size, "blocks": n, "memcpy_mib_s": mib / memcpy, "put_mib_s": mib / put,
                         "put_vs_memcpy": memcpy / put, "get_into_mib_s": mib / get,
                         "get_vs_memcpy": memcpy / get, "put_us": put / n * 1e6})
        finally:
            t.close()
    return rows


def kv_like(layout: KVLayout, seed: int = 0) -> bytes:
    """fp16 K/V with structure: per-channel offsets and scales (K outliers), per-token V magnitude."""
    rng = np.random.default_rng(seed)
    shape = (layout.tokens, layout.heads, layout.head_dim)
    k = rng.normal(0, 1, shape) * rng.lognormal(0, 1, (1, layout.heads, layout.head_dim)) \
        + rng.normal(0, 2, (1, layout.heads, layout.head_dim))
    v = rng.normal(0, 1, shape) * rng.lognormal(0, 0.5, (layout.tokens, layout.heads, 1))
    return np.stack([k, v]).astype(np.float16).tobytes()


def bench_codecs(repeats: int) -> list[dict]:
    layout = KVLayout("fp16", tokens=256, heads=8, head_dim=128)  # 1 MiB: a 256-token block of one layer
    data = kv_like(layout)
    rows = []
    for kind, level in [("zstd", 1), ("zstd", 3), ("lz4", None), ("int8", None), ("int4", None)]:
        codec = Codec(kind, level=level)
        lay = layout if kind.startswith("int") else None
        blob = codec.encode(data, lay)
        enc = best_of(repeats, lambda: codec.encode(data, lay))
        dec = best_of(repeats, lambda: codec.decode(blob, lay))
        out = codec.decode(blob, lay)
        err = measure_error(data, out, layout)
        mb = len(data) / 1e6
        rows.append({"codec": kind + (f"-{level}" if level is not None else ""), "ratio": len(data) / len(blob),
                     "encode_mb_s": mb / enc, "decode_mb_s": mb / dec, "max_abs": err["max_abs"],
                     "rel_rms": err["rel_rms"]})
    return rows


def table(rows: list[dict], title: str) -> str:
    cols = list(rows[0])
    fmt = [max(len(c), 10) for c in cols]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(cols, fmt))]
    for r in rows:
        cells = []
        for c, w in zip(cols, fmt):
            v = r[c]
            cells.append((f"{v:.3g}" if isinstance(v, float) and (abs(v) < 0.01 and v) else
                          f"{v:.2f}" if isinstance(v, float) else str(v)).rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="directory on the filesystem under test")
    ap.add_argument("--total-mib", type=int, default=256, help="bytes per block size and measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-checksum", choices=["lazy", "commit"], default="lazy")
    ap.add_argument("--skip-nvme", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    total = args.total_mib << 20
    res = {"nvme": [] if args.skip_nvme else bench_nvme(args.dir, total, args.repeats),
           "memory": bench_memory(total, args.repeats, args.memory_checksum),
           "codecs": bench_codecs(args.repeats)}
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        print()
    else:
        if res["nvme"]:
            print(table(res["nvme"], f"NvmeTier on {args.dir} vs dd O_DIRECT (put: durable per block, vs dd "
                                     "dsync; put_many: one group commit, vs dd conv=fdatasync; nosync: not "
                                     "durable)"))
            print()
        print(table(res["memory"], f"MemoryTier (memfd, checksum={args.memory_checksum}) vs numpy memcpy"))
        print()
        print(table(res["codecs"], "codecs on a KV-like fp16 block (256 tokens x 8 heads x 128)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
