"""The engine's side of the cluster tier (kvtier.store.cluster): what to publish, what to fetch, and how a
fetched block joins the local tiers.

The cluster tier sits below every local tier and is shared by every kvtierd of the cluster. The policy:
- publish (config `publish = "auto"`): at put, blocks that are shared prefixes (block type prefix) or already
  used by more than one session; at eviction from the last local tier, blocks the policy saw reused (hits, more
  than one session) or of a reusable type (prefix, history). Blocks another host may want, not every tail block.
  `all` publishes every put, `none` nothing.
- fetch (`fetch = "auto"`): a local miss asks the cluster for the object's size (one master RPC), then fetches
  when latency + size / bandwidth, both measured on this tier, beats recomputing the block at
  `recompute_bytes_per_s`; otherwise it stays a miss (the engine recomputes) and `fetch_skipped_recompute` counts it.
A fetched block lands straight in a reserved memory-tier slot (no copy), is verified, and then is an ordinary
local block. A failure of any kind is a miss.
"""
from __future__ import annotations

import errno
import logging

from kvtier.policy.model import BlockType
from kvtier.store.cluster import ClusterConfig, ClusterTier, ClusterTimeout, ClusterUnavailable

log = logging.getLogger("kvtier.daemon")

EVICT_REASONS = {"capacity", "policy", "declined", "resize", "admin"}
REUSABLE_TYPES = {int(BlockType.PREFIX), int(BlockType.HISTORY)}


class ClusterLink:
    def __init__(self, engine, cfg: ClusterConfig, tier: ClusterTier | None = None):
        self.engine = engine
        self.cfg = cfg
        self.tier = tier or ClusterTier(cfg)
        self.name = cfg.name
        self.fetched_now: set[bytes] = set()   # keys fetched during the current get (served from the cluster)
        self.counters = {"hits": 0, "lookups": 0, "published": 0, "publish_declined": 0, "fetch_failed": 0}
        self.tier.start()

    # -- policy ------------------------------------------------------------------------------------------
    def should_publish(self, b, when: str) -> bool:
        mode = self.cfg.publish
        if mode == "none" or b.nbytes is None:
            return False
        if mode == "all":
            return when == "put"
        if when == "put":
            return b.btype == int(BlockType.PREFIX) or len(b.sessions) > 1
        return b.hits > 0 or len(b.sessions) > 1 or b.btype in REUSABLE_TYPES

    def _publish(self, b, payload) -> None:
        head = {"type": b.btype, "meta": b.meta, "layout": list(b.layout) if b.layout else None}
        try:
            if self.tier.publish(b.key, payload, head):
                self.counters["published"] += 1
        except (ValueError, TypeError) as e:   # metadata too large for the header, or not msgpack-able
            log.debug("not publishing %s: %s", b.key.hex(), e)
            self.counters["publish_declined"] += 1

    def on_put(self, blocks) -> None:
        for b in blocks:
            if self.should_publish(b, "put"):
                try:
                    payload = self.engine._read(b.tier, b)
                except OSError:
                    continue
                self._publish(b, payload)
                del payload

    def on_evict(self, b, src: int, reason: str) -> None:
        """b is about to leave this host (dropped from the last local tier): publish it if it is worth it."""
        if reason not in EVICT_REASONS or b.tenant is None or not self.should_publish(b, "evict"):
            return
        try:
            payload = self.engine._read(src, b)
        except OSError:
            return
        self._publish(b, payload)
        del payload

    def on_delete(self, b) -> None:
        self.tier.remove(b.key)

    # -- lookups ---------------------------------------------------------------------------------------------
    def begin_get(self) -> None:
        self.fetched_now.clear()

    def fetch(self, tenant: str, key: bytes):
        """A local miss: the block from the cluster as a new local Block (in the first memory tier with room),
        or None (absent, not worth fetching, no room, unreachable, or failed verification)."""
        from kvtier.daemon.engine import Block
        eng = self.engine
        tier = self.tier
        if not tier.usable:
            return None
        self.counters["lookups"] += 1
        n = tier.size_of(key)
        if n is None or not eng.cfg.min_block_bytes <= n <= eng.cfg.max_block_bytes or not tier.worth_fetching(n):
            return None
        pkey = b"\xfd" * 8 + next(eng._ids).to_bytes(8, "little")   # placeholder until verified
        try:
            t, slot = eng._reserve(pkey, n, eng.salt(tenant))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            return None
        mem = eng.tiers[t]
        arena = mem._arenas[slot.arena]
        keep_reserved = False
        try:
            if not tier.register(arena.addr, arena.size):
                return None
            view = mem.view(slot)
            late_key = pkey
            try:
                head = tier.fetch_into(key, arena.addr + slot.offset, n, view, lambda: mem.abort(late_key))
            except ClusterTimeout:
                # the call may still write into the slot: it stays reserved until that call ends
                head, keep_reserved = None, True
            except ClusterUnavailable:
                head = None
            finally:
                view.release()
            if head is None:
                self.counters["fetch_failed"] += 1
                return None
            mem.rename_reserved(pkey, key)
            pkey = None
        finally:
            if pkey is not None and not keep_reserved:
                mem.abort(pkey)
        mem.commit(key)
        eng._arena_id(t, slot.arena)
        b = Block(key, tenant, n, head.get("type"), head.get("meta"), t)
        b.layout = tuple(head["layout"]) if head.get("layout") else None
        b.out_of_policy = True   # the get that fetched it hands it to its tier's policy (or release does)
        eng._add(b)
        eng._log_move(b, None, t, f"fetched from {self.name}")
        self.fetched_now.add(key)
        self.counters["hits"] += 1
        return b

    def contains(self, keys: list[bytes]) -> list[bool]:
        return self.tier.contains_many(keys)

    # -- reporting -------------------------------------------------------------------------------------------
    def row(self) -> dict:
        st = self.tier.stats()
        return {"name": self.name, "kind": "cluster", "capacity_bytes": self.tier.capacity_bytes,
                "used_bytes": st["used_bytes"], "blocks": st["blocks"], "hits": self.counters["hits"],
                "backend": "mooncake", "backend_note": self.tier.backend_note, "health": st["health"]}

    def status(self) -> dict:
        st = self.tier.stats()
        est = self.tier.fetch_estimate_us(1 << 20)
        return {"name": self.name, "health": st["health"], "local_hostname": self.cfg.local_hostname,
                "master": self.cfg.master, "metadata_server": self.cfg.metadata_server,
                "publish": self.cfg.publish, "fetch": self.cfg.fetch,
                "latency_us": st["latency_us"], "bandwidth_bytes_per_s": st["bandwidth_bytes_per_s"],
                "fetch_1mib_estimate_us": est, "recompute_1mib_us": (1 << 20) / self.cfg.recompute_bytes_per_s * 1e6,
                "pending_publishes": st["pending_publishes"],
                "counters": dict(self.counters, **{k: st[k] for k in (
                    "fetches", "fetch_bytes", "publishes", "publish_failures", "publish_skipped", "timeouts",
                    "errors", "busy", "checksum_failures", "fetch_skipped_recompute", "misses", "removes",
                    "remove_failures")})}

    def close(self) -> None:
        self.tier.close()
