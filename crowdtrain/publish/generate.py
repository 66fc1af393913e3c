"""Sample text from an exported Hugging Face model folder (`crowdtrain generate`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.model import load_pretrained


def generate_text(
    model_dir: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """Prompt + sampled continuation, decoded. The same seed gives the same text."""
    if max_new_tokens < 1:
        raise CrowdtrainError("--max-tokens must be at least 1")
    if temperature <= 0:
        raise CrowdtrainError("--temperature must be > 0")
    if top_k < 0:
        raise CrowdtrainError("--top-k must be >= 0 (0 disables it)")
    p = Path(model_dir)
    model = load_pretrained(p)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CrowdtrainError(f"cannot load the tokenizer in {p}: {e}") from None
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tok.eos_token_id]])
    limit = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, max(1, limit - ids.shape[1]))
    ids = ids[:, -(limit - max_new_tokens):]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, temperature=temperature, top_k=top_k or None,
                             max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                             else tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
