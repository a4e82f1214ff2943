"""Real kvtierd processes for tests: write a config, start the daemon, wait for its socket, stop it."""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy.random  # noqa: F401  (block_bytes: imported before a test forks a child that drops to uid nobody,
import pytest         #  which may not be able to read the interpreter's library to import it then)

from kvtier.client import admin_call

KVTIERD = str(Path(sys.executable).parent / "kvtierd")
KVCTL = str(Path(sys.executable).parent / "kvctl")


def write_config(d: Path, dram="256KiB", cxl="256KiB", nvme="32MiB", policy="lru", extra="", metrics='""',
                 backend="auto", cxl_node=0, nominal="16KiB") -> Path:
    cfg = d / "kvtierd.toml"
    cfg.write_text(f"""
socket = "{d}/kvtierd.sock"
state_dir = "{d}/state"
policy = "{policy}"
metrics = {metrics}
{extra}
[blocks]
nominal_bytes = "{nominal}"
[[tiers]]
name = "dram0"
kind = "dram"
nodes = [0]
capacity = "{dram}"
backend = "{backend}"
[[tiers]]
name = "cxl0"
kind = "cxl"
nodes = [{cxl_node}]
capacity = "{cxl}"
backend = "{backend}"
[[tiers]]
name = "nvme0"
kind = "nvme"
directory = "{d}/state/nvme"
capacity = "{nvme}"
""")
    return cfg


# Daemon tests that run twice: on the host (memfd tiers) and in the tiered guest with kvtier.ko loaded, where the
# memory tiers are module regions and the CXL tier sits on node 1, the guest's lower-tier node.
BACKENDS = [pytest.param("memfd", id="memfd"), pytest.param("kmod", id="kmod", marks=pytest.mark.guest("tiered"))]


def backend_config(request, d: Path, **kw) -> Path:
    """write_config for the backend of a fixture parametrised with BACKENDS (for kmod: kvtier.ko loaded)."""
    if request.param == "kmod":
        request.getfixturevalue("kvtier_module")
        return write_config(d, backend="kmod", cxl_node=1, **kw)
    return write_config(d, **kw)


@contextlib.contextmanager
def running_daemon(d_dir: Path, cfg: Path, timeout_s: float = 120):
    """A started daemon; on exit it must stop cleanly (exit 0), is killed if the body failed, and d_dir goes."""
    d = Daemon(d_dir, cfg).start(timeout_s=timeout_s)
    try:
        yield d
        assert d.stop() == 0, d.log.read_text()[-2000:]
    finally:
        if d.alive():
            d.kill9()
        shutil.rmtree(d_dir, ignore_errors=True)


def engine(cfg: Path, defer_policy: bool = False):
    """An in-process Engine over the tiers of config file cfg, as kvtierd builds them (no server, no socket)."""
    from kvtier.daemon import config as config_mod
    from kvtier.daemon.engine import Engine
    from kvtier.daemon.server import build_tiers
    c = config_mod.load(str(cfg))
    e = Engine(c, build_tiers(c))
    e.defer_policy = defer_policy
    return e


def short_dir() -> Path:
    """A directory other users can traverse (the uid tests need it), with a short path (sun_path is 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="kvd-", dir="/tmp"))
    d.chmod(0o755)
    return d


def wait_serving(proc: subprocess.Popen, socket_path: str, log: Path, timeout_s: float = 20.0) -> None:
    """Until the daemon answers on its socket (the socket file appears at bind, before listen: a connect in
    between is refused), or raise with its log's tail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvtierd exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            admin_call(socket_path, "stats")
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"kvtierd did not come up: {log.read_text()[-2000:]}")


class Daemon:
    def __init__(self, directory: Path, cfg: Path, log_level="info", env=None, nofile=None):
        self.dir, self.cfg = directory, cfg
        self.nofile = nofile   # RLIMIT_NOFILE for the daemon, if given
        self.socket = str(directory / "kvtierd.sock")
        self.log = directory / "kvtierd.log"
        self.log_level = log_level
        self.proc = None
        self.env = env

    def start(self, timeout_s=20.0) -> "Daemon":
        logf = open(self.log, "ab")
        limit = None if self.nofile is None else (
            lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile)))
        self.proc = subprocess.Popen([KVTIERD, "--config", str(self.cfg), "--log-level", self.log_level],
                                     stdout=logf, stderr=logf, env={**os.environ, **(self.env or {})},
                                     preexec_fn=limit)
        logf.close()
        wait_serving(self.proc, self.socket, self.log, timeout_s)
        return self

    def stats(self) -> dict:
        return admin_call(self.socket, "stats")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout_s=60.0) -> int:
        """SIGTERM and wait, as systemd does (the unit's TimeoutStopSec=60): a graceful stop may spend up to
        shutdown_flush_s (default 20 s) copying blocks to NVMe, longer than that under TCG on a busy host."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError(f"kvtierd did not stop within {timeout_s} s of SIGTERM; its log ends:\n"
                               f"{self.log.read_text()[-2000:]}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def block_bytes(seed: int, nbytes: int) -> bytes:
    """Deterministic content per block, so every get can be checked."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def wait_for(pred, timeout_s=5.0, step_s=0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step_s)
    return pred()


__all__ = ["Daemon", "write_config", "short_dir", "block_bytes", "wait_for", "KVTIERD", "KVCTL"]
