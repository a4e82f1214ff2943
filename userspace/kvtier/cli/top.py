"""kvctl top: a live view of the running kvtierd, like top(1): tiers, hottest sessions and blocks, API and
migration rates, migration latency percentiles per node pair (eBPF probes), per-region fault rates.

Blocks and sessions are ranked by access heat (decayed count of direct touches seen by the probes) when
the probes are on, else by API hits. Rates are per second over the last refresh.

Examples:
  kvctl top                            # refresh every 2 s; Ctrl-C ends it
  kvctl top --interval 0.5 --limit 20
  kvctl top --once --json              # one snapshot for scripts
  kvctl top --count 3 --json           # three snapshots, one JSON object per line
"""
from __future__ import annotations

import json
import sys
import time

import click

from kvtier.cli.common import human_bytes, table
from kvtier.cli.status import call, json_option, probes_line, socket_option

CLEAR = "\x1b[H\x1b[2J"
RATE_COUNTERS = ("puts", "gets", "misses", "demotions", "promotions", "prefetches", "bytes_moved")


def rates(snap: dict, prev: dict | None) -> dict:
    """Per-second rates of the daemon's counters between two snapshots ({} for the first)."""
    if not prev or snap.get("time", 0) <= prev.get("time", 0):
        return {}
    dt = snap["time"] - prev["time"]
    c, p = snap.get("counters", {}), prev.get("counters", {})
    return {k: (c.get(k, 0) - p.get(k, 0)) / dt for k in RATE_COUNTERS if k in c and k in p}


def _us(v) -> str:
    return "-" if v is None else f"{v}"


def render(snap: dict, prev: dict | None = None, width: int = 120) -> str:
    lines = [f"kvtierd  {time.strftime('%H:%M:%S', time.localtime(snap.get('time', time.time())))}  "
             f"probes: {probes_line(snap.get('probes', {}))}"]
    r = rates(snap, prev)
    if r:
        lines.append("rates/s: " + ", ".join(
            f"{k} {human_bytes(v) if k == 'bytes_moved' else f'{v:.1f}'}" for k, v in r.items()))
    if snap.get("tiers"):
        rows = [["TIER", "KIND", "USED", "CAPACITY", "USE%", "BLOCKS", "HITS"]]
        for t in snap["tiers"]:
            pct = 100.0 * t["used_bytes"] / t["capacity_bytes"] if t["capacity_bytes"] else 0.0
            rows.append([t["name"], t["kind"], human_bytes(t["used_bytes"]), human_bytes(t["capacity_bytes"]),
                         f"{pct:.1f}", str(t["blocks"]), str(t["hits"])])
        lines += ["", table(rows, right={2, 3, 4, 5, 6})]
    by = snap.get("ranked_by", "hits")
    if snap.get("sessions"):
        rows = [["SESSION", "NAME", "TENANT", "STATE", "BLOCKS", by.upper()]]
        rows += [[str(s["session"]), s["name"][:24], s["tenant"], s["state"], str(s["blocks"]), f"{s[by]:.1f}"]
                 for s in snap["sessions"]]
        lines += ["", f"hottest sessions (by {by})", table(rows, right={4, 5})]
    if snap.get("blocks"):
        rows = [["BLOCK", "TIER", "HEAT", "TOUCHES", "LAST(ms)", "HITS", "SESSIONS"]]
        for b in snap["blocks"]:
            last = b.get("last_access_ms_ago")
            rows.append([b["block"][:16], b["tier"], f"{b['heat']:.1f}", str(b["touches"]),
                         "-" if last is None else f"{last:.0f}", str(b["hits"]),
                         ",".join(map(str, b["sessions"][:4])) + ("..." if len(b["sessions"]) > 4 else "")])
        lines += ["", f"hottest blocks (by {by})", table(rows, right={2, 3, 4, 5})]
    if snap.get("migrations"):
        rows = [["KIND", "SRC", "DST", "COUNT", "RATE/s", "LAT p50us", "p90", "p99", "SIZE p50"]]
        for m in snap["migrations"]:
            lat, size = m["latency_us"], m["bytes"]
            node = lambda n: "?" if n < 0 else str(n)   # noqa: E731
            rows.append([m["kind"], node(m["src_node"]), node(m["dst_node"]), str(m["count"]),
                         f"{m.get('rate_per_s', 0.0):.1f}", "<=" + _us(lat["p50"]), _us(lat["p90"]), _us(lat["p99"]),
                         "<=" + human_bytes(size["p50"])])
        lines += ["", "migrations (latency and size: log2 bucket upper bounds)", table(rows, right=set(range(1, 9)))]
    if snap.get("regions"):
        rows = [["REGION", "TIER", "FAULTS/s"]]
        rows += [[str(g["region"]), g["tier"] or "-", f"{g['faults_per_s']:.1f}"] for g in snap["regions"]]
        lines += ["", table(rows, right={2})]
    return "\n".join(line[:width] for line in "\n".join(lines).splitlines())


@click.command("top", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.option("--interval", type=click.FloatRange(min=0.1, max=3600), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--limit", type=click.IntRange(min=1, max=1000), default=10, show_default=True,
              help="Sessions and blocks shown.")
@click.option("--once", is_flag=True, help="One snapshot, then exit.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Refreshes before exiting (default: until Ctrl-C).")
@socket_option
@json_option
def top(interval, limit, once, count, socket_path, as_json):
    """Live view of tiers, hottest sessions and blocks, migration rates and latency percentiles."""
    if once:
        count = 1
    live = sys.stdout.isatty() and not as_json
    prev = None
    n = 0
    try:
        while True:
            snap = call(socket_path, "top", limit=limit)
            n += 1
            if as_json:
                snap["rates_per_s"] = rates(snap, prev)
                click.echo(json.dumps(snap))
            else:
                click.echo((CLEAR if live else "") + render(snap, prev), nl=True)
            if count is not None and n >= count:
                return
            prev = snap
            time.sleep(interval)
    except KeyboardInterrupt:
        return
