"""What a worker makes its contributions with: the codec settings the coordinator publishes in
its run info (volunteer.worker.codec_options), checked before any training, and the sparse
codec's error-feedback decay (SwarmConfig.sparse_ef_decay -> SwarmSchedule -> the worker's
payload and residual)."""

from __future__ import annotations

from types import SimpleNamespace

import pydantic
import pytest
import torch
from swarm_helpers import copy_run

from crowdtrain.coordinator.reports import run_info
from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.folder import SwarmConfig
from crowdtrain.volunteer.worker import Worker, codec_options
from crowdtrain.wire import codecs
from crowdtrain.wire.protocol import SubmitStats, SwarmSchedule


def schedule(codec: str, block: int, **sparse) -> SwarmSchedule:
    return SwarmSchedule(inner_steps=5, round_seconds=60.0, rounds=2, min_contributions=1,
                         codec=codec, block=block, **sparse)


def test_a_sparse_run_s_k_and_bits_come_from_its_schedule():
    assert codec_options(schedule("int8", 256)) == {}
    assert codec_options(schedule("int4", 64)) == {}
    got = codec_options(schedule("sparse", 4096, sparse_k=123, sparse_bits=4))
    assert got == {"block": 4096, "k": 123, "bits": 4}


@pytest.mark.parametrize("sparse", [{}, {"sparse_k": 41}, {"sparse_k": 0, "sparse_bits": 2},
                                    {"sparse_k": 41, "sparse_bits": 3}])
def test_a_sparse_schedule_without_usable_k_and_bits_stops_the_worker(sparse):
    with pytest.raises(CrowdtrainError, match="sparse codec settings are not usable"):
        codec_options(schedule("sparse", 4096, **sparse))


def test_the_error_feedback_decay_is_a_validated_run_setting():
    assert SwarmConfig().sparse_ef_decay == codecs.SPARSE_EF_DECAY
    assert SwarmConfig(codec="sparse", sparse_ef_decay=1.0).sparse_ef_decay == 1.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(CrowdtrainError, match="sparse_ef_decay"):
            SwarmConfig(codec="sparse", sparse_ef_decay=bad)
    # on the wire: optional (None from a coordinator that does not send it: plain feedback)
    assert schedule("sparse", 4096, sparse_k=41, sparse_bits=2).sparse_ef_decay is None
    assert schedule("sparse", 4096, sparse_ef_decay=0.9).sparse_ef_decay == 0.9
    for bad in (-0.1, 1.5):
        with pytest.raises(pydantic.ValidationError):
            schedule("sparse", 4096, sparse_k=41, sparse_bits=2, sparse_ef_decay=bad)


def test_the_coordinator_publishes_the_decay_of_a_sparse_run_only(tiny_run, tmp_path):
    def decay(codec: str) -> float | None:
        run = copy_run(tiny_run, tmp_path / codec, codec=codec, sparse_ef_decay=0.8)
        info = run_info(run, round=0, finished=False, params=1, teacher=None)
        return info.schedule.sparse_ef_decay

    assert decay("sparse") == 0.8 and decay("int8") is None


def _worker(sched: SwarmSchedule, shapes: dict) -> Worker:
    """Just what Worker._payload reads: the run's schedule, the codec options, the shapes."""
    w = Worker.__new__(Worker)
    w.cfg = SimpleNamespace(error_feedback=True)
    w.info = SimpleNamespace(schedule=sched)
    w.codec_options = codec_options(sched)
    w.shapes = shapes
    w.residual = None
    return w


def own(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy to hand `_payload`, which sums in place (its delta's tensors become the residual)."""
    return {k: v.clone() for k, v in d.items()}


@pytest.mark.parametrize("decay", [None, 1.0, 0.9])
def test_the_worker_decays_its_residual_as_the_run_says(decay):
    shapes = {"w": (3000,), "b": (7, 5)}
    g = torch.Generator().manual_seed(0)
    sched = schedule("sparse", 4096, sparse_k=41, sparse_bits=2, sparse_ef_decay=decay)
    w = _worker(sched, shapes)
    stats = SubmitStats(lease_id=1, round=0, steps=1, tokens=1, mean_loss=1.0, seconds=1.0)
    beta = 1.0 if decay is None else decay
    kept = None
    for _ in range(3):
        d = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
        sent = codecs.from_bytes(w._payload(own(d), stats), shapes)[0]
        for k in d:  # what is kept + what is sent = delta + decay * what was kept before
            want = d[k] if kept is None else d[k] + beta * kept[k]
            assert torch.allclose(w.residual[k] + sent[k], want, rtol=0, atol=1e-9), k
            assert 0 < int((sent[k] != 0).sum()) <= 41
        kept = w.residual
    # the decay is the sparse codec's: an int8 run's residual is its rounding error, undecayed
    w = _worker(schedule("int8", 256, sparse_ef_decay=0.5), shapes)
    d = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
    w._payload(own(d), stats)
    r = w.residual
    sent = codecs.from_bytes(w._payload(own(d), stats), shapes)[0]
    for k in d:
        assert torch.allclose(w.residual[k] + sent[k], d[k] + r[k], rtol=0, atol=1e-9), k


def test_a_sparse_run_defaults_to_plain_averaging_unless_told_otherwise():
    """The outer optimizer's defaults follow the codec: DiLoCo's Nesterov momentum for the
    dense codecs, none (lr 1) for the sparse one, whose decayed error feedback replaces it."""
    dense, sp = SwarmConfig(), SwarmConfig(codec="sparse")
    assert (dense.outer_lr, dense.outer_momentum) == (0.7, 0.9)
    assert (sp.outer_lr, sp.outer_momentum) == (1.0, 0.0)
    given = SwarmConfig(codec="sparse", outer_lr=0.7, outer_momentum=0.9)
    assert (given.outer_lr, given.outer_momentum) == (0.7, 0.9)  # what the user set stays
    with pytest.raises(CrowdtrainError, match="outer_momentum"):
        SwarmConfig(codec="sparse", outer_momentum=1.0)


def test_an_overlapped_run_defaults_to_a_lower_outer_momentum():
    """Overlapped rounds: Nesterov 0.8 (measured within 1% of stop-and-wait with the update a
    quarter round late; 0.9 was +1.46% at H=100); the sparse codec keeps its own; a value the
    user sets stays."""
    assert SwarmConfig(overlap=True).outer_momentum == 0.8
    assert SwarmConfig(overlap=True).outer_lr == 0.7
    assert SwarmConfig(overlap=True, codec="sparse").outer_momentum == 0.0
    assert SwarmConfig(overlap=True, outer_momentum=0.9).outer_momentum == 0.9
