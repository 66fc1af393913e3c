"""Collaborative fine-tuning: a run started from a local pretrained folder, trained by the swarm
either in full or as LoRA adapters (peft). The pretrained model is made here: a tiny Llama
trained briefly on Shakespeare and saved with `save_pretrained` + a tokenizer.json; the new
data is different text (this package's Python source)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from swarm_helpers import Swarm

from crowdtrain.cli.processes import get_status
from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.checkpoint import load_checkpoint
from crowdtrain.run.data import DataConfig, get_batch, train_tokenizer
from crowdtrain.run.folder import PRETRAINED, Run, SwarmConfig, init_run
from crowdtrain.run.ledger import Ledger
from crowdtrain.run.lora import LoraSettings
from crowdtrain.run.model import build_model, count_params, preset_config, state_dict_for_save
from crowdtrain.run.train import InnerLoop, TrainConfig, evaluate
from crowdtrain.wire import codecs


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus) -> Path:
    """A tiny Llama trained for a few steps on Shakespeare, saved as a Hugging Face folder."""
    import numpy as np

    d = tmp_path_factory.mktemp("pretrained") / "tiny-shakespeare"
    tok = train_tokenizer([corpus], DataConfig(vocab_size=512))
    eot = tok.token_to_id("<|endoftext|>")
    model = build_model(preset_config("tiny", tok.get_vocab_size(), eot), seed=1)
    ids = np.asarray(tok.encode(corpus.read_text(encoding="utf-8")[:60_000]).ids, np.uint16)
    tcfg = TrainConfig(batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, total_steps=60)
    InnerLoop(model, tcfg, torch.device("cpu")).run(
        lambda step: get_batch([ids], 8, 64, 0, step), 0, 60)
    model.save_pretrained(str(d))
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def new_text(tmp_path_factory) -> Path:
    """Different text from the pretraining data: Python source (~120 kB)."""
    src = Path(__file__).resolve().parents[1] / "crowdtrain"
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(src.glob("*.py")))[:120_000]
    p = tmp_path_factory.mktemp("newdata") / "code.txt"
    p.write_text(text, encoding="utf-8")
    return p


def run_loss(run: Run, rnd: int) -> float:
    model, _ = run.load_model(rnd)
    return evaluate(model, run.val_windows(), torch.device("cpu"))


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


@pytest.mark.slow
def test_lora_fine_tuning_swarm_end_to_end(pretrained, new_text, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from crowdtrain.publish.export import export_model

    lora = LoraSettings(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    run = init_run(tmp_path / "lora", [new_text], preset="tiny", from_pretrained=pretrained,
                   lora=lora, progress=False,
                   train_overrides={"lr": 1e-2, "warmup_steps": 5, "total_steps": 80},
                   swarm=SwarmConfig(inner_steps=20, rounds=4, round_seconds=90,
                                     min_contributions=2))
    assert run.config.lora == lora and run.base_path.is_file()
    full_params = count_params(AutoModelForCausalLM.from_pretrained(str(pretrained),
                                                                    local_files_only=True))
    s = Swarm(run, tmp_path)
    try:
        s.serve()
        for name in ("ann", "ben"):
            s.join(name)
        for name in ("ann", "ben"):
            assert s.wait(name) == 0, s.log(name)
            assert "the run finished at round 4" in s.log(name)
            assert "downloaded the base weights" in s.log(name)
        st = get_status(s.url)
    finally:
        s.stop()
    assert st.finished and st.params == full_params
    # only the adapters travel: each contribution is under 5% of the full model's fp32 bytes
    # (and under 10% of what a full-model int8 contribution would be)
    per_round = [r.bytes_in / r.contributions for r in st.rounds if r.contributions]
    assert len(per_round) == 4 and sum(r.contributions for r in st.rounds) == 8
    full_fp32, full_int8 = 4 * full_params, codecs.payload_bytes(full_params, "int8")
    assert all(b < 0.05 * full_fp32 and b < 0.10 * full_int8 for b in per_round), \
        (per_round, full_fp32)
    update = (run.dir / "updates" / "update-000003.safetensors").stat().st_size
    assert update < 0.05 * full_fp32
    assert all(r["status"] == "accepted" for r in Ledger(run.dir / "ledger.sqlite")
               .contributions())
    # the frozen base never moved; the held-out loss on the new text fell
    from crowdtrain.run.lora import base_sha256

    assert base_sha256(run.base_path) == run.config.base_sha256
    assert all("lora_" in k for k in load_checkpoint(run.ckpt_dir, 4).tensors)
    first, last = run_loss(run, 0), run_loss(run, 4)
    assert last < first - 0.1, (first, last)  # deterministic evaluation: a real fall
    print(f"LoRA: {per_round[-1]:.0f} bytes per contribution vs full model {full_fp32:,} fp32 "
          f"/ {full_int8:,} int8; held-out loss {first:.4f} -> {last:.4f}")
    # export: the merged model plus the adapter in peft's format, which gives the same logits
    out = export_model(run, tmp_path / "export", evaluate=False)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(str(pretrained), local_files_only=True)
    peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.tensor([run.tokenizer.encode("def load_into(model, tensors):\n").ids])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, peft(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    with torch.no_grad(), peft.disable_adapter():
        c = peft(input_ids=ids).logits
    assert (a - c).abs().max() > 1e-3  # the adapter changed the model
