"""kvtierd's TOML configuration: parsed and validated at start (and on SIGHUP), errors name the key.

    socket = "/run/kvtier/kvtierd.sock"   # or $KVTIER_SOCKET
    group = "kvtier"                      # who may connect (besides root); default: kvtier if it exists, else root
    socket_mode = 0o660
    state_dir = "/var/lib/kvtier"         # or $KVTIER_STATE_DIR
    policy = "kvtier"                     # any name of kvtier.policy.registry
    metrics = "127.0.0.1:9477"            # Prometheus endpoint; "" turns it off
    busy_poll_us = 500                    # keep polling this long after a request (0: sleep at once)
    gc_freeze = true                      # Python's cycle collector skips what outlived a collection (false:
                                          # CPython's own, whose collections walk the whole index)
    shutdown_flush_s = 20                 # on SIGTERM, copy memory-only blocks to NVMe for up to this long,
                                          # so a restart serves them (0: off; keep under TimeoutStopSec)
    max_sessions_per_tenant = 65536       # open sessions a tenant may hold: beyond, register_session is EDQUOT
    max_sessions_per_uid = 262144         # ... and a uid, in all tenants (any name is a tenant unless configured)
    max_connections_per_uid = 1024        # connections one uid may hold open: beyond, a new one is refused
                                          # (EDQUOT), so one user cannot take every descriptor the daemon has
    max_pinned_per_tenant = "50%"         # bytes a tenant's decoding sessions may pin (never evicted): bytes or
                                          # % of the memory tiers' capacity; beyond, a decoding hint or put is EDQUOT
    max_pinned_per_uid = "50%"            # ... and a uid's sessions, in all tenants

    [blocks]
    min_bytes = 1
    max_bytes = "256MiB"
    nominal_bytes = "1MiB"                # policy capacities in blocks = tier capacity / nominal_bytes; pinned
                                          # and reserved blocks: at most the memory tiers' sum of those (>= 65536)

    [[tiers]]                             # fastest first; memory tiers, then at most one nvme tier
    name = "dram0"
    kind = "dram"                         # gpu | dram | cxl | nvme (gpu: first, keys device, capacity ("N%" of
                                          # the GPU's free memory), optional; see kvtier.cuda.config)
    nodes = [0]
    capacity = "8GiB"                     # bytes, or "N KiB/MiB/GiB/TiB", or "25%" of free memory / disk
    backend = "auto"                      # auto | memfd | kmod
    free_target = "2%"                    # kept free by background demotion (bytes or % of the tier; 0: off)

    [[tiers]]
    name = "nvme0"
    kind = "nvme"
    directory = "/var/lib/kvtier/nvme"
    capacity = "100GiB"
    codec = { compression = "zstd" }      # optional: zstd | lz4 (lossless), or { quantization = "int8" | "int4",
                                          # error_bound = 0.02 } for KV blocks put with a layout
    fsync = true

    [tenants.acme]                        # optional: a tenant's salt and the uids allowed to bind to it
    salt = "acme-2026"
    uids = [1000]

    [cluster]                             # optional: the Mooncake Store tier below (kvtier.store.cluster)
    master = "10.0.0.1:50051"
    metadata_server = "http://10.0.0.1:8080/metadata"
    local_hostname = "10.0.0.11"          # + protocol, segment, buffer, timeout_ms, probe_interval_ms, namespace,
                                          #   publish, fetch, recompute_bytes_per_s (README: The cluster tier)

    [admins]                              # optional: who gets the all-tenant view and pin/evict/policy set
    uids = [1001]                         # (root and the daemon's own uid always do)
    groups = ["kvadmin"]

    [probes]                              # optional: eBPF access heat (kvtier.daemon.heat)
    enabled = "auto"                      # auto | true | false
    interval_ms = 1000                    # + half_life_ms, sample
"""
from __future__ import annotations

import grp
import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field

from kvtier.errors import InputError

DEFAULT_CONFIG = "/etc/kvtier/kvtierd.toml"
SOCKET_ENV = "KVTIER_SOCKET"
STATE_ENV = "KVTIER_STATE_DIR"
DEFAULT_SOCKET = "/run/kvtier/kvtierd.sock"
DEFAULT_STATE = "/var/lib/kvtier"
DEFAULT_DRAM_FRACTION = 0.25   # of MemAvailable: leave the machine room for the engine itself
DEFAULT_NVME_FRACTION = 0.5    # of the state directory's free disk
DEFAULT_FREE_TARGET = "2%"     # of a memory tier with a tier below: reclaimed in the background (Engine.reclaim)
DEFAULT_MAX_SESSIONS = 65536   # per tenant: a client that never ends its sessions cannot grow the daemon for ever
DEFAULT_MAX_UID_SESSIONS = 262144   # per uid, in every tenant: unconfigured tenants are any name
# Pinned bytes (a decoding session's blocks, out of every policy) per tenant and per uid, of the memory tiers'
# capacity: one tenant cannot make the first tiers unevictable for the others.
DEFAULT_MAX_PINNED = "50%"
DEFAULT_MAX_CONNECTIONS = 1024   # per uid: one user's leaked connections cannot use up the daemon's descriptors
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
_TOP_KEYS = {"socket", "group", "socket_mode", "state_dir", "policy", "metrics", "blocks", "tiers", "tenants",
             "shutdown_flush_s", "max_sessions_per_tenant", "max_sessions_per_uid", "max_connections_per_uid",
             "max_pinned_per_tenant", "max_pinned_per_uid",
             "busy_poll_us", "gc_freeze", "admins", "cluster", "probes"}


@dataclass
class TierConfig:
    name: str
    kind: str
    capacity_bytes: int
    nodes: list[int] = field(default_factory=list)
    backend: str = "auto"
    directory: str = ""
    codec: dict | None = None
    fsync: bool = True
    prefault: bool = False   # memory tiers: fault the whole arena in at start (first puts pay no page faults)
    free_target_bytes: int = 0   # memory tiers: what background reclaim keeps free (Engine.reclaim; 0: off)
    device: int = 0          # gpu tiers: the CUDA device (kvtier.cuda.config)
    optional: bool = False   # gpu tiers: without the GPU, start without the tier instead of failing


@dataclass
class TenantConfig:
    name: str
    salt: bytes
    uids: list[int] | None = None   # None: any uid allowed to connect

    def allows(self, uid: int) -> bool:
        return self.uids is None or uid in self.uids


@dataclass
class Config:
    socket: str
    gid: int
    group: str
    socket_mode: int
    state_dir: str
    policy: str
    metrics_host: str | None
    metrics_port: int
    min_block_bytes: int
    max_block_bytes: int
    nominal_block_bytes: int
    tiers: list[TierConfig]
    tenants: dict[str, TenantConfig]
    source: str = "(embedded default)"
    busy_poll_us: int = 500
    gc_freeze: bool = True   # see daemon.server.Collector
    shutdown_flush_s: float = 20.0   # SIGTERM: copy memory-only blocks to NVMe for this long (0: off)
    max_sessions_per_tenant: int = DEFAULT_MAX_SESSIONS   # open sessions per tenant (register_session: EDQUOT)
    max_sessions_per_uid: int = DEFAULT_MAX_UID_SESSIONS   # open sessions per peer uid, in all tenants (EDQUOT)
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS   # open connections per peer uid (beyond: EDQUOT)
    max_pinned_per_tenant: int = 1 << 62   # bytes a tenant's decoding sessions may pin (load: DEFAULT_MAX_PINNED)
    max_pinned_per_uid: int = 1 << 62      # ... a uid's sessions, in all tenants
    admin_uids: tuple = ()   # besides root and the daemon's uid (tuples: --check prints them as JSON lists)
    admin_gids: tuple = ()
    cluster: object = None   # kvtier.store.cluster.ClusterConfig when [cluster] is configured
    probes: object = None    # kvtier.daemon.heat.ProbesConfig ([probes]: eBPF access heat)
    absent_tiers: list = field(default_factory=list)   # optional gpu tiers left out: {name, kind, device, reason}

    def tenant(self, name: str) -> TenantConfig:
        # An unconfigured tenant gets its name as salt: tenants never share blocks unless configured to.
        return self.tenants.get(name) or TenantConfig(name, b"tenant:" + name.encode())


def parse_size(value, where: str, free_bytes: int | None = None) -> int:
    """An int, "64MiB"-style string, or "N%" of `free_bytes`; InputError naming `where`."""
    if isinstance(value, bool):
        raise InputError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        v = value.strip().lower().replace(" ", "")
        if v.endswith("%") and free_bytes is not None:
            try:
                pct = float(v[:-1])
            except ValueError:
                raise InputError(f"{where}: bad percentage {value!r}") from None
            if not 0 < pct <= 100:
                raise InputError(f"{where}: percentage must be in (0, 100], got {value!r}")
            n = int(free_bytes * pct / 100)
        else:
            m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-z]*)", v)
            if not m or m.group(2) not in _UNITS:
                raise InputError(f"{where}: bad size {value!r} (examples: 1048576, \"64MiB\", \"8GiB\", \"25%\")")
            n = int(float(m.group(1)) * _UNITS[m.group(2)])
    else:
        raise InputError(f"{where}: expected a size, got {value!r}")
    if n <= 0:
        raise InputError(f"{where}: size must be positive, got {value!r}")
    return n


def _free_target(value, where: str, capacity_bytes: int) -> int:
    """A memory tier's free_target: bytes or "N%" of the tier, at most half of it; 0 turns reclaim off."""
    if value == 0 or value == "0":
        return 0
    n = parse_size(value, where, capacity_bytes)
    if n > capacity_bytes // 2:
        raise InputError(f"{where}: at most half the tier's capacity ({capacity_bytes // 2} bytes), got {value!r}")
    return n


def parse_metrics(value: str, where: str) -> tuple[str | None, int]:
    """ "HOST:PORT" -> (host, port); "" -> (None, 0): no endpoint."""
    if not value:
        return None, 0
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise InputError(f"{where}: expected HOST:PORT or \"\", got {value!r}")
    return host.strip("[]"), int(port)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


def _disk_free(path: str) -> int:
    p = path
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    return shutil.disk_usage(p or "/").free


def _check_type(d: dict, key: str, types, where: str):
    v = d[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in allowed):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise InputError(f"{where}{key}: expected {names}, got {v!r}")
    return v


def default_group() -> tuple[str, int]:
    try:
        return "kvtier", grp.getgrnam("kvtier").gr_gid
    except KeyError:
        return grp.getgrgid(0).gr_name, 0


def load(path: str | None) -> Config:
    """Read and validate `path` (None: the default file if it exists, else the embedded default)."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return from_dict({}, "(embedded default)")
        path = DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: {e}") from None
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    return from_dict(data, path)


def from_dict(d: dict, source: str) -> Config:
    w = f"{source}: "
    unknown = set(d) - _TOP_KEYS
    if unknown:
        raise InputError(f"{w}unknown key '{sorted(unknown)[0]}'; valid: {', '.join(sorted(_TOP_KEYS))}")
    for key, t in (("socket", str), ("group", str), ("state_dir", str), ("policy", str), ("metrics", str),
                   ("socket_mode", int), ("busy_poll_us", int), ("gc_freeze", bool), ("blocks", dict), ("tiers", list),
                   ("tenants", dict), ("admins", dict)):
        if key in d:
            _check_type(d, key, t, w)
    socket = d.get("socket") or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    state_dir = d.get("state_dir") or os.environ.get(STATE_ENV) or DEFAULT_STATE
    if "group" in d:
        try:
            gid = grp.getgrnam(d["group"]).gr_gid
        except KeyError:
            raise InputError(f"{w}group: no such group '{d['group']}'") from None
        group = d["group"]
    else:
        group, gid = default_group()
    mode = d.get("socket_mode", 0o660)
    if not 0 <= mode <= 0o777:
        raise InputError(f"{w}socket_mode: expected a permission mode such as 0o660, got {mode!r}")

    from kvtier.policy.registry import policy_names
    policy = d.get("policy", "kvtier")
    if policy not in policy_names() or policy == "opt":
        raise InputError(f"{w}policy: unknown or offline policy '{policy}'; valid: "
                         f"{', '.join(n for n in policy_names() if n != 'opt')}")

    mhost, mport = parse_metrics(d.get("metrics", "127.0.0.1:9477"), f"{w}metrics")

    flush_s = d.get("shutdown_flush_s", 20.0)
    if isinstance(flush_s, bool) or not isinstance(flush_s, (int, float)) or not 0 <= flush_s <= 3600:
        raise InputError(f"{w}shutdown_flush_s: expected 0..3600 seconds, got {flush_s!r}")
    limits = {}
    for key, default, what in (("max_sessions_per_tenant", DEFAULT_MAX_SESSIONS, "sessions"),
                               ("max_sessions_per_uid", DEFAULT_MAX_UID_SESSIONS, "sessions"),
                               ("max_connections_per_uid", DEFAULT_MAX_CONNECTIONS, "connections")):
        v = limits[key] = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 1 << 31:
            raise InputError(f"{w}{key}: expected 1..{(1 << 31) - 1} {what}, got {v!r}")
    busy = d.get("busy_poll_us", 500)
    if not 0 <= busy <= 100_000:
        raise InputError(f"{w}busy_poll_us: expected 0..100000 microseconds, got {busy!r}")
    blocks = d.get("blocks", {})
    bad = set(blocks) - {"min_bytes", "max_bytes", "nominal_bytes"}
    if bad:
        raise InputError(f"{w}blocks.{sorted(bad)[0]}: unknown key; valid: min_bytes, max_bytes, nominal_bytes")
    min_b = parse_size(blocks.get("min_bytes", 1), f"{w}blocks.min_bytes")
    max_b = parse_size(blocks.get("max_bytes", 256 << 20), f"{w}blocks.max_bytes")
    nominal = parse_size(blocks.get("nominal_bytes", 1 << 20), f"{w}blocks.nominal_bytes")
    if min_b > max_b:
        raise InputError(f"{w}blocks.min_bytes: {min_b} is larger than blocks.max_bytes {max_b}")

    absent_tiers: list = []
    tiers = _tiers(d.get("tiers"), state_dir, w, absent_tiers)
    memory_bytes = sum(t.capacity_bytes for t in tiers if t.kind != "nvme")
    for key in ("max_pinned_per_tenant", "max_pinned_per_uid"):
        limits[key] = parse_size(d.get(key, DEFAULT_MAX_PINNED), f"{w}{key}", memory_bytes)
    tenants = {}
    for name, t in d.get("tenants", {}).items():
        where = f"{w}tenants.{name}."
        if not isinstance(t, dict):
            raise InputError(f"{w}tenants.{name}: expected a table")
        bad = set(t) - {"salt", "uids"}
        if bad:
            raise InputError(f"{where}{sorted(bad)[0]}: unknown key; valid: salt, uids")
        salt = t.get("salt", "tenant:" + name)
        if not isinstance(salt, str):
            raise InputError(f"{where}salt: expected a string")
        uids = t.get("uids")
        if uids is not None and (not isinstance(uids, list) or not all(isinstance(u, int) and u >= 0 for u in uids)):
            raise InputError(f"{where}uids: expected a list of uids, got {uids!r}")
        tenants[name] = TenantConfig(name, salt.encode(), uids)
    admin_uids, admin_gids = _admins(d.get("admins", {}), w)
    cluster = None
    if "cluster" in d:   # the Mooncake cluster tier below the local tiers (kvtier.store.cluster)
        from kvtier.store.cluster import parse_config
        cluster = parse_config(d["cluster"], w)
    from kvtier.daemon.heat import parse_config as parse_probes
    probes = parse_probes(d.get("probes"), w)
    return Config(socket=socket, gid=gid, group=group, socket_mode=mode, state_dir=state_dir, policy=policy,
                  metrics_host=mhost, metrics_port=mport, min_block_bytes=min_b, max_block_bytes=max_b,
                  nominal_block_bytes=nominal, tiers=tiers, tenants=tenants, source=source, busy_poll_us=busy,
                  gc_freeze=d.get("gc_freeze", True), shutdown_flush_s=float(flush_s),
                  **limits,
                  admin_uids=admin_uids, admin_gids=admin_gids, cluster=cluster, absent_tiers=absent_tiers,
                  probes=probes)


def _admins(a: dict, w: str) -> tuple[tuple, tuple]:
    """[admins] uids = [...], groups = [names or gids] -> (uids, gids)."""
    bad = set(a) - {"uids", "groups"}
    if bad:
        raise InputError(f"{w}admins.{sorted(bad)[0]}: unknown key; valid: groups, uids")
    uids = a.get("uids", [])
    if not isinstance(uids, list) or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0
                                             for u in uids):
        raise InputError(f"{w}admins.uids: expected a list of uids, got {uids!r}")
    groups = a.get("groups", [])
    if not isinstance(groups, list):
        raise InputError(f"{w}admins.groups: expected a list of group names or gids, got {groups!r}")
    gids = set()
    for g in groups:
        if isinstance(g, int) and not isinstance(g, bool) and g >= 0:
            gids.add(g)
        elif isinstance(g, str):
            try:
                gids.add(grp.getgrnam(g).gr_gid)
            except KeyError:
                raise InputError(f"{w}admins.groups: no such group '{g}'") from None
        else:
            raise InputError(f"{w}admins.groups: expected a group name or gid, got {g!r}")
    return tuple(sorted(set(uids))), tuple(sorted(gids))


def _tiers(spec, state_dir: str, w: str, absent: list | None = None) -> list[TierConfig]:
    if spec is None:
        # Embedded default: DRAM through memfd on node 0, NVMe in the state directory.
        nvme_dir = os.path.join(state_dir, "nvme")
        dram = TierConfig("dram0", "dram", max(64 << 20, int(_mem_available() * DEFAULT_DRAM_FRACTION)), [0])
        dram.free_target_bytes = _free_target(DEFAULT_FREE_TARGET, "", dram.capacity_bytes)
        return [dram, TierConfig("nvme0", "nvme", max(64 << 20, int(_disk_free(state_dir) * DEFAULT_NVME_FRACTION)),
                                 directory=nvme_dir)]
    if not spec:
        raise InputError(f"{w}tiers: at least one tier is needed")
    out, names = [], set()
    for i, t in enumerate(spec):
        where = f"{w}tiers[{i}]."
        if not isinstance(t, dict):
            raise InputError(f"{w}tiers[{i}]: expected a table")
        allowed = {"name", "kind", "nodes", "capacity", "backend", "directory", "codec", "fsync", "prefault",
                   "free_target", "device", "optional"}
        bad = set(t) - allowed
        if bad:
            raise InputError(f"{where}{sorted(bad)[0]}: unknown key; valid: {', '.join(sorted(allowed))}")
        kind = t.get("kind")
        if kind not in ("gpu", "dram", "cxl", "nvme"):
            raise InputError(f"{where}kind: expected gpu, dram, cxl or nvme, got {kind!r}")
        name = t.get("name", f"{kind}{i}")
        if not isinstance(name, str) or not name or name in names:
            raise InputError(f"{where}name: missing, not a string or used twice: {name!r}")
        names.add(name)
        if "capacity" not in t:
            raise InputError(f"{where}capacity: missing")
        tc = TierConfig(name, kind, 0)
        if kind in ("gpu", "nvme") and "free_target" in t:
            raise InputError(f"{where}free_target: only memory tiers (dram, cxl) are reclaimed into a tier below")
        if kind == "gpu":   # kvtier.cuda.config: device, optional, capacity within the GPU's free memory
            if out and out[-1].kind != "gpu":
                raise InputError(f"{where}kind: gpu tiers come first (fastest first)")
            from kvtier.cuda.config import gpu_tier
            if gpu_tier(t, where, tc, parse_size, absent if absent is not None else []):
                out.append(tc)
            continue
        for k in ("device", "optional"):
            if k in t:
                raise InputError(f"{where}{k}: only gpu tiers have it")
        if kind == "nvme":
            if out and out[-1].kind == "nvme":
                raise InputError(f"{where}kind: only one nvme tier is supported")
            d = t.get("directory", os.path.join(state_dir, "nvme"))
            if not isinstance(d, str) or not d:
                raise InputError(f"{where}directory: expected a path")
            tc.directory = d
            tc.capacity_bytes = parse_size(t["capacity"], f"{where}capacity", _disk_free(d))
            codec = t.get("codec")
            if codec is not None and not isinstance(codec, dict):
                raise InputError(f"{where}codec: expected a table such as {{ compression = \"zstd\" }}")
            if codec is not None:   # checked here, so --check and SIGHUP catch a bad codec, not only a start
                from kvtier.store.codec import codec_from_config
                codec_from_config(codec, where=f"{where}codec")
            tc.codec = codec
            fs = t.get("fsync", True)
            if not isinstance(fs, bool):
                raise InputError(f"{where}fsync: expected true or false")
            tc.fsync = fs
        else:
            if out and out[-1].kind == "nvme":
                raise InputError(f"{where}kind: memory tiers must come before the nvme tier (fastest first)")
            nodes = t.get("nodes", [0])
            if not isinstance(nodes, list) or not nodes or not all(isinstance(n, int) and n >= 0 for n in nodes):
                raise InputError(f"{where}nodes: expected a list of NUMA node ids, got {nodes!r}")
            tc.nodes = nodes
            tc.capacity_bytes = parse_size(t["capacity"], f"{where}capacity", _mem_available())
            backend = t.get("backend", "auto")
            if backend not in ("auto", "memfd", "kmod"):
                raise InputError(f"{where}backend: expected auto, memfd or kmod, got {backend!r}")
            tc.backend = backend
            prefault = t.get("prefault", False)
            if not isinstance(prefault, bool):
                raise InputError(f"{where}prefault: expected true or false")
            tc.prefault = prefault
            tc.free_target_bytes = _free_target(t.get("free_target", DEFAULT_FREE_TARGET), f"{where}free_target",
                                                tc.capacity_bytes)
        if kind == "nvme" and "prefault" in t:
            raise InputError(f"{where}prefault: only memory tiers (dram, cxl) are prefaulted")
        out.append(tc)
    if not out or all(t.kind == "gpu" for t in out if t.kind != "nvme"):
        raise InputError(f"{w}tiers: a dram or cxl tier is needed (clients put and read through host memory; "
                         "gpu tiers sit above it)")
    if out[0].kind == "nvme":
        raise InputError(f"{w}tiers[0].kind: the first tier must be a memory tier (dram or cxl)")
    return out
