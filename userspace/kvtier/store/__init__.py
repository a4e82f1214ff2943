"""kvtier.store: the daemon's tier backends behind one interface.

- `Tier` (base.py): the contract every tier keeps -- 16-byte keys, bytes-like values, an xxh3_64
  checksum of the original bytes verified on every get from disk, and on a memory get once recorded
  (MemoryTier checksums lazily by default) (`ChecksumError`, errno EIO, block dropped),
  a capacity that is never exceeded (`OSError(ENOSPC)`), stats().
- `MemoryTier` (memory.py): DRAM/CXL arenas (memfd + mbind, or kvtier.ko regions) with a zero-copy
  reserve/commit/locate API for clients that map the arena, and `migrate_to(node)`.
- `NvmeTier` (nvme.py): the cold store; O_DIRECT data arena + append-only, CRC'd, fsync'd index log,
  crash-safe, optional compression/quantisation through a `Codec`; a caller header kept apart from
  the data so aligned buffers go to / come from disk without a copy; put_many() group commits.
- `Codec`, `KVLayout`, `codec_from_config` (codec.py): none/zstd/lz4 lossless, KIVI-style int8/int4.
"""
from kvtier.store.base import ChecksumError, ErrorBoundExceeded, Slot, Tier, checksum
from kvtier.store.codec import Codec, KVLayout, codec_from_config, measure_error
from kvtier.store.memory import MemoryTier
from kvtier.store.nvme import NvmeTier

__all__ = ["Tier", "MemoryTier", "NvmeTier", "Codec", "KVLayout", "Slot", "ChecksumError",
           "ErrorBoundExceeded", "codec_from_config", "measure_error", "checksum"]
