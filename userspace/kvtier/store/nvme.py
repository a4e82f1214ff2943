"""NVMe cold store: an O_DIRECT data arena plus an append-only, CRC'd, fsync'd index log.

Files in the tier's directory:
  kvtier-data       extents in 4 KiB units, written and read with O_DIRECT from aligned mmap buffers
                    (buffered I/O when the filesystem refuses O_DIRECT, e.g. tmpfs; stats()["io_mode"]).
                    It grows with the puts that first reach past its end (each of those fdatasyncs commits
                    the new size); once written, an extent is overwritten in place, no metadata changes.
                    Not zero-filled ahead: measured, writing every byte twice cost more on a first fill
                    (1 MiB puts 960 vs 673 us) than the journal commits it saves.
  kvtier-index.log  fixed-size records (put / delete) of key, offset, lengths, codec, xxh3_64 of the
                    original bytes and of the stored bytes, sequence number, each with its own CRC32.
                    Pre-extended with zeros ~1 MiB at a time; records are pwritten at the tracked end
                    (no O_APPEND: an append changes no metadata, its fdatasync is one flush). The first
                    all-zero record is the end; a log without a zero tail (older versions) ends at EOF.

A block may carry a small caller header (put(..., header=)): it is stored in the extent's first 4 KiB
unit and the data from the next unit on, so data in a page-aligned buffer (a memfd arena slot) is
written and read with O_DIRECT straight from / into that buffer (no bounce copy); the header's length
is in the record (its "hlen" field) and the checksum covers header + data as if concatenated.
  kvtier.lock       flock'd while open: one process per store.

Crash safety: put writes the data (O_DIRECT: it has reached the device when the write returns), THEN
appends the index record and fdatasyncs the log, THEN returns (put_many: all data, all records in one
write with their place in the batch, one log fdatasync). The log's fdatasync flushes the device's
write cache, data included: flush_mode "single", one flush per put as dd oflag=direct,dsync has, where
an O_DIRECT overwrite changes no metadata (ext4, xfs) and the extents lie in the committed part of the
data file. There the records are written first and their writeback started (sync_file_range), then the
data, then the log's fdatasync: the two device writes overlap (a 64 KiB put: 0.75 of the time). A put
that grows the file or fills a hole, buffered I/O, or another filesystem first fdatasyncs the data file
("separate": the data's metadata, or its pages, need their own sync).
An extent is reused only after the record that frees it (delete or overwrite) is durable. After kill -9
at any moment, replaying the log finds every acknowledged block; a torn last record fails its CRC and is
cut off (zeroed, with anything after the end: the unacknowledged rest of a batch). After a power loss
(or a kill -9 in single mode between a commit's records and its data) the last commit's records may be
on disk without its data; each earlier commit was flushed before the next was written (a commit holds
the store's lock from its records to its flush). So recovery reads back the last commit's blocks, and
cuts it from its first block whose bytes fail their checksum: those puts were never acknowledged, and an
overwritten key keeps its previous version, whose extent is still unreused.
Every get verifies the checksum anyway (media errors, fsync=False).

Capacity counts allocated 4 KiB extents of the data file; the index log (80 bytes per record,
compacted when mostly dead) is not counted.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import xxhash

from kvtier._native import ffi
from kvtier.errors import InputError
from kvtier.store.alloc import ExtentAllocator
from kvtier.store.base import ChecksumError, Tier, check_key, checksum, enospc
from kvtier.store.codec import CODEC_IDS, KINDS, Codec, KVLayout

UNIT_BYTES = 4096
DATA_FILE = "kvtier-data"
LOG_FILE = "kvtier-index.log"
LOCK_FILE = "kvtier.lock"
OP_PUT, OP_DELETE = 1, 2
_QHEAD_MAGIC = b"KVH1"  # quantised blob with the caller's header framed in front (quantising codecs)
# magic op codec hlen seq key offset length stored_length csum stored_csum batch_index, then crc32 of all that
_REC = struct.Struct("<4sBBHQ16sQQQQQI")
_CRC = struct.Struct("<I")
REC_BYTES = _REC.size + _CRC.size
_MAGIC = b"KVI2"
_REC1 = struct.Struct("<4sBBHQ16sQQQQQ")  # KVI1 (older versions): no batch index, crc32 of these 72 bytes
_MAGIC1 = b"KVI1"
assert REC_BYTES == 80 and _REC1.size + 8 == REC_BYTES
MAX_HEADER = UNIT_BYTES  # a header lives in the extent's first unit
CHUNK_BYTES = 8 << 20   # bounce copies of unaligned data go in chunks, overlapping the previous chunk's write
RUN_BYTES_MAX = 32 << 20   # adjacent extents of a group commit written by one pwritev, up to this much
RUN_IOV_MAX = 768          # and this many iovecs (IOV_MAX is 1024)
LOG_STEP_BYTES = REC_BYTES * 13108   # the index log is pre-extended with zeros ~1 MiB (whole records) at a time
_ZERO_REC = bytes(REC_BYTES)
SYNC_FILE_RANGE_WRITE = 2   # start writeback of the range, do not wait for it
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


@dataclass
class _Record:
    seq: int
    offset: int
    length: int          # original bytes
    stored_length: int   # bytes after the codec (what sits in the extent)
    codec: int
    checksum: int        # xxh3_64 of the original bytes
    stored_checksum: int  # xxh3_64 of the stored bytes: catches a torn extent before decoding it
    hlen: int = 0        # header bytes in the first unit (codec none only); data starts at UNIT_BYTES


def _pack(op: int, key: bytes, r: _Record, batch_index: int = 0) -> bytes:
    body = _REC.pack(_MAGIC, op, r.codec, r.hlen, r.seq, key, r.offset, r.length, r.stored_length, r.checksum,
                     r.stored_checksum, batch_index)
    return body + _CRC.pack(zlib.crc32(body))


def _unpack(raw: bytes):
    """(op, key, record, batch_index) or None when the record is torn or corrupt. batch_index: the
    record's place in the group commit that wrote it (0 for a lone record and for KVI1 records)."""
    if len(raw) != REC_BYTES:
        return None
    layout = _REC1 if raw[:4] == _MAGIC1 else _REC
    body = raw[:layout.size]
    if zlib.crc32(body) != _CRC.unpack_from(raw, layout.size)[0]:
        return None
    fields = layout.unpack(body) if layout is _REC else (*_REC1.unpack(body), 0)
    magic, op, codec, hlen, seq, key, offset, length, stored_length, csum, stored_csum, batch_index = fields
    if magic not in (_MAGIC, _MAGIC1) or op not in (OP_PUT, OP_DELETE) or codec >= len(KINDS):
        return None
    if hlen and (hlen > MAX_HEADER or codec != CODEC_IDS["none"]
                 or stored_length < UNIT_BYTES or length != hlen + stored_length - UNIT_BYTES):
        return None
    return op, key, _Record(seq, offset, length, stored_length, codec, csum, stored_csum, hlen), batch_index


def _filesystem(fd: int) -> tuple[str, str]:
    """(type, super options) of the filesystem holding fd, from /proc/self/mountinfo; ("", "") unknown."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == dev and " - " in line:
                    after = line.split(" - ", 1)[1].split()
                    return after[0], after[2] if len(after) > 2 else ""
    except OSError:
        pass
    return "", ""


def _stored_ok(rec: _Record, stored: memoryview) -> bool:
    """Whether the bytes read from rec's extent are the ones rec describes (length and checksum)."""
    if stored.nbytes != rec.stored_length:
        return False
    if rec.hlen:
        return _csum([stored[:rec.hlen], stored[UNIT_BYTES:]]) == rec.checksum
    return checksum(stored) == rec.stored_checksum


def _address(view) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(view)))


def _csum(parts) -> int:
    """xxh3_64 of the concatenation of `parts`, without concatenating them."""
    if len(parts) == 1:
        return checksum(parts[0])
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.intdigest()


def _advance(iov: list, n: int) -> list:
    """The iovecs left after the first n bytes were transferred."""
    while n and iov:
        if n >= iov[0].nbytes:
            n -= iov[0].nbytes
            iov = iov[1:]
        else:
            iov = [iov[0][n:]] + iov[1:]
            n = 0
    return iov


def _round_up(n: int) -> int:
    return max(UNIT_BYTES, (n + UNIT_BYTES - 1) // UNIT_BYTES * UNIT_BYTES)


def extent_bytes(nbytes: int) -> int:
    """Room on disk for a block of nbytes stored uncompressed with a header: its header unit and its data in
    whole units (what put_many allocates for it)."""
    return _round_up(UNIT_BYTES + nbytes)


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


class _Pending:
    """A put between its extent's allocation and its index record (put / put_many); head and blob are
    the bytes still to write."""
    __slots__ = ("key", "rec", "src_bytes", "head", "blob")

    def __init__(self, key, rec, src_bytes, head, blob):
        self.key, self.rec, self.src_bytes, self.head, self.blob = key, rec, src_bytes, head, blob


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
        # bounce_bytes: data copied through an aligned buffer because the caller's was not aligned
        self._stats.update(bounce_bytes=0, quantised_blocks=0, quant_refused=0, quant_skipped_no_layout=0,
                           quant_max_abs=0.0, quant_rel_rms_max=0.0, quant_rel_rms_sum=0.0,
                           compactions=0, log_extends=0, recovered_blocks=0, recovery_torn_records=0,
                           recovery_unflushed_records=0, recovery_dropped_blocks=0, io_errors=0,
                           data_syncs=0, data_syncs_saved=0, log_writeback_early=0)
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
        self._log_fd = open_file(LOG_FILE, os.O_RDWR | os.O_CREAT, "index log")
        if not os.access(self.directory, os.W_OK):
            raise OSError(errno.EACCES, f"tier {self.name}: directory {self.directory} is not writable",
                          self.directory)
        self._recover()
        # One flush per durable put where an O_DIRECT overwrite changes no metadata (ext4, xfs): the
        # log's fdatasync then flushes the device cache under the data too. Elsewhere (buffered I/O,
        # copy-on-write filesystems) the data file is synced on its own first.
        fstype, options = _filesystem(self._data_fd)
        self.flush_mode = "single" if (self.io_mode == "direct" and self.fsync and fstype in ("ext4", "xfs")
                                       and "data=journal" not in options) else "separate"
        self._durable_end = 0   # [0, this) of the data file: written and committed, so overwrites need no data sync
        if self.flush_mode == "single":
            os.fdatasync(self._data_fd)   # commit what an earlier process wrote before trusting its extents
            if os.fstat(self._data_fd).st_size:   # (SEEK_HOLE at the end of the file is ENXIO)
                self._durable_end = os.lseek(self._data_fd, 0, os.SEEK_HOLE)   # unwritten extents are holes

    def _recover(self) -> None:
        data_size = os.fstat(self._data_fd).st_size
        raw = b""
        size = os.fstat(self._log_fd).st_size
        if size:
            raw = os.pread(self._log_fd, size, 0)
        good_end = 0
        torn = 0
        log_end = len(raw)
        parsed = []   # (position, op, key, record, batch_index)
        for pos in range(0, len(raw), REC_BYTES):
            chunk = raw[pos:pos + REC_BYTES]
            if chunk == _ZERO_REC[:len(chunk)]:   # the pre-extended zero tail: the end of the log
                log_end = pos
                break
            rec = _unpack(chunk)
            if rec is None:
                if chunk[:3] == _MAGIC[:3] and _MAGIC[3] < chunk[3] <= ord("9"):
                    # a newer kvtier's record, not a torn one of ours: cutting the log there would lose its blocks
                    raise OSError(errno.EPROTONOSUPPORT,
                                  f"tier {self.name}: {os.path.join(self.directory, LOG_FILE)} holds records of "
                                  f"format {chunk[:4].decode()}, written by a newer kvtier (this one reads "
                                  f"{_MAGIC1.decode()} and {_MAGIC.decode()}); not opened, nothing changed")
                torn += 1
                continue
            good_end = pos + REC_BYTES
            parsed.append((pos, *rec))
        # The last group commit may be cut by a power loss before its one flush: its records can be on
        # disk while its data is not. Each earlier commit's flush ended before the next was written, so
        # only the last one needs its data read back; from its first block that fails, it is cut off
        # (never acknowledged), and an overwritten key keeps its previous version.
        cut = None
        if parsed:
            first = parsed[-1][0] - parsed[-1][4] * REC_BYTES
            cut = next((i for i, (pos, op, _, rec, _) in enumerate(parsed)
                        if pos >= first and op == OP_PUT and not self._intact(rec)), None)
        unflushed = 0
        if cut is not None:
            unflushed = len(parsed) - cut
            good_end = parsed[cut][0]
            del parsed[cut:]
        live: dict[bytes, _Record] = {}
        for _, op, key, rec, _ in parsed:
            self._seq = max(self._seq, rec.seq)
            if op == OP_DELETE:
                live.pop(key, None)
            else:
                prev = live.get(key)
                if prev is None or prev.seq < rec.seq:
                    live[key] = rec
        records = len(parsed)
        # Zero a torn tail, and whatever follows the end (the unacknowledged rest of a batch cut short
        # by a crash), so new records follow the last good one and nothing stale there can revive later.
        if raw.count(0, good_end) != len(raw) - good_end:
            torn += sum(1 for pos in range(log_end, len(raw), REC_BYTES)
                        if raw.count(0, pos, pos + REC_BYTES) != len(raw[pos:pos + REC_BYTES]))
            self._pwrite_all(self._log_fd, bytes(len(raw) - good_end), good_end)
            self._sync(self._log_fd)
        self._log_end, self._log_size = good_end, len(raw)
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
        self._stats["recovery_unflushed_records"] = unflushed
        self._stats["recovery_dropped_blocks"] = dropped
        if dropped:  # make the drop durable so a later overwrite of those extents is not confusing
            self._compact()
        else:
            self._maybe_compact()

    # -- plumbing -----------------------------------------------------------------------------------

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fdatasync(fd)

    def _pwrite_all(self, fd: int, data, offset: int) -> None:
        """pwrite all of `data` (buffered fd); OSError(ENOSPC) on a write that stops short."""
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view, offset = view[n:], offset + n

    def _buffer(self, nbytes: int, which: str = "buf") -> memoryview:
        buf = getattr(self._tls, which, None)
        if buf is None:
            buf = _AlignedBuffer()
            setattr(self._tls, which, buf)
        return buf.get(nbytes)

    def _writer(self) -> ThreadPoolExecutor:
        """One thread that writes a chunk while the caller copies the next (pwrite drops the GIL)."""
        with self._lock:
            if getattr(self, "_pool", None) is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kvtier-{self.name}-io")
            return self._pool

    def _committed(self, extents: list[tuple[int, int]]) -> bool:
        """Whether extents [(start, end)] all lie in the committed part of the data file, so the log's flush
        covers their overwrite (flush_mode single; caller holds the lock). The part only grows: a yes stays
        true."""
        return self.flush_mode == "single" and all(end <= self._durable_end for _, end in extents)

    def _sync_data(self, extents: list[tuple[int, int]]) -> None:
        """Make written extents [(start, end)] durable before their records: outside the committed part an
        extent fills a hole or grows the file, and that metadata needs the data file's own fdatasync (a
        journal commit); after it, the extents count as committed."""
        if self.fsync:
            os.fdatasync(self._data_fd)
            self._stats["data_syncs"] += 1
        if self.flush_mode == "single":
            with self._lock:   # extents from here on are committed; others' past a gap wait for their own sync
                for start, end in sorted(extents):
                    if start <= self._durable_end < end:
                        self._durable_end = end

    def _append(self, op: int, key: bytes, rec: _Record) -> None:
        """Append one record and make it durable (caller holds the lock)."""
        self._append_raw(_pack(op, key, rec), 1)

    def _append_raw(self, data: bytes, records: int) -> None:
        """Append whole records in one write and make them durable (caller holds the lock). They go
        at the tracked end, into zeros written ahead (~1 MiB at a time): the append changes no
        metadata, so its fdatasync is one device flush, not a journal commit."""
        self._log_write(data)
        self._log_commit(data, records)

    def _log_write(self, data: bytes) -> None:
        """Write records at the log's tracked end, not yet durable (caller holds the lock until _log_commit)."""
        fd, at = self._log_fd, self._log_end
        end = at + len(data)
        if end > self._log_size:
            target = -(-end // LOG_STEP_BYTES) * LOG_STEP_BYTES
            try:
                self._pwrite_all(fd, bytes(target - self._log_size), self._log_size)
                self._log_size = target
            except OSError as e:   # disk full: the zeros that landed still serve
                self._log_size = os.fstat(fd).st_size
                if end > self._log_size:
                    raise OSError(e.errno, f"tier {self.name}: cannot extend the index log: "
                                           f"{e.strerror}") from None
            self._stats["log_extends"] += 1
        try:
            self._pwrite_all(fd, data, at)
        except OSError as e:
            self._log_unwrite(len(data))
            raise OSError(e.errno, f"tier {self.name}: cannot write the index log: {e.strerror}") from None

    def _log_unwrite(self, nbytes: int) -> None:
        """Zero records that were written but will not be acknowledged, so they cannot point at extents
        freed for reuse (the next records go to the same place)."""
        try:
            os.pwrite(self._log_fd, bytes(nbytes), self._log_end)
        except OSError:
            pass

    def _log_commit(self, data: bytes, records: int) -> None:
        """Make the records _log_write wrote durable, and move the log's end past them."""
        try:
            self._sync(self._log_fd)
        except OSError as e:
            self._log_unwrite(len(data))
            raise OSError(e.errno, f"tier {self.name}: cannot write the index log: {e.strerror}") from None
        self._log_end += len(data)
        self._log_records += records

    def _maybe_compact(self) -> None:
        if self._log_records > self.compact_min_records and self._log_records > 2 * len(self._index):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the log with live records only: write tmp, fsync, rename, fsync the directory."""
        tmp = os.path.join(self.directory, LOG_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            payload = b"".join(_pack(OP_PUT, k, r) for k, r in self._index.items())
            log_end = len(payload)
            size = (log_end // LOG_STEP_BYTES + 1) * LOG_STEP_BYTES
            payload += bytes(size - log_end)   # pre-extended like the live log
            self._pwrite_all(fd, payload, 0)
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
        new_fd = os.open(os.path.join(self.directory, LOG_FILE), os.O_RDWR | os.O_CLOEXEC)
        self._fds[self._fds.index(self._log_fd)] = new_fd
        os.close(self._log_fd)
        self._log_fd = new_fd
        self._log_end, self._log_size = log_end, size
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

    def put(self, key: bytes, data, layout: KVLayout | None = None, lossless: bool = False,
            header=b"") -> int:
        """Store a block durably (fsync=True: on disk before this returns); returns the stored bytes.

        With a quantising codec, `layout` describes the block; without it, or with lossless=True, the
        block is stored uncompressed. ErrorBoundExceeded means: call again with lossless=True.
        `header` (at most 4 KiB) is stored in front of the data without concatenating them: get()
        returns header + data, get_body_into() the two apart.
        """
        return self.put_many([(key, data, header)], layout=layout, lossless=lossless)[0]

    def put_many(self, items, layout: KVLayout | None = None, lossless: bool = False) -> list[int]:
        """put() of several blocks [(key, data) or (key, data, header)] as one group commit: every
        extent is written, then one data fdatasync, then all index records in one write and one log
        fdatasync. All-or-nothing as acknowledged: on an error no block of the batch is stored (a crash
        in between may leave any subset, each intact); returns the stored bytes of each.

        flush_mode single, every extent in the committed part of the data file: the records are written
        first and their writeback started, then the data, then the log's one fdatasync, so the log's
        device write overlaps the data's instead of following it. The log and the commit are held
        throughout: a crash or power loss in between leaves this commit last, and recovery reads its
        data back (see the top)."""
        self._check_open()
        done: list[_Pending] = []
        try:
            for item in items:
                # (key, data), (key, data, header) or (key, data, header, layout): a layout per block
                key, data, header, item_layout = (*item, b"", layout)[:4] if len(item) == 2 else \
                    (*item, layout)[:4]
                done.append(self._prepare(check_key(key), data, header, item_layout, lossless))
            if done:
                extents = [(p.rec.offset, p.rec.offset + _round_up(p.rec.stored_length)) for p in done]
                with self._lock:
                    overlap = self._committed(extents)
                if not overlap:
                    self._write_all(done)
                    self._sync_data(extents)
                with self._lock:   # the records and the index change together
                    if overlap:
                        self._commit_overlapped(done)
                    else:
                        self._append_raw(self._records(done), len(done))
                    for p in done:
                        old = self._index.get(p.key)
                        self._index[p.key] = p.rec
                        if old is not None:
                            self._alloc.free(old.offset, old.stored_length)
                        self._stats["puts"] += 1
                        self._stats["bytes_in"] += p.src_bytes
                        self._stats["stored_bytes_in"] += p.rec.stored_length
                    self._maybe_compact()
        except BaseException as e:
            with self._lock:
                for p in done:
                    if self._index.get(p.key) is not p.rec:
                        self._alloc.free(p.rec.offset, p.rec.stored_length)
                if isinstance(e, OSError):
                    self._stats["io_errors"] += 1
            raise
        return [p.rec.stored_length for p in done]

    def _records(self, done: list[_Pending]) -> bytes:
        """The batch's index records, numbered (caller holds the lock)."""
        payload = []
        for i, p in enumerate(done):
            self._seq += 1
            p.rec.seq = self._seq
            payload.append(_pack(OP_PUT, p.key, p.rec, i))
        return b"".join(payload)

    def _commit_overlapped(self, done: list[_Pending]) -> None:
        """Records written and their writeback started, the data written meanwhile, then the one flush
        (caller holds the lock, so no other commit starts before this one is durable)."""
        data = self._records(done)
        self._log_write(data)
        if _libc.sync_file_range(self._log_fd, self._log_end, len(data), SYNC_FILE_RANGE_WRITE) == 0:
            self._stats["log_writeback_early"] += 1   # else (not supported): fdatasync writes it, as before
        try:
            self._write_all(done)
        except BaseException:
            self._log_unwrite(len(data))
            raise
        self._log_commit(data, len(done))
        self._stats["data_syncs_saved"] += 1

    def _prepare(self, key: bytes, data, header, layout, lossless) -> _Pending:
        """Encode and checksum one block and allocate its extent (written by _write_pending)."""
        src = memoryview(data).cast("B")
        head = memoryview(header).cast("B")
        if head.nbytes > MAX_HEADER:
            raise InputError(f"tier {self.name}: a header is at most {MAX_HEADER} bytes, got {head.nbytes}")
        qhead = memoryview(b"")
        if head.nbytes and self.codec.kind != "none":
            if self.codec.lossless:
                src = memoryview(bytes(head) + bytes(src))   # a compressor needs the block in one piece
                head = memoryview(b"")
            elif layout is not None and not lossless:
                # a layout describes the data only: quantise that, and frame the header in front of the blob
                qhead, head = head, memoryview(b"")
        with self._lock:
            blob, codec = self._encode(src, layout, lossless)
        blob = memoryview(blob).cast("B")
        csum = _csum([head, src]) if head.nbytes else checksum(src)
        if qhead.nbytes:
            hlen = 0   # the header is inside the blob: the record says nothing of it
            blob = memoryview(b"".join((_QHEAD_MAGIC, qhead.nbytes.to_bytes(4, "little"), qhead, blob)))
            stored = blob.nbytes
            rec = _Record(0, 0, qhead.nbytes + src.nbytes, stored, codec.id, _csum([qhead, src]), checksum(blob))
        elif codec.kind == "none":
            hlen = head.nbytes
            stored = (UNIT_BYTES if hlen else 0) + blob.nbytes
            rec = _Record(0, 0, hlen + src.nbytes, stored, codec.id, csum, csum, hlen)
        else:
            hlen = 0
            stored = blob.nbytes
            rec = _Record(0, 0, src.nbytes, stored, codec.id, csum, checksum(blob))
        with self._lock:
            offset = self._alloc.alloc(stored)
            if offset is None:
                self._stats["enospc"] += 1
                raise enospc(self.name, stored, self._alloc.used_bytes, self.capacity_bytes)
        rec.offset = offset
        return _Pending(key, rec, src.nbytes, head if hlen else None, blob)

    def _write_all(self, done: list[_Pending]) -> None:
        """Write a group commit's extents (not yet synced). Adjacent ones whose data O_DIRECT can take as it is
        go out as one pwritev: the device gets a few large requests rather than two per block (a 1 MiB block
        and its header unit span 257 pages, over a virtio disk's 254 segments); 1 MiB blocks from a memfd
        arena here: ~270 us per block merged, ~320 one by one."""
        run: list[_Pending] = []
        end = size = iovs = 0
        for p in sorted(done, key=lambda p: p.rec.offset):
            n = p.blob.nbytes
            if not (self.io_mode == "direct" and n and self._aligned(p.blob)):
                self._write_pending(p)
                continue
            if run and (p.rec.offset != end or size + n > RUN_BYTES_MAX or iovs + 3 > RUN_IOV_MAX):
                self._write_run(run)
                run, size, iovs = [], 0, 0
            run.append(p)
            end = p.rec.offset + _round_up(p.rec.stored_length)
            size += n
            iovs += 3
        if run:
            self._write_run(run)

    def _write_run(self, run: list[_Pending]) -> None:
        """Write adjacent extents of aligned data in one pwritev."""
        units = self._buffer(2 * UNIT_BYTES * len(run), "units")   # each extent's header and last units
        iov = []
        for i, p in enumerate(run):
            iov += self._extent_iov(p.head, p.blob, units[2 * i * UNIT_BYTES:2 * (i + 1) * UNIT_BYTES])
        self._pwritev_all(iov, run[0].rec.offset, sum(v.nbytes for v in iov))
        for p in run:
            p.head = p.blob = None

    def _write_pending(self, p: _Pending) -> None:
        """Write a prepared block's extent (not yet synced); put_many frees the extent on an error."""
        self._write_extent(p.rec.offset, p.head, p.blob)
        p.head = p.blob = None

    def _aligned(self, view: memoryview) -> bool:
        """Whether O_DIRECT can move `view` itself (buffered I/O can always)."""
        return self.io_mode != "direct" or _address(view) % UNIT_BYTES == 0

    def _pwritev_all(self, iov: list, offset: int, total: int, done: int = 0) -> None:
        pos = 0
        while iov:
            n = os.pwritev(self._data_fd, iov, offset + pos)
            if n <= 0:
                raise OSError(errno.EIO, f"tier {self.name}: pwritev returned {n}")
            pos += n
            iov = _advance(iov, n)
            if iov and (offset + pos) % UNIT_BYTES and self.io_mode == "direct":
                # O_DIRECT cannot continue at an unaligned offset; a short write means the
                # filesystem (or RLIMIT_FSIZE) refused the rest
                raise OSError(errno.ENOSPC, f"tier {self.name}: short write ({done + pos} of {total} bytes): "
                                            "disk full or file size limit")

    def _extent_iov(self, head: memoryview | None, blob: memoryview, units: memoryview) -> list:
        """The iovecs of [header unit][data][zero pad to a unit] for data that I/O can move as it is (aligned,
        or buffered I/O); the header unit and the last partial unit are built in `units` (two aligned units)."""
        iov = []
        if head is not None:
            unit = units[:UNIT_BYTES]
            unit[:head.nbytes] = head
            unit[head.nbytes:] = bytes(UNIT_BYTES - head.nbytes)
            iov.append(unit)
        n = blob.nbytes
        padded = _round_up(n) if n or head is None else 0
        main = n - n % UNIT_BYTES if self.io_mode == "direct" else n
        if main:
            iov.append(blob[:main])
        if padded > main:   # the last partial unit, zero-padded
            tail = units[UNIT_BYTES:UNIT_BYTES + padded - main]
            tail[:n - main] = blob[main:]
            tail[n - main:] = bytes(padded - n)
            iov.append(tail)
        return iov

    def _write_extent(self, offset: int, head: memoryview | None, blob: memoryview) -> None:
        """Write [header unit][data][zero pad to a unit] at offset: straight from `blob` when it is
        aligned (or I/O is buffered), else through aligned bounce buffers, chunk by chunk."""
        n = blob.nbytes
        padded = _round_up(n) if n or head is None else 0
        total = (UNIT_BYTES if head is not None else 0) + padded
        units = self._buffer(2 * UNIT_BYTES, "units")
        if self._aligned(blob):
            self._pwritev_all(self._extent_iov(head, blob, units), offset, total)
            return
        iov = self._extent_iov(head, blob[:0], units) if head is not None else []   # the header unit alone
        if iov:   # header unit first, then the data from the next unit
            self._pwritev_all(iov, offset, total)
            offset += UNIT_BYTES
        self._stats["bounce_bytes"] += n
        if padded <= CHUNK_BYTES:
            buf = self._buffer(padded)
            buf[:n] = blob
            buf[n:] = bytes(padded - n)
            self._pwritev_all([buf], offset, total, total - padded)
            return
        # double-buffered: copy chunk i+1 while the writer thread writes chunk i
        bufs = [self._buffer(CHUNK_BYTES, "chunk0"), self._buffer(CHUNK_BYTES, "chunk1")]
        pool = self._writer()
        pending = None
        try:
            for i, pos in enumerate(range(0, padded, CHUNK_BYTES)):
                size = min(CHUNK_BYTES, padded - pos)
                buf = bufs[i % 2][:size]
                have = max(0, min(size, n - pos))
                buf[:have] = blob[pos:pos + have]
                if have < size:
                    buf[have:] = bytes(size - have)
                if pending is not None:
                    pending.result()
                pending = pool.submit(self._pwritev_all, [buf], offset + pos, total, total - padded + pos)
            pending.result()
            pending = None
        finally:
            if pending is not None:   # an error: wait before the buffers can be reused
                try:
                    pending.result()
                except OSError:
                    pass

    def _preadv_all(self, iov: list, offset: int) -> int:
        pos = 0
        while iov:
            n = os.preadv(self._data_fd, iov, offset + pos)
            if n <= 0:
                break  # end of file: the extent is short, the checksum says so
            pos += n
            iov = _advance(iov, n)
        return pos

    def _read_extent(self, rec: _Record) -> memoryview:
        padded = _round_up(rec.stored_length)
        buf = self._buffer(padded)
        pos = self._preadv_all([buf], rec.offset)
        return buf[:min(pos, rec.stored_length)]

    def _read_body_into(self, rec: _Record, dst: memoryview) -> tuple[bytes, bool]:
        """Read a codec-none block's header and data (into dst, straight when it is aligned) and
        verify its checksum: (header, ok)."""
        n = dst.nbytes
        if not self._aligned(dst):
            stored = self._read_extent(rec)
            if stored.nbytes != rec.stored_length:
                return b"", False
            start = UNIT_BYTES if rec.hlen else 0
            head = bytes(stored[:rec.hlen])
            dst[:] = stored[start:start + n]
            self._stats["bounce_bytes"] += n
            return head, _csum([head, dst]) == rec.checksum
        iov = []
        if rec.hlen:
            iov.append(self._buffer(UNIT_BYTES, "head"))
        main = n - n % UNIT_BYTES if self.io_mode == "direct" else n
        if main:
            iov.append(dst[:main])
        tail = None
        if n > main:
            tail = self._buffer(UNIT_BYTES, "tail")
            iov.append(tail)
        want = (UNIT_BYTES if rec.hlen else 0) + n
        got = self._preadv_all(iov, rec.offset)
        if got < want:
            return b"", False
        if tail is not None:
            dst[main:] = tail[:n - main]
        head = bytes(iov[0][:rec.hlen]) if rec.hlen else b""
        return head, _csum([head, dst] if rec.hlen else [dst]) == rec.checksum

    def _lookup(self, key: bytes) -> _Record:
        with self._lock:
            rec = self._index.get(key)
            self._stats["gets"] += 1
            if rec is None:
                self._stats["misses"] += 1
                raise KeyError(key)
            return rec

    def _settle(self, key: bytes, rec: _Record, detail: str | None) -> bool:
        """After reading rec: True to serve what was read, False to read again (the block was
        replaced or deleted meanwhile); raises ChecksumError (block dropped) if it is corrupt."""
        with self._lock:
            if self._index.get(key) is not rec:
                if detail is not None or key in self._index:
                    self._stats["gets"] -= 1   # counted again by the retry
                    return False
            if detail is not None:
                self._drop(key, rec)
                raise ChecksumError(self.name, key, detail)
            self._stats["hits"] += 1
            self._stats["bytes_out"] += rec.length
        return True

    def _fetch(self, key: bytes) -> tuple[bytes, bytes | memoryview]:
        """(header, data) of a block, verified; drops the block on a checksum failure."""
        key = check_key(key)
        self._check_open()
        while True:
            rec = self._lookup(key)
            stored = self._read_extent(rec)
            detail = None
            head, data = b"", None
            if not _stored_ok(rec, stored):
                detail = "stored bytes do not match their checksum"
            elif rec.hlen:
                head, data = stored[:rec.hlen], stored[UNIT_BYTES:]
            else:
                try:
                    if rec.codec != CODEC_IDS["none"] and bytes(stored[:4]) == _QHEAD_MAGIC:
                        hl = int.from_bytes(stored[4:8], "little")   # a quantised block with its header
                        head, stored = stored[8:8 + hl], stored[8 + hl:]
                    data = stored if rec.codec == CODEC_IDS["none"] else self._codec(rec.codec).decode(stored)
                except Exception as e:
                    detail = f"cannot decode ({e})"
                else:
                    if rec.codec != CODEC_IDS["none"] and KINDS[rec.codec] in ("zstd", "lz4") \
                            and checksum(data) != rec.checksum:
                        detail = "decoded bytes do not match their checksum"
            if self._settle(key, rec, detail):
                return bytes(head), data

    def _intact(self, rec: _Record) -> bool:
        """Whether rec's extent holds what rec describes (recovery's check of the last group commit)."""
        if rec.offset + rec.stored_length > os.fstat(self._data_fd).st_size:
            return False
        return _stored_ok(rec, self._read_extent(rec))

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
        head, data = self._fetch(key)
        return b"".join((head, data)) if head else bytes(data)

    def get_into(self, key: bytes, out) -> int:
        """Copy the block (header + data) into `out`; an aligned `out` of a header-less block is read
        into straight from disk."""
        dst = memoryview(out).cast("B")
        with self._lock:
            rec = self._index.get(check_key(key))
        if rec is not None and not rec.hlen and rec.codec == CODEC_IDS["none"]:
            if dst.nbytes < rec.length:
                raise ValueError(f"tier {self.name}: buffer of {dst.nbytes} bytes < block of {rec.length}")
            head, n = self.get_body_into(key, dst)
            if not head:
                return n
            # replaced meanwhile by a block with a header: read that one the general way
        head, data = self._fetch(key)
        data = memoryview(data).cast("B")
        total = len(head) + data.nbytes
        if dst.nbytes < total:
            raise ValueError(f"tier {self.name}: buffer of {dst.nbytes} bytes < block of {total}")
        dst[:len(head)] = head
        dst[len(head):total] = data
        return total

    def get_body_into(self, key: bytes, out) -> tuple[bytes, int]:
        """(header, data length) of a block, its data read into `out` (straight from disk with
        O_DIRECT when `out` is page-aligned: a memfd arena slot), verified; ChecksumError drops it.
        On an error `out` may hold anything."""
        key = check_key(key)
        self._check_open()
        dst = memoryview(out).cast("B")
        while True:
            rec = self._lookup(key)
            n = rec.length - rec.hlen
            if dst.nbytes < n:
                with self._lock:
                    self._stats["gets"] -= 1
                raise ValueError(f"tier {self.name}: buffer of {dst.nbytes} bytes < block of {n}")
            if rec.codec != CODEC_IDS["none"]:
                with self._lock:
                    self._stats["gets"] -= 1   # _fetch counts it
                head, data = self._fetch(key)
                data = memoryview(data).cast("B")
                if dst.nbytes < data.nbytes:
                    raise ValueError(f"tier {self.name}: buffer of {dst.nbytes} bytes < block of {data.nbytes}")
                dst[:data.nbytes] = data
                return head, data.nbytes
            head, ok = self._read_body_into(rec, dst[:n])
            if self._settle(key, rec, None if ok else "stored bytes do not match their checksum"):
                return head, n

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
                    "codec": KINDS[r.codec], "checksum": r.checksum, "seq": r.seq, "header_length": r.hlen}

    def quant_stats(self) -> dict:
        """The quantisation error measured so far (cheap: for status and metrics)."""
        s = self._stats
        n = s["quantised_blocks"]
        return {"codec": self.codec.kind, "error_bound": self.codec.error_bound, "quantised_blocks": n,
                "refused_over_bound": s["quant_refused"], "skipped_no_layout": s["quant_skipped_no_layout"],
                "max_abs": s["quant_max_abs"], "rel_rms_max": s["quant_rel_rms_max"],
                "rel_rms_mean": s["quant_rel_rms_sum"] / n if n else 0.0}

    def stats(self) -> dict:
        out = super().stats()
        n = out.pop("quant_rel_rms_sum")
        out["quant_rel_rms_mean"] = n / out["quantised_blocks"] if out["quantised_blocks"] else 0.0
        out.update(directory=self.directory, codec=self.codec.kind, error_bound=self.codec.error_bound,
                   io_mode=self.io_mode, fsync=self.fsync, flush_mode=self.flush_mode, log_records=self._log_records,
                   log_file_bytes=self._log_size,
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
