"""kvtier's eBPF probes (bpf/kvheat.bpf.c) from Python: load them with bcc and read their maps.

The one place that imports bcc: Debian's python3-bpfcc is built for Debian's python, so when `import bcc`
fails the package is loaded from /usr/lib/python3/dist-packages/bcc alone (nothing else from that directory
joins sys.path). bcc compiles the program against /lib/modules/$(uname -r)/build, so it runs where kernel
headers exist (the test guest; not the CI host) and needs root or CAP_BPF + CAP_PERFMON.

    p = Probes(heat_pages=True)           # kvtier.ko's tracepoints when it is loaded, generic probes always
    p.add_range(pid, addr, length, 2 << 20)   # anonymous KV memory of an engine: faults, NUMA hinting faults
    ...
    for e in p.read_heat():               # and clear: counts since the last read
        print(e.region, e.block, e.count)
    p.histograms()                        # {(kind, src, dst): {"latency_us": {slot: n}, "bytes": {...}}}
    p.close()

Pure helpers (log2 histogram percentiles and rendering, the decayed heat tracker) need no bcc.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

BCC_DIST = "/usr/lib/python3/dist-packages"
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
PAGE_SHIFT = 12
KIND_NAMES = {0: "kvtier", 1: "kernel"}
# effective capabilities that let a process load BPF and attach it to tracepoints/kprobes
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


class ProbesUnavailable(Exception):
    """Why the probes cannot run here (no bcc, no privileges, no kernel headers, compile failure)."""


def bpf_dir() -> Path:
    """Where kvheat.bpf.c and kvheat.h live: $KVTIER_BPF_DIR, the source tree's bpf/, or share/kvtier/bpf."""
    env = os.environ.get("KVTIER_BPF_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "bpf", Path(sys.prefix) / "share" / "kvtier" / "bpf",
                   Path("/usr/share/kvtier/bpf"), Path("/usr/local/share/kvtier/bpf")]
    for c in candidates:
        if (c / "kvheat.bpf.c").is_file():
            return c
    raise ProbesUnavailable(f"bpf/kvheat.bpf.c not found (looked in {', '.join(map(str, candidates))})")


def header_constants(path: str | Path | None = None) -> dict[str, int]:
    """The KVHEAT_* integer constants of kvheat.h (defined once, there), without the prefix."""
    text = Path(path or bpf_dir() / "kvheat.h").read_text()
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"^#define\s+KVHEAT_(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text, re.M)}


def import_bcc():
    """bcc's Python package, or ProbesUnavailable saying how to get it."""
    try:
        import bcc   # noqa: F401  (Debian's python, or a venv with system site-packages)
        return sys.modules["bcc"]
    except ImportError:
        pass
    init = Path(BCC_DIST) / "bcc" / "__init__.py"
    if not init.is_file():
        raise ProbesUnavailable("bcc is not installed (Debian: apt-get install python3-bpfcc)")
    spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:   # libbcc.so missing or of another version
        del sys.modules["bcc"]
        raise ProbesUnavailable(f"bcc from {init.parent} does not import: {e}") from None
    return mod


def privilege_problem() -> str:
    """'' when this process may load BPF programs, else why not."""
    if os.geteuid() == 0:
        return ""
    try:
        with open("/proc/self/status") as f:
            caps = int(next(line.split()[1] for line in f if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        caps = 0
    if caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1):
        return ""
    return "not privileged (needs root, or CAP_BPF and CAP_PERFMON)"


def tracefs() -> str | None:
    for t in TRACEFS:
        if os.path.isdir(os.path.join(t, "events")):
            return t
    return None


def kvtier_tracepoints() -> bool:
    """Whether kvtier.ko's tracepoints (with the migration's from_node/duration_ns) exist right now."""
    t = tracefs()
    if t is None:
        return False
    try:
        return "duration_ns" in Path(t, "events/kvtier/kvtier_migrate/format").read_text()
    except OSError:
        return False


def page_node_bits() -> tuple[int, int] | None:
    """(NODES_PGSHIFT, NODES_MASK) of this kernel's page->flags, from its config, or None where the layout
    is not the simple one: with SPARSEMEM_VMEMMAP the node field sits at the top of the word."""
    rel = os.uname().release
    text = ""
    for path in (f"/boot/config-{rel}", f"/lib/modules/{rel}/build/.config"):
        try:
            text = Path(path).read_text()
            break
        except OSError:
            continue
    conf = dict(re.findall(r"^(CONFIG_\w+)=(\S+)", text, re.M))
    if conf.get("CONFIG_SPARSEMEM_VMEMMAP") != "y" or conf.get("CONFIG_64BIT") != "y":
        return None
    shift = int(conf.get("CONFIG_NODES_SHIFT", "0") or 0)
    if not 0 < shift <= 10:
        return None
    return 64 - shift, (1 << shift) - 1


# -- log2 histograms (bcc's bpf_log2l convention: slot s >= 1 holds [2^(s-1), 2^s), and 0 lands in 1) --------

def slot_bounds(slot: int) -> tuple[int, int]:
    """The values a slot holds, [low, high]."""
    if slot <= 1:
        return 0, 1
    return 1 << (slot - 1), (1 << slot) - 1


def hist_total(slots: dict[int, int]) -> int:
    return sum(slots.values())


def hist_percentile(slots: dict[int, int], q: float) -> int | None:
    """The upper bound of the slot holding the q-quantile (0 < q <= 1); None for an empty histogram."""
    total = hist_total(slots)
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for s in sorted(slots):
        seen += slots[s]
        if seen >= rank:
            return slot_bounds(s)[1]
    return slot_bounds(max(slots))[1]


def hist_lines(slots: dict[int, int], unit: str, width: int = 30) -> list[str]:
    """A bcc-style text histogram, from the lowest to the highest non-empty slot."""
    if not slots:
        return []
    peak = max(slots.values()) or 1
    lo, hi = min(slots), max(slots)
    out = [f"{unit:>21} : count     distribution"]
    for s in range(lo, hi + 1):
        n = slots.get(s, 0)
        a, b = slot_bounds(s)
        bar = "*" * round(n * width / peak)
        out.append(f"{a:>10} -> {b:<10}: {n:<9} |{bar:<{width}}|")
    return out


def hist_summary(slots: dict[int, int]) -> dict:
    return {"count": hist_total(slots), "p50": hist_percentile(slots, 0.5), "p90": hist_percentile(slots, 0.9),
            "p99": hist_percentile(slots, 0.99), "max": hist_percentile(slots, 1.0)}


# -- decayed heat ----------------------------------------------------------------------------------------

class HeatTracker:
    """Per-key access heat as an exponentially decayed count (an EMA of touches): each touch adds 1, and the
    total halves every half_life_ms. Decay is applied lazily, so untouched keys cost nothing per tick."""

    def __init__(self, half_life_ms: float):
        if half_life_ms <= 0:
            raise ValueError("half_life_ms must be > 0")
        self.half_life_ms = float(half_life_ms)
        self._h: dict = {}   # key -> [heat at t_ms, t_ms, total touches, last access ms]

    def _decay(self, heat: float, dt_ms: float) -> float:
        return heat * 0.5 ** (max(0.0, dt_ms) / self.half_life_ms)

    def add(self, key, count: int, now_ms: float) -> float:
        e = self._h.get(key)
        if e is None:
            e = self._h[key] = [0.0, now_ms, 0, now_ms]
        e[0] = self._decay(e[0], now_ms - e[1]) + count
        e[1] = now_ms
        e[2] += count
        e[3] = now_ms
        return e[0]

    def value(self, key, now_ms: float) -> float:
        e = self._h.get(key)
        return self._decay(e[0], now_ms - e[1]) if e else 0.0

    def info(self, key, now_ms: float) -> dict | None:
        e = self._h.get(key)
        if e is None:
            return None
        return {"heat": round(self._decay(e[0], now_ms - e[1]), 3), "touches": e[2],
                "last_access_ms_ago": round(now_ms - e[3], 1)}

    def top(self, n: int, now_ms: float) -> list[tuple]:
        """The n hottest (key, heat), hottest first."""
        rows = ((k, self._decay(e[0], now_ms - e[1])) for k, e in self._h.items())
        return sorted(rows, key=lambda kv: -kv[1])[:n]

    def forget(self, keep) -> int:
        """Drop keys for which keep(key) is false; returns how many went."""
        gone = [k for k in self._h if not keep(k)]
        for k in gone:
            del self._h[k]
        return len(gone)

    def __len__(self):
        return len(self._h)

    def __contains__(self, key):
        return key in self._h


# -- the probes --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeatEntry:
    region: int      # kvtier region id, or ANON_BIT | range id
    block: int
    page: int
    count: int
    writes: int
    hint_faults: int
    last_ns: int
    node: int


class Probes:
    """bpf/kvheat.bpf.c compiled and attached. kvtier=None attaches kvtier.ko's tracepoints when the module
    is loaded (the generic probes work without it); ignore_tgid leaves one process's faults out (the daemon's
    own accesses are API calls it already counts)."""

    def __init__(self, kvtier: bool | None = None, anon: bool = True, migrate: bool = True,
                 heat_pages: bool = False, heat_entries: int = 65536, max_ranges: int = 16,
                 ignore_tgid: int = 0):
        why = privilege_problem()
        if why:
            raise ProbesUnavailable(why)
        bcc = import_bcc()
        if tracefs() is None:
            raise ProbesUnavailable("tracefs is not mounted (/sys/kernel/tracing)")
        src_dir = bpf_dir()
        self.constants = header_constants(src_dir / "kvheat.h")
        self.with_kvtier = kvtier_tracepoints() if kvtier is None else kvtier
        if not 1 <= max_ranges <= 256 or not 1 <= heat_entries <= 1 << 22:
            raise ValueError("max_ranges must be 1..256 and heat_entries 1..4194304")
        self.max_ranges = max_ranges
        cflags = [f"-I{src_dir}", f"-DWITH_KVTIER={int(self.with_kvtier)}", f"-DWITH_ANON={int(anon)}",
                  f"-DWITH_MIGRATE={int(migrate)}", f"-DHEAT_PAGES={int(heat_pages)}",
                  f"-DHEAT_ENTRIES={heat_entries}", f"-DMAX_RANGES={max_ranges}",
                  f"-DIGNORE_TGID={int(ignore_tgid)}",
                  f"-DKVHEAT_PAGE_SHIFT={(os.sysconf('SC_PAGE_SIZE')).bit_length() - 1}"]
        bits = page_node_bits()
        if bits:
            cflags += [f"-DNODES_PGSHIFT={bits[0]}", f"-DNODES_MASK={bits[1]}UL"]
        try:
            self.bpf = bcc.BPF(src_file=str(src_dir / "kvheat.bpf.c").encode(), cflags=cflags)
        except Exception as e:   # compile/load errors come as plain Exceptions from bcc
            raise ProbesUnavailable(f"bcc could not load bpf/kvheat.bpf.c: {str(e).splitlines()[0]}") from None
        self.attached: list[str] = []
        self.missing: list[str] = []
        if self.with_kvtier:
            self.attached += ["kvtier:kvtier_fault", "kvtier:kvtier_migrate"]
        if anon:
            self.attached.append("exceptions:page_fault_user")
            self._kprobe("task_numa_fault", "kvheat_numa_hint")
        if migrate:
            if self._kprobe("migrate_pages", "kvheat_migrate_entry"):
                self.attached.append("migrate:mm_migrate_pages")
        self._ranges: dict[int, tuple] = {}
        self.closed = False

    def _kprobe(self, symbol: str, fn: str) -> bool:
        bcc = sys.modules["bcc"]
        if bcc.BPF.ksymname(symbol) == -1:
            self.missing.append(f"kprobe:{symbol} (no such kernel symbol)")
            return False
        try:
            self.bpf.attach_kprobe(event=symbol, fn_name=fn)
        except Exception as e:
            self.missing.append(f"kprobe:{symbol} ({e})")
            return False
        self.attached.append(f"kprobe:{symbol}")
        return True

    # -- anonymous ranges --------------------------------------------------------------------------
    def add_range(self, tgid: int, start: int, length: int, block_bytes: int, range_id: int | None = None) -> int:
        """Count faults (and NUMA hinting faults) of process tgid in [start, start+length); returns the range
        id (heat entries carry region ANON_BIT | id)."""
        if tgid <= 0 or length <= 0 or block_bytes <= 0 or start < 0:
            raise ValueError("tgid, length and block_bytes must be positive")
        free = [i for i in range(self.max_ranges) if i not in self._ranges]
        if not free:
            raise OSError(28, f"all {self.max_ranges} range slots are in use")
        slot = free[0]
        rid = slot if range_id is None else range_id
        table = self.bpf[b"ranges"]
        r = table.Leaf(tgid, rid, start, start + length, block_bytes)
        table[table.Key(slot)] = r
        self._ranges[slot] = (tgid, rid, start, length, block_bytes)
        self._set_counter(self.constants["C_RANGES"], len(self._ranges))
        return rid

    def remove_range(self, range_id: int) -> bool:
        for slot, r in list(self._ranges.items()):
            if r[1] == range_id:
                table = self.bpf[b"ranges"]
                table[table.Key(slot)] = table.Leaf()
                del self._ranges[slot]
                self._set_counter(self.constants["C_RANGES"], len(self._ranges))
                return True
        return False

    def _set_counter(self, idx: int, value: int) -> None:
        t = self.bpf[b"counters"]
        t[t.Key(idx)] = t.Leaf(value)

    # -- maps ----------------------------------------------------------------------------------------
    def read_heat(self, clear: bool = True) -> list[HeatEntry]:
        """Heat entries (counts since the last clearing read)."""
        table = self.bpf[b"heat"]
        if clear:
            try:
                items = list(table.items_lookup_and_delete_batch())
            except Exception:   # kernels before 5.6: read, then clear (a touch in between may be lost)
                items = list(table.items())
                table.clear()
        else:
            items = list(table.items())
        return [HeatEntry(k.region, k.block, k.page, v.count, v.writes, v.hint_faults, v.last_ns, v.node)
                for k, v in items]

    def region_faults(self) -> dict[int, dict]:
        return {k.value: {"faults": v.faults, "writes": v.writes, "hint_faults": v.hint_faults,
                          "first_ns": v.first_ns, "last_ns": v.last_ns}
                for k, v in self.bpf[b"region_faults"].items()}

    def histograms(self) -> dict[tuple, dict]:
        """{(kind name, src, dst): {"latency_us": {slot: count}, "bytes": {slot: count}}}; nodes -1 = unknown."""
        out: dict[tuple, dict] = {}
        any_node = self.constants["NODE_ANY"]
        for name, field in (("mig_lat_us", "latency_us"), ("mig_bytes", "bytes")):
            for k, v in self.bpf[name.encode()].items():
                key = (KIND_NAMES.get(k.kind, str(k.kind)), -1 if k.src == any_node else k.src,
                       -1 if k.dst == any_node else k.dst)
                h = out.setdefault(key, {"latency_us": {}, "bytes": {}})
                h[field][k.slot] = h[field].get(k.slot, 0) + v.value
        return out

    def counters(self) -> dict[str, int]:
        t = self.bpf[b"counters"]
        names = {v: k[2:].lower() for k, v in self.constants.items() if k.startswith("C_")}
        return {names[i]: t[t.Key(i)].value for i in sorted(names)}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.bpf.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def migration_rows(hists: dict[tuple, dict]) -> list[dict]:
    """Histograms as sorted JSON rows with percentiles."""
    rows = []
    for (kind, src, dst), h in sorted(hists.items()):
        rows.append({"kind": kind, "src_node": src, "dst_node": dst, "count": hist_total(h["latency_us"]),
                     "latency_us": hist_summary(h["latency_us"]), "bytes": hist_summary(h["bytes"]),
                     "latency_us_hist": {str(s): n for s, n in sorted(h["latency_us"].items())},
                     "bytes_hist": {str(s): n for s, n in sorted(h["bytes"].items())}})
    return rows
