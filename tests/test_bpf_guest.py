"""eBPF probes (bpf/kvheat.bpf.c through kvtier.probes) in the guest kernel: block access counts, migration
histograms, anonymous ranges, load/detach cycles without leaks, the generic probes without kvtier.ko, and the
daemon's policy seeing heat from direct memory access.

bcc compiles each load for 5-40 s under TCG; every test that loads the probes runs in a forked child (in_child).
"""
from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import shutil
import subprocess
import time
import traceback
from pathlib import Path

import pytest

from kvtier import kmod, numa, probes

PAGE = os.sysconf("SC_PAGE_SIZE")
REPO = Path(__file__).resolve().parents[1]
CYCLES = int(os.environ.get("KVTIER_BPF_CYCLES", "3"))

pytestmark = pytest.mark.guest("tiered")   # two nodes, the lower one CXL-like; one boot is enough


def in_child(fn):
    """Run the test body in a forked child: bcc maps LLVM and reads the kernel headers into this process,
    which would stay resident here and upset the session fixture that compares MemFree before and after
    kvtier.ko's life. The child's traceback (or skip) comes back through a pipe."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                fn(*args, **kwargs)
                msg = b""
            except pytest.skip.Exception as e:
                msg = b"SKIP:" + str(e).encode()
            except BaseException:
                msg, code = traceback.format_exc().encode(), 1
            with os.fdopen(w, "wb") as f:
                f.write(msg)
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read()
        _, status = os.waitpid(pid, 0)
        if msg.startswith(b"SKIP:"):
            pytest.skip(msg[5:].decode())
        assert status == 0 and not msg, msg.decode() or f"child exited with status {status:#x}"
    return wrapper


@pytest.fixture(scope="module", autouse=True)
def give_back_bcc_memory():
    """bcc reads thousands of kernel headers and maps LLVM (page cache, heap): give that back after this
    module, so the session's kvtier_module fixture, which compares MemFree before and after, sees only the
    module's own pages."""
    yield
    import gc
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    subprocess.run(["sync"], check=False)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def memory_nodes() -> list[int]:
    nodes = []
    for part in open("/sys/devices/system/node/has_memory").read().strip().split(","):
        lo, _, hi = part.partition("-")
        nodes.extend(range(int(lo), int(hi or lo) + 1))
    return nodes


def heat_by_block(entries, region) -> dict[int, int]:
    out: dict[int, int] = {}
    for e in entries:
        if e.region == region:
            out[e.block] = out.get(e.block, 0) + e.count
    return out


def bpf_fds() -> dict[str, int]:
    """This process's BPF program, map and perf-event fds (attached probes hold one each)."""
    out = {"bpf-prog": 0, "bpf-map": 0, "perf_event": 0}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        for k in out:
            if k in target:
                out[k] += 1
    return out


@in_child
def test_generic_probes_without_kvtier_module(kvtier_module):
    """With kvtier.ko unloaded the probes load without its tracepoints and still count anonymous-range faults
    and kernel migrations; the module is loaded again afterwards for the other tests (so this runs before
    any program attached to the module's tracepoints would pin it)."""
    if int(Path("/sys/kernel/kvtier/regions").read_text()) != 0:
        pytest.skip("kvtier.ko has regions: cannot unload it here")
    if subprocess.run(["rmmod", "kvtier"], check=False).returncode != 0:
        pytest.skip("kvtier.ko is in use: cannot unload it here")
    try:
        assert not probes.kvtier_tracepoints()
        with probes.Probes() as p:
            assert not p.with_kvtier and not any(a.startswith("kvtier:") for a in p.attached)
            m = mmap.mmap(-1, 4 * PAGE)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            p.add_range(os.getpid(), addr, 4 * PAGE, 2 * PAGE, range_id=3)
            m[0] = m[3 * PAGE] = 1
            assert heat_by_block(p.read_heat(), p.constants["ANON_BIT"] | 3) == {0: 1, 1: 1}
            far = memory_nodes()[-1]
            assert numa.move_pages([addr, addr + 3 * PAGE], [far, far]) == [far, far]
            assert any(k[0] == "kernel" and k[2] == far for k in p.histograms())
            m.close()
    finally:
        subprocess.run(["insmod", str(REPO / "kmod" / "kvtier.ko")], check=True)
        for _ in range(100):
            if os.path.exists("/dev/kvtier"):
                break
            time.sleep(0.05)


@in_child
def test_touched_blocks_are_counted(kvtier_dev):
    """Touch a known set of blocks (first touches, then three sampled rounds): the heat map reports exactly
    those counts, per block, and nothing for blocks never touched."""
    loaded = probes.Probes(heat_pages=False)
    for tp in ("kvtier:kvtier_fault", "kvtier:kvtier_migrate", "exceptions:page_fault_user",
               "kprobe:migrate_pages", "migrate:mm_migrate_pages"):
        assert tp in loaded.attached
    region = kvtier_dev.create_region(16 * 2 * PAGE, 2 * PAGE, node=0)
    buf = kvtier_dev.mmap(region)
    try:
        loaded.read_heat()   # start from an empty map
        buf[1 * 2 * PAGE] = 1
        buf[1 * 2 * PAGE + PAGE] = 1   # block 1: both pages
        for b in (4, 5, 9):
            buf[b * 2 * PAGE] = 1
        assert heat_by_block(loaded.read_heat(), region.id) == {1: 2, 4: 1, 5: 1, 9: 1}
        buf[4 * 2 * PAGE] = 2          # mapped now: no fault, no count
        assert heat_by_block(loaded.read_heat(), region.id) == {}
        for _ in range(3):             # sampling: reset, then one touch each of blocks 4 and 9
            kvtier_dev.access_reset(region.id)
            _ = buf[4 * 2 * PAGE]
            buf[9 * 2 * PAGE] = 3
        entries = [e for e in loaded.read_heat() if e.region == region.id]
        assert heat_by_block(entries, region.id) == {4: 3, 9: 3}
        writes = {e.block: e.writes for e in entries}
        assert writes[9] >= 1 and writes[4] == 0, writes   # block 4 was only read after its first write
        assert all(e.node == 0 and e.last_ns > 0 for e in entries)
        faults = loaded.region_faults()[region.id]
        assert faults["faults"] == 2 + 1 + 1 + 1 + 6
    finally:
        buf.close()
        kvtier_dev.release(region.id)


@in_child
def test_migrations_fill_histograms_per_node_pair(kvtier_dev):
    """kvtier.ko migrating 3 populated blocks 0 -> far node (2 empty ones do not count), one back, and
    move_pages(2) of anonymous pages: the histograms count exactly those, per (kind, src, dst)."""
    far = memory_nodes()[-1]
    assert far != 0
    loaded = probes.Probes(anon=False)
    before = loaded.histograms()
    region = kvtier_dev.create_region(8 * 2 * PAGE, 2 * PAGE, node=0)
    buf = kvtier_dev.mmap(region)
    try:
        for b in (0, 1, 3):
            buf[b * 2 * PAGE] = 1            # one page each: 4 KiB blocks moved
        assert kvtier_dev.migrate(region.id, 0, 5, far) == (3 * PAGE, 3)
        assert kvtier_dev.migrate(region.id, 1, 1, 0) == (PAGE, 1)
    finally:
        buf.close()
        kvtier_dev.release(region.id)
    anon = mmap.mmap(-1, 8 * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(anon))
    for i in range(8):
        anon[i * PAGE] = 1
    assert numa.move_pages([addr + i * PAGE for i in range(8)], [far] * 8) == [far] * 8
    after = loaded.histograms()

    def delta(key, field):
        a = after.get(key, {}).get(field, {})
        b = before.get(key, {}).get(field, {})
        return {s: n - b.get(s, 0) for s, n in a.items() if n - b.get(s, 0)}

    out_lat = delta(("kvtier", 0, far), "latency_us")
    assert sum(out_lat.values()) == 3
    page_slot = PAGE.bit_length()        # bcc's log2 slot of PAGE bytes: [2^(s-1), 2^s)
    assert delta(("kvtier", 0, far), "bytes") == {page_slot: 3}
    assert sum(delta(("kvtier", far, 0), "latency_us").values()) == 1
    kernel = delta(("kernel", 0, far), "bytes")
    assert sum(kernel.values()) >= 1 and (8 * PAGE).bit_length() in kernel, after
    rows = probes.migration_rows(after)
    row = next(r for r in rows if (r["kind"], r["src_node"], r["dst_node"]) == ("kvtier", 0, far))
    assert row["latency_us"]["p50"] is not None and row["latency_us"]["p50"] <= row["latency_us"]["max"]
    anon.close()


@in_child
def test_anonymous_range_faults(kvtier_module):
    """Faults in a registered range of this process count per block and page; outside it, or after the
    range is removed, they do not."""
    size = 16 * PAGE
    loaded = probes.Probes(migrate=False)
    m = mmap.mmap(-1, size + 4 * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    rid = loaded.add_range(os.getpid(), addr, size, 4 * PAGE, range_id=77)
    try:
        loaded.read_heat()
        for i in (0, 1, 5, 15):
            m[i * PAGE] = 1
        m[size + PAGE] = 1                      # past the range
        region = loaded.constants["ANON_BIT"] | 77
        got = heat_by_block(loaded.read_heat(), region)
        assert got == {0: 2, 1: 1, 3: 1}
        assert loaded.counters()["ranges"] == 1
    finally:
        assert loaded.remove_range(rid)
    m[2 * PAGE] = 1
    assert heat_by_block(loaded.read_heat(), loaded.constants["ANON_BIT"] | 77) == {}
    assert loaded.counters()["ranges"] == 0
    m.close()


@in_child
def test_load_and_detach_cycles_leak_nothing(kvtier_module):
    """Full load/close cycles: every cycle attaches and counts, and afterwards this process holds no more
    BPF or perf-event fds than before and tracefs lists no leftover kprobe."""
    base = bpf_fds()
    tracing = probes.tracefs()
    for i in range(CYCLES):
        with probes.Probes(heat_pages=True) as p:
            assert "kprobe:migrate_pages" in p.attached
            during = bpf_fds()
            assert during["bpf-prog"] > base["bpf-prog"] and during["perf_event"] > base["perf_event"]
            m = mmap.mmap(-1, 4 * PAGE)
            p.add_range(os.getpid(), ctypes.addressof(ctypes.c_char.from_buffer(m)), 4 * PAGE, PAGE)
            m[0] = 1
            assert p.counters()["anon_faults"] == 1, f"cycle {i}"
            m.close()
        assert bpf_fds() == base, f"cycle {i}: fds left behind"
    kprobes = Path(tracing, "kprobe_events").read_text()
    assert "migrate_pages" not in kprobes and "task_numa_fault" not in kprobes, kprobes


def test_daemon_policy_sees_direct_access_heat(kvtier_module):
    """A real kvtierd on kvtier.ko regions with the probes on: a client writes one block's memory directly
    (no API call); `kvctl explain` shows heat for it and none for its neighbours, and the LRU policy now
    ranks it most recently used although the API last touched it third."""
    from daemon_proc import KVCTL, running_daemon, short_dir, wait_for, write_config

    from kvtier.client import Client
    from kvtier.daemon import protocol
    from kvtier.daemon.engine import derive_key

    keys = {h: derive_key(b"tenant:acme", h).hex() for h in range(6)}   # an unconfigured tenant's salt
    d_dir = short_dir()
    cfg = write_config(d_dir, dram="4MiB", cxl="4MiB", backend="kmod", nominal="64KiB", policy="lru",
                       extra="[probes]\nenabled = true\ninterval_ms = 200\nhalf_life_ms = 600000\n")
    with running_daemon(d_dir, cfg) as d:
        assert wait_for(lambda: d.stats()["probes"]["state"] != "loading", timeout_s=240, step_s=0.5)
        st = d.stats()
        assert st["probes"]["loaded"], st["probes"]
        assert st["tiers"][0]["backend"] == "kmod"

        def explain(h):
            out = subprocess.run([KVCTL, "explain", keys[h], "--json", "--socket", d.socket],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        with Client(d.socket, "acme") as kv:
            sid = kv.register_session("direct")
            kv.put(sid, [(h, "history", bytes([h]) * (64 << 10)) for h in range(6)])
            time.sleep(0.6)   # the puts' own first-touch faults are sampled and reset
            reply = kv.call("get", session=sid, blocks=[0, 1, 3, 4, 5, 2])   # API order: 2 is last
            slots = dict(zip([0, 1, 3, 4, 5, 2], reply["slots"]))
            kv._id += 1
            protocol.send(kv.sock, {"op": "release", "lease": reply["lease"]})
            kv.get(sid, [0, 1, 3, 4, 5])                                    # now 2 is the least recent
            before = {h: explain(h) for h in range(6)}
            assert before[2]["policy"]["recency_rank"] == 0
            arena, off, n = slots[2][:3]
            view = kv._view(arena, off, n)
            for round_ in range(4):       # direct writes, no API call; the daemon resets accesses in between
                for p in range(0, n, PAGE):
                    view[p] = round_
                time.sleep(0.5)
            view.release()
            after = {h: explain(h) for h in range(6)}
            # an engine's own anonymous memory, registered with the hashes of blocks 0 and 1
            anon = mmap.mmap(-1, 4 * PAGE)
            rid = kv.register_range(ctypes.addressof(ctypes.c_char.from_buffer(anon)), 4 * PAGE, 2 * PAGE, [0, 1])
            anon[2 * PAGE] = anon[3 * PAGE] = 1   # block 1's two pages
            assert wait_for(lambda: explain(1)["heat"]["touches"] >= after[1]["heat"]["touches"] + 2, timeout_s=10)
            assert explain(0)["heat"]["touches"] == after[0]["heat"]["touches"]
            kv.unregister_range(rid)
            anon.close()
    assert after[2]["heat"]["touches"] >= 4 and after[2]["heat"]["heat"] > 0, after[2]["heat"]
    assert all(after[h]["heat"]["touches"] < after[2]["heat"]["touches"] for h in (0, 1, 3, 4, 5))
    assert after[2]["policy"]["recency_rank"] == 5, after[2]["policy"]


def test_kvheat_tool_smoke():
    """bpf/kvheat.py on its own: watching a range of this process, it reports the blocks touched while it
    ran, as JSON."""
    size = 8 * PAGE
    m = mmap.mmap(-1, size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    proc = subprocess.Popen([str(REPO / ".venv/bin/python"), str(REPO / "bpf/kvheat.py"), "-j", "-p",
                             str(os.getpid()), "-R", f"{addr:#x}:{size}:{2 * PAGE}", "--no-kvtier", "2", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()   # "Tracing ..." once attached
        assert line.startswith("Tracing"), line + proc.stderr.read()
        for i in (0, 1, 6):
            m[i * PAGE] = 1
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    snap = json.loads(out.splitlines()[-1])
    got = {(b["region"], b["block"]): b["count"] for b in snap["blocks"]}
    assert got == {("anon:0", 0): 2, ("anon:0", 3): 1}, snap
    assert snap["counters"]["anon_faults"] == 3
    m.close()


def test_access_reset_keeps_pages_and_refaults(kvtier_dev):
    """KVTIER_IOC_ACCESS_RESET (no bcc needed): data and residency stay, the next touch of each page faults
    again (the region's fault counter says so), and bad ranges are refused."""
    import errno

    region = kvtier_dev.create_region(4 * 2 * PAGE, 2 * PAGE, node=0)
    buf = kvtier_dev.mmap(region)
    try:
        for i in range(8):
            buf[i * PAGE] = i + 1
        before = kvtier_dev.info(region.id)
        kvtier_dev.access_reset(region.id, 1, 2)       # blocks 1 and 2: pages 2..5
        assert [buf[i * PAGE] for i in range(8)] == list(range(1, 9))
        after = kvtier_dev.info(region.id)
        assert after["faults"] - before["faults"] == 4
        assert after["resident_bytes"] == before["resident_bytes"] == 8 * PAGE
        for first, nr in ((0, 0), (3, 2), (4, 1)):
            with pytest.raises(OSError) as e:
                kvtier_dev.access_reset(region.id, first, nr)
            assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            kvtier_dev.access_reset(region.id + 1000, 0, 1)
        assert e.value.errno == errno.ENOENT
        assert kvtier_dev.api()["features"] & kmod.FEATURE_ACCESS_RESET
    finally:
        buf.close()
        kvtier_dev.release(region.id)


def test_daemon_stopped_while_its_probes_load_exits_cleanly(kvtier_module):
    """SIGTERM while bcc still compiles the probes in the daemon's background thread: the daemon waits for the
    load and exits 0, with the probes closed. Stopping under it crashed the interpreter at exit (a segfault in
    libc, the daemon's exit status -11), as a test module whose daemon lived a second showed."""
    from daemon_proc import Daemon, short_dir, write_config

    d_dir = short_dir()
    cfg = write_config(d_dir, backend="kmod", cxl_node=1, extra="[probes]\nenabled = true\n")
    d = Daemon(d_dir, cfg).start(timeout_s=120)
    try:
        assert d.stats()["probes"]["state"] == "loading"   # bcc takes seconds to compile in this guest
        rc = d.stop(timeout_s=240)
        log = d.log.read_text()
        assert rc == 0, log[-2000:]
        assert "waiting for the eBPF probes" in log, log[-2000:]
    finally:
        if d.alive():
            d.kill9()
        shutil.rmtree(d_dir, ignore_errors=True)
