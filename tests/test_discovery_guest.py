"""`kvctl tiers --json` in the QEMU guest, checked against what the guest's own sysfs says.

Run with: tools/vmtest --topology tiered -- .venv/bin/python -m pytest -q -m guest tests/test_discovery_guest.py
(and --topology plain, numa).
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

GIB = 1 << 30
KVCTL = str(Path(sys.executable).parent / "kvctl")
NODE_DIR = Path("/sys/devices/system/node")
TIERING_DIR = Path("/sys/devices/virtual/memory_tiering")


def kvctl_tiers(*args):
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_NVME_DIRS"}
    proc = subprocess.run([KVCTL, "tiers", "--json", *args], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sysfs_list(path: Path) -> list[int]:
    out = []
    for part in path.read_text().strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    return out


def mem_total_bytes(node: int) -> int:
    for line in (NODE_DIR / f"node{node}/meminfo").read_text().splitlines():
        if "MemTotal:" in line:
            return int(line.split()[3]) * 1024
    raise AssertionError(f"no MemTotal for node {node}")


def kernel_memory_tier(node: int) -> int:
    for tier in TIERING_DIR.glob("memory_tier*"):
        if node in sysfs_list(tier / "nodelist"):
            return int(tier.name[len("memory_tier"):])
    raise AssertionError(f"node {node} is in no memory tier")


def memory_tiers(data):
    return [t for t in data["tiers"] if t["kind"] in ("dram", "cxl")]


@pytest.mark.guest("plain")
def test_plain_one_dram_tier():
    data = kvctl_tiers()
    assert sysfs_list(NODE_DIR / "online") == [0]
    tiers = memory_tiers(data)
    assert [(t["kind"], t["nodes"]) for t in tiers] == [("dram", [0])]
    assert tiers[0]["capacity_bytes"] == mem_total_bytes(0)
    assert [n["id"] for n in data["nodes"]] == [0]


@pytest.mark.guest("numa")
def test_numa_cpuless_node_inside_dram_tier():
    data = kvctl_tiers()
    assert sysfs_list(NODE_DIR / "online") == [0, 1]
    assert sysfs_list(NODE_DIR / "node1/cpulist") == []
    # Linux 6.1 puts a plain CPU-less node in DRAM's memory tier; kvctl follows the kernel.
    assert kernel_memory_tier(1) == kernel_memory_tier(0)
    tiers = memory_tiers(data)
    assert [(t["kind"], t["nodes"]) for t in tiers] == [("dram", [0, 1])]
    assert tiers[0]["capacity_bytes"] == mem_total_bytes(0) + mem_total_bytes(1)
    nodes = {n["id"]: n for n in data["nodes"]}
    assert nodes[1]["has_cpu"] is False and nodes[1]["cpus"] == [] and nodes[1]["has_memory"] is True
    assert nodes[0]["has_cpu"] is True
    sysfs_distance = int((NODE_DIR / "node1/distance").read_text().split()[0])
    assert nodes[1]["distances"]["0"] == sysfs_distance > nodes[1]["distances"]["1"] == 10


@pytest.mark.guest("tiered")
def test_tiered_node1_is_lower_cxl_tier():
    data = kvctl_tiers()
    assert kernel_memory_tier(1) > kernel_memory_tier(0)
    tiers = memory_tiers(data)
    by_kind = {t["kind"]: t for t in tiers}
    assert set(by_kind) == {"dram", "cxl"} and len(tiers) == 2
    dram, cxl = by_kind["dram"], by_kind["cxl"]
    assert dram["nodes"] == [0] and cxl["nodes"] == [1]
    assert cxl["rank"] > dram["rank"]
    assert (dram["memory_tier"], cxl["memory_tier"]) == (kernel_memory_tier(0), kernel_memory_tier(1))
    assert cxl["capacity_bytes"] == mem_total_bytes(1)
    assert 0.5 * GIB <= cxl["capacity_bytes"] <= 1.1 * GIB    # the 1 GiB NVDIMM, less its metadata
    assert 0 < cxl["free_bytes"] <= cxl["capacity_bytes"]
    nodes = {n["id"]: n for n in data["nodes"]}
    assert nodes[1]["has_cpu"] is False and nodes[1]["memory_tier"] == kernel_memory_tier(1)


@pytest.mark.guest()
def test_nvme_dir_on_tmpfs_reports_o_direct():
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        data = kvctl_tiers("--nvme-dir", d)
        nvme = [t for t in data["tiers"] if t["kind"] == "nvme"]
        assert len(nvme) == 1 and nvme[0]["paths"] == [d]
        assert nvme[0]["rank"] == max(t["rank"] for t in data["tiers"])
        assert nvme[0]["details"]["fs_type"] == "tmpfs"
        st = os.statvfs(d)
        assert nvme[0]["capacity_bytes"] == st.f_blocks * st.f_frsize
        major, minor = (int(x) for x in platform.release().split(".")[:2])
        if (major, minor) < (6, 6):     # tmpfs learned O_DIRECT in 6.6
            assert nvme[0]["details"]["o_direct"] is False
            assert "O_DIRECT" in nvme[0]["details"]["o_direct_error"]
        assert os.listdir(d) == []


@pytest.mark.guest()
def test_gpu_absent_in_guest():
    data = kvctl_tiers()
    assert data["gpu"]["present"] is False and data["gpu"]["reason"]
