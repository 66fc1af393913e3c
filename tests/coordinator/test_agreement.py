"""The agreement screen of sparse rounds (coordinator.agreement): its statistics against their
definition and independent of the blocks; the rule on hand-made agreements; and, through
`robust_aggregate` on real sparse payload files, a sign-flipped and a same-norm noise
contribution refused with the reason while honest rounds, rounds without consensus and dense
(int8) rounds refuse nobody."""

from __future__ import annotations

import math

import pytest
import torch

from crowdtrain.coordinator import agreement
from crowdtrain.coordinator.aggregation import RobustConfig, TensorSource, robust_aggregate
from crowdtrain.coordinator.payloads import open_payload
from crowdtrain.wire import codecs

SHAPES = {"emb": (97, 64), "w": (9001,), "mlp": (129, 33)}


def honest(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """n deltas that share a direction (one loss, different batches), as honest ones do."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 1e-3 for k, s in SHAPES.items()}
    return [{k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}
            for _ in range(n)]


def norm(d: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in d.values()))


def aggregate(tmp_path, ds, codec="sparse", cfg=None, weights=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    srcs = []
    try:
        for i, d in enumerate(ds):
            p = tmp_path / f"c{i}.safetensors"
            p.write_bytes(codecs.to_bytes(d, codec))
            srcs.append(open_payload(p, SHAPES))
        return robust_aggregate(srcs, weights or [1000.0 + 7 * i for i in range(len(ds))],
                                SHAPES, cfg or RobustConfig(), block_elems=2048)
    finally:
        for s in srcs:
            s.close()


def decoded(ds, codec="sparse"):
    return [codecs.from_bytes(codecs.to_bytes(d, codec), SHAPES)[0] for d in ds]


def test_block_stats_are_the_definition_and_do_not_depend_on_the_blocks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g)
    x[x.abs() < 1.0] = 0  # sparse rows with overlapping supports
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    whole = agreement.block_stats(x, p)
    parts = sum(agreement.block_stats(x[:, a:a + 70], p) for a in range(0, 300, 70))
    assert torch.allclose(whole, parts, rtol=1e-9, atol=1e-12)
    for j in range(5):
        o = sum(p[i] * x[i] for i in range(5) if i != j)
        on = x[j] != 0
        want = float((x[j] * o).sum()) / math.sqrt(float((o[on] ** 2).sum())
                                                  * float((x[j] ** 2).sum()))
        assert agreement.agreements(whole)[j] == pytest.approx(want, rel=1e-5)


def test_agreement_is_the_cosine_on_the_entries_sent():
    v = torch.tensor([1.0, -2.0, 0.0, 3.0, 0.0, 0.0])
    w = torch.tensor([1.0, -2.0, 5.0, 3.0, 0.0, 0.0])  # also sends an entry v does not
    x = torch.stack([v, w, -v, torch.tensor([0, 0, 0, 0, 1.0, 1.0])])
    agree = agreement.agreements(agreement.block_stats(x, torch.full((4,), 0.25)))
    # the flipped one against (v + w) / 4 on its own entries: the cosine of -v with 2v, -1
    assert agree[2] == pytest.approx(-1.0)
    # an entry nobody else sent adds nothing: the last row shares no entry, so 0
    assert agree[3] == 0.0
    # v against (w - v) / 4 = (0, 0, 5/4, 0, ...) on v's entries: all zero there, so 0
    assert agree[0] == 0.0


def test_the_rule_refuses_the_least_agreeing_only_below_the_factor_of_a_real_consensus():
    assert agreement.least_agreeing([0.5, 0.45, 0.52, -0.4], 0.25)[0] == 3
    j, reason = agreement.least_agreeing([0.5, 0.45, 0.01, 0.48], 0.25)
    assert j == 2 and "points against the round" in reason and "0.010" in reason
    assert agreement.least_agreeing([0.5, 0.45, 0.2, 0.48], 0.25) is None  # 0.2 >= 0.25 x 0.47
    assert agreement.least_agreeing([0.01, 0.02, -0.1, 0.03], 0.25) is None  # no consensus
    j, reason = agreement.least_agreeing([0.01, 0.02, -0.5, 0.03], 0.25)  # but opposed
    assert j == 2 and "(below -0.2)" in reason
    assert agreement.least_agreeing([0.5, -0.5], 0.25) is None  # too few to judge
    assert agreement.least_agreeing([0.5, 0.45, -0.4], 0.0) is None  # screen off


def test_honest_sparse_rounds_refuse_nobody(tmp_path):
    for seed in range(3):
        _, screening = aggregate(tmp_path, honest(4, seed))
        assert screening == [(1.0, None)] * 4


@pytest.mark.parametrize("attack", ["sign_flip", "noise"])
def test_an_in_norm_attack_on_sparse_payloads_is_refused_with_its_reason(tmp_path, attack):
    ds = honest(4, seed=7)
    if attack == "sign_flip":
        ds[1] = {k: -v for k, v in ds[1].items()}
    else:
        g = torch.Generator().manual_seed(3)
        noise = {k: torch.randn(v.shape, generator=g) for k, v in ds[1].items()}
        ds[1] = {k: v * (norm(ds[1]) / norm(noise)) for k, v in noise.items()}
    got, screening = aggregate(tmp_path, ds)
    assert [m for m, _ in screening] == [1.0, 0.0, 1.0, 1.0]
    assert "points against the round" in screening[1][1]
    # what is left is the aggregate of the honest three alone
    want, _ = aggregate(tmp_path / "three", [ds[0], ds[2], ds[3]], weights=[1000.0, 1014.0,
                                                                            1021.0])
    for k in SHAPES:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-9)
    # without the screen the attacker is in the result (centered clipping cannot see it)
    _, unscreened = aggregate(tmp_path / "off", ds, cfg=RobustConfig(agreement_factor=0.0))
    assert unscreened[1][0] > 0


def test_an_honest_majority_is_never_outvoted(tmp_path):
    # two flipped of five cancel the honest consensus (the honest agree ~0 with the others'
    # mean) but each is opposed to it; one at a time, at most (5 - 1) // 2 = 2 refused
    ds = honest(5, seed=11)
    for i in (0, 3):
        ds[i] = {k: -v for k, v in ds[i].items()}
    _, screening = aggregate(tmp_path, ds)
    assert [m for m, _ in screening] == [0.0, 1.0, 1.0, 0.0, 1.0]
    # three flipped of five: the "consensus" is the attackers'; the screen stops at 2
    ds = honest(5, seed=12)
    for i in (0, 1, 2):
        ds[i] = {k: -v for k, v in ds[i].items()}
    _, screening = aggregate(tmp_path / "b", ds)
    assert sum(m == 0.0 for m, _ in screening) <= 2


def test_no_consensus_or_dense_rounds_are_not_screened(tmp_path):
    g = torch.Generator().manual_seed(5)  # independent noise: nothing to agree on
    ds = [{k: torch.randn(s, generator=g) * 1e-3 for k, s in SHAPES.items()} for _ in range(4)]
    _, screening = aggregate(tmp_path, ds)
    assert screening == [(1.0, None)] * 4
    # int8 payloads are dense: centered clipping, not the agreement screen, handles them
    ds = honest(4, seed=7)
    ds[1] = {k: -v for k, v in ds[1].items()}
    _, screening = aggregate(tmp_path / "int8", ds, codec="int8")
    assert all("points against" not in (r or "") for _, r in screening)
    # in-memory sources say whether they stand for sparse payloads
    sources = [TensorSource(d, sparse=True) for d in decoded(ds)]
    _, screening = robust_aggregate(sources, [1.0] * 4, SHAPES, RobustConfig())
    assert screening[1][0] == 0.0


def test_the_factor_is_validated():
    with pytest.raises(ValueError, match="agreement_factor"):
        RobustConfig(agreement_factor=1.0)
    with pytest.raises(ValueError, match="agreement_factor"):
        RobustConfig(agreement_factor=float("nan"))


def test_the_screen_does_not_depend_on_blocks_or_threads(tmp_path):
    ds = honest(4, seed=7)
    ds[2] = {k: -v for k, v in ds[2].items()}
    srcs = []
    for i, d in enumerate(ds):
        p = tmp_path / f"c{i}.safetensors"
        p.write_bytes(codecs.to_bytes(d, "sparse"))
        srcs.append(open_payload(p, SHAPES))
    try:
        runs = [robust_aggregate(srcs, [1.0, 2.0, 3.0, 4.0], SHAPES, RobustConfig(),
                                 block_elems=b, threads=t) for b, t in ((512, 1), (512, 2),
                                                                        (4096, 2))]
    finally:
        for s in srcs:
            s.close()
    assert all([m for m, _ in r[1]] == [1.0, 1.0, 0.0, 1.0] for r in runs)
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in SHAPES)
    assert all(torch.allclose(runs[0][0][k], runs[2][0][k], rtol=1e-5, atol=1e-9)
               for k in SHAPES)
