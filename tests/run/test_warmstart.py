"""The run owner's warm start (crowdtrain.run.warmstart, SwarmConfig.warm_start): `init` trains the
first steps of the schedule on K x the batch, checkpoint 0 records them, the swarm continues
the schedule from there, and the published record reports them apart from the volunteers'."""

from __future__ import annotations

import json

import pytest

from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.export import export_model
from crowdtrain.run.folder import SwarmConfig, init_run
from crowdtrain.wire.protocol import JoinRequest, LeaseRequest


def test_warm_start_settings_and_step_counts():
    cfg = SwarmConfig(rounds=9, inner_steps=100, warm_start=0.1)
    assert cfg.warm_start_steps() == 100 and cfg.total_steps() == 1000  # 10% of all steps
    assert SwarmConfig(rounds=0, warm_start=0.1).warm_start_steps() == 0  # no fixed length
    assert SwarmConfig(rounds=5, warm_start=0.0).total_steps() == 5 * 50
    long = SwarmConfig(rounds=1000, inner_steps=100)  # "short": capped for a long run
    assert long.warm_start_steps() == 1000 and long.total_steps() == 101_000
    assert SwarmConfig(rounds=9, inner_steps=100, warm_start_max_steps=40).warm_start_steps() \
        == 40
    for bad in ({"warm_start": 0.6}, {"warm_start": -0.1}, {"warm_start_batch": 0},
                {"warm_start_max_steps": -1}):
        with pytest.raises(CrowdtrainError, match=next(iter(bad))):
            SwarmConfig(**bad)


def test_init_warm_starts_checkpoint_zero_and_the_swarm_continues_its_schedule(
        corpus, tiny_run, tmp_path):
    swarm = SwarmConfig(rounds=4, inner_steps=10, warm_start=0.2, warm_start_batch=4)
    warm = swarm.warm_start_steps()
    assert warm == 10
    run = init_run(tmp_path / "warm", [corpus], preset="tiny", progress=False, swarm=swarm,
                   train_overrides={"total_steps": swarm.total_steps()})
    model, ck = run.load_model(0)
    ws = ck.meta["warm_start"]
    tcfg = run.config.train
    assert ck.meta["source"] == "warm start" and ck.meta["steps"] == warm == ws["steps"]
    assert ws["batch_size"] == 4 * tcfg.batch_size
    assert ws["tokens"] == ck.meta["tokens_trained"] == warm * 4 * tcfg.batch_size * tcfg.seq_len
    assert ws["seconds"] > 0 and ws["device"] == "cpu"
    # same corpus, preset and seed as tiny_run (which is not warm-started): better already
    cold = tiny_run.load_model(0)[1].meta
    assert cold["steps"] == 0 and "warm_start" not in cold
    assert ck.meta["val_loss"] < cold["val_loss"] - 0.1, (ck.meta["val_loss"], cold["val_loss"])

    coord = Coordinator(run, evaluate_rounds=False)
    try:
        vol = coord.authenticate(coord.join(JoinRequest(name="v", device="cpu",
                                                        api_version=1)).token)
        lease = coord.lease(vol, LeaseRequest()).lease
        assert lease.start_step == warm and lease.max_steps == 10
    finally:
        coord.close()

    out = export_model(run, tmp_path / "model", evaluate=False)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["training"]["warm_start"] == ws
    assert prov["compute"]["warm_start_tokens"] == ws["tokens"]
    card = (out / "README.md").read_text()
    assert "warm start (the run owner" in card and f"{ws['tokens']:,} tokens" in card
