"""kvtier.store codecs: lossless round trips, KIVI-style quantisation error, config validation."""
import numpy as np
import pytest

from kvtier.errors import InputError
from kvtier.store import Codec, ErrorBoundExceeded, KVLayout, codec_from_config, measure_error


def kv_block(layout: KVLayout, seed: int = 0) -> bytes:
    """KV-like data: K with a few outlier channels, V smooth per token."""
    rng = np.random.default_rng(seed)
    shape = (layout.tokens, layout.heads, layout.head_dim)
    k = rng.normal(0, 1, shape) * (1 + 8 * (rng.random((1, layout.heads, layout.head_dim)) < 0.05))
    v = rng.normal(0, 0.5, shape) + rng.normal(0, 1, (layout.tokens, layout.heads, 1))
    x = np.stack([k, v]).astype(np.float32)
    if layout.dtype == "fp16":
        return x.astype(np.float16).tobytes()
    if layout.dtype == "fp32":
        return x.tobytes()
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


@pytest.mark.parametrize("kind,level", [("none", None), ("zstd", 1), ("zstd", 9), ("lz4", None)])
def test_lossless_round_trip(kind, level):
    codec = Codec(kind, level=level)
    for data in (b"", b"a" * 100_000, np.random.default_rng(1).bytes(70_000),
                 kv_block(KVLayout("fp16", 64, 4, 64))):
        blob = codec.encode(data)
        assert codec.decode(blob) == data
    assert codec.lossless
    if kind != "none":
        assert len(codec.encode(b"a" * 100_000)) < 10_000


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind,max_rel", [("int8", 0.02), ("int4", 0.25)])
def test_quantise_round_trip_error(dtype, kind, max_rel):
    layout = KVLayout(dtype, tokens=32, heads=4, head_dim=64)
    data = kv_block(layout, seed=3)
    codec = Codec(kind)
    blob = codec.encode(data, layout)
    assert len(blob) < len(data) * (0.6 if kind == "int8" else 0.4) * (2 if dtype == "fp32" else 1)
    out = codec.decode(blob)
    assert len(out) == len(data)
    err = measure_error(data, out, layout)
    assert err == pytest.approx(codec.last_error)
    assert 0 < err["rel_rms"] < max_rel
    assert err["max_abs"] > 0
    # int8 is much closer than int4 on the same data
    if kind == "int4":
        e8 = measure_error(data, Codec("int8").decode(Codec("int8").encode(data, layout)), layout)
        assert e8["rel_rms"] < err["rel_rms"] / 4


def test_key_quantised_per_channel_keeps_outlier_channels():
    """A channel with huge values must not wreck the precision of the others (per-channel K groups)."""
    layout = KVLayout("fp32", tokens=16, heads=1, head_dim=8)
    x = np.zeros((2, 16, 1, 8), np.float32)
    x[0, :, 0, :] = np.linspace(0, 1, 16)[:, None]
    x[0, :, 0, 3] *= 1000  # outlier channel
    x[1] = np.random.default_rng(0).normal(size=(16, 1, 8))
    out = np.frombuffer(Codec("int8").decode(Codec("int8").encode(x.tobytes(), layout)), np.float32)
    out = out.reshape(x.shape)
    normal = [c for c in range(8) if c != 3]
    assert np.abs(out[0, :, 0, normal] - x[0, :, 0, normal]).max() < 1 / 255 + 1e-3


def test_error_bound_refuses():
    layout = KVLayout("fp16", 32, 2, 32)
    data = kv_block(layout)
    with pytest.raises(ErrorBoundExceeded) as info:
        Codec("int4", error_bound=0.001).encode(data, layout)
    assert info.value.error["rel_rms"] > 0.001
    Codec("int8", error_bound=0.05).encode(data, layout)  # within bound
    bad = np.frombuffer(data, np.float16).copy()
    bad[5] = np.inf
    with pytest.raises(ErrorBoundExceeded):
        Codec("int8", error_bound=0.05).encode(bad.tobytes(), layout)


def test_quantise_needs_layout_and_matching_size():
    with pytest.raises(ValueError):
        Codec("int8").encode(b"\0" * 64)
    with pytest.raises(ValueError):
        Codec("int8").encode(b"\0" * 128, KVLayout("fp16", 4, 1, 4))


def test_codec_from_config():
    assert codec_from_config({}).kind == "none"
    c = codec_from_config({"compression": "zstd", "level": 3})
    assert (c.kind, c.level) == ("zstd", 3)
    c = codec_from_config({"quantization": "int8", "error_bound": 0.02})
    assert (c.kind, c.error_bound) == ("int8", 0.02)
    for table, key in [({"compression": "gzip"}, "compression"), ({"compression": "zstd", "level": 99}, "level"),
                       ({"compression": "lz4", "level": "x"}, "level"), ({"quantization": "int3"}, "quantization"),
                       ({"quantization": "int8", "error_bound": 2}, "error_bound"),
                       ({"compression": "zstd", "error_bound": 0.1}, "error_bound"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(InputError, match=rf"tiers\.nvme\.{key}"):
            codec_from_config(table, where="tiers.nvme")
