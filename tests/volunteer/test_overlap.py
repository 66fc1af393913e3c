"""The worker's side of overlapped rounds (crowdtrain.volunteer.overlap): the fold keeps a
lease's contribution its own progress, older anchors move along, uploads go one at a time."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from crowdtrain.run.model import build_model, load_into, preset_config, state_dict_for_save
from crowdtrain.volunteer.overlap import Anchors, PendingTheta, Uploader


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state_dict_for_save(model).items()}


def noise(like: dict[str, torch.Tensor], seed: int, scale: float = 1e-2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in like.items()}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(preset_config("tiny", vocab_size=64, eot_id=0))


def test_the_fold_puts_the_progress_on_theta_and_keeps_the_contribution(model):
    p0 = params(model)
    anchors = Anchors(params(model), 3, local=True)
    step = noise(p0, 1)  # training so far
    load_into(model, {k: p0[k] + step[k] for k in p0})
    before = anchors.delta(state_dict_for_save(model))
    theta = {k: v + 0.5 for k, v in p0.items()}  # theta of round 3, published
    anchors.fold(model, theta, 3)
    now = state_dict_for_save(model)
    assert all(torch.allclose(now[k], theta[k] + step[k], atol=1e-6) for k in theta)
    after = anchors.delta(now)
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)
    assert not anchors.local and anchors.current is theta and anchors.unfolded == {}


def test_an_older_round_folds_in_and_moves_the_later_anchor_along(model):
    """A lease ahead on round 5 whose previous lease (round 4) ended before theta 4 came:
    theta 4 folds in first, the lease's own anchor moves with it, and its contribution is
    still its own progress; theta 5 then makes the parameters theta 5 + that progress."""
    p4 = params(model)
    lease4 = Anchors(params(model), 4, local=True)
    sent4 = noise(p4, 2)
    load_into(model, {k: p4[k] - sent4[k] for k in p4})
    lease5 = Anchors(params(model), 5, local=True, unfolded=lease4.unfolded)
    assert sorted(lease5.unfolded) == [4, 5]
    progress = noise(p4, 3)
    load_into(model, {k: v - progress[k] for k, v in params(model).items()})
    theta4 = noise(p4, 4, scale=1.0)
    lease5.fold(model, theta4, 4)
    assert lease5.local and sorted(lease5.unfolded) == [5]
    d = lease5.delta(state_dict_for_save(model))
    assert all(torch.allclose(d[k], progress[k], atol=1e-5) for k in d)
    theta5 = noise(p4, 5, scale=1.0)
    lease5.fold(model, theta5, 5)
    now = state_dict_for_save(model)
    assert all(torch.allclose(now[k], theta5[k] - progress[k], atol=1e-5) for k in now)


def test_pending_theta_is_none_until_fetched_and_cancel_ends_the_wait():
    go = threading.Event()

    def fetch(cancel):
        go.wait(10)
        return {"w": torch.ones(1)}, 7

    p = PendingTheta(fetch, 7)
    assert p.result() is None
    go.set()
    end = time.monotonic() + 10
    while p.result() is None and time.monotonic() < end:
        time.sleep(0.01)
    assert p.result()[1] == 7

    waiting = PendingTheta(lambda cancel: None if cancel.wait(10) else ({}, 1), 1)
    waiting.cancel()
    waiting._thread.join(5)
    assert waiting.result() is None


def test_uploads_go_one_at_a_time_in_order_and_failures_come_back():
    order, up = [], Uploader()
    release = threading.Event()

    def first():
        release.wait(10)
        order.append(1)

    up.send(1, first)
    assert up.in_flight == 1
    threading.Timer(0.2, release.set).start()
    up.send(2, lambda: order.append(2))  # waits for the first
    up.wait()
    assert order == [1, 2] and up.in_flight is None

    def broken():
        raise RuntimeError("link down")

    up.send(3, broken)
    with pytest.raises(RuntimeError, match="link down"):
        up.wait()
