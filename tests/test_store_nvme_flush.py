"""NvmeTier's index log without journal commits: it is pre-extended with zeros (an append is a pwrite
into them, no size change, so its fdatasync is one device flush); recovery ends the log at the first
zero record, zeroes what follows, and still opens logs written before this layout. A put into the
committed part of the data file costs one flush (the log's), and recovery reads back the last commit's
data, which that one flush did not order before its records."""
import errno
import os
import shutil
import subprocess
import struct
import tempfile
import zlib

import pytest

from kvtier.store import NvmeTier
from kvtier.store.nvme import DATA_FILE, LOG_FILE, LOG_STEP_BYTES, REC_BYTES, UNIT_BYTES


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def block(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


@pytest.fixture
def store_dir():
    d = tempfile.mkdtemp(prefix="kvtier-nvme-", dir="/var/tmp")   # ext4 here: O_DIRECT, real extents
    yield d
    shutil.rmtree(d, ignore_errors=True)


def first_hole(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE)   # ext4 reports unwritten (fallocated) extents as holes too
    finally:
        os.close(fd)


def count_syncs(fn):
    syncs = []
    real = os.fdatasync
    os.fdatasync = lambda fd: (syncs.append(fd), real(fd))[1]
    try:
        fn()
    finally:
        os.fdatasync = real
    return syncs


def test_zero_tail_ends_the_log_and_what_follows_never_revives(store_dir):
    """A record after a zero gap is the unacknowledged rest of a batch cut by a crash: recovery must
    ignore it AND zero it, or a later open would read it once the gap is filled by new records."""
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    t.put(key(0), block(0, 10_000))
    t.put(key(1), block(1, 10_000))
    t.delete(key(0))   # records: put 0, put 1, delete 0
    t.close()
    log = os.path.join(store_dir, LOG_FILE)
    with open(log, "r+b") as f:
        put0 = f.read(REC_BYTES)
        f.seek(4 * REC_BYTES)   # slot 3 stays zero: the end; slot 4 holds a stale put of key 0
        f.write(put0)
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    assert sorted(t.keys()) == [key(1)] and t.stats()["recovery_torn_records"] == 1
    with open(log, "rb") as f:
        assert f.read()[3 * REC_BYTES:5 * REC_BYTES] == bytes(2 * REC_BYTES)   # zeroed on disk
    t.put(key(2), block(2, 10_000))   # slot 3: the gap is filled, slot 4 is next
    t.close()
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    assert sorted(t.keys()) == [key(1), key(2)]   # key 0 stays deleted
    assert t.stats()["recovery_torn_records"] == 0 and t.stats()["log_records"] == 4
    t.put(key(3), block(3, 10_000))
    t.close()
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    assert sorted(t.keys()) == [key(1), key(2), key(3)] and t.get(key(3)) == block(3, 10_000)
    t.close()


def test_store_from_before_the_zero_tail_opens_and_keeps_working(store_dir):
    """Older versions appended to the log: it ends at EOF (no zero tail); the data file may have holes
    (freed extents punched by hand, say). Such a store opens, and new records follow the old ones."""
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    for i in range(6):
        t.put(key(i), block(i, 50_000 + i))
    t.delete(key(1))   # its extent becomes a hole below
    offsets = {i: t.block_info(key(i))["offset"] for i in (0, 2, 3, 4, 5)}
    last_end = max(o + 50_000 + i for i, o in offsets.items())
    freed = t.block_info(key(0))["offset"] + 53_248   # key 1 sits after key 0
    t.close()
    log, data = os.path.join(store_dir, LOG_FILE), os.path.join(store_dir, DATA_FILE)
    os.truncate(log, 7 * REC_BYTES)
    os.truncate(data, -(-last_end // UNIT_BYTES) * UNIT_BYTES)
    # the freed extent of key 1 as a hole, as an old store could have it
    subprocess.run(["fallocate", "--punch-hole", "--keep-size", "--offset", str(freed), "--length", "53248", data],
                   check=True)
    assert first_hole(data) == freed
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    s = t.stats()
    assert s["recovered_blocks"] == 5 and s["recovery_torn_records"] == 0 and s["log_records"] == 7
    for i in (0, 2, 3, 4, 5):
        assert t.get(key(i)) == block(i, 50_000 + i)
    t.put(key(1), block(11, 50_000))
    t.put(key(6), block(6, 2 << 20))   # beyond the old end: grows the file
    t.close()
    assert os.path.getsize(log) == LOG_STEP_BYTES   # extended from the old EOF
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    assert len(t) == 7 and t.get(key(1)) == block(11, 50_000) and t.get(key(6)) == block(6, 2 << 20)
    assert t.stats()["log_records"] == 9 and t.get(key(5)) == block(5, 50_005)
    t.close()


def test_compaction_writes_a_pre_extended_log(store_dir):
    t = NvmeTier("nvme0", store_dir, 16 << 20, compact_min_records=50)
    log = os.path.join(store_dir, LOG_FILE)
    i = 0
    while t.stats()["compactions"] == 0:
        t.put(key(i % 10), block(i, 1000))
        i += 1
    size = os.path.getsize(log)   # just compacted: the new log, zero tail included
    assert size == LOG_STEP_BYTES == t.stats()["log_file_bytes"] and t.stats()["log_records"] == 10
    with open(log, "rb") as f:
        raw = f.read()
    assert raw[10 * REC_BYTES:] == bytes(size - 10 * REC_BYTES)
    assert raw[9 * REC_BYTES:10 * REC_BYTES] != bytes(REC_BYTES)   # the last live record
    extends = t.stats()["log_extends"]
    syncs = count_syncs(lambda: t.put(key(3), block(999, 1000)))   # into a committed extent: the log's flush only
    assert len(syncs) == 1 + (t.flush_mode == "separate") and os.path.getsize(log) == size
    assert t.stats()["log_extends"] == extends
    latest = {}
    for j in range(i, i + 100):   # more compactions, then a restart
        t.put(key(j % 10), block(j, 1000))
        latest[j % 10] = j
    assert t.stats()["compactions"] >= 2
    t.close()
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    assert len(t) == 10 and t.stats()["recovery_torn_records"] == 0
    for k, j in latest.items():
        assert t.get(key(k)) == block(j, 1000)
    t.close()


def test_failed_log_sync_leaves_no_record_behind(store_dir):
    """A put whose log fdatasync fails is not acknowledged and its extent is freed: its record must
    not stay in the log (it would point at an extent reused later)."""
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    t.put(key(1), block(1, 10_000))
    real = os.fdatasync
    calls = []

    def failing(fd):
        calls.append(fd)
        if fd == t._log_fd:
            raise OSError(errno.EIO, "injected")
        real(fd)
    os.fdatasync = failing
    try:
        with pytest.raises(OSError) as info:
            t.put(key(2), block(2, 10_000))
    finally:
        os.fdatasync = real
    assert info.value.errno == errno.EIO and "index log" in str(info.value) and len(calls) == 2
    assert not t.contains(key(2)) and t.stats()["log_records"] == 1
    with open(os.path.join(store_dir, LOG_FILE), "rb") as f:
        raw = f.read()
    assert raw[REC_BYTES:] == bytes(len(raw) - REC_BYTES)
    t.put(key(3), block(3, 10_000))   # takes the freed extent and the zeroed slot
    t.close()
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    assert sorted(t.keys()) == [key(1), key(3)] and t.get(key(3)) == block(3, 10_000)
    t.close()


@pytest.fixture
def small_fs():
    """A 6 MiB tmpfs (O_DIRECT on Linux >= 6.6, else buffered): a really full disk. Needs root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small filesystem")
    d = tempfile.mkdtemp(prefix="kvtier-full-", dir="/var/tmp")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", d], capture_output=True, text=True)
    if p.returncode:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=False)
        os.rmdir(d)


def test_disk_full_is_enospc_and_keeps_what_fit(small_fs):
    cap = 64 << 20   # far more than the disk
    t = NvmeTier("nvme0", small_fs, cap)
    acked = []
    with pytest.raises(OSError) as info:
        for i in range(100):
            t.put(key(i), block(i, 500_000))
            acked.append(i)
    e = info.value
    assert e.errno in (errno.ENOSPC, errno.EFBIG) and "\n" not in str(e)
    assert 8 <= len(acked) < 12   # ~6 MiB of 500 KB blocks, less the pre-extended log
    assert t.used_bytes == len(acked) * 503_808   # the failed put's extent was given back
    t.delete(key(acked[0]))
    t.put(key(99), block(99, 400_000))   # fits in the freed room, already written: an overwrite
    t.close()
    t = NvmeTier("nvme0", small_fs, cap)
    assert sorted(t.keys()) == sorted(key(i) for i in acked[1:] + [99])
    for i in acked[1:]:
        assert t.get(key(i)) == block(i, 500_000)
    assert t.get(key(99)) == block(99, 400_000)
    t.close()


def single_flush(t: NvmeTier) -> None:
    if t.flush_mode != "single":
        pytest.skip(f"{t.directory}: flush mode {t.flush_mode} (single needs O_DIRECT on ext4 or xfs)")


def test_a_put_into_committed_space_costs_one_flush(store_dir):
    """Steady state: the data overwrites extents whose metadata is committed, so the log's fdatasync
    (a device cache flush) covers the data too. A put that grows the file or fills a hole still
    syncs the data file first (its metadata needs the journal commit)."""
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    single_flush(t)
    log_fd = t._log_fd
    syncs = count_syncs(lambda: t.put(key(0), block(0, 1 << 20)))   # grows the file
    assert len(syncs) == 2 and syncs[-1] == log_fd
    t.put(key(1), block(1, 1 << 20))
    t.delete(key(0))
    syncs = count_syncs(lambda: t.put(key(2), block(2, 1 << 20)))   # key 0's committed extent
    assert syncs == [log_fd] and t.block_info(key(2))["offset"] == 0
    syncs = count_syncs(lambda: t.put_many([(key(2), block(3, 300_000)), (key(4), block(4, 300_000))]))
    assert len(syncs) == 2   # key 2's new extent lies past the committed end: data sync, then the log's
    t.delete(key(1))
    syncs = count_syncs(lambda: t.put_many([(key(5), block(5, 200_000), b"h"), (key(6), block(6, 500_000))]))
    assert syncs == [log_fd]
    s = t.stats()
    assert s["flush_mode"] == "single" and s["data_syncs_saved"] == 2 and s["data_syncs"] == 3
    t.close()
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    assert t.get(key(5)) == b"h" + block(5, 200_000) and t.get(key(6)) == block(6, 500_000)
    assert t.get(key(2)) == block(3, 300_000) and sorted(t.keys()) == [key(2), key(4), key(5), key(6)]
    t.close()
    t = NvmeTier("nvme0", store_dir, 32 << 20, direct=False)   # buffered: the data's pages need their own sync
    assert t.flush_mode == "separate"
    t.delete(key(6))
    assert len(count_syncs(lambda: t.put(key(7), block(7, 1000)))) == 2
    t.close()


def test_the_log_write_overlaps_the_data_write_and_a_crash_between_is_cut(store_dir):
    """In committed space the records are written (and their writeback started) before the data, so the
    log's device write overlaps the data's; the commit stays the last one until its flush, so a kill -9
    after its records and before its data leaves a commit that recovery reads back and cuts."""
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    single_flush(t)
    t.put(key(0), block(0, 1 << 20))
    t.put(key(1), block(1, 1 << 20))
    t.delete(key(1))   # its extent, committed and free, takes key 0's next version
    order = []
    for name in ("_log_write", "_write_pending", "_log_commit"):
        real = getattr(t, name)
        setattr(t, name, lambda *a, _n=name, _r=real: (order.append(_n), _r(*a))[1])
    t.put(key(2), block(2, 1 << 20))
    assert order == ["_log_write", "_write_pending", "_log_commit"]
    assert t.stats()["log_writeback_early"] == 1 and t.get(key(2)) == block(2, 1 << 20)
    t.delete(key(2))
    t.close()
    pid = os.fork()
    if pid == 0:   # the child dies after the records of key 0's overwrite, before its data
        try:
            c = NvmeTier("nvme0", store_dir, 32 << 20)
            c._write_pending = lambda p: os._exit(0)
            c.put(key(0), block(10, 1 << 20))
        finally:
            os._exit(3)
    assert os.waitpid(pid, 0)[1] == 0
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    assert t.stats()["recovery_unflushed_records"] == 1
    assert t.get(key(0)) == block(0, 1 << 20) and t.keys() == [key(0)]
    t.close()


def lose_the_data(store_dir: str, offset: int, nbytes: int) -> None:
    """What a power loss before the flush can leave: the record on disk, the extent's old bytes."""
    with open(os.path.join(store_dir, DATA_FILE), "r+b") as f:
        f.seek(offset)
        f.write(bytes(nbytes))


def test_a_commit_whose_data_did_not_land_is_cut_and_the_old_version_serves(store_dir):
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    t.put(key(0), block(0, 100_000))
    t.put(key(1), block(1, 100_000))
    t.put(key(0), block(10, 100_000))   # the overwrite's record lands, its data does not
    info = t.block_info(key(0))
    t.close()
    lose_the_data(store_dir, info["offset"], 100_000)
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    s = t.stats()
    assert s["recovery_unflushed_records"] == 1 and s["log_records"] == 2
    assert t.get(key(0)) == block(0, 100_000) and t.get(key(1)) == block(1, 100_000)
    with open(os.path.join(store_dir, LOG_FILE), "rb") as f:
        assert f.read(4 * REC_BYTES)[2 * REC_BYTES:] == bytes(2 * REC_BYTES)   # cut on disk too
    t.put(key(2), block(2, 100_000))   # takes the cut record's place; the old version's extent is intact
    t.close()
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    assert [t.get(key(i)) for i in range(3)] == [block(i, 100_000) for i in range(3)]
    assert t.stats()["recovery_unflushed_records"] == 0
    t.close()


def test_a_batch_is_cut_from_its_first_block_whose_data_did_not_land(store_dir):
    """Only the last commit is read back (every earlier one was flushed before the next was written);
    of it, the blocks before the first bad one stay, each intact."""
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    t.put(key(9), block(9, 70_000))
    t.put_many([(key(i), block(i, 70_000)) for i in range(3)])
    t.put_many([(key(0), block(20, 70_000)), (key(3), block(3, 70_000)), (key(4), block(4, 70_000), b"hd"),
                (key(1), block(21, 70_000))])
    lost = t.block_info(key(4))
    t.close()
    lose_the_data(store_dir, lost["offset"] + UNIT_BYTES, 4096)   # a page of its data, past its header unit
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    assert t.stats()["recovery_unflushed_records"] == 2 and not t.contains(key(4))
    assert t.get(key(0)) == block(20, 70_000) and t.get(key(3)) == block(3, 70_000)
    assert t.get(key(1)) == block(1, 70_000)   # cut with the rest: its previous version serves
    assert t.get(key(9)) == block(9, 70_000) and t.get(key(2)) == block(2, 70_000)
    t.close()


def test_records_from_before_the_batch_index_still_open(store_dir):
    """KVI1 records (older versions) carry no batch index: each counts as its own commit."""
    from kvtier.store.nvme import _REC, _REC1, _MAGIC1
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    t.put_many([(key(i), block(i, 30_000)) for i in range(4)])
    t.delete(key(2))
    t.close()
    log = os.path.join(store_dir, LOG_FILE)
    with open(log, "r+b") as f:
        raw = f.read(5 * REC_BYTES)
        old = b""
        for pos in range(0, len(raw), REC_BYTES):
            fields = _REC.unpack_from(raw, pos)
            body = _REC1.pack(_MAGIC1, *fields[1:-1])
            old += body + struct.pack("<II", zlib.crc32(body), 0)
        f.seek(0)
        f.write(old)
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    assert sorted(t.keys()) == [key(0), key(1), key(3)] and t.get(key(3)) == block(3, 30_000)
    assert t.stats()["recovery_torn_records"] == 0 and t.stats()["log_records"] == 5
    t.put(key(5), block(5, 30_000))
    t.close()
    t = NvmeTier("nvme0", store_dir, 32 << 20)
    assert len(t) == 4 and t.get(key(5)) == block(5, 30_000)
    t.close()
