#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""kvheat: per-block access heat, fault rates and migration latency of KV-cache memory, from eBPF (bcc).

Stand-alone: needs neither kvtierd nor kvtier.ko. With kvtier.ko loaded it counts faults per region block
(kvtier:kvtier_fault) and times the module's block migrations (kvtier:kvtier_migrate); always it times
the kernel's migrations (migrate_pages(): move_pages, mbind, NUMA balancing, demotion) per node pair, and
counts faults and NUMA hinting faults in the anonymous ranges given with --pid/--range.

USAGE: kvheat.py [-h] [-p PID] [-R ADDR:LEN[:BLOCK]] [-r REGION] [-n TOP] [--pages] [-s] [-H] [-j] [-T]
                 [--no-kvtier] [--no-migrate] [interval] [count]

Needs root (or CAP_BPF + CAP_PERFMON) and the running kernel's headers (bcc compiles against them).
See kvheat(8).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
    ./kvheat.py                     # top 10 blocks, fault rates and migrations every second
    ./kvheat.py 5 3                 # every 5 s, three times
    ./kvheat.py -s -n 20            # reset kvtier regions' accesses each interval: count repeated touches
    ./kvheat.py -r 7 --pages        # only region 7, heat per page
    ./kvheat.py -H                  # also log2 histograms of migration latency and size per node pair
    ./kvheat.py -p 4242 -R 0x7f0000000000:1G:2M   # anonymous KV memory of pid 4242, 2 MiB blocks
    ./kvheat.py -j 1 1              # one JSON object after one second
"""


def _import_kvtier():
    """kvtier.probes from the installed package, or from this source tree."""
    try:
        import kvtier.probes  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "userspace"))
    from kvtier import probes
    return probes


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in units else ""
    return int(t[: len(t) - len(unit)] or "x", 0) * units[unit]


def parse_range(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected ADDR:LEN[:BLOCK], got {text!r}")
    try:
        addr, length = int(parts[0], 0), parse_size(parts[1])
        block = parse_size(parts[2]) if len(parts) == 3 else 2 << 20
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number in {text!r}") from None
    if addr <= 0 or length <= 0 or block <= 0 or block % os.sysconf("SC_PAGE_SIZE"):
        raise argparse.ArgumentTypeError(f"{text!r}: address and length positive, block a page multiple")
    return addr, length, block


def positive(kind):
    def conv(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return v
    return conv


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvheat", description="Per-block access heat, fault rates and migration "
                                 "latency of KV-cache memory (eBPF).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    ap.add_argument("interval", nargs="?", type=positive(float), default=1.0, help="seconds between outputs")
    ap.add_argument("count", nargs="?", type=positive(int), default=None, help="outputs before exiting")
    ap.add_argument("-p", "--pid", type=positive(int), help="process whose --range to watch")
    ap.add_argument("-R", "--range", dest="ranges", action="append", type=parse_range, default=[],
                    metavar="ADDR:LEN[:BLOCK]", help="anonymous KV memory of --pid (repeatable; BLOCK default 2M)")
    ap.add_argument("-r", "--region", type=int, action="append", default=[], help="only these kvtier regions")
    ap.add_argument("-n", "--top", type=positive(int), default=10, help="blocks shown (default 10)")
    ap.add_argument("--pages", action="store_true", help="heat per page inside a block")
    ap.add_argument("-s", "--sample", action="store_true",
                    help="reset kvtier regions' accesses each interval so repeated touches fault again")
    ap.add_argument("-H", "--hist", action="store_true", help="print log2 histograms per node pair")
    ap.add_argument("-j", "--json", action="store_true", help="one JSON object per interval")
    ap.add_argument("-T", "--timestamp", action="store_true", help="print a timestamp per interval")
    ap.add_argument("--no-kvtier", action="store_true", help="ignore kvtier.ko even if loaded")
    ap.add_argument("--no-migrate", action="store_true", help="do not time kernel migrations")
    return ap


def snapshot(p, totals: dict, args, dt: float) -> dict:
    """One interval: heat since the last one (added to the running totals), fault rates, migrations."""
    probes = sys.modules["kvtier.probes"]
    anon = p.constants["ANON_BIT"]
    for e in p.read_heat(clear=True):
        if args.region and (e.region & anon or e.region not in args.region):
            continue
        k = (e.region, e.block, e.page)
        t = totals.setdefault(k, {"count": 0, "writes": 0, "hint_faults": 0, "node": e.node})
        t["count"] += e.count
        t["writes"] += e.writes
        t["hint_faults"] += e.hint_faults
        t["node"] = e.node
        t["interval"] = t.get("interval", 0) + e.count
    rows = sorted(totals.items(), key=lambda kv: (-kv[1].get("interval", 0), -kv[1]["count"]))[:args.top]
    blocks = [{"region": (f"anon:{r & ~anon}" if r & anon else r), "block": b, "page": pg, **v}
              for (r, b, pg), v in rows]
    for v in totals.values():
        v["interval"] = 0
    faults = p.region_faults()
    prev = snapshot.prev_faults
    regions = [{"region": (f"anon:{r & ~anon}" if r & anon else r), "faults": f["faults"],
                "faults_per_s": round((f["faults"] - prev.get(r, 0)) / dt, 1), "hint_faults": f["hint_faults"]}
               for r, f in sorted(faults.items()) if not args.region or r in args.region]
    snapshot.prev_faults = {r: f["faults"] for r, f in faults.items()}
    return {"time": time.time(), "blocks": blocks, "regions": regions,
            "migrations": probes.migration_rows(p.histograms()), "counters": p.counters()}


snapshot.prev_faults = {}


def render(snap: dict, hists: dict, args) -> str:
    probes = sys.modules["kvtier.probes"]
    out = []
    if args.timestamp:
        out.append(time.strftime("%H:%M:%S", time.localtime(snap["time"])))
    out.append(f"{'REGION':>12} {'BLOCK':>7} {'PAGE':>5} {'NOW':>7} {'TOTAL':>9} {'WRITES':>8} {'HINT':>6} NODE")
    for b in snap["blocks"]:
        out.append(f"{b['region']!s:>12} {b['block']:>7} {b['page']:>5} {b.get('interval', 0):>7} {b['count']:>9} "
                   f"{b['writes']:>8} {b['hint_faults']:>6} {b['node']}")
    if snap["regions"]:
        out.append("")
        out.append(f"{'REGION':>12} {'FAULTS':>9} {'FAULTS/s':>9} {'HINT':>6}")
        out += [f"{r['region']!s:>12} {r['faults']:>9} {r['faults_per_s']:>9} {r['hint_faults']:>6}"
                for r in snap["regions"]]
    if snap["migrations"]:
        out.append("")
        out.append(f"{'KIND':>7} {'SRC':>4} {'DST':>4} {'COUNT':>7} {'LAT p50us':>10} {'p90':>8} {'p99':>8} "
                   f"{'SIZE p50':>10}")
        for m in snap["migrations"]:
            lat = m["latency_us"]
            out.append(f"{m['kind']:>7} {m['src_node']:>4} {m['dst_node']:>4} {m['count']:>7} "
                       f"{'<=' + str(lat['p50']):>10} {lat['p90']!s:>8} {lat['p99']!s:>8} {m['bytes']['p50']!s:>10}")
    if args.hist:
        for (kind, src, dst), h in sorted(hists.items()):
            out.append("")
            out.append(f"{kind} migrations, node {src} -> {dst}")
            out += probes.hist_lines(h["latency_us"], "usecs")
            out += probes.hist_lines(h["bytes"], "bytes")
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.ranges and not args.pid:
        build_parser().error("--range needs --pid")
    probes = _import_kvtier()
    try:
        p = probes.Probes(kvtier=False if args.no_kvtier else None, anon=bool(args.ranges),
                          migrate=not args.no_migrate, heat_pages=args.pages)
    except probes.ProbesUnavailable as e:
        print(f"kvheat: {e}", file=sys.stderr)
        return 1
    for i, (addr, length, block) in enumerate(args.ranges):
        p.add_range(args.pid, addr, length, block, range_id=i)
    dev = None
    if args.sample and p.with_kvtier:
        from kvtier import kmod
        dev = kmod.Device()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print(f"Tracing {', '.join(p.attached)}... Hit Ctrl-C to end.", file=sys.stderr, flush=True)
    totals: dict = {}
    n = 0
    last = time.monotonic()
    try:
        while args.count is None or n < args.count:
            time.sleep(args.interval)
            now = time.monotonic()
            snap = snapshot(p, totals, args, now - last)
            last = now
            n += 1
            if args.json:
                print(json.dumps(snap), flush=True)
            else:
                print(render(snap, p.histograms(), args) + "\n", flush=True)
            if dev is not None:
                for r in {b["region"] for b in snap["blocks"] if isinstance(b["region"], int)} | set(args.region):
                    try:
                        dev.access_reset(r)
                    except OSError:
                        pass   # the region went away
    except KeyboardInterrupt:
        pass
    finally:
        p.close()
        if dev is not None:
            dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
