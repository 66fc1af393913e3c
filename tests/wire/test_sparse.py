"""The sparse low-bit codec: what the worker keeps plus what it sends is its delta (the
error-feedback identity), sizes, exact decoding, hostile payloads refused with the reason,
the coordinator's streamed source equal to the full decode, and aggregation over it."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crowdtrain.coordinator.aggregation import RobustConfig, robust_aggregate
from crowdtrain.coordinator.payloads import check_payload_file, open_payload
from crowdtrain.wire import codecs, sparse
from crowdtrain.wire.outer import weighted_mean

SHAPES = {"emb": (97, 64), "w": (5000,), "one": (1,), "odd": (3, 1371)}


def delta(seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}


@pytest.mark.parametrize("bits", sparse.BITS)
@pytest.mark.parametrize("block,k", [(4096, 41), (256, 8), (64, 64)])
def test_error_feedback_identity_and_sizes(bits, block, k):
    ef = codecs.ErrorFeedback("sparse", block, k, bits)
    d = delta(1)
    wire = ef.compress(d)
    sent = codecs.decode(wire, "sparse", SHAPES, block, k, bits)
    for name, x in d.items():
        # what is kept plus what is sent is the delta: bit for bit where nothing was sent,
        # within one float32 rounding of the subtraction where something was
        back, r = ef.residual[name] + sent[name], ef.residual[name]
        assert torch.equal(back[sent[name] == 0], x[sent[name] == 0]), name
        ulp = torch.finfo(torch.float32).eps * torch.maximum(x.abs(), r.abs())
        assert bool(((back - x).abs() <= ulp).all()), name
        n = sparse.entries(x.numel(), block, k)
        assert int((sent[name] != 0).sum()) <= n
        assert wire[name + ":idx"].numel() == n
    # the entries sent are the largest in magnitude of each chunk
    flat, got = d["w"].reshape(-1), sent["w"].reshape(-1)
    for c in range(math.ceil(flat.numel() / block)):
        x, y = flat[c * block:(c + 1) * block], got[c * block:(c + 1) * block]
        kk = min(k, x.numel())
        top = set(torch.topk(x.abs(), kk).indices.tolist())
        assert set(torch.nonzero(y).reshape(-1).tolist()) <= top
    # a second round carries the residual: over two rounds the sum decoded tracks the sum given
    wire2 = ef.compress(d)
    sent2 = codecs.decode(wire2, "sparse", SHAPES, block, k, bits)
    for name, x in d.items():
        assert torch.allclose(sent[name] + sent2[name] + ef.residual[name], 2 * x, atol=1e-9)


@pytest.mark.parametrize("decay", [1.0, 0.95, 0.5, 0.0])
def test_decayed_error_feedback_keeps_what_the_rule_says(decay):
    """SparseLoCo's accumulator: e = decay * residual + delta is what is compressed, and what
    is kept plus what is sent is e (so delta + decay * residual), over several rounds."""
    block, k, bits = 256, 8, 2
    residual = None
    for rnd in range(3):
        d = delta(10 + rnd)
        e = codecs.accumulate(d, residual, decay)
        want = d if residual is None else {n: d[n] + decay * residual[n] for n in d}
        for n in d:  # the rule itself, to one float32 rounding
            assert torch.allclose(e[n], want[n], rtol=0, atol=1e-9), n
        sent = codecs.from_bytes(codecs.to_bytes(e, "sparse", block=block, k=k, bits=bits),
                                 SHAPES)[0]
        new = {n: e[n] - sent[n] for n in e}
        for n in e:
            # kept + sent = delta + decay * kept before: exactly where nothing was sent
            back = new[n] + sent[n]
            assert torch.equal(back[sent[n] == 0], e[n][sent[n] == 0]), n
            assert torch.allclose(back, want[n], rtol=0, atol=1e-9), n
            assert int((sent[n] != 0).sum()) <= sparse.entries(d[n].numel(), block, k)
        residual = new
    # decay 1 is plain error feedback, bit for bit the sum it always was
    assert all(torch.equal(codecs.accumulate(d, residual, 1.0)[n], d[n] + residual[n])
               for n in d)
    # decay 0 forgets all that was not sent
    assert all(torch.equal(codecs.accumulate(d, residual, 0.0)[n], d[n]) for n in d)


def test_decayed_error_feedback_forgets_unsent_mass_geometrically():
    """A value never sent accumulates to delta * (1 - decay^t) / (1 - decay), not t x delta."""
    d = {"w": torch.full((4,), 1e-3)}
    e = None
    for _ in range(20):
        e = codecs.accumulate(d, e, 0.9)  # nothing sent: the residual is the accumulator
    assert torch.allclose(e["w"], torch.full((4,), 1e-3 * (1 - 0.9 ** 20) / 0.1))


@pytest.mark.parametrize("decay", [-0.1, 1.01, float("nan")])
def test_error_feedback_decay_outside_0_1_is_refused(decay):
    with pytest.raises(codecs.CodecError, match="decay must be in"):
        codecs.accumulate(delta(1), delta(2), decay)


def test_bytes_per_parameter_against_int8():
    numel = 10_000_000
    int8 = codecs.payload_bytes(numel, "int8")
    one = codecs.payload_bytes(numel, "sparse", k=sparse.chunk_k(4096, 0.01), bits=2)
    three = codecs.payload_bytes(numel, "sparse", k=sparse.chunk_k(4096, 0.03), bits=2)
    assert int8 / one > 40 and int8 / three > 14
    blob = codecs.to_bytes(delta(0), "sparse")
    params = sum(math.prod(s) for s in SHAPES.values())
    assert len(blob) < 0.1 * codecs.payload_bytes(params, "int8")


def test_round_trip_bytes_and_decoding_is_exact():
    d = delta(2)
    blob = codecs.to_bytes(d, "sparse", meta={"stats": "{}"}, block=512, k=10, bits=4)
    out, meta = codecs.from_bytes(blob, SHAPES)
    assert meta["codec"] == "sparse" and meta["k"] == "10" and meta["bits"] == "4"
    again, _ = codecs.from_bytes(blob, SHAPES)
    assert all(torch.equal(out[k], again[k]) for k in out)
    # the largest entry of a chunk decodes to its absmax exactly (scale * (2^bits - 1))
    top = d["w"].reshape(-1)[:512].abs().max()
    assert float(out["w"].reshape(-1)[:512].abs().max()) == pytest.approx(float(top), rel=1e-6)


def hostile(mutate) -> bytes:
    wire = codecs.encode(delta(3), "sparse", 256, 8, 2)
    meta = {"codec": "sparse", "block": "256", "k": "8", "bits": "2", "stats": "{}"}
    mutate(wire, meta)
    return st_save(wire, metadata=meta)


def _dup(w, m):
    w["w:idx"][1] = w["w:idx"][0]


def _out_of_range(w, m):
    w["w:idx"][7] = 256


def _negative(w, m):
    w["w:idx"][3] = -1


def _last_chunk(w, m):  # the last chunk of "odd" is shorter than the block
    w["odd:idx"][-1] = 255


def _nan_scale(w, m):
    w["emb:scale"][2] = float("nan")


def _count(w, m):
    w["w:idx"] = w["w:idx"][:-1]


def _k(w, m):
    m["k"] = "9"


def _bits(w, m):
    m["bits"] = "3"


@pytest.mark.parametrize("mutate,reason", [
    (_dup, "repeated or out of order"), (_out_of_range, "out of range"),
    (_negative, "out of range"), (_last_chunk, "out of range"),
    (_nan_scale, "finite"), (_count, "shape"), (_k, "shape"), (_bits, "bits"),
])
def test_hostile_payloads_are_refused_with_the_reason(tmp_path, mutate, reason):
    blob = hostile(mutate)
    with pytest.raises(codecs.CodecError, match=reason):
        codecs.from_bytes(blob, SHAPES)
    p = tmp_path / "c.safetensors"
    p.write_bytes(blob)
    with pytest.raises(codecs.CodecError, match=reason):  # the coordinator's streamed check
        check_payload_file(p, SHAPES, block_elems=300)


def test_a_truncated_payload_is_refused(tmp_path):
    blob = codecs.to_bytes(delta(4), "sparse")
    for cut in (5, len(blob) // 2, len(blob) - 1):
        with pytest.raises(codecs.CodecError):
            codecs.from_bytes(blob[:cut], SHAPES)
        p = tmp_path / f"t{cut}.safetensors"
        p.write_bytes(blob[:cut])
        with pytest.raises(codecs.CodecError):
            check_payload_file(p, SHAPES)


@pytest.mark.parametrize("bits", sparse.BITS)
def test_streamed_slices_equal_the_full_decode(tmp_path, bits):
    blob = codecs.to_bytes(delta(5), "sparse", block=128, k=5, bits=bits)
    full, _ = codecs.from_bytes(blob, SHAPES)
    p = tmp_path / "c.safetensors"
    p.write_bytes(blob)
    g = torch.Generator().manual_seed(0)
    with open_payload(p, SHAPES) as src:
        for name, t in full.items():
            flat = t.reshape(-1)
            for _ in range(20):
                a = int(torch.randint(0, flat.numel(), (1,), generator=g))
                b = int(torch.randint(a, flat.numel() + 1, (1,), generator=g))
                assert torch.equal(src.read(name, a, b), flat[a:b]), (name, a, b)
            assert torch.equal(src.read(name, 0, flat.numel()), flat)


@pytest.mark.parametrize("method", ["mean", "centered_clip"])
def test_aggregation_over_sparse_files(tmp_path, method):
    paths, decoded = [], []
    for i in range(5):
        blob = codecs.to_bytes(delta(10 + i), "sparse")
        p = tmp_path / f"c{i}.safetensors"
        p.write_bytes(blob)
        paths.append(p)
        decoded.append(codecs.from_bytes(blob, SHAPES)[0])
    weights = [1.0, 2.0, 1.0, 3.0, 1.0]
    srcs = [open_payload(p, SHAPES) for p in paths]
    out, screening = robust_aggregate(srcs, weights, SHAPES, RobustConfig(method=method),
                                      block_elems=1000, threads=2)
    for s in srcs:
        s.close()
    assert all(m == 1.0 for m, _ in screening)
    if method == "mean":
        ref = weighted_mean(decoded, weights)
        assert all(torch.allclose(out[k], ref[k], atol=1e-9) for k in ref)
    else:
        assert all(torch.isfinite(out[k]).all() for k in out)


def test_wire_is_stable_safetensors():
    blob = codecs.to_bytes(delta(6), "sparse")
    wire = st_load(blob)
    assert wire["w:idx"].dtype == torch.int16 and wire["w:q"].dtype == torch.int8
    assert wire["w:scale"].dtype == torch.float32


@pytest.mark.parametrize("decay", [1.0, 0.95])
def test_the_in_place_accumulator_is_the_same_sum_in_the_deltas_own_tensors(decay):
    """The worker sums in place (`inplace=True`: no second model-sized copy while the next
    lease trains); the values are the out-of-place rule's, bit for bit."""
    residual, d = delta(20), delta(21)
    want = codecs.accumulate(d, residual, decay)
    ids = {n: id(t) for n, t in d.items()}
    got = codecs.accumulate(d, residual, decay, inplace=True)
    assert {n: id(t) for n, t in got.items()} == ids  # d's own tensors
    assert all(torch.equal(got[n], want[n]) for n in want)
