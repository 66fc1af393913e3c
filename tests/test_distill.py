"""`crowdtrain distill`: a student trained on the teacher's logits ends closer to the teacher in
bits per byte than the same student trained on the same tokens without the teacher."""

from __future__ import annotations

import pytest
import torch
from publish_helpers import train_briefly

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.distill import DistillConfig, distill, split_texts
from crowdtrain.publish.export import export_model
from crowdtrain.publish.provenance import load_provenance


@pytest.fixture(scope="module")
def teacher(tiny_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("distill")
    run = train_briefly(tiny_run, base / "run", steps=200)
    return export_model(run, base / "teacher", evaluate=False)


def test_distillation_brings_the_student_closer_to_the_teacher(teacher, corpus, tmp_path):
    cfg = DistillConfig(preset="tiny", steps=100, alpha=0.9, temperature=1.0, seed=0)
    kd = distill(teacher, [corpus], cfg, out_dir=tmp_path / "student")
    alone = distill(teacher, [corpus], DistillConfig(preset="tiny", steps=100, alpha=0.0,
                                                     seed=0))
    assert kd.tokens == alone.tokens == 100 * 8 * 64  # same batches, same tokens
    assert kd.teacher.bits_per_byte == alone.teacher.bits_per_byte
    t = kd.teacher.bits_per_byte
    gap_kd, gap_alone = kd.student.bits_per_byte - t, alone.student.bits_per_byte - t
    assert 0 < gap_kd < gap_alone - 0.05, (t, kd.student.bits_per_byte,
                                           alone.student.bits_per_byte)
    # exported like any model
    from transformers import AutoModelForCausalLM

    out = kd.out_dir
    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert sum(p.numel() for p in m.parameters()) == kd.student_params
    prov = load_provenance(out)
    d = prov["distillation"]
    assert d["student"]["bits_per_byte"] == kd.student.bits_per_byte
    assert d["teacher"]["bits_per_byte"] == t and d["alpha"] == 0.9 and d["steps"] == 100
    assert d["student"]["bytes"] == (out / "model.safetensors").stat().st_size
    card = (out / "README.md").read_text()
    assert "## Distillation" in card and "- distillation" in card


def test_distill_cli_reports_student_and_teacher(teacher, corpus, tmp_path, capsys):
    from crowdtrain.cli.main import main

    code = main(["distill", str(teacher), "--preset", "tiny", "--data", str(corpus), "--out",
                 str(tmp_path / "s"), "--steps", "3", "-q", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "teacher: " in out and "student: " in out and "bits/byte" in out
    code = main(["distill", str(teacher), "--data", str(corpus), "--out", str(tmp_path / "s"),
                 "--steps", "3"])
    assert code == 2 and "not empty" in capsys.readouterr().err


def test_bad_settings_are_refused():
    with pytest.raises(CrowdtrainError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(CrowdtrainError, match="unknown preset"):
        DistillConfig(preset="huge")
    with pytest.raises(CrowdtrainError, match="too small"):
        split_texts(["x"], 0.1)
    train, val = split_texts(["a\n" * 50], 0.1)
    assert "".join(train + val) == "a\n" * 50 and val == ["a\n" * 4]  # cut after a newline


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


def test_a_distillation_run_refuses_settings_it_cannot_honour(teacher, corpus, tmp_path):
    from crowdtrain.run.folder import init_run
    from crowdtrain.run.lora import LoraSettings

    with pytest.raises(CrowdtrainError, match="drop --from-pretrained"):
        init_run(tmp_path / "a", [corpus], preset="tiny", teacher=teacher,
                 from_pretrained=teacher)
    with pytest.raises(CrowdtrainError, match="drop --lora"):
        init_run(tmp_path / "b", [corpus], preset="tiny", teacher=teacher, lora=LoraSettings())
    with pytest.raises(CrowdtrainError, match="--teacher .*not a folder"):
        init_run(tmp_path / "c", [corpus], preset="tiny", teacher=tmp_path / "nowhere")
    with pytest.raises(CrowdtrainError, match="alpha"):
        init_run(tmp_path / "d", [corpus], preset="tiny", teacher=teacher, distill_alpha=1.5,
                 progress=False)
    assert not (tmp_path / "d").exists()  # refused before anything was written
