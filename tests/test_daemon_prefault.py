"""Prefaulted memory tiers (prefault = true): the daemon allocates its arena's pages at start and clients map
them into their page tables at attach, both in the background, so a put's first touch of a slot does not fault
page by page."""
from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from daemon_proc import KVTIERD, Daemon, short_dir
from kvtier.client import Client


def config(d, dram="8MiB", extra_nvme=""):
    cfg = d / "kvtierd.toml"
    cfg.write_text(f"""
socket = "{d}/kvtierd.sock"
state_dir = "{d}/state"
metrics = ""
[blocks]
max_bytes = "8MiB"
[[tiers]]
name = "dram0"
kind = "dram"
capacity = "{dram}"
backend = "memfd"
prefault = true
[[tiers]]
name = "nvme0"
kind = "nvme"
directory = "{d}/state/nvme"
capacity = "32MiB"
{extra_nvme}
""")
    return cfg


@pytest.fixture
def daemon_dir():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def shmem_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


def test_prefaulted_arena_first_put_takes_no_faults(daemon_dir):
    d = Daemon(daemon_dir, config(daemon_dir)).start()
    try:
        deadline = time.monotonic() + 20
        while shmem_bytes(d.proc.pid) < 8 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shmem_bytes(d.proc.pid) >= 8 << 20   # the whole arena is allocated before any put
        a = np.random.default_rng(1).integers(0, 255, 4 << 20, dtype=np.uint8)
        with Client(d.socket, "acme") as kv:
            assert kv.hello["arenas"][0]["prefault"] is True
            for t in kv._prefaults:
                t.join(20)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            kv.put(None, [(1, "input", a)])
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            assert np.array_equal(kv.get(None, [1])[0], a)
        # without the prefault this put faults 1024 pages in; a few stray faults (allocator) are fine
        assert faults < 64, faults
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]


def test_prefault_is_for_memory_tiers_only(daemon_dir):
    cfg = config(daemon_dir, extra_nvme="prefault = true")
    out = subprocess.run([KVTIERD, "--config", str(cfg), "--check"], capture_output=True, text=True)
    assert out.returncode == 2 and "tiers[1].prefault" in out.stderr, out.stderr
    cfg.write_text(cfg.read_text().replace("prefault = true\n[[tiers]]", 'prefault = "yes"\n[[tiers]]', 1))
    out = subprocess.run([KVTIERD, "--config", str(cfg), "--check"], capture_output=True, text=True)
    assert out.returncode == 2 and "tiers[0].prefault" in out.stderr, out.stderr


def test_prefaulted_arena_stays_with_its_tenant_across_connections(daemon_dir):
    """An emptied tenant's arenas close when it disconnects, except the prefaulted ones the tier started with:
    an engine that reconnects finds them still resident and mapped the same way (no page faults again)."""
    d = Daemon(daemon_dir, config(daemon_dir)).start()
    try:
        with Client(d.socket, "acme") as kv:
            first = [(a["arena"], a["size"]) for a in kv.hello["arenas"]]
            kv.put(None, [(1, "input", b"x" * 4096)])
            assert kv.delete([1]) == 1
        time.sleep(0.3)   # the daemon has seen the close
        assert d.stats()["tiers"][0]["domains"] == 1
        assert shmem_bytes(d.proc.pid) >= 8 << 20   # still resident
        with Client(d.socket, "acme") as kv:
            assert [(a["arena"], a["size"]) for a in kv.hello["arenas"]] == first and kv.hello["arenas"][0]["prefault"]
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]


def test_a_reload_that_changes_the_first_tenants_salt_frees_its_prefaulted_arena(daemon_dir):
    """The kept arenas belong to a salt: once no tenant that bound them maps to it (a reload changed the salt),
    they are released, prefault or not, instead of staying resident for nobody."""
    cfg = config(daemon_dir)
    d = Daemon(daemon_dir, cfg).start()
    try:
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(1, "input", b"x" * 4096)])
            assert kv.delete([1]) == 1
        deadline = time.monotonic() + 20
        while shmem_bytes(d.proc.pid) < 8 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.stats()["tiers"][0]["domains"] == 1
        cfg.write_text(cfg.read_text() + '\n[tenants.acme]\nsalt = "rotated"\n')
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while d.stats()["tiers"][0]["domains"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.stats()["tiers"][0]["domains"] == 0
        assert shmem_bytes(d.proc.pid) < 2 << 20   # the pages went back
        with Client(d.socket, "acme") as kv:   # binds its new salt: a fresh arena
            kv.put(None, [(2, "input", b"y" * 4096)])
            assert kv.get(None, [2])[0].tobytes() == b"y" * 4096
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]
