"""One-round-trip puts: the client copies into spare slots the daemon handed it and sends one put naming them."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from daemon_proc import BACKENDS, backend_config, running_daemon, short_dir
import kvtier.client as client_mod
from kvtier.client import Client, DaemonError

BLOCK = 16 << 10


@pytest.fixture(scope="module", params=BACKENDS)
def daemon(request):
    d_dir = short_dir()
    with running_daemon(d_dir, backend_config(request, d_dir)) as d:
        yield d


def _rounds(kv):
    """Count the requests a Client sends (each one with an id is a round trip unless pipelined)."""
    sent = []
    orig = kv._call

    def call(op, **kw):
        sent.append(op)
        return orig(op, **kw)
    kv._call = call
    return sent


def test_second_put_takes_one_round_trip(daemon):
    rng = np.random.default_rng(1)
    blocks = [rng.integers(0, 255, BLOCK, dtype=np.uint8) for _ in range(4)]
    with Client(daemon.socket, "spare-a") as kv:
        assert kv.put(None, [(1, "input", blocks[0])]) == 1   # reserve + commit, asks for a spare
        sent = _rounds(kv)
        for i in (1, 2, 3):
            assert kv.put(None, [(1 + i, "input", blocks[i])]) == 1
        assert sent == ["put", "put", "put"], sent          # one request per put
        got = kv.get(None, [1, 2, 3, 4])
        assert all(np.array_equal(g, b) for g, b in zip(got, blocks))
        # dedup through a spare: the copy is discarded, the block stays as first stored
        assert kv.put(None, [(2, "input", blocks[0])]) == 0
        assert np.array_equal(kv.get(None, [2])[0], blocks[1])
        # pipelined and durable puts through spares
        assert kv.put(None, [(5, "input", blocks[0])], wait=False) == 0
        assert kv.flush() == 1
        assert kv.put(None, [(6, "input", blocks[2])], durable=True) == 1
        assert np.array_equal(kv.get(None, [6])[0], blocks[2])
        # a delete moves the held spares into the room it freed; puts go on through the moved spares
        held = [sp[:3] for sps in kv._spares.values() for sp in sps]
        assert held and kv.delete([6, 5]) == 2
        assert kv._spares and [sp[:3] for sps in kv._spares.values() for sp in sps] != held
        sent.clear()
        assert kv.put(None, [(7, "input", blocks[3])]) == 1
        assert sent == ["put"] and np.array_equal(kv.get(None, [7])[0], blocks[3])
        assert all(np.array_equal(g, b) for g, b in zip(kv.get(None, [1, 2, 3, 4]), blocks))
    with Client(daemon.socket, "spare-b") as other:     # tenant isolation holds for spare puts too
        assert other.get(None, [1, 2, 3, 4]) == [None] * 4


def test_forged_spare_slot_refused_and_daemon_keeps_serving(daemon):
    data = np.full(BLOCK, 7, dtype=np.uint8)
    with Client(daemon.socket, "spare-c") as kv, Client(daemon.socket, "spare-d") as thief:
        kv.put(None, [(10, "input", data)])
        [sp] = kv._spares[BLOCK]
        forged = [[11, "input", BLOCK, None, None, [sp[0], sp[1], sp[2] + 4096]],    # offset outside the slot
                  [11, "input", BLOCK, None, None, [sp[0], sp[1] + 99, sp[2]]],     # another arena
                  [11, "input", BLOCK * 2, None, None, sp[:3]],                     # longer than the slot
                  [11, "input", BLOCK, None, None, [10 ** 12, sp[1], sp[2]]],       # no such spare
                  [11, "input", BLOCK, None, None, "x"], [11, "input"]]
        for item in forged:
            with pytest.raises(DaemonError) as e:
                kv.call("put", blocks=[item], spared=True)
            assert e.value.errno == errno.EINVAL, item
        thief.put(None, [(20, "input", data)])   # another connection may not commit into kv's spare
        with pytest.raises(DaemonError) as e:
            thief.call("put", blocks=[[21, "input", BLOCK, None, None, sp[:3]]], spared=True)
        assert e.value.errno == errno.EINVAL
        assert kv.contains([11]) == [None] and thief.contains([21]) == [None]
        # the refused put gave the spare back; the client starts afresh and puts still work
        kv._spares.clear()
        assert kv.put(None, [(12, "input", data)]) == 1
        assert kv.put(None, [(13, "input", data)]) == 1
        assert np.array_equal(kv.get(None, [13])[0], data)


def test_spares_are_freed_when_the_connection_closes(daemon):
    data = np.zeros(BLOCK, dtype=np.uint8)
    with Client(daemon.socket, "spare-e") as kv:
        before = kv.stats()
    # summed over the tiers: background reclaim may move earlier tests' blocks down meanwhile
    used0 = sum(t.get("used_bytes") for t in daemon.stats()["tiers"])
    with Client(daemon.socket, "spare-e") as kv:
        for i in range(8):
            kv.put(None, [(100 + i, "input", data)])
        kv.delete([100 + i for i in range(8)])
    assert before
    assert sum(t.get("used_bytes") for t in daemon.stats()["tiers"]) == used0


def _sent(kv, monkeypatch):
    """The ops a Client sends, with whether each carried an id (expects a reply)."""
    from kvtier.daemon import protocol
    sent = []
    orig = protocol.send

    def send(sock, msg, fds=()):
        if sock is kv.sock:
            sent.append((msg["op"], "id" in msg))
        return orig(sock, msg, fds)
    monkeypatch.setattr(protocol, "send", send)
    return sent


def test_pipelined_small_puts_go_without_replies_and_flush_counts_them(daemon, monkeypatch):
    rng = np.random.default_rng(3)
    blocks = [rng.integers(0, 255, 64, dtype=np.uint8) for _ in range(200)]
    with Client(daemon.socket, "spare-f") as kv, Client(daemon.socket, "spare-f") as other:
        sent = _sent(kv, monkeypatch)
        for i, b in enumerate(blocks):
            assert kv.put(None, [(1000 + i, "input", b)], wait=False) == 0
            if i == 100:   # this connection's next request sees every put sent before it, flushed or not
                assert kv.get(None, [1000 + i])[0].tobytes() == b.tobytes()
        puts = [has_id for op, has_id in sent if op == "put"]
        assert len(puts) == 200 and puts.count(False) >= 150, sent   # most puts get no reply at all
        assert kv.put(None, [(1000, "input", blocks[0])], wait=False) == 0   # a duplicate: not counted
        assert kv.flush() == 200
        assert kv.flush() == 0
        got = other.get(None, [1000 + i for i in range(200)])   # another connection of the tenant sees them
        assert all(g.tobytes() == b.tobytes() for g, b in zip(got, blocks))
    with Client(daemon.socket, "spare-g") as stranger:   # and no other tenant does
        assert stranger.contains([1000 + i for i in range(200)]) == [None] * 200


def test_a_failed_put_without_reply_surfaces_at_the_next_call_and_leaks_nothing(daemon):
    data = np.full(64, 3, dtype=np.uint8)
    with Client(daemon.socket, "spare-h") as kv:
        for i in range(20):
            kv.put(None, [(2000 + i, "input", data)], wait=False)   # spares enough for puts without reply
        kv.flush()
        nowait = kv._nowait
        spare = kv._spares[64][-1]   # the one the next put takes
        kv.put(None, [(2100, "no-such-type", data)], wait=False)   # refused by the daemon, after the call returned
        kv.put(None, [(2101, "input", data)], wait=False)          # and the pipeline goes on
        assert kv._nowait == nowait + 2
        with pytest.raises(DaemonError) as e:
            kv.contains([2101])
        assert e.value.errno == errno.EINVAL and "block type" in str(e.value)
        assert kv.contains([2100, 2101]) == [None, "dram0"]   # replies stay in step: this is contains' answer
        assert kv.flush() == 1
        # the refused put's spare went back: the connection holds it no more
        with pytest.raises(DaemonError) as e:
            kv.call("put", blocks=[[2103, "input", 64, None, None, spare[:3]]], spared=True)
        assert e.value.errno == errno.EINVAL and "not this connection's" in str(e.value)
        # garbage sent without an id gets no reply either: the next call still reads its own
        from kvtier.daemon import protocol
        for junk in ({"op": "put", "nowait": True, "spared": True, "blocks": "x"},
                     {"op": "put", "nowait": True, "spared": True, "blocks": [[1, 2, 3]]},
                     {"op": "put", "nowait": True, "spared": True, "blocks": [[2102, "input", 64, None, None,
                                                                              [10 ** 15, 0, 0]]]}):
            protocol.send(kv.sock, junk)
        with pytest.raises(DaemonError) as e:
            kv.contains([2102])
        assert e.value.errno == errno.EINVAL and "3 put(s)" in str(e.value)
        assert kv.contains([2101, 2102]) == ["dram0", None]


def test_pipelined_puts_of_one_size_give_back_the_spares_of_another(daemon):
    """Spares of a size the engine no longer puts go back to the daemon (the general path gives them back), also
    when its puts of the size it does put take the short path."""
    with Client(daemon.socket, "spare-i") as kv:
        for i in range(40):   # puts of two sizes at once: spares of both are held, until one asked for more
            kv.put(None, [(3000 + i, "input", np.full(64, i, dtype=np.uint8)),
                          (3100 + i, "input", np.full(128, i, dtype=np.uint8))], wait=False)
            kv.flush()
            last = i
            if len(kv._spares[64]) > client_mod.PIPELINED_SPARES // 2 + 1:
                break
        assert set(kv._spares) == {64, 128} and len(kv._spares[64]) > client_mod.PIPELINED_SPARES // 2 + 1
        for i in range(40):
            kv.put(None, [(3200 + i, "input", np.full(64, i, dtype=np.uint8))], wait=False)
            assert set(kv._spares) == {64}, i
        kv.flush()
        got = kv.get(None, [k + i for k in (3000, 3100, 3200) for i in range(40)])
        assert [None if g is None else g.tobytes() for g in got] == \
            [bytes([i]) * n if k == 3200 or i <= last else None for k, n in ((3000, 64), (3100, 128), (3200, 64))
             for i in range(40)]
