"""The engine-side client of kvtierd: sessions, hints, and zero-copy put/get of KV blocks by prefix hash.

    from kvtier.client import Client
    with Client("/run/kvtier/kvtierd.sock", tenant="acme") as kv:
        sid = kv.register_session("conv-42")
        kv.put(sid, [(prefix_hash, "history", kv_block_array), ...])      # numpy arrays or bytes
        arrays = kv.get(sid, [prefix_hash, ...])                          # numpy arrays (or None: miss)
        kv.hint(sid, "decoding")                                          # its blocks stay in the first tier

Block bytes never go through the socket: at hello the daemon passes its arenas (memfd descriptors by SCM_RIGHTS,
or kvtier.ko regions it granted to this uid), the client maps them, a put writes into slots the daemon reserved
for it (spare slots the previous put's reply handed out: one round trip; else reserve, write, commit), a get
copies out of the slots the daemon returns and releases them (a release needs no reply). put_into and get_views
leave that copy to the caller, who writes into / reads from the daemon's memory itself. Not thread-safe:
use one Client per thread. The wire protocol is documented in kvtier.daemon.protocol.
"""
from __future__ import annotations

import contextlib
import errno
from collections import Counter
import mmap
import os
import socket
import threading

import numpy as np

from kvtier.daemon import directory, protocol
from kvtier.errors import InputError

try:
    from kvtier._native import ffi as _ffi, lib as _lib
except ImportError:   # not built (a source tree without the extension): plain copies
    _ffi = _lib = None

BLOCK_TYPES = ("prefix", "history", "input", "tail")
LOOKUP_BATCH = 4096   # hashes per message: well under protocol.MAX_MESSAGE_BYTES
PUT_BATCH = 2048      # blocks per put message
STAGE_MIN_BYTES = 1 << 20   # puts this big are staged: sent before the copy, committed after it (~12 µs less)
PIPELINED_SPARES = 64   # sets of spares held for small pipelined puts: most then go without a reply
TOUCHES_HELD = 1 << 16   # hashes read, kept while the daemon's socket is full (the oldest are dropped beyond)


def _last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache of cpu0 (sysfs), or default where sysfs does not say."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        names = os.listdir(base)
    except OSError:
        return default
    for idx in names:
        try:
            with open(f"{base}/{idx}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if unit != 1 else text
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best or default


# Copies of this many bytes or more use non-temporal stores (copy_block). A put's: its destination, a slot of the
# daemon's arena, is not read again soon and mostly not in cache. Measured here (32 MiB L3, 2026-11-24, one daemon,
# 3 rounds each way interleaved) at 8 MiB: a stream of pipelined puts 1.11-1.18 of a memcpy into as many
# destinations, against 0.90-0.93 with plain copies (a single put whose slot was just freed, so in cache, does
# better plain: 0.62-0.73 of a cache-hot memcpy against 0.57-0.59).
NT_COPY_MIN_BYTES = 8 << 20
# A get's: from where source and destination together outgrow the last-level cache. Below that the caller's
# buffer is often in cache (an engine reuses its own), and its next reader finds the block there. Measured as
# above: get/memcpy at 8 MiB 0.91-0.95 plain against 0.62-0.68 non-temporal; at 16 MiB 0.97-1.01 non-temporal
# against 0.89-0.92 plain (tools/bench_put_paths.py, median of 5 and 7 rounds).
NT_GET_MIN_BYTES = max(NT_COPY_MIN_BYTES, _last_level_cache_bytes() // 2)


class DaemonError(OSError):
    """kvtierd refused or failed a request (errno tells which)."""


def copy_block(dst: memoryview, src: memoryview, get: bool = False) -> None:
    """dst[:] = src, with non-temporal stores from NT_COPY_MIN_BYTES up (NT_GET_MIN_BYTES for a get: kvt_copy_nt).
    Measured here (2026-11-22) into destinations not in cache: 8 MiB at ~40 GB/s against ~27 for memcpy, 64 MiB at
    ~25 against ~18; into a cached one they lose until the copy outgrows the cache (see the thresholds)."""
    n = src.nbytes
    if n < (NT_GET_MIN_BYTES if get else NT_COPY_MIN_BYTES) or _lib is None:
        dst[:] = src
        return
    if dst.nbytes != n:
        raise ValueError(f"copy of {n} bytes into {dst.nbytes}")
    _lib.kvt_copy_nt(_ffi.from_buffer(dst, require_writable=True), _ffi.from_buffer(src), n)


def _pipelined(nbytes: int) -> int:
    """How many puts of nbytes a pipelined put holds spares for: PIPELINED_SPARES small ones, up to 1 MiB of them;
    two of a staged (big) one."""
    return 2 if nbytes >= STAGE_MIN_BYTES else max(2, min(PIPELINED_SPARES, STAGE_MIN_BYTES // max(1, nbytes)))


def _meta(data) -> tuple[memoryview, object]:
    if isinstance(data, np.ndarray):
        a = np.ascontiguousarray(data)
        return memoryview(a.reshape(-1).view(np.uint8)), [a.dtype.str, list(a.shape)]
    mv = memoryview(data)
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, None


_LAYOUT_DTYPES = {"float16": "fp16", "float32": "fp32"}


def _layout(layout, data, nbytes: int):
    """The wire layout [dtype, tokens, heads, head_dim] of one block (None: none). layout="auto" takes it
    from a numpy array shaped [2, tokens, heads, head_dim] (K then V) of float16/float32."""
    if layout is None:
        return None
    if isinstance(layout, str) and layout == "auto":
        if not isinstance(data, np.ndarray) or data.ndim != 4 or data.shape[0] != 2 or \
                data.dtype.name not in _LAYOUT_DTYPES:
            raise InputError("layout: \"auto\" needs numpy float16/float32 arrays shaped [2, tokens, heads, "
                             f"head_dim], got {getattr(data, 'shape', type(data).__name__)}")
        return [_LAYOUT_DTYPES[data.dtype.name], *(int(x) for x in data.shape[1:])]
    if hasattr(layout, "head_dim"):   # a kvtier.store.codec.KVLayout
        layout = (layout.dtype, layout.tokens, layout.heads, layout.head_dim)
    from kvtier.store.codec import DTYPES
    if not isinstance(layout, (list, tuple)) or len(layout) != 4 or layout[0] not in DTYPES or \
            not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in layout[1:]):
        raise InputError(f"layout: expected (dtype ({', '.join(DTYPES)}), tokens, heads, head_dim) or \"auto\", "
                         f"got {layout!r}")
    need = 2 * layout[1] * layout[2] * layout[3] * (4 if layout[0] == "fp32" else 2)
    if need != nbytes:
        raise InputError(f"layout: {tuple(layout)!r} describes {need} bytes, the block has {nbytes}")
    return list(layout)


def _typed(a: np.ndarray, meta):
    """A block's bytes as the array put() was given: meta [dtype, shape] (None: the uint8 bytes as they are)."""
    return a.view(np.dtype(meta[0])).reshape(meta[1]) if meta else a


class _Slots(list):
    """put_into's slots; `stored` (blocks that were new) is set when its with-block ends."""
    stored = 0


class Client:
    def __init__(self, socket_path: str, tenant: str, timeout_s: float = 30.0,
                 busy_poll_s: float | None = None, directory: bool = True):
        """directory=False: every get asks the daemon, even for blocks its block directory lists
        (kvtier.daemon.directory; with it, a get of a block in the first memory tier needs no round trip)."""
        self.socket_path = socket_path
        # spin this long for a reply before sleeping (0: never spin; None: protocol.default_spin_s())
        self.busy_poll_s = protocol.default_spin_s() if busy_poll_s is None else busy_poll_s
        self.tenant = tenant
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        protocol.set_timeouts(self.sock, timeout_s)   # kernel timeouts: no poll() before every send/recv
        self._buf = protocol.new_buffer()
        try:
            self.sock.connect(socket_path)
        except OSError:
            self.sock.close()
            raise
        self._id = 0
        self._unacked = 0          # commits sent without waiting for their reply
        self._nowait = 0           # puts sent with no reply at all: their results come with a later reply
        self._nowait_failed = None   # the DaemonError a reply reported for them, raised by the call reading it
        self.stored_unacked = 0
        self._spares: dict[int, list] = {}   # nbytes -> spare slots [[spare, arena, offset, nbytes]] to put into
        self._lent = 0             # put_into blocks open (their spares are out of _spares, being written)
        self._maps: list[mmap.mmap | None] = []
        self._views: list[memoryview | None] = []
        self._dev = None           # /dev/kvtier, when the daemon's arenas are kvtier.ko regions
        self._prefault_stop = threading.Event()
        self._prefaults: list[threading.Thread] = []
        self._want_dir = directory
        self._dir = None           # kvtier.daemon.directory.DirectoryView of this tenant's domain
        self._touches: dict = {}   # session -> hashes read through the directory, not yet told to the daemon
        self._held_touches = 0
        self.hello = self._call("hello", tenant=tenant, version=protocol.VERSION, _want_fds=True)

    # -- plumbing ------------------------------------------------------------------------------------
    def _call(self, op: str, _want_fds: bool = False, **fields) -> dict:
        self._id += 1
        fields["op"], fields["id"] = op, self._id
        try:
            if self._touches:
                self._send_touches()   # first: the daemon sees what was read before what comes next
            protocol.send(self.sock, fields)
        except (BrokenPipeError, ConnectionResetError):
            self._reply()   # a daemon that refused the connection said why before closing it: raise that
            raise
        try:
            self._collect_commits()
        except DaemonError as e:
            # Read this request's reply anyway, or it would be taken for the next request's (replies carry
            # no check against that). A put's reservation dropped here is aborted when the connection closes.
            try:
                self._reply()
            except DaemonError:
                pass
            raise e
        reply = self._reply()
        if self._nowait_failed is not None:
            e, self._nowait_failed = self._nowait_failed, None
            raise e
        return reply

    def _reply(self) -> dict:
        data, fds, _ = protocol.recv_reply(self.sock, self.busy_poll_s, self._buf)
        if not data:
            for fd in fds:
                os.close(fd)
            raise DaemonError(errno.ECONNRESET, "kvtierd closed the connection")
        reply = protocol.unpack(data)
        nowait = reply.get("nowait")
        try:
            if nowait:   # puts sent without reply that the daemon did before this one: what they stored
                self.stored_unacked += nowait[0]
            if not reply.get("ok"):
                raise DaemonError(reply.get("errno") or errno.EIO, f"kvtierd: {reply.get('error')}")
            if "arenas" in reply:
                self._map_arenas(reply["arenas"], fds)
            if "directory" in reply and fds and self._want_dir and self._dir is None and directory.available():
                try:
                    self._dir = directory.DirectoryView(fds[-1], reply["directory"])
                    self._dir_salt, self._dir_tier = reply["directory"]["salt"], reply["directory"]["tier"]
                except (OSError, KeyError, ValueError, TypeError):
                    self._dir = None   # a directory this client cannot read: every get asks the daemon
            if "spare_pool" in reply:   # the daemon moved every spare this connection holds
                self._spares = {}
                for sp in reply["spare_pool"]:
                    self._spares.setdefault(sp[3], []).append(sp)
            for sp in reply.get("spares") or ():
                self._spares.setdefault(sp[3], []).append(sp)
        finally:
            for fd in fds:
                os.close(fd)   # a mapping keeps the memory; the descriptor is not needed after mmap
        if nowait and nowait[1] and self._nowait_failed is None:
            self._nowait_failed = DaemonError(nowait[1], f"kvtierd: {nowait[3]} put(s) sent with wait=False failed, "
                                                         f"the first: {nowait[2]}")
        return reply

    def _collect_commits(self) -> None:
        """Read the replies of commits sent with wait=False (the daemon answers in order); raise the first error."""
        first = None
        while self._unacked:
            self._unacked -= 1
            try:
                stored = self._reply()["stored"]   # (read first: the reply may add the nowait puts' count)
                self.stored_unacked += stored
            except DaemonError as e:
                first = first or e
        if first is None and self._nowait_failed is not None:
            first, self._nowait_failed = self._nowait_failed, None
        if first is not None:
            raise first

    def flush(self) -> int:
        """Wait for the commits of puts made with wait=False; returns how many blocks they stored."""
        if self._nowait:
            self._nowait = 0
            self._call("spare")   # its reply comes after every put sent before it, and says what they did
        self._collect_commits()
        n, self.stored_unacked = self.stored_unacked, 0
        return n

    def _map_arenas(self, arenas: list[dict], fds: list[int]) -> None:
        fd_iter = iter(fds)
        for a in arenas:
            g = a["arena"]
            if g < len(self._views) and self._views[g] is not None:
                if a["kind"] == "memfd":
                    next(fd_iter, None)
                continue
            if a["kind"] == "memfd":
                fd = next(fd_iter)
                m = mmap.mmap(fd, a["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                # where the daemon's pages are 2 MiB (shmem THP), map them so: fewer TLB misses per copy (as
                # kvtier.store.memory.advise_huge, which the client does not import: it needs the store's cffi)
                try:
                    m.madvise(mmap.MADV_HUGEPAGE)
                except (AttributeError, OSError):
                    pass
            elif a["kind"] == "kvtier":
                # a kvtier.ko region the daemon granted to this uid: attach it on our own fd, then map it
                from kvtier import kmod
                if self._dev is None:
                    self._dev = kmod.Device()
                region = self._dev.attach(a["region_id"])
                m = self._dev.mmap(region)
            else:
                raise DaemonError(errno.EPROTO, f"unknown arena kind {a['kind']!r}")
            while len(self._views) <= g:
                self._maps.append(None)
                self._views.append(None)
            self._maps[g], self._views[g] = m, memoryview(m)
            if a.get("prefault"):
                # the daemon prefaults this arena: map its pages into our page tables too, in the background,
                # so a put's first touch of a slot does not fault page by page (~16k faults per 64 MiB)
                from kvtier import numa
                from kvtier.store.memory import populate
                t = threading.Thread(target=populate, args=(numa.address_of(m), a["size"], self._prefault_stop),
                                     name=f"kvtier-prefault-{g}", daemon=True)
                t.start()
                self._prefaults.append(t)

    def _view(self, arena: int, offset: int, nbytes: int) -> memoryview:
        if arena >= len(self._views) or self._views[arena] is None:
            self._call("arenas", _want_fds=True)   # the daemon added an arena since hello
            if arena >= len(self._views) or self._views[arena] is None:
                raise DaemonError(errno.EPROTO, f"kvtierd named arena {arena}, which this tenant cannot map")
        return self._views[arena][offset:offset + nbytes]

    def close(self) -> None:
        try:
            if self._touches:
                self._send_touches()
            self._collect_commits()
        except OSError:
            pass
        if self._dir is not None:
            self._dir.close()
            self._dir = None
        self._prefault_stop.set()   # a populate must not run on a mapping being unmapped
        for t in self._prefaults:
            t.join()
        for v in self._views:
            if v is not None:
                v.release()
        for m in self._maps:
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass   # an array from get_views/put_into still points into it: mapped until it goes
        self._views, self._maps = [], []
        if self._dev is not None:
            self._dev.close()
            self._dev = None
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sessions and hints ------------------------------------------------------------------------------
    def register_session(self, name: str = "") -> int:
        """A new session of this connection's tenant; DaemonError EDQUOT once the tenant holds the daemon's
        max_sessions_per_tenant open sessions, or this uid max_sessions_per_uid in all tenants (end_session frees
        one)."""
        return self._call("register_session", name=name)["session"]

    def end_session(self, session: int) -> int:
        return self._call("end_session", session=session)["released"]

    def hint(self, session: int, state: str, block_types=None) -> None:
        """state: prefilling | decoding | idle | finished | resume; block_types: [(prefix_hash, type)].

        Send `finished` (or end_session) when a conversation is over and `resume` when another turn is coming
        (a pending tool call, a user typing): the default policy re-ranks the session's blocks by them, so a
        finished one's go down a tier first. Only hints the engine really knows help; their weight is learned."""
        fields = {"session": session, "state": state}
        if block_types is not None:
            fields["block_types"] = [[h, t] for h, t in block_types]
        self._call("hint", **fields)

    # -- blocks ---------------------------------------------------------------------------------------------
    @property
    def put_batch_bytes(self) -> int:
        """The most bytes of one put message (and of one put_into): its slots are reserved in memory at once."""
        return self.hello.get("put_batch_bytes") or (1 << 62)

    @property
    def get_batch_blocks(self) -> int:
        """The most blocks of one get message (and of one get_views): they are held in memory until released."""
        return min(self.hello.get("get_batch_blocks") or LOOKUP_BATCH, LOOKUP_BATCH)

    def put(self, session: int | None, blocks, durable: bool = False, wait: bool = True, layout=None,
            lossless: bool = False) -> int:
        """Store blocks [(prefix_hash, block_type, numpy array | bytes-like)]; returns how many were new
        (the rest were already stored under this tenant: dedup). durable=True writes them through to NVMe
        before the call returns, so they survive a crash of the daemon.

        wait=False pipelines: the commit is sent but its reply is read by the next call (or flush()), so the
        daemon checksums this put while the engine prepares the next one; returns 0 then, errors surface at
        the next call. Small blocks then mostly go with no reply at all (the client holds spare slots for the
        next PIPELINED_SPARES puts), and the call costs the copy and one send. The blocks are visible to the next
        request on this connection either way, and to every client once the daemon has read the put.

        layout: how the blocks are laid out as KV (K then V, each [tokens, heads, head_dim]): a tuple
        (dtype, tokens, heads, head_dim) for every block, or "auto" (from each array's shape [2, tokens, heads,
        head_dim]). With it, an NVMe tier configured with a quantising codec (int8/int4, error_bound) may store
        the block quantised: a later get returns values within the bound, not the same bytes. Without it, or
        with lossless=True, blocks always come back byte-identical."""
        if not wait and not durable and layout is None and len(blocks) == 1 and self._put_one_nowait(session,
                                                                                                   blocks[0]):
            return 0
        batch = self.put_batch_bytes
        items, views, nbytes, stored = [], [], 0, 0
        for h, btype, data in blocks:
            mv, meta = _meta(data)
            # a message's reserved slots must fit in the memory tiers at once
            if items and (nbytes + mv.nbytes > batch or len(items) >= PUT_BATCH):
                stored += self._put(session, items, views, durable, wait)
                items, views, nbytes = [], [], 0
            item = [h, btype, mv.nbytes, meta]
            if layout is not None and not lossless:
                item.append(_layout(layout, data, mv.nbytes))
            items.append(item)
            views.append(mv)
            nbytes += mv.nbytes
        return stored + self._put(session, items, views, durable, wait) if items else stored

    def _put_one_nowait(self, session, block) -> bool:
        """put(wait=False) of one small block, the engine's common pipelined put, with less code on the way than
        _put_begin: into a spare held, sent with no reply, when the spares of its size cover half the puts
        PIPELINED_SPARES counts for it (or one, if a reply bringing more is on its way). False: none of that;
        the general path then."""
        h, btype, data = block
        mv, meta = _meta(data)
        n = mv.nbytes
        held = self._spares.get(n)
        # (spares of another size held: the general path gives them back, as the engine now puts this size)
        if held is None or len(self._spares) > 1 or n >= STAGE_MIN_BYTES or \
                len(held) <= (1 if self._unacked else _pipelined(n) // 2):
            return False
        sp = held.pop()
        try:
            copy_block(self._view(sp[1], sp[2], sp[3]), mv)
        except BaseException:
            held.append(sp)
            raise
        self._send_noreply("put", nowait=True, spared=True, session=session, durable=False,
                           blocks=[[h, btype, n, meta, None, sp[:3]]])
        return True

    def _put(self, session, items, views, durable, wait=True) -> int:
        state, dests = self._put_begin({"session": session, "blocks": items, "durable": durable}, items, wait)
        try:
            for dst, mv in zip(dests, views):
                if dst is not None:
                    copy_block(dst, mv)
        except BaseException:
            self._put_abort(state)
            raise
        return self._put_end(state, wait)

    def _send_nowait(self, op: str, **fields) -> None:
        """Send without reading the reply: pipelined puts; _collect_commits() reads the replies later."""
        if self._touches:
            self._send_touches()
        self._id += 1
        protocol.send(self.sock, {**fields, "op": op, "id": self._id})
        self._unacked += 1

    def _send_noreply(self, op: str, **fields) -> None:
        """Send a put the daemon does not answer at all (nowait): what it did comes with a later reply."""
        if self._touches:
            self._send_touches()
        protocol.send(self.sock, {**fields, "op": op})
        self._nowait += 1

    def _want(self, need: Counter, per_block: int = 1) -> tuple[list, list]:
        """Spare sizes to ask for (per_block per block of this put, less what is still held) and spares to give
        back (sizes this put did not use: the engine's next put is likely shaped like this one), taken out of
        the pool."""
        drop = []
        for n in list(self._spares):
            if n not in need:
                drop += self._spares.pop(n)
        want = []
        for n, k in need.items():
            want += [n] * max(0, k * per_block - len(self._spares.get(n, ())))
        return want, drop

    def _put_begin(self, fields, items, wait, stage=True) -> tuple[tuple, list]:
        """Where a put's blocks go: (state for _put_end/_put_abort, a writable view per block, None where the
        daemon already holds the block). With spare slots of the right sizes held, the views are those spares
        (one round trip in all: _put_end's put names them; its reply hands out spares for the next put). Else
        the daemon reserves slots now (a round trip) and _put_end commits them, asking for spares.
        Big puts are staged (unless stage=False): the put naming the spares goes out now, before the caller fills
        them (no reply), so the daemon checks and books it meanwhile, and the commit in _put_end only makes the
        blocks visible. The connection then must send nothing else before that commit (the daemon drops a staged
        put that is not followed by its commit or abort), so put_into, whose caller runs code in between, does not
        stage."""
        if self.hello.get("spare_slots", False):
            pool = self._spares
            if len(items) == 1:   # the common small put, without a Counter's cost
                need = {items[0][2]: 1}
            else:
                need = Counter(it[2] for it in items)
            if self._unacked and not all(len(pool.get(n, ())) >= k for n, k in need.items()):
                self._collect_commits()   # the spares of pipelined puts come with their replies
            spared = all(len(pool.get(n, ())) >= k for n, k in need.items())
            used = [pool[it[2]].pop() for it in items] if spared else []
            total = sum(need_n * k for need_n, k in need.items())
            staged = spared and stage and total >= STAGE_MIN_BYTES
            # pipelined (wait=False): the reply is read later, so hold spares for the puts sent meanwhile. Small
            # ones go without any reply (see _put_end) while the spares left cover half of those, or another put
            # like this one if a reply bringing more is on its way; the others ask for more
            per = 1 if wait else _pipelined(total)
            low = 1 if self._unacked else per // 2
            nowait = spared and not wait and not staged and not fields.get("durable") and \
                all(len(pool.get(n, ())) >= k * low for n, k in need.items())
            want, drop = self._want(need, 0 if nowait else per)
            fields = {**fields, "want": want} if not nowait else {**fields, "nowait": True}
            if drop:
                fields["drop"] = [sp[0] for sp in drop]
            if spared:
                fields["spared"] = True
                for it, sp in zip(items, used):
                    it[:] = [it[0], it[1], it[2], it[3], it[4] if len(it) == 5 else None, sp[:3]]
                if staged:
                    self._id += 1
                    protocol.send(self.sock, {**fields, "op": "put", "stage": True})
                # what an abort gives back to the pool: the spares named, and those to drop until a put says so
                state = ("spared", used + (drop if not staged else []), staged, fields)
                try:
                    dests = [self._view(sp[1], sp[2], sp[3]) for sp in used]
                except BaseException:
                    self._put_abort(state)
                    raise
                return state, dests
        reply = self._call("put", **fields)
        txn = reply.get("txn")
        if not txn:
            return ("done", reply.get("stored", 0)), [None] * len(items)
        try:
            dests = [None if slot is None else self._view(slot[0], slot[1], slot[2]) for slot in reply["slots"]]
        except BaseException:
            self._put_abort(("reserved", txn))
            raise
        return ("reserved", txn), dests

    def _put_end(self, state, wait) -> int:
        """Make the filled blocks visible: how many were new (0 when wait=False: see put)."""
        if state[0] == "done":
            return state[1]
        if state[0] == "reserved":
            op, fields = "commit", {"txn": state[1]}
        elif state[2]:   # staged
            op, fields = "commit", {"staged": True}
        else:
            op, fields = "put", state[3]
        if not wait:
            if fields.get("nowait"):
                self._send_noreply(op, **fields)
                return 0
            self._send_nowait(op, **fields)
            return 0
        return self._call(op, **fields)["stored"]   # a refused put: the daemon frees the spares it named

    def _put_abort(self, state) -> None:
        """The caller did not fill the slots: nothing of the put is stored."""
        if state[0] == "reserved":
            self._call("abort", txn=state[1])
        elif state[0] == "spared":
            _, held, staged, _ = state
            if staged:   # the daemon frees the staged slots and the spares the put named (it took the drops)
                self._call("abort", staged=True)
            else:
                for sp in held:
                    self._spares.setdefault(sp[3], []).append(sp)

    @contextlib.contextmanager
    def put_into(self, session: int | None, blocks, durable: bool = False, dtype=None, shape=None):
        """Zero-copy put: the caller writes the blocks straight into the daemon's memory (a D2H copy into it,
        say), and they are stored when the with-block ends; if it raises, nothing is stored.

            with kv.put_into(sid, [(prefix_hash, "history", nbytes), ...]) as slots:
                for dst, src in zip(slots, blocks):
                    if dst is not None:   # None: this tenant already has the block (nothing to write)
                        dst[...] = src
            slots.stored   # how many were new

        Each slot is a writable numpy array over the daemon's memory: uint8 of nbytes, or dtype/shape when
        given (then get() returns the blocks with that dtype and shape). A slot is valid inside the with-block
        only (it is read-only after it). A block the daemon finds already stored only at the end is deduplicated
        then (its bytes are discarded), as with put(). At most one put batch per call (the client's PUT_BATCH
        blocks and the daemon's put_batch_bytes): the slots are reserved in memory tiers all at once. Other calls
        on this client may run inside the with-block (another put_into too)."""
        items = []
        for item in blocks:
            if not isinstance(item, (list, tuple)) or len(item) != 3:
                raise InputError(f"put_into: a block is (prefix_hash, block_type, nbytes), got {item!r}")
            h, btype, nbytes = item
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise InputError(f"put_into: nbytes must be a non-negative int, got {nbytes!r}")
            items.append([h, btype, nbytes, None])
        if dtype is not None or shape is not None:   # the meta put() records for a numpy array
            dt = np.dtype(dtype if dtype is not None else np.uint8)
            for it in items:
                dims = [it[2] // dt.itemsize] if shape is None else [int(x) for x in shape]
                if int(np.prod(dims)) * dt.itemsize != it[2]:
                    raise InputError(f"put_into: {it[2]} bytes do not hold a {dt.name} array of shape "
                                     f"{tuple(dims) if shape is not None else '(n,)'}")
                it[3] = [dt.str, dims]
        batch = self.put_batch_bytes
        if len(items) > PUT_BATCH or sum(it[2] for it in items) > batch:
            raise InputError(f"put_into: at most {PUT_BATCH} blocks and {batch} bytes per call (the slots are "
                             f"reserved in memory tiers at once), got {len(items)} blocks of "
                             f"{sum(it[2] for it in items)} bytes")
        slots = _Slots()
        if not items:
            yield slots
            return
        state, dests = self._put_begin({"session": session, "blocks": items, "durable": durable}, items, True,
                                       stage=False)
        self._lent += 1   # spares in the caller's hands: a delete must not have the daemon move them
        try:
            for it, dst in zip(items, dests):
                if dst is None:
                    slots.append(None)
                    continue
                slots.append(_typed(np.frombuffer(dst, dtype=np.uint8), it[3]))
            yield slots
        except BaseException:
            self._put_abort(state)
            raise
        finally:
            self._lent -= 1
            for a in slots:   # a write through a kept slot would change a stored block behind the daemon's back
                if a is not None:
                    a.flags.writeable = False
        slots.stored = self._put_end(state, True)

    def get(self, session: int | None, hashes, out=None):
        """Blocks by prefix hash: a numpy array per hit (dtype/shape as put; uint8 for bytes), None per miss.
        `out`, if given, is a list of writable buffers to copy into instead (returned in their place)."""
        hashes = list(hashes)
        # Served blocks are held in memory tiers until released: ask in batches that fit there.
        n = self.get_batch_blocks
        result, served = [], []
        for i in range(0, len(hashes), n):
            result += self._get(session, hashes[i:i + n], None if out is None else out[i:i + n])
            served += self.last_served
        self.last_served = served
        return result

    def _get(self, session, hashes, out):
        if self._dir is not None:
            result, missed = self._get_listed(session, hashes, out)
            if not missed:
                return result
            served = self.last_served
            got = self._get_asking(session, [hashes[i] for i in missed],
                                   None if out is None else [out[i] for i in missed])
            for i, a, tier in zip(missed, got, self.last_served):
                result[i], served[i] = a, tier
            self.last_served = served
            return result
        return self._get_asking(session, hashes, out)

    def _get_listed(self, session, hashes, out) -> tuple[list, list[int]]:
        """The blocks the directory lists, copied without asking the daemon (then told in a touch it does not
        answer); (results, indexes of the rest)."""
        d, salt, views = self._dir, self._dir_salt, self._views
        result, missed, read = [None] * len(hashes), [], []
        served = [None] * len(hashes)
        for i, h in enumerate(hashes):
            try:
                e = d.find(directory.derive_key(salt, h))
            except OSError:
                e = None   # a malformed hash: the daemon's answer says what is wrong with it
            if e is not None and e[2] < len(views) and views[e[2]] is not None and \
                    e[3] + e[4] <= views[e[2]].nbytes:
                index, seq, arena, offset, nbytes, meta = e
                src = views[arena][offset:offset + nbytes]
                if out is not None:
                    copy_block(memoryview(out[i]).cast("B")[:nbytes], src, get=True)
                    a = out[i]
                else:
                    a = np.empty(nbytes, dtype=np.uint8)
                    copy_block(memoryview(a), src, get=True)
                    a = _typed(a, meta)
                if d.same(index, seq):   # the entry did not change while we copied: the bytes are that block's
                    result[i], served[i] = a, self._dir_tier
                    read.append(h)
                    continue
            missed.append(i)
        self.last_served = served
        if read:
            self._touch(session, read)
        return result, missed

    def _touch(self, session, hashes) -> None:
        """Tell the daemon what was read through the directory, without waiting for it. When its socket is full
        (the daemon is behind), the hashes wait here and go in one message per session later: the policy then
        sees them as one request, as it would a batched get."""
        held = self._touches.get(session)
        if held is None:
            self._touches[session] = held = []
        held += hashes
        self._held_touches += len(hashes)
        if self._held_touches > TOUCHES_HELD:   # the oldest go uncounted rather than this client's memory growing
            for sid in list(self._touches):
                self._held_touches -= len(self._touches.pop(sid))
                if self._held_touches <= TOUCHES_HELD // 2:
                    break
        try:
            self._send_touches(protocol.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        except OSError as e:   # a daemon that is gone: a read through a dead daemon's directory is no read
            raise DaemonError(errno.ECONNRESET, f"kvtierd closed the connection ({e.strerror or e})") from None

    def _send_touches(self, flags: int = 0) -> None:
        while self._touches:
            sid, hashes = next(iter(self._touches.items()))
            while hashes:
                chunk = hashes[:LOOKUP_BATCH]
                self.sock.send(protocol.pack({"op": "touch", "session": sid, "blocks": chunk}), flags)
                del hashes[:LOOKUP_BATCH]
                self._held_touches -= len(chunk)
            del self._touches[sid]

    def _get_asking(self, session, hashes, out):
        reply = self._call("get", session=session, blocks=hashes)
        result = []
        try:
            for i, (src, meta) in enumerate(self._served(reply)):
                if src is None:
                    result.append(None)
                elif out is not None:
                    copy_block(memoryview(out[i]).cast("B")[:src.nbytes], src, get=True)
                    result.append(out[i])
                else:
                    a = np.empty(src.nbytes, dtype=np.uint8)
                    copy_block(memoryview(a), src, get=True)
                    result.append(_typed(a, meta))
        finally:
            self._release(reply)
        return result

    def _served(self, reply):
        """(view of the daemon's memory, meta) per block a get asked for; (None, None) for a miss."""
        self.last_served = reply.get("tiers")
        for slot in reply["slots"]:
            yield (None, None) if slot is None else (self._view(slot[0], slot[1], slot[2]), slot[3])

    def _release(self, reply) -> None:
        if reply.get("lease"):
            self._id += 1
            protocol.send(self.sock, {"op": "release", "lease": reply["lease"]})   # no reply

    @contextlib.contextmanager
    def get_views(self, session: int | None, hashes):
        """Zero-copy get: a read-only numpy array over the daemon's memory per hit (dtype/shape as put; uint8
        for bytes), None per miss, valid inside the with-block only. The blocks are held where they are (not
        moved, evicted or deleted: a delete gets EBUSY) until it ends, so the caller can copy them to where it
        needs them (an H2D copy, say) without a copy into its own memory first.

            with kv.get_views(sid, [prefix_hash, ...]) as arrays:
                for a in arrays: ...

        At most get_batch_blocks per call: held blocks stay in memory tiers."""
        hashes = list(hashes)
        n = self.get_batch_blocks
        if len(hashes) > n:
            raise InputError(f"get_views: at most {n} blocks per call (they are held in memory tiers), "
                             f"got {len(hashes)}")
        reply = self._call("get", session=session, blocks=hashes)
        try:
            arrays = []
            for src, meta in self._served(reply):
                if src is None:
                    arrays.append(None)
                    continue
                arrays.append(_typed(np.frombuffer(src.toreadonly(), dtype=np.uint8), meta))
            yield arrays
        finally:
            self._release(reply)

    def contains(self, hashes) -> list[str | None]:
        """The tier holding each block (None: not stored for this tenant)."""
        hashes = list(hashes)
        out = []
        for i in range(0, len(hashes), LOOKUP_BATCH):
            out += self._call("contains", blocks=hashes[i:i + LOOKUP_BATCH])["tiers"]
        return out

    def delete(self, hashes) -> int:
        hashes = list(hashes)
        # spare_pool: the daemon may move this connection's spares into the room the delete freed
        # (not while a put_into holds some: the move frees every spare of the connection, those too)
        return sum(self._call("delete", blocks=hashes[i:i + LOOKUP_BATCH],
                              spare_pool=bool(self._spares) and not self._lent)["deleted"]
                   for i in range(0, len(hashes), LOOKUP_BATCH))

    def stats(self) -> dict:
        return self._call("stats")

    def register_range(self, address: int, length: int, block_bytes: int, hashes=None) -> int:
        """KV kept in this process's own (anonymous) memory: the daemon's eBPF probes count faults and NUMA
        hinting faults in [address, address + length) as access heat of the block whose prefix hash is
        hashes[i] for the i-th block_bytes of it. Returns the range id (unregister_range)."""
        return self._call("register_range", address=address, length=length, block_bytes=block_bytes,
                          blocks=None if hashes is None else list(hashes))["range"]

    def unregister_range(self, range_id: int) -> None:
        self._call("unregister_range", range=range_id)

    def call(self, op: str, **fields) -> dict:
        """Any op of the protocol (kvctl's admin ops use this)."""
        return self._call(op, **fields)


def admin_call(socket_path: str, op: str, tenant: str | None = None, **fields) -> dict:
    """One request (kvctl): connect, ask, close. Without a tenant the daemon needs an admin identity (root, its
    own uid, or [admins] of its config) and shows every tenant; with one, the request sees that tenant only."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    protocol.set_timeouts(sock, 30.0)
    try:
        sock.connect(socket_path)
        msgs = ([{"op": "hello", "id": 1, "tenant": tenant, "version": protocol.VERSION}] if tenant else [])
        msgs.append({**fields, "op": op, "id": 2})
        for msg in msgs:
            try:
                protocol.send(sock, msg)
            except (BrokenPipeError, ConnectionResetError):
                pass   # refused: the daemon's reply, read next, says why
            data, fds, _ = protocol.recv_reply(sock, 0)
            for fd in fds:
                os.close(fd)   # hello's arenas: this one-shot call moves no block bytes
            if not data:
                raise DaemonError(errno.ECONNRESET, "kvtierd closed the connection")
            reply = protocol.unpack(data)
            if not reply.get("ok"):
                raise DaemonError(reply.get("errno") or errno.EIO, f"kvtierd: {reply.get('error')}")
    finally:
        sock.close()
    return reply
