"""NvmeTier crash safety: SIGKILL a child in the middle of heavy put/overwrite/delete traffic, reopen,
and check that every acknowledged block reads back intact and nothing corrupt is served."""
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from kvtier.store import NvmeTier

KEYS = 40
CHILD = textwrap.dedent("""
    import os, random, sys
    from kvtier.store import NvmeTier
    directory, run = sys.argv[1], int(sys.argv[2])
    t = NvmeTier("nvme0", directory, 24 << 20, compact_min_records=64)  # compactions get killed too
    rng = random.Random(run)
    out = os.fdopen(1, "w", buffering=1)
    out.write("READY\\n")
    ver = run * 1_000_000
    while True:
        ver += 1
        k = rng.randrange(%d)
        if rng.random() < 0.15:
            out.write(f"B {k} -1\\n")
            t.delete(k.to_bytes(16, "little"))
            out.write(f"A {k} -1\\n")
        else:
            out.write(f"B {k} {ver}\\n")
            try:
                size = random.Random(-ver).choice([100, 5000, 65536, 200_000, 1 << 20])
                t.put(k.to_bytes(16, "little"), random.Random(ver).randbytes(size))
            except OSError:
                out.write(f"F {k} {ver}\\n")
                continue
            out.write(f"A {k} {ver}\\n")
""" % KEYS)


def content(ver: int) -> bytes:
    return random.Random(ver).randbytes(random.Random(-ver).choice([100, 5000, 65536, 200_000, 1 << 20]))


def run_child(directory: str, run: int, kill_after_s: float) -> list[tuple[str, int, int]]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, directory, str(run)], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"READY\n"
        time.sleep(kill_after_s)
        p.send_signal(signal.SIGKILL)
        rest = p.stdout.read()
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    events = []
    for line in rest.decode().splitlines():
        parts = line.split()
        if len(parts) == 3:  # the last line may be cut by the kill
            events.append((parts[0], int(parts[1]), int(parts[2])))
    return events


def test_kill9_during_heavy_puts_loses_no_acknowledged_block():
    directory = tempfile.mkdtemp(prefix="kvtier-crash-", dir="/var/tmp")
    rng = random.Random(1234)
    expected: dict[int, int] = {}  # key -> version (-1: deleted) as verified after the last run
    total_acks = 0
    try:
        for run in range(1, 26):
            events = run_child(directory, run, rng.uniform(0.02, 0.4))
            allowed: dict[int, set[int]] = {}
            for ev, k, ver in events:
                if ev == "B":  # in flight: the old or the new state may survive
                    allowed[k] = {expected.get(k, -1), ver}
                elif ev == "A":
                    expected[k] = ver
                    allowed[k] = {ver}
                    total_acks += 1
                elif ev == "F":
                    allowed[k] = {expected.get(k, -1)}
            t = NvmeTier("nvme0", directory, 24 << 20)
            try:
                assert t.used_bytes <= 24 << 20
                for k in range(KEYS):
                    kb = k.to_bytes(16, "little")
                    ok = allowed.get(k, {expected.get(k, -1)})
                    if not t.contains(kb):
                        assert -1 in ok, f"run {run}: acknowledged key {k} (version {ok}) lost"
                        expected[k] = -1
                        continue
                    data = t.get(kb)  # a ChecksumError here fails the test: nothing corrupt is served
                    match = [v for v in ok if v != -1 and content(v) == data]
                    assert match, f"run {run}: key {k} holds none of the versions {ok}"
                    expected[k] = match[0]
                assert sorted(t.keys()) == sorted(k.to_bytes(16, "little") for k, v in expected.items() if v != -1)
            finally:
                t.close()
        assert total_acks > 100, "the children acknowledged too few puts for the test to mean much"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
