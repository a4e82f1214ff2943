"""The cffi NUMA shim: move_pages(2), mbind(2), get_mempolicy(2) with errors as OSError(errno).

Host tests cover the single-node paths and the error mapping; guest tests (numa, tiered) move real pages
to node 1 and check where the kernel says they are.
"""
import errno
import mmap
import os
import re

import pytest

from kvtier import numa

PAGES = 16


def online_nodes():
    text = open("/sys/devices/system/node/has_memory").read().strip()
    nodes = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        nodes.update(range(int(lo), int(hi or lo) + 1))
    return nodes


@pytest.fixture
def region():
    mm = mmap.mmap(-1, PAGES * numa.PAGE_SIZE)
    yield mm, numa.address_of(mm)
    mm.close()


def page_addrs(base, count=PAGES):
    return [base + i * numa.PAGE_SIZE for i in range(count)]


def touch(mm):
    for i in range(PAGES):
        mm[i * numa.PAGE_SIZE] = (i % 250) + 1


def numa_maps_nodes(addr):
    """Per-node page counts /proc/self/numa_maps reports for the mapping starting at addr."""
    for line in open("/proc/self/numa_maps"):
        if int(line.split()[0], 16) == addr:
            return {int(n): int(c) for n, c in re.findall(r"\bN(\d+)=(\d+)", line)}
    raise AssertionError(f"no numa_maps line for {addr:#x}")


def test_page_size_matches_os():
    assert numa.PAGE_SIZE == os.sysconf("SC_PAGESIZE")


def test_allowed_nodes_are_online_nodes():
    assert numa.allowed_nodes() == online_nodes()


def test_query_reports_node_of_touched_pages_and_enoent_for_untouched(region):
    mm, base = region
    mm[0] = 1  # only the first page is faulted in
    status = numa.move_pages(page_addrs(base, 2))
    assert status[0] in online_nodes()
    assert status[1] == -errno.ENOENT
    assert numa.node_of(base) == status[0]


def test_move_to_own_node_keeps_data(region):
    mm, base = region
    touch(mm)
    node = numa.node_of(base)
    assert numa.move_pages(page_addrs(base), [node] * PAGES) == [node] * PAGES
    assert all(mm[i * numa.PAGE_SIZE] == (i % 250) + 1 for i in range(PAGES))


def test_move_to_node_without_memory_is_enodev(region):
    mm, base = region
    touch(mm)
    missing = max(online_nodes()) + 1
    with pytest.raises(OSError) as err:
        numa.move_pages(page_addrs(base), [missing] * PAGES)
    assert err.value.errno == errno.ENODEV


def test_mismatched_lengths_is_einval(region):
    _, base = region
    with pytest.raises(OSError) as err:
        numa.move_pages(page_addrs(base), [0])
    assert err.value.errno == errno.EINVAL


def test_mbind_sets_policy_visible_to_get_mempolicy(region):
    mm, base = region
    numa.mbind(base, len(mm), numa.MPOL_BIND, {0})
    assert numa.get_mempolicy(base) == (numa.MPOL_BIND, {0})
    touch(mm)
    assert numa.node_of(base) == 0


def test_thread_policy_is_default():
    assert numa.get_mempolicy() == (numa.MPOL_DEFAULT, set())


def test_mbind_unaligned_is_einval(region):
    mm, base = region
    with pytest.raises(OSError) as err:
        numa.mbind(base + 1, numa.PAGE_SIZE, numa.MPOL_BIND, {0})
    assert err.value.errno == errno.EINVAL


def test_mbind_unmapped_is_efault():
    mm = mmap.mmap(-1, 4 * numa.PAGE_SIZE)
    base = numa.address_of(mm)
    mm.close()  # the range is now unmapped
    with pytest.raises(OSError) as err:
        numa.mbind(base, 4 * numa.PAGE_SIZE, numa.MPOL_BIND, {0})
    assert err.value.errno == errno.EFAULT


def test_node_out_of_mask_range_is_einval(region):
    mm, base = region
    with pytest.raises(OSError) as err:
        numa.mbind(base, len(mm), numa.MPOL_BIND, {5000})
    assert err.value.errno == errno.EINVAL


def test_oserror_message_names_the_call(region):
    _, base = region
    with pytest.raises(OSError, match="mbind"):
        numa.mbind(base + 1, numa.PAGE_SIZE, numa.MPOL_BIND, {0})


@pytest.mark.guest("numa", "tiered")
def test_move_pages_to_node1_and_back(region):
    mm, base = region
    touch(mm)
    assert numa.move_pages(page_addrs(base), [1] * PAGES) == [1] * PAGES
    assert numa.move_pages(page_addrs(base)) == [1] * PAGES
    assert numa_maps_nodes(base) == {1: PAGES}
    assert all(mm[i * numa.PAGE_SIZE] == (i % 250) + 1 for i in range(PAGES))
    assert numa.move_pages(page_addrs(base), [0] * PAGES) == [0] * PAGES
    assert numa_maps_nodes(base) == {0: PAGES}


@pytest.mark.guest("numa", "tiered")
def test_mbind_bind_places_new_pages_on_node1(region):
    mm, base = region
    numa.mbind(base, len(mm), numa.MPOL_BIND, {1})
    touch(mm)
    assert {numa.node_of(a) for a in page_addrs(base)} == {1}


@pytest.mark.guest("numa", "tiered")
def test_mbind_move_migrates_present_pages(region):
    mm, base = region
    numa.mbind(base, len(mm), numa.MPOL_BIND, {0})
    touch(mm)
    numa.mbind(base, len(mm), numa.MPOL_BIND, {1}, numa.MPOL_MF_MOVE | numa.MPOL_MF_STRICT)
    assert numa.move_pages(page_addrs(base)) == [1] * PAGES
    assert all(mm[i * numa.PAGE_SIZE] == (i % 250) + 1 for i in range(PAGES))


@pytest.mark.guest("numa", "tiered")
def test_two_nodes_allowed():
    assert numa.allowed_nodes() == {0, 1}
