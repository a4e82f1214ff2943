"""kvtier.ko's packaging: dkms.conf builds the module Kbuild names, the udev rule is well formed, the sdist
carries the uapi header the cffi build reads. Host-only; `dkms build` runs when dkms and headers are there."""
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KMOD = REPO / "kmod"
KVER = "6.1.0-test-amd64"


def dkms_conf(kernelver: str = KVER) -> dict:
    """dkms.conf is sourced by bash with $kernelver set: read its variables exactly that way."""
    script = ('set -eu; source "$1"; for v in PACKAGE_NAME PACKAGE_VERSION AUTOINSTALL BUILD_EXCLUSIVE_CONFIG '
              'CLEAN; do printf "%s=%s\\n" "$v" "${!v}"; done; printf "BUILT_MODULE_NAME=%s\\n" '
              '"${BUILT_MODULE_NAME[0]}"; printf "DEST_MODULE_LOCATION=%s\\n" "${DEST_MODULE_LOCATION[0]}"; '
              'printf "MAKE=%s\\n" "${MAKE[0]}"')
    out = subprocess.run(["bash", "-c", script, "bash", str(KMOD / "dkms.conf")], env={"kernelver": kernelver},
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_dkms_conf_names_the_module_kbuild_builds():
    conf = dkms_conf()
    kbuild = (KMOD / "Kbuild").read_text()
    modules = re.findall(r"^obj-m\s*\+?:?=\s*(.+)$", kbuild, re.M)
    built = {Path(o).stem for line in modules for o in line.split()}
    assert built == {conf["BUILT_MODULE_NAME"]}
    assert conf["PACKAGE_NAME"] == "kvtier"
    assert conf["DEST_MODULE_LOCATION"] == "/updates/dkms"
    assert conf["AUTOINSTALL"] == "yes"
    assert conf["MAKE"] == f"make KVER={KVER}"
    # The Makefile builds against the kernel named by KVER, not the running one.
    makefile = (KMOD / "Makefile").read_text()
    assert re.search(r"^KDIR\s*\?=.*\$\(KVER\)", makefile, re.M)


def test_dkms_version_matches_the_python_package():
    version = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert dkms_conf()["PACKAGE_VERSION"] == version


def test_dkms_build_exclusive_configs_are_documented():
    configs = dkms_conf()["BUILD_EXCLUSIVE_CONFIG"].split()
    assert set(configs) == {"CONFIG_NUMA", "CONFIG_MIGRATION"}
    notes = (REPO / "Kconfig-notes.md").read_text()
    for config in configs:
        assert f"`{config}`" in notes


UDEV_MATCH = {"SUBSYSTEM", "KERNEL", "ACTION", "DRIVER", "ATTR"}
UDEV_ASSIGN = {"GROUP", "MODE", "OWNER", "TAG", "SYMLINK"}
UDEV_TERM = re.compile(r'^\s*([A-Z]+)(\{[^}]*\})?\s*(==|!=|\+=|:=|=)\s*"([^"]*)"\s*$')


def parse_udev_rules(text: str) -> list[list[tuple[str, str, str]]]:
    rules = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        terms = []
        for term in line.split(","):
            m = UDEV_TERM.match(term)
            assert m, f"line {lineno}: cannot parse {term!r}"
            key, _, op, value = m.groups()
            if key in UDEV_MATCH:
                assert op in ("==", "!="), f"line {lineno}: {key} is a match key, not {op}"
            elif key in UDEV_ASSIGN:
                assert op in ("=", "+=", ":="), f"line {lineno}: {key} is an assignment, not {op}"
            else:
                raise AssertionError(f"line {lineno}: unexpected key {key}")
            terms.append((key, op, value))
        rules.append(terms)
    return rules


def test_udev_rule_gives_group_kvtier_mode_0660():
    (rule,) = parse_udev_rules((KMOD / "99-kvtier.rules").read_text())
    fields = {key: (op, value) for key, op, value in rule}
    device_name = re.search(r'#define\s+KVTIER_DEVICE_NAME\s+"(\w+)"',
                            (KMOD / "include/uapi/linux/kvtier.h").read_text()).group(1)
    assert fields["KERNEL"] == ("==", device_name)
    assert fields["SUBSYSTEM"] == ("==", "misc")
    assert fields["GROUP"] == ("=", "kvtier")
    assert fields["MODE"] == ("=", "0660")


def test_udev_parser_rejects_malformed_rules():
    for bad in ('KERNEL="kvtier", MODE="0660"', 'KERNEL=="kvtier", MODE=="0660"', 'KERNEL=="kvtier" GROUP="x"'):
        with pytest.raises(AssertionError):
            parse_udev_rules(bad)


def test_readme_documents_the_install():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Kernel module"):]
    for needle in ("dkms add", "dkms build", "dkms install", "99-kvtier.rules", "groupadd", "max_region_bytes",
                   "max_total_bytes"):
        assert needle in section, needle


def test_sdist_carries_the_uapi_header(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    (sdist,) = tmp_path.glob("kvtier-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    assert any(n.endswith("/kmod/include/uapi/linux/kvtier.h") for n in names)
    assert any(n.endswith("/userspace/kvtier/_native_build.py") for n in names)


@pytest.mark.skipif(shutil.which("dkms") is None, reason="dkms not installed")
def test_dkms_builds_the_module(tmp_path):
    kvers = sorted(p.parent.name for p in Path("/lib/modules").glob("6.1*/build"))
    if not kvers:
        pytest.skip("no 6.1 kernel headers")
    src = tmp_path / "src"
    shutil.copytree(KMOD, src, ignore=shutil.ignore_patterns("*.o", "*.ko", "*.mod", "*.mod.c", ".*.cmd",
                                                            "modules.order", "Module.symvers"))
    for d in ("tree", "srctree"):
        (tmp_path / d).mkdir()
    out = subprocess.run(["dkms", "build", "--dkmstree", str(tmp_path / "tree"), "--sourcetree",
                          str(tmp_path / "srctree"), "-k", kvers[-1], str(src)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    built = list((tmp_path / "tree").glob(f"kvtier/*/{kvers[-1]}/*/module/kvtier.ko*"))
    assert built, out.stdout[-2000:]
