"""Python side of kvtier.ko's /dev/kvtier: regions, tags, migration, sharing, queries, grants, statistics.

Every call goes through the cffi binding of the module's own uapi header (kvtier._native, built from
kmod/include/uapi/linux/kvtier.h), so struct layouts and ioctl numbers come from the compiler, never from
this file. A failed ioctl raises OSError(errno, "<ioctl name>: <strerror>").

    with Device() as dev:
        region = dev.create_region(64 << 20, 2 << 20, node=0, tags=Tags(tenant_id=7, session_id=42))
        buf = dev.mmap(region)
        buf[:5] = b"hello"
        bytes_moved, blocks_moved = dev.migrate(region.id, 0, region.nr_blocks, node=1)
"""
from __future__ import annotations

import dataclasses
import errno as _errno
import mmap as _mmap
import os
from collections.abc import Mapping
from typing import NamedTuple

from kvtier._native import ffi, lib

DEVICE_PATH = "/dev/kvtier"
SYSFS_MODULE = "/sys/module/kvtier"
GENL_NAME = "kvtier"            # KVTIER_GENL_NAME (string macros are not in the cffi binding)
GENL_MCGRP_EVENTS = "events"    # KVTIER_GENL_MCGRP_EVENTS

# Every integer KVTIER_* constant of the header, without the prefix: BLOCK_PREFIX, PRIO_DECODE,
# FEATURE_SHARE, TAG_SESSION, IOC_MIGRATE, CMD_REGION_GET, A_REGION_ID, ...
_CONSTANTS = {name[len("KVTIER_"):]: getattr(lib, name) for name in dir(lib) if name.startswith("KVTIER_")}
globals().update(_CONSTANTS)

API_VERSION = lib.KVTIER_API_VERSION
MAX_NODES = lib.KVTIER_MAX_NODES
NODE_NONE = lib.KVTIER_NODE_NONE
MMAP_SHIFT = lib.KVTIER_MMAP_SHIFT

# ioctl command number -> name, for error messages and the API handshake's command bitmask.
IOCTLS = {value: f"KVTIER_{name}" for name, value in _CONSTANTS.items() if name.startswith("IOC_")
          and name != "IOC_MAGIC"}

BLOCK_TYPE_NAMES = {lib.KVTIER_BLOCK_UNKNOWN: "unknown", lib.KVTIER_BLOCK_PREFIX: "prefix",
                    lib.KVTIER_BLOCK_HISTORY: "history", lib.KVTIER_BLOCK_GENERATED: "generated"}
PRIORITY_NAMES = {lib.KVTIER_PRIO_IDLE: "idle", lib.KVTIER_PRIO_NORMAL: "normal",
                  lib.KVTIER_PRIO_DECODE: "decode"}

_TAG_FIELDS = ("tenant_id", "session_id", "layer_first", "layer_count", "head_first", "head_count",
               "block_type", "priority")
# Which KVTIER_TAG_* bit a tag field belongs to (tenant_id has none: it is fixed at creation).
_TAG_MASK_OF = {"session_id": lib.KVTIER_TAG_SESSION, "layer_first": lib.KVTIER_TAG_LAYERS,
                "layer_count": lib.KVTIER_TAG_LAYERS, "head_first": lib.KVTIER_TAG_HEADS,
                "head_count": lib.KVTIER_TAG_HEADS, "block_type": lib.KVTIER_TAG_TYPE,
                "priority": lib.KVTIER_TAG_PRIORITY}


@dataclasses.dataclass(frozen=True)
class Tags:
    """What a region holds (struct kvtier_tags). layer_count/head_count 0 mean all layers/heads."""

    tenant_id: int = 0
    session_id: int = 0
    layer_first: int = 0
    layer_count: int = 0
    head_first: int = 0
    head_count: int = 0
    block_type: int = lib.KVTIER_BLOCK_UNKNOWN
    priority: int = lib.KVTIER_PRIO_NORMAL

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Region(NamedTuple):
    """A region this fd holds a reference on: its id and where to mmap it."""

    id: int
    mmap_offset: int
    size_bytes: int
    block_bytes: int

    @property
    def nr_blocks(self) -> int:
        return self.size_bytes // self.block_bytes


class BlockState(NamedTuple):
    """One block of a region (struct kvtier_block_state)."""

    node: int            # NODE_NONE (-1) when no page is allocated yet
    flags: int           # BLOCK_POPULATED / BLOCK_PARTIAL / BLOCK_SHARED
    block_type: int
    priority: int
    faults: int
    migrations: int

    @property
    def populated(self) -> bool:
        return bool(self.flags & lib.KVTIER_BLOCK_POPULATED)

    @property
    def partial(self) -> bool:
        return bool(self.flags & lib.KVTIER_BLOCK_PARTIAL)

    @property
    def shared(self) -> bool:
        return bool(self.flags & lib.KVTIER_BLOCK_SHARED)


def module_loaded() -> bool:
    """True when kvtier.ko is loaded in the running kernel."""
    return os.path.isdir(SYSFS_MODULE)


def _tag_items(tags) -> dict:
    if tags is None:
        return {}
    if isinstance(tags, Tags):
        return tags.as_dict()
    if isinstance(tags, Mapping):
        unknown = set(tags) - set(_TAG_FIELDS)
        if unknown:
            raise TypeError(f"unknown tag field(s) {sorted(unknown)}; valid: {', '.join(_TAG_FIELDS)}")
        return dict(tags)
    raise TypeError(f"tags must be a kvtier.kmod.Tags or a mapping, not {type(tags).__name__}")


def _fill_tags(c_tags, tags) -> dict:
    items = _tag_items(tags)
    for name, value in items.items():
        setattr(c_tags, name, value)
    return items


def _tags_dict(c_tags) -> dict:
    return {name: int(getattr(c_tags, name)) for name in _TAG_FIELDS}


class Device:
    """An open /dev/kvtier. Regions created or attached through it are released when it closes."""

    def __init__(self, path: str = DEVICE_PATH):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if path == DEVICE_PATH and not module_loaded():
                raise OSError(_errno.ENOENT, f"kvtier.ko is not loaded (no {path}); "
                                             "load it with `modprobe kvtier`") from None
            raise OSError(_errno.ENOENT, f"no device node {path}"
                          + (" although kvtier.ko is loaded (udev rule missing?)" if module_loaded() else
                             "; is kvtier.ko loaded?"), path) from None
        except PermissionError:
            raise OSError(_errno.EACCES, f"cannot open {path}: permission denied "
                                         "(join the group the udev rule gives the device, usually kvtier)",
                          path) from None

    # -- plumbing ---------------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed kvtier device")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def raw_ioctl(self, cmd: int, arg) -> int:
        """ioctl(2) with any argument (cdata, int address or NULL); returns the result or -errno."""
        if isinstance(arg, int):
            arg = ffi.cast("void *", arg)
        return int(lib.kvt_ioctl(self.fileno(), cmd & 0xFFFFFFFF, arg))

    def _ioctl(self, cmd: int, arg) -> int:
        ret = int(lib.kvt_ioctl(self.fileno(), cmd, arg))
        if ret < 0:
            name = IOCTLS.get(cmd, hex(cmd))
            raise OSError(-ret, f"{name}: {os.strerror(-ret)}")
        return ret

    # -- commands ---------------------------------------------------------------------------------

    def api(self) -> dict:
        """The handshake: API version, page size, features, supported commands and size limits."""
        c = ffi.new("struct kvtier_api *")
        self._ioctl(lib.KVTIER_IOC_API, c)
        ioctls = int(c.ioctls)
        return {
            "api_version": int(c.api_version),
            "page_size": int(c.page_size),
            "features": int(c.features),
            "ioctls": ioctls,
            "commands": sorted(name for cmd, name in IOCTLS.items() if ioctls >> (cmd & 0xFF) & 1),
            "max_region_bytes": int(c.max_region_bytes),
            "max_total_bytes": int(c.max_total_bytes),
            "max_nodes": int(c.max_nodes),
        }

    def create_region(self, size_bytes: int, block_bytes: int, node: int, tags=None, flags: int = 0) -> Region:
        """A new region of size_bytes in blocks of block_bytes, whose pages go to `node`."""
        c = ffi.new("struct kvtier_region_create *")
        c.size_bytes = size_bytes
        c.block_bytes = block_bytes
        c.node = node
        c.flags = flags
        _fill_tags(c.tags, tags)
        self._ioctl(lib.KVTIER_IOC_REGION_CREATE, c)
        return Region(int(c.region_id), int(c.mmap_offset), size_bytes, block_bytes)

    def attach(self, region_id: int) -> Region:
        """Take a reference on an existing region (same uid, root, or granted) so this fd may map it."""
        c = ffi.new("struct kvtier_region_attach *")
        c.region_id = region_id
        self._ioctl(lib.KVTIER_IOC_REGION_ATTACH, c)
        return Region(region_id, int(c.mmap_offset), int(c.size_bytes), int(c.block_bytes))

    def release(self, region_id: int) -> None:
        """Drop this fd's reference; the region lives on while mappings or other fds hold it."""
        c = ffi.new("struct kvtier_region_release *")
        c.region_id = region_id
        self._ioctl(lib.KVTIER_IOC_REGION_RELEASE, c)

    def info(self, region_id: int) -> dict:
        """Size, owner, tags, residency (node_bytes: {node: bytes}, non-zero nodes only) and counters."""
        c = ffi.new("struct kvtier_region_info *")
        c.region_id = region_id
        self._ioctl(lib.KVTIER_IOC_REGION_INFO, c)
        return {
            "region_id": int(c.region_id),
            "size_bytes": int(c.size_bytes),
            "block_bytes": int(c.block_bytes),
            "nr_blocks": int(c.nr_blocks),
            "owner_uid": int(c.owner_uid),
            "node": int(c.node),
            "tags": _tags_dict(c.tags),
            "resident_bytes": int(c.resident_bytes),
            "shared_bytes": int(c.shared_bytes),
            "faults": int(c.faults),
            "migrations": int(c.migrations),
            "migrated_bytes": int(c.migrated_bytes),
            "node_bytes": {n: int(c.node_bytes[n]) for n in range(MAX_NODES) if c.node_bytes[n]},
        }

    def set_tags(self, region_id: int, tags, mask: int | None = None, first_block: int = 0,
                 nr_blocks: int = 0) -> None:
        """Update tags: the region's own (nr_blocks=0) or block_type/priority of a block range.

        Without `mask`, the fields named in `tags` (a mapping) decide it; a Tags instance sets every
        field but tenant_id, which cannot change.
        """
        c = ffi.new("struct kvtier_set_tags *")
        c.region_id = region_id
        c.first_block = first_block
        c.nr_blocks = nr_blocks
        items = _fill_tags(c.tags, tags)
        if mask is None:
            mask = 0
            for name in items:
                mask |= _TAG_MASK_OF.get(name, 0)
            if nr_blocks:
                mask &= lib.KVTIER_TAG_TYPE | lib.KVTIER_TAG_PRIORITY
        c.mask = mask
        self._ioctl(lib.KVTIER_IOC_SET_TAGS, c)

    def migrate(self, region_id: int, first_block: int, nr_blocks: int, node: int,
                flags: int = 0) -> tuple[int, int]:
        """Move blocks [first_block, first_block + nr_blocks) to `node`; returns (bytes_moved, blocks_moved)."""
        c = ffi.new("struct kvtier_migrate *")
        c.region_id = region_id
        c.first_block = first_block
        c.nr_blocks = nr_blocks
        c.node = node
        c.flags = flags
        self._ioctl(lib.KVTIER_IOC_MIGRATE, c)
        return int(c.bytes_moved), int(c.blocks_moved)

    def share(self, dst_region_id: int, dst_first_block: int, src_region_id: int, src_first_block: int,
              nr_blocks: int) -> None:
        """Make dst blocks share src blocks' pages, read-only (a write raises SIGBUS; unshare copies)."""
        c = ffi.new("struct kvtier_share *")
        c.dst_region_id = dst_region_id
        c.src_region_id = src_region_id
        c.dst_first_block = dst_first_block
        c.src_first_block = src_first_block
        c.nr_blocks = nr_blocks
        self._ioctl(lib.KVTIER_IOC_SHARE, c)

    def _range_ioctl(self, cmd: int, region_id: int, first_block: int, nr_blocks: int) -> None:
        c = ffi.new("struct kvtier_range *")
        c.region_id = region_id
        c.first_block = first_block
        c.nr_blocks = nr_blocks
        self._ioctl(cmd, c)

    def unshare(self, region_id: int, first_block: int, nr_blocks: int) -> None:
        """Give shared blocks private, writable copies on their node."""
        self._range_ioctl(lib.KVTIER_IOC_UNSHARE, region_id, first_block, nr_blocks)

    def access_reset(self, region_id: int, first_block: int = 0, nr_blocks: int | None = None) -> None:
        """Unmap blocks from every process, keeping their pages, so the next touch of each page faults
        again and fires the kvtier_fault tracepoint (access sampling for the eBPF heat probes)."""
        if nr_blocks is None:
            nr_blocks = self.info(region_id)["nr_blocks"] - first_block
        self._range_ioctl(lib.KVTIER_IOC_ACCESS_RESET, region_id, first_block, nr_blocks)

    def discard(self, region_id: int, first_block: int, nr_blocks: int) -> None:
        """Free blocks' pages (unmapped from every process); the next touch faults in zeroed ones."""
        self._range_ioctl(lib.KVTIER_IOC_DISCARD, region_id, first_block, nr_blocks)

    def query(self, region_id: int, first_block: int = 0, nr_blocks: int | None = None) -> list[BlockState]:
        """Per-block state (node, flags, type, priority, faults, migrations); all blocks by default."""
        if nr_blocks is None:
            nr_blocks = self.info(region_id)["nr_blocks"] - first_block
        entries = ffi.new("struct kvtier_block_state[]", max(nr_blocks, 1))
        c = ffi.new("struct kvtier_block_query *")
        c.region_id = region_id
        c.first_block = first_block
        c.nr_blocks = nr_blocks
        c.entries_ptr = int(ffi.cast("uintptr_t", entries))
        self._ioctl(lib.KVTIER_IOC_BLOCK_QUERY, c)
        return [BlockState(int(e.node), int(e.flags), int(e.block_type), int(e.priority), int(e.faults),
                           int(e.migrations)) for e in (entries[i] for i in range(nr_blocks))]

    def grant(self, region_id: int, uid: int, revoke: bool = False) -> None:
        """Let `uid` attach the region (or take that back)."""
        c = ffi.new("struct kvtier_grant *")
        c.region_id = region_id
        c.uid = uid
        c.flags = lib.KVTIER_GRANT_REVOKE if revoke else 0
        self._ioctl(lib.KVTIER_IOC_GRANT, c)

    def stats(self) -> dict:
        """Module-wide counters and, under "nodes", {node: counters} for nodes with any non-zero one."""
        c = ffi.new("struct kvtier_stats *")
        self._ioctl(lib.KVTIER_IOC_STATS, c)
        return stats_dict(c)

    def mmap(self, region: Region | int, length: int | None = None, offset: int = 0,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE) -> _mmap.mmap:
        """Map the region (MAP_SHARED at its mmap offset); `offset` is page-aligned within the region."""
        if not isinstance(region, Region):
            region = self._region_of(int(region))
        if length is None:
            length = region.size_bytes - offset
        return _mmap.mmap(self.fileno(), length, _mmap.MAP_SHARED, prot, offset=region.mmap_offset + offset)

    def _region_of(self, region_id: int) -> Region:
        info = self.info(region_id)
        return Region(region_id, region_id << MMAP_SHIFT, info["size_bytes"], info["block_bytes"])


def stats_dict(c) -> dict:
    """A struct kvtier_stats as a dict (shared with tests that compare it with netlink and sysfs)."""
    out = {name: int(getattr(c, name)) for name in ("regions", "allocated_bytes", "shared_bytes", "faults",
                                                      "migrations", "migrated_bytes", "shares", "cow_copies")}
    nodes = {}
    for n in range(MAX_NODES):
        node = c.nodes[n]
        row = {"allocated_bytes": int(node.allocated_bytes), "migrated_in_bytes": int(node.migrated_in_bytes),
               "migrated_out_bytes": int(node.migrated_out_bytes)}
        if any(row.values()):
            nodes[n] = row
    out["nodes"] = nodes
    return out
