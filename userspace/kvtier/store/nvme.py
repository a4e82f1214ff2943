"""NVMe cold store: an O_DIRECT data arena plus an append-only, CRC'd, fsync'd index log.

Files in the tier's directory:
  kvtier-data       extents in 4 KiB units, written and read with O_DIRECT from aligned mmap buffers
                    (buffered I/O when the filesystem refuses O_DIRECT, e.g. tmpfs; stats()["io_mode"]).
  kvtier-index.log  fixed-size records (put / delete) of key, offset, lengths, codec, xxh3_64 of the
                    original bytes and of the stored bytes, sequence number, each with its own CRC32.
  kvtier.lock       flock'd while open: one process per store.

Crash safety: put writes the data, fdatasyncs it, THEN appends the index record and fdatasyncs the
log, THEN returns. An extent is reused only after the record that frees it (delete or overwrite)
is durable. So after kill -9 at any moment, replaying the log finds every acknowledged block, a torn
last record fails its CRC and is cut off, and a record never points at data that was not durable.
Every get verifies the checksum anyway (media errors, fsync=False).

Capacity counts allocated 4 KiB extents of the data file; the index log (80 bytes per record,
compacted when mostly dead) is not counted.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import zlib
from dataclasses import dataclass

from kvtier.store.alloc import ExtentAllocator
from kvtier.store.base import ChecksumError, Tier, check_key, checksum, enospc
from kvtier.store.codec import CODEC_IDS, KINDS, Codec, KVLayout

UNIT_BYTES = 4096
DATA_FILE = "kvtier-data"
LOG_FILE = "kvtier-index.log"
LOCK_FILE = "kvtier.lock"
OP_PUT, OP_DELETE = 1, 2
_REC = struct.Struct("<4sBBHQ16sQQQQQ")  # magic op codec pad seq key offset length stored_length csum stored_csum
_CRC = struct.Struct("<II")               # crc32 of the record body, reserved
REC_BYTES = _REC.size + _CRC.size
_MAGIC = b"KVI1"
assert REC_BYTES == 80


@dataclass
class _Record:
    seq: int
    offset: int
    length: int          # original bytes
    stored_length: int   # bytes after the codec (what sits in the extent)
    codec: int
    checksum: int        # xxh3_64 of the original bytes
    stored_checksum: int  # xxh3_64 of the stored bytes: catches a torn extent before decoding it


def _pack(op: int, key: bytes, r: _Record) -> bytes:
    body = _REC.pack(_MAGIC, op, r.codec, 0, r.seq, key, r.offset, r.length, r.stored_length, r.checksum,
                     r.stored_checksum)
    return body + _CRC.pack(zlib.crc32(body), 0)


def _unpack(raw: bytes):
    """(op, key, record) or None when the record is torn or corrupt."""
    if len(raw) != REC_BYTES:
        return None
    body = raw[:_REC.size]
    crc, _ = _CRC.unpack_from(raw, _REC.size)
    if zlib.crc32(body) != crc:
        return None
    magic, op, codec, _, seq, key, offset, length, stored_length, csum, stored_csum = _REC.unpack(body)
    if magic != _MAGIC or op not in (OP_PUT, OP_DELETE) or codec >= len(KINDS):
        return None
    return op, key, _Record(seq, offset, length, stored_length, codec, csum, stored_csum)


def _round_up(n: int) -> int:
    return max(UNIT_BYTES, (n + UNIT_BYTES - 1) // UNIT_BYTES * UNIT_BYTES)


class _AlignedBuffer:
    """A page-aligned anonymous mapping, grown on demand (O_DIRECT needs aligned memory)."""

    def __init__(self):
        self.buf = None
        self.size = 0

    def get(self, nbytes: int) -> memoryview:
        if nbytes > self.size:
            # the old mapping is dropped, not closed: a view of it may still be alive (a traceback)
            size = 1 << max(16, (nbytes - 1).bit_length())
            self.buf = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.size = size
        return memoryview(self.buf)[:nbytes]


class NvmeTier(Tier):
    """NvmeTier(name, directory, capacity_bytes, codec=None, fsync=True)."""

    def __init__(self, name: str, directory: str, capacity_bytes: int, codec: Codec | None = None,
                 fsync: bool = True, direct: bool = True, compact_min_records: int = 1024):
        super().__init__(name, "nvme", capacity_bytes)
        self.directory = os.path.abspath(directory)
        self.codec = codec or Codec("none")
        self.fsync = fsync
        self.compact_min_records = compact_min_records  # compact when the log has more and is >50% dead
        self._codecs = {self.codec.id: self.codec}
        self._index: dict[bytes, _Record] = {}
        self._seq = 0
        self._log_records = 0
        self._tls = threading.local()
        self._closed = False
        self._fds: list[int] = []
        self._stats.update(quantised_blocks=0, quant_refused=0, quant_skipped_no_layout=0,
                           quant_max_abs=0.0, quant_rel_rms_max=0.0, quant_rel_rms_sum=0.0,
                           compactions=0, recovered_blocks=0, recovery_torn_records=0,
                           recovery_dropped_blocks=0, io_errors=0)
        try:
            self._open(direct)
        except BaseException:
            self._close_fds()
            raise

    # -- open / recovery ----------------------------------------------------------------------------

    def _open(self, direct: bool) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"tier {self.name}: cannot create directory {self.directory}: "
                                   f"{e.strerror}", self.directory) from None

        def open_file(fname, flags, what):
            path = os.path.join(self.directory, fname)
            try:
                fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise OSError(e.errno, f"tier {self.name}: cannot open {what} {path}: {e.strerror}",
                              path) from None
            self._fds.append(fd)
            return fd

        self._lock_fd = open_file(LOCK_FILE, os.O_RDWR | os.O_CREAT, "lock file")
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EBUSY, f"tier {self.name}: {self.directory} is in use by another process",
                          self.directory) from None
        self.io_mode = "buffered"
        self.io_note = "direct I/O disabled by the caller" if not direct else ""
        self._data_fd = -1
        if direct:
            try:
                self._data_fd = open_file(DATA_FILE, os.O_RDWR | os.O_CREAT | os.O_DIRECT, "data file")
                self.io_mode = "direct"
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.io_note = f"the filesystem of {self.directory} refuses O_DIRECT; using buffered I/O"
        if self._data_fd < 0:
            self._data_fd = open_file(DATA_FILE, os.O_RDWR | os.O_CREAT, "data file")
        self._log_fd = open_file(LOG_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, "index log")
        if not os.access(self.directory, os.W_OK):
            raise OSError(errno.EACCES, f"tier {self.name}: directory {self.directory} is not writable",
                          self.directory)
        self._recover()

    def _recover(self) -> None:
        data_size = os.fstat(self._data_fd).st_size
        raw = b""
        size = os.fstat(self._log_fd).st_size
        if size:
            raw = os.pread(self._log_fd, size, 0)
        live: dict[bytes, _Record] = {}
        good_end = 0
        torn = 0
        records = 0
        for pos in range(0, len(raw), REC_BYTES):
            parsed = _unpack(raw[pos:pos + REC_BYTES])
            if parsed is None:
                torn += 1
                continue
            records += 1
            good_end = pos + REC_BYTES
            op, key, rec = parsed
            self._seq = max(self._seq, rec.seq)
            if op == OP_DELETE:
                live.pop(key, None)
            else:
                prev = live.get(key)
                if prev is None or prev.seq < rec.seq:
                    live[key] = rec
        if good_end < len(raw):  # cut a torn tail so new records follow the last good one
            os.ftruncate(self._log_fd, good_end)
            self._sync(self._log_fd)
        # Nothing may point outside the data file or the capacity, nor overlap another block.
        alloc_size = self.capacity_bytes - self.capacity_bytes % UNIT_BYTES
        dropped = 0
        extents = []
        end_used = 0
        for key, rec in sorted(live.items(), key=lambda kv: (kv[1].offset, -kv[1].seq)):
            end = rec.offset + _round_up(rec.stored_length)
            if rec.offset % UNIT_BYTES or end > alloc_size or rec.offset + rec.stored_length > data_size \
                    or rec.offset < end_used:
                del live[key]
                dropped += 1
                continue
            extents.append((rec.offset, rec.stored_length))
            end_used = end
        self._alloc = ExtentAllocator.from_used(alloc_size, UNIT_BYTES, extents)
        self._index = live
        self._log_records = records
        self._stats["recovered_blocks"] = len(live)
        self._stats["recovery_torn_records"] = torn
        self._stats["recovery_dropped_blocks"] = dropped
        if dropped:  # make the drop durable so a later overwrite of those extents is not confusing
            self._compact()
        else:
            self._maybe_compact()

    # -- plumbing -----------------------------------------------------------------------------------

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fdatasync(fd)

    def _buffer(self, nbytes: int) -> memoryview:
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = _AlignedBuffer()
        return buf.get(nbytes)

    def _append(self, op: int, key: bytes, rec: _Record) -> None:
        """Append one record and make it durable (caller holds the lock)."""
        data = _pack(op, key, rec)
        n = os.write(self._log_fd, data)
        if n != len(data):  # a short write of a record: cut it so the log stays parseable
            size = os.fstat(self._log_fd).st_size
            os.ftruncate(self._log_fd, size - n)
            raise OSError(errno.ENOSPC, f"tier {self.name}: short write to the index log")
        self._sync(self._log_fd)
        self._log_records += 1

    def _maybe_compact(self) -> None:
        if self._log_records > self.compact_min_records and self._log_records > 2 * len(self._index):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the log with live records only: write tmp, fsync, rename, fsync the directory."""
        tmp = os.path.join(self.directory, LOG_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            payload = b"".join(_pack(OP_PUT, k, r) for k, r in self._index.items())
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, os.path.join(self.directory, LOG_FILE))
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        new_fd = os.open(os.path.join(self.directory, LOG_FILE), os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self._fds[self._fds.index(self._log_fd)] = new_fd
        os.close(self._log_fd)
        self._log_fd = new_fd
        self._log_records = len(self._index)
        self._stats["compactions"] += 1

    def _codec(self, codec_id: int) -> Codec:
        c = self._codecs.get(codec_id)
        if c is None:
            c = self._codecs[codec_id] = Codec(KINDS[codec_id])
        return c

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"tier {self.name} is closed")

    # -- Tier ---------------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._alloc.used_bytes

    def _encode(self, data, layout: KVLayout | None, lossless: bool) -> tuple[bytes | memoryview, Codec]:
        codec = self.codec
        if codec.lossless:
            return (data if codec.kind == "none" else codec.encode(data)), codec
        if lossless or layout is None:
            if layout is None and not lossless:
                self._stats["quant_skipped_no_layout"] += 1
            return data, self._codec(CODEC_IDS["none"])
        try:
            blob = codec.encode(data, layout)
        except Exception:
            self._stats["quant_refused"] += 1
            raise
        err = codec.last_error
        self._stats["quantised_blocks"] += 1
        self._stats["quant_max_abs"] = max(self._stats["quant_max_abs"], err["max_abs"])
        self._stats["quant_rel_rms_max"] = max(self._stats["quant_rel_rms_max"], err["rel_rms"])
        self._stats["quant_rel_rms_sum"] += err["rel_rms"]
        return blob, codec

    def put(self, key: bytes, data, layout: KVLayout | None = None, lossless: bool = False) -> int:
        """Store a block durably (fsync=True: on disk before this returns); returns the stored bytes.

        With a quantising codec, `layout` describes the block; without it, or with lossless=True, the
        block is stored uncompressed. ErrorBoundExceeded means: call again with lossless=True.
        """
        key = check_key(key)
        src = memoryview(data).cast("B")
        self._check_open()
        with self._lock:
            blob, codec = self._encode(src, layout, lossless)
        blob = memoryview(blob).cast("B")
        stored = blob.nbytes
        rec = _Record(0, 0, src.nbytes, stored, codec.id, checksum(src),
                      checksum(blob) if codec.kind != "none" else 0)
        if codec.kind == "none":
            rec.stored_checksum = rec.checksum
        with self._lock:
            offset = self._alloc.alloc(stored)
            if offset is None:
                self._stats["enospc"] += 1
                raise enospc(self.name, stored, self._alloc.used_bytes, self.capacity_bytes)
        rec.offset = offset
        try:
            self._write_extent(offset, blob)
            self._sync(self._data_fd)
            with self._lock:
                self._seq += 1
                rec.seq = self._seq
                self._append(OP_PUT, key, rec)
                old = self._index.get(key)
                self._index[key] = rec
                if old is not None:
                    self._alloc.free(old.offset, old.stored_length)
                self._stats["puts"] += 1
                self._stats["bytes_in"] += src.nbytes
                self._stats["stored_bytes_in"] += stored
                self._maybe_compact()
        except BaseException as e:
            with self._lock:
                if self._index.get(key) is not rec:
                    self._alloc.free(offset, stored)
                if isinstance(e, OSError):
                    self._stats["io_errors"] += 1
            raise
        return stored

    def _write_extent(self, offset: int, blob: memoryview) -> None:
        padded = _round_up(blob.nbytes)
        buf = self._buffer(padded)
        buf[:blob.nbytes] = blob
        if padded > blob.nbytes:
            buf[blob.nbytes:] = bytes(padded - blob.nbytes)
        pos = 0
        while pos < padded:
            n = os.pwrite(self._data_fd, buf[pos:], offset + pos)
            if n <= 0:
                raise OSError(errno.EIO, f"tier {self.name}: pwrite returned {n}")
            pos += n
            if pos < padded and (offset + pos) % UNIT_BYTES and self.io_mode == "direct":
                # O_DIRECT cannot continue at an unaligned offset; a short write means the
                # filesystem (or RLIMIT_FSIZE) refused the rest
                raise OSError(errno.ENOSPC, f"tier {self.name}: short write ({pos} of {padded} bytes): "
                                            "disk full or file size limit")

    def _read_extent(self, rec: _Record) -> memoryview:
        padded = _round_up(rec.stored_length)
        buf = self._buffer(padded)
        pos = 0
        while pos < padded:
            n = os.preadv(self._data_fd, [buf[pos:]], rec.offset + pos)
            if n <= 0:
                break  # end of file: the extent is short, the checksum says so
            pos += n
        return buf[:min(pos, rec.stored_length)]

    def _fetch(self, key: bytes) -> bytes | memoryview:
        """The original bytes of a block, verified; drops the block on a checksum failure."""
        key = check_key(key)
        self._check_open()
        with self._lock:
            rec = self._index.get(key)
            self._stats["gets"] += 1
            if rec is None:
                self._stats["misses"] += 1
                raise KeyError(key)
        stored = self._read_extent(rec)
        detail = None
        data = None
        if stored.nbytes != rec.stored_length or checksum(stored) != rec.stored_checksum:
            detail = "stored bytes do not match their checksum"
        else:
            try:
                data = stored if rec.codec == CODEC_IDS["none"] else self._codec(rec.codec).decode(stored)
            except Exception as e:
                detail = f"cannot decode ({e})"
            else:
                if rec.codec != CODEC_IDS["none"] and KINDS[rec.codec] in ("zstd", "lz4") \
                        and checksum(data) != rec.checksum:
                    detail = "decoded bytes do not match their checksum"
        with self._lock:
            if self._index.get(key) is not rec:  # replaced or deleted while we read: read again
                if detail is not None or key in self._index:
                    return self._fetch(key)
            if detail is not None:
                self._drop(key, rec)
                raise ChecksumError(self.name, key, detail)
            self._stats["hits"] += 1
            self._stats["bytes_out"] += rec.length
        return data

    def _drop(self, key: bytes, rec: _Record) -> None:
        """Forget a corrupt block durably, so it is never served again (caller holds the lock)."""
        self._stats["checksum_failures"] += 1
        self._seq += 1
        try:
            self._append(OP_DELETE, key, _Record(self._seq, 0, 0, 0, 0, 0, 0))
        except OSError:
            pass  # still dropped in memory; recovery's checksum on read drops it again
        del self._index[key]
        self._alloc.free(rec.offset, rec.stored_length)

    def get(self, key: bytes) -> bytes:
        return bytes(self._fetch(key))

    def get_into(self, key: bytes, out) -> int:
        data = memoryview(self._fetch(key)).cast("B")
        dst = memoryview(out).cast("B")
        if dst.nbytes < data.nbytes:
            raise ValueError(f"tier {self.name}: buffer of {dst.nbytes} bytes < block of {data.nbytes}")
        dst[:data.nbytes] = data
        return data.nbytes

    def contains(self, key: bytes) -> bool:
        return bytes(key) in self._index

    def delete(self, key: bytes) -> bool:
        key = check_key(key)
        with self._lock:
            self._check_open()
            rec = self._index.get(key)
            if rec is None:
                return False
            self._seq += 1
            self._append(OP_DELETE, key, _Record(self._seq, 0, 0, 0, 0, 0, 0))
            del self._index[key]
            self._alloc.free(rec.offset, rec.stored_length)  # reusable only now the delete is durable
            self._stats["deletes"] += 1
            self._maybe_compact()
            return True

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def block_info(self, key: bytes) -> dict:
        """Where and how a block is stored (for kvctl explain)."""
        with self._lock:
            r = self._index[check_key(key)]
            return {"offset": r.offset, "length": r.length, "stored_length": r.stored_length,
                    "codec": KINDS[r.codec], "checksum": r.checksum, "seq": r.seq}

    def stats(self) -> dict:
        out = super().stats()
        n = out.pop("quant_rel_rms_sum")
        out["quant_rel_rms_mean"] = n / out["quantised_blocks"] if out["quantised_blocks"] else 0.0
        out.update(directory=self.directory, codec=self.codec.kind, error_bound=self.codec.error_bound,
                   io_mode=self.io_mode, fsync=self.fsync, log_records=self._log_records,
                   free_extents=self._alloc.free_extents, largest_free_bytes=self._alloc.largest_free)
        if self.io_note:
            out["io_note"] = self.io_note
        return out

    def _close_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_fds()
