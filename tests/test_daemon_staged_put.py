"""Staged puts and non-temporal copies of big blocks.

Staged puts: a big spared put is sent before the client copies (no reply) and committed after the copy, so
the daemon checks and books it while the bytes move. The blocks appear only at the commit; a failure found at
staging is the commit's error; anything but a commit or abort after a stage aborts it; nothing leaks."""
from __future__ import annotations

import errno

import numpy as np
import pytest

import kvtier.client as client_mod
from daemon_proc import running_daemon, short_dir, write_config, wait_for
from kvtier.client import Client, DaemonError, copy_block
from kvtier.daemon import protocol

BLOCK = 64 << 10


@pytest.fixture(scope="module")
def daemon():
    d_dir = short_dir()
    with running_daemon(d_dir, write_config(d_dir, dram="64MiB", cxl="8MiB", nvme="64MiB")) as d:
        yield d


@pytest.fixture(autouse=True)
def stage_every_put(monkeypatch):
    monkeypatch.setattr(client_mod, "STAGE_MIN_BYTES", BLOCK)   # small blocks take the staged path too


def _sent(kv):
    """The ops a Client sends, with whether each carried an id (expects a reply)."""
    sent = []
    orig = protocol.send

    def send(sock, msg, fds=()):
        if sock is kv.sock:
            sent.append((msg["op"], "id" in msg, bool(msg.get("stage") or msg.get("staged"))))
        return orig(sock, msg, fds)
    return sent, send


def _used(daemon):
    return [t.get("used_bytes") for t in daemon.stats()["tiers"]]


def _stage(kv, items):
    """Send a staged put by hand (no id, no reply), as the client does before its copy."""
    kv._id += 1
    protocol.send(kv.sock, {"op": "put", "stage": True, "spared": True, "session": None, "blocks": items,
                            "durable": False, "want": []})


def test_staged_put_round_trip(daemon, monkeypatch):
    rng = np.random.default_rng(3)
    blocks = [rng.integers(0, 255, BLOCK, dtype=np.uint8) for _ in range(5)]
    with Client(daemon.socket, "stage-a") as kv:
        assert kv.put(None, [(1, "input", blocks[0])]) == 1   # reserve + commit: no spare held yet
        sent, send = _sent(kv)
        monkeypatch.setattr(protocol, "send", send)
        assert kv.put(None, [(2, "input", blocks[1])]) == 1
        assert sent == [("put", False, True), ("commit", True, True)], sent   # stage (no reply), then commit
        # a duplicate through a staged put: the copy is discarded at the commit, the first version stays
        assert kv.put(None, [(2, "input", blocks[2])]) == 0
        assert np.array_equal(kv.get(None, [2])[0], blocks[1])
        # pipelined, several blocks, durable
        assert kv.put(None, [(3, "input", blocks[2]), (4, "input", blocks[3])], wait=False) == 0
        assert kv.flush() == 2
        assert kv.put(None, [(5, "input", blocks[4])], durable=True) == 1
        got = kv.get(None, [1, 2, 3, 4, 5])
        assert all(np.array_equal(g, b) for g, b in zip(got, [blocks[0], blocks[1], blocks[2], blocks[3], blocks[4]]))
    with Client(daemon.socket, "stage-b") as other:   # tenants stay apart
        assert other.get(None, [1, 2, 3, 4, 5]) == [None] * 5


def test_blocks_appear_at_the_commit_and_a_racing_put_deduplicates(daemon):
    data = np.full(BLOCK, 9, dtype=np.uint8)
    other_data = np.full(BLOCK, 1, dtype=np.uint8)
    with Client(daemon.socket, "stage-c") as kv, Client(daemon.socket, "stage-c") as racer:
        kv.put(None, [(10, "input", data)])
        [sp] = kv._spares[BLOCK]
        _stage(kv, [[11, "input", BLOCK, None, None, sp[:3]]])
        kv._view(sp[1], sp[2], sp[3])[:] = memoryview(data)
        assert racer.contains([11]) == [None]             # staged: not visible yet
        assert racer.put(None, [(11, "input", other_data)]) == 0   # the key is being written: one copy per key
        assert kv.call("commit", staged=True)["stored"] == 1
        assert np.array_equal(racer.get(None, [11])[0], data)


def test_a_refused_stage_fails_its_commit_and_frees_the_spares(daemon):
    data = np.full(BLOCK, 5, dtype=np.uint8)
    with Client(daemon.socket, "stage-d") as kv:
        kv.put(None, [(20, "input", data)])
        [sp] = kv._spares[BLOCK]
        for item in ([21, "input", BLOCK, None, None, [sp[0], sp[1], sp[2] + 4096]],   # not the slot given
                     [21, "nonsense", BLOCK, None, None, sp[:3]],                      # bad block type
                     [21, "input"]):                                                  # malformed item
            _stage(kv, [item])
            with pytest.raises(DaemonError) as e:
                kv.call("commit", staged=True)
            assert e.value.errno == errno.EINVAL, item
            assert kv.contains([21]) == [None]
        # the first refused stage named the spare: it went back at that commit
        with pytest.raises(DaemonError) as e:
            kv.call("put", blocks=[[22, "input", BLOCK, None, None, sp[:3]]], spared=True)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(DaemonError) as e:
            kv.call("commit", staged=True)                  # nothing staged
        assert e.value.errno == errno.ENOENT
        kv._spares.clear()
        assert kv.put(None, [(23, "input", data)]) == 1
        assert np.array_equal(kv.get(None, [23])[0], data)


def test_another_op_after_a_stage_aborts_it(daemon):
    data = np.full(BLOCK, 6, dtype=np.uint8)
    with Client(daemon.socket, "stage-e") as kv:
        kv.put(None, [(30, "input", data)])
        [sp] = kv._spares[BLOCK]
        _stage(kv, [[31, "input", BLOCK, None, None, sp[:3]]])
        assert kv.contains([31]) == [None]                 # not a commit: the staged put is dropped
        with pytest.raises(DaemonError) as e:
            kv.call("commit", staged=True)
        assert e.value.errno == errno.ENOENT
        assert kv.contains([31]) == [None]


def test_a_failed_copy_aborts_the_staged_put(daemon, monkeypatch):
    data = np.full(BLOCK, 8, dtype=np.uint8)
    with Client(daemon.socket, "stage-f") as kv:
        kv.put(None, [(40, "input", data)])
        used = _used(daemon)
        sent, send = _sent(kv)
        monkeypatch.setattr(protocol, "send", send)

        def broken_view(*a):
            raise MemoryError("copy failed")
        monkeypatch.setattr(kv, "_view", broken_view)
        with pytest.raises(MemoryError):
            kv.put(None, [(41, "input", data)])
        assert ("abort", True, True) in sent
        monkeypatch.undo()
        monkeypatch.setattr(client_mod, "STAGE_MIN_BYTES", BLOCK)
        assert kv.contains([41]) == [None]
        assert _used(daemon) <= used                       # the staged slot and its spare went back
        kv._spares.clear()
        assert kv.put(None, [(42, "input", data)]) == 1


def test_a_connection_closed_mid_stage_leaks_nothing(daemon):
    data = np.full(BLOCK, 4, dtype=np.uint8)
    used = _used(daemon)
    kv = Client(daemon.socket, "stage-g")
    kv.put(None, [(50, "input", data)])
    kv.delete([50])
    [sp] = kv._spares[BLOCK]
    _stage(kv, [[51, "input", BLOCK, None, None, sp[:3]]])
    kv.sock.close()   # gone between stage and commit
    wait_for(lambda: _used(daemon) == used)
    assert _used(daemon) == used
    with Client(daemon.socket, "stage-g") as again:
        assert again.contains([51]) == [None]


@pytest.mark.parametrize("nbytes", [client_mod.NT_COPY_MIN_BYTES - 1, client_mod.NT_COPY_MIN_BYTES,
                                    client_mod.NT_COPY_MIN_BYTES + 77])
@pytest.mark.parametrize("dst_shift", [0, 3, 16])
def test_copy_block_matches_a_plain_copy(nbytes, dst_shift):
    """Non-temporal copies (from NT_COPY_MIN_BYTES up) at unaligned destinations and odd lengths: every byte
    lands, nothing around the destination is touched."""
    src = np.random.default_rng(nbytes + dst_shift).integers(0, 255, nbytes + 5, dtype=np.uint8)[5:]
    buf = np.full(nbytes + 64, 0xAB, dtype=np.uint8)
    copy_block(memoryview(buf)[dst_shift:dst_shift + nbytes], memoryview(src))
    assert np.array_equal(buf[dst_shift:dst_shift + nbytes], src)
    assert (buf[:dst_shift] == 0xAB).all() and (buf[dst_shift + nbytes:] == 0xAB).all()
    with pytest.raises(ValueError):   # a size mismatch is refused, never a partial or overrunning copy
        copy_block(memoryview(buf)[:nbytes - 1], memoryview(src))


def test_big_blocks_round_trip(daemon):
    """Blocks above the non-temporal thresholds, odd sizes, through staged puts (waiting and pipelined) and gets
    into new arrays and into the caller's buffers."""
    rng = np.random.default_rng(11)
    sizes = [client_mod.NT_COPY_MIN_BYTES + 13, 2 * client_mod.NT_COPY_MIN_BYTES - 1,
             client_mod.NT_GET_MIN_BYTES + 5]   # (gets go non-temporal from their own threshold)
    blocks = [rng.integers(0, 255, n, dtype=np.uint8) for n in sizes]
    with Client(daemon.socket, "stage-big") as kv:
        for rnd in range(3):   # the first put reserves and commits; later ones go through spares, staged
            keys = [100 * rnd + i for i in range(len(blocks))]
            for k, b in zip(keys, blocks):
                assert kv.put(None, [(k, "input", b)], wait=rnd != 1) == (1 if rnd != 1 else 0)
            if rnd == 1:
                assert kv.flush() == len(blocks)
            got = kv.get(None, keys)
            assert all(np.array_equal(g, b) for g, b in zip(got, blocks))
            outs = [np.zeros_like(b) for b in blocks]
            kv.get(None, keys, out=outs)
            assert all(np.array_equal(o, b) for o, b in zip(outs, blocks))
            assert kv.delete(keys) == len(keys)
