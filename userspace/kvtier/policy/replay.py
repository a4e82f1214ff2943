"""Replay drivers: the single-tier hit-rate contract, and capacity sweeps.

Single-tier contract (what checks rely on): for each request in arrival order, each of its blocks is a hit
if it is resident when the request arrives; after the request, all of its blocks are offered for admission
to the cache of N blocks. hit_rate = hits / all block accesses, the same for every policy.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

from kvtier.policy.model import Request, SessionState
from kvtier.policy.registry import make_policy


@dataclass
class ReplayResult:
    policy: str
    capacity_blocks: int
    requests: int = 0
    accesses: int = 0
    hits: int = 0
    evictions: int = 0
    seconds: float = 0.0
    distinct_blocks: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def blocks_per_second(self) -> float:
        return self.accesses / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = {"policy": self.policy, "capacity_blocks": self.capacity_blocks, "requests": self.requests,
             "block_accesses": self.accesses, "hits": self.hits, "hit_rate": self.hit_rate,
             "evictions": self.evictions, "distinct_blocks": self.distinct_blocks,
             "replay_seconds": round(self.seconds, 3), "blocks_per_second": round(self.blocks_per_second)}
        d.update(self.extra)
        return d


def distinct_blocks(requests: list[Request]) -> int:
    s: set[int] = set()
    for r in requests:
        s.update(r.hash_ids)
    return len(s)


def lifecycle_hints(requests: list[Request], accuracy: float = 1.0, seed: int = 0) -> list[SessionState]:
    """Per request, the hint an engine that knows its users would send when the turn ends: RESUME if the
    conversation (the inferred session) has a later turn in the trace, FINISHED if not. It looks ahead, like
    `opt`: it stands in for what a chat front end or an agent framework knows (a closed conversation, a pending
    tool call). With `accuracy` < 1 each hint is the wrong one with probability 1 - accuracy."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"hint accuracy must be in [0, 1], got {accuracy}")
    later: set[int] = set()
    out = [SessionState.FINISHED] * len(requests)
    rng = random.Random(seed)
    for i in range(len(requests) - 1, -1, -1):
        sid = requests[i].session_id
        resumes = sid in later
        later.add(sid)
        if accuracy < 1.0 and rng.random() >= accuracy:
            resumes = not resumes
        out[i] = SessionState.RESUME if resumes else SessionState.FINISHED
    return out


def replay_single(requests: list[Request], policy_name: str, capacity_blocks: int,
                  progress: Callable[[int], None] | None = None, policy=None,
                  hints: list[SessionState] | None = None) -> ReplayResult:
    """Replay under the single-tier contract; `progress(n)` is called with requests done so far. `hints[i]`,
    if given, is sent for request i's session after its blocks are offered (see lifecycle_hints)."""
    if policy is None:
        policy = make_policy(policy_name, capacity_blocks, requests=requests)
    res = ReplayResult(policy=policy.name, capacity_blocks=capacity_blocks)
    contains, begin, on_hit, end = policy.contains, policy.begin_request, policy.on_hit, policy.end_request
    t0 = time.perf_counter()
    hits = accesses = evictions = 0
    step = max(1, len(requests) // 100)
    for r in requests:
        begin(r)
        mask = [contains(b) for b in r.hash_ids]
        for pos, hit in enumerate(mask):
            if hit:
                hits += 1
                on_hit(r.hash_ids[pos], r, pos)
        accesses += len(mask)
        evictions += len(end(r, mask))
        if hints is not None:
            policy.session_hint(r.session_id, hints[r.index], r.timestamp_ms)
        if len(policy) > capacity_blocks:  # the contract every policy is held to
            raise AssertionError(f"policy {policy.name} holds {len(policy)} > {capacity_blocks} blocks")
        if progress is not None and (r.index + 1) % step == 0:
            progress(r.index + 1)
    res.seconds = time.perf_counter() - t0
    res.requests, res.accesses, res.hits, res.evictions = len(requests), accesses, hits, evictions
    res.distinct_blocks = distinct_blocks(requests)
    return res
