"""kvtier.store.NvmeTier: round trips per codec, capacity, corruption, torn index, disk full, EACCES."""
import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from kvtier.store import ChecksumError, Codec, ErrorBoundExceeded, KVLayout, NvmeTier
from kvtier.store.nvme import DATA_FILE, LOG_FILE, REC_BYTES

from test_store_codec import kv_block

PY = sys.executable


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def store_dir():
    # /var/tmp is ext4 here (O_DIRECT works); pytest's tmp_path may be elsewhere
    d = tempfile.mkdtemp(prefix="kvtier-nvme-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("codec", [None, Codec("zstd", level=3), Codec("lz4")], ids=["none", "zstd", "lz4"])
def test_round_trip_reopen(store_dir, codec):
    rng = random.Random(1)
    layout = KVLayout("fp16", 64, 8, 64)
    blobs = {key(i): (kv_block(layout, i) if i % 2 else rng.randbytes(rng.randrange(1, 200_000)))
             for i in range(12)}
    t = NvmeTier("nvme0", store_dir, 64 << 20, codec=codec)
    assert t.stats()["io_mode"] == "direct"
    stored = {k: t.put(k, v) for k, v in blobs.items()}
    if codec is not None and codec.kind == "zstd":  # KV-like fp16 compresses a little with zstd
        assert stored[key(1)] < len(blobs[key(1)])
    for k, v in blobs.items():
        assert t.get(k) == v
    t.put(key(0), b"replaced")
    t.delete(key(2))
    t.close()
    t = NvmeTier("nvme0", store_dir, 64 << 20, codec=codec)
    try:
        assert t.stats()["recovered_blocks"] == 11
        assert t.get(key(0)) == b"replaced" and not t.contains(key(2))
        for i in range(3, 12):
            out = bytearray(len(blobs[key(i)]))
            assert t.get_into(key(i), out) == len(out) and bytes(out) == blobs[key(i)]
    finally:
        t.close()


def test_quantising_tier_reports_error_and_refuses_over_bound(store_dir):
    layout = KVLayout("bf16", 32, 4, 64)
    data = kv_block(layout, 5)
    t = NvmeTier("nvme0", store_dir, 16 << 20, codec=Codec("int8", error_bound=0.02))
    stored = t.put(key(1), data, layout=layout)
    assert stored < len(data) * 0.6
    back = t.get(key(1))
    from kvtier.store import measure_error
    err = measure_error(data, back, layout)
    s = t.stats()
    assert s["quantised_blocks"] == 1 and 0 < s["quant_rel_rms_max"] <= 0.02
    assert s["quant_rel_rms_max"] == pytest.approx(err["rel_rms"])
    t.close()
    t = NvmeTier("nvme0", store_dir, 16 << 20, codec=Codec("int4", error_bound=0.001))
    with pytest.raises(ErrorBoundExceeded):
        t.put(key(2), data, layout=layout)
    assert not t.contains(key(2)) and t.stats()["quant_refused"] == 1
    t.put(key(2), data, lossless=True)  # the caller's fallback
    assert t.get(key(2)) == data
    assert t.get(key(1)) == back  # an int8 block decodes under a tier now configured int4
    t.close()


def test_capacity_never_exceeded_under_churn(store_dir):
    cap = 2 << 20
    t = NvmeTier("nvme0", store_dir, cap, fsync=False, compact_min_records=100)
    rng = random.Random(3)
    live, full = {}, 0
    for _ in range(1500):
        if live and rng.random() < 0.3:
            k = rng.choice(list(live))
            assert t.delete(k)
            del live[k]
            continue
        k = key(rng.randrange(100))
        data = rng.randbytes(rng.choice([100, 4096, 5000, 70_000, 300_000]))
        try:
            t.put(k, data)
            live[k] = data
        except OSError as e:
            assert e.errno == errno.ENOSPC
            full += 1
        assert t.used_bytes <= cap
    assert full > 0
    assert os.path.getsize(os.path.join(store_dir, DATA_FILE)) <= cap
    assert t.stats()["compactions"] >= 1  # 1500 ops on <= 100 keys: the log was compacted
    t.close()
    t = NvmeTier("nvme0", store_dir, cap)
    assert t.used_bytes <= cap and set(t.keys()) == set(live)
    for k, v in live.items():
        assert t.get(k) == v
    t.close()


def test_corrupt_data_detected_dropped_and_stays_dropped(store_dir):
    t = NvmeTier("nvme0", store_dir, 8 << 20, codec=Codec("zstd"))
    t.put(key(1), b"a" * 50_000 + os.urandom(1000))
    t.put(key(2), os.urandom(20_000))
    t.put(key(3), b"c" * 5000)   # the last commit is read back at recovery (see test_store_nvme_flush.py)
    off = t.block_info(key(2))["offset"]
    t.close()
    with open(os.path.join(store_dir, DATA_FILE), "r+b") as f:
        f.seek(off + 777)
        b = f.read(1)
        f.seek(off + 777)
        f.write(bytes([b[0] ^ 0x40]))
    t = NvmeTier("nvme0", store_dir, 8 << 20, codec=Codec("zstd"))
    with pytest.raises(ChecksumError) as info:
        t.get(key(2))
    assert info.value.errno == errno.EIO and not t.contains(key(2))
    assert t.stats()["checksum_failures"] == 1
    assert t.get(key(1))[:10] == b"a" * 10
    t.close()
    t = NvmeTier("nvme0", store_dir, 8 << 20)  # the drop was logged: never served again
    assert not t.contains(key(2)) and t.contains(key(1))
    t.close()


def test_torn_index_tail_ignored(store_dir):
    t = NvmeTier("nvme0", store_dir, 8 << 20)
    for i in range(5):
        t.put(key(i), bytes([i]) * 10_000)
    t.close()
    log = os.path.join(store_dir, LOG_FILE)
    with open(log, "rb") as f:
        raw = f.read()
    assert raw[5 * REC_BYTES:] == bytes(len(raw) - 5 * REC_BYTES) and len(raw) > 5 * REC_BYTES  # zero tail
    with open(log, "r+b") as f:  # the last record half-written: its second half still zeros
        f.seek(4 * REC_BYTES + REC_BYTES // 2)
        f.write(bytes(REC_BYTES // 2))
    t = NvmeTier("nvme0", store_dir, 8 << 20)
    assert sorted(t.keys()) == [key(i) for i in range(4)]
    assert t.stats()["recovery_torn_records"] == 1
    with open(log, "rb") as f:  # the torn record was zeroed: new records follow good ones
        assert f.read()[4 * REC_BYTES:] == bytes(len(raw) - 4 * REC_BYTES)
    t.put(key(9), b"after")
    t.close()
    with open(log, "r+b") as f:  # garbage right after the end
        f.seek(5 * REC_BYTES)
        f.write(os.urandom(REC_BYTES))
    t = NvmeTier("nvme0", store_dir, 8 << 20)
    assert t.get(key(9)) == b"after" and t.get(key(3)) == b"\3" * 10_000
    assert t.stats()["recovery_torn_records"] == 1 and len(t) == 5
    t.close()


def test_log_of_a_newer_format_is_refused_untouched(store_dir):
    """A downgrade: records of a format this version does not know are not torn records to cut off (that would
    drop every block they index); the tier refuses to open and leaves the files as they were."""
    t = NvmeTier("nvme0", store_dir, 8 << 20)
    for i in range(3):
        t.put(key(i), bytes([i]) * 10_000)
    t.close()
    log = os.path.join(store_dir, LOG_FILE)
    with open(log, "r+b") as f:   # the last record as a newer kvtier would write it
        f.seek(2 * REC_BYTES)
        f.write(b"KVI3" + os.urandom(REC_BYTES - 4))
    before = {n: open(os.path.join(store_dir, n), "rb").read() for n in (LOG_FILE, DATA_FILE)}
    with pytest.raises(OSError) as e:
        NvmeTier("nvme0", store_dir, 8 << 20)
    assert e.value.errno == errno.EPROTONOSUPPORT and "KVI3" in str(e.value) and "newer kvtier" in str(e.value)
    assert {n: open(os.path.join(store_dir, n), "rb").read() for n in (LOG_FILE, DATA_FILE)} == before


def test_record_pointing_outside_the_file_dropped(store_dir):
    t = NvmeTier("nvme0", store_dir, 8 << 20)
    t.put(key(1), b"x" * 10_000)
    t.put(key(2), b"y" * 10_000)
    t.close()
    os.truncate(os.path.join(store_dir, DATA_FILE), 8192)  # block 2's data lost
    t = NvmeTier("nvme0", store_dir, 8 << 20)
    assert t.contains(key(1)) is False or t.get(key(1)) == b"x" * 10_000
    assert not t.contains(key(2)) and t.stats()["recovery_dropped_blocks"] >= 1
    t.close()


def test_second_opener_refused(store_dir):
    t = NvmeTier("nvme0", store_dir, 1 << 20)
    with pytest.raises(OSError) as info:
        NvmeTier("nvme0", store_dir, 1 << 20)
    assert info.value.errno == errno.EBUSY
    t.close()


_FSIZE_CHILD = textwrap.dedent("""
    import resource, signal, sys, errno
    from kvtier.store import NvmeTier
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    t = NvmeTier("nvme0", sys.argv[1], 64 << 20)
    resource.setrlimit(resource.RLIMIT_FSIZE, (299_008, 299_008))  # 4 KiB aligned: the next O_DIRECT write gets EFBIG
    acked = []
    for i in range(100):
        try:
            t.put(i.to_bytes(16, "little"), bytes([i]) * 50_000)
            acked.append(i)
        except OSError as e:
            print("ERR", e.errno, len(acked), t.used_bytes, flush=True)
            break
    # the store still works after the error: deletes, smaller puts in freed space
    t.delete((0).to_bytes(16, "little")); acked.remove(0)
    t.put((0).to_bytes(16, "little"), b"small"); acked.append(0)
    print("ACKED", *acked, flush=True)
""")


def test_file_size_limit_gives_error_not_corruption(store_dir):
    p = subprocess.run([PY, "-c", _FSIZE_CHILD, store_dir], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    err_line = next(line for line in p.stdout.splitlines() if line.startswith("ERR"))
    _, code, n_acked, used = err_line.split()
    assert int(code) == errno.EFBIG and int(n_acked) >= 3
    acked = [int(x) for x in p.stdout.split("ACKED")[1].split()]
    t = NvmeTier("nvme0", store_dir, 64 << 20)
    assert sorted(int.from_bytes(k, "little") for k in t.keys()) == sorted(acked)
    for i in acked:
        assert t.get(key(i)) == (b"small" if i == 0 else bytes([i]) * 50_000)
    t.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged uid")
def test_unwritable_directory_eacces(store_dir):
    os.chmod(store_dir, 0o755)
    ro = os.path.join(store_dir, "ro")
    os.mkdir(ro, 0o500)
    child = textwrap.dedent("""
        import os, sys
        from kvtier.store import NvmeTier  # import first: the venv may not be readable by nobody
        os.setgid(65534); os.setuid(65534)
        for d in (sys.argv[1], sys.argv[1] + "/sub"):
            try:
                NvmeTier("nvme0", d, 1 << 20)
            except OSError as e:
                print(e.errno, e)
            else:
                print("opened")
    """)
    p = subprocess.run([PY, "-c", child, ro], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f"{errno.EACCES} ") and "nvme0" in line, line
    assert os.listdir(ro) == []


def test_buffered_fallback_on_tmpfs():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(prefix="kvtier-nvme-", dir="/dev/shm")
    try:
        t = NvmeTier("nvme0", d, 1 << 20)
        s = t.stats()
        if s["io_mode"] == "direct":
            pytest.skip("this tmpfs accepts O_DIRECT (Linux >= 6.6)")
        assert "O_DIRECT" in s["io_note"]
        t.put(key(1), b"z" * 5000)
        assert t.get(key(1)) == b"z" * 5000
        t.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_buffered_mode_when_asked(store_dir):
    t = NvmeTier("nvme0", store_dir, 1 << 20, direct=False)
    assert t.stats()["io_mode"] == "buffered" and t.stats()["io_note"]
    t.put(key(1), b"q" * 9000)
    t.close()
    t = NvmeTier("nvme0", store_dir, 1 << 20)  # the same files reopen with O_DIRECT
    assert t.get(key(1)) == b"q" * 9000
    t.close()


def test_concurrent_threads(store_dir):
    import threading
    t = NvmeTier("nvme0", store_dir, 32 << 20, fsync=False)
    errors = []

    def worker(w):
        rng = random.Random(w)
        try:
            for i in range(60):
                k = key(w * 1000 + i % 10)
                data = rng.randbytes(rng.choice([100, 10_000, 100_000]))
                t.put(k, data)
                assert t.get(k) == data
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(t) == 40 and t.used_bytes <= 32 << 20
    t.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_header_apart_from_data_zero_copy_both_ways(store_dir, direct):
    """put(header=) stores header and data without joining them; get_body_into reads the data into a
    page-aligned buffer (a memfd slot) straight from disk and hands the header back, all verified."""
    import mmap
    t = NvmeTier("nvme0", store_dir, 64 << 20, direct=direct)
    head = b"KVB1" + os.urandom(60)
    sizes = {1: 3 << 20, 2: (1 << 20) + 123, 3: 10, 4: 20 << 20}   # aligned, ragged tail, tiny, chunked
    arena = mmap.mmap(-1, 32 << 20)
    arena[:8 << 20] = os.urandom(8 << 20)
    t.put(key(0), memoryview(arena)[:8 << 20], header=head)   # page-aligned both ways: no bounce buffer
    assert t.get_body_into(key(0), memoryview(arena)[8 << 20:]) == (head, 8 << 20)
    assert arena[8 << 20:16 << 20] == arena[:8 << 20] and getattr(t._tls, "buf", None) is None
    assert t.stats()["bounce_bytes"] == 0
    for i, n in sizes.items():
        data = np.random.default_rng(i).integers(0, 255, n, dtype=np.uint8)
        t.put(key(i), data, header=head)
        assert t.get(key(i)) == head + data.tobytes()
        assert t.get_body_into(key(i), memoryview(arena)) == (head, n)   # aligned: no bounce
        assert arena[:n] == data.tobytes()
        odd = bytearray(n + 1)
        assert t.get_body_into(key(i), memoryview(odd)[1:]) == (head, n)   # unaligned: bounce
        assert odd[1:] == data.tobytes()
        whole = bytearray(n + len(head))
        assert t.get_into(key(i), whole) == n + len(head) and whole == head + data.tobytes()
        assert t.block_info(key(i))["length"] == n + len(head)
    # an unaligned source (bounce copy, chunked for 20 MiB) reads back the same
    src = bytearray(os.urandom((17 << 20) + 5))
    t.put(key(5), memoryview(src)[5:], header=b"h")
    assert t.get(key(5)) == b"h" + bytes(src[5:])
    t.close()
    t = NvmeTier("nvme0", store_dir, 64 << 20, direct=direct)   # the header length is in the index
    assert t.get_body_into(key(2), memoryview(arena))[0] == head
    with pytest.raises(ValueError):
        t.put(key(9), b"x", header=b"h" * 5000)
    t.close()
    arena.close()


def test_header_block_corruption_detected_by_get_body_into(store_dir):
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    t.put(key(1), os.urandom(1 << 20), header=b"meta")
    t.put(key(2), b"last")   # the last commit is read back at recovery: this test is about get's check
    off = t.block_info(key(1))["offset"]
    t.close()
    with open(os.path.join(store_dir, DATA_FILE), "r+b") as f:   # a flipped byte in the data, not the header
        f.seek(off + 4096 + 5000)
        b = f.read(1)
        f.seek(off + 4096 + 5000)
        f.write(bytes([b[0] ^ 1]))
    t = NvmeTier("nvme0", store_dir, 16 << 20)
    import mmap
    buf = mmap.mmap(-1, 1 << 20)
    with pytest.raises(ChecksumError):
        t.get_body_into(key(1), memoryview(buf))
    assert not t.contains(key(1)) and t.stats()["checksum_failures"] == 1
    t.close()


def test_put_many_group_commit(store_dir):
    """One data fdatasync and one log write + fdatasync for the batch; every block recovers."""
    t = NvmeTier("nvme0", store_dir, 64 << 20)
    blobs = {key(i): os.urandom(100_000 + i) for i in range(20)}
    records = t.stats()["log_records"]
    syncs = []
    real = os.fdatasync
    os.fdatasync = lambda fd: (syncs.append(fd), real(fd))[1]
    try:
        stored = t.put_many([(k, v, b"h%d" % i) for i, (k, v) in enumerate(blobs.items())])
    finally:
        os.fdatasync = real
    assert len(syncs) == 2 and len(stored) == 20
    assert t.stats()["log_records"] == records + 20
    t.close()
    t = NvmeTier("nvme0", store_dir, 64 << 20)
    for i, (k, v) in enumerate(blobs.items()):
        assert t.get(k) == b"h%d" % i + v
    # a batch that does not fit stores nothing and leaks no extent
    used = t.used_bytes
    with pytest.raises(OSError) as info:
        t.put_many([(key(100), os.urandom(1 << 20)), (key(101), os.urandom(80 << 20))])
    assert info.value.errno == errno.ENOSPC and not t.contains(key(100)) and t.used_bytes == used
    t.close()


def test_put_many_writes_adjacent_aligned_extents_together(store_dir):
    """A group commit of page-aligned blocks (arena slots) goes out in one pwritev per run of adjacent extents,
    header units and ragged tails included, with no bounce copy; every block reads back, after a reopen too,
    and so do those of a second batch that overwrites freed extents in the committed part of the file."""
    import mmap
    arena = mmap.mmap(-1, 16 << 20)
    arena[:] = os.urandom(16 << 20)
    view = memoryview(arena)
    sizes = [1 << 20, (1 << 20) + 123, 64 << 10, 3 << 20, 4096, 200_000]
    offsets = [i * (4 << 20) // 2 for i in range(len(sizes))]   # page-aligned slots 2 MiB apart
    want = {}
    t = NvmeTier("nvme0", store_dir, 64 << 20)
    calls = []
    real = os.pwritev
    os.pwritev = lambda fd, iov, off: (calls.append(len(iov)), real(fd, iov, off))[1]
    try:
        for batch in range(2):
            items = []
            for i, (n, o) in enumerate(zip(sizes, offsets)):
                k = key(batch * 100 + i)
                head = b"" if i % 3 == 2 else b"hd%d" % i
                items.append((k, view[o:o + n], head))
                want[k] = head + bytes(view[o:o + n])
            calls.clear()
            t.put_many(items)
            assert len(calls) < len(sizes), calls   # (the log is written with pwrite)
            if batch == 0:   # free these extents: the next batch overwrites them (the overlapped commit)
                for k in list(want):
                    assert t.delete(k)
                want.clear()
    finally:
        os.pwritev = real
    assert t.stats()["bounce_bytes"] == 0 and t.stats()["data_syncs_saved"] == 1   # the second: overlapped
    for k, v in want.items():
        assert t.get(k) == v
    t.close()
    t = NvmeTier("nvme0", store_dir, 64 << 20)
    assert len(t) == len(sizes)
    for k, v in want.items():
        assert t.get(k) == v
    t.close()
