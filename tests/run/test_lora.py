"""Collaborative fine-tuning: a run started from a local pretrained folder, trained by the swarm
either in full or as LoRA adapters (peft). The pretrained model is made here: a tiny Llama
trained briefly on Shakespeare and saved with `save_pretrained` + a tokenizer.json; the new
data is different text (this package's Python source)."""

from __future__ import annotations

import json

import pytest
import torch

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.checkpoint import load_checkpoint
from crowdtrain.run.folder import PRETRAINED, init_run
from crowdtrain.run.lora import LoraSettings
from crowdtrain.run.model import state_dict_for_save


def test_full_fine_tune_starts_from_the_pretrained_weights_and_tokenizer(pretrained, new_text,
                                                                         tmp_path):
    from transformers import AutoModelForCausalLM

    run = init_run(tmp_path / "full", [new_text], preset="tiny", from_pretrained=pretrained,
                   progress=False, train_overrides={"total_steps": 20})
    assert run.config.preset == PRETRAINED and run.config.base_model == pretrained.name
    assert run.config.lora is None and not run.base_path.exists()
    assert run.tokenizer_path.read_text() == (pretrained / "tokenizer.json").read_text()
    hf = AutoModelForCausalLM.from_pretrained(str(pretrained), local_files_only=True)
    ck = load_checkpoint(run.ckpt_dir, 0).tensors
    want = state_dict_for_save(hf)
    assert set(ck) == set(want) and all(torch.equal(ck[k], want[k]) for k in want)
    assert run.model_config().hidden_size == hf.config.hidden_size


def test_fine_tune_settings_are_checked(pretrained, new_text, tmp_path, capsys):
    with pytest.raises(CrowdtrainError, match="--from-pretrained"):
        init_run(tmp_path / "a", [new_text], lora=LoraSettings(), progress=False)
    with pytest.raises(CrowdtrainError, match="own tokenizer"):
        init_run(tmp_path / "b", [new_text], from_pretrained=pretrained, vocab_size=300,
                 progress=False)
    with pytest.raises(CrowdtrainError, match="invalid lora setting"):
        LoraSettings(rank=0, targets=("q_proj", "lm_head"))
    with pytest.raises(CrowdtrainError, match="unknown LoRA target"):
        LoraSettings.parse_targets("q_proj,attn")
    assert LoraSettings.parse_targets("all")[-1] == "down_proj"
    from crowdtrain.cli.main import main

    assert main(["init", str(tmp_path / "d"), "--data", str(new_text), "--from-pretrained",
                 str(pretrained), "--lora-targets", "q_proj,attn"]) == 2
    assert "error: unknown LoRA target(s) attn" in capsys.readouterr().err
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CrowdtrainError, match="Llama-architecture"):
        init_run(tmp_path / "c", [new_text], from_pretrained=gpt, progress=False)


