"""Synthetic Mooncake-format traces with structure unlike the bundled one, to check that policies generalise.

Each generator is seeded and returns Requests (write them with kvtier.policy.trace.write_trace).
  - "chat":     multi-turn conversations (geometric turn counts, exponential think times per session),
                a few system prompts picked by Zipf popularity;
  - "rag":      many sessions sharing long Zipf-popular documents (deep prefix sharing, fan-out), few turns;
  - "scan":     chat plus large one-off requests (scans) that a good policy must not let flush the cache;
  - "agentic":  long sessions of rapid turns with large growing contexts and tool-call bursts;
  - "prefix":   many shared system prompts (long, Zipf-popular) under short conversations;
  - "longchat": long multi-turn chats with slow, heavy-tailed think times and small turns.
"""
from __future__ import annotations

import random

from kvtier.policy.model import TOKENS_PER_BLOCK, Request
from kvtier.policy.trace import infer_sessions

KINDS = ("chat", "rag", "scan", "agentic", "prefix", "longchat")


def _zipf_pick(rng: random.Random, n: int, s: float = 1.1) -> int:
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    return rng.choices(range(n), weights)[0]


def generate(kind: str = "chat", requests: int = 3000, seed: int = 0) -> list[Request]:
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic trace kind '{kind}'; valid: {', '.join(KINDS)}")
    rng = random.Random(seed)
    next_id = [0]

    def fresh(n: int) -> list[int]:
        ids = list(range(next_id[0], next_id[0] + n))
        next_id[0] += n
        return ids

    params = {
        "chat": dict(prompts=8, prompt_blocks=(1, 4), docs=0, turn_p=0.7, think_ms=60000, new_blocks=(1, 8),
                     rate_per_s=3.0, scan_p=0.0),
        "rag": dict(prompts=2, prompt_blocks=(1, 2), docs=200, turn_p=0.3, think_ms=30000, new_blocks=(1, 3),
                    rate_per_s=4.0, scan_p=0.0),
        "scan": dict(prompts=8, prompt_blocks=(1, 4), docs=0, turn_p=0.7, think_ms=60000, new_blocks=(1, 8),
                     rate_per_s=3.0, scan_p=0.15),
        "agentic": dict(prompts=4, prompt_blocks=(2, 6), docs=0, turn_p=0.9, think_ms=4000, new_blocks=(2, 12),
                        rate_per_s=2.0, scan_p=0.0),
        "prefix": dict(prompts=150, prompt_blocks=(4, 30), docs=0, turn_p=0.3, think_ms=20000, new_blocks=(1, 6),
                       rate_per_s=5.0, scan_p=0.0),
        "longchat": dict(prompts=3, prompt_blocks=(1, 3), docs=0, turn_p=0.93, think_ms=180000, new_blocks=(1, 4),
                         rate_per_s=1.0, scan_p=0.0),
    }[kind]
    prompts = [fresh(rng.randint(*params["prompt_blocks"])) for _ in range(params["prompts"])]
    docs = [fresh(rng.randint(4, 40)) for _ in range(params["docs"])]
    t = 0.0
    out = []
    sessions = 0
    import heapq
    pending: list[tuple[float, int, list[int]]] = []
    while len(out) < requests:
        t += rng.expovariate(params["rate_per_s"]) * 1000.0
        # turns of existing sessions that are due before this new arrival
        while pending and pending[0][0] <= t and len(out) < requests:
            when, sid, ctx = heapq.heappop(pending)
            out.append(_turn(rng, when, ctx, params, fresh, pending, sid))
        if len(out) >= requests:
            break
        if params["scan_p"] and rng.random() < params["scan_p"]:
            ids = fresh(rng.randint(60, 200))
            out.append(Request(-1, t, len(ids) * TOKENS_PER_BLOCK, rng.randint(1, 50), ids))
            continue
        ctx = list(prompts[_zipf_pick(rng, len(prompts))])
        if docs:
            ctx += docs[_zipf_pick(rng, len(docs))]
        sessions += 1
        out.append(_turn(rng, t, ctx, params, fresh, pending, sessions))
    out.sort(key=lambda r: r.timestamp_ms)
    for i, r in enumerate(out):
        r.index = i
        r.timestamp_ms = float(int(r.timestamp_ms))
    infer_sessions(out)
    return out


def _turn(rng, t, ctx, params, fresh, pending, sid) -> Request:
    import heapq
    ids = ctx + fresh(rng.randint(*params["new_blocks"]))
    partial = rng.randint(1, TOKENS_PER_BLOCK)
    req = Request(-1, t, (len(ids) - 1) * TOKENS_PER_BLOCK + partial, rng.randint(1, 800), ids)
    if rng.random() < params["turn_p"]:
        # the next turn extends every full block; the partial tail block is re-hashed with more tokens
        gap = rng.expovariate(1.0 / params["think_ms"]) * rng.choice((0.3, 1.0, 3.0))
        heapq.heappush(pending, (t + gap, sid, ids[:-1]))
    return req
