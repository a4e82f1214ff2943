"""Test selection between the host and the QEMU guest.

Tests marked `guest` need the guest kernel that tools/vmtest boots (NUMA nodes, a lower memory tier,
later the kvtier module and bcc). tools/vmtest sets KVTIER_GUEST_TOPOLOGY inside the guest; there a
guest test runs only if its marker names that topology (no names: every topology). On the host,
guest tests are skipped. tools/test runs `pytest -m "not guest"` on the host, then
`pytest -m guest` once per topology inside one guest boot each.
"""
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
