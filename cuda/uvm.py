"""A region of CUDA managed (unified) memory with placement advice and prefetches on streams.

ManagedArena(runtime, device, nbytes, host_node) takes one cudaMallocManaged allocation (refused when the GPU has
less free memory than asked for) and moves byte ranges of it:

  to_device(off, n)  cudaMemPrefetchAsync to the GPU on the promotion stream, then cudaMemAdvise
                     SetPreferredLocation(GPU): a hot block, or one of a session about to resume. SetAccessedBy(GPU)
                     is set once, on the whole arena, when it is allocated.
  to_host(off, n)    SetPreferredLocation(host NUMA node; plain host where the platform has no NUMA-aware
                     managed memory or ignores the advice) and a prefetch to the node on the demotion stream: a
                     demoted block. AccessedBy stays set, so the GPU maps the pages over the link instead of
                     faulting them back.
  read_mostly(off, n, on)  SetReadMostly / UnsetReadMostly: a shared prefix block several sessions read; the
                     driver may keep read-only copies on several processors.

Each prefetch records an event on its stream and returns a Move; poll() retires finished moves, wait() blocks on
one. Promotions and demotions use separate streams so a demotion never queues behind promotions.
"""
from __future__ import annotations

import ctypes
import errno
import time
from collections import deque

from kvtier.cuda.runtime import CPU_DEVICE_ID, CudaError, GpuUnavailable, Runtime

EVENTS_KEPT = 64   # idle events kept for reuse (creating one is a driver call)


class Move:
    """One prefetch in flight: direction "to_device" | "to_host", its range, and its completion event."""

    __slots__ = ("direction", "offset", "nbytes", "event", "started_ns", "done")

    def __init__(self, direction: str, offset: int, nbytes: int, event):
        self.direction, self.offset, self.nbytes, self.event = direction, offset, nbytes, event
        self.started_ns = time.monotonic_ns()
        self.done = False


class ManagedArena:
    def __init__(self, rt: Runtime, device: int, nbytes: int, host_node: int | None = None):
        self.rt, self.device, self.nbytes = rt, int(device), int(nbytes)
        rt.set_device(self.device)
        if not rt.concurrent_managed_access(self.device):
            raise GpuUnavailable(f"GPU {device} has no concurrent managed access "
                                 "(cudaDevAttrConcurrentManagedAccess = 0): advise and prefetch need it")
        free, _total = rt.mem_get_info()
        if self.nbytes > free:   # never ask for more managed memory than the GPU has free
            raise OSError(errno.ENOMEM, f"GPU {device}: {self.nbytes} bytes asked for, {free} free")
        self.ptr = rt.malloc_managed(self.nbytes)
        self._streams = []
        try:
            self.h2d = rt.stream_create()
            self._streams.append(self.h2d)
            self.d2h = rt.stream_create()
            self._streams.append(self.d2h)
        except BaseException:
            self._release()
            raise
        self.dev_loc = rt.location("device", self.device)
        try:
            # once for the whole arena: the GPU keeps every page mapped wherever it lives (set per move, this
            # advice on host-resident pages took 33 of a 1 GiB promotion's 72 ms on an H100)
            rt.advise(self.ptr, self.nbytes, "SetAccessedBy", self.dev_loc)
        except BaseException:
            self._release()
            raise
        self.host_note = ""
        if host_node is None:
            self.host_loc = rt.location("host")
        else:
            self.host_loc = rt.location("host_numa", host_node)
        self.host_node = host_node
        self.pref_host_loc = self.host_loc   # the preferred location of demoted blocks (see to_host)
        self._pref_checked = host_node is None
        self._buf = (ctypes.c_char * self.nbytes).from_address(self.ptr)
        self.view = memoryview(self._buf).cast("B")
        self.in_flight: deque[Move] = deque()
        self._idle_events: list = []
        self.stats = {"to_device": 0, "to_host": 0, "to_device_bytes": 0, "to_host_bytes": 0,
                      "moves_completed": 0, "read_mostly_advice": 0}

    # -- moves -----------------------------------------------------------------------------------------
    def _check(self, off: int, n: int) -> int:
        if off < 0 or n <= 0 or off + n > self.nbytes:
            raise ValueError(f"range [{off}, {off + n}) outside the managed arena of {self.nbytes} bytes")
        return self.ptr + off

    def _event(self):
        return self._idle_events.pop() if self._idle_events else self.rt.event_create()

    def _record(self, direction: str, off: int, n: int, stream) -> Move:
        ev = self._event()
        try:
            self.rt.event_record(ev, stream)
        except BaseException:
            self._idle_events.append(ev)
            raise
        m = Move(direction, off, n, ev)
        self.in_flight.append(m)
        self.stats[direction] += 1
        self.stats[direction + "_bytes"] += n
        return m

    def to_device(self, off: int, n: int) -> Move:
        ptr = self._check(off, n)
        self.rt.prefetch(ptr, n, self.dev_loc, self.h2d)
        # after the prefetch: advice on host-resident pages walks them all (measured 0.29-0.39 of pinned memcpy
        # advice first, 0.88 prefetch first at 1 GiB on an H100)
        self.rt.advise(ptr, n, "SetPreferredLocation", self.dev_loc)
        return self._record("to_device", off, n, self.h2d)

    def to_host(self, off: int, n: int) -> Move:
        ptr = self._check(off, n)
        try:
            self.rt.advise(ptr, n, "SetPreferredLocation", self.pref_host_loc)
        except CudaError as e:
            if self.host_node is None:
                raise
            # no NUMA-aware managed memory here (driver or platform): the host as a whole
            self.host_note = f"host NUMA node {self.host_node} refused ({e.name}); demoting to the host"
            self.host_node, self.host_loc = None, self.rt.location("host")
            self.pref_host_loc, self._pref_checked = self.host_loc, True
            self.rt.advise(ptr, n, "SetPreferredLocation", self.host_loc)
        if not self._pref_checked:
            self._check_numa_preference(ptr, n)
        self.rt.prefetch(ptr, n, self.host_loc, self.d2h)
        return self._record("to_host", off, n, self.d2h)

    def _check_numa_preference(self, ptr: int, n: int) -> None:
        """Once: did the host NUMA node preference take? The H100's driver (580.159) answers success and leaves
        the old preference (the GPU's) in place, while a prefetch to the node works; then demoted blocks prefer
        the host as a whole and are still prefetched to the node."""
        self._pref_checked = True
        if self.rt.range_attribute(ptr, n, "PreferredLocationType") == 3:   # cudaMemLocationTypeHostNuma
            return
        self.host_note = (f"host NUMA node {self.host_node}: the driver accepted SetPreferredLocation but did not "
                          "apply it; demoted blocks prefer the host and are prefetched to the node")
        self.pref_host_loc = self.rt.location("host")
        self.rt.advise(ptr, n, "SetPreferredLocation", self.pref_host_loc)

    def read_mostly(self, off: int, n: int, on: bool = True) -> None:
        ptr = self._check(off, n)
        self.rt.advise(ptr, n, "SetReadMostly" if on else "UnsetReadMostly", self.dev_loc)
        self.stats["read_mostly_advice"] += 1

    def poll(self) -> int:
        """Retire the moves whose events completed (the two streams finish independently); returns how many."""
        done, keep = 0, deque()
        for m in self.in_flight:
            if m.done or self.rt.event_query(m.event):
                m.done = True
                self._retire(m)
                done += 1
            else:
                keep.append(m)
        self.in_flight = keep
        return done

    def _retire(self, m: Move) -> None:
        self.stats["moves_completed"] += 1
        if len(self._idle_events) < EVENTS_KEPT:
            self._idle_events.append(m.event)
        else:
            self.rt.event_destroy(m.event)
        m.event = None

    def wait(self, m: Move) -> None:
        """Block until move m finished."""
        if not m.done and m.event is not None:
            self.rt.event_synchronize(m.event)
            m.done = True
        self.poll()

    def wait_all(self) -> None:
        for s in self._streams:
            self.rt.stream_synchronize(s)
        for m in self.in_flight:
            m.done = True
        self.poll()

    # -- copies (the copy engine: no CPU page faults on GPU-resident pages) -----------------------------
    def copy_out(self, off: int, n: int, dst_addr: int) -> None:
        self.rt.memcpy(dst_addr, self._check(off, n), n)

    def copy_in(self, off: int, src_addr: int, n: int) -> None:
        self.rt.memcpy(self._check(off, n), src_addr, n)

    def location(self, off: int, n: int) -> dict:
        """Where the range is: the GPU id, -1 (host) or -2 (mixed/unset), as cudaMemRangeGetAttribute says."""
        ptr = self._check(off, n)
        attr = self.rt.range_attribute
        # CUDA 12.2+: the cudaMemLocationType (1 device, 2 host, 3 host NUMA node) and its id. The preferred
        # location comes from them: the legacy attribute says 0 (GPU 0's id) for host NUMA node 0 on an H100
        pref_type, pref_id = attr(ptr, n, "PreferredLocationType"), attr(ptr, n, "PreferredLocationId")
        return {"last_prefetch": attr(ptr, n, "LastPrefetchLocation"),
                "preferred": pref_id if pref_type == 1 else CPU_DEVICE_ID if pref_type in (2, 3) else -2,
                "read_mostly": bool(attr(ptr, n, "ReadMostly")),
                "last_prefetch_type": attr(ptr, n, "LastPrefetchLocationType"),
                "last_prefetch_id": attr(ptr, n, "LastPrefetchLocationId"),
                "preferred_type": pref_type, "preferred_id": pref_id}

    # -- teardown --------------------------------------------------------------------------------------
    def _release(self) -> None:
        for s in self._streams:
            try:
                self.rt.stream_destroy(s)
            except CudaError:
                pass
        self._streams = []
        if self.ptr:
            self.rt.free(self.ptr)
            self.ptr = 0

    def close(self) -> None:
        if not self.ptr:
            return
        try:
            self.wait_all()
        finally:
            for ev in self._idle_events:
                try:
                    self.rt.event_destroy(ev)
                except CudaError:
                    pass
            self._idle_events = []
            try:
                self.view.release()
            except BufferError:
                pass   # a caller still holds a slice: the allocation is freed anyway below
            self._buf = None
            self._release()
