"""Belady's OPT with bypass: the offline limit under the single-tier contract.

It reads the whole trace up front (the only policy allowed to). When a block is offered it keeps the
blocks whose next use is soonest: if the cache is full, the resident block with the farthest next use
is evicted, or the offered block itself is declined when its own next use is farther (or never).
With unit-size blocks and hits counted per access this is optimal.
"""
from __future__ import annotations

import heapq

from kvtier.policy.base import Policy
from kvtier.policy.model import Request

NEVER = 1 << 62


def next_uses(requests: list[Request]) -> list[list[int]]:
    """next_uses(reqs)[i][pos]: index of the next request after i that accesses that block, or NEVER."""
    out: list[list[int]] = [[]] * len(requests)
    last: dict[int, int] = {}
    for r in reversed(requests):
        get = last.get
        out[r.index] = [get(b, NEVER) for b in r.hash_ids]
        for b in r.hash_ids:
            last[b] = r.index
    return out


class OPT(Policy):
    name = "opt"
    offline = True

    def __init__(self, capacity_blocks: int, requests: list[Request] | None = None, next_use_table=None):
        super().__init__(capacity_blocks)
        if requests is None and next_use_table is None:
            raise ValueError("opt needs the whole trace (requests=...)")
        self._next = next_use_table if next_use_table is not None else next_uses(requests)
        self._res: dict[int, int] = {}       # block -> its next use
        self._known: dict[int, int] = {}     # block -> next use as of its last offer (for demotions)
        self._heap: list[tuple[int, int]] = []  # (-next use, block), stale entries skipped

    def contains(self, block):
        return block in self._res

    def __len__(self):
        return len(self._res)

    def _top(self):
        heap, res = self._heap, self._res
        while heap:
            neg, b = heap[0]
            if res.get(b) == -neg:
                return b, -neg
            heapq.heappop(heap)
        return None, -1

    def offer(self, block, req, pos, hit):
        nu = self._next[req.index][pos]
        self._known[block] = nu
        res = self._res
        if block in res:
            if nu >= NEVER:  # never used again: freeing the slot now only helps
                del res[block]
                return [block]
            res[block] = nu
            heapq.heappush(self._heap, (-nu, block))
            return []
        if nu >= NEVER or self.capacity_blocks == 0:
            return []
        out = []
        if len(res) >= self.capacity_blocks:
            victim, vnu = self._top()
            if vnu <= nu:
                return []  # bypass: the offered block is the one used farthest in the future
            heapq.heappop(self._heap)
            del res[victim]
            out.append(victim)
        res[block] = nu
        heapq.heappush(self._heap, (-nu, block))
        return out

    def end_request(self, req, hits):
        # Refresh the request's resident blocks first: an old next use (this request) must not make a
        # block look valuable, or stale, while its siblings are offered.
        nxt = self._next[req.index]
        order = sorted(range(len(req.hash_ids)), key=lambda pos: (req.hash_ids[pos] not in self._res, nxt[pos]))
        out: list[int] = []
        for pos in order:
            out.extend(self.offer(req.hash_ids[pos], req, pos, hits[pos]))
        return out

    def export_meta(self, block):
        return self._known.get(block)

    def admit_demoted(self, block, meta, req=None):
        if meta is None or meta >= NEVER or self.capacity_blocks == 0:
            return []
        out = []
        if len(self._res) >= self.capacity_blocks:
            victim, vnu = self._top()
            if vnu <= meta:
                return []
            heapq.heappop(self._heap)
            del self._res[victim]
            out.append(victim)
        self._res[block] = meta
        heapq.heappush(self._heap, (-meta, block))
        return out

    def remove(self, block):
        return self._res.pop(block, None) is not None

    def pop_victim(self):
        b, _ = self._top()
        if b is None:
            return None
        heapq.heappop(self._heap)
        del self._res[b]
        return b

    def explain(self, block):
        d = super().explain(block)
        if block in self._res:
            d["next_use_request"] = self._res[block] if self._res[block] < NEVER else None
        return d
