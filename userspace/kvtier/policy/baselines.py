"""Baseline policies for honest comparison: LRU, FIFO, LFU, ARC, S3-FIFO.

They admit every offered block (LRU is what vLLM, SGLang and Mooncake use). Each keeps O(1) or
O(log n) work per access so a 300k-access trace replays in about a second.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

from kvtier.policy.base import Policy


class LRU(Policy):
    """Least recently used: a hit or an offer moves the block to the young end."""

    name = "lru"

    def __init__(self, capacity_blocks: int):
        super().__init__(capacity_blocks)
        self._q: OrderedDict[int, None] = OrderedDict()

    def contains(self, block):
        return block in self._q

    def __len__(self):
        return len(self._q)

    def _touch(self, block):
        self._q.move_to_end(block)

    def offer(self, block, req, pos, hit):
        if block in self._q:
            self._touch(block)
            return []
        if self.capacity_blocks == 0:
            return []
        out = []
        while len(self._q) >= self.capacity_blocks:
            out.append(self._q.popitem(last=False)[0])
        self._q[block] = None
        return out

    def remove(self, block):
        return self._q.pop(block, 0) is None

    def touch(self, block, count, now_ms=0.0):
        if count > 0 and block in self._q:
            self._touch(block)

    def pop_victim(self):
        return self._q.popitem(last=False)[0] if self._q else None

    def explain(self, block):
        d = super().explain(block)
        if block in self._q:
            # 0 = next to be evicted; O(n), for explanations only
            d["recency_rank"] = list(self._q).index(block)
        return d


class FIFO(LRU):
    """First in, first out: hits do not reorder."""

    name = "fifo"

    def _touch(self, block):
        pass


class LFU(Policy):
    """Least frequently used, counting accesses while resident; ties broken by age (older goes first)."""

    name = "lfu"

    def __init__(self, capacity_blocks: int):
        super().__init__(capacity_blocks)
        self._freq: dict[int, tuple[int, int]] = {}  # block -> (count, stamp)
        self._heap: list[tuple[int, int, int]] = []
        self._stamp = 0

    def contains(self, block):
        return block in self._freq

    def __len__(self):
        return len(self._freq)

    def _push(self, block, count):
        self._stamp += 1
        self._freq[block] = (count, self._stamp)
        heapq.heappush(self._heap, (count, self._stamp, block))

    def offer(self, block, req, pos, hit):
        if block in self._freq:
            self._push(block, self._freq[block][0] + 1)
            return []
        if self.capacity_blocks == 0:
            return []
        out = []
        while len(self._freq) >= self.capacity_blocks:
            out.append(self.pop_victim())
        self._push(block, 1)
        return out

    def remove(self, block):
        return self._freq.pop(block, None) is not None  # heap entry goes stale

    def touch(self, block, count, now_ms=0.0):
        if count > 0 and block in self._freq:
            self._push(block, self._freq[block][0] + count)

    def pop_victim(self):
        while self._heap:
            count, stamp, block = heapq.heappop(self._heap)
            if self._freq.get(block) == (count, stamp):
                del self._freq[block]
                return block
        return None

    def explain(self, block):
        d = super().explain(block)
        if block in self._freq:
            d["count"] = self._freq[block][0]
        return d


class ARC(Policy):
    """Adaptive Replacement Cache (Megiddo & Modha, FAST'03): recency list T1, frequency list T2, and
    ghost lists B1/B2 that move the target size p toward whichever list would have hit."""

    name = "arc"

    def __init__(self, capacity_blocks: int):
        super().__init__(capacity_blocks)
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self.p = 0.0

    def contains(self, block):
        return block in self.t1 or block in self.t2

    def __len__(self):
        return len(self.t1) + len(self.t2)

    def _replace(self, in_b2: bool) -> int:
        if self.t1 and (len(self.t1) > self.p or (in_b2 and len(self.t1) == self.p) or not self.t2):
            v = self.t1.popitem(last=False)[0]
            self.b1[v] = None
        else:
            v = self.t2.popitem(last=False)[0]
            self.b2[v] = None
        return v

    def offer(self, block, req, pos, hit):
        c = self.capacity_blocks
        if block in self.t1:
            del self.t1[block]
            self.t2[block] = None
            return []
        if block in self.t2:
            self.t2.move_to_end(block)
            return []
        if c == 0:
            return []
        out = []
        if block in self.b1:
            self.p = min(c, self.p + max(len(self.b2) / len(self.b1), 1))
            del self.b1[block]
            if len(self) >= c:
                out.append(self._replace(False))
            self.t2[block] = None
        elif block in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1))
            del self.b2[block]
            if len(self) >= c:
                out.append(self._replace(True))
            self.t2[block] = None
        else:
            l1 = len(self.t1) + len(self.b1)
            if l1 >= c:
                if len(self.t1) < c:
                    self.b1.popitem(last=False)
                    if len(self) >= c:  # not full when a tier stack took blocks away (remove)
                        out.append(self._replace(False))
                else:
                    out.append(self.t1.popitem(last=False)[0])
            elif l1 + len(self.t2) + len(self.b2) >= c:
                if l1 + len(self.t2) + len(self.b2) >= 2 * c and self.b2:
                    self.b2.popitem(last=False)
                if len(self) >= c:
                    out.append(self._replace(False))
            self.t1[block] = None
        return out

    def remove(self, block):
        return self.t1.pop(block, 0) is None or self.t2.pop(block, 0) is None

    def touch(self, block, count, now_ms=0.0):
        if count <= 0:
            return
        if block in self.t1:
            del self.t1[block]
            self.t2[block] = None
        elif block in self.t2:
            self.t2.move_to_end(block)

    def pop_victim(self):
        if not len(self):
            return None
        return self._replace(False)

    def explain(self, block):
        d = super().explain(block)
        d["list"] = "T1" if block in self.t1 else "T2" if block in self.t2 else \
            "B1 (ghost)" if block in self.b1 else "B2 (ghost)" if block in self.b2 else None
        d["target_t1_blocks"] = round(self.p, 1)
        return d


class S3FIFO(Policy):
    """S3-FIFO (Yang et al., SOSP'23): a small FIFO (10%) filters one-hit wonders, a main FIFO with
    reinsertion holds blocks seen again, and a ghost FIFO sends returning blocks straight to main."""

    name = "s3fifo"

    def __init__(self, capacity_blocks: int):
        super().__init__(capacity_blocks)
        self.small_cap = max(1, capacity_blocks // 10)
        self.small: OrderedDict[int, None] = OrderedDict()
        self.main: OrderedDict[int, None] = OrderedDict()
        self.ghost: OrderedDict[int, None] = OrderedDict()
        self.freq: dict[int, int] = {}

    def contains(self, block):
        return block in self.freq

    def __len__(self):
        return len(self.freq)

    def _evict_main(self) -> int:
        while True:
            v = next(iter(self.main))
            f = self.freq[v]
            if f > 0:
                self.freq[v] = f - 1
                self.main.move_to_end(v)
            else:
                del self.main[v], self.freq[v]
                return v

    def _evict(self) -> int:
        if self.small and (len(self.small) >= self.small_cap or not self.main):
            v = self.small.popitem(last=False)[0]
            if self.freq[v] > 0:
                self.freq[v] = 0
                self.main[v] = None
                return self._evict_main() if len(self) >= self.capacity_blocks else self._evict()
            del self.freq[v]
            self.ghost[v] = None
            if len(self.ghost) > self.capacity_blocks - self.small_cap:
                self.ghost.popitem(last=False)
            return v
        return self._evict_main()

    def offer(self, block, req, pos, hit):
        if block in self.freq:
            self.freq[block] = min(3, self.freq[block] + 1)
            return []
        if self.capacity_blocks == 0:
            return []
        out = []
        while len(self) >= self.capacity_blocks:
            out.append(self._evict())
        if block in self.ghost:
            del self.ghost[block]
            self.main[block] = None
        else:
            self.small[block] = None
        self.freq[block] = 0
        return out

    def remove(self, block):
        if block not in self.freq:
            return False
        del self.freq[block]
        self.small.pop(block, None)
        self.main.pop(block, None)
        return True

    def touch(self, block, count, now_ms=0.0):
        if count > 0 and block in self.freq:
            self.freq[block] = min(3, self.freq[block] + count)

    def pop_victim(self):
        return self._evict() if len(self) else None

    def explain(self, block):
        d = super().explain(block)
        d["queue"] = "small" if block in self.small else "main" if block in self.main else \
            "ghost" if block in self.ghost else None
        d["freq"] = self.freq.get(block)
        return d
