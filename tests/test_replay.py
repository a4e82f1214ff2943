"""kvctl replay: the trace reader, the single-tier JSON contract and bad input (exit 2, one line)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier.errors import InputError
from kvtier.policy.replay import lifecycle_hints, replay_single
from kvtier.policy.synth import generate
from kvtier.policy.trace import parse_lines, read_trace, write_trace

ROOT = Path(__file__).resolve().parents[1]
KVCTL = ROOT / ".venv/bin/kvctl"
TRACE = ROOT.parent / "shared/traces/mooncake_conversation_trace.jsonl"


def kvctl(*args):
    exe = [str(KVCTL)] if KVCTL.exists() else [sys.executable, "-m", "kvtier.cli"]
    return subprocess.run(exe + [str(a) for a in args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def small_trace(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_trace(generate("chat", 300, seed=5), path)
    return path


def test_sessions_inferred_from_prefixes():
    reqs = parse_lines([
        '{"timestamp": 0, "input_length": 1500, "output_length": 5, "hash_ids": [0, 1, 2]}',
        '{"timestamp": 1, "input_length": 600, "output_length": 5, "hash_ids": [0, 7]}',
        '{"timestamp": 2, "input_length": 2500, "output_length": 5, "hash_ids": [0, 1, 3, 4]}',
    ])
    assert reqs[0].session_id == reqs[2].session_id != reqs[1].session_id


@pytest.mark.parametrize("line,problem", [
    ("{bad", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1}', "missing field 'hash_ids'"),
    ('{"timestamp": 0, "input_length": "5", "output_length": 1, "hash_ids": [1]}', "'input_length'"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, "x"]}', "'hash_ids'"),
    ('{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}', "negative"),
])
def test_malformed_line_names_line_and_problem(line, problem):
    good = '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}'
    with pytest.raises(InputError, match=rf"t.jsonl:3: .*{problem}"):
        parse_lines([good, "", line], where="t.jsonl")


def test_json_contract(small_trace):
    p = kvctl("replay", small_trace, "--policy", "lru", "--capacity-blocks", 50, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    expected = replay_single(read_trace(small_trace), "lru", 50)
    assert out["hit_rate"] == pytest.approx(expected.hit_rate)
    assert out["hits"] == expected.hits and out["block_accesses"] == expected.accesses


def test_tiers_and_plot(small_trace, tmp_path):
    png = tmp_path / "hr.png"
    p = kvctl("replay", small_trace, "--tiers", "dram:40,cxl:100,nvme:400", "--json", "--plot", png)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [t["kind"] for t in out["tiers"]] == ["dram", "cxl", "nvme"]
    assert out["ttft_ms_mean"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    human = kvctl("replay", small_trace, "--tiers", "dram:40,nvme:400")
    assert human.returncode == 0 and "TTFT" in human.stdout


def test_lifecycle_hints_via_cli(small_trace):
    base = json.loads(kvctl("replay", small_trace, "--capacity-blocks", 50, "--json").stdout)
    p = kvctl("replay", small_trace, "--capacity-blocks", 50, "--hints", "lifecycle", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["hints"] == {"kind": "lifecycle", "accuracy": 1.0}
    reqs = read_trace(small_trace)
    want = replay_single(reqs, "kvtier", 50, hints=lifecycle_hints(reqs))
    assert out["hits"] == want.hits and "hints" not in base
    tiers = kvctl("replay", small_trace, "--tiers", "dram:40,nvme:400", "--hints", "lifecycle", "--json")
    assert tiers.returncode == 0 and json.loads(tiers.stdout)["hints"]["kind"] == "lifecycle"


@pytest.mark.parametrize("args,needle", [
    (["--hint-accuracy", "1.5"], "--hint-accuracy"),
    (["--hints", "oracle"], "--hints"),
    (["--policy", "belady"], "valid: kvtier"),
    (["--tiers", "ram:10"], "unknown tier kind 'ram'"),
    (["--tiers", "dram:ten"], "capacity 'ten'"),
    (["--capacity-blocks", "10", "--tiers", "dram:10"], "not both"),
])
def test_bad_input_exits_2_one_line(small_trace, args, needle):
    p = kvctl("replay", small_trace, *args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr


def test_malformed_trace_via_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 1\n')
    p = kvctl("replay", bad)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "bad.jsonl:2:" in p.stderr
    missing = kvctl("replay", tmp_path / "nope.jsonl")
    assert missing.returncode in (1, 2) and missing.stderr.count("\n") == 1


@pytest.mark.skipif(not TRACE.exists(), reason=f"bundled trace not found at {TRACE}")
def test_bundled_trace_replays_fast():
    t0 = time.perf_counter()
    p = kvctl("replay", TRACE, "--capacity-blocks", 3655, "--json")
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["block_accesses"] == 288500
    assert elapsed < 30  # generous for a loaded 2-core machine; tools/bench_policy.py measures the rate
