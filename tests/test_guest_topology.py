"""What each tools/vmtest guest topology promises, checked inside the guest.

plain: one node with the CPUs; numa: a memory-only node 1 in the same memory tier as node 0;
tiered: a memory-only node 1 onlined from device-dax (ZONE_MOVABLE) in a lower memory tier.
Also the guest environment every later guest test relies on (mounts, loopback, modules, the venv).
"""
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NODES = Path("/sys/devices/system/node")
TIERS = Path("/sys/devices/virtual/memory_tiering")
MIB = 1 << 20


def parse_list(text):
    """A kernel cpulist/nodelist ("0-2,5") as a sorted list of ints."""
    numbers = []
    for part in filter(None, text.strip().split(",")):
        low, _, high = part.partition("-")
        numbers.extend(range(int(low), int(high or low) + 1))
    return numbers


def node_mem_bytes(node):
    for line in (NODES / f"node{node}" / "meminfo").read_text().splitlines():
        if "MemTotal:" in line:
            return int(line.split()[-2]) * 1024
    raise AssertionError(f"no MemTotal for node {node}")


def tier_of(node):
    """The memory tier id holding `node` (a larger id is a slower tier)."""
    for tier in TIERS.glob("memory_tier*"):
        if node in parse_list((tier / "nodelist").read_text()):
            return int(tier.name.removeprefix("memory_tier"))
    raise AssertionError(f"node {node} is in no memory tier: {sorted(t.name for t in TIERS.glob('memory_tier*'))}")


@pytest.mark.guest
def test_harness_names_the_topology_and_kernel(topology):
    assert os.environ["KVTIER_GUEST_TOPOLOGY"] == topology
    assert os.environ["KVTIER_KVER"] == os.uname().release
    assert os.uname().release.startswith("6.1.")


@pytest.mark.guest
def test_node_layout(topology):
    nodes = parse_list((NODES / "online").read_text())
    assert nodes == ([0] if topology == "plain" else [0, 1])
    assert parse_list((NODES / "node0" / "cpulist").read_text()) == [0, 1]
    assert node_mem_bytes(0) > 768 * MIB
    if topology != "plain":
        assert parse_list((NODES / "node1" / "cpulist").read_text()) == []
        assert 896 * MIB <= node_mem_bytes(1) <= 1024 * MIB


@pytest.mark.guest("numa")
def test_numa_memory_only_node_shares_the_dram_tier():
    # This 6.1 kernel ranks a plain CPU-less node like DRAM; only device-dax/kmem memory goes lower.
    assert tier_of(1) == tier_of(0)


@pytest.mark.guest("tiered")
def test_tiered_node1_is_a_lower_tier_of_movable_memory():
    assert tier_of(1) > tier_of(0)
    zones = Path("/proc/zoneinfo").read_text().split("\nNode ")
    node1_movable = [zone for zone in zones if zone.split()[:3] == ["1,", "zone", "Movable"]]
    assert node1_movable, "node 1 has no Movable zone"
    managed = next(line for line in node1_movable[0].splitlines() if line.strip().startswith("managed"))
    assert int(managed.split()[-1]) * os.sysconf("SC_PAGE_SIZE") >= 896 * MIB
    assert Path("/sys/bus/dax/devices/dax0.0").exists()


@pytest.mark.guest
def test_guest_environment(topology):
    mounts = {fields[1]: fields[2]
              for fields in (line.split() for line in Path("/proc/mounts").read_text().splitlines())}
    expected = {"/": "overlay", str(REPO): "9p", "/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs",
                "/dev/pts": "devpts", "/dev/shm": "tmpfs", "/tmp": "tmpfs", "/sys/kernel/tracing": "tracefs",
                "/sys/kernel/debug": "debugfs", "/sys/fs/bpf": "bpf", "/sys/fs/cgroup": "cgroup2"}
    assert {path: mounts.get(path) for path in expected} == expected
    assert os.getcwd() == str(REPO)
    assert os.geteuid() == 0
    assert socket.gethostname() == f"vmtest-{topology}"
    assert Path(f"/lib/modules/{os.uname().release}/modules.dep").exists()
    # The overlay root and the repository share are writable.
    Path("/var/tmp/vmtest-probe").write_text("x")
    probe = REPO / ".vmtest" / f"guest-probe-{os.getpid()}"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text("x")
    probe.unlink()


@pytest.mark.guest
def test_loopback_serves_tcp():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(4) == b"ping"


@pytest.mark.guest
def test_repository_venv_imports_the_native_numa_binding():
    import kvtier.numa

    assert kvtier.numa.PAGE_SIZE == os.sysconf("SC_PAGE_SIZE")
