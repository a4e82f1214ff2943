"""kvctl migrate: move a region's blocks to another NUMA node with kvtier.ko's migration ioctl.

The caller needs access to the region (its owner, root, or a granted uid). Without --blocks every block moves.

Examples:
  kvctl migrate 3 --node 1
  kvctl migrate 3 --node 0 --blocks 0:16
  kvctl migrate 3 --node 1 --json
"""
from __future__ import annotations

import json
import time

import click

from kvtier.cli.common import human_bytes
from kvtier.errors import InputError


def parse_blocks(text: str) -> tuple[int, int]:
    """'FIRST:COUNT' -> (first, count), both non-negative integers, count > 0."""
    first, sep, count = text.partition(":")
    try:
        if not sep:
            raise ValueError
        first_block, nr_blocks = int(first), int(count)
    except ValueError:
        raise InputError(f"--blocks: expected FIRST:COUNT (e.g. 0:16), got {text!r}") from None
    if first_block < 0 or nr_blocks <= 0:
        raise InputError(f"--blocks: FIRST must be >= 0 and COUNT > 0, got {text!r}")
    return first_block, nr_blocks


@click.command("migrate", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@click.argument("region_id", metavar="REGION", type=click.IntRange(min=0))
@click.option("--node", required=True, type=click.IntRange(min=0), help="Target NUMA node.")
@click.option("--blocks", metavar="FIRST:COUNT", help="Only these blocks (default: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def migrate(region_id: int, node: int, blocks: str | None, as_json: bool):
    """Move a region's blocks (all, or FIRST:COUNT) to NUMA node N; prints the bytes moved."""
    first_block, nr_blocks = parse_blocks(blocks) if blocks is not None else (0, None)
    from kvtier import kmod

    with kmod.Device() as dev:
        if nr_blocks is None:
            nr_blocks = dev.info(region_id)["nr_blocks"]
        start = time.perf_counter()
        bytes_moved, blocks_moved = dev.migrate(region_id, first_block, nr_blocks, node)
        elapsed_s = time.perf_counter() - start
    result = {"region_id": region_id, "node": node, "first_block": first_block, "nr_blocks": nr_blocks,
              "bytes_moved": bytes_moved, "blocks_moved": blocks_moved, "elapsed_ns": int(elapsed_s * 1e9)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        rate = f", {bytes_moved / 2**20 / elapsed_s:.0f} MiB/s" if elapsed_s > 0 and bytes_moved else ""
        click.echo(f"region {region_id}: blocks {first_block}..{first_block + nr_blocks - 1} -> node {node}: "
                   f"moved {human_bytes(bytes_moved)} ({bytes_moved} bytes) in {blocks_moved} blocks, "
                   f"{elapsed_s * 1e3:.1f} ms{rate}")
