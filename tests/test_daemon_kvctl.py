"""kvctl's daemon commands end to end against a real kvtierd, each with --json; errors are one line."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess

import pytest

from daemon_proc import KVCTL, Daemon, block_bytes, short_dir, write_config
from kvtier.client import Client, DaemonError, admin_call


@pytest.fixture(scope="module")
def daemon():
    d_dir = short_dir()
    d = Daemon(d_dir, write_config(d_dir)).start()
    with Client(d.socket, "acme") as kv:
        sid = kv.register_session("chat")
        kv.put(sid, [(i, "history", block_bytes(i, 16 << 10)) for i in range(40)])
        kv.get(sid, [0, 1, 2, 39])
        kv.hint(sid, "idle")
    yield d
    d.stop()
    shutil.rmtree(d_dir, ignore_errors=True)


def kvctl(d, *args, ok=True):
    out = subprocess.run([KVCTL, *args, "--socket", d.socket], capture_output=True, text=True, timeout=30)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def js(d, *args):
    return json.loads(kvctl(d, *args, "--json").stdout)


def test_status_sessions_blocks(daemon):
    st = js(daemon, "status")
    assert [t["name"] for t in st["tiers"]] == ["dram0", "cxl0", "nvme0"]
    assert st["blocks"] == 40 and st["sessions"] == 1 and st["policy"] == "lru"
    assert sum(t["hits"] for t in st["tiers"]) == 4 and st["module"]["loaded"] in (True, False)
    assert "dram0" in kvctl(daemon, "status").stdout
    nvme = st["tiers"][2]
    assert nvme["io_mode"] in ("direct", "buffered") and nvme["flush_mode"] in ("single", "separate")
    assert nvme["flush_mode"] == "separate" or nvme["io_mode"] == "direct"
    assert st["tiers"][0]["shmem_thp"] in ("never", "advise", "within_size", "always", "deny", "force", "unavailable")
    sessions = js(daemon, "sessions")["sessions"]
    assert sessions[0]["name"] == "chat" and sessions[0]["blocks"] == 40 and sessions[0]["state"] == "idle"
    assert sum(sessions[0]["blocks_by_tier"].values()) == 40
    nvme = js(daemon, "blocks", "--tier", "nvme0")
    assert nvme["total"] > 0 and all(b["tier"] == "nvme0" for b in nvme["blocks"])
    mine = js(daemon, "blocks", "--session", str(sessions[0]["session"]), "--limit", "5")
    assert mine["total"] == 40 and len(mine["blocks"]) == 5
    every = js(daemon, "blocks", "--limit", "7")   # no filter: counted without a walk, the first 7 listed
    assert every["total"] == 40 and len(every["blocks"]) == 7 and len({b["block"] for b in every["blocks"]}) == 7
    assert every["total"] == sum(js(daemon, "blocks", "--tier", t["name"])["total"] for t in st["tiers"])
    assert admin_call(daemon.socket, "blocks", limit=2**64 - 1)["total"] == 40
    for op in ("blocks", "moves", "top"):
        with pytest.raises(DaemonError) as e:
            admin_call(daemon.socket, op, limit=-1)
        assert e.value.errno == errno.EINVAL, op


def test_explain_pin_evict(daemon):
    block = js(daemon, "blocks", "--tier", "dram0", "--limit", "1")["blocks"][0]["block"]
    ex = js(daemon, "explain", block)
    assert ex["tier"] == "dram0" and ex["policy"]["resident"] is True and "policy" in ex["why"]
    assert js(daemon, "pin", block)["blocks"] == 1
    assert "pinned" in js(daemon, "explain", block)["why"]
    out = kvctl(daemon, "evict", block, ok=False)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and "pinned" in out.stderr
    assert js(daemon, "unpin", block)["blocks"] == 1
    moved = js(daemon, "evict", block)
    assert moved["from"] == "dram0" and moved["to"] == "cxl0"
    ex = js(daemon, "explain", block)
    assert ex["tier"] == "cxl0" and any(m["reason"] == "admin" for m in ex["moves"])


def test_policy_show_set(daemon):
    assert js(daemon, "policy", "show")["policy"] == "lru"
    r = js(daemon, "policy", "set", "s3fifo")
    assert r["policy"] == "s3fifo" and js(daemon, "status")["policy"] == "s3fifo"
    out = kvctl(daemon, "policy", "set", "nope", ok=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    js(daemon, "policy", "set", "lru")


def test_errors_are_one_line(daemon, tmp_path):
    for args, code in ((["explain", "zz"], 1), (["explain", "0" * 32], 1), (["pin"], 2),
                       (["blocks", "--tier", "tape"], 1)):
        out = kvctl(daemon, *args, ok=False)
        assert out.returncode == code, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    out = subprocess.run([KVCTL, "status", "--socket", str(tmp_path / "none.sock")], capture_output=True, text=True)
    assert out.returncode == 1 and "not running" in out.stderr and len(out.stderr.strip().splitlines()) == 1
