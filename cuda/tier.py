"""GpuTier: the HBM tier, blocks in one CUDA managed-memory arena owned by the daemon process.

It keeps kvtier.store.base.Tier's contract and the slot interface of MemoryTier that the daemon's engine uses
(reserve / commit / abort / rename_reserved / locate / view), so the engine runs it as its first memory tier.
Its arena is not mappable by clients (managed memory belongs to the process that allocated it): arenas() is
empty and `client_mappable` is False, so clients put into the first host tier and a get of a GPU-resident
block is staged into a host slot (copy_out: cudaMemcpy, which does not fault GPU-resident pages to the CPU).

Placement, as the engine drives it:
  commit(key)       a block written here (a promotion, or put() directly): prefetch to the GPU.
  prefetch(key)     again to the GPU (a session resuming, or starting to decode: its working set resident).
  prepare_demote(key)  read-mostly dropped, prefetch to the host NUMA node, waited for: the engine then reads
                    the block from host-resident pages on its way to the next tier.
  set_shared(key, on)  SetReadMostly for a prefix block several sessions hold.
  poll()            retire finished prefetches (events); the daemon calls it from its loop.
"""
from __future__ import annotations

import ctypes
import errno
import threading
from dataclasses import dataclass

from kvtier.cuda import runtime as runtime_mod
from kvtier.cuda.uvm import ManagedArena
from kvtier.store.alloc import ExtentAllocator
from kvtier.store.base import Slot, Tier, check_key, enospc

ALIGN_BYTES = 4096   # advice and prefetch act on whole pages: a block never shares a page with another

_held_lock = threading.Lock()
_held: dict[int, int] = {}   # device -> managed bytes the GpuTiers of this process hold


def held_bytes(device: int) -> int:
    """Managed memory this process's GPU tiers hold on `device` (the config adds it back to free memory, so a
    SIGHUP re-reads capacities against what the daemon could have, not what it left over)."""
    with _held_lock:
        return _held.get(int(device), 0)


@dataclass
class _Block:
    offset: int
    nbytes: int
    shared: bool = False


def _address(buf, nbytes: int) -> tuple[int, object]:
    """The address of a writable buffer's first byte, and the ctypes object keeping the export alive."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes < nbytes:
        raise ValueError(f"buffer of {mv.nbytes} bytes < block of {nbytes}")
    c = (ctypes.c_char * mv.nbytes).from_buffer(mv)
    return ctypes.addressof(c), c


class GpuTier(Tier):
    client_mappable = False

    def __init__(self, name: str, capacity_bytes: int, device: int = 0, host_node: int | None = None,
                 runtime=None):
        super().__init__(name, "gpu", capacity_bytes)
        self.rt = runtime if runtime is not None else runtime_mod.load()
        self.device = int(device)
        self.arena = ManagedArena(self.rt, self.device, self.capacity_bytes, host_node)
        self.backend = "cuda-standin" if self.rt.is_standin else "cuda-uvm"
        self._alloc = ExtentAllocator(self.capacity_bytes, ALIGN_BYTES)
        self._blocks: dict[bytes, _Block] = {}
        self._pending: dict[bytes, _Block] = {}
        self._closed = False
        self._stats.update(reserves=0, commits=0, aborts=0, promotions=0, demotions=0)
        with _held_lock:
            _held[self.device] = _held.get(self.device, 0) + self.capacity_bytes

    def _span(self, b: _Block) -> int:
        """The whole pages of b's extent (advice and prefetch act on pages; the extent owns them all)."""
        return min(self._alloc.round_up(b.nbytes), self.capacity_bytes - b.offset)

    @property
    def backend_note(self) -> str:
        return self.arena.host_note

    # -- slots (the engine's interface) ----------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._alloc.used_bytes

    def arenas(self) -> list[dict]:
        return []   # nothing a client can map

    # one arena for every tenant: clients never map it, so it separates nothing a tenant could reach
    domains: tuple = ()

    def domain_arenas(self, domain: bytes) -> list[int]:
        return []

    def release_domain(self, domain: bytes, keep_prefaulted: bool = True) -> bool:
        return True

    def reserved_count(self) -> int:
        return len(self._pending)

    def reserve(self, key: bytes, nbytes: int, domain: bytes = b"") -> Slot:
        key = check_key(key)
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise ValueError(f"tier {self.name}: block size must be positive, got {nbytes}")
        with self._lock:
            self._check_open()
            old = self._pending.pop(key, None)
            if old is not None:
                self._alloc.free(old.offset, old.nbytes)
            off = self._alloc.alloc(nbytes)
            if off is None:
                self._stats["enospc"] += 1
                raise enospc(self.name, nbytes, self.used_bytes, self.capacity_bytes)
            self._pending[key] = _Block(off, nbytes)
            self._stats["reserves"] += 1
            return Slot(0, off, nbytes)

    def commit(self, key: bytes) -> None:
        """Make the reserved block visible and start its prefetch to the GPU (its promotion)."""
        key = check_key(key)
        with self._lock:
            b = self._pending.pop(key, None)
            if b is None:
                raise KeyError(key)
            old = self._blocks.get(key)
            if old is not None:
                self._alloc.free(old.offset, old.nbytes)
            self._blocks[key] = b
            self._stats["commits"] += 1
            self._stats["puts"] += 1
            self._stats["bytes_in"] += b.nbytes
            self._stats["stored_bytes_in"] += b.nbytes
            self._stats["promotions"] += 1
            self.arena.to_device(b.offset, self._span(b))

    def abort(self, key: bytes) -> None:
        key = check_key(key)
        with self._lock:
            b = self._pending.pop(key, None)
            if b is None:
                raise KeyError(key)
            self._alloc.free(b.offset, b.nbytes)
            self._stats["aborts"] += 1

    def rename_reserved(self, old_key: bytes, new_key: bytes) -> None:
        old_key, new_key = check_key(old_key), check_key(new_key)
        with self._lock:
            if new_key in self._pending:
                raise KeyError(new_key)
            self._pending[new_key] = self._pending.pop(old_key)

    def locate(self, key: bytes) -> Slot:
        with self._lock:
            b = self._blocks[check_key(key)]
            return Slot(0, b.offset, b.nbytes)

    def view(self, slot: Slot) -> memoryview:
        """CPU access to a slot (managed memory: the driver migrates what the CPU touches)."""
        if slot.arena != 0 or slot.offset < 0 or slot.offset + slot.nbytes > self.capacity_bytes:
            raise ValueError(f"slot {slot} is outside tier {self.name}")
        return self.arena.view[slot.offset:slot.offset + slot.nbytes]

    # -- placement -------------------------------------------------------------------------------------
    def prefetch(self, key: bytes):
        """Prefetch a resident block to the GPU again (a session resuming or decoding); returns the Move."""
        with self._lock:
            b = self._blocks[check_key(key)]
            self._stats["promotions"] += 1
            return self.arena.to_device(b.offset, self._span(b))

    def prepare_demote(self, key: bytes, wait: bool = True):
        """Before a block leaves this tier: prefer the host, prefetch it there, and (wait) let that finish, so
        the copy to the next tier reads host-resident pages instead of faulting them over one by one."""
        with self._lock:
            b = self._blocks[check_key(key)]
            if b.shared:   # a read-duplicated page would keep its GPU copy
                self.arena.read_mostly(b.offset, self._span(b), False)
                b.shared = False
            move = self.arena.to_host(b.offset, self._span(b))
            self._stats["demotions"] += 1
        if wait:
            self.arena.wait(move)
        return move

    def set_shared(self, key: bytes, shared: bool = True) -> bool:
        """SetReadMostly (or unset it) for a block several sessions read; False if it already was."""
        with self._lock:
            b = self._blocks.get(check_key(key))
            if b is None or b.shared == shared:
                return False
            self.arena.read_mostly(b.offset, self._span(b), shared)
            b.shared = shared
            return True

    def is_shared(self, key: bytes) -> bool:
        b = self._blocks.get(bytes(key))
        return b is not None and b.shared

    def poll(self) -> int:
        with self._lock:
            return self.arena.poll()

    def wait_all(self) -> None:
        with self._lock:
            self.arena.wait_all()

    def location(self, key: bytes) -> dict:
        """cudaMemRangeGetAttribute's view of a block: last prefetch and preferred location (GPU id, -1 host)."""
        with self._lock:
            b = self._blocks[check_key(key)]
            return self.arena.location(b.offset, self._span(b))

    # -- Tier ------------------------------------------------------------------------------------------
    def put(self, key: bytes, data) -> int:
        src = memoryview(data).cast("B")
        slot = self.reserve(key, src.nbytes)
        try:
            self.view(slot)[:] = src
        except BaseException:
            self.abort(key)
            raise
        self.commit(key)
        return src.nbytes

    def _lookup(self, key: bytes) -> _Block:
        b = self._blocks.get(check_key(key))
        self._stats["gets"] += 1
        if b is None:
            self._stats["misses"] += 1
            raise KeyError(key)
        return b

    def copy_out(self, key: bytes, out) -> int:
        """Copy a block into a writable host buffer with cudaMemcpy; returns its length."""
        with self._lock:
            b = self._lookup(key)
            addr, keep = _address(out, b.nbytes)
            self.arena.copy_out(b.offset, b.nbytes, addr)
            del keep
            self._stats["hits"] += 1
            self._stats["bytes_out"] += b.nbytes
            return b.nbytes

    def get(self, key: bytes) -> bytes:
        with self._lock:
            b = self._blocks.get(check_key(key))
            out = bytearray(b.nbytes if b is not None else 0)
            self.copy_out(key, out)
            return bytes(out)

    def get_into(self, key: bytes, out) -> int:
        return self.copy_out(key, out)

    def contains(self, key: bytes) -> bool:
        return bytes(key) in self._blocks

    def delete(self, key: bytes) -> bool:
        with self._lock:
            b = self._blocks.pop(check_key(key), None)
            if b is None:
                return False
            if b.shared:   # the next block in this range starts without read duplication
                self.arena.read_mostly(b.offset, self._span(b), False)
            self._alloc.free(b.offset, b.nbytes)
            self._stats["deletes"] += 1
            return True

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"tier {self.name} is closed")

    def gpu_stats(self) -> dict:
        """Per-tier GPU counters: prefetches each way (count, bytes), moves in flight and completed."""
        with self._lock:
            s = dict(self.arena.stats)
            s.update(device=self.device, moves_in_flight=len(self.arena.in_flight),
                     shared_blocks=sum(1 for b in self._blocks.values() if b.shared),
                     host_node=self.arena.host_node)
            return s

    def stats(self) -> dict:
        out = super().stats()
        out.update(backend=self.backend, device=self.device, reserved_blocks=len(self._pending),
                   gpu=self.gpu_stats())
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._blocks.clear()
            self._pending.clear()
            try:
                self.arena.close()
            finally:
                with _held_lock:
                    _held[self.device] = max(0, _held.get(self.device, 0) - self.capacity_bytes)


def open_tier(name: str, capacity_bytes: int, device: int = 0, host_node: int | None = None) -> GpuTier:
    """The daemon's constructor: the real runtime, or the stand-in under KVTIER_CUDA_STANDIN=1. What keeps the
    tier from opening is one OSError line (ENODEV, or ENOMEM when the GPU has less free than asked for)."""
    try:
        rt = runtime_mod.load()
    except ImportError as e:
        raise OSError(errno.ENODEV, f"tier {name}: cuda-python not installed ({e})") from None
    try:
        return GpuTier(name, capacity_bytes, device=device, host_node=host_node, runtime=rt)
    except (runtime_mod.CudaError, runtime_mod.GpuUnavailable) as e:   # one line for kvtierd, not a traceback
        raise OSError(errno.ENODEV, f"tier {name}: GPU {device}: {e}") from None
