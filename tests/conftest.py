"""Test selection between the host and the QEMU guest.

Tests marked `guest` need the guest kernel that tools/vmtest boots (NUMA nodes, a lower memory tier,
later the kvtier module and bcc). tools/vmtest sets KVTIER_GUEST_TOPOLOGY inside the guest; there a
guest test runs only if its marker names that topology (no names: every topology). On the host,
guest tests are skipped. tools/test runs `pytest -m "not guest"` on the host, then
`pytest -m guest` once per topology inside one guest boot each.
"""
import gc
import os

import pytest

TOPOLOGIES = ("plain", "numa", "tiered")
GUEST_TOPOLOGY = os.environ.get("KVTIER_GUEST_TOPOLOGY")


def guest_topologies(item):
    marker = item.get_closest_marker("guest")
    if marker is None:
        return None
    names = marker.args or TOPOLOGIES
    unknown = set(names) - set(TOPOLOGIES)
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: unknown topology {sorted(unknown)}; valid: {TOPOLOGIES}")
    return names


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        names = guest_topologies(item)
        if names is None:
            keep.append(item)
        elif GUEST_TOPOLOGY is None:
            item.add_marker(pytest.mark.skip(reason="needs the guest kernel: run through tools/vmtest"))
            keep.append(item)
        elif GUEST_TOPOLOGY in names:
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def topology():
    """The guest topology this test runs under (None on the host)."""
    return GUEST_TOPOLOGY


# ---- kvtier.ko (kmod/): loaded once per guest session, every page checked on the way out ----

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

KMOD_PATH = pathlib.Path(__file__).resolve().parent.parent / "kmod" / "kvtier.ko"
# Unrelated kernel activity moves a node's free memory a little; our own leak would be whole regions.
MEMFREE_SLACK_BYTES = {"cpu_node": 64 << 20, "memory_only_node": 8 << 20}


def node_memfree_bytes() -> dict:
    """{node: free bytes}: each zone's free pages plus the pages parked on its per-CPU lists.

    Freed pages go to per-CPU lists first, which MemFree does not count (several MiB on a 1 GiB
    node), so /proc/zoneinfo is read instead of nodeN/meminfo.
    """
    out, node = {}, None
    for line in pathlib.Path("/proc/zoneinfo").read_text().splitlines():
        words = line.split()
        if line.startswith("Node "):
            node = int(words[1].rstrip(","))
            out.setdefault(node, 0)
        elif node is not None and words[:2] == ["pages", "free"]:
            out[node] += int(words[2])
        elif node is not None and words[:1] == ["count:"]:
            out[node] += int(words[1])
    return {n: pages * os.sysconf("SC_PAGE_SIZE") for n, pages in out.items()}


def _drop_caches() -> None:
    """Page cache and slab that other tests filled (bcc reads the kernel headers: ~100 MiB) are not ours:
    reclaim them before each reading so that only memory the module kept shows as missing."""
    subprocess.run(["sync"], check=False)
    try:
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def _node_has_cpus(node: int) -> bool:
    cpulist = pathlib.Path(f"/sys/devices/system/node/node{node}/cpulist")
    return cpulist.exists() and cpulist.read_text().strip() != ""


@pytest.fixture(scope="session")
def kvtier_module():
    """kvtier.ko loaded in the guest for the whole session (skips on the host or when not built).

    At the end it unloads the module and asserts that the module's counters were back to zero and
    that every node's MemFree came back to about where it was before the module was loaded.
    """
    if GUEST_TOPOLOGY is None:
        pytest.skip("needs the guest kernel: run through tools/vmtest")
    if not KMOD_PATH.is_file():
        pytest.skip(f"{KMOD_PATH} is not built (make -C kmod)")
    if pathlib.Path("/sys/module/kvtier").exists():
        yield None  # loaded by someone else: use it, leave it loaded
        return
    _drop_caches()
    before = node_memfree_bytes()
    subprocess.run(["insmod", str(KMOD_PATH)], check=True)
    for _ in range(100):  # devtmpfs creates the node asynchronously
        if os.path.exists("/dev/kvtier"):
            break
        time.sleep(0.05)
    yield KMOD_PATH
    gc.collect()  # numpy arrays over region mappings (get_views, put_into) left in reference cycles
    allocated = int(pathlib.Path("/sys/kernel/kvtier/allocated_bytes").read_text())
    regions = int(pathlib.Path("/sys/kernel/kvtier/regions").read_text())
    for _ in range(50):  # a just-exited child may still hold its fd for a moment
        if subprocess.run(["rmmod", "kvtier"], check=False).returncode == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("rmmod kvtier failed: something still holds /dev/kvtier or a mapping")
    _drop_caches()
    after = node_memfree_bytes()
    assert regions == 0, f"{regions} regions left at the end of the session"
    assert allocated == 0, f"{allocated} bytes still allocated by kvtier at the end of the session"
    for node, free in before.items():
        kind = "cpu_node" if _node_has_cpus(node) else "memory_only_node"
        assert after[node] >= free - MEMFREE_SLACK_BYTES[kind], (
            f"node {node}: MemFree {after[node]} after unload < {free} before load "
            f"- {MEMFREE_SLACK_BYTES[kind]} slack")


@pytest.fixture
def kvtier_dev(kvtier_module):
    """An open kvtier.kmod.Device, closed after the test."""
    from kvtier.kmod import Device

    dev = Device()
    yield dev
    dev.close()
