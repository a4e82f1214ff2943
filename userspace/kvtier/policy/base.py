"""The policy interface every placement policy implements, single tier at a time.

The replay driver and the daemon speak to a policy through the same calls, in this order per request:

    begin_request(req)               a request arrived (online hint: its blocks, session, time)
    contains(block) / on_hit(...)    lookups; a resident block that is accessed is a hit
    offer(block, req, pos, hit)      after the request, each of its blocks is offered for admission;
                                     the policy may decline a new block (admission control) and returns
                                     the blocks it evicted to make room
    request_done(req)                after the offers: per-request learning (end_request(req, hits) is
                                     every offer, then this)
    remove(block)                    the caller takes a block away (promotion to a faster tier, pinning)
    pop_victim()                     evict one block now (the caller shrinks the tier or demotes)
    session_hint(sid, state)         prefill / decode / idle / finished
    touch(block, count, now_ms)      accessed outside the API (eBPF heat); resident blocks only
    explain(block)                   the scores behind the block's current standing
    prefetch_suggestions(limit)      blocks the policy expects to be asked for soon

A tier stack (kvtier.policy.tiers) runs one policy instance per tier and turns evictions into demotions.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from kvtier.policy.model import Request, SessionState


class Policy(ABC):
    """One tier's admission and eviction. Capacity is in blocks; the policy never holds more."""

    name: str = ""
    offline = False  # True only for policies that read the future (opt)

    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self.capacity_blocks = capacity_blocks

    # -- lookups ---------------------------------------------------------------------------------
    @abstractmethod
    def contains(self, block: int) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def begin_request(self, req: Request) -> None:
        """A request arrived; called before its lookups."""

    def on_hit(self, block: int, req: Request, pos: int) -> None:
        """A resident block was accessed (the default does nothing; offer() sees the hit too)."""

    # -- placement -------------------------------------------------------------------------------
    @abstractmethod
    def offer(self, block: int, req: Request, pos: int, hit: bool) -> list[int]:
        """Offer a block of the finished request; return the blocks evicted (the offered one if it was
        resident and is now dropped). A declined new block is simply not resident afterwards."""

    @abstractmethod
    def remove(self, block: int) -> bool:
        """Drop a block without counting an eviction; False if it was not resident."""

    @abstractmethod
    def pop_victim(self) -> int | None:
        """Evict and return the block this policy values least (None if empty)."""

    def resize(self, capacity_blocks: int) -> list[int]:
        """Change the capacity; returns the blocks evicted to fit."""
        self.capacity_blocks = max(0, capacity_blocks)
        out = []
        while len(self) > self.capacity_blocks:
            v = self.pop_victim()
            if v is None:
                break
            out.append(v)
        return out

    def end_request(self, req: Request, hits: list[bool]) -> list[int]:
        """Offer every block of the request, in order, then request_done(req); returns all evictions."""
        out: list[int] = []
        for pos, block in enumerate(req.hash_ids):
            out.extend(self.offer(block, req, pos, hits[pos]))
        self.request_done(req)
        return out

    def request_done(self, req: Request) -> None:
        """The request's blocks have been offered: what it teaches beyond them (how often each block has been
        seen, the session's turn count). end_request calls it; a caller that offers block by block (a tier
        stack that pins a decoding session's blocks, the daemon) calls it once per request, after its offers."""

    def touch(self, block: int, count: int, now_ms: float = 0.0) -> None:
        """The block was accessed outside the API `count` times (eBPF access heat: an engine read or wrote
        its memory directly). Never admits or evicts; the default ignores it."""

    # -- moves between tiers ----------------------------------------------------------------------
    def export_meta(self, block: int):
        """Policy state that travels with a block demoted to the next tier (None: nothing)."""
        return None

    def admit_demoted(self, block: int, meta, req: Request | None = None) -> list[int]:
        """Take a block demoted from the tier above; returns the blocks evicted to make room."""
        return self.offer(block, req, -1, False)

    # -- hints and introspection -----------------------------------------------------------------
    def session_hint(self, session_id: int, state: SessionState, now_ms: float = 0.0,
                     blocks: list[int] | None = None) -> None:
        """Session life-cycle events; `blocks`: the session's blocks, where the caller knows them (default: the
        blocks of its latest request). Baselines ignore them."""

    def explain(self, block: int) -> dict:
        return {"policy": self.name, "block": block, "resident": self.contains(block)}

    def prefetch_suggestions(self, limit: int = 16) -> list[int]:
        return []
