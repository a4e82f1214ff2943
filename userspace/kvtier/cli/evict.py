"""kvctl evict: demote one block a tier down now (from the last tier: drop it).

Examples:
  kvctl evict 5f1c0c3e8d0a4b7e9a2d6c1b0e3f4a59
"""
from __future__ import annotations

import click

from kvtier.cli.status import call, emit, json_option, socket_option


@click.command("evict", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.argument("block")
@socket_option
@json_option
def evict(block, socket_path, as_json):
    """Move BLOCK one tier down (a pinned or leased block is refused)."""
    emit(as_json, call(socket_path, "evict", block=block),
         lambda r: f"{r['block']}: {r['from']} -> {r['to'] or '(dropped)'}")
