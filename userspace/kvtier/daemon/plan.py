"""`kvtierd --plan`: the capacity plan. Discover the tiers, size a model's KV cache and plan where its sessions
would live, filling tiers in rank order (fastest first)."""
from __future__ import annotations

import json

import click

from kvtier import discovery
from kvtier.cli.common import human_bytes, nvme_dirs_option, table
from kvtier.cli.size import TokenCount
from kvtier.sizing import DTYPES, ModelKV


def plan_sessions(tiers, bytes_per_session: int, sessions: int) -> tuple[list[dict], int]:
    """Place `sessions` whole sessions tier by tier in rank order, by free bytes.

    Returns one row per tier (sessions placed, bytes used) and the number of sessions that fit nowhere.
    A session is not split across tiers: its blocks move between tiers as a unit of urgency.
    """
    left = sessions
    rows = []
    for t in sorted(tiers, key=lambda t: t.rank):
        placed = min(left, t.free_bytes // bytes_per_session)
        left -= placed
        rows.append({"name": t.name, "kind": t.kind, "rank": t.rank, "free_bytes": t.free_bytes,
                     "sessions": placed, "used_bytes": placed * bytes_per_session})
    return rows, left


@click.command("kvtierd --plan", context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  kvtierd --plan --model llama-3-70b --context 128k --sessions 8 --nvme-dir /var/tmp
  kvtierd --plan --model ./Mistral-7B-v0.1 --context 32k --dtype int8 --json
""")
@click.option("--model", default="llama-3-8b", show_default=True,
              help="Preset name, a config.json, or a directory holding one (see kvctl size --list-presets).")
@click.option("--context", type=TokenCount(), default="32k", show_default=True, help="Tokens per session.")
@click.option("--sessions", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sessions to place.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bf16", show_default=True, help="KV element type.")
@click.option("--block-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens per KV block (paged allocation).")
@nvme_dirs_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
def kvtierd(model, context, sessions, dtype, block_tokens, nvme_dirs, as_json):
    """Discover this machine's tiers, size MODEL's KV cache and plan where SESSIONS sessions live.

    Tiers fill in rank order (HBM, DRAM, CXL, NVMe) by free bytes; a session stays whole in one tier.
    Sessions that fit nowhere are counted as unplaced.
    """
    report = ModelKV.from_source(model).size(context, sessions=1, dtype=dtype, block_tokens=block_tokens)
    tiers = discovery.discover(nvme_dirs=tuple(nvme_dirs))
    rows, unplaced = plan_sessions(tiers, report.bytes_per_session, sessions)
    plan = {"model": report.model, "context_tokens": context, "dtype": report.dtype, "block_tokens": block_tokens,
            "bytes_per_session": report.bytes_per_session, "sessions": sessions, "unplaced_sessions": unplaced,
            "tiers": rows, "warnings": report.warnings}
    for w in report.warnings:
        click.echo(f"kvtierd: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps(plan, indent=2))
    else:
        click.echo(f"kvtierd: {report.model}, {context:,} tokens, {report.dtype}, {block_tokens}-token blocks: "
                   f"{human_bytes(report.bytes_per_session)} per session")
        lines = [["rank", "tier", "kind", "free", "sessions", "used"]]
        lines += [[str(r["rank"]), r["name"], r["kind"], human_bytes(r["free_bytes"]), str(r["sessions"]),
                   human_bytes(r["used_bytes"])] for r in rows]
        click.echo(table(lines, right={0, 3, 4, 5}))
        click.echo(f"placed {sessions - unplaced} of {sessions} sessions" +
                   (f"; {unplaced} fit in no tier" if unplaced else ""))
