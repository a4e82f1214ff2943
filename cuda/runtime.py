"""A thin adapter over the CUDA runtime API of cuda-python (cuda.bindings.runtime), or over its stand-in.

Runtime(rt) turns every call's (cudaError_t, values...) tuple into values or a CudaError naming the call and
the CUDA error (cudaErrorMemoryAllocation, ...). `rt` is cuda.bindings.runtime on a machine with a GPU, or
kvtier.cuda.standin.StandinRuntime, which records every call and backs "managed memory" with host memory
(tests, and machines without a GPU when KVTIER_CUDA_STANDIN=1 asks for it: test-only).

Nothing here imports cuda.bindings at module import: load() does, when asked for the real runtime.
"""
from __future__ import annotations

import ctypes
import functools
import os

STANDIN_ENV = "KVTIER_CUDA_STANDIN"   # "1": GPU tier and discovery use the recording stand-in (tests only)
CPU_DEVICE_ID = -1                    # cudaCpuDeviceId: what LastPrefetchLocation says for host memory
MEM_ATTACH_GLOBAL = 1                 # cudaMemAttachGlobal: any stream may touch the allocation
EVENT_DISABLE_TIMING = 2              # cudaEventDisableTiming: completion events need no timestamps


class CudaError(OSError):
    """A CUDA runtime call failed: `call` and the CUDA error `name` (cudaErrorMemoryAllocation, ...)."""

    def __init__(self, call: str, name: str):
        super().__init__(f"{call} failed: {name}")
        self.call, self.name = call, name


class GpuUnavailable(RuntimeError):
    """No GPU tier on this machine; the message is the one-line reason discovery gave."""


def standin_enabled() -> bool:
    return os.environ.get(STANDIN_ENV, "") not in ("", "0")


def load(standin: bool | None = None) -> "Runtime":
    """The runtime adapter: the stand-in when `standin` (default: $KVTIER_CUDA_STANDIN) asks, else the real
    cuda.bindings.runtime (ImportError when cuda-python is not installed)."""
    if standin is None:
        standin = standin_enabled()
    if standin:
        from kvtier.cuda import standin as standin_mod
        return Runtime(standin_mod.instance().runtime)
    from cuda.bindings import runtime as rt
    return Runtime(rt)


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _cu_mem_range_get_attribute(attribute: int, ptr: int, nbytes: int) -> tuple[int | str, int]:
    """(error, value) of the driver's cuMemRangeGetAttribute for a 4-byte attribute, through ctypes: error is 0,
    or the CUresult's name."""
    try:
        lib = _libcuda()
    except OSError as e:
        return f"libcuda.so.1 not loadable ({e})", 0
    value = ctypes.c_int(0)
    r = lib.cuMemRangeGetAttribute(ctypes.byref(value), ctypes.c_size_t(4), ctypes.c_int(attribute),
                                   ctypes.c_uint64(ptr), ctypes.c_size_t(nbytes))
    if r == 0:
        return 0, value.value
    name = ctypes.c_char_p()
    lib.cuGetErrorName(ctypes.c_int(r), ctypes.byref(name))
    return (name.value.decode() if name.value else f"CUresult {r}"), 0


class Runtime:
    """Checked calls of the runtime API the GPU tier, its tests and bench_gpu.py use."""

    def __init__(self, rt):
        self.rt = rt
        self.is_standin = bool(getattr(rt, "IS_STANDIN", False))
        self._ok = rt.cudaError_t.cudaSuccess
        self._not_ready = rt.cudaError_t.cudaErrorNotReady
        # cuda-bindings 12.x: the cudaMemLocation forms are the _v2 calls; 13.x: the plain names take them
        self._advise = "cudaMemAdvise_v2" if hasattr(rt, "cudaMemAdvise_v2") else "cudaMemAdvise"
        self._prefetch = "cudaMemPrefetchAsync_v2" if hasattr(rt, "cudaMemPrefetchAsync_v2") else \
            "cudaMemPrefetchAsync"
        self._driver_range_attribute = getattr(rt, "cuMemRangeGetAttribute", _cu_mem_range_get_attribute)

    def _name(self, err) -> str:
        try:
            e, name = self.rt.cudaGetErrorName(err)
            if e == self._ok and name:
                return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:   # the name is only for the message
            pass
        return getattr(err, "name", str(err))

    def _call(self, call: str, *args):
        err, *values = getattr(self.rt, call)(*args)
        if err != self._ok:
            raise CudaError(call, self._name(err))
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    # -- device ----------------------------------------------------------------------------------------
    def set_device(self, device: int) -> None:
        self._call("cudaSetDevice", device)

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device."""
        free, total = self._call("cudaMemGetInfo")
        return int(free), int(total)

    def concurrent_managed_access(self, device: int) -> bool:
        """Whether the device supports advise/prefetch of managed memory (Linux, Pascal or newer)."""
        attr = self.rt.cudaDeviceAttr.cudaDevAttrConcurrentManagedAccess
        return bool(self._call("cudaDeviceGetAttribute", attr, device))

    # -- memory ----------------------------------------------------------------------------------------
    def malloc_managed(self, nbytes: int) -> int:
        return int(self._call("cudaMallocManaged", nbytes, MEM_ATTACH_GLOBAL))

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", nbytes))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def malloc_host(self, nbytes: int) -> int:
        return int(self._call("cudaMallocHost", nbytes))

    def free_host(self, ptr: int) -> None:
        self._call("cudaFreeHost", ptr)

    def memcpy(self, dst: int, src: int, nbytes: int, stream=None) -> None:
        """cudaMemcpyDefault: the driver tells host, device and managed pointers apart (UVA)."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDefault
        if stream is None:
            self._call("cudaMemcpy", dst, src, nbytes, kind)
        else:
            self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)

    # -- placement -------------------------------------------------------------------------------------
    def location(self, where: str, ident: int = 0):
        """A cudaMemLocation: where = "device" (ident: the GPU), "host", or "host_numa" (ident: the node)."""
        loc = self.rt.cudaMemLocation()
        t = self.rt.cudaMemLocationType
        loc.type = {"device": t.cudaMemLocationTypeDevice, "host": t.cudaMemLocationTypeHost,
                    "host_numa": t.cudaMemLocationTypeHostNuma}[where]
        loc.id = int(ident) if where != "host" else 0
        return loc

    def advise(self, ptr: int, nbytes: int, advice: str, loc) -> None:
        """advice: a cudaMemoryAdvise name without its prefix, e.g. "SetPreferredLocation"."""
        self._call(self._advise, ptr, nbytes, getattr(self.rt.cudaMemoryAdvise, "cudaMemAdvise" + advice), loc)

    def prefetch(self, ptr: int, nbytes: int, loc, stream) -> None:
        self._call(self._prefetch, ptr, nbytes, loc, 0, stream)

    def range_attribute(self, ptr: int, nbytes: int, attribute: str) -> int:
        """An int-valued cudaMemRangeAttribute (name without its prefix, e.g. "LastPrefetchLocation"); for
        AccessedBy (a list of device ids) the first one."""
        attr = getattr(self.rt.cudaMemRangeAttribute, "cudaMemRangeAttribute" + attribute)
        try:
            v = self._call("cudaMemRangeGetAttribute", 4, attr, ptr, nbytes)
        except TypeError:
            # cuda-bindings wraps only CUDA 11's attributes ("Unsupported attribute" for the rest); CUDA 12.2's
            # ...Type/...Id pairs come from the driver's cuMemRangeGetAttribute (same enum values)
            err, v = self._driver_range_attribute(int(attr), ptr, nbytes)
            if err != 0:
                raise CudaError("cuMemRangeGetAttribute", err) from None
        return int(v[0]) if isinstance(v, (list, tuple)) else int(v)

    # -- streams and events ----------------------------------------------------------------------------
    def stream_create(self):
        return self._call("cudaStreamCreate")

    def stream_destroy(self, stream) -> None:
        self._call("cudaStreamDestroy", stream)

    def stream_synchronize(self, stream) -> None:
        self._call("cudaStreamSynchronize", stream)

    def event_create(self, timing: bool = False):
        if timing:
            return self._call("cudaEventCreate")
        return self._call("cudaEventCreateWithFlags", EVENT_DISABLE_TIMING)

    def event_destroy(self, event) -> None:
        self._call("cudaEventDestroy", event)

    def event_record(self, event, stream) -> None:
        self._call("cudaEventRecord", event, stream)

    def event_query(self, event) -> bool:
        """True once the work before the event finished; False while it runs (cudaErrorNotReady)."""
        err, *_ = self.rt.cudaEventQuery(event)
        if err == self._ok:
            return True
        if err == self._not_ready:
            return False
        raise CudaError("cudaEventQuery", self._name(err))

    def event_synchronize(self, event) -> None:
        self._call("cudaEventSynchronize", event)

    def event_elapsed_ms(self, start, end) -> float:
        return float(self._call("cudaEventElapsedTime", start, end))

    def device_synchronize(self) -> None:
        self._call("cudaDeviceSynchronize")
