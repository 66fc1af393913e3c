"""Reduced forms of the reliability benchmarks, with real processes (bench/poisoning_swarm.py,
bench/chaos.py; the full experiments and their figures are in BENCHMARKS.md):

- poisoning: 3 honest workers + 1 worker sending 100x its delta; with the run's default
  aggregation the final held-out loss stays within 3% of the honest-only run and the ledger
  says the attacker was left out (so the attack was really there and the defence acted);
- chaos: 4 workers, a random worker SIGKILLed every few seconds and the coordinator twice;
  all rounds complete, every acknowledged contribution is in the ledger and its checkpoint,
  and the loss is within 3% of the undisturbed run and well below the initial loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from chaos import chaos_run  # noqa: E402
from poisoning_swarm import swarm_run  # noqa: E402

from crowdtrain.run.folder import SwarmConfig  # noqa: E402

pytestmark = pytest.mark.slow


def test_one_malicious_worker_of_four_does_not_hurt_the_run(tiny_run, tmp_path):
    kw = dict(honest=3, rounds=3, inner_steps=8)
    ref = swarm_run(tiny_run, tmp_path, None, SwarmConfig().aggregation, **kw)
    assert ref.loss < 0.9 * ref.initial, ref  # the honest run learns
    hit = swarm_run(tiny_run, tmp_path, "scaled_x100", SwarmConfig().aggregation, **kw)
    assert hit.attacker == {"left out": 3}, hit.attacker
    assert hit.loss <= 1.03 * ref.loss, (hit.loss, ref.loss)


def test_chaos_kills_lose_no_acknowledged_work(tiny_run, tmp_path):
    kw = dict(workers=4, rounds=4, inner_steps=10, round_seconds=12, kill_every=4.0, seed=1)
    ref = chaos_run(tiny_run, tmp_path, chaos=False, **kw)
    assert not ref.problems, ref.problems
    o = chaos_run(tiny_run, tmp_path, chaos=True, **kw)
    assert not o.problems, o.problems
    assert o.coordinator_kills == 2 and o.worker_kills >= 3, o
    assert o.accepted >= 4 and o.acknowledged >= 1, o  # at least one per round was aggregated
    assert o.loss < 0.9 * o.initial, o
    assert o.loss <= 1.03 * ref.loss, (o.loss, ref.loss)
