"""Class-queue bookkeeping shared by the learned experts (kvtier-density, kvtier-predict).

Resident blocks sit in one insertion-ordered queue per class (block -> request clock of its last offer, oldest
first). Within a class the oldest block has the lowest hit density, so only queue heads are eviction candidates:
the head with the lowest density goes first, and a new block worth less than every head is declined (admission
control). A density depends on the class and the bucket of the block's age, and is cached until the model relearns
(`_stale()`). The heads are ranked in a heap that holds a current entry for every head: an entry is pushed when a
block becomes its class's head and again when the clock takes the head's age into its next bucket (a second heap
orders those crossings), and entries that no longer describe a head at its current age are skipped when they
surface. So the victim is always the lowest-density head, and a request costs O(log n) per head that changed or
aged into a new bucket; the whole heap is rebuilt only when the model relearns (or dead entries pile up).
"""
from __future__ import annotations

import heapq
from collections import OrderedDict, deque

from kvtier.policy.base import Policy

RECENT_REQUESTS = 4096   # requests whose per-request state is kept for offers that come after later requests began
HISTORY_PER_BLOCK = 16   # per-block history (times seen, first child) is kept for this many blocks per cache block
SESSIONS_KEPT = 1 << 16  # sessions whose turns and gaps are kept, the most recently active


def trimmed(d: dict, limit: int) -> dict:
    """`d`, or once it holds a quarter more than `limit`, a copy of its last `limit` entries: a daemon runs for
    months, and its blocks and sessions come and go (callers re-insert an entry they update, so the first ones
    are the least recent). One copy now and then: deleting a dict's first entry one at a time costs a scan over
    the dead entries before it."""
    if len(d) <= limit + (limit >> 2):
        return d
    items = iter(d.items())
    for _ in range(len(d) - limit):
        next(items)
    return dict(items)


class ClassQueuePolicy(Policy):
    """Subclasses define `_hit_density(cls, age_requests)` and `_bucket_end(age_requests)` (the smallest age in a
    later density bucket), and call `_stale()` whenever cached densities are dropped."""

    def __init__(self, capacity_blocks: int):
        super().__init__(capacity_blocks)
        self._where: dict[int, tuple] = {}              # resident block -> class
        self._queues: dict[tuple, OrderedDict] = {}     # class -> block -> clock of its last offer
        self._heads: list | None = None                 # (density, head block, class, its clock, valid until clock)
        self._crossings: list = []                      # (clock, block, class, its clock): a head's age changes bucket
        self._heads_stamp = None                        # _freshness() when the heap was built
        self._clock = 0
        self._ghost: dict = {}                          # block -> record of its last offer in the horizon ([1]: clock)
        self._ghost_q: deque = deque()                  # (block, clock) offers in order, to expire ghosts
        self._req = self._req_state = None              # the request begun last, and what the subclass keeps of it
        self._recent: OrderedDict = OrderedDict()       # req.index -> that state, for the last RECENT_REQUESTS
        self._admit_rate = 16.0                         # EMA of a request's blocks resident after its offers

    def _begin(self, req, state) -> None:
        """Keep per-request state for the request's offers. A tier stack offers a decoding session's blocks when
        its decode ends, after later requests began: those offers find their own request's state here."""
        self._req, self._req_state = req, state
        if req.index >= 0:
            recent = self._recent
            recent[req.index] = state
            if len(recent) > RECENT_REQUESTS:
                recent.popitem(last=False)

    def _count_admitted(self, req) -> None:
        """Fold how many of req's blocks are resident after its offers into the admissions EMA (request_done):
        with the capacity, it gives the cache's turnover time, which sets the learning horizon."""
        admitted = sum(1 for b in req.hash_ids if b in self._where)
        self._admit_rate = 0.99 * self._admit_rate + 0.01 * admitted

    @property
    def history_blocks(self) -> int:
        """How many blocks' history (times seen, ...) the expert keeps."""
        return HISTORY_PER_BLOCK * max(1024, self.capacity_blocks)

    def _state_of(self, req):
        """What _begin kept for req (None if it is too old, or unindexed and not the current one)."""
        if req is self._req:
            return self._req_state
        return self._recent.get(req.index) if req.index >= 0 else None

    def _hit_density(self, cls, age: float) -> float:
        raise NotImplementedError

    def _stale(self) -> None:
        self._heads = None

    def _bucket_end(self, age: float) -> float:
        raise NotImplementedError

    def _freshness(self):
        """Changes whenever densities may have for another reason than the heads' ages: the heap is rebuilt."""
        return None

    def _push_head(self, cls, block, t) -> None:
        """Rank `block` (clock t), now the head of class cls, at its current age; note when that age changes bucket."""
        age = self._clock - t
        until = t + self._bucket_end(age)
        heapq.heappush(self._heads, (self._hit_density(cls, age), block, cls, t, until))
        if until != float("inf"):
            heapq.heappush(self._crossings, (until, block, cls, t))

    def _new_head(self, q: OrderedDict, cls) -> None:
        """The head of class cls left (evicted, removed or re-offered): rank the next one."""
        if q and self._heads is not None:
            for b, t in q.items():   # the head only
                self._push_head(cls, b, t)
                break

    def _expire_ghosts(self, limit):
        """Remove and yield the ghost records of blocks last offered before clock `limit` and not accessed since:
        blocks not reused within the horizon."""
        ghost, q = self._ghost, self._ghost_q
        while q and q[0][1] < limit:
            b, t = q.popleft()
            g = ghost.get(b)
            if g is not None and g[1] == t:
                del ghost[b]
                yield g

    def contains(self, block):
        return block in self._where

    def touch(self, block, count, now_ms=0.0):
        """Direct access (eBPF heat): the block becomes the youngest of its class, as if offered again now."""
        cls = self._where.get(block)
        if count > 0 and cls is not None:
            self._admit(block, cls, self._clock)

    def __len__(self):
        return len(self._where)

    def _admit(self, block, cls, now) -> list[int]:
        old = self._where.pop(block, None)
        out = []
        if old is None:
            if self.capacity_blocks == 0:
                return out
            if len(self._where) >= self.capacity_blocks:
                victim = self._victim(self._hit_density(cls, 0))
                if victim is None:
                    return out  # declined: every resident candidate is worth more than this block
                self._drop(victim)
                out.append(victim)
        else:
            self._unqueue(old, block)
        q = self._queues.get(cls)
        if q is None:
            q = self._queues[cls] = OrderedDict()
        if not q and self._heads is not None:
            self._push_head(cls, block, now)
        q[block] = now
        self._where[block] = cls
        return out

    def _admit_demoted(self, block, cls, clock) -> list[int]:
        """A block demoted from the tier above keeps its class and age and is never declined: the lowest-density
        head makes room."""
        out = []
        if block not in self._where and len(self._where) >= self.capacity_blocks > 0:
            victim = self._victim()
            if victim is not None:
                self._drop(victim)
                out.append(victim)
        return out + self._admit(block, cls, clock)

    def _victim(self, floor: float = float("inf")) -> int | None:
        """The class head with the lowest hit density, if below floor."""
        heap = self._heads
        stamp = self._freshness()
        queues = self._queues
        now = self._clock
        if heap is None or stamp != self._heads_stamp or len(heap) > 4 * len(queues) + 64:
            self._heads_stamp = stamp
            heap = self._heads = []
            self._crossings = []
            for cls, q in queues.items():
                self._new_head(q, cls)
        else:
            crossings = self._crossings
            while crossings and crossings[0][0] <= now:
                _, b, cls, t = heapq.heappop(crossings)
                q = queues[cls]
                if q and next(iter(q.items())) == (b, t):   # still the head: ranked again at its new age
                    self._push_head(cls, b, t)
        while heap:
            v, b, cls, t, until = heap[0]
            if now < until:
                q = queues[cls]
                if q and next(iter(q.items())) == (b, t):   # a head, ranked at its current age
                    return b if v < floor else None
            heapq.heappop(heap)   # a head that left, or an entry its age has outgrown (a newer one is queued)
        return None

    def _unqueue(self, cls, block) -> None:
        """Take block out of its class queue; if it was the head, the next one is ranked."""
        q = self._queues[cls]
        was_head = next(iter(q)) == block
        del q[block]
        if was_head:
            self._new_head(q, cls)

    def _drop(self, block) -> None:
        self._unqueue(self._where.pop(block), block)

    def remove(self, block):
        if block not in self._where:
            return False
        self._drop(block)
        return True

    def pop_victim(self):
        v = self._victim()
        if v is not None:
            self._drop(v)
        return v
