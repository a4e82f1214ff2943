#!/usr/bin/env python3
"""A/B of the client's big-block data paths in one run, against a numpy copy of the same bytes.

Usage: .venv/bin/python tools/bench_put_paths.py [--policy NAME] [--rounds N] [--max-mib M] [--json]

Modes, interleaved round by round on one daemon so that noise hits them alike: `plain` (one spared put after
the copy, memcpy copies), `staged` (the put sent before the copy, committed after it: client.STAGE_MIN_BYTES),
`staged+nt` (staged, and copies of client.NT_COPY_MIN_BYTES and more with non-temporal stores: the default).
Gets: plain copies against non-temporal ones from NT_COPY_MIN_BYTES (the client's own gets go non-temporal from
client.NT_GET_MIN_BYTES, half the last-level cache). The zero-copy paths: `put into` (Client.put_into, the caller's
copy into the daemon's slot included) and `get in place` (Client.get_views: no copy at all, the caller reads the
daemon's memory; its ratio, memcpy time / its time, is how many times over the copy it saves outweighs its round
trip). Each cell is the median over rounds of the best of several ops; ratios are memcpy time / op time (1.0: as
fast as a copy into one cache-hot buffer).
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "userspace"))

import bench_daemon  # noqa: E402
from bench_daemon import best  # noqa: E402
import kvtier.client as client_mod  # noqa: E402

NEVER = 1 << 62
MODES = {"plain": (NEVER, NEVER), "staged": (client_mod.STAGE_MIN_BYTES, NEVER),
         "staged+nt": (client_mod.STAGE_MIN_BYTES, client_mod.NT_COPY_MIN_BYTES)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="kvtier")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-mib", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="kvbench-paths-"))
    rows = []
    try:
        p, sock = bench_daemon.start_daemon(d, dram=f"{max(512, 8 * args.max_mib)}MiB", nvme="1GiB",
                                            policy=args.policy)
        try:
            with client_mod.Client(sock, "bench") as kv:
                key = 1
                size = 2 << 20
                while size <= args.max_mib << 20:
                    src = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
                    dst = np.zeros_like(src)
                    reps = max(5, min(20, (256 << 20) // size))
                    res: dict[str, list] = {}
                    for _ in range(args.rounds):
                        for mode, (stage, nt) in MODES.items():
                            client_mod.STAGE_MIN_BYTES, client_mod.NT_COPY_MIN_BYTES = stage, nt
                            client_mod.NT_GET_MIN_BYTES = nt
                            ts = []
                            for _ in range(reps):   # each put a new key, deleted outside the timing
                                key += 1
                                t = time.perf_counter()
                                kv.put(None, [(key, "input", src)])
                                ts.append(time.perf_counter() - t)
                                kv.delete([key])
                            res.setdefault(f"put {mode}", []).append(min(ts))
                            if mode != "staged":
                                key += 1
                                kv.put(None, [(key, "input", src)])
                                k = key
                                got = best(lambda: kv.get(None, [k], out=[dst]), reps)
                                assert np.array_equal(dst, src)
                                kv.delete([key])
                                res.setdefault(f"get {'nt' if mode == 'staged+nt' else 'plain'}", []).append(got)
                        # zero-copy: the caller fills the daemon's slot itself / reads the block in place
                        ts = []
                        for _ in range(reps):
                            key += 1
                            t = time.perf_counter()
                            with kv.put_into(None, [(key, "input", size)]) as slots:
                                np.copyto(slots[0], src)
                            ts.append(time.perf_counter() - t)
                            kv.delete([key])
                        res.setdefault("put into", []).append(min(ts))
                        key += 1
                        kv.put(None, [(key, "input", src)])
                        res.setdefault("get in place", []).append(bench_daemon.get_in_place_s(kv, key, reps))
                        with kv.get_views(None, [key]) as views:
                            assert np.array_equal(views[0], src)
                        kv.delete([key])
                        res.setdefault("memcpy", []).append(best(lambda: np.copyto(dst, src), reps))
                    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
                    rows.append({"block_bytes": size, **{f"{k}_us": v * 1e6 for k, v in med.items()},
                                 **{f"{k}_ratio": med["memcpy"] / v for k, v in med.items() if k != "memcpy"}})
                    size *= 2
        finally:
            bench_daemon.stop(p)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from kvtier.cli.common import human_bytes, table
    cols = ["put plain", "put staged", "put staged+nt", "put into", "get plain", "get nt", "get in place"]
    out = [["block", "memcpy us"] + [f"{c} (ratio)" for c in cols]]
    for r in rows:
        out.append([human_bytes(r["block_bytes"]), f"{r['memcpy_us']:.0f}"]
                   + [f"{r[c + '_us']:.0f} ({r[c + '_ratio']:.2f})" for c in cols])
    print(f"big-block data paths, policy {args.policy}, median of {args.rounds} rounds (us, memcpy/op; put into: "
          f"the caller copies into the daemon's slot itself, put_into; get in place: get_views, the caller reads the "
          f"daemon's memory with no copy, so its ratio is how many times over the copy it saves outweighs its round "
          f"trip, not a copy speed):")
    print(table(out))


if __name__ == "__main__":
    main()
