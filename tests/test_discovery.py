"""Tier discovery on fake sysfs trees (plain, numa, tiered, HMAT, no memory_tiering), NVMe
directories, the GPU probe through a fake driver, and `kvctl tiers` on this host."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from kvtier import discovery
from kvtier.cli import cli, run
from kvtier.cli.common import human_bytes
from kvtier.cli.tiers import render
from kvtier.cuda.discover import Gpu, GpuReport, discover_gpus
from kvtier.errors import InputError

GIB = 1 << 30
KVCTL = str(Path(sys.executable).parent / "kvctl")
NO_GPU = GpuReport(False, reason="test: no GPU")


def _fmt(ids):
    return ",".join(str(i) for i in ids)


def make_sysfs(root: Path, nodes: dict, memory_tiers: dict | None = None, hmat: dict | None = None):
    """A fake /sys. nodes: id -> (cpus, mem_total_bytes, mem_free_bytes, distances list);
    memory_tiers: tier id -> node ids; hmat: node -> {accessN: (initiators, rbw, rlat, wbw, wlat)}."""
    ndir = root / "devices/system/node"
    ndir.mkdir(parents=True)
    ids = sorted(nodes)
    (ndir / "online").write_text(_fmt(ids) + "\n")
    (ndir / "has_cpu").write_text(_fmt(i for i in ids if nodes[i][0]) + "\n")
    (ndir / "has_memory").write_text(_fmt(i for i in ids if nodes[i][1]) + "\n")
    for nid, (cpus, total, free, distances) in nodes.items():
        d = ndir / f"node{nid}"
        d.mkdir()
        (d / "cpulist").write_text(_fmt(cpus) + "\n")
        (d / "distance").write_text(" ".join(map(str, distances)) + "\n")
        (d / "meminfo").write_text(
            f"Node {nid} MemTotal:       {total // 1024} kB\n"
            f"Node {nid} MemFree:        {free // 1024} kB\n"
            f"Node {nid} MemUsed:        {(total - free) // 1024} kB\n"
            f"Node {nid} HugePages_Total:     0\n")
    if memory_tiers is not None:
        tdir = root / "devices/virtual/memory_tiering"
        tdir.mkdir(parents=True)
        (tdir / "uevent").write_text("")
        for tier_id, members in memory_tiers.items():
            (tdir / f"memory_tier{tier_id}").mkdir()
            (tdir / f"memory_tier{tier_id}" / "nodelist").write_text(_fmt(members) + "\n")
    for nid, classes in (hmat or {}).items():
        for access, (initiators, rbw, rlat, wbw, wlat) in classes.items():
            idir = ndir / f"node{nid}" / access / "initiators"
            idir.mkdir(parents=True)
            for i in initiators:
                (idir / f"node{i}").symlink_to(ndir / f"node{i}")
            for name, value in (("read_bandwidth", rbw), ("read_latency", rlat),
                                ("write_bandwidth", wbw), ("write_latency", wlat)):
                (idir / name).write_text(f"{value}\n")
    return str(root)


PLAIN = {0: ([0, 1], 2 * GIB, GIB + 12345 * 1024, [10])}
NUMA = {0: ([0, 1], GIB, 700 * 1024 * 1024, [10, 20]),
        1: ([], GIB, 1000 * 1024 * 1024, [20, 10])}


def test_plain_one_dram_tier(tmp_path):
    root = make_sysfs(tmp_path, PLAIN, {4: [0]})
    tiers = discovery.discover(sysfs_root=root, gpus=NO_GPU)
    assert [(t.name, t.kind, t.rank, t.nodes) for t in tiers] == [("dram", "dram", 0, [0])]
    assert tiers[0].capacity_bytes == PLAIN[0][1]
    assert tiers[0].free_bytes == PLAIN[0][2]
    assert tiers[0].memory_tier == 4


def test_numa_cpuless_node_stays_in_dram_tier_when_kernel_says_so(tmp_path):
    root = make_sysfs(tmp_path, NUMA, {4: [0, 1]})
    tiers = discovery.discover(sysfs_root=root, gpus=NO_GPU)
    assert [(t.kind, t.nodes) for t in tiers] == [("dram", [0, 1])]
    assert tiers[0].capacity_bytes == 2 * GIB
    assert tiers[0].free_bytes == 1700 * 1024 * 1024
    assert tiers[0].details["cpuless_nodes"] == [1]
    topo = discovery.read_topology(root)
    node1 = topo.node(1)
    assert not node1.has_cpu and node1.has_memory and node1.cpus == []
    assert node1.distances == {0: 20, 1: 10}
    assert topo.distance_to_cpu(1) == 20 > topo.distance_to_cpu(0) == 10
    assert topo.cpu_nodes == [0] and topo.memory_nodes == [0, 1]


def test_tiered_lower_memory_tier_is_cxl(tmp_path):
    root = make_sysfs(tmp_path, NUMA, {22: [1], 4: [0]})
    tiers = discovery.discover(sysfs_root=root, gpus=NO_GPU)
    assert [(t.name, t.kind, t.rank, t.nodes, t.memory_tier) for t in tiers] == [
        ("dram", "dram", 0, [0], 4), ("cxl0", "cxl", 1, [1], 22)]
    assert tiers[1].capacity_bytes == GIB and tiers[1].free_bytes == 1000 * 1024 * 1024
    assert discovery.read_topology(root).node(1).memory_tier == 22


def test_memoryless_node_is_ignored_and_several_cxl_tiers_ordered(tmp_path):
    nodes = {0: ([0], GIB, GIB // 2, [10, 20, 30, 11]),
             1: ([], 2 * GIB, GIB, [20, 10, 30, 20]),
             2: ([], 4 * GIB, 3 * GIB, [30, 30, 10, 30]),
             3: ([1], 0, 0, [11, 20, 30, 10])}          # CPUs but no memory
    root = make_sysfs(tmp_path, nodes, {4: [0, 3], 22: [1], 30: [2]})
    tiers = discovery.discover(sysfs_root=root, gpus=NO_GPU)
    assert [(t.name, t.rank, t.nodes) for t in tiers] == [
        ("dram", 0, [0]), ("cxl0", 1, [1]), ("cxl1", 2, [2])]
    assert tiers[2].capacity_bytes == 4 * GIB
    assert not discovery.read_topology(root).node(3).has_memory


def test_without_memory_tiering_cpuless_nodes_are_cxl_by_distance(tmp_path):
    nodes = {0: ([0, 1], GIB, GIB // 2, [10, 40, 20]),
             1: ([], GIB, GIB, [40, 10, 40]),
             2: ([], 3 * GIB, 2 * GIB, [20, 40, 10])}
    root = make_sysfs(tmp_path, nodes, memory_tiers=None)
    topo = discovery.read_topology(root)
    assert topo.memory_tiers is None and topo.node(0).memory_tier is None
    tiers = discovery.discover(sysfs_root=root, gpus=NO_GPU)
    # node 2 is nearer to the CPUs (20) than node 1 (40), so it ranks first.
    assert [(t.name, t.kind, t.nodes, t.memory_tier) for t in tiers] == [
        ("dram", "dram", [0], None), ("cxl0", "cxl", [2], None), ("cxl1", "cxl", [1], None)]
    assert tiers[1].details["max_distance_to_cpu"] == 20


def test_hmat_access_attributes(tmp_path):
    root = make_sysfs(tmp_path, NUMA, {4: [0], 22: [1]}, hmat={
        0: {"access0": ([0], 200000, 80, 150000, 90)},
        1: {"access0": ([0], 30000, 250, 20000, 300), "access1": ([0], 31000, 240, 21000, 290)}})
    topo = discovery.read_topology(root)
    a0 = topo.node(1).access["access0"]
    assert (a0.initiators, a0.read_bandwidth_mbps, a0.read_latency_ns, a0.write_bandwidth_mbps,
            a0.write_latency_ns) == ([0], 30000, 250, 20000, 300)
    assert topo.node(1).access["access1"].read_latency_ns == 240
    assert set(topo.node(0).access) == {"access0"}
    text = render(discovery.survey(sysfs_root=root, gpus=NO_GPU))
    assert "250 ns, 30000 MB/s" in text
    as_json = discovery.survey(sysfs_root=root, gpus=NO_GPU).to_dict()
    assert as_json["nodes"][1]["access"]["access0"]["write_latency_ns"] == 300


def test_gpus_rank_first_then_memory_then_nvme(tmp_path):
    root = make_sysfs(tmp_path / "sys", NUMA, {4: [0], 22: [1]})
    gpus = GpuReport(True, gpus=[Gpu(0, "Fake H100", 80 * GIB, 79 * GIB),
                                 Gpu(1, "Fake H100", 80 * GIB, 70 * GIB)])
    data = tmp_path / "kv"
    data.mkdir()
    tiers = discovery.discover(nvme_dirs=[str(data)], sysfs_root=root, gpus=gpus)
    assert [(t.name, t.kind, t.rank) for t in tiers] == [
        ("gpu0", "hbm", 0), ("gpu1", "hbm", 0), ("dram", "dram", 1), ("cxl0", "cxl", 2),
        ("nvme0", "nvme", 3)]
    assert tiers[1].free_bytes == 70 * GIB and tiers[1].paths == ["cuda:1"]


def test_nvme_dir_capacity_matches_statvfs(tmp_path):
    root = make_sysfs(tmp_path / "sys", PLAIN, {4: [0]})
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    tiers = discovery.discover(nvme_dirs=[str(a), str(b)], sysfs_root=root, gpus=NO_GPU)
    nvme = [t for t in tiers if t.kind == "nvme"]
    st = os.statvfs(a)
    assert [t.name for t in nvme] == ["nvme0", "nvme1"] and nvme[0].rank == nvme[1].rank == 1
    assert nvme[0].capacity_bytes == st.f_blocks * st.f_frsize
    assert abs(nvme[0].free_bytes - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024
    assert nvme[0].paths == [str(a)]
    assert nvme[0].details["o_direct"] in (True, False)
    assert os.listdir(a) == [] and os.listdir(b) == []   # the O_DIRECT probe file is gone
    # On the real /proc the mount holding tmp_path is found and has a filesystem type.
    assert nvme[0].details["fs_type"] and nvme[0].details["mount_point"]


def test_mountinfo_longest_prefix_escapes_and_rotational(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 27 259:1 / /mnt/fast\\040disk rw,relatime shared:5 - xfs /dev/nvme0n1p1 rw\n"
        "41 40 0:50 / /mnt/fast\\040disk/ram rw - tmpfs tmpfs rw\n")
    sysfs = tmp_path / "sys"
    disk = sysfs / "devices/pci/nvme0n1"
    (disk / "queue").mkdir(parents=True)
    (disk / "queue/rotational").write_text("0\n")
    (disk / "nvme0n1p1").mkdir()
    (disk / "nvme0n1p1/partition").write_text("1\n")
    (sysfs / "dev/block").mkdir(parents=True)
    (sysfs / "dev/block/259:1").symlink_to(disk / "nvme0n1p1")
    hit = discovery.find_mount("/mnt/fast disk/kv/cold", str(proc))
    assert hit == {"mount_point": "/mnt/fast disk", "fs_type": "xfs", "source": "/dev/nvme0n1p1",
                   "dev": "259:1"}
    assert discovery.find_mount("/mnt/fast disk/ram/x", str(proc))["fs_type"] == "tmpfs"
    assert discovery.find_mount("/mnt/fast diskette", str(proc))["mount_point"] == "/"
    assert discovery._rotational("259:1", str(sysfs)) is False
    assert discovery._rotational("0:50", str(sysfs)) is None


def test_nvme_dir_missing_or_not_a_directory_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discovery.discover(nvme_dirs=[str(tmp_path / "nope")], gpus=NO_GPU)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        discovery.discover(nvme_dirs=[str(f)], gpus=NO_GPU)


def test_kvctl_tiers_missing_dir_exits_2_with_one_line():
    proc = subprocess.run([KVCTL, "tiers", "--nvme-dir", "/nonexistent"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "/nonexistent" in proc.stderr
    assert proc.stderr.startswith("kvctl: error:") and proc.stdout == ""


def test_kvctl_tiers_json_on_this_host():
    env = {k: v for k, v in os.environ.items() if k != discovery.NVME_DIRS_ENV}
    proc = subprocess.run([KVCTL, "tiers", "--json"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"tiers", "nodes", "gpu"}
    dram = [t for t in data["tiers"] if t["kind"] == "dram"]
    assert dram and dram[0]["rank"] == min(t["rank"] for t in data["tiers"] if t["kind"] != "hbm")
    assert all(isinstance(t["capacity_bytes"], int) and isinstance(t["free_bytes"], int)
               for t in data["tiers"])
    # The dram tier's capacity is the MemTotal of its nodes as sysfs states it.
    total = 0
    for nid in dram[0]["nodes"]:
        for line in Path(f"/sys/devices/system/node/node{nid}/meminfo").read_text().splitlines():
            if "MemTotal:" in line:
                total += int(line.split()[3]) * 1024
    assert dram[0]["capacity_bytes"] == total
    assert 0 < dram[0]["free_bytes"] <= total
    if not any(p.startswith("nvidia") for p in os.listdir("/dev")):
        assert data["gpu"]["present"] is False and data["gpu"]["reason"]


def test_kvctl_tiers_env_dirs_and_option_override(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.setenv(discovery.NVME_DIRS_ENV, f"{a}::{b}")
    assert run(cli, "kvctl", ["tiers", "--json"]) == 0
    paths = [t["paths"][0] for t in json.loads(capsys.readouterr().out)["tiers"] if t["kind"] == "nvme"]
    assert paths == [str(a), str(b)]
    assert run(cli, "kvctl", ["tiers", "--json", "--nvme-dir", str(b)]) == 0
    paths = [t["paths"][0] for t in json.loads(capsys.readouterr().out)["tiers"] if t["kind"] == "nvme"]
    assert paths == [str(b)]
    monkeypatch.setenv(discovery.NVME_DIRS_ENV, str(tmp_path / "missing"))
    assert run(cli, "kvctl", ["tiers"]) == 2
    assert "missing" in capsys.readouterr().err


def test_kvctl_tiers_human_table(tmp_path, capsys):
    assert run(cli, "kvctl", ["tiers", "--nvme-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["RANK", "NAME", "KIND"]
    assert "dram" in out and "nvme0" in out and "GiB" in out and "GPU" in out


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(GIB) == "1 GiB"
    assert human_bytes(5463298048) == "5.09 GiB"
    assert human_bytes(1000 * GIB) == "1000 GiB"


def test_discovery_import_does_not_load_cuda():
    code = ("import sys, kvtier.cli.tiers, kvtier.discovery; "
            "sys.exit('cuda.bindings' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ---- GPU probe: the real driver here, a fake one for the paths a GPU takes -----------------------

def test_gpu_absent_here_has_reason():
    report = discover_gpus()
    assert report.present == bool(report.gpus)
    if not report.present:
        assert report.reason and "\n" not in report.reason
        assert report.to_dict() == {"present": False, "gpus": [], "reason": report.reason}


def test_gpu_reason_when_cuda_python_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    report = discover_gpus()
    assert not report.present and report.reason.startswith("cuda-python not installed")


class FakeDriver:
    """The part of cuda.bindings.driver that discover_gpus uses, with one result per call."""

    def __init__(self, init_error=0, devices=(("Fake GPU", 80 * GIB, 60 * GIB),)):
        self.CUresult = types.SimpleNamespace(CUDA_SUCCESS=0)
        self.init_error, self.devices, self.retained, self.pushed = init_error, devices, 0, 0
        self.names = {0: "CUDA_SUCCESS", 100: "CUDA_ERROR_NO_DEVICE", 3: "CUDA_ERROR_NOT_INITIALIZED"}

    def cuGetErrorName(self, err):
        return 0, self.names[err].encode()

    def cuInit(self, flags):
        return (self.init_error,)

    def cuDeviceGetCount(self):
        return 0, len(self.devices)

    def cuDeviceGet(self, i):
        return 0, i

    def cuDeviceGetName(self, length, dev):
        return 0, self.devices[dev][0].encode().ljust(length, b"\0")

    def cuDeviceTotalMem(self, dev):
        return 0, self.devices[dev][1]

    def cuDevicePrimaryCtxRetain(self, dev):
        self.retained += 1
        return 0, f"ctx{dev}"

    def cuDevicePrimaryCtxRelease(self, dev):
        self.retained -= 1
        return (0,)

    def cuCtxPushCurrent(self, ctx):
        self.pushed += 1
        self.current = ctx
        return (0,)

    def cuCtxPopCurrent(self):
        self.pushed -= 1
        return 0, self.current

    def cuMemGetInfo(self):
        assert self.pushed == 1, "cuMemGetInfo needs a current context"
        return 0, self.devices[int(self.current[3:])][2], self.devices[int(self.current[3:])][1]


def test_gpu_probe_with_fake_driver_releases_context():
    drv = FakeDriver(devices=(("Fake A", 80 * GIB, 60 * GIB), ("Fake B", 141 * GIB, 140 * GIB)))
    report = discover_gpus(drv)
    assert report.present and report.reason is None
    assert [(g.index, g.name, g.total_bytes, g.free_bytes) for g in report.gpus] == [
        (0, "Fake A", 80 * GIB, 60 * GIB), (1, "Fake B", 141 * GIB, 140 * GIB)]
    assert drv.retained == 0 and drv.pushed == 0


def test_gpu_reasons_from_fake_driver():
    assert discover_gpus(FakeDriver(init_error=100)).reason.startswith("no devices")
    assert discover_gpus(FakeDriver(init_error=3)).reason == "cuInit failed: CUDA_ERROR_NOT_INITIALIZED"
    assert discover_gpus(FakeDriver(devices=())).reason == "no devices"

    class Broken(FakeDriver):
        def cuInit(self, flags):
            raise RuntimeError("libcuda.so.1: cannot open shared object file")
    assert discover_gpus(Broken()).reason.startswith("driver library not found: libcuda.so.1")
