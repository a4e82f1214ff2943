"""Graceful stop: memory-only blocks are copied to NVMe (shutdown_flush_s) so a restart serves them, within the
NVMe tier's free room; with the flush off they are gone after a restart, as a cache's are."""
from __future__ import annotations

import shutil

import pytest

from daemon_proc import Daemon, block_bytes, short_dir, write_config
from kvtier.client import Client

BLOCK = 16 << 10


@pytest.mark.parametrize("flush_s, nvme, expect", [(20, "32MiB", "all"), (0, "32MiB", "none"),
                                                    (20, "256KiB", "some")])
def test_graceful_stop_keeps_memory_blocks_for_the_restart(flush_s, nvme, expect):
    d_dir = short_dir()
    cfg = write_config(d_dir, dram="1MiB", cxl="1MiB", nvme=nvme, extra=f"shutdown_flush_s = {flush_s}")
    try:
        d = Daemon(d_dir, cfg).start()
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(i, "history", block_bytes(i, BLOCK)) for i in range(40)])   # all fit in memory
            kv.put(None, [(1000, "input", block_bytes(1000, BLOCK))], durable=True)
            for _ in range(3):
                kv.get(None, list(range(10)))   # the most-hit blocks go to disk first
        st = d.stats()
        assert st["tiers"][-1]["blocks"] == 1   # only the durable block is on disk before the stop
        assert d.stop() == 0
        log = d.log.read_text()
        d = Daemon(d_dir, cfg).start()
        with Client(d.socket, "acme") as kv:
            got = kv.get(None, list(range(40)))
            served = [i for i, g in enumerate(got) if g is not None]
            for i in served:
                assert got[i].tobytes() == block_bytes(i, BLOCK), i
            assert kv.get(None, [1000])[0].tobytes() == block_bytes(1000, BLOCK)   # durable: always kept
        with Client(d.socket, "other") as kv:   # flushed blocks keep their tenant
            assert kv.get(None, list(range(40))) == [None] * 40
        assert d.stop() == 0
        if expect == "all":
            assert served == list(range(40)), log
        elif expect == "none":
            assert served == []
        else:   # 256 KiB of disk: the durable block plus what fits (4 KiB extents of header), most-hit first
            assert 0 < len(served) < 40 and set(range(min(len(served), 10))) <= set(served), (served, log)
    finally:
        shutil.rmtree(d_dir, ignore_errors=True)
