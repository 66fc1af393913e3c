"""Distillation by a swarm of real processes (`init --teacher`): volunteers fetch the teacher
and learn from its logits; the student ends closer to the teacher than without it."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.export import export_model
from crowdtrain.publish.provenance import load_provenance


@pytest.mark.slow
def test_a_swarm_distils_its_teacher_into_a_student(teacher, corpus, tmp_path):
    """`init --teacher`: real volunteers fetch the teacher (sha256-checked) and learn from its
    logits; the swarm's student ends closer to the teacher than the same swarm, on the same
    tokens and tokenizer, without it; the export records the teacher."""
    from crowdtrain.cli.processes import LocalSwarm
    from crowdtrain.run.folder import SwarmConfig, init_run
    from crowdtrain.run.train import evaluate

    swarm = SwarmConfig(rounds=3, inner_steps=30, warm_start=0.0, min_contributions=2,
                        round_seconds=300, outer_lr=1.0, outer_momentum=0.0)
    loss, runs = {}, {}
    for case in ("teacher", "alone"):
        run = init_run(tmp_path / case, [corpus], preset="tiny", progress=False, swarm=swarm,
                       train_overrides={"total_steps": 90, "warmup_steps": 10},
                       **({"teacher": teacher} if case == "teacher" else
                          {"tokenizer": teacher / "tokenizer.json"}))
        with LocalSwarm(run.dir, tmp_path / f"{case}-logs") as s:
            s.serve()
            for name in ("v1", "v2"):
                s.join(name)
            for name in ("v1", "v2"):
                assert s.wait(name) == 0, s.log(name)
            assert ("downloaded the teacher" in s.log("v1")) == (case == "teacher")
            assert s.status().finished
        model, _ = run.load_model()
        loss[case], runs[case] = evaluate(model, run.val_windows(), torch.device("cpu")), run
    t = runs["teacher"].load_teacher()
    assert runs["alone"].load_teacher() is None and t.alpha == 0.9
    # both runs hold the same held-out windows: the teacher's loss on them is the target
    assert runs["teacher"].index.val == runs["alone"].index.val
    target = evaluate(t.model, runs["teacher"].val_windows(), torch.device("cpu"))
    assert target < loss["teacher"] < loss["alone"] - 0.03, (target, loss)
    out = export_model(runs["teacher"], tmp_path / "student", evaluate=False)
    rec = load_provenance(out)["training"]["teacher"]
    assert rec["sha256"] == runs["teacher"].config.teacher.sha256 and rec["name"] == "teacher"
    assert "distilled the teacher `teacher`" in (out / "README.md").read_text()
    # a worker that would ignore the teacher (API v1) is turned away; a damaged teacher stops
    # the coordinator at its start, in words
    from fastapi.testclient import TestClient

    from crowdtrain.coordinator.rules import Coordinator
    from crowdtrain.coordinator.server import create_app
    from crowdtrain.wire import protocol

    coord = Coordinator(runs["teacher"], evaluate_rounds=False)
    with TestClient(create_app(coord)) as c:
        assert c.get(protocol.INFO, headers={protocol.API_HEADER: "1"}).status_code == 426
        info = protocol.RunInfo.model_validate(c.get(protocol.INFO).json())
        assert info.teacher.sha256 == rec["sha256"] and info.teacher.alpha == 0.9
    coord.close()
    weights = runs["teacher"].model_dir / "teacher.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CrowdtrainError, match="does not match the sha256"):
        Coordinator(runs["teacher"], evaluate_rounds=False)
