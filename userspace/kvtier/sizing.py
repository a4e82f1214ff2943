"""Exact KV-cache memory for a model, per attention type.

A model's KV footprint is the sum over its layers of what each layer keeps per token, times the tokens it
keeps. General-purpose calculators multiply one number by the layer count; that over-provisions sliding-window,
interleaved local/global, latent (MLA) and hybrid models by up to an order of magnitude. Here every layer gets
a kind, its per-token width in elements and (for sliding layers) its window; the arithmetic lives in
`LayerKV.block_bytes` and `LayerKV.blocks_held`, nowhere else.

Layer kinds and their formulas (E = elements per token, b = dtype bits):

* ``full`` (MHA, GQA, MQA): K and V are both stored, each ``num_key_value_heads * head_dim`` elements, so a
  layer costs ``2 * kv_heads * head_dim * b/8`` bytes per token and keeps every token of the context.
  ``head_dim`` is the config's ``head_dim`` when present (Gemma, Mistral-Nemo), else
  ``hidden_size // num_attention_heads``. ``num_key_value_heads`` missing means MHA (= attention heads);
  ``multi_query`` true means MQA (1 KV head) unless Falcon's ``new_decoder_architecture`` names ``num_kv_heads``.
* ``sliding`` (Mistral v0.1, Gemma 2/3 local layers, gpt-oss): same width as ``full`` but keeps only the last
  ``window`` tokens: ``min(context, window)``.
* ``mla`` (DeepSeek-V2/V3, Kimi-K2; any config with ``kv_lora_rank``): one compressed latent per token per
  layer, not K and V per head: ``(kv_lora_rank + qk_rope_head_dim) * b/8`` bytes per token, every token kept.
  DeepSeek-V3: 61 layers * 576 * 2 = 70,272 bytes per token in bf16. Multi-token-prediction layers
  (``num_nextn_predict_layers``) are not counted: they only hold KV when speculative decoding uses them.
* ``none`` (Mamba/SSM, linear attention, short convolution): a fixed-size state per sequence, no per-token KV;
  counted as 0 bytes here (the state is not KV-cache and does not grow with the context).

Paged allocation (``block_tokens`` = B): storage is whole blocks of B token slots per layer.
A full layer keeps ``ceil(ctx / B)`` blocks. A sliding layer keeps the blocks that the last ``window`` tokens
(positions ``ctx-window .. ctx-1``) actually span: ``floor((ctx-1)/B) - floor(max(ctx-window, 0)/B) + 1``;
a window that is not aligned to blocks straddles one block more than ``window / B``.
Without paging a layer holds exactly its tokens (a sliding layer is a ring buffer of ``window`` slots).

Dtypes: bf16/fp16 2 bytes per element; fp8 1 byte with one per-tensor scale per layer (a handful of bytes
per model, not per token: not counted). int8/int4 are KIVI-style asymmetric group quantisation: every group of
``GROUP_ELEMENTS`` (32) elements carries an fp16 scale and an fp16 zero-point (4 bytes). Keys are grouped per
channel (a group is 32 consecutive tokens of one channel), values per token (32 consecutive channels of one
token); the MLA latent is grouped per token like values. A partial group still pays its full 4 bytes. Groups
never straddle a block. No full-precision residual window is modelled.

Config conventions honoured (Hugging Face ``config.json``), first match wins for the per-layer layout:
``layer_types`` list; Nemotron-H ``hybrid_override_pattern`` ("M" Mamba, "*" attention, "-" MLP, "E" MoE);
``layers_block_type`` list; Jamba ``attn_layer_period``/``attn_layer_offset`` (attention where
``i % period == offset``); Qwen3-Next ``full_attention_interval`` (full where ``(i+1) % n == 0``, the rest
linear attention). Otherwise, if a sliding window applies (``sliding_window`` a positive integer, and not
switched off by Qwen2's ``use_sliding_window: false``): Gemma 2 slides on even-indexed layers (HF:
``is_sliding = not bool(layer_idx % 2)``); ``sliding_window_pattern`` p (Gemma 3, Cohere 2) slides where
``(i+1) % p != 0``; Qwen2 ``use_sliding_window`` slides on layers ``i >= max_window_layers``; anything else
(Mistral) slides on every layer. A multimodal config's language model is read from ``text_config``.
Fields a saved config omits because they equal the class default are filled from `MODEL_TYPE_DEFAULTS`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path

from kvtier.errors import InputError

KINDS = ("full", "sliding", "mla", "none")
GROUP_ELEMENTS = 32          # KIVI's group size
GROUP_META_BYTES = 4         # fp16 scale + fp16 zero-point per group


@dataclass(frozen=True)
class KVDtype:
    """How one KV element is stored."""

    name: str
    bits: int
    group_elements: int = 0      # 0: no per-group metadata

    @property
    def grouped(self) -> bool:
        return self.group_elements > 0

    def describe(self) -> dict:
        if self.grouped:
            return {
                "dtype": self.name, "bits": self.bits, "scheme": "asymmetric group quantisation (KIVI-style)",
                "group_elements": self.group_elements, "metadata_bytes_per_group": GROUP_META_BYTES,
                "metadata": "fp16 scale + fp16 zero-point per group",
                "key_grouping": f"per channel: a group is {self.group_elements} tokens of one channel",
                "value_grouping": f"per token: a group is {self.group_elements} channels of one token",
                "mla_latent_grouping": "per token, like values",
                "partial_groups": "a partial group pays the full metadata; groups never straddle a block",
            }
        if self.name == "fp8":
            return {"dtype": self.name, "bits": self.bits, "scheme": "per-tensor scale",
                    "metadata": "one scale per layer and tensor, independent of tokens: not counted (negligible)"}
        return {"dtype": self.name, "bits": self.bits, "scheme": "none"}


DTYPES = {
    "bf16": KVDtype("bf16", 16),
    "fp16": KVDtype("fp16", 16),
    "fp8": KVDtype("fp8", 8),
    "int8": KVDtype("int8", 8, GROUP_ELEMENTS),
    "int4": KVDtype("int4", 4, GROUP_ELEMENTS),
}


def kv_dtype(name: str | KVDtype) -> KVDtype:
    if isinstance(name, KVDtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"unknown dtype {name!r} (valid: {', '.join(DTYPES)})") from None


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class LayerKV:
    """One decoder layer's KV: its kind, per-token widths in elements, and its window (sliding only)."""

    kind: str
    key_elements: int = 0        # per token; MLA: the latent (kv_lora_rank + qk_rope_head_dim)
    value_elements: int = 0      # per token; MLA: 0, the latent serves K and V
    window_tokens: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}")
        if (self.kind == "sliding") != (self.window_tokens is not None):
            raise ValueError("window_tokens is set exactly for sliding layers")

    def tokens_held(self, context: int) -> int:
        """Tokens this layer keeps for one session at `context` tokens."""
        if self.kind == "none":
            return 0
        if self.kind == "sliding":
            return min(context, self.window_tokens)
        return context

    def blocks_held(self, context: int, block_tokens: int) -> int:
        """Blocks of `block_tokens` slots this layer needs at `context` tokens (see module doc)."""
        if self.kind == "none":
            return 0
        if self.kind == "sliding":
            first = max(context - self.window_tokens, 0)
            return (context - 1) // block_tokens - first // block_tokens + 1
        return -(-context // block_tokens)

    def block_bytes(self, slots: int, dtype: KVDtype) -> int:
        """Bytes of one contiguous allocation of `slots` token slots, metadata included."""
        if self.kind == "none" or slots == 0:
            return 0
        elements = slots * (self.key_elements + self.value_elements)
        data = -(-elements * dtype.bits // 8)
        if not dtype.grouped:
            return data
        g = dtype.group_elements
        if self.kind == "mla":          # latent grouped per token
            groups = slots * -(-self.key_elements // g)
        else:                           # K per channel over tokens, V per token over channels
            groups = self.key_elements * -(-slots // g) + slots * -(-self.value_elements // g)
        return data + groups * GROUP_META_BYTES

    def bytes_per_token(self, dtype: KVDtype) -> Fraction:
        """Bytes one more token costs this layer, amortised over whole quantisation groups.

        full / sliding: (key_elements + value_elements) * bits/8, key = value = kv_heads * head_dim;
        mla: latent * bits/8; none: 0. int8/int4 add 4 bytes per 32-element group (module doc).
        """
        if self.kind == "none":
            return Fraction(0)
        g = dtype.group_elements
        per = Fraction((self.key_elements + self.value_elements) * dtype.bits, 8)
        if dtype.grouped:
            if self.kind == "mla":
                per += -(-self.key_elements // g) * GROUP_META_BYTES
            else:
                per += Fraction(self.key_elements * GROUP_META_BYTES, g)
                per += -(-self.value_elements // g) * GROUP_META_BYTES
        return per

    def session_bytes(self, context: int, dtype: KVDtype, block_tokens: int | None = None) -> int:
        """Bytes this layer holds for one session at `context` tokens."""
        if block_tokens is None:
            return self.block_bytes(self.tokens_held(context), dtype)
        return self.blocks_held(context, block_tokens) * self.block_bytes(block_tokens, dtype)


def _number(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


@dataclass(frozen=True)
class LayerGroup:
    """Layers of one kind and shape, for one session: the per-layer-type breakdown."""

    kind: str
    layers: int
    window_tokens: int | None
    bytes_per_token: int | float     # all `layers` together, one token
    tokens_held: int                 # per layer
    blocks_held: int | None          # per layer; None without paging
    bytes: int                       # all `layers` together, one session

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SizeReport:
    """The answer to `kvctl size`: one session, all sessions, and the breakdown."""

    model: str
    model_type: str | None
    source: str
    context_tokens: int
    sessions: int
    dtype: str
    quantization: dict
    block_tokens: int | None
    layers: int
    kv_layers: int
    max_position_embeddings: int | None
    bytes_per_token_full: int | float
    bytes_per_session: int
    total_bytes: int
    breakdown: list[LayerGroup]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["breakdown"] = [g.to_dict() for g in self.breakdown]
        d["warnings"] = list(self.warnings)
        return d


@dataclass(frozen=True)
class ModelKV:
    """A model's KV layout: one LayerKV per decoder layer."""

    name: str
    layers: tuple[LayerKV, ...]
    model_type: str | None = None
    max_position_embeddings: int | None = None
    source: str = "config"

    @classmethod
    def from_config(cls, config: dict, name: str | None = None, source: str = "config") -> "ModelKV":
        return _parse_config(config, name=name, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelKV":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        config = _read_json(path)
        fallback = path.resolve().parent.name if path.name == "config.json" else path.stem
        return cls.from_config(config, name=_name_from(config, fallback), source=str(path))

    @classmethod
    def from_preset(cls, preset: str) -> "ModelKV":
        names = preset_names()
        if preset not in names:
            raise InputError(f"unknown preset {preset!r} (valid: {', '.join(names)})")
        text = _presets_dir().joinpath(f"{preset}.json").read_text(encoding="utf-8")
        return cls.from_config(json.loads(text), name=preset, source="preset")

    @classmethod
    def from_source(cls, source: str | Path) -> "ModelKV":
        """A config.json file, a directory holding one, or a preset name."""
        path = Path(source)
        if path.exists():
            return cls.from_file(path)
        if str(source) in preset_names():
            return cls.from_preset(str(source))
        if "/" in str(source) or str(source).endswith(".json"):
            raise InputError(f"{source}: no such file or directory")
        raise InputError(f"unknown model {str(source)!r}: not a config.json path or directory, and not a preset "
                         f"(valid presets: {', '.join(preset_names())})")

    @property
    def kv_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.kind != "none")

    def bytes_per_token(self, dtype: str | KVDtype = "bf16") -> int | float:
        """Bytes one token costs across all layers at full attention (before any window caps it)."""
        dt = kv_dtype(dtype)
        return _number(sum((layer.bytes_per_token(dt) for layer in self.layers), Fraction(0)))

    def session_bytes(self, context: int, dtype: str | KVDtype = "bf16", block_tokens: int | None = None) -> int:
        """Bytes one session holds at `context` tokens, block padding included."""
        _positive(context, "context")
        if block_tokens is not None:
            _positive(block_tokens, "block_tokens")
        dt = kv_dtype(dtype)
        return sum(layer.session_bytes(context, dt, block_tokens) for layer in self.layers)

    def breakdown(self, context: int, dtype: str | KVDtype = "bf16",
                  block_tokens: int | None = None) -> list[LayerGroup]:
        """Per-layer-type totals for one session, in order of first appearance."""
        dt = kv_dtype(dtype)
        groups: dict[LayerKV, list[LayerKV]] = {}
        for layer in self.layers:
            groups.setdefault(layer, []).append(layer)
        out = []
        for layer, members in groups.items():
            n = len(members)
            out.append(LayerGroup(
                kind=layer.kind, layers=n, window_tokens=layer.window_tokens,
                bytes_per_token=_number(n * layer.bytes_per_token(dt)),
                tokens_held=layer.tokens_held(context),
                blocks_held=None if block_tokens is None else layer.blocks_held(context, block_tokens),
                bytes=n * layer.session_bytes(context, dt, block_tokens)))
        return out

    def size(self, context: int, sessions: int = 1, dtype: str | KVDtype = "bf16",
             block_tokens: int | None = None) -> SizeReport:
        _positive(context, "context")
        _positive(sessions, "sessions")
        if block_tokens is not None:
            _positive(block_tokens, "block_tokens")
        dt = kv_dtype(dtype)
        per_session = self.session_bytes(context, dt, block_tokens)
        warnings = []
        if self.max_position_embeddings is not None and context > self.max_position_embeddings:
            warnings.append(f"context {context} tokens exceeds {self.name}'s max_position_embeddings "
                            f"{self.max_position_embeddings}")
        return SizeReport(
            model=self.name, model_type=self.model_type, source=self.source, context_tokens=context,
            sessions=sessions, dtype=dt.name, quantization=dt.describe(), block_tokens=block_tokens,
            layers=len(self.layers), kv_layers=self.kv_layers,
            max_position_embeddings=self.max_position_embeddings,
            bytes_per_token_full=self.bytes_per_token(dt), bytes_per_session=per_session,
            total_bytes=sessions * per_session, breakdown=self.breakdown(context, dt, block_tokens),
            warnings=warnings)


# ---- presets -------------------------------------------------------------------------------------------

def _presets_dir():
    return resources.files("kvtier").joinpath("data").joinpath("models")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".json"))


# ---- config parsing ------------------------------------------------------------------------------------

# Class defaults of transformers' configs for fields that shape the KV layout: save_pretrained leaves out a
# field equal to its class default (Gemma 3's text_config has no sliding_window_pattern), so we fill them in.
MODEL_TYPE_DEFAULTS = {
    "mistral": {"sliding_window": 4096},
    "gemma2": {"sliding_window": 4096},
    "gemma3_text": {"hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 4096,
                    "sliding_window_pattern": 6, "max_position_embeddings": 131072},
    "cohere2": {"sliding_window_pattern": 4},
    "qwen2": {"use_sliding_window": False},
    "qwen2_moe": {"use_sliding_window": False},
    "qwen3": {"use_sliding_window": False},
    "qwen3_moe": {"use_sliding_window": False},
    "qwen3_next": {"full_attention_interval": 4},
    "jamba": {"attn_layer_period": 8, "attn_layer_offset": 4},
    "falcon": {"max_position_embeddings": 2048},
}
# A multimodal wrapper whose text_config omits its model_type.
TEXT_MODEL_TYPES = {"gemma3": "gemma3_text"}
# GPT-2 / Falcon (RefinedWeb) / MPT-style names for the standard fields.
ALIASES = {
    "num_hidden_layers": ("n_layer", "n_layers", "num_layers"),
    "num_attention_heads": ("n_head", "n_heads"),
    "hidden_size": ("n_embd", "d_model"),
    "max_position_embeddings": ("n_positions", "max_seq_len", "seq_length"),
}
LAYER_TYPE_KINDS = {
    "full_attention": "full", "attention": "full", "global_attention": "full",
    "sliding_attention": "sliding", "sliding_window_attention": "sliding", "local_attention": "sliding",
    "linear_attention": "none", "mamba": "none", "mamba2": "none", "ssm": "none", "conv": "none",
    "short_conv": "none", "recurrent": "none",
}
NEMOTRON_PATTERN_KINDS = {"*": "full", "M": "none", "-": "none", "E": "none"}


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a config.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _name_from(config: dict, fallback: str) -> str:
    name = config.get("_name_or_path")
    return name if isinstance(name, str) and name else fallback


class _Fields:
    """Read fields of one config (with defaults and aliases), naming the field in every error."""

    def __init__(self, config: dict, where: str):
        self.config = config
        self.where = where
        self.defaults = MODEL_TYPE_DEFAULTS.get(config.get("model_type"), {})

    def get(self, key: str, default=None):
        for k in (key, *ALIASES.get(key, ())):
            if k in self.config and self.config[k] is not None:
                return self.config[k]
        return self.defaults.get(key, default)

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def integer(self, key: str, *, required: bool = True, minimum: int = 1) -> int | None:
        value = self.get(key)
        if value is None:
            if required:
                raise InputError(f"{self.where}: missing field {key!r}")
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"{self.where}: field {key!r} must be an integer >= {minimum}, got {value!r}")
        return value

    def bad(self, key: str, value, why: str) -> InputError:
        return InputError(f"{self.where}: field {key!r}: {why}, got {value!r}")


def _language_model(config: dict) -> tuple[dict, str]:
    """The dict describing the decoder: the config itself, or its text_config for multimodal wrappers."""
    if any(k in config for k in ("num_hidden_layers", *ALIASES["num_hidden_layers"])):
        return config, "config"
    for key in ("text_config", "llm_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict):
            sub = dict(sub)
            if "model_type" not in sub and config.get("model_type") in TEXT_MODEL_TYPES:
                sub["model_type"] = TEXT_MODEL_TYPES[config["model_type"]]
            return sub, key
    return config, "config"


def _sliding_window(f: _Fields) -> int | None:
    if f.get("use_sliding_window") is False:
        return None          # Qwen2: the window field is present but switched off
    window = f.get("sliding_window")
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise f.bad("sliding_window", window, "must be a positive integer or null")
    return window


def _layer_kinds(f: _Fields, n_layers: int, window: int | None) -> list[str]:
    """Kind per layer before MLA substitution: 'full', 'sliding' or 'none'."""
    layer_types = f.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != n_layers:
            raise f.bad("layer_types", layer_types if not isinstance(layer_types, list) else len(layer_types),
                        f"must be a list of {n_layers} entries (num_hidden_layers)")
        kinds = []
        for i, t in enumerate(layer_types):
            if t not in LAYER_TYPE_KINDS:
                raise InputError(f"{f.where}: field 'layer_types[{i}]': unknown layer type {t!r} "
                                 f"(known: {', '.join(LAYER_TYPE_KINDS)})")
            kinds.append(LAYER_TYPE_KINDS[t])
        return kinds

    pattern = f.get("hybrid_override_pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or len(pattern) != n_layers:
            raise f.bad("hybrid_override_pattern", pattern, f"must be a string of {n_layers} characters")
        for i, c in enumerate(pattern):
            if c not in NEMOTRON_PATTERN_KINDS:
                raise InputError(f"{f.where}: field 'hybrid_override_pattern': unknown layer code {c!r} at {i} "
                                 f"(known: {''.join(NEMOTRON_PATTERN_KINDS)})")
        return [NEMOTRON_PATTERN_KINDS[c] for c in pattern]

    block_types = f.get("layers_block_type")
    if block_types is not None:
        if not isinstance(block_types, list) or len(block_types) != n_layers:
            raise f.bad("layers_block_type", block_types, f"must be a list of {n_layers} entries")
        kinds = []
        for i, t in enumerate(block_types):
            if t not in LAYER_TYPE_KINDS:
                raise InputError(f"{f.where}: field 'layers_block_type[{i}]': unknown layer type {t!r}")
            kinds.append(LAYER_TYPE_KINDS[t])
        return kinds

    if f.has("attn_layer_period"):        # Jamba
        period = f.integer("attn_layer_period")
        offset = f.integer("attn_layer_offset", minimum=0)
        return ["full" if i % period == offset else "none" for i in range(n_layers)]

    if f.has("full_attention_interval"):  # Qwen3-Next / Qwen3.5: 3 linear-attention layers, then 1 full
        interval = f.integer("full_attention_interval")
        return ["full" if (i + 1) % interval == 0 else "none" for i in range(n_layers)]

    if window is None:
        return ["full"] * n_layers
    if f.config.get("model_type") == "gemma2":
        return ["sliding" if i % 2 == 0 else "full" for i in range(n_layers)]
    if f.has("sliding_window_pattern"):
        p = f.integer("sliding_window_pattern")
        return ["sliding" if (i + 1) % p else "full" for i in range(n_layers)]
    if f.get("use_sliding_window") is True and f.has("max_window_layers"):
        first = f.integer("max_window_layers", minimum=0)
        return ["sliding" if i >= first else "full" for i in range(n_layers)]
    return ["sliding"] * n_layers


def _kv_heads(f: _Fields, n_heads: int) -> int:
    # Falcon: new_decoder_architecture names num_kv_heads; otherwise multi_query means one KV head.
    if f.get("new_decoder_architecture") is True:
        return f.integer("num_kv_heads")
    if f.get("multi_query") is True:
        return 1
    for key in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):
        if f.has(key):
            return f.integer(key)
    return n_heads


def _parse_config(config: dict, name: str | None, source: str) -> ModelKV:
    if not isinstance(config, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(config).__name__}")
    lm, key = _language_model(config)
    where = source if key == "config" else f"{source}: {key}"
    f = _Fields(lm, where)
    n_layers = f.integer("num_hidden_layers")
    window = _sliding_window(f)
    kinds = _layer_kinds(f, n_layers, window)
    if "sliding" in kinds and window is None:
        raise InputError(f"{where}: missing field 'sliding_window' (the layout has sliding-attention layers)")

    if f.has("kv_lora_rank"):             # MLA: one latent per token per layer
        if "sliding" in kinds:
            raise InputError(f"{where}: field 'kv_lora_rank': MLA with sliding-window layers is not supported")
        latent = f.integer("kv_lora_rank") + f.integer("qk_rope_head_dim")
        attention = LayerKV("mla", key_elements=latent)
        layers = tuple(attention if k == "full" else LayerKV("none") for k in kinds)
    else:
        n_heads = f.integer("num_attention_heads")
        if f.has("head_dim"):
            head_dim = f.integer("head_dim")
        else:
            hidden = f.integer("hidden_size")
            if hidden % n_heads:
                raise f.bad("hidden_size", hidden, f"not divisible by num_attention_heads {n_heads} "
                            "and no head_dim given")
            head_dim = hidden // n_heads
        width = _kv_heads(f, n_heads) * head_dim
        by_kind = {"full": LayerKV("full", width, width), "none": LayerKV("none")}
        if window is not None:
            by_kind["sliding"] = LayerKV("sliding", width, width, window_tokens=window)
        layers = tuple(by_kind[k] for k in kinds)

    if not any(layer.kind != "none" for layer in layers):
        raise InputError(f"{where}: no layer holds KV (layout has only non-attention layers)")
    max_pos = f.integer("max_position_embeddings", required=False)
    return ModelKV(name=name or _name_from(config, "model"), layers=layers, model_type=lm.get("model_type"),
                   max_position_embeddings=max_pos, source=source)
