"""The block directory (kvtier.daemon.directory): gets of first-tier blocks read without asking the daemon, which
still counts them; a block moved, freed or replaced while a client copies it is never returned torn; a tenant
maps only its own domain's directory, read-only."""
from __future__ import annotations

import errno
import mmap
import multiprocessing as mp
import os
import re
import signal
import subprocess

import numpy as np
import pytest

from daemon_proc import BACKENDS, KVCTL, backend_config, running_daemon, short_dir, write_config
from kvtier.client import Client, DaemonError, admin_call
from kvtier.daemon import directory
from kvtier.daemon.directory import Directory, DirectoryView, derive_key

pytestmark = pytest.mark.skipif(not directory.available(), reason="kvtier._native is not built")


def test_listing_finding_and_the_seqlock():
    d = Directory(1)   # one bucket: every key collides
    view = DirectoryView(os.dup(d.fd), d.handle())
    try:
        keys = [derive_key(b"s", h) for h in range(directory.WAYS + 1)]
        for i, k in enumerate(keys[:-1]):
            assert d.put(k, 3, 0, 4096 * i, 100 + i, ["<f4", [5, 5]])
        assert not d.put(keys[-1], 3, 0, 0, 1, None) and d.bucket_full == 1   # a full bucket: not listed
        assert view.find(keys[-1]) is None and d.listed() == directory.WAYS
        index, seq, arena, offset, nbytes, meta = view.find(keys[2])
        assert (arena, offset, nbytes, meta) == (3, 8192, 102, ["<f4", [5, 5]]) and seq % 2 == 0
        assert view.same(index, seq)
        d.put(keys[2], 4, 0, 0, 7, None)   # moved: a reader of the old place must not trust what it read
        assert not view.same(index, seq)
        assert view.find(keys[2])[2:] == (4, 0, 7, None)
        d.delete(keys[3])
        assert view.find(keys[3]) is None and d.listed() == directory.WAYS - 1
        assert not d.put(keys[4], 0, 0, 0, 1, ["x" * 40, [1]])   # meta too big for an entry: unlisted
        assert view.find(keys[4]) is None
        assert d.put(keys[-1], 1, 0, 0, 1, None)   # a way was freed
    finally:
        view.close()
        d.close()


def test_clients_cannot_write_the_directory():
    d = Directory(4)
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(d.fd, d.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.pwrite(d.fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(d.fd, 0)
    finally:
        d.close()


@pytest.fixture(scope="module", params=BACKENDS)
def daemon(request):
    d_dir = short_dir()
    with running_daemon(d_dir, backend_config(request, d_dir, dram="8MiB", cxl="4MiB", nvme="64MiB")) as d:
        yield d


def _no_asking(kv):
    def refuse(op, *a, **kw):
        raise AssertionError(f"asked the daemon: {op}")
    kv._call = refuse


def test_get_of_a_first_tier_block_needs_no_round_trip_and_is_counted(daemon):
    a = np.arange(4096, dtype=np.float32).reshape(16, 256)
    with Client(daemon.socket, "dir-a") as kv:
        assert kv._dir is not None
        sid = kv.register_session("s")
        kv.put(sid, [(1, "input", a), (2, "input", b"kv" * 5000)])
        before = admin_call(daemon.socket, "stats")["tiers"][0]["hits"]
        call = kv._call
        _no_asking(kv)
        got = kv.get(sid, [1, 2])
        assert got[0].dtype == np.float32 and got[0].shape == (16, 256) and np.array_equal(got[0], a)
        assert bytes(got[1]) == b"kv" * 5000
        assert kv.last_served == ["dram0", "dram0"]
        out = [np.zeros(4096, dtype=np.float32)]
        assert kv.get(sid, [1], out=out)[0] is out[0] and np.array_equal(out[0].reshape(16, 256), a)
        kv._call = call
        # the daemon saw the three hits (the touches go before any later request on the connection)
        kv.stats()
        st = admin_call(daemon.socket, "stats")
        assert st["tiers"][0]["hits"] == before + 3
        assert st["directory"]["on"] and st["directory"]["listed"] >= 2 and st["directory"]["touched"] >= 3
        r = subprocess.run([KVCTL, "status", "--socket", daemon.socket], capture_output=True, text=True)
        assert r.returncode == 0 and re.search(r"block directory: on, \d+ blocks listed", r.stdout), r.stdout
        explained = kv.call("explain", block=derive_key(b"tenant:dir-a", 1).hex())
        assert explained["hits"] >= 2
        # a miss and a block the directory does not list go to the daemon, in one get with a listed one
        assert kv.get(sid, [1, 99]) [1] is None and kv.last_served == ["dram0", None]


def test_tenants_do_not_see_each_others_directories(daemon):
    with Client(daemon.socket, "dir-b") as b, Client(daemon.socket, "dir-c") as c:
        b.put(None, [(7, "input", b"only b" * 100)])
        assert b.get(None, [7])[0] is not None
        assert c.hello["directory"]["salt"] != b.hello["directory"]["salt"]
        # c's directory holds nothing of b's, even looked up with b's key
        assert c._dir.find(derive_key(b.hello["directory"]["salt"], 7)) is None
        assert c.get(None, [7]) == [None] and c.contains([7]) == [None]


def _reader(sock, keys, rounds, q):
    """Reads keys through the directory while another client frees and reuses their slots: every block returned
    must be whole (its bytes say which key and version they are)."""
    try:
        bad = 0
        with Client(sock, "dir-race") as kv:
            listed = kv._get_listed
            direct = [0]

            def counting(*a, **k):
                result, missed = listed(*a, **k)
                direct[0] += sum(r is not None for r in result)
                return result, missed
            kv._get_listed = counting
            for _ in range(rounds):
                for k, g in zip(keys, kv.get(None, keys)):
                    if g is None:
                        continue
                    g = np.asarray(g).view(np.uint64)
                    if g[0] != k or not np.all(g[2:] == g[1]):
                        bad += 1
        q.put((bad, direct[0], rounds * len(keys)))
    except BaseException as e:
        q.put(repr(e))


def test_a_block_freed_or_replaced_during_a_read_is_never_returned_torn(daemon):
    keys = list(range(5000, 5032))
    nbytes = 64 << 10

    def block(k, version):
        a = np.full(nbytes // 8, version, dtype=np.uint64)
        a[0] = k
        return a

    def delete(hashes):
        while True:
            try:
                return w.delete(hashes)
            except DaemonError as e:   # a get through the socket holds the block until it is released
                if e.errno != errno.EBUSY:
                    raise

    with Client(daemon.socket, "dir-race") as w:
        w.put(None, [(k, "input", block(k, 0)) for k in keys])
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_reader, args=(daemon.socket, keys, 400, q))
        p.start()
        version = 0
        while p.is_alive():
            version += 1
            # delete and put back under other keys first, so freed slots are reused by other blocks
            delete(keys[::2])
            w.put(None, [(k + 100, "input", block(k + 100, version)) for k in keys[::2]])
            w.put(None, [(k, "input", block(k, version)) for k in keys[::2]])
            delete([k + 100 for k in keys[::2]])
        p.join(60)
        r = q.get(timeout=10)
    assert not isinstance(r, str), r
    bad, direct, reads = r
    assert bad == 0
    assert version > 5 and 0 < direct < reads   # the writer did run, and reads went both ways


def test_a_read_through_a_dead_daemons_directory_fails():
    d_dir = short_dir()
    with running_daemon(d_dir, write_config(d_dir)) as d:
        kv = Client(d.socket, "dir-dead")
        kv.put(None, [(1, "input", b"x" * 4096)])
        assert kv.get(None, [1])[0] is not None
        d.kill9()
        with pytest.raises(DaemonError) as e:
            kv.get(None, [1])
        assert e.value.errno == errno.ECONNRESET
        kv.close()
        d.start()


def test_gets_go_on_while_the_daemon_is_stopped_and_their_hits_are_counted_after():
    # Directory gets never wait for the daemon. Their touches wait in the client while the daemon's socket is full
    # (here: the daemon is stopped), then go as one message per session, so no hit is lost.
    d_dir = short_dir()
    with running_daemon(d_dir, write_config(d_dir, dram="8MiB")) as d:
        with Client(d.socket, "dir-stop") as kv:
            kv.put(None, [(i, "input", b"%0100d" % i) for i in range(8)])
            before = admin_call(d.socket, "stats")["tiers"][0]["hits"]
            d.signal(signal.SIGSTOP)
            try:
                n = 3000
                for j in range(n):
                    assert bytes(kv.get(None, [j % 8])[0]) == b"%0100d" % (j % 8)
                assert kv._held_touches > 0   # the socket filled up: they wait here
            finally:
                d.signal(signal.SIGCONT)
            kv.stats()   # sends what waited, first
            assert kv._held_touches == 0
            assert admin_call(d.socket, "stats")["tiers"][0]["hits"] == before + n
