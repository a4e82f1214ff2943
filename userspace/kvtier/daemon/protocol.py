"""kvtierd's engine API wire protocol.

Transport: a Unix SOCK_SEQPACKET socket. Why: the kernel keeps message boundaries (no length prefix, no partial
frames to reassemble, a malformed message can never desynchronise the stream), file descriptors travel with a
message (SCM_RIGHTS, how the client receives the daemon's memfd arenas), and SO_PEERCRED gives the peer's uid/gid.

Latency: waking a process blocked in the kernel costs 50-100 µs on some virtual machines, more than the op
itself. So both ends busy-poll briefly: the client spins on a non-blocking receive for up to BUSY_POLL_S
before blocking, the daemon keeps polling (epoll with timeout 0) for busy_poll_us after serving a request.
Cost: one core spinning for that window while requests keep coming; nothing when idle.

Frame: one message = one msgpack map, at most MAX_MESSAGE_BYTES (a batch of a few thousand blocks; the client
splits bigger ones). Requests carry "op" and "id"; the reply echoes
"id" with "ok": true and the op's fields, or "ok": false, "error" (one line) and "errno". A request without "id"
gets no reply (used by `release`, so a get costs one round trip). Block bytes never travel on the socket: a put
returns slots (arena, offset, nbytes) that the client fills through its own mapping, then commits; a get returns
slots the client copies out of, then releases.

Ops (fields; reply fields):
  hello            tenant, version                 -> arenas [{arena, tier, kind, size, region_id?}] (+ memfd fds),
                                                      block size limits, put_batch_bytes, get_batch_blocks
  arenas           -                               -> arenas (+ fds): after a reply names an unknown arena
  register_session name?                           -> session
  end_session      session                         -> released (blocks it referenced)
  hint             session, state (prefilling|decoding|idle|finished|resume), block_types?
  put              session?, blocks [[hash, type, nbytes, meta]], durable? -> txn, slots [[arena, off, n]|None]
                   (None: already stored, dedup; the session's reference is taken; txn 0: nothing to write)
  commit           txn                             -> stored (acknowledged: see durability in engine.py)
  abort            txn
  get              session?, blocks [hash]          -> lease, slots [[arena, off, n, meta]|None], tiers
  release          lease                           (no reply when sent without id)
  contains         blocks [hash]                   -> tiers [name|None]
  delete           blocks [hash]                   -> deleted
  stats            -                               -> the daemon's state (kvctl status)
  admin ops (kvctl): sessions, blocks {session?, tier?, limit?}, explain {block}, pin/unpin {block|session},
                     evict {block}, policy / policy_set {name}, moves {limit?}; pin/unpin/evict/policy_set need
                     root or the daemon's uid
Replies arrive in request order on a connection, so a client may send a commit and read its reply later.
A prefix hash is an int in [0, 2**64) (msgpack's range) or bytes of at most 64; kvctl names blocks by their
32-hex-digit key. Limits: a list has at most 65536 entries (E2BIG); wrong types are EINVAL.
"""
from __future__ import annotations

import array
import errno
import socket
import time

import msgpack

VERSION = 1
BUSY_POLL_S = 200e-6
MAX_MESSAGE_BYTES = 192 << 10   # under the default net.core.wmem_max (208 KiB): a datagram must fit
MAX_FDS = 64


class ProtocolError(OSError):
    """The daemon answered ok=false; errno says what kind of failure."""


def pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


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


def recv_reply(sock: socket.socket, spin_s: float = BUSY_POLL_S) -> tuple[bytes, list[int], bool]:
    """recv() after spinning up to spin_s on a non-blocking receive (see Latency above)."""
    if spin_s > 0:
        deadline = time.perf_counter() + spin_s
        while True:
            try:
                return recv(sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() > deadline:
                    break
    return recv(sock)


def recv(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int], bool]:
    """One message: (bytes, received fds, truncated). Empty bytes with no fds: the peer closed."""
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE_BYTES + 1, socket.CMSG_SPACE(MAX_FDS * 4), flags)
    fds: list[int] = []
    for level, typ, payload in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return data, fds, bool(flags & socket.MSG_TRUNC) or len(data) > MAX_MESSAGE_BYTES
