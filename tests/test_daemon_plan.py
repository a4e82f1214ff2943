"""kvtierd's start-up plan: whole sessions placed tier by tier in rank order."""
import json
import subprocess
import sys
from pathlib import Path

from kvtier.daemon import plan_sessions
from kvtier.discovery import Tier

GiB = 1 << 30
KVTIERD = str(Path(sys.executable).parent / "kvtierd")


def tiers():
    # Given out of rank order on purpose: the plan must sort by rank.
    return [Tier("nvme0", "nvme", 2, 100 * GiB, 90 * GiB, paths=["/x"]),
            Tier("dram", "dram", 0, 64 * GiB, 25 * GiB, nodes=[0]),
            Tier("cxl0", "cxl", 1, 32 * GiB, 31 * GiB, nodes=[1])]


def test_fills_fastest_tier_first_with_whole_sessions():
    rows, unplaced = plan_sessions(tiers(), 10 * GiB, 7)
    assert [(r["name"], r["sessions"]) for r in rows] == [("dram", 2), ("cxl0", 3), ("nvme0", 2)]
    assert unplaced == 0
    assert all(r["used_bytes"] <= r["free_bytes"] for r in rows)


def test_counts_sessions_that_fit_nowhere():
    rows, unplaced = plan_sessions(tiers(), 10 * GiB, 100)
    assert sum(r["sessions"] for r in rows) == 2 + 3 + 9
    assert unplaced == 100 - 14


def test_session_larger_than_every_tier():
    rows, unplaced = plan_sessions(tiers(), 200 * GiB, 3)
    assert unplaced == 3 and all(r["sessions"] == 0 for r in rows)


def test_cli_json_plan_matches_sizing(tmp_path):
    out = subprocess.run([KVTIERD, "--plan", "--model", "llama-3-8b", "--context", "8k", "--sessions", "3",
                          "--nvme-dir", str(tmp_path), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    # Llama-3-8B: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 131,072 bytes per token.
    assert plan["bytes_per_session"] == 131072 * 8192
    assert sum(t["sessions"] for t in plan["tiers"]) + plan["unplaced_sessions"] == 3
    assert plan["tiers"][-1]["kind"] == "nvme"


def test_bad_input_is_one_line_exit_2(tmp_path):
    for args in (["--model", "no-such-model"], ["--context", "0"], ["--dtype", "fp64"],
                 ["--nvme-dir", str(tmp_path / "missing")]):
        out = subprocess.run([KVTIERD, "--plan", *args], capture_output=True, text=True)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
