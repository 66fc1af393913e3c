"""A Llama model + our byte-level BPE tokenizer -> one GGUF file that llama.cpp and ollama run.

Written with the `gguf` package's GGUFWriter the way llama.cpp's `convert_hf_to_gguf.py` writes
a Llama: the same metadata keys and tensor names (the gguf package's table for a Llama,
`gguf.get_tensor_name_map`: `token_embd`, `blk.N.attn_q`, ...), the query
and key projections permuted for llama.cpp's interleaved rotary embedding, no `output.weight`
when the embeddings are tied (llama.cpp falls back to `token_embd`), and the tokenizer as a
"gpt2" byte-level BPE (tokens, token types, merges, special ids). Quantisation as
`convert_hf_to_gguf.py --outtype`: `f16` stores 2-D weights in float16, `q8_0` in 8-bit blocks of
32 with a float16 scale; 1-D norm weights stay float32, and a 2-D weight whose rows are not a
multiple of 32 falls back to float16.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from crowdtrain.errors import CrowdtrainError

QUANTS = ("q8_0", "f16")

@dataclass
class GgufInfo:
    path: Path
    bytes: int
    quant: str
    tensor_types: dict[str, int]  # GGML type name -> number of tensors


def gguf_name(hf_name: str, n_blocks: int) -> str:
    """The llama.cpp tensor name of weight `hf_name` of a HF Llama with `n_blocks` layers,
    from the gguf package's own table (`gguf.get_tensor_name_map`, which
    convert_hf_to_gguf.py names a Llama's tensors by)."""
    name = None
    if hf_name.endswith(".weight"):
        name = _llama_names(n_blocks).get_name(hf_name, try_suffixes=(".weight",))
    if name is None:
        raise CrowdtrainError(f"cannot map tensor {hf_name} to a llama.cpp name: only Llama "
                              "models export to GGUF")
    return name


@functools.cache
def _llama_names(n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split rotary layout -> llama.cpp's
    interleaved one (transformers' GGUF loader applies the inverse)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tokenizer_fields(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges as "a b") of a byte-level BPE tokenizer."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CrowdtrainError("only byte-level BPE tokenizers export to GGUF")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    tokens = [""] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    if any(t == "" for t in tokens):
        raise CrowdtrainError("the tokenizer's ids are not contiguous; cannot write GGUF")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    import gguf

    types = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL)
             for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _tensor_data(name: str, t: np.ndarray, quant: str):
    """(array, raw_dtype or None) to hand to GGUFWriter.add_tensor, as convert_hf_to_gguf does."""
    import gguf

    if t.ndim <= 1:
        return t.astype(np.float32), None
    if quant == "f16":
        return t.astype(np.float16), None
    try:
        return gguf.quants.quantize(t.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    except gguf.quants.QuantError:  # rows not a multiple of the block size (32)
        return t.astype(np.float16), None


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer, path: str | os.PathLike,
               quant: str = "q8_0", name: str = "crowdtrain", eot_id: int | None = None
               ) -> GgufInfo:
    """Write `model` (a transformers LlamaForCausalLM) and `tokenizer` as one GGUF file."""
    import gguf

    if quant not in QUANTS:
        raise CrowdtrainError(f"unknown GGUF quantisation {quant!r}: choose {' or '.join(QUANTS)}")
    cfg = model.config
    if cfg.model_type != "llama":
        raise CrowdtrainError(f"only Llama models export to GGUF, this one is {cfg.model_type}")
    path = Path(path)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise CrowdtrainError(f"rope type {rope.get('rope_type')!r} is not supported in GGUF "
                              "export")
    tokens, types, merges = tokenizer_fields(tokenizer)
    if len(tokens) != cfg.vocab_size:
        raise CrowdtrainError(f"the tokenizer has {len(tokens)} tokens but the model "
                              f"{cfg.vocab_size}")
    eot = cfg.eos_token_id if eot_id is None else eot_id

    w = gguf.GGUFWriter(None, "llama")
    w.add_name(name)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0"
                        else gguf.LlamaFileType.MOSTLY_F16))
    if quant == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if eot is not None:
        w.add_bos_token_id(int(eot))
        w.add_eos_token_id(int(eot))
        w.add_pad_token_id(int(eot))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    counts: dict[str, int] = {}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf, p in model.state_dict().items():
        if hf == "lm_head.weight" and tied:
            continue
        if "rotary_emb" in hf:
            continue
        t = p.detach().to("cpu", torch.float32).numpy()
        if hf.endswith("self_attn.q_proj.weight"):
            t = permute_qk(t, n_head)
        elif hf.endswith("self_attn.k_proj.weight"):
            t = permute_qk(t, n_kv)
        data, raw = _tensor_data(hf, t, quant)
        if raw is None:
            w.add_tensor(gguf_name(hf, cfg.num_hidden_layers), data)
            kind = "F32" if data.dtype == np.float32 else "F16"
        else:
            w.add_tensor(gguf_name(hf, cfg.num_hidden_layers), data, raw_dtype=raw)
            kind = raw.name
        counts[kind] = counts.get(kind, 0) + 1
    tmp = path.with_name(f".{path.name}.tmp")
    try:  # written beside, then renamed: a crash never leaves a half-written .gguf
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return GgufInfo(path, path.stat().st_size, quant, counts)
