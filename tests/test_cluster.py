"""The cluster tier on a real Mooncake Store: metadata server, master and a storage node as processes, and two
kvtierd "hosts", each in its own network namespace with its own address on a bridge the test creates.

Layout (SUBNET = 10.213.N.0/24, N random per run):
  namespace core: br0 .1 -- mooncake_http_metadata_server :8080, mooncake_master :50051, storage node
                  (mooncake_client, 128 MiB segment)
  namespace h1:   eth0 .11 -- kvtierd (cluster client, no segment)       veth to br0
  namespace h2:   eth0 .12 -- kvtierd                                     veth to br0
The test talks to the daemons over their Unix sockets (pathname sockets cross network namespaces). Every
address any process uses is loopback or in SUBNET, asserted from ss in every namespace and from the segment
names the master registered. Needs root (ip netns) and the `cluster` extra (mooncake-transfer-engine-non-cuda).
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_proc import KVCTL, Daemon, block_bytes, short_dir, wait_for
from kvtier.client import Client

BIN = Path(sys.executable).parent
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2 (ip netns)"),
    pytest.mark.skipif(not (BIN / "mooncake_master").exists(), reason="needs the cluster extra (Mooncake)"),
]

BLOCK = 256 << 10
TIMEOUT_MS = 3000   # generous: the test machine's cores are shared


def sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


class Net:
    """Namespaces core, h1, h2 joined by a bridge in core; removed (with what runs in them) by close()."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.n = random.randint(16, 250)
        self.subnet = ipaddress.ip_network(f"10.213.{self.n}.0/24")
        self.core, self.hosts = f"kvc{tag}c", [f"kvc{tag}h1", f"kvc{tag}h2"]
        self.core_ip = f"10.213.{self.n}.1"
        self.host_ips = [f"10.213.{self.n}.11", f"10.213.{self.n}.12"]
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []
        for ns in [self.core] + self.hosts:
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.core, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.core, "addr", "add", f"{self.core_ip}/24", "dev", "br0")
        sh("ip", "-n", self.core, "link", "set", "br0", "up")
        for i, (ns, ip) in enumerate(zip(self.hosts, self.host_ips)):
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.core)
            sh("ip", "-n", self.core, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def spawn(self, ns: str, argv: list, log: Path, env=None) -> subprocess.Popen:
        f = open(log, "ab")
        p = subprocess.Popen(["ip", "netns", "exec", ns] + [str(a) for a in argv], stdout=f, stderr=f,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        f.close()
        self.procs.append(p)
        return p

    def in_subnet(self, addr: str) -> bool:
        host = addr.rsplit(":", 1)[0].strip("[]")
        if host in ("*", "0.0.0.0", "::"):
            return True
        ip = ipaddress.ip_address(host.removeprefix("::ffff:"))
        return ip.is_loopback or ip in self.subnet

    def connections(self, ns: str) -> list[tuple[str, str, str]]:
        """(state, local, peer) of every TCP socket in ns but listeners."""
        out = sh("ip", "netns", "exec", ns, "ss", "-tanH").stdout
        rows = []
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 5 and f[0] != "LISTEN":
                rows.append((f[0], f[3], f[4]))
        return rows

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        for ns in self.made:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)


def daemon_config(d: Path, net: Net, i: int) -> Path:
    cfg = d / "kvtierd.toml"
    cfg.write_text(f"""
socket = "{d}/kvtierd.sock"
state_dir = "{d}/state"
policy = "lru"
metrics = ""
[blocks]
nominal_bytes = "256KiB"
[[tiers]]
name = "dram0"
kind = "dram"
nodes = [0]
capacity = "48MiB"
backend = "memfd"
[tenants.acme]
salt = "acme-salt"
[tenants.other]
salt = "other-salt"
[cluster]
master = "{net.core_ip}:50051"
metadata_server = "http://{net.core_ip}:8080/metadata"
local_hostname = "{net.host_ips[i]}"
protocol = "tcp"
buffer = "32MiB"
timeout_ms = {TIMEOUT_MS}
probe_interval_ms = 300
recompute_bytes_per_s = "1MiB"   # a slow "engine": fetching 256 KiB blocks (< 250 ms) always wins here
""")
    return cfg


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.net = Net()
        self.daemons = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        n, tmp = self.net, self.tmp
        core_env = {"MC_TCP_BIND_ADDRESS": n.core_ip}
        self.meta = n.spawn(n.core, [BIN / "mooncake_http_metadata_server", "--host", n.core_ip, "--port", "8080"],
                            tmp / "meta.log")
        self.master = n.spawn(n.core, [BIN / "mooncake_master", f"--rpc_address={n.core_ip}", "--rpc_port=50051",
                                       f"--metrics_host={n.core_ip}", "--metrics_port=9003", "--client_ttl=2",
                                       "--default_kv_lease_ttl=200", "--logtostderr"], tmp / "master.log")
        assert wait_for(lambda: ":50051" in sh("ip", "netns", "exec", n.core, "ss", "-tlnH").stdout, 15), \
            (tmp / "master.log").read_text()[-2000:]
        self.node = n.spawn(n.core, [BIN / "mooncake_client", f"--host={n.core_ip}", "--global_segment_size=128MB",
                                     "--local_buffer_size=16MB", f"--master_server_address={n.core_ip}:50051",
                                     f"--metadata_server=http://{n.core_ip}:8080/metadata", "--protocol=tcp",
                                     "--port=50052", "--logtostderr"], tmp / "node.log", env=core_env)
        assert wait_for(lambda: "Mounting segment" in (tmp / "node.log").read_text(errors="replace"), 20), \
            (tmp / "node.log").read_text()[-2000:]
        for i, ns in enumerate(n.hosts):
            d = tmp / f"h{i + 1}"
            d.mkdir()
            dm = Daemon(d, daemon_config(d, n, i))
            dm.proc = n.spawn(ns, [BIN / "kvtierd", "--config", dm.cfg, "--log-level", "info"], dm.log)
            self.daemons.append(dm)
        for dm in self.daemons:
            assert wait_for(lambda: self._up(dm), 20), dm.log.read_text()[-3000:]
            assert wait_for(lambda: self.health(dm)["state"] == "ok", 20), (self.health(dm), dm.log.read_text()[-3000:])

    @staticmethod
    def _up(dm) -> bool:
        try:
            dm.stats()
            return True
        except OSError:
            return False

    @staticmethod
    def status(dm) -> dict:
        return dm.stats()["cluster"]

    def health(self, dm) -> dict:
        return self.status(dm)["health"]

    def close(self) -> None:
        for dm in self.daemons:
            if dm.alive():
                try:
                    dm.stop(timeout_s=10)
                except TimeoutError:
                    pass
        self.net.close()


@pytest.fixture(scope="module")
def cluster():
    tmp = short_dir()
    c = None
    try:
        c = Cluster(tmp)
        yield c
    finally:
        if c is not None:
            c.close()
        shutil.rmtree(tmp, ignore_errors=True)


def healthy(c: Cluster) -> None:
    """Both daemons see the cluster as ok (a probe that timed out on a loaded machine degrades it briefly)."""
    for dm in c.daemons:
        assert wait_for(lambda: c.health(dm)["state"] == "ok", 15), c.health(dm)


def published(c: Cluster, dm, n: int) -> bool:
    st = c.status(dm)
    return st["counters"]["publishes"] >= n and st["pending_publishes"] == 0


def test_prefix_put_on_one_host_is_served_on_another(cluster):
    h1, h2 = cluster.daemons
    healthy(cluster)
    prefix = [(0x1000 + i, "prefix", block_bytes(i, BLOCK)) for i in range(6)]
    tail = [(0x2000, "tail", block_bytes(99, BLOCK))]
    with Client(h1.socket, tenant="acme") as kv:
        sid = kv.register_session("writer")
        assert kv.put(sid, prefix + tail) == 7
    assert wait_for(lambda: published(cluster, h1, 6), 10), cluster.status(h1)
    st1 = cluster.status(h1)
    assert st1["counters"]["publishes"] == 6, st1   # auto policy: shared prefixes, not the request's tail block
    with Client(h2.socket, tenant="acme") as kv:
        sid = kv.register_session("reader")
        assert kv.contains([h for h, _, _ in prefix] + [0x2000]) == ["cluster0"] * 6 + [None], cluster.status(h2)
        got = kv.get(sid, [h for h, _, _ in prefix] + [0x2000])
        assert kv.last_served == ["cluster0"] * 6 + [None], cluster.status(h2)
        for (h, _, data), g in zip(prefix, got[:6]):
            assert g is not None and bytes(g) == data, hex(h)
        assert got[6] is None
        asked, call = [], kv._call
        kv._call = lambda op, **kw: (asked.append(op), call(op, **kw))[1]
        again = kv.get(sid, [h for h, _, _ in prefix])          # now a local block of h2
        assert kv.last_served == ["dram0"] * 6
        assert "get" not in asked, asked   # read through h2's block directory: the cluster tier does not turn it off
        assert all(bytes(g) == d for g, (_, _, d) in zip(again, prefix))
    st2 = cluster.status(h2)
    assert st2["counters"]["fetches"] == 6 and st2["counters"]["fetch_bytes"] == 6 * BLOCK
    assert st2["bandwidth_bytes_per_s"] and st2["bandwidth_bytes_per_s"] > 0   # measured, for fetch-vs-recompute


def test_tenants_stay_isolated_across_hosts(cluster):
    h1, h2 = cluster.daemons
    healthy(cluster)
    import numpy as np
    # K and V of 16 tokens, 8 heads of 512: BLOCK bytes like every block here (mixed sizes fragment the one
    # small memory tier, and the engine's reserve does not evict for fragmentation)
    kv_block = (np.arange(2 * 16 * 8 * 512) % 2048).astype(np.float16).reshape(2, 16, 8, 512)
    with Client(h1.socket, tenant="acme") as kv:
        kv.put(None, [(0x3000, "prefix", block_bytes(300, BLOCK)), (0x3001, "prefix", kv_block)])
    assert wait_for(lambda: published(cluster, h1, 8), 10)
    with Client(h2.socket, tenant="acme") as kv:   # dtype and shape travel with the block
        got = kv.get(None, [0x3001])[0]
        assert got is not None and got.dtype == np.float16 and got.shape == kv_block.shape, cluster.status(h2)
        assert np.array_equal(got, kv_block)
    with Client(h2.socket, tenant="other") as kv:
        assert kv.contains([0x3000, 0x1000]) == [None, None]
        assert kv.get(None, [0x3000, 0x1000]) == [None, None]
    with Client(h2.socket, tenant="acme") as kv:
        got = kv.get(None, [0x3000])[0]
        assert got is not None and bytes(got) == block_bytes(300, BLOCK), cluster.status(h2)


def test_corrupt_remote_object_is_a_miss_not_served(cluster):
    """An object under the right key whose payload does not match its checksum (written by a Mooncake client
    in the core namespace) is reported and never served."""
    net = cluster.net
    h2 = cluster.daemons[1]
    before = cluster.status(h2)["counters"]["checksum_failures"]
    healthy(cluster)
    script = f"""
import ctypes, mmap, os, sys
from mooncake.store import MooncakeDistributedStore
from kvtier.daemon.engine import derive_key
from kvtier.store.cluster import HEADER_BYTES, pack_header
from kvtier.store.base import checksum
good, bad = os.urandom({BLOCK}), os.urandom({BLOCK})
buf = mmap.mmap(-1, HEADER_BYTES + {BLOCK})
buf[:HEADER_BYTES] = pack_header({BLOCK}, checksum(good), {{"type": 0, "meta": None, "layout": None}})
buf[HEADER_BYTES:] = bad
s = MooncakeDistributedStore()
assert s.setup("{net.core_ip}", "http://{net.core_ip}:8080/metadata", 0, 16 << 20, "tcp", "",
               "{net.core_ip}:50051") == 0
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
assert s.register_buffer(addr, len(buf)) == 0
key = "kvtier/" + derive_key(b"acme-salt", 0x4000).hex()
rc = s.put_from(key, addr, len(buf))
print("put", rc, flush=True)
s.close()
os._exit(0 if rc == 0 else 1)
"""
    r = sh("ip", "netns", "exec", net.core, sys.executable, "-c", script, check=False,
           env={**os.environ, "MC_TCP_BIND_ADDRESS": net.core_ip, "GLOG_minloglevel": "2"}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    with Client(h2.socket, tenant="acme") as kv:
        assert kv.contains([0x4000]) == ["cluster0"], cluster.status(h2)   # the object is there...
        assert kv.get(None, [0x4000]) == [None]         # ...but fails verification: a miss
        assert kv.contains([0x4000]) == ["cluster0"]    # and nothing local was kept
    st = cluster.status(h2)
    assert st["counters"]["checksum_failures"] == before + 1, st
    assert "checksum mismatch" in st["health"]["last_error"]


def test_no_address_outside_loopback_and_the_namespaces(cluster):
    net = cluster.net
    seen_master = 0
    for ns in [net.core] + net.hosts:
        for state, local, peer in net.connections(ns):
            assert net.in_subnet(local) and net.in_subnet(peer), (ns, state, local, peer)
            seen_master += ns in net.hosts and peer == f"{net.core_ip}:50051"
    assert seen_master >= 2   # both daemons talk to the master at its namespace address
    segs = set(re.findall(r"segment_name=([^\s,]+)", (cluster.tmp / "master.log").read_text(errors="replace")))
    assert segs and all(s.rsplit(":", 1)[0] in [net.core_ip] + net.host_ips for s in segs), segs


def test_kvctl_shows_the_cluster_tier_and_its_health(cluster):
    h1 = cluster.daemons[0]
    r = subprocess.run([KVCTL, "status", "--socket", h1.socket, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    row = [t for t in st["tiers"] if t["kind"] == "cluster"]
    assert row and row[0]["name"] == "cluster0" and row[0]["health"]["state"] == "ok"
    r = subprocess.run([KVCTL, "status", "--socket", h1.socket], capture_output=True, text=True)
    assert r.returncode == 0 and "cluster0" in r.stdout and "mooncake" in r.stdout, r.stdout + r.stderr
    assert re.search(r"cluster cluster0 \(10\.213\.\d+\.11 -> master .*\): ok; published \d+", r.stdout), r.stdout
    r = subprocess.run([KVCTL, "tiers", "--socket", h1.socket, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["daemon"]["cluster"]["health"]["state"] == "ok"


def test_evicted_reused_blocks_are_published_and_deletes_leave_the_cluster(cluster):
    """Auto policy at eviction: history blocks pushed out of h1's only tier go to the cluster (tail blocks
    would not), and h2 fetches them; a tenant's delete removes the cluster copy too."""
    h1, h2 = cluster.daemons
    healthy(cluster)
    before = cluster.status(h1)["counters"]["publishes"]
    with Client(h1.socket, tenant="acme") as kv:
        for i in range(240):   # 60 MiB through a 48 MiB tier: the oldest are evicted
            kv.put(None, [(0x8000 + i, "history", block_bytes(800 + i, BLOCK))])
    assert wait_for(lambda: published(cluster, h1, before + 5), 10), cluster.status(h1)
    with Client(h1.socket, tenant="acme") as kv:
        assert kv.contains([0x8000]) == ["cluster0"]   # gone from h1's memory, in the cluster
    with Client(h2.socket, tenant="acme") as kv:
        got = kv.get(None, [0x8000])[0]
        assert got is not None and bytes(got) == block_bytes(800, BLOCK), cluster.status(h2)
        assert kv.last_served == ["cluster0"]
    with Client(h1.socket, tenant="acme") as kv, Client(h2.socket, tenant="acme") as other:
        kv.put(None, [(0x8100, "prefix", block_bytes(900, BLOCK))])
        assert wait_for(lambda: published(cluster, h1, cluster.status(h1)["counters"]["publishes"]), 5)
        assert wait_for(lambda: kv.contains([0x8100]) == ["dram0"], 5)
        # h2 asks first: Mooncake's existence check grants a read lease, and asking every 50 ms (its TTL here is
        # 200 ms) renews it for ever; the remove, refused for it, is forced after a few tries (REMOVE_FORCE_AFTER)
        assert other.contains([0x8100]) == ["cluster0"]
        assert kv.delete([0x8100]) == 1
        assert wait_for(lambda: other.contains([0x8100]) == [None], 5), cluster.status(h1)


def test_unreachable_host_link_is_a_bounded_miss(cluster):
    """h2's link down: a lookup waits at most the timeout, then misses; health says why; local blocks serve."""
    net, h2 = cluster.net, cluster.daemons[1]
    with Client(h2.socket, tenant="acme") as kv:
        kv.put(None, [(0x5000, "tail", block_bytes(500, BLOCK))])
    sh("ip", "-n", net.hosts[1], "link", "set", "eth0", "down")
    try:
        with Client(h2.socket, tenant="acme") as kv:
            t0 = time.monotonic()
            assert kv.get(None, [0x3fff]) == [None]
            assert time.monotonic() - t0 < 3 * TIMEOUT_MS / 1000 + 2
            assert bytes(kv.get(None, [0x5000])[0]) == block_bytes(500, BLOCK)
        assert wait_for(lambda: cluster.health(h2)["state"] != "ok", 10), cluster.health(h2)
        assert cluster.health(h2)["reason"]
    finally:
        sh("ip", "-n", net.hosts[1], "link", "set", "eth0", "up")
    assert wait_for(lambda: cluster.health(h2)["state"] == "ok", 30), cluster.health(h2)


def test_storage_node_down_degrades_without_corruption(cluster):
    h1, h2 = cluster.daemons
    healthy(cluster)
    before = cluster.status(h1)["counters"]["publishes"]
    with Client(h1.socket, tenant="acme") as kv:
        kv.put(None, [(0x6000 + i, "prefix", block_bytes(600 + i, BLOCK)) for i in range(3)])
    assert wait_for(lambda: published(cluster, h1, before + 3), 10), cluster.status(h1)
    os.killpg(cluster.node.pid, signal.SIGKILL)
    cluster.node.wait()
    assert wait_for(lambda: cluster.health(h1)["state"] == "degraded", 10), cluster.health(h1)
    assert re.search(r"storage node|segment", cluster.health(h1)["reason"]), cluster.health(h1)
    c0 = cluster.status(h1)["counters"]
    with Client(h1.socket, tenant="acme") as kv:    # not published (skipped or failed, reported), served locally
        kv.put(None, [(0x7000, "prefix", block_bytes(700, BLOCK))])
        assert bytes(kv.get(None, [0x7000])[0]) == block_bytes(700, BLOCK)
    c1 = cluster.status(h1)["counters"]
    assert c1["publishes"] == c0["publishes"]
    assert c1["publish_skipped"] + c1["publish_failures"] > c0["publish_skipped"] + c0["publish_failures"]
    with Client(h2.socket, tenant="acme") as kv:
        t0 = time.monotonic()
        got = kv.get(None, [0x6000, 0x6001, 0x6002, 0x1000])
        assert time.monotonic() - t0 < 3 * TIMEOUT_MS / 1000 + 2
        assert got[:3] == [None, None, None]                     # the objects' node is gone: misses
        assert bytes(got[3]) == block_bytes(0, BLOCK)            # fetched earlier: a local block, intact
    assert wait_for(lambda: cluster.health(h2)["state"] == "degraded", 10), cluster.health(h2)
    for dm in (h1, h2):
        assert dm.alive()


def test_metadata_server_and_master_down_degrade_with_reason_and_daemons_stop_cleanly(cluster):
    h1, h2 = cluster.daemons
    os.killpg(cluster.meta.pid, signal.SIGKILL)
    cluster.meta.wait()
    for dm in (h1, h2):
        assert wait_for(lambda: "metadata server" in cluster.health(dm)["reason"], 15), cluster.health(dm)
    os.killpg(cluster.master.pid, signal.SIGKILL)
    cluster.master.wait()
    for dm in (h1, h2):
        assert wait_for(lambda: "master" in cluster.health(dm)["reason"], 15), cluster.health(dm)
        assert cluster.health(dm)["state"] == "degraded"
    with Client(h1.socket, tenant="acme") as kv:
        t0 = time.monotonic()
        assert kv.get(None, [0x9999]) == [None]
        assert time.monotonic() - t0 < 3 * TIMEOUT_MS / 1000 + 2
        kv.put(None, [(0x9000, "tail", block_bytes(9000, BLOCK))])
        assert bytes(kv.get(None, [0x9000])[0]) == block_bytes(9000, BLOCK)
    for dm in (h1, h2):
        assert dm.stop(timeout_s=15) == 0, dm.log.read_text()[-2000:]
        assert "Traceback" not in dm.log.read_text(errors="replace"), dm.log.read_text()[-3000:]


def test_unreachable_cluster_at_start_leaves_the_daemon_serving(tmp_path):
    """Nothing listens at the master or metadata address: the daemon starts, serves its local tier, reports the
    cluster tier down with the reason, and stops at once (a Mooncake setup against an unreachable metadata server
    would hold the GIL: it is never attempted)."""
    d = short_dir()
    cfg = d / "kvtierd.toml"
    cfg.write_text(f'socket = "{d}/kvtierd.sock"\nstate_dir = "{d}/state"\nmetrics = ""\n'
                   '[[tiers]]\nname = "dram0"\nkind = "dram"\ncapacity = "16MiB"\nbackend = "memfd"\n'
                   '[cluster]\nmaster = "127.0.0.1:9"\nmetadata_server = "http://127.0.0.1:9/metadata"\n'
                   'timeout_ms = 500\nprobe_interval_ms = 200\n')
    dm = Daemon(d, cfg).start()
    try:
        assert wait_for(lambda: dm.stats()["cluster"]["health"]["state"] == "down", 5)
        h = dm.stats()["cluster"]["health"]
        assert "master 127.0.0.1:9 unreachable" in h["reason"], h
        with Client(dm.socket, tenant="t") as kv:
            t0 = time.monotonic()
            kv.put(None, [(1, "prefix", b"x" * 4096)])
            assert bytes(kv.get(None, [1])[0]) == b"x" * 4096
            assert kv.get(None, [2]) == [None]
            assert time.monotonic() - t0 < 2
        t0 = time.monotonic()
        assert dm.stop() == 0
        assert time.monotonic() - t0 < 5
    finally:
        if dm.alive():
            dm.kill9()
        shutil.rmtree(d, ignore_errors=True)


def test_bad_cluster_config_is_one_line_exit_2(tmp_path):
    base = f'socket = "{tmp_path}/s.sock"\nstate_dir = "{tmp_path}"\nmetrics = ""\n'
    cases = {
        '[cluster]\nmetadata_server = "http://127.0.0.1:8080/metadata"\n': "cluster.master: missing",
        '[cluster]\nmaster = "nohost"\nmetadata_server = "http://127.0.0.1:8080/metadata"\n': "cluster.master",
        '[cluster]\nmaster = "127.0.0.1:50051"\nmetadata_server = "ftp://x"\n': "cluster.metadata_server",
        '[cluster]\nmaster = "127.0.0.1:50051"\nmetadata_server = "http://a:1/metadata"\nprotocol = "udp"\n':
            "cluster.protocol",
        '[cluster]\nmaster = "127.0.0.1:50051"\nmetadata_server = "http://a:1/metadata"\ntimeout_ms = 0\n':
            "cluster.timeout_ms",
        '[cluster]\nmaster = "127.0.0.1:50051"\nmetadata_server = "http://a:1/metadata"\nbuffer = "-1"\n':
            "cluster.buffer",
        '[cluster]\nmaster = "127.0.0.1:50051"\nmetadata_server = "http://a:1/metadata"\nbogus = 1\n':
            "cluster.bogus",
        'cluster = 3\n': "cluster: expected a table",
    }
    for text, want in cases.items():
        p = tmp_path / "c.toml"
        p.write_text(base + text)
        r = subprocess.run([str(BIN / "kvtierd"), "--config", str(p), "--check"], capture_output=True, text=True)
        assert r.returncode == 2 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1, (text, r.stderr)
    p.write_text(base + '[cluster]\nmaster = "127.0.0.1:50051"\nmetadata_server = "http://127.0.0.1:8080/metadata"\n')
    r = subprocess.run([str(BIN / "kvtierd"), "--config", str(p), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_fetch_versus_recompute_uses_the_measured_tier():
    from kvtier.store.cluster import ClusterConfig, ClusterTier
    t = ClusterTier(ClusterConfig(master="127.0.0.1:1", metadata_server="http://127.0.0.1:2/metadata",
                                  recompute_bytes_per_s=1 << 30))
    assert t.worth_fetching(1 << 20)            # nothing measured yet: fetch, and measure
    t._measure(100, 200e-6)                      # 200 us per small call
    t._measure(8 << 20, 1.0)                     # the first transfer opens a connection: not a sample
    assert t.fetch_estimate_us(1 << 20) is None
    t._measure(8 << 20, 8e-3)                    # 8 MiB in 8 ms: 1 MiB costs 1000 us more
    assert abs(t.fetch_estimate_us(1 << 20) - 1200) < 1
    assert not t.worth_fetching(1 << 20)         # 1.2 ms to fetch vs 0.98 ms to recompute: recompute
    t.cfg.recompute_bytes_per_s = 256 << 20
    assert t.worth_fetching(1 << 20)             # a slower engine: fetch
    assert t.stats()["fetch_skipped_recompute"] == 1
    t.cfg.fetch = "never"
    assert not t.worth_fetching(1)
    t.close()


def test_a_remove_refused_for_a_read_lease_is_retried_with_backoff_then_forced():
    """Mooncake refuses a remove while a reader holds a lease (-706): the tier tries again with backoff, and
    stops when it is gone; a lease renewed all along (a host that keeps asking) is overridden by a forced remove."""
    from kvtier.store.cluster import REMOVE_FORCE_AFTER, ClusterConfig, ClusterTier

    class Store:
        def __init__(self, refusals):
            self.refusals, self.calls = refusals, []

        def remove(self, okey, force=False):
            self.calls.append((time.monotonic(), force))
            return 0 if force or len(self.calls) > self.refusals else -706

    t = ClusterTier(ClusterConfig(master="127.0.0.1:1", metadata_server="http://127.0.0.1:2/metadata"))
    try:
        t._store = store = Store(refusals=2)   # the lease ends while the tier backs off
        t0 = time.monotonic()
        t.remove(b"\x01" * 16)
        assert wait_for(lambda: len(store.calls) == 3, 5), store.calls
        time.sleep(0.5)
        assert [f for _, f in store.calls] == [False] * 3      # removed without force: no further tries
        gaps = [b - a for a, b in zip([t0] + [c for c, _ in store.calls], [c for c, _ in store.calls])]
        assert gaps[2] > gaps[1], gaps   # backing off
        t._store = store = Store(refusals=1 << 30)   # a lease renewed for ever
        t0 = time.monotonic()
        t.remove(b"\x02" * 16)
        assert wait_for(lambda: store.calls and store.calls[-1][1], 5), store.calls
        time.sleep(0.5)
        assert [f for _, f in store.calls] == [False] * REMOVE_FORCE_AFTER + [True], store.calls
        assert store.calls[-1][0] - t0 < 2.0
        assert t.stats()["remove_failures"] == 0
    finally:
        t._store = None
        t.close()
