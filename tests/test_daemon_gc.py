"""The daemon's cycle collector (server.Collector): what lives through a collection is frozen, so no collection
walks the index again. That is only safe while the daemon's requests make no garbage reference cycles (a cycle of
frozen objects is never freed), which the first tests check; the last ones check a running daemon freezes what it
holds, and that gc_freeze = false gives CPython's collector back."""
from __future__ import annotations

import collections
import gc
import random
import signal
import subprocess
import time

import pytest

from daemon_proc import KVCTL, engine, running_daemon, short_dir, write_config
from kvtier.client import Client
from kvtier.daemon import config as config_mod
from kvtier.daemon.engine import Engine
from kvtier.errors import InputError


def _workload(e: Engine, rng: random.Random, steps: int) -> None:
    """Sessions, hints, puts (some durable, some aborted), gets, deletes, refused requests; far more blocks than
    the memory tiers hold, so blocks are demoted to NVMe, promoted and dropped."""
    sids = []
    for _ in range(steps):
        r = rng.random()
        try:
            if r < 0.05:
                sids.append(e.register_session("t", "s"))
            elif r < 0.08 and sids:
                e.end_session("t", sids.pop(0))
            elif r < 0.12 and sids:
                e.hint("t", rng.choice(sids), rng.choice(["prefilling", "decoding", "idle", "finished", "resume"]))
            elif r < 0.5:
                hs = [rng.randrange(400) for _ in range(rng.randint(1, 6))]
                sid = rng.choice(sids) if sids and rng.random() < 0.5 else None
                txn, _ = e.put_reserve("t", sid, [[h, "input", 1024, None] for h in hs], rng.random() < 0.2)
                if rng.random() < 0.1:
                    e.put_abort(txn)
                else:
                    e.put_commit(txn)
            elif r < 0.85:
                lease, _, _ = e.get("t", None, [rng.randrange(400) for _ in range(rng.randint(1, 6))])
                e.run_deferred()
                if lease:
                    e.release(lease)
            elif r < 0.95:
                e.delete("t", [rng.randrange(400) for _ in range(3)])
            elif r < 0.97:
                e.put_reserve("t", None, [[1, "input", 1 << 40, None]], False)   # refused: too big
            else:
                e.hint("t", 10**9, "decoding")   # refused: no such session
        except OSError:
            pass
        e.run_deferred()


def _cycles(fn) -> collections.Counter:
    """The objects fn left as garbage reference cycles, by type."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        fn()
        gc.collect()
        found = collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return found


@pytest.mark.parametrize("policy", ["kvtier", "lru", "arc", "s3fifo"])
def test_requests_and_policy_changes_make_no_reference_cycles(policy):
    d = short_dir()
    cfg = write_config(d, dram="64KiB", cxl="64KiB", nvme="1MiB", nominal="1KiB", policy=policy)
    e = engine(cfg, defer_policy=True)
    try:
        _workload(e, random.Random(1), 200)   # warm: first-use caches are not garbage
        assert not _cycles(lambda: _workload(e, random.Random(2), 3000))
        # a policy change drops the old policy's state, which a frozen cycle would keep for good
        assert not _cycles(lambda: (e.set_policy("lru" if policy != "lru" else "kvtier"), e.run_deferred()))
    finally:
        e.close()


def _fill(sock: str, n: int) -> None:
    with Client(sock, "t") as kv:
        for j in range(0, n, 1000):
            kv.put(None, [(j + i, "input", b"x" * 64) for i in range(1000)])


@pytest.mark.parametrize("freeze", [True, False])
def test_daemon_freezes_what_outlives_a_collection(freeze):
    d = short_dir()
    cfg = write_config(d, dram="128MiB", nominal="64", extra="" if freeze else "gc_freeze = false")
    with running_daemon(d, cfg) as dm:
        start = dm.stats()["collector"]
        _fill(dm.socket, 50_000)
        st = dm.stats()
        g = st["collector"]
        assert st["blocks"] == 50_000 and g["freeze"] is freeze
        assert g["collections"][0] > start["collections"][0]   # young collections ran during the fill
        grown = g["frozen_objects"] - start["frozen_objects"]
        if freeze:
            assert grown >= st["blocks"], g   # each block's objects left the collector's reach
        else:
            assert grown <= 0, g              # CPython's: only what start-up froze (less what was freed since)
        out = subprocess.run([KVCTL, "status", "--socket", dm.socket], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "collector: " in out.stdout, out.stdout + out.stderr


def test_sighup_switches_the_collector():
    d = short_dir()
    cfg = write_config(d, dram="64MiB", nominal="64")
    with running_daemon(d, cfg) as dm:
        assert dm.stats()["collector"]["freeze"] is True
        cfg.write_text(cfg.read_text().replace('policy = "lru"', 'policy = "lru"\ngc_freeze = false'))
        dm.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while dm.stats()["collector"]["freeze"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dm.stats()["collector"]["freeze"] is False
        _fill(dm.socket, 2000)   # and it keeps serving
        assert dm.stats()["blocks"] == 2000


def test_gc_freeze_must_be_a_boolean(tmp_path):
    cfg = write_config(tmp_path, extra='gc_freeze = "yes"')
    with pytest.raises(InputError, match="gc_freeze: expected bool"):
        config_mod.load(str(cfg))
