"""A Llama, Mistral or Qwen2 model + its byte-level BPE tokenizer -> one GGUF file that llama.cpp
and ollama run.

Written with the `gguf` package's GGUFWriter the way llama.cpp's `convert_hf_to_gguf.py` writes
these architectures:

- llama and mistral (`LlamaModel` in the converter; a Hugging Face MistralForCausalLM is written
  as architecture "llama" too): the `llama.*` metadata (with `vocab_size` and the rope dimension
  count), the query and key projections permuted for llama.cpp's interleaved rotary embedding
  (the key with the key-value head count under grouped-query attention). Like the converter, a
  Mistral's sliding window is not written: llama.cpp's llama architecture attends over the whole
  context, which is the same model for sequences no longer than the window.
- qwen2 (`Qwen2Model`): architecture "qwen2", its `qwen2.*` metadata, the q/k/v biases, and no
  permutation (llama.cpp runs Qwen2 with the half-split "neox" rotary layout HF uses).

Tensor names come from the gguf package's table for the architecture
(`gguf.get_tensor_name_map`: `token_embd`, `blk.N.attn_q`, ...); there is no `output.weight`
when the embeddings are tied (llama.cpp falls back to `token_embd`).

The tokenizer is written as a "gpt2" byte-level BPE: tokens by id, token types (the tokenizer's
special added tokens, and ones that look like `<|...|>`, as CONTROL; other added tokens as
USER_DEFINED), merges, the bos/eos/pad (and unk) ids, whether a bos/eos token is added, and the
chat template. A vocabulary shorter than the model's embedding rows is padded with `[PAD{id}]`
tokens of type UNUSED, as the converter does. The pre-tokenizer type ("tokenizer.ggml.pre") is
recognised from the tokenizer's own splitting rule (GPT-2's, Llama 3's or Qwen2's); the converter
recognises it by hashing a known model's token ids and refuses a vocabulary it does not know, so
for a tokenizer we cannot name this refuses too rather than write a wrong split.

Quantisation as `convert_hf_to_gguf.py --outtype`: `f16` stores 2-D weights in float16, `q8_0` in
8-bit blocks of 32 with a float16 scale; 1-D weights (norms, biases) stay float32, and a 2-D
weight whose rows are not a multiple of 32 falls back to float16.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from crowdtrain.errors import CrowdtrainError

QUANTS = ("q8_0", "f16")
# transformers model_type -> GGUF architecture, as convert_hf_to_gguf.py registers them
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED = {"llama"}  # GGUF architectures whose q/k rows llama.cpp wants interleaved
_CONVERT = "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py"

# the splitting rules llama.cpp implements for a byte-level BPE, by "tokenizer.ggml.pre" name
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_GPT2_SPLIT: "gpt-2", _LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class GgufInfo:
    path: Path
    bytes: int
    quant: str
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    arch: str = "llama"  # the GGUF architecture written


def gguf_name(hf_name: str, n_blocks: int, arch: str = "llama") -> str:
    """The llama.cpp tensor name of weight or bias `hf_name` of a HF model of GGUF architecture
    `arch` with `n_blocks` layers, from the gguf package's own table
    (`gguf.get_tensor_name_map`, which convert_hf_to_gguf.py names tensors by)."""
    name = _names(arch, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CrowdtrainError(f"cannot map tensor {hf_name} to a llama.cpp {arch} tensor: "
                              f"{_CONVERT}")
    return name


@functools.cache
def _names(arch: str, n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split rotary layout -> llama.cpp's
    interleaved one, per head (`n_head` is the key-value head count for the key projection;
    transformers' GGUF loader applies the inverse). Works on a weight or a bias."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _backend(tokenizer: Any) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a Tokenizer or of a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(backend, Tokenizer):
        raise CrowdtrainError("GGUF export needs a fast (tokenizer.json) tokenizer: "
                              f"{_CONVERT}")
    return backend


def pre_tokenizer_type(tokenizer: Any) -> str:
    """llama.cpp's name ("tokenizer.ggml.pre") for the way a byte-level BPE tokenizer splits
    text before merging: "gpt-2", "llama-bpe" or "qwen2"."""
    spec = json.loads(_backend(tokenizer).to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        split = _GPT2_SPLIT
        if steps[0].get("add_prefix_space"):
            split = None  # llama.cpp never prepends a space
    elif (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
          and not steps[1].get("add_prefix_space")
          and str(steps[0].get("behavior", "")).lower() == "isolated"):
        split = steps[0].get("pattern", {}).get("Regex")
    name = PRE_TOKENIZERS.get(split) if split is not None else None
    if name is None:
        raise CrowdtrainError(f"the tokenizer splits text in a way llama.cpp does not know "
                              f"({'+'.join(map(str, kinds)) or 'no pre-tokenizer'}): {_CONVERT}")
    return name


def tokenizer_fields(tokenizer: Any, vocab_size: int | None = None
                     ) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges as "a b") of a byte-level BPE tokenizer,
    padded to `vocab_size` tokens with `[PAD{id}]` (type UNUSED) as convert_hf_to_gguf.py pads
    a vocabulary shorter than the model's embedding."""
    import gguf

    backend = _backend(tokenizer)
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CrowdtrainError(f"GGUF export supports byte-level BPE tokenizers; this one is "
                              f"{model.get('type') or 'unknown'}: {_CONVERT}")
    decoder = spec.get("decoder") or {}
    if "ByteLevel" not in json.dumps(decoder):
        raise CrowdtrainError(f"GGUF export supports byte-level BPE tokenizers; this BPE "
                              f"decodes with {decoder.get('type')}: {_CONVERT}")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise CrowdtrainError(f"the tokenizer normalizes text ({normalizer}), which llama.cpp "
                              f"does not: {_CONVERT}")
    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    size = n if vocab_size is None else vocab_size
    if n > size:
        raise CrowdtrainError(f"the tokenizer has ids up to {n - 1} but the model only "
                              f"{size} embeddings: export the model with its own tokenizer")
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        if tok not in added:
            types[i] = int(gguf.TokenType.NORMAL)
        elif added[tok].get("special") or (tok.startswith("<|") and tok.endswith("|>")):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            types[i] = int(gguf.TokenType.USER_DEFINED)
    # a space inside a merge part (transformers >= 4.45's list form) as the converter encodes it
    merges = [m if isinstance(m, str)
              else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m)
              for m in model.get("merges", [])]
    return tokens, types, merges


def _first(value: Any) -> int | None:
    """A config's token id (an int, or a list of ids such as Llama 3's eos) -> one int."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _adds_specials(backend: Tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """(adds bos, adds eos): whether the tokenizer puts them around a text by itself."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a").ids
    extra = len(full) > len(plain)
    return (extra and bos is not None and full[0] == bos,
            extra and eos is not None and full[-1] == eos)


def _tensor_data(t: np.ndarray, quant: str):
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


def _check_config(cfg: Any) -> tuple[str, float]:
    """(GGUF architecture, rope theta) of a model config this module can write, or why not."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise CrowdtrainError(f"GGUF export supports llama, mistral and qwen2 models; this is a "
                              f"{model_type} model: {_CONVERT}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CrowdtrainError(f"GGUF export writes plain rotary embeddings; this model's rope "
                              f"scaling is {rope_type!r}: {_CONVERT}")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    return ARCHITECTURES[model_type], float(theta if theta is not None else 10000.0)


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike,
               quant: str = "q8_0", name: str = "crowdtrain", eot_id: int | None = None, *,
               bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
               add_bos: bool | None = None, chat_template: str | None = None) -> GgufInfo:
    """Write `model` (a transformers Llama, Mistral or Qwen2 causal LM) and `tokenizer` (its
    byte-level BPE: a `tokenizers.Tokenizer` or a transformers fast tokenizer) as one GGUF file.

    Special ids: `eot_id` (our runs' `<|endoftext|>`) means bos = eos = pad = `eot_id` and no
    bos added; `bos_id`, `eos_id`, `pad_id` and `add_bos` take precedence when given. Otherwise
    they come from a transformers tokenizer's own settings, then the model's config, and
    whether bos/eos are added is read off the tokenizer's post-processor. `chat_template`
    (default: a transformers tokenizer's own) is written as `tokenizer.chat_template`."""
    import gguf

    if quant not in QUANTS:
        raise CrowdtrainError(f"unknown GGUF quantisation {quant!r}: choose {' or '.join(QUANTS)}")
    cfg = model.config
    arch, rope_theta = _check_config(cfg)
    backend = _backend(tokenizer)
    tokens, types, merges = tokenizer_fields(backend, cfg.vocab_size)
    pre = pre_tokenizer_type(backend)
    path = Path(path)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None)

    hf_tok = tokenizer if tokenizer is not backend else None
    ids: dict[str, int | None] = {}
    for key, given in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
        # precedence: the keyword, eot_id, a transformers tokenizer's own, the model config
        own = getattr(hf_tok, f"{key}_token_id", None) if hf_tok is not None else None
        choices = (given, eot_id, own, getattr(cfg, f"{key}_token_id", None))
        ids[key] = _first(next((v for v in choices if v is not None), None))
    for key, i in ids.items():
        if i is not None and not 0 <= i < cfg.vocab_size:
            raise CrowdtrainError(f"the {key} token id {i} is outside the model's vocabulary "
                                  f"of {cfg.vocab_size}: pass the tokenizer's own {key} id")
    adds_bos, adds_eos = _adds_specials(backend, ids["bos"], ids["eos"])
    if eot_id is not None:
        adds_bos = adds_eos = False
    if add_bos is not None:
        adds_bos = bool(add_bos)
    if chat_template is None and hf_tok is not None:
        own_template = getattr(hf_tok, "chat_template", None)
        chat_template = own_template if isinstance(own_template, str) else None
    unk = json.loads(backend.to_str()).get("model", {}).get("unk_token")
    unk_id = backend.token_to_id(unk) if unk else None

    w = gguf.GGUFWriter(None, arch)
    w.add_name(name)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0"
                        else gguf.LlamaFileType.MOSTLY_F16))
    if quant == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if head_dim is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(int(head_dim or cfg.hidden_size // n_head))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if ids["bos"] is not None:
        w.add_bos_token_id(ids["bos"])
    if ids["eos"] is not None:
        w.add_eos_token_id(ids["eos"])
    if ids["pad"] is not None:
        w.add_pad_token_id(ids["pad"])
    if unk_id is not None:
        w.add_unk_token_id(unk_id)
    w.add_add_bos_token(adds_bos)
    w.add_add_eos_token(adds_eos)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    counts: dict[str, int] = {}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf, p in model.state_dict().items():
        if (hf == "lm_head.weight" and tied) or "rotary_emb" in hf:
            continue
        t = p.detach().to("cpu", torch.float32).numpy()
        if arch in _PERMUTED:
            if ".self_attn.q_proj." in hf:
                t = permute_qk(t, n_head)
            elif ".self_attn.k_proj." in hf:
                t = permute_qk(t, n_kv)
        data, raw = _tensor_data(t, quant)
        if raw is None:
            w.add_tensor(gguf_name(hf, cfg.num_hidden_layers, arch), data)
            kind = "F32" if data.dtype == np.float32 else "F16"
        else:
            w.add_tensor(gguf_name(hf, cfg.num_hidden_layers, arch), data, raw_dtype=raw)
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
    return GgufInfo(path, path.stat().st_size, quant, counts, arch)
