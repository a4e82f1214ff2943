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


def test_domains_have_their_own_arenas_and_share_the_capacity():
    """Each domain (a tenant's salt) gets arenas no other domain's blocks go into; the capacity is the tier's;
    an empty domain's arenas close, a holding one's stay."""
    t = MemoryTier("dram0", "dram", [0], 1 << 20, backend="memfd")
    try:
        a = t.reserve(key(1), 600 << 10, domain=b"alpha")
        t.commit(key(1))
        b = t.reserve(key(2), 100 << 10, domain=b"beta")
        t.commit(key(2))
        assert t.domain_arenas(b"alpha") == [a.arena] and t.domain_arenas(b"beta") == [b.arena]
        assert a.arena != b.arena and t.stats()["domains"] == 2
        handles = t.arenas()
        assert handles[a.arena]["fd"] != handles[b.arena]["fd"]
        with pytest.raises(OSError) as e:   # 700 KiB stored: beta's own arena is empty enough, the tier is not
            t.reserve(key(3), 400 << 10, domain=b"beta")
        assert e.value.errno == errno.ENOSPC
        # the bytes of each block are in its domain's memfd only
        t.view(t.locate(key(1)))[:] = b"A" * (600 << 10)
        t.view(t.locate(key(2)))[:] = b"B" * (100 << 10)
        for arena, other in ((a.arena, b"B" * 4096), (b.arena, b"A" * 4096)):
            with mmap.mmap(handles[arena]["fd"], handles[arena]["size"], mmap.MAP_SHARED) as m:
                assert m.find(other) == -1
        assert not t.release_domain(b"beta")   # it stores a block
        t.delete(key(2))
        assert t.release_domain(b"beta") and t.arenas()[b.arena] is None and t.stats()["domains"] == 1
        assert t.get(key(1)) == b"A" * (600 << 10)
        c = t.reserve(key(4), 4096, domain=b"gamma")   # a new domain gets a new arena, never beta's old one
        assert c.arena not in (a.arena, b.arena)
    finally:
        t.close()


def test_resident_memory_stays_bounded_as_domains_churn():
    """Eight domains each fill most of the tier and empty it again: without punching free extents every domain's
    memfd would keep its pages (8x the capacity); the tier keeps resident memory near its capacity and the blocks
    still stored keep their bytes."""
    cap = 16 << 20
    t = MemoryTier("dram0", "dram", [0], cap, backend="memfd")
    blk = 256 << 10
    kept = {}
    try:
        peak = 0
        for d in range(8):
            dom = f"tenant-{d}".encode()
            keys = [key(1000 * d + i) for i in range(40)]   # 10 MiB
            for i, k in enumerate(keys):
                t.put(k, bytes([d + 1]) * blk, domain=dom)
                peak = max(peak, t.resident_bytes())
            kk = key(1000 * d + 999)
            t.put(kk, os.urandom(4096), domain=dom)   # one small block per domain stays
            kept[kk] = t.get(kk)
            for k in keys:
                t.delete(k)
        assert t.stats()["domains"] == 8 and t.stats()["trims"] > 0
        # capacity + its slack + one check interval of allocation (+ a page per arena of rounding)
        assert peak <= cap + cap // 8 + t._trim_check_bytes + 8 * 2 * 4096, peak
        for k, v in kept.items():
            assert t.get(k) == v
        t.trim(force=True)
        assert t.resident_bytes() <= 8 * 2 * 4096   # only the pages the kept blocks touch
        for k, v in kept.items():
            assert t.get(k) == v
    finally:
        t.close()


@pytest.mark.guest("numa", "tiered")
def test_kmod_domains_get_their_own_regions_and_trim_discards(kvtier_dev):
    """On kvtier.ko arenas too: each domain has its own regions, and churn across domains is trimmed by
    KVTIER_IOC_DISCARD (whole region blocks of free space), keeping the regions' resident bytes bounded."""
    cap = 16 << 20
    t = MemoryTier("dram0", "dram", [0], cap, backend="kmod")
    try:
        assert t.backend == "kmod"
        peak = 0
        for d in range(6):
            dom = f"tenant-{d}".encode()
            keys = [key(100 * d + i) for i in range(8)]   # 8 x 1 MiB, of which 1 stays
            for k in keys:
                t.put(k, bytes([d + 1]) * (1 << 20), domain=dom)
                peak = max(peak, t.resident_bytes())
            for k in keys[1:]:
                t.delete(k)
        regions = {t.arenas()[i]["region_id"] for d in range(6) for i in t.domain_arenas(f"tenant-{d}".encode())}
        assert len(regions) == 6 and t.stats()["trims"] > 0
        # without discards this reaches 6 x 8 MiB
        assert peak <= cap + cap // 8 + t._trim_check_bytes + 6 * (2 << 20), peak
        for d in range(6):
            assert t.get(key(100 * d)) == bytes([d + 1]) * (1 << 20)
        t.trim(force=True)
        assert t.resident_bytes() <= 6 * (4 << 20)   # a kept 1 MiB block spans at most two region blocks
        for d in range(6):
            assert t.get(key(100 * d)) == bytes([d + 1]) * (1 << 20)
            t.delete(key(100 * d))
            assert t.release_domain(f"tenant-{d}".encode())
        assert t.resident_bytes() == 0
    finally:
        t.close()


@pytest.mark.guest("numa", "tiered")
def test_kmod_domain_over_max_total_gets_a_memfd_arena(kvtier_dev):
    """kvtier.ko counts every region's full size against max_total_bytes: a second domain whose regions do not fit
    gets a memfd arena (placed with mbind) rather than failing its tenant's hello."""
    cap = kvtier_dev.api()["max_total_bytes"] * 3 // 5 // (2 << 20) * (2 << 20)
    t = MemoryTier("dram0", "dram", [0], cap, backend="kmod")
    try:
        t.put(key(1), b"a" * 4096, domain=b"one")
        t.put(key(2), b"b" * 4096, domain=b"two")
        kinds = {d: {t.arenas()[i]["kind"] for i in t.domain_arenas(d)} for d in (b"one", b"two")}
        assert kinds == {b"one": {"kvtier"}, b"two": {"memfd"}}, kinds
        assert t.get(key(1)) == b"a" * 4096 and t.get(key(2)) == b"b" * 4096
        assert "memfd arena" in t.backend_note
    finally:
        t.close()


@pytest.mark.guest("tiered")
def test_memfd_arena_sits_on_2mib_pages_where_shmem_thp_allows():
    """The tier advises 2 MiB pages for its memfd: with shmem THP "advise" (set here, in the guest's own
    kernel) a put faults its slot in huge pages, which O_DIRECT moves in a few large requests; under the
    default "never" the same tier works on 4 KiB pages."""
    from kvtier.store.memory import SHMEM_THP, shmem_pmd_bytes, shmem_thp_mode

    def set_mode(mode):
        with open(SHMEM_THP, "w") as f:
            f.write(mode)

    old = shmem_thp_mode()
    data = os.urandom(8 << 20)
    try:
        for mode in ("advise", "never"):
            set_mode(mode)
            assert shmem_thp_mode() == mode
            base = shmem_pmd_bytes()
            t = MemoryTier("dram0", "dram", [0], 32 << 20, backend="memfd")
            try:
                t.put(key(1), data)
                huge = shmem_pmd_bytes() - base
                assert t.get(key(1)) == data
            finally:
                t.close()
            if mode == "advise":
                assert huge >= 6 << 20, f"{huge} bytes on 2 MiB pages"
            else:
                assert huge == 0
    finally:
        set_mode(old)
