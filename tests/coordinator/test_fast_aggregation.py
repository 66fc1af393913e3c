"""The block-matrix aggregation equals the one it replaced (reference_aggregation.py) within
1e-6 relative, for every method, honest rounds and attacked ones, from real int8 and sparse
payload files; it is bit-identical run to run and across thread counts for a block size, and
agrees across block sizes. Its parts against their definitions: the selection network against
a sort, the trimmed mean (ties across the cut included) against the stable-sort reference,
`read_into` against `read` for every payload codec, compiled int8 decode or not. The compiled
first pass (kernels.first_pass, numba) against the torch operations it replaces and against
its definition. The reference predates the agreement screen of sparse rounds, so every
configuration here turns it off (agreement_factor=0; the screen: test_agreement.py)."""

from __future__ import annotations

import pytest
import reference_aggregation as ref
import torch

from crowdtrain.coordinator import kernels
from crowdtrain.coordinator.aggregation import METHODS, RobustConfig, robust_aggregate
from crowdtrain.coordinator.payloads import open_payload
from crowdtrain.coordinator.trimmed import (
    order_statistics,
    selection_network,
    sorting_network,
    trim_count,
    weighted_trimmed_mean,
)
from crowdtrain.wire import codecs

SHAPES = {"emb": (97, 64), "w": (3001,), "one": (1,), "mlp": (129, 33)}
# the sparse codec at its defaults (1% of each 4096-value chunk, 2 bits) and a denser one whose
# chunks do not divide the aggregation blocks
CODECS = {"int8": {}, "sparse": {}, "sparse-dense": {"block": 96, "k": 24, "bits": 4}}


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


def write_payloads(folder, ds, codec: str = "int8", **opts) -> list:
    """Each delta of `ds` as a payload file of `codec` in `folder` (options per file: a list
    value gives file i its i-th item, None for the codec's default)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, d in enumerate(ds):
        own = {k: v[i] if isinstance(v, list) else v for k, v in opts.items()}
        p = folder / f"c{i}.safetensors"
        p.write_bytes(codecs.to_bytes(d, codec, **{k: v for k, v in own.items()
                                                    if v is not None}))
        paths.append(p)
    return paths


@pytest.fixture(params=[(8, False, "int8"), (8, True, "int8"), (5, True, "int8"),
                        (20, False, "int8"), (3, False, "int8"), (8, False, "sparse"),
                        (8, True, "sparse"), (8, False, "sparse-dense"),
                        (13, True, "sparse-dense")],
                ids=lambda p: f"{p[0]}{'-attacked' if p[1] else ''}-{p[2]}")
def payloads(request, tmp_path):
    n, attacked, codec = request.param
    paths = write_payloads(tmp_path, deltas(n, attacked, seed=n), codec.split("-")[0],
                           **CODECS[codec])
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
    cfg = RobustConfig(method=method, agreement_factor=0.0)
    want, want_screen = aggregate(ref.robust_aggregate, paths, weights, cfg, block_elems=1000)
    for threads, block in ((1, 1000), (2, 777), (2, 4096), (1, 1 << 16)):
        got, screening = aggregate(robust_aggregate, paths, weights, cfg, block_elems=block,
                                   threads=threads)
        assert [m for m, _ in screening] == pytest.approx([m for m, _ in want_screen],
                                                          rel=1e-6)
        assert [r is None for _, r in screening] == [r is None for _, r in want_screen]
        assert rel(got, want) < 1e-6, (method, threads, block, rel(got, want))


@pytest.mark.parametrize("method", ["trimmed_mean", "centered_clip"])
def test_bit_identical_run_to_run_and_across_thread_counts(payloads, method):
    paths, weights = payloads
    cfg = RobustConfig(method=method, agreement_factor=0.0)
    runs = [aggregate(robust_aggregate, paths, weights, cfg, block_elems=512, threads=t)[0]
            for t in (2, 2, 1, 3)]
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in SHAPES)


@pytest.mark.parametrize("passes_from", [1, 10**6], ids=["passes", "gram"])
def test_centered_clip_by_passes_or_gram_equals_the_previous(payloads, monkeypatch,
                                                            passes_from):
    # G a from a pass over the blocks per product (large n) or from the Gram matrix (small n)
    import crowdtrain.coordinator.aggregation as agg
    monkeypatch.setattr(agg, "PASSES_FROM", passes_from)
    paths, weights = payloads
    cfg = RobustConfig(method="centered_clip", agreement_factor=0.0)
    want, want_screen = aggregate(ref.robust_aggregate, paths, weights, cfg, block_elems=1000)
    runs = [aggregate(robust_aggregate, paths, weights, cfg, block_elems=block, threads=t)
            for t, block in ((2, 4096), (1, 4096), (2, 1000))]
    for got, screening in runs:
        assert [m for m, _ in screening] == pytest.approx([m for m, _ in want_screen],
                                                          rel=1e-6)
        assert rel(got, want) < 1e-6, rel(got, want)
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in SHAPES)


@pytest.mark.parametrize("method", METHODS)
def test_columns_of_zeros_are_left_out_bit_identically(tmp_path, method):
    # sparse payloads: the math runs on the columns where someone sent a value (`_support`);
    # the same result run to run and across thread counts, and equal to the original
    paths = write_payloads(tmp_path, deltas(8, False, seed=3), "sparse")
    weights = [float(1000 + 37 * i) for i in range(8)]
    cfg = RobustConfig(method=method, agreement_factor=0.0)
    want, _ = aggregate(ref.robust_aggregate, paths, weights, cfg, block_elems=1000)
    runs = [aggregate(robust_aggregate, paths, weights, cfg, block_elems=4096, threads=t)[0]
            for t in (2, 2, 1)]
    for got in runs:
        assert rel(got, want) < 1e-6
        assert all(torch.equal(runs[0][k], got[k]) for k in SHAPES)


def test_support_finds_the_columns_that_are_not_all_zero():
    from crowdtrain.coordinator.aggregation import _support
    x = torch.zeros(5, 4096)
    x[0, 7], x[3, 7], x[2, 4000], x[4, 0] = 1.0, -2.0, -1e-30, 3.0
    assert _support(x).tolist() == [0, 7, 4000]
    assert _support(torch.randn(5, 4096)) is None  # dense: nothing to leave out
    y = torch.zeros(3, 4096)
    y[1, ::2] = 1.0  # row 0 is empty but the union is half the columns and more
    assert _support(y) is None or _support(y).numel() == 2048


def test_trimmed_mean_breaks_ties_by_worker_order_as_a_stable_sort():
    # int8 payloads make exact ties common (zeros above all); the dropped worker decides
    # which weight leaves the mean
    x = torch.tensor([[0.0, -0.0, 1.0, 2.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 3.0, 2.0],
                      [5.0, 0.0, -1.0, 2.0]])
    w = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    got = weighted_trimmed_mean(x, w, 1)
    want = ref.weighted_trimmed_mean(x, w, 1)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("n", range(1, 22))
def test_trimmed_mean_equals_the_stable_sort_with_ties(n):
    # small integers (ties everywhere, across the cut too), mostly-zero columns (as sparse
    # payloads give), -0.0 next to 0.0, and plain random values
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-3, 4, (n, 3000), generator=g).float() * 0.5
    x[:, :1000] = torch.randn(n, 1000, generator=g)
    x[:, 2000:] *= torch.rand(n, 1000, generator=g) < 0.1
    x[0, ::7] = -0.0
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    for k in range(0, (n - 1) // 2 + 1):
        got = weighted_trimmed_mean(x, w, k)
        want = ref.weighted_trimmed_mean(x, w, k)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (n, k)  # terms are O(1)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 16, 17, 33, 100])
def test_networks_sort_and_select(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-5, 6, (n, 500), generator=g).float()
    wires = x.clone()
    for i, j in sorting_network(n):  # the 0-1 principle is not needed: just check it sorts
        lo, hi = torch.minimum(wires[i], wires[j]), torch.maximum(wires[i], wires[j])
        wires[i], wires[j] = lo, hi
    assert torch.equal(wires, torch.sort(x, dim=0).values)
    ranks = (n // 4, n - n // 4 - 1)
    before = x.clone()
    got = order_statistics(x, ranks)
    assert torch.equal(x, before)  # x is only read
    srt = torch.sort(x, dim=0).values
    assert all(torch.equal(v, srt[r]) for v, r in zip(got, ranks, strict=True))
    assert len(selection_network(n, ranks)) <= len(sorting_network(n))


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("codec", ["int8", "int4", "sparse", "sparse-dense"])
def test_read_into_equals_read(tmp_path, codec, compiled, monkeypatch):
    # (int8's whole blocks decode in kernels.dequantizer()'s loop where numba is there: the same
    # bits as torch's multiply, which `compiled=False` runs)
    monkeypatch.setattr(kernels, "enabled", compiled)
    shapes = {**SHAPES, "big": (5, 9001)}
    g = torch.Generator().manual_seed(7)
    d = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    p = tmp_path / "c.safetensors"
    p.write_bytes(codecs.to_bytes(d, codec.split("-")[0], **CODECS.get(codec, {})))
    full = codecs.from_bytes(p.read_bytes(), shapes)[0]
    with open_payload(p, shapes) as src:
        for name, t in full.items():
            flat = t.reshape(-1)
            n = flat.numel()
            ranges = [(0, n), (0, 0), (n, n), (0, 1), (n - 1, n)]
            ranges += [tuple(sorted(torch.randint(0, n + 1, (2,), generator=g).tolist()))
                       for _ in range(30)]
            ranges += [(a, min(a + 4096, n)) for a in range(0, n, 4096)]
            for a, b in ranges:
                out = torch.full((b - a,), 7.0)
                src.read_into(name, a, b, out)
                assert torch.equal(out, flat[a:b]), (name, a, b)


# ---------------------------------------------------------------- the compiled first pass

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


@needs_kernel
@pytest.mark.parametrize("method", ["trimmed_mean", "centered_clip"])
def test_compiled_first_pass_equals_the_torch_path(payloads, method, monkeypatch):
    # int8 and sparse payloads, honest and attacked rounds, odd sizes: the compiled loop
    # (kernels.first_pass) against the torch operations it replaces, both against the original
    paths, weights = payloads
    cfg = RobustConfig(method=method, agreement_factor=0.0)
    want, want_screen = aggregate(ref.robust_aggregate, paths, weights, cfg, block_elems=1000)
    fast = [aggregate(robust_aggregate, paths, weights, cfg, block_elems=b, threads=t)
            for t, b in ((2, 4096), (2, 4096), (1, 777))]
    monkeypatch.setattr(kernels, "enabled", False)
    assert not kernels.available()
    slow, slow_screen = aggregate(robust_aggregate, paths, weights, cfg, block_elems=4096,
                                  threads=2)
    for got, screening in fast:
        assert [m for m, _ in screening] == pytest.approx([m for m, _ in slow_screen],
                                                          rel=1e-6)
        assert [m for m, _ in screening] == pytest.approx([m for m, _ in want_screen],
                                                          rel=1e-6)
        assert rel(got, slow) < 1e-6 and rel(got, want) < 1e-6, (rel(got, slow),
                                                                  rel(got, want))
    assert all(torch.equal(fast[0][0][k], fast[1][0][k]) for k in SHAPES)  # run to run


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 100])
def test_compiled_first_pass_against_its_definition(n):
    # ties everywhere (across the cut too), -0.0 next to 0.0, mostly-zero columns, random
    # values, a length that is not a multiple of the tile: v against the stable sort, the
    # norms and the Gram matrix (or its diagonal) against float64
    g = torch.Generator().manual_seed(n)
    length = 3 * kernels.tile_for(n) + 37
    x = torch.randint(-3, 4, (n, length), generator=g).float() * 0.5
    x[:, :200] = torch.randn(n, 200, generator=g)
    x[:, -300:] *= torch.rand(n, 300, generator=g) < 0.1
    x[0, ::7] = -0.0
    w = (torch.rand(n, generator=g) + 0.1).float()
    ks = sorted({0, trim_count(n, 0.25), (n - 1) // 2})
    for k in ks:
        net = kernels.network_array(selection_network(n, (k, n - k - 1)) if k else ())
        for mode in (0, 1, 2):
            v = torch.full((length,), 7.0)
            sq, gm = kernels.first_pass(x, w, k, net, v, True, mode)
            want = ref.weighted_trimmed_mean(x, w.double(), k).float()
            assert torch.allclose(v, want, rtol=1e-6, atol=1e-6), (n, k, mode)
            assert torch.allclose(sq, x.double().square().sum(1), rtol=1e-6)
            d = (x - v).double()
            if mode == 1:
                assert torch.allclose(gm, d @ d.t(), rtol=1e-5, atol=1e-5)
            elif mode == 2:
                assert torch.allclose(gm, d.square().sum(1), rtol=1e-5, atol=1e-5)
            else:
                assert gm is None


@needs_kernel
def test_compiled_trimmed_mean_breaks_ties_exactly_as_a_stable_sort():
    # where the torch path takes the masked mean of equal values (L == H), the compiled loop
    # keeps exactly the stable sort's workers: equal, not just close
    x = torch.tensor([[0.0, -0.0, 1.0, 2.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 3.0, 2.0],
                      [5.0, 0.0, -1.0, 2.0]])
    w = torch.tensor([1.0, 2.0, 4.0, 8.0])
    v = torch.empty(4)
    kernels.first_pass(x, w, 1, kernels.network_array(selection_network(4, (1, 2))), v,
                       False, 0)
    assert torch.equal(v, ref.weighted_trimmed_mean(x, w.double(), 1).float())


def test_without_numba_the_torch_path_runs(monkeypatch, tmp_path):
    # numba missing (or unable to compile): first_pass says so and the aggregation is the
    # torch operations', still equal to the original
    monkeypatch.setattr(kernels, "_compiled", lambda name="first_pass": None)
    assert not kernels.available()
    assert kernels.dequantizer() is None
    assert kernels.first_pass(torch.zeros(3, 5), torch.ones(3), 1,
                              kernels.network_array(()), torch.empty(5), True, 1) is None
    paths = write_payloads(tmp_path, deltas(5, True, seed=11))
    weights = [float(1000 + 37 * i) for i in range(5)]
    cfg = RobustConfig(agreement_factor=0.0)
    want, _ = aggregate(ref.robust_aggregate, paths, weights, cfg, block_elems=1000)
    got, _ = aggregate(robust_aggregate, paths, weights, cfg, block_elems=4096, threads=2)
    assert rel(got, want) < 1e-6


# ---------------------------------------------------------------- the whole-matrix int8 decode

def _int8_files(folder, n: int, blocks: list[int | None], big: int | None = None):
    ds = deltas(n, True, seed=3)
    if big is not None:  # values near float32's limit: its scales could overflow a value
        ds[big] = {k: v / v.abs().max() * 3.39e38 for k, v in ds[big].items()}
    return write_payloads(folder, ds, block=blocks)


@needs_kernel
@pytest.mark.parametrize("method", METHODS)
def test_whole_matrix_int8_decode_equals_row_by_row(tmp_path, method, monkeypatch):
    # kernels.row_decoder decodes every contribution's block in one call from the payloads'
    # memory maps: the same bits as the per-row decode, for every method and thread count
    # (blocks of 4096 values: whole int8 blocks, except each parameter's tail, row by row)
    from crowdtrain.coordinator import aggregation as agg
    paths = _int8_files(tmp_path, 9, [None] * 9)
    weights = [float(1000 + 37 * i) for i in range(9)]
    cfg = RobustConfig(method=method, agreement_factor=0.0)
    calls = []
    real = agg._Passes.matrix

    def counted(self, rows, *a, **kw):
        calls.append(self._int8_table(a[1] if len(a) > 1 else kw["name"]) is not None)
        return real(self, rows, *a, **kw)

    monkeypatch.setattr(agg._Passes, "matrix", counted)
    fast = [aggregate(robust_aggregate, paths, weights, cfg, block_elems=4096, threads=t)
            for t in (1, 2)]
    assert any(calls)  # the one-call decode ran
    monkeypatch.setattr(kernels, "row_decoder", lambda: None)
    slow, slow_screen = aggregate(robust_aggregate, paths, weights, cfg, block_elems=4096,
                                  threads=1)
    for got, screening in fast:
        assert all(torch.equal(got[k], slow[k]) for k in SHAPES), method
        assert screening == slow_screen


@needs_kernel
def test_whole_matrix_decode_only_where_every_row_can(tmp_path):
    # one payload of another block size, or one whose scales could overflow a value (checked
    # row by row for non-finite values): that parameter's blocks are decoded row by row,
    # and the result still equals the original aggregation's
    from crowdtrain.coordinator.aggregation import _Passes
    cases = {"uniform": (_int8_files(tmp_path / "u", 5, [None] * 5), True),
             "mixed blocks": (_int8_files(tmp_path / "m", 5, [None, 128, None, None, None]),
                              False),
             "a large scale": (_int8_files(tmp_path / "b", 5, [None] * 5, big=4), False)}
    for case, (paths, whole) in cases.items():
        srcs = [open_payload(p, SHAPES) for p in paths]
        try:
            passes = _Passes(srcs, SHAPES, 4096, 1, None)
            assert (passes._int8_table("emb") is not None) == whole, case
        finally:
            for s in srcs:
                s.close()
    paths = cases["mixed blocks"][0]
    weights = [1.0] * 5
    cfg = RobustConfig(method="centered_clip", agreement_factor=0.0)
    want, _ = aggregate(ref.robust_aggregate, paths, weights, cfg, block_elems=1000)
    got, _ = aggregate(robust_aggregate, paths, weights, cfg, block_elems=4096, threads=2)
    assert rel(got, want) < 1e-6
