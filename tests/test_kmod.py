"""kvtier.ko in the guest: every ioctl's success and error paths, mmap and faults, residency,
migration between nodes under concurrent readers and writers, sharing, access control, and
load/use/unload with every page returned.

Run: tools/vmtest --topology tiered -- .venv/bin/python -m pytest -q -m guest tests/test_kmod.py
(also numa and plain). The session fixture in conftest.py loads the module and, at the end,
unloads it and checks that the module's counters and each node's MemFree came back.
"""
import errno
import json
import mmap
import os
import random
import signal
import stat
import struct
import threading
import time

import pytest

PAGE = mmap.PAGESIZE
MIGRATION_TOPOLOGIES = ("numa", "tiered")

pytestmark = pytest.mark.usefixtures("kvtier_module")


# ---- helpers ----------------------------------------------------------------------------------

def kmod():
    from kvtier import kmod as module
    return module


def memory_nodes():
    """Nodes with memory, e.g. [0] or [0, 1] (from /sys/devices/system/node/has_memory)."""
    nodes = []
    for part in open("/sys/devices/system/node/has_memory").read().strip().split(","):
        lo, _, hi = part.partition("-")
        nodes.extend(range(int(lo), int(hi or lo) + 1))
    return nodes


def far_node():
    return memory_nodes()[-1]


def errno_of(fn, *args, **kwargs):
    """The errno fn raises (OSError), or 0 when it succeeds."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno
    return 0


def page_content(index, version):
    """A page that names itself: (index, version) repeated, so a torn or stale page shows."""
    return struct.pack("<QQ", index, version) * (PAGE // 16)


def page_version(buf, index):
    """The version stored in page `index` of buf; asserts the page is whole and its own."""
    data = bytes(buf[index * PAGE:(index + 1) * PAGE])
    idx, version = struct.unpack_from("<QQ", data)
    assert idx == index and data == page_content(index, version), (
        f"page {index} is torn or foreign: header {(idx, version)}")
    return version


def in_child(fn, uid=None):
    """Run fn() in a forked child (optionally as uid); returns (wait status, fn's JSON result)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(rfd)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            result, code = f"{type(exc).__name__}: {exc}", 1
        try:
            os.write(wfd, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    return status, (json.loads(data) if data else None)


def write_quietly(view, offset):
    """One byte written into a mapping, without pytest's faulthandler dumping a SIGBUS traceback."""
    import faulthandler

    faulthandler.disable()
    view[offset:offset + 1] = b"x"


def raw_struct(ctype):
    return kmod().ffi.new(ctype)


def read_sysfs(name):
    return int(open(f"/sys/kernel/kvtier/{name}").read())


# ---- handshake, unknown commands, bad pointers ------------------------------------------------

@pytest.mark.guest
def test_api_handshake(kvtier_dev):
    k = kmod()
    api = kvtier_dev.api()
    assert api["api_version"] == k.API_VERSION
    assert api["page_size"] == PAGE
    for feature in ("FEATURE_MIGRATE", "FEATURE_SHARE", "FEATURE_GRANT", "FEATURE_MOVABLE_NODES"):
        assert api["features"] & getattr(k, feature), feature
    # Every command this header defines is announced, and nothing beyond it.
    numbers = {cmd & 0xFF for cmd in k.IOCTLS}
    assert api["ioctls"] == sum(1 << n for n in numbers)
    assert api["max_nodes"] == k.MAX_NODES
    assert api["max_region_bytes"] > 0 and api["max_total_bytes"] > 0


@pytest.mark.guest
def test_unknown_commands_enotty(kvtier_dev):
    k = kmod()
    buf = raw_struct("char[4096]")
    ioc_read = 2 << 30
    for cmd in (0, 0x1234, (ioc_read | (8 << 16) | (k.IOC_MAGIC << 8) | 0x7F),
                (ioc_read | (8 << 16) | (0xDB << 8) | 0x00),
                # right number, wrong size or direction: a different command
                k.IOC_API ^ (1 << 16), k.IOC_STATS & ~(3 << 30)):
        assert kvtier_dev.raw_ioctl(cmd, buf) == -errno.ENOTTY, hex(cmd)


@pytest.mark.guest
def test_bad_pointers_efault(kvtier_dev):
    k = kmod()
    for cmd in k.IOCTLS:
        for ptr in (0, 1, 0xFFFF_FFFF_FFFF_F000):
            assert kvtier_dev.raw_ioctl(cmd, ptr) == -errno.EFAULT, (k.IOCTLS[cmd], hex(ptr))
    region = kvtier_dev.create_region(4 * PAGE, PAGE, node=0)
    q = raw_struct("struct kvtier_block_query *")
    q.region_id, q.first_block, q.nr_blocks, q.entries_ptr = region.id, 0, 4, 8
    assert kvtier_dev.raw_ioctl(k.IOC_BLOCK_QUERY, q) == -errno.EFAULT


# ---- region create / attach / release / info ---------------------------------------------------

@pytest.mark.guest
def test_create_rejects_bad_requests(kvtier_dev):
    k = kmod()
    api = kvtier_dev.api()
    mb = 1 << 20
    cases = {
        "zero size": dict(size_bytes=0, block_bytes=PAGE),
        "zero block": dict(size_bytes=mb, block_bytes=0),
        "block not page multiple": dict(size_bytes=mb, block_bytes=PAGE + 512),
        "size not block multiple": dict(size_bytes=mb + PAGE, block_bytes=2 * PAGE),
        "huge block": dict(size_bytes=1 << 30, block_bytes=1 << 30),
        "negative node": dict(size_bytes=mb, block_bytes=PAGE, node=-1),
        "no such node": dict(size_bytes=mb, block_bytes=PAGE, node=k.MAX_NODES - 1),
        "node out of range": dict(size_bytes=mb, block_bytes=PAGE, node=1 << 20),
        "unknown flag": dict(size_bytes=mb, block_bytes=PAGE, flags=1 << 7),
        "bad block type": dict(size_bytes=mb, block_bytes=PAGE, tags={"block_type": k.BLOCK_TYPE_MAX + 1}),
        "bad priority": dict(size_bytes=mb, block_bytes=PAGE, tags={"priority": k.PRIO_MAX + 1}),
    }
    for name, kw in cases.items():
        kw.setdefault("node", 0)
        assert errno_of(kvtier_dev.create_region, **kw) == errno.EINVAL, name
    c = raw_struct("struct kvtier_region_create *")
    c.size_bytes, c.block_bytes, c.node, c.pad = mb, PAGE, 0, 1
    assert kvtier_dev.raw_ioctl(k.IOC_REGION_CREATE, c) == -errno.EINVAL
    assert errno_of(kvtier_dev.create_region, api["max_region_bytes"] + (2 << 20), 2 << 20, 0) == errno.E2BIG
    # The global cap: unpopulated regions reserve their size, so two big ones exceed it.
    size = min(api["max_region_bytes"], api["max_total_bytes"]) // (2 << 20) * (2 << 20)
    if 2 * size > api["max_total_bytes"]:
        big = kvtier_dev.create_region(size, 2 << 20, 0)
        assert errno_of(kvtier_dev.create_region, size, 2 << 20, 0) == errno.ENOSPC
        kvtier_dev.release(big.id)
    assert kvtier_dev.stats()["regions"] == 0


@pytest.mark.guest
def test_create_attach_release_info(kvtier_dev):
    k = kmod()
    tags = k.Tags(tenant_id=7, session_id=42, layer_first=2, layer_count=4, head_first=1, head_count=8,
                  block_type=k.BLOCK_HISTORY, priority=k.PRIO_DECODE)
    regions_before = read_sysfs("regions")
    region = kvtier_dev.create_region(1 << 20, 64 << 10, node=0, tags=tags)
    assert region.id > 0 and region.mmap_offset == region.id << k.MMAP_SHIFT
    assert read_sysfs("regions") == regions_before + 1
    info = kvtier_dev.info(region.id)
    assert info["size_bytes"] == 1 << 20 and info["block_bytes"] == 64 << 10 and info["nr_blocks"] == 16
    assert info["owner_uid"] == os.geteuid() and info["node"] == 0
    assert info["tags"] == tags.as_dict()
    assert info["resident_bytes"] == 0 and info["node_bytes"] == {}

    with k.Device() as other:
        attached = other.attach(region.id)
        assert attached == region
        assert errno_of(other.attach, region.id) == errno.EEXIST
        kvtier_dev.release(region.id)
        assert errno_of(kvtier_dev.release, region.id) == errno.ENOENT
        assert read_sysfs("regions") == regions_before + 1, "the other fd still holds it"
        assert other.info(region.id)["size_bytes"] == 1 << 20
    # closing the last fd freed it
    assert read_sysfs("regions") == regions_before
    for fn in (kvtier_dev.info, kvtier_dev.attach, kvtier_dev.query):
        assert errno_of(fn, region.id) == errno.ENOENT
    assert errno_of(kvtier_dev.info, 0) == errno.ENOENT
    assert errno_of(kvtier_dev.info, 1 << 60) == errno.ENOENT
    a = raw_struct("struct kvtier_region_attach *")
    a.region_id, a.pad = 1, 1
    assert kvtier_dev.raw_ioctl(k.IOC_REGION_ATTACH, a) == -errno.EINVAL


# ---- mmap and faults ------------------------------------------------------------------------------

@pytest.mark.guest
def test_mmap_rules(kvtier_dev):
    k = kmod()
    region = kvtier_dev.create_region(1 << 20, 64 << 10, node=0)
    fd = kvtier_dev.fileno()
    with pytest.raises(OSError) as exc:  # a private mapping would copy-on-write away from us
        mmap.mmap(fd, PAGE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=region.mmap_offset)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        mmap.mmap(fd, (1 << 20) + PAGE, mmap.MAP_SHARED, offset=region.mmap_offset)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        mmap.mmap(fd, PAGE, mmap.MAP_SHARED, offset=region.mmap_offset + (1 << 20))
    assert exc.value.errno == errno.EINVAL
    with k.Device() as other:  # an fd that neither created nor attached the region
        with pytest.raises(OSError) as exc:
            other.mmap(region)
        assert exc.value.errno == errno.EACCES
    tail = kvtier_dev.mmap(region, length=PAGE, offset=(1 << 20) - PAGE)
    tail[:4] = b"tail"
    full = kvtier_dev.mmap(region)
    assert bytes(full[(1 << 20) - PAGE:(1 << 20) - PAGE + 4]) == b"tail"
    tail.close()
    full.close()


@pytest.mark.guest
def test_faults_populate_and_residency(kvtier_dev):
    k = kmod()
    block = 64 << 10
    region = kvtier_dev.create_region(16 * block, block, node=0)
    buf = kvtier_dev.mmap(region)
    assert all(s.node == k.NODE_NONE and s.flags == 0 for s in kvtier_dev.query(region.id))
    assert bytes(buf[:PAGE]) == bytes(PAGE)  # zero-filled on first touch
    buf[block:block + 4] = b"abcd"  # block 1, first page
    for off in range(2 * block, 3 * block, PAGE):  # block 2 entirely
        buf[off] = 1
    states = kvtier_dev.query(region.id)
    assert states[0].partial and states[0].node == 0
    assert states[1].partial and states[1].faults >= 1
    assert states[2].populated and not states[2].partial and states[2].faults >= block // PAGE
    assert states[3].node == k.NODE_NONE
    info = kvtier_dev.info(region.id)
    assert info["resident_bytes"] == 2 * PAGE + block
    assert info["node_bytes"] == {0: 2 * PAGE + block}
    assert info["faults"] >= 2 + block // PAGE
    # a second mapping (another fd) sees the same pages
    with k.Device() as other:
        view = other.mmap(other.attach(region.id))
        assert bytes(view[block:block + 4]) == b"abcd"
        view[5 * block] = 9
        assert buf[5 * block] == 9
        view.close()
    q = kvtier_dev.query(region.id, 15, 1)
    assert len(q) == 1
    for first, nr in ((16, 1), (0, 17), (0, 0), (0xFFFF_FFFF, 2)):
        assert errno_of(kvtier_dev.query, region.id, first, nr) == errno.EINVAL, (first, nr)
    buf.close()


@pytest.mark.guest
def test_populate_flag_and_region_outlives_fd(kvtier_module):
    k = kmod()
    allocated = read_sysfs("allocated_bytes")
    regions = read_sysfs("regions")
    dev = k.Device()
    region = dev.create_region(1 << 20, 256 << 10, node=0, flags=k.CREATE_POPULATE)
    assert all(s.populated and s.node == 0 for s in dev.query(region.id))
    assert read_sysfs("allocated_bytes") == allocated + (1 << 20)
    buf = dev.mmap(region)
    buf[:3] = b"xyz"
    dev.close()  # the mapping keeps the region
    assert read_sysfs("regions") == regions + 1
    assert bytes(buf[:3]) == b"xyz"
    buf.close()
    assert read_sysfs("regions") == regions
    assert read_sysfs("allocated_bytes") == allocated


@pytest.mark.guest
def test_discard_frees_pages_and_unmaps_them_everywhere(kvtier_dev):
    """DISCARD gives a block's pages back (allocated_bytes drops by exactly them) and unmaps them in every
    mapping: a second mapping then reads zeros (first touch, read or write, allocates a zeroed page again).
    A shared block keeps the pages its sharer still uses; bad ranges are EINVAL."""
    k = kmod()
    block = 8 * PAGE
    region = kvtier_dev.create_region(4 * block, block, node=0)
    buf = kvtier_dev.mmap(region)
    other_dev = k.Device()   # another process's view: its own fd and mapping
    other = other_dev.mmap(other_dev.attach(region.id))
    for p in range(4 * block // PAGE):
        buf[p * PAGE:(p + 1) * PAGE] = page_content(p, 1)
    assert page_version(other, 9) == 1
    before = read_sysfs("allocated_bytes")
    kvtier_dev.discard(region.id, 1, 2)
    assert read_sysfs("allocated_bytes") == before - 2 * block
    assert [s.populated for s in kvtier_dev.query(region.id)] == [True, False, False, True]
    assert bytes(other[block:3 * block]) == bytes(2 * block)   # zeros, through the old mapping too
    assert page_version(other, 0) == 1 and page_version(other, 3 * block // PAGE) == 1
    assert read_sysfs("allocated_bytes") == before   # those reads faulted zeroed pages in again
    buf[block:block + PAGE] = page_content(block // PAGE, 2)
    assert page_version(other, block // PAGE) == 2
    kvtier_dev.discard(region.id, 2, 1)   # nothing there: a no-op
    # a block sharing its pages drops only its own reference
    src = kvtier_dev.create_region(block, block, node=0)
    sbuf = kvtier_dev.mmap(src)
    sbuf[:PAGE] = page_content(0, 7)
    kvtier_dev.share(region.id, 3, src.id, 0, 1)
    kvtier_dev.discard(region.id, 3, 1)
    assert page_version(sbuf, 0) == 7 and bytes(other[3 * block:3 * block + 16]) == bytes(16)
    assert not kvtier_dev.query(region.id, 3, 1)[0].shared
    for first, nr in ((4, 1), (0, 5), (0, 0), (0xFFFF_FFFF, 2)):
        assert errno_of(kvtier_dev.discard, region.id, first, nr) == errno.EINVAL, (first, nr)
    assert kvtier_dev.api()["features"] & k.FEATURE_DISCARD
    sbuf.close()
    other.close()
    other_dev.close()
    buf.close()


# ---- tags ----------------------------------------------------------------------------------------

@pytest.mark.guest
def test_set_tags_region_and_blocks(kvtier_dev):
    k = kmod()
    region = kvtier_dev.create_region(8 * PAGE, PAGE, node=0,
                                      tags=k.Tags(tenant_id=3, session_id=1, block_type=k.BLOCK_PREFIX))
    kvtier_dev.set_tags(region.id, {"session_id": 99, "layer_first": 4, "layer_count": 2,
                                    "priority": k.PRIO_DECODE})
    tags = kvtier_dev.info(region.id)["tags"]
    assert tags["session_id"] == 99 and tags["layer_first"] == 4 and tags["layer_count"] == 2
    assert tags["priority"] == k.PRIO_DECODE and tags["tenant_id"] == 3
    assert tags["block_type"] == k.BLOCK_PREFIX, "not in the mask: unchanged"
    kvtier_dev.set_tags(region.id, {"block_type": k.BLOCK_GENERATED, "priority": k.PRIO_IDLE},
                        first_block=2, nr_blocks=3)
    states = kvtier_dev.query(region.id)
    assert [s.block_type for s in states] == [k.BLOCK_PREFIX] * 2 + [k.BLOCK_GENERATED] * 3 + [k.BLOCK_PREFIX] * 3
    assert [s.priority for s in states] == [k.PRIO_NORMAL] * 2 + [k.PRIO_IDLE] * 3 + [k.PRIO_NORMAL] * 3
    bad = [
        dict(tags={"session_id": 1}, mask=0),
        dict(tags={"session_id": 1}, mask=1 << 9),
        dict(tags={"block_type": k.BLOCK_TYPE_MAX + 1}),
        dict(tags={"priority": k.PRIO_MAX + 1}, first_block=0, nr_blocks=1),
        dict(tags={"session_id": 5}, mask=k.TAG_SESSION, first_block=0, nr_blocks=1),
        dict(tags={"priority": 1}, first_block=7, nr_blocks=2),
        dict(tags={"priority": 1}, first_block=1, nr_blocks=0),
    ]
    for kw in bad:
        assert errno_of(kvtier_dev.set_tags, region.id, **kw) == errno.EINVAL, kw
    t = raw_struct("struct kvtier_set_tags *")
    t.region_id, t.mask, t.pad = region.id, k.TAG_SESSION, 1
    assert kvtier_dev.raw_ioctl(k.IOC_SET_TAGS, t) == -errno.EINVAL
    assert kvtier_dev.info(region.id)["tags"]["tenant_id"] == 3


# ---- migration ------------------------------------------------------------------------------------

@pytest.mark.guest(*MIGRATION_TOPOLOGIES)
def test_migrate_content_residency_counters(kvtier_dev):
    k = kmod()
    far = far_node()
    block = 256 << 10
    nr_blocks = 16
    region = kvtier_dev.create_region(nr_blocks * block, block, node=0)
    buf = kvtier_dev.mmap(region)
    pages = nr_blocks * block // PAGE
    for p in range(pages - block // PAGE):  # the last block stays empty
        buf[p * PAGE:(p + 1) * PAGE] = page_content(p, 1)
    stats0 = kvtier_dev.stats()
    bytes_moved, blocks_moved = kvtier_dev.migrate(region.id, 0, 8, far)
    assert (bytes_moved, blocks_moved) == (8 * block, 8)
    states = kvtier_dev.query(region.id)
    assert [s.node for s in states] == [far] * 8 + [0] * 7 + [k.NODE_NONE]
    assert all(s.migrations == 1 for s in states[:8]) and all(s.migrations == 0 for s in states[8:])
    for p in range(pages - block // PAGE):
        assert page_version(buf, p) == 1
    info = kvtier_dev.info(region.id)
    assert info["node_bytes"] == {0: 7 * block, far: 8 * block}
    assert info["migrations"] == 8 and info["migrated_bytes"] == 8 * block
    stats1 = kvtier_dev.stats()
    assert stats1["migrated_bytes"] - stats0["migrated_bytes"] == 8 * block
    far_in0 = stats0["nodes"].get(far, {}).get("migrated_in_bytes", 0)
    assert stats1["nodes"][far]["migrated_in_bytes"] - far_in0 == 8 * block
    assert stats1["nodes"][0]["migrated_out_bytes"] - stats0["nodes"][0]["migrated_out_bytes"] == 8 * block
    assert int(open(f"/sys/kernel/kvtier/nodes/node{far}/migrated_in_bytes").read()) == \
        stats1["nodes"][far]["migrated_in_bytes"]
    # already there: nothing to do
    assert kvtier_dev.migrate(region.id, 0, 8, far) == (0, 0)
    # writes after the move land on the new pages and survive the way back
    for p in range(0, 8 * block // PAGE):
        buf[p * PAGE:(p + 1) * PAGE] = page_content(p, 2)
    assert kvtier_dev.migrate(region.id, 0, nr_blocks, 0) == (8 * block, 8)
    for p in range(pages - block // PAGE):
        assert page_version(buf, p) == (2 if p < 8 * block // PAGE else 1)
    # an empty block moved with POPULATE gets zeroed pages on the target
    assert kvtier_dev.migrate(region.id, nr_blocks - 1, 1, far, flags=k.MIGRATE_POPULATE) == (0, 1)
    last = kvtier_dev.query(region.id, nr_blocks - 1, 1)[0]
    assert last.populated and last.node == far
    assert bytes(buf[(nr_blocks - 1) * block:]) == bytes(block)
    buf.close()


@pytest.mark.guest
def test_migrate_rejects_bad_requests(kvtier_dev):
    k = kmod()
    region = kvtier_dev.create_region(4 * PAGE, PAGE, node=0)
    for first, nr, node, flags in ((0, 0, 0, 0), (3, 2, 0, 0), (0xFFFF_FFFF, 1, 0, 0), (0, 1, -1, 0),
                                   (0, 1, k.MAX_NODES, 0), (0, 1, 0, 1 << 5)):
        assert errno_of(kvtier_dev.migrate, region.id, first, nr, node, flags) == errno.EINVAL
    m = raw_struct("struct kvtier_migrate *")
    m.region_id, m.nr_blocks, m.pad = region.id, 1, 3
    assert kvtier_dev.raw_ioctl(k.IOC_MIGRATE, m) == -errno.EINVAL
    assert errno_of(kvtier_dev.migrate, region.id + 1000, 0, 1, 0) == errno.ENOENT


@pytest.mark.guest(*MIGRATION_TOPOLOGIES)
def test_concurrent_readers_writers_during_migration(kvtier_dev):
    """Writer threads bump per-page versions, readers check every page they read is whole and never
    older than before, while the main thread migrates ranges back and forth. Afterwards every
    acknowledged write must be there."""
    far = far_node()
    block = 128 << 10
    nr_blocks = 32
    region = kvtier_dev.create_region(nr_blocks * block, block, node=0)
    buf = kvtier_dev.mmap(region)
    pages = nr_blocks * block // PAGE
    acked = [0] * pages
    for p in range(pages):
        buf[p * PAGE:(p + 1) * PAGE] = page_content(p, 0)
    stop = threading.Event()
    errors = []

    def writer(first):
        rng = random.Random(first)
        try:
            while not stop.is_set():
                p = rng.randrange(first, pages, 2)
                version = acked[p] + 1
                buf[p * PAGE:(p + 1) * PAGE] = page_content(p, version)
                acked[p] = version
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader(seed):
        rng = random.Random(seed)
        seen = [0] * pages
        try:
            while not stop.is_set():
                p = rng.randrange(pages)
                version = page_version(buf, p)
                assert version >= seen[p], f"page {p} went back from {seen[p]} to {version}"
                seen[p] = version
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=reader, args=(100 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    moved_total = 0
    rng = random.Random(1)
    try:
        for i in range(30):
            node = far if i % 2 == 0 else 0
            first = rng.randrange(nr_blocks)
            nr = rng.randrange(1, nr_blocks - first + 1) if i % 3 else nr_blocks - first
            moved, _ = kvtier_dev.migrate(region.id, first, nr, node)
            moved_total += moved
            if errors:
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert moved_total > 0
    kvtier_dev.migrate(region.id, 0, nr_blocks, far)
    assert all(s.node == far for s in kvtier_dev.query(region.id))
    for p in range(pages):
        assert page_version(buf, p) == acked[p], f"page {p}: acknowledged write {acked[p]} lost"
    assert sum(acked) > pages, "the writers made progress"
    buf.close()


@pytest.mark.guest(*MIGRATION_TOPOLOGIES)
def test_migration_while_another_process_maps(kvtier_dev):
    """A child maps the region through its own fd and writes versions while the parent migrates;
    both end up seeing the same, latest pages."""
    k = kmod()
    far = far_node()
    block = 64 << 10
    nr_blocks = 16
    region = kvtier_dev.create_region(nr_blocks * block, block, node=0, flags=k.CREATE_POPULATE)
    pages = nr_blocks * block // PAGE
    buf = kvtier_dev.mmap(region)
    for p in range(pages):
        buf[p * PAGE:(p + 1) * PAGE] = page_content(p, 0)
    rfd, wfd = os.pipe()

    def child():
        os.close(rfd)
        with k.Device() as dev:
            view = dev.mmap(dev.attach(region.id))
            os.write(wfd, b"r")
            versions = [0] * pages
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                for p in range(pages):
                    assert page_version(view, p) == versions[p]
                    versions[p] += 1
                    view[p * PAGE:(p + 1) * PAGE] = page_content(p, versions[p])
            view.close()
            return versions

    result = {}

    def run_child():
        result["child"] = in_child(child)

    t = threading.Thread(target=run_child)
    t.start()
    assert os.read(rfd, 1) == b"r"
    os.close(rfd)
    os.close(wfd)
    moves = 0
    while t.is_alive():
        kvtier_dev.migrate(region.id, 0, nr_blocks, far if moves % 2 == 0 else 0)
        moves += 1
    t.join()
    status, versions = result["child"]
    assert os.waitstatus_to_exitcode(status) == 0, versions
    assert moves >= 2
    for p in range(pages):
        assert page_version(buf, p) == versions[p]
    buf.close()


@pytest.mark.guest(*MIGRATION_TOPOLOGIES)
def test_unmap_and_exit_during_migration(kvtier_dev):
    """Processes that exit (or are killed) and threads that unmap while blocks migrate: the
    regions are freed with every page, nothing crashes."""
    k = kmod()
    far = far_node()
    base_regions = read_sysfs("regions")
    base_allocated = read_sysfs("allocated_bytes")
    block = 64 << 10
    size = 64 * block
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: own region, writes until killed
        try:
            os.close(rfd)
            dev = k.Device()
            region = dev.create_region(size, block, node=0, flags=k.CREATE_POPULATE)
            view = dev.mmap(region)
            os.write(wfd, struct.pack("<Q", region.id))
            i = 0
            while True:
                off = (i * PAGE) % size
                view[off:off + 8] = struct.pack("<Q", i)
                i += 1
        finally:
            os._exit(1)
    os.close(wfd)
    (child_region,) = struct.unpack("<Q", os.read(rfd, 8))
    os.close(rfd)
    region = kvtier_dev.create_region(size, block, node=0, flags=k.CREATE_POPULATE)
    stop = threading.Event()
    outcomes = []

    def migrator(region_id):
        n = 0
        while not stop.is_set():
            err = errno_of(kvtier_dev.migrate, region_id, 0, size // block, far if n % 2 == 0 else 0)
            outcomes.append(err)
            n += 1
            if err == errno.ENOENT:
                return

    def mapper():
        while not stop.is_set():
            view = kvtier_dev.mmap(region)
            view[0:8] = b"mapped!!"
            assert bytes(view[0:8]) == b"mapped!!"
            view.close()

    threads = [threading.Thread(target=migrator, args=(child_region,)),
               threading.Thread(target=migrator, args=(region.id,)),
               threading.Thread(target=mapper)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    kvtier_dev.release(region.id)
    assert set(outcomes) <= {0, errno.ENOENT}, outcomes
    assert errno.ENOENT in outcomes, "the killed child's region went away"
    assert read_sysfs("regions") == base_regions
    assert read_sysfs("allocated_bytes") == base_allocated


# ---- sharing --------------------------------------------------------------------------------------

@pytest.mark.guest
def test_share_sigbus_unshare_and_lifetime(kvtier_dev):
    k = kmod()
    block = 16 * PAGE
    tags = k.Tags(tenant_id=7, session_id=1, block_type=k.BLOCK_PREFIX)
    src = kvtier_dev.create_region(4 * block, block, node=0, tags=tags)
    dst = kvtier_dev.create_region(4 * block, block, node=0, tags=k.Tags(tenant_id=7, session_id=2))
    sbuf, dbuf = kvtier_dev.mmap(src), kvtier_dev.mmap(dst)
    for p in range(4 * block // PAGE):
        sbuf[p * PAGE:(p + 1) * PAGE] = page_content(p, 5)
    dbuf[:PAGE] = page_content(0, 99)  # dst's own page, replaced by the share
    stats0 = kvtier_dev.stats()
    kvtier_dev.share(dst.id, 0, src.id, 0, 2)
    stats1 = kvtier_dev.stats()
    assert stats1["shares"] - stats0["shares"] == 2
    assert stats1["allocated_bytes"] == stats0["allocated_bytes"] - PAGE, "dst's own page was freed"
    assert stats1["shared_bytes"] == 2 * block
    for p in range(2 * block // PAGE):
        assert page_version(dbuf, p) == 5
    assert [s.shared for s in kvtier_dev.query(dst.id)] == [True, True, False, False]
    assert [s.shared for s in kvtier_dev.query(src.id)] == [True, True, False, False]
    assert kvtier_dev.info(dst.id)["shared_bytes"] == 2 * block
    # same region, other blocks: allowed without overlap
    kvtier_dev.share(src.id, 3, src.id, 2, 1)
    assert bytes(sbuf[3 * block:3 * block + 16]) == bytes(sbuf[2 * block:2 * block + 16])
    assert errno_of(kvtier_dev.share, src.id, 1, src.id, 0, 2) == errno.EINVAL

    # a write to a shared block raises SIGBUS, in either region
    for view, off in ((dbuf, 0), (sbuf, block + 8), (sbuf, 3 * block)):
        status, _ = in_child(lambda view=view, off=off: write_quietly(view, off))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, status
    status, result = in_child(lambda: bytes(dbuf[:16]).hex())  # reading is fine
    assert os.waitstatus_to_exitcode(status) == 0 and result == page_content(0, 5)[:16].hex()

    # UNSHARE gives dst a private, writable copy; src keeps its pages
    kvtier_dev.unshare(dst.id, 0, 1)
    assert kvtier_dev.stats()["cow_copies"] - stats0["cow_copies"] == 1
    assert page_version(dbuf, 0) == 5
    dbuf[:PAGE] = page_content(0, 6)
    assert page_version(sbuf, 0) == 5 and page_version(dbuf, 0) == 6
    assert [s.shared for s in kvtier_dev.query(dst.id)][:2] == [False, True]
    kvtier_dev.unshare(dst.id, 2, 2)  # not shared: nothing to do
    # freeing src never frees pages dst still shares
    sbuf.close()
    kvtier_dev.release(src.id)
    assert errno_of(kvtier_dev.info, src.id) == errno.ENOENT
    for p in range(block // PAGE, 2 * block // PAGE):
        assert page_version(dbuf, p) == 5
    assert not kvtier_dev.query(dst.id)[1].shared, "the last sharer owns it alone"
    dbuf[block:block + PAGE] = page_content(block // PAGE, 7)  # and may write it again
    assert page_version(dbuf, block // PAGE) == 7
    dbuf.close()


@pytest.mark.guest
def test_share_rules(kvtier_dev):
    k = kmod()
    a = kvtier_dev.create_region(4 * PAGE, PAGE, node=0, tags={"tenant_id": 1})
    b = kvtier_dev.create_region(4 * PAGE, PAGE, node=0, tags={"tenant_id": 2})
    c = kvtier_dev.create_region(8 * PAGE, 2 * PAGE, node=0, tags={"tenant_id": 1})
    d = kvtier_dev.create_region(4 * PAGE, PAGE, node=0, tags={"tenant_id": 1})
    assert errno_of(kvtier_dev.share, b.id, 0, a.id, 0, 1) == errno.EPERM, "across tenants"
    assert errno_of(kvtier_dev.share, c.id, 0, a.id, 0, 1) == errno.EINVAL, "block sizes differ"
    for df, sf, nr in ((0, 0, 0), (3, 0, 2), (0, 3, 2), (0xFFFF_FFFF, 0, 2)):
        assert errno_of(kvtier_dev.share, d.id, df, a.id, sf, nr) == errno.EINVAL, (df, sf, nr)
    assert errno_of(kvtier_dev.share, d.id, 0, a.id + 1000, 0, 1) == errno.ENOENT
    s = raw_struct("struct kvtier_share *")
    s.dst_region_id, s.src_region_id, s.nr_blocks, s.pad = d.id, a.id, 1, 1
    assert kvtier_dev.raw_ioctl(k.IOC_SHARE, s) == -errno.EINVAL
    assert errno_of(kvtier_dev.unshare, d.id, 0, 0) == errno.EINVAL
    assert errno_of(kvtier_dev.unshare, d.id, 2, 3) == errno.EINVAL


@pytest.mark.guest
def test_share_across_processes_same_tenant(kvtier_dev):
    """A child creates a prefix region and fills it; the parent's region shares it; the child exits
    (freeing its region) and the parent still reads the prefix."""
    k = kmod()
    block = 8 * PAGE
    rfd, wfd = os.pipe()
    gofd_r, gofd_w = os.pipe()

    def child():
        os.close(rfd)
        os.close(gofd_w)
        with k.Device() as dev:
            region = dev.create_region(2 * block, block, node=0, tags={"tenant_id": 11})
            view = dev.mmap(region)
            for p in range(2 * block // PAGE):
                view[p * PAGE:(p + 1) * PAGE] = page_content(p, 3)
            os.write(wfd, struct.pack("<Q", region.id))
            os.read(gofd_r, 1)  # wait until the parent has shared
            view.close()
        return region.id

    result = {}
    t = threading.Thread(target=lambda: result.setdefault("child", in_child(child)))
    t.start()
    (src_id,) = struct.unpack("<Q", os.read(rfd, 8))  # the child exists now: close our copies
    os.close(wfd)
    os.close(gofd_r)
    os.close(rfd)
    dst = kvtier_dev.create_region(2 * block, block, node=0, tags={"tenant_id": 11})
    kvtier_dev.share(dst.id, 0, src_id, 0, 2)
    os.write(gofd_w, b"g")
    os.close(gofd_w)
    t.join()
    status, child_region = result["child"]
    assert os.waitstatus_to_exitcode(status) == 0, child_region
    assert errno_of(kvtier_dev.info, src_id) == errno.ENOENT, "the child's region is gone"
    view = kvtier_dev.mmap(dst)
    for p in range(2 * block // PAGE):
        assert page_version(view, p) == 3
    view.close()


# ---- access control --------------------------------------------------------------------------

NOBODY = 65534


@pytest.fixture
def world_open_device(kvtier_module):
    """/dev/kvtier opened up (0666) for a test that runs a child as another uid."""
    mode = stat.S_IMODE(os.stat("/dev/kvtier").st_mode)
    os.chmod("/dev/kvtier", 0o666)
    yield
    os.chmod("/dev/kvtier", mode)


@pytest.mark.guest
def test_another_uid_is_denied_until_granted(kvtier_dev, world_open_device):
    k = kmod()
    region = kvtier_dev.create_region(4 * PAGE, PAGE, node=0, tags={"tenant_id": 5})
    buf = kvtier_dev.mmap(region)
    buf[:6] = b"secret"

    def probe():
        out = {}
        with k.Device() as dev:
            out["attach"] = errno_of(dev.attach, region.id)
            out["info"] = errno_of(dev.info, region.id)
            out["query"] = errno_of(dev.query, region.id, 0, 1)
            out["set_tags"] = errno_of(dev.set_tags, region.id, {"session_id": 1})
            out["migrate"] = errno_of(dev.migrate, region.id, 0, 1, 0)
            out["unshare"] = errno_of(dev.unshare, region.id, 0, 1)
            out["grant"] = errno_of(dev.grant, region.id, os.getuid())
            out["mmap"] = errno_of(dev.mmap, k.Region(region.id, region.mmap_offset, 4 * PAGE, PAGE))
            own = dev.create_region(4 * PAGE, PAGE, node=0, tags={"tenant_id": 5})
            out["own_info_uid"] = dev.info(own.id)["owner_uid"]
            out["share_into_own"] = errno_of(dev.share, own.id, 0, region.id, 0, 1)
        return out

    status, out = in_child(probe, uid=NOBODY)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert out.pop("own_info_uid") == NOBODY
    assert out == {name: errno.EACCES for name in out}, out

    kvtier_dev.grant(region.id, NOBODY)

    def granted():
        out = {}
        with k.Device() as dev:
            view = dev.mmap(dev.attach(region.id))
            out["data"] = bytes(view[:6]).decode()
            view.close()
            out["grant_further"] = errno_of(dev.grant, region.id, 1234)
            other = dev.create_region(4 * PAGE, PAGE, node=0, tags={"tenant_id": 6})
            out["cross_tenant"] = errno_of(dev.share, other.id, 0, region.id, 0, 1)
            same = dev.create_region(4 * PAGE, PAGE, node=0, tags={"tenant_id": 5})
            out["same_tenant"] = errno_of(dev.share, same.id, 0, region.id, 0, 1)
        return out

    status, out = in_child(granted, uid=NOBODY)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert out == {"data": "secret", "grant_further": errno.EACCES, "cross_tenant": errno.EPERM,
                   "same_tenant": 0}

    kvtier_dev.grant(region.id, NOBODY, revoke=True)
    status, out = in_child(lambda: errno_of(k.Device().attach, region.id), uid=NOBODY)
    assert os.waitstatus_to_exitcode(status) == 0 and out == errno.EACCES
    g = raw_struct("struct kvtier_grant *")
    g.region_id, g.uid, g.flags = region.id, NOBODY, 1 << 4
    assert kvtier_dev.raw_ioctl(k.IOC_GRANT, g) == -errno.EINVAL
    g.flags, g.uid = 0, 0xFFFF_FFFF
    assert kvtier_dev.raw_ioctl(k.IOC_GRANT, g) == -errno.EINVAL
    buf.close()


@pytest.mark.guest
def test_device_mode_gates_open(kvtier_module):
    k = kmod()
    assert stat.S_IMODE(os.stat("/dev/kvtier").st_mode) & 0o006 == 0, "not world-accessible by default"
    status, out = in_child(lambda: errno_of(k.Device), uid=NOBODY)
    assert os.waitstatus_to_exitcode(status) == 0 and out == errno.EACCES


# ---- observability and page accounting -------------------------------------------------------------

@pytest.mark.guest
def test_sysfs_matches_stats(kvtier_dev):
    region = kvtier_dev.create_region(1 << 20, 64 << 10, node=0, flags=kmod().CREATE_POPULATE)
    stats = kvtier_dev.stats()
    for name in ("regions", "allocated_bytes", "shared_bytes", "faults", "migrations", "migrated_bytes",
                 "shares", "cow_copies"):
        assert read_sysfs(name) == stats[name], name
    assert read_sysfs("reserved_bytes") >= 1 << 20
    for node in memory_nodes():
        value = int(open(f"/sys/kernel/kvtier/nodes/node{node}/allocated_bytes").read())
        assert value == stats["nodes"].get(node, {}).get("allocated_bytes", 0)
    assert stats["nodes"][0]["allocated_bytes"] >= 1 << 20
    kvtier_dev.release(region.id)


@pytest.mark.guest
def test_tracepoints_registered(kvtier_module):
    events = "/sys/kernel/tracing/events/kvtier"
    if not os.path.isdir(events):
        pytest.skip("tracefs not mounted")
    names = set(os.listdir(events))
    for event in ("kvtier_region_create", "kvtier_region_destroy", "kvtier_fault", "kvtier_migrate",
                  "kvtier_share"):
        assert event in names
    fmt = open(f"{events}/kvtier_migrate/format").read()
    assert "region_id" in fmt and "session_id" in fmt and "block" in fmt


@pytest.mark.guest
def test_tracepoints_carry_region_session_block(kvtier_dev):
    """create, fault, migrate (two nodes), share and destroy each leave a trace line naming the
    region and the session."""
    tracing = "/sys/kernel/tracing"
    if not os.path.isdir(f"{tracing}/events/kvtier"):
        pytest.skip("tracefs not mounted")

    def write(path, text):
        with open(f"{tracing}/{path}", "w") as f:
            f.write(text)

    write("trace", "")
    write("events/kvtier/enable", "1")
    try:
        tags = {"tenant_id": 1, "session_id": 4242}
        a = kvtier_dev.create_region(4 * PAGE, PAGE, node=0, tags=tags)
        b = kvtier_dev.create_region(4 * PAGE, PAGE, node=0, tags=tags)
        view = kvtier_dev.mmap(a)
        view[2 * PAGE] = 1  # block 2
        view.close()
        if len(memory_nodes()) > 1:
            kvtier_dev.migrate(a.id, 2, 1, far_node())
        kvtier_dev.share(b.id, 1, a.id, 2, 1)
        kvtier_dev.release(b.id)
    finally:
        write("events/kvtier/enable", "0")
    trace = open(f"{tracing}/trace").read()
    expect = [f"kvtier_region_create: region={a.id} session=4242",
              f"kvtier_fault: region={a.id} session=4242 block=2 page=0 node=0 write=1",
              f"kvtier_share: dst_region={b.id} src_region={a.id} session=4242 dst_block=1 src_block=2",
              f"kvtier_region_destroy: region={b.id} session=4242"]
    if len(memory_nodes()) > 1:
        expect.append(f"kvtier_migrate: region={a.id} session=4242 block=2 to_node={far_node()} bytes={PAGE}")
    for line in expect:
        assert line in trace, f"{line!r} not in trace:\n{trace[-3000:]}"


@pytest.mark.guest
def test_pages_return_to_the_node(kvtier_module):
    """64 MiB populated on the farthest node: its MemFree drops by that much, and comes back when
    the region goes."""
    from conftest import node_memfree_bytes

    k = kmod()
    node = far_node()
    size = 64 << 20
    before = node_memfree_bytes()[node]
    allocated = read_sysfs("allocated_bytes")
    dev = k.Device()
    region = dev.create_region(size, 2 << 20, node=node, flags=k.CREATE_POPULATE)
    during = node_memfree_bytes()[node]
    assert before - during >= size - (4 << 20), (before, during)
    assert read_sysfs("allocated_bytes") == allocated + size
    assert dev.info(region.id)["node_bytes"] == {node: size}
    dev.close()
    after = node_memfree_bytes()[node]
    assert read_sysfs("allocated_bytes") == allocated
    assert after >= before - (8 << 20), (before, after)
