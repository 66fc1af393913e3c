"""Overlapped rounds with real processes: a volunteer trains round r+1 while round r waits for a
slower volunteer and closes, folds the update in when it comes, and the run still verifies bit
for bit (crowdtrain.volunteer.overlap, Coordinator.lease with `ahead`)."""

from __future__ import annotations

import re

import torch
from swarm_helpers import copy_run, run_to_end

from crowdtrain.publish.export import export_model
from crowdtrain.publish.verify import verify_model
from crowdtrain.run.ledger import Ledger
from crowdtrain.run.train import evaluate


def val_loss(run, rnd: int) -> float:
    model, _ = run.load_model(rnd)
    return evaluate(model, run.val_windows(), torch.device("cpu"))


def folds(log: str) -> list[tuple[int, int, int]]:
    """(lease round, update round, steps of the lease before it) of every fold in a log."""
    return [tuple(map(int, m)) for m in re.findall(
        r"round (\d+): folded in the update of round (\d+) after step (\d+)", log)]


def test_a_worker_trains_the_next_round_while_a_slower_one_holds_the_round_open(tiny_run,
                                                                                tmp_path):
    """The order of events, not their timing: the fast volunteer's lease on round r+1 starts
    (and trains steps) before update r is folded in; the run learns and `verify` replays the
    published updates bit for bit."""
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=200, rounds=4, round_seconds=120,
                   min_contributions=2, overlap=True)
    s, status = run_to_end(run, tmp_path, names=("fast", "slow"),
                           join_args={"slow": ("--step-pause", "0.02")})
    fast = s.log("fast")
    assert status.finished and status.round == 4
    ahead = [int(r) for r in re.findall(r"round (\d+): training ahead", fast)]
    assert ahead, fast
    # some lease ahead folded in the update it waited for after training steps of its own:
    # theta of its round (update r = lease round - 1) or, if the lease ended first, in the next
    assert any(k >= 1 and upd == lease - 1 and lease in ahead or lease - 1 in ahead
               and upd == lease - 2 for lease, upd, k in folds(fast)), fast
    for lease, upd, _ in folds(fast):  # and every fold came after its lease started ahead
        assert fast.index(f"round {lease}: training ahead") < fast.index(
            f"round {lease}: folded in the update of round {upd}")
    ledger = Ledger(run.ledger_path)
    rows = ledger.contributions()
    assert rows and all(r["status"] == "accepted" for r in rows), [r["reason"] for r in rows]
    assert val_loss(run, 4) < 0.95 * val_loss(run, 0)
    report = verify_model(export_model(run, tmp_path / "export"), run.dir)
    assert report.ok, report


def test_a_slow_volunteer_sends_its_first_round_once_the_fast_one_has(tiny_run, tmp_path):
    """Round 0 of an overlapped run cannot be paced (no speed is known): when the fast
    volunteer's work is in, the slow one's heartbeat tells it to send the steps it has done
    (AliveResponse.finish) instead of training its whole lease while everyone waits."""
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=60, rounds=1, round_seconds=120,
                   min_contributions=2, overlap=True)
    s, status = run_to_end(run, tmp_path, names=("fast", "slow"),
                           join_args={"slow": ("--step-pause", "0.5")})
    assert status.finished
    assert "its first contribution is in and it was not paced" in s.log("slow"), s.log("slow")
    rows = {r["volunteer_id"]: r for r in Ledger(run.ledger_path).contributions()}
    steps = sorted(r["steps"] for r in rows.values())
    assert len(steps) == 2 and all(r["status"] == "accepted" for r in rows.values())
    assert steps[0] < 60 == steps[1], steps  # 60 steps at 0.5 s would take 30 s
