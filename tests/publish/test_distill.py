"""`crowdtrain distill`: a student trained on the teacher's logits ends closer to the teacher in
bits per byte than the same student trained on the same tokens without the teacher."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.distill import DistillConfig, distill, split_texts
from crowdtrain.publish.provenance import read_provenance


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
    d = read_provenance(out).distillation
    assert d.student.bits_per_byte == kd.student.bits_per_byte
    assert d.teacher.bits_per_byte == t and d.alpha == 0.9 and d.steps == 100
    assert d.student.bytes == (out / "model.safetensors").stat().st_size
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


@pytest.mark.parametrize("student", ["preset", "gemma-config"])
def test_a_teacher_of_any_family_distils_into_a_preset_or_any_architecture(student, corpus,
                                                                           tmp_path):
    """A Qwen2 teacher (its own tokenizer and special tokens, no bos) distils into a preset
    Llama or, from a config.json, a Gemma student; the student ships the teacher's tokenizer
    files unchanged and its special ids, and loads with AutoModelForCausalLM."""
    import json

    from families import FAMILIES, make_config, make_family
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = make_family("qwen2", tmp_path / "tiny-qwen2")
    cfg = DistillConfig(steps=6, batch_size=4, seq_len=32)
    if student == "gemma-config":
        c = make_config(FAMILIES["gemma"], 64, None, 1, None)
        (tmp_path / "student.json").write_text(c.to_json_string())
        cfg = DistillConfig(steps=6, batch_size=4, seq_len=32,
                            student_config=str(tmp_path / "student.json"))
    res = distill(teacher, [corpus], cfg, tmp_path / "student")
    out = res.out_dir
    model = AutoModelForCausalLM.from_pretrained(str(out))
    want = "GemmaForCausalLM" if student == "gemma-config" else "LlamaForCausalLM"
    assert type(model).__name__ == want
    tconf = json.loads((teacher / "config.json").read_text())
    assert model.config.vocab_size == tconf["vocab_size"]
    assert model.config.eos_token_id == tconf["eos_token_id"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (teacher / name).read_bytes()
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "<|endoftext|>"
    assert res.student.tokens > 0 and res.teacher.tokens == res.student.tokens


def test_a_swarm_distillation_run_takes_a_teacher_of_any_family(corpus, tmp_path):
    """`init --teacher` with a Qwen2 teacher: a preset Llama student with the teacher's
    vocabulary and special tokens; the run frames documents with the teacher's eos and the
    export ships the teacher's tokenizer files unchanged."""
    from families import make_family
    from transformers import AutoModelForCausalLM

    from crowdtrain.publish.export import export_model
    from crowdtrain.run.folder import SwarmConfig, init_run

    teacher = make_family("qwen2", tmp_path / "tiny-qwen2")
    run = init_run(tmp_path / "run", [corpus], preset="tiny", teacher=teacher, progress=False,
                   swarm=SwarmConfig(warm_start=0.05, rounds=2, inner_steps=5))
    eos = AutoModelForCausalLM.from_pretrained(str(teacher)).config.eos_token_id
    assert run.config.teacher.name == "tiny-qwen2" and run.index.eot_id == eos
    cfg = run.model_config()
    assert cfg.model_type == "llama" and cfg.eos_token_id == eos
    assert run.specials().chat_template is not None  # the teacher's, kept for the export
    out = export_model(run, tmp_path / "student", evaluate=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (teacher / name).read_bytes()
