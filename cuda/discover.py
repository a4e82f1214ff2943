"""GPU discovery through cuda-python's driver API (cuda.bindings.driver).

discover_gpus() returns a GpuReport: the GPUs with their total and free HBM bytes, or, when there are
none, a one-line reason (cuda-python not installed, driver library not found, the cuInit error name,
no devices). It never raises for a missing GPU stack: the HBM tier is optional.

cuda.bindings is imported inside discover_gpus(), never at module import, so `kvctl` starts fast
on machines with or without it.
"""
from __future__ import annotations

import os

from dataclasses import asdict, dataclass, field

_NAME_LEN = 256


@dataclass
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass
class GpuReport:
    present: bool
    gpus: list[Gpu] = field(default_factory=list)
    reason: str | None = None       # why there are no GPUs (None when present)

    def to_dict(self) -> dict:
        out = {"present": self.present, "gpus": [asdict(g) for g in self.gpus]}
        if self.reason is not None:
            out["reason"] = self.reason
        return out


class _CudaError(Exception):
    def __init__(self, call: str, name: str):
        super().__init__(f"{call} failed: {name}")
        self.call, self.name = call, name


def _import_driver():
    # cuda/ has no __init__.py on purpose: run from the repository root, it joins cuda-python's `cuda`
    # namespace package instead of hiding it.
    from cuda.bindings import driver
    return driver


def _error_name(driver, err) -> str:
    try:
        ret, name = driver.cuGetErrorName(err)
        if ret == driver.CUresult.CUDA_SUCCESS and name:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is only for the message; fall back to the enum's own
        pass
    return getattr(err, "name", str(err))


def _call(driver, call: str, result):
    """Unpack a cuda.bindings result tuple (CUresult, values...), raising _CudaError on failure."""
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        raise _CudaError(call, _error_name(driver, err))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def _probe(driver, index: int) -> Gpu:
    dev = _call(driver, "cuDeviceGet", driver.cuDeviceGet(index))
    raw = _call(driver, "cuDeviceGetName", driver.cuDeviceGetName(_NAME_LEN, dev))
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    total = int(_call(driver, "cuDeviceTotalMem", driver.cuDeviceTotalMem(dev)))
    # cuMemGetInfo needs a current context: borrow the primary one and give it back, so this probe
    # leaves no context behind (and does not create a second one next to the engine's).
    ctx = _call(driver, "cuDevicePrimaryCtxRetain", driver.cuDevicePrimaryCtxRetain(dev))
    try:
        _call(driver, "cuCtxPushCurrent", driver.cuCtxPushCurrent(ctx))
        try:
            free, _total = _call(driver, "cuMemGetInfo", driver.cuMemGetInfo())
        finally:
            driver.cuCtxPopCurrent()
    finally:
        driver.cuDevicePrimaryCtxRelease(dev)
    return Gpu(index=index, name=name, total_bytes=total, free_bytes=int(free))


def discover_gpus(driver=None) -> GpuReport:
    """The GPUs the CUDA driver sees, or why there are none. `driver` replaces cuda.bindings.driver (tests);
    KVTIER_CUDA_STANDIN=1 (test-only) answers for the stand-in GPU of kvtier.cuda.standin instead."""
    if driver is None and os.environ.get("KVTIER_CUDA_STANDIN", "") not in ("", "0"):
        from kvtier.cuda import standin
        driver = standin.instance().driver
    if driver is None:
        try:
            driver = _import_driver()
        except ImportError as exc:
            return GpuReport(False, reason=f"cuda-python not installed ({_one_line(exc)})")
    try:
        err, = driver.cuInit(0)
    except Exception as exc:  # cuda-pathfinder raises its own error types when libcuda.so is absent
        return GpuReport(False, reason=f"driver library not found: {_one_line(exc)}")
    if err != driver.CUresult.CUDA_SUCCESS:
        name = _error_name(driver, err)
        if name == "CUDA_ERROR_NO_DEVICE":
            return GpuReport(False, reason="no devices (cuInit: CUDA_ERROR_NO_DEVICE)")
        return GpuReport(False, reason=f"cuInit failed: {name}")
    try:
        count = int(_call(driver, "cuDeviceGetCount", driver.cuDeviceGetCount()))
        if count == 0:
            return GpuReport(False, reason="no devices")
        return GpuReport(True, gpus=[_probe(driver, i) for i in range(count)])
    except _CudaError as exc:
        return GpuReport(False, reason=str(exc))
