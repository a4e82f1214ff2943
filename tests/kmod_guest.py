"""Shared by the kvtier.ko userspace tests in the guest: make sure the module is loaded.

K1's conftest fixture `kvtier_dev` loads kmod/kvtier.ko for the session; where it is not defined (yet),
insmod the freshly built module here (the guest runs tests as root).
"""
import subprocess
from pathlib import Path

import pytest

from kvtier import kmod

REPO = Path(__file__).resolve().parents[1]


def ensure_module(request) -> None:
    try:
        request.getfixturevalue("kvtier_dev")
    except pytest.FixtureLookupError:
        if not kmod.module_loaded():
            ko = REPO / "kmod" / "kvtier.ko"
            if not ko.exists():
                pytest.fail(f"{ko} is not built (tools/vmtest builds kmod/ before booting)")
            subprocess.run(["insmod", str(ko)], check=True)
    assert kmod.module_loaded()
