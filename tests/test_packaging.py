"""`pip install .` builds the cffi extension and installs kvctl, kvtierd and every subpackage."""
import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_has_extension_commands_and_subpackages(tmp_path):
    # Build from a copy of the tracked files: a stale build/ in the checkout must not hide a missing module.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    # --no-build-isolation: build with the venv's setuptools/cffi, so the test needs no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("kvtier-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("kvtier/_native") and n.endswith(".so") for n in names)
    for module in ("kvtier/numa.py", "kvtier/cli/__init__.py", "kvtier/cuda/__init__.py",
                   "kvtier/daemon/__init__.py", "kvtier/store/__init__.py"):
        assert module in names
    assert any(n.startswith("kvtier/data/models/") and n.endswith(".json") for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    assert dict(parser["console_scripts"]) == {"kvctl": "kvtier.cli:main", "kvtierd": "kvtier.daemon:main"}


def test_installed_commands_run():
    bindir = Path(sys.executable).parent
    for command in ("kvctl", "kvtierd"):
        out = subprocess.run([bindir / command, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "Usage:" in out.stdout
