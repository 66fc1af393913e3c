"""The block-matrix aggregation equals the one it replaced (reference_aggregation.py) within
1e-6 relative, for every method, honest rounds and attacked ones, from real int8 payload
files; it is bit-identical run to run for a given thread count, and agrees across thread
counts and block sizes."""

from __future__ import annotations

import pytest
import reference_aggregation as ref
import torch

from crowdtrain.coordinator.aggregation import (
    METHODS,
    RobustConfig,
    robust_aggregate,
    weighted_trimmed_mean,
)
from crowdtrain.coordinator.payloads import open_payload
from crowdtrain.wire import codecs

SHAPES = {"emb": (97, 64), "w": (3001,), "one": (1,), "mlp": (129, 33)}


def deltas(n: int, attacked: bool, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 1e-3 for k, s in SHAPES.items()}
    out = [{k: v + torch.randn(v.shape, generator=g) * 5e-4 for k, v in base.items()}
           for _ in range(n)]
    if attacked:  # one scaled x100 (refused), one x3 (clipped), one sign-flipped
        out[0] = {k: 100 * v for k, v in out[0].items()}
        out[1] = {k: 3 * v for k, v in out[1].items()}
        out[2] = {k: -v for k, v in out[2].items()}
    return out


@pytest.fixture(params=[(8, False), (8, True), (5, True), (20, False), (3, False)],
                ids=lambda p: f"{p[0]}{'-attacked' if p[1] else ''}")
def payloads(request, tmp_path):
    n, attacked = request.param
    paths = []
    for i, d in enumerate(deltas(n, attacked, seed=n)):
        p = tmp_path / f"c{i}.safetensors"
        p.write_bytes(codecs.to_bytes(d, "int8"))
        paths.append(p)
    weights = [float(1000 + 37 * i) for i in range(n)]
    return paths, weights


def aggregate(fn, paths, weights, cfg, **kw):
    srcs = [open_payload(p, SHAPES) for p in paths]
    try:
        return fn(srcs, weights, SHAPES, cfg, **kw)
    finally:
        for s in srcs:
            s.close()


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    den = sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5
    return num / den


@pytest.mark.parametrize("method", METHODS)
def test_equals_the_previous_aggregation_within_1e6(payloads, method):
    paths, weights = payloads
    cfg = RobustConfig(method=method)
    want, want_screen = aggregate(ref.robust_aggregate, paths, weights, cfg, block_elems=1000)
    for threads, block in ((1, 1000), (2, 777), (2, 1 << 20)):
        got, screening = aggregate(robust_aggregate, paths, weights, cfg, block_elems=block,
                                   threads=threads)
        assert [m for m, _ in screening] == pytest.approx([m for m, _ in want_screen],
                                                          rel=1e-6)
        assert [r is None for _, r in screening] == [r is None for _, r in want_screen]
        assert rel(got, want) < 1e-6, (method, threads, block, rel(got, want))


def test_bit_identical_run_to_run_for_a_thread_count(payloads):
    paths, weights = payloads
    cfg = RobustConfig()
    a, _ = aggregate(robust_aggregate, paths, weights, cfg, block_elems=500, threads=2)
    b, _ = aggregate(robust_aggregate, paths, weights, cfg, block_elems=500, threads=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trimmed_mean_breaks_ties_by_worker_order_as_a_stable_sort():
    # int8 payloads make exact ties common (zeros above all); the dropped worker decides
    # which weight leaves the mean
    x = torch.tensor([[0.0, -0.0, 1.0, 2.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 3.0, 2.0],
                      [5.0, 0.0, -1.0, 2.0]])
    w = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    got = weighted_trimmed_mean(x, w, 1)
    want = ref.weighted_trimmed_mean(x, w, 1)
    assert torch.equal(got, want), (got, want)
