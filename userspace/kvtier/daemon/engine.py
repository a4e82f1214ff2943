"""The block engine: one index of blocks over a stack of tiers, driven by the policy library.

Tiers are fastest first: memory tiers (DRAM, CXL: kvtier.store.MemoryTier) then at most one NVMe cold store
(kvtier.store.NvmeTier). Like kvtier.policy.tiers.TierStack, every tier has its own policy instance (same name),
and what a tier's policy evicts or declines is demoted to the next tier instead of dropped; only the last tier
drops. A hit in a lower tier is promoted to the first tier. Pinned blocks (decoding sessions, `kvctl pin`) and
blocks a client is copying out of (leased) are taken out of their policy, so nothing can pick them as victims.

Keys: key = xxh3_128(tenant salt + prefix hash), 16 bytes; a tenant only ever reaches keys under its own salt, and
one copy is kept per key however many sessions reference it (refcounts are the sessions holding it).

Durability: a block is in the NVMe tier once it was demoted there or put with durable=True (written through at
commit, before the commit is acknowledged). Those blocks survive kill -9 (NvmeTier's crash-safe index) and are
served after a restart; blocks only in a memory tier are lost if the process dies (a cache, not a store). A
graceful stop (SIGTERM) copies them to NVMe first, within a time budget (flush_for_restart), then closes the index.

Every move is logged (logger kvtier.daemon, debug) and kept in a ring buffer of recent moves with its reason.
"""
from __future__ import annotations

import errno
import itertools
import logging
import time
from collections import deque
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import msgpack

from kvtier.daemon import directory
from kvtier.daemon.directory import derive_key
from kvtier.policy.model import BlockType, Request, SessionState
from kvtier.policy.registry import make_policy
from kvtier.store.base import ErrorBoundExceeded
from kvtier.store.codec import DTYPES
from kvtier.store.memory import shmem_thp_mode
from kvtier.store.nvme import MAX_HEADER as NVME_HEADER_MAX, extent_bytes   # (headers up to it stored apart)

log = logging.getLogger("kvtier.daemon")

MOVES_KEPT = 4096
PUT_SPARES_MAX = 2048   # spare slots handed out per request
# Blocks out of every policy (pinned by decoding sessions; reserved for puts being written and as spare slots) are
# bounded by bytes only, so tiny ones could grow the daemon's index (~2 KiB a block) without a count bound: each
# kind is held to the memory tiers' capacity in nominal blocks, and to at least this many.
OUT_OF_POLICY_MIN_BLOCKS = 65536
NVME_MAGIC = b"KVB1"
RECLAIM_BATCH_BYTES = 8 << 20   # one step of background reclaim: ~2-3 ms of disk here, then requests again
UNPIN_AT_ONCE = 1024   # a session leaving decoding with more pinned blocks is unpinned in steps (unpin_step)
UNPIN_STEP_S = 0.002   # of unpinning per server turn, then requests again
WRITEBACK_DEPTH = 2   # reclaim batches queued for the writer thread: the next is ready when one is done
STATES = {"prefilling": SessionState.PREFILL, "decoding": SessionState.DECODE, "idle": SessionState.IDLE,
          "finished": SessionState.FINISHED, "resume": SessionState.RESUME}
BLOCK_TYPES = {t.name.lower(): int(t) for t in BlockType}


def err(code: int, msg: str) -> OSError:
    return OSError(code, msg)


def _plain(x):
    """Policy explanations as wire-safe values: 128-bit block ids as hex, enums and tuples as plain values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_plain(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (float, str)):
        return x
    if isinstance(x, int):
        return x if -(1 << 63) <= x < (1 << 64) else f"{x:032x}"
    return str(x)


def _check_layout(layout, nbytes: int):
    """A put item's layout [dtype, tokens, heads, head_dim] (None: no layout), checked against its size."""
    if layout is None:
        return None
    if not isinstance(layout, (list, tuple)) or len(layout) != 4 or layout[0] not in DTYPES or \
            not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in layout[1:]):
        raise err(errno.EINVAL, f"layout: expected [dtype ({', '.join(DTYPES)}), tokens, heads, head_dim], "
                                f"got {layout!r}")
    need = 2 * layout[1] * layout[2] * layout[3] * (4 if layout[0] == "fp32" else 2)
    if need != nbytes:
        raise err(errno.EINVAL, f"layout: {layout!r} describes {need} bytes, the block has {nbytes}")
    return tuple(layout)


class Block:
    __slots__ = ("key", "bid", "tenant", "nbytes", "btype", "meta", "tier", "sessions", "pins", "leases",
                 "nvme_copy", "durable", "out_of_policy", "hits", "layout", "writeback")

    def __init__(self, key, tenant, nbytes, btype, meta, tier):
        self.key = key
        self.bid = int.from_bytes(key, "little")
        self.tenant = tenant
        self.nbytes = nbytes
        self.btype = btype
        self.meta = meta
        self.tier = tier
        self.sessions: set[int] = set()
        self.pins = 0           # decoding sessions + kvctl pins holding it
        self.leases = 0         # gets a client has not released yet
        self.nvme_copy = False  # a copy exists in the NVMe tier
        self.durable = False    # put with durable=True: the NVMe copy is kept while the block is in memory
        self.out_of_policy = False
        self.hits = 0
        self.layout = None      # (dtype, tokens, heads, head_dim) of a KV block a quantising tier may quantise
        self.writeback = False  # a reclaim victim the writer thread is copying to NVMe (Engine.reclaim)

    def to_dict(self, tiers) -> dict:
        return {"block": self.key.hex(), "tenant": self.tenant, "nbytes": self.nbytes,
                "block_type": BlockType(self.btype).name.lower() if self.btype is not None else None,
                "tier": tiers[self.tier].name, "sessions": len(self.sessions), "pinned": self.pins > 0,
                "durable": self.nvme_copy or tiers[self.tier].kind == "nvme", "hits": self.hits}


def count_down(counts: dict, key) -> None:
    """counts[key] -= 1, the key dropped at 0 (counts of what a tenant or uid holds open)."""
    left = counts.pop(key) - 1
    if left:
        counts[key] = left


class Session:
    __slots__ = ("sid", "tenant", "name", "state", "blocks", "created", "uid")

    def __init__(self, sid, tenant, name, uid=None):
        self.sid, self.tenant, self.name, self.uid = sid, tenant, name, uid   # uid: the peer that registered it
        self.state = "prefilling"
        self.blocks: dict[bytes, None] = {}   # keys in the order the session took them on (a prefix first)
        self.created = time.time()


class Engine:
    def __init__(self, cfg, tiers: list, metrics=None):
        self.cfg = cfg
        self.salts: dict[str, bytes] = {}   # tenant -> salt (salt())
        self.domain_tenants: dict[bytes, set] = {}   # domain (salt) -> tenants that bound it (release_stale_domains)
        self.tiers = tiers
        self.metrics = metrics
        self.nvme = tiers[-1] if tiers[-1].kind == "nvme" else None
        self.mem_count = len(tiers) - (1 if self.nvme is not None else 0)
        self.limit_bytes = [t.capacity_bytes for t in tiers]
        self.blocks: dict[bytes, Block] = {}   # written only by _add and _forget (they keep the indexes below)
        # each tenant's blocks apart (None: recovered, tenant not read yet), so a tenant's `status` count and
        # `kvctl blocks` listing cost its own blocks: at a million blocks a walk over all of them held the server
        # loop, every tenant's requests with it, for ~30 ms
        self.by_tenant: dict[str | None, dict[bytes, Block]] = {}
        self.tier_blocks = [0] * len(tiers)   # stored blocks by b.tier (a tier's own count includes copies)
        self.by_bid: dict[int, Block] = {}
        # blocks with pins -> (tenant, uid, bytes) charged for them: the session that pinned them first (None, None:
        # kvctl pin), and the bytes as they were then (a block recovered from NVMe has none until its header is
        # read); kept so status counts them without a scan
        self.pinned: dict[Block, tuple] = {}
        self.pinned_bytes: dict = {}       # tenant -> bytes of the blocks charged to it (max_pinned_per_tenant)
        self.uid_pinned_bytes: dict = {}   # uid -> the same, in every tenant (max_pinned_per_uid)
        self.pinned_bytes_total = 0        # of every pinned block (status, kvtier_pinned_bytes)
        self.sessions: dict[int, Session] = {}
        self.tenant_sessions: dict[str, int] = {}   # tenant -> its registered sessions (status without a scan)
        self.uid_sessions: dict[int, int] = {}      # uid -> the sessions it registered, in every tenant
        self.pending: dict[int, tuple] = {}   # txn -> (tenant, sid, [(key, Block)], durable)
        self.pending_keys: dict[bytes, int] = {}   # key -> txn reserving it
        self.leases: dict[int, list[Block]] = {}
        self.moves: deque = deque(maxlen=MOVES_KEPT)
        self.counters = {"puts": 0, "dedup_puts": 0, "gets": 0, "misses": 0, "demotions": 0, "promotions": 0,
                         "drops": 0, "bytes_moved": 0, "prefetches": 0, "reclaim_batches": 0,
                         "writeback_blocks": 0, "touched": 0, "pins_over_quota": 0}
        self.hits_by_tier = [0] * len(tiers)
        self.evictions: dict[str, int] = {}
        self.set_free_targets([getattr(tc, "free_target_bytes", 0) for tc in cfg.tiers])
        self._wb: deque = deque()   # writebacks in flight, oldest first: (future, tier, [Block], bytes) (reclaim)
        self._wb_pool = None        # their one writer thread, started on first use
        self.on_writeback_done = None   # called from the writer thread when a writeback is done (wakes the server)
        self._ids = itertools.count(1)
        self._req_index = 0
        self.arena_table: list[tuple[int, int]] = []     # global arena id -> (tier, tier's arena index)
        self._arena_ids: dict[tuple[int, int], int] = {}
        for t in range(self.mem_count):
            for a in range(len(tiers[t].arenas())):
                self._arena_id(t, a)
        self.policy_name = cfg.policy
        self.policies = self._make_policies(cfg.policy)
        self.cluster = None   # kvtier.daemon.cluster_link.ClusterLink: the Mooncake tier below, when configured
        # The server sets defer_policy: the policy's bookkeeping of a put or a memory hit (and a cluster publish)
        # then runs right after the reply is sent (run_deferred), not while the client waits for it. Nothing
        # else runs in between, so the policy sees the same events in the same order.
        self.defer_policy = False
        self._deferred: deque = deque()
        # blocks of sessions that left decoding, unpinned by unpin_step, and policy hints given after them
        self._unpins: deque = deque()
        self.gpu = None       # kvtier.cuda.placement.GpuPlacement: hooks for GPU tiers (first tiers), when any
        if any(t.kind == "gpu" for t in tiers):
            from kvtier.cuda.placement import GpuPlacement
            self.gpu = GpuPlacement(self)
        # block directories, one per domain (kvtier.daemon.directory): clients read the first tier's blocks
        # without asking. Not where the first tier is a GPU's (clients cannot map it)
        self.dirs: dict[bytes, directory.Directory] = {}
        self.directory_on = directory.available() and self.gpu is None and self.mem_count > 0 and \
            hasattr(tiers[0], "on_free")
        if self.directory_on:
            tiers[0].on_free = self._unlist
        if self.nvme is not None:
            self._recover_nvme()

    # -- set-up ------------------------------------------------------------------------------------
    def salt(self, tenant: str) -> bytes:
        """The tenant's key salt, cached: an unconfigured tenant's config is built on every cfg.tenant() call.
        The server clears the cache when a reload changes the tenants."""
        s = self.salts.get(tenant)
        if s is None:
            s = self.cfg.tenant(tenant).salt
            if len(self.salts) < 1 << 16:
                self.salts[tenant] = s
        return s

    def _mine(self, b: Block | None, tenant: str, salt: bytes) -> bool:
        """Whether tenant (whose salt is `salt`) may reach b: its own, or one of a tenant configured with the same
        salt (tenants sharing a salt share blocks)."""
        return b is not None and (b.tenant == tenant or (b.tenant is not None and self.salt(b.tenant) == salt))

    def _domain(self, b: Block) -> bytes:
        """The memory domain b's bytes live in: its tenant's salt, so only clients of tenants that share that
        salt map them (a block recovered from NVMe learns its tenant from its header first)."""
        if b.tenant is None and self._known(b) is None:
            raise err(errno.EIO, f"block {b.key.hex()} is unreadable")
        return self.salt(b.tenant)

    def open_domain(self, tenant: str, busy: set) -> bytes:
        """Make sure every client-mappable memory tier has arenas for tenant's domain (its salt) and return it.
        A tier at its domain limit first closes the arenas of idle domains (none of `busy`, nothing stored)."""
        domain = self.salt(tenant)
        for t in range(self.mem_count):
            tier = self.tiers[t]
            try:
                tier.domain_arenas(domain)
            except OSError as e:
                if e.errno != errno.EUSERS:
                    raise
                for d in tier.domains:
                    if d not in busy:
                        tier.release_domain(d)
                tier.domain_arenas(domain)
                held = {d for m in range(self.mem_count) for d in self.tiers[m].domains}
                self.domain_tenants = {d: ts for d, ts in self.domain_tenants.items() if d in held}
        self.domain_tenants.setdefault(domain, set()).add(tenant)
        # (with a cluster tier too: a block read through the directory is a local first-tier hit, which the
        # cluster has no part in; a miss still asks the daemon, which fetches from the cluster)
        if self.directory_on and domain not in self.dirs:
            self.dirs[domain] = directory.Directory(directory.buckets_for(self._capacity_blocks(0)))
        return domain

    def directory(self, domain: bytes):
        """The domain's block directory for its clients to map (None: gets go through the socket only)."""
        return self.dirs.get(domain)

    def _list(self, b: Block, slot) -> None:
        """Put b, just served or stored in the first tier at `slot`, in its domain's directory."""
        d = self.dirs.get(self.salt(b.tenant)) if b.tenant is not None else None
        if d is not None:
            d.put(b.key, self._arena_id(0, slot.arena), 0, slot.offset, slot.nbytes, b.meta)

    def _unlist(self, key: bytes, domain: bytes | None) -> None:
        """key's slot in the first tier is about to be freed (MemoryTier.on_free): no client may find it after."""
        d = self.dirs.get(domain)
        if d is not None:
            d.delete(key)

    def release_domain(self, domain: bytes, stale: bool = False) -> None:
        """The last connection of a domain closed: its arenas go where nothing is stored in them (`stale`: the
        prefaulted ones a tier started with too, as no tenant maps to this domain any more)."""
        released = True
        for t in range(self.mem_count):
            released &= self.tiers[t].release_domain(domain, keep_prefaulted=not stale)
        if released:
            self.domain_tenants.pop(domain, None)
            d = self.dirs.pop(domain, None)
            if d is not None:
                d.close()

    def release_stale_domains(self, busy: set) -> None:
        """After a reload: domains that none of the tenants that bound them maps to any more (their salt changed),
        and that no connection holds, are released, prefaulted arenas included (else they stay resident)."""
        for domain, tenants in list(self.domain_tenants.items()):
            if domain not in busy and all(self.salt(t) != domain for t in tenants):
                self.release_domain(domain, stale=True)

    def _capacity_blocks(self, t: int) -> int:
        return max(1, self.limit_bytes[t] // self.cfg.nominal_block_bytes)

    def _make_policies(self, name: str) -> list:
        ps = [make_policy(name, self._capacity_blocks(t)) for t in range(len(self.tiers))]
        for p in ps[1:]:
            if hasattr(p, "learner"):
                p.learner = ps[0]   # lower tiers only see demotions: score with the first tier's statistics
        return ps

    def _recover_nvme(self) -> None:
        """After a restart the NVMe tier's index names what survived; metadata is read lazily on first use."""
        n = 0
        for key in self.nvme.keys():
            b = Block(key, None, None, None, None, len(self.tiers) - 1)
            self._add(b)
            self.policies[-1].admit_demoted(b.bid, None)
            n += 1
        # The policy may hold fewer blocks than the disk (a smaller capacity or nominal block size since):
        # what it did not keep is dropped, as it would have been had it been offered live.
        dropped = 0
        for b in list(self.blocks.values()):
            if not self.policies[-1].contains(b.bid):
                b.out_of_policy = True
                self._drop(b, "recovery")
                dropped += 1
        log.info("recovered %d blocks from %s (%d over the policy's capacity dropped)", n - dropped,
                 self.nvme.name, dropped)

    def _arena_id(self, t: int, a: int) -> int:
        g = self._arena_ids.get((t, a))
        if g is None:
            g = self._arena_ids[(t, a)] = len(self.arena_table)
            self.arena_table.append((t, a))
        return g

    def arenas(self, domain: bytes) -> list[dict]:
        """How a client of `domain` maps its arenas (and no other domain's), each named by its global id."""
        out = []
        for t in range(self.mem_count):
            handles = self.tiers[t].arenas()
            for a in self.tiers[t].domain_arenas(domain):
                h = dict(handles[a])
                h.update(arena=self._arena_id(t, a), tier=self.tiers[t].name)
                out.append(h)
        return out

    # -- moves ---------------------------------------------------------------------------------------
    def _log_move(self, b: Block, src: int | None, dst: int | None, reason: str) -> None:
        rec = {"time": time.time(), "block": b.key.hex(), "from": self.tiers[src].name if src is not None else None,
               "to": self.tiers[dst].name if dst is not None else None, "reason": reason, "nbytes": b.nbytes}
        self.moves.append(rec)
        log.debug("move %s %s -> %s (%s, %s bytes)", rec["block"], rec["from"], rec["to"], reason, b.nbytes)
        if self.metrics is not None and src is not None and dst is not None:
            self.metrics.moved_bytes(b.nbytes or 0, rec["from"], rec["to"])

    def _read(self, t: int, b: Block):
        """The block's payload from tier t (a memoryview for memory tiers)."""
        tier = self.tiers[t]
        try:
            if t < self.mem_count:
                return tier.view(tier.locate(b.key))
            raw = tier.get(b.key)
        except (KeyError, OSError) as e:
            self._unreadable(t, b, e)
        return memoryview(raw)[self._parse_head(t, b, raw, len(raw)):]

    def _unreadable(self, t: int, b: Block, e: BaseException):
        if isinstance(e, OSError) and e.errno not in (errno.EIO, None):
            raise e
        # corrupt (the tier verified its checksum and dropped it) or gone: forget it, never serve it
        log.error("block %s in %s unreadable (%s): forgotten", b.key.hex(), self.tiers[t].name, e)
        self.policies[t].remove(b.bid)
        self._forget(b)
        self.evictions["corrupt"] = self.evictions.get("corrupt", 0) + 1
        raise err(errno.EIO, f"block {b.key.hex()} in {self.tiers[t].name} is unreadable") from None

    def _parse_head(self, t: int, b: Block, raw, total: int) -> int:
        """Learn b's metadata from its NVMe header (raw starts with it; total = header + payload bytes);
        returns the header's length."""
        hlen = int.from_bytes(raw[4:8], "little")
        if raw[:4] != NVME_MAGIC or 8 + hlen > len(raw):
            raise err(errno.EIO, f"block {b.key.hex()}: bad header in {self.tiers[t].name}")
        head = msgpack.unpackb(raw[8:8 + hlen], raw=False)
        self._set_tenant(b, head["tenant"])
        b.btype, b.meta = head["type"], head["meta"]
        b.durable = bool(head.get("durable"))
        b.layout = tuple(head["layout"]) if head.get("layout") else None
        b.nvme_copy = True
        b.nbytes = total - 8 - hlen
        return 8 + hlen

    def _fill_from_nvme(self, b: Block, nbytes: int):
        """A payload for _store that reads b's data from NVMe straight into the memory slot (O_DIRECT into
        the arena when the slot is page-aligned), checksum verified; None when b's header is not stored
        apart from its data (older or oversized headers): read it the general way."""
        try:
            info = self.nvme.block_info(b.key)
        except KeyError as e:
            self._unreadable(len(self.tiers) - 1, b, e)
        if not info["header_length"]:
            return None

        def fill(view):
            t = len(self.tiers) - 1
            try:
                head, n = self.nvme.get_body_into(b.key, view)
            except (KeyError, OSError) as e:
                self._unreadable(t, b, e)
            self._parse_head(t, b, head, len(head) + n)
            if n != nbytes:
                raise err(errno.EIO, f"block {b.key.hex()}: changed size on {self.tiers[t].name}")
        fill.nbytes = info["length"] - info["header_length"]
        return fill

    def _known(self, b: Block | None) -> Block | None:
        """b with its tenant known: a block recovered from NVMe learns it from its header on first use
        (None if it turns out unreadable: it was forgotten)."""
        if b is not None and b.tenant is None:
            try:
                self._read(b.tier, b)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                return None
        return b

    def _nvme_header(self, b: Block) -> bytes:
        fields = {"tenant": b.tenant, "type": b.btype, "meta": b.meta, "durable": b.durable}
        if b.layout:
            fields["layout"] = list(b.layout)
        head = msgpack.packb(fields, use_bin_type=True)
        return b"".join((NVME_MAGIC, len(head).to_bytes(4, "little"), head))

    def _room(self, t: int, nbytes: int, reason: str = "capacity") -> None:
        """Demote victims of tier t's policy until nbytes more fit under its limit (ENOSPC if they cannot)."""
        tier = self.tiers[t]
        while tier.used_bytes + nbytes > self.limit_bytes[t]:
            if self._wb and self._wb[0][1] == t:
                # reclaim is writing this tier's victims: wait for them (as the kernel throttles a writer on
                # dirty pages) rather than write more of our own beside the writer
                self._writeback_finish()
                continue
            if not self._demote_batch(t, tier.used_bytes + nbytes - self.limit_bytes[t], reason):
                raise err(errno.ENOSPC, f"tier {tier.name}: no room for {nbytes} bytes: "
                                        f"every block is pinned or being read")

    def _victim(self, t: int) -> Block | None:
        """The next block tier t's policy gives up that can move now (out of its policy), or None."""
        while True:
            v = self.policies[t].pop_victim()
            if v is None:
                return None
            b = self.by_bid.get(v)
            if b is None or b.tier != t:
                continue
            if b.leases or b.pins:
                b.out_of_policy = True   # re-offered when released / unpinned
                continue
            return b

    def _evict_one(self, t: int, reason: str) -> bool:
        b = self._victim(t)
        if b is None:
            return False
        self._demote(b, reason)
        return True

    def _victims(self, t: int, nbytes: int) -> list:
        """Victims of tier t (out of its policy now) until they hold at least nbytes."""
        victims, got = [], 0
        while got < nbytes:
            b = self._victim(t)
            if b is None:
                break
            victims.append(b)
            got += b.nbytes or 1
        return victims

    def _to_nvme(self, t: int) -> bool:
        """Whether tier t demotes into the NVMe tier."""
        return self.nvme is not None and t < self.mem_count and t + 1 == len(self.tiers) - 1

    def _demote_batch(self, t: int, nbytes: int, reason: str) -> bool:
        """Demote victims of tier t until at least nbytes of them moved, now; those bound for NVMe are written
        as one group commit (one device flush for the lot, not one each). False if no block could move."""
        victims = self._victims(t, nbytes)
        if not victims:
            return False
        if self._to_nvme(t):
            todo = [b for b in victims if not b.nvme_copy]
            if todo:
                self._nvme_put_many(todo)   # if that fails, _demote writes them one by one
        for b in victims:
            self._demote(b, reason)
        return True

    def set_free_targets(self, targets: list) -> None:
        """The bytes reclaim() keeps free in each memory tier that has a tier below it (0: off)."""
        targets = (list(targets) + [0] * len(self.tiers))[:len(self.tiers)]
        self.free_target = [0 if t + 1 >= len(self.tiers) or t >= self.mem_count or self.tiers[t].kind == "gpu"
                            else min(int(n or 0), self.limit_bytes[t] // 2) for t, n in enumerate(targets)]
        # a tier under its (new) target refills it at once, not only once it falls under half of it
        self._reclaiming = [bool(n) and self.limit_bytes[t] - self.tiers[t].used_bytes < n
                            for t, n in enumerate(self.free_target)]

    def reclaim(self, batch_bytes: int = RECLAIM_BATCH_BYTES) -> bool:
        """Background demotion, as kswapd does for the kernel: a memory tier whose free bytes fell under half
        its free target demotes its policy's victims, a batch per call, until the whole target is free again.
        So a put finds room without waiting for the disk, and the disk gets batches with one flush each.
        A batch bound for NVMe is written by a thread (writeback) while requests go on; it moves when the
        write is done (_writeback_finish). The server calls this after requests, while idle and when
        on_writeback_done wakes it; True while a tier wants another batch at once. Up to WRITEBACK_DEPTH
        batches wait for the writer, so the disk does not wait for the server to pick the next one."""
        while self._wb and self._wb[0][0].done():
            self._writeback_finish()
        more = False
        for t, target in enumerate(self.free_target):
            if not target:
                continue
            free = self._free_bytes(t)
            if self.limit_bytes[t] - self.tiers[t].used_bytes >= target or \
                    (free >= target // 2 and not self._reclaiming[t]):
                self._reclaiming[t] = False   # refilled (written, not only being written), or not yet due
                continue
            if free >= target:
                continue   # the rest is being written: its completion wakes the server, and the refill goes on
            to_nvme = self._to_nvme(t)
            if to_nvme and len(self._wb) >= WRITEBACK_DEPTH:
                continue   # the writer has enough: a completion wakes the server
            self._reclaiming[t] = True
            victims = self._victims(t, min(batch_bytes, target - free))
            if not victims:
                self._reclaiming[t] = False   # nothing movable now (pinned, leased): the next put retries
                continue
            self.counters["reclaim_batches"] += 1
            later = []
            for b in victims:
                if to_nvme and not b.nvme_copy and b.nbytes and self._quant_layout(b) is None:
                    later.append(b)
                else:
                    self._demote(b, "reclaim")   # to a memory tier (a copy), or already on disk: now
            if later:
                self._writeback_start(t, later)
            more = more or (self._free_bytes(t) < target and not (to_nvme and len(self._wb) >= WRITEBACK_DEPTH))
        return more

    def _free_bytes(self, t: int) -> int:
        """Tier t's free bytes for reclaim: those of blocks being written count, as they will be once written."""
        return self.limit_bytes[t] - self.tiers[t].used_bytes + sum(w[3] for w in self._wb if w[1] == t)

    def _writeback_start(self, t: int, blocks: list) -> None:
        """Hand tier t's victims to the writer thread as one NVMe group commit. They stay where they are,
        readable, until it is done; anything that would free or move one first waits for it (_settle).
        If that cannot start (no room on disk without evicting for them now), they are demoted here."""
        try:
            items = self._nvme_items(blocks)
            if items is None:
                raise err(errno.E2BIG, f"a header over {NVME_HEADER_MAX} bytes")
            # room on disk now, in this thread, for this batch and those still in flight (the writer only writes)
            self._room(len(self.tiers) - 1, sum(extent_bytes(b.nbytes) for b in blocks) +
                       sum(extent_bytes(b.nbytes) for w in self._wb for b in w[2]))
        except OSError as e:
            log.debug("writeback of %d blocks from %s: %s; demoting them now", len(blocks), self.tiers[t].name, e)
            items = None   # (views of arena memory)
            for b in blocks:
                if self.blocks.get(b.key) is b and b.tier == t:
                    self._demote(b, "reclaim")
            return
        for b in blocks:
            b.writeback = True
        if self._wb_pool is None:
            self._wb_pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-writeback")
        fut = self._wb_pool.submit(self.nvme.put_many, items)
        del items
        self._wb.append((fut, t, blocks, sum(b.nbytes or 0 for b in blocks)))
        if self.on_writeback_done is not None:
            fut.add_done_callback(lambda _: self.on_writeback_done())

    def _writeback_finish(self) -> None:
        """Wait for the oldest writeback and move its blocks to the NVMe tier (main thread). One that was
        taken back meanwhile (hit back into its policy, pinned, being read) stays in memory with its disk
        copy; if the write failed, each goes the synchronous way."""
        fut, t, blocks, _ = self._wb.popleft()
        futures.wait([fut])
        for b in blocks:
            b.writeback = False
        try:
            fut.result()
            ok = True
        except Exception as e:   # noqa: BLE001 - any failure: demote them one by one instead
            log.warning("writeback of %d blocks from %s failed (%s); demoting them one by one", len(blocks),
                        self.tiers[t].name, e)
            ok = False
        self.counters["writeback_blocks"] += len(blocks) if ok else 0
        for b in blocks:
            if self.blocks.get(b.key) is not b:
                if ok and b.key not in self.blocks:   # gone meanwhile (cannot happen: _settle): no orphan on disk
                    self.nvme.delete(b.key)
                continue
            if ok:
                b.nvme_copy = True
            if b.tier != t or b.pins or b.leases or self.policies[t].contains(b.bid):
                if b.leases or b.pins:
                    b.out_of_policy = True   # re-offered when released / unpinned
                continue
            self._demote(b, "reclaim")

    def _settle(self, b: Block) -> None:
        """Before b's memory may be freed or b moved: wait for a writeback that is reading it (rare: a victim
        being written is out of every policy's reach; a client delete, a promotion or kvctl evict of it)."""
        if b.writeback:
            self.writeback_wait()

    @property
    def writeback_busy(self) -> bool:
        return bool(self._wb)

    @property
    def writeback_batches(self) -> int:
        """Reclaim batches in flight (written, or waiting for the writer)."""
        return len(self._wb)

    def writeback_wait(self) -> None:
        """Wait for the writebacks in flight, if any, and finish them."""
        while self._wb:
            self._writeback_finish()

    def _store(self, t: int, b: Block, payload) -> None:
        """Write payload into tier t (making room there first); payload may be a function that fills the
        reserved memory slot itself (_fill_from_nvme)."""
        tier = self.tiers[t]
        size = payload.nbytes if callable(payload) else len(payload)
        n = size if t < self.mem_count else size + 256
        for _ in range(64):
            self._room(t, n if t < self.mem_count else 0)
            try:
                if t < self.mem_count:
                    slot = self._reserve_in(t, b.key, size, self._domain(b))
                    try:
                        if callable(payload):
                            payload(tier.view(slot))
                        else:
                            tier.view(slot)[:] = payload
                    except BaseException:
                        tier.abort(b.key)
                        raise
                    tier.commit(b.key)
                    self._arena_id(t, slot.arena)
                else:
                    header = self._nvme_header(b)
                    if len(header) <= NVME_HEADER_MAX:   # apart from the data: no copy to join them
                        self._nvme_put(b, payload, header)
                    else:
                        tier.put(b.key, b"".join((header, payload)))
                return
            except OSError as e:
                if e.errno != errno.ENOSPC or not self._evict_one(t, "capacity"):
                    raise
        raise err(errno.ENOSPC, f"tier {tier.name}: no room after 64 evictions")

    def _quant_layout(self, b: Block):
        """b's KVLayout when the NVMe tier quantises and b has one (else None: stored as the codec says)."""
        if b.layout is None or self.nvme is None or self.nvme.codec.lossless:
            return None
        from kvtier.store.codec import KVLayout
        return KVLayout(*b.layout)

    def _nvme_put(self, b: Block, payload, header: bytes) -> None:
        layout = self._quant_layout(b)
        try:
            self.nvme.put(b.key, payload, header=header, layout=layout)
        except ErrorBoundExceeded as e:
            # over the tier's stated bound: this block is stored exactly (the store counted the refusal)
            log.debug("block %s: %s; stored lossless", b.key.hex(), e)
            self.nvme.put(b.key, payload, header=header, lossless=True)

    def _demote(self, b: Block, reason: str) -> None:
        """Move b one tier down (or drop it from the last tier). b is already out of its policy."""
        src = b.tier
        if b.writeback:
            self.writeback_wait()
            if b.tier != src or self.blocks.get(b.key) is not b:
                return   # the writeback moved it down just now: that was this demotion
        dst = src + 1
        if dst >= len(self.tiers):
            self._drop(b, reason)
            return
        if self.tiers[dst].kind == "nvme" and b.nvme_copy:
            pass   # written through at put: the disk copy is current
        else:
            if self.gpu is not None:
                self.gpu.before_demote(b, src)   # a GPU block: prefetched to the host first
            payload = self._read(src, b)
            try:
                self._store(dst, b, payload)
            except OSError as e:
                log.warning("demote %s from %s failed (%s); dropping it", b.key.hex(), self.tiers[src].name, e)
                del payload
                self._drop(b, "demote-failed")
                return
            del payload
        if src < self.mem_count:
            self.tiers[src].delete(b.key)
        self._retier(b, dst)
        if self.tiers[dst].kind == "nvme":
            b.nvme_copy = True
        self.counters["demotions"] += 1
        self.counters["bytes_moved"] += b.nbytes or 0
        self._log_move(b, src, dst, reason)
        meta = self.policies[src].export_meta(b.bid)
        self._admit(dst, b, lambda p: p.admit_demoted(b.bid, meta))

    def _admit(self, t: int, b: Block, offer) -> None:
        """Hand b to tier t's policy; cascade what it evicts; a declined b goes further down."""
        b.out_of_policy = False
        evicted = offer(self.policies[t])
        for v in evicted:
            if v == b.bid:
                continue
            vb = self.by_bid.get(v)
            if vb is None or vb.tier != t:
                continue
            if vb.leases or vb.pins:
                vb.out_of_policy = True
                continue
            self._demote(vb, "policy")
        if not self.policies[t].contains(b.bid) and b.tier == t:
            if b.pins or b.leases:
                b.out_of_policy = True   # declined while held: offered again when released / unpinned
            else:
                self._demote(b, "declined")

    def _take_out(self, b: Block) -> None:
        """Out of its tier's policy (pinned): no policy can choose it; _put_back hands it back."""
        self.policies[b.tier].remove(b.bid)
        b.out_of_policy = True

    def _put_back(self, b: Block) -> None:
        if b.out_of_policy and not b.pins and not b.leases and b.key in self.blocks:
            self._admit(b.tier, b, lambda p: p.admit_demoted(b.bid, None))

    def _drop(self, b: Block, reason: str) -> None:
        self._settle(b)
        src = b.tier
        if self.cluster is not None:
            self.cluster.on_evict(b, src, reason)   # leaving this host: the policy may publish it first
        try:
            self.tiers[src].delete(b.key)
            if b.nvme_copy and self.nvme is not None and src < self.mem_count:
                self.nvme.delete(b.key)
        except OSError as e:
            log.warning("delete %s from %s: %s", b.key.hex(), self.tiers[src].name, e)
        self.policies[src].remove(b.bid)
        self._forget(b)
        self.counters["drops"] += 1
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.evicted(reason)
        self._log_move(b, src, None, reason)

    def _add(self, b: Block) -> None:
        old = self.blocks.get(b.key)
        if old is not None:
            self._unindex(old)
            if old is not b:
                self._uncharge_pin(old)   # replaced: no longer stored
        self.blocks[b.key] = b
        self.by_bid[b.bid] = b
        self._index(b)

    def _set_tenant(self, b: Block, tenant: str | None) -> None:
        if b.tenant != tenant:
            stored = self.blocks.get(b.key) is b
            if stored:
                self._unindex(b)
            b.tenant = tenant
            if stored:
                self._index(b)

    def _index(self, b: Block) -> None:
        mine = self.by_tenant.get(b.tenant)
        if mine is None:
            mine = self.by_tenant[b.tenant] = {}
        mine[b.key] = b
        self.tier_blocks[b.tier] += 1

    def _unindex(self, b: Block) -> None:
        mine = self.by_tenant.get(b.tenant)
        if mine is not None and mine.get(b.key) is b:
            del mine[b.key]
            if not mine:
                del self.by_tenant[b.tenant]
            self.tier_blocks[b.tier] -= 1

    def _retier(self, b: Block, t: int) -> None:
        """b now lives in tier t (the only place a block changes tier)."""
        if self.blocks.get(b.key) is b:
            self.tier_blocks[b.tier] -= 1
            self.tier_blocks[t] += 1
        b.tier = t

    def of_tenant(self, tenant: str | None) -> dict[bytes, Block]:
        """The tenant's stored blocks by key (the index itself: do not modify)."""
        return self.by_tenant.get(tenant, {})

    def of_tier(self, t: int, tenant: str | None = None):
        """The stored blocks in tier t (of one tenant), lazily: found through the tier's own keys, or through the
        tenant's blocks when they are fewer. A tier's keys include reserved slots and a durable block's NVMe copy,
        which are skipped."""
        blocks = self.blocks
        if tenant is not None:
            mine = self.of_tenant(tenant)
            if len(mine) <= len(self.tiers[t]):
                return (b for b in mine.values() if b.tier == t)
            blocks = mine
        return (b for b in map(blocks.get, self.tiers[t].keys()) if b is not None and b.tier == t)

    def _forget(self, b: Block) -> None:
        gone = self.blocks.pop(b.key, None)
        if gone is not None:
            self._unindex(gone)
        self._uncharge_pin(b)
        self.by_bid.pop(b.bid, None)
        for sid in b.sessions:
            s = self.sessions.get(sid)
            if s is not None:
                s.blocks.pop(b.key, None)

    def _promote(self, b: Block, reason: str) -> bool:
        """Bring b up to the first memory tier with room (the first tier, else the next ones above it);
        False if none has room (b stays where it is). The caller hands b to its new tier's policy."""
        self._settle(b)
        src = b.tier
        if src == 0:
            return True
        # (not with GPU tiers: the promotion tries the GPU first, and O_DIRECT into managed memory is not assured)
        payload = self._fill_from_nvme(b, b.nbytes) if src >= self.mem_count and b.nbytes is not None \
            and self.gpu is None else None
        if payload is None:
            payload = self._read(src, b)
        self.policies[src].remove(b.bid)
        b.out_of_policy = True
        b.leases += 1   # not a victim while a tier makes room
        dst = None
        try:
            for t in range(min(src, self.mem_count)):
                try:
                    self._store(t, b, payload)
                    dst = t
                    break
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        finally:
            b.leases -= 1
        if dst is None:
            self._put_back(b)
            return False
        del payload
        if src < self.mem_count or not b.durable:
            self.tiers[src].delete(b.key)
            if src >= self.mem_count:
                b.nvme_copy = False
        # a durable block keeps its NVMe copy: it is now in memory and on disk
        self._retier(b, dst)
        if dst == 0 and self.dirs:
            self._list(b, self.tiers[0].locate(b.key))   # a prefetch, say: the next get finds it without asking
        if self.gpu is not None:
            self.gpu.after_promote(b)   # a shared prefix on the GPU: read-mostly
        self.counters["promotions"] += 1
        self.counters["bytes_moved"] += b.nbytes or 0
        self._log_move(b, src, dst, reason)
        return True

    # -- requests as the policy sees them -----------------------------------------------------------
    def _request(self, sid: int | None, tenant: str, blocks: list[Block]) -> Request:
        self._req_index += 1
        return Request(self._req_index, time.monotonic() * 1e3, 512 * len(blocks), 0, [b.bid for b in blocks],
                       session_id=-1 if sid is None else sid, tenant=tenant)   # -1: no session (ids start at 1)

    def _session(self, tenant: str, sid) -> Session | None:
        if sid is None:
            return None
        s = self.sessions.get(sid)
        if s is None or s.tenant != tenant:
            raise err(errno.ENOENT, f"no session {sid} for this tenant")
        return s

    # -- API ops -------------------------------------------------------------------------------------
    def register_session(self, tenant: str, name: str, uid: int | None = None) -> int:
        held, most = self.tenant_sessions.get(tenant, 0), self.cfg.max_sessions_per_tenant
        if held >= most:
            raise err(errno.EDQUOT, f"tenant {tenant!r} holds {held} open sessions, the most that "
                                    f"max_sessions_per_tenant allows; end some first")
        # (per uid too: an unconfigured tenant is any name, so the per-tenant cap alone bounds nothing)
        held, most = self.uid_sessions.get(uid, 0), self.cfg.max_sessions_per_uid
        if uid is not None and held >= most:
            raise err(errno.EDQUOT, f"uid {uid} holds {held} open sessions, the most that max_sessions_per_uid "
                                    f"allows; end some first")
        sid = next(self._ids)
        self.sessions[sid] = Session(sid, tenant, name or f"s{sid}", uid)
        self.tenant_sessions[tenant] = self.tenant_sessions.get(tenant, 0) + 1
        if uid is not None:
            self.uid_sessions[uid] = held + 1
        self.policies[0].session_hint(sid, SessionState.PREFILL, time.monotonic() * 1e3)
        return sid

    def end_session(self, tenant: str, sid: int) -> int:
        s = self._session(tenant, sid)
        self.hint(tenant, sid, "finished")
        n = 0
        for key in list(s.blocks):
            b = self.blocks.get(key)
            if b is not None:
                b.sessions.discard(sid)
                n += 1
        del self.sessions[sid]
        count_down(self.tenant_sessions, tenant)
        if s.uid is not None:
            count_down(self.uid_sessions, s.uid)
        return n

    def hint(self, tenant: str, sid: int, state: str, block_types=None) -> None:
        s = self._session(tenant, sid)
        if state not in STATES:
            raise err(errno.EINVAL, f"unknown session state {state!r}; valid: {', '.join(STATES)}")
        if block_types is not None:
            salt = self.salt(tenant)
            for key_hash, btype in block_types:
                b = self.blocks.get(derive_key(salt, key_hash))
                if self._mine(b, tenant, salt):
                    b.btype = BLOCK_TYPES.get(btype, btype) if isinstance(btype, str) else int(btype)
        was, asked = s.state, state
        if state == "decoding" and was != "decoding":
            held = [b for b in map(self.blocks.get, s.blocks) if b is not None]
            _, over = self._pin_room(s, [b for b in held if b not in self.pinned])
            if over is not None:
                raise err(*over)   # nothing changed: the session stays as it was
            for b in held:   # pinned where they are: the get before decoding brought them up
                self._pin(b, s)
            if self.gpu is not None:
                self.gpu.decoding(s)   # its GPU-resident blocks: prefetched to the GPU again
        elif state != "decoding" and was == "decoding":
            held = [b for b in map(self.blocks.get, s.blocks) if b is not None]
            if len(held) <= UNPIN_AT_ONCE and not self._unpins:
                for b in held:
                    self._unpin(b)
            else:
                # Back to the policies a few ms at a time between requests (unpin_step): each may cascade
                # demotions, and tens of thousands at once held every tenant's requests for seconds. Until then
                # they stay pinned, which is what they were; a pin taken meanwhile is counted on top.
                self._unpins.extend(held)
        if state == "resume":
            for key in list(s.blocks):
                b = self.blocks.get(key)
                if b is not None and b.tier != 0:
                    if self._promote(b, "prefetch"):
                        self.counters["prefetches"] += 1
                        self._admit(b.tier, b, lambda p: p.admit_demoted(b.bid, None))
            state = "idle"
        # every tier's policy hears it, after a resume's promotions: a finished or resuming session's blocks
        # are re-ranked by what the engine says (see kvtier.policy.predictor), wherever they are
        hinted = STATES[asked]
        bids = None
        if hinted in (SessionState.FINISHED, SessionState.RESUME):
            bids = [b.bid for b in map(self.blocks.get, s.blocks) if b is not None]
        now_ms = time.monotonic() * 1e3
        if self._unpins:   # after the unpinning queued before it: the policies hear it with the blocks back
            self._unpins.append((sid, hinted, now_ms, bids))
        else:
            self._hint_policies(sid, hinted, now_ms, bids)
        s.state = state

    def _hint_policies(self, sid, hinted, now_ms, bids) -> None:
        for p in self.policies:
            p.session_hint(sid, hinted, now_ms, bids)

    def _attach(self, s: Session, b: Block) -> None:
        """b is now one of s's blocks; a decoding session pins what it takes on (and unpins it at idle)."""
        if b.key in s.blocks:
            return
        s.blocks[b.key] = None
        b.sessions.add(s.sid)
        if self.gpu is not None:
            self.gpu.shared(b)
        if s.state == "decoding":
            if b in self.pinned or self._pin_room(s, [b])[1] is None:
                self._pin(b, s)
            else:   # a get cannot be refused for it: the block is served and stays in its policy
                self.counters["pins_over_quota"] += 1

    def unpin_step(self, budget_s: float = UNPIN_STEP_S) -> bool:
        """Unpin the blocks of sessions that left decoding, and pass on the hints given after them, for up to
        budget_s; True while some are left."""
        q = self._unpins
        deadline = time.perf_counter() + budget_s
        while q:
            b = q.popleft()
            if b.__class__ is tuple:
                self._hint_policies(*b)   # a hint given while blocks were still to be unpinned
            else:
                self._unpin(b)
            if time.perf_counter() > deadline:
                break
        return bool(q)

    def _pin(self, b: Block, s: Session | None = None) -> None:
        """Pin b for session s (None: kvctl pin, charged to no one)."""
        b.pins += 1
        self._charge_pin(b, s)
        self._take_out(b)

    def _unpin(self, b: Block) -> None:
        if b.pins > 0:
            b.pins -= 1
            if not b.pins:
                self._uncharge_pin(b)
        self._put_back(b)

    def _charge_pin(self, b: Block, s: Session | None) -> None:
        """b's first pin: its bytes count against the pinning session's tenant and uid until its last pin goes."""
        if b in self.pinned:
            return
        nbytes = b.nbytes or 0
        tenant, uid = (None, None) if s is None else (s.tenant, s.uid)
        self.pinned[b] = (tenant, uid, nbytes)
        self.pinned_bytes_total += nbytes
        for counts, k in ((self.pinned_bytes, tenant), (self.uid_pinned_bytes, uid)):
            if k is not None:
                counts[k] = counts.get(k, 0) + nbytes

    def _uncharge_pin(self, b: Block) -> None:
        charged = self.pinned.pop(b, None)
        if charged is None:
            return
        tenant, uid, nbytes = charged
        self.pinned_bytes_total -= nbytes
        for counts, k in ((self.pinned_bytes, tenant), (self.uid_pinned_bytes, uid)):
            if k is not None:
                left = counts.pop(k) - nbytes
                if left:
                    counts[k] = left

    def _pin_room(self, s: Session, blocks: list) -> tuple[int, tuple | None]:
        """How many of `blocks` (not pinned yet, in order) session s may pin, and (errno, why) it may not pin the
        rest: pinned blocks are at most out_of_policy_limit(), and a tenant's and a uid's pinned bytes at most
        max_pinned_per_tenant and max_pinned_per_uid."""
        count_room = self.out_of_policy_limit() - len(self.pinned)
        limits = [(self.pinned_bytes.get(s.tenant, 0), self.cfg.max_pinned_per_tenant, "max_pinned_per_tenant",
                   f"tenant {s.tenant!r}")]
        if s.uid is not None:
            limits.append((self.uid_pinned_bytes.get(s.uid, 0), self.cfg.max_pinned_per_uid, "max_pinned_per_uid",
                           f"uid {s.uid}"))
        nbytes = 0
        for n, b in enumerate(blocks):
            if n >= count_room:
                # pinned blocks are out of every policy, so the bytes alone would bound them: tiny blocks would then
                # grow the daemon's index (~2 KiB a block) far past what the tiers' policies ever hold
                return n, (errno.ENOSPC, f"{len(self.pinned)} blocks are pinned, and the memory tiers hold at most "
                                         f"{self.out_of_policy_limit()} pinned (their capacity / "
                                         f"blocks.nominal_bytes, at least {OUT_OF_POLICY_MIN_BLOCKS})")
            nbytes += b.nbytes
            for held, most, key, who in limits:
                if held + nbytes > most:
                    return n, (errno.EDQUOT, f"{who} has {held} bytes pinned by decoding sessions, and pinning "
                                             f"{nbytes} more passes {key} ({most} bytes); let "
                                             f"some of its sessions leave decoding first")
        return len(blocks), None

    def put_reserve(self, tenant: str, sid, items: list, durable: bool) -> tuple[int, list]:
        s = self._session(tenant, sid)
        salt = self.salt(tenant)
        txn = next(self._ids)
        slots, staged, staged_keys = [], [], set()
        room = self.out_of_policy_limit() - self._reserved()
        try:
            for item in items:
                if not isinstance(item, (list, tuple)) or len(item) not in (4, 5):
                    raise err(errno.EINVAL, "a put item is [prefix_hash, block_type, nbytes, meta(, layout)]")
                h, btype, nbytes, meta = item[:4]
                layout = _check_layout(item[4], nbytes) if len(item) == 5 else None
                if isinstance(btype, str):
                    btype = BLOCK_TYPES.get(btype)
                if not isinstance(btype, int) or btype not in BLOCK_TYPES.values():
                    raise err(errno.EINVAL, f"block type must be one of {', '.join(BLOCK_TYPES)}")
                if not isinstance(nbytes, int) or isinstance(nbytes, bool) or \
                        not self.cfg.min_block_bytes <= nbytes <= self.cfg.max_block_bytes:
                    raise err(errno.EINVAL, f"block size {nbytes!r} outside [{self.cfg.min_block_bytes}, "
                                            f"{self.cfg.max_block_bytes}] bytes")
                key = derive_key(salt, h)
                old = self.blocks.get(key)
                if old is not None or key in self.pending_keys or key in staged_keys:
                    # stored, or being written by another put right now: one copy per key
                    if old is not None and s is not None:
                        self._attach(s, old)
                    self.counters["dedup_puts"] += 1
                    slots.append(None)
                    continue
                if len(staged) >= room:
                    raise err(errno.EDQUOT, f"{self._reserved()} slots are reserved for puts being written and "
                                            f"as spares, the most the memory tiers hold (their capacity / "
                                            f"blocks.nominal_bytes, at least {OUT_OF_POLICY_MIN_BLOCKS}); commit "
                                            f"or abort puts first")
                t, slot = self._reserve(key, nbytes, salt)
                nb = Block(key, tenant, nbytes, btype, meta, t)
                nb.layout = layout
                staged.append((key, nb))
                staged_keys.add(key)
                slots.append([self._arena_id(t, slot.arena), slot.offset, nbytes])
        except BaseException:
            for key, b in staged:
                self.tiers[b.tier].abort(key)
            raise
        self.pending[txn] = (tenant, sid, staged, durable)
        for key, _ in staged:
            self.pending_keys[key] = txn
        return txn, slots

    def _reserve_in(self, t: int, key: bytes, nbytes: int, domain: bytes):
        """A slot in memory tier t, in domain's arenas: victims are demoted until nbytes fit under its limit and,
        when its arena is fragmented, until a free extent is large enough (ENOSPC once nothing is left to
        demote)."""
        self._room(t, nbytes)
        while True:
            try:
                return self.tiers[t].reserve(key, nbytes, domain)
            except OSError as e:
                if e.errno != errno.ENOSPC or not self._evict_one(t, "fragmentation"):
                    raise

    def _reserve(self, key: bytes, nbytes: int, domain: bytes):
        """A slot in the first memory tier with room (victims demoted); reserved slots are not evictable,
        so a batch larger than the first tier continues in the next one."""
        why = None   # the last tier's reason (its text, not the exception: that would be a cycle with this frame)
        for t in range(self.mem_count):
            if self.gpu is not None and t in self.gpu.tiers:
                continue   # clients write into host memory; the GPU tier is reached by promotion
            try:
                return t, self._reserve_in(t, key, nbytes, domain)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                why = e.strerror
        raise err(errno.ENOSPC, f"no memory tier has room for a {nbytes}-byte block: {why}")

    # -- one-round-trip puts: spare slots ---------------------------------------------------------------
    # A put reply (and a "spare" request) may hand the client spare slots: space reserved in a memory tier
    # under a placeholder key, owned by that connection. The client copies its next blocks into spare slots
    # of the right size and sends one "put" naming them (spare id, arena, offset, nbytes): the daemon checks
    # the slot is this connection's and matches, renames the placeholder to the block's key and commits
    # (dedup frees the slot instead). Spares never evict: they are taken only from free room under a tier's
    # limit, at most `budget` bytes per connection.
    def spare_reserve(self, owner: dict, sizes: list, budget: int, domain: bytes) -> list:
        out = []
        held = sum(v[2] for v in owner.values())
        room = self.out_of_policy_limit() - self._reserved()
        for n in sizes[:PUT_SPARES_MAX]:
            if not isinstance(n, int) or isinstance(n, bool) or \
                    not self.cfg.min_block_bytes <= n <= self.cfg.max_block_bytes:
                raise err(errno.EINVAL, f"spare size {n!r} outside [{self.cfg.min_block_bytes}, "
                                        f"{self.cfg.max_block_bytes}] bytes")
            if held + n > budget or len(out) >= room:
                break
            slot = None
            for t in range(self.mem_count):
                tier = self.tiers[t]
                if tier.used_bytes + n > self.limit_bytes[t] or (self.gpu is not None and t in self.gpu.tiers):
                    continue
                sid = next(self._ids)
                pkey = b"\xfe" * 8 + sid.to_bytes(8, "little")   # a placeholder key (KEY_BYTES)
                try:
                    slot = tier.reserve(pkey, n, domain)
                except OSError:
                    continue
                break
            if slot is None:
                break
            owner[sid] = (t, pkey, n, self._arena_id(t, slot.arena), slot.offset)
            held += n
            out.append([sid, self._arena_id(t, slot.arena), slot.offset, n])
        return out

    def spare_refresh(self, owner: dict, domain: bytes) -> list:
        """Re-reserve a connection's spares after a delete freed memory: they move into the room just freed
        (cache-warm, and first fit keeps the arena compact). The whole new set: the client replaces its own."""
        sizes = [v[2] for v in owner.values()]
        for sid in list(owner):
            self.spare_free(owner, sid)
        return self.spare_reserve(owner, sizes, sum(sizes), domain)

    def spare_free(self, owner: dict, sid: int) -> None:
        t, pkey, _, _, _ = owner.pop(sid)
        try:
            self.tiers[t].abort(pkey)
        except KeyError:
            pass

    def put_spare(self, tenant: str, sid, items: list, durable: bool, owner: dict) -> int:
        """Commit blocks the client wrote into its spare slots: items [hash, type, nbytes, meta, layout|None,
        [spare, arena, offset]]. Every item is checked before anything changes; a bad one fails the whole put
        (EINVAL) and leaves the spares as they were."""
        txn, duplicates = self.put_spare_stage(tenant, sid, items, durable, owner)
        for spare in duplicates:
            self.spare_free(owner, spare)   # the client's copy is discarded
        return self.put_commit(txn) if txn else 0

    def put_spare_stage(self, tenant: str, sid, items: list, durable: bool, owner: dict) -> tuple[int, list]:
        """put_spare up to the commit: (txn, or 0 when nothing is left to commit; the spares of duplicates,
        which the caller frees). A staged put is sent before the client copies (see the server's staged put),
        so a duplicate's spare stays this connection's until the commit: freed now, it could be handed out
        again while the client still writes into it. The keys are pending until put_commit, so a concurrent
        put of the same key deduplicates against them."""
        s = self._session(tenant, sid)
        salt = self.salt(tenant)
        checked, seen = [], set()
        for item in items:
            if not isinstance(item, (list, tuple)) or len(item) != 6:
                raise err(errno.EINVAL, "a spare put item is [prefix_hash, block_type, nbytes, meta, layout, "
                                        "[spare, arena, offset]]")
            h, btype, nbytes, meta, layout, where = item
            layout = _check_layout(layout, nbytes) if layout is not None else None
            if isinstance(btype, str):
                btype = BLOCK_TYPES.get(btype)
            if not isinstance(btype, int) or btype not in BLOCK_TYPES.values():
                raise err(errno.EINVAL, f"block type must be one of {', '.join(BLOCK_TYPES)}")
            if not isinstance(where, (list, tuple)) or len(where) != 3:
                raise err(errno.EINVAL, "a spare slot is [spare, arena, offset]")
            spare, arena, offset = where
            info = owner.get(spare) if isinstance(spare, int) and not isinstance(spare, bool) else None
            if info is None or spare in seen:
                raise err(errno.EINVAL, f"spare slot {spare!r} is not this connection's (or named twice)")
            if info[3] != arena or info[4] != offset or info[2] != nbytes:
                raise err(errno.EINVAL, f"spare slot {spare}: [{arena!r}, {offset!r}, {nbytes!r}] is not "
                                        f"the slot it was given ([{info[3]}, {info[4]}, {info[2]}])")
            seen.add(spare)
            checked.append((derive_key(salt, h), btype, nbytes, meta, layout, spare))
        staged, staged_keys, duplicates = [], set(), []
        for key, btype, nbytes, meta, layout, spare in checked:
            old = self.blocks.get(key)
            if old is not None or key in self.pending_keys or key in staged_keys:
                if old is not None and s is not None:
                    self._attach(s, old)
                self.counters["dedup_puts"] += 1
                duplicates.append(spare)
                continue
            t, pkey, _, _, _ = owner.pop(spare)
            self.tiers[t].rename_reserved(pkey, key)   # the placeholder becomes the block's slot
            nb = Block(key, tenant, nbytes, btype, meta, t)
            nb.layout = layout
            staged.append((key, nb))
            staged_keys.add(key)
        if not staged:
            return 0, duplicates
        txn = next(self._ids)
        self.pending[txn] = (tenant, sid, staged, durable)
        for key in staged_keys:
            self.pending_keys[key] = txn
        return txn, duplicates

    def put_abort(self, txn: int) -> None:
        _, _, staged, _ = self.pending.pop(txn)
        for key, b in staged:
            self.pending_keys.pop(key, None)
            try:
                self.tiers[b.tier].abort(key)
            except KeyError:
                pass

    def put_commit(self, txn: int) -> int:
        if txn not in self.pending:
            raise err(errno.ENOENT, f"no open put {txn}")
        tenant, sid, staged, durable = self.pending.pop(txn)
        n = len(staged)
        for key, _ in staged:
            self.pending_keys.pop(key, None)
        s = self.sessions.get(sid) if sid is not None else None
        blocks = []
        failure = over = None
        decoding = s is not None and s.state == "decoding"
        if decoding:
            room, over = self._pin_room(s, [b for _, b in staged])
            for key, b in staged[room:]:
                self.tiers[b.tier].abort(key)
            staged = staged[:room]
        for key, b in staged:
            self.tiers[b.tier].commit(key)
        spilled = durable and self.nvme is not None and len(staged) > 1 and self._spill_many(staged)
        for i, (key, b) in enumerate(staged):
            if failure is not None:
                self.tiers[b.tier].delete(key)
                continue
            if durable and self.nvme is not None and not spilled:
                try:
                    b.durable = True
                    self._store(len(self.tiers) - 1, b, self._read(b.tier, b))
                    b.nvme_copy = True
                except OSError as e:
                    # not acknowledged: this block and the rest of the batch are not stored (errno and text
                    # kept, not the exception: that would be a reference cycle with this frame)
                    self.tiers[b.tier].delete(key)
                    failure = (e.errno, f"write-through to NVMe failed: {e.strerror or e}")
                    continue
            self._add(b)
            if b.tier == 0 and self.dirs:
                self._list(b, self.tiers[0].locate(key))
            if s is not None:
                b.sessions.add(sid)
                s.blocks[key] = None
            blocks.append(b)
        self.counters["puts"] += len(blocks)
        if self.metrics is not None:
            self.metrics.bytes_put(sum(b.nbytes for b in blocks))
        for b in blocks:
            if decoding:   # pinned now, not after the reply: a decoding session's blocks are never victims
                b.pins += 1
                self._charge_pin(b, s)
            b.out_of_policy = True   # until the policy has seen it (run_deferred)
        self._policy_work(lambda: self._admit_put(sid, tenant, blocks))
        failure = failure or over
        if failure is not None:
            raise err(failure[0] or errno.EIO, f"stored {len(blocks)} of the put's {n} blocks: "
                                               f"{failure[1]}")
        return len(blocks)

    def _admit_put(self, sid, tenant: str, blocks: list) -> None:
        if self.cluster is not None:
            self.cluster.on_put(blocks)
        req = self._request(sid, tenant, blocks)
        self.policies[0].begin_request(req)
        for pos, b in enumerate(blocks):
            if b.pins or self.blocks.get(b.key) is not b:
                continue   # pinned (decoding): out of policy until unpinned
            if b.tier == 0:
                self._admit(0, b, lambda p: p.offer(b.bid, req, pos, False))
            else:
                self._admit(b.tier, b, lambda p: p.admit_demoted(b.bid, None))
        self.policies[0].request_done(req)

    def _policy_work(self, fn) -> None:
        if self.defer_policy:
            self._deferred.append(fn)
        else:
            fn()

    def run_deferred(self) -> None:
        """The policy work of the last request, after its reply went out (see defer_policy)."""
        while self._deferred:
            fn = self._deferred.popleft()
            try:
                fn()
            except Exception:   # the request was answered already: log it, keep the rest in order
                log.exception("deferred policy work")

    def _spill_many(self, staged: list) -> bool:
        """Write a durable batch through to NVMe as one group commit; False if that did not work out (nothing
        of it acknowledged): the caller goes block by block."""
        blocks = [b for _, b in staged]
        for b in blocks:
            b.durable = True
        return self._nvme_put_many(blocks)

    def _nvme_put_many(self, blocks: list) -> bool:
        """Copy blocks to NVMe as one group commit (one log flush; see NvmeTier.put_many) and mark them
        nvme_copy; False if that did not work out (none of them written)."""
        if any(self._quant_layout(b) for b in blocks):
            return False   # quantised blocks go one by one: each may be refused over the bound and retried
        items = None
        try:
            items = self._nvme_items(blocks)
            if items is None:
                return False
            self._room(len(self.tiers) - 1, 0)
            self.nvme.put_many(items)
        except OSError as e:
            log.debug("group write of %d blocks to NVMe failed (%s); one by one", len(blocks), e)
            return False
        finally:
            del items
        for b in blocks:
            b.nvme_copy = True
        return True

    def _nvme_payload(self, b: Block):
        """b's bytes to write to NVMe: its memory tier's view (O_DIRECT straight from managed (GPU) memory is
        not portable: those are copied out first)."""
        v = self._read(b.tier, b)
        return bytes(v) if self.tiers[b.tier].kind == "gpu" else v

    def _nvme_items(self, blocks: list) -> list | None:
        """NvmeTier.put_many items [(key, payload, header)] for blocks; None if a header is over
        NVME_HEADER_MAX (the store keeps no more apart from the data: those go one by one)."""
        items = []
        for b in blocks:
            header = self._nvme_header(b)
            if len(header) > NVME_HEADER_MAX:
                return None
            items.append((b.key, self._nvme_payload(b), header))
        return items

    def get(self, tenant: str, sid, hashes: list) -> tuple[int, list, list]:
        s = self._session(tenant, sid)
        salt = self.salt(tenant)
        found = []
        if self.cluster is not None:
            self.cluster.begin_get()
        for h in hashes:
            b = self.blocks.get(derive_key(salt, h))
            if b is None and self.cluster is not None:
                b = self.cluster.fetch(tenant, derive_key(salt, h))   # a local miss: the cluster's copy, verified
            b = self._known(b)
            found.append(b if self._mine(b, tenant, salt) else None)
        req = self._request(sid, tenant, [b for b in found if b is not None])
        # every block already in the first tier (nothing to promote): the policy sees the hits after the reply
        hits = [] if self.defer_policy and self.gpu is None and self.cluster is None and \
            all(b is None or b.tier == 0 for b in found) else None
        if hits is None:
            self.policies[0].begin_request(req)
        lease = next(self._ids)
        held, slots, served = [], [], []
        pos = 0
        for b in found:
            self.counters["gets"] += 1
            if b is not None and self.blocks.get(b.key) is not b:
                b = None   # dropped while an earlier block of this batch was brought up
            if b is None:
                self.counters["misses"] += 1
                if self.metrics is not None:
                    self.metrics.miss()
                slots.append(None)
                served.append(None)
                continue
            src = b.tier
            try:
                promoted = src == 0 or self._promote(b, "hit")
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                promoted, b = False, None   # corrupt on its tier: a miss, never bad bytes
            if b is None:
                self.counters["misses"] += 1
                slots.append(None)
                served.append(None)
                continue
            if not promoted:
                if src >= self.mem_count:   # no room in memory to serve an NVMe block from
                    self.counters["misses"] += 1
                    slots.append(None)
                    served.append(None)
                    continue
            self._count_hit(b, src, s)
            # Leased before its policy sees the hit: a policy that declines a just-promoted block cannot push it
            # back below memory before the client has read it (it is re-offered on release).
            b.leases += 1
            held.append(b)
            if not b.pins:
                if hits is not None:
                    hits.append((b, pos))
                else:
                    self._account_hit(b, src, req, pos)
            pos += 1
            if self.gpu is not None and b.tier in self.gpu.tiers:
                t_slot, slot = self.gpu.stage(b, lease)   # a host copy: clients cannot map GPU memory
                if slot is None:
                    slots.append(None)
                    served.append(None)
                    continue
            else:
                t_slot, slot = b.tier, self.tiers[b.tier].locate(b.key)
                if t_slot == 0 and self.dirs:
                    self._list(b, slot)
            slots.append([self._arena_id(t_slot, slot.arena), slot.offset, slot.nbytes, b.meta])
            served.append(self.cluster.name if self.cluster is not None and b.key in self.cluster.fetched_now
                          else self.tiers[src].name)
        if held:
            self.leases[lease] = held
        if hits is not None:
            self._deferred.append(lambda: self._account_hits(req, hits))
        else:
            self.policies[0].request_done(req)
        return lease, slots, served

    def _count_hit(self, b: Block, src: int, s: Session | None) -> None:
        """A hit of b served by tier src: counted for the tier and the block, and b is now one of s's blocks."""
        self.hits_by_tier[src] += 1
        b.hits += 1
        if self.metrics is not None:
            self.metrics.hit(self.tiers[src].name)
        if s is not None:
            self._attach(s, b)

    def _account_hit(self, b: Block, src: int, req, pos: int) -> None:
        if src == 0 and self.policies[0].contains(b.bid):
            self.policies[0].on_hit(b.bid, req, pos)
        if b.tier == 0:
            self._admit(0, b, lambda p: p.offer(b.bid, req, pos, True))
        elif b.tier != src:
            self._admit(b.tier, b, lambda p: p.admit_demoted(b.bid, None))

    def _account_hits(self, req, hits: list) -> None:
        self.policies[0].begin_request(req)
        for b, pos in hits:
            if self.blocks.get(b.key) is b and not b.pins and b.tier == 0:
                self._account_hit(b, 0, req, pos)
        self.policies[0].request_done(req)

    def touch(self, tenant: str, sid, hashes: list) -> int:
        """Blocks a client read through its directory (kvtier.daemon.directory): counted as hits of the first
        tier, and seen by the policy as a get's are. Blocks gone since, or not the tenant's, are skipped.
        Returns how many were counted."""
        try:
            s = self._session(tenant, sid)
        except OSError:
            s = None   # ended since: the hits still count
        salt = self.salt(tenant)
        served, hits = [], []
        for h in hashes:
            try:
                b = self.blocks.get(derive_key(salt, h))
            except OSError:
                continue
            if b is None or b.tenant is None or not self._mine(b, tenant, salt):
                continue
            self.counters["gets"] += 1
            self.counters["touched"] += 1
            self._count_hit(b, 0, s)
            if not b.pins:
                hits.append((b, len(served)))
            served.append(b)
        if served:
            self._account_hits(self._request(sid if s is not None else None, tenant, served), hits)
        return len(served)

    def release(self, lease: int) -> None:
        if self.gpu is not None:
            self.gpu.release(lease)   # staging slots of GPU-resident blocks
        for b in self.leases.pop(lease, ()):
            b.leases -= 1
            if not b.leases:
                self._put_back(b)

    def contains(self, tenant: str, hashes: list) -> list:
        salt = self.salt(tenant)
        out = []
        for h in hashes:
            b = self.blocks.get(derive_key(salt, h))
            b = self._known(b)
            out.append(self.tiers[b.tier].name if self._mine(b, tenant, salt) else None)
        if self.cluster is not None and None in out:
            miss = [i for i, o in enumerate(out) if o is None]
            for i, there in zip(miss, self.cluster.contains([derive_key(salt, hashes[i]) for i in miss])):
                out[i] = self.cluster.name if there else None
        return out

    def delete(self, tenant: str, hashes: list) -> int:
        salt = self.salt(tenant)
        n = 0
        for h in hashes:
            b = self.blocks.get(derive_key(salt, h))
            b = self._known(b)
            if not self._mine(b, tenant, salt):
                continue
            if b.leases:
                raise err(errno.EBUSY, f"block {b.key.hex()} is being read")
            if self.cluster is not None:
                self.cluster.on_delete(b)
            self._drop(b, "deleted")
            n += 1
        return n

    # -- admin (kvctl) --------------------------------------------------------------------------------
    def find(self, block_hex: str) -> Block:
        try:
            key = bytes.fromhex(block_hex)
        except (ValueError, TypeError):
            key = b""
        if len(key) != 16:
            raise err(errno.EINVAL, f"a block is named by its 32-hex-digit key, got {block_hex!r}")
        b = self.blocks.get(key)
        if b is None:
            raise err(errno.ENOENT, f"no block {block_hex}")
        return b

    def pin(self, block=None, session=None, unpin=False) -> int:
        targets = []
        if session is not None:
            s = self.sessions.get(session)
            if s is None:
                raise err(errno.ENOENT, f"no session {session}")
            targets = [self.blocks[k] for k in s.blocks if k in self.blocks]
        else:
            targets = [self.find(block)]
        for b in targets:
            if unpin:
                self._unpin(b)
            else:
                self._pin(b)
            self._log_move(b, b.tier, b.tier, "unpin" if unpin else "pin")
        return len(targets)

    def evict(self, block: str) -> dict:
        b = self.find(block)
        src = b.tier
        self._settle(b)
        if b.tier == src and self.blocks.get(b.key) is b:   # (else a reclaim moved it down just now)
            if b.pins or b.leases:
                raise err(errno.EBUSY, f"block {block} is pinned or being read")
            self.policies[src].remove(b.bid)
            b.out_of_policy = True
            self._demote(b, "admin")
        return {"block": block, "from": self.tiers[src].name,
                "to": self.tiers[b.tier].name if b.key in self.blocks else None}

    def explain(self, block: str) -> dict:
        b = self._known(self.find(block))
        if b is None:
            raise err(errno.EIO, f"block {block} was unreadable (corrupt) and is forgotten")
        d = b.to_dict(self.tiers)
        if b.pins:
            why = "pinned (a decoding session or kvctl pin): out of every policy's reach"
        elif b.leases:
            why = "being read by a client (leased): not movable until released"
        else:
            why = f"placed by policy {self.policy_name} of tier {self.tiers[b.tier].name}"
        d["why"] = why
        d["policy"] = _plain(self.policies[b.tier].explain(b.bid) if not b.out_of_policy else
                             {"policy": self.policy_name, "resident": False,
                              "note": "out of the policy (pinned/leased)"})
        d["session_ids"] = sorted(b.sessions)
        d["moves"] = [m for m in self.moves if m["block"] == d["block"]][-10:]
        return d

    def set_policy(self, name: str) -> None:
        self.writeback_wait()   # its blocks are out of the old policy and go to the NVMe one when written
        self.policies = self._make_policies(name)
        self.policy_name = name
        self.readmit_all()

    def readmit_all(self) -> None:
        for b in list(self.blocks.values()):
            b.out_of_policy = True
        for t in range(len(self.tiers)):
            for b in [b for b in self.blocks.values() if b.tier == t]:
                self._put_back(b)

    def set_limits(self, limits: list[int]) -> None:
        self.writeback_wait()
        for t, lim in enumerate(limits):
            self.limit_bytes[t] = min(lim, self.tiers[t].capacity_bytes)
            for v in self.policies[t].resize(self._capacity_blocks(t)):
                vb = self.by_bid.get(v)
                if vb is not None and vb.tier == t:
                    vb.out_of_policy = True
                    self._demote(vb, "resize")
            while self.tiers[t].used_bytes > self.limit_bytes[t] and self._evict_one(t, "resize"):
                pass

    def prefetch_tick(self, limit: int = 16) -> int:
        """Promote what the first tier's policy expects to be asked for soon (idle sessions due back)."""
        n = 0
        if self.gpu is not None:
            self.gpu.tick()   # retire finished GPU prefetches (their events)
        try:
            wanted = self.policies[0].prefetch_suggestions(limit)
        except TypeError:
            wanted = []
        for bid in wanted:
            b = self.by_bid.get(bid)
            if b is not None and b.tier != 0 and not b.pins and not b.leases:
                if self._promote(b, "prefetch"):
                    self._admit(b.tier, b, lambda p: p.admit_demoted(b.bid, None))
                    self.counters["prefetches"] += 1
                    n += 1
        return n

    def tier_rows(self) -> list[dict]:
        rows = []
        for t, tier in enumerate(self.tiers):
            rows.append({"name": tier.name, "kind": tier.kind, "capacity_bytes": self.limit_bytes[t],
                         # copies the tier holds (a durable block in memory is also on NVMe); O(1), and safe to
                         # read from the metrics thread
                         "used_bytes": tier.used_bytes, "blocks": len(tier),
                         "hits": self.hits_by_tier[t], "backend": getattr(tier, "backend", "file"),
                         "free_target_bytes": self.free_target[t],
                         "backend_note": getattr(tier, "backend_note", "")})
            if getattr(tier, "backend", "") == "memfd":   # 2 MiB pages under the arenas only where not "never"
                rows[-1]["shmem_thp"] = shmem_thp_mode()
            if hasattr(tier, "resident_bytes"):
                # arena sets (one per tenant salt that has bound) and the memory they hold, punched free extents not
                rows[-1].update(domains=len(tier.domains), resident_bytes=tier.resident_bytes())
            if hasattr(tier, "flush_mode"):   # NVMe: O_DIRECT or buffered; device flushes per durable put
                rows[-1].update(io_mode=tier.io_mode, flush_mode=tier.flush_mode)
            if hasattr(tier, "quant_stats") and not tier.codec.lossless:
                rows[-1]["quant"] = tier.quant_stats()   # the error measured on what it quantised
            if hasattr(tier, "gpu_stats"):
                rows[-1]["gpu"] = {**tier.gpu_stats(), **self.gpu.counters}   # prefetches, moves in flight, staging
        if self.cluster is not None:
            rows.append(self.cluster.row())
        return rows

    def out_of_policy_limit(self) -> int:
        """How many blocks may be pinned, and how many slots reserved, at once (OUT_OF_POLICY_MIN_BLOCKS)."""
        return max(OUT_OF_POLICY_MIN_BLOCKS, sum(self._capacity_blocks(t) for t in range(self.mem_count)))

    def _reserved(self) -> int:
        return sum(self.tiers[t].reserved_count() for t in range(self.mem_count))

    def pinned_blocks(self, tenant: str | None = None) -> int:
        """Stored blocks with pins (of one tenant)."""
        return sum(1 for b in self.pinned if tenant is None or b.tenant == tenant)

    def status(self) -> dict:
        gets = self.counters["gets"]
        hits = sum(self.hits_by_tier)
        return {"policy": self.policy_name, "tiers": self.tier_rows(), "sessions": len(self.sessions),
                "blocks": len(self.blocks), "pinned_blocks": self.pinned_blocks(),
                "pinned_bytes": self.pinned_bytes_total,
                "unpinning_blocks": sum(1 for b in self._unpins if b.__class__ is not tuple),
                "counters": dict(self.counters), "evictions": dict(self.evictions),
                "hit_rate": hits / gets if gets else 0.0,
                "hit_rate_by_tier": {self.tiers[t].name: (h / gets if gets else 0.0)
                                     for t, h in enumerate(self.hits_by_tier)},
                "directory": {"on": self.directory_on, "domains": len(self.dirs),
                              "listed": sum(d.listed() for d in self.dirs.values()),
                              "bucket_full": sum(d.bucket_full for d in self.dirs.values()),
                              "touched": self.counters["touched"]},
                **({"cluster": self.cluster.status()} if self.cluster is not None else {})}

    def flush_for_restart(self, budget_s: float, batch_bytes: int = 64 << 20) -> dict:
        """Graceful stop: copy memory-only blocks to the NVMe tier so that a restart serves them. Most-hit blocks
        first, only into the NVMe tier's free room (what is on disk is not evicted for them), group-committed in
        batches, until budget_s runs out. Blocks stay where they are: this only adds disk copies."""
        t0 = time.monotonic()
        self.writeback_wait()
        out = {"blocks": 0, "bytes": 0, "left": 0, "seconds": 0.0}
        if self.nvme is None:
            return out
        todo = sorted((b for b in self.blocks.values()
                       if b.tier < self.mem_count and not b.nvme_copy and b.nbytes and b.tenant is not None),
                      key=lambda b: -b.hits)
        # the recovered disk is re-admitted into the NVMe policy at start: stay within its capacity in blocks
        room = self.policies[-1].capacity_blocks - len(self.policies[-1]) - \
            sum(1 for b in self.blocks.values() if b.nvme_copy and b.tier < self.mem_count)
        limit = self.limit_bytes[-1]
        i = 0
        while i < len(todo) and room > 0 and time.monotonic() - t0 < budget_s:
            batch, nbytes = [], 0
            while i < len(todo) and room > len(batch) and nbytes < batch_bytes:
                b = todo[i]
                i += 1
                if self.nvme.used_bytes + nbytes + b.nbytes + 4096 > limit:
                    continue   # the tier's free room, rounded up to its 4 KiB extents
                batch.append(b)
                nbytes += b.nbytes + 4096
            if not batch:
                break
            plain = [b for b in batch if self._quant_layout(b) is None]
            try:
                if plain:
                    self.nvme.put_many([(b.key, self._nvme_payload(b), self._nvme_header(b)) for b in plain])
                for b in batch:
                    if b not in plain:
                        self._nvme_put(b, self._nvme_payload(b), self._nvme_header(b))
            except OSError as e:
                log.warning("flush for restart stopped: %s", e)
                break
            for b in batch:
                b.nvme_copy = True
                out["blocks"] += 1
                out["bytes"] += b.nbytes
            room -= len(batch)
        out["left"] = sum(1 for b in self.blocks.values() if b.tier < self.mem_count and not b.nvme_copy)
        out["seconds"] = time.monotonic() - t0
        return out

    def close(self) -> None:
        try:
            self.writeback_wait()
        except Exception as e:   # closing must go on
            log.warning("writeback at close: %s", e)
        if self._wb_pool is not None:
            self._wb_pool.shutdown()
        if self.cluster is not None:
            self.cluster.close()
        for t in self.tiers:
            try:
                t.close()
            except Exception as e:   # closing must go on for the other tiers
                log.warning("closing %s: %s", t.name, e)
