"""kvtier.store.MemoryTier on the memfd backend (host) and migrate_to / kmod arenas (guest)."""
import errno
import mmap
import os
import random

import pytest

from kvtier.store import ChecksumError, MemoryTier, Slot, checksum


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def tier():
    t = MemoryTier("dram0", "dram", [0], 4 << 20, backend="memfd")
    yield t
    t.close()


def test_round_trip_and_overwrite(tier):
    blobs = {key(i): os.urandom(random.Random(i).randrange(1, 300_000)) for i in range(10)}
    for k, v in blobs.items():
        assert tier.put(k, v) == len(v)
    for k, v in blobs.items():
        assert tier.contains(k) and tier.get(k) == v
        out = bytearray(len(v) + 10)
        assert tier.get_into(k, memoryview(out)) == len(v) and bytes(out[:len(v)]) == v
    used = tier.used_bytes
    tier.put(key(0), b"short")
    assert tier.get(key(0)) == b"short" and tier.used_bytes < used
    assert sorted(tier.keys()) == sorted(blobs) and len(tier) == 10
    assert tier.delete(key(1)) and not tier.delete(key(1)) and not tier.contains(key(1))
    with pytest.raises(KeyError):
        tier.get(key(1))
    s = tier.stats()
    assert s["puts"] == 11 and s["misses"] == 1 and s["backend"] == "memfd" and s["blocks"] == 9
    with pytest.raises(ValueError):
        tier.put(b"short key", b"x")


def test_capacity_never_exceeded_under_churn(tier):
    rng = random.Random(7)
    live = {}
    enospc = 0
    for step in range(3000):
        k = key(rng.randrange(200))
        if rng.random() < 0.35 and live:
            k = rng.choice(list(live))
            assert tier.delete(k)
            del live[k]
            continue
        data = rng.randbytes(rng.choice([64, 1000, 4096, 65536, 300_000]))
        try:
            tier.put(k, data)
            live[k] = data
        except OSError as e:
            assert e.errno == errno.ENOSPC
            enospc += 1
            # a failed overwrite keeps the old value
            if k in live:
                assert tier.get(k) == live[k]
        assert tier.used_bytes <= tier.capacity_bytes
        assert tier.used_bytes >= sum(len(v) for v in live.values())
    assert enospc > 0, "the churn never filled the tier; the test proves nothing"
    for k, v in live.items():
        assert tier.get(k) == v
    for k in list(live):
        tier.delete(k)
    assert tier.used_bytes == 0
    # everything freed coalesces back into one extent: the whole capacity fits one block again
    tier.put(key(1), b"\1" * tier.capacity_bytes)


@pytest.fixture
def commit_tier():
    t = MemoryTier("dram0", "dram", [0], 4 << 20, backend="memfd", checksum="commit")
    yield t
    t.close()


def test_corruption_detected_and_dropped(commit_tier):
    """checksum="commit": checksummed at commit, verified on every get."""
    tier = commit_tier
    tier.put(key(1), b"a" * 5000)
    slot = tier.locate(key(1))
    tier.view(slot)[100] ^= 0xFF
    with pytest.raises(ChecksumError) as info:
        tier.get(key(1))
    assert info.value.errno == errno.EIO
    assert not tier.contains(key(1))
    with pytest.raises(KeyError):
        tier.get(key(1))
    tier.put(key(2), b"b" * 5000)
    tier.view(tier.locate(key(2)))[0] = 0
    with pytest.raises(ChecksumError):
        tier.get_into(key(2), memoryview(bytearray(5000)))
    assert tier.stats()["checksum_failures"] == 2 and tier.used_bytes == 0


def test_lazy_checksum_recorded_on_demand_then_verified(tier):
    """The default (lazy) commit records no checksum; checksum_of() records one that gets then verify."""
    assert tier.stats()["checksum"] == "lazy"
    tier.put(key(1), b"a" * 5000)
    tier.view(tier.locate(key(1)))[100] ^= 0xFF  # no checksum yet: nothing to catch this with
    assert tier.get(key(1)) == b"a" * 100 + bytes([ord("a") ^ 0xFF]) + b"a" * 4899
    tier.put(key(2), b"b" * 5000)
    assert tier.checksum_of(key(2)) == checksum(b"b" * 5000)  # what a move to NVMe records
    assert tier.verify(key(2))
    tier.view(tier.locate(key(2)))[0] = 0
    assert not tier.verify(key(2)) and not tier.contains(key(2))
    tier.put(key(3), b"c" * 5000)
    assert tier.verify(key(3))  # the first verify records the checksum ...
    tier.view(tier.locate(key(3)))[7] = 0
    with pytest.raises(ChecksumError):  # ... which later gets check
        tier.get_into(key(3), memoryview(bytearray(5000)))
    assert tier.stats()["checksum_failures"] == 2
    with pytest.raises(ValueError):
        MemoryTier("x", "dram", [0], 1 << 20, backend="memfd", checksum="never")


def test_zero_copy_through_a_client_mapping(tier):
    """A client maps the memfd (as it would after SCM_RIGHTS), writes into a reserved slot, reads a located one."""
    (handle,) = tier.arenas()
    assert handle["kind"] == "memfd" and handle["size"] == tier.capacity_bytes
    client_fd = os.dup(handle["fd"])  # what the client holds after receiving the fd
    client = mmap.mmap(client_fd, handle["size"], mmap.MAP_SHARED)
    try:
        payload = os.urandom(100_000)
        slot = tier.reserve(key(5), len(payload))
        assert isinstance(slot, Slot) and slot.arena == 0 and slot.nbytes == len(payload)
        assert not tier.contains(key(5))  # invisible until committed
        client[slot.offset:slot.offset + slot.nbytes] = payload
        tier.commit(key(5))
        assert tier.get(key(5)) == payload and tier.checksum_of(key(5)) == checksum(payload)
        # daemon-side put, client-side read
        tier.put(key(6), b"from the daemon")
        loc = tier.locate(key(6))
        assert client[loc.offset:loc.offset + loc.nbytes] == b"from the daemon"
        # abort gives the space back
        used = tier.used_bytes
        tier.reserve(key(7), 50_000)
        assert tier.used_bytes > used
        tier.abort(key(7))
        assert tier.used_bytes == used and not tier.contains(key(7))
        with pytest.raises(KeyError):
            tier.commit(key(7))
        with pytest.raises(OSError) as info:
            tier.reserve(key(8), tier.capacity_bytes)
        assert info.value.errno == errno.ENOSPC
    finally:
        client.close()
        os.close(client_fd)


def test_node_pages_counts_resident_memory(tier):
    tier.put(key(1), b"\1" * (1 << 20))
    pages = tier.node_pages()
    assert sum(pages.values()) >= (1 << 20) // mmap.PAGESIZE


# ---- guest: real NUMA nodes and kvtier.ko ----

def _memfd_nodes(tier, slot):
    from kvtier import numa
    view = tier.view(slot)
    base = numa.address_of(view)
    addrs = [base + off for off in range(0, slot.nbytes, numa.PAGE_SIZE)]
    return set(numa.move_pages(addrs))


@pytest.mark.guest("numa", "tiered")
def test_migrate_memfd_arena_between_nodes():
    t = MemoryTier("dram0", "dram", [0], 8 << 20, backend="memfd")
    try:
        data = os.urandom(4 << 20)
        t.put(key(1), data)
        slot = t.locate(key(1))
        assert _memfd_nodes(t, slot) == {0}
        moved = t.migrate_to(1)
        assert moved >= len(data)
        assert _memfd_nodes(t, slot) == {1}
        assert t.get(key(1)) == data and t.nodes == [1]
        assert t.stats()["migrated_bytes"] == moved
    finally:
        t.close()


@pytest.mark.guest("numa", "tiered")
def test_kmod_arena_round_trip_and_migrate(kvtier_dev):
    t = MemoryTier("dram0", "dram", [0], 8 << 20, backend="kmod")
    try:
        assert t.backend == "kmod"
        (handle,) = t.arenas()
        assert handle["kind"] == "kvtier"
        data = os.urandom(3 << 20)
        t.put(key(1), data)
        # a second mapping of the region through another fd sees the same bytes (the client's view)
        region = kvtier_dev.attach(handle["region_id"])
        client = kvtier_dev.mmap(region)
        loc = t.locate(key(1))
        assert client[loc.offset:loc.offset + loc.nbytes] == data
        client.close()
        kvtier_dev.release(region.id)
        moved = t.migrate_to(1)
        assert moved >= len(data) // 2
        assert set(t.node_pages()) == {1}
        assert t.get(key(1)) == data
    finally:
        t.close()


def test_large_blocks_start_on_a_page(tier):
    """Blocks of 64 KiB and more are page-aligned (O_DIRECT spills/fills use the slot itself), and the
    alignment slack goes back to the allocator."""
    tier.put(key(1), b"s" * 100)   # knocks the next free offset off a page boundary
    for i in range(2, 6):
        tier.put(key(i), bytes([i]) * (65536 + 1000 * i))
        assert tier.locate(key(i)).offset % mmap.PAGESIZE == 0
        assert tier.get(key(i)) == bytes([i]) * (65536 + 1000 * i)
    assert tier.used_bytes == 128 + sum((65536 + 1000 * i + 63) // 64 * 64 for i in range(2, 6))
    for i in range(1, 6):
        tier.delete(key(i))
    assert tier.used_bytes == 0
    tier.put(key(7), b"\1" * tier.capacity_bytes)   # slack coalesced: the whole capacity fits again


def test_rename_reserved_names_a_placeholder_slot(tier):
    placeholder, real = key(900), key(901)
    slot = tier.reserve(placeholder, 4096)
    tier.view(slot)[:] = b"\x5a" * 4096
    tier.rename_reserved(placeholder, real)
    with pytest.raises(KeyError):
        tier.commit(placeholder)             # the placeholder name is gone
    tier.commit(real)
    assert tier.get(real) == b"\x5a" * 4096 and not tier.contains(placeholder)
    other = tier.reserve(key(902), 4096)
    with pytest.raises(KeyError):
        tier.rename_reserved(key(902), key(902))   # the target name is taken (by itself here)
    tier.abort(key(902))
    with pytest.raises(KeyError):
        tier.rename_reserved(key(903), key(904))   # nothing reserved under that name
    assert other.nbytes == 4096
