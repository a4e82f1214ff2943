"""kvctl policy show / set: the running kvtierd's placement policy.

Examples:
  kvctl policy show --json
  kvctl policy set lru
"""
from __future__ import annotations

import click

from kvtier.cli.common import table
from kvtier.cli.status import call, emit, json_option, socket_option


def render(r: dict) -> str:
    rows = [["TIER", "CAPACITY BLOCKS", "RESIDENT"]] + \
        [[t["tier"], str(t["capacity_blocks"]), str(t["resident_blocks"])] for t in r["tiers"]]
    return f"policy {r['policy']}: {r['doc']}\n" + table(rows, right={1, 2})


@click.group("policy", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
def policy():
    """Show or change the placement policy of the running daemon."""


@policy.command("show")
@socket_option
@json_option
def show(socket_path, as_json):
    """The policy and what each tier's instance holds (resident blocks are not pinned ones)."""
    emit(as_json, call(socket_path, "policy"), render)


@policy.command("set")
@click.argument("name")
@socket_option
@json_option
def set_(name, socket_path, as_json):
    """Switch to policy NAME (kvtier, kvtier-density, lru, lfu, fifo, arc, s3fifo); resident blocks re-admitted."""
    from kvtier.policy.registry import policy_class
    policy_class(name)   # an unknown name is a one-line input error before we ask the daemon
    emit(as_json, call(socket_path, "policy_set", name=name), render)
