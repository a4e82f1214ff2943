"""kvctl regions: the KV regions kvtier.ko holds, read over its generic netlink family.

Root sees every region; other users see their own.

Examples:
  kvctl regions
  kvctl regions --json
"""
from __future__ import annotations

import errno
import json

import click

from kvtier.cli.common import human_bytes, table

COLUMNS = (("ID", "region_id"), ("OWNER", "owner_uid"), ("TENANT", "tenant_id"), ("SESSION", "session_id"),
           ("SIZE", "size_bytes"), ("BLOCK", "block_bytes"), ("NODE", "node"),
           ("RESIDENT", "resident_bytes"), ("SHARED", "shared_bytes"), ("FAULTS", "faults"),
           ("MIGRATIONS", "migrations"))
_BYTES = {"size_bytes", "block_bytes", "resident_bytes", "shared_bytes"}


def require_module() -> None:
    """Fail fast (before pyroute2's slow import) when the module is absent."""
    from kvtier import kmod

    if not kmod.module_loaded():
        raise OSError(errno.ENOENT, "kvtier.ko is not loaded")


def render(regions: list[dict]) -> str:
    if not regions:
        return "no regions"
    rows = [[name for name, _ in COLUMNS]]
    for r in regions:
        rows.append([human_bytes(r.get(key)) if key in _BYTES else str(r.get(key, "-")) for _, key in COLUMNS])
    return table(rows, right=set(range(len(COLUMNS))) - {0})


@click.command("regions", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.option("--json", "as_json", is_flag=True, help="One JSON array of regions on stdout.")
def regions(as_json: bool):
    """List kvtier.ko's regions: owner, tags, size, node, residency and counters."""
    require_module()
    from kvtier import kmod_netlink

    found = kmod_netlink.list_regions()
    click.echo(json.dumps(found) if as_json else render(found))
