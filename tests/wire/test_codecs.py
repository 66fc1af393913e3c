"""Wire codecs: round-trip accuracy, wire size, bitwise determinism, error feedback, and
malformed payloads refused with CodecError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from crowdtrain.wire.codecs import (
    BLOCK,
    CODECS,
    INT4_BLOCK,
    CodecError,
    ErrorFeedback,
    decode,
    default_block,
    dequantize_int4,
    dequantize_int8,
    encode,
    from_bytes,
    payload_bytes,
    quantize_int4,
    quantize_int8,
    to_bytes,
    unpack_int4,
)


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture
def tensors():
    return {
        "emb.weight": _rand(40, 16, seed=1),
        "block.0.w": _rand(3, 100, seed=2, scale=1e-3),
        "bias": _rand(7, seed=3, scale=10.0),
    }


def _shapes(ts):
    return {k: tuple(v.shape) for k, v in ts.items()}


def _blob(wire, codec="int8", block=BLOCK, **meta):
    return st_save(wire, metadata={"codec": codec, "block": str(block), **meta})


# ---- round trips ---------------------------------------------------------------------------

def test_int8_error_at_most_half_a_step_per_block():
    x = torch.cat([_rand(1000, seed=4), _rand(300, seed=5, scale=1e-4), torch.zeros(300)])
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and q.shape == (x.numel(),)
    assert scale.dtype == torch.float32 and scale.shape == ((x.numel() + BLOCK - 1) // BLOCK,)
    assert int(q.abs().max()) == 127
    y = dequantize_int8(q, scale, x.shape)
    err = (y - x).abs()
    for b in range(scale.numel()):
        sl = slice(b * BLOCK, (b + 1) * BLOCK)
        absmax = float(x[sl].abs().max())
        assert float(err[sl].max()) <= absmax / 254 * (1 + 1e-5) + 1e-12, b


def test_int8_roundtrip_odd_numel_shape():
    x = _rand(3, 100, seed=6)  # 300 elements: one full block and a partial one
    out = decode(encode({"w": x}, "int8"), "int8", {"w": (3, 100)})
    assert out["w"].shape == (3, 100) and out["w"].dtype == torch.float32
    assert float((out["w"] - x).abs().max()) <= float(x.abs().max()) / 254 * (1 + 1e-5)


def test_int8_all_zero_tensor():
    x = torch.zeros(5, 60)
    q, scale = quantize_int8(x)
    assert torch.equal(scale, torch.zeros(2))
    assert torch.equal(q, torch.zeros(300, dtype=torch.int8))
    out = decode(encode({"z": x}, "int8"), "int8", {"z": (5, 60)})
    assert torch.equal(out["z"], x)


@pytest.mark.parametrize("numel", [1, 2, 63, 64, 65, 1001])
def test_int4_packs_two_values_a_byte_within_half_a_step(numel):
    x = _rand(numel, seed=numel)
    q, scale = quantize_int4(x)
    assert q.dtype == torch.int8 and q.shape == ((numel + 1) // 2,)
    assert scale.shape == ((numel + INT4_BLOCK - 1) // INT4_BLOCK,)
    values = unpack_int4(q)[:numel]
    assert int(values.abs().max()) == 7 and int(values.min()) >= -7
    y = dequantize_int4(q, scale, (numel,))
    for b in range(scale.numel()):
        sl = slice(b * INT4_BLOCK, (b + 1) * INT4_BLOCK)
        assert float((y[sl] - x[sl]).abs().max()) <= float(x[sl].abs().max()) / 14 * 1.0001
    # nibble order: element 2i low, 2i+1 high, each stored as value + 8
    assert torch.equal(unpack_int4(torch.tensor([0x3C], dtype=torch.uint8).view(torch.int8)),
                       torch.tensor([4, -5], dtype=torch.int8))


def test_int4_wire_about_half_a_byte_per_parameter_and_odd_blocks_refused():
    ts = {"a": _rand(1000, 77, seed=8), "b": _rand(2321, seed=9)}
    numel = sum(v.numel() for v in ts.values())
    blob = to_bytes(ts, "int4")
    assert 0.5 < len(blob) / numel < 0.6 and payload_bytes(numel, "int4") <= len(blob)
    assert len(blob) < 0.6 * len(to_bytes(ts, "int8"))
    with pytest.raises(CodecError, match="even block"):
        to_bytes(ts, "int4", block=65)
    wire = encode({"w": torch.ones(100)}, "int4", block=64)
    with pytest.raises(CodecError, match="even block"):
        from_bytes(_blob(wire, "int4", block=63), {"w": (100,)})


def test_fp32_roundtrip_exact(tensors):
    out = decode(encode(tensors, "fp32"), "fp32", _shapes(tensors))
    for k, v in tensors.items():
        assert torch.equal(out[k], v), k


def test_fp16_roundtrip_within_precision(tensors):
    out = decode(encode(tensors, "fp16"), "fp16", _shapes(tensors))
    for k, v in tensors.items():
        assert out[k].dtype == torch.float32
        assert torch.allclose(out[k], v, rtol=2**-11, atol=1e-7), k
        assert torch.equal(out[k], v.half().float()), k


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "sparse"])  # test_sparse.py
def test_bytes_roundtrip_all_codecs(tensors, codec):
    blob = to_bytes(tensors, codec, meta={"round": "12", "worker": "w1"})
    out, meta = from_bytes(blob, _shapes(tensors), max_bytes=len(blob))
    assert meta == {"codec": codec, "block": str(default_block(codec)), "round": "12",
                    "worker": "w1"}
    assert out.keys() == tensors.keys()
    for k, v in tensors.items():
        tol = {"int8": float(v.abs().max()) / 254 * 1.001,
               "int4": float(v.abs().max()) / 14 * 1.001, "fp16": 1e-2, "fp32": 0.0}[codec]
        assert float((out[k] - v).abs().max()) <= tol, (codec, k)


def test_encode_outputs_are_contiguous_cpu_and_do_not_alias_inputs(tensors):
    t = _rand(8, 4, seed=7).t()  # non-contiguous input
    for codec in CODECS:
        wire = encode({"t": t}, codec)
        for v in wire.values():
            assert v.is_contiguous() and v.device.type == "cpu"
    fp32 = encode(tensors, "fp32")
    fp32["bias"].zero_()
    assert not torch.equal(tensors["bias"], fp32["bias"])


def test_int8_wire_about_one_byte_per_parameter():
    ts = {"a": _rand(1000, 768, seed=8), "b": _rand(232_000, seed=9)}
    numel = sum(v.numel() for v in ts.values())
    blob = to_bytes(ts, "int8")
    ratio = len(blob) / numel
    assert 1.0 <= ratio <= 1.1, ratio
    assert payload_bytes(numel, "int8") <= len(blob)


def test_payload_bytes():
    assert payload_bytes(1000, "int8") == 1000 + 4 * 4
    assert payload_bytes(1024, "int8") == 1024 + 4 * 4
    assert payload_bytes(1000, "fp16") == 2000
    assert payload_bytes(1000, "fp32") == 4000
    assert payload_bytes(1001, "int4") == 501 + 4 * 16
    with pytest.raises(CodecError):
        payload_bytes(10, "int2")


# ---- determinism ---------------------------------------------------------------------------

def test_dequantize_bitwise_deterministic():
    x = _rand(5000, seed=10)
    q, scale = quantize_int8(x)
    a = dequantize_int8(q, scale, (50, 100))
    b = dequantize_int8(q.clone(), scale.clone(), (50, 100))
    assert torch.equal(a, b)
    # Exactly one float32 multiply per element: same bits as the obvious formula.
    ref = q.to(torch.float32) * scale.repeat_interleave(BLOCK)[: q.numel()]
    assert torch.equal(a.reshape(-1), ref)
    theta = _rand(50, 100, seed=11)
    assert torch.equal(theta + a, theta + dequantize_int8(q, scale, (50, 100)))


def test_decode_from_bytes_bitwise_deterministic(tensors):
    blob = to_bytes(tensors, "int8")
    a, _ = from_bytes(blob, _shapes(tensors))
    b, _ = from_bytes(bytes(blob), _shapes(tensors))
    for k in tensors:
        assert torch.equal(a[k], b[k]), k


# ---- error feedback ------------------------------------------------------------------------

def test_error_feedback_tracks_sum_of_inputs():
    # One large value per block fixes the scale at 1/127; the small values are below half a
    # step, so without feedback they always quantize to zero and their sum is lost.
    x = torch.full((2, BLOCK), 0.003)
    x[:, 0] = 1.0
    steps = 50
    step_size = (1.0 + 1 / 254) / 127  # the largest scale x + residual can have
    shapes = {"w": tuple(x.shape)}

    ef = ErrorFeedback("int8")
    total_in = torch.zeros_like(x)
    total_fb = torch.zeros_like(x)
    total_nofb = torch.zeros_like(x)
    worst_fb = 0.0
    for _ in range(steps):
        total_in += x
        total_fb += decode(ef.compress({"w": x}), "int8", shapes)["w"]
        total_nofb += decode(encode({"w": x}, "int8"), "int8", shapes)["w"]
        worst_fb = max(worst_fb, float((total_fb - total_in).abs().max()))
    err_nofb = float((total_nofb - total_in).abs().max())
    assert worst_fb <= step_size
    assert err_nofb >= 0.9 * steps * 0.003  # grows linearly with steps
    assert err_nofb > 10 * worst_fb
    # The decoded sum is off from the input sum by exactly the residual still held back.
    assert torch.allclose(total_fb + ef.residual["w"], total_in, atol=1e-4)


def test_error_feedback_fp32_has_zero_residual_and_reset():
    ef = ErrorFeedback("fp32")
    x = _rand(4, 70, seed=12)
    wire = ef.compress({"w": x})
    assert torch.equal(wire["w"], x)
    assert torch.equal(ef.residual["w"], torch.zeros_like(x))
    ef8 = ErrorFeedback("int8")
    ef8.compress({"w": x})
    assert float(ef8.residual["w"].abs().max()) > 0
    ef8.reset()
    assert ef8.residual == {}


def test_error_feedback_leaves_residual_unchanged_on_error():
    ef = ErrorFeedback("int8")
    ef.compress({"a": _rand(300, seed=13)})
    before = ef.residual["a"].clone()
    bad = torch.ones(10)
    bad[3] = float("nan")
    with pytest.raises(CodecError, match="b"):
        ef.compress({"a": _rand(300, seed=14), "b": bad})
    assert torch.equal(ef.residual["a"], before)
    assert "b" not in ef.residual


# ---- malformed inputs ----------------------------------------------------------------------

def test_truncated_bytes(tensors):
    blob = to_bytes(tensors, "int8")
    for cut in (0, 4, 8, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            from_bytes(blob[:cut], _shapes(tensors))


def test_garbage_bytes(tensors):
    g = torch.Generator().manual_seed(15)
    garbage = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    with pytest.raises(CodecError):
        from_bytes(garbage, _shapes(tensors))
    bad_json = struct.pack("<Q", 10) + b"{not json!" + b"\0" * 16
    with pytest.raises(CodecError, match="JSON"):
        from_bytes(bad_json, _shapes(tensors))


def test_header_length_larger_than_blob():
    blob = struct.pack("<Q", 10_000) + b'{"__metadata__": {}}'
    with pytest.raises(CodecError, match="header length"):
        from_bytes(blob, {"w": (4,)})


def test_bad_tensor_offsets_in_header():
    header = json.dumps({
        "__metadata__": {"codec": "fp32", "block": "256"},
        "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1000]},
    }).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 16
    with pytest.raises(CodecError, match="parsed"):
        from_bytes(blob, {"w": (4,)})


def test_max_bytes(tensors):
    blob = to_bytes(tensors, "fp32")
    with pytest.raises(CodecError, match="too large"):
        from_bytes(blob, _shapes(tensors), max_bytes=len(blob) - 1)


def test_missing_tensor(tensors):
    blob = to_bytes({k: v for k, v in tensors.items() if k != "bias"}, "int8")
    with pytest.raises(CodecError, match="missing.*bias:q"):
        from_bytes(blob, _shapes(tensors))


def test_extra_tensor(tensors):
    blob = to_bytes({**tensors, "stray": torch.ones(3)}, "fp16")
    with pytest.raises(CodecError, match="unexpected.*stray"):
        from_bytes(blob, _shapes(tensors))


def test_key_mismatch_message_lists_at_most_three():
    shapes = {f"p{i}": (2,) for i in range(6)}
    wire = {f"x{i}": torch.zeros(2) for i in range(5)}
    with pytest.raises(CodecError) as ei:
        decode(wire, "fp32", shapes)
    msg = str(ei.value)
    assert "p0, p1, p2 (+3 more)" in msg and "x0, x1, x2 (+2 more)" in msg
    assert "p3" not in msg and "x3" not in msg


@pytest.mark.parametrize("codec", CODECS)
def test_wrong_shape(codec):
    blob = to_bytes({"w": torch.ones(4, 5)}, codec)
    with pytest.raises(CodecError, match="w"):
        from_bytes(blob, {"w": (5, 5)})


def test_wrong_fp_shape_same_numel():
    blob = to_bytes({"w": torch.ones(4, 5)}, "fp32")
    with pytest.raises(CodecError, match="tensor w has shape"):
        from_bytes(blob, {"w": (5, 4)})


def test_wrong_scale_length():
    q, scale = quantize_int8(torch.ones(300))
    wire = {"w:q": q, "w:scale": torch.cat([scale, scale])}
    with pytest.raises(CodecError, match="w:scale"):
        decode(wire, "int8", {"w": (300,)})


@pytest.mark.parametrize(
    "codec,wire",
    [
        ("fp32", {"w": torch.ones(4, dtype=torch.float64)}),
        ("fp32", {"w": torch.ones(4, dtype=torch.float16)}),
        ("fp16", {"w": torch.ones(4, dtype=torch.float32)}),
        ("int8", {"w:q": torch.ones(4, dtype=torch.int16), "w:scale": torch.ones(1)}),
        ("int8", {"w:q": torch.ones(4, dtype=torch.int8),
                  "w:scale": torch.ones(1, dtype=torch.float16)}),
    ],
)
def test_wrong_dtype(codec, wire):
    with pytest.raises(CodecError, match="must be"):
        decode(wire, codec, {"w": (4,)})
    with pytest.raises(CodecError, match="must be"):
        from_bytes(_blob(wire, codec), {"w": (4,)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_non_finite_values(codec, bad):
    dtype = torch.float32 if codec == "fp32" else torch.float16
    w = torch.ones(4, dtype=dtype)
    w[2] = bad
    with pytest.raises(CodecError, match="tensor w has non-finite values"):
        from_bytes(_blob({"w": w}, codec), {"w": (4,)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_scale(bad):
    q = torch.ones(300, dtype=torch.int8)
    scale = torch.tensor([0.5, bad])
    with pytest.raises(CodecError, match="w:scale"):
        from_bytes(_blob({"w:q": q, "w:scale": scale}), {"w": (300,)})


def test_huge_scale_overflows_to_inf():
    q = torch.full((4,), 127, dtype=torch.int8)
    scale = torch.tensor([3e38])
    with pytest.raises(CodecError, match="tensor w has non-finite values"):
        decode({"w:q": q, "w:scale": scale}, "int8", {"w": (4,)})


def test_encode_rejects_non_finite_and_fp16_overflow():
    x = torch.ones(4)
    x[1] = float("nan")
    for codec in CODECS:
        with pytest.raises(CodecError, match="tensor x has non-finite values"):
            encode({"x": x}, codec)
    with pytest.raises(CodecError, match="overflows float16"):
        encode({"big": torch.tensor([1e6])}, "fp16")
    with pytest.raises(CodecError, match="floating-point"):
        encode({"i": torch.ones(3, dtype=torch.int64)}, "fp32")


def test_unknown_codec():
    with pytest.raises(CodecError, match="unknown codec"):
        encode({"w": torch.ones(3)}, "int2")
    with pytest.raises(CodecError, match="unknown codec"):
        decode({"w": torch.ones(3)}, "bf16", {"w": (3,)})
    with pytest.raises(CodecError, match="unknown codec"):
        from_bytes(_blob({"w": torch.ones(3)}, "int2"), {"w": (3,)})
    with pytest.raises(CodecError, match="unknown codec"):
        ErrorFeedback("int2")


@pytest.mark.parametrize("meta", [{}, {"codec": "fp32"}, {"codec": "fp32", "block": "abc"},
                                  {"codec": "fp32", "block": "8"},
                                  {"codec": "fp32", "block": "1000000"}])
def test_bad_metadata(meta):
    blob = st_save({"w": torch.ones(3)}, metadata=meta or None)
    with pytest.raises(CodecError, match="metadata"):
        from_bytes(blob, {"w": (3,)})


def test_to_bytes_rejects_reserved_or_non_string_meta():
    with pytest.raises(CodecError, match="reserved"):
        to_bytes({"w": torch.ones(3)}, "fp32", meta={"codec": "int8"})
    with pytest.raises(CodecError, match="str"):
        to_bytes({"w": torch.ones(3)}, "fp32", meta={"round": 3})  # type: ignore[dict-item]


def test_dequantize_validates_lengths():
    q, scale = quantize_int8(torch.ones(300))
    with pytest.raises(CodecError):
        dequantize_int8(q, scale, (301,))
    with pytest.raises(CodecError):
        dequantize_int8(q, scale[:1], (300,))
