"""tools/vmtest, the QEMU guest harness, tested from the host.

Most tests boot a real guest (5-15 s each under TCG); the option checks do not boot anything.
Each booting test checks one part of the contract: exit status and argument vector, output streaming,
cwd and the writable repository share, the dmesg scan, the timeouts (a boot that never reaches CMD is retried
once), crash detection, the module build.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VMTEST = REPO / "tools" / "vmtest"

boots = pytest.mark.skipif(
    os.environ.get("KVTIER_GUEST_TOPOLOGY") is not None
    or (os.geteuid() != 0 and shutil.which("qemu-system-x86_64") is None),
    reason="boots a QEMU guest: needs the host (not the guest) and root or QEMU installed",
)


def vmtest(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(VMTEST), *args], capture_output=True, text=True,
                          env={**os.environ, "VMTEST_KEEP": "0", **(env or {})}, timeout=timeout)


@pytest.fixture
def scratch():
    """A folder inside the repository (the guest's writable share), removed afterwards."""
    path = REPO / ".vmtest" / f"test-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("args, complaint", [
    (["--topology", "cxl", "--", "true"], "invalid choice: 'cxl'"),
    (["--timeout", "soon", "--", "true"], "bad timeout 'soon'"),
    (["--timeout", "0", "--", "true"], "bad timeout '0'"),
    (["--timeout", "-3", "--", "true"], "bad timeout '-3'"),
    (["--timeout", "nan", "--", "true"], "bad timeout 'nan'"),
    (["--boot-timeout", "-1", "--", "true"], "bad timeout '-1'"),
    (["--"], "missing '-- CMD"),
    (["true"], "missing '--' before the command"),
    ([], "missing '-- CMD"),
    (["--frobnicate", "--", "true"], "unrecognized arguments: --frobnicate"),
])
def test_bad_options_exit_2_without_booting(args, complaint):
    started = time.monotonic()
    done = vmtest(*args)
    assert done.returncode == 2, done.stderr
    assert complaint in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert time.monotonic() - started < 5  # no guest was booted


def test_help_states_the_contract():
    done = vmtest("--help")
    assert done.returncode == 0
    for promise in ("--topology", "--timeout", "KVTIER_GUEST_TOPOLOGY", "124", "tiered", "Examples:"):
        assert promise in done.stdout


@boots
def test_argv_cwd_env_output_and_exit_status(scratch):
    # The guest writes what it saw into the repository share; the host reads it back.
    script = textwrap.dedent("""
        import json, os, socket, sys
        out = sys.argv[1]
        with open(out, "w") as f:
            json.dump({"argv": sys.argv[2:], "cwd": os.getcwd(), "uid": os.geteuid(),
                       "hostname": socket.gethostname(),
                       "env": {k: os.environ.get(k) for k in ("HOME", "LANG", "PYTHONUNBUFFERED",
                               "KVTIER_GUEST_TOPOLOGY", "KVTIER_KVER", "KVTIER_TEST_PASSTHROUGH")}}, f)
        print("to-stdout", flush=True)
        print("to-stderr", file=sys.stderr, flush=True)
        sys.exit(7)
    """)
    tricky = ["plain", "two words", "it's \"quoted\"", "$HOME", "", "*", "back\\slash", "new\nline", "-- --x"]
    out = scratch / "seen.json"
    done = vmtest("--", "/usr/bin/python3", "-c", script, str(out.relative_to(REPO)), *tricky,
                  env={"KVTIER_TEST_PASSTHROUGH": "a b"})
    assert done.returncode == 7, done.stderr
    assert "to-stdout" in done.stdout and "to-stderr" in done.stdout
    seen = json.loads(out.read_text())
    assert seen["argv"] == tricky
    assert seen["cwd"] == str(REPO)
    assert seen["uid"] == 0
    assert seen["hostname"] == "vmtest-plain"
    assert seen["env"]["HOME"] == "/root"
    assert seen["env"]["LANG"] == "C.UTF-8"
    assert seen["env"]["PYTHONUNBUFFERED"] == "1"
    assert seen["env"]["KVTIER_GUEST_TOPOLOGY"] == "plain"
    assert seen["env"]["KVTIER_KVER"].startswith("6.1.")
    assert seen["env"]["KVTIER_TEST_PASSTHROUGH"] == "a b"


@boots
def test_kernel_warning_in_dmesg_fails_a_passing_command():
    done = vmtest("--", "sh", "-c", "echo 'WARNING: CPU: 1 PID: 1 at vmtest-selftest' >/dev/kmsg; echo cmd-ok")
    assert "cmd-ok" in done.stdout
    assert done.returncode == 1
    assert "vmtest: guest dmesg shows WARNING" in done.stderr
    assert "at vmtest-selftest" in done.stderr


@boots
def test_timeout_kills_the_guest_with_124():
    started = time.monotonic()
    done = vmtest("--timeout", "6", "--", "sleep", "600")
    elapsed = time.monotonic() - started
    assert done.returncode == 124, done.stderr
    assert "vmtest: timeout after 6 s" in done.stderr
    assert elapsed < 6 + 20


@boots
def test_boot_that_does_not_reach_cmd_is_retried_once_then_124(scratch):
    # No guest reaches CMD in 0.3 s: both boots are cut short, CMD never runs, and the run ends long
    # before --timeout with 124 and each boot's console kept.
    marker = scratch / "ran"
    started = time.monotonic()
    done = vmtest("--boot-timeout", "0.3", "--timeout", "60", "--", "touch", str(marker),
                  env={"VMTEST_KEEP": "1"})
    elapsed = time.monotonic() - started
    assert done.returncode == 124, done.stderr
    assert done.stderr.count("the guest did not start CMD within 0.3 s of booting") == 2, done.stderr
    assert "booting again" in done.stderr
    assert not marker.exists()
    assert elapsed < 40
    kept = Path(done.stderr.rsplit("run files kept in ", 1)[1].strip())
    try:
        assert {"console.boot1.log", "console.boot2.log"} <= {p.name for p in kept.iterdir()}
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    # a CMD that runs past the boot timeout is not a boot hang: "started" marks that CMD began
    done = vmtest("--boot-timeout", "15", "--", "sh", "-c", "sleep 20; touch " + str(marker))
    assert done.returncode == 0, done.stderr
    assert "booting again" not in done.stderr
    assert marker.exists()


@boots
def test_console_keeps_the_boot_and_leaves_cmds_kernel_messages_to_dmesg():
    # A hung boot is diagnosed from console.log, so the boot's messages are there; CMD's info messages are not
    # (they would slow CMD on the serial port) but are in the run's dmesg.
    done = vmtest("--", "sh", "-c", "echo '<6>vmtest-info-probe' >/dev/kmsg", env={"VMTEST_KEEP": "1"})
    assert done.returncode == 0, done.stderr
    kept = Path(done.stderr.rsplit("run files kept in ", 1)[1].strip())
    try:
        console = (kept / "console.log").read_text(errors="replace")
        assert "Linux version" in console and "Freeing unused kernel" in console
        assert "vmtest-info-probe" not in console
        assert "vmtest-info-probe" in (kept / "dmesg").read_text(errors="replace")
    finally:
        shutil.rmtree(kept, ignore_errors=True)


@boots
def test_guest_panic_is_a_failure():
    done = vmtest("--", "sh", "-c", "echo c >/proc/sysrq-trigger; exit 0")
    assert done.returncode == 125, done.stderr
    assert "without reporting CMD's exit status" in done.stderr
    assert "Kernel panic" in done.stderr


HELLO_C = r"""
#include <linux/module.h>
static int __init vmtest_hello_init(void) { pr_info("vmtest_hello: loaded\n"); return 0; }
static void __exit vmtest_hello_exit(void) { pr_info("vmtest_hello: unloaded\n"); }
module_init(vmtest_hello_init);
module_exit(vmtest_hello_exit);
MODULE_LICENSE("GPL");
"""


@boots
def test_module_is_built_on_the_host_and_loads_in_the_guest(scratch):
    (scratch / "Makefile").write_text("obj-m := vmtest_hello.o\n")
    (scratch / "vmtest_hello.c").write_text(HELLO_C)
    relative = scratch.relative_to(REPO)
    done = vmtest("--", "sh", "-c", f"insmod {relative}/vmtest_hello.ko && rmmod vmtest_hello && dmesg",
                  env={"VMTEST_KMOD_DIR": str(scratch)})
    assert done.returncode == 0, done.stderr
    assert (scratch / "vmtest_hello.ko").exists()
    assert "vmtest_hello: loaded" in done.stdout and "vmtest_hello: unloaded" in done.stdout


def test_module_build_failure_stops_before_booting(scratch):
    if shutil.which("make") is None or not list(Path("/lib/modules").glob("6.1.*/build/Makefile")):
        pytest.skip("needs make and the 6.1 kernel headers")
    (scratch / "Makefile").write_text("obj-m := vmtest_broken.o\n")
    (scratch / "vmtest_broken.c").write_text("this is not C;\n")
    done = vmtest("--", "true", env={"VMTEST_KMOD_DIR": str(scratch)})
    assert done.returncode == 125
    assert "vmtest: module build failed" in done.stderr
    assert "vmtest_broken.c" in done.stderr  # the compiler's complaint is shown
