"""Checkpoint -> Hugging Face model folder: `save_pretrained` weights and config, the tokenizer
as a `PreTrainedTokenizerFast`, a generation config, and a README.md model card that records
the architecture, the data (with hashes), the tokens trained and the held-out loss.
Any transformers user loads the result with `from_pretrained`.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerFast

from crowdtrain import __version__
from crowdtrain.data import EOT
from crowdtrain.errors import CrowdtrainError
from crowdtrain.model import count_params
from crowdtrain.rundir import Run


def export_model(run: Run, out_dir: str | os.PathLike, rnd: int | None = None,
                 force: bool = False) -> Path:
    """Write the run's checkpoint `rnd` (default: latest) as a HF folder at `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CrowdtrainError(f"{out} is not empty; choose a new folder or pass --force")
        if not (out / "config.json").exists():
            raise CrowdtrainError(f"refusing to --force over {out}: it is not a model folder")
        shutil.rmtree(out)
    model, ckpt = run.load_model(rnd)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.8, top_k=50, max_new_tokens=200,
        bos_token_id=run.index.eot_id, eos_token_id=run.index.eot_id,
        pad_token_id=run.index.eot_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    hf_tokenizer(run).save_pretrained(str(out))
    (out / "README.md").write_text(model_card(run, model, ckpt.meta))
    return out


def hf_tokenizer(run: Run) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=run.tokenizer, bos_token=EOT, eos_token=EOT, pad_token=EOT,
        model_max_length=run.model_config().max_position_embeddings,
    )


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def model_card(run: Run, model, meta: dict) -> str:
    """README.md with HF model-card metadata (YAML front matter) and a human-readable record."""
    cfg, mc, idx = run.config, run.model_config(), run.index
    sources = "\n".join(
        f"| {s['name']} | {s['bytes']:,} | `{s['sha256']}` |" for s in idx.sources
    )
    val = meta.get("val_loss")
    ppl = math.exp(val) if isinstance(val, (int, float)) and val < 50 else None
    return f"""---
library_name: transformers
pipeline_tag: text-generation
license: apache-2.0
tags:
- crowdtrain
- llama
- text-generation
---

# {cfg.name}

A causal language model trained with [crowdtrain](https://pypi.org/project/crowdtrain/)
(version {__version__}), from run `{cfg.name}`, checkpoint round {meta['round']}.

## Architecture

| | |
|---|---|
| architecture | Llama (`LlamaForCausalLM`) |
| preset | `{cfg.preset}` |
| parameters | {count_params(model):,} |
| layers / hidden / heads | {mc.num_hidden_layers} / {mc.hidden_size} / {mc.num_attention_heads} |
| context length | {mc.max_position_embeddings} |
| vocabulary | {mc.vocab_size} (byte-level BPE, trained on the corpus) |

## Data

| file | bytes | sha256 |
|---|---|---|
{sources}

Tokenized into {len(idx.train)} training shards ({idx.train_tokens:,} tokens) and
{len(idx.val)} held-out validation shards ({idx.val_tokens:,} tokens): the last
{cfg.data.val_fraction:.0%} of the corpus bytes.

## Training

| | |
|---|---|
| tokens trained | {int(meta.get('tokens_trained', 0)):,} |
| inner steps | {int(meta.get('steps', 0)):,} |
| last trained by | {meta.get('source', 'n/a')} |
| held-out loss (nats/token) | {_fmt(val)} |
| held-out perplexity | {_fmt(ppl, 2)} |
| optimizer | AdamW, lr {cfg.train.lr}, warmup {cfg.train.warmup_steps} + cosine |
| AdamW betas / weight decay | {cfg.train.beta1}, {cfg.train.beta2} / {cfg.train.weight_decay} |
| batch | {cfg.train.batch_size} x {cfg.train.seq_len} tokens |
| checkpoint sha256 | `{meta.get('sha256', 'n/a')}` |

## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = tok("ROMEO:", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, do_sample=True, max_new_tokens=100)[0]))
```

or `crowdtrain generate path/to/this/folder "ROMEO:"`.
"""
