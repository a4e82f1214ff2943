"""A full memory tier whose arena is fragmented by small blocks still takes a large block: victims are demoted
until a free extent is large enough, not only until the byte count fits (regression: ENOSPC with room to make)."""
from __future__ import annotations

from daemon_proc import block_bytes, running_daemon, short_dir, write_config
from kvtier.client import Client

SMALL, LARGE = 256 << 10, 1 << 20


def test_large_puts_into_a_tier_fragmented_by_small_blocks():
    d_dir = short_dir()
    cfg = write_config(d_dir, dram="8MiB", cxl="8MiB", nvme="64MiB", nominal="256KiB")
    with running_daemon(d_dir, cfg) as d:
        with Client(d.socket, "frag") as kv:
            for i in range(80):   # 20 MiB of small blocks: both memory tiers full, the rest on disk
                kv.put(None, [(i, "history", block_bytes(i, SMALL))])
            kv.delete(list(range(0, 80, 2)))   # holes of one small block each
            for i in range(1000, 1012):   # each needs four adjacent small slots
                kv.put(None, [(i, "history", block_bytes(i, LARGE))])
            got = kv.get(None, list(range(1000, 1012)) + list(range(1, 80, 2)))
            assert all(g is not None for g in got[:12])
            for i, g in zip(list(range(1000, 1012)) + list(range(1, 80, 2)), got):
                if g is not None:
                    assert g.tobytes() == block_bytes(i, LARGE if i >= 1000 else SMALL), i
        st = d.stats()
        for t in st["tiers"][:2]:
            assert t["used_bytes"] <= t["capacity_bytes"], t
