"""A policy with admission control may decline a block that a get just promoted; the get must still serve it
(regression: the declined block went back to NVMe before the client was handed its memory slot)."""
from __future__ import annotations

import numpy as np

from daemon_proc import block_bytes, running_daemon, short_dir, write_config
from kvtier.client import Client

BLOCK = 64


def test_gets_served_while_admission_declines():
    d_dir = short_dir()
    # 256 blocks per memory tier and 512 on disk for 3000 blocks that are never reused while being put: the
    # policy learns to decline, so most gets promote from NVMe into a full first tier that declines them
    # DRAM then NVMe, no CXL between them: a declined block has no memory tier left to fall to
    cfg = write_config(d_dir, dram="256KiB", nominal="1KiB", nvme="2MiB", policy="kvtier")
    text = cfg.read_text()
    cxl = text.index('[[tiers]]\nname = "cxl0"')
    cfg.write_text(text[:cxl] + text[text.index("[[tiers]]", cxl + 1):])
    with running_daemon(d_dir, cfg) as d:
        with Client(d.socket, "decline") as kv:
            n = 3000
            for i in range(n):
                kv.put(None, [(i, "input", block_bytes(i, BLOCK))])
            served = 0
            for rnd in range(3):
                for i in range(n):
                    out = kv.get(None, [i])
                    assert len(out) == 1
                    if out[0] is not None:
                        assert np.array_equal(np.frombuffer(out[0], dtype=np.uint8),
                                              np.frombuffer(block_bytes(i, BLOCK), dtype=np.uint8)), (rnd, i)
                        served += 1
            assert served > n // 10   # the first tier and the disk hold some: a selective tier still serves
        st = d.stats()
        # nothing stranded: a block declined while leased went back to its policy on release, so no memory tier
        # holds more blocks than its policy's capacity (256 nominal blocks)
        for t in st["tiers"][:1]:
            assert t["blocks"] <= 256, t
