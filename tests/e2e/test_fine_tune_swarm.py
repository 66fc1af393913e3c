"""Collaborative LoRA fine-tuning with real processes: a coordinator and two volunteers train
adapters on a pretrained folder's frozen base; only the adapters travel, the export merges them
and ships them in peft's format."""

from __future__ import annotations

import pytest
import torch
from swarm_helpers import Swarm

from crowdtrain.cli.processes import get_status
from crowdtrain.run.checkpoint import load_checkpoint
from crowdtrain.run.folder import Run, SwarmConfig, init_run
from crowdtrain.run.ledger import Ledger
from crowdtrain.run.lora import LoraSettings
from crowdtrain.run.model import count_params
from crowdtrain.run.train import evaluate
from crowdtrain.wire import codecs


def run_loss(run: Run, rnd: int) -> float:
    model, _ = run.load_model(rnd)
    return evaluate(model, run.val_windows(), torch.device("cpu"))


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
    update = run.update_path(3).stat().st_size
    assert update < 0.05 * full_fp32
    assert all(r["status"] == "accepted" for r in Ledger(run.ledger_path)
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
