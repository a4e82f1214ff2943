"""kvtierd's engine API throughput and overheads, as ratios to baselines measured in the same run.

  1. put/get of one block through the API (client library, zero-copy: the client writes into / copies out of the
     daemon's memfd arena) for 64 KiB..64 MiB blocks, vs a numpy copy of the same bytes between two buffers.
     put = reserve + client write + commit (O(1): the memory tier checksums lazily, when a block leaves it);
     get = lookup in the block directory + client copy + a touch message it does not wait for (a block not in
     the first tier: a round trip for lookup and lease, copy, release); in place = get_views: lookup + release,
     the caller reads the daemon's memory itself (no copy: the time an engine pays before its own H2D copy out of
     that memory).
  2. per-op overhead for small (64-byte) blocks: one block per call, and per block in batches of 256, each
     marked against the 20 µs target.
  3. NVMe spill (put durable=True: written through with O_DIRECT straight from the arena slot, durable before
     the ack: one device flush on ext4/xfs, see kvtier/store/nvme.py) vs `dd oflag=direct,dsync` (each block
     durable before the next: the fair baseline for a durable put), and fill (get of a block only on NVMe, read
     with O_DIRECT straight into the arena slot, checksum verified) vs `dd iflag=direct`, same sizes, same
     filesystem. Spill, fill and both dd runs alternate round by round (--nvme-rounds, default 3) and the
     median ratio is reported.
  4. spill under memory pressure: a stream of plain (not durable) 1 MiB puts into a full DRAM tier, so every put
     displaces a block to NVMe, once with the default free target (background reclaim: victims demoted in
     batches, written by the writer thread, one device flush per batch) and once with free_target = 0 (each
     put demotes its victim itself, one durable write each, the behaviour before reclaim), vs `dd oflag=direct`
     writing as many blocks over an existing file (conv=fdatasync: one flush for the lot; and without any
     flush), rounds interleaved (--nvme-rounds).
  5. contains() lookups per second with N stored blocks, and the daemon's memory per stored block
     (anonymous RSS delta / blocks: the index, policy state and allocator; block bytes are in the arena).
     The fill's put calls are timed too (median, p99, worst), and the fill runs again on a daemon with
     gc_freeze = false (CPython's collector as it is): the collector's pauses in both, from `kvctl status`.

  The small-op table also measures the transport floor (a bare Python SEQPACKET round trip, same run) and marks the
  target against each op's latency over that floor: kvtier's own cost per call.

    .venv/bin/python tools/bench_daemon.py [--keys 1000000] [--max-mib 64] [--cpu N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvtier.client import Client, admin_call


def rss(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def get_in_place_s(kv, key, repeat: int) -> float:
    """Best time of a zero-copy get (get_views) of a stored block: the caller reads the daemon's memory, no copy."""
    def in_place():
        with kv.get_views(None, [key]) as views:
            assert views[0] is not None
    return best(in_place, repeat)


def best(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def start_daemon(d: Path, dram: str, nvme: str, policy: str = "kvtier",
                 busy_poll_us: int | None = None, prefault: bool = False,
                 gc_freeze: bool = True, free_target: str | None = None) -> tuple[subprocess.Popen, str]:
    cfg = d / "bench.toml"
    cfg.write_text(f"""
socket = "{d}/s"
state_dir = "{d}"
metrics = ""
policy = "{policy}"
gc_freeze = {"true" if gc_freeze else "false"}
{"" if busy_poll_us is None else f"busy_poll_us = {busy_poll_us}"}
[blocks]
min_bytes = 1
max_bytes = "256MiB"
nominal_bytes = 64
[[tiers]]
name = "dram0"
kind = "dram"
capacity = "{dram}"
prefault = {"true" if prefault else "false"}
{"" if free_target is None else f'free_target = "{free_target}"'}
[[tiers]]
name = "nvme0"
kind = "nvme"
directory = "{d}/nvme"
capacity = "{nvme}"
""")
    log = open(d / "kvtierd.log", "wb")
    p = subprocess.Popen([str(Path(sys.executable).parent / "kvtierd"), "--config", str(cfg), "--log-level",
                          "warning"], stdout=log, stderr=log)
    sock = f"{d}/s"
    for _ in range(400):
        try:
            admin_call(sock, "stats")
            return p, sock
        except OSError:
            time.sleep(0.05)
    raise SystemExit(open(d / "kvtierd.log").read())


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(60)


def bench_throughput(sock: str, max_mib: int, settle_s: float = 0.0) -> list[dict]:
    rows = []
    key = [10_000_000]
    with Client(sock, "bench") as kv:
        time.sleep(settle_s)   # a prefaulted arena: let the daemon's and this client's background populate finish
        size = 64 << 10
        while size <= max_mib << 20:
            src = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
            dst = np.empty_like(src)
            dst.fill(0)   # fair: the baseline's destination is faulted in, as a (prefaulted) arena slot is
            repeat = max(5, min(200, (256 << 20) // size))
            memcpy_s = best(lambda: np.copyto(dst, src), repeat)

            def put(wait=True):
                key[0] += 1
                kv.put(None, [(key[0], "input", src)], wait=wait)
            # the first put of this size: into arena memory not written yet unless the arena was prefaulted
            t = time.perf_counter()
            put()
            first_s = time.perf_counter() - t
            kv.delete([key[0]])
            # first touch of the arena's pages happens once, in the warm-up rounds
            stream = max(4, min(64, (192 << 20) // size))

            def put_stream() -> float:
                first = key[0] + 1
                t = time.perf_counter()
                for _ in range(stream):
                    put(wait=False)
                kv.flush()
                dt = (time.perf_counter() - t) / stream
                kv.delete(list(range(first, key[0] + 1)))
                return dt
            put_stream()
            stream_s = min(put_stream() for _ in range(3))
            # a stream writes `stream` distinct slots (more than a cache holds): its baseline copies into as many
            # distinct destinations, faulted in, not into one cache-hot buffer
            dsts = [np.zeros_like(src) for _ in range(stream)]

            def copy_stream():
                for x in dsts:
                    np.copyto(x, src)
            memcpy_stream_s = best(copy_stream, 3) / stream
            del dsts
            put_ts = []
            for _ in range(repeat):
                t = time.perf_counter()
                put()
                put_ts.append(time.perf_counter() - t)
                kv.delete([key[0]])
            put()
            k = key[0]
            out = [dst]
            get_s = best(lambda: kv.get(None, [k], out=out), repeat)
            assert np.array_equal(dst, src)

            in_place_s = get_in_place_s(kv, k, repeat)
            kv.delete([k])
            put_s = min(put_ts)
            rows.append({"block_bytes": size, "memcpy_gbps": size / memcpy_s / 1e9, "put_gbps": size / put_s / 1e9,
                         "put_stream_gbps": size / stream_s / 1e9, "put_stream_ratio": memcpy_stream_s / stream_s,
                         "memcpy_stream_gbps": size / memcpy_stream_s / 1e9,
                         "get_gbps": size / get_s / 1e9, "put_ratio": memcpy_s / put_s, "get_ratio": memcpy_s / get_s,
                         "put_us": put_s * 1e6, "get_us": get_s * 1e6, "memcpy_us": memcpy_s * 1e6,
                         "get_in_place_us": in_place_s * 1e6, "get_in_place_ratio": memcpy_s / in_place_s,
                         "first_put_us": first_s * 1e6, "first_put_ratio": memcpy_s / first_s})
            size *= 4 if size < (1 << 20) else 2
    return rows


TARGET_US = 20.0   # the per-operation overhead target for small blocks


def round_trip_floor_us(n: int = 5000, spin_s: float = 0.0, echo_spin_s: float = 0.0) -> float:
    """The transport alone: a 64-byte SOCK_SEQPACKET ping-pong between this process and a forked echo child,
    the same kind of socket and wake-ups as one API call, with no kvtier code on either side. Both ends spin
    for a message as the client (spin_s) and the daemon (echo_spin_s, its busy_poll_us) do."""
    import socket
    from kvtier.daemon.protocol import recv_reply
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        a.close()
        while True:
            m, _, _ = recv_reply(b, echo_spin_s)
            if not m:
                os._exit(0)
            b.send(m)
    b.close()
    msg = b"x" * 64
    buf = bytearray(256)
    for _ in range(200):
        a.send(msg)
        recv_reply(a, spin_s, buf)
    t = time.perf_counter()
    for _ in range(n):
        a.send(msg)
        recv_reply(a, spin_s, buf)
    dt = (time.perf_counter() - t) / n
    a.close()
    os.waitpid(pid, 0)
    return dt * 1e6


def bench_small(sock: str, client_spin_s: float | None = None, daemon_spin_s: float = 500e-6) -> dict:
    with Client(sock, "bench", **({} if client_spin_s is None else {"busy_poll_s": client_spin_s})) as kv:
        payload = b"x" * 64
        n = 3000
        base = 20_000_000
        t = time.perf_counter()
        for i in range(n):
            kv.put(None, [(base + i, "input", payload)])
        put1 = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for i in range(n):
            kv.put(None, [(base + 50_000 + i, "input", payload)], wait=False)
        kv.flush()
        put_async = (time.perf_counter() - t) / n
        kv.delete([base + 50_000 + i for i in range(n)])
        # the same puts paced at one per synchronous put's time, a load the daemon keeps up with: what the
        # caller's thread spends per put (most go without any reply: see Client._put_one_nowait)
        spent = []
        for i in range(n):
            t = time.perf_counter()
            kv.put(None, [(base + 200_000 + i, "input", payload)], wait=False)
            t2 = time.perf_counter()
            spent.append(t2 - t)
            while time.perf_counter() - t2 < put1:
                pass
        kv.flush()
        spent.sort()
        kv.delete([base + 200_000 + i for i in range(n)])
        t = time.perf_counter()
        for i in range(n):
            kv.get(None, [base + i])
        get1 = (time.perf_counter() - t) / n
        batch = 256
        with Client(sock, "bench", directory=False,
                    **({} if client_spin_s is None else {"busy_poll_s": client_spin_s})) as asking:
            t = time.perf_counter()
            for i in range(n):
                asking.get(None, [base + i])
            get_asking1 = (time.perf_counter() - t) / n
            t = time.perf_counter()
            for j in range(0, n, batch):
                asking.get(None, [base + j + i for i in range(min(batch, n - j))])
            get_asking_b = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for i in range(n):
            kv.contains([base + i])
        cont1 = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for j in range(0, n * 4, batch):
            kv.put(None, [(base + 100_000 + j + i, "input", payload) for i in range(batch)])
        putb = (time.perf_counter() - t) / (n * 4)
        t = time.perf_counter()
        for j in range(0, n * 4, batch):
            kv.get(None, [base + 100_000 + j + i for i in range(batch)])
        getb = (time.perf_counter() - t) / (n * 4)
        kv.delete([base + i for i in range(n)] + [base + 100_000 + i for i in range(n * 4)])
        spin_us = kv.busy_poll_s * 1e6
    floor = round_trip_floor_us(spin_s=spin_us / 1e6, echo_spin_s=daemon_spin_s)
    return {"round_trip_floor_us": floor, "client_spin_us": spin_us, "put_us_per_op": put1 * 1e6,
            "put_pipelined_us_per_op": put_async * 1e6, "put_submit_us_per_op": sum(spent) / n * 1e6,
            "put_submit_median_us": spent[n // 2] * 1e6, "put_submit_p99_us": spent[int(n * 0.99)] * 1e6,
            "get_us_per_op": get1 * 1e6,
            "get_asking_us_per_op": get_asking1 * 1e6, "get_asking_us_per_block_batch256": get_asking_b * 1e6,
            "contains_us_per_op": cont1 * 1e6,
            "put_us_per_block_batch256": putb * 1e6, "get_us_per_block_batch256": getb * 1e6}


def dd(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return time.perf_counter() - t


def device_io(path: Path) -> tuple[int, int] | None:
    """(write requests, flush requests) completed by the block device holding `path` (/sys/dev/block/M:m/stat
    fields 5 and 16): a journal commit shows as extra writes, a plain fdatasync as one flush."""
    st = os.stat(path)
    try:
        fields = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat").read_text().split()
    except OSError:
        return None
    return (int(fields[4]), int(fields[15])) if len(fields) >= 16 else None


def io_per_op(a, b, n: int) -> list[float] | None:
    return None if a is None or b is None else [(y - x) / n for x, y in zip(a, b)]


def bench_nvme(sock: str, d: Path, pid: int, rounds: int = 3) -> list[dict]:
    """Per size: one first pass (the store's data file grows), then `rounds` rounds of [spill, fill, dd write,
    dd read], so each ratio compares runs seconds apart on this noisy virtual disk; the median ratio is
    reported, with the range over rounds."""
    rows = []
    with Client(sock, "bench") as kv:
        for size in (1 << 20, 8 << 20, 32 << 20):
            count = max(4, (128 << 20) // size)
            src = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
            base = 30_000_000 + size
            keys = [base + i for i in range(count)]
            t = time.perf_counter()
            for k in keys:
                kv.put(None, [(k, "input", src)], durable=True)
            first_s = (time.perf_counter() - t) / count
            kv.delete(keys)
            kv.put(None, [(base - 1, "input", src)], durable=True)   # warm-up
            f = d / "nvme" / "dd.bin"
            # fills copy into one buffer, faulted in here, as an engine reuses its own (a fresh 32 MiB array costs
            # ~40 ms of page faults on this VM, charged to whichever get touched it first)
            out = [np.zeros_like(src)]
            # dd's first pass creates its file as the store's grew its own; its rounds then overwrite it
            w_first = dd(["if=/dev/zero", f"of={f}", f"bs={size}", f"count={count}", "oflag=direct,dsync"]) / count
            per = []
            for _ in range(rounds):
                f0 = device_io(d)
                t = time.perf_counter()
                for k in keys:
                    kv.put(None, [(k, "input", src)], durable=True)
                spill_s = (time.perf_counter() - t) / count
                f1 = device_io(d)
                # drop the memory copies (evict to NVMe: they are durable, so only the memory copy goes)
                for _ in keys:
                    for b in admin_call(sock, "blocks", tier="dram0", limit=50)["blocks"]:
                        admin_call(sock, "evict", block=b["block"])
                os.sync()   # (no drop_caches: both read with O_DIRECT, and it would evict the daemon's code pages)
                t = time.perf_counter()
                n_fill = 0
                for k in keys:
                    n_fill += kv.get(None, [k], out=out)[0] is not None
                fill_s = (time.perf_counter() - t) / max(1, n_fill)
                served = kv.last_served
                kv.delete(keys)
                f2 = device_io(d)
                w = dd(["if=/dev/zero", f"of={f}", f"bs={size}", f"count={count}", "oflag=direct,dsync",
                        "conv=notrunc"]) / count
                f3 = device_io(d)
                r = dd([f"if={f}", "of=/dev/null", f"bs={size}", f"count={count}", "iflag=direct"]) / count
                per.append({"spill_s": spill_s, "fill_s": fill_s, "w": w, "r": r, "fills": n_fill,
                            "served": served, "spill_io": io_per_op(f0, f1, count), "dd_io": io_per_op(f2, f3, count)})
            f.unlink()
            kv.delete([base - 1])
            med = statistics.median
            spill_ratios = [p["w"] / p["spill_s"] for p in per]
            fill_ratios = [p["r"] / p["fill_s"] for p in per]
            rows.append({"block_bytes": size, "rounds": rounds,
                         "spill_mbps": med(size / p["spill_s"] / 1e6 for p in per),
                         "dd_write_mbps": med(size / p["w"] / 1e6 for p in per),
                         "spill_ratio": med(spill_ratios), "spill_ratio_range": [min(spill_ratios), max(spill_ratios)],
                         "first_pass_spill_ratio": w_first / first_s,
                         "fill_mbps": med(size / p["fill_s"] / 1e6 for p in per),
                         "dd_read_mbps": med(size / p["r"] / 1e6 for p in per),
                         "fill_ratio": med(fill_ratios), "fill_ratio_range": [min(fill_ratios), max(fill_ratios)],
                         "fills": min(p["fills"] for p in per), "last_served_from": per[-1]["served"],
                         # device [writes, flushes] per op, last round (the whole disk: others' I/O counts too)
                         "spill_io_per_op": per[-1]["spill_io"], "dd_io_per_op": per[-1]["dd_io"]})
    return rows


def bench_pressure(d: Path, policy: str, rounds: int = 3, size: int = 1 << 20, dram_mib: int = 1024,
                   total_mib: int = 256) -> dict:
    """Spill under memory pressure (see the top): per mode, the mean time per put of a stream of `total_mib` of
    puts into a full DRAM tier and the median and p99 put call; dd's times per block of the same size."""
    n = (total_mib << 20) // size
    src = np.random.default_rng(7).integers(0, 255, size, dtype=np.uint8)
    f = d / "pressure-dd.bin"
    dd(["if=/dev/zero", f"of={f}", f"bs={size}", f"count={n}", "oflag=direct"])   # dd overwrites from here on
    modes = {"reclaim": None, "in the put": "0"}   # None: the default free target
    daemons = {}
    out = {m: [] for m in modes}
    out["dd_fdatasync"], out["dd_nosync"] = [], []
    try:
        for m, ft in modes.items():
            sub = d / f"pressure-{len(daemons)}"
            sub.mkdir()
            p, sock = start_daemon(sub, dram=f"{dram_mib}MiB", nvme=f"{2 * total_mib + 2 * dram_mib}MiB",
                                   policy=policy, free_target=ft)
            daemons[m] = (p, sock, Client(sock, "bench"), [0])
            kv, key = daemons[m][2], daemons[m][3]

            def puts(count, kv=kv, key=key):
                for _ in range(count):
                    key[0] += 1
                    kv.put(None, [(key[0], "input", src)])
            puts(n + dram_mib)   # the NVMe data file grows once; then it is overwritten, like dd's file
            kv.delete(list(range(1, key[0] + 1)))
            puts(dram_mib)       # DRAM full again: from here every put displaces a block
        for _ in range(rounds):
            for m, (p, sock, kv, key) in daemons.items():
                c0 = admin_call(sock, "stats")["counters"]
                ts = []
                t = time.perf_counter()
                for _ in range(n):
                    key[0] += 1
                    t1 = time.perf_counter()
                    kv.put(None, [(key[0], "input", src)])
                    ts.append(time.perf_counter() - t1)
                total = time.perf_counter() - t
                c1 = admin_call(sock, "stats")["counters"]
                ts.sort()
                out[m].append({"put_s": total / n, "median_s": ts[n // 2], "p99_s": ts[int(n * 0.99)],
                               "demotions": c1["demotions"] - c0["demotions"],
                               "written_back": c1["writeback_blocks"] - c0["writeback_blocks"]})
            out["dd_fdatasync"].append(dd(["if=/dev/zero", f"of={f}", f"bs={size}", f"count={n}", "oflag=direct",
                                           "conv=notrunc,fdatasync"]) / n)
            out["dd_nosync"].append(dd(["if=/dev/zero", f"of={f}", f"bs={size}", f"count={n}", "oflag=direct",
                                        "conv=notrunc"]) / n)
    finally:
        for p, _, kv, _ in daemons.values():
            kv.close()
            stop(p)
        f.unlink(missing_ok=True)
    med = statistics.median
    rows = []
    for m in modes:
        r = out[m]
        rows.append({"mode": m, "block_bytes": size, "put_us": med(x["put_s"] for x in r) * 1e6,
                     "median_put_us": med(x["median_s"] for x in r) * 1e6,
                     "p99_put_us": med(x["p99_s"] for x in r) * 1e6,
                     "vs_dd_fdatasync": med(dd_t / x["put_s"] for dd_t, x in zip(out["dd_fdatasync"], r)),
                     "vs_dd_nosync": med(dd_t / x["put_s"] for dd_t, x in zip(out["dd_nosync"], r)),
                     "written_back_share": sum(x["written_back"] for x in r) / max(1, sum(x["demotions"] for x in r))})
    return {"rows": rows, "rounds": rounds, "puts": n, "dram_mib": dram_mib,
            "dd_fdatasync_us": med(out["dd_fdatasync"]) * 1e6, "dd_nosync_us": med(out["dd_nosync"]) * 1e6}


def bench_contains(sock: str, pid: int, keys: int) -> dict:
    before = rss(pid)
    calls = []
    with Client(sock, "bench") as kv:
        payload = b"k" * 64
        t = time.perf_counter()
        for j in range(0, keys, 2048):
            blocks = [(40_000_000 + j + i, "input", payload) for i in range(min(2048, keys - j))]
            c = time.perf_counter()
            kv.put(None, blocks)
            calls.append(time.perf_counter() - c)
        fill_s = time.perf_counter() - t
        after = rss(pid)
        probe = list(range(40_000_000, 40_000_000 + keys, max(1, keys // 200_000)))
        t = time.perf_counter()
        found = kv.contains(probe)
        look_s = time.perf_counter() - t
        assert all(f is not None for f in found)
    st = admin_call(sock, "stats")
    calls.sort()
    return {"stored_blocks": st["blocks"], "contains_per_s": len(probe) / look_s, "fill_s": fill_s,
            "put_blocks_per_s": keys / fill_s, "collector": st["collector"],
            "put_call_ms": {"blocks": 2048, "median": 1e3 * calls[len(calls) // 2],
                            "p99": 1e3 * calls[min(len(calls) - 1, int(0.99 * len(calls)))], "max": 1e3 * calls[-1]},
            "anon_bytes_per_block": (after["RssAnon"] - before["RssAnon"]) / keys,
            "shmem_bytes_per_block": (after["RssShmem"] - before["RssShmem"]) / keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--max-mib", type=int, default=64)
    ap.add_argument("--skip-nvme", action="store_true")
    ap.add_argument("--nvme-rounds", type=int, default=3,
                    help="rounds of spill/fill and dd per size, interleaved; the median ratio is reported")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cpu", type=int, default=None,
                    help="pin the daemon and this client to one CPU: on a VM, a wake-up across idle vCPUs costs "
                         "tens of microseconds of the hypervisor's, which this takes out of the small-op numbers")
    ap.add_argument("--policy", default="kvtier", help="the daemon's policy (default: kvtier, the daemon's default)")
    ap.add_argument("--no-prefault", action="store_true",
                    help="do not prefault the DRAM arena (first puts then fault its pages in one by one)")
    args = ap.parse_args()
    from kvtier.cli.common import human_bytes, table
    from kvtier.store.memory import shmem_pmd_bytes, shmem_thp_mode

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})   # the daemon (a child) inherits it
    d = Path(tempfile.mkdtemp(prefix="kvbench-", dir=os.environ.get("KVTIER_BENCH_DIR", "/var/tmp")))
    result = {}
    try:
        # pinned to one CPU, a daemon that keeps polling after a reply only takes the CPU from the client
        p, sock = start_daemon(d, dram=f"{max(512, 4 * args.max_mib)}MiB", nvme="2GiB", policy=args.policy,
                               prefault=not args.no_prefault, busy_poll_us=0 if args.cpu is not None else None)
        try:
            result["throughput"] = bench_throughput(sock, args.max_mib, 0 if args.no_prefault else 2.0)
            result["shmem_thp"] = {"mode": shmem_thp_mode(), "daemon_pmd_mapped_bytes": shmem_pmd_bytes(p.pid)}
            result["small"] = bench_small(sock, daemon_spin_s=0 if args.cpu is not None else 500e-6)
            if not args.skip_nvme:
                result["nvme"] = bench_nvme(sock, d, p.pid, max(1, args.nvme_rounds))
        finally:
            stop(p)
        if not args.skip_nvme:
            result["pressure"] = bench_pressure(d, args.policy, max(1, args.nvme_rounds))
        for freeze in (True, False):   # the daemon's collector against CPython's own, same fill
            p, sock = start_daemon(d, dram=f"{max(256, args.keys * 64 // (1 << 20) * 2)}MiB", nvme="64MiB",
                                   policy=args.policy, gc_freeze=freeze)
            try:
                result["contains" if freeze else "contains_gc_unfrozen"] = bench_contains(sock, p.pid, args.keys)
            finally:
                stop(p)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    rows = [["block", "memcpy GB/s", "put GB/s", "put/memcpy", "pipelined put GB/s", "ratio", "get GB/s",
             "get/memcpy", "put us", "get us", "in place us", "memcpy/in place", "first put us", "first/memcpy"]]
    for r in result["throughput"]:
        rows.append([human_bytes(r["block_bytes"]), f"{r['memcpy_gbps']:.2f}", f"{r['put_gbps']:.2f}",
                     f"{r['put_ratio']:.2f}", f"{r['put_stream_gbps']:.2f}", f"{r['put_stream_ratio']:.2f}",
                     f"{r['get_gbps']:.2f}", f"{r['get_ratio']:.2f}", f"{r['put_us']:.0f}", f"{r['get_us']:.0f}",
                     f"{r['get_in_place_us']:.0f}", f"{r['get_in_place_ratio']:.2f}",
                     f"{r['first_put_us']:.0f}", f"{r['first_put_ratio']:.2f}"])
    print("put/get of one block through the API vs numpy copy of the same bytes (best of N; pipelined put: a "
          "stream of puts with wait=False, commit replies read by the next call, vs copies into as many distinct "
          "buffers; in place: get_views, the caller reads the daemon's memory with no copy, so memcpy/in place "
          "is how many times over the copy it saves outweighs its round trip):")
    thp = result["shmem_thp"]
    print(f"(DRAM arena prefaulted: {'no' if args.no_prefault else 'yes'}; first put: the first put of that size, "
          f"before any warm-up; shmem THP: {thp['mode']}, daemon memory on 2 MiB pages: "
          f"{human_bytes(thp['daemon_pmd_mapped_bytes'])})")
    print(table(rows, right=set(range(1, 14))))
    s = result["small"]
    print(f"\nsmall (64 B) blocks, per-operation overhead against the target of {TARGET_US:.0f} us "
          f"(one block per call includes the socket round trips: put and contains 1 each, a get none when the block "
          f"is in the first tier (kvtier.daemon.directory: it tells the daemon in a message it does not wait for), "
          f"else 1; a put copies into a spare slot the previous put's reply handed out):")
    floor = s["round_trip_floor_us"]
    print(f"(transport floor, same run: a 64-byte SOCK_SEQPACKET round trip between two Python processes with no "
          f"kvtier code = {floor:.1f} us; CPU pinned: {'no' if args.cpu is None else args.cpu}; client spin for a "
          f"reply: {s['client_spin_us']:.0f} us; daemon policy: {args.policy})")
    rows = [["op", "one block per call, us", "over the floor, us", f"target {TARGET_US:.0f} us",
             "batch of 256, us/block", f"target {TARGET_US:.0f} us"]]
    for name, one, batch in (("put", "put_us_per_op", "put_us_per_block_batch256"),
                             ("put pipelined (wait=False), back to back", "put_pipelined_us_per_op", None),
                             ("put submitted (wait=False), paced at the put's rate", "put_submit_us_per_op", None),
                             ("get (read through the block directory)", "get_us_per_op",
                              "get_us_per_block_batch256"),
                             ("get, asking the daemon (directory=False)", "get_asking_us_per_op",
                              "get_asking_us_per_block_batch256"),
                             ("contains", "contains_us_per_op", None)):
        over = s[one] - (floor if one != "put_submit_us_per_op" else 0)   # a submit waits for no round trip
        rows.append([name, f"{s[one]:.1f}", f"{over:.1f}", "met" if over < TARGET_US else "NOT met",
                     f"{s[batch]:.1f}" if batch else "-",
                     ("met" if s[batch] < TARGET_US else "NOT met") if batch else "-"])
    print(table(rows, right={1, 2, 4}))
    print(f"(put submitted: the caller's time per put(wait=False) when puts come no faster than one per synchronous "
          f"put's time, so the daemon keeps up; mean {s['put_submit_us_per_op']:.1f} us, median "
          f"{s['put_submit_median_us']:.1f} us, p99 "
          f"{s['put_submit_p99_us']:.1f} us. Back to back, the daemon's own time per put bounds them instead)")
    if "nvme" in result:
        rows = [["block", "spill MB/s", "dd write MB/s", "spill/dd", "(range)", "1st pass", "fill MB/s",
                 "dd read MB/s", "fill/dd", "(range)", "target", "dev writes+flushes/spill", "/dd write"]]
        for r in result["nvme"]:
            io = ["-" if r[k] is None else "{:.1f}+{:.1f}".format(*r[k]) for k in ("spill_io_per_op", "dd_io_per_op")]
            met = "met" if min(r["spill_ratio"], r["fill_ratio"]) >= 0.9 else "NOT met"
            rows.append([human_bytes(r["block_bytes"]), f"{r['spill_mbps']:.0f}", f"{r['dd_write_mbps']:.0f}",
                         f"{r['spill_ratio']:.2f}", "{:.2f}-{:.2f}".format(*r["spill_ratio_range"]),
                         f"{r['first_pass_spill_ratio']:.2f}", f"{r['fill_mbps']:.0f}", f"{r['dd_read_mbps']:.0f}",
                         f"{r['fill_ratio']:.2f}", "{:.2f}-{:.2f}".format(*r["fill_ratio_range"]), met, *io])
        rounds = result["nvme"][0]["rounds"] if result["nvme"] else 0
        print(f"\nNVMe spill (durable put, steady state) and fill (get of an NVMe-only block) vs dd O_DIRECT, median\n"
              f"of {rounds} interleaved rounds (range over rounds; 1st pass: the same puts once before, growing the\n"
              f"data file; target 0.9):")
        print(table(rows, right=set(range(1, 13))))
    if "pressure" in result:
        pr = result["pressure"]
        rows = [["demotion", "put us (mean)", "median", "p99", "spill MB/s", "/dd conv=fdatasync", "/dd no flush",
                 "written by the writer"]]
        for r in pr["rows"]:
            rows.append([r["mode"], f"{r['put_us']:.0f}", f"{r['median_put_us']:.0f}", f"{r['p99_put_us']:.0f}",
                         f"{r['block_bytes'] / r['put_us']:.0f}", f"{r['vs_dd_fdatasync']:.2f}",
                         f"{r['vs_dd_nosync']:.2f}", f"{r['written_back_share']:.0%}"])
        print(f"\nspill under memory pressure: {pr['puts']} puts of {human_bytes(pr['rows'][0]['block_bytes'])} "
              f"into a full {pr['dram_mib']} MiB DRAM tier, each displacing a block to NVMe; reclaim (the default "
              f"free target) against demotion in the put (free_target = 0); dd over an existing file, same block "
              f"size: {pr['dd_fdatasync_us']:.0f} us per block with one flush for the lot, {pr['dd_nosync_us']:.0f} "
              f"without; medians of {pr['rounds']} interleaved rounds:")
        print(table(rows, right=set(range(1, 8))))
    c = result["contains"]
    print(f"\ncontains at {c['stored_blocks']:,} stored blocks: {c['contains_per_s']:,.0f} lookups/s "
          f"(batches of 4096); daemon memory per stored block: {c['anon_bytes_per_block']:.0f} B anonymous "
          f"(index, policy, allocator) + {c['shmem_bytes_per_block']:.0f} B of arena; "
          f"filled at {c['put_blocks_per_s']:,.0f} puts/s")
    rows = [["collector", "fill puts/s", "put call ms: median", "p99", "max", "collections (gen 0/1/2)",
             "collector pause ms: max", "total"]]
    for name, key in (("frozen survivors (gc_freeze = true)", "contains"), ("CPython's (gc_freeze = false)",
                                                                             "contains_gc_unfrozen")):
        r = result[key]
        g, pc = r["collector"], r["put_call_ms"]
        rows.append([name, f"{r['put_blocks_per_s']:,.0f}", f"{pc['median']:.1f}", f"{pc['p99']:.1f}",
                     f"{pc['max']:.0f}", "/".join(map(str, g["collections"])), f"{g['pause_max_ms']:.1f}",
                     f"{g['pause_total_ms']:.0f}"])
    print(f"\nthe fill ({c['stored_blocks']:,} blocks, puts of {c['put_call_ms']['blocks']}) under the daemon's "
          f"collector and under CPython's (a full collection, which CPython runs now and then, walks every "
          f"object the second keeps: it is not in this fill; the worst call is dict growth, in both):")
    print(table(rows, right=set(range(1, 8))))


if __name__ == "__main__":
    main()
