"""Tier discovery: what memory and storage this machine has for KV blocks.

Two views:
  * read_topology() -> Topology: node-level facts from sysfs (CPUs, MemTotal/MemFree, distances,
    the kernel's memory tier, HMAT access attributes, has_cpu/has_memory). The daemon places by these.
  * discover() -> list[Tier], sorted by rank (0 = fastest); survey() returns tiers, topology and the
    GPU report together (what `kvctl tiers` prints).

Ranking and kinds
  1. GPUs (kind "hbm", one tier per GPU, named gpuN) share rank 0 when cuda-python finds any.
  2. Memory nodes (nodes with no memory are ignored) are grouped by the kernel's memory tier,
     /sys/devices/virtual/memory_tiering/memory_tierN/nodelist. N is the node's abstract distance
     divided into chunks, so a lower N is faster. The fastest tier that holds a CPU node is kind
     "dram" (named "dram"); every slower memory tier is kind "cxl" (cxl0, cxl1, ... from fast to
     slow), one rank each. Tiers faster than the DRAM tier without CPUs (on-package HBM nodes) are
     also kind "dram", named dram-tierN. The kernel's grouping wins: Linux 6.1 puts a plain CPU-less
     node in the same tier as DRAM, so such a node is reported inside the dram tier; the node-level
     view still shows it CPU-less and farther away.
  3. Without memory_tiering (older kernels): CPU nodes with memory form the dram tier; CPU-less memory
     nodes are kind "cxl", grouped by their distance to the nearest CPU node (nearer = faster).
  4. NVMe directories are configured, never discovered (discover(nvme_dirs=...), `kvctl tiers
     --nvme-dir`, env KVTIER_NVME_DIRS): kind "nvme", named nvme0, nvme1, ..., sharing the last rank.

Free bytes: MemFree per node for memory, statvfs f_bavail (what a non-root daemon may use) for
directories, cuMemGetInfo for GPUs.

sysfs_root and proc_root let tests point at a fake tree.
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import asdict, dataclass, field

from kvtier.errors import InputError

NVME_DIRS_ENV = "KVTIER_NVME_DIRS"
_HMAT_ATTRS = ("read_bandwidth", "read_latency", "write_bandwidth", "write_latency")
# HMAT units as the kernel gives them (Documentation/ABI/stable/sysfs-devices-node): MB/s and ns.
_HMAT_NAMES = {"read_bandwidth": "read_bandwidth_mbps", "read_latency": "read_latency_ns",
               "write_bandwidth": "write_bandwidth_mbps", "write_latency": "write_latency_ns"}
_ODIRECT_BLOCK = 4096


@dataclass
class Tier:
    name: str                 # e.g. "gpu0", "dram", "cxl0", "nvme0"
    kind: str                 # "hbm" | "dram" | "cxl" | "nvme"
    rank: int                 # 0 = fastest
    capacity_bytes: int
    free_bytes: int
    nodes: list[int] = field(default_factory=list)   # NUMA nodes (memory tiers)
    paths: list[str] = field(default_factory=list)   # directories (nvme) or devices ("cuda:0") for hbm
    memory_tier: int | None = None                   # the kernel's memory_tierN id (memory tiers)
    details: dict = field(default_factory=dict)      # kind-specific facts (filesystem, GPU name, ...)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Access:
    """HMAT performance of a memory node as seen from its best initiators (accessN/initiators)."""
    initiators: list[int]
    read_bandwidth_mbps: int | None = None
    read_latency_ns: int | None = None
    write_bandwidth_mbps: int | None = None
    write_latency_ns: int | None = None


@dataclass
class Node:
    id: int
    cpus: list[int]
    has_cpu: bool
    has_memory: bool
    mem_total_bytes: int
    mem_free_bytes: int
    distances: dict[int, int]            # node id -> SLIT distance (10 = local)
    memory_tier: int | None = None       # None: no memory_tiering in sysfs, or no memory
    # access0: from any initiator, access1: from CPU initiators only (kernel's HMAT classes)
    access: dict[str, Access] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["distances"] = {str(k): v for k, v in self.distances.items()}
        return out


@dataclass
class Topology:
    nodes: list[Node]
    memory_tiers: dict[int, list[int]] | None   # memory_tierN -> nodes; None when sysfs lacks it

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def cpu_nodes(self) -> list[int]:
        return [n.id for n in self.nodes if n.has_cpu]

    @property
    def memory_nodes(self) -> list[int]:
        return [n.id for n in self.nodes if n.has_memory]

    def distance_to_cpu(self, node_id: int) -> int | None:
        """Distance from a node to the nearest CPU node (itself when it has CPUs)."""
        node = self.node(node_id)
        dists = [node.distances[c] for c in self.cpu_nodes if c in node.distances]
        return min(dists) if dists else None


@dataclass
class Survey:
    tiers: list[Tier]
    topology: Topology
    gpu: object        # kvtier.cuda.discover.GpuReport

    def to_dict(self) -> dict:
        return {"tiers": [t.to_dict() for t in self.tiers],
                "nodes": [n.to_dict() for n in self.topology.nodes],
                "gpu": self.gpu.to_dict()}


# ---- sysfs reading -------------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def parse_list(text: str | None) -> list[int]:
    """A kernel cpulist/nodelist ("0-3,8,10-11") as a sorted list of ints."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


def _meminfo(text: str | None) -> dict[str, int]:
    """Node meminfo ("Node 0 MemTotal:  5335252 kB") or /proc/meminfo as bytes per field."""
    out = {}
    for line in (text or "").splitlines():
        m = re.match(r"(?:Node \d+ )?(\w+):\s+(\d+)(?:\s+kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _read_access(node_dir: str) -> dict[str, Access]:
    out = {}
    try:
        names = sorted(d for d in os.listdir(node_dir) if re.fullmatch(r"access\d+", d))
    except OSError:
        return out
    for name in names:
        idir = os.path.join(node_dir, name, "initiators")
        try:
            entries = os.listdir(idir)
        except OSError:
            continue
        initiators = sorted(int(e[4:]) for e in entries if re.fullmatch(r"node\d+", e))
        values = {_HMAT_NAMES[a]: _int_or_none(_read(os.path.join(idir, a))) for a in _HMAT_ATTRS}
        out[name] = Access(initiators=initiators, **values)
    return out


def _read_memory_tiers(sysfs_root: str) -> dict[int, list[int]] | None:
    tdir = os.path.join(sysfs_root, "devices/virtual/memory_tiering")
    try:
        names = os.listdir(tdir)
    except OSError:
        return None
    tiers = {}
    for name in names:
        m = re.fullmatch(r"memory_tier(\d+)", name)
        if m:
            tiers[int(m.group(1))] = parse_list(_read(os.path.join(tdir, name, "nodelist")))
    return dict(sorted(tiers.items())) or None


def _single_node(sysfs_root: str, proc_root: str) -> list[Node]:
    """A kernel without NUMA sysfs (CONFIG_NUMA=n): the whole machine is node 0."""
    cpus = parse_list(_read(os.path.join(sysfs_root, "devices/system/cpu/online")))
    info = _meminfo(_read(os.path.join(proc_root, "meminfo")))
    total = info.get("MemTotal", 0)
    return [Node(id=0, cpus=cpus, has_cpu=bool(cpus), has_memory=total > 0, mem_total_bytes=total,
                 mem_free_bytes=info.get("MemFree", 0), distances={0: 10})]


def read_topology(sysfs_root: str = "/sys", proc_root: str = "/proc") -> Topology:
    """Node-level facts from sysfs: see Node and Topology."""
    ndir = os.path.join(sysfs_root, "devices/system/node")
    memory_tiers = _read_memory_tiers(sysfs_root)
    online = _read(os.path.join(ndir, "online"))
    if online is not None:
        ids = parse_list(online)
    else:
        try:
            ids = sorted(int(d[4:]) for d in os.listdir(ndir) if re.fullmatch(r"node\d+", d))
        except OSError:
            return Topology(_single_node(sysfs_root, proc_root), memory_tiers)
    has_cpu_list = _read(os.path.join(ndir, "has_cpu"))
    has_memory_list = _read(os.path.join(ndir, "has_memory"))
    tier_of = {n: t for t, nodes in (memory_tiers or {}).items() for n in nodes}
    nodes = []
    for nid in ids:
        d = os.path.join(ndir, f"node{nid}")
        cpus = parse_list(_read(os.path.join(d, "cpulist")))
        info = _meminfo(_read(os.path.join(d, "meminfo")))
        total = info.get("MemTotal", 0)
        # The distance file lists one distance per online node, in the order of `online`.
        dist_values = [int(x) for x in (_read(os.path.join(d, "distance")) or "").split()]
        distances = dict(zip(ids, dist_values))
        has_cpu = nid in parse_list(has_cpu_list) if has_cpu_list is not None else bool(cpus)
        has_memory = nid in parse_list(has_memory_list) if has_memory_list is not None else total > 0
        nodes.append(Node(id=nid, cpus=cpus, has_cpu=has_cpu, has_memory=has_memory,
                          mem_total_bytes=total, mem_free_bytes=info.get("MemFree", 0),
                          distances=distances, memory_tier=tier_of.get(nid),
                          access=_read_access(d)))
    return Topology(nodes, memory_tiers)


# ---- memory tiers --------------------------------------------------------------------------------

def _memory_groups(topo: Topology) -> list[tuple[int | None, list[int]]]:
    """Memory nodes grouped fastest first, as (memory tier id or None, nodes)."""
    mem = [n for n in topo.nodes if n.has_memory and n.mem_total_bytes > 0]
    if topo.memory_tiers:
        groups = []
        for tier_id, node_ids in topo.memory_tiers.items():
            members = [n.id for n in mem if n.id in node_ids]
            if members:
                groups.append((tier_id, members))
        # A memory node the kernel lists in no tier (should not happen): last, on its own.
        listed = {n for _, members in groups for n in members}
        groups += [(None, [n.id]) for n in mem if n.id not in listed]
        return groups
    dram = [n.id for n in mem if n.has_cpu]
    by_distance: dict[int, list[int]] = {}
    for n in mem:
        if not n.has_cpu:
            d = topo.distance_to_cpu(n.id)
            by_distance.setdefault(d if d is not None else 255, []).append(n.id)
    return ([(None, dram)] if dram else []) + [(None, by_distance[d]) for d in sorted(by_distance)]


def _memory_tiers(topo: Topology, first_rank: int) -> list[Tier]:
    groups = _memory_groups(topo)
    has_cpu = {n.id for n in topo.nodes if n.has_cpu}
    dram_at = next((i for i, (_, members) in enumerate(groups) if has_cpu & set(members)), 0)
    tiers = []
    for i, (tier_id, members) in enumerate(groups):
        nodes = [topo.node(n) for n in members]
        if i == dram_at:
            kind, name = "dram", "dram"
        elif i < dram_at:
            kind, name = "dram", f"dram-tier{tier_id}" if tier_id is not None else f"dram{i}"
        else:
            kind, name = "cxl", f"cxl{i - dram_at - 1}"
        dists = [topo.distance_to_cpu(n) for n in members]
        tiers.append(Tier(
            name=name, kind=kind, rank=first_rank + i,
            capacity_bytes=sum(n.mem_total_bytes for n in nodes),
            free_bytes=sum(n.mem_free_bytes for n in nodes),
            nodes=list(members), memory_tier=tier_id,
            details={"cpu_nodes": [n.id for n in nodes if n.has_cpu],
                     "cpuless_nodes": [n.id for n in nodes if not n.has_cpu],
                     "max_distance_to_cpu": max((d for d in dists if d is not None), default=None)}))
    return tiers


# ---- NVMe directories ----------------------------------------------------------------------------

def _unescape_mount(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def find_mount(path: str, proc_root: str = "/proc") -> dict | None:
    """The mount holding `path` (longest mount-point prefix in mountinfo), or None if unreadable."""
    text = _read(os.path.join(proc_root, "self/mountinfo"))
    if text is None:
        return None
    real = os.path.realpath(path)
    best = None
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
            mount_point = _unescape_mount(fields[4])
            fs_type, source = fields[sep + 1], _unescape_mount(fields[sep + 2])
        except (ValueError, IndexError):
            continue
        prefix = mount_point.rstrip("/") + "/"
        if real == mount_point or real.startswith(prefix) or mount_point == "/":
            # Later lines for the same mount point are mounts on top: >= lets them win.
            if best is None or len(mount_point) >= len(best["mount_point"]):
                best = {"mount_point": mount_point, "fs_type": fs_type, "source": source,
                        "dev": fields[2]}
    return best


def _rotational(dev: str, sysfs_root: str) -> bool | None:
    """Whether the block device major:minor spins; None when there is no block device to ask."""
    base = os.path.join(sysfs_root, "dev/block", dev)
    for queue in (os.path.join(base, "queue"), os.path.join(base, "..", "queue")):  # disk, partition
        value = _read(os.path.join(queue, "rotational"))
        if value in ("0", "1"):
            return value == "1"
    return None


def _try_o_direct(directory: str) -> tuple[bool | None, str | None]:
    """Open, write one aligned block and remove a temp file with O_DIRECT; (works, why not)."""
    path = os.path.join(directory, f".kvtier-odirect-{os.getpid()}-{os.urandom(4).hex()}")
    # Create first, then reopen with O_DIRECT: a filesystem that refuses O_DIRECT (tmpfs before
    # 6.6) fails open(O_CREAT|O_DIRECT) only after creating the file.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        return None, f"cannot create a file there: {e.strerror}"
    try:
        try:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError as e:
            return False, f"open(O_DIRECT): {e.strerror}"
        buf = mmap.mmap(-1, _ODIRECT_BLOCK)     # page-aligned, as O_DIRECT wants
        try:
            os.write(fd, buf)
        except OSError as e:
            return False, f"write(O_DIRECT): {e.strerror}"
        finally:
            buf.close()
            os.close(fd)
        return True, None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def nvme_tier(path: str, name: str, rank: int, sysfs_root: str = "/sys",
              proc_root: str = "/proc") -> Tier:
    """A configured directory as an nvme tier; InputError if it is missing or not a directory."""
    if not os.path.exists(path):
        raise InputError(f"NVMe directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise InputError(f"NVMe directory {path!r} is not a directory")
    st = os.statvfs(path)
    mount = find_mount(path, proc_root) or {}
    works, why = _try_o_direct(path)
    details = {"fs_type": mount.get("fs_type"), "mount_point": mount.get("mount_point"),
               "source": mount.get("source"),
               "rotational": _rotational(mount["dev"], sysfs_root) if "dev" in mount else None,
               "o_direct": works}
    if why:
        details["o_direct_error"] = why
    return Tier(name=name, kind="nvme", rank=rank, capacity_bytes=st.f_blocks * st.f_frsize,
                free_bytes=st.f_bavail * st.f_frsize, paths=[os.path.abspath(path)], details=details)


# ---- everything ----------------------------------------------------------------------------------

def _gpu_tiers(report) -> list[Tier]:
    return [Tier(name=f"gpu{g.index}", kind="hbm", rank=0, capacity_bytes=g.total_bytes,
                 free_bytes=g.free_bytes, paths=[f"cuda:{g.index}"], details={"device_name": g.name})
            for g in report.gpus]


def survey(nvme_dirs=(), sysfs_root: str = "/sys", proc_root: str = "/proc", gpus=None) -> Survey:
    """Tiers, node topology and GPU report. `gpus`: a GpuReport to use instead of asking the driver."""
    if gpus is None:
        from kvtier.cuda.discover import discover_gpus   # lazy: cuda-python is slow to import
        gpus = discover_gpus()
    topo = read_topology(sysfs_root, proc_root)
    tiers = _gpu_tiers(gpus)
    tiers += _memory_tiers(topo, first_rank=1 if tiers else 0)
    nvme_rank = max((t.rank for t in tiers), default=-1) + 1
    tiers += [nvme_tier(p, f"nvme{i}", nvme_rank, sysfs_root, proc_root)
              for i, p in enumerate(nvme_dirs)]
    return Survey(sorted(tiers, key=lambda t: t.rank), topo, gpus)


def discover(nvme_dirs=(), sysfs_root: str = "/sys", proc_root: str = "/proc", gpus=None) -> list[Tier]:
    """The tiers of this machine sorted by rank (0 = fastest); see the module docstring for the rules."""
    return survey(nvme_dirs, sysfs_root, proc_root, gpus).tiers
