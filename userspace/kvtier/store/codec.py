"""Per-tier block codecs: lossless zstd / lz4, and KIVI-style int8 / int4 quantisation of KV blocks.

Quantisation follows KIVI (Liu et al., 2024): keys have outlier *channels*, so K is quantised per
channel (one group = one (head, dim) channel across the block's tokens); values have no such
structure and are quantised per token (one group = one token's head_dim values in one head).
Asymmetric: q = round((x - zero) / scale), scale and zero stored as fp16 per group. A quantised blob
carries its own header (dtype and shape), so decode() needs no layout.

Error is measured on every encode (max_abs and rel_rms = rms(error) / rms(original)); a codec with
`error_bound` refuses a block whose rel_rms exceeds it (ErrorBoundExceeded), and the caller stores
that block lossless instead.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from kvtier.errors import InputError
from kvtier.store.base import ErrorBoundExceeded

KINDS = ("none", "zstd", "lz4", "int8", "int4")
CODEC_IDS = {kind: i for i, kind in enumerate(KINDS)}  # stored in the NVMe index; append only
DTYPES = ("fp16", "bf16", "fp32")
_QHDR = struct.Struct("<4sBBHIII")  # magic, bits, dtype, reserved, tokens, heads, head_dim
_QMAGIC = b"KVQ1"


@dataclass(frozen=True)
class KVLayout:
    """A KV block: K then V, each [tokens, heads, head_dim] of `dtype`."""
    dtype: str
    tokens: int
    heads: int
    head_dim: int

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if min(self.tokens, self.heads, self.head_dim) <= 0:
            raise ValueError(f"KVLayout dims must be positive: {self}")

    @property
    def elem_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def nbytes(self) -> int:
        return 2 * self.tokens * self.heads * self.head_dim * self.elem_bytes


def _to_f32(data, layout: KVLayout):
    import numpy as np
    raw = np.frombuffer(data, dtype={"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}[layout.dtype])
    if raw.size * layout.elem_bytes != layout.nbytes:
        raise ValueError(f"block of {len(memoryview(data).cast('B'))} bytes does not match {layout} "
                         f"({layout.nbytes} bytes)")
    if layout.dtype == "bf16":
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = raw.astype(np.float32)
    return out.reshape(2, layout.tokens, layout.heads, layout.head_dim)


def _from_f32(x, dtype: str) -> bytes:
    import numpy as np
    if dtype == "fp16":
        return x.astype(np.float16).tobytes()
    if dtype == "fp32":
        return x.astype(np.float32).tobytes()
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16  # round to nearest even
    return rounded.astype(np.uint16).tobytes()


def _quantise(x, axis: int, bits: int):
    """Asymmetric quantisation of x with one (scale, zero) per slice along `axis` reduced."""
    import numpy as np
    qmax = (1 << bits) - 1
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    zero = lo.astype(np.float16)
    scale = ((hi - zero.astype(np.float32)) / qmax).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0)).astype(np.float16)
    q = np.clip(np.rint((x - zero.astype(np.float32)) / scale.astype(np.float32)), 0, qmax).astype(np.uint8)
    return q, scale, zero


def _dequantise(q, scale, zero):
    import numpy as np
    return q.astype(np.float32) * scale.astype(np.float32) + zero.astype(np.float32)


def _pack4(q):
    import numpy as np
    flat = q.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def _unpack4(packed, count: int):
    import numpy as np
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count]


def measure_error(original, decoded, layout: KVLayout) -> dict:
    """max_abs and rel_rms (rms of the error / rms of the original) between two blocks of `layout`."""
    import numpy as np
    a = _to_f32(original, layout).astype(np.float64)
    b = _to_f32(decoded, layout).astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return {"max_abs": float("inf"), "rel_rms": float("inf")}
    err = a - b
    rms = float(np.sqrt(np.mean(a * a)))
    err_rms = float(np.sqrt(np.mean(err * err)))
    return {"max_abs": float(np.abs(err).max()) if err.size else 0.0,
            "rel_rms": err_rms / rms if rms > 0 else (0.0 if err_rms == 0 else float("inf"))}


class Codec:
    """encode()/decode() a block; `lossless` says whether decode(encode(x)) == x."""

    def __init__(self, kind: str = "none", level: int | None = None, error_bound: float | None = None):
        if kind not in KINDS:
            raise ValueError(f"codec kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.kind = kind
        self.level = level
        self.error_bound = error_bound
        self.id = CODEC_IDS[kind]
        self.last_error: dict | None = None  # error measured by the last quantising encode()
        if kind == "zstd":
            import zstandard
            self._zc = zstandard.ZstdCompressor(level=3 if level is None else int(level))
            self._zd = zstandard.ZstdDecompressor()
        elif kind == "lz4":
            import lz4.frame  # noqa: F401

    @property
    def lossless(self) -> bool:
        return self.kind in ("none", "zstd", "lz4")

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}.get(self.kind, 0)

    def __repr__(self) -> str:
        extra = f", level={self.level}" if self.level is not None else ""
        extra += f", error_bound={self.error_bound}" if self.error_bound is not None else ""
        return f"Codec({self.kind!r}{extra})"

    def encode(self, data, layout: KVLayout | None = None) -> bytes:
        if self.kind == "none":
            return bytes(data)
        if self.kind == "zstd":
            return self._zc.compress(data)
        if self.kind == "lz4":
            import lz4.frame
            return lz4.frame.compress(data, compression_level=self.level or 0)
        if layout is None:
            raise ValueError(f"codec {self.kind} needs a KVLayout to quantise a block")
        return self._quantise(data, layout)

    def decode(self, blob, layout: KVLayout | None = None) -> bytes:
        if self.kind == "none":
            return bytes(blob)
        if self.kind == "zstd":
            return self._zd.decompress(blob)
        if self.kind == "lz4":
            import lz4.frame
            return lz4.frame.decompress(blob)
        return self._dequantise(blob)

    # -- quantisation -----------------------------------------------------------------------------

    def _quantise(self, data, layout: KVLayout) -> bytes:
        import numpy as np
        x = _to_f32(data, layout)
        if not np.isfinite(x).all():
            self.last_error = {"max_abs": float("inf"), "rel_rms": float("inf")}
            raise ErrorBoundExceeded(f"codec {self.kind}: block has non-finite values", self.last_error)
        bits = self.bits
        qk, sk, zk = _quantise(x[0], axis=0, bits=bits)   # per channel: reduce over tokens
        qv, sv, zv = _quantise(x[1], axis=2, bits=bits)   # per token: reduce over head_dim
        parts = [_QHDR.pack(_QMAGIC, bits, DTYPES.index(layout.dtype), 0, layout.tokens, layout.heads,
                            layout.head_dim),
                 sk.tobytes(), zk.tobytes(), sv.tobytes(), zv.tobytes()]
        parts += [_pack4(qk).tobytes(), _pack4(qv).tobytes()] if bits == 4 else [qk.tobytes(), qv.tobytes()]
        blob = b"".join(parts)
        decoded = self._dequantise(blob)
        self.last_error = measure_error(data, decoded, layout)
        if self.error_bound is not None and not self.last_error["rel_rms"] <= self.error_bound:
            raise ErrorBoundExceeded(
                f"codec {self.kind}: rel_rms error {self.last_error['rel_rms']:.4g} exceeds the bound "
                f"{self.error_bound}", self.last_error)
        return blob

    def _dequantise(self, blob) -> bytes:
        import numpy as np
        blob = memoryview(blob).cast("B")
        magic, bits, dtype_i, _, tokens, heads, head_dim = _QHDR.unpack_from(blob)
        if magic != _QMAGIC or bits not in (4, 8) or dtype_i >= len(DTYPES):
            raise ValueError("not a kvtier quantised block")
        pos = _QHDR.size
        n_k_groups, n_v_groups, n = heads * head_dim, tokens * heads, tokens * heads * head_dim

        def take(count, dtype):
            nonlocal pos
            arr = np.frombuffer(blob, dtype=dtype, count=count, offset=pos)
            pos += arr.nbytes
            return arr

        sk, zk = take(n_k_groups, np.float16), take(n_k_groups, np.float16)
        sv, zv = take(n_v_groups, np.float16), take(n_v_groups, np.float16)
        if bits == 4:
            qk = _unpack4(take((n + 1) // 2, np.uint8), n)
            qv = _unpack4(take((n + 1) // 2, np.uint8), n)
        else:
            qk, qv = take(n, np.uint8), take(n, np.uint8)
        k = _dequantise(qk.reshape(tokens, heads, head_dim), sk.reshape(1, heads, head_dim),
                        zk.reshape(1, heads, head_dim))
        v = _dequantise(qv.reshape(tokens, heads, head_dim), sv.reshape(tokens, heads, 1),
                        zv.reshape(tokens, heads, 1))
        return _from_f32(np.stack([k, v]), DTYPES[dtype_i])


def codec_from_config(table: dict | None, where: str = "tier") -> Codec:
    """A Codec from a TOML table: {"compression": "zstd", "level": 3} or
    {"quantization": "int8", "error_bound": 0.02}; bad values raise InputError naming the key."""
    table = dict(table or {})
    known = {"compression", "level", "quantization", "error_bound"}
    for key in table:
        if key not in known:
            raise InputError(f"{where}.{key}: unknown key (expected one of {', '.join(sorted(known))})")
    comp = table.get("compression", "none")
    quant = table.get("quantization", "none")
    if comp not in ("none", "zstd", "lz4"):
        raise InputError(f"{where}.compression: must be none, zstd or lz4, not {comp!r}")
    if quant not in ("none", "int8", "int4"):
        raise InputError(f"{where}.quantization: must be none, int8 or int4, not {quant!r}")
    if comp != "none" and quant != "none":
        raise InputError(f"{where}: compression and quantization cannot both be set")
    level = table.get("level")
    if level is not None:
        if comp == "none":
            raise InputError(f"{where}.level: only applies with compression = \"zstd\" or \"lz4\"")
        limits = (-7, 22) if comp == "zstd" else (0, 16)
        if isinstance(level, bool) or not isinstance(level, int) or not limits[0] <= level <= limits[1]:
            raise InputError(f"{where}.level: must be an integer {limits[0]}..{limits[1]} for {comp}, "
                             f"not {level!r}")
    bound = table.get("error_bound")
    if bound is not None:
        if quant == "none":
            raise InputError(f"{where}.error_bound: only applies with quantization = \"int8\" or \"int4\"")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < 1:
            raise InputError(f"{where}.error_bound: must be a number in (0, 1) (relative RMS error), "
                             f"not {bound!r}")
        bound = float(bound)
    if quant != "none":
        return Codec(quant, error_bound=bound)
    return Codec(comp, level=level)
