"""kvtier's main demo: start kvtierd on the embedded userspace backend, drive it with the bundled Mooncake
conversation trace carrying real bytes, and show blocks moving between DRAM, CXL and NVMe.

For each request of the trace (in order): the engine asks kvtierd for the request's prefix blocks (get; every
block served is checked byte for byte against its deterministic content), "recomputes" the misses and stores
them (put), marks its session decoding while it generates (its blocks are pinned in DRAM), then idle. A
session's next turn sends a resume hint first (prefetch; odd sessions only). Tiers are small on purpose, so
blocks spill from DRAM to the CXL tier (a memfd tier; on a machine without a CXL node it lives on node 0) and
to NVMe, and are promoted back on hits.

    tools/demo [--requests N] [--block-kib K] [--trace FILE] [--keep]
"""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def content(block_id: int, nbytes: int) -> np.ndarray:
    """Deterministic bytes per block id: 8-byte words of (id, index) mixed, cheap to make and to check."""
    words = np.arange(nbytes // 8, dtype=np.uint64)
    words ^= np.uint64(block_id * 0x9E3779B97F4A7C15 % (1 << 64))
    return words.view(np.uint8)


def cxl_node() -> int:
    from kvtier import discovery
    try:
        for t in discovery.discover():
            if t.kind == "cxl" and t.nodes:
                return t.nodes[0]
    except Exception:
        pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--block-kib", type=int, default=64)
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--dram-mib", type=int, default=16)
    ap.add_argument("--cxl-mib", type=int, default=32)
    ap.add_argument("--nvme-mib", type=int, default=2048)
    ap.add_argument("--keep", action="store_true", help="keep the state directory")
    args = ap.parse_args()

    from kvtier.cli.common import human_bytes, table
    from kvtier.client import Client, admin_call
    from kvtier.policy.trace import read_trace

    reqs = read_trace(args.trace)[:args.requests]
    nbytes = args.block_kib << 10
    state = Path(tempfile.mkdtemp(prefix="kvtier-demo-", dir="/tmp"))
    node = cxl_node()
    cfg = state / "kvtierd.toml"
    cfg.write_text(f"""
socket = "{state}/kvtierd.sock"
state_dir = "{state}"
metrics = ""
[blocks]
nominal_bytes = {nbytes}
[[tiers]]
name = "dram0"
kind = "dram"
nodes = [0]
capacity = "{args.dram_mib}MiB"
[[tiers]]
name = "cxl0"
kind = "cxl"
nodes = [{node}]
capacity = "{args.cxl_mib}MiB"
[[tiers]]
name = "nvme0"
kind = "nvme"
directory = "{state}/nvme"
capacity = "{args.nvme_mib}MiB"
""")
    kvtierd = Path(sys.executable).parent / "kvtierd"
    log = open(state / "kvtierd.log", "wb")
    proc = subprocess.Popen([str(kvtierd), "--config", str(cfg)], stdout=log, stderr=log)
    sock = str(state / "kvtierd.sock")
    t0 = time.monotonic()
    try:
        while True:
            try:
                admin_call(sock, "stats")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - t0 > 20:
                    print(open(state / "kvtierd.log").read(), file=sys.stderr)
                    return 1
                time.sleep(0.05)
        print(f"kvtierd pid {proc.pid} on {sock}: dram0 {args.dram_mib} MiB, cxl0 {args.cxl_mib} MiB "
              f"(node {node}), nvme0 {args.nvme_mib} MiB; {len(reqs)} requests of the trace, "
              f"{args.block_kib} KiB blocks")
        sessions: dict[int, int] = {}
        checked = verified_bytes = 0
        timeline = [["requests", "dram0", "cxl0", "nvme0", "hits dram/cxl/nvme", "misses", "demoted",
                     "promoted"]]
        t_start = time.monotonic()
        with Client(sock, "demo") as kv:
            for i, r in enumerate(reqs):
                sid = sessions.get(r.session_id)
                if sid is None:
                    sid = sessions[r.session_id] = kv.register_session(f"conv-{r.session_id}")
                elif r.session_id % 2:
                    # next turn of a known conversation: prefetch its blocks (half of the sessions only, so the
                    # table shows both prefetched hits and hits served from the lower tiers)
                    kv.hint(sid, "resume")
                kv.hint(sid, "prefilling")
                got = kv.get(sid, r.hash_ids)
                missing = []
                for h, g in zip(r.hash_ids, got):
                    if g is None:
                        missing.append(h)
                    else:
                        if not np.array_equal(g, content(h, nbytes)):
                            raise SystemExit(f"demo: block {h} came back corrupt from {kv.last_served}")
                        checked += 1
                        verified_bytes += g.nbytes
                btypes = {h: ("prefix" if pos == 0 else "tail" if pos == len(r.hash_ids) - 1 else "history")
                          for pos, h in enumerate(r.hash_ids)}
                kv.put(sid, [(h, btypes[h], content(h, nbytes)) for h in missing])
                kv.hint(sid, "decoding")
                kv.hint(sid, "idle")
                if (i + 1) % max(1, len(reqs) // 6) == 0 or i + 1 == len(reqs):
                    st = admin_call(sock, "stats")
                    t = {x["name"]: x for x in st["tiers"]}
                    c = st["counters"]
                    timeline.append([str(i + 1)] + [f"{t[n]['blocks']} ({human_bytes(t[n]['used_bytes'])})"
                                                     for n in ("dram0", "cxl0", "nvme0")] +
                                    ["/".join(str(t[n]["hits"]) for n in ("dram0", "cxl0", "nvme0")),
                                     str(c["misses"]), str(c["demotions"]), str(c["promotions"])])
        elapsed = time.monotonic() - t_start
        st = admin_call(sock, "stats")
        moves = admin_call(sock, "moves", limit=800)["moves"]
        print("\nblocks per tier as the trace runs (count and bytes), hits by the tier that served them:")
        print(table(timeline, right=set(range(8))))
        c = st["counters"]
        rows = [["tier", "kind", "capacity", "used", "blocks", "hits", "hit share"]]
        for t in st["tiers"]:
            rows.append([t["name"], t["kind"], human_bytes(t["capacity_bytes"]), human_bytes(t["used_bytes"]),
                         str(t["blocks"]), str(t["hits"]), f"{100 * st['hit_rate_by_tier'][t['name']]:.1f}%"])
        print("\nfinal state:")
        print(table(rows, right={2, 3, 4, 5, 6}))
        reasons: dict[tuple, int] = {}
        for m in moves:
            k = (m["from"], m["to"] or "(dropped)", m["reason"])
            reasons[k] = reasons.get(k, 0) + 1
        mrows = [["from", "to", "reason", "moves (last 800)"]] + \
            [[a, b, why, str(n)] for (a, b, why), n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        print("\nrecent moves by reason:")
        print(table(mrows, right={3}))
        print(f"\n{c['puts']} puts, {c['gets']} lookups: {c['gets'] - c['misses']} hits "
              f"({100 * st['hit_rate']:.1f}%), {c['misses']} misses; {c['demotions']} demotions, "
              f"{c['promotions']} promotions ({c['prefetches']} prefetched), {c['drops']} dropped, "
              f"{human_bytes(c['bytes_moved'])} moved")
        print(f"every hit verified byte for byte: {checked} blocks, {human_bytes(verified_bytes)}; "
              f"{len(reqs)} requests in {elapsed:.1f} s")
        ok = checked > 0 and c["demotions"] > 0 and st["tiers"][-1]["blocks"] > 0
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print(f"kvtierd stopped (exit {rc})")
        if args.keep:
            print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
