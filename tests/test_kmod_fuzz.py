"""Fuzz kvtier.ko's ioctls: >= 100,000 random and malformed calls, each answered by an errno or success.

The mix: well-formed commands with "interesting" field values (live and dead region ids, huge and
unaligned sizes, ranges past the end, unknown flag bits, non-zero padding, bad nodes), known commands with
fully random struct bytes, our magic with random numbers/sizes/directions, known numbers with the wrong
size or direction, fully random command words, and bad user pointers (NULL, 0x1, kernel and non-canonical
addresses, an unmapped page, a read-only page) both as the argument and as entries_ptr.

Strict checks where the ABI is unambiguous: a command word the module does not define gets ENOTTY, a bad
argument pointer for a defined command gets EFAULT, a valid query into unwritable memory gets EFAULT.
Every other failure must be one of the errnos below. Afterwards every region is released and the module's
counters must be back to where they started (nothing leaked).

The loop calls the raw cffi kvt_ioctl (no fcntl, no Python struct packing) to stay fast under TCG, and runs
in a forked child, so a kernel that scribbles over user memory fails this test instead of killing pytest.
KVTIER_FUZZ_CALLS and KVTIER_FUZZ_SEED override the count and the seed (the seed is printed).
"""
import ctypes
import errno
import json
import os
import random
import time
import traceback

import pytest

from kmod_guest import ensure_module
from kvtier import kmod
from kvtier._native import ffi, lib

N_CALLS = int(os.environ.get("KVTIER_FUZZ_CALLS", "100000"))
PAGE = os.sysconf("SC_PAGESIZE")

ALLOWED_ERRNOS = {errno.EINVAL, errno.ENOTTY, errno.EFAULT, errno.ENOENT, errno.EACCES, errno.EPERM,
                  errno.ENOMEM, errno.EBUSY, errno.EEXIST, errno.ENOSPC, errno.EOVERFLOW, errno.E2BIG,
                  errno.ERANGE, errno.ENODEV, errno.EXDEV, errno.EAGAIN, errno.EOPNOTSUPP}

COMMANDS = {name: (getattr(lib, name), struct) for name, struct in {
    "KVTIER_IOC_API": "kvtier_api",
    "KVTIER_IOC_REGION_CREATE": "kvtier_region_create",
    "KVTIER_IOC_REGION_ATTACH": "kvtier_region_attach",
    "KVTIER_IOC_REGION_RELEASE": "kvtier_region_release",
    "KVTIER_IOC_REGION_INFO": "kvtier_region_info",
    "KVTIER_IOC_SET_TAGS": "kvtier_set_tags",
    "KVTIER_IOC_MIGRATE": "kvtier_migrate",
    "KVTIER_IOC_SHARE": "kvtier_share",
    "KVTIER_IOC_UNSHARE": "kvtier_range",
    "KVTIER_IOC_BLOCK_QUERY": "kvtier_block_query",
    "KVTIER_IOC_GRANT": "kvtier_grant",
    "KVTIER_IOC_STATS": "kvtier_stats",
    "KVTIER_IOC_ACCESS_RESET": "kvtier_range",
    "KVTIER_IOC_DISCARD": "kvtier_range",
}.items()}
VALID_CMDS = {cmd for cmd, _ in COMMANDS.values()}
NAME_OF = {cmd: name for name, (cmd, _) in COMMANDS.items()}
# ioctl types the VFS answers itself before the driver sees them (FIOCLEX/FIONBIO 'T', FIFREEZE/FITHAW 'X',
# FS_IOC_* 'f', FICLONE 0x94, FIBMAP/FIGETBSZ 0): never send those, freezing the guest's fs is no test.
VFS_TYPES = {0x00, 0x54, 0x58, 0x66, 0x94}

U32 = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 255, 256, 4095, 4096, 65535, 1 << 31, 0xFFFFFFFF]
U64 = [0, 1, PAGE - 1, PAGE, 2 * PAGE, 1 << 20, 1 << 30, 1 << 40, 1 << 48, 1 << 63, 2**64 - 1, 2**64 - PAGE]
NODES = [-1, 0, 1, 2, 3, 63, 64, 65, -2, 2**31 - 1, -2**31]
FLAG_BITS = {"KVTIER_IOC_REGION_CREATE": lib.KVTIER_CREATE_POPULATE,
             "KVTIER_IOC_MIGRATE": lib.KVTIER_MIGRATE_POPULATE, "KVTIER_IOC_GRANT": lib.KVTIER_GRANT_REVOKE}
TAG_BITS = (lib.KVTIER_TAG_SESSION | lib.KVTIER_TAG_LAYERS | lib.KVTIER_TAG_HEADS | lib.KVTIER_TAG_TYPE
            | lib.KVTIER_TAG_PRIORITY)
STATE_BYTES = ffi.sizeof("struct kvtier_block_state")

MAX_LIVE_REGIONS = 24
MAX_REGION_BLOCKS = 64

# Scratch memory, one anonymous mapping: pages [0, 5) hold the ioctl argument (room for _IOC_SIZE's
# 16383-byte maximum, should a driver copy that much), page 5 is unmapped, page 6 read-only, pages
# [7, 31) take query entries, page 31 is unmapped so an over-long write faults instead of hitting the heap.
ARG_PAGES, HOLE, READ_ONLY, ENTRIES_FIRST, GUARD, SCRATCH_PAGES = 5, 5, 6, 7, 31, 32


def _scratch():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    import mmap as m
    base = libc.mmap(None, SCRATCH_PAGES * PAGE, m.PROT_READ | m.PROT_WRITE, m.MAP_PRIVATE | m.MAP_ANONYMOUS,
                     -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    assert libc.munmap(base + HOLE * PAGE, PAGE) == 0
    assert libc.munmap(base + GUARD * PAGE, PAGE) == 0
    assert libc.mprotect(base + READ_ONLY * PAGE, PAGE, m.PROT_READ) == 0
    return base


def fuzz(fd: int, n_calls: int, seed: int, max_region_bytes: int) -> dict:
    """The loop (runs in the forked child). Returns counts and any violation found."""
    rng = random.Random(seed)
    base = _scratch()
    arg = ffi.cast("void *", base)
    arg_bytes = ARG_PAGES * PAGE
    entries_end = base + GUARD * PAGE
    entries_size = (GUARD - ENTRIES_FIRST) * PAGE
    bad_pointers = [0, 1, base + HOLE * PAGE, base + GUARD * PAGE - 1, 0xFFFF888000000000, 0xFFFFFFFF81000000,
                    0xFFFFFFFFFFFFF000, 0x0000800000000000, 0x00007FFFFFFFF000]
    read_only = base + READ_ONLY * PAGE
    pool = os.urandom(1 << 20)
    live = {}            # region id -> nr_blocks
    dead = []            # released ids: commands on them must fail cleanly
    ok = {}
    errnos = {}
    violations = []
    ever_created = []

    def u32():
        return rng.choice(U32) if rng.random() < 0.7 else rng.getrandbits(32)

    def u64():
        return rng.choice(U64) if rng.random() < 0.7 else rng.getrandbits(64)

    def node():
        r = rng.random()
        if r < 0.5:
            return rng.randint(0, 1)   # the guest's real nodes, so migrations get through
        return rng.choice(NODES) if r < 0.95 else rng.getrandbits(32) - 2**31

    def region_id():
        r = rng.random()
        if live and r < 0.75:
            return rng.choice(list(live))
        if dead and r < 0.85:
            return rng.choice(dead)
        return u64()

    def block_range(rid):
        nr = live.get(rid)
        if nr and rng.random() < 0.7:
            first = rng.randrange(nr)
            return first, rng.randint(1, nr - first)
        return u32(), u32()

    def flags(name):
        valid = FLAG_BITS.get(name, 0)
        return rng.getrandbits(32) if rng.random() < 0.15 else valid & rng.getrandbits(32)

    def pad():
        return 0 if rng.random() < 0.9 else rng.getrandbits(32)

    def fill_tags(t):
        t.tenant_id = rng.choice([0, 1, 2, 7]) if rng.random() < 0.9 else rng.getrandbits(64)
        t.session_id = u64()
        t.layer_first, t.layer_count, t.head_first, t.head_count = u32(), u32(), u32(), u32()
        t.block_type = rng.randint(0, 3) if rng.random() < 0.85 else u32()
        t.priority = rng.randint(0, 2) if rng.random() < 0.85 else u32()

    def structured(name, struct):
        """Fill the argument with a plausible-but-often-wrong struct; returns a strict expectation or None."""
        ffi.memmove(arg, b"\0" * ffi.sizeof(f"struct {struct}"), ffi.sizeof(f"struct {struct}"))
        s = ffi.cast(f"struct {struct} *", arg)
        if name == "KVTIER_IOC_REGION_CREATE":
            if rng.random() < 0.8:
                block = rng.choice([PAGE, 2 * PAGE, 4 * PAGE, 16 * PAGE])
                s.size_bytes = block * rng.randint(1, MAX_REGION_BLOCKS)
            else:   # malformed, or larger than the module allows: never a real huge allocation
                block = rng.choice([0, 1, PAGE - 1, PAGE + 1, 3 * PAGE, 0xFFFFF000])
                s.size_bytes = rng.choice([0, PAGE + 1, max_region_bytes + PAGE, 2**64 - PAGE,
                                           max_region_bytes * 2 + rng.randrange(1 << 20)])
            s.block_bytes = block
            s.node = node()
            s.flags = flags(name)
            s.pad = pad()
            fill_tags(s.tags)
            if rng.random() < 0.1:
                s.region_id, s.mmap_offset = u64(), u64()
        elif name in ("KVTIER_IOC_REGION_ATTACH", "KVTIER_IOC_REGION_RELEASE", "KVTIER_IOC_REGION_INFO"):
            s.region_id = region_id()
            if name == "KVTIER_IOC_REGION_ATTACH":
                s.pad = pad()
        elif name == "KVTIER_IOC_SET_TAGS":
            s.region_id = region_id()
            s.first_block, s.nr_blocks = block_range(s.region_id) if rng.random() < 0.6 else (0, 0)
            s.mask = TAG_BITS & rng.getrandbits(32) if rng.random() < 0.85 else rng.getrandbits(32)
            s.pad = pad()
            fill_tags(s.tags)
        elif name == "KVTIER_IOC_MIGRATE":
            s.region_id = region_id()
            s.first_block, s.nr_blocks = block_range(s.region_id)
            s.node = node()
            s.flags = flags(name)
            s.pad = pad()
        elif name == "KVTIER_IOC_SHARE":
            s.dst_region_id, s.src_region_id = region_id(), region_id()
            s.dst_first_block, s.nr_blocks = block_range(s.dst_region_id)
            s.src_first_block = block_range(s.src_region_id)[0]
            s.pad = pad()
        elif name in ("KVTIER_IOC_UNSHARE", "KVTIER_IOC_ACCESS_RESET", "KVTIER_IOC_DISCARD"):
            s.region_id = region_id()
            s.first_block, s.nr_blocks = block_range(s.region_id)
        elif name == "KVTIER_IOC_BLOCK_QUERY":
            rid = region_id()
            first, nr = block_range(rid)
            s.region_id, s.first_block, s.nr_blocks = rid, first, nr
            r = rng.random()
            if r < 0.8:
                # End exactly at the guard page when it fits, so any overrun faults.
                need = nr * STATE_BYTES
                s.entries_ptr = entries_end - need if need <= entries_size else entries_end - entries_size
            else:
                bad = rng.choice(bad_pointers + [read_only])
                s.entries_ptr = bad
                nr_blocks = live.get(rid)
                if nr_blocks and nr > 0 and first + nr <= nr_blocks:
                    return errno.EFAULT   # a valid query whose entries cannot be written
        elif name == "KVTIER_IOC_GRANT":
            s.region_id = region_id()
            s.uid = rng.choice([0, 1, 1000, 65534, 0xFFFFFFFF]) if rng.random() < 0.9 else rng.getrandbits(32)
            s.flags = flags(name)
        return None

    names = list(COMMANDS)
    started = time.perf_counter()
    for i in range(n_calls):
        r = rng.random()
        expect = None
        ptr = arg
        if r < 0.50:
            name = rng.choice(names)
            cmd, struct = COMMANDS[name]
            expect = structured(name, struct)
            if rng.random() < 0.04:
                ptr = ffi.cast("void *", rng.choice(bad_pointers))
                expect = errno.EFAULT
        elif r < 0.70:
            name = rng.choice(names)
            cmd, struct = COMMANDS[name]
            size = ffi.sizeof(f"struct {struct}")
            off = rng.randrange(len(pool) - size)
            ffi.memmove(arg, pool[off:off + size], size)
        else:
            if r < 0.82:      # our magic, random number, size and direction
                cmd = (rng.getrandbits(2) << 30) | (rng.getrandbits(14) << 16) | (lib.KVTIER_IOC_MAGIC << 8) \
                    | rng.choice([rng.getrandbits(8), rng.randrange(16)])
            elif r < 0.90:    # a known number with the wrong size or direction
                good = rng.choice(list(VALID_CMDS))
                if rng.random() < 0.5:
                    cmd = (good & ~(0x3FFF << 16)) | (rng.getrandbits(14) << 16)
                else:
                    cmd = (good & ~(3 << 30)) | (rng.getrandbits(2) << 30)
            else:             # anything at all
                cmd = rng.getrandbits(32)
                while (cmd >> 8) & 0xFF in VFS_TYPES:
                    cmd = rng.getrandbits(32)
            name = NAME_OF.get(cmd)
            off = rng.randrange(len(pool) - arg_bytes)
            ffi.memmove(arg, pool[off:off + 64], 64)
            if name is None:
                expect = errno.ENOTTY
            if rng.random() < 0.1:
                ptr = ffi.cast("void *", rng.choice(bad_pointers))
                expect = errno.ENOTTY if name is None else errno.EFAULT

        ret = lib.kvt_ioctl(fd, cmd, ptr)
        key = name or "unknown"
        if ret >= 0:
            ok[key] = ok.get(key, 0) + 1
            if expect is not None and len(violations) < 20:
                violations.append(f"call {i}: {key} ({cmd:#x}) succeeded, expected errno {expect}")
            if ptr == arg and name == "KVTIER_IOC_REGION_CREATE":
                c = ffi.cast("struct kvtier_region_create *", arg)
                rid = int(c.region_id)
                live[rid] = int(c.size_bytes) // int(c.block_bytes)
                ever_created.append(rid)
                if len(live) > MAX_LIVE_REGIONS:
                    victim = next(iter(live))
                    rel = ffi.new("struct kvtier_region_release *", {"region_id": victim})
                    lib.kvt_ioctl(fd, lib.KVTIER_IOC_REGION_RELEASE, rel)
                    live.pop(victim)
                    dead.append(victim)
            elif ptr == arg and name == "KVTIER_IOC_REGION_RELEASE":
                rid = int(ffi.cast("struct kvtier_region_release *", arg).region_id)
                if rid in live:
                    live.pop(rid)
                    dead.append(rid)
        else:
            err = -ret
            errnos[errno.errorcode.get(err, str(err))] = errnos.get(errno.errorcode.get(err, str(err)), 0) + 1
            bad = err not in ALLOWED_ERRNOS or (expect is not None and err != expect)
            if bad and len(violations) < 20:
                violations.append(f"call {i}: {key} ({cmd:#x}) -> {errno.errorcode.get(err, err)}, "
                                  f"expected {errno.errorcode.get(expect, 'an allowed errno')}")
    return {"calls": n_calls, "duration_s": time.perf_counter() - started, "ok": ok, "errnos": errnos,
            "violations": violations, "created": len(ever_created), "ever_created": ever_created[-200:]}


def run_in_child(n_calls: int, seed: int, max_region_bytes: int) -> dict:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: open its own fd, fuzz, report, exit without running pytest's teardown
        status = 1
        try:
            os.close(read_end)
            with kmod.Device() as dev:
                result = fuzz(dev.fileno(), n_calls, seed, max_region_bytes)
            with os.fdopen(write_end, "w") as out:
                json.dump(result, out)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
        f"fuzzing child died: wait status {status:#x} (signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else '-'})"
    return json.loads(data)


def _settled_stats(dev, baseline, timeout_s=5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = dev.stats()
        same = (stats["regions"], stats["allocated_bytes"], stats["shared_bytes"]) == \
            (baseline["regions"], baseline["allocated_bytes"], baseline["shared_bytes"])
        if same or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


@pytest.mark.guest("numa")
def test_fuzz_ioctls(request):
    ensure_module(request)
    seed = int(os.environ.get("KVTIER_FUZZ_SEED", str(int.from_bytes(os.urandom(4), "little"))))
    with kmod.Device() as dev:
        api = dev.api()
        baseline = dev.stats()
    result = run_in_child(N_CALLS, seed, api["max_region_bytes"])
    summary = (f"kvtier fuzz: seed {seed}, {result['calls']} ioctls in {result['duration_s']:.1f} s "
               f"({result['calls'] / result['duration_s']:.0f}/s), {result['created']} regions created; "
               f"ok {result['ok']}; errnos {result['errnos']}")
    print(summary)  # pytest shows it (with the seed to replay) when the test fails
    assert result["calls"] >= 100_000 or "KVTIER_FUZZ_CALLS" in os.environ
    assert not result["violations"], f"{summary}\n" + "\n".join(result["violations"])
    # The fuzzer got past argument checking into the real work, not only into -EINVAL.
    for name in ("KVTIER_IOC_REGION_CREATE", "KVTIER_IOC_MIGRATE", "KVTIER_IOC_BLOCK_QUERY",
                 "KVTIER_IOC_SET_TAGS", "KVTIER_IOC_REGION_INFO", "KVTIER_IOC_API", "KVTIER_IOC_STATS"):
        assert result["ok"].get(name, 0) > 0, f"no {name} ever succeeded: {summary}"

    # The child's fd is closed: every region it made must be gone, every page returned.
    with kmod.Device() as dev:
        after = _settled_stats(dev, baseline)
        for rid in result["ever_created"]:
            with pytest.raises(OSError) as err:
                dev.info(rid)
            assert err.value.errno in (errno.ENOENT, errno.EINVAL), rid
    assert after["regions"] == baseline["regions"]
    assert after["allocated_bytes"] == baseline["allocated_bytes"]
    assert after["shared_bytes"] == baseline["shared_bytes"]
    assert {n: s["allocated_bytes"] for n, s in after["nodes"].items() if s["allocated_bytes"]} == \
        {n: s["allocated_bytes"] for n, s in baseline["nodes"].items() if s["allocated_bytes"]}
