"""kvctl stats: kvtier.ko's module-wide and per-node counters, read over its generic netlink family.

Examples:
  kvctl stats
  kvctl stats --json
"""
from __future__ import annotations

import json

import click

from kvtier.cli.common import human_bytes, table
from kvtier.cli.regions import require_module

_NODE_COLUMNS = (("NODE", None), ("ALLOCATED", "allocated_bytes"), ("MIGRATED IN", "migrated_in_bytes"),
                 ("MIGRATED OUT", "migrated_out_bytes"))


def render(stats: dict) -> str:
    lines = []
    for key, value in stats.items():
        if key == "nodes":
            continue
        lines.append([key, f"{human_bytes(value)} ({value})" if key.endswith("_bytes") else str(value)])
    out = [table(lines)]
    nodes = stats.get("nodes") or {}
    if nodes:
        rows = [[name for name, _ in _NODE_COLUMNS]]
        for node in sorted(nodes):
            rows.append([str(node)] + [human_bytes(nodes[node].get(key)) for _, key in _NODE_COLUMNS[1:]])
        out += ["", table(rows, right={0, 1, 2, 3})]
    return "\n".join(out)


@click.command("stats", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def stats(as_json: bool):
    """kvtier.ko's counters: regions, allocated/shared bytes, faults, migrations, and per node."""
    require_module()
    from kvtier import kmod_netlink

    result = kmod_netlink.stats()
    if as_json:
        result = {**result, "nodes": {str(n): v for n, v in sorted(result.get("nodes", {}).items())}}
        click.echo(json.dumps(result))
    else:
        click.echo(render(result))
