"""The round-in-progress snapshot a worker keeps on its own disk (volunteer.resume): what it
records, what it refuses to read back, how often it is written."""

from __future__ import annotations

import time

import pytest
import torch

from crowdtrain.run.train import StepStats
from crowdtrain.volunteer.resume import (
    PartialRound,
    RoundSnapshots,
    load_partial,
    merge_stats,
    save_partial,
)
from crowdtrain.wire.protocol import Lease

LEASE = Lease(lease_id=7, round=3, shards=["train-000"], seed=11, start_step=90, max_steps=30,
              seconds=50.0, deadline_in=60.0)


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def test_a_snapshot_round_trips_and_matches_only_its_own_lease(tmp_path):
    p = tmp_path / "in-progress.safetensors"
    opt = {"w:exp_avg": torch.ones(4, 3), "w:step": torch.tensor(12.0)}
    save_partial(p, PartialRound(LEASE, 3, StepStats(12, 6144, 4.25, 3.5), params(), opt,
                                 residual=params(2)))
    back = load_partial(p, params(1))
    assert back.lease == LEASE and back.theta_round == 3
    assert back.stats == StepStats(12, 6144, 4.25, 3.5)
    assert all(torch.equal(back.params[k], v) for k, v in params().items())
    assert torch.equal(back.optimizer["w:step"], opt["w:step"])
    assert all(torch.equal(back.residual[k], v) for k, v in params(2).items())
    assert back.matches(LEASE.model_copy(update={"seconds": 20.0}), 3)  # handed back later
    assert not back.matches(LEASE.model_copy(update={"lease_id": 8}), 3)  # a fresh lease
    assert not back.matches(LEASE, 2)  # parameters of another round


def test_a_lease_ahead_keeps_its_anchor_the_pending_fold(tmp_path):
    """Overlapped rounds: a lease ahead snapshotted before theta of its round was folded in
    keeps the parameters it started from (its anchor); it resumes whatever theta the worker
    holds, since the fold needs only the anchor."""
    p = tmp_path / "in-progress.safetensors"
    ahead = LEASE.model_copy(update={"ahead": True})
    save_partial(p, PartialRound(ahead, 2, StepStats(5, 500, 4.0, 1.0), params(), {},
                                 anchor=params(3)))
    back = load_partial(p, params(1))
    assert all(torch.equal(back.anchor[k], v) for k, v in params(3).items())
    assert back.matches(LEASE, 2) and back.matches(LEASE, None)  # the round need not match
    assert not back.matches(LEASE.model_copy(update={"lease_id": 8}), 2)
    save_partial(p, PartialRound(LEASE, 3, StepStats(5, 500, 4.0, 1.0), params(), {}))
    assert load_partial(p, params(1)).anchor is None


def test_a_sparse_residual_round_trips_and_the_resumed_upload_is_the_same(tmp_path):
    """The sparse codec's residual (all that was not sent: most of each delta) is kept as is:
    the worker that resumes sends the same bytes as one that never stopped."""
    from crowdtrain.wire import codecs

    shapes = {"w": (96, 128), "b": (128,)}
    g = torch.Generator().manual_seed(5)
    first, second = ({k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
                     for _ in range(2))
    opts = {"k": 123, "bits": 4}
    sent, _ = codecs.from_bytes(codecs.to_bytes(first, "sparse", **opts), shapes)
    residual = {k: first[k] - sent[k] for k in first}
    assert (sent["w"] != 0).float().mean() < 0.05  # most of it stays behind
    p = tmp_path / "in-progress.safetensors"
    model = {k: torch.zeros(s) for k, s in shapes.items()}
    save_partial(p, PartialRound(LEASE, 3, StepStats(2, 10, 4.0, 1.0), model, {},
                                 residual=residual))
    back = load_partial(p, model).residual
    assert all(torch.equal(back[k], residual[k]) for k in shapes)
    # the same wire tensors (the bytes differ only in the order of the metadata's keys)
    wire = codecs.encode({k: second[k] + residual[k] for k in shapes}, "sparse", **opts)
    again = codecs.encode({k: second[k] + back[k] for k in shapes}, "sparse", **opts)
    assert wire.keys() == again.keys() and all(torch.equal(wire[k], again[k]) for k in wire)


@pytest.mark.parametrize("damage", ["truncate", "shapes", "garbage"])
def test_a_damaged_or_foreign_snapshot_is_ignored_and_removed(tmp_path, damage):
    p = tmp_path / "in-progress.safetensors"
    save_partial(p, PartialRound(LEASE, 3, StepStats(5, 100, 4.0, 1.0), params(), {}))
    model = params()
    if damage == "truncate":  # killed mid-write would leave no such file (atomic), a bad disk
        p.write_bytes(p.read_bytes()[:-10])
    elif damage == "shapes":  # the run's model changed
        model = {"w": torch.zeros(5, 3), "b": torch.zeros(3)}
    else:
        p.write_bytes(b"\x00" * 64)
    assert load_partial(p, model) is None and not p.exists()


def test_stats_of_a_lease_trained_in_two_lives_add_up():
    m = merge_stats(StepStats(10, 1000, 4.0, 2.0), StepStats(30, 3000, 3.0, 5.0))
    assert m == StepStats(40, 4000, 3.25, 7.0)


def test_snapshots_keep_their_cost_a_small_share_of_training(tmp_path):
    def slow_state():
        time.sleep(0.05)  # a large model on a slow disk
        return params(), {}, None, None

    snaps = RoundSnapshots(tmp_path / "s.safetensors", LEASE, 3, slow_state,
                           before=StepStats(10, 1000, 4.0, 2.0), min_interval=0.0,
                           max_overhead=0.02)
    assert snaps.due()
    snaps.save(StepStats(5, 500, 3.0, 1.0))
    assert snaps.interval >= 0.05 / 0.02 and not snaps.due()
    saved = load_partial(tmp_path / "s.safetensors", params())
    assert saved.stats.steps == 15 and saved.stats.tokens == 1500  # this life + the earlier
    snaps.discard()
    assert not (tmp_path / "s.safetensors").exists()


def test_the_run_folder_keeps_parameters_and_optimizer_and_ignores_damaged_files(tmp_path):
    from crowdtrain.volunteer.files import RunFolder

    folder = RunFolder(tmp_path)
    assert folder.load_params(params()) == (None, None) and folder.load_optimizer() is None
    folder.save_params(params(1), 7)
    folder.save_optimizer({"w:exp_avg": torch.ones(4, 3)})
    theta, rnd = folder.load_params(params())
    assert rnd == 7 and all(torch.equal(theta[k], v) for k, v in params(1).items())
    assert torch.equal(folder.load_optimizer()["w:exp_avg"], torch.ones(4, 3))
    assert folder.load_params({"w": torch.zeros(5, 3), "b": torch.zeros(3)}) == (None, None)
    folder.params.write_bytes(b"\x00" * 32)
    folder.optimizer.write_bytes(folder.optimizer.read_bytes()[:-3])
    assert folder.load_params(params()) == (None, None) and folder.load_optimizer() is None
