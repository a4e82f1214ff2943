"""kvtierd's access heat from the eBPF probes (kvtier.probes, bpf/kvheat.bpf.c) as a policy input.

Every `interval_ms` the main loop calls tick(): it reads and clears the probes' heat map (faults per
kvtier.ko region block and page), maps each (region, block, page) to the daemon block stored at that
arena offset, adds the counts to a per-block decayed count (an EMA of touches, halving every
`half_life_ms`) and calls the block's tier policy's touch(), so a block an engine reads or writes directly
counts as used even when no API call said so. Then it resets the regions' accesses (KVTIER_IOC_ACCESS_RESET:
PTEs zapped, pages kept), so the next touch of each page faults again and is counted: DAMON-style sampling.

Engines that keep KV in anonymous memory register it (op "register_range": address, length, block_bytes
and, optionally, the prefix hash of each block): user faults and NUMA hinting faults there count as well.

The probes load in a background thread (bcc compiles for seconds). Without bcc, without privileges or with
`[probes] enabled = false` the daemon runs on API signals alone, and `kvctl status` says why.

    [probes]
    enabled = "auto"        # auto (load if possible) | true (log an error if they cannot load) | false
    interval_ms = 1000      # how often heat is read and accesses are reset
    half_life_ms = 10000    # heat halves this long after the last touch
    sample = true           # reset accesses after each read (false: only first touches count)

[probes] is read at start; a SIGHUP reload keeps the running probes' settings.
"""
from __future__ import annotations

import bisect
import errno
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

from kvtier.errors import InputError
from kvtier.probes import HeatTracker, ProbesUnavailable, migration_rows

log = logging.getLogger("kvtierd.heat")

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
FORGET_EVERY = 30   # ticks between sweeps of heat entries whose block is gone
MAX_RANGES_PER_PROCESS = 1024   # ranges a process may hold registered (each keeps its block list)
_KEYS = {"enabled", "interval_ms", "half_life_ms", "sample"}


@dataclass
class ProbesConfig:
    enabled: str = "auto"     # auto | on | off
    interval_ms: int = 1000
    half_life_ms: int = 10000
    sample: bool = True


def parse_config(d, w: str) -> ProbesConfig:
    """The [probes] table; errors name the key (InputError, exit 2)."""
    if d is None:
        return ProbesConfig()
    if not isinstance(d, dict):
        raise InputError(f"{w}probes: expected a table")
    bad = set(d) - _KEYS
    if bad:
        raise InputError(f"{w}probes.{sorted(bad)[0]}: unknown key; valid: {', '.join(sorted(_KEYS))}")
    enabled = d.get("enabled", "auto")
    if enabled is True or enabled is False:
        enabled = "on" if enabled else "off"
    if enabled not in ("auto", "on", "off"):
        raise InputError(f"{w}probes.enabled: expected \"auto\", true or false, got {enabled!r}")
    out = ProbesConfig(enabled=enabled)
    for key, lo, hi in (("interval_ms", 50, 3_600_000), ("half_life_ms", 100, 86_400_000)):
        v = d.get(key, getattr(out, key))
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise InputError(f"{w}probes.{key}: expected {lo}..{hi} milliseconds, got {v!r}")
        setattr(out, key, v)
    sample = d.get("sample", True)
    if not isinstance(sample, bool):
        raise InputError(f"{w}probes.sample: expected true or false, got {sample!r}")
    out.sample = sample
    return out


def _load_probes():
    from kvtier.probes import Probes
    return Probes(heat_pages=True, ignore_tgid=os.getpid())


class Heat:
    """The daemon's side of the probes: loading, sampling, per-block heat, and what `kvctl top` shows."""

    def __init__(self, engine, cfg: ProbesConfig | None = None, loader=_load_probes, device=None):
        self.engine = engine
        self.cfg = cfg or ProbesConfig()
        self.tracker = HeatTracker(self.cfg.half_life_ms)
        self._loader = loader
        self._loading: threading.Thread | None = None   # the background load (bcc compiles for seconds)
        self._device = device            # kvtier.kmod.Device for ACCESS_RESET (opened lazily)
        self.probes = None
        self.state = "off"               # off | loading | on | unavailable
        self.note = ""
        self._last_tick = 0.0
        self._ticks = 0
        self._lock = threading.Lock()
        self.samples = 0
        self.touches = 0                 # faults mapped to daemon blocks
        self.unmapped = 0                # faults in memory that holds no daemon block (free space, others)
        self.ranges: dict[int, dict] = {}   # anonymous ranges engines registered: id -> {pid, keys, ...}
        self._next_range = 1
        self._mig_prev: dict[tuple, tuple[int, float]] = {}
        self.mig_rates: dict[tuple, float] = {}
        self._fault_prev: dict[int, tuple[int, float]] = {}
        self.fault_rates: dict[int, float] = {}
        self._regions: dict[int, tuple[int, int, int]] | None = None
        self._regions_generation: tuple = ()

    # -- life cycle ---------------------------------------------------------------------------------
    @property
    def interval_s(self) -> float:
        return self.cfg.interval_ms / 1000.0

    def start(self, background: bool = True) -> None:
        if self.cfg.enabled == "off":
            self.state, self.note = "off", "disabled in the config ([probes] enabled = false)"
            return
        self.state, self.note = "loading", "compiling bpf/kvheat.bpf.c"
        if background:
            self._loading = threading.Thread(target=self._load, name="kvtierd-probes", daemon=True)
            self._loading.start()
        else:
            self._load()

    def _load(self) -> None:
        try:
            p = self._loader()
        except ProbesUnavailable as e:
            self._unavailable(str(e))
            return
        except Exception as e:   # a bcc bug must not take the daemon down: API signals still work
            self._unavailable(f"{type(e).__name__}: {e}")
            return
        with self._lock:
            self.probes = p
            self.state = "on"
            self.note = "" if p.with_kvtier else "kvtier.ko not loaded: generic probes only"
            self._attach_waiting()
        log.info("eBPF probes loaded: %s%s", ", ".join(p.attached),
                 f" (missing: {', '.join(p.missing)})" if p.missing else "")

    def _unavailable(self, why: str) -> None:
        self.state, self.note = "unavailable", why
        (log.error if self.cfg.enabled == "on" else log.info)(
            "eBPF probes not loaded, running on API signals alone: %s", why)

    def close(self) -> None:
        if self._loading is not None and self._loading.is_alive():
            # let bcc finish: probes loaded after close would stay attached, and a process that exits while the
            # thread is inside the compiler runs its libraries' exit handlers under it
            log.info("waiting for the eBPF probes to finish loading before closing them")
            self._loading.join()
        with self._lock:
            if self.probes is not None:
                self.probes.close()
                self.probes = None
            if self._device is not None:
                self._device.close()
                self._device = None

    # -- the daemon's kvtier.ko regions ---------------------------------------------------------------
    def _region_map(self) -> dict[int, tuple[int, int, int]]:
        """region id -> (tier index, arena index, block bytes) for the memory tiers on kvtier.ko (rebuilt when a
        tier opens or closes a tenant domain's arenas)."""
        tiers = self.engine.tiers[:self.engine.mem_count]
        generation = tuple(getattr(tier, "arena_generation", 0) for tier in tiers)
        if self._regions is None or generation != self._regions_generation:
            from kvtier.store.memory import KMOD_BLOCK_BYTES
            out = {}
            for t, tier in enumerate(tiers):
                arenas = getattr(tier, "arenas", None)   # a GPU tier has none: no faults to attribute
                for a, h in enumerate(arenas() if arenas else []):
                    if h is not None and h.get("kind") == "kvtier":
                        out[int(h["region_id"])] = (t, a, KMOD_BLOCK_BYTES)
            self._regions, self._regions_generation = out, generation
        return self._regions

    def _extents(self, t: int) -> tuple[list, list]:
        """Tier t's committed blocks sorted by (arena, offset): keys for bisect, and (end, Block)."""
        tier = self.engine.tiers[t]
        rows = []
        for b in self.engine.blocks.values():
            if b.tier != t:
                continue
            try:
                slot = tier.locate(b.key)
            except KeyError:
                continue
            rows.append(((slot.arena, slot.offset), slot.offset + slot.nbytes, b))
        rows.sort(key=lambda r: r[0])
        return [r[0] for r in rows], [(r[1], r[2]) for r in rows]

    def _reset_accesses(self) -> None:
        if not self.cfg.sample or not self._region_map():
            return
        try:
            if self._device is None:
                from kvtier import kmod
                self._device = kmod.Device()
            for rid in self._regions:
                self._device.access_reset(rid)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                self.note = "this kvtier.ko has no ACCESS_RESET: only first touches count"
                self.cfg.sample = False
            else:
                log.warning("access reset: %s", e)

    # -- sampling (main loop) --------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> int:
        """Read the probes if the interval passed; returns the faults attributed to daemon blocks."""
        now = time.monotonic() if now is None else now
        if self.probes is None or now - self._last_tick < self.interval_s:
            return 0
        self._last_tick = now
        with self._lock:
            try:
                return self._sample(now)
            except Exception:   # never take the main loop down; the next tick tries again
                log.exception("reading the eBPF probes")
                return 0

    def _sample(self, now: float) -> int:
        entries = self.probes.read_heat(clear=True)
        self.samples += 1
        self._ticks += 1
        now_ms = now * 1000.0
        regions = self._region_map()
        anon_bit = self.probes.constants["ANON_BIT"]
        indexes: dict[int, tuple[list, list]] = {}
        counts: dict[bytes, int] = {}
        for e in entries:
            if e.region & anon_bit:
                key = self._range_key(e.region & ~anon_bit, e.block)
                if key is None:
                    self.unmapped += e.count
                else:
                    counts[key] = counts.get(key, 0) + e.count
                continue
            m = regions.get(e.region)
            if m is None:
                self.unmapped += e.count
                continue
            t, a, block_bytes = m
            off = e.block * block_bytes + e.page * PAGE_BYTES
            if t not in indexes:
                indexes[t] = self._extents(t)
            starts, ends = indexes[t]
            i = bisect.bisect_right(starts, (a, off)) - 1
            if i < 0 or starts[i][0] != a or off >= ends[i][0]:
                # a page holds the tails and heads of neighbouring blocks too: credit the one it starts in
                j = bisect.bisect_left(starts, (a, off))
                if j < len(starts) and starts[j][0] == a and starts[j][1] < off + PAGE_BYTES:
                    i = j
                else:
                    self.unmapped += e.count
                    continue
            b = ends[i][1]
            counts[b.key] = counts.get(b.key, 0) + e.count
        attributed = 0
        for key, n in counts.items():
            b = self.engine.blocks.get(key)
            if b is None:
                continue
            attributed += n
            self.tracker.add(key, n, now_ms)
            if not b.out_of_policy and not b.pins:
                self.engine.policies[b.tier].touch(b.bid, n, now_ms)
        self.touches += attributed
        if self._ticks % FORGET_EVERY == 0:
            self.tracker.forget(self.engine.blocks.__contains__)
            self._prune_ranges()
        self._reset_accesses()
        self._rates(now)
        return attributed

    def _rates(self, now: float) -> None:
        for key, h in self.probes.histograms().items():
            n = sum(h["latency_us"].values())
            prev = self._mig_prev.get(key)
            if prev is not None and now > prev[1]:
                self.mig_rates[key] = (n - prev[0]) / (now - prev[1])
            self._mig_prev[key] = (n, now)
        for rid, f in self.probes.region_faults().items():
            prev = self._fault_prev.get(rid)
            if prev is not None and now > prev[1]:
                self.fault_rates[rid] = (f["faults"] - prev[0]) / (now - prev[1])
            self._fault_prev[rid] = (f["faults"], now)

    # -- anonymous ranges ------------------------------------------------------------------------------
    def register_range(self, pid: int, address: int, length: int, block_bytes: int, keys: list) -> dict:
        """An engine's anonymous KV memory: faults there count as heat of keys[i] for block i."""
        if address <= 0 or length <= 0 or block_bytes <= 0 or block_bytes % PAGE_BYTES:
            raise OSError(errno.EINVAL, "address and length must be positive, block_bytes a page multiple")
        nblocks = -(-length // block_bytes)
        if len(keys) > nblocks:
            raise OSError(errno.EINVAL, f"{len(keys)} block hashes for {nblocks} blocks")
        held = sum(1 for r in self.ranges.values() if r["pid"] == pid)
        if held >= MAX_RANGES_PER_PROCESS:
            raise OSError(errno.EDQUOT, f"process {pid} has {held} ranges registered, the most a process may; "
                                        f"unregister some first")
        rid = self._next_range
        self._next_range += 1
        r = {"range": rid, "pid": pid, "address": address, "length": length, "block_bytes": block_bytes,
             "keys": list(keys), "attached": False}
        with self._lock:
            self.ranges[rid] = r
            if self.probes is not None:
                self._attach_range(r)
        return {"range": rid, "probes": self.state, "counted": r["attached"]}

    # The probes count faults in a few range slots (probes.max_ranges, 16). They are shared between processes
    # max-min fair: a process with fewer counted ranges takes a slot from the one with the most (its newest
    # range waits, not counted), and a slot freed goes to a waiting range of the process with the fewest. So one
    # engine registering ranges in a loop cannot leave another's uncounted.
    def _counted(self) -> Counter:
        return Counter(r["pid"] for r in self.ranges.values() if r["attached"])

    def _attach_range(self, r: dict) -> None:
        for _ in range(2):
            try:
                self.probes.add_range(r["pid"], r["address"], r["length"], r["block_bytes"], range_id=r["range"])
                r["attached"] = True
                return
            except OSError as e:
                if e.errno != errno.ENOSPC or not self._take_slot_for(r["pid"]):
                    log.info("range %d of pid %d not counted for now: %s", r["range"], r["pid"], e)
                    return
            except ValueError as e:
                log.warning("range %d of pid %d not counted: %s", r["range"], r["pid"], e)
                return

    def _take_slot_for(self, pid: int) -> bool:
        """Free a slot for pid from the process with the most counted ranges, if it has two more than pid."""
        counted = self._counted()
        if not counted:
            return False
        rich, n = counted.most_common(1)[0]
        if n < counted.get(pid, 0) + 2:
            return False
        victim = max(rid for rid, r in self.ranges.items() if r["pid"] == rich and r["attached"])
        self.probes.remove_range(victim)
        self.ranges[victim]["attached"] = False
        log.info("range %d of pid %d not counted for now: its slot went to pid %d (fair share)", victim, rich, pid)
        return True

    def _attach_waiting(self) -> None:
        """Give free slots to waiting ranges, the process with the fewest counted first (then the oldest range)."""
        while True:
            counted = self._counted()
            if sum(counted.values()) >= self.probes.max_ranges:
                return
            waiting = [r for r in self.ranges.values() if not r["attached"]]
            if not waiting:
                return
            r = min(waiting, key=lambda r: (counted.get(r["pid"], 0), r["range"]))
            self._attach_range(r)
            if not r["attached"]:
                return

    def unregister_range(self, rid: int) -> bool:
        with self._lock:
            r = self.ranges.pop(rid, None)
            if r is not None and r["attached"] and self.probes is not None:
                self.probes.remove_range(rid)
                self._attach_waiting()
        return r is not None

    def _range_key(self, rid: int, block: int):
        r = self.ranges.get(rid)
        if r is None or block >= len(r["keys"]) or r["keys"][block] is None:
            return None
        return r["keys"][block]

    def _prune_ranges(self) -> None:
        """Ranges of processes that exited go (their addresses mean nothing any more)."""
        freed = False
        for rid, r in list(self.ranges.items()):
            if not os.path.exists(f"/proc/{r['pid']}"):
                self.ranges.pop(rid)
                if r["attached"] and self.probes is not None:
                    self.probes.remove_range(rid)
                    freed = True
        if freed:
            self._attach_waiting()

    # -- what kvctl shows --------------------------------------------------------------------------
    def block_info(self, key: bytes, now: float | None = None) -> dict | None:
        now = time.monotonic() if now is None else now
        return self.tracker.info(key, now * 1000.0)

    def status(self) -> dict:
        p = self.probes
        return {"loaded": p is not None, "state": self.state,
                "note": self.note or ("" if p is not None else "running on API signals alone"),
                "attached": list(p.attached) if p is not None else [],
                "missing": list(p.missing) if p is not None else [],
                "interval_ms": self.cfg.interval_ms, "half_life_ms": self.cfg.half_life_ms,
                "sampling": self.cfg.sample, "samples": self.samples, "touches": self.touches,
                "unmapped_touches": self.unmapped, "hot_blocks": len(self.tracker), "ranges": len(self.ranges),
                "ranges_counted": sum(self._counted().values())}

    def top(self, limit: int = 10, scope: str | None = None, now: float | None = None) -> dict:
        """Hottest blocks and sessions (by heat; by API hits when the probes are off), migration rates and
        latency percentiles, per-region fault rates."""
        eng = self.engine
        now_ms = (time.monotonic() if now is None else now) * 1000.0
        names = [t.name for t in eng.tiers]
        blocks = []
        by_heat = self.probes is not None
        if by_heat:
            pool = ((eng.blocks.get(k), h) for k, h in self.tracker.top(len(self.tracker), now_ms))
        else:
            pool = ((b, 0.0) for b in sorted(eng.blocks.values(), key=lambda b: -b.hits))
        sessions: dict[int, float] = {}
        for b, h in pool:
            if b is None or (scope is not None and b.tenant != scope):
                continue
            for sid in b.sessions:
                sessions[sid] = sessions.get(sid, 0.0) + (h if by_heat else b.hits)
            if len(blocks) < limit:
                info = self.tracker.info(b.key, now_ms) or {}
                blocks.append({"block": b.key.hex(), "tier": names[b.tier], "tenant": b.tenant,
                               "heat": info.get("heat", 0.0), "touches": info.get("touches", 0),
                               "last_access_ms_ago": info.get("last_access_ms_ago"), "hits": b.hits,
                               "sessions": sorted(b.sessions)})
        srows = []
        for sid, v in sorted(sessions.items(), key=lambda kv: -kv[1])[:limit]:
            s = eng.sessions.get(sid)
            if s is None:
                continue
            srows.append({"session": sid, "name": s.name, "tenant": s.tenant, "state": s.state,
                          "blocks": len(s.blocks), "heat" if by_heat else "hits": round(v, 3)})
        out = {"ranked_by": "heat" if by_heat else "hits", "blocks": blocks, "sessions": srows,
               "migrations": [], "regions": []}
        if self.probes is not None and scope is None:
            with self._lock:
                rows = migration_rows(self.probes.histograms())
            for r in rows:
                r["rate_per_s"] = round(self.mig_rates.get((r["kind"], r["src_node"], r["dst_node"]), 0.0), 3)
            out["migrations"] = rows
            regions = self._region_map()
            out["regions"] = [{"region": rid, "tier": names[regions[rid][0]] if rid in regions else None,
                               "faults_per_s": round(rate, 3)} for rid, rate in sorted(self.fault_rates.items())]
        return out
