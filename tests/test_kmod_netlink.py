"""kvtier.ko's generic netlink family from Python (kvtier.kmod_netlink), and kvctl regions/migrate/stats.

Guest tests (numa topology: node 1 is the migration target) create regions through the ioctl binding and
check what the family reports: the region list with its tags, statistics equal to the ioctl's, the
"events" multicast group, and per-uid filtering. Host tests check the errors when the module is absent.
"""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmod_guest import ensure_module
from kvtier import kmod, kmod_netlink

REPO = Path(__file__).resolve().parents[1]
KVCTL = Path(sys.executable).parent / "kvctl"
PAGE = os.sysconf("SC_PAGESIZE")
NOBODY = 65534

TAGS = kmod.Tags(tenant_id=7, session_id=4242, layer_first=2, layer_count=30, head_first=0, head_count=8,
                 block_type=kmod.BLOCK_HISTORY, priority=kmod.PRIO_DECODE)


@pytest.fixture
def dev(request):
    ensure_module(request)
    with kmod.Device() as device:
        yield device


def _populate(dev, region, pattern: bytes = b"kvtier") -> None:
    buf = dev.mmap(region)
    try:
        for off in range(0, region.size_bytes, PAGE):
            buf[off:off + len(pattern)] = pattern
    finally:
        buf.close()


def _kvctl(*args, check_rc=None):
    out = subprocess.run([str(KVCTL), *args], capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert out.returncode == check_rc, (args, out.returncode, out.stdout, out.stderr)
    return out


# -- host: errors when the module is absent --------------------------------------------------------------

def test_family_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kmod_netlink, "FAMILY", "kvtier_nofam")
    try:
        with pytest.raises(OSError) as err:
            kmod_netlink.list_regions()
    except PermissionError:
        pytest.skip("no generic netlink socket here")
    assert err.value.errno == errno.ENOENT
    assert "not loaded" in str(err.value) and "kvtier_nofam" in str(err.value)


@pytest.mark.skipif(kmod.module_loaded(), reason="kvtier.ko is loaded here")
@pytest.mark.parametrize("args", [["regions"], ["regions", "--json"], ["stats"], ["migrate", "1", "--node", "1"]])
def test_kvctl_without_module_one_line_exit_1(args):
    out = _kvctl(*args, check_rc=1)
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "kvtier.ko is not loaded" in out.stderr


@pytest.mark.parametrize("args", [["migrate", "1", "--node", "1", "--blocks", "3"],
                                  ["migrate", "1", "--node", "1", "--blocks", "0:0"],
                                  ["migrate", "1", "--node", "-1"], ["migrate", "1"], ["regions", "--bogus"],
                                  ["stats", "extra"]])
def test_kvctl_bad_options_exit_2(args):
    out = _kvctl(*args, check_rc=2)
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("kvctl: error: ")


# -- guest ------------------------------------------------------------------------------------------------

@pytest.mark.guest("numa")
def test_list_regions_shows_region_with_tags(dev):
    region = dev.create_region(8 * PAGE, 2 * PAGE, node=0, tags=TAGS)
    _populate(dev, region)
    listed = {r["region_id"]: r for r in kmod_netlink.list_regions()}
    assert region.id in listed
    r = listed[region.id]
    assert (r["tenant_id"], r["session_id"]) == (TAGS.tenant_id, TAGS.session_id)
    assert (r["size_bytes"], r["block_bytes"], r["node"]) == (region.size_bytes, region.block_bytes, 0)
    assert r["owner_uid"] == os.geteuid()
    assert r["resident_bytes"] == region.size_bytes
    info = dev.info(region.id)
    assert r["faults"] == info["faults"] > 0
    dev.release(region.id)
    assert region.id not in {r["region_id"] for r in kmod_netlink.list_regions()}


@pytest.mark.guest("numa")
def test_stats_match_the_ioctl(dev):
    region = dev.create_region(16 * PAGE, 4 * PAGE, node=0, tags=TAGS)
    _populate(dev, region)
    dev.migrate(region.id, 0, 2, node=1)
    with kmod_netlink.Netlink() as nl:
        via_netlink = nl.stats()
    via_ioctl = dev.stats()
    for key in ("regions", "allocated_bytes", "shares", "shared_bytes", "faults", "migrations", "migrated_bytes"):
        if key in via_netlink:
            assert via_netlink[key] == via_ioctl[key], key
    assert {"regions", "allocated_bytes"} <= set(via_netlink)
    assert via_netlink["regions"] >= 1 and via_netlink["allocated_bytes"] >= region.size_bytes
    nl_nodes = {n: s for n, s in via_netlink["nodes"].items() if any(s.values())}
    assert set(nl_nodes) == set(via_ioctl["nodes"])
    for node, row in via_ioctl["nodes"].items():
        for key, value in row.items():
            assert nl_nodes[node].get(key, value) == value, (node, key)
    assert via_ioctl["nodes"][1]["allocated_bytes"] >= 8 * PAGE
    dev.release(region.id)


@pytest.mark.guest("numa")
def test_events_announce_new_migrated_and_del(dev):
    with kmod_netlink.Netlink() as nl:
        nl.subscribe()
        region = dev.create_region(8 * PAGE, 2 * PAGE, node=0, tags=TAGS)
        _populate(dev, region)
        bytes_moved, blocks_moved = dev.migrate(region.id, 1, 2, node=1)
        dev.release(region.id)
        seen = []
        for event in nl.events(timeout_s=5):   # ends after 5 s without any event
            if event.get("region_id") == region.id:
                seen.append(event)
                if event["event"] == "region_del":
                    break
    assert [e["event"] for e in seen] == ["region_new", "migrated", "region_del"], seen
    new, migrated, _ = seen
    assert new["tenant_id"] == TAGS.tenant_id and new["session_id"] == TAGS.session_id
    assert (migrated["node"], migrated["first_block"], migrated["nr_blocks"]) == (1, 1, 2)
    assert migrated["bytes_moved"] == bytes_moved == 2 * region.block_bytes
    assert blocks_moved == 2


@pytest.mark.guest("numa")
def test_non_root_sees_only_its_own_regions(dev):
    mine = dev.create_region(4 * PAGE, PAGE, node=0, tags=TAGS)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            # Open the device as root, then become nobody: the region it creates belongs to nobody.
            with kmod.Device() as own:
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                theirs = own.create_region(2 * PAGE, PAGE, node=0, tags=kmod.Tags(tenant_id=9))
                listed = [(r["region_id"], r["owner_uid"]) for r in kmod_netlink.list_regions()]
                with os.fdopen(write_end, "w") as out:
                    json.dump({"theirs": theirs.id, "listed": listed}, out)
            status = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed ({status:#x})"
    child = json.loads(data)
    assert child["listed"] == [[child["theirs"], NOBODY]]
    # Root sees both (the child's region is gone with its fd, so only while it lived; check ours now).
    assert mine.id in {r["region_id"] for r in kmod_netlink.list_regions()}
    dev.release(mine.id)


@pytest.mark.guest("numa")
def test_kvctl_regions_migrate_stats_end_to_end(dev):
    region = dev.create_region(32 * PAGE, 4 * PAGE, node=0, tags=TAGS)
    _populate(dev, region, b"end-to-end")

    listed = json.loads(_kvctl("regions", "--json", check_rc=0).stdout)
    (row,) = [r for r in listed if r["region_id"] == region.id]
    assert (row["tenant_id"], row["session_id"], row["node"]) == (TAGS.tenant_id, TAGS.session_id, 0)
    table = _kvctl("regions", check_rc=0).stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "OWNER", "TENANT", "SESSION"]
    assert any(line.split()[:4] == [str(region.id), "0", "7", "4242"] for line in table[1:])

    moved = json.loads(_kvctl("migrate", str(region.id), "--node", "1", "--blocks", "2:4", "--json",
                              check_rc=0).stdout)
    assert (moved["bytes_moved"], moved["blocks_moved"]) == (4 * region.block_bytes, 4)
    states = dev.query(region.id)
    assert [s.node for s in states] == [0, 0, 1, 1, 1, 1, 0, 0]
    human = _kvctl("migrate", str(region.id), "--node", "1", check_rc=0).stdout
    assert f"({4 * region.block_bytes} bytes) in 4 blocks" in human  # the 4 blocks still on node 0
    assert dev.info(region.id)["node_bytes"] == {1: region.size_bytes}
    buf = dev.mmap(region, prot=__import__("mmap").PROT_READ)
    assert all(buf[off:off + 10] == b"end-to-end" for off in range(0, region.size_bytes, PAGE))
    buf.close()

    stats = json.loads(_kvctl("stats", "--json", check_rc=0).stdout)
    ioctl_stats = dev.stats()
    assert stats["regions"] == ioctl_stats["regions"] >= 1
    assert stats["allocated_bytes"] == ioctl_stats["allocated_bytes"]
    assert int(stats["nodes"]["1"]["allocated_bytes"]) == ioctl_stats["nodes"][1]["allocated_bytes"]
    assert "NODE" in _kvctl("stats", check_rc=0).stdout

    missing = _kvctl("migrate", str(2**40), "--node", "1", check_rc=1)
    assert missing.stderr.count("\n") == 1 and "KVTIER_IOC_REGION_INFO" in missing.stderr
    dev.release(region.id)
