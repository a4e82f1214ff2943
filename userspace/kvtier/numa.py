"""NUMA placement syscalls for the userspace tier backend: move_pages(2), mbind(2), get_mempolicy(2).

Thin wrappers over kvtier._native (raw syscalls, no libnuma). Every failure raises OSError with errno.
Addresses are plain ints; `address_of` turns a writable buffer (mmap, bytearray, numpy array) into one.
"""
from __future__ import annotations

import errno as _errno
import os
from typing import Iterable, Sequence

from kvtier._native import ffi, lib

MPOL_DEFAULT = lib.MPOL_DEFAULT
MPOL_PREFERRED = lib.MPOL_PREFERRED
MPOL_BIND = lib.MPOL_BIND
MPOL_INTERLEAVE = lib.MPOL_INTERLEAVE
MPOL_LOCAL = lib.MPOL_LOCAL
MPOL_F_NODE = lib.MPOL_F_NODE
MPOL_F_ADDR = lib.MPOL_F_ADDR
MPOL_F_MEMS_ALLOWED = lib.MPOL_F_MEMS_ALLOWED
MPOL_MF_STRICT = lib.MPOL_MF_STRICT
MPOL_MF_MOVE = lib.MPOL_MF_MOVE
MPOL_MF_MOVE_ALL = lib.MPOL_MF_MOVE_ALL

PAGE_SIZE = int(lib.kvt_page_size())

# Debian's kernels are built with CONFIG_NODES_SHIFT=10; get_mempolicy refuses masks shorter than
# nr_node_ids, so always pass room for the largest possible node count.
_MAX_NODES = 1024
_BITS_PER_LONG = ffi.sizeof("unsigned long") * 8
_MASK_LONGS = _MAX_NODES // _BITS_PER_LONG


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def _nodemask(nodes: Iterable[int]):
    mask = ffi.new("unsigned long[]", _MASK_LONGS)
    for node in nodes:
        if not 0 <= node < _MAX_NODES:
            raise OSError(_errno.EINVAL, f"node {node} out of range 0..{_MAX_NODES - 1}")
        mask[node // _BITS_PER_LONG] |= 1 << (node % _BITS_PER_LONG)
    return mask


def _nodes_of(mask) -> set[int]:
    return {i * _BITS_PER_LONG + b for i in range(_MASK_LONGS) for b in range(_BITS_PER_LONG)
            if mask[i] >> b & 1}


def address_of(buffer) -> int:
    """The start address of a writable buffer; the caller keeps `buffer` alive while it is used."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buffer, require_writable=True)))


def move_pages(addrs: Sequence[int], nodes: Sequence[int] | None = None, *, pid: int = 0,
               flags: int = MPOL_MF_MOVE) -> list[int]:
    """Move the pages holding `addrs` to `nodes` (one node per address), or only query them.

    Returns the per-page status: the node the page is on now, or a negative errno for that page
    (-ENOENT: not faulted in yet, -EFAULT: not mapped, -ENOMEM/-EBUSY: could not move). With
    nodes=None nothing moves and the statuses say where each page is.
    """
    count = len(addrs)
    if nodes is not None and len(nodes) != count:
        raise OSError(_errno.EINVAL, f"move_pages: {count} addresses but {len(nodes)} nodes")
    if count == 0:
        return []
    pages = ffi.new("void *[]", [ffi.cast("void *", a) for a in addrs])
    c_nodes = ffi.new("int[]", list(nodes)) if nodes is not None else ffi.NULL
    status = ffi.new("int[]", count)
    _check(lib.kvt_move_pages(pid, count, pages, c_nodes, status, flags if nodes is not None else 0),
           "move_pages")
    return list(status)


def mbind(addr: int, length: int, mode: int, nodes: Iterable[int] = (), flags: int = 0) -> None:
    """Set the memory policy of [addr, addr+length); with MPOL_MF_MOVE also move present pages."""
    mask = _nodemask(nodes)
    _check(lib.kvt_mbind(addr, length, mode, mask, _MAX_NODES + 1, flags), "mbind")


def get_mempolicy(addr: int | None = None) -> tuple[int, set[int]]:
    """The policy mode and node set of the calling thread, or of the VMA holding `addr`."""
    mode = ffi.new("int *")
    mask = ffi.new("unsigned long[]", _MASK_LONGS)
    flags = MPOL_F_ADDR if addr is not None else 0
    _check(lib.kvt_get_mempolicy(mode, mask, _MAX_NODES + 1, addr or 0, flags), "get_mempolicy")
    return mode[0], _nodes_of(mask)


def node_of(addr: int) -> int:
    """The node of the page holding `addr` (faulting it in if needed)."""
    node = ffi.new("int *")
    _check(lib.kvt_get_mempolicy(node, ffi.NULL, 0, addr, MPOL_F_NODE | MPOL_F_ADDR), "get_mempolicy")
    return node[0]


def allowed_nodes() -> set[int]:
    """The nodes this process may allocate on (its cpuset's mems)."""
    mask = ffi.new("unsigned long[]", _MASK_LONGS)
    _check(lib.kvt_get_mempolicy(ffi.NULL, mask, _MAX_NODES + 1, 0, MPOL_F_MEMS_ALLOWED), "get_mempolicy")
    return _nodes_of(mask)
