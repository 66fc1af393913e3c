"""DiLoCo outer step: weighted mean of pseudo-gradients, SGD/Nesterov update matching
torch.optim.SGD, global norm, and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from crowdtrain.wire.outer import OuterConfig, delta_norm, outer_step, weighted_mean


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _delta(seed):
    return {"a": _rand(3, 5, seed=seed), "b": _rand(7, seed=seed + 100)}


# ---- weighted_mean -------------------------------------------------------------------------

def test_weighted_mean_hand_computed():
    d1 = {"w": torch.tensor([4.0, -8.0, 0.0]), "v": torch.tensor([[1.0]])}
    d2 = {"w": torch.tensor([8.0, 4.0, 2.0]), "v": torch.tensor([[5.0]])}
    out = weighted_mean([d1, d2], [1, 3])
    # 0.25 * d1 + 0.75 * d2
    assert torch.equal(out["w"], torch.tensor([7.0, 1.0, 1.5]))
    assert torch.equal(out["v"], torch.tensor([[4.0]]))
    assert out["w"].dtype == torch.float32


def test_weighted_mean_random_matches_formula_and_is_deterministic():
    ds = [_delta(s) for s in range(4)]
    ws = [10.0, 250.0, 3.0, 77.0]
    out = weighted_mean(ds, ws)
    total = sum(ws)
    for k in ds[0]:
        ref = sum(d[k].double() * (w / total) for d, w in zip(ds, ws, strict=True))
        assert torch.allclose(out[k].double(), ref, atol=1e-6), k
    again = weighted_mean(ds, ws)
    for k in out:
        assert torch.equal(out[k], again[k]), k


def test_weighted_mean_equal_weights_is_mean_and_scale_free():
    ds = [_delta(s) for s in range(3)]
    a = weighted_mean(ds, [1, 1, 1])
    b = weighted_mean(ds, [1000, 1000, 1000])
    for k in a:
        assert torch.allclose(a[k], (ds[0][k] + ds[1][k] + ds[2][k]) / 3, atol=1e-6)
        assert torch.allclose(a[k], b[k], atol=1e-7)


def test_weighted_mean_does_not_mutate_inputs():
    ds = [_delta(s) for s in range(2)]
    copies = [{k: v.clone() for k, v in d.items()} for d in ds]
    out = weighted_mean(ds, [2.0, 1.0])
    out["a"].add_(1.0)
    for d, c in zip(ds, copies, strict=True):
        for k in d:
            assert torch.equal(d[k], c[k])


@pytest.mark.parametrize(
    "deltas,weights",
    [
        ([], []),
        ([{"a": torch.ones(2)}], []),
        ([{"a": torch.ones(2)}, {"a": torch.ones(2)}], [1.0]),
        ([{"a": torch.ones(2)}, {"a": torch.ones(2)}], [1.0, 0.0]),
        ([{"a": torch.ones(2)}, {"a": torch.ones(2)}], [1.0, -2.0]),
        ([{"a": torch.ones(2)}, {"a": torch.ones(2)}], [1.0, float("nan")]),
        ([{"a": torch.ones(2)}, {"a": torch.ones(2)}], [1.0, float("inf")]),
        ([{"a": torch.ones(2)}, {"b": torch.ones(2)}], [1.0, 1.0]),
        ([{"a": torch.ones(2)}, {"a": torch.ones(2), "b": torch.ones(1)}], [1.0, 1.0]),
        ([{"a": torch.ones(2)}, {"a": torch.ones(3)}], [1.0, 1.0]),
    ],
    ids=["empty", "no-weights", "length", "zero", "negative", "nan", "inf", "names",
         "extra-name", "shape"],
)
def test_weighted_mean_rejects(deltas, weights):
    with pytest.raises(ValueError):
        weighted_mean(deltas, weights)


# ---- outer_step ----------------------------------------------------------------------------

@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_matches_torch_sgd(nesterov):
    cfg = OuterConfig(lr=0.7, momentum=0.9, nesterov=nesterov)
    init = {"w": _rand(4, 6, seed=1), "b": _rand(6, seed=2)}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = torch.optim.SGD(list(ref.values()), lr=0.7, momentum=0.9, nesterov=nesterov)
    ours = {k: v.clone() for k, v in init.items()}
    buf = None
    for step in range(5):
        grad = {k: _rand(*v.shape, seed=10 * step + i) for i, (k, v) in enumerate(init.items())}
        for k, p in ref.items():
            p.grad = grad[k].clone()
        opt.step()
        update, buf = outer_step(ours, grad, buf, cfg)
        ours = {k: ours[k] + update[k] for k in ours}
        for k, p in ref.items():
            assert torch.allclose(ours[k], p.detach(), atol=1e-6, rtol=0), (step, k)
            assert torch.allclose(buf[k], opt.state[p]["momentum_buffer"], atol=1e-6), (step, k)
    # The parameters really moved, so the comparison above is not vacuous.
    assert float((ours["w"] - init["w"]).abs().max()) > 0.5


def test_outer_step_first_step_values():
    params = {"w": torch.zeros(2)}
    grad = {"w": torch.tensor([1.0, -2.0])}
    update, buf = outer_step(params, grad, None, OuterConfig(lr=0.5, momentum=0.9))
    # buf = g; nesterov step = g + 0.9 g = 1.9 g; update = -0.5 * 1.9 g
    assert torch.allclose(update["w"], torch.tensor([-0.95, 1.9]))
    assert torch.equal(buf["w"], grad["w"])
    update, _ = outer_step(params, grad, None, OuterConfig(lr=0.5, momentum=0.9, nesterov=False))
    assert torch.allclose(update["w"], torch.tensor([-0.5, 1.0]))


def test_outer_step_does_not_mutate_or_alias_inputs():
    params = {"w": _rand(5, seed=3)}
    grad = {"w": _rand(5, seed=4)}
    mom = {"w": _rand(5, seed=5)}
    saved = [params["w"].clone(), grad["w"].clone(), mom["w"].clone()]
    for nesterov in (True, False):
        update, buf = outer_step(params, grad, mom, OuterConfig(nesterov=nesterov))
        buf["w"].add_(1.0)
        update["w"].add_(1.0)
        for now, before in zip((params["w"], grad["w"], mom["w"]), saved, strict=True):
            assert torch.equal(now, before)
    _, buf = outer_step(params, grad, None, OuterConfig(nesterov=False))
    buf["w"].add_(1.0)
    assert torch.equal(grad["w"], saved[1])


def test_outer_step_rejects_mismatch():
    params = {"w": torch.zeros(3), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="grad"):
        outer_step(params, {"w": torch.zeros(3)}, None, OuterConfig())
    with pytest.raises(ValueError, match="grad"):
        outer_step(params, {"w": torch.zeros(4), "b": torch.zeros(2)}, None, OuterConfig())
    good = {"w": torch.zeros(3), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="momentum"):
        outer_step(params, good, {"w": torch.zeros(3)}, OuterConfig())


# ---- delta_norm, OuterConfig ---------------------------------------------------------------

def test_delta_norm():
    d = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert delta_norm(d) == 5.0
    assert delta_norm({}) == 0.0
    x = _delta(7)
    ref = math.sqrt(sum(float((v.double() ** 2).sum()) for v in x.values()))
    assert delta_norm(x) == pytest.approx(ref, rel=1e-12)


def test_outer_config_defaults_and_validation():
    cfg = OuterConfig()
    assert (cfg.lr, cfg.momentum, cfg.nesterov) == (0.7, 0.9, True)
    assert OuterConfig(lr=10, momentum=0).lr == 10
    for kwargs, field in [({"lr": 0}, "lr"), ({"lr": -0.1}, "lr"), ({"lr": 11}, "lr"),
                          ({"lr": float("nan")}, "lr"), ({"momentum": 1}, "momentum"),
                          ({"momentum": -0.1}, "momentum"),
                          ({"momentum": float("nan")}, "momentum")]:
        with pytest.raises(ValueError, match=field):
            OuterConfig(**kwargs)


# ---- round schedules (crowdtrain.run.schedule) -------------------------------------------------

@pytest.mark.parametrize("total,rounds,growth", [(1500, 15, 1.0), (1500, 15, 8.0), (100, 7, 3.0),
                                                 (10, 10, 50.0), (7, 1, 4.0), (301, 5, 2.5)])
def test_inner_steps_schedule_keeps_the_total_and_grows(total, rounds, growth):
    from crowdtrain.run.schedule import inner_steps_schedule

    hs = inner_steps_schedule(total, rounds, growth)
    assert len(hs) == rounds and sum(hs) == total and min(hs) >= 1
    assert all(a <= b for a, b in zip(hs, hs[1:], strict=False)), hs
    if growth == 1.0 and total % rounds == 0:
        assert set(hs) == {total // rounds}
    if rounds > 1 and total >= 10 * rounds:
        assert abs(hs[-1] / hs[0] - growth) <= 0.25 * growth, hs
    with pytest.raises(ValueError):
        inner_steps_schedule(total, rounds, 0.5)
    with pytest.raises(ValueError):
        inner_steps_schedule(rounds - 1, rounds, growth)


def test_swarm_config_round_steps_follow_the_schedule():
    from crowdtrain.errors import CrowdtrainError
    from crowdtrain.run.folder import SwarmConfig

    fixed = SwarmConfig(inner_steps=40, rounds=5)
    assert [fixed.round_steps(r) for r in range(7)] == [40] * 7
    grow = SwarmConfig(inner_steps=100, rounds=15, inner_steps_growth=8.0)
    hs = [grow.round_steps(r) for r in range(15)]
    assert sum(hs) == 1500 and hs[0] < 100 < hs[-1] and grow.round_steps(99) == hs[-1]
    with pytest.raises(CrowdtrainError, match="inner_steps_growth"):
        SwarmConfig(inner_steps_growth=0.5)
    with pytest.raises(CrowdtrainError, match="inner_steps_growth"):
        SwarmConfig(rounds=0, inner_steps_growth=2.0)
