"""kvctl explain: why a block is where it is (pins, leases, and its tier's policy scores), with its recent moves.

Examples:
  kvctl explain 5f1c0c3e8d0a4b7e9a2d6c1b0e3f4a59
  kvctl explain 5f1c0c3e8d0a4b7e9a2d6c1b0e3f4a59 --json
"""
from __future__ import annotations

import json

import click

from kvtier.cli.common import human_bytes
from kvtier.cli.status import call, emit, json_option, socket_option


def render(d: dict) -> str:
    lines = [f"block {d['block']} ({d['tenant']}, {d['block_type']}, {human_bytes(d['nbytes'])}) is in {d['tier']}",
             f"why: {d['why']}",
             f"sessions: {', '.join(map(str, d['session_ids'])) or '-'}; hits {d['hits']}; "
             f"durable: {'yes' if d['durable'] else 'no'}",
             "policy: " + json.dumps(d["policy"], default=str)]
    for m in d["moves"]:
        lines.append(f"  moved {m['from']} -> {m['to'] or '(dropped)'}: {m['reason']}")
    return "\n".join(lines)


@click.command("explain", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.argument("block")
@socket_option
@json_option
def explain(block, socket_path, as_json):
    """Why BLOCK (its 32-hex-digit key, see kvctl blocks) is in its tier: the policy's explanation."""
    emit(as_json, call(socket_path, "explain", block=block), render)
