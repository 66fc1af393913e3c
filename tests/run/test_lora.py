"""Collaborative fine-tuning: a run started from a local pretrained folder, trained by the swarm
either in full or as LoRA adapters (peft). The pretrained model is made here: a tiny Llama
trained briefly on Shakespeare and saved with `save_pretrained` + a tokenizer.json; the new
data is different text (this package's Python source). LoRA's layer choice is checked on small
random models of six open families (tests/families.py), loaded as a download would be."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, make_family

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.checkpoint import load_checkpoint
from crowdtrain.run.folder import PRETRAINED, init_run
from crowdtrain.run.lora import (
    LoraSettings,
    is_lora,
    merge,
    parse_targets,
    resolve_targets,
    save_adapter,
    wrap,
)
from crowdtrain.run.model import state_dict_for_save

# what "default" and "all-linear" resolve to on each family
DEFAULTS = {"llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
            "mistral": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"),
            "phi3": ("qkv_proj",), "gpt2": ("c_attn",)}
LLAMA_LIKE = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
ALL_LINEAR = {"llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "mistral": LLAMA_LIKE,
              "gemma": LLAMA_LIKE, "phi3": ("down_proj", "gate_up_proj", "o_proj", "qkv_proj"),
              "gpt2": ("c_attn", "c_fc", "c_proj")}


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("families")
    return {name: make_family(name, root / name) for name in FAMILIES}


def load(folder) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def linear_layers(model: torch.nn.Module) -> set[str]:
    """Every nn.Linear / Conv1D of a plain model but its output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}


def adapted(model: torch.nn.Module, targets: tuple[str, ...]) -> set[str]:
    return {n for n in linear_layers(model)
            if any(n == t or n.endswith("." + t) for t in targets)}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_settings_take_default_all_linear_or_names():
    assert LoraSettings().targets == ("default",)
    assert parse_targets("default") == ("default",)
    assert parse_targets("all-linear") == parse_targets(" all ") == ("all-linear",)
    assert parse_targets(" q_proj, self_attn.v_proj ,") == ("q_proj", "self_attn.v_proj")
    for bad in ("", " , ", "q_proj,q_proj", "default,q_proj", "q_proj,all-linear", "q proj",
                "q_proj,attn!", "model..q_proj"):
        with pytest.raises(CrowdtrainError, match="invalid LoRA targets .* give 'default', "
                                                  "'all-linear' or comma-separated"):
            parse_targets(bad)
    for bad in ((), "q_proj", ("q_proj", "q_proj"), ("all-linear", "q_proj"), ("a b",), (1,)):
        with pytest.raises(CrowdtrainError, match="invalid lora setting.*targets"):
            LoraSettings(targets=bad)
    # a run.json of an older version (JSON lists) still loads; to_dict goes back to it
    old = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    s = LoraSettings(**old)
    assert s.targets == ("q_proj", "v_proj") and s.to_dict() == old
    assert LoraSettings(**LoraSettings(targets=("all-linear",)).to_dict()).targets == (
        "all-linear",)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_default_and_all_linear_resolve_to_the_familys_layers(family_folders, name):
    model = load(family_folders[name])
    default = resolve_targets(LoraSettings(rank=4), model)
    assert default == LoraSettings(rank=4, targets=DEFAULTS[name])
    everything = resolve_targets(LoraSettings(targets=("all-linear",)), model)
    assert everything.targets == ALL_LINEAR[name]
    assert adapted(model, everything.targets) == linear_layers(model)
    # concrete names resolve to themselves, sorted, and a model is not changed by resolving
    assert resolve_targets(LoraSettings(targets=everything.targets[::-1]), model) == everything
    assert not is_lora(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.filterwarnings("ignore:.is_gradient_checkpointing. is deprecated:FutureWarning")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapters_train_merge_and_export_on_every_family(family_folders, name, tmp_path):
    from peft import PeftModel

    settings = LoraSettings(rank=4, targets=("all-linear",))
    plain = load(family_folders[name])
    layers = linear_layers(plain)
    ids = torch.randint(0, plain.config.vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(0))
    before = logits(plain, ids)
    model = wrap(plain, settings, seed=3)
    assert is_lora(model)
    # only the adapters train, and every linear layer but the head has one
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with_adapter = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
                    if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert with_adapter == layers
    # GPT-2's Conv1D keeps its weight transposed: peft must know (and not have to guess)
    assert model.peft_config["default"].fan_in_fan_out == (name == "gpt2")
    assert torch.allclose(logits(model, ids), before, atol=1e-6)  # B starts at zero

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained = logits(model, ids)
    assert (trained - before).abs().max() > 1e-3

    out = save_adapter(model, tmp_path / "adapter", base_name=f"tiny-{name}")
    merged = merge(model)
    assert not is_lora(merged) and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, ids), trained, atol=1e-5, rtol=1e-5)
    # the exported adapter on a fresh copy of the base gives the trained model
    again = PeftModel.from_pretrained(load(family_folders[name]), str(out)).eval()
    torch.testing.assert_close(logits(again, ids), trained, atol=1e-5, rtol=1e-5)


def test_a_name_that_is_no_linear_layer_fails_with_the_models_layers(family_folders):
    llama, gpt2 = load(family_folders["llama"]), load(family_folders["gpt2"])
    with pytest.raises(CrowdtrainError, match=r"LoRA target\(s\) attn name no linear layer of "
                       r"this llama model .*choose from down_proj,gate_proj,k_proj,o_proj,"
                       r"q_proj,up_proj,v_proj, or 'default' or 'all-linear'$"):
        resolve_targets(LoraSettings(targets=("q_proj", "attn")), llama)
    with pytest.raises(CrowdtrainError, match=r"q_proj,v_proj name no linear layer of this "
                       r"gpt2 model .*choose from c_attn,c_fc,c_proj,"):
        resolve_targets(LoraSettings(targets=("q_proj", "v_proj")), gpt2)
    for bad in ("lm_head", "mlp", "self_attn", "layers"):  # the head; not linear layers
        with pytest.raises(CrowdtrainError, match=f"{bad} name no linear layer"):
            resolve_targets(LoraSettings(targets=(bad,)), llama)
    # a longer suffix is a name too
    assert resolve_targets(LoraSettings(targets=("mlp.c_proj",)), gpt2).targets == (
        "mlp.c_proj",)
    wrapped = wrap(llama, LoraSettings(targets=("self_attn.q_proj",)))
    with pytest.raises(CrowdtrainError, match="before wrapping"):
        resolve_targets(LoraSettings(), wrapped)


def test_an_old_runs_names_give_the_same_adapters_as_the_default(family_folders):
    old = wrap(load(family_folders["llama"]), LoraSettings(targets=["q_proj", "v_proj"]), seed=1)
    new = wrap(load(family_folders["llama"]), LoraSettings(), seed=1)
    a, b = state_dict_for_save(old), state_dict_for_save(new)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


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
    with pytest.raises(CrowdtrainError, match=r"invalid lora setting\(s\): rank, targets"):
        LoraSettings(rank=0, targets=("q_proj", "q_proj"))
    from crowdtrain.cli.main import main

    assert main(["init", str(tmp_path / "d"), "--data", str(new_text), "--from-pretrained",
                 str(pretrained), "--lora-targets", "q_proj,attn!"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid LoRA targets 'q_proj,attn!'") and err.count("\n") == 1
    assert not (tmp_path / "d").exists()
