"""kill -9 of kvtierd during heavy put/spill traffic, then restart: every acknowledged durable block is served
intact, and nothing served is corrupt. Also: a full or unusable NVMe directory gives errors, not corruption."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from daemon_proc import KVTIERD, Daemon, block_bytes, short_dir, wait_for, write_config
from kvtier.client import Client

WRITER = textwrap.dedent("""
    import sys
    from kvtier.client import Client
    from daemon_proc import block_bytes
    sock, ack_path, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ack = open(ack_path, "a")
    kv = Client(sock, "crash")
    sid = kv.register_session("w")
    i = start
    while True:
        durable = i % 2 == 0
        batch = [(h, "history", block_bytes(h, 8192 + (h % 5) * 4096)) for h in range(i, i + 4)]
        kv.put(sid, batch, durable=durable)
        ack.write("".join(f"{h} {int(durable)}\\n" for h, _, _ in batch))
        ack.flush()
        kv.get(sid, [i - 7, i - 3, i + 1])   # reads promote NVMe blocks while others spill
        i += 4
""")


def _reap(d) -> None:
    """A failed test must not leave its daemon running."""
    if d is not None and d.alive():
        d.kill9()


def _verify(d: Daemon, acked: dict[int, bool]) -> tuple[int, int]:
    with Client(d.socket, "crash") as kv:
        hashes = sorted(acked)
        where = kv.contains(hashes)
        present = [h for h, w in zip(hashes, where) if w is not None]
        for h, w in zip(hashes, where):
            if acked[h]:
                assert w is not None, \
                    f"durable block {h} lost: {len(acked)} acked, {where[:12]} {open(d.log).read()[-800:]}"
        got = kv.get(None, present)
        for h, g in zip(present, got):
            assert g is not None, f"block {h} listed but not served"
            assert g.tobytes() == block_bytes(h, 8192 + (h % 5) * 4096), f"block {h} corrupt"
    return sum(acked.values()), len(present)


@pytest.mark.parametrize("round_", range(6))
def test_kill9_during_spill_then_restart(round_, tmp_path):
    kill9_rounds(round_, tmp_path, lives=2)


@pytest.mark.guest("tiered")
def test_kill9_with_module(kvtier_module, tmp_path):
    """The same, with kvtier.ko regions as the memory tiers (one round: the guest runs under TCG)."""
    kill9_rounds(0, tmp_path, lives=1, backend="kmod", cxl_node=1)


def kill9_rounds(round_, tmp_path, lives, **cfg):
    d_dir = short_dir()
    try:
        d = Daemon(d_dir, write_config(d_dir, dram="128KiB", cxl="128KiB", nvme="64MiB", **cfg)).start(120)
        acked: dict[int, bool] = {}
        ack_path = tmp_path / "acks"
        rng = random.Random(round_)
        start = 0
        for life in range(lives):   # crashes per round, traffic resumes on the recovered store
            acks_before = ack_path.stat().st_size if ack_path.exists() else 0
            w = subprocess.Popen([sys.executable, "-c", WRITER, d.socket, str(ack_path), str(start)],
                                 cwd=str(__import__("pathlib").Path(__file__).parent),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # the kill lands at a random moment of the traffic, counted from the writer's first acknowledgement
            # (its start-up takes seconds under TCG)
            assert wait_for(lambda: ack_path.exists() and ack_path.stat().st_size > acks_before, 120, 0.02)
            time.sleep(rng.uniform(0.4, 1.2))
            d.kill9()
            w.wait(10)
            for line in ack_path.read_text().splitlines():
                h, dur = line.split()
                acked[int(h)] = acked.get(int(h), False) or dur == "1"
            assert acked, "the writer acknowledged nothing"
            start = max(acked) + 1000
            d.start(120)
            durable, present = _verify(d, acked)
            assert durable > 0 and present >= durable
        assert d.stop() == 0
    finally:
        _reap(locals().get("d"))
        shutil.rmtree(d_dir, ignore_errors=True)


def test_nvme_full_gives_errors_not_corruption():
    d_dir = short_dir()
    try:
        d = Daemon(d_dir, write_config(d_dir, dram="64KiB", cxl="64KiB", nvme="256KiB")).start()
        stored = []
        with Client(d.socket, "full") as kv:
            for h in range(200):   # 200 x 16 KiB through 384 KiB of tiers: the last tier drops, never overflows
                kv.put(None, [(h, "input", block_bytes(h, 16 << 10))])
                stored.append(h)
            st = d.stats()
            assert all(t["used_bytes"] <= t["capacity_bytes"] for t in st["tiers"])
            assert st["evictions"].get("capacity", 0) + st["evictions"].get("policy", 0) + \
                st["evictions"].get("declined", 0) > 0
            where = kv.contains(stored)
            present = [h for h, w in zip(stored, where) if w]
            assert 0 < len(present) < 200
            # reading promotes, which demotes others and drops from the full last tier: a later block of
            # the list may be gone by its turn (a miss), but what is served is intact
            got = kv.get(None, present)
            assert sum(g is not None for g in got) >= len(present) // 2
            for h, g in zip(present, got):
                assert g is None or g.tobytes() == block_bytes(h, 16 << 10)
            with pytest.raises(OSError):   # larger than every tier: an error, nothing half-stored
                kv.put(None, [(9999, "input", block_bytes(1, 300 << 10))])
            assert kv.contains([9999]) == [None]
        assert d.stop() == 0
    finally:
        _reap(locals().get("d"))
        shutil.rmtree(d_dir, ignore_errors=True)


def test_unusable_nvme_directory_is_one_line_error():
    d_dir = short_dir()
    try:
        (d_dir / "file").write_text("x")
        cfg = write_config(d_dir)
        cfg.write_text(cfg.read_text().replace(f'directory = "{d_dir}/state/nvme"', f'directory = "{d_dir}/file/nvme"'))
        out = subprocess.run([KVTIERD, "--config", str(cfg)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 1, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr and "Not a directory" in lines[0]
    finally:
        _reap(locals().get("d"))
        shutil.rmtree(d_dir, ignore_errors=True)


def test_corrupt_nvme_block_is_a_miss_never_bad_bytes():
    d_dir = short_dir()
    try:
        d = Daemon(d_dir, write_config(d_dir)).start()
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(1, "prefix", b"\xab" * 65536), (2, "prefix", b"\xcd" * 65536)], durable=True)
            # a later commit: the store reads the last one back at recovery and would cut it there
            kv.put(None, [(3, "prefix", b"\xef" * 4096)], durable=True)
        assert d.stop() == 0
        data = d_dir / "state" / "nvme" / "kvtier-data"
        raw = bytearray(data.read_bytes())
        at = raw.find(b"\xab" * 4096)
        assert at >= 0
        raw[at + 100] ^= 0xFF   # one flipped byte in block 1's payload
        data.write_bytes(bytes(raw))
        d.start()
        with Client(d.socket, "acme") as kv:
            assert kv.get(None, [1, 2])[0] is None
            assert kv.get(None, [2])[0].tobytes() == b"\xcd" * 65536
            assert kv.contains([1, 2]) == [None, "dram0"]
        assert d.stats()["evictions"].get("corrupt") == 1
        assert d.stop() == 0
    finally:
        _reap(locals().get("d"))
        shutil.rmtree(d_dir, ignore_errors=True)
