"""The GPU tier above the cuda-python calls, against the recording stand-in (kvtier.cuda.standin): the advise /
prefetch sequences of promotion, demotion, shared prefixes and resume; data intact; events; capacity; the
config; the engine; and a real kvtierd with a stand-in GPU tier (KVTIER_CUDA_STANDIN=1, test-only)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from kvtier.cuda import runtime as runtime_mod
from kvtier.cuda import standin
from kvtier.cuda.discover import GpuReport
from kvtier.cuda.runtime import CudaError, Runtime
from kvtier.cuda.tier import GpuTier, held_bytes
from kvtier.errors import InputError
from kvtier.store.base import Slot

MIB = 1 << 20
PAGE = 4096


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def data(i: int, n: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def sim():
    """A fresh process stand-in GPU of 16 MiB (discovery, config and tiers all see this one)."""
    s = standin.reset(total_bytes=16 * MIB)
    yield s
    standin.reset()


@pytest.fixture
def tier(sim):
    t = GpuTier("gpu0", 1 * MIB, device=0, host_node=0, runtime=Runtime(sim.runtime))
    sim.runtime.calls.clear()
    yield t
    t.close()


def since(rt, n: int, *names) -> list[tuple]:
    calls = rt.calls[n:]
    return [c for c in calls if not names or c[0] in names]


# ---- imports and the runtime adapter -------------------------------------------------------------------

def test_everything_imports_without_cuda_python():
    code = ("import sys; sys.modules['cuda.bindings'] = None; sys.modules['cuda.bindings.runtime'] = None\n"
            "import kvtier.cuda.runtime, kvtier.cuda.uvm, kvtier.cuda.tier, kvtier.cuda.placement, "
            "kvtier.cuda.config, kvtier.cuda.standin, kvtier.cuda.discover\n"
            "from kvtier.cuda import runtime\n"
            "try:\n    runtime.load(standin=False)\nexcept ImportError:\n    print('no cuda-python')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no cuda-python"


def test_runtime_errors_carry_the_cuda_error_name(sim):
    rt = Runtime(sim.runtime)
    with pytest.raises(CudaError) as e:
        rt.malloc_managed(64 * MIB)   # more than the 16 MiB stand-in GPU
    assert e.value.name == "cudaErrorMemoryAllocation" and e.value.call == "cudaMallocManaged"
    assert "cudaMallocManaged failed: cudaErrorMemoryAllocation" in str(e.value)
    with pytest.raises(CudaError) as e:
        rt.set_device(3)
    assert e.value.name == "cudaErrorInvalidDevice"
    stream = rt.stream_create()
    ev = rt.event_create()
    rt.event_record(ev, stream)
    assert rt.event_query(ev) is True
    rt.event_destroy(ev)
    with pytest.raises(CudaError):
        rt.event_query(ev)   # a destroyed event: cudaErrorInvalidResourceHandle


def test_load_picks_the_standin_from_the_env(monkeypatch):
    monkeypatch.setenv(runtime_mod.STANDIN_ENV, "1")
    assert runtime_mod.load().is_standin
    monkeypatch.setenv(runtime_mod.STANDIN_ENV, "0")
    assert not runtime_mod.standin_enabled()


# ---- placement call sequences ----------------------------------------------------------------------------

def test_promotion_advises_gpu_and_prefetches_on_the_h2d_stream(tier, sim):
    rt = sim.runtime
    tier.put(key(1), data(1, 5000))
    b = tier.locate(key(1))
    ptr = tier.arena.ptr + b.offset
    span = 2 * PAGE   # whole pages: 5000 bytes round up to two
    assert since(rt, 0, "cudaMemAdvise", "cudaMemPrefetchAsync", "cudaEventRecord") == [
        # each promotion: the prefetch first (advice on host-resident pages walks them all), then the advice
        ("cudaMemPrefetchAsync", ptr, span, ("device", 0), tier.arena.h2d),
        ("cudaMemAdvise", ptr, span, "SetPreferredLocation", ("device", 0)),
        ("cudaEventRecord", since(rt, 0, "cudaEventRecord")[0][1], tier.arena.h2d)]
    # SetAccessedBy(GPU) was set once, for the whole arena, when it was allocated
    assert Runtime(rt).range_attribute(tier.arena.ptr, tier.arena.nbytes, "AccessedBy") == 0
    assert tier.location(key(1)) == {"last_prefetch": 0, "preferred": 0, "read_mostly": False,
                                     "last_prefetch_type": 1, "last_prefetch_id": 0,
                                     "preferred_type": 1, "preferred_id": 0}
    assert tier.gpu_stats()["to_device"] == 1 and tier.gpu_stats()["to_device_bytes"] == span


def test_demotion_prefers_the_host_node_prefetches_on_d2h_and_waits(tier, sim):
    rt = sim.runtime
    tier.put(key(2), data(2, PAGE))
    n = len(rt.calls)
    move = tier.prepare_demote(key(2))
    ptr = tier.arena.ptr + tier.locate(key(2)).offset
    calls = since(rt, n, "cudaMemAdvise", "cudaMemPrefetchAsync", "cudaEventRecord", "cudaEventSynchronize")
    assert calls[:2] == [("cudaMemAdvise", ptr, PAGE, "SetPreferredLocation", ("host_numa", 0)),
                         ("cudaMemPrefetchAsync", ptr, PAGE, ("host_numa", 0), tier.arena.d2h)]
    assert calls[2][0] == "cudaEventRecord" and calls[2][2] == tier.arena.d2h != tier.arena.h2d
    assert calls[3] == ("cudaEventSynchronize", calls[2][1])
    assert move.done and tier.gpu_stats()["moves_in_flight"] == 0
    assert tier.location(key(2))["last_prefetch"] == standin.CPU_DEVICE_ID
    assert tier.location(key(2))["preferred"] == standin.CPU_DEVICE_ID
    assert (tier.location(key(2))["last_prefetch_type"], tier.location(key(2))["last_prefetch_id"]) == (3, 0)
    assert (tier.location(key(2))["preferred_type"], tier.location(key(2))["preferred_id"]) == (3, 0)
    assert tier.get(key(2)) == data(2, PAGE)


def test_a_numa_preference_the_driver_ignores_falls_back_to_the_host(sim):
    sim.runtime.numa_preference_ignored = True   # what driver 580.159 does on an H100
    t = GpuTier("gpu0", MIB, device=0, host_node=0, runtime=Runtime(sim.runtime))
    try:
        t.put(key(1), data(1, PAGE))
        t.put(key(2), data(2, PAGE))
        t.prepare_demote(key(1))
        loc = t.location(key(1))
        assert (loc["preferred"], loc["preferred_type"]) == (standin.CPU_DEVICE_ID, 2), loc   # not the GPU's
        assert (loc["last_prefetch_type"], loc["last_prefetch_id"]) == (3, 0)   # pages still go to the node
        assert "did not apply" in t.backend_note
        n = len(sim.runtime.calls)
        t.prepare_demote(key(2))
        ptr = t.arena.ptr + t.locate(key(2)).offset
        assert since(sim.runtime, n, "cudaMemAdvise", "cudaMemPrefetchAsync", "cudaMemRangeGetAttribute")[:2] == [
            ("cudaMemAdvise", ptr, PAGE, "SetPreferredLocation", ("host", 0)),   # checked once, not per move
            ("cudaMemPrefetchAsync", ptr, PAGE, ("host_numa", 0), t.arena.d2h)]
        assert t.get(key(2)) == data(2, PAGE)
    finally:
        t.close()


def test_shared_prefix_is_read_mostly_until_demoted_or_deleted(tier, sim):
    rt = sim.runtime
    tier.put(key(3), data(3, 3 * PAGE))
    tier.put(key(4), data(4, PAGE))
    n = len(rt.calls)
    assert tier.set_shared(key(3)) is True
    assert tier.set_shared(key(3)) is False   # already: no second call
    ptr = tier.arena.ptr + tier.locate(key(3)).offset
    assert since(rt, n, "cudaMemAdvise") == [("cudaMemAdvise", ptr, 3 * PAGE, "SetReadMostly", ("device", 0))]
    assert tier.location(key(3))["read_mostly"] and not tier.location(key(4))["read_mostly"]
    n = len(rt.calls)
    tier.prepare_demote(key(3))
    advice = [c[3] for c in since(rt, n, "cudaMemAdvise")]
    assert advice == ["UnsetReadMostly", "SetPreferredLocation"]   # no read-duplicated GPU copy left behind
    assert not tier.location(key(3))["read_mostly"]
    tier.set_shared(key(4))
    n = len(rt.calls)
    tier.delete(key(4))
    assert [c[3] for c in since(rt, n, "cudaMemAdvise")] == ["UnsetReadMostly"]


def test_events_report_when_moves_finish(sim):
    sim.runtime.pending_queries = 2   # each event answers NotReady twice before it completes
    t = GpuTier("gpu0", MIB, runtime=Runtime(sim.runtime))
    try:
        t.put(key(1), data(1, PAGE))
        t.put(key(2), data(2, PAGE))
        assert t.gpu_stats()["moves_in_flight"] == 2
        assert t.poll() == 0 and t.poll() == 0   # still running
        assert t.poll() == 2 and t.gpu_stats()["moves_in_flight"] == 0
        assert t.gpu_stats()["moves_completed"] == 2
        m = t.prefetch(key(1))
        assert not m.done
        t.arena.wait(m)
        assert m.done and t.gpu_stats()["moves_in_flight"] == 0
        # finished events are reused, not created again
        created = len(sim.runtime.calls_named("cudaEventCreateWithFlags"))
        t.prefetch(key(2))
        assert len(sim.runtime.calls_named("cudaEventCreateWithFlags")) == created
    finally:
        t.close()


def test_data_intact_through_put_get_get_into_and_reuse(tier):
    blocks = {i: data(i, n) for i, n in enumerate([1, 4095, 4096, 4097, 65536, 100_000])}
    for i, d in blocks.items():
        assert tier.put(key(i), d) == len(d)
    for i, d in blocks.items():
        assert tier.get(key(i)) == d
        out = bytearray(len(d) + 10)
        assert tier.get_into(key(i), out) == len(d) and bytes(out[:len(d)]) == d
        assert bytes(tier.view(tier.locate(key(i)))) == d
    for i in list(blocks)[::2]:
        assert tier.delete(key(i))
        blocks[i] = data(100 + i, len(blocks[i]))
        tier.put(key(i), blocks[i])   # reused ranges carry the new bytes
    assert all(tier.get(key(i)) == d for i, d in blocks.items())
    with pytest.raises(KeyError):
        tier.get(key(99))
    with pytest.raises(ValueError):
        tier.get_into(key(1), bytearray(10))


def test_capacity_is_never_exceeded(tier, sim):
    n = 0
    with pytest.raises(OSError) as e:
        while True:
            tier.put(key(n), data(n, 5000))   # 8 KiB with page rounding
            n += 1
            assert tier.used_bytes <= tier.capacity_bytes
    assert e.value.errno == errno.ENOSPC and n == MIB // (2 * PAGE)
    assert tier.stats()["enospc"] == 1 and len(tier) == n


def test_never_asks_for_more_than_the_gpu_has_free(sim):
    sim.runtime.used_elsewhere_bytes = 15 * MIB   # another process holds most of the 16 MiB
    with pytest.raises(OSError) as e:
        GpuTier("gpu0", 2 * MIB, runtime=Runtime(sim.runtime))
    assert e.value.errno == errno.ENOMEM and "free" in str(e.value)
    assert not sim.runtime.calls_named("cudaMallocManaged")   # refused before asking the driver


def test_close_frees_the_managed_memory(sim):
    before = sim.runtime.free_bytes()
    t = GpuTier("gpu0", 4 * MIB, runtime=Runtime(sim.runtime))
    assert sim.runtime.free_bytes() == before - 4 * MIB and held_bytes(0) >= 4 * MIB
    held = held_bytes(0)
    t.close()
    assert sim.runtime.free_bytes() == before and held_bytes(0) == held - 4 * MIB
    assert not sim.runtime.streams and not sim.runtime.events   # streams and events destroyed too


def test_host_numa_refused_falls_back_to_host(sim):
    class NoNuma(standin.StandinRuntime):
        def cudaMemAdvise(self, ptr, nbytes, advice, loc):
            if int(loc.type) == 3:
                self._rec("cudaMemAdvise-refused")
                return (standin.cudaError_t.cudaErrorInvalidValue,)
            return super().cudaMemAdvise(ptr, nbytes, advice, loc)

    rt = NoNuma(total_bytes=16 * MIB)
    t = GpuTier("gpu0", MIB, host_node=1, runtime=Runtime(rt))
    try:
        t.put(key(1), data(1, PAGE))
        t.prepare_demote(key(1))
        assert "host NUMA node 1 refused (cudaErrorInvalidValue)" in t.backend_note
        assert rt.calls_named("cudaMemPrefetchAsync")[-1][3] == ("host", 0)
        assert t.location(key(1))["last_prefetch"] == standin.CPU_DEVICE_ID
    finally:
        t.close()


def test_discovery_sees_the_standin_through_its_one_code_path(sim, monkeypatch):
    from kvtier.cuda.discover import discover_gpus
    monkeypatch.setenv(runtime_mod.STANDIN_ENV, "1")
    t = GpuTier("gpu0", 4 * MIB, runtime=Runtime(sim.runtime))
    try:
        r = discover_gpus()
        assert r.present and r.gpus[0].name.startswith(standin.NAME)
        assert r.gpus[0].total_bytes == 16 * MIB and r.gpus[0].free_bytes == 12 * MIB
    finally:
        t.close()


# ---- config ----------------------------------------------------------------------------------------------

def _cfg(tiers, source="t.toml"):
    from kvtier.daemon import config
    return config.from_dict({"policy": "lru", "tiers": tiers}, source)


GPU = {"name": "gpu0", "kind": "gpu", "device": 0, "capacity": "4MiB"}
DRAM = {"name": "dram0", "kind": "dram", "capacity": "4MiB"}


@pytest.fixture
def standin_env(sim, monkeypatch):
    monkeypatch.setenv(runtime_mod.STANDIN_ENV, "1")
    return sim


def test_config_gpu_tier(standin_env):
    cfg = _cfg([dict(GPU, capacity="50%"), DRAM])
    g = cfg.tiers[0]
    assert (g.kind, g.device, g.capacity_bytes, g.optional) == ("gpu", 0, 8 * MIB, False)
    assert cfg.absent_tiers == []


@pytest.mark.parametrize("tiers, message", [
    ([dict(GPU, capacity="17MiB"), DRAM], "t.toml: tiers[0].capacity: 17825792 bytes is more than GPU 0 has free"),
    ([dict(GPU, device=2), DRAM], "t.toml: tiers[0].kind: a gpu tier needs GPU 2, but no GPU 2"),
    ([dict(GPU, device=-1), DRAM], "t.toml: tiers[0].device: expected a CUDA device index"),
    ([dict(GPU, device="0"), DRAM], "t.toml: tiers[0].device: expected a CUDA device index"),
    ([dict(GPU, optional="yes"), DRAM], "t.toml: tiers[0].optional: expected true or false"),
    ([dict(GPU, nodes=[0]), DRAM], "t.toml: tiers[0].nodes: not a key of a gpu tier"),
    ([DRAM, GPU], "t.toml: tiers[1].kind: gpu tiers come first"),
    ([GPU], "t.toml: tiers: a dram or cxl tier is needed"),
    ([dict(DRAM, device=0)], "t.toml: tiers[0].device: only gpu tiers have it"),
    ([dict(GPU, capacity="0%"), DRAM], "t.toml: tiers[0].capacity: percentage must be in (0, 100]"),
])
def test_config_gpu_errors_name_the_key(standin_env, tiers, message):
    with pytest.raises(InputError) as e:
        _cfg(tiers)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_config_without_gpu_fails_or_skips_when_optional(monkeypatch):
    import kvtier.cuda.discover as discover
    monkeypatch.setattr(discover, "discover_gpus", lambda: GpuReport(False, reason="no devices (test)"))
    with pytest.raises(InputError) as e:
        _cfg([GPU, DRAM])
    assert str(e.value) == ("t.toml: tiers[0].kind: a gpu tier needs GPU 0, but no devices (test) "
                            "(set optional = true to start without it)")
    cfg = _cfg([dict(GPU, optional=True), DRAM])
    assert [t.name for t in cfg.tiers] == ["dram0"]
    assert cfg.absent_tiers == [{"name": "gpu0", "kind": "gpu", "device": 0, "reason": "no devices (test)"}]


def test_config_counts_what_this_process_holds_as_free(standin_env):
    """A SIGHUP re-reads "N%" against the GPU's free memory plus what the daemon's own GPU tier holds."""
    t = GpuTier("gpu0", 8 * MIB, runtime=Runtime(standin_env.runtime))
    try:
        assert _cfg([dict(GPU, capacity="50%"), DRAM]).tiers[0].capacity_bytes == 8 * MIB
        assert _cfg([dict(GPU, capacity="12MiB"), DRAM]).tiers[0].capacity_bytes == 12 * MIB
    finally:
        t.close()


def test_kvtierd_check_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text('[[tiers]]\nkind = "gpu"\ndevice = 5\ncapacity = "1MiB"\n'
                   '[[tiers]]\nkind = "dram"\ncapacity = "1MiB"\n')
    kvtierd = os.path.join(os.path.dirname(sys.executable), "kvtierd")
    out = subprocess.run([kvtierd, "--config", str(cfg), "--check"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, runtime_mod.STANDIN_ENV: "1"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith(f"kvtierd: error: {cfg}: tiers[0].kind: a gpu tier needs GPU 5")
    assert "Traceback" not in out.stderr


# ---- the engine ------------------------------------------------------------------------------------------

@pytest.fixture
def engine(standin_env):
    from kvtier.daemon.engine import Engine
    from kvtier.daemon.server import build_tiers
    from kvtier.daemon import config
    cfg = config.from_dict({"policy": "lru", "blocks": {"nominal_bytes": "4KiB"},
                            "tiers": [dict(GPU, capacity="32KiB"),
                                      dict(DRAM, capacity="256KiB", backend="memfd", nodes=[0])]}, "t")
    tiers = build_tiers(cfg)
    e = Engine(cfg, tiers)
    yield e
    e.close()


def _put(e, sid, hashes, nbytes=PAGE):
    txn, slots = e.put_reserve("t", sid, [[h, "prefix", nbytes, None] for h in hashes], False)
    for h, s in zip(hashes, slots):
        if s is not None:
            t, a = e.arena_table[s[0]]
            e.tiers[t].view(Slot(a, s[1], s[2]))[:] = data(h, nbytes)
    return e.put_commit(txn)


def _read(e, slot):
    t, a = e.arena_table[slot[0]]
    assert e.tiers[t].kind != "gpu"   # clients only ever see host memory
    return bytes(e.tiers[t].view(Slot(a, slot[1], slot[2])))


def test_engine_puts_to_host_promotes_hits_to_gpu_and_stages_gets(engine):
    e, rt = engine, standin.instance().runtime
    sid = e.register_session("t", "a")
    assert _put(e, sid, [1, 2, 3]) == 3
    assert e.contains("t", [1, 2, 3]) == ["dram0"] * 3   # clients write into host memory
    host_used = e.tiers[1].used_bytes
    lease, slots, served = e.get("t", sid, [1, 2, 3])
    assert served == ["dram0"] * 3
    assert [_read(e, s) for s in slots] == [data(h, PAGE) for h in (1, 2, 3)]
    assert e.contains("t", [1, 2, 3]) == ["gpu0"] * 3   # promoted: the GPU is the top tier
    assert len(rt.calls_named("cudaMemPrefetchAsync")) == 3 and len(rt.calls_named("cudaMemcpy")) == 3
    assert e.tiers[1].used_bytes == host_used   # staging slots stand where the promoted blocks were
    e.release(lease)
    assert e.tiers[1].used_bytes == 0   # staging slots freed with the lease
    lease, slots, served = e.get("t", sid, [2])
    assert served == ["gpu0"] and _read(e, slots[0]) == data(2, PAGE)
    e.release(lease)
    row = e.tier_rows()[0]
    assert row["kind"] == "gpu" and row["gpu"]["to_device"] == 3 and row["gpu"]["staged_gets"] == 4


def test_engine_demotes_gpu_victims_through_the_host(engine):
    e, rt = engine, standin.instance().runtime
    sid = e.register_session("t", "a")
    hashes = list(range(10, 22))   # 12 pages against an 8-page GPU tier
    _put(e, sid, hashes)
    for h in hashes:
        lease, slots, _ = e.get("t", sid, [h])
        assert _read(e, slots[0]) == data(h, PAGE)
        e.release(lease)
        assert e.tiers[0].used_bytes <= e.limit_bytes[0]
    where = e.contains("t", hashes)
    assert where.count("gpu0") == 8 and where.count("dram0") == 4
    host_prefetches = [c for c in rt.calls_named("cudaMemPrefetchAsync") if c[3] == ("host_numa", 0)]
    assert len(host_prefetches) == 4 == e.tier_rows()[0]["gpu"]["to_host"]
    assert e.counters["demotions"] == 4
    for h in hashes:   # every block intact wherever it ended up
        lease, slots, _ = e.get("t", sid, [h])
        assert _read(e, slots[0]) == data(h, PAGE)
        e.release(lease)


def test_engine_shared_prefix_is_read_mostly(engine):
    e, rt = engine, standin.instance().runtime
    s1, s2 = e.register_session("t", "a"), e.register_session("t", "b")
    _put(e, s1, [7])
    e.release(e.get("t", s1, [7])[0])   # on the GPU, one session
    assert not rt.calls_named("cudaMemAdvise") or \
        all(c[3] != "SetReadMostly" for c in rt.calls_named("cudaMemAdvise"))
    e.release(e.get("t", s2, [7])[0])   # a second session reads the prefix
    assert [c[3] for c in rt.calls_named("cudaMemAdvise")].count("SetReadMostly") == 1
    b = e.blocks[next(iter(e.sessions[s1].blocks))]
    assert e.tiers[0].location(b.key)["read_mostly"]


def test_engine_resume_prefetches_and_decoding_keeps_the_working_set(engine):
    e, rt = engine, standin.instance().runtime
    sid = e.register_session("t", "a")
    _put(e, sid, [30, 31])
    assert e.contains("t", [30, 31]) == ["dram0", "dram0"]
    n = len(rt.calls_named("cudaMemPrefetchAsync"))
    e.hint("t", sid, "resume")   # the session is about to come back: its blocks go up to the GPU
    assert e.contains("t", [30, 31]) == ["gpu0", "gpu0"]
    assert [c[3] for c in rt.calls_named("cudaMemPrefetchAsync")[n:]] == [("device", 0)] * 2
    n = len(rt.calls_named("cudaMemPrefetchAsync"))
    e.hint("t", sid, "decoding")   # pinned on the GPU, prefetched there again
    assert [c[3] for c in rt.calls_named("cudaMemPrefetchAsync")[n:]] == [("device", 0)] * 2
    assert all(e.blocks[k].pins for k in e.sessions[sid].blocks)
    other = e.register_session("t", "b")   # another session's blocks cannot push the pinned ones out
    _put(e, other, list(range(40, 52)))
    for h in range(40, 52):
        e.release(e.get("t", other, [h])[0])
    assert e.contains("t", [30, 31]) == ["gpu0", "gpu0"]
    assert e.prefetch_tick() >= 0 and e.tier_rows()[0]["gpu"]["moves_in_flight"] == 0   # events retired


def test_metrics_have_gpu_families(engine):
    from prometheus_client import generate_latest
    from kvtier.daemon.metrics import Metrics
    e = engine
    sid = e.register_session("t", "a")
    _put(e, sid, [1])
    e.release(e.get("t", sid, [1])[0])
    m = Metrics()
    m.engine = e
    text = generate_latest(m.registry).decode()
    assert 'kvtier_gpu_prefetches{direction="to_device",tier="gpu0"} 1.0' in text
    assert 'kvtier_tier_used_bytes{kind="gpu",tier="gpu0"} 4096.0' in text


# ---- a real daemon with a stand-in GPU tier ---------------------------------------------------------------

def _daemon_config(d, gpu_extra=""):
    cfg = d / "kvtierd.toml"
    cfg.write_text(f"""
socket = "{d}/kvtierd.sock"
state_dir = "{d}/state"
policy = "lru"
metrics = ""
[blocks]
nominal_bytes = "16KiB"
[[tiers]]
name = "gpu0"
kind = "gpu"
device = 0
capacity = "128KiB"
{gpu_extra}
[[tiers]]
name = "dram0"
kind = "dram"
capacity = "512KiB"
backend = "memfd"
[[tiers]]
name = "nvme0"
kind = "nvme"
directory = "{d}/state/nvme"
capacity = "8MiB"
""")
    return cfg


def test_daemon_round_trips_through_a_standin_gpu_tier():
    from daemon_proc import KVCTL, Daemon, short_dir
    from kvtier.client import Client
    d_dir = short_dir()
    d = Daemon(d_dir, _daemon_config(d_dir), env={runtime_mod.STANDIN_ENV: "1"})
    d.start()
    try:
        n, size = 40, 16 << 10   # 640 KiB over 128 KiB GPU + 512 KiB DRAM: some reach NVMe
        with Client(d.socket, "acme") as kv:
            sid = kv.register_session("conv")
            assert kv.put(sid, [(100 + i, "history", data(i, size)) for i in range(n)]) == n
            for _ in range(2):
                got = kv.get(sid, [100 + i for i in range(n)])
                assert [g.tobytes() for g in got] == [data(i, size) for i in range(n)]
            assert "gpu0" in kv.contains([100 + i for i in range(n)])
            kv.hint(sid, "resume")
        st = d.stats()
        gpu = st["tiers"][0]
        assert (gpu["name"], gpu["kind"], gpu["backend"]) == ("gpu0", "gpu", "cuda-standin")
        assert 0 < gpu["used_bytes"] <= gpu["capacity_bytes"] == 128 << 10
        assert gpu["gpu"]["to_device"] > 0 and gpu["gpu"]["to_host"] > 0 and gpu["gpu"]["staged_gets"] > 0
        assert all(t["used_bytes"] <= t["capacity_bytes"] for t in st["tiers"])
        env = {**os.environ, "KVTIER_SOCKET": d.socket}
        out = subprocess.run([KVCTL, "status"], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "gpu0" in out.stdout and "cuda-standin" in out.stdout and "prefetched to GPU" in out.stdout
        assert d.stop() == 0, d.log.read_text()[-2000:]
    finally:
        if d.alive():
            d.kill9()
        import shutil
        shutil.rmtree(d_dir, ignore_errors=True)


def test_daemon_without_its_gpu_exits_2_or_starts_without_an_optional_tier():
    from daemon_proc import KVCTL, Daemon, short_dir
    import shutil
    d_dir = short_dir()
    try:
        env = {runtime_mod.STANDIN_ENV: "1"}
        cfg = _daemon_config(d_dir).read_text().replace("device = 0", "device = 3")
        (d_dir / "kvtierd.toml").write_text(cfg)
        out = subprocess.run([sys.executable, "-c", "from kvtier.daemon import main; main()", "--config",
                              str(d_dir / "kvtierd.toml")], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env})
        assert out.returncode == 2 and "tiers[0].kind: a gpu tier needs GPU 3" in out.stderr, out.stderr
        (d_dir / "kvtierd.toml").write_text(cfg.replace("device = 3", "device = 3\noptional = true"))
        d = Daemon(d_dir, d_dir / "kvtierd.toml", env=env).start()
        try:
            st = d.stats()
            assert [t["name"] for t in st["tiers"]] == ["dram0", "nvme0"]
            assert st["absent_tiers"] == [{"name": "gpu0", "kind": "gpu", "device": 3,
                                           "reason": "no GPU 3 (this machine has 1)"}]
            out = subprocess.run([KVCTL, "status"], capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "KVTIER_SOCKET": d.socket})
            assert "gpu0 (gpu): absent (no GPU 3 (this machine has 1))" in out.stdout, out.stdout
            assert "left out: no GPU 3" in d.log.read_text()
            assert d.stop() == 0
        finally:
            if d.alive():
                d.kill9()
    finally:
        shutil.rmtree(d_dir, ignore_errors=True)


def test_kvctl_tiers_lists_the_standin_gpu():
    kvctl = os.path.join(os.path.dirname(sys.executable), "kvctl")
    out = subprocess.run([kvctl, "tiers", "--json"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, runtime_mod.STANDIN_ENV: "1",
                              standin.TOTAL_ENV: str(2 << 30)})
    assert out.returncode == 0, out.stderr
    import json
    gpu = json.loads(out.stdout)["gpu"]
    assert gpu["present"] and gpu["gpus"][0]["total_bytes"] == 2 << 30


# ---- tools/bench_gpu.py ----------------------------------------------------------------------------------

BENCH = os.path.join(os.path.dirname(__file__), "..", "tools", "bench_gpu.py")


def test_bench_gpu_runs_against_the_standin():
    import json
    out = subprocess.run([sys.executable, BENCH, "--standin", "--sizes", "1MiB,4MiB", "--reps", "1", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["standin"] and [row["size_bytes"] for row in r["rows"]] == [1 << 20, 4 << 20]
    assert r["skipped"] == []   # 8x the largest size: both fit
    row = r["rows"][0]
    assert all(row[k] > 0 for k in ("memcpy_h2d_gbps", "prefetch_h2d_gbps", "memcpy_d2h_gbps", "prefetch_d2h_gbps"))
    assert row["ratio_h2d"] == pytest.approx(row["prefetch_h2d_gbps"] / row["memcpy_h2d_gbps"])
    out = subprocess.run([sys.executable, BENCH, "--standin", "--sizes", "1MiB", "--reps", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "RATIO H2D" in out.stdout and "numbers mean nothing" in out.stdout


def test_bench_gpu_without_a_gpu_says_why_and_exits_0():
    from kvtier.cuda.discover import discover_gpus
    env = {k: v for k, v in os.environ.items() if k != runtime_mod.STANDIN_ENV}
    report = discover_gpus()
    if report.present:
        pytest.skip("this machine has a GPU: tools/bench_gpu.py measures instead")
    out = subprocess.run([sys.executable, BENCH], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == f"bench_gpu: skipped: {report.reason}"
    out = subprocess.run([sys.executable, BENCH, "--sizes", "12XB"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "bad size '12XB'" in out.stderr


# ---- the adapter against the installed cuda-python ---------------------------------------------------------

def test_adapter_calls_fit_the_installed_cuda_bindings():
    """Without a driver every call reaches the driver and fails with a CUDA error name: cuda-python accepted the
    arguments (a wrong signature would be a TypeError). With a GPU, tests/test_cuda_gpu.py runs them for real."""
    from kvtier.cuda.discover import discover_gpus
    try:
        from cuda.bindings import runtime as real
    except ImportError:
        pytest.skip("cuda-python not installed")
    if discover_gpus().present:
        pytest.skip("this machine has a GPU: tests/test_cuda_gpu.py calls these for real")
    rt = Runtime(real)
    ev, st = real.cudaEvent_t(), real.cudaStream_t()
    calls = [lambda: rt.set_device(0), rt.mem_get_info, lambda: rt.concurrent_managed_access(0),
             lambda: rt.malloc_managed(PAGE), lambda: rt.malloc(PAGE), lambda: rt.malloc_host(PAGE),
             lambda: rt.free(PAGE), lambda: rt.free_host(PAGE), lambda: rt.memcpy(PAGE, PAGE, 16),
             lambda: rt.memcpy(PAGE, PAGE, 16, st),
             lambda: rt.advise(PAGE, PAGE, "SetPreferredLocation", rt.location("device", 0)),
             lambda: rt.advise(PAGE, PAGE, "SetAccessedBy", rt.location("device", 0)),
             lambda: rt.advise(PAGE, PAGE, "SetReadMostly", rt.location("device", 0)),
             lambda: rt.advise(PAGE, PAGE, "SetPreferredLocation", rt.location("host_numa", 1)),
             lambda: rt.prefetch(PAGE, PAGE, rt.location("host"), st),
             lambda: rt.range_attribute(PAGE, PAGE, "LastPrefetchLocation"),
             lambda: rt.range_attribute(PAGE, PAGE, "AccessedBy"),
             rt.stream_create, lambda: rt.stream_destroy(st), lambda: rt.stream_synchronize(st),
             rt.event_create, lambda: rt.event_create(timing=True), lambda: rt.event_record(ev, st),
             lambda: rt.event_query(ev), lambda: rt.event_synchronize(ev), lambda: rt.event_elapsed_ms(ev, ev),
             lambda: rt.event_destroy(ev), rt.device_synchronize]
    for call in calls:
        with pytest.raises(CudaError) as e:
            call()
        assert e.value.name.startswith("cudaError"), e.value
    # CUDA 12.2's attributes, which cuda-bindings does not wrap (a TypeError once the driver answered), go to
    # the driver through ctypes: a CUDA error either way, never a TypeError
    with pytest.raises(CudaError) as e:
        rt.range_attribute(PAGE, PAGE, "LastPrefetchLocationType")
    assert e.value.call in ("cudaMemRangeGetAttribute", "cuMemRangeGetAttribute"), e.value


def test_attributes_cuda_bindings_does_not_wrap_are_read_from_the_driver(tier, sim):
    tier.put(key(1), data(1, PAGE))
    ptr = tier.arena.ptr + tier.locate(key(1)).offset
    with pytest.raises(TypeError):   # as cuda-bindings 13.3 answers on an H100
        sim.runtime.cudaMemRangeGetAttribute(4, standin.cudaMemRangeAttribute(7), ptr, PAGE)
    assert tier.rt.range_attribute(ptr, PAGE, "LastPrefetchLocationType") == 1   # a device
    assert tier.rt.range_attribute(ptr, PAGE, "PreferredLocationId") == 0
    with pytest.raises(CudaError) as e:
        tier.rt.range_attribute(1, PAGE, "LastPrefetchLocationId")   # not managed memory
    assert (e.value.call, e.value.name) == ("cuMemRangeGetAttribute", "CUDA_ERROR_INVALID_VALUE")


def test_adapter_uses_the_v2_calls_where_cuda_bindings_12_has_them():
    class Bindings12(standin.StandinRuntime):
        def cudaMemAdvise_v2(self, ptr, nbytes, advice, loc):
            self._rec("v2-advise")
            return self.cudaMemAdvise(ptr, nbytes, advice, loc)

        def cudaMemPrefetchAsync_v2(self, ptr, nbytes, loc, flags, stream):
            self._rec("v2-prefetch")
            return self.cudaMemPrefetchAsync(ptr, nbytes, loc, flags, stream)

    rt = Bindings12(total_bytes=16 * MIB)
    t = GpuTier("gpu0", MIB, runtime=Runtime(rt))
    try:
        t.put(key(1), data(1, PAGE))
        assert [c[0] for c in rt.calls if c[0].startswith("v2")] == ["v2-advise", "v2-prefetch", "v2-advise"]
    finally:
        t.close()
