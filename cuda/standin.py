"""A recording stand-in for the CUDA runtime and driver APIs that kvtier.cuda uses (tests only).

StandinRuntime has the names of cuda.bindings.runtime that kvtier.cuda.runtime.Runtime calls, with the same
(error, values...) results and enum values, and records every call in `calls`. "Managed memory" is anonymous
host memory (mmap), so data written through the CPU or cudaMemcpy really lands and can be checked; advice and
prefetches are kept per page, so cudaMemRangeGetAttribute answers as a GPU would (the location every page of
the range agrees on, else cudaInvalidDeviceId). Events complete at once, or after `pending_queries`
cudaEventQuery calls answered cudaErrorNotReady (to test waiting). Allocations beyond the stand-in GPU's free
memory fail with cudaErrorMemoryAllocation, as on a GPU.

StandinDriver answers kvtier.cuda.discover's driver calls for the same stand-in GPU(s), so discovery takes
its one code path. KVTIER_CUDA_STANDIN=1 makes kvtierd and kvctl use instance() (test-only); its GPU has
KVTIER_CUDA_STANDIN_TOTAL_BYTES (default 1 GiB) of memory, of which KVTIER_CUDA_STANDIN_USED_BYTES (default 0)
are taken by "other processes".
"""
from __future__ import annotations

import ctypes
import enum
import mmap
import os
import threading
import time
import types

import numpy as np

PAGE_BYTES = mmap.PAGESIZE
CPU_DEVICE_ID = -1
INVALID_DEVICE_ID = -2
TOTAL_ENV = "KVTIER_CUDA_STANDIN_TOTAL_BYTES"
USED_ENV = "KVTIER_CUDA_STANDIN_USED_BYTES"
NAME = "kvtier stand-in GPU"


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600


class cudaMemoryAdvise(enum.IntEnum):
    cudaMemAdviseSetReadMostly = 1
    cudaMemAdviseUnsetReadMostly = 2
    cudaMemAdviseSetPreferredLocation = 3
    cudaMemAdviseUnsetPreferredLocation = 4
    cudaMemAdviseSetAccessedBy = 5
    cudaMemAdviseUnsetAccessedBy = 6


class cudaMemRangeAttribute(enum.IntEnum):
    cudaMemRangeAttributeReadMostly = 1
    cudaMemRangeAttributePreferredLocation = 2
    cudaMemRangeAttributeAccessedBy = 3
    cudaMemRangeAttributeLastPrefetchLocation = 4
    cudaMemRangeAttributePreferredLocationType = 5
    cudaMemRangeAttributePreferredLocationId = 6
    cudaMemRangeAttributeLastPrefetchLocationType = 7
    cudaMemRangeAttributeLastPrefetchLocationId = 8


class cudaMemLocationType(enum.IntEnum):
    cudaMemLocationTypeInvalid = 0
    cudaMemLocationTypeDevice = 1
    cudaMemLocationTypeHost = 2
    cudaMemLocationTypeHostNuma = 3


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyDefault = 4


class cudaDeviceAttr(enum.IntEnum):
    cudaDevAttrConcurrentManagedAccess = 89


class cudaMemLocation:
    def __init__(self):
        self.type = cudaMemLocationType.cudaMemLocationTypeInvalid
        self.id = 0


def describe(loc) -> tuple:
    """A cudaMemLocation as a plain tuple: ("device", 0), ("host", 0), ("host_numa", 1)."""
    t = int(loc.type)
    return ({1: "device", 2: "host", 3: "host_numa"}.get(t, f"type{t}"), int(loc.id) if t != 2 else 0)


class _Managed:
    """One cudaMallocManaged allocation: host memory plus per-page placement state."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.buf = mmap.mmap(-1, max(nbytes, 1))
        self.ptr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        pages = (nbytes + PAGE_BYTES - 1) // PAGE_BYTES
        self.pref_type = np.zeros(pages, np.int32)   # cudaMemLocationType; 0: no preference
        self.pref_id = np.zeros(pages, np.int32)
        self.last_type = np.zeros(pages, np.int32)   # 0: never prefetched
        self.last_id = np.zeros(pages, np.int32)
        self.read_mostly = np.zeros(pages, np.bool_)
        self.accessed_by = np.zeros(pages, np.int64)   # bit per device


class _Event:
    def __init__(self, timing: bool):
        self.timing = timing
        self.recorded = False
        self.pending = 0
        self.time_s = 0.0


class StandinRuntime:
    """The cuda.bindings.runtime calls kvtier.cuda uses, recorded in `calls` (name, args...)."""

    IS_STANDIN = True
    cudaError_t = cudaError_t
    cudaMemoryAdvise = cudaMemoryAdvise
    cudaMemRangeAttribute = cudaMemRangeAttribute
    cudaMemLocationType = cudaMemLocationType
    cudaMemLocation = cudaMemLocation
    cudaMemcpyKind = cudaMemcpyKind
    cudaDeviceAttr = cudaDeviceAttr

    def __init__(self, devices: int = 1, total_bytes: int = 1 << 30, used_elsewhere_bytes: int = 0,
                 pending_queries: int = 0, managed_access: bool = True, numa_preference_ignored: bool = False):
        self.devices = devices
        # as an H100's driver 580.159: SetPreferredLocation(host NUMA node) answers success and changes nothing
        self.numa_preference_ignored = numa_preference_ignored
        self.total_bytes = total_bytes
        self.used_elsewhere_bytes = used_elsewhere_bytes
        self.pending_queries = pending_queries
        self.managed_access = managed_access
        self.calls: list[tuple] = []
        self.current = 0
        self.managed: dict[int, _Managed] = {}
        self.plain: dict[int, tuple] = {}   # cudaMalloc / cudaMallocHost: ptr -> (mmap, nbytes, is_device)
        self.streams: set[int] = set()
        self.events: dict[int, _Event] = {}
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _rec(self, *call) -> None:
        with self._lock:
            self.calls.append(call)

    def calls_named(self, *names) -> list[tuple]:
        return [c for c in self.calls if c[0] in names]

    def device_used_bytes(self) -> int:
        return (sum(m.nbytes for m in self.managed.values()) +
                sum(n for _, n, dev in self.plain.values() if dev) + self.used_elsewhere_bytes)

    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.device_used_bytes())

    def _find(self, ptr: int, nbytes: int):
        """(allocation, first page, end page) of a range inside one managed allocation, else None."""
        for m in self.managed.values():
            if m.ptr <= ptr and ptr + nbytes <= m.ptr + m.nbytes and nbytes > 0:
                off = ptr - m.ptr
                return m, off // PAGE_BYTES, (off + nbytes + PAGE_BYTES - 1) // PAGE_BYTES
        return None

    def _valid_loc(self, loc) -> bool:
        kind, ident = describe(loc)
        if kind == "device":
            return 0 <= ident < self.devices
        return kind in ("host", "host_numa") and ident >= 0

    # -- runtime API -----------------------------------------------------------------------------------
    def cudaGetErrorName(self, err):
        return cudaError_t.cudaSuccess, cudaError_t(int(err)).name.encode()

    def cudaSetDevice(self, device):
        self._rec("cudaSetDevice", device)
        if not 0 <= device < self.devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        self.current = device
        return (cudaError_t.cudaSuccess,)

    def cudaMemGetInfo(self):
        self._rec("cudaMemGetInfo")
        return cudaError_t.cudaSuccess, self.free_bytes(), self.total_bytes

    def cudaDeviceGetAttribute(self, attr, device):
        self._rec("cudaDeviceGetAttribute", int(attr), device)
        if not 0 <= device < self.devices:
            return cudaError_t.cudaErrorInvalidDevice, None
        return cudaError_t.cudaSuccess, int(self.managed_access)

    def cudaMallocManaged(self, nbytes, flags):
        self._rec("cudaMallocManaged", nbytes, flags)
        if nbytes <= 0:
            return cudaError_t.cudaErrorInvalidValue, None
        if nbytes > self.free_bytes():
            return cudaError_t.cudaErrorMemoryAllocation, None
        m = _Managed(nbytes)
        self.managed[m.ptr] = m
        return cudaError_t.cudaSuccess, m.ptr

    def _plain_alloc(self, call, nbytes, device):
        self._rec(call, nbytes)
        if nbytes <= 0:
            return cudaError_t.cudaErrorInvalidValue, None
        if device and nbytes > self.free_bytes():
            return cudaError_t.cudaErrorMemoryAllocation, None
        buf = mmap.mmap(-1, nbytes)
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self.plain[ptr] = (buf, nbytes, device)
        return cudaError_t.cudaSuccess, ptr

    def cudaMalloc(self, nbytes):
        return self._plain_alloc("cudaMalloc", nbytes, True)

    def cudaMallocHost(self, nbytes):
        return self._plain_alloc("cudaMallocHost", nbytes, False)

    def _release(self, call, ptr, table):
        self._rec(call, ptr)
        entry = table.pop(ptr, None)
        if entry is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        buf = entry.buf if isinstance(entry, _Managed) else entry[0]
        try:
            buf.close()
        except BufferError:   # a memoryview of it is still alive: the mapping goes with the last one
            pass
        return (cudaError_t.cudaSuccess,)

    def cudaFree(self, ptr):
        if ptr in self.managed:
            return self._release("cudaFree", ptr, self.managed)
        return self._release("cudaFree", ptr, self.plain)

    def cudaFreeHost(self, ptr):
        return self._release("cudaFreeHost", ptr, self.plain)

    def cudaMemcpy(self, dst, src, nbytes, kind):
        self._rec("cudaMemcpy", dst, src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self._rec("cudaMemcpyAsync", dst, src, nbytes, stream)
        if stream not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        ctypes.memmove(dst, src, nbytes)
        return (cudaError_t.cudaSuccess,)

    def cudaMemAdvise(self, ptr, nbytes, advice, loc):
        advice = cudaMemoryAdvise(int(advice))
        self._rec("cudaMemAdvise", ptr, nbytes, advice.name[len("cudaMemAdvise"):], describe(loc))
        hit = self._find(ptr, nbytes)
        if hit is None or not self._valid_loc(loc):
            return (cudaError_t.cudaErrorInvalidValue,)
        m, a, b = hit
        kind, ident = describe(loc)
        A = cudaMemoryAdvise
        if advice == A.cudaMemAdviseSetPreferredLocation:
            if self.numa_preference_ignored and kind == "host_numa":
                return (cudaError_t.cudaSuccess,)
            m.pref_type[a:b], m.pref_id[a:b] = int(loc.type), ident
        elif advice == A.cudaMemAdviseUnsetPreferredLocation:
            m.pref_type[a:b] = 0
        elif advice in (A.cudaMemAdviseSetReadMostly, A.cudaMemAdviseUnsetReadMostly):
            m.read_mostly[a:b] = advice == A.cudaMemAdviseSetReadMostly
        elif kind == "device":   # accessed-by only names devices
            bit = 1 << ident
            if advice == A.cudaMemAdviseSetAccessedBy:
                m.accessed_by[a:b] |= bit
            else:
                m.accessed_by[a:b] &= ~bit
        else:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def cudaMemPrefetchAsync(self, ptr, nbytes, loc, flags, stream):
        self._rec("cudaMemPrefetchAsync", ptr, nbytes, describe(loc), stream)
        hit = self._find(ptr, nbytes)
        if hit is None or not self._valid_loc(loc) or flags != 0:
            return (cudaError_t.cudaErrorInvalidValue,)
        if stream not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        m, a, b = hit
        m.last_type[a:b], m.last_id[a:b] = int(loc.type), describe(loc)[1]
        return (cudaError_t.cudaSuccess,)

    @staticmethod
    def _agreed(types, ids) -> tuple[int, int] | None:
        """The (type, id) every page agrees on, else None."""
        if len(types) == 0 or (types != types[0]).any() or (ids != ids[0]).any():
            return None
        return int(types[0]), int(ids[0])

    def cudaMemRangeGetAttribute(self, size, attribute, ptr, nbytes):
        attribute = cudaMemRangeAttribute(int(attribute))
        if attribute >= cudaMemRangeAttribute.cudaMemRangeAttributePreferredLocationType:
            # as cuda-bindings 12.x and 13.x: its wrapper knows only CUDA 11's attributes
            raise TypeError(f"Unsupported attribute: {attribute.name}")
        return self._range_attribute(size, attribute, ptr, nbytes)

    def cuMemRangeGetAttribute(self, attribute: int, ptr: int, nbytes: int) -> tuple[int | str, int]:
        """The driver's call as kvtier.cuda.runtime reaches it through ctypes: (0 or the error's name, value)."""
        err, v = self._range_attribute(4, cudaMemRangeAttribute(int(attribute)), ptr, nbytes)
        return (0, v) if err == cudaError_t.cudaSuccess else ("CUDA_ERROR_INVALID_VALUE", 0)

    def _range_attribute(self, size, attribute, ptr, nbytes):
        self._rec("cudaMemRangeGetAttribute", attribute.name[len("cudaMemRangeAttribute"):], ptr, nbytes)
        hit = self._find(ptr, nbytes)
        if hit is None or size != 4:
            return cudaError_t.cudaErrorInvalidValue, None
        m, a, b = hit
        R = cudaMemRangeAttribute
        if attribute == R.cudaMemRangeAttributeReadMostly:
            return cudaError_t.cudaSuccess, int(bool(m.read_mostly[a:b].all()))
        if attribute == R.cudaMemRangeAttributeAccessedBy:   # a list, as cuda-python returns it (4 bytes: one id)
            bits = int(np.bitwise_and.reduce(m.accessed_by[a:b]))
            return cudaError_t.cudaSuccess, [(bits & -bits).bit_length() - 1 if bits else INVALID_DEVICE_ID]
        if attribute in (R.cudaMemRangeAttributePreferredLocation, R.cudaMemRangeAttributePreferredLocationType,
                         R.cudaMemRangeAttributePreferredLocationId):
            agreed = self._agreed(m.pref_type[a:b], m.pref_id[a:b])
            legacy = attribute == R.cudaMemRangeAttributePreferredLocation
        else:
            agreed = self._agreed(m.last_type[a:b], m.last_id[a:b])
            legacy = attribute == R.cudaMemRangeAttributeLastPrefetchLocation
        if legacy:   # a device id, cudaCpuDeviceId for host memory, cudaInvalidDeviceId when unset or mixed
            if agreed is None or agreed[0] == 0:
                return cudaError_t.cudaSuccess, INVALID_DEVICE_ID
            return cudaError_t.cudaSuccess, agreed[1] if agreed[0] == 1 else CPU_DEVICE_ID
        if attribute.name.endswith("Type"):
            return cudaError_t.cudaSuccess, agreed[0] if agreed else 0
        return cudaError_t.cudaSuccess, agreed[1] if agreed else 0

    def cudaStreamCreate(self):
        self._rec("cudaStreamCreate")
        s = next(self._ids)
        self.streams.add(s)
        return cudaError_t.cudaSuccess, s

    def cudaStreamDestroy(self, stream):
        self._rec("cudaStreamDestroy", stream)
        if stream not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self.streams.discard(stream)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        self._rec("cudaStreamSynchronize", stream)
        for e in self.events.values():
            e.pending = 0
        return (cudaError_t.cudaSuccess,)

    def cudaDeviceSynchronize(self):
        self._rec("cudaDeviceSynchronize")
        for e in self.events.values():
            e.pending = 0
        return (cudaError_t.cudaSuccess,)

    def _event_create(self, call, timing, *args):
        self._rec(call, *args)
        e = next(self._ids)
        self.events[e] = _Event(timing)
        return cudaError_t.cudaSuccess, e

    def cudaEventCreate(self):
        return self._event_create("cudaEventCreate", True)

    def cudaEventCreateWithFlags(self, flags):
        return self._event_create("cudaEventCreateWithFlags", not flags & 2, flags)

    def cudaEventDestroy(self, event):
        self._rec("cudaEventDestroy", event)
        if self.events.pop(event, None) is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        return (cudaError_t.cudaSuccess,)

    def cudaEventRecord(self, event, stream):
        self._rec("cudaEventRecord", event, stream)
        e = self.events.get(event)
        if e is None or stream not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        e.recorded, e.pending, e.time_s = True, self.pending_queries, time.perf_counter()
        return (cudaError_t.cudaSuccess,)

    def cudaEventQuery(self, event):
        self._rec("cudaEventQuery", event)
        e = self.events.get(event)
        if e is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if e.pending > 0:
            e.pending -= 1
            return (cudaError_t.cudaErrorNotReady,)
        return (cudaError_t.cudaSuccess,)

    def cudaEventSynchronize(self, event):
        self._rec("cudaEventSynchronize", event)
        e = self.events.get(event)
        if e is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        e.pending = 0
        return (cudaError_t.cudaSuccess,)

    def cudaEventElapsedTime(self, start, end):
        self._rec("cudaEventElapsedTime", start, end)
        a, b = self.events.get(start), self.events.get(end)
        if a is None or b is None or not (a.timing and b.timing and a.recorded and b.recorded):
            return cudaError_t.cudaErrorInvalidResourceHandle, None
        return cudaError_t.cudaSuccess, (b.time_s - a.time_s) * 1e3


class StandinDriver:
    """The driver calls kvtier.cuda.discover makes, answered for a StandinRuntime's GPU(s)."""

    def __init__(self, runtime: StandinRuntime):
        self.rt = runtime
        self.CUresult = types.SimpleNamespace(CUDA_SUCCESS=0)   # CUresult and cudaError_t share these codes
        self._ctx = []

    def cuGetErrorName(self, err):
        return 0, cudaError_t(int(err)).name.encode()

    def cuInit(self, flags):
        return (cudaError_t.cudaSuccess if self.rt.devices else cudaError_t.cudaErrorNoDevice,)

    def cuDeviceGetCount(self):
        return 0, self.rt.devices

    def cuDeviceGet(self, i):
        return (0, i) if 0 <= i < self.rt.devices else (cudaError_t.cudaErrorInvalidDevice, None)

    def cuDeviceGetName(self, length, dev):
        return 0, f"{NAME} {dev}".encode()[:length - 1].ljust(length, b"\0")

    def cuDeviceTotalMem(self, dev):
        return 0, self.rt.total_bytes

    def cuDevicePrimaryCtxRetain(self, dev):
        return 0, dev

    def cuDevicePrimaryCtxRelease(self, dev):
        return (0,)

    def cuCtxPushCurrent(self, ctx):
        self._ctx.append(ctx)
        return (0,)

    def cuCtxPopCurrent(self):
        return 0, self._ctx.pop() if self._ctx else None

    def cuMemGetInfo(self):
        return 0, self.rt.free_bytes(), self.rt.total_bytes


class Standin:
    def __init__(self, **kw):
        self.runtime = StandinRuntime(**kw)
        self.driver = StandinDriver(self.runtime)


_instance: Standin | None = None
_instance_lock = threading.Lock()


def instance() -> Standin:
    """The process's stand-in GPU (KVTIER_CUDA_STANDIN=1): discovery and the GPU tier share its memory."""
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = Standin(total_bytes=int(os.environ.get(TOTAL_ENV, 1 << 30)),
                                used_elsewhere_bytes=int(os.environ.get(USED_ENV, 0)))
        return _instance


def reset(**kw) -> Standin:
    """A fresh process stand-in (tests)."""
    global _instance
    with _instance_lock:
        _instance = Standin(**kw)
        return _instance
