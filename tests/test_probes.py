"""The eBPF probes' pure-Python side on the host: log2 histograms, decayed heat, the shared header, the
daemon's heat sampler against a fake probe reader, policies' touch(), `kvctl top` rendering, the [probes]
config, and a real daemon that runs without the probes and says so. bcc itself runs in the guest only
(tests/test_bpf_guest.py)."""
from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from cffi import FFI

from kvtier import probes
from kvtier.daemon import config, heat
from kvtier.daemon.heat import Heat, ProbesConfig
from kvtier.errors import InputError
from kvtier.policy.registry import make_policy

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096


# -- histograms and heat ------------------------------------------------------------------------------------

def test_slots_follow_bcc_log2():
    assert probes.slot_bounds(1) == (0, 1)
    assert probes.slot_bounds(13) == (4096, 8191)
    # bcc's bpf_log2l(v) is floor(log2 v) + 1: the slot of v holds v
    for v in (1, 2, 3, 4095, 4096, 1 << 20, (1 << 40) + 5):
        lo, hi = probes.slot_bounds(v.bit_length())
        assert lo <= v <= hi


def test_percentiles_are_bucket_upper_bounds():
    h = {3: 50, 5: 40, 10: 10}             # 50 in [4,7], 40 in [16,31], 10 in [512,1023]
    assert probes.hist_percentile(h, 0.5) == 7
    assert probes.hist_percentile(h, 0.51) == 31
    assert probes.hist_percentile(h, 0.9) == 31
    assert probes.hist_percentile(h, 0.99) == 1023
    assert probes.hist_percentile({}, 0.5) is None
    s = probes.hist_summary(h)
    assert s["count"] == 100 and s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    lines = probes.hist_lines(h, "usecs")
    assert len(lines) == 1 + (10 - 3 + 1) and "|" in lines[1]
    assert lines[1].split(":")[1].split()[0] == "50" and lines[4].split(":")[1].split()[0] == "0"


def test_heat_decays_by_half_life():
    t = probes.HeatTracker(half_life_ms=1000)
    t.add("a", 8, now_ms=0)
    assert t.value("a", 1000) == pytest.approx(4.0)
    assert t.add("a", 2, now_ms=2000) == pytest.approx(4.0)   # 8 halved twice + 2
    t.add("b", 5, now_ms=2000)
    assert [k for k, _ in t.top(2, 2000)] == ["b", "a"]
    info = t.info("a", 3000)
    assert info["touches"] == 10 and info["last_access_ms_ago"] == 1000 and info["heat"] == pytest.approx(2.0)
    assert t.forget(lambda k: k == "b") == 1 and "a" not in t and len(t) == 1
    with pytest.raises(ValueError):
        probes.HeatTracker(0)


def test_migration_rows():
    rows = probes.migration_rows({("kvtier", 0, 1): {"latency_us": {5: 3, 7: 1}, "bytes": {22: 4}}})
    assert rows[0]["count"] == 4 and rows[0]["latency_us"]["p50"] == 31 and rows[0]["bytes"]["max"] == (1 << 22) - 1


# -- the header shared by the BPF program and the reader ------------------------------------------------------

def _header():
    return (REPO / "bpf" / "kvheat.h").read_text()


def test_header_structs_have_no_implicit_padding():
    text = _header()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    ffi = FFI()
    ffi.cdef("typedef uint16_t __u16; typedef uint32_t __u32; typedef int32_t __s32; typedef uint64_t __u64;"
             + body)
    structs = re.findall(r"^struct (\w+) \{", text, re.M)
    assert {"kvheat_key", "kvheat_val", "kvheat_region", "kvheat_range", "kvheat_hist_key"} <= set(structs)
    for s in structs:
        t = ffi.typeof(f"struct {s}")
        assert ffi.sizeof(t) == sum(ffi.sizeof(f.type) for _, f in t.fields), f"{s} has implicit padding"
        assert ffi.sizeof(t) % 8 == 0, s


def test_constants_come_from_the_header():
    c = probes.header_constants(REPO / "bpf" / "kvheat.h")
    assert c["ANON_BIT"] == 1 << 31 and c["NODE_ANY"] == 0xFFFF
    counters = sorted(v for k, v in c.items() if k.startswith("C_"))
    assert counters == list(range(len(counters))) and len(counters) <= c["NR_COUNTERS"]


def test_program_uses_the_tracepoint_fields_the_module_defines():
    trace = (REPO / "kmod" / "kvtier_trace.h").read_text()
    prog = (REPO / "bpf" / "kvheat.bpf.c").read_text()
    for event in ("kvtier_fault", "kvtier_migrate"):
        body = trace[trace.index(f"TRACE_EVENT({event},"):]
        fields = set(re.findall(r"__field\(\w+, (\w+)\)", body[:body.index("TP_fast_assign")]))
        probe = prog[prog.index(f"TRACEPOINT_PROBE(kvtier, {event})"):]
        used = set(re.findall(r"args->(\w+)", probe[:probe.index("\n}")]))
        assert used and used <= fields, (event, used - fields)


def test_bcc_missing_is_a_clear_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(probes, "BCC_DIST", str(tmp_path))
    import sys
    monkeypatch.setitem(sys.modules, "bcc", None)   # `import bcc` fails
    with pytest.raises(probes.ProbesUnavailable, match="python3-bpfcc"):
        probes.import_bcc()


# -- policies -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lru", "arc", "lfu", "s3fifo", "kvtier"])
def test_touch_protects_a_resident_block_and_admits_nothing(name):
    from kvtier.policy.model import Request
    p = make_policy(name, 4)
    req = Request(0, 0.0, 4 * 512, 10, [1, 2, 3, 4], session_id=1)
    p.begin_request(req)
    p.end_request(req, [False] * 4)
    assert len(p) == 4
    p.touch(99, 5, 0.0)             # not resident: never admitted by a touch
    assert not p.contains(99) and len(p) == 4
    p.touch(1, 3, 0.0)
    if name == "s3fifo":   # a touch sets the frequency bits a hit would (reinsertion, not reordering)
        assert p.explain(1)["freq"] == 3 and p.explain(2)["freq"] == 0
        return
    victims = [p.pop_victim() for _ in range(3)]
    assert 1 not in victims, (name, victims)


def test_fifo_and_default_touch_change_nothing():
    p = make_policy("fifo", 3)
    for b in (1, 2, 3):
        p.offer(b, None, 0, False)
    p.touch(1, 10, 0.0)
    assert p.pop_victim() == 1


# -- the daemon's heat sampler ------------------------------------------------------------------------------

class FakeProbes:
    """Stands in for kvtier.probes.Probes at the hardware boundary: heat entries handed in by the test."""

    def __init__(self, max_ranges=16):
        self.max_ranges = max_ranges
        self.constants = probes.header_constants(REPO / "bpf" / "kvheat.h")
        self.entries = []
        self.attached, self.missing, self.with_kvtier = ["kvtier:kvtier_fault"], [], True
        self.ranges = {}
        self.closed = False

    def read_heat(self, clear=True):
        out, self.entries = self.entries, [] if clear else self.entries
        return out

    def histograms(self):
        return {("kvtier", 0, 1): {"latency_us": {6: 2}, "bytes": {22: 2}}}

    def region_faults(self):
        return {7: {"faults": 10, "writes": 0, "hint_faults": 0, "first_ns": 0, "last_ns": 0}}

    def add_range(self, tgid, start, length, block_bytes, range_id=None):
        if len(self.ranges) >= self.max_ranges:   # as Probes.add_range: the BPF map's slots are all taken
            raise OSError(errno.ENOSPC, f"all {self.max_ranges} range slots are in use")
        self.ranges[range_id] = (tgid, start, length, block_bytes)
        return range_id

    def remove_range(self, rid):
        return self.ranges.pop(rid, None) is not None

    def close(self):
        self.closed = True


class FakeDevice:
    def __init__(self):
        self.resets = []

    def access_reset(self, region_id):
        self.resets.append(region_id)

    def close(self):
        pass


def fake_engine():
    """Two blocks in arena 0 of a kvtier.ko-backed tier (region 7), an LRU policy over them."""
    from kvtier.store.base import Slot
    from kvtier.store.memory import KMOD_BLOCK_BYTES

    blocks = {}
    slots = {}
    for i, (off, n) in enumerate([(0, 64 << 10), (KMOD_BLOCK_BYTES + 8192, 16 << 10)]):
        key = bytes([i + 1]) * 16
        blocks[key] = SimpleNamespace(key=key, bid=i + 1, tier=0, pins=0, out_of_policy=False, sessions={1},
                                      tenant="acme", hits=0)
        slots[key] = Slot(0, off, n)
    tier = SimpleNamespace(name="dram0", arenas=lambda: [{"kind": "kvtier", "region_id": 7, "size": 4 << 20}],
                           locate=lambda k: slots[k])
    policy = make_policy("lru", 8)
    for b in blocks.values():
        policy.offer(b.bid, None, 0, False)
    eng = SimpleNamespace(tiers=[tier], mem_count=1, blocks=blocks, policies=[policy],
                          sessions={1: SimpleNamespace(name="s", tenant="acme", state="decoding", blocks=set(blocks))})
    return eng, blocks


def test_sampler_maps_faults_to_blocks_feeds_the_policy_and_resets():
    from kvtier.store.memory import KMOD_BLOCK_BYTES

    eng, blocks = fake_engine()
    k1, k2 = list(blocks)
    fake, dev = FakeProbes(), FakeDevice()
    h = Heat(eng, ProbesConfig(interval_ms=100), loader=lambda: fake, device=dev)
    h.start(background=False)
    assert h.state == "on" and h.status()["loaded"]
    E = probes.HeatEntry
    pages_per_kmod_block = KMOD_BLOCK_BYTES // PAGE
    fake.entries = [E(7, 0, 3, 2, 2, 0, 1, 0),                       # block 1's 4th page, twice
                    E(7, 1, 2, 5, 0, 0, 1, 0),                       # 2 MiB + 8 KiB: block 2's first page
                    E(7, 0, pages_per_kmod_block - 1, 4, 0, 0, 1, 0),  # free space at the end: nobody's
                    E(9, 0, 0, 1, 0, 0, 1, 0)]                       # a region that is not ours
    assert eng.policies[0].pop_victim() == 1 and eng.policies[0].offer(1, None, 0, False) == []   # 1 is MRU now
    assert h.tick(now=10.0) == 7
    assert h.block_info(k1, now=10.0)["touches"] == 2 and h.block_info(k2, now=10.0)["touches"] == 5
    assert h.unmapped == 5 and dev.resets == [7]
    assert eng.policies[0].pop_victim() == 1   # block 2 was touched after 1: 1 is the LRU victim again
    assert h.tick(now=10.05) == 0               # within the interval: nothing read
    top = h.top(5, now=10.1)
    assert top["ranked_by"] == "heat" and top["blocks"][0]["block"] == k2.hex()
    assert top["migrations"][0]["count"] == 2 and top["sessions"][0]["session"] == 1
    h.close()
    assert fake.closed


def test_sampler_counts_registered_anonymous_ranges():
    eng, blocks = fake_engine()
    k1, k2 = list(blocks)
    fake = FakeProbes()
    h = Heat(eng, ProbesConfig(), loader=lambda: fake, device=FakeDevice())
    rid = h.register_range(4242, 0x7F0000000000, 8 * PAGE, 4 * PAGE, [k2, None])["range"]  # before loading
    h.start(background=False)
    assert fake.ranges[rid] == (4242, 0x7F0000000000, 8 * PAGE, 4 * PAGE)
    anon = fake.constants["ANON_BIT"]
    fake.entries = [probes.HeatEntry(anon | rid, 0, 1, 3, 0, 1, 1, -1),
                    probes.HeatEntry(anon | rid, 1, 0, 1, 0, 0, 1, -1)]
    assert h.tick(now=5.0) == 3 and h.block_info(k2, now=5.0)["touches"] == 3 and h.unmapped == 1
    with pytest.raises(OSError):
        h.register_range(1, 0x1000, PAGE, 100, [])
    assert h.unregister_range(rid) and rid not in fake.ranges


def test_a_process_holds_at_most_max_ranges_per_process():
    # ranges live until their process exits: one that registers in a loop must not grow the daemon for ever
    eng, _ = fake_engine()
    h = Heat(eng, ProbesConfig(), loader=lambda: FakeProbes(), device=FakeDevice())
    rids = [h.register_range(4242, 0x7F0000000000 + i * PAGE, PAGE, PAGE, [])["range"]
            for i in range(heat.MAX_RANGES_PER_PROCESS)]
    with pytest.raises(OSError) as e:
        h.register_range(4242, 0x1000, PAGE, PAGE, [])
    assert e.value.errno == errno.EDQUOT
    assert h.register_range(4343, 0x1000, PAGE, PAGE, [])   # another process has its own
    assert h.unregister_range(rids[0])
    assert h.register_range(4242, 0x1000, PAGE, PAGE, [])   # one unregistered frees a place


def test_probe_slots_are_shared_fairly_between_processes():
    # one engine that registers ranges in a loop must not leave another's uncounted
    eng, _ = fake_engine()
    fake = FakeProbes(max_ranges=4)
    h = Heat(eng, ProbesConfig(), loader=lambda: fake, device=FakeDevice())
    greedy = [h.register_range(100, 0x7F0000000000 + i * PAGE, PAGE, PAGE, []) for i in range(3)]   # before loading
    h.start(background=False)
    greedy += [h.register_range(100, 0x7F0000100000 + i * PAGE, PAGE, PAGE, []) for i in range(3)]
    assert [h.ranges[g["range"]]["attached"] for g in greedy] == [True] * 4 + [False] * 2   # the slots are full
    owners = lambda: sorted(t[0] for t in fake.ranges.values())   # noqa: E731
    assert owners() == [100] * 4 and h.status()["ranges_counted"] == 4 and h.status()["ranges"] == 6
    a = h.register_range(200, 0x1000, PAGE, PAGE, [])
    b = h.register_range(300, 0x1000, PAGE, PAGE, [])
    assert a["counted"] and b["counted"] and owners() == [100, 100, 200, 300]   # each took one of 100's
    assert not h.register_range(200, 0x2000, PAGE, PAGE, [])["counted"]   # 2 against 200's 1: no more to take
    assert h.unregister_range(a["range"])   # its slot goes to the waiting range of the process with fewest (200)
    assert owners() == [100, 100, 200, 300]
    assert h.unregister_range(b["range"])   # only 100 has ranges waiting now: its oldest is counted again
    assert owners() == [100, 100, 100, 200] and fake.ranges.keys() >= {greedy[2]["range"]}
    from kvtier.cli.status import probes_line
    assert "3 registered ranges wait for a probe slot" in probes_line(h.status())


def test_sampler_without_probes_says_why():
    eng, _ = fake_engine()

    def unavailable():
        raise probes.ProbesUnavailable("bcc is not installed (Debian: apt-get install python3-bpfcc)")
    h = Heat(eng, ProbesConfig(), loader=unavailable)
    h.start(background=False)
    st = h.status()
    assert not st["loaded"] and st["state"] == "unavailable" and "python3-bpfcc" in st["note"]
    assert h.tick(now=100.0) == 0 and h.top(5)["ranked_by"] == "hits"
    off = Heat(eng, ProbesConfig(enabled="off"), loader=unavailable)
    off.start(background=False)
    assert off.status()["state"] == "off" and "enabled = false" in off.status()["note"]


# -- config ----------------------------------------------------------------------------------------------

def test_probes_config_is_validated():
    c = config.from_dict({"probes": {"enabled": False, "interval_ms": 250, "half_life_ms": 5000,
                                     "sample": False}}, "t.toml")
    assert (c.probes.enabled, c.probes.interval_ms, c.probes.half_life_ms, c.probes.sample) == \
        ("off", 250, 5000, False)
    assert config.from_dict({}, "t.toml").probes.enabled == "auto"
    for bad, msg in (({"x": 1}, "probes.x: unknown key"), ({"interval_ms": 10}, "probes.interval_ms"),
                     ({"interval_ms": "1s"}, "probes.interval_ms"), ({"enabled": "yes"}, "probes.enabled"),
                     ({"sample": 1}, "probes.sample")):
        with pytest.raises(InputError, match=msg):
            config.from_dict({"probes": bad}, "t.toml")
    with pytest.raises(InputError, match="probes: expected a table"):
        config.from_dict({"probes": 5}, "t.toml")


# -- kvctl top ------------------------------------------------------------------------------------------

SNAP = {"time": 1000.0, "ranked_by": "heat", "probes": {"loaded": True, "touches": 12, "samples": 3, "note": ""},
        "tiers": [{"name": "dram0", "kind": "dram", "used_bytes": 1 << 20, "capacity_bytes": 4 << 20, "blocks": 2,
                   "hits": 5}],
        "counters": {"puts": 10, "gets": 4, "misses": 0, "demotions": 1, "promotions": 0, "prefetches": 0,
                     "bytes_moved": 0},
        "sessions": [{"session": 3, "name": "chat", "tenant": "acme", "state": "decoding", "blocks": 2, "heat": 7.5}],
        "blocks": [{"block": "ab" * 16, "tier": "dram0", "heat": 7.5, "touches": 12, "last_access_ms_ago": 40.0,
                    "hits": 1, "sessions": [3]}],
        "migrations": probes.migration_rows({("kernel", 0, 1): {"latency_us": {8: 4}, "bytes": {16: 4}}}),
        "regions": [{"region": 7, "tier": "dram0", "faults_per_s": 3.0}]}


def test_top_renders_every_section_and_rates():
    from kvtier.cli import top
    prev = json.loads(json.dumps(SNAP))
    prev["time"], prev["counters"]["puts"] = 998.0, 4
    text = top.render(SNAP, prev)
    for needle in ("probes: on (12 direct touches", "puts 3.0", "dram0", "hottest sessions (by heat)", "chat",
                   "hottest blocks (by heat)", "abababababababab", "kernel", "<=255", "<=64 KiB", "FAULTS/s"):
        assert needle in text, needle
    assert top.rates(SNAP, None) == {}


# -- a real daemon without the probes ---------------------------------------------------------------------------

def test_daemon_runs_without_probes_and_says_so():
    from daemon_proc import KVCTL, Daemon, block_bytes, short_dir, wait_for, write_config
    from kvtier.client import Client

    d_dir = short_dir()
    d = Daemon(d_dir, write_config(d_dir, extra="[probes]\ninterval_ms = 100\n")).start()
    try:
        assert wait_for(lambda: d.stats()["probes"]["state"] != "loading", timeout_s=60)
        st = d.stats()["probes"]
        if st["loaded"]:
            pytest.skip("the probes loaded on this machine (a kernel with headers and bcc)")
        assert st["state"] == "unavailable" and st["note"]
        with Client(d.socket, "acme") as kv:
            sid = kv.register_session("chat")
            kv.put(sid, [(i, "history", block_bytes(i, 16 << 10)) for i in range(4)])
            kv.get(sid, [2, 2, 3])
        out = subprocess.run([KVCTL, "status", "--socket", d.socket], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "API signals only" in out.stdout, out.stdout + out.stderr
        out = subprocess.run([KVCTL, "top", "--once", "--json", "--socket", d.socket], capture_output=True,
                             text=True, timeout=30)
        snap = json.loads(out.stdout)
        assert snap["ranked_by"] == "hits" and snap["blocks"][0]["hits"] == 2 and not snap["probes"]["loaded"]
        out = subprocess.run([KVCTL, "top", "--count", "2", "--interval", "0.2", "--socket", d.socket],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.count("hottest blocks (by hits)") == 2
        bad = subprocess.run([KVCTL, "top", "--interval", "0", "--socket", d.socket], capture_output=True,
                             text=True, timeout=30)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
        expl = json.loads(subprocess.run([KVCTL, "blocks", "--json", "--socket", d.socket], capture_output=True,
                                         text=True, timeout=30).stdout)
        assert all(b["heat"] == 0.0 for b in expl["blocks"])
    finally:
        d.stop()
        shutil.rmtree(d_dir, ignore_errors=True)


def test_kvheat_tool_help_and_bad_input():
    out = subprocess.run([str(REPO / "bpf" / "kvheat.py"), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "examples:" in out.stdout and "-R 0x7f0000000000:1G:2M" in out.stdout
    for args in (["0"], ["-R", "0x1000:4096"], ["-p", "1", "-R", "0x1000:4096:100"]):
        bad = subprocess.run([str(REPO / "bpf" / "kvheat.py"), *args], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "kvheat: error:" in bad.stderr, args
