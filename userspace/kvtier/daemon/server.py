"""kvtierd's event loop: the engine API socket, signals, systemd notification, metrics.

One thread runs a selectors loop over the listening socket, the connections and a signal wake-up pipe; every op
runs to completion in it (no locks in the engine). NVMe I/O runs inline: a spill is an fdatasync'd O_DIRECT
write that the client's commit waits for anyway. The metrics endpoint runs in prometheus-client's own thread and
only reads counters.

Who may connect: the socket file is mode 0660 (socket_mode) owned by root:<group>, and each peer's SO_PEERCRED is
checked again at accept: root, the daemon's own uid, or a process whose primary or supplementary groups include
the configured group. A connection binds to one tenant at hello (a tenant may be limited to some uids).

Tenant isolation: every op is scoped to the connection's tenant. The read-only views (stats, sessions, blocks,
explain, moves) show a tenant-bound connection only its own tenant's sessions, blocks and moves; another tenant's
block or session answers ENOENT, exactly as a missing one would, so not even its existence leaks. The all-tenant
views (a connection that bound no tenant), pin/unpin/evict and policy set need an admin: root, the daemon's uid,
or a uid / group listed under [admins] in the config (kvctl, run as root, binds no tenant: the whole view).
"""
from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import struct
import time

from kvtier.daemon import protocol
from kvtier.daemon.engine import Engine, count_down
from kvtier.errors import InputError

log = logging.getLogger("kvtier.daemon")

PREFETCH_EVERY_S = 1.0
# Per-connection state a client could otherwise grow without bound (each is far above what an engine holds):
MAX_LEASES_PER_CONNECTION = 65536   # gets not released yet (get_views open, or a client that never releases)
WARN_EVERY_S = 10.0   # a warning about refused connections is logged at most this often
ACCEPT_PAUSE_S = 0.1   # out of descriptors system-wide: how long accepting waits before it tries again
GC_GEN0_OBJECTS = 50_000   # allocations between young collections (CPython default 700); see Collector


class Collector:
    """Python's cycle collector, kept away from what the daemon holds.

    The index, the policies' state and the arenas are millions of long-lived objects that make no garbage
    cycles, and CPython's collector would walk them anyway: a collection of its middle generation walks
    everything that survived the young ones since the last (~200 ms at 1M blocks), a full one the whole heap
    (1.8 s at 1M blocks under the default policy), and every client waits that long. So what start-up built is
    frozen (gc.freeze: the permanent generation, never walked), young collections come every GC_GEN0_OBJECTS
    allocations (bulk puts at 1M blocks ran 1.3-1.4x faster than with CPython's 700), and with freeze=True (the
    default; config gc_freeze) the survivors of each collection are frozen as it ends: no collection walks an
    object twice, so each costs what was allocated since the last (5-15 ms at most here). The price: garbage that is a
    reference cycle of objects which lived through a collection is never freed. Reference counting still frees
    everything else, the daemon's requests make no such cycles (tests/test_daemon_gc.py checks), and what drops
    long-lived state (a policy change) calls collect_all(), which walks everything once."""

    def __init__(self, freeze: bool = True):
        self.freeze = freeze
        self.collections = [0, 0, 0]   # per generation, since start
        self.pause_max_s = self.pause_total_s = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_OBJECTS, 20, 100)
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        if self.freeze:
            gc.freeze()   # the survivors: the collected generations are empty now, so nothing younger goes too
        dt = time.perf_counter() - self._t0
        self.collections[info["generation"]] += 1
        self.pause_total_s += dt
        self.pause_max_s = max(self.pause_max_s, dt)

    def collect_all(self) -> None:
        """Walk everything once (frozen objects included) and free the cycles among them."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def status(self) -> dict:
        return {"freeze": self.freeze, "collections": list(self.collections), "frozen_objects": gc.get_freeze_count(),
                "pause_max_ms": round(self.pause_max_s * 1e3, 3), "pause_total_ms": round(self.pause_total_s * 1e3, 1)}


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) READY=1 / WATCHDOG=1 / STOPPING=1 through $NOTIFY_SOCKET; False if not under it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]   # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify %s: %s", state, e)
        return False


def peer_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def build_tiers(cfg) -> list:
    from kvtier.store import MemoryTier, NvmeTier, codec_from_config
    tiers = []
    try:
        for t in cfg.tiers:
            if t.kind == "nvme":
                os.makedirs(t.directory, mode=0o700, exist_ok=True)
                codec = codec_from_config(t.codec) if t.codec else None
                tiers.append(NvmeTier(t.name, t.directory, t.capacity_bytes, codec=codec, fsync=t.fsync))
            elif t.kind == "gpu":   # CUDA managed memory; demoted blocks prefer the next memory tier's node
                from kvtier.cuda.tier import open_tier
                host = next((h for h in cfg.tiers if h.kind in ("dram", "cxl")), None)
                tiers.append(open_tier(t.name, t.capacity_bytes, t.device, host.nodes[0] if host else None))
            else:
                tiers.append(MemoryTier(t.name, t.kind, t.nodes, t.capacity_bytes, backend=t.backend,
                                        prefault=t.prefault))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return tiers


class Connection:
    __slots__ = ("sock", "uid", "gid", "pid", "tenant", "domain", "txns", "leases", "groups", "refused", "spares",
                 "staged", "nowait")

    def __init__(self, sock, uid, gid, pid, groups):
        self.sock, self.uid, self.gid, self.pid, self.groups = sock, uid, gid, pid, groups
        self.tenant = None
        self.domain = None   # the tenant's salt when it bound: the memory it may map (engine.open_domain)
        self.txns: set[int] = set()
        self.leases: set[int] = set()
        self.spares: dict[int, tuple] = {}   # spare slots this client may fill (engine.spare_reserve)
        self.staged = None   # a staged put waiting for its commit: (txn, spares to free at commit, reply | error)
        self.nowait = None   # what puts sent without reply stored and their first failure (Server._put_nowait)


class Server:
    def __init__(self, cfg, config_path: str | None, metrics=None):
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = metrics
        self.tiers = build_tiers(cfg)
        self.engine = Engine(cfg, self.tiers, metrics)
        self.engine.on_writeback_done = self._wake   # a reclaim batch is on disk: move it (Engine.reclaim)
        self.engine.defer_policy = True   # policy bookkeeping after the reply: see Engine.run_deferred
        from kvtier.daemon.heat import Heat   # eBPF access heat: loads in the background, optional
        self.heat = Heat(self.engine, getattr(cfg, "probes", None))
        self.heat.start()
        if cfg.cluster is not None:   # connects in the background: the local tiers serve meanwhile
            from kvtier.daemon.cluster_link import ClusterLink
            self.engine.cluster = ClusterLink(self.engine, cfg.cluster)
        if metrics is not None:
            metrics.engine = self.engine
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Connection] = {}
        self.running = True
        self.reload_wanted = False
        self.metrics_port = None
        self.started = time.time()
        self.collector = Collector(cfg.gc_freeze)
        self._rbuf = protocol.new_buffer()   # one receive buffer: the loop unpacks each message before the next
        self._ops = {
            "hello": self.op_hello, "arenas": self.op_arenas, "register_session": self.op_register_session,
            "end_session": self.op_end_session, "hint": self.op_hint, "put": self.op_put, "commit": self.op_commit,
            "abort": self.op_abort, "spare": self.op_spare,
            "get": self.op_get, "release": self.op_release, "touch": self.op_touch, "contains": self.op_contains,
            "delete": self.op_delete, "stats": self.op_stats, "sessions": self.op_sessions,
            "blocks": self.op_blocks, "explain": self.op_explain, "pin": self.op_pin, "unpin": self.op_unpin,
            "evict": self.op_evict, "policy": self.op_policy, "policy_set": self.op_policy, "moves": self.op_moves,
            "top": self.op_top, "register_range": self.op_register_range,
            "unregister_range": self.op_unregister_range,
        }

    # -- socket set-up ---------------------------------------------------------------------------------
    def listen(self) -> None:
        path = self.cfg.socket
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
                probe.close()
                raise OSError(errno.EADDRINUSE, f"{path}: another kvtierd is serving this socket")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)   # stale socket of a daemon that died
            finally:
                probe.close()
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)   # never world-accessible, not even between bind and chmod
        try:
            self.lsock.bind(path)
        finally:
            os.umask(old)
        os.chown(path, -1, self.cfg.gid)
        os.chmod(path, self.cfg.socket_mode)
        self.lsock.listen(128)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        # epoll has no FD_SETSIZE: take the whole descriptor limit the service was given (systemd's default soft
        # limit is 1024, its hard one far higher; LimitNOFILE= sets both)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass
        # held for the moment the process is out of file descriptors: closed to accept (and close) the waiting
        # peer, else the listening socket stays readable and the loop spins
        self.spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.shed = 0
        self._warned: dict[str, float] = {}   # kind of warning -> when it was last logged (_warn_rarely)
        self.accept_paused_until = 0.0   # out of descriptors even with the spare: stop accepting until then
        self.uid_conns: dict[int, int] = {}   # peer uid -> connections open (max_connections_per_uid)
        self.over_quota = 0
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        if self.metrics is not None and self.cfg.metrics_host:
            try:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
            except OSError as e:
                log.warning("metrics endpoint %s:%s not started: %s", self.cfg.metrics_host,
                            self.cfg.metrics_port, e)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGHUP:
            self.reload_wanted = True
        else:
            self.running = False

    # -- main loop ---------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        watchdog_us = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        ping_s = watchdog_us / 2e6 if watchdog_us else None
        last_ping = last_prefetch = time.monotonic()
        sd_notify(f"READY=1\nSTATUS=serving {self.cfg.socket}\nMAINPID={os.getpid()}")
        log.info("kvtierd ready on %s (policy %s, tiers %s, metrics %s)", self.cfg.socket, self.engine.policy_name,
                 ", ".join(f"{t.name}:{t.kind}:{t.capacity_bytes}" for t in self.tiers),
                 f"{self.cfg.metrics_host}:{self.metrics_port}" if self.metrics_port else "off")
        for t in getattr(self.cfg, "absent_tiers", ()):   # optional gpu tiers without their GPU
            log.warning("tier %s (%s) left out: %s", t["name"], t["kind"], t["reason"])
        self.collector.start()
        spin_s = self.cfg.busy_poll_us / 1e6
        spin_until = 0.0
        reclaim = False   # a memory tier is refilling its free target (Engine.reclaim): one batch per turn
        while self.running:
            timeout = min(PREFETCH_EVERY_S, ping_s) if ping_s else PREFETCH_EVERY_S
            if self.heat.probes is not None:
                timeout = min(timeout, self.heat.interval_s)
            if self.accept_paused_until:
                self._resume_accept()
                timeout = min(timeout, ACCEPT_PAUSE_S)
            if spin_until or reclaim:
                # busy-poll right after a request: the next one usually follows within microseconds
                events = self.sel.select(0)
                if not events:
                    if reclaim:
                        reclaim = self._reclaim()   # idle: a batch, then look for requests again
                        continue
                    if time.perf_counter() < spin_until:
                        continue
                    spin_until = 0.0
                    events = self.sel.select(timeout)
            else:
                events = self.sel.select(timeout)
            if spin_s and events and not self.engine.writeback_busy:
                # (not while the writer thread works: on a small machine spinning would take its CPU)
                spin_until = time.perf_counter() + spin_s
            for key, _ in events:
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    try:
                        self.wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                else:
                    try:
                        self._serve(key.data)
                    except Exception:   # one connection's failure never takes the daemon down
                        log.exception("connection of pid %d", key.data.pid)
                        self._close(key.data)
            if events:
                reclaim = self._reclaim()   # keeps pace with puts: a batch after each turn that served requests
            if self.reload_wanted:
                self.reload_wanted = False
                self.reload()
            now = time.monotonic()
            if ping_s and now - last_ping >= ping_s:
                sd_notify("WATCHDOG=1")
                last_ping = now
            if now - last_prefetch >= PREFETCH_EVERY_S:
                last_prefetch = now
                try:
                    self.engine.prefetch_tick()
                except Exception:
                    log.exception("prefetch")
            self.heat.tick(now)   # eBPF heat -> per-block EMA and policy.touch(), every [probes] interval_ms
        self.shutdown()

    def _wake(self) -> None:
        """From another thread: make serve_forever look around (select returns)."""
        try:
            self.wake_w.send(b"w")
        except OSError:
            pass   # full: a wake-up is pending anyway

    def _reclaim(self) -> bool:
        """Background work, one step a turn: unpinning a session that left decoding, then refilling free targets.
        True while there is more."""
        try:
            more = self.engine.unpin_step()
        except Exception:
            log.exception("unpin")
            more = False
        try:
            return self.engine.reclaim() or more
        except Exception:   # a failed demotion is logged where it happens; never stop serving for it
            log.exception("reclaim")
            return more

    def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        log.info("kvtierd stopping: closing connections and tiers")
        try:
            self.sel.unregister(self.lsock)
        except (KeyError, ValueError):
            pass
        self.lsock.close()
        try:
            os.unlink(self.cfg.socket)
        except OSError:
            pass
        for fd in list(self.conns):
            self._close(self.conns[fd])
        if self.cfg.shutdown_flush_s > 0:
            try:
                done = self.engine.flush_for_restart(self.cfg.shutdown_flush_s)
                log.info("flushed %d memory-only blocks (%d bytes) to NVMe in %.2f s for the restart; %d left",
                         done["blocks"], done["bytes"], done["seconds"], done["left"])
            except Exception:   # a failed flush must not keep the NVMe index from closing cleanly
                log.exception("flush for restart")
        self.heat.close()
        self.collector.stop()
        self.engine.close()   # NvmeTier.close() syncs and closes its index log
        if self.metrics is not None:
            self.metrics.stop()

    def reload(self) -> None:
        """SIGHUP: re-read the config; policy and capacities change live, an invalid file keeps the old one."""
        from kvtier.daemon import config as config_mod
        try:
            new = config_mod.load(self.config_path)
            if [(t.name, t.kind) for t in new.tiers] != [(t.name, t.kind) for t in self.cfg.tiers]:
                raise InputError("the tier list changed (names or kinds); that needs a restart")
        except (InputError, OSError) as e:
            log.error("reload failed, keeping the old config: %s", e)
            return
        self.cfg.tenants = new.tenants
        self.engine.salts.clear()
        for conn in list(self.conns.values()):
            # a tenant whose salt or allowed uids changed binds again (its mappings are the old domain's)
            if conn.tenant is not None:
                if self.engine.salt(conn.tenant) != conn.domain or not self.cfg.tenant(conn.tenant).allows(conn.uid):
                    log.info("closing pid %d's connection: tenant %s changed", conn.pid, conn.tenant)
                    self._close(conn)
        self.engine.release_stale_domains({c.domain for c in self.conns.values()})
        self.cfg.admin_uids, self.cfg.admin_gids = new.admin_uids, new.admin_gids
        self.cfg.min_block_bytes, self.cfg.max_block_bytes = new.min_block_bytes, new.max_block_bytes
        self.cfg.nominal_block_bytes = new.nominal_block_bytes
        if new.policy != self.engine.policy_name:
            self._set_policy(new.policy)
        self.cfg.gc_freeze = self.collector.freeze = new.gc_freeze
        self.cfg.max_sessions_per_tenant = new.max_sessions_per_tenant   # sessions already open stay open
        self.cfg.max_sessions_per_uid = new.max_sessions_per_uid
        self.cfg.max_connections_per_uid = new.max_connections_per_uid   # so do connections
        # pins taken stay: a lower bound refuses only new ones
        self.cfg.max_pinned_per_tenant, self.cfg.max_pinned_per_uid = new.max_pinned_per_tenant, new.max_pinned_per_uid
        self.engine.set_limits([t.capacity_bytes for t in new.tiers])
        self.engine.set_free_targets([t.free_target_bytes for t in new.tiers])
        log.info("reloaded %s: policy %s, capacities %s", self.config_path or "(embedded default)", new.policy,
                 [t.capacity_bytes for t in new.tiers])

    def _set_policy(self, name: str) -> None:
        """kvctl policy set, or a reload naming another policy."""
        self.engine.set_policy(name)
        self.cfg.policy = name
        self.collector.collect_all()   # the old policy's state goes: free what of it was frozen in cycles

    # -- connections ------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._shed(e)
            return   # else (ECONNABORTED, ...) that peer is gone
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if self.uid_conns.get(uid, 0) >= self.cfg.max_connections_per_uid:
            self._over_quota(sock, uid, pid)
            return
        self.uid_conns[uid] = self.uid_conns.get(uid, 0) + 1
        groups = peer_groups(pid) | {gid}
        refused = uid not in (0, os.getuid()) and self.cfg.gid not in groups
        if refused:
            # Kept open and answered EACCES per request: closing at once would reset the peer before it
            # could read why. It is closed when the peer goes away.
            log.warning("refused uid %d (pid %d): not in group %s", uid, pid, self.cfg.group)
        # replies are small; a peer that stops reading gets a send timeout (a kernel one: see protocol.py)
        protocol.set_timeouts(sock, 5.0)
        conn = Connection(sock, uid, gid, pid, groups)
        conn.refused = refused
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)

    def _over_quota(self, sock: socket.socket, uid: int, pid: int) -> None:
        """uid holds max_connections_per_uid connections already: say why in one reply (the client raises it as
        the answer to its hello) and close, so one user cannot take every descriptor from the others."""
        self.over_quota += 1
        try:
            protocol.send(sock, {"id": 0, "ok": False, "errno": errno.EDQUOT,
                                 "error": f"uid {uid} holds {self.uid_conns[uid]} connections, as many as "
                                          f"max_connections_per_uid allows; close some first"})
            while sock.recv(64, socket.MSG_DONTWAIT):   # its hello: closing with it unread would reset the peer,
                pass                                     # which then reads ECONNRESET instead of this reply
        except OSError:
            pass   # the peer is gone already, or sent nothing yet (it reads this reply after EPIPE)
        sock.close()
        self._warn_rarely("over_quota", "refused a connection of uid %d (pid %d): it holds %d "
                          "(max_connections_per_uid); %d refused so far", uid, pid, self.uid_conns[uid],
                          self.over_quota)

    def _shed(self, why: OSError) -> None:
        """Out of file descriptors: the waiting peer is accepted and closed at once (it reads ECONNRESET), using
        the spare descriptor, so the daemon keeps serving the connections it has instead of failing. If even that
        fails (the whole system is out: ENFILE), accepting pauses for ACCEPT_PAUSE_S: the listening socket stays
        readable, and polling it again at once would spin the loop."""
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        try:
            self.lsock.accept()[0].close()
            self.shed += 1
        except (BlockingIOError, InterruptedError):
            pass   # the peer gave up meanwhile
        except OSError:
            self._pause_accept()
        try:
            self.spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._pause_accept()   # taken again at the next shed
        self._warn_rarely("shed", "connection refused: %s (%d connections open, %d refused so far); raise "
                          "LimitNOFILE or find the client that does not close its connections", why.strerror,
                          len(self.conns), self.shed)

    def _warn_rarely(self, kind: str, fmt: str, *args) -> None:
        """log.warning, at most every 10 s per kind: a client refused in a loop must not flood the journal."""
        now = time.monotonic()
        if now - self._warned.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[kind] = now
            log.warning(fmt, *args)

    def _pause_accept(self) -> None:
        if not self.accept_paused_until:
            self.sel.unregister(self.lsock)
        self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S

    def _resume_accept(self) -> None:
        if self.accept_paused_until and time.monotonic() >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            self.sel.register(self.lsock, selectors.EVENT_READ, None)

    def _close(self, conn: Connection) -> None:
        self._drop_staged(conn)
        for txn in list(conn.txns):
            try:
                self.engine.put_abort(txn)
            except KeyError:
                pass
        for lease in list(conn.leases):
            self.engine.release(lease)
        for spare in list(conn.spares):
            self.engine.spare_free(conn.spares, spare)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if self.conns.pop(conn.sock.fileno(), None) is conn:
            count_down(self.uid_conns, conn.uid)
        conn.sock.close()
        if conn.domain is not None and not any(c.domain == conn.domain for c in self.conns.values()):
            self.engine.release_domain(conn.domain)   # kept while it stores blocks

    def _serve(self, conn: Connection) -> None:
        try:
            data, fds, truncated = protocol.recv(conn.sock, protocol.MSG_DONTWAIT, self._rbuf)
        except BlockingIOError:
            return   # a spurious wake-up: nothing to read after all
        except OSError:
            self._close(conn)
            return
        for fd in fds:   # clients have no reason to send descriptors
            os.close(fd)
        if not data and not fds:
            self._close(conn)
            return
        if truncated:
            self._reply(conn, {"id": 0, "ok": False, "errno": errno.EMSGSIZE,
                               "error": f"message larger than {protocol.MAX_MESSAGE_BYTES} bytes"})
            self._close(conn)
            return
        t0 = time.perf_counter()
        rid = None
        op = "?"
        try:
            msg = protocol.unpack(data)
            if not isinstance(msg, dict):
                raise OSError(errno.EINVAL, "a request is a map with 'op'")
            rid = msg.get("id")
            op = msg.get("op")
            if conn.refused:
                raise OSError(errno.EACCES, f"uid {conn.uid} is not in group {self.cfg.group}")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise OSError(errno.EINVAL, f"unknown op {op!r}")
            if conn.staged is not None and op != "commit" and op != "abort":
                self._drop_staged(conn)   # a staged put is followed by its commit or abort, nothing else
            reply, fds = handler(conn, msg)
            reply["ok"] = True
        except OSError as e:
            reply, fds = {"ok": False, "errno": e.errno or errno.EIO, "error": e.strerror or str(e)}, []
        except (ValueError, TypeError, KeyError, OverflowError, IndexError) as e:
            # msgpack's own errors and wrong field types: the request was malformed
            log.debug("op %r: malformed request", op, exc_info=True)
            reply, fds = {"ok": False, "errno": errno.EINVAL, "error": f"malformed request: {e}"}, []
        except Exception as e:
            log.exception("op %r failed", op)
            reply, fds = {"ok": False, "errno": errno.EIO, "error": f"internal error: {e}"}, []
        if self.metrics is not None and isinstance(op, str) and op in self._ops:
            self.metrics.observe(op, time.perf_counter() - t0)
        if rid is not None or not reply["ok"]:   # else fire-and-forget (release): no reply
            reply["id"] = rid if isinstance(rid, int) else 0
            if conn.nowait is not None:
                reply["nowait"], conn.nowait = conn.nowait, None
            self._reply(conn, reply, fds)
        self.engine.run_deferred()   # the policy's part of a put or hit, off the client's wait

    def _reply(self, conn, reply, fds=()) -> None:
        try:
            protocol.send(conn.sock, reply, fds)
        except OSError as e:
            if e.errno != errno.EMSGSIZE or not reply.get("ok"):
                self._close(conn)
                return
            self._reply(conn, {"id": reply.get("id", 0), "ok": False, "errno": errno.E2BIG,
                               "error": f"the reply is larger than {protocol.MAX_MESSAGE_BYTES} bytes; "
                                        f"ask for fewer rows (limit)"})
        except Exception as e:   # a reply that does not encode is our bug: say so, keep serving
            log.exception("reply to %r does not encode", reply.get("id"))
            self._reply(conn, {"id": reply.get("id", 0), "ok": False, "errno": errno.EIO,
                               "error": f"internal error encoding the reply: {e}"})

    # -- ops ------------------------------------------------------------------------------------------------------
    def _tenant(self, conn) -> str:
        if conn.tenant is None:
            raise OSError(errno.EPERM, "say hello (bind a tenant) first")
        return conn.tenant

    @staticmethod
    def _list(msg, field, limit=1 << 16) -> list:
        v = msg.get(field)
        if not isinstance(v, list):
            raise OSError(errno.EINVAL, f"'{field}' must be a list")
        if len(v) > limit:
            raise OSError(errno.E2BIG, f"'{field}' has more than {limit} entries")
        return v

    @staticmethod
    def _int(msg, field, optional=False):
        v = msg.get(field)
        if v is None and optional:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise OSError(errno.EINVAL, f"'{field}' must be an integer")
        return v

    @staticmethod
    def _limit(msg, default: int) -> int:
        """msg's optional 'limit' of rows (absent or 0: default); a negative one is EINVAL."""
        v = Server._int(msg, "limit", True) or default
        if v < 0:
            raise OSError(errno.EINVAL, "'limit' must be a positive integer")
        return v

    def _arena_reply(self, conn) -> tuple[dict, list[int]]:
        """The arenas of the connection's domain only: a client maps no other tenant's memory."""
        arenas = self.engine.arenas(conn.domain)
        fds = []
        for a in arenas:
            if a["kind"] == "memfd":
                fds.append(a.pop("fd"))
            elif a["kind"] == "kvtier":
                t, idx = self.engine.arena_table[a["arena"]]
                self.tiers[t].grant(idx, conn.uid)
        return {"arenas": arenas}, fds

    def op_hello(self, conn, msg):
        tenant = msg.get("tenant")
        if not isinstance(tenant, str) or not 0 < len(tenant) <= 128:
            raise OSError(errno.EINVAL, "'tenant' must be a non-empty string of at most 128 characters")
        if msg.get("version", protocol.VERSION) != protocol.VERSION:
            raise OSError(errno.EPROTO, f"protocol version {msg.get('version')!r} not supported; "
                                        f"this daemon speaks {protocol.VERSION}")
        if not self.cfg.tenant(tenant).allows(conn.uid):
            raise OSError(errno.EACCES, f"uid {conn.uid} may not bind to tenant {tenant}")
        if conn.tenant is not None and conn.tenant != tenant:
            # its spares and mappings are the first tenant's memory
            raise OSError(errno.EISCONN, f"this connection is bound to tenant {conn.tenant}; connect again")
        conn.domain = self.engine.open_domain(tenant, {c.domain for c in self.conns.values()})
        conn.tenant = tenant
        reply, fds = self._arena_reply(conn)
        reply.update(tenant=tenant, version=protocol.VERSION, spare_slots=True,
                     min_block_bytes=self.cfg.min_block_bytes,
                     max_block_bytes=self.cfg.max_block_bytes,
                     put_batch_bytes=max(1, min(self.engine.limit_bytes[:self.engine.mem_count]) // 2),
                     get_batch_blocks=max(1, min(self.engine.limit_bytes[:self.engine.mem_count]) // 2
                                          // self.cfg.nominal_block_bytes))
        d = self.engine.directory(conn.domain)
        if d is not None:
            # the salt lets the client compute the keys of its own domain's blocks, no one else's (it maps no
            # other domain's directory or arenas)
            reply["directory"] = {**d.handle(), "salt": conn.domain, "tier": self.tiers[0].name}
            fds = [*fds, d.fd]
        return reply, fds

    def op_arenas(self, conn, msg):
        self._tenant(conn)
        return self._arena_reply(conn)

    def op_register_session(self, conn, msg):
        name = msg.get("name") or ""
        if not isinstance(name, str):
            raise OSError(errno.EINVAL, "'name' must be a string")
        return {"session": self.engine.register_session(self._tenant(conn), name[:256], conn.uid)}, []

    def op_end_session(self, conn, msg):
        return {"released": self.engine.end_session(self._tenant(conn), self._int(msg, "session"))}, []

    def op_hint(self, conn, msg):
        bt = msg.get("block_types")
        if bt is not None:
            bt = self._list(msg, "block_types")
            if not all(isinstance(x, list) and len(x) == 2 for x in bt):
                raise OSError(errno.EINVAL, "'block_types' is a list of [prefix_hash, type]")
        state = msg.get("state")
        if not isinstance(state, str):
            raise OSError(errno.EINVAL, "'state' must be a string")
        self.engine.hint(self._tenant(conn), self._int(msg, "session"), state, bt)
        return {}, []

    def _spare_budget(self) -> int:
        return max(1, min(self.engine.limit_bytes[:self.engine.mem_count]) // 2)

    def _spares(self, conn, msg, reply) -> None:
        """A put or spare request's "drop" (spare ids the client gives back) and "want" (sizes of spare slots
        for its next put): the reply's "spares" [[spare, arena, offset, nbytes]]."""
        drop = msg.get("drop")
        if drop is not None:
            for sid in self._list(msg, "drop"):
                if isinstance(sid, int) and sid in conn.spares:
                    self.engine.spare_free(conn.spares, sid)
        want = msg.get("want")
        if want is not None:
            reply["spares"] = self.engine.spare_reserve(conn.spares, self._list(msg, "want"), self._spare_budget(),
                                                        conn.domain)

    def op_spare(self, conn, msg):
        self._tenant(conn)
        reply = {}
        self._spares(conn, msg, reply)
        return reply, []

    @staticmethod
    def _named_spares(blocks) -> list:
        """The spare ids a spared put's items name (well-formed or not: a refused put gives them back)."""
        out = []
        for item in blocks:
            where = item[-1] if isinstance(item, list) and item else None
            sid = where[0] if isinstance(where, list) and where else None
            if isinstance(sid, int) and not isinstance(sid, bool):
                out.append(sid)
        return out

    def _free_spares(self, conn, sids) -> None:
        """Give back those of these spares the connection still holds."""
        for sid in sids:
            if sid in conn.spares:
                self.engine.spare_free(conn.spares, sid)

    def _drop_staged(self, conn) -> None:
        """Abort a staged put: its slots and the spares it named go back."""
        staged, conn.staged = conn.staged, None
        if staged is None:
            return
        txn, spares, _ = staged
        if txn:
            conn.txns.discard(txn)
            self.engine.put_abort(txn)
        self._free_spares(conn, spares)

    def _stage_put(self, conn, tenant, blocks, msg) -> None:
        """A staged put (stage: true, sent without id, before the client copies): the checks, renames and
        next spares happen while the client copies; its commit (staged: true) only makes the blocks visible.
        A failure is kept for the commit's reply. The spares it names stay this connection's until then:
        the client may still be writing into them. (_serve has dropped any earlier staged put: a put is
        neither its commit nor its abort.)"""
        named = [sid for sid in self._named_spares(blocks) if sid in conn.spares]
        try:
            self._spares(conn, {"drop": msg.get("drop")}, {})
            txn, duplicates = self.engine.put_spare_stage(tenant, self._int(msg, "session", True), blocks,
                                                          bool(msg.get("durable", False)), conn.spares)
        except (OSError, ValueError, TypeError, KeyError, OverflowError, IndexError) as e:
            conn.staged = (0, named, e)
            return
        if txn:
            conn.txns.add(txn)
        reply = {}
        try:
            self._spares(conn, {"want": msg.get("want")}, reply)
        except OSError:
            pass   # spares are an optimisation: the put itself stands
        conn.staged = (txn, duplicates, reply)

    def _commit_staged(self, conn) -> dict:
        staged, conn.staged = conn.staged, None
        if staged is None:
            raise OSError(errno.ENOENT, "no staged put on this connection")
        txn, spares, reply = staged
        self._free_spares(conn, spares)   # duplicates' spares, or every named spare of a refused put
        if isinstance(reply, BaseException):
            raise reply
        if txn:
            conn.txns.discard(txn)
            reply["stored"] = self.engine.put_commit(txn)
        else:
            reply["stored"] = 0
        reply["txn"] = 0
        return reply

    def _put_spared(self, conn, tenant, blocks, msg) -> int:
        """Commit a put's blocks from the spares it names (after taking its "drop"); how many were new. A refused
        put gives back the spares it named (the client forgets them): none leaks."""
        self._spares(conn, {"drop": msg.get("drop")}, {})
        try:
            return self.engine.put_spare(tenant, self._int(msg, "session", True), blocks,
                                         bool(msg.get("durable", False)), conn.spares)
        except BaseException:
            self._free_spares(conn, self._named_spares(blocks))
            raise

    def _put_nowait(self, conn, msg) -> None:
        """A pipelined put into spares the client holds, sent without id: nothing answers it, so nothing here may
        fail. What it stored and the first failure since the last reply go out with the connection's next reply
        ("nowait": [stored, errno, error, failed puts]); the client reports them at its next call."""
        stored, failure = 0, None
        try:
            stored = self._put_spared(conn, self._tenant(conn), self._list(msg, "blocks"), msg)
        except OSError as e:
            failure = (e.errno or errno.EIO, e.strerror or str(e))
        except (ValueError, TypeError, KeyError, OverflowError, IndexError) as e:
            failure = (errno.EINVAL, f"malformed request: {e}")
        except Exception as e:
            log.exception("put without reply failed")
            failure = (errno.EIO, f"internal error: {e}")
        nw = conn.nowait or [0, 0, "", 0]
        nw[0] += stored
        if failure is not None:
            if not nw[1]:
                nw[1], nw[2] = failure
            nw[3] += 1
        conn.nowait = nw

    def op_put(self, conn, msg):
        if msg.get("nowait") and msg.get("spared") and "id" not in msg:
            self._put_nowait(conn, msg)
            return {}, []
        if msg.get("stage") and msg.get("spared"):
            try:
                tenant, blocks = self._tenant(conn), self._list(msg, "blocks")
            except OSError as e:   # sent without id: the failure is the commit's to report
                conn.staged = (0, [], e)
            else:
                self._stage_put(conn, tenant, blocks, msg)
            return {}, []
        tenant = self._tenant(conn)
        blocks = self._list(msg, "blocks")
        if msg.get("spared"):
            # one round trip: the blocks are already in this connection's spare slots
            reply = {"txn": 0, "stored": self._put_spared(conn, tenant, blocks, msg)}
            self._spares(conn, {"want": msg.get("want")}, reply)
            return reply, []
        txn, slots = self.engine.put_reserve(tenant, self._int(msg, "session", True), blocks,
                                             bool(msg.get("durable", False)))
        if not any(slots):
            self.engine.put_commit(txn)   # everything deduplicated: nothing to write
            reply = {"txn": 0, "slots": slots, "stored": 0}
        else:
            conn.txns.add(txn)
            reply = {"txn": txn, "slots": slots}
        try:
            self._spares(conn, msg, reply)
        except OSError:
            pass   # spares are an optimisation: the put itself stands
        return reply, []

    def op_commit(self, conn, msg):
        if msg.get("staged"):
            return self._commit_staged(conn), []
        txn = self._int(msg, "txn")
        if txn not in conn.txns:
            raise OSError(errno.ENOENT, f"no open put {txn} on this connection")
        conn.txns.discard(txn)
        return {"stored": self.engine.put_commit(txn)}, []

    def op_abort(self, conn, msg):
        if msg.get("staged"):
            if conn.staged is None:
                raise OSError(errno.ENOENT, "no staged put on this connection")
            self._drop_staged(conn)
            return {}, []
        txn = self._int(msg, "txn")
        if txn not in conn.txns:
            raise OSError(errno.ENOENT, f"no open put {txn} on this connection")
        conn.txns.discard(txn)
        self.engine.put_abort(txn)
        return {}, []

    def op_get(self, conn, msg):
        if len(conn.leases) >= MAX_LEASES_PER_CONNECTION:
            raise OSError(errno.EDQUOT, f"this connection holds {len(conn.leases)} gets it has not released, the most "
                                        f"a connection may; release some first")
        lease, slots, served = self.engine.get(self._tenant(conn), self._int(msg, "session", True),
                                               self._list(msg, "blocks"))
        if lease in self.engine.leases:
            conn.leases.add(lease)
        return {"lease": lease, "slots": slots, "tiers": served}, []

    def op_release(self, conn, msg):
        lease = self._int(msg, "lease")
        if lease in conn.leases:
            conn.leases.discard(lease)
            self.engine.release(lease)
        return {}, []

    def op_touch(self, conn, msg):
        # no reply is read for a touch, so nothing here may fail: bad hashes are skipped, as blocks gone since are
        blocks = msg.get("blocks")
        session = msg.get("session")
        if conn.tenant is not None and isinstance(blocks, list) and len(blocks) <= 1 << 16 and \
                (session is None or isinstance(session, int) and not isinstance(session, bool)):
            self.engine.touch(conn.tenant, session, blocks)
        return {}, []

    def op_contains(self, conn, msg):
        return {"tiers": self.engine.contains(self._tenant(conn), self._list(msg, "blocks"))}, []

    def op_delete(self, conn, msg):
        reply = {"deleted": self.engine.delete(self._tenant(conn), self._list(msg, "blocks"))}
        if reply["deleted"] and conn.spares and msg.get("spare_pool"):
            # the client replaces its spares
            reply["spare_pool"] = self.engine.spare_refresh(conn.spares, conn.domain)
        return reply, []

    # admin and tenant-scoped views
    def _is_admin(self, conn) -> bool:
        # checked per request, not at accept: a SIGHUP that changes [admins] applies to open connections too
        return (conn.uid in (0, os.getuid()) or conn.uid in self.cfg.admin_uids
                or not conn.groups.isdisjoint(self.cfg.admin_gids))

    def _scope(self, conn) -> str | None:
        """The tenant a view is limited to: the connection's, once bound (admins too: a bound connection acts as
        its tenant); None (every tenant) only for an admin that bound none, as kvctl does."""
        if conn.tenant is not None:
            return conn.tenant
        if self._is_admin(conn):
            return None
        raise OSError(errno.EPERM, "bind a tenant (hello) first; the all-tenant view needs an admin")

    def _admin(self, conn) -> None:
        if not self._is_admin(conn):
            raise OSError(errno.EPERM, "this needs an admin: root, the daemon's user or [admins] of the config")

    def _find(self, scope, block):
        """The block named by hex key; another tenant's block is ENOENT, like a missing one."""
        if not isinstance(block, str):
            raise OSError(errno.EINVAL, "'block' must be a hex key")
        b = self.engine.find(block)
        if scope is not None and b.tenant != scope:
            raise OSError(errno.ENOENT, f"no block {block}")
        return b

    def op_stats(self, conn, msg):
        scope = self._scope(conn)
        from kvtier import kmod
        if scope is None:
            st = self.engine.status()
            st.update(connections=len(self.conns), connections_shed=self.shed,
                      connections_over_quota=self.over_quota, metrics_port=self.metrics_port,
                      collector=self.collector.status())
        else:
            # Other tenants' volume and hit rates are theirs: a tenant sees the tiers' sizes and its own counts.
            eng = self.engine
            st = {"policy": eng.policy_name, "tenant": scope,
                  "tiers": [{k: r[k] for k in ("name", "kind", "capacity_bytes", "backend", "backend_note")}
                            for r in eng.tier_rows()],
                  "sessions": eng.tenant_sessions.get(scope, 0),
                  "blocks": len(eng.of_tenant(scope)),
                  "pinned_blocks": eng.pinned_blocks(scope),
                  "pinned_bytes": eng.pinned_bytes.get(scope, 0),
                  "max_pinned_bytes": self.cfg.max_pinned_per_tenant}
        st.update(socket=self.cfg.socket, config=self.cfg.source, pid=os.getpid(), uptime_s=time.time() - self.started,
                  admin=scope is None, absent_tiers=getattr(self.cfg, "absent_tiers", []),
                  module={"device": kmod.DEVICE_PATH, "present": os.path.exists(kmod.DEVICE_PATH),
                          "loaded": os.path.exists("/sys/module/kvtier")},
                  probes=self.heat.status())
        return st, []

    def op_sessions(self, conn, msg):
        scope = self._scope(conn)
        rows = []
        for s in self.engine.sessions.values():
            if scope is not None and s.tenant != scope:
                continue
            tiers = {}
            for k in s.blocks:
                b = self.engine.blocks.get(k)
                if b is not None:
                    name = self.tiers[b.tier].name
                    tiers[name] = tiers.get(name, 0) + 1
            rows.append({"session": s.sid, "tenant": s.tenant, "name": s.name, "state": s.state,
                         "blocks": len(s.blocks), "blocks_by_tier": tiers})
        return {"sessions": rows}, []

    def op_blocks(self, conn, msg):
        scope = self._scope(conn)
        sid = self._int(msg, "session", True)
        tier = msg.get("tier")
        limit = self._limit(msg, 500)
        eng = self.engine
        if sid is not None:
            s = eng.sessions.get(sid)
            if s is None or (scope is not None and s.tenant != scope):
                raise OSError(errno.ENOENT, f"no session {sid}")
            pool = (eng.blocks[k] for k in s.blocks if k in eng.blocks)
        else:
            pool = (eng.blocks if scope is None else eng.of_tenant(scope)).values()
        names = [t.name for t in self.tiers]
        if tier is not None and tier not in names:
            raise OSError(errno.EINVAL, f"no tier {tier!r}; tiers: {', '.join(names)}")
        if sid is None and tier is None:   # the whole pool matches: its length, and no walk past the first `limit`
            total = len(pool)
            shown = list(itertools.islice(pool, min(limit, total)))
        elif sid is None:   # one tier: the admin's count is kept; a tenant's walks its blocks or the tier's (fewer)
            t = names.index(tier)
            found = eng.of_tier(t, scope)
            shown = list(itertools.islice(found, min(limit, eng.tier_blocks[t])))
            total = eng.tier_blocks[t] if scope is None else len(shown) + sum(1 for _ in found)
        else:
            hits = [b for b in pool if (tier is None or names[b.tier] == tier) and (scope is None or b.tenant == scope)]
            total, shown = len(hits), hits[:limit]
        rows = []
        for b in shown:
            rows.append(b.to_dict(self.tiers))
            rows[-1]["heat"] = (self.heat.block_info(b.key) or {}).get("heat", 0.0)
        return {"blocks": rows, "total": total}, []

    def op_explain(self, conn, msg):
        scope = self._scope(conn)
        self._find(scope, msg.get("block"))
        d = self.engine.explain(msg["block"])
        d["heat"] = self.heat.block_info(bytes.fromhex(msg["block"])) or {"heat": 0.0, "touches": 0,
                                                                           "probes": self.heat.state}
        if scope is not None:
            # a shared block's sessions may include another tenant's only through a shared salt; keep its own
            d["session_ids"] = [sid for sid in d["session_ids"]
                                if (s := self.engine.sessions.get(sid)) is not None and s.tenant == scope]
        return d, []

    def _pin(self, conn, msg, unpin):
        self._admin(conn)
        sid = self._int(msg, "session", True)
        block = msg.get("block")
        if (sid is None) == (block is None):
            raise OSError(errno.EINVAL, "give exactly one of 'block' and 'session'")
        if block is not None and not isinstance(block, str):
            raise OSError(errno.EINVAL, "'block' must be a hex key")
        return {"blocks": self.engine.pin(block, sid, unpin)}, []

    def op_pin(self, conn, msg):
        return self._pin(conn, msg, False)

    def op_unpin(self, conn, msg):
        return self._pin(conn, msg, True)

    def op_evict(self, conn, msg):
        self._admin(conn)
        block = msg.get("block")
        if not isinstance(block, str):
            raise OSError(errno.EINVAL, "'block' must be a hex key")
        return self.engine.evict(block), []

    def op_policy(self, conn, msg):
        self._scope(conn)   # the policy's name and per-tier counts: any bound tenant may read them
        name = msg.get("name")
        if name is not None:
            self._admin(conn)
            from kvtier.policy.registry import policy_names
            if not isinstance(name, str) or name not in policy_names() or name == "opt":
                raise OSError(errno.EINVAL, f"unknown or offline policy {name!r}; valid: "
                                            f"{', '.join(n for n in policy_names() if n != 'opt')}")
            self._set_policy(name)
        p0 = self.engine.policies[0]
        return {"policy": self.engine.policy_name,
                "tiers": [{"tier": t.name, "capacity_blocks": p.capacity_blocks, "resident_blocks": len(p)}
                          for t, p in zip(self.tiers, self.engine.policies)],
                "doc": (type(p0).__doc__ or "").strip().splitlines()[0]}, []

    def op_moves(self, conn, msg):
        scope = self._scope(conn)
        limit = self._limit(msg, 100)
        moves = self.engine.moves
        if scope is not None:
            # moves carry the block key only: a move is the tenant's if the block still is (a dropped block's
            # moves are no longer attributable, so they are left out rather than risk showing another's)
            own = self.engine.of_tenant(scope)
            moves = [m for m in moves if bytes.fromhex(m["block"]) in own]
        return {"moves": list(moves)[-limit:]}, []

    def op_top(self, conn, msg):
        """kvctl top: tiers, hottest blocks and sessions, migration rates and latency percentiles."""
        scope = self._scope(conn)
        limit = min(self._limit(msg, 10), 1000)
        eng = self.engine
        reply = self.heat.top(limit, scope)
        reply.update(tiers=eng.tier_rows() if scope is None else [], counters=dict(eng.counters) if scope is None
                     else {}, probes=self.heat.status(), time=time.time())
        return reply, []

    def op_register_range(self, conn, msg):
        """An engine's anonymous KV memory (its own address space): faults there count as heat of the blocks
        named by `blocks` (prefix hashes, block i at address + i * block_bytes; None for a hole)."""
        from kvtier.daemon.engine import derive_key
        salt = self.engine.salt(self._tenant(conn))
        keys = [None if h is None else derive_key(salt, h) for h in self._list(msg, "blocks")] \
            if msg.get("blocks") is not None else []
        return self.heat.register_range(conn.pid, self._int(msg, "address"), self._int(msg, "length"),
                                        self._int(msg, "block_bytes"), keys), []

    def op_unregister_range(self, conn, msg):
        rid = self._int(msg, "range")
        r = self.heat.ranges.get(rid)
        if r is None or r["pid"] != conn.pid:
            raise OSError(errno.ENOENT, f"no range {rid} of this process")
        return {"removed": self.heat.unregister_range(rid)}, []
