"""The block directory: where a domain's blocks lie in the first memory tier, so a client's get needs no daemon.

A get through the socket is a round trip and a turn of the daemon's one thread: ~10 us of transport and tens of us
of CPython, policy bookkeeping included, for a block the client then copies out of memory it has mapped anyway.
So for each domain (tenant salt) the daemon keeps a table of its blocks in the first memory tier in a sealed memfd
that clients of the domain map read-only (hello hands it out with the arenas). A client's get looks a block up
there, copies it out of its arena mapping and checks the entry did not change meanwhile (a seqlock per entry, in
kvtier._native: kvt_dir_*); then it tells the daemon what it read in a message it does not wait for ("touch"),
so hits are counted and the policy sees them as a get's. Anything else (not there, changed during the copy,
another tier) goes through the socket as before.

Correctness rests on one rule: an entry is emptied before the slot it names is freed (MemoryTier.on_free), and a
freed slot is written again only after that (by the daemon, or by a client it hands the slot to afterwards). A
reader that sees the same even seq before and after its copy therefore copied the block the entry named.
The table is lossy: a bucket holds KVT_DIR_WAYS entries, and a block that finds its bucket full, or whose meta
(dtype, shape) does not fit in an entry, is simply not listed. Clients cannot write it: F_SEAL_FUTURE_WRITE.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct

import msgpack
import numpy as np
import xxhash

try:
    from kvtier._native import ffi, lib
except ImportError:   # a client without the built extension: gets go through the socket
    ffi = lib = None

MAGIC = b"KVD1"
VERSION = 1
HEADER = struct.Struct("<4sIQII")   # magic, version, buckets, entry bytes, ways
ENTRY_BYTES = 64
HEADER_BYTES = 4096
WAYS = 8
USED_OFFSET = 44         # of struct kvt_dirent's used byte
META_MAX_BYTES = 16
MAX_BUCKETS = 1 << 15   # 262,144 entries, 16 MiB of (sparse) memfd per domain at most
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)   # Linux 5.1


def derive_key(salt: bytes, prefix_hash) -> bytes:
    """The daemon's key of a block: xxh3_128(tenant salt + prefix hash). Clients of a domain compute it too, to
    look blocks up in its directory."""
    if isinstance(prefix_hash, bool) or not isinstance(prefix_hash, (int, bytes)):
        raise OSError(errno.EINVAL, f"a prefix hash is an int or bytes, got {type(prefix_hash).__name__}")
    if isinstance(prefix_hash, int):
        if not 0 <= prefix_hash < 1 << 64:
            raise OSError(errno.EINVAL, "an int prefix hash must be in [0, 2**64) (longer hashes: pass bytes)")
        h = prefix_hash.to_bytes(8, "little")
    else:
        if len(prefix_hash) > 64:
            raise OSError(errno.EINVAL, "a bytes prefix hash is at most 64 bytes")
        h = b"b" + prefix_hash
    return xxhash.xxh3_128_digest(salt + b"\0" + h)


def buckets_for(max_blocks: int) -> int:
    """Buckets for a tier that may hold max_blocks of a domain: about two entries per block, a power of two."""
    want = max(1, 2 * max_blocks // WAYS)
    return min(MAX_BUCKETS, 1 << (want - 1).bit_length())


def available() -> bool:
    return lib is not None


class Directory:
    """The daemon's side: one domain's table, which only the daemon writes."""

    def __init__(self, nbuckets: int, name: str = ""):
        if nbuckets < 1 or nbuckets & (nbuckets - 1):
            raise ValueError(f"directory buckets must be a power of two, got {nbuckets}")
        self.nbuckets = nbuckets
        self.size = HEADER_BYTES + nbuckets * WAYS * ENTRY_BYTES
        self.fd = os.memfd_create(f"kvtier-directory{name and '-' + name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            self.buf = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            HEADER.pack_into(self.buf, 0, MAGIC, VERSION, nbuckets, ENTRY_BYTES, WAYS)
            # our mapping stays writable; every later one (a client's) can only read
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE |
                        fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(self.fd)
            raise
        self._base = ffi.from_buffer(self.buf)
        self._entry = ffi.new("struct kvt_dirent *")
        self.bucket_full = 0     # listings refused for a full bucket (a block served again is tried again)

    def put(self, key: bytes, arena: int, tier: int, offset: int, nbytes: int, meta) -> bool:
        """List a block (or move its entry); False if it is not listed (its bucket is full, or meta too big)."""
        packed = b"" if meta is None else msgpack.packb(meta, use_bin_type=True)
        if len(packed) > META_MAX_BYTES:
            self.delete(key)
            return False
        e = self._entry
        ffi.memmove(e.key, key, 16)
        e.offset, e.nbytes, e.arena, e.used, e.metalen, e.tier = offset, nbytes, arena, 1, len(packed), tier
        ffi.memmove(e.meta, packed, len(packed))
        if lib.kvt_dir_put(self._base, self.nbuckets, e) < 0:
            self.bucket_full += 1
            return False
        return True

    def delete(self, key: bytes) -> None:
        lib.kvt_dir_del(self._base, self.nbuckets, key)

    def listed(self) -> int:
        """Entries in use (a scan: for status, not for the serving path)."""
        used = np.frombuffer(self.buf, dtype=np.uint8, count=self.size - HEADER_BYTES, offset=HEADER_BYTES)
        return int(np.count_nonzero(used[USED_OFFSET::ENTRY_BYTES]))

    def handle(self) -> dict:
        return {"size": self.size, "buckets": self.nbuckets}

    def close(self) -> None:
        if self.fd < 0:
            return
        ffi.release(self._base)
        self.buf.close()
        os.close(self.fd)
        self.fd = -1


class DirectoryView:
    """A client's read-only mapping of its domain's directory."""

    def __init__(self, fd: int, handle: dict):
        size, nbuckets = handle["size"], handle["buckets"]
        if os.fstat(fd).st_size != size:
            raise OSError(errno.EPROTO, f"directory of {os.fstat(fd).st_size} bytes, hello said {size}")
        self.buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        magic, version, buckets, entry, ways = HEADER.unpack_from(self.buf, 0)
        if (magic, version, buckets, entry, ways) != (MAGIC, VERSION, nbuckets, ENTRY_BYTES, WAYS) or \
                size != HEADER_BYTES + buckets * ways * entry:
            self.buf.close()
            raise OSError(errno.EPROTO, "the daemon's block directory has a layout this client does not know")
        self.nbuckets = nbuckets
        self._base = ffi.from_buffer(self.buf)
        self._out = ffi.new("struct kvt_dirent *")
        self._meta: dict[bytes, object] = {}

    def find(self, key: bytes):
        """(index, seq, arena, offset, nbytes, meta) of key's entry, or None. What is read through it is valid only
        if same(index, seq) afterwards."""
        i = lib.kvt_dir_find(self._base, self.nbuckets, key, self._out)
        if i < 0:
            return None
        o = self._out
        meta = None
        if o.metalen:
            raw = bytes(ffi.buffer(o.meta, o.metalen))
            meta = self._meta.get(raw)
            if meta is None:
                meta = msgpack.unpackb(raw, raw=False)
                if len(self._meta) < 256:
                    self._meta[raw] = meta
        return i, o.seq, o.arena, o.offset, o.nbytes, meta

    def same(self, index: int, seq: int) -> bool:
        return bool(lib.kvt_dir_same(self._base, index, seq))

    def close(self) -> None:
        ffi.release(self._base)
        self.buf.close()
