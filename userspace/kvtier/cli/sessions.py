"""kvctl sessions: the running kvtierd's sessions, their state and where their blocks are.

Examples:
  kvctl sessions
  kvctl sessions --json
"""
from __future__ import annotations

import click

from kvtier.cli.common import table
from kvtier.cli.status import call, emit, json_option, socket_option


def render(r: dict) -> str:
    rows = [["SESSION", "TENANT", "NAME", "STATE", "BLOCKS", "BY TIER"]]
    for s in r["sessions"]:
        rows.append([str(s["session"]), s["tenant"], s["name"], s["state"], str(s["blocks"]),
                     ", ".join(f"{k} {v}" for k, v in sorted(s["blocks_by_tier"].items())) or "-"])
    return table(rows, right={0, 4})


@click.command("sessions", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@socket_option
@json_option
def sessions(socket_path, as_json):
    """Registered sessions: tenant, state (prefilling/decoding/idle/finished), blocks per tier."""
    emit(as_json, call(socket_path, "sessions"), render)
