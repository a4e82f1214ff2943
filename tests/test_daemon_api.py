"""kvtierd's engine API against a real daemon process: round trips through every tier, tenants, peer checks,
malformed messages, reload, metrics, pinning of decoding sessions."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import urllib.request

import msgpack
import numpy as np
import pytest

from daemon_proc import (BACKENDS, KVTIERD, Daemon, backend_config, block_bytes, running_daemon, short_dir,
                         wait_for, wait_serving, write_config)
from kvtier.client import Client, DaemonError, admin_call

BLOCK = 16 << 10


@pytest.fixture
def daemon_dir():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(daemon_dir):
    d = Daemon(daemon_dir, write_config(daemon_dir)).start()
    yield d
    assert d.stop() == 0, d.log.read_text()[-2000:]


@pytest.fixture(scope="module", params=BACKENDS)
def core_daemon(request):
    """One daemon for the core tests (they use distinct tenants and hashes): a start takes ~10 s under TCG."""
    d_dir = short_dir()
    with running_daemon(d_dir, backend_config(request, d_dir)) as d:
        if request.param == "kmod":
            assert [t["backend"] for t in d.stats()["tiers"][:2]] == ["kmod", "kmod"]
            with Client(d.socket, "probe") as kv:   # clients map module regions the daemon granted them
                assert kv.hello["arenas"] and all(a["kind"] == "kvtier" for a in kv.hello["arenas"])
        yield d


def test_round_trip_through_every_tier(core_daemon):
    daemon = core_daemon
    n = 60   # 60 x 16 KiB = 960 KiB against 256 KiB DRAM + 256 KiB CXL: most blocks spill to NVMe
    with Client(daemon.socket, "acme") as kv:
        sid = kv.register_session("conv")
        arrays = [np.frombuffer(block_bytes(i, BLOCK), dtype=np.float16).reshape(8, -1) for i in range(n)]
        assert kv.put(sid, [(1000 + i, "history", a) for i, a in enumerate(arrays)]) == n
        where = kv.contains([1000 + i for i in range(n)])
        assert {"dram0", "cxl0", "nvme0"} <= set(where), where
        got = kv.get(sid, [1000 + i for i in range(n)])
        served = kv.last_served
        for a, g in zip(arrays, got):
            assert g is not None and g.dtype == a.dtype and g.shape == a.shape and g.tobytes() == a.tobytes()
        assert {"dram0", "cxl0", "nvme0"} & set(served) and "nvme0" in served, served
        # bytes in, bytes out (uint8 views)
        assert kv.put(sid, [(5, "prefix", block_bytes(5, 1000))]) == 1
        assert kv.get(sid, [5])[0].tobytes() == block_bytes(5, 1000)
        assert kv.get(sid, [999999]) == [None]
    st = daemon.stats()
    assert st["counters"]["demotions"] > 0 and st["counters"]["promotions"] > 0
    assert all(t["used_bytes"] <= t["capacity_bytes"] for t in st["tiers"])


def test_dedup_one_copy_per_prefix(daemon):
    with Client(daemon.socket, "acme") as kv:
        s1, s2 = kv.register_session(), kv.register_session()
        assert kv.put(s1, [(7, "prefix", block_bytes(7, 4096))]) == 1
        assert kv.put(s2, [(7, "prefix", block_bytes(7, 4096))]) == 0   # already stored: deduplicated
        blocks = admin_call(daemon.socket, "blocks")["blocks"]
        assert len(blocks) == 1 and blocks[0]["sessions"] == 2
        assert daemon.stats()["counters"]["dedup_puts"] == 1
        # two engines putting the same new block at once: the second finds it being written, one copy results
        with Client(daemon.socket, "acme") as other:
            r = kv.call("put", blocks=[[8, "prefix", 4096, None]])
            assert r["slots"][0] is not None
            assert other.put(None, [(8, "prefix", block_bytes(8, 4096))]) == 0
            kv._view(*r["slots"][0])[:] = block_bytes(8, 4096)
            assert kv.call("commit", txn=r["txn"])["stored"] == 1
            assert other.get(None, [8])[0].tobytes() == block_bytes(8, 4096)


def test_tenants_do_not_see_each_other(core_daemon):
    daemon = core_daemon
    with Client(daemon.socket, "alpha") as a, Client(daemon.socket, "beta") as b:
        a.put(None, [(42, "prefix", block_bytes(1, 4096))])
        assert a.contains([42]) == ["dram0"]
        assert b.contains([42]) == [None]
        assert b.get(None, [42]) == [None]
        assert b.delete([42]) == 0
        b.put(None, [(42, "prefix", block_bytes(2, 4096))])   # same hash, other tenant: its own block
        assert a.get(None, [42])[0].tobytes() == block_bytes(1, 4096)
        assert b.get(None, [42])[0].tobytes() == block_bytes(2, 4096)
        with pytest.raises(DaemonError) as e:
            b.hint(a.register_session(), "decoding")   # a's session is not b's
        assert e.value.errno == errno.ENOENT


def _as_nobody(fn):
    """Run fn() in a child process as uid/gid 65534 with no supplementary groups; returns its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os._exit(fn())
        except BaseException:
            os._exit(99)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_other_uid_refused(daemon_dir):
    # socket_mode 0666 lets the connect through the filesystem, so the daemon's own SO_PEERCRED check is tested.
    cfg = write_config(daemon_dir, extra='group = "root"\nsocket_mode = 0o666\n[tenants.ops]\nuids = [0]')
    d = Daemon(daemon_dir, cfg).start()
    try:
        def connect():
            try:
                Client(d.socket, "anyone")
            except DaemonError as e:
                return 10 if e.errno == errno.EACCES else 11
            except OSError:
                return 12
            return 0
        assert _as_nobody(connect) == 10
        with Client(d.socket, "anyone") as kv:   # root still gets in
            assert kv.contains([1]) == [None]
    finally:
        d.stop()
    # Group nogroup (65534) may connect, but tenant "ops" is limited to uid 0.
    cfg = write_config(daemon_dir, extra='group = "nogroup"\n[tenants.ops]\nuids = [0]')
    os.unlink(daemon_dir / "kvtierd.log")
    d = Daemon(daemon_dir, cfg).start()
    try:
        assert oct(os.stat(d.socket).st_mode & 0o777) == oct(0o660)

        def bind(tenant):
            def go():
                try:
                    with Client(d.socket, tenant) as kv:   # maps the memfd arenas it was passed, as uid 65534
                        kv.put(None, [(1, "input", block_bytes(1, 8192))])
                        if kv.get(None, [1])[0].tobytes() != block_bytes(1, 8192):
                            return 13
                except DaemonError as e:
                    return 10 if e.errno == errno.EACCES else 11
                except OSError:
                    return 12
                return 0
            return go
        assert _as_nobody(bind("guests")) == 0
        assert _as_nobody(bind("ops")) == 10
    finally:
        d.stop()


def _raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(path)
    return s


def test_malformed_messages_get_errors_and_daemon_keeps_serving(core_daemon):
    daemon = core_daemon
    rng = np.random.default_rng(1)
    bad = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 300, 60)]
    bad += [msgpack.packb(x) for x in (
        [], 5, "hello", {"op": 5}, {"op": "nope", "id": 1}, {"op": "put", "id": 2},
        {"op": "put", "id": 3, "blocks": "x"}, {"op": "get", "id": 4, "blocks": [[1, 2]]},
        {"op": "hello", "id": 5, "tenant": 7}, {"op": "hello", "id": 6, "tenant": "t", "version": "x"},
        {"op": "commit", "id": 7, "txn": "1"}, {"op": "release", "id": 8, "lease": "x"},
        {"op": "explain", "id": 9, "block": "zz"}, {"op": "blocks", "id": 10, "limit": "all"},
        {"op": "hint", "id": 11, "session": 1, "state": 3},
    )]
    bad.append(msgpack.packb({"op": "hello", "id": 1, "tenant": "t"}) + b"\xc1")   # trailing garbage
    for payload in bad:
        s = _raw(daemon.socket)
        s.send(payload)
        try:
            reply = msgpack.unpackb(s.recv(1 << 20))
            assert reply["ok"] is False and reply["errno"] > 0 and reply["error"], (payload, reply)
        except (ConnectionResetError, TimeoutError):
            pass   # closing the connection is allowed
        s.close()
    # an authenticated client sending nonsense ops: errors, and the same connection keeps working
    with Client(daemon.socket, "acme") as kv:
        for fields in ({"blocks": [[1, "weird", 10, None]]}, {"blocks": [[1, "input", -5, None]]},
                       {"blocks": [[1, "input", 1 << 40, None]]}, {"blocks": [[-5, "input", 10, None]]},
                       {"blocks": [[b"x" * 100, "input", 10, None]]}):
            with pytest.raises(DaemonError) as e:
                kv.call("put", **fields)
            assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:   # over the message size: refused by the kernel or the daemon
            kv.call("get", blocks=list(range(70000)))
        assert e.value.errno in (errno.EMSGSIZE, errno.E2BIG)
        with pytest.raises(DaemonError) as e:
            kv.call("contains", blocks=[1] * 70000)
        assert e.value.errno == errno.E2BIG
        kv.put(None, [(1, "input", b"abc")])
        assert kv.get(None, [1])[0].tobytes() == b"abc"
    # a message over the size limit: refused (the socket may close), daemon alive
    s = _raw(daemon.socket)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    try:
        s.send(b"\x00" * ((1 << 20) + 100))
    except OSError as e:
        assert e.errno == errno.EMSGSIZE   # the kernel refused a datagram over the socket buffer
    else:
        try:
            assert msgpack.unpackb(s.recv(1 << 20))["errno"] == errno.EMSGSIZE
        except ConnectionResetError:
            pass
    s.close()
    assert daemon.alive() and daemon.stats()["blocks"] >= 1


def test_sighup_reloads_config_and_keeps_old_on_error(daemon_dir):
    cfg = write_config(daemon_dir, policy="lru")
    d = Daemon(daemon_dir, cfg).start()
    try:
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(i, "history", block_bytes(i, 16 << 10)) for i in range(10)])
        cfg.write_text(cfg.read_text().replace('policy = "lru"', 'policy = "lfu"').replace('"256KiB"', '"64KiB"', 1))
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: d.stats()["policy"] == "lfu")
        st = d.stats()
        assert st["tiers"][0]["capacity_bytes"] == 64 << 10 and st["tiers"][0]["used_bytes"] <= 64 << 10
        cfg.write_text(cfg.read_text().replace('policy = "lfu"', 'policy = "no-such"'))
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: "reload failed" in d.log.read_text())
        assert d.stats()["policy"] == "lfu" and d.alive()
        with Client(d.socket, "acme") as kv:
            assert [g.tobytes() for g in kv.get(None, range(10))] == [block_bytes(i, 16 << 10) for i in range(10)]
    finally:
        assert d.stop() == 0


def test_a_tenant_holds_at_most_max_sessions_and_sighup_changes_it(daemon_dir):
    cfg = write_config(daemon_dir, extra="max_sessions_per_tenant = 3")
    d = Daemon(daemon_dir, cfg).start()
    try:
        with Client(d.socket, "acme") as a, Client(d.socket, "globex") as b:
            mine = [a.register_session(f"s{i}") for i in range(3)]
            with pytest.raises(DaemonError) as e:
                a.register_session("one too many")
            assert e.value.errno == errno.EDQUOT and "max_sessions_per_tenant" in str(e.value)
            assert len([b.register_session(f"t{i}") for i in range(3)]) == 3   # another tenant's own quota
            a.end_session(mine.pop())
            mine.append(a.register_session("after one ended"))
            cfg.write_text(cfg.read_text().replace("max_sessions_per_tenant = 3", "max_sessions_per_tenant = 5"))
            d.signal(signal.SIGHUP)
            assert wait_for(lambda: "reloaded" in d.log.read_text())
            mine += [a.register_session(f"more{i}") for i in range(2)]
            with pytest.raises(DaemonError):
                a.register_session("sixth")
            assert d.stats()["sessions"] == 5 + 3 and d.alive()
    finally:
        assert d.stop() == 0
    for key in ("max_sessions_per_tenant", "max_sessions_per_uid", "max_connections_per_uid"):
        for value in ("0", "true", '"many"', "2147483648"):
            p = daemon_dir / "bad.toml"
            p.write_text(f"{key} = {value}\n")
            out = subprocess.run([KVTIERD, "--config", str(p), "--check"], capture_output=True, text=True)
            assert out.returncode == 2 and key in out.stderr, (value, out.stderr)


def test_a_uid_holds_at_most_max_sessions_per_uid_in_all_tenants(daemon_dir):
    # any name is a tenant unless configured, so the per-tenant cap alone does not bound one client's sessions
    cfg = write_config(daemon_dir, extra='group = "nogroup"\nsocket_mode = 0o666\nmax_sessions_per_uid = 3')
    d = Daemon(daemon_dir, cfg).start()
    try:
        with Client(d.socket, "t1") as a, Client(d.socket, "t2") as b, Client(d.socket, "t3") as c:
            mine = [a.register_session("x"), a.register_session("y"), b.register_session("z")]
            with pytest.raises(DaemonError) as e:
                c.register_session("one too many")
            assert e.value.errno == errno.EDQUOT and "max_sessions_per_uid" in str(e.value)

            def three_of_its_own():
                try:
                    with Client(d.socket, "t3") as x:
                        return 0 if len({x.register_session(f"n{i}") for i in range(3)}) == 3 else 13
                except DaemonError as e:
                    return 10 if e.errno == errno.EDQUOT else 11
            assert _as_nobody(three_of_its_own) == 0
            a.end_session(mine[0])
            c.register_session("after one ended")
            assert d.stats()["sessions"] == 3 + 3
    finally:
        assert d.stop() == 0


def test_a_uid_holds_at_most_max_connections_and_other_uids_are_not_refused(daemon_dir):
    # a client that leaks connections uses up its own uid's share, not the descriptors every other user needs
    cfg = write_config(daemon_dir, extra='group = "nogroup"\nsocket_mode = 0o666\nmax_connections_per_uid = 2')
    d = Daemon(daemon_dir, cfg).start()
    try:
        a, b = Client(d.socket, "acme"), Client(d.socket, "acme")
        a.put(None, [(1, "input", block_bytes(1, BLOCK))])
        with pytest.raises(DaemonError) as e:
            Client(d.socket, "acme")
        assert e.value.errno == errno.EDQUOT and "max_connections_per_uid" in str(e.value)
        with pytest.raises(DaemonError) as e:   # kvctl's one-shot calls are connections of their uid too
            admin_call(d.socket, "stats")
        assert e.value.errno == errno.EDQUOT

        def two_of_its_own():
            try:
                with Client(d.socket, "guest") as x, Client(d.socket, "guest"):
                    x.put(None, [(2, "input", block_bytes(2, BLOCK))])
                    return 0 if x.get(None, [2])[0].tobytes() == block_bytes(2, BLOCK) else 13
            except DaemonError as e:
                return 10 if e.errno == errno.EDQUOT else 11
            except OSError:
                return 12
        assert _as_nobody(two_of_its_own) == 0
        assert a.get(None, [1])[0].tobytes() == block_bytes(1, BLOCK)   # the ones it holds are served
        b.close()
        with Client(d.socket, "acme") as c:   # a closed connection frees its place
            assert c.contains([1])[0] is not None
            cfg.write_text(cfg.read_text().replace("max_connections_per_uid = 2", "max_connections_per_uid = 3"))
            d.signal(signal.SIGHUP)
            assert wait_for(lambda: "reloaded" in d.log.read_text())
            assert d.stats()["connections_over_quota"] == 2   # (the third connection of two)
        a.close()
        st = d.stats()
        assert st["connections"] == 1 and d.alive()   # this one: the others' places were all given back
    finally:
        assert d.stop() == 0


def test_out_of_descriptors_it_refuses_new_connections_and_keeps_serving(daemon_dir):
    # a client that opens connections and never closes them runs the daemon out of file descriptors
    d = Daemon(daemon_dir, write_config(daemon_dir), nofile=64).start()
    try:
        with Client(d.socket, "acme", directory=False) as kv:   # its get asks the daemon, which must answer
            kv.put(None, [(1, "input", block_bytes(1, 16 << 10))])
            hogs = []
            for _ in range(100):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.settimeout(10)
                s.connect(d.socket)
                hogs.append(s)
            try:
                assert hogs[-1].recv(64) == b""   # accepted and closed at once: EOF, not a hang
            except ConnectionResetError:
                pass
            assert kv.get(None, [1])[0].tobytes() == block_bytes(1, 16 << 10)
            for s in hogs:
                s.close()
        assert wait_for(lambda: d.alive() and d.stats()["connections_shed"] > 0)
        assert "connection refused: Too many open files" in d.log.read_text()
    finally:
        assert d.stop() == 0


def test_a_connection_holds_at_most_max_leases_and_releasing_frees_them(daemon_dir):
    # every get holds its blocks until released: a client that never releases must not grow the daemon for ever
    from kvtier.daemon import protocol
    from kvtier.daemon.server import MAX_LEASES_PER_CONNECTION as most
    d = Daemon(daemon_dir, write_config(daemon_dir)).start()
    try:
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(1, "input", block_bytes(1, BLOCK))])
            leases, chunk = [], 128
            for first in range(0, most + 1, chunk):   # pipelined: `chunk` gets, then their replies
                ids = range(first, min(first + chunk, most + 1))
                for i in ids:
                    protocol.send(kv.sock, {"op": "get", "id": 10 + i, "blocks": [1]})
                replies = [protocol.unpack(protocol.recv(kv.sock)[0]) for _ in ids]
                leases += [r["lease"] for r in replies if r["ok"]]
            assert len(leases) == most and not replies[-1]["ok"]
            assert replies[-1]["errno"] == errno.EDQUOT and "release some first" in replies[-1]["error"]
            for lease in leases[:10]:
                protocol.send(kv.sock, {"op": "release", "lease": lease})   # (no reply)
            assert kv.get(None, [1])[0].tobytes() == block_bytes(1, BLOCK)
            key = admin_call(d.socket, "blocks")["blocks"][0]["block"]
            assert "leased" in admin_call(d.socket, "explain", block=key)["why"]
        assert "leased" not in admin_call(d.socket, "explain", block=key)["why"]   # they went with the connection
    finally:
        assert d.stop() == 0


def test_out_of_descriptors_system_wide_pauses_accepting_instead_of_spinning(daemon_dir, monkeypatch):
    # ENFILE: even the spare descriptor cannot be had back, so the waiting peer cannot be accepted and closed.
    # The listening socket stays readable; polling it again at once would spin the loop at 100% CPU.
    # (The whole system's file table cannot be filled here: root is exempt from it. The error is injected.)
    import selectors
    import time

    from kvtier.daemon import server as srv

    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(str(daemon_dir / "l.sock"))
    lsock.listen()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer.connect(str(daemon_dir / "l.sock"))

    class Full:
        fileno = lsock.fileno

        def accept(self):
            raise OSError(errno.ENFILE, os.strerror(errno.ENFILE))

    def no_file(*a):
        raise OSError(errno.ENFILE, os.strerror(errno.ENFILE))
    s = object.__new__(srv.Server)
    s.lsock, s.sel, s.conns = Full(), selectors.DefaultSelector(), {}
    s.spare_fd, s.shed, s._warned, s.accept_paused_until = os.open("/dev/null", os.O_RDONLY), 0, {}, 0.0
    s.sel.register(s.lsock, selectors.EVENT_READ, None)
    assert s.sel.select(0)   # the peer waits
    monkeypatch.setattr(srv.os, "open", no_file)
    s._accept()
    assert s.sel.select(0) == [] and s.accept_paused_until > time.monotonic()   # not polled while it waits
    s._resume_accept()
    assert s.sel.select(0) == []   # (too soon)
    time.sleep(srv.ACCEPT_PAUSE_S)
    s._resume_accept()
    assert s.sel.select(0) and s.accept_paused_until == 0.0   # looked at again: accepting may work by now
    peer.close()
    lsock.close()


def test_metrics_endpoint_serves_the_families(daemon_dir):
    cfg = write_config(daemon_dir, metrics='"127.0.0.1:0"')
    d = Daemon(daemon_dir, cfg).start()
    try:
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(i, "history", block_bytes(i, 16 << 10)) for i in range(40)])
            kv.get(None, list(range(45)))
            sid = kv.register_session("decoding")
            kv.hint(sid, "decoding")
            kv.put(sid, [(100 + i, "history", block_bytes(i, 16 << 10)) for i in range(3)])
        port = d.stats()["metrics_port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for family in ("kvtier_tier_capacity_bytes{", "kvtier_tier_used_bytes{", "kvtier_hits_total{tier=",
                       "kvtier_misses_total", "kvtier_bytes_moved_total{", "kvtier_api_latency_seconds_bucket{",
                       "kvtier_put_bytes_total"):
            assert family in text, family
        misses = [line for line in text.splitlines() if line.startswith("kvtier_misses_total")]
        assert float(misses[0].split()[-1]) >= 5
        assert "kvtier_pinned_bytes 49152.0" in text.splitlines()   # the decoding session's 3 blocks
    finally:
        d.stop()


def test_pinned_bytes_are_bounded_per_tenant_and_per_uid(daemon_dir):
    # A decoding session's blocks are never evicted, so one tenant (or one uid, under as many tenant names as it
    # likes) could make the memory tiers unevictable for every other. Each is held to max_pinned_per_tenant and
    # max_pinned_per_uid bytes, charged to the session that pinned a block first.
    cfg = write_config(daemon_dir, extra='max_pinned_per_tenant = "64KiB"\nmax_pinned_per_uid = "96KiB"')
    d = Daemon(daemon_dir, cfg).start()

    def blk(i):
        return block_bytes(i, 16 << 10)

    def state(sid):
        return [r["state"] for r in admin_call(d.socket, "sessions")["sessions"] if r["session"] == sid][0]
    try:
        with Client(d.socket, "acme") as a, Client(d.socket, "globex") as b:
            s1 = a.register_session("first")
            a.put(s1, [(i, "history", blk(i)) for i in range(4)])
            a.hint(s1, "decoding")   # 64 KiB: the tenant's bound, reached
            st = a.stats()
            assert st["pinned_bytes"] == 64 << 10 and st["max_pinned_bytes"] == 64 << 10
            s2 = a.register_session("second")
            a.put(s2, [(10, "history", blk(10))])
            with pytest.raises(DaemonError) as e:
                a.hint(s2, "decoding")
            assert e.value.errno == errno.EDQUOT and "max_pinned_per_tenant" in str(e.value)
            assert state(s2) == "prefilling" and d.stats()["pinned_blocks"] == 4   # refused whole
            with pytest.raises(DaemonError) as e:   # a decoding session's put past the bound is refused
                a.put(s1, [(20, "input", blk(20))])
            assert e.value.errno == errno.EDQUOT and "stored 0 of the put's 1" in str(e.value)
            assert a.contains([20]) == [None]
            # another tenant of the same uid has its own 64 KiB, but the uid 96 KiB in all
            t1 = b.register_session("x")
            b.hint(t1, "decoding")
            with pytest.raises(DaemonError) as e:
                b.put(t1, [(30 + i, "input", blk(30 + i)) for i in range(3)])
            assert e.value.errno == errno.EDQUOT and "max_pinned_per_uid" in str(e.value)
            assert "stored 2 of the put's 3" in str(e.value)
            assert [x is not None for x in b.contains([30, 31, 32])] == [True, True, False]
            assert b.stats()["pinned_bytes"] == 32 << 10 and d.stats()["pinned_bytes"] == 96 << 10
            # a get cannot be refused for it: served, and the block stays in its policy (counted)
            assert a.get(s1, [10])[0].tobytes() == blk(10)
            assert wait_for(lambda: d.stats()["counters"]["pins_over_quota"] == 1)
            assert d.stats()["pinned_blocks"] == 6
            a.hint(s1, "idle")   # leaving decoding gives the bytes back
            assert a.stats()["pinned_bytes"] == 0
            a.hint(s2, "decoding")
            assert a.stats()["pinned_bytes"] == 16 << 10 and state(s2) == "decoding"
            assert b.delete([30]) == 1   # a pinned block deleted: its bytes go back too
            assert b.stats()["pinned_bytes"] == 16 << 10
    finally:
        assert d.stop() == 0
    for key in ("max_pinned_per_tenant", "max_pinned_per_uid"):
        for value in ("0", "true", '"many"', '"150%"'):
            p = daemon_dir / "bad.toml"
            p.write_text(f"{key} = {value}\n")
            out = subprocess.run([KVTIERD, "--config", str(p), "--check"], capture_output=True, text=True)
            assert out.returncode == 2 and key in out.stderr, (value, out.stderr)


def test_decoding_session_blocks_never_evicted(daemon):
    with Client(daemon.socket, "acme") as kv:
        hot = kv.register_session("decoding")
        kv.put(hot, [(i, "history", block_bytes(i, 16 << 10)) for i in range(4)])
        kv.hint(hot, "decoding")
        other = kv.register_session("churn")
        for r in range(5):   # 5 x 40 blocks through a 256 KiB first tier
            kv.put(other, [(1000 + 40 * r + i, "input", block_bytes(i, 16 << 10)) for i in range(40)])
            kv.get(other, [1000 + 40 * r + i for i in range(0, 40, 3)])
        assert kv.contains(range(4)) == ["dram0"] * 4
        moved = {m["block"] for m in admin_call(daemon.socket, "moves", limit=5000)["moves"]
                 if m["reason"] not in ("pin", "unpin", "decoding")}
        mine = {b["block"] for b in admin_call(daemon.socket, "blocks", session=hot)["blocks"]}
        assert len(mine) == 4 and not (mine & moved)
        shared = 1000 + 40 * 4 + 39   # a block of the other session, taken on while decoding: pinned too
        kv.get(hot, [shared])
        assert daemon.stats()["pinned_blocks"] == 5
        kv.put(hot, [(9000, "tail", block_bytes(9, 16 << 10))])   # put while decoding: pinned
        assert daemon.stats()["pinned_blocks"] == 6
        assert kv.delete([9000]) == 1
        assert daemon.stats()["pinned_blocks"] == 5
        kv.hint(hot, "idle")   # back to the policy: now it may move
        assert daemon.stats()["pinned_blocks"] == 0
        kv.put(other, [(5000 + i, "input", block_bytes(i, 16 << 10)) for i in range(40)])
        assert kv.contains(range(4)) != ["dram0"] * 4


def test_config_errors_name_the_key(daemon_dir):
    cases = {'policy = "nope"': "policy", 'bogus = 1': "bogus", '[[tiers]]\nkind = "tape"\ncapacity = 1': "kind",
             '[[tiers]]\nkind = "dram"\ncapacity = "lots"': "capacity", 'metrics = "nohost"': "metrics",
             'group = "no-such-group-x"': "group", '[admins]\nuids = ["x"]': "admins.uids",
             '[admins]\ngroups = ["no-such-group-x"]': "admins.groups", '[admins]\nusers = [1]': "admins.users"}
    for text, key in cases.items():
        p = daemon_dir / "bad.toml"
        p.write_text(text + "\n")
        out = subprocess.run([KVTIERD, "--config", str(p), "--check"], capture_output=True, text=True)
        assert out.returncode == 2, (text, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and key in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([KVTIERD, "--config", str(write_config(daemon_dir)), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and '"policy": "lru"' in out.stdout


def test_durable_put_survives_sigterm_and_restart(daemon_dir):
    d = Daemon(daemon_dir, write_config(daemon_dir)).start()
    try:
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(i, "prefix", block_bytes(i, 4096)) for i in range(5)], durable=True)
            kv.put(None, [(100, "input", block_bytes(100, 4096))])   # memory only
        assert d.stop() == 0 and not os.path.exists(d.socket)
        d.start()
        with Client(d.socket, "acme") as kv:
            assert [g.tobytes() for g in kv.get(None, range(5))] == [block_bytes(i, 4096) for i in range(5)]
            # memory only, but a graceful stop flushed it (shutdown_flush_s)
            assert kv.get(None, [100])[0].tobytes() == block_bytes(100, 4096)
            kv.put(None, [(101, "input", block_bytes(101, 4096))])   # memory only
        d.kill9()
        d.start()
        with Client(d.socket, "acme") as kv:
            assert [g.tobytes() for g in kv.get(None, range(5))] == [block_bytes(i, 4096) for i in range(5)]
            assert kv.get(None, [101]) == [None]   # memory tiers are a cache: a crash loses what is only there
    finally:
        d.stop()


def test_pinned_and_reserved_blocks_are_bounded_by_count(daemon_dir):
    # Pinned blocks (decoding sessions) and reserved slots (puts being written, spares) are out of every policy, so
    # only bytes bounded them: 64-byte blocks filled 2 MiB of memory tiers with 32,000 pinned blocks, each ~2 KiB
    # of the daemon's index. Each kind is bounded by count too: capacity / nominal_bytes, at least 65536.
    from kvtier.daemon import protocol
    from kvtier.daemon.engine import OUT_OF_POLICY_MIN_BLOCKS as most
    cfg = write_config(daemon_dir, dram="12MiB", cxl="1MiB", nominal="16KiB")   # 768 + 64 nominal blocks < most
    d = Daemon(daemon_dir, cfg).start()
    try:
        with Client(d.socket, "acme") as kv:
            hot = kv.register_session("decoding")
            kv.hint(hot, "decoding")
            tiny = [b"%063d" % i for i in range(most + 100)]
            assert kv.put(hot, [(i, "input", tiny[i]) for i in range(most - 28)]) == most - 28
            with pytest.raises(DaemonError) as e:
                kv.put(hot, [(i, "input", tiny[i]) for i in range(most - 28, most + 72)])
            assert e.value.errno == errno.ENOSPC and "stored 28 of the put's 100" in str(e.value)
            assert "nominal_bytes" in str(e.value)
            assert d.stats()["pinned_blocks"] == most
            held = kv.contains(range(most - 100, most + 100))
            assert all(held[:100]) and not any(held[100:])   # the rest of the batch is not stored
            assert kv.get(None, [most - 1])[0].tobytes() == tiny[most - 1]
            assert kv.put(kv.register_session("not decoding"), [(10**9, "input", b"x" * 64)]) == 1   # unpinned
            assert kv.delete(range(10)) == 10   # room for 10 more
            assert kv.put(hot, [(2 * most + i, "input", b"y" * 64) for i in range(10)]) == 10
            kv.delete(list(range(most)) + [2 * most + i for i in range(10)])
            assert d.stats()["pinned_blocks"] == 0
        with Client(d.socket, "acme") as kv:   # puts reserved and never committed
            txns, n = [], 0
            while True:
                protocol.send(kv.sock, {"op": "put", "id": 7, "blocks": [[n + i, "input", 64, None]
                                                                         for i in range(2048)]})
                r = protocol.unpack(protocol.recv(kv.sock)[0])
                if not r["ok"]:
                    break
                txns.append(r["txn"])
                n += 2048
            assert n == most and r["errno"] == errno.EDQUOT and "commit or abort" in r["error"]
            protocol.send(kv.sock, {"op": "abort", "id": 8, "txn": txns[0]})
            assert protocol.unpack(protocol.recv(kv.sock)[0])["ok"]
            assert kv.put(None, [(10**9 + 1, "input", b"z" * 64)]) == 1   # room again
        with Client(d.socket, "acme") as kv:   # the closed connection's reservations went with it
            assert kv.put(None, [(10**9 + 2 + i, "input", b"z" * 64) for i in range(4096)]) == 4096
    finally:
        assert d.stop() == 0


def test_a_session_leaving_decoding_with_many_blocks_is_unpinned_between_requests(daemon_dir):
    # Unpinned blocks go back to the policies, and each may cascade demotions down to NVMe: unpinned all at once,
    # 8,000 tiny blocks held every tenant's requests for 2.5 s (65,000: over 30 s). They are unpinned in steps
    # now, between requests, and a pin taken meanwhile is kept.
    from kvtier.daemon.engine import UNPIN_AT_ONCE
    n = 4 * UNPIN_AT_ONCE
    d = Daemon(daemon_dir, write_config(daemon_dir, nvme="128MiB")).start()   # 16 + 16 nominal blocks in memory
    try:
        with Client(d.socket, "acme") as kv, Client(d.socket, "other") as other:
            sid = kv.register_session("long")
            kv.hint(sid, "decoding")
            data = [b"%063d" % i for i in range(n)]
            kv.put(sid, [(i, "input", data[i]) for i in range(n)])
            assert d.stats()["pinned_blocks"] == n
            kv.hint(sid, "idle")
            kv.hint(sid, "decoding")   # back before the unpinning is done: its pins stay
            assert wait_for(lambda: d.stats()["unpinning_blocks"] == 0, 120)
            assert d.stats()["pinned_blocks"] == n
            kv.end_session(sid)   # answered at once; the unpinning goes on between requests
            st = d.stats()
            assert st["unpinning_blocks"] > 0 and st["pinned_blocks"] > 0
            assert other.put(None, [(1, "input", b"served meanwhile")]) == 1
            assert bytes(other.get(None, [1])[0]) == b"served meanwhile"
            assert wait_for(lambda: d.stats()["pinned_blocks"] == 0, 120)
            got = kv.get(None, range(0, n, 97))   # back to the policies: demoted or kept, never lost
            assert [bytes(g) for g in got] == [data[i] for i in range(0, n, 97)]
    finally:
        assert d.stop() == 0


def test_systemd_notify_ready_watchdog_stopping(daemon_dir):
    sock_path = str(daemon_dir / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(10)
    d = Daemon(daemon_dir, write_config(daemon_dir), env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"})
    d.start()
    try:
        got = [s.recv(4096).decode() for _ in range(3)]
        assert got[0].startswith("READY=1") and "WATCHDOG=1" in got[1:]
    finally:
        assert d.stop() == 0
    rest = []
    while True:
        try:
            rest.append(s.recv(4096).decode())
        except TimeoutError:
            break
        if rest[-1].startswith("STOPPING=1"):
            break
    assert rest and rest[-1].startswith("STOPPING=1")
    s.close()


def test_embedded_default_without_config(daemon_dir):
    if os.path.exists("/etc/kvtier/kvtierd.toml"):
        pytest.skip("this machine has a system config, which kvtierd would read instead of the embedded default")
    env = {**os.environ, "KVTIER_STATE_DIR": str(daemon_dir / "state"), "KVTIER_SOCKET": str(daemon_dir / "d.sock")}
    log = open(daemon_dir / "default.log", "wb")
    p = subprocess.Popen([KVTIERD, "--metrics", ""], env=env, stdout=log, stderr=log)
    try:
        wait_serving(p, str(daemon_dir / "d.sock"), daemon_dir / "default.log")
        with Client(str(daemon_dir / "d.sock"), "acme") as kv:
            kv.put(None, [(1, "prefix", block_bytes(1, 1 << 20))], durable=True)
            assert kv.get(None, [1])[0].tobytes() == block_bytes(1, 1 << 20)
        out = subprocess.run([KVTIERD.replace("kvtierd", "kvctl"), "status", "--json"], env=env,
                             capture_output=True, text=True)
        st = __import__("json").loads(out.stdout)
        assert [t["kind"] for t in st["tiers"]] == ["dram", "nvme"] and st["config"] == "(embedded default)"
        assert os.path.isdir(daemon_dir / "state" / "nvme") and st["tiers"][1]["blocks"] == 1
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0


def test_finished_session_goes_down_first_and_resuming_one_stays(daemon_dir):
    """The engine's life-cycle hints reach the policy: when the first tier needs room, a finished session's blocks
    are demoted (not dropped) before a resuming session's and before blocks with no hint at all."""
    d = Daemon(daemon_dir, write_config(daemon_dir, policy="kvtier")).start()   # 14 blocks in dram0 (+ 2% free)
    try:
        with Client(d.socket, "acme") as kv:
            done, back, new = kv.register_session("done"), kv.register_session("back"), kv.register_session("new")
            kv.put(back, [(100 + i, "history", block_bytes(100 + i, BLOCK)) for i in range(5)])
            kv.put(done, [(i, "history", block_bytes(i, BLOCK)) for i in range(5)])   # younger: by age, it stays
            kv.hint(back, "resume")
            assert kv.end_session(done) == 5   # the finished hint: its blocks are only worth their prefix now
            assert kv.contains(list(range(5)) + list(range(100, 105))) == ["dram0"] * 10
            for i in range(6):   # 16 blocks > 14: some must go down
                kv.put(new, [(200 + i, "input", block_bytes(200 + i, BLOCK))])
            where = dict(zip(range(5), kv.contains(range(5))))
            down = [b for b, t in where.items() if t != "dram0"]
            assert len(down) >= 2 and all(where[b] == "cxl0" for b in down), where   # demoted, not dropped
            assert kv.contains(range(100, 106)) == ["dram0"] * 5 + [None]
            assert kv.contains(range(200, 206)) == ["dram0"] * 6
            assert [bytes(v) for v in kv.get(None, range(5))] == [block_bytes(i, BLOCK) for i in range(5)]
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]
