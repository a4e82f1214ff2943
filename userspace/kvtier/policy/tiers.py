"""Multi-tier simulation: N tiers, one policy instance each, demotion instead of eviction, urgency pinning,
and a cost model that turns where each block was found into a time-to-first-token estimate.

Tier SPEC (for `kvctl replay --tiers`): comma-separated tiers, fastest first, each
    KIND:CAPACITY_BLOCKS[:BANDWIDTH_GBPS[:LATENCY_US]]
KIND is one of hbm, dram, cxl, nvme, remote; bandwidth (GB/s, to the GPU) and latency (µs per block)
default per kind (DEFAULT_LINKS). Example: dram:1000,cxl:4000,nvme:20000.

Flow per request (arrival order, sessions overlapping in time):
  1. decodes that ended before this arrival release their pinned blocks back to the first tier's policy;
  2. each block is looked up: pinned or in tier i -> a hit served by that tier (a lower-tier hit is
     promoted: taken out of that tier and offered to the first tier); otherwise a miss (recompute);
  3. with urgency on, the request's blocks are pinned in the first tier for its prefill + decode time
     (duration model below): taken out of the policy, which shrinks by as much, so no policy can evict
     a decoding session's blocks; without it, the blocks are offered to the first tier at once;
  4. a block the first tier evicts or declines is offered to the next tier (demotion), and so on; only
     the last tier drops blocks.
"""
from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field

from kvtier.errors import InputError
from kvtier.policy.model import TOKENS_PER_BLOCK, Request, SessionState
from kvtier.policy.registry import make_policy

# kind -> (bandwidth_gbps to the GPU, latency_us per block load)
DEFAULT_LINKS = {
    "hbm": (2000.0, 1.0),     # already on the GPU
    "dram": (25.0, 5.0),      # PCIe 5.0 x16 host-to-device, in practice
    "cxl": (20.0, 10.0),      # CXL.mem expander behind the host, then PCIe
    "nvme": (6.0, 100.0),     # one PCIe 4.0 SSD, O_DIRECT reads
    "remote": (12.0, 50.0),   # 100 Gb/s RDMA to a shared store
}


@dataclass(frozen=True)
class TierSpec:
    kind: str
    capacity_blocks: int
    bandwidth_gbps: float
    latency_us: float

    def load_ms(self, nbytes: int) -> float:
        return nbytes / (self.bandwidth_gbps * 1e9) * 1e3 + self.latency_us / 1e3


def parse_tiers(spec: str) -> list[TierSpec]:
    """Parse KIND:CAPACITY_BLOCKS[:BANDWIDTH_GBPS[:LATENCY_US]],... (InputError naming the bad part)."""
    tiers = []
    if not spec or not spec.strip():
        raise InputError("tier spec is empty; expected KIND:CAPACITY_BLOCKS[:BANDWIDTH_GBPS[:LATENCY_US]],...")
    for item in spec.split(","):
        parts = item.strip().split(":")
        kind = parts[0].strip().lower()
        if kind not in DEFAULT_LINKS:
            raise InputError(f"tier spec '{item.strip()}': unknown tier kind '{parts[0]}'; "
                             f"valid: {', '.join(DEFAULT_LINKS)}")
        if len(parts) < 2 or len(parts) > 4:
            raise InputError(f"tier spec '{item.strip()}': expected KIND:CAPACITY_BLOCKS[:BANDWIDTH_GBPS[:LATENCY_US]]")
        try:
            cap = int(parts[1])
        except ValueError:
            raise InputError(f"tier spec '{item.strip()}': capacity '{parts[1]}' "
                             "is not a whole number of blocks") from None
        if cap < 0:
            raise InputError(f"tier spec '{item.strip()}': capacity must not be negative")
        bw, lat = DEFAULT_LINKS[kind]
        try:
            if len(parts) > 2:
                bw = float(parts[2])
            if len(parts) > 3:
                lat = float(parts[3])
        except ValueError as e:
            raise InputError(f"tier spec '{item.strip()}': {e}") from None
        if not bw > 0 or not lat >= 0:
            raise InputError(f"tier spec '{item.strip()}': bandwidth must be > 0 and latency >= 0")
        tiers.append(TierSpec(kind, cap, bw, lat))
    return tiers


@dataclass(frozen=True)
class CostModel:
    """Defaults: Llama-3-8B in fp16 (32 layers x 8 KV heads x 128 dims x K,V x 2 bytes = 128 KiB per token)
    on one H100: prefill about 20k tokens/s, decode about 25 ms per token at batch load."""

    bytes_per_token: int = 131072
    prefill_us_per_token: float = 50.0
    decode_ms_per_token: float = 25.0

    def block_tokens(self, req: Request, pos: int) -> int:
        if pos < req.blocks - 1:
            return TOKENS_PER_BLOCK
        rest = req.input_length - TOKENS_PER_BLOCK * (req.blocks - 1)
        return max(1, min(TOKENS_PER_BLOCK, rest))

    def ttft_ms(self, req: Request, served: list[int | None], tiers: list[TierSpec]) -> float:
        """Load every hit from the tier that served it, recompute every miss (serially: an upper bound)."""
        ms = 0.0
        for pos, t in enumerate(served):
            tokens = self.block_tokens(req, pos)
            if t is None:
                ms += tokens * self.prefill_us_per_token / 1e3
            else:
                ms += tiers[t].load_ms(tokens * self.bytes_per_token)
        return ms

    def busy_ms(self, req: Request, misses: int) -> tuple[float, float]:
        """(prefill, decode) duration of a request, for how long its session holds its blocks."""
        prefill = misses * TOKENS_PER_BLOCK * self.prefill_us_per_token / 1e3
        return prefill, req.output_length * self.decode_ms_per_token


@dataclass
class TierResult:
    policy: str
    tiers: list[TierSpec]
    accesses: int = 0
    hits_per_tier: list[int] = field(default_factory=list)
    demotions: int = 0
    promotions: int = 0
    drops: int = 0
    bytes_moved: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    max_pinned_blocks: int = 0

    def as_dict(self) -> dict:
        hits = sum(self.hits_per_tier)
        t = sorted(self.ttft_ms) or [0.0]
        return {
            "policy": self.policy,
            "tiers": [{"kind": s.kind, "capacity_blocks": s.capacity_blocks, "bandwidth_gbps": s.bandwidth_gbps,
                       "latency_us": s.latency_us, "hits": h,
                       "hit_rate": h / self.accesses if self.accesses else 0.0}
                      for s, h in zip(self.tiers, self.hits_per_tier)],
            "block_accesses": self.accesses, "hits": hits,
            "hit_rate": hits / self.accesses if self.accesses else 0.0,
            "demotions": self.demotions, "promotions": self.promotions, "drops": self.drops,
            "bytes_moved": self.bytes_moved, "max_pinned_blocks": self.max_pinned_blocks,
            "ttft_ms_mean": statistics.fmean(t), "ttft_ms_p50": t[len(t) // 2], "ttft_ms_p90": t[int(len(t) * 0.9)],
        }


class TierStack:
    """N tiers, one policy instance each; the first tier is the working tier."""

    def __init__(self, policy_name: str, tiers: list[TierSpec], requests: list[Request] | None = None,
                 cost: CostModel | None = None, urgency: bool = True, on_event=None,
                 hints: list[SessionState] | None = None):
        if not tiers:
            raise InputError("at least one tier is needed")
        self.tiers = tiers
        self.cost = cost or CostModel()
        self.urgency = urgency
        self.on_event = on_event  # on_event(kind, tier, block, time_ms) for evict/demote/drop/pin/unpin
        self.hints = hints        # per request: the engine's hint when its turn ends (replay.lifecycle_hints)
        opts = {}
        from kvtier.policy.registry import policy_class
        if policy_class(policy_name).offline:
            from kvtier.policy.opt import next_uses
            opts["next_use_table"] = next_uses(requests)
        self.policies = [make_policy(policy_name, t.capacity_blocks, requests=requests, **opts) for t in tiers]
        for p in self.policies[1:]:
            if hasattr(p, "learner"):
                p.learner = self.policies[0]
        self.location: dict[int, int] = {}
        self.pinned: dict[int, int] = {}  # block -> number of decoding requests holding it
        self._ends: list[tuple[float, int, Request, list[bool]]] = []   # (decode end, index, request, hits)
        self.result = TierResult(policy=self.policies[0].name, tiers=tiers, hits_per_tier=[0] * len(tiers))
        self.now_ms = 0.0

    def _event(self, kind, tier, block):
        if self.on_event is not None:
            self.on_event(kind, tier, block, self.now_ms)

    def _block_bytes(self) -> int:
        return TOKENS_PER_BLOCK * self.cost.bytes_per_token

    def _cascade(self, tier: int, blocks: list[int], meta_from=None) -> None:
        """Blocks evicted or declined by `tier` go to the tier below; the last tier drops them."""
        for b in blocks:
            if self.location.get(b) == tier:
                del self.location[b]
            nxt = tier + 1
            if nxt >= len(self.policies):
                self.result.drops += 1
                self._event("drop", tier, b)
                continue
            self._event("demote", tier, b)
            meta = self.policies[tier].export_meta(b)
            evicted = self.policies[nxt].admit_demoted(b, meta)
            if self.policies[nxt].contains(b):
                self.location[b] = nxt
                self.result.demotions += 1
                self.result.bytes_moved += self._block_bytes()
            self._cascade(nxt, [v for v in evicted if v != b])

    def _offer_top(self, req: Request, pos: int, hit: bool) -> None:
        b = req.hash_ids[pos]
        top = self.policies[0]
        evicted = top.offer(b, req, pos, hit)
        for v in evicted:
            self._event("evict", 0, v)
        if top.contains(b):
            self.location[b] = 0
        else:
            evicted = [v for v in evicted if v != b] + [b]
        self._cascade(0, evicted)

    def _fit_top(self) -> None:
        cap = max(0, self.tiers[0].capacity_blocks - len(self.pinned))
        evicted = self.policies[0].resize(cap)
        for v in evicted:
            self._event("evict", 0, v)
        self._cascade(0, evicted)

    def _release_until(self, t_ms: float) -> None:
        while self._ends and self._ends[0][0] <= t_ms:
            end, _, req, hits = heapq.heappop(self._ends)
            self.now_ms = end
            for p in self.policies:
                p.session_hint(req.session_id, SessionState.IDLE, end)
            freed = []
            for pos, b in enumerate(req.hash_ids):
                n = self.pinned.get(b)
                if n is None:
                    continue
                if n > 1:
                    self.pinned[b] = n - 1
                else:
                    del self.pinned[b]
                    freed.append(pos)
                    self._event("unpin", 0, b)
            self.policies[0].capacity_blocks = max(0, self.tiers[0].capacity_blocks - len(self.pinned))
            for pos in freed:
                self._offer_top(req, pos, hits[pos])   # a hit: resident when the request arrived
            self._send_hint(req, end)

    def _send_hint(self, req: Request, now_ms: float) -> None:
        """The engine's hint as req's turn ends, to every tier's policy (after the turn's blocks were offered)."""
        if self.hints is not None:
            for p in self.policies:
                p.session_hint(req.session_id, self.hints[req.index], now_ms)

    def step(self, req: Request) -> None:
        self._release_until(req.timestamp_ms)
        self.now_ms = req.timestamp_ms
        for p in self.policies:
            p.begin_request(req)
        served: list[int | None] = []
        res = self.result
        for b in req.hash_ids:
            if b in self.pinned:
                t = 0
            else:
                t = self.location.get(b)
                if t is not None and t > 0:  # promote: out of the lower tier, offered to the top below
                    self.policies[t].remove(b)
                    del self.location[b]
                    res.promotions += 1
                    res.bytes_moved += self._block_bytes()
            served.append(t)
            if t is not None:
                res.hits_per_tier[t] += 1
        res.accesses += len(served)
        res.ttft_ms.append(self.cost.ttft_ms(req, served, self.tiers))
        if not self.urgency:
            for pos in range(len(req.hash_ids)):
                self._offer_top(req, pos, served[pos] is not None)
            for p in self.policies:
                p.request_done(req)
            self._send_hint(req, self.now_ms)
            return
        misses = sum(1 for t in served if t is None)
        prefill_ms, decode_ms = self.cost.busy_ms(req, misses)
        cap0 = self.tiers[0].capacity_blocks
        for pos, b in enumerate(req.hash_ids):
            if b in self.pinned:
                self.pinned[b] += 1
            elif len(self.pinned) < cap0:
                if self.location.get(b) == 0:
                    self.policies[0].remove(b)
                    del self.location[b]
                self.pinned[b] = 1
                self._event("pin", 0, b)
            else:  # the working tier is all pinned: serve this block from below
                self._offer_top(req, pos, served[pos] is not None)
        res.max_pinned_blocks = max(res.max_pinned_blocks, len(self.pinned))
        for p in self.policies:
            p.session_hint(req.session_id, SessionState.DECODE, self.now_ms)
            p.request_done(req)   # what the request teaches, now: its pinned blocks are offered at its end
        self._fit_top()
        heapq.heappush(self._ends, (req.timestamp_ms + prefill_ms + decode_ms, req.index, req,
                                    [t is not None for t in served]))

    def finish(self) -> TierResult:
        self._release_until(float("inf"))
        return self.result


def replay_tiers(requests: list[Request], policy_name: str, tiers: list[TierSpec], cost: CostModel | None = None,
                 urgency: bool = True, on_event=None, progress=None,
                 hints: list[SessionState] | None = None) -> TierResult:
    stack = TierStack(policy_name, tiers, requests, cost, urgency, on_event, hints)
    step = max(1, len(requests) // 100)
    for r in requests:
        stack.step(r)
        if progress is not None and (r.index + 1) % step == 0:
            progress(r.index + 1)
    return stack.finish()
