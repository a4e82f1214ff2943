"""kvctl size: exact KV-cache memory for a model, and how many sessions fit in each tier."""
from __future__ import annotations

import json
import re

import click

from kvtier import discovery
from kvtier.cli.common import human_bytes, nvme_dirs_option, table
from kvtier.sizing import DTYPES, ModelKV, preset_names

_SUFFIXES = {"": 1, "k": 1024, "m": 1024 * 1024}


class TokenCount(click.ParamType):
    """A positive integer, optionally with k (x1024) or M (x1048576): 131072, 128k, 1M."""

    name = "TOKENS"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            n = value
        else:
            m = re.fullmatch(r"\s*(-?\d+)\s*([kKmM]?)\s*", str(value))
            if not m:
                self.fail(f"{value!r} is not a token count (e.g. 131072, 128k, 1M)", param, ctx)
            n = int(m.group(1)) * _SUFFIXES[m.group(2).lower()]
        if n <= 0:
            self.fail(f"{value} must be a positive number of tokens", param, ctx)
        return n


def tier_fits(tiers, bytes_per_session: int) -> list[dict]:
    """Sessions of `bytes_per_session` that fit in each tier, by free and by total capacity."""
    return [{
        "name": t.name, "kind": t.kind, "rank": t.rank,
        "capacity_bytes": t.capacity_bytes, "free_bytes": t.free_bytes,
        "sessions_fit_free": t.free_bytes // bytes_per_session,
        "sessions_fit_capacity": t.capacity_bytes // bytes_per_session,
    } for t in sorted(tiers, key=lambda t: t.rank)]


def _discover(nvme_dirs, warnings: list[str]):
    # Sizing must work where discovery cannot (no sysfs); say so instead of failing.
    try:
        return discovery.discover(nvme_dirs=tuple(nvme_dirs))
    except OSError as e:
        warnings.append(f"tier discovery failed: {e}")
    return []


def _human(report: dict) -> str:
    q = report["quantization"]
    paging = f"{report['block_tokens']}-token blocks" if report["block_tokens"] else "no paging"
    dtype = report["dtype"]
    if "group_elements" in q:
        dtype += f" (+ fp16 scale and zero-point per {q['group_elements']} elements)"
    out = [
        f"model        {report['model']}  ({report['model_type'] or 'unknown type'}, {report['source']})",
        f"layers       {report['layers']}, {report['kv_layers']} holding KV",
        f"context      {report['context_tokens']:,} tokens x {report['sessions']:,} session(s), {dtype}, {paging}",
        f"per token    {report['bytes_per_token_full']:,} bytes at full attention "
        f"({human_bytes(report['bytes_per_token_full'])})",
        f"per session  {report['bytes_per_session']:,} bytes ({human_bytes(report['bytes_per_session'])})",
        f"total        {report['total_bytes']:,} bytes ({human_bytes(report['total_bytes'])})",
        "",
    ]
    rows = [["kind", "layers", "window", "bytes/token", "tokens held", "blocks held", "bytes/session", ""]]
    for g in report["breakdown"]:
        rows.append([g["kind"], str(g["layers"]), "-" if g["window_tokens"] is None else f"{g['window_tokens']:,}",
                     f"{g['bytes_per_token']:,}", f"{g['tokens_held']:,}",
                     "-" if g["blocks_held"] is None else f"{g['blocks_held']:,}",
                     f"{g['bytes']:,}", human_bytes(g["bytes"])])
    out.append(table(rows, right={1, 2, 3, 4, 5, 6, 7}))
    if report["tiers"]:
        rows = [["tier", "kind", "free", "capacity", "sessions fit (free)", "(capacity)"]]
        for t in report["tiers"]:
            rows.append([t["name"], t["kind"], human_bytes(t["free_bytes"]), human_bytes(t["capacity_bytes"]),
                         f"{t['sessions_fit_free']:,}", f"{t['sessions_fit_capacity']:,}"])
        out += ["", table(rows, right={2, 3, 4, 5})]
    return "\n".join(out)


def _list_presets(as_json: bool) -> None:
    rows = []
    for name in preset_names():
        m = ModelKV.from_preset(name)
        kinds = sorted({layer.kind for layer in m.layers if layer.kind != "none"})
        rows.append({"name": name, "model_type": m.model_type, "layers": len(m.layers), "kv_layers": m.kv_layers,
                     "attention": kinds, "bytes_per_token_full": m.bytes_per_token("bf16"),
                     "max_position_embeddings": m.max_position_embeddings})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    lines = [["preset", "type", "layers", "kv layers", "attention", "bf16 bytes/token", "max context"]]
    for r in rows:
        lines.append([r["name"], r["model_type"] or "-", str(r["layers"]), str(r["kv_layers"]),
                      "+".join(r["attention"]), f"{r['bytes_per_token_full']:,}",
                      "-" if r["max_position_embeddings"] is None else f"{r['max_position_embeddings']:,}"])
    click.echo(table(lines, right={2, 3, 5, 6}))


@click.command("size", epilog="""\b
Examples:
  kvctl size llama-3-70b --context 128k
  kvctl size deepseek-v3 --context 32k --sessions 64 --dtype fp8 --json
  kvctl size ./Mistral-7B-v0.1 --context 32768 --block-tokens 16
  kvctl size gemma-3-27b --context 128k --nvme-dir /mnt/nvme/kv
  kvctl size --list-presets
""")
@click.argument("model", required=False)
@click.option("--context", type=TokenCount(), help="Tokens per session (131072, 128k, 1M). Required.")
@click.option("--sessions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Concurrent sessions at that context.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bf16", show_default=True,
              help="KV element type.")
@click.option("--block-tokens", type=click.IntRange(min=1), default=None,
              help="Paged allocation: tokens per block; each layer rounds up to whole blocks.")
@nvme_dirs_option
@click.option("--list-presets", is_flag=True, help="List the built-in models and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def size(model, context, sessions, dtype, block_tokens, nvme_dirs, list_presets, as_json):
    """Exact KV-cache bytes for MODEL at a context, and sessions that fit per tier.

    MODEL is a Hugging Face config.json, a directory holding one, or a preset
    name (--list-presets).

    \b
    Per layer and token (b = bytes per element):
      MHA/GQA/MQA  2 * num_key_value_heads * head_dim * b  (K and V)
                   head_dim: config head_dim, else hidden_size / heads;
                   no num_key_value_heads: MHA; multi_query: 1 KV head
      sliding      same width, keeps min(context, window) tokens
      MLA          (kv_lora_rank + qk_rope_head_dim) * b  (one latent)
      Mamba/linear 0 (fixed-size state, not KV)
    Interleaving follows the config: layer_types, Gemma 2 (even layers
    slide), sliding_window_pattern (Gemma 3: every 6th layer global),
    Qwen2 use_sliding_window/max_window_layers, Jamba attn_layer_period/
    offset, Nemotron-H hybrid_override_pattern, full_attention_interval.

    \b
    --block-tokens B: a full layer holds ceil(ctx/B) blocks; a sliding layer
    the blocks its last `window` tokens span:
      floor((ctx-1)/B) - floor(max(ctx-window, 0)/B) + 1
    (a window not aligned to blocks straddles one more block).

    \b
    Dtypes: bf16/fp16 2 bytes, fp8 1 byte (per-tensor scale, not counted);
    int8/int4 add an fp16 scale + fp16 zero-point (4 bytes) per group of
    32 elements, KIVI-style: keys per channel (32 tokens of a channel),
    values and MLA latents per token (32 channels of a token).

    A context beyond max_position_embeddings is sized but warned about.
    Per-tier fits divide each discovered tier's free and total bytes by
    the bytes of one session.
    """
    if list_presets:
        _list_presets(as_json)
        return
    if model is None:
        raise click.UsageError("missing argument 'MODEL' (a config.json, a directory, or a preset name)")
    if context is None:
        raise click.UsageError("missing option '--context'")
    kv = ModelKV.from_source(model)
    report = kv.size(context, sessions=sessions, dtype=dtype, block_tokens=block_tokens).to_dict()
    warnings = report["warnings"]
    report["tiers"] = tier_fits(_discover(nvme_dirs, warnings), report["bytes_per_session"])
    for w in warnings:
        click.echo(f"kvctl: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(_human(report))

