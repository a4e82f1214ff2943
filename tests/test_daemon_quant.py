"""Quantisation through the daemon: a real kvtierd whose NVMe tier has codec = {quantization = "int8",
error_bound = ...}; KV blocks put with a layout come back from NVMe within the bound (and the error is reported
by kvctl status --json and the metrics), blocks without a layout or marked lossless come back byte-identical."""
from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest

from daemon_proc import KVCTL, KVTIERD, Daemon, short_dir
from kvtier.client import Client, DaemonError, admin_call
from kvtier.errors import InputError

TOKENS, HEADS, HEAD_DIM = 16, 4, 64   # a block: [2, 16, 4, 64] fp16 = 16 KiB


def config(d, quant="int8", bound=0.02, metrics='""'):
    cfg = d / "kvtierd.toml"
    cfg.write_text(f"""
socket = "{d}/kvtierd.sock"
state_dir = "{d}/state"
policy = "lru"
metrics = {metrics}
[blocks]
nominal_bytes = "16KiB"
[[tiers]]
name = "dram0"
kind = "dram"
capacity = "4MiB"
[[tiers]]
name = "nvme0"
kind = "nvme"
directory = "{d}/state/nvme"
capacity = "32MiB"
codec = {{ quantization = "{quant}", error_bound = {bound} }}
""")
    return cfg


@pytest.fixture
def daemon_dir():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def kv_block(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, TOKENS, HEADS, HEAD_DIM)).astype(np.float16)


def spill(sock: str, kv: Client, hashes) -> None:
    """Evict the blocks to the NVMe tier (dram0 -> nvme0) and check they are there."""
    for b in admin_call(sock, "blocks", tier="dram0", limit=1000)["blocks"]:
        admin_call(sock, "evict", block=b["block"])
    assert kv.contains(hashes) == ["nvme0"] * len(hashes)


def rel_rms(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a * a)))


def test_quantised_spill_within_bound_and_reported(daemon_dir):
    d = Daemon(daemon_dir, config(daemon_dir, metrics='"127.0.0.1:0"')).start()
    try:
        blocks = {i: kv_block(i) for i in range(1, 7)}
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(i, "history", blocks[i]) for i in (1, 2)], layout="auto")
            kv.put(None, [(3, "history", blocks[3])], layout=("fp16", TOKENS, HEADS, HEAD_DIM))
            kv.put(None, [(4, "history", blocks[4])])                                    # no layout
            kv.put(None, [(5, "history", blocks[5])], layout="auto", lossless=True)     # marked lossless
            kv.put(None, [(6, "history", blocks[6])], layout="auto", durable=True)      # written through
            spill(d.socket, kv, list(blocks))
            got = dict(zip(blocks, kv.get(None, list(blocks))))
        for i in (1, 2, 3, 6):
            assert got[i].dtype == np.float16 and got[i].shape == blocks[i].shape
            assert not np.array_equal(got[i], blocks[i]), f"block {i} came back exact: not quantised"
            assert rel_rms(blocks[i], got[i]) <= 0.02, i
        for i in (4, 5):
            assert got[i].tobytes() == blocks[i].tobytes(), f"block {i} should be byte-identical"

        out = subprocess.run([KVCTL, "status", "--json", "--socket", d.socket], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        nvme = [t for t in json.loads(out.stdout)["tiers"] if t["name"] == "nvme0"][0]
        q = nvme["quant"]
        assert q["codec"] == "int8" and q["error_bound"] == 0.02
        assert q["quantised_blocks"] >= 4 and q["skipped_no_layout"] >= 1
        worst = max(rel_rms(blocks[i], got[i]) for i in (1, 2, 3, 6))
        # the reported error is the one measured at encode time, i.e. what the client got back
        assert 0 < q["rel_rms_max"] <= 0.02 and abs(q["rel_rms_max"] - worst) < 1e-3
        seen = max(float(np.abs(blocks[i].astype(np.float32) - got[i]).max()) for i in (1, 2, 3, 6))
        assert q["max_abs"] >= seen - 1e-3

        port = d.stats()["metrics_port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        line = [x for x in text.splitlines() if x.startswith('kvtier_quant_error{measure="rel_rms_max"')
                or x.startswith('kvtier_quant_error{tier="nvme0",measure="rel_rms_max"')]
        assert line and abs(float(line[0].split()[-1]) - q["rel_rms_max"]) < 1e-9, text[-800:]
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]


def test_block_over_the_bound_is_stored_lossless(daemon_dir):
    # int4 of random data misses a 1% bound: the tier stores such a block exactly and counts it
    d = Daemon(daemon_dir, config(daemon_dir, quant="int4", bound=0.01)).start()
    try:
        a = kv_block(11)
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(11, "history", a)], layout="auto")
            spill(d.socket, kv, [11])
            got = kv.get(None, [11])[0]
        assert got.tobytes() == a.tobytes()
        q = [t for t in d.stats()["tiers"] if t["name"] == "nvme0"][0]["quant"]
        assert q["refused_over_bound"] == 1 and q["quantised_blocks"] == 0
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]


def test_quantised_blocks_survive_restart(daemon_dir):
    cfg = config(daemon_dir)
    d = Daemon(daemon_dir, cfg).start()
    a = kv_block(21)
    try:
        with Client(d.socket, "acme") as kv:
            kv.put(None, [(21, "history", a)], layout="auto")
            spill(d.socket, kv, [21])
    finally:
        assert d.stop() == 0
    d = Daemon(daemon_dir, cfg).start()
    try:
        with Client(d.socket, "acme") as kv:
            got = kv.get(None, [21])[0]
            assert kv.get(None, [21], )[0].shape == a.shape   # served from memory now, same values
        assert got.shape == a.shape and not np.array_equal(got, a) and rel_rms(a, got) <= 0.02
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]


def test_bad_layout_is_an_input_error(daemon_dir):
    d = Daemon(daemon_dir, config(daemon_dir)).start()
    try:
        with Client(d.socket, "acme") as kv:
            with pytest.raises(InputError, match="layout"):
                kv.put(None, [(31, "history", kv_block(31))], layout=("fp16", TOKENS, HEADS, HEAD_DIM * 2))
            with pytest.raises(InputError, match="layout"):
                kv.put(None, [(32, "history", b"x" * 1024)], layout="auto")
            with pytest.raises(InputError, match="layout"):
                kv.put(None, [(33, "history", kv_block(33))], layout=("fp8", TOKENS, HEADS, HEAD_DIM))
            # the daemon checks it too (a client that skips the library's check)
            with pytest.raises(DaemonError, match="layout") as e:
                kv.call("put", blocks=[[34, "history", 16384, None, ["fp16", 1, 1, 1]]])
            assert e.value.errno == 22
            assert kv.contains([31, 32, 33, 34]) == [None] * 4
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]


def test_bad_codec_config_names_the_key(daemon_dir):
    cfg = config(daemon_dir)
    cfg.write_text(cfg.read_text().replace('error_bound = 0.02', 'error_bound = 2'))
    out = subprocess.run([KVTIERD, "--config", str(cfg), "--check"], capture_output=True, text=True)
    assert out.returncode == 2 and "tiers[1].codec.error_bound" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
