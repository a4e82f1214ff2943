"""How kvtierd's engine drives its GPU tiers (kvtier.cuda.tier.GpuTier); the engine calls these hooks.

The GPU tiers are the engine's first tiers, so the policy's promotions land there (GpuTier.commit prefetches the
block to the GPU) and its demotions leave from there (prepare_demote: preferred location the host NUMA node, a
prefetch there, waited for before the copy to the next tier). On top of that:

  - clients never see GPU memory: puts go to the first host tier, and a get of a GPU-resident block is staged
    (cudaMemcpy) into a slot of a host tier, reserved under a placeholder key and freed when the lease is
    released;
  - a block held by two or more sessions (a shared prefix) is advised read-mostly while on the GPU;
  - a session that starts decoding has its GPU-resident blocks prefetched to the GPU again (the existing pin
    logic keeps them there); a resuming session's blocks are promoted (the engine's resume path), which
    prefetches them;
  - tick() retires finished prefetches (their events) from the daemon's loop.
"""
from __future__ import annotations

import errno

STAGE_KEY_PREFIX = b"\xfd" * 8   # placeholder keys of staging slots (spare slots use \xfe)


class GpuPlacement:
    def __init__(self, engine):
        self.e = engine
        self.tiers = {t for t, tier in enumerate(engine.tiers) if tier.kind == "gpu"}
        self.host = [t for t in range(engine.mem_count) if t not in self.tiers]
        self.staged: dict[int, list[tuple[int, bytes]]] = {}   # lease -> staging slots (tier, placeholder key)
        self.counters = {"staged_gets": 0, "staged_bytes": 0, "stage_no_room": 0, "shared_marked": 0,
                         "decode_prefetches": 0}

    def _gpu(self, b):
        return self.e.tiers[b.tier] if b.tier in self.tiers and b.key in self.e.blocks else None

    # -- moves ----------------------------------------------------------------------------------------
    def before_demote(self, b, src: int) -> None:
        if src in self.tiers:
            self.e.tiers[src].prepare_demote(b.key)

    def after_promote(self, b) -> None:
        self.shared(b)

    def shared(self, b) -> None:
        """A block on a GPU tier that two or more sessions hold: read-mostly."""
        tier = self._gpu(b)
        if tier is not None and len(b.sessions) >= 2 and tier.set_shared(b.key, True):
            self.counters["shared_marked"] += 1

    def decoding(self, session) -> None:
        """A session starts decoding: its GPU-resident blocks go to the GPU again (pinned there by the engine)."""
        for key in list(session.blocks):
            b = self.e.blocks.get(key)
            tier = self._gpu(b) if b is not None else None
            if tier is not None:
                tier.prefetch(key)
                self.counters["decode_prefetches"] += 1

    def tick(self) -> int:
        return sum(self.e.tiers[t].poll() for t in self.tiers)

    # -- client reads -----------------------------------------------------------------------------------
    def stage(self, b, lease: int):
        """(tier, Slot) of a host copy of GPU-resident block b for a client get, or (None, None) when no host
        tier has room (the get reports a miss for it)."""
        e = self.e
        for t in self.host:
            tier = e.tiers[t]
            pkey = STAGE_KEY_PREFIX + next(e._ids).to_bytes(8, "little")
            try:
                e._room(t, b.nbytes)
                slot = tier.reserve(pkey, b.nbytes, e._domain(b))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                continue
            try:
                e.tiers[b.tier].copy_out(b.key, tier.view(slot))
            except BaseException:
                tier.abort(pkey)
                raise
            self.staged.setdefault(lease, []).append((t, pkey))
            self.counters["staged_gets"] += 1
            self.counters["staged_bytes"] += b.nbytes
            return t, slot
        self.counters["stage_no_room"] += 1
        return None, None

    def release(self, lease: int) -> None:
        for t, pkey in self.staged.pop(lease, ()):
            try:
                self.e.tiers[t].abort(pkey)
            except KeyError:
                pass
