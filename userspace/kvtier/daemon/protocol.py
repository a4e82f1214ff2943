"""kvtierd's engine API wire protocol.

Transport: a Unix SOCK_SEQPACKET socket. Why: the kernel keeps message boundaries (no length prefix, no partial
frames to reassemble, a malformed message can never desynchronise the stream), file descriptors travel with a
message (SCM_RIGHTS, how the client receives the daemon's memfd arenas), and SO_PEERCRED gives the peer's uid/gid.

Latency: waking a process blocked in the kernel costs 50-100 µs on some virtual machines, more than the op
itself. So the daemon keeps polling (epoll with timeout 0) for busy_poll_us after serving a request, and a
client spins on a non-blocking receive for up to busy_poll_s before blocking (Client(busy_poll_s=...)).
The client's default (default_spin_s) spins BUSY_POLL_S = 50 µs, about one reply of a small op, when the
process may run on two or more CPUs, and not at all on one (a spinner there only delays the daemon it waits
for). Short on purpose: on a 2-core machine shared with other work, a client spinning for hundreds of µs beside
the daemon's own spin took a small op from ~25 to ~80-700 µs (each spinner takes the core the other needs).
Cost of the daemon's spin: one core for that window while requests keep coming; nothing when idle.
Sockets are in blocking mode with kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO, set_timeouts) rather than
Python's settimeout(): with a Python timeout every send and recv first calls poll(), and a MSG_DONTWAIT
receive blocks in that poll, so the client's spin slept and the daemon's send paid for waking it up
(measured: 31 µs per reply send, most of a small op's round trip). Receives go into a buffer allocated once
(recv(buf=...)), not a fresh 192 KiB one per message.

Frame: one message = one msgpack map, at most MAX_MESSAGE_BYTES (a batch of a few thousand blocks; the client
splits bigger ones). Requests carry "op" and "id"; the reply echoes
"id" with "ok": true and the op's fields, or "ok": false, "error" (one line) and "errno". A request without "id"
gets no reply (used by `release`, so a get costs one round trip). Block bytes never travel on the socket: a put
returns slots (arena, offset, nbytes) that the client fills through its own mapping, then commits; a get returns
slots the client copies out of, then releases.

Ops (fields; reply fields):
  hello            tenant, version                 -> arenas [{arena, tier, kind, size, region_id?}] (+ memfd fds),
                                                      block size limits, put_batch_bytes, get_batch_blocks,
                                                      directory? {size, buckets, salt, tier} (+ its fd, last)
  arenas           -                               -> arenas (+ fds): after a reply names an unknown arena
  register_session name?                           -> session
  end_session      session                         -> released (blocks it referenced)
  hint             session, state (prefilling|decoding|idle|finished|resume), block_types?
  put              session?, blocks [[hash, type, nbytes, meta]], durable? -> txn, slots [[arena, off, n]|None]
                   (None: already stored, dedup; the session's reference is taken; txn 0: nothing to write)
                   want? [nbytes], drop? [spare]   -> spares [[spare, arena, off, n]] (see the spared put below)
  put (spared)     spared: true, session?, blocks [[hash, type, nbytes, meta, layout|None, [spare, arena, off]]],
                   durable?, want?, drop?          -> stored, spares: ONE round trip. The client copied each
                   block into a spare slot a previous reply handed this connection (a slot reserved under a
                   placeholder, owned by the connection, freed when it closes); the daemon checks every slot is
                   this connection's and matches exactly (else EINVAL, nothing changes, the named spares are
                   freed), then commits as `commit` does (dedup frees the slot). "want" asks for spares for the
                   next put (taken from free room only, never by eviction, up to half the smallest memory tier
                   per connection); "drop" gives spares back. hello's reply says spare_slots: true.
  put (staged)     as the spared put, plus stage: true, sent WITHOUT id (no reply) BEFORE the client copies: the
                   daemon checks and books it while the bytes are copied. The next message on the connection
                   must be "commit" or "abort" with staged: true; anything else aborts the staged put. Until its
                   commit the blocks are invisible (their keys are pending: a racing put of one deduplicates)
                   and every spare it names stays the connection's, even a duplicate's, since the client may
                   still be writing into it. A staged put the daemon refuses is reported by its commit.
  put (nowait)     as the spared put, plus nowait: true, sent WITHOUT id: no reply at all (the client's
                   put(wait=False) of small blocks while it holds spares for more). Nothing answers it, so
                   what it did rides on the connection's next reply: "nowait": [stored, errno, error, failed],
                   the blocks these puts stored and their first failure (errno 0: none) since the last reply.
                   A refused one frees the spares it named, as a spared put's refusal does.
  spare            want? [nbytes], drop? [spare]   -> spares
  commit           txn | staged: true              -> stored (acknowledged: see durability in engine.py);
                                                      a staged commit also returns the spares its put wanted
  abort            txn | staged: true
  get              session?, blocks [hash]          -> lease, slots [[arena, off, n, meta]|None], tiers
  release          lease                           (no reply when sent without id)
  touch            session?, blocks [hash]         (sent without id, no reply) blocks the client read itself
                                                   through the domain's block directory (daemon/directory.py):
                                                   counted as hits and shown to the policy like a get's
  contains         blocks [hash]                   -> tiers [name|None]
  delete           blocks [hash], spare_pool?      -> deleted, spare_pool? (with spare_pool: true and spares held,
                                                      they are re-reserved into the room just freed and the
                                                      reply lists them all: the client replaces its set)
  stats            -                               -> the daemon's state (kvctl status)
  register_range   address, length, block_bytes, blocks? [hash|None]  -> range, probes, counted (eBPF heat of
                                                      the caller's own anonymous KV memory; daemon/heat.py)
  unregister_range range                           -> removed
  admin ops (kvctl): sessions, blocks {session?, tier?, limit?}, explain {block}, pin/unpin {block|session},
                     evict {block}, policy / policy_set {name}, moves {limit?}, top {limit?}. stats and the
                     read-only ones are scoped to the connection's tenant once bound; without a tenant (the all-tenant
                     view) and for pin/unpin/evict/policy_set the peer must be an admin (root, the daemon's
                     uid, or [admins] of the config); else EPERM
Replies arrive in request order on a connection, so a client may send a commit and read its reply later.
A prefix hash is an int in [0, 2**64) (msgpack's range) or bytes of at most 64; kvctl names blocks by their
32-hex-digit key. Limits: a list has at most 65536 entries (E2BIG); wrong types are EINVAL. A connection holds at
most 65536 gets it has not released, and a process 1024 registered ranges (EDQUOT beyond: daemon/server.py
MAX_LEASES_PER_CONNECTION, daemon/heat.py MAX_RANGES_PER_PROCESS); a uid holds at most max_connections_per_uid
connections (config): one more is answered EDQUOT, with id 0, and closed. Slots reserved by puts and as spares,
and blocks pinned by decoding sessions, are each at most the memory tiers' capacity / nominal_bytes and at least
65536 (daemon/engine.py OUT_OF_POLICY_MIN_BLOCKS): a put beyond is EDQUOT, a decoding put beyond ENOSPC.
A tenant's and a uid's pinned bytes are at most max_pinned_per_tenant / max_pinned_per_uid (config): a decoding
hint beyond is EDQUOT (nothing changes), a decoding session's put beyond stores what fits and is EDQUOT.
"""
from __future__ import annotations

import array
import errno
import os
import socket
import struct
import threading
import time

import msgpack

VERSION = 1
BUSY_POLL_S = 50e-6   # a client's spin for a reply when it has a CPU to spare (see Latency above)
MAX_MESSAGE_BYTES = 192 << 10   # under the default net.core.wmem_max (208 KiB): a datagram must fit
MAX_FDS = 64


_MSG_TRUNC = int(socket.MSG_TRUNC)         # plain ints: IntFlag arithmetic costs microseconds per message
MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)


class ProtocolError(OSError):
    """The daemon answered ok=false; errno says what kind of failure."""


_packers = threading.local()


def pack(msg: dict) -> bytes:
    # a Packer kept per thread: ~0.6 us less per message than packb, which builds one each call
    try:
        return _packers.p.pack(msg)
    except AttributeError:
        _packers.p = msgpack.Packer(use_bin_type=True)
        return _packers.p.pack(msg)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=MAX_MESSAGE_BYTES,
                           max_str_len=MAX_MESSAGE_BYTES, max_array_len=1 << 18, max_map_len=1 << 16)


def send(sock: socket.socket, msg: dict, fds: list[int] = ()) -> None:
    data = pack(msg)
    if len(data) > MAX_MESSAGE_BYTES:
        raise OSError(errno.EMSGSIZE, f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking mode with kernel send/receive timeouts (see Latency above); a timed-out call raises
    BlockingIOError (EAGAIN), which recv_reply turns into TimeoutError."""
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def new_buffer() -> bytearray:
    return bytearray(MAX_MESSAGE_BYTES + 1)


def default_spin_s() -> float:
    """BUSY_POLL_S when this process may run on two or more CPUs, else 0 (see Latency above)."""
    try:
        return BUSY_POLL_S if len(os.sched_getaffinity(0)) >= 2 else 0.0
    except OSError:
        return 0.0


def recv_reply(sock: socket.socket, spin_s: float = 0.0, buf: bytearray | None = None):
    """recv() after spinning up to spin_s on a non-blocking receive (see Latency above)."""
    try:
        if spin_s > 0:
            deadline = time.perf_counter() + spin_s
            while True:
                try:
                    return recv(sock, MSG_DONTWAIT, buf)
                except BlockingIOError:
                    if time.perf_counter() > deadline:
                        break
        return recv(sock, 0, buf)
    except BlockingIOError:   # SO_RCVTIMEO ran out
        raise TimeoutError(errno.ETIMEDOUT, "kvtierd did not answer in time") from None
    except ConnectionResetError:
        # the daemon closed with our message unread, maybe after a last reply saying why (a refused
        # connection): the reset is reported first, and the reply is still queued behind it
        try:
            return recv(sock, MSG_DONTWAIT, buf)
        except OSError:
            raise ConnectionResetError(errno.ECONNRESET, "kvtierd closed the connection") from None


def recv(sock: socket.socket, flags: int = 0, buf: bytearray | None = None) -> tuple[bytes, list[int], bool]:
    """One message: (bytes, received fds, truncated). Empty bytes with no fds: the peer closed.
    With `buf` (from new_buffer) the bytes are a memoryview into it, valid until the next recv into buf."""
    if buf is None:
        data, anc, mflags, _ = sock.recvmsg(MAX_MESSAGE_BYTES + 1, _ANC_SPACE, flags)
    else:
        n, anc, mflags, _ = sock.recvmsg_into([buf], _ANC_SPACE, flags)
        data = memoryview(buf)[:n]
    fds: list[int] = []
    for level, typ, payload in anc:
        if level == _SOL_SOCKET and typ == _SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return data, fds, bool(mflags & _MSG_TRUNC) or len(data) > MAX_MESSAGE_BYTES
