"""Model presets build real transformers Llama models of the promised sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.model import (
    PRESETS,
    build_model,
    count_params,
    load_into,
    preset_config,
    state_dict_for_save,
)


@pytest.mark.parametrize("name,low,high", [("tiny", 50_000, 1_000_000),
                                           ("small", 3_000_000, 10_000_000),
                                           ("base", 90_000_000, 160_000_000)])
def test_presets_have_promised_sizes(name, low, high):
    cfg = preset_config(name, PRESETS[name].vocab_size, eot_id=0)
    with torch.device("meta"):  # count without allocating the base model
        model = build_model(cfg)
    assert isinstance(model, LlamaForCausalLM)
    assert low <= count_params(model) <= high


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(CrowdtrainError, match="unknown preset 'huge'.*tiny, small, base"):
        preset_config("huge", 512, 0)


def test_same_seed_same_weights_and_state_dict_round_trip():
    cfg = preset_config("tiny", 512, 0)
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    sa, sb, sc = state_dict_for_save(a), state_dict_for_save(b), state_dict_for_save(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert "lm_head.weight" not in sa  # tied to the embeddings, stored once
    load_into(c, sa)
    assert all(torch.equal(sa[k], v) for k, v in state_dict_for_save(c).items())
    x = torch.randint(0, 512, (1, 16))
    assert torch.equal(a(input_ids=x).logits, c(input_ids=x).logits)


def test_a_hub_id_resolves_from_the_local_cache_and_never_downloads_unasked(tmp_path,
                                                                          monkeypatch):
    """`huggingface-cli download ORG/NAME` leaves models--ORG--NAME/snapshots/REV/ and
    refs/main in the cache; an id found there is that snapshot folder, one that is not there
    is a one-line error that says how to get it (nothing is fetched without --download)."""
    import shutil

    from families import make_family

    from crowdtrain.run.model import load_config, load_pretrained, resolve_source, source_dtype

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--community--tiny-qwen2"
    snap = make_family("qwen2", repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    folder, hub_id = resolve_source("community/tiny-qwen2")
    assert folder.resolve() == snap.resolve() and hub_id == "community/tiny-qwen2"
    model = load_pretrained(folder)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights
    assert source_dtype(load_config(folder)) == "bfloat16"  # what the files hold: the export's
    with pytest.raises(CrowdtrainError, match="huggingface-cli download community/absent"):
        resolve_source("community/absent")
    shutil.rmtree(repo)
    local = make_family("gpt2", tmp_path / "gpt2")
    assert resolve_source(local) == (local, None)
    with pytest.raises(CrowdtrainError, match="--from-pretrained .*nothing-here: not a folder"):
        resolve_source(tmp_path / "nothing-here")
