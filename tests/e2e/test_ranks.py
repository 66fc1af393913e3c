"""A multi-process volunteer (`crowdtrain join --nproc 2`, gloo on CPU) against a real
coordinator: its contribution is accepted, and equals (within float tolerance) what a
one-process worker sends for the same lease and global batch."""

from __future__ import annotations

import pytest
import torch
from swarm_helpers import Swarm, copy_run

from crowdtrain.run.ledger import Ledger
from crowdtrain.wire import codecs

pytestmark = pytest.mark.slow


def contribute(tiny_run, tmp_path, *join_args: str) -> tuple[dict[str, torch.Tensor], str]:
    """Run a fresh copy of the run for one round with one volunteer; its delta and log."""
    # fp32 payloads: compare what was trained, not int8 rounding of it
    run = copy_run(tiny_run, tmp_path / "run", rounds=1, inner_steps=6, codec="fp32",
                   min_contributions=1, round_seconds=120)
    s = Swarm(run, tmp_path)
    try:
        s.serve()
        s.join("v", "--max-rounds", "1", *join_args)
        assert s.wait("v", timeout=180) == 0, s.log("v")
    finally:
        s.stop()
    rows = Ledger(run.ledger_path).contributions()
    assert [r["status"] for r in rows] == ["accepted"], rows
    shapes = {k: tuple(v.shape) for k, v in run.load_model(0)[1].tensors.items()}
    delta, _ = codecs.from_bytes((run.dir / rows[0]["path"]).read_bytes(), shapes)
    return delta, s.log("v")


def test_two_process_gloo_worker_equals_one_process(tiny_run, tmp_path):
    two, log2 = contribute(tiny_run, tmp_path / "two", "--nproc", "2")
    assert "1 rounds, 1 accepted" in log2, log2
    one, _ = contribute(tiny_run, tmp_path / "one")
    scale = max(float(v.abs().max()) for v in one.values())
    worst = max(float((two[k] - one[k]).abs().max()) for k in one)
    assert scale > 1e-3  # it trained
    assert worst < 1e-4 * scale + 1e-6, (worst, scale)


def test_nproc_must_divide_the_batch(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", rounds=1, inner_steps=2)
    s = Swarm(run, tmp_path)
    try:
        s.serve()
        s.join("v", "--nproc", "3")  # the tiny preset's batch is 8
        assert s.wait("v", timeout=180) == 2
    finally:
        s.stop()
    assert "does not split across 3 processes" in s.log("v")
    assert "Traceback" not in s.log("v")
    assert "joined" not in s.log("v")  # said before any process started or joined
