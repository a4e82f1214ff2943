"""DRAM / CXL tier: arenas of shared memory placed on NUMA nodes, with a zero-copy client path.

An arena is either a memfd (memfd_create + ftruncate + mmap MAP_SHARED, placed with
mbind(MPOL_BIND, MPOL_MF_MOVE); clients receive the fd over SCM_RIGHTS) or a kvtier.ko region
created on nodes[0] (clients attach it after grant(arena, uid) and mmap /dev/kvtier at mmap_offset).
Blocks are extents of an arena (ExtentAllocator, 64-byte units). A block is visible (contains, get,
locate) only once committed.

Domains: a tier keeps one set of arenas per domain (the daemon's domain is a tenant's key salt), so a client
maps only its own tenant's memory. The arenas the tier starts with go to the first domain that asks (the common
one-tenant case costs nothing); later domains get arenas of their own, sparse until written. Resident memory is
bounded across domains: every so many allocated bytes the tier compares its arenas' resident pages with its
capacity and, past 1/TRIM_SLACK over it, punches their free extents out (memfd: FALLOC_FL_PUNCH_HOLE).

Checksums (checksum="lazy", the default): memory is not where corruption comes from, so commit is O(1)
metadata and no checksum is taken while a block sits in memory; checksum_of() / verify() compute and
record it when a block leaves the tier (its NVMe record needs it) or on request, and a get verifies a
recorded one. checksum="commit" records it at commit and verifies it on every get.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import threading
from dataclasses import dataclass

from kvtier import numa
from kvtier.store.alloc import ExtentAllocator
from kvtier.store.base import ChecksumError, Slot, Tier, check_key, checksum, enospc

ALIGN_BYTES = 64  # cache line: blocks never share a line, small blocks waste little
PAGE_ALIGN_MIN = 64 << 10  # blocks this big start on a page: O_DIRECT to/from NVMe works on the slot itself
KMOD_BLOCK_BYTES = 2 << 20  # kvtier.ko region block: a page multiple, the driver's unit of migration
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable without touching them
POPULATE_CHUNK = 8 << 20   # per madvise call: a close() waits at most this long for a prefault to stop
DEFAULT_DOMAIN = b""       # callers that do not separate tenants (tools, tests) share this one
MAX_DOMAINS = 256          # arena sets per tier: each is a memfd (or kvtier.ko regions) and a client mapping
TRIM_SLACK = 8             # resident bytes may pass capacity by 1/TRIM_SLACK before free extents are punched
TRIM_CHECK_MIN_BYTES = 4 << 20   # resident is checked after every capacity/16 (at least this) allocated bytes
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
HUGE_BYTES = 2 << 20       # a memfd arena is sized in these, so all of it can sit on 2 MiB pages
SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def punch(fd: int, offset: int, length: int) -> None:
    """Give [offset, offset+length) of a memfd back to the kernel (pages read as zeros afterwards, in every
    mapping)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(PUNCH_HOLE): {os.strerror(e)}")


def advise_huge(buf: mmap.mmap) -> None:
    """Ask for 2 MiB pages under a memfd mapping. They come where shmem THP is "advise" (or within_size,
    always); the default "never" ignores this. An O_DIRECT transfer from or into 4 KiB pages is cut into a
    request per 254 pages (virtio's and NVMe's segment limits); from 2 MiB pages it goes in a few large
    ones: measured 1.7-2x faster to disk here (tools/bench_daemon.py prints the mode it ran under)."""
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass


def shmem_thp_mode() -> str:
    """The kernel's shmem THP setting (never, advise, within_size, always, deny, force), or "unavailable"."""
    try:
        with open(SHMEM_THP) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    at = text.find("[")
    return text[at + 1:text.find("]", at)] if at >= 0 else text.strip()


def shmem_pmd_bytes(pid: int | str = "self") -> int:
    """Bytes of shared memory process `pid` maps with 2 MiB pages (memfd arenas on shmem THP)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("ShmemPmdMapped:"):
                return int(line.split()[1]) * 1024
    return 0


def populate(addr: int, length: int, stop: threading.Event | None = None) -> str:
    """Fault [addr, addr+length) in writable, chunk by chunk (ctypes drops the GIL, so a background thread
    does this without stalling the caller's thread); returns "" when done, else why it stopped. A page
    first touched costs ~3 us (a shmem page allocated and zeroed, then mapped): 64 MiB is ~50 ms that a
    put would otherwise pay."""
    off = 0
    while off < length:
        if stop is not None and stop.is_set():
            return "stopped"
        n = min(POPULATE_CHUNK, length - off)
        if _libc.madvise(addr + off, n, MADV_POPULATE_WRITE) != 0:
            return f"madvise(MADV_POPULATE_WRITE): {os.strerror(ctypes.get_errno())}"   # kernel < 5.14
        off += n
    return ""


@dataclass
class _Block:
    arena: int
    offset: int
    nbytes: int
    checksum: int | None  # None while reserved, or committed in lazy mode and not yet asked for


class _Arena:
    def __init__(self, kind: str, size: int, buf: mmap.mmap, fd: int = -1, region=None):
        self.kind = kind
        self.size = size
        self.buf = buf
        self.view = memoryview(buf)
        self.fd = fd
        self.region = region
        self.alloc = ExtentAllocator(size, ALIGN_BYTES)
        self.addr = numa.address_of(buf) if size else 0
        self.prefault = False   # clients populate their mapping too (page tables: ~1.5 us a page otherwise)
        self.domain: bytes | None = None   # whose blocks it holds; None until a domain takes it

    def handle(self) -> dict:
        if self.kind == "memfd":
            return {"kind": "memfd", "fd": self.fd, "size": self.size, "prefault": self.prefault}
        return {"kind": "kvtier", "region_id": self.region.id, "mmap_offset": self.region.mmap_offset,
                "size": self.size}


def _numa_maps_pages(addr: int) -> dict[int, int]:
    """{node: pages} of the mapping starting at `addr`, from /proc/self/numa_maps (no per-page syscalls)."""
    with open("/proc/self/numa_maps") as f:
        for line in f:
            start, _, rest = line.partition(" ")
            if int(start, 16) == addr:
                return {int(n): int(p) for n, p in re.findall(r"\bN(\d+)=(\d+)", rest)}
    return {}


class MemoryTier(Tier):
    """MemoryTier(name, kind, nodes, capacity_bytes, backend="auto"|"memfd"|"kmod",
    checksum="lazy"|"commit")."""

    def __init__(self, name: str, kind: str, nodes: list[int], capacity_bytes: int, backend: str = "auto",
                 checksum: str = "lazy", prefault: bool = False):
        super().__init__(name, kind, capacity_bytes)
        if checksum not in ("lazy", "commit"):
            raise ValueError(f"tier {name}: checksum must be lazy or commit, not {checksum!r}")
        self.checksum_mode = checksum
        if kind not in ("dram", "cxl"):
            raise ValueError(f"tier {name}: a MemoryTier is dram or cxl, not {kind!r}")
        if backend not in ("auto", "memfd", "kmod"):
            raise ValueError(f"tier {name}: backend must be auto, memfd or kmod, not {backend!r}")
        self.nodes = list(nodes)
        if not self.nodes:
            raise ValueError(f"tier {name}: nodes must name at least one NUMA node")
        self._blocks: dict[bytes, _Block] = {}
        self._pending: dict[bytes, _Block] = {}  # reserved, not yet committed
        self._arenas: list[_Arena | None] = []   # Slot.arena indexes it; a released arena leaves None
        self._domains: dict[bytes, list[int]] = {}   # domain -> its arenas
        # called as on_free(key, domain) before a committed block's slot is freed (the daemon unlists it from its
        # block directory first: clients read listed slots without asking, see kvtier.daemon.directory)
        self.on_free = None
        self.arena_generation = 0   # counts arena sets opened and closed (for whoever caches arenas())
        self._dev = None
        self.backend_note = ""
        self._stats.update(reserves=0, commits=0, aborts=0, migrations=0, migrated_bytes=0)
        self._closed = False
        if backend in ("auto", "kmod"):
            try:
                self._open_kmod()
                self._add_kmod_arenas()
                self.backend = "kmod"
            except OSError as e:
                self._close_arenas()
                if backend == "kmod":
                    raise
                self.backend_note = f"kvtier.ko not used: {e.strerror or e}"
        if not self._arenas:
            self._open_memfd()
            self.backend = "memfd"
        # prefault: the arena's pages are allocated now, in the background, instead of on a put's first touch
        self.prefault = prefault and self.backend == "memfd"
        self._prefault_stop = threading.Event()
        self._prefault_thread = None
        self.prefault_note = ""
        for a in self._arenas:
            a.prefault = self.prefault
        # resident memory across domains is checked after this many allocated bytes (see trim())
        self._trim_check_bytes = max(self.capacity_bytes // 16, TRIM_CHECK_MIN_BYTES)
        self._allocated_since_check = 0
        self._stats.update(trims=0)
        if self.prefault:
            self._prefault_thread = threading.Thread(target=self._prefault, args=(list(self._arenas),),
                                                     name=f"prefault-{name}", daemon=True)
            self._prefault_thread.start()

    def _prefault(self, arenas: list[_Arena]) -> None:
        # only the arenas the tier started with (the first domain's): a later domain's arena stays sparse
        for a in arenas:
            why = populate(a.addr, a.size, self._prefault_stop)
            if why:
                self.prefault_note = why
                return

    # -- arenas -----------------------------------------------------------------------------------

    def _open_memfd(self) -> None:
        """Add a memfd arena of the tier's capacity (sparse: pages are taken as they are written)."""
        size = (self.capacity_bytes + HUGE_BYTES - 1) // HUGE_BYTES * HUGE_BYTES   # sparse: only address space
        fd = os.memfd_create(f"kvtier-{self.name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        advise_huge(buf)   # before the first fault (prefault, or a put): the pages come 2 MiB at a time
        arena = _Arena("memfd", self.capacity_bytes, buf, fd=fd)
        self._arenas.append(arena)
        # The policy lives on the shared memfd object, so pages a client faults in land here too.
        try:
            numa.mbind(arena.addr, size, numa.MPOL_BIND, self.nodes, numa.MPOL_MF_MOVE)
        except OSError as e:
            self.backend_note = (f"mbind to nodes {self.nodes} failed ({e.strerror}); "
                                 "pages go where the kernel puts them")

    def _open_kmod(self) -> None:
        from kvtier import kmod
        if not os.path.exists(kmod.DEVICE_PATH):
            raise OSError(errno.ENOENT, f"no {kmod.DEVICE_PATH}")
        self._dev = kmod.Device()

    def _add_kmod_arenas(self) -> None:
        """Add kvtier.ko regions covering the tier's capacity (the driver allocates a page on first touch)."""
        max_region = self._dev.api()["max_region_bytes"] or self.capacity_bytes
        max_region -= max_region % KMOD_BLOCK_BYTES
        left = (self.capacity_bytes + KMOD_BLOCK_BYTES - 1) // KMOD_BLOCK_BYTES * KMOD_BLOCK_BYTES
        covered = 0
        while left > 0:
            size = min(left, max_region)
            region = self._dev.create_region(size, KMOD_BLOCK_BYTES, self.nodes[0])
            try:
                buf = self._dev.mmap(region)
            except OSError:
                self._dev.release(region.id)
                raise
            # capacity is exact: the last arena's rounding is not handed out
            usable = min(size, self.capacity_bytes - covered)
            arena = _Arena("kvtier", size, buf, region=region)
            arena.alloc = ExtentAllocator(usable, ALIGN_BYTES)
            self._arenas.append(arena)
            covered += usable
            left -= size

    def _close_arena(self, arena: _Arena) -> None:
        try:
            arena.view.release()
            arena.buf.close()
        except BufferError:
            pass  # a view handed out by view() is still alive; the mapping goes with it
        if arena.fd >= 0:
            os.close(arena.fd)
        if arena.region is not None and self._dev is not None:
            try:
                self._dev.release(arena.region.id)
            except OSError:
                pass

    def _close_arenas(self) -> None:
        for arena in self._arenas:
            if arena is not None:
                self._close_arena(arena)
        self._arenas = []
        self._domains = {}
        if self._dev is not None:
            self._dev.close()
            self._dev = None

    def arenas(self) -> list[dict | None]:
        """How a client maps each arena: {"kind": "memfd", "fd", "size"} or
        {"kind": "kvtier", "region_id", "mmap_offset", "size"} (None: released); Slot.arena indexes this list.
        A client of one domain is given only domain_arenas(domain) of it."""
        return [a.handle() if a is not None else None for a in self._arenas]

    # -- domains ------------------------------------------------------------------------------------

    def domain_arenas(self, domain: bytes) -> list[int]:
        """The indexes of `domain`'s arenas, made on first use: the arenas the tier started with go to the first
        domain, later ones get arenas of their own (EUSERS past MAX_DOMAINS)."""
        idx = self._domains.get(domain)
        if idx is not None:
            return idx
        with self._lock:
            self._check_open()
            if domain in self._domains:
                return self._domains[domain]
            idx = [i for i, a in enumerate(self._arenas) if a is not None and a.domain is None]
            if not idx:
                if len(self._domains) >= MAX_DOMAINS:
                    raise OSError(errno.EUSERS, f"tier {self.name}: {MAX_DOMAINS} tenant domains hold arenas "
                                                f"already")
                first = len(self._arenas)
                if self.backend == "kmod":
                    try:
                        self._add_kmod_arenas()
                    except OSError as e:
                        # e.g. the module's max_total_bytes, which counts every region's full size: this
                        # domain's memory is a memfd, placed with mbind, as without the module
                        for a in self._arenas[first:]:
                            self._close_arena(a)
                        del self._arenas[first:]
                        self.backend_note = f"a tenant's kvtier.ko regions failed ({e.strerror}): memfd arena"
                if len(self._arenas) == first:
                    self._open_memfd()   # adds its arena only once it is mapped
                idx = list(range(first, len(self._arenas)))
            for i in idx:
                self._arenas[i].domain = domain
            self._domains[domain] = idx
            self.arena_generation += 1
            return idx

    def release_domain(self, domain: bytes, keep_prefaulted: bool = True) -> bool:
        """Close `domain`'s arenas if nothing is stored or reserved in them (their pages go back even where a
        client still maps them); False if something is, or (keep_prefaulted) if they are the prefaulted arenas
        the tier started with. Arenas are never handed to another domain: a process of this one may keep its
        mapping."""
        with self._lock:
            idx = self._domains.get(domain)
            if idx is None:
                return True
            if any(self._arenas[i].alloc.used_bytes for i in idx):
                return False
            if keep_prefaulted and any(self._arenas[i].prefault for i in idx):
                return False   # prefaulted by the admin's choice: they stay resident, warm for the domain's return
            if self._prefault_thread is not None and any(self._arenas[i].prefault for i in idx):
                self._prefault_stop.set()   # it may be populating one of them
                self._prefault_thread.join()
                self._prefault_thread = None
            for i in idx:
                a = self._arenas[i]
                self._give_back_free(a)   # all of it is free
                self._close_arena(a)
                self._arenas[i] = None
            del self._domains[domain]
            self.arena_generation += 1
            return True

    @property
    def domains(self) -> list[bytes]:
        return list(self._domains)

    def _resident(self, a: _Arena) -> int:
        if a.kind == "kvtier":
            return self._dev.info(a.region.id)["resident_bytes"]
        return os.fstat(a.fd).st_blocks * 512

    def _give_back_free(self, a: _Arena) -> None:
        """Give back the memory under every free extent of `a` (its blocks are untouched): a memfd's whole pages
        are punched out, a kvtier.ko region's whole region blocks discarded (KVTIER_IOC_DISCARD)."""
        unit = a.region.block_bytes if a.kind == "kvtier" else numa.PAGE_SIZE
        for start, size in a.alloc.free_ranges():
            lo, hi = -(-start // unit) * unit, (start + size) // unit * unit
            if hi <= lo:
                continue
            if a.kind == "kvtier":
                self._dev.discard(a.region.id, lo // unit, (hi - lo) // unit)
            else:
                punch(a.fd, lo, hi - lo)

    def resident_bytes(self) -> int:
        """Memory the arenas hold (pages written and not given back since)."""
        return sum(self._resident(a) for a in self._arenas if a is not None)

    def trim(self, force: bool = False) -> int:
        """When the arenas hold more than capacity + 1/TRIM_SLACK (or `force`), give back the free extents of the
        arenas holding most beyond their blocks until at most capacity is resident; returns the bytes let go."""
        with self._lock:
            held = [(a, self._resident(a)) for a in self._arenas if a is not None]
            total = before = sum(r for _, r in held)
            if not force and total <= self.capacity_bytes + self.capacity_bytes // TRIM_SLACK:
                return 0
            for a, resident in sorted(held, key=lambda ar: ar[0].alloc.used_bytes - ar[1]):
                if not force and total <= self.capacity_bytes:
                    break
                self._give_back_free(a)
                total -= resident - self._resident(a)
            self._stats["trims"] += 1
            return before - total

    def grant(self, arena: int, uid: int, revoke: bool = False) -> None:
        """Let `uid` attach a kvtier.ko arena (no-op for memfd: holding the fd is the permission)."""
        a = self._arenas[arena]
        if a.kind == "kvtier":
            self._dev.grant(a.region.id, uid, revoke=revoke)

    # -- allocation -------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(a.alloc.used_bytes for a in self._arenas if a is not None)

    def _alloc(self, nbytes: int, domain: bytes) -> Slot | None:
        idx = self.domain_arenas(domain)
        if len(self._domains) > 1:
            # Capacity is the tier's, across domains (each domain's arenas span all of it).
            if self.used_bytes + nbytes > self.capacity_bytes:
                return None
            self._allocated_since_check += nbytes
            if self._allocated_since_check >= self._trim_check_bytes:
                self._allocated_since_check = 0
                self.trim()
        arenas = self._arenas
        if nbytes >= PAGE_ALIGN_MIN:
            for i in idx:
                off = self._alloc_page_aligned(arenas[i], nbytes)
                if off is not None:
                    return Slot(i, off, nbytes)
        for i in idx:   # no aligned room: any fit (only the copy path is slower)
            off = arenas[i].alloc.alloc(nbytes)
            if off is not None:
                return Slot(i, off, nbytes)
        return None

    @staticmethod
    def _alloc_page_aligned(arena: _Arena, nbytes: int) -> int | None:
        """Take enough to start on a page boundary (arena bases are page-aligned), give back the rest."""
        alloc = arena.alloc
        page = numa.PAGE_SIZE
        start = alloc.alloc(nbytes + page - ALIGN_BYTES)
        if start is None:
            return None
        taken = alloc.round_up(nbytes + page - ALIGN_BYTES)
        off = (start + page - 1) // page * page
        need = alloc.round_up(nbytes)
        if off > start:
            alloc.free(start, off - start)
        if start + taken > off + need:
            alloc.free(off + need, start + taken - off - need)
        return off

    def _free(self, b: _Block) -> None:
        self._arenas[b.arena].alloc.free(b.offset, b.nbytes)

    def _free_committed(self, key: bytes, b: _Block) -> None:
        if self.on_free is not None:
            self.on_free(key, self._arenas[b.arena].domain)
        self._free(b)

    def reserve(self, key: bytes, nbytes: int, domain: bytes = DEFAULT_DOMAIN) -> Slot:
        """Space for a block a client writes directly, in one of `domain`'s arenas; invisible until
        commit(key)."""
        key = check_key(key)
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"tier {self.name}: negative block size {nbytes}")
        with self._lock:
            self._check_open()
            old_pending = self._pending.pop(key, None)
            if old_pending is not None:
                self._free(old_pending)
            slot = self._alloc(nbytes, domain)
            if slot is None:
                self._stats["enospc"] += 1
                raise enospc(self.name, nbytes, self.used_bytes, self.capacity_bytes)
            self._pending[key] = _Block(slot.arena, slot.offset, nbytes, None)
            self._stats["reserves"] += 1
            return slot

    def commit(self, key: bytes) -> None:
        """Make what was written into the reserved slot visible (replacing an older committed block of
        the same key); checksum="commit" checksums it first, "lazy" leaves that to checksum_of()."""
        key = check_key(key)
        with self._lock:
            b = self._pending.pop(key, None)
            if b is None:
                raise KeyError(key)
            if self.checksum_mode == "commit":
                b.checksum = checksum(self._view(b))
            old = self._blocks.get(key)
            if old is not None:
                self._free_committed(key, old)
            self._blocks[key] = b
            self._stats["commits"] += 1
            self._stats["puts"] += 1
            self._stats["bytes_in"] += b.nbytes
            self._stats["stored_bytes_in"] += b.nbytes

    def reserved_count(self) -> int:
        """Slots reserved and not yet committed (puts being written, spare slots)."""
        return len(self._pending)

    def rename_reserved(self, old_key: bytes, new_key: bytes) -> None:
        """Give a reserved (not yet committed) slot another key: the daemon hands clients spare slots
        under placeholder keys and names them when the client says what it wrote there."""
        old_key, new_key = check_key(old_key), check_key(new_key)
        with self._lock:
            if new_key in self._pending:
                raise KeyError(new_key)
            self._pending[new_key] = self._pending.pop(old_key)

    def abort(self, key: bytes) -> None:
        key = check_key(key)
        with self._lock:
            b = self._pending.pop(key, None)
            if b is None:
                raise KeyError(key)
            self._free(b)
            self._stats["aborts"] += 1

    def locate(self, key: bytes) -> Slot:
        """Where a client reads a committed block (KeyError if absent)."""
        with self._lock:
            b = self._blocks[check_key(key)]
            return Slot(b.arena, b.offset, b.nbytes)

    def checksum_of(self, key: bytes) -> int:
        """The xxh3_64 of a committed block (for a client that verifies what it reads, or a move to
        another tier); lazy mode computes and records it on the first call."""
        with self._lock:
            b = self._blocks[check_key(key)]
            if b.checksum is None:
                b.checksum = checksum(self._view(b))
            return b.checksum

    def verify(self, key: bytes) -> bool:
        """Whether a committed block still matches its checksum (drops it if not); a lazy block's
        first verify records the checksum it is checked against from then on."""
        with self._lock:
            b = self._blocks[check_key(key)]
            if b.checksum is None:
                b.checksum = checksum(self._view(b))
                return True
            if checksum(self._view(b)) == b.checksum:
                return True
            self._drop_corrupt(key, b)
            return False

    def view(self, slot: Slot) -> memoryview:
        """A writable view of a slot, for the daemon's own access."""
        arena = self._arenas[slot.arena]
        if slot.offset < 0 or slot.offset + slot.nbytes > arena.size:
            raise ValueError(f"slot {slot} is outside arena {slot.arena} ({arena.size} bytes)")
        return arena.view[slot.offset:slot.offset + slot.nbytes]

    def _view(self, b: _Block) -> memoryview:
        return self._arenas[b.arena].view[b.offset:b.offset + b.nbytes]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"tier {self.name} is closed")

    # -- Tier -------------------------------------------------------------------------------------

    def put(self, key: bytes, data, domain: bytes = DEFAULT_DOMAIN) -> int:
        src = memoryview(data).cast("B")
        try:
            slot = self.reserve(key, src.nbytes, domain)
        except OSError as e:
            slot = self._reserve_in_place_of(key, src.nbytes, e)
        try:
            self.view(slot)[:] = src
        except BaseException:
            self.abort(key)
            raise
        self.commit(key)
        return src.nbytes

    def _reserve_in_place_of(self, key: bytes, nbytes: int, error: OSError) -> Slot:
        """A full tier can still overwrite a block with one that fits once the old one is freed
        (the old block stops being visible from here on; on failure it is put back untouched)."""
        key = check_key(key)
        with self._lock:
            old = self._blocks.get(key)
            if error.errno != errno.ENOSPC or old is None:
                raise error
            self._free_committed(key, old)
            slot = self._alloc(nbytes, self._arenas[old.arena].domain)
            if slot is None:
                arena = self._arenas[old.arena].alloc
                if not arena.alloc_at(old.offset, old.nbytes):  # cannot happen: nothing ran in between
                    del self._blocks[key]
                raise error
            del self._blocks[key]
            self._pending[key] = _Block(slot.arena, slot.offset, nbytes, None)
            self._stats["enospc"] -= 1
            self._stats["reserves"] += 1
            return slot

    def _drop_corrupt(self, key: bytes, b: _Block) -> None:
        del self._blocks[key]
        self._free_committed(key, b)
        self._stats["checksum_failures"] += 1

    def _lookup(self, key: bytes) -> _Block:
        b = self._blocks.get(check_key(key))
        self._stats["gets"] += 1
        if b is None:
            self._stats["misses"] += 1
            raise KeyError(key)
        return b

    def get(self, key: bytes) -> bytes:
        with self._lock:
            b = self._lookup(key)
            data = bytes(self._view(b))
            if b.checksum is not None and checksum(data) != b.checksum:
                self._drop_corrupt(key, b)
                raise ChecksumError(self.name, key)
            self._stats["hits"] += 1
            self._stats["bytes_out"] += b.nbytes
            return data

    def get_into(self, key: bytes, out) -> int:
        with self._lock:
            b = self._lookup(key)
            dst = memoryview(out).cast("B")
            if dst.nbytes < b.nbytes:
                raise ValueError(f"tier {self.name}: buffer of {dst.nbytes} bytes < block of {b.nbytes}")
            dst = dst[:b.nbytes]
            dst[:] = self._view(b)
            # verify what the caller got, not the source afterwards
            if b.checksum is not None and checksum(dst) != b.checksum:
                self._drop_corrupt(key, b)
                raise ChecksumError(self.name, key)
            self._stats["hits"] += 1
            self._stats["bytes_out"] += b.nbytes
            return b.nbytes

    def contains(self, key: bytes) -> bool:
        return bytes(key) in self._blocks

    def delete(self, key: bytes) -> bool:
        with self._lock:
            key = check_key(key)
            b = self._blocks.pop(key, None)
            if b is None:
                return False
            self._free_committed(key, b)
            self._stats["deletes"] += 1
            return True

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    # -- placement --------------------------------------------------------------------------------

    def node_pages(self) -> dict[int, int]:
        """{node: resident pages} over all arenas."""
        out: dict[int, int] = {}
        for a in self._arenas:
            if a is None:
                continue
            if a.kind == "kvtier":
                pages = {n: b // numa.PAGE_SIZE for n, b in self._dev.info(a.region.id)["node_bytes"].items()}
            else:
                pages = _numa_maps_pages(a.addr)
            for n, p in pages.items():
                out[n] = out.get(n, 0) + p
        return out

    def migrate_to(self, node: int) -> int:
        """Move every arena's pages to `node` (kmod: the driver's migrate ioctl; memfd: mbind with
        MPOL_MF_MOVE_ALL, or MPOL_MF_MOVE without CAP_SYS_NICE); returns the bytes moved."""
        node = int(node)
        moved = 0
        with self._lock:
            self._check_open()
            for a in self._arenas:
                if a is None:
                    continue
                if a.kind == "kvtier":
                    moved += self._dev.migrate(a.region.id, 0, a.region.nr_blocks, node)[0]
                    continue
                before = _numa_maps_pages(a.addr).get(node, 0)
                length = (a.size + numa.PAGE_SIZE - 1) // numa.PAGE_SIZE * numa.PAGE_SIZE
                try:
                    # MOVE_ALL also moves pages a client has mapped too
                    numa.mbind(a.addr, length, numa.MPOL_BIND, [node], numa.MPOL_MF_MOVE_ALL)
                except OSError as e:
                    if e.errno != errno.EPERM:
                        raise
                    numa.mbind(a.addr, length, numa.MPOL_BIND, [node], numa.MPOL_MF_MOVE)
                after = _numa_maps_pages(a.addr).get(node, 0)
                moved += max(0, after - before) * numa.PAGE_SIZE
            self.nodes = [node]
            self._stats["migrations"] += 1
            self._stats["migrated_bytes"] += moved
        return moved

    def stats(self) -> dict:
        out = super().stats()
        out.update(backend=self.backend, checksum=self.checksum_mode, nodes=list(self.nodes),
                   arenas=sum(a is not None for a in self._arenas), domains=len(self._domains),
                   reserved_blocks=len(self._pending))
        if self.backend_note:
            out["backend_note"] = self.backend_note
        if self.prefault_note:
            out["prefault_note"] = self.prefault_note
        return out

    def close(self) -> None:
        if getattr(self, "_prefault_thread", None) is not None:
            self._prefault_stop.set()   # before the arenas are unmapped under it
            self._prefault_thread.join()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._blocks.clear()
            self._pending.clear()
            self._close_arenas()
