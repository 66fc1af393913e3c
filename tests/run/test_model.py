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
