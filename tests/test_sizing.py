"""kvctl size and kvtier.sizing: exact KV bytes per attention type, paging, quantisation, presets, errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier import discovery
from kvtier.cli import cli, run
from kvtier.discovery import Tier
from kvtier.errors import InputError
from kvtier.sizing import GROUP_ELEMENTS, LayerKV, ModelKV, kv_dtype, preset_names

KVCTL = Path(sys.executable).parent / "kvctl"
GiB = 1 << 30


def tiny(**fields):
    """A small decoder config; fields override."""
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    config.update(fields)
    return ModelKV.from_config(config, name="tiny")


def kinds(model):
    return [layer.kind for layer in model.layers]


def kvctl_json(capsys, *args):
    status = run(cli, "kvctl", ["size", *args, "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    return json.loads(out), err


@pytest.fixture
def no_tiers(monkeypatch):
    monkeypatch.setattr(discovery, "discover", lambda nvme_dirs=(), sysfs_root="/sys": [])


# ---- reference values -------------------------------------------------------------------------------------

def test_llama3_70b_reference():
    m = ModelKV.from_source("llama-3-70b")
    assert m.bytes_per_token("bf16") == 327_680
    assert m.session_bytes(131_072, "bf16") == 40 * GiB


def test_deepseek_v3_reference():
    m = ModelKV.from_source("deepseek-v3")
    assert m.bytes_per_token("bf16") == 70_272 == 61 * 576 * 2
    assert [g.kind for g in m.breakdown(1000)] == ["mla"]


# ---- MHA / GQA / MQA / head_dim ---------------------------------------------------------------------------

def test_mha_when_no_kv_heads():
    # head_dim 64/4 = 16, 4 KV heads: 2 * 4 * 16 * 2 bytes per layer.
    assert tiny().bytes_per_token() == 2 * (2 * 4 * 16 * 2)


def test_gqa_uses_kv_heads():
    assert tiny(num_key_value_heads=2).bytes_per_token() == 2 * (2 * 2 * 16 * 2)


def test_mqa_multi_query_means_one_kv_head():
    assert tiny(multi_query=True).bytes_per_token() == 2 * (2 * 1 * 16 * 2)
    # Falcon-7B's config also says num_kv_heads 71; HF ignores it unless new_decoder_architecture.
    assert tiny(multi_query=True, num_kv_heads=4, new_decoder_architecture=False).bytes_per_token() == 2 * 64
    assert tiny(multi_query=True, num_kv_heads=2, new_decoder_architecture=True).bytes_per_token() == 2 * 128
    falcon = ModelKV.from_source("falcon-7b")
    assert falcon.bytes_per_token() == 32 * 2 * 1 * (4544 // 71) * 2


def test_explicit_head_dim_wins_over_hidden_over_heads():
    gemma = ModelKV.from_source("gemma-2-9b")      # hidden 3584 / 16 heads = 224, head_dim 256
    assert gemma.bytes_per_token() == 42 * 2 * 8 * 256 * 2
    assert tiny(head_dim=40).bytes_per_token() == 2 * (2 * 4 * 40 * 2)


def test_gpt2_aliases():
    m = ModelKV.from_config({"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024})
    assert m.bytes_per_token() == 12 * 2 * 768 * 2
    assert m.max_position_embeddings == 1024


# ---- sliding windows and paging ---------------------------------------------------------------------------

def test_sliding_window_caps_tokens():
    m = ModelKV.from_source("mistral-7b")
    per_layer = 2 * 8 * 128 * 2
    assert m.session_bytes(2000) == 32 * 2000 * per_layer
    assert m.session_bytes(4096) == m.session_bytes(32768) == 32 * 4096 * per_layer
    assert m.bytes_per_token() == 32 * per_layer     # full-attention rate ignores the window


def test_sliding_window_null_and_qwen2_switch_mean_full():
    assert set(kinds(ModelKV.from_source("mixtral-8x7b"))) == {"full"}
    assert set(kinds(ModelKV.from_source("qwen2.5-7b"))) == {"full"}        # sliding_window set, switched off
    q = tiny(model_type="qwen2", num_hidden_layers=6, sliding_window=8, use_sliding_window=True, max_window_layers=4)
    assert kinds(q) == ["full"] * 4 + ["sliding"] * 2


# (context, blocks) for window 10, 4-token blocks, counted by hand from the token positions held.
HAND_BLOCKS = [(1, 1), (4, 1), (5, 2), (10, 3), (11, 3), (12, 3), (13, 4), (14, 3), (100, 3), (103, 3), (105, 4)]


@pytest.mark.parametrize("context,blocks", HAND_BLOCKS)
def test_sliding_blocks_by_hand(context, blocks):
    layer = LayerKV("sliding", 8, 8, window_tokens=10)
    assert layer.blocks_held(context, 4) == blocks
    assert layer.session_bytes(context, kv_dtype("bf16"), 4) == blocks * 4 * 16 * 2


def test_sliding_blocks_match_positions():
    for window, block in [(10, 4), (4096, 16), (7, 7), (3, 8), (1, 1)]:
        layer = LayerKV("sliding", 1, 1, window_tokens=window)
        for context in range(1, 3 * window + 2 * block + 3):
            spanned = {t // block for t in range(max(context - window, 0), context)}
            assert layer.blocks_held(context, block) == len(spanned), (window, block, context)


def test_full_layer_blocks_round_up():
    m = tiny()
    per_token_layer = 2 * 4 * 16 * 2
    assert m.session_bytes(17, block_tokens=16) == 2 * 32 * per_token_layer
    assert m.session_bytes(16, block_tokens=16) == 2 * 16 * per_token_layer
    assert m.session_bytes(17) == 2 * 17 * per_token_layer


def test_gemma3_paged_session_exact():
    m = ModelKV.from_source("gemma-3-27b")
    per_layer = 2 * 16 * 128 * 2
    ctx, block = 131_072 + 5, 16
    sliding_blocks = (ctx - 1) // block - (ctx - 1024) // block + 1
    assert sliding_blocks == 65                     # 1024-token window not aligned to blocks: one more
    assert m.session_bytes(ctx, block_tokens=block) == (
        52 * sliding_blocks * block * per_layer + 10 * math.ceil(ctx / block) * block * per_layer)


# ---- interleaving ------------------------------------------------------------------------------------------

def test_gemma2_even_layers_slide():
    k = kinds(ModelKV.from_source("gemma-2-9b"))
    assert k[:4] == ["sliding", "full", "sliding", "full"]
    assert k.count("sliding") == k.count("full") == 21
    assert kinds(ModelKV.from_source("gemma-2-27b")).count("sliding") == 23


def test_gemma3_every_sixth_layer_global():
    m = ModelKV.from_source("gemma-3-27b")        # pattern 6 comes from the class default
    k = kinds(m)
    assert [i for i, kind in enumerate(k) if kind == "full"] == list(range(5, 62, 6))
    assert k.count("sliding") == 52
    assert m.max_position_embeddings == 131_072
    assert m.session_bytes(131_072) == 2 * 16 * 128 * 2 * (52 * 1024 + 10 * 131_072)


def test_layer_types_list_is_authoritative():
    types = ["sliding_attention", "full_attention", "linear_attention", "mamba"]
    m = tiny(num_hidden_layers=4, sliding_window=3, layer_types=types)
    assert kinds(m) == ["sliding", "full", "none", "none"]
    assert m.session_bytes(10) == (3 + 10) * 2 * 4 * 16 * 2


def test_sliding_pattern_generic():
    assert kinds(tiny(num_hidden_layers=8, sliding_window=4, sliding_window_pattern=4)) == (
        ["sliding"] * 3 + ["full"] + ["sliding"] * 3 + ["full"])


# ---- hybrids and MLA ---------------------------------------------------------------------------------------

def test_jamba_only_attention_layers_count():
    m = ModelKV.from_source("jamba")
    assert [i for i, k in enumerate(kinds(m)) if k == "full"] == [4, 12, 20, 28]
    assert m.bytes_per_token() == 4 * 2 * 8 * 128 * 2
    assert m.session_bytes(1000) == 1000 * m.bytes_per_token()


def test_qwen3_next_linear_attention_holds_no_kv():
    m = ModelKV.from_source("qwen3-next-80b-a3b")
    assert [i for i, k in enumerate(kinds(m)) if k == "full"] == list(range(3, 48, 4))
    assert m.bytes_per_token() == 12 * 2 * 2 * 256 * 2


def test_nemotron_pattern_and_layers_block_type():
    m = tiny(num_hidden_layers=6, hybrid_override_pattern="M-M*-E")
    assert kinds(m) == ["none", "none", "none", "full", "none", "none"]
    m = tiny(num_hidden_layers=3, layers_block_type=["mamba", "attention", "mamba"])
    assert kinds(m) == ["none", "full", "none"]


def test_mla_latent_not_per_head():
    m = ModelKV.from_source("deepseek-v2")
    assert m.bytes_per_token() == 60 * (512 + 64) * 2
    # 128 KV heads of 128 would be 2*128*128*2 = 65,536 bytes per layer; MLA keeps 1,152.
    assert m.bytes_per_token() < 60 * 2 * 128 * 128 * 2 / 50


# ---- dtypes ------------------------------------------------------------------------------------------------

def test_float_dtypes():
    m = ModelKV.from_source("llama-3-70b")
    assert m.bytes_per_token("fp16") == 327_680
    assert m.bytes_per_token("fp8") == 163_840


def test_int8_int4_include_group_metadata():
    m = ModelKV.from_source("llama-3-70b")        # 1,024 K and 1,024 V elements per layer per token
    meta = 1024 * 4 // GROUP_ELEMENTS + (1024 // GROUP_ELEMENTS) * 4
    assert m.bytes_per_token("int8") == 80 * (2048 + meta)
    assert m.bytes_per_token("int4") == 80 * (1024 + meta)
    assert ModelKV.from_source("deepseek-v3").bytes_per_token("int8") == 61 * (576 + 576 // GROUP_ELEMENTS * 4)


def test_int_partial_groups_pay_full_metadata():
    layer = LayerKV("full", 64, 64)
    # 33 tokens: K has 2 groups per channel (32 + 1 tokens), V 2 groups per token (64 channels).
    meta = 64 * 2 * 4 + 33 * 2 * 4
    assert layer.session_bytes(33, kv_dtype("int8")) == 33 * 128 + meta
    assert layer.session_bytes(33, kv_dtype("int4")) == 33 * 64 + meta
    assert layer.session_bytes(32, kv_dtype("int8")) == 32 * 128 + 64 * 4 + 32 * 2 * 4


def test_quantisation_stated_in_json(capsys, no_tiers):
    report, _ = kvctl_json(capsys, "llama-3-8b", "--context", "1k", "--dtype", "int4")
    assert report["quantization"]["group_elements"] == GROUP_ELEMENTS
    assert report["quantization"]["bits"] == 4
    assert report["bytes_per_session"] == ModelKV.from_source("llama-3-8b").session_bytes(1024, "int4")


# ---- sessions, JSON shape, warnings, tiers -----------------------------------------------------------------

def test_total_is_sessions_times_session(capsys, no_tiers):
    report, err = kvctl_json(capsys, "gemma-2-9b", "--context", "6000", "--sessions", "7", "--block-tokens", "16")
    assert err == ""
    assert report["total_bytes"] == 7 * report["bytes_per_session"]
    assert report["bytes_per_session"] == sum(g["bytes"] for g in report["breakdown"])
    m = ModelKV.from_source("gemma-2-9b")
    assert report["bytes_per_session"] == m.session_bytes(6000, block_tokens=16)
    assert report["bytes_per_token_full"] == m.bytes_per_token()
    by_kind = {g["kind"]: g for g in report["breakdown"]}
    assert by_kind["sliding"]["tokens_held"] == 4096 and by_kind["full"]["tokens_held"] == 6000
    assert by_kind["full"]["blocks_held"] == 375
    assert report["warnings"] == []


def test_context_beyond_max_positions_warns(capsys, no_tiers):
    report, err = kvctl_json(capsys, "llama-3-70b", "--context", "128k")
    assert report["total_bytes"] == 40 * GiB
    assert len(report["warnings"]) == 1 and "max_position_embeddings" in report["warnings"][0]
    assert err.startswith("kvctl: warning: ") and err.count("\n") == 1


def test_fits_per_tier(capsys, monkeypatch):
    seen = {}
    tiers = [Tier("nvme0", "nvme", 2, capacity_bytes=1000 * GiB, free_bytes=300 * GiB, paths=["/mnt/kv"]),
             Tier("gpu0", "hbm", 0, capacity_bytes=80 * GiB, free_bytes=50 * GiB, paths=["gpu0"])]

    def fake_discover(nvme_dirs=(), sysfs_root="/sys"):
        seen["nvme_dirs"] = tuple(nvme_dirs)
        return tiers

    monkeypatch.setattr(discovery, "discover", fake_discover)
    report, _ = kvctl_json(capsys, "llama-3.1-70b", "--context", "32k", "--nvme-dir", "/mnt/kv")
    assert seen["nvme_dirs"] == ("/mnt/kv",)
    per_session = report["bytes_per_session"]
    assert per_session == 10 * GiB
    fits = {t["name"]: t for t in report["tiers"]}
    assert [t["name"] for t in report["tiers"]] == ["gpu0", "nvme0"]     # by rank
    assert fits["gpu0"]["sessions_fit_free"] == 5 and fits["gpu0"]["sessions_fit_capacity"] == 8
    assert fits["nvme0"]["sessions_fit_free"] == 30 and fits["nvme0"]["sessions_fit_capacity"] == 100

    assert run(cli, "kvctl", ["size", "llama-3.1-70b", "--context", "32k"]) == 0
    out = capsys.readouterr().out
    gpu_row = next(line for line in out.splitlines() if line.startswith("gpu0"))
    assert gpu_row.split()[-2:] == ["5", "8"]
    assert "10 GiB" in out


def test_discovery_unavailable_still_sizes(capsys, monkeypatch):
    def no_sysfs(nvme_dirs=(), sysfs_root="/sys"):
        raise FileNotFoundError(2, "No such file or directory", "/sys/devices/system/node")

    monkeypatch.setattr(discovery, "discover", no_sysfs)
    report, err = kvctl_json(capsys, "mistral-7b", "--context", "100")
    assert report["tiers"] == [] and "discovery" in report["warnings"][0]
    assert report["total_bytes"] == 100 * 32 * 2 * 8 * 128 * 2


# ---- sources -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads(preset):
    m = ModelKV.from_source(preset)
    assert m.kv_layers > 0 and m.bytes_per_token() > 0
    assert m.session_bytes(4096, block_tokens=16) >= m.session_bytes(4096) > 0


def test_required_presets_exist(capsys):
    required = {"llama-3-8b", "llama-3-70b", "mistral-7b", "mixtral-8x7b", "qwen2.5-7b", "qwen2.5-72b",
                "falcon-7b", "deepseek-v2", "deepseek-v3", "gemma-2-9b", "gemma-2-27b", "gemma-3-27b", "jamba"}
    assert required <= set(preset_names())
    assert run(cli, "kvctl", ["size", "--list-presets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in listed] == preset_names()


def test_config_as_dir_and_as_file(tmp_path):
    preset = ModelKV.from_source("gemma-3-27b")
    text = (Path(__file__).resolve().parents[1] / "userspace/kvtier/data/models/gemma-3-27b.json").read_text()
    (tmp_path / "config.json").write_text(text)
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        m = ModelKV.from_source(source)
        assert m.layers == preset.layers
        assert m.session_bytes(50_000) == preset.session_bytes(50_000)


def test_missing_field_is_named():
    with pytest.raises(InputError, match="num_hidden_layers"):
        ModelKV.from_config({"hidden_size": 64})
    with pytest.raises(InputError, match="qk_rope_head_dim"):
        tiny(kv_lora_rank=512)
    with pytest.raises(InputError, match="sliding_window"):
        tiny(layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(InputError, match="layer_types"):
        tiny(layer_types=["full_attention"])
    with pytest.raises(InputError, match="num_key_value_heads"):
        tiny(num_key_value_heads=0)


def test_library_rejects_nonpositive_sizes():
    m = tiny()
    for bad in (0, -1):
        with pytest.raises(InputError):
            m.session_bytes(bad)
        with pytest.raises(InputError):
            m.size(100, sessions=bad)
        with pytest.raises(InputError):
            m.session_bytes(100, block_tokens=bad)
    with pytest.raises(InputError, match="dtype"):
        m.session_bytes(100, "fp4")


# ---- bad input through the installed command ---------------------------------------------------------------

def bad_inputs(tmp: Path):
    (tmp / "malformed.json").write_text("{\"num_hidden_layers\": ")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp / "empty").mkdir()
    (tmp / "dir-as-file" / "config.json").mkdir(parents=True)
    (tmp / "nolayers.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    (tmp / "unknown-type.json").write_text(json.dumps(
        {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "layer_types": ["warp_attention"]}))
    ctx = ["--context", "1024"]
    return {
        "missing file": [str(tmp / "nope.json"), *ctx],
        "unreadable (directory named config.json)": [str(tmp / "dir-as-file"), *ctx],
        "undecodable bytes": [str(tmp / "binary.json"), *ctx],
        "malformed json": [str(tmp / "malformed.json"), *ctx],
        "not an object": [str(tmp / "list.json"), *ctx],
        "dir without config.json": [str(tmp / "empty"), *ctx],
        "missing field": [str(tmp / "nolayers.json"), *ctx],
        "unknown layer type": [str(tmp / "unknown-type.json"), *ctx],
        "unknown preset": ["llama-9-1t", *ctx],
        "zero context": ["llama-3-8b", "--context", "0"],
        "negative context": ["llama-3-8b", "--context", "-4"],
        "garbage context": ["llama-3-8b", "--context", "lots"],
        "zero sessions": ["llama-3-8b", *ctx, "--sessions", "0"],
        "negative sessions": ["llama-3-8b", *ctx, "--sessions", "-2"],
        "zero block tokens": ["llama-3-8b", *ctx, "--block-tokens", "0"],
        "negative block tokens": ["llama-3-8b", *ctx, "--block-tokens", "-16"],
        "unknown dtype": ["llama-3-8b", *ctx, "--dtype", "fp4"],
        "no context": ["llama-3-8b"],
        "no model": ctx,
    }


def test_bad_input_one_line_exit_2(tmp_path):
    for label, args in bad_inputs(tmp_path).items():
        proc = subprocess.run([KVCTL, "size", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (label, proc.stderr)
        assert "Traceback" not in proc.stderr, label
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvctl: error: "), (label, proc.stderr)
        assert proc.stdout == "", label


def test_unknown_preset_lists_valid_names():
    proc = subprocess.run([KVCTL, "size", "llama-9-1t", "--context", "8"], capture_output=True, text=True)
    assert "llama-3-70b" in proc.stderr and "deepseek-v3" in proc.stderr


def test_help_states_semantics():
    proc = subprocess.run([KVCTL, "size", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for phrase in ("kv_lora_rank + qk_rope_head_dim", "floor((ctx-1)/B)", f"{GROUP_ELEMENTS} elements",
                   "zero-point", "--list-presets"):
        assert phrase in proc.stdout, phrase
