"""The contract every tier keeps, and what they share: keys, checksums, errors, counters."""
from __future__ import annotations

import errno
import threading
from abc import ABC, abstractmethod
from typing import NamedTuple

import xxhash

KEY_BYTES = 16


def checksum(data) -> int:
    """xxh3_64 of the original (pre-codec) bytes: what every tier records and verifies."""
    return xxhash.xxh3_64_intdigest(data)


class ChecksumError(OSError):
    """A stored block no longer matches its checksum; the tier has dropped it (errno EIO)."""

    def __init__(self, tier: str, key: bytes, detail: str = "checksum mismatch"):
        super().__init__(errno.EIO, f"tier {tier}: block {key.hex()}: {detail}; block dropped")
        self.tier = tier
        self.key = key


class ErrorBoundExceeded(ValueError):
    """A quantising codec measured more error than the tier's bound allows; store it lossless instead."""

    def __init__(self, message: str, error: dict):
        super().__init__(message)
        self.error = error


class Slot(NamedTuple):
    """Where a block lives in a MemoryTier: arena index (into arenas()), byte offset, length."""
    arena: int
    offset: int
    nbytes: int


def check_key(key) -> bytes:
    if type(key) is bytes and len(key) == KEY_BYTES:
        return key   # the common case, first: this runs several times per put and get
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"a block key is {KEY_BYTES} bytes, got {type(key).__name__} "
                         f"of length {len(key) if hasattr(key, '__len__') else '?'}")
    return bytes(key)


def enospc(tier: str, nbytes: int, used: int, capacity: int) -> OSError:
    return OSError(errno.ENOSPC, f"tier {tier}: no room for {nbytes} bytes "
                                 f"({used} of {capacity} bytes in use)")


class Tier(ABC):
    """One storage tier. Thread-safe: methods may be called from several threads.

    put() stores a copy (overwriting an existing key is allowed) and returns the bytes it occupies
    after the codec; get() returns the original bytes or raises KeyError / ChecksumError.
    """

    name: str
    kind: str  # "gpu" | "dram" | "cxl" | "nvme"
    capacity_bytes: int

    def __init__(self, name: str, kind: str, capacity_bytes: int):
        if kind not in ("gpu", "dram", "cxl", "nvme", "cluster"):
            raise ValueError(f"tier {name}: kind must be gpu, dram, cxl, nvme or cluster, not {kind!r}")
        if int(capacity_bytes) <= 0:
            raise ValueError(f"tier {name}: capacity_bytes must be positive, not {capacity_bytes}")
        self.name = name
        self.kind = kind
        self.capacity_bytes = int(capacity_bytes)
        self._lock = threading.RLock()
        self._stats = {"puts": 0, "gets": 0, "hits": 0, "misses": 0, "deletes": 0,
                       "bytes_in": 0, "bytes_out": 0, "stored_bytes_in": 0,
                       "checksum_failures": 0, "enospc": 0}

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes taken from capacity (allocated extents, not just logical lengths)."""

    @abstractmethod
    def put(self, key: bytes, data) -> int: ...

    @abstractmethod
    def get(self, key: bytes) -> bytes: ...

    @abstractmethod
    def get_into(self, key: bytes, out: memoryview) -> int:
        """Copy the block into `out` (at least as long as the block); returns its length."""

    @abstractmethod
    def contains(self, key: bytes) -> bool: ...

    @abstractmethod
    def delete(self, key: bytes) -> bool: ...

    @abstractmethod
    def keys(self) -> list[bytes]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    def reserved_count(self) -> int:
        """Slots reserved and not yet committed (a tier that reserves before the bytes arrive overrides this)."""
        return 0

    def __contains__(self, key) -> bool:
        return self.contains(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._stats)
            out.update(name=self.name, kind=self.kind, capacity_bytes=self.capacity_bytes,
                       used_bytes=self.used_bytes, blocks=len(self))
            return out
