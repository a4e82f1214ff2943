#!/usr/bin/env python3
"""Cluster-tier benchmark: a Mooncake Store get into registered memory (the cluster tier's fetch path) for
8-64 MiB blocks, against a local memcpy of the same bytes and a Redis GET (Debian's redis-server, the simple
alternative a user might pick), all measured in this run. Prints a table of times, rates and ratios.

It starts its own processes on loopback and stops them at the end: mooncake_http_metadata_server,
mooncake_master, a storage node (mooncake_client with a 512 MiB segment) and redis-server (no persistence).
Every fetch is checked against the bytes put.

    .venv/bin/python tools/bench_cluster.py [--sizes-mib 8,16,32,64] [--reps 9]

Needs the cluster and bench extras (tools/setup installs them) and redis-server on PATH.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mib", default="8,16,32,64")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    try:
        sizes = [int(x) << 20 for x in args.sizes_mib.split(",")]
        if not sizes or min(sizes) <= 0 or max(sizes) > 256 << 20 or args.reps < 1:
            raise ValueError
    except ValueError:
        print("bench_cluster: --sizes-mib takes sizes in 1..256 MiB like 8,16 and --reps a positive count",
              file=sys.stderr)
        return 2
    if not (BIN / "mooncake_master").exists() or not shutil.which("redis-server"):
        print("bench_cluster: needs mooncake (pip extra 'cluster') and redis-server (apt)", file=sys.stderr)
        return 2
    import redis
    from mooncake.store import MooncakeDistributedStore

    tmp = Path(tempfile.mkdtemp(prefix="kvbench-"))
    procs = []
    env = {**os.environ, "MC_TCP_BIND_ADDRESS": "127.0.0.1", "GLOG_minloglevel": "2"}
    os.environ.update(MC_TCP_BIND_ADDRESS="127.0.0.1", GLOG_minloglevel="2")

    def spawn(argv, name):
        f = open(tmp / f"{name}.log", "wb")
        procs.append(subprocess.Popen([str(a) for a in argv], stdout=f, stderr=f, env=env, start_new_session=True))
        f.close()
    try:
        meta, master, node, rport = free_port(), free_port(), free_port(), free_port()
        spawn([BIN / "mooncake_http_metadata_server", "--host", "127.0.0.1", "--port", meta], "meta")
        spawn([BIN / "mooncake_master", "--rpc_address=127.0.0.1", f"--rpc_port={master}",
               "--metrics_host=127.0.0.1", f"--metrics_port={free_port()}"], "master")
        wait_port(meta)
        wait_port(master)
        spawn([BIN / "mooncake_client", "--host=127.0.0.1", "--global_segment_size=512MB",
               "--local_buffer_size=16MB", f"--master_server_address=127.0.0.1:{master}",
               f"--metadata_server=http://127.0.0.1:{meta}/metadata", "--protocol=tcp", f"--port={node}"], "node")
        wait_port(node)
        spawn(["redis-server", "--bind", "127.0.0.1", "--port", rport, "--save", "", "--appendonly", "no",
               "--protected-mode", "no", "--proto-max-bulk-len", "512mb"], "redis")
        wait_port(rport)

        store = MooncakeDistributedStore()
        rc = store.setup("127.0.0.1", f"http://127.0.0.1:{meta}/metadata", 0, 16 << 20, "tcp", "",
                         f"127.0.0.1:{master}")
        if rc != 0:
            raise RuntimeError(f"mooncake setup failed ({rc})")
        cap = 2 * max(sizes)
        buf = mmap.mmap(-1, cap)
        arr = np.frombuffer(buf, dtype=np.uint8)
        arr[:] = 1   # fault every page in: neither side pays first-touch faults in the timed part
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        if store.register_buffer(addr, cap) != 0:
            raise RuntimeError("register_buffer failed")
        r = redis.Redis(host="127.0.0.1", port=rport)
        src, dst = arr[:max(sizes)], arr[max(sizes):]
        rng = np.random.default_rng(0)
        rows = []
        for n in sizes:
            src[:n] = rng.integers(0, 256, n, dtype=np.uint8)
            payload = src[:n].tobytes()
            key = f"bench/{n}"
            rc = store.put_from(key, addr, n)
            if rc != 0:
                raise RuntimeError(f"put_from {n} bytes failed ({rc})")
            r.set(key, payload)

            def mc_get():
                got = store.get_into(key, addr + max(sizes), n)
                if got != n:
                    raise RuntimeError(f"get_into returned {got}")
            t_mc = timed(mc_get, args.reps)
            if not np.array_equal(dst[:n], src[:n]):
                raise RuntimeError("mooncake get_into returned other bytes")
            dst[:n] = 0

            def memcpy():
                np.copyto(dst[:n], src[:n])
            t_cp = timed(memcpy, args.reps)

            def redis_get():
                v = r.get(key)
                dst[:n] = np.frombuffer(v, dtype=np.uint8)   # into the same buffer, as the tier would
            t_rd = timed(redis_get, args.reps)
            if not np.array_equal(dst[:n], src[:n]):
                raise RuntimeError("redis returned other bytes")
            rows.append((n, t_cp, t_mc, t_rd))
            store.remove(key, True)
            r.delete(key)
        store.close()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"cluster tier fetch: Mooncake Store get_into registered memory (TCP, loopback, separate storage-node "
          f"process) vs local memcpy vs Redis GET; median of {args.reps}")
    hdr = ["size", "memcpy ms", "GB/s", "mooncake ms", "GB/s", "redis ms", "GB/s", "mooncake/memcpy",
           "redis/mooncake"]
    out = [hdr]
    for n, cp, mc, rd in rows:
        out.append([f"{n >> 20} MiB", f"{cp * 1e3:.2f}", f"{n / cp / 1e9:.1f}", f"{mc * 1e3:.2f}",
                    f"{n / mc / 1e9:.1f}", f"{rd * 1e3:.2f}", f"{n / rd / 1e9:.1f}", f"{mc / cp:.1f}x",
                    f"{rd / mc:.1f}x"])
    w = [max(len(r[i]) for r in out) for i in range(len(hdr))]
    for r in out:
        print("  ".join(c.rjust(w[i]) for i, c in enumerate(r)))
    print("mooncake/memcpy: how much slower a cluster fetch is than copying the bytes locally; "
          "redis/mooncake > 1: Mooncake is faster than Redis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
