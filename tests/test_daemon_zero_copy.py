"""Zero-copy put and get: the caller writes blocks straight into the daemon's memory (put_into) and reads them in
place (get_views), against a real daemon."""
from __future__ import annotations

import errno
import gc
import subprocess
import sys

import numpy as np
import pytest

from daemon_proc import BACKENDS, backend_config, running_daemon, short_dir
from kvtier.client import STAGE_MIN_BYTES, Client, DaemonError
from kvtier.errors import InputError

BLOCK = 16 << 10


@pytest.fixture(scope="module", params=BACKENDS)
def daemon(request):
    """On the host (memfd arenas) and in the tiered guest with kvtier.ko loaded (views of module regions)."""
    d_dir = short_dir()
    with running_daemon(d_dir, backend_config(request, d_dir, dram="32MiB", cxl="16MiB")) as d:
        if request.param == "kmod":
            assert [t["backend"] for t in d.stats()["tiers"][:2]] == ["kmod", "kmod"]
        yield d
    # Arrays over the daemon's memory that the tests left in reference cycles (an exception's frames) keep this
    # process's mappings, and with them kvtier.ko's regions, alive until collected: later tests count regions.
    gc.collect()


def _fill(slots, blocks):
    for dst, src in zip(slots, blocks):
        if dst is not None:
            dst[...] = src


@pytest.mark.parametrize("nbytes", [BLOCK, STAGE_MIN_BYTES])   # spare or reserved slots; staged at 1 MiB
def test_put_into_then_get_views_round_trip(daemon, nbytes):
    rng = np.random.default_rng(nbytes)
    blocks = [rng.integers(0, 255, nbytes, dtype=np.uint8) for _ in range(3)]
    base = 1000 + nbytes
    with Client(daemon.socket, "zc-a") as kv:
        for round_ in range(2):   # the first put reserves (and asks for spares), the second fills spares
            keys = [base + 10 * round_ + i for i in range(3)]
            with kv.put_into(None, [(k, "input", nbytes) for k in keys]) as slots:
                assert len(slots) == 3 and all(s.flags.writeable and s.nbytes == nbytes for s in slots)
                _fill(slots, blocks)
            assert slots.stored == 3
            assert not any(s.flags.writeable for s in slots)   # a kept slot cannot change the stored block
            with kv.get_views(None, keys + [base + 999]) as got:
                assert got[-1] is None
                assert all(np.array_equal(g, b) for g, b in zip(got, blocks))
                assert not any(g.flags.writeable for g in got[:3])
                with pytest.raises(ValueError):
                    got[0][0] = 1   # the daemon's memory is read-only through a view
            assert all(np.array_equal(g, b) for g, b in zip(kv.get(None, keys), blocks))   # and through get()


def test_other_calls_inside_a_put_into_block(daemon):
    """The caller runs code between handing out the slots and storing them: other calls on the same client (a
    get, a put, a delete that frees room, another put_into) must not cost the open put_into its slots."""
    big = np.full(STAGE_MIN_BYTES, 5, dtype=np.uint8)   # a put() this big is staged; a put_into is not
    small = np.full(BLOCK, 6, dtype=np.uint8)
    with Client(daemon.socket, "zc-g") as kv:
        assert kv.put(None, [(1, "input", small), (2, "input", big)]) == 2   # spares of both sizes are held now
        assert kv.put(None, [(3, "input", small), (4, "input", big)]) == 2
        with kv.put_into(None, [(10, "input", STAGE_MIN_BYTES), (11, "input", BLOCK)]) as slots:
            assert np.array_equal(kv.get(None, [2])[0], big) and kv.contains([1]) == [kv.contains([1])[0]]
            assert kv.delete([1, 2]) == 2   # frees room: the daemon would move the connection's spares into it
            assert kv.put(None, [(5, "input", small)]) == 1
            with kv.put_into(None, [(12, "input", BLOCK)]) as inner:
                inner[0][:] = 8
            assert inner.stored == 1
            slots[0][:] = 5
            slots[1][:] = 6
        assert slots.stored == 2
        got = kv.get(None, [10, 11, 12, 3, 4, 5])
        assert np.array_equal(got[0], big) and np.array_equal(got[1], small) and int(got[2].sum()) == 8 * BLOCK
        assert np.array_equal(got[3], small) and np.array_equal(got[4], big) and np.array_equal(got[5], small)
        assert kv.delete([10, 11, 12, 3, 4, 5]) == 6


def test_durable_put_into_is_on_nvme_when_the_block_ends(daemon):
    def nvme_blocks():
        return [t for t in daemon.stats()["tiers"] if t["kind"] == "nvme"][0]["blocks"]
    data = np.arange(BLOCK, dtype=np.uint8)
    before = nvme_blocks()
    with Client(daemon.socket, "zc-f") as kv:
        with kv.put_into(None, [(40, "input", BLOCK)], durable=True) as slots:
            slots[0][...] = data
        assert slots.stored == 1
    assert nvme_blocks() == before + 1   # written through to NVMe before the with-block ended
    with Client(daemon.socket, "zc-f") as kv:
        assert np.array_equal(kv.get(None, [40])[0], data) and kv.delete([40]) == 1


def test_put_into_typed_slots_come_back_typed(daemon):
    kv_block = np.random.default_rng(5).standard_normal((2, 16, 4, 8)).astype(np.float16)
    with Client(daemon.socket, "zc-b") as kv:
        with kv.put_into(None, [(7, "history", kv_block.nbytes)], dtype=np.float16, shape=kv_block.shape) as slots:
            assert slots[0].dtype == np.float16 and slots[0].shape == kv_block.shape
            slots[0][...] = kv_block
        assert slots.stored == 1
        got = kv.get(None, [7])[0]
        assert got.dtype == np.float16 and got.shape == kv_block.shape and np.array_equal(got, kv_block)
        with kv.get_views(None, [7]) as views:
            assert views[0].dtype == np.float16 and np.array_equal(views[0], kv_block)
        # dtype alone: a flat array of that dtype per block
        with kv.put_into(None, [(8, "history", 64)], dtype="float32") as slots:
            assert slots[0].shape == (16,)
            slots[0][:] = np.arange(16)
        assert np.array_equal(kv.get(None, [8])[0], np.arange(16, dtype=np.float32))


def test_put_into_that_raises_stores_nothing_and_leaks_no_slot(daemon):
    used0 = [t.get("used_bytes") for t in daemon.stats()["tiers"]]
    with Client(daemon.socket, "zc-c") as kv:
        for nbytes in (BLOCK, STAGE_MIN_BYTES):
            for attempt in range(3):   # reserved slots, then spares (staged at 1 MiB)
                with pytest.raises(RuntimeError, match="engine failed"):
                    with kv.put_into(None, [(50 + attempt, "input", nbytes)]) as slots:
                        slots[0][:10] = 1
                        raise RuntimeError("engine failed mid-copy")
                assert kv.contains([50 + attempt]) == [None]
        # an abort through spares keeps the ones its put would have given back (here: the 1 MiB one)
        with kv.put_into(None, [(57, "input", BLOCK), (58, "input", STAGE_MIN_BYTES)]):
            pass
        assert kv.delete([57, 58]) == 2
        held = sorted(sp[0] for sps in kv._spares.values() for sp in sps)
        assert sorted(kv._spares) == [BLOCK, STAGE_MIN_BYTES]
        with pytest.raises(RuntimeError):
            with kv.put_into(None, [(59, "input", BLOCK)]):
                raise RuntimeError("engine failed")
        assert sorted(sp[0] for sps in kv._spares.values() for sp in sps) == held
        with kv.put_into(None, [(60, "input", BLOCK)]) as slots:   # the connection still works
            slots[0][:] = 7
        assert slots.stored == 1 and int(kv.get(None, [60])[0].sum()) == 7 * BLOCK
        assert kv.delete([60]) == 1
    # every aborted slot went back, and the connection's spares went with it
    assert [t.get("used_bytes") for t in daemon.stats()["tiers"]] == used0


def test_put_into_dedups_and_refuses_bad_input(daemon):
    data = np.full(BLOCK, 3, dtype=np.uint8)
    with Client(daemon.socket, "zc-d") as kv:
        assert kv.put(None, [(70, "input", data)]) == 1
        kv._spares.clear()   # no spares: the daemon reserves, and says at once that 70 is stored
        with kv.put_into(None, [(70, "input", BLOCK), (71, "input", BLOCK)]) as slots:
            assert slots[0] is None and slots[1] is not None
            _fill(slots, [data, data])
        assert slots.stored == 1
        with kv.put_into(None, [(71, "input", BLOCK)]) as slots:   # through a spare: found at the end
            slots[0][:] = 9
        assert slots.stored == 0 and np.array_equal(kv.get(None, [71])[0], data)   # the first copy stays
        for bad in ([(72, "input")], [(72, "input", -1)], [(72, "input", 1.5)], ["x"]):
            with pytest.raises(InputError, match="put_into"):
                with kv.put_into(None, bad):
                    pass
        with pytest.raises(InputError, match="do not hold"):
            with kv.put_into(None, [(73, "input", 10)], dtype=np.float32):
                pass
        with pytest.raises(InputError, match="at most"):
            with kv.put_into(None, [(80 + i, "input", 16) for i in range(5000)]):
                pass
        with pytest.raises(InputError, match="at most"):
            with kv.get_views(None, range(100_000)):
                pass
        with pytest.raises(DaemonError) as e:   # a bad block type: the daemon refuses it, nothing is left
            with kv.put_into(None, [(74, "nonsense", BLOCK)]) as slots:
                pass
        assert e.value.errno == errno.EINVAL and kv.contains([74]) == [None]


def test_get_views_hold_blocks_until_the_block_ends(daemon):
    data = np.arange(BLOCK, dtype=np.uint8)
    with Client(daemon.socket, "zc-e") as kv:
        assert kv.put(None, [(90, "input", data)]) == 1
        with kv.get_views(None, [90]) as views:
            with pytest.raises(DaemonError) as e:
                kv.delete([90])   # held while the caller reads it in place
            assert e.value.errno == errno.EBUSY
            assert np.array_equal(views[0], data)
        assert kv.delete([90]) == 1   # released when the with-block ended
        with pytest.raises(KeyError):
            with kv.get_views(None, [90]) as views:
                assert views == [None]
                raise KeyError("the caller's own error")
        assert kv.put(None, [(90, "input", data)]) == 1 and kv.delete([90]) == 1   # nothing left held


def test_engine_connector_example_runs_against_the_daemon(daemon):
    """The example an engine developer starts from: save after prefill, load on the next turn, both zero-copy."""
    out = subprocess.run([sys.executable, "-m", "kvtier.examples.engine_connector", "--socket", str(daemon.socket)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "turn 1: stored blocks 6" in out.stdout and "96 tokens cached, 6 blocks loaded and verified" in out.stdout


def test_engine_connector_saves_more_than_one_batch(daemon):
    """A long prompt's blocks take more than one put_into batch (put_batch_bytes) and come back whole."""
    from kvtier.examples.engine_connector import KvtierConnector, chained_hashes
    conn = KvtierConnector(str(daemon.socket), tenant="zc-long")
    try:
        shape = (4, 2, 16, 8, 64)   # 128 KiB per block
        n = conn.kv.hello["put_batch_bytes"] // (128 << 10) + 5
        tokens = list(range(16 * n))
        blocks = [np.random.default_rng(i).standard_normal(shape).astype(np.float16) for i in range(n)]
        assert conn.save_kv("long", tokens, blocks) == n
        assert conn.lookup("long", tokens) == 16 * n
        out = [np.empty(shape, np.float16) for _ in range(n)]
        assert conn.load_kv("long", tokens, out) == n
        assert all(np.array_equal(a, b) for a, b in zip(out, blocks))
        assert conn.kv.delete(chained_hashes(tokens, 16)) == n
    finally:
        conn.kv.close()
