"""Poisoning-robust aggregation (coordinator.aggregation): config validation, norm screening,
block-wise aggregation equal to the full-tensor references for any block size, exact int8
slices from payload files, robustness to a scaled attack, and the poisoning benchmark."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crowdtrain.coordinator.aggregation import (
    METHODS,
    DeltaSource,
    RobustConfig,
    TensorSource,
    robust_aggregate,
    screen,
)
from crowdtrain.coordinator.payloads import (
    SafetensorsFloatSource,
    SafetensorsQuantSource,
    SafetensorsSparseSource,
    open_payload,
)
from crowdtrain.wire import codecs
from crowdtrain.wire.outer import delta_norm, weighted_mean

ROOT = Path(__file__).resolve().parents[2]

# odd sizes: not multiples of the int8 block (256) nor of the aggregation blocks tried below
SHAPES = {"emb": (37, 29), "w": (300,), "one": (1,), "scalar": (), "big": (5, 211)}
BLOCKS = [1, 7, 100, 256, 1000, 1 << 20]


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) if shape else torch.randn(1, generator=g)[0]


def _delta(seed, scale=1.0):
    return {k: _rand(s, seed * 10 + i) * scale for i, (k, s) in enumerate(SHAPES.items())}


def _write(tmp_path, deltas, block=codecs.BLOCK, codec="int8"):
    """Payload files for `deltas`, and the deltas as the coordinator decodes them."""
    paths, decoded = [], []
    for i, d in enumerate(deltas):
        blob = codecs.to_bytes(d, codec, meta={"stats": "{}"}, block=block)
        p = tmp_path / f"c{i}.safetensors"
        p.write_bytes(blob)
        paths.append(p)
        decoded.append(codecs.from_bytes(blob, SHAPES)[0])
    return paths, decoded


class Recording:
    """A DeltaSource wrapper that checks every request and every returned slice."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.calls = inner, limit, 0

    def read(self, name, a, b):
        assert 0 <= a < b and b - a <= self.limit, (name, a, b)
        out = self.inner.read(name, a, b)
        assert out.dtype == torch.float32 and out.shape == (b - a,)
        self.calls += 1
        return out


# ---- RobustConfig --------------------------------------------------------------------------

def test_config_defaults_and_validation():
    cfg = RobustConfig()
    assert cfg.method in METHODS
    assert cfg.clip_factor >= 1 and cfg.refuse_factor >= cfg.clip_factor
    assert 0 <= cfg.trim_fraction < 0.5
    RobustConfig(clip_factor=math.inf, refuse_factor=math.inf)  # both may be disabled
    RobustConfig(trim_fraction=0.0, clip_factor=3, refuse_factor=3)
    bad = [({"method": "median"}, "method"), ({"clip_factor": 0.5}, "clip_factor"),
           ({"clip_factor": float("nan")}, "clip_factor"), ({"clip_factor": "2"}, "clip_factor"),
           ({"clip_factor": True}, "clip_factor"), ({"refuse_factor": 1.5}, "refuse_factor"),
           ({"refuse_factor": float("nan")}, "refuse_factor"),
           ({"trim_fraction": 0.5}, "trim_fraction"), ({"trim_fraction": -0.1}, "trim_fraction"),
           ({"trim_fraction": float("nan")}, "trim_fraction"), ({"cc_iters": 0}, "cc_iters"),
           ({"cc_iters": 2.0}, "cc_iters")]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            RobustConfig(**kwargs)


# ---- screen --------------------------------------------------------------------------------

def test_screen_clips_and_refuses_with_reasons():
    cfg = RobustConfig(method="clip_mean", clip_factor=2.0, refuse_factor=10.0)
    norms = [1.0, 1.2, 0.8, 3.6, 50.0]  # median 1.2
    out = screen(norms, cfg)
    assert out[0] == out[1] == out[2] == (1.0, None)
    mult, reason = out[3]
    assert mult == pytest.approx(2.4 / 3.6) and "clipped from 3.6 to 2.4" in reason
    assert mult * norms[3] == pytest.approx(2.0 * 1.2)
    mult, reason = out[4]
    assert mult == 0.0 and "refused" in reason and "42x" in reason and "1.2" in reason


def test_screen_leaves_alone_when_not_meaningful():
    cfg = RobustConfig(method="trimmed_mean")
    assert screen([1.0, 500.0], cfg) == [(1.0, None)] * 2  # < 3 contributions: no median
    assert screen([], cfg) == []
    assert screen([0.0, 0.0, 5.0], cfg) == [(1.0, None)] * 3  # median 0
    assert screen([1.0, 1.0, 500.0], RobustConfig(method="mean")) == [(1.0, None)] * 3
    out = screen([1.0, 1.0, 1.1, float("inf")], cfg)
    assert out[3][0] == 0.0 and "not finite" in out[3][1]
    assert screen([1.0, 1.0, 1.0, 1.9], RobustConfig(method="clip_mean"))[3] == (1.0, None)


# ---- SafetensorsQuantSource -----------------------------------------------------------------

@pytest.mark.parametrize("codec,block", [("int8", codecs.BLOCK), ("int8", 64),
                                         ("int4", 64), ("int4", 18)])
def test_quantized_source_slices_equal_full_decode(tmp_path, codec, block):
    (path,), (full,) = _write(tmp_path, [_delta(3)], block=block, codec=codec)
    g = torch.Generator().manual_seed(0)
    with SafetensorsQuantSource(path, SHAPES) as src:
        assert isinstance(src, DeltaSource)
        for name, t in full.items():
            flat = t.reshape(-1)
            n = flat.numel()
            ranges = [(0, n), (0, 1), (n - 1, n), (n, n), (0, 0)]
            ranges += [tuple(sorted(torch.randint(0, n + 1, (2,), generator=g).tolist()))
                       for _ in range(20)]
            for a, b in ranges:
                got = src.read(name, a, b)
                assert got.dtype == torch.float32 and got.shape == (b - a,), (name, a, b)
                assert torch.equal(got, flat[a:b]), (name, a, b)
            for a, b in [(-1, 2), (0, n + 1), (3, 2)]:
                with pytest.raises(ValueError, match="outside"):
                    src.read(name, a, b)
    with pytest.raises(ValueError, match="closed"):
        src.read("w", 0, 1)


def test_int8_source_rejects_mismatching_files(tmp_path):
    (path,), _ = _write(tmp_path, [_delta(1)])
    with pytest.raises(ValueError, match="do not match"):
        SafetensorsQuantSource(path, {**SHAPES, "extra": (3,)})
    with pytest.raises(ValueError, match="emb:q"):
        SafetensorsQuantSource(path, {**SHAPES, "emb": (29, 38)})
    fp16 = tmp_path / "h.safetensors"
    fp16.write_bytes(codecs.to_bytes(_delta(1), "fp16"))
    with pytest.raises(ValueError, match="codec"):
        SafetensorsQuantSource(fp16, SHAPES)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a payload")
    with pytest.raises(ValueError, match="cannot open"):
        SafetensorsQuantSource(junk, SHAPES)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_open_payload_streams_any_codec_exactly(tmp_path, codec):
    blob = codecs.to_bytes(_delta(4), codec)
    full = codecs.from_bytes(blob, SHAPES)[0]
    path = tmp_path / f"{codec}.safetensors"
    path.write_bytes(blob)
    want = SafetensorsQuantSource if codec in codecs.QUANTIZED else \
        SafetensorsSparseSource if codec == "sparse" else SafetensorsFloatSource
    with open_payload(path, SHAPES) as src:
        assert isinstance(src, want)
        for name, t in full.items():
            flat = t.reshape(-1)
            n = flat.numel()
            for a, b in [(0, n), (0, 1), (n - 1, n), (n // 3, n // 2 + 1), (1, n), (n, n)]:
                a, b = min(a, b), b
                got = src.read(name, a, b)
                assert got.dtype == torch.float32 and got.shape == (b - a,), (name, a, b)
                assert torch.equal(got, flat[a:b]), (name, a, b)
    with pytest.raises(ValueError, match="do not match"):
        open_payload(path, {"w": (300,)})
    with pytest.raises(ValueError, match="cannot open"):
        open_payload(tmp_path / "missing.safetensors", SHAPES)


# ---- robust_aggregate ----------------------------------------------------------------------

@pytest.mark.parametrize("block_elems", BLOCKS)
def test_mean_equals_weighted_mean_from_files(tmp_path, block_elems):
    paths, decoded = _write(tmp_path, [_delta(s) for s in range(4)])
    weights = [1024.0, 512.0, 3.0, 2048.0]
    ref = weighted_mean(decoded, weights)
    srcs = [Recording(SafetensorsQuantSource(p, SHAPES), block_elems) for p in paths]
    out, screening = robust_aggregate(srcs, weights, SHAPES, RobustConfig(method="mean"),
                                      block_elems=block_elems)
    assert screening == [(1.0, None)] * 4
    assert all(s.calls > 0 for s in srcs)
    for k, shape in SHAPES.items():
        assert out[k].shape == shape and out[k].dtype == torch.float32
        assert torch.allclose(out[k], ref[k], atol=1e-6, rtol=0), k
    for s in srcs:
        s.inner.close()


@pytest.mark.parametrize("method", ["clip_mean", "trimmed_mean", "centered_clip"])
def test_block_size_does_not_change_the_result(method):
    deltas = [_delta(s, scale=1.0 + 0.3 * s) for s in range(5)] + [_delta(9, scale=4.0)]
    weights = [3.0, 1.0, 2.0, 2.0, 1.0, 2.0]
    cfg = RobustConfig(method=method, trim_fraction=0.2)
    outs = [robust_aggregate([Recording(TensorSource(d), b) for d in deltas], weights, SHAPES,
                             cfg, block_elems=b)
            for b in BLOCKS]
    for out, screening in outs[1:]:
        assert screening == outs[0][1]
        for k in SHAPES:
            assert torch.allclose(out[k], outs[0][0][k], atol=1e-6, rtol=0), (method, k)


def _reference_trimmed(deltas, weights, mults, k):
    """Per coordinate in plain Python: drop k lowest and k highest, weighted mean of the rest."""
    out = {}
    for name, shape in SHAPES.items():
        cols = [(d[name].reshape(-1) * m).tolist() for d, m in zip(deltas, mults, strict=True)]
        vals = []
        for j in range(len(cols[0])):
            pairs = sorted(((c[j], w) for c, w in zip(cols, weights, strict=True)),
                           key=lambda p: p[0])[k:len(cols) - k]
            vals.append(sum(v * w for v, w in pairs) / sum(w for _, w in pairs))
        out[name] = torch.tensor(vals, dtype=torch.float64).reshape(shape)
    return out


@pytest.mark.parametrize("n,trim,k", [(5, 0.2, 1), (7, 0.3, 2), (4, 0.25, 1)])
def test_trimmed_mean_matches_reference(n, trim, k):
    deltas = [_delta(s, scale=0.5 + 0.25 * s) for s in range(n - 1)] + [_delta(50, scale=5.0)]
    weights = [float(1 + (3 * s) % 5) for s in range(n)]
    cfg = RobustConfig(method="trimmed_mean", trim_fraction=trim)
    mults = [m for m, _ in screen([delta_norm(d) for d in deltas], cfg)]
    assert any(m < 1 for m in mults)  # the larger deltas are clipped first
    ref = _reference_trimmed(deltas, weights, mults, k)
    for block in (7, 1000):
        out, _ = robust_aggregate([TensorSource(d) for d in deltas], weights, SHAPES, cfg,
                                  block_elems=block)
        for name in SHAPES:
            assert torch.allclose(out[name].double(), ref[name], atol=1e-6, rtol=1e-6), name


def test_trimmed_mean_with_two_workers_is_weighted_mean():
    deltas = [_delta(0), _delta(1)]
    out, _ = robust_aggregate([TensorSource(d) for d in deltas], [1.0, 3.0], SHAPES,
                              RobustConfig(method="trimmed_mean", trim_fraction=0.4))
    ref = weighted_mean(deltas, [1.0, 3.0])
    for k in SHAPES:
        assert torch.allclose(out[k], ref[k], atol=1e-6), k


def _honest_and_attacker():
    base = _delta(100)
    honest = [{k: v + 0.3 * n[k] for k, v in base.items()}
              for n in (_delta(s) for s in range(4))]
    attacker = {k: 100.0 * v for k, v in honest[0].items()}
    return honest, attacker


@pytest.mark.parametrize("method", ["clip_mean", "trimmed_mean", "centered_clip"])
def test_scaled_attack_is_refused_and_aggregate_stays_honest(method):
    honest, attacker = _honest_and_attacker()
    weights = [1.0, 2.0, 1.0, 1.5, 1.0]
    srcs = [TensorSource(d) for d in [*honest, attacker]]
    out, screening = robust_aggregate(srcs, weights, SHAPES, RobustConfig(method=method),
                                      block_elems=100)
    assert [m for m, _ in screening[:4]] == [1.0] * 4
    assert screening[4][0] == 0.0 and "refused" in screening[4][1]
    ref = weighted_mean(honest, weights[:4])
    err = delta_norm({k: out[k] - ref[k] for k in ref}) / delta_norm(ref)
    assert err < (1e-6 if method == "clip_mean" else 0.25), err
    plain, _ = robust_aggregate(srcs, weights, SHAPES, RobustConfig(method="mean"))
    assert delta_norm({k: plain[k] - ref[k] for k in ref}) / delta_norm(ref) > 10


def test_centered_clip_resists_sign_flip_and_keeps_agreement():
    honest, _ = _honest_and_attacker()
    ref = weighted_mean(honest, [1.0] * 4)
    cfg = RobustConfig(method="centered_clip")
    same, _ = robust_aggregate([TensorSource(honest[0])] * 4, [1.0] * 4, SHAPES, cfg)
    for k in SHAPES:
        assert torch.allclose(same[k], honest[0][k], atol=1e-6), k
    flip = {k: -v for k, v in honest[0].items()}
    srcs = [TensorSource(d) for d in [*honest, flip]]
    cc, _ = robust_aggregate(srcs, [1.0] * 5, SHAPES, cfg)
    mean, _ = robust_aggregate(srcs, [1.0] * 5, SHAPES, RobustConfig(method="mean"))

    def err(x):
        return delta_norm({k: x[k] - ref[k] for k in ref})

    assert err(cc) < 0.6 * err(mean)


def test_robust_aggregate_rejects_bad_input():
    src = TensorSource(_delta(0))
    cfg = RobustConfig()
    with pytest.raises(ValueError, match="at least one"):
        robust_aggregate([], [], SHAPES, cfg)
    with pytest.raises(ValueError, match="weights"):
        robust_aggregate([src], [1.0, 2.0], SHAPES, cfg)
    for w in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight 0"):
            robust_aggregate([src], [w], SHAPES, cfg)
    with pytest.raises(ValueError, match="block_elems"):
        robust_aggregate([src], [1.0], SHAPES, cfg, block_elems=0)

    class Greedy:
        def read(self, name, a, b):
            return torch.zeros(b - a + 1)

    with pytest.raises(ValueError, match="bad slice"):
        robust_aggregate([Greedy()], [1.0], SHAPES, cfg)


# ---- the benchmark keeps working -----------------------------------------------------------

def test_poisoning_benchmark_quick(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "poisoning.py"), str(tiny_run.dir),
                           "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| attack |"):]
    for attack in ("none", "scaled_x100", "noise", "sign_flip", "alie", "liar"):
        assert f"| {attack} |" in table, attack
    for method in METHODS:
        assert method in table.splitlines()[0]
    assert "pick: " in proc.stdout


# ---- check_payload_file: the coordinator's streamed check of an upload ---------------------

def _bad_payloads() -> dict[str, bytes]:
    """Payloads (good and broken) of SHAPES, by name."""
    from safetensors.torch import save

    good = {c: codecs.to_bytes(_delta(2), c, meta={"stats": "{}"}) for c in codecs.CODECS}
    wire = codecs.encode(_delta(2), "int8")
    meta = {"codec": "int8", "block": str(codecs.BLOCK)}

    def with_wire(**change):
        return save({**wire, **change}, metadata=meta)

    nan_q = wire["w:scale"].clone()
    nan_q[0] = float("nan")
    neg = wire["w:scale"].clone()
    neg[0] = -1.0
    fp32 = codecs.encode(_delta(2), "fp32")
    int4 = codecs.encode(_delta(2), "int4")
    meta4 = {"codec": "int4", "block": str(codecs.INT4_BLOCK)}
    nan32 = {**fp32, "big": fp32["big"].clone()}
    nan32["big"][1, 2] = float("inf")
    return {
        **{f"good {c}": b for c, b in good.items()},
        "truncated": good["int8"][:-7],
        "header only": good["int8"][:8],
        "junk": b"junk",
        "empty": b"",
        "nan scale": with_wire(**{"w:scale": nan_q}),
        "negative scale": with_wire(**{"w:scale": neg}),
        "wrong length": with_wire(**{"w:q": wire["w:q"][:-1].clone()}),
        "extra tensor": with_wire(extra=torch.zeros(3)),
        "float64": save({k: v.double() for k, v in fp32.items()},
                        metadata={"codec": "fp32", "block": "256"}),
        "inf value": save(nan32, metadata={"codec": "fp32", "block": "256"}),
        "no codec": save(wire, metadata={"block": "256"}),
        "bad block": save(wire, metadata={"codec": "int8", "block": "3"}),
        "int4 odd block": save(codecs.encode(_delta(2), "int4", block=64),
                               metadata={"codec": "int4", "block": "63"}),
        "int4 int8-length values": save({**int4, "w:q": wire["w:q"]}, metadata=meta4),
        "int4 short values": save({**int4, "w:q": int4["w:q"][:-1].clone()}, metadata=meta4),
        "int8 labelled int4": save(wire, metadata={"codec": "int4", "block": "256"}),
        "transposed": save({**fp32, "emb": fp32["emb"].t().contiguous()},
                           metadata={"codec": "fp32", "block": "256"}),
    }


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_check_payload_file_agrees_with_from_bytes(tmp_path, case):
    from crowdtrain.coordinator.payloads import check_payload_file

    blob = _bad_payloads()[case]
    path = tmp_path / "upload"
    path.write_bytes(blob)
    try:
        _, want = codecs.from_bytes(blob, SHAPES)
    except codecs.CodecError:
        with pytest.raises(codecs.CodecError):
            check_payload_file(path, SHAPES, block_elems=100)
        assert case != "good" and not case.startswith("good"), case
    else:
        assert case.startswith("good"), case
        assert check_payload_file(path, SHAPES, block_elems=100) == want
    with pytest.raises(codecs.CodecError, match="too large"):
        check_payload_file(path, SHAPES, max_bytes=len(blob) - 1)


def test_aggregation_blocks_shrink_as_contributions_grow():
    from crowdtrain.coordinator.aggregation import block_for

    assert block_for(1) == 1 << 17 and block_for(0) == 1 << 17
    sizes = [block_for(n) for n in (1, 10, 100, 1000, 10**6)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 1 << 12  # a sparse chunk
    assert all(s & (s - 1) == 0 for s in sizes)  # powers of two: int8 and sparse aligned
    for n in (200, 1000, 2000):  # the working set n x block x 12 bytes stays within budget
        assert n * block_for(n) * 12 <= 256 << 20
        assert n * 2 * block_for(n, threads=2) * 12 <= 256 << 20  # ... on two threads too
