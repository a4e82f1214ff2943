"""Extent allocator shared by the tiers: best-fit over free extents, coalescing on free.

Free extents are indexed three ways: by start, by end (O(1) coalescing with both neighbours) and in
a list sorted by (size, start) searched with bisect, so finding a fit is O(log n); insertion into
that list is a memmove of pointers, cheap at the extent counts a tier sees.
"""
from __future__ import annotations

import bisect


class ExtentAllocator:
    def __init__(self, size_bytes: int, unit_bytes: int):
        self.unit_bytes = unit_bytes
        self.size_bytes = size_bytes - size_bytes % unit_bytes
        self.used_bytes = 0
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._sizes: list[tuple[int, int]] = []
        if self.size_bytes:
            self._add_free(0, self.size_bytes)

    def round_up(self, nbytes: int) -> int:
        unit = self.unit_bytes
        return max(unit, (nbytes + unit - 1) // unit * unit)

    def _add_free(self, start: int, size: int) -> None:
        self._by_start[start] = size
        self._by_end[start + size] = start
        bisect.insort(self._sizes, (size, start))

    def _remove_free(self, start: int) -> int:
        size = self._by_start.pop(start)
        del self._by_end[start + size]
        i = bisect.bisect_left(self._sizes, (size, start))
        del self._sizes[i]
        return size

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new extent of round_up(nbytes), or None when no free extent is big enough."""
        need = self.round_up(nbytes)
        i = bisect.bisect_left(self._sizes, (need, -1))
        if i == len(self._sizes):
            return None
        size, start = self._sizes[i]
        self._remove_free(start)
        if size > need:
            self._add_free(start + need, size - need)
        self.used_bytes += need
        return start

    def alloc_at(self, start: int, nbytes: int) -> bool:
        """Take [start, start+round_up(nbytes)) if it is entirely free (recovery, undo)."""
        need = self.round_up(nbytes)
        if start % self.unit_bytes or start < 0 or start + need > self.size_bytes:
            return False
        # the free extent containing `start`: the largest free start <= start
        free_start = None
        if start in self._by_start:
            free_start = start
        else:
            # walk is avoided by keeping a sorted view only when needed (recovery is one pass)
            for fs, fsize in self._by_start.items():
                if fs <= start < fs + fsize:
                    free_start = fs
                    break
        if free_start is None:
            return False
        fsize = self._by_start[free_start]
        if start + need > free_start + fsize:
            return False
        self._remove_free(free_start)
        if start > free_start:
            self._add_free(free_start, start - free_start)
        if free_start + fsize > start + need:
            self._add_free(start + need, free_start + fsize - start - need)
        self.used_bytes += need
        return True

    def free(self, start: int, nbytes: int) -> None:
        size = self.round_up(nbytes)
        self.used_bytes -= size
        if start + size in self._by_start:  # merge with the following extent
            size += self._remove_free(start + size)
        if start in self._by_end:  # merge with the preceding extent
            prev = self._by_end[start]
            size += self._remove_free(prev)
            start = prev
        self._add_free(start, size)

    @property
    def largest_free(self) -> int:
        return self._sizes[-1][0] if self._sizes else 0

    @property
    def free_extents(self) -> int:
        return len(self._sizes)

    def free_ranges(self) -> list[tuple[int, int]]:
        """The free extents as [(start, nbytes)], in no particular order."""
        return list(self._by_start.items())

    @classmethod
    def from_used(cls, size_bytes: int, unit_bytes: int, extents) -> "ExtentAllocator":
        """An allocator whose used extents are `extents` [(start, nbytes)], non-overlapping (recovery)."""
        self = cls(0, unit_bytes)
        self.size_bytes = size_bytes - size_bytes % unit_bytes
        pos = 0
        for start, nbytes in sorted(extents):
            need = self.round_up(nbytes)
            if start < pos or start + need > self.size_bytes:
                raise ValueError(f"extent {start}+{need} overlaps or lies outside 0..{self.size_bytes}")
            if start > pos:
                self._add_free(pos, start - pos)
            pos = start + need
            self.used_bytes += need
        if pos < self.size_bytes:
            self._add_free(pos, self.size_bytes - pos)
        return self
