"""kvctl blocks: blocks held by the running kvtierd, optionally of one session or one tier.

Examples:
  kvctl blocks --tier nvme0 --limit 20
  kvctl blocks --session 3 --json
"""
from __future__ import annotations

import click

from kvtier.cli.common import human_bytes, table
from kvtier.cli.status import call, emit, json_option, socket_option


def render(r: dict) -> str:
    rows = [["BLOCK", "TENANT", "TYPE", "SIZE", "TIER", "SESSIONS", "PINNED", "DURABLE", "HITS", "HEAT"]]
    for b in r["blocks"]:
        rows.append([b["block"], b["tenant"] or "?", b["block_type"] or "?", human_bytes(b["nbytes"]), b["tier"],
                     str(b["sessions"]), "yes" if b["pinned"] else "", "yes" if b["durable"] else "", str(b["hits"]),
                     f"{b.get('heat', 0.0):.1f}"])   # heat: decayed direct touches (eBPF probes)
    more = r["total"] - len(r["blocks"])
    return table(rows, right={3, 5, 8, 9}) + (f"\n... {more} more (--limit)" if more > 0 else "")


@click.command("blocks", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.option("--session", type=int, default=None, help="Only this session's blocks.")
@click.option("--tier", default=None, help="Only blocks in this tier (by name).")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="Rows at most (about 800 fit in one reply).")
@socket_option
@json_option
def blocks(session, tier, limit, socket_path, as_json):
    """Blocks: key, tenant, type, size, tier, sessions referencing it, pinned, durable, hits, heat."""
    emit(as_json, call(socket_path, "blocks", session=session, tier=tier, limit=limit), render)
