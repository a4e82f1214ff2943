"""Background reclaim (Engine.reclaim): a memory tier keeps its free target by demoting its policy's victims in
batches, and a batch bound for NVMe is written by a writer thread while requests go on. Blocks being written stay
readable where they are; a delete, promotion or kvctl evict of one waits for the write; a failed write falls back
to demoting them one by one; nothing is lost or served wrong on any of these paths."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from daemon_proc import engine, running_daemon, short_dir
from kvtier.client import Client
from kvtier.daemon import config as config_mod
from kvtier.daemon.engine import WRITEBACK_DEPTH, Engine, derive_key
from kvtier.errors import InputError
from kvtier.store.base import Slot

BLOCK = 256 << 10
MiB = 1 << 20


def _toml(d, dram="4MiB", free_target="1MiB", policy="lru", nvme_extra="") -> str:
    ft = "" if free_target is None else f'free_target = "{free_target}"'
    return f"""
socket = "{d}/kvtierd.sock"
state_dir = "{d}/state"
policy = "{policy}"
metrics = ""
[blocks]
nominal_bytes = "{BLOCK}"
[[tiers]]
name = "dram0"
kind = "dram"
capacity = "{dram}"
{ft}
[[tiers]]
name = "nvme0"
kind = "nvme"
directory = "{d}/state/nvme"
capacity = "64MiB"
{nvme_extra}
"""


def _engine(d, **kw) -> Engine:
    cfg = d / "kvtierd.toml"
    cfg.write_text(_toml(d, **kw))
    return engine(cfg, defer_policy=True)


def _content(h: int) -> bytes:
    return h.to_bytes(8, "little") * (BLOCK // 8)


def _put(e: Engine, h: int) -> None:
    txn, [slot] = e.put_reserve("t", None, [[h, "input", BLOCK, None]], False)
    t, arena = e.arena_table[slot[0]]
    e.tiers[t].view(Slot(arena, slot[1], slot[2]))[:] = _content(h)
    e.put_commit(txn)
    e.run_deferred()


def _read(e: Engine, h: int) -> tuple[bytes | None, str | None]:
    lease, [slot], [served] = e.get("t", None, [h])
    e.run_deferred()
    if slot is None:
        return None, None
    t, arena = e.arena_table[slot[0]]
    data = bytes(e.tiers[t].view(Slot(arena, slot[1], slot[2])))
    e.release(lease)
    return data, served


def _reclaim_all(e: Engine) -> None:
    """What the server's loop does: reclaim after requests, and finish each writeback when it is done."""
    for _ in range(1000):
        more = e.reclaim()
        if e.writeback_busy:
            e.writeback_wait()
        elif not more:
            return
    raise AssertionError("reclaim does not settle")


def _free(e: Engine, t: int = 0) -> int:
    return e.limit_bytes[t] - e.tiers[t].used_bytes


def _count_batches(e: Engine) -> list[int]:
    sizes = []
    orig = e.nvme.put_many

    def put_many(items, *a, **kw):
        sizes.append(len(items))
        return orig(items, *a, **kw)
    e.nvme.put_many = put_many
    return sizes


def test_reclaim_keeps_the_free_target_with_group_written_batches():
    d = short_dir()
    e = _engine(d)
    try:
        batches = _count_batches(e)
        for h in range(40):   # 10 MiB through a 4 MiB tier
            _put(e, h)
            _reclaim_all(e)
            assert _free(e) >= MiB // 2   # never under half the target once reclaim had its turn
        assert e.counters["demotions"] >= 24
        c = e.counters
        assert c["reclaim_batches"] > 0 and c["writeback_blocks"] >= 24, c
        assert max(batches) > 1   # a batch of victims is one group commit, not one flush each
        assert {m["reason"] for m in e.moves} == {"reclaim"}   # the puts never demoted anything themselves
        for h in range(40):
            data, served = _read(e, h)
            assert data == _content(h), (h, served)
        assert any(e.blocks[k].tier == 1 for k in e.blocks)
    finally:
        e.close()


def test_free_target_zero_demotes_in_the_put():
    d = short_dir()
    e = _engine(d, free_target="0")
    try:
        for h in range(24):
            _put(e, h)
            assert e.reclaim() is False
        assert e.counters["reclaim_batches"] == 0 and e.counters["demotions"] >= 8
        assert _free(e) < BLOCK   # full: each put made room for itself
        assert {m["reason"] for m in e.moves} == {"capacity"}
        assert all(_read(e, h)[0] == _content(h) for h in range(24))
    finally:
        e.close()


def _in_writer(e: Engine, hook) -> None:
    """Run hook(items) in the writer thread before each of its group commits (the main thread's go straight on)."""
    orig = e.nvme.put_many

    def put_many(items, *a, **kw):
        if threading.current_thread() is not threading.main_thread():
            hook(items)
        return orig(items, *a, **kw)
    e.nvme.put_many = put_many


def _gated(e: Engine) -> threading.Event:
    """Hold the writer thread's group commits until the event is set."""
    gate = threading.Event()

    def wait(_items):
        assert gate.wait(30)
    _in_writer(e, wait)
    return gate


def _block(e: Engine, h: int):
    return e.blocks.get(derive_key(e.salt("t"), h))


def _start_writeback(e: Engine) -> list[int]:
    """Fill the tier until a writeback is in flight; its blocks' hashes."""
    for h in range(100, 140):
        _put(e, h)
        e.reclaim()
        if e.writeback_busy:
            break
    assert e.writeback_busy
    return [h for h in range(100, 140) if _block(e, h) is not None and _block(e, h).writeback]


def test_a_put_into_a_full_tier_waits_for_the_writeback_instead_of_writing_beside_it():
    """Puts faster than the disk: up to WRITEBACK_DEPTH batches wait for the writer, and a put that then finds no
    room waits for the oldest to be written and moved (as the kernel throttles a task on dirty pages); it never
    writes victims of its own beside the writer."""
    d = short_dir()
    e = _engine(d, free_target="2MiB")
    try:
        gate = _gated(e)
        in_main = []
        inner = e.nvme.put_many

        def put_many(items, *a, **kw):
            if threading.current_thread() is threading.main_thread():
                in_main.append(len(items))
            return inner(items, *a, **kw)
        e.nvme.put_many = put_many
        h = 100
        while _free(e) >= BLOCK:
            _put(e, h)
            e.reclaim()
            h += 1
        assert e.writeback_batches == WRITEBACK_DEPTH
        threading.Timer(0.3, gate.set).start()
        t0 = time.monotonic()
        _put(e, h)   # no room: waits for the oldest batch
        assert time.monotonic() - t0 >= 0.2
        assert not in_main and {m["reason"] for m in e.moves} == {"reclaim"}
        _reclaim_all(e)
        assert e.counters["writeback_blocks"] >= 4 and not in_main
        for k in range(100, h + 1):
            assert _read(e, k)[0] == _content(k), k
    finally:
        e.close()


def test_blocks_being_written_are_served_and_wait_to_be_deleted_or_evicted():
    d = short_dir()
    e = _engine(d, free_target="2MiB")
    try:
        gate = _gated(e)
        victims = _start_writeback(e)
        assert len(victims) >= 4, victims
        hit, gone, evicted, *rest = victims
        # served from memory while the writer holds it
        data, served = _read(e, hit)
        assert data == _content(hit) and served == "dram0"
        # a delete must wait for the write (it would free memory the writer reads): it returns once the gate opens
        threading.Timer(0.3, gate.set).start()
        t0 = time.monotonic()
        assert e.delete("t", [gone]) == 1
        assert time.monotonic() - t0 >= 0.2
        assert not e.writeback_busy
        assert _read(e, gone) == (None, None)
        assert not e.nvme.contains(derive_key(e.salt("t"), gone))   # the deleted block left no copy on disk
        # the hit block went back into its policy: it stays in memory, with its disk copy
        b_hit = _block(e, hit)
        assert b_hit.tier == 0 and b_hit.nvme_copy and e.nvme.contains(b_hit.key)
        # the others moved to NVMe, intact
        assert all(_block(e, h).tier == 1 for h in [evicted, *rest])
        assert all(_read(e, h)[0] == _content(h) for h in range(100, 140) if _block(e, h) is not None)
    finally:
        gate.set()
        e.close()


def test_kvctl_evict_of_a_block_being_written_is_that_demotion():
    d = short_dir()
    e = _engine(d, free_target="2MiB")
    try:
        gate = _gated(e)
        victims = _start_writeback(e)
        b = _block(e, victims[0])
        threading.Timer(0.2, gate.set).start()
        out = e.evict(b.key.hex())
        assert out == {"block": b.key.hex(), "from": "dram0", "to": "nvme0"}   # moved once, not dropped
        assert e.blocks[b.key] is b and b.tier == 1 and not b.writeback
    finally:
        gate.set()
        e.close()


def test_a_failed_writeback_demotes_one_by_one():
    d = short_dir()
    e = _engine(d)
    try:
        failed = []

        def fail_once(items):
            if not failed:
                failed.append(len(items))
                raise OSError(5, "injected I/O error")
        _in_writer(e, fail_once)
        for h in range(24):
            _put(e, h)
            _reclaim_all(e)
        assert failed and failed[0] >= 1
        assert all(_read(e, h)[0] == _content(h) for h in range(24))
        assert e.counters["drops"] == 0
    finally:
        e.close()


@pytest.mark.parametrize("value, message", [
    ("60%", "at most half"), ("3MiB", "at most half"), ("lots", "bad size"), (-1, "positive"), (True, "size")])
def test_free_target_config_errors_name_the_key(value, message):
    d = short_dir()
    cfg = d / "k.toml"
    cfg.write_text(_toml(d).replace('free_target = "1MiB"', f"free_target = {value!r}".replace("'", '"')
                                    if not isinstance(value, bool) else "free_target = true"))
    with pytest.raises(InputError) as e:
        config_mod.load(str(cfg))
    assert "tiers[0].free_target" in str(e.value) and message in str(e.value)


def test_free_target_defaults_and_only_memory_tiers_have_it():
    d = short_dir()
    cfg = d / "k.toml"
    cfg.write_text(_toml(d, free_target=None))
    assert config_mod.load(str(cfg)).tiers[0].free_target_bytes == int(4 * MiB * 0.02)
    cfg.write_text(_toml(d, free_target=None, nvme_extra='free_target = "1MiB"'))
    with pytest.raises(InputError, match=r"tiers\[1\]\.free_target: only memory tiers"):
        config_mod.load(str(cfg))


def test_daemon_reclaims_in_the_background_and_sighup_changes_the_target():
    d = short_dir()
    cfg = d / "kvtierd.toml"
    cfg.write_text(_toml(d, dram="8MiB", free_target="2MiB", policy="kvtier"))
    with running_daemon(d, cfg) as dm:
        def free() -> int:
            t = dm.stats()["tiers"][0]
            return t["capacity_bytes"] - t["used_bytes"]
        with Client(dm.socket, "t") as kv:
            for h in range(64):   # 16 MiB through an 8 MiB tier
                kv.put(None, [(h, "input", _content(h))])
            # the stream may end between half the target and the target, where no refill is due (hysteresis,
            # as kswapd's watermarks): put on until a refill starts after the stream, then it must reach the target
            n, batches = 64, dm.stats()["counters"]["reclaim_batches"]
            while dm.stats()["counters"]["reclaim_batches"] == batches and n < 96:
                kv.put(None, [(n, "input", _content(n))])
                n += 1
            deadline = time.monotonic() + 10
            while free() < 2 * MiB and time.monotonic() < deadline:
                time.sleep(0.05)
            assert free() >= 2 * MiB
            st = dm.stats()
            assert st["counters"]["reclaim_batches"] > 0 and st["counters"]["writeback_blocks"] > 0, st["counters"]
            assert st["tiers"][0]["free_target_bytes"] == 2 * MiB
            got = kv.get(None, list(range(n)))
            assert all(g is not None and bytes(g) == _content(h) for h, g in zip(range(n), got))
            # a bigger target by SIGHUP: the daemon frees that much while idle
            cfg.write_text(_toml(d, dram="8MiB", free_target="4MiB", policy="kvtier"))
            dm.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while free() < 4 * MiB and time.monotonic() < deadline:
                kv.contains([0])   # (the reload happens on the daemon's next turn)
                time.sleep(0.05)
            assert free() >= 4 * MiB
            assert dm.stats()["tiers"][0]["free_target_bytes"] == 4 * MiB
