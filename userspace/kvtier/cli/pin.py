"""kvctl pin / unpin: keep a block (or every block of a session) where it is, out of every policy's reach.

Examples:
  kvctl pin 5f1c0c3e8d0a4b7e9a2d6c1b0e3f4a59
  kvctl unpin --session 3 --json
"""
from __future__ import annotations

import click

from kvtier.errors import InputError
from kvtier.cli.status import call, emit, json_option, socket_option


def _run(op, block, session, socket_path, as_json):
    if (block is None) == (session is None):
        raise InputError(f"{op}: give a BLOCK or --session S (one of them)")
    r = call(socket_path, op, block=block, session=session)
    emit(as_json, r, lambda r: f"{op}ned {r['blocks']} block{'s' if r['blocks'] != 1 else ''}")


@click.command("pin", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.argument("block", required=False)
@click.option("--session", type=int, default=None, help="Every block of this session.")
@socket_option
@json_option
def pin(block, session, socket_path, as_json):
    """Pin BLOCK or a session's blocks: never demoted or evicted until unpinned."""
    _run("pin", block, session, socket_path, as_json)


@click.command("unpin", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.argument("block", required=False)
@click.option("--session", type=int, default=None, help="Every block of this session.")
@socket_option
@json_option
def unpin(block, session, socket_path, as_json):
    """Undo one pin of BLOCK or of a session's blocks (they go back to their tier's policy)."""
    _run("unpin", block, session, socket_path, as_json)
