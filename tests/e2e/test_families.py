"""Swarm fine-tuning of the open families people download, with real processes: for Llama (with
a `</s>` end of sequence), Qwen2, Mistral, Gemma, Phi-3 and GPT-2, a small random model saved
as a Hub download looks (sharded bf16 safetensors, its own tokenizer and special tokens:
tests/families.py) goes through init, serve, two worker processes, two rounds and export. The
export loads with AutoModelForCausalLM in the source's family and dtype and gives the run's
final logits; it ships the source's tokenizer files unchanged; `verify` replays it; the
held-out loss fell. A LoRA variant runs for two families (Qwen2, and GPT-2's Conv1D layers)."""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, make_family
from swarm_helpers import run_to_end

from crowdtrain.run.folder import Run, SwarmConfig, init_run
from crowdtrain.run.lora import LoraSettings
from crowdtrain.run.train import evaluate

CASES = [(name, False) for name in FAMILIES] + [("qwen2", True), ("gpt2", True)]


@pytest.fixture(scope="module")
def text(tmp_path_factory, corpus):
    """~60 kB of the test corpus: enough for two short rounds and a held-out split."""
    t = corpus.read_text(encoding="utf-8")[:60_000]
    p = tmp_path_factory.mktemp("families") / "text.txt"
    p.write_text(t[: t.rfind("\n") + 1], encoding="utf-8")
    return p


def held_out(run: Run, rnd: int) -> float:
    model, _ = run.load_model(rnd)
    return evaluate(model, run.val_windows(), torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "lora"), CASES,
                         ids=[f"{f}-lora" if lo else f for f, lo in CASES])
def test_a_family_fine_tunes_on_the_swarm_and_exports_in_its_own_family(
        family, lora, text, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crowdtrain.publish.export import export_model
    from crowdtrain.publish.verify import verify_model

    src = make_family(family, tmp_path / f"tiny-{family}")
    assert len(list(src.glob("model-0000*-of-*.safetensors"))) > 1  # sharded, as downloaded
    run = init_run(tmp_path / "run", [text], preset="tiny", from_pretrained=src,
                   lora=LoraSettings(rank=4, alpha=8) if lora else None, progress=False,
                   train_overrides={"lr": 1e-2 if lora else 3e-3, "warmup_steps": 2,
                                    "total_steps": 12, "batch_size": 4, "seq_len": 64},
                   swarm=SwarmConfig(inner_steps=6, rounds=2, round_seconds=90,
                                     min_contributions=2, warm_start=0))
    source = run.config.source
    assert source.model_type == family and source.dtype == "bfloat16"
    assert run.config.base_model == f"tiny-{family}" and run.index.eot_id == \
        json.loads((src / "config.json").read_text())["eos_token_id"]
    run_to_end(run, tmp_path)  # a coordinator and two worker processes, two rounds
    first, last = held_out(run, 0), held_out(run, 2)
    assert last < first - 0.05, (first, last)

    out = export_model(run, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        if (src / name).is_file():  # the source's tokenizer, special tokens, chat template
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    exported = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert type(exported).__name__ == json.loads((src / "config.json").read_text())[
        "architectures"][0]
    assert next(exported.parameters()).dtype == torch.bfloat16
    final, _ = run.load_model(2)
    if lora:
        assert (out / "adapter" / "adapter_config.json").is_file()
        from crowdtrain.run.lora import merge

        final = merge(final)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tok("The swarm merges what volunteers send.")["input_ids"]])
    with torch.no_grad():
        want = final.eval()(input_ids=ids).logits
        got = exported.float().eval()(input_ids=ids).logits
    # bf16 weights: ~3 significant digits each; logits of a tiny model stay within 0.1
    assert (want - got).abs().max() < 0.1, (want - got).abs().max()
    report = verify_model(out, run.dir)
    assert report.ok, report.failure
    card = (out / "README.md").read_text()
    assert f"tiny-{family}" in card and f"license: {FAMILIES[family].license}" in card
    from crowdtrain.publish.evaluate import evaluate_model
    from crowdtrain.publish.generate import generate_text

    assert evaluate_model(out, [text]).tokens > 1000  # `crowdtrain eval` on the export
    sample = generate_text(out, "The swarm", max_new_tokens=8)
    assert sample.startswith("The swarm")  # the prompt, then what the model sampled
    if not lora:
        check_gguf(run, family, want, ids, tmp_path)


def check_gguf(run: Run, family: str, want: torch.Tensor, ids: torch.Tensor, tmp_path) -> None:
    """The Llama family (Llama, Mistral, Qwen2) exports to GGUF that transformers' GGUF loader
    reads back with the run's logits within q8_0's tolerance; any other family gets one line
    saying which are supported."""
    from transformers import AutoModelForCausalLM

    from crowdtrain.errors import CrowdtrainError
    from crowdtrain.publish.export import export_model

    if family not in ("llama", "mistral", "qwen2"):
        with pytest.raises(CrowdtrainError, match="supports llama, mistral and qwen2"):
            export_model(run, tmp_path / "gguf", fmt="gguf", evaluate=False)
        return
    out = export_model(run, tmp_path / "gguf", fmt="gguf", evaluate=False)
    (path,) = out.glob("*.gguf")
    g = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        got = g.eval()(input_ids=ids).logits
    err = float((want - got).abs().max())
    assert err < 0.08 * float(want.abs().max()), (err, float(want.abs().max()))
