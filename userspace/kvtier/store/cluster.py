"""Cluster tier: KV blocks shared between kvtierd instances on different hosts through Mooncake Store.

Mooncake Store (kvcache-ai/Mooncake; PyPI mooncake-transfer-engine-non-cuda on CPU hosts) is the distributed
KV-cache engine inference fleets already run: a master (mooncake_master) places objects in memory segments that
storage nodes (mooncake_client, or any client with global_segment_size > 0) contribute; a metadata server
(mooncake_http_metadata_server, or etcd) holds the transfer engine's segment descriptors. kvtier is a client.

Object layout: a 512-byte header then the payload. The header carries a magic, the payload's length and xxh3_64,
and the block's metadata (msgpack, with its own xxh3_64); a fetch verifies both before the block is used, so a
torn, stale or tampered object is a miss that is counted and reported, never served.

Keys: "<namespace>/<derive_key(tenant salt, prefix hash).hex()>": the same on every host for the same tenant salt
and chained prefix hash, different across tenants (different salts).

Data path: fetches land directly in a reserved slot of a memory tier (its arenas are registered with Mooncake:
get_into, no copy). Publishes are asynchronous: the block is copied into a registered staging buffer and
put_from from there by the worker thread, because the engine may move or free the slot before the transfer ends.

Every Mooncake call runs on one worker thread and the caller waits at most timeout_ms: an unreachable master,
metadata server or storage node gives misses and a degraded health with the reason, never a hung daemon. A call
still stuck after its timeout keeps the worker; later calls fail at once ("busy") until it returns, and a fetch
that timed out keeps its slot reserved until the call really ends (it may still write there).
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import logging
import mmap
import os
import queue
import re
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgpack
import xxhash

from kvtier.errors import InputError
from kvtier.store.alloc import ExtentAllocator
from kvtier.store.base import Tier, check_key, checksum

log = logging.getLogger("kvtier.cluster")

HEADER_BYTES = 512
MAGIC = b"KVC1"
STAGING_ALIGN_BYTES = 4096
PUBLISHED_KEPT = 65536        # keys this host published, remembered to skip republishing
# A remove refused for a read lease (-706) is tried again after 0.1, 0.2, 0.4 s, then forced. An existence check
# grants a lease too, so a host that keeps asking for a hot block (every 50 ms, with the master's TTL 200 ms, in a
# test) renews it for ever, and a tenant's delete never left the cluster. By then a real transfer is long over;
# one racing a forced remove reads the block, or bytes that fail the payload checksum every fetch verifies (a miss).
REMOVE_BACKOFF_S, REMOVE_FORCE_AFTER = 0.1, 3
EWMA = 0.2
# Mooncake's ErrorCode values seen on the Python API (mooncake-store/include/types.h)
MC_ERRORS = {-200: "no available segment (storage node gone or full)", -600: "buffer too small",
             -704: "object not found", -706: "object has a lease", -800: "transfer failed (storage node "
             "unreachable)", -900: "RPC to the master failed", -1000: "metadata server error",
             -1: "internal error"}


def mc_error(rc: int) -> str:
    return f"{MC_ERRORS.get(rc, 'error')} ({rc})"


class _Worker:
    """One daemon thread running calls in order. Not a ThreadPoolExecutor: its threads are joined at exit, and a
    Mooncake call stuck on a dead peer must not keep the daemon from exiting."""

    def __init__(self, name: str):
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            fut, fn = self._q.get()
            if fut is None:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)

    def submit(self, fn) -> cf.Future:
        fut = cf.Future()
        self._q.put((fut, fn))
        return fut

    def shutdown(self) -> None:
        self._q.put((None, None))


class ClusterUnavailable(OSError):
    """The cluster tier could not answer in time or is not connected: the caller treats it as a miss."""

    def __init__(self, msg: str):
        super().__init__(errno.EHOSTUNREACH, msg)


class ClusterTimeout(ClusterUnavailable):
    """The call did not answer in time and still runs on the worker."""


@dataclass
class ClusterConfig:
    name: str = "cluster0"
    master: str = ""                      # host:port of mooncake_master
    metadata_server: str = ""             # http://host:port/metadata (mooncake_http_metadata_server) or etcd
    local_hostname: str = "127.0.0.1"     # this host's address as the cluster sees it (also MC_TCP_BIND_ADDRESS)
    protocol: str = "tcp"
    rdma_devices: str = ""
    segment_bytes: int = 0                # memory this daemon contributes to the cluster (0: client only)
    buffer_bytes: int = 256 << 20         # registered staging for asynchronous publishes
    timeout_ms: int = 2000
    probe_interval_ms: int = 1000
    namespace: str = "kvtier"
    publish: str = "auto"                 # auto | all | none
    fetch: str = "auto"                   # auto | always | never
    recompute_bytes_per_s: int = 2 << 30  # how fast the engine recomputes KV: fetch only when faster than that


CLUSTER_KEYS = ("name", "master", "metadata_server", "local_hostname", "protocol", "rdma_devices", "segment",
                "buffer", "timeout_ms", "probe_interval_ms", "namespace", "publish", "fetch", "recompute_bytes_per_s")


def parse_config(d, where: str) -> ClusterConfig:
    """The [cluster] table, validated; InputError names the key."""
    from kvtier.daemon.config import parse_size
    if not isinstance(d, dict):
        raise InputError(f"{where}cluster: expected a table")
    bad = set(d) - set(CLUSTER_KEYS)
    if bad:
        raise InputError(f"{where}cluster.{sorted(bad)[0]}: unknown key; valid: {', '.join(sorted(CLUSTER_KEYS))}")
    c = ClusterConfig()
    for key in ("name", "master", "metadata_server", "local_hostname", "protocol", "rdma_devices", "namespace",
                "publish", "fetch"):
        if key in d:
            if not isinstance(d[key], str):
                raise InputError(f"{where}cluster.{key}: expected a string, got {d[key]!r}")
            setattr(c, key, d[key])
    for key in ("master", "metadata_server"):
        if not getattr(c, key):
            raise InputError(f"{where}cluster.{key}: missing (the Mooncake {key.replace('_', ' ')} address)")
    if not re.fullmatch(r"[^\s:/]+:\d{1,5}", c.master) or int(c.master.rpartition(":")[2]) > 65535:
        raise InputError(f"{where}cluster.master: expected HOST:PORT, got {c.master!r}")
    if not (c.metadata_server.startswith(("http://", "etcd://")) or c.metadata_server == "P2PHANDSHAKE"):
        raise InputError(f"{where}cluster.metadata_server: expected http://HOST:PORT/metadata, etcd://HOST:PORT "
                         f"or P2PHANDSHAKE, got {c.metadata_server!r}")
    if not c.local_hostname or not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", c.local_hostname):
        raise InputError(f"{where}cluster.local_hostname: expected this host's address, got {c.local_hostname!r}")
    if c.protocol not in ("tcp", "rdma"):
        raise InputError(f"{where}cluster.protocol: expected tcp or rdma, got {c.protocol!r}")
    if not c.name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", c.name):
        raise InputError(f"{where}cluster.name: expected a tier name, got {c.name!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", c.namespace):
        raise InputError(f"{where}cluster.namespace: expected letters, digits, '_', '.', '-', got {c.namespace!r}")
    if c.publish not in ("auto", "all", "none"):
        raise InputError(f"{where}cluster.publish: expected auto, all or none, got {c.publish!r}")
    if c.fetch not in ("auto", "always", "never"):
        raise InputError(f"{where}cluster.fetch: expected auto, always or never, got {c.fetch!r}")
    if "segment" in d:
        s = d["segment"]
        c.segment_bytes = 0 if s == 0 or s == "0" else parse_size(s, f"{where}cluster.segment")
    if "buffer" in d:
        c.buffer_bytes = parse_size(d["buffer"], f"{where}cluster.buffer")
    if "recompute_bytes_per_s" in d:
        c.recompute_bytes_per_s = parse_size(d["recompute_bytes_per_s"], f"{where}cluster.recompute_bytes_per_s")
    for key, lo, hi in (("timeout_ms", 10, 600_000), ("probe_interval_ms", 100, 600_000)):
        if key in d:
            v = d[key]
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise InputError(f"{where}cluster.{key}: expected {lo}..{hi} milliseconds, got {v!r}")
            setattr(c, key, v)
    if c.buffer_bytes < 1 << 20:
        raise InputError(f"{where}cluster.buffer: at least 1MiB, got {c.buffer_bytes}")
    return c


def pack_header(nbytes: int, payload_sum: int, head: dict) -> bytes:
    body = msgpack.packb(head, use_bin_type=True)
    if 32 + len(body) > HEADER_BYTES:
        raise ValueError(f"block metadata of {len(body)} bytes does not fit a {HEADER_BYTES}-byte header")
    fixed = b"".join((MAGIC, len(body).to_bytes(4, "little"), nbytes.to_bytes(8, "little"),
                      payload_sum.to_bytes(8, "little"), xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")))
    return (fixed + body).ljust(HEADER_BYTES, b"\0")


def unpack_header(raw) -> tuple[int, int, dict]:
    """(payload bytes, payload xxh3_64, metadata) or ValueError for anything that is not a sound header."""
    raw = bytes(raw[:HEADER_BYTES])
    if raw[:4] != MAGIC:
        raise ValueError("bad magic")
    blen = int.from_bytes(raw[4:8], "little")
    if 32 + blen > HEADER_BYTES:
        raise ValueError("bad header length")
    body = raw[32:32 + blen]
    if xxhash.xxh3_64_intdigest(body) != int.from_bytes(raw[24:32], "little"):
        raise ValueError("header checksum mismatch")
    return int.from_bytes(raw[8:16], "little"), int.from_bytes(raw[16:24], "little"), \
        msgpack.unpackb(body, raw=False)


class ClusterTier(Tier):
    """A client of a Mooncake Store cluster. start() connects in the background; health() says how it is."""

    def __init__(self, cfg: ClusterConfig):
        Tier.__init__(self, cfg.name, "cluster", max(1, cfg.segment_bytes or cfg.buffer_bytes))
        self.cfg = cfg
        self.backend = "mooncake"
        self.backend_note = f"master {cfg.master}, metadata {cfg.metadata_server}, {cfg.protocol}"
        self._store = None
        self._worker = _Worker("kvtier-cluster")
        self._stuck: cf.Future | None = None   # a call that outlived its timeout and still holds the worker
        self._state = "connecting"
        self._reason = "not connected yet"
        self._last_error = ""
        self._last_error_time = 0.0
        self._registered: dict[int, int] = {}   # addr -> size of buffers registered with Mooncake
        self._staging = None
        self._staging_addr = 0
        self._staging_alloc = None
        self._hdr = None                         # registered header buffer for fetches (worker-only)
        self._hdr_addr = 0
        self._published: OrderedDict[bytes, int] = OrderedDict()
        self._pending_publish = 0
        self.latency_us = None                   # EWMA of small-call latency
        self.bandwidth_bytes_per_s = None        # EWMA of transfer bandwidth
        self._warm = False
        self._stats.update(fetches=0, fetch_bytes=0, publishes=0, publish_failures=0, publish_skipped=0,
                           timeouts=0, errors=0, busy=0, fetch_skipped_recompute=0, removes=0,
                           remove_failures=0)
        self._closed = threading.Event()
        self._probe_thread = None

    # -- connection ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; the daemon serves its local tiers meanwhile (and if it never connects)."""
        self._staging = mmap.mmap(-1, self.cfg.buffer_bytes)
        from kvtier import numa
        self._staging_addr = numa.address_of(self._staging)
        self._staging_alloc = ExtentAllocator(self.cfg.buffer_bytes, STAGING_ALIGN_BYTES)
        self._hdr = mmap.mmap(-1, 4096)
        self._hdr_addr = numa.address_of(self._hdr)
        self._probe_thread = threading.Thread(target=self._probe_loop, name="kvtier-cluster-probe", daemon=True)
        self._probe_thread.start()

    def _setup(self) -> None:
        # Mooncake's transfer engine advertises this address; without it, the machine's external interface
        os.environ["MC_TCP_BIND_ADDRESS"] = self.cfg.local_hostname
        os.environ.setdefault("GLOG_minloglevel", "2")   # Mooncake logs every retry at INFO/WARNING
        from mooncake.store import MooncakeDistributedStore
        store = MooncakeDistributedStore()
        rc = store.setup(self.cfg.local_hostname, self.cfg.metadata_server, self.cfg.segment_bytes,
                         16 << 20, self.cfg.protocol, self.cfg.rdma_devices, self.cfg.master)
        if rc != 0:
            raise ClusterUnavailable(f"setup failed: {mc_error(rc)} (master {self.cfg.master}, "
                                     f"metadata {self.cfg.metadata_server})")
        for addr, size in ((self._staging_addr, self.cfg.buffer_bytes), (self._hdr_addr, 4096)):
            rc = store.register_buffer(addr, size)
            if rc != 0:
                raise ClusterUnavailable(f"register_buffer failed: {mc_error(rc)}")
        self._store = store

    def _probe_loop(self) -> None:
        interval = self.cfg.probe_interval_ms / 1000
        while not self._closed.is_set():
            try:
                unreachable = self._unreachable()
                if unreachable:
                    self._fail("probe", unreachable)
                elif self._store is None:
                    self._call(self._setup, op="setup", timeout_s=max(5.0, self.cfg.timeout_ms / 1000))
                    self._registered.update({self._staging_addr: self.cfg.buffer_bytes, self._hdr_addr: 4096})
                    self._ok("connected")
                    log.info("cluster tier %s connected to master %s as %s", self.name, self.cfg.master,
                             self.cfg.local_hostname)
                else:
                    # health_check() only says the client is set up: an end-to-end probe (a 1 KiB upsert through
                    # the master to a storage node) is what notices a dead master or storage node
                    rc = self._call(self._probe_put, op=f"probe via master {self.cfg.master}")
                    if rc != 0:
                        self._fail(f"probe via master {self.cfg.master}", mc_error(rc))
                    else:
                        self._ok("probe answered")
            except ClusterUnavailable:
                pass   # _call recorded the reason
            except Exception as e:   # never let the probe die: it is how the tier comes back
                self._fail("probe", str(e))
            self._closed.wait(interval)

    def _unreachable(self) -> str:
        """Why the master or the metadata server cannot be reached ("" if both accept a TCP connection within
        the timeout). Checked in Python before any Mooncake call: MooncakeDistributedStore.setup() holds the GIL
        while it waits for an unreachable metadata server, which would freeze the whole daemon."""
        targets = [("master", self.cfg.master)]
        m = re.match(r"(?:http|etcd)://([^/]+)", self.cfg.metadata_server)
        if m:
            targets.append(("metadata server", m.group(1)))
        for what, hostport in targets:
            host, _, port = hostport.rpartition(":")
            if not port.isdigit():   # http://host/metadata: the scheme's port
                host, port = hostport, "80"
            try:
                socket.create_connection((host.strip("[]"), int(port)),
                                         timeout=min(1.0, self.cfg.timeout_ms / 1000)).close()
            except OSError as e:
                return f"{what} {hostport} unreachable: {e.strerror or e}"
        return ""

    def _probe_put(self) -> int:
        return self._store.upsert_from(f"{self.cfg.namespace}/__probe__/{self.cfg.local_hostname}",
                                       self._hdr_addr + 2048, 1024)

    def _ok(self, why: str) -> None:
        if self._state != "ok":
            log.info("cluster tier %s: ok (%s)", self.name, why)
        self._state, self._reason = "ok", ""

    def _fail(self, op: str, reason: str) -> None:
        msg = f"{op}: {reason}"
        state = "degraded" if self._store is not None else "down"
        if self._state != state or self._reason != msg:
            log.warning("cluster tier %s %s: %s", self.name, state, msg)
        self._state = state
        self._reason = msg
        self._last_error, self._last_error_time = msg, time.monotonic()
        with self._lock:
            self._stats["errors"] += 1

    def _call(self, fn, op: str, timeout_s: float | None = None):
        """Run fn on the worker, waiting at most the timeout; ClusterUnavailable on timeout or a stuck worker."""
        if self._closed.is_set():
            raise ClusterUnavailable("closed")
        stuck = self._stuck
        if stuck is not None and not stuck.done():
            with self._lock:
                self._stats["busy"] += 1
            raise ClusterUnavailable(f"{op}: an earlier call is still stuck")
        fut = self._worker.submit(fn)
        try:
            return fut.result(timeout=timeout_s if timeout_s is not None else self.cfg.timeout_ms / 1000)
        except cf.TimeoutError:
            self._stuck = fut
            with self._lock:
                self._stats["timeouts"] += 1
            self._fail(op, f"no answer within {self.cfg.timeout_ms} ms")
            raise ClusterTimeout(f"{op}: timed out") from None
        except ClusterUnavailable as e:
            self._fail(op, e.strerror)
            raise

    @property
    def connected(self) -> bool:
        return self._store is not None and not self._closed.is_set()

    @property
    def usable(self) -> bool:
        """Connected and not degraded: while degraded, lookups and publishes are skipped at once (misses) rather
        than each waiting for a dead peer; the probe brings the tier back."""
        return self.connected and self._state == "ok"

    def health(self) -> dict:
        return {"state": "ok" if self._state == "ok" and self.connected else self._state, "reason": self._reason,
                "last_error": self._last_error,
                "last_error_age_s": round(time.monotonic() - self._last_error_time, 1) if self._last_error else None}

    # -- keys ---------------------------------------------------------------------------------------------
    def object_key(self, key: bytes) -> str:
        return f"{self.cfg.namespace}/{check_key(key).hex()}"

    # -- measurements and the fetch-versus-recompute decision ----------------------------------------
    def _measure(self, nbytes: int, seconds: float) -> None:
        us = seconds * 1e6
        with self._lock:
            if nbytes >= 64 << 10 and not self._warm:
                self._warm = True   # the first transfer also opens the connection to a storage node: not a sample
                return
            if nbytes < 64 << 10:
                self.latency_us = us if self.latency_us is None else (1 - EWMA) * self.latency_us + EWMA * us
            else:
                bw = nbytes / max(seconds, 1e-7)
                self.bandwidth_bytes_per_s = bw if self.bandwidth_bytes_per_s is None else \
                    (1 - EWMA) * self.bandwidth_bytes_per_s + EWMA * bw

    def fetch_estimate_us(self, nbytes: int) -> float | None:
        if self.bandwidth_bytes_per_s is None:
            return None
        return (self.latency_us or 0.0) + nbytes / self.bandwidth_bytes_per_s * 1e6

    def worth_fetching(self, nbytes: int) -> bool:
        """Fetch when the measured tier beats recomputing the block (no measurement yet: fetch, to get one)."""
        if self.cfg.fetch == "never":
            return False
        if self.cfg.fetch == "always":
            return True
        est = self.fetch_estimate_us(nbytes)
        if est is None or est < nbytes / self.cfg.recompute_bytes_per_s * 1e6:
            return True
        with self._lock:
            self._stats["fetch_skipped_recompute"] += 1
        return False

    # -- registered memory --------------------------------------------------------------------------------
    def register(self, addr: int, size: int) -> bool:
        """Register a memory tier's arena so fetches land in it without a copy."""
        if self._registered.get(addr) == size:
            return True
        if not self.connected:
            return False
        try:
            rc = self._call(lambda: self._store.register_buffer(addr, size), op="register_buffer")
        except ClusterUnavailable:
            return False
        if rc != 0:
            self._fail("register_buffer", mc_error(rc))
            return False
        self._registered[addr] = size
        return True

    # -- data path -----------------------------------------------------------------------------------------
    def size_of(self, key: bytes) -> int | None:
        """Payload bytes of the cluster's object for key, None if absent (or the tier cannot answer)."""
        if not self.usable:
            return None
        okey = self.object_key(key)
        t0 = time.perf_counter()
        try:
            n = self._call(lambda: self._store.get_size(okey), op="get_size")
        except ClusterUnavailable:
            return None
        self._measure(0, time.perf_counter() - t0)
        if n is None or n < 0:
            if n not in (-704, None):
                self._fail("get_size", mc_error(n))
            return None
        return n - HEADER_BYTES if n > HEADER_BYTES else None

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        if not self.usable or not keys:
            return [False] * len(keys)
        okeys = [self.object_key(k) for k in keys]
        try:
            rcs = self._call(lambda: self._store.batch_is_exist(okeys), op="batch_is_exist")
        except ClusterUnavailable:
            return [False] * len(keys)
        return [rc == 1 for rc in rcs]

    def fetch_into(self, key: bytes, addr: int, nbytes: int, view: memoryview, on_late_finish) -> dict | None:
        """Fetch key's payload (nbytes) straight into registered memory at addr (view: the same bytes);
        returns its metadata, or None for a miss (absent, failed, or corrupt: counted and reported); raises
        ClusterUnavailable when it cannot ask. On ClusterTimeout the call may still write to addr later:
        on_late_finish() runs once it has really ended."""
        okey = self.object_key(key)
        hdr = self._hdr_addr
        t0 = time.perf_counter()

        def go():
            return self._store.batch_get_into_multi_buffers([okey], [[hdr, addr]], [[HEADER_BYTES, nbytes]])
        with self._lock:
            self._stats["gets"] += 1
        try:
            rcs = self._call(go, op="get")
        except ClusterTimeout:
            self._stuck.add_done_callback(lambda f: on_late_finish())
            raise
        dt = time.perf_counter() - t0
        rc = rcs[0] if rcs else -1
        if rc != HEADER_BYTES + nbytes:
            with self._lock:
                self._stats["misses"] += 1
            if rc != -704:
                self._fail("get", f"{okey}: {mc_error(rc) if rc < 0 else f'{rc} bytes, expected {nbytes}'}")
            return None
        try:
            plen, psum, head = unpack_header(self._hdr)
            if plen != nbytes:
                raise ValueError(f"header says {plen} bytes, object has {nbytes}")
            if checksum(view) != psum:
                raise ValueError("payload checksum mismatch")
        except (ValueError, msgpack.UnpackException) as e:
            with self._lock:
                self._stats["checksum_failures"] += 1
                self._stats["misses"] += 1
            self._last_error, self._last_error_time = f"get {okey}: {e}: not served", time.monotonic()
            log.error("cluster tier %s: object %s failed verification (%s): a miss, not served", self.name, okey, e)
            return None
        self._measure(HEADER_BYTES + nbytes, dt)
        with self._lock:
            self._stats["hits"] += 1
            self._stats["fetches"] += 1
            self._stats["fetch_bytes"] += nbytes
            self._stats["bytes_out"] += nbytes
        if self._state == "degraded" and self._reason.startswith("get"):
            self._ok("a fetch succeeded")
        return head

    def publish(self, key: bytes, payload, head: dict) -> bool:
        """Queue key's block for the cluster: copied into the registered staging buffer now, put from there by
        the worker. False (counted) when not usable, already published, or no staging room."""
        key = check_key(key)
        if not self.usable:
            with self._lock:
                self._stats["publish_skipped"] += 1
            return False
        nbytes = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        with self._lock:
            if key in self._published:
                self._published.move_to_end(key)
                return False
            stuck = self._stuck is not None and not self._stuck.done()
            off = None if stuck else self._staging_alloc.alloc(HEADER_BYTES + nbytes)
            if off is None:
                self._stats["publish_skipped"] += 1
                return False
            ext = self._staging_alloc.round_up(HEADER_BYTES + nbytes)
            self._pending_publish += 1
        try:
            mv = memoryview(self._staging)
            mv[off:off + HEADER_BYTES] = pack_header(nbytes, checksum(payload), head)
            mv[off + HEADER_BYTES:off + HEADER_BYTES + nbytes] = payload
            del mv
        except BaseException:
            with self._lock:
                self._staging_alloc.free(off, ext)
                self._pending_publish -= 1
            raise
        okey = self.object_key(key)
        addr = self._staging_addr + off
        total = HEADER_BYTES + nbytes

        def go():
            t0 = time.perf_counter()
            try:
                rc = self._store.put_from(okey, addr, total)
            finally:
                with self._lock:
                    self._staging_alloc.free(off, ext)
                    self._pending_publish -= 1
            if rc == 0 or rc == -707:   # -707: already there (another host published it first)
                self._measure(total, time.perf_counter() - t0)
                with self._lock:
                    self._stats["publishes"] += 1
                    self._stats["puts"] += 1
                    self._stats["bytes_in"] += nbytes
                    self._published[key] = nbytes
                    while len(self._published) > PUBLISHED_KEPT:
                        self._published.popitem(last=False)
                if self._state == "degraded" and self._reason.startswith("put"):
                    self._ok("a publish succeeded")
            else:
                with self._lock:
                    self._stats["publish_failures"] += 1
                self._fail("put", f"{okey}: {mc_error(rc)}")
        fut = self._worker.submit(go)
        fut.add_done_callback(lambda f: f.exception() and log.warning("publish %s: %s", okey, f.exception()))
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until queued publishes are done (tests and shutdown)."""
        end = time.monotonic() + timeout_s
        while self._pending_publish and time.monotonic() < end:
            time.sleep(0.005)
        return not self._pending_publish

    def remove(self, key: bytes) -> None:
        """Best effort, asynchronous: a tenant's delete also leaves the cluster. Mooncake refuses while a read
        lease is held: retried with backoff, then forced (REMOVE_FORCE_AFTER)."""
        if not self.connected:
            return
        okey = self.object_key(key)
        with self._lock:
            self._published.pop(check_key(key), None)
            self._stats["removes"] += 1

        def go(attempt: int):
            store = self._store
            if store is None:
                rc = 0
            elif attempt < REMOVE_FORCE_AFTER:
                rc = store.remove(okey)
            else:
                rc = store.remove(okey, force=True)
            if rc == -706 and attempt < REMOVE_FORCE_AFTER:
                # a reader's lease: again after a backoff
                delay_s = REMOVE_BACKOFF_S * 2 ** attempt
                t = threading.Timer(delay_s, lambda: self.connected and self._worker.submit(lambda: go(attempt + 1)))
                t.daemon = True
                t.start()
            elif rc not in (0, -704):
                with self._lock:
                    self._stats["remove_failures"] += 1
                log.info("cluster tier %s: remove %s: %s", self.name, okey, mc_error(rc))
        self._worker.submit(lambda: go(0))

    # -- the Tier contract (bytes path: tools and tests; the daemon uses fetch_into / publish) --------
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._published.values())

    def put(self, key: bytes, data) -> int:
        if not self.publish(key, memoryview(data).cast("B"), {}):
            raise ClusterUnavailable(f"tier {self.name}: not published ({self.health()['reason'] or 'no room'})")
        return len(data)

    def get(self, key: bytes) -> bytes:
        n = self.size_of(key)
        if n is None:
            raise KeyError(key)
        buf = bytearray(n)
        self.get_into(key, memoryview(buf))
        return bytes(buf)

    def get_into(self, key: bytes, out: memoryview) -> int:
        n = self.size_of(key)
        if n is None or n > self.cfg.buffer_bytes:
            raise KeyError(key)
        with self._lock:
            off = self._staging_alloc.alloc(n)
        if off is None:
            raise ClusterUnavailable(f"tier {self.name}: no staging room for {n} bytes")
        ext = self._staging_alloc.round_up(n)
        freed = threading.Event()

        def release():
            if not freed.is_set():
                freed.set()
                with self._lock:
                    self._staging_alloc.free(off, ext)
        view = memoryview(self._staging)[off:off + n]
        late = False
        try:
            if self.fetch_into(key, self._staging_addr + off, n, view, release) is None:
                raise KeyError(key)
            out[:n] = view
            return n
        except ClusterTimeout:
            late = True
            raise
        finally:
            view.release()
            if not late:
                release()

    def contains(self, key: bytes) -> bool:
        return self.contains_many([key])[0]

    def delete(self, key: bytes) -> bool:
        self.remove(key)
        return True

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._published)

    def __len__(self) -> int:
        with self._lock:
            return len(self._published)

    def stats(self) -> dict:
        out = super().stats()
        out.update(health=self.health(), latency_us=self.latency_us, bandwidth_bytes_per_s=self.bandwidth_bytes_per_s,
                   pending_publishes=self._pending_publish, local_hostname=self.cfg.local_hostname,
                   master=self.cfg.master, metadata_server=self.cfg.metadata_server)
        return out

    def close(self) -> None:
        if self._closed.is_set():
            return
        self.flush(min(2.0, self.cfg.timeout_ms / 1000))
        self._closed.set()
        store = self._store
        self._store = None
        if store is not None and (self._stuck is None or self._stuck.done()):
            try:
                self._worker.submit(store.close).result(timeout=self.cfg.timeout_ms / 1000)
            except Exception as e:   # a dead cluster must not stop the daemon's shutdown
                log.warning("closing cluster tier %s: %s", self.name, e)
        self._worker.shutdown()
