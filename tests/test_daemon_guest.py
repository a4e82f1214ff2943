"""The daemon's round trip inside the guest with kvtier.ko loaded: memory tiers are kvtier.ko regions
(backend "kmod"), the CXL tier on node 1 (the tiered topology's lower-tier node), clients map granted regions."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from daemon_proc import Daemon, block_bytes, short_dir, write_config
from kvtier.client import Client

pytestmark = pytest.mark.guest("tiered")


@pytest.fixture
def kmod_daemon(request):
    from kmod_guest import ensure_module
    ensure_module(request)
    d_dir = short_dir()
    d = Daemon(d_dir, write_config(d_dir, dram="1MiB", cxl="1MiB", backend="kmod", cxl_node=1)).start()
    yield d
    d.stop()
    shutil.rmtree(d_dir, ignore_errors=True)


def test_round_trip_with_module(kmod_daemon):
    st = kmod_daemon.stats()
    assert [t["backend"] for t in st["tiers"][:2]] == ["kmod", "kmod"]
    n = 200   # 200 x 16 KiB = 3.1 MiB through 1 MiB DRAM + 1 MiB CXL
    with Client(kmod_daemon.socket, "guest") as kv:
        assert all(a["kind"] == "kvtier" for a in kv.hello["arenas"])
        sid = kv.register_session()
        arrays = [np.frombuffer(block_bytes(i, 16 << 10), dtype=np.uint16) for i in range(n)]
        assert kv.put(sid, [(i, "history", a) for i, a in enumerate(arrays)]) == n
        assert {"dram0", "cxl0", "nvme0"} <= set(kv.contains(range(n)))
        got = kv.get(sid, list(range(n)))
        assert all(g is not None and g.tobytes() == a.tobytes() for g, a in zip(got, arrays))
        with Client(kmod_daemon.socket, "other") as other:
            assert other.contains(range(n)) == [None] * n
