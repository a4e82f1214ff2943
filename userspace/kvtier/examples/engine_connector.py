"""How an engine's KV offload connector (vLLM KVConnector / LMCache-style) would use kvtierd.

The engine keeps KV in GPU pages of `block_tokens` tokens. After prefill it saves the request's full blocks to
kvtierd (save_kv); when a later turn arrives it asks which leading blocks kvtierd has (lookup, by chained prefix
hash) and loads them instead of recomputing (load_kv). Decoding / idle / resume hints let kvtierd keep the
session's blocks in DRAM while it decodes and prefetch them before the next turn.

Runnable against a daemon:  python -m kvtier.examples.engine_connector --socket /run/kvtier/kvtierd.sock
"""
from __future__ import annotations

import argparse

import numpy as np
import xxhash

from kvtier.client import PUT_BATCH, Client


def chained_hashes(tokens: list[int], block_tokens: int, parent: int = 0) -> list[int]:
    """One 64-bit hash per full block: hash(parent hash, the block's tokens) -- equal prefix, equal hash."""
    out = []
    for i in range(0, len(tokens) - len(tokens) % block_tokens, block_tokens):
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") +
                                          np.asarray(tokens[i:i + block_tokens], dtype=np.int32).tobytes())
        out.append(parent)
    return out


class KvtierConnector:
    """The three calls an engine's connector makes; `layers x 2 x block_tokens x heads x head_dim` per block."""

    def __init__(self, socket_path: str, tenant: str, block_tokens: int = 16):
        self.kv = Client(socket_path, tenant)
        self.block_tokens = block_tokens
        self.sessions: dict[str, int] = {}

    def _session(self, request_id: str) -> int:
        if request_id not in self.sessions:
            self.sessions[request_id] = self.kv.register_session(request_id)
        return self.sessions[request_id]

    def lookup(self, request_id: str, tokens: list[int]) -> int:
        """How many leading tokens kvtierd can supply (the engine skips prefill for them)."""
        sid = self._session(request_id)
        self.kv.hint(sid, "resume")
        hashes = chained_hashes(tokens, self.block_tokens)
        hit = 0
        for where in self.kv.contains(hashes):
            if where is None:
                break   # a prefix: the first miss ends it
            hit += 1
        return hit * self.block_tokens

    def load_kv(self, request_id: str, tokens: list[int], gpu_blocks: list[np.ndarray]) -> int:
        """Copy the stored prefix blocks into the engine's buffers; returns blocks loaded. get_views lends the
        daemon's memory itself: a real connector copies host-to-device from it (no staging copy first)."""
        hashes = chained_hashes(tokens, self.block_tokens)[:len(gpu_blocks)]
        sid, per = self._session(request_id), self.kv.get_batch_blocks
        loaded = 0
        while loaded < len(hashes):   # as many as the daemon holds for one get at a time; a miss ends the prefix
            with self.kv.get_views(sid, hashes[loaded:loaded + per]) as views:
                for src in views:
                    if src is None:
                        return loaded
                    gpu_blocks[loaded][...] = src   # stands for the H2D copy into the engine's KV pages
                    loaded += 1
        return loaded

    def save_kv(self, request_id: str, tokens: list[int], blocks: list[np.ndarray]) -> int:
        """After prefill: store the request's full blocks (a shared prefix is stored once). put_into hands out the
        daemon's slots: a real connector copies device-to-host into them (no staging copy first)."""
        hashes = chained_hashes(tokens, self.block_tokens)[:len(blocks)]
        sid = self._session(request_id)
        types = ["prefix"] + ["history"] * (len(hashes) - 1)
        stored = 0
        if hashes:
            # one put_into per batch the daemon takes at once (its slots are reserved in memory together)
            per = max(1, min(PUT_BATCH, self.kv.put_batch_bytes // max(1, blocks[0].nbytes)))
            for i in range(0, len(hashes), per):
                todo = [(h, t, b.nbytes) for h, t, b in zip(hashes[i:i + per], types[i:i + per], blocks[i:i + per])]
                with self.kv.put_into(sid, todo, dtype=blocks[0].dtype, shape=blocks[0].shape) as slots:
                    for dst, src in zip(slots, blocks[i:i + per]):
                        if dst is not None:   # None: already stored (a shared prefix)
                            dst[...] = src    # stands for the D2H copy out of the engine's KV pages
                stored += slots.stored
        self.kv.hint(sid, "decoding")   # its blocks stay in DRAM while it generates
        return stored

    def request_finished(self, request_id: str) -> None:
        self.kv.hint(self._session(request_id), "idle")   # may resume: kept, demoted rather than dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", default="/run/kvtier/kvtierd.sock")
    args = ap.parse_args()
    conn = KvtierConnector(args.socket, tenant="example")
    shape = (4, 2, 16, 8, 64)   # layers, K/V, tokens, heads, head_dim
    turn1 = list(range(100))
    blocks = [np.random.default_rng(i).standard_normal(shape).astype(np.float16) for i in range(6)]
    print("turn 1: cached tokens", conn.lookup("conv-1", turn1))
    print("turn 1: stored blocks", conn.save_kv("conv-1", turn1, blocks))
    conn.request_finished("conv-1")
    turn2 = turn1 + list(range(1000, 1040))
    cached = conn.lookup("conv-1", turn2)
    staging = [np.empty(shape, np.float16) for _ in range(cached // 16)]
    loaded = conn.load_kv("conv-1", turn2, staging)
    assert all(np.array_equal(a, b) for a, b in zip(staging[:loaded], blocks))
    print(f"turn 2: {cached} tokens cached, {loaded} blocks loaded and verified")


if __name__ == "__main__":
    main()
