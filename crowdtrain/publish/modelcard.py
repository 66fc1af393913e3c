"""The model card (README.md) of an exported model, rendered from its provenance record.

Written with huggingface_hub's model-card classes: the metadata header is a `ModelCardData`
(library, pipeline, license, tags, and the held-out evaluation as `EvalResult`s, which it
writes as the `model-index`), the card a `ModelCard` of that header and a human-readable
account of the record: architecture, evaluation, GGUF file, distillation, data, training,
contributors, the provenance chain and how to use the model. Rendered locally: nothing is
fetched from or pushed to the Hub.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.provenance import PROVENANCE_FILE, ModelInfo, Provenance

README = "README.md"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) \
        else f"{x:.{digits}f}"


TASK = {"task_type": "text-generation", "task_name": "Text generation"}
METRICS = (  # (EvalResult metric type and name, the Evaluation field, digits kept)
    ("bits_per_byte", "bits per byte", "bits_per_byte", 5),
    ("perplexity", "perplexity (per token)", "perplexity", 4),
    ("loss", "cross-entropy (nats per token)", "loss", 5),
)


def card_data(record: Provenance) -> ModelCardData:
    """The card's Hugging Face metadata: library, pipeline, license, tags and, when the model
    was evaluated, the held-out figures as `EvalResult`s (the `model-index`); the GGUF file's
    own figures for a GGUF export."""
    gguf = record.format_exported == "gguf"
    m = record.model
    family = (m.architecture or "LlamaForCausalLM").split("For")[0].lower() if m else "llama"
    tags = ["crowdtrain", family, "text-generation"]
    if m and m.lora:
        tags.append("lora")
    if record.distillation or (record.training and record.training.teacher):
        tags.append("distillation")
    if record.run.trained_by == "swarm":
        tags.append("volunteer-computing")
    if gguf:
        tags.append("gguf")
    ev = record.gguf.evaluation if gguf and record.gguf else None
    ev = ev or record.evaluation
    results = []
    if ev and ev.bits_per_byte is not None:
        dataset = {"dataset_type": "text", "dataset_name": str(ev.data or "held-out text")}
        for metric, words, field, digits in METRICS:
            value = getattr(ev, field)
            if value is not None:
                results.append(EvalResult(**TASK, **dataset, metric_type=metric,
                                          metric_name=words,
                                          metric_value=round(value, digits)))
    # a fine-tuned model keeps its base's license ("other" when the base's card names none)
    license = "apache-2.0"
    if m and m.base_model:
        license = m.base_license or "other"
    return ModelCardData(library_name=None if gguf else "transformers",
                         pipeline_tag="text-generation", license=license, tags=tags,
                         base_model=m.base_hub_id if m else None,
                         model_name=record.run.name if results else None,
                         eval_results=results or None)


def _table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(record: Provenance) -> ModelCard:
    """README.md: the metadata header (`card_data`) plus a human-readable account of the
    provenance record, rendered here (nothing is fetched or pushed)."""
    return ModelCard(f"---\n{card_data(record).to_yaml()}\n---\n\n{_text(record)}")


def write_model_card(out_dir: str | os.PathLike, record: Provenance) -> Path:
    """`out_dir`/README.md, the model card of `record`."""
    path = Path(out_dir) / README
    model_card(record).save(path)
    return path


def _text(record: Provenance) -> str:
    run, m = record.run, record.model
    name, version = run.name, record.crowdtrain_version
    out = [f"# {name}\n"]
    if d := record.distillation:
        out.append(f"A causal language model distilled with [crowdtrain]"
                   f"(https://pypi.org/project/crowdtrain/) (version "
                   f"{version}) from the teacher "
                   f"`{d.teacher.folder}` on the teacher's logits (KL, temperature "
                   f"{d.temperature}, weight {d.alpha}) and the text (cross-entropy).\n")
    else:
        how = ("by volunteers in a crowdtrain swarm (DiLoCo rounds over HTTP)"
               if run.trained_by == "swarm" else "on one machine")
        rnd = m.checkpoint_round if m.checkpoint_round is not None else "n/a"
        what = "A causal language model trained"
        if m.base_model:
            what = (f"`{m.base_model}` fine-tuned" + (" with LoRA adapters" if m.lora else "")
                    + " on the data below")
        out.append(f"{what} {how} with [crowdtrain]"
                   f"(https://pypi.org/project/crowdtrain/) (version "
                   f"{version}), from run `{name}`, "
                   f"checkpoint round {rnd}.\n")
        if t := (record.training.teacher if record.training else None):
            out.append(f"Every inner step distilled the teacher `{t.name}` (weights sha256 "
                       f"`{t.sha256}`): KL on its logits at temperature {t.temperature} "
                       f"with weight {t.alpha}, plus the text's cross-entropy.\n")
    if m.params is not None:
        out.append("## Architecture\n")
        out.append(_table([
            ["architecture", f"`{m.architecture or 'LlamaForCausalLM'}`"],
            ["preset", f"`{run.preset or 'n/a'}`"],
            ["parameters", f"{m.params:,}"],
            ["layers / hidden / heads", f"{_or(m.layers, '?')} / {_or(m.hidden, '?')} / "
                                        f"{_or(m.heads, '?')}"],
            ["context length", str(_or(m.context, "n/a"))],
            ["vocabulary", f"{_or(m.vocab_size, 'n/a')} "
                           + ("(the base model's tokenizer)" if m.base_model else
                              "(byte-level BPE)")],
        ] + _base_rows(m), ["", ""]) + "\n")
    out.append(_evaluation_section(record))
    if record.gguf:
        out.append(_gguf_section(record))
    if record.distillation:
        out.append(_distill_section(record))
    if record.data:
        out.append(_data_section(record))
    if record.hyperparameters:
        out.append(_training_section(record))
    if run.trained_by == "swarm":
        out.append(_contributors_section(record))
    if record.verification:
        out.append(_verification_section(record))
    if record.chain:
        out.append(_provenance_section(record))
    out.append(_usage_section(record))
    return "\n".join(out)


def _or(x: object, default: object) -> object:
    return default if x is None else x


def _base_rows(m: ModelInfo) -> list[list[str]]:
    """Rows for a model fine-tuned from a pretrained one (in full, or with LoRA adapters)."""
    if not m.base_model:
        return []
    rows = [["fine-tuned from", f"`{m.base_model}`" + (
        f" ([Hub](https://huggingface.co/{m.base_hub_id}))" if m.base_hub_id else "")]]
    if m.base_weights_sha256:
        rows.append(["base model weights sha256 (its files)", f"`{m.base_weights_sha256}`"])
    if m.base_model:
        rows.append(["base model license", m.base_license or "not stated in its card"])
    if m.dtype:
        rows.append(["weights dtype", f"{m.dtype} (the base model's; trained in float32)"])
    if lo := m.lora:
        rows.append(["LoRA", f"rank {lo.rank}, alpha {lo.alpha}, on "
                             f"{', '.join(lo.targets)}; adapter in `adapter/`, merged here"])
    if m.base_sha256:
        rows.append(["base weights sha256", f"`{m.base_sha256}`"])
    return rows


def _evaluation_section(record: Provenance) -> str:
    rows = []
    for label, ev in (("this model", record.evaluation),
                      ("this GGUF file", record.gguf.evaluation if record.gguf else None)):
        if ev:
            rows.append([label, ev.data or "", f"{ev.tokens:,}", f"{ev.bytes:,}",
                         _fmt(ev.loss), _fmt(ev.perplexity, 2), _fmt(ev.bits_per_byte)])
    if not rows:
        return "## Evaluation\n\nNot evaluated at export.\n"
    return ("## Evaluation\n\nMeasured by `crowdtrain eval` at export. Bits per byte (total "
            "nats / (ln 2 x UTF-8 bytes)) compares across tokenizers.\n\n"
            + _table(rows, ["model", "text", "tokens", "bytes", "loss (nats/token)",
                            "perplexity", "bits per byte"]) + "\n")


def _gguf_section(record: Provenance) -> str:
    g = record.gguf
    types = ", ".join(f"{n} x {k}" for k, n in sorted(g.tensor_types.items()))
    return (f"## GGUF\n\n`{g.file}`: {g.quant} ({types}), {g.bytes:,} bytes "
            f"(the float32 weights are {g.original_fp32_bytes:,} bytes). It runs in "
            "llama.cpp and ollama (architecture `llama`, tokenizer `gpt2` byte-level BPE).\n")


def _distill_section(record: Provenance) -> str:
    d = record.distillation
    t, s = d.teacher, d.student
    rows = [["teacher", f"{t.params:,}", f"{t.bytes:,}", _fmt(t.bits_per_byte)],
            ["student (this model)", f"{s.params:,}", f"{s.bytes:,}", _fmt(s.bits_per_byte)]]
    return ("## Distillation\n\n" + _table(rows, ["", "parameters", "model.safetensors bytes",
                                                  "held-out bits per byte"])
            + f"\n\nTeacher `model.safetensors` sha256 `{t.sha256}`"
            + (f", provenance chain head `{t.chain_head}`" if t.chain_head else "")
            + f". {d.steps} steps of {d.batch_size} x {d.seq_len} tokens "
              f"({d.tokens:,} tokens), AdamW lr {d.lr}.\n")


def _data_section(record: Provenance) -> str:
    d = record.data
    src = _table([[s.name, f"{s.bytes:,}", f"`{s.sha256}`"] for s in d.sources],
                 ["file", "bytes", "sha256"])
    text = f"## Data\n\n{src}\n"
    if d.train_shards is not None:
        text += (f"\nTokenized into {len(d.train_shards)} training shards "
                 f"({d.train_tokens:,} tokens) and {len(d.val_shards)} held-out "
                 f"validation shards ({d.val_tokens:,} tokens): the last "
                 f"{d.val_fraction:.0%} of the corpus bytes. Tokenizer sha256 "
                 f"`{d.tokenizer.sha256}`; every shard's sha256 is in "
                 f"`{PROVENANCE_FILE}`.\n")
    return text


def _training_section(record: Provenance) -> str:
    h, t, c = record.hyperparameters, record.training, record.compute
    tr = h.train
    rows = [
        ["tokens trained", f"{t.tokens_trained if t else 0:,}"],
        ["inner steps", f"{t.inner_steps if t else 0:,}"],
        ["optimizer", f"AdamW, lr {tr.lr}, warmup {tr.warmup_steps} + cosine"],
        ["AdamW betas / weight decay", f"{tr.beta1}, {tr.beta2} / {tr.weight_decay}"],
        ["batch", f"{tr.batch_size} x {tr.seq_len} tokens"],
    ]
    if record.run.trained_by == "swarm":
        s = h.swarm
        nesterov = " (Nesterov)" if s.nesterov and s.outer_momentum else ""
        rows += [
            ["DiLoCo rounds", f"{t.rounds if t else 0} of {s.inner_steps} inner steps" + (
                f" on average, growing {s.inner_steps_growth:g}x over the run"
                if s.inner_steps_growth != 1 else "")],
            ["outer optimizer", f"SGD lr {s.outer_lr}, momentum {s.outer_momentum}{nesterov}"],
            ["aggregation", f"{s.aggregation}, updates published as int8"],
        ]
    if ws := (t.warm_start if t else None):
        rows.append(["warm start (the run owner, one machine, before the swarm)",
                     f"{ws.steps:,} steps x {ws.batch_size} sequences = {ws.tokens:,} "
                     f"tokens in {ws.seconds:.0f} s on {ws.device} (included in tokens "
                     "trained)"])
    flops = c.training_flops_estimate if c else 0
    seconds = c.volunteer_seconds if c else 0
    rows += [
        ["training compute (6 x params x tokens)", f"{flops:.3g} FLOPs"],
        ["volunteer compute time", f"{seconds / 3600:.2f} h" if seconds else "n/a"],
        ["checkpoint sha256", f"`{record.model.checkpoint_sha256}`"],
    ]
    text = "## Training\n\n" + _table(rows, ["", ""]) + "\n"
    if curve := record.loss_curve:
        text += ("\nHeld-out loss curve (nats/token, the run's validation windows):\n\n"
                 + _table([[str(p.round), f"{p.tokens_trained:,}", _fmt(p.val_loss)]
                           for p in curve], ["round", "tokens trained", "held-out loss"]) + "\n")
    return text


def _contributors_section(record: Provenance) -> str:
    rows = [[c.name, f"{c.tokens:,}", f"{c.share:.1%}", str(c.rounds), str(c.accepted)]
            for c in record.contributors]
    text = "## Contributors\n\n"
    text += (_table(rows, ["volunteer", "tokens", "share", "rounds", "contributions"])
             if rows else "No contributions.") + "\n"
    text += ("\nVolunteers appear by the display name they chose, or as anonymous when they "
             "opted out at join.\n")
    ref = record.refused
    if ref.total:
        text += ("\nRefused or left-out contributions (no credit):\n\n"
                 + _table([[k, str(n)] for k, n in ref.by_reason.items()],
                          ["reason", "count"]) + "\n")
    else:
        text += "\nNo contribution was refused.\n"
    return text


def _verification_section(record: Provenance) -> str:
    v = record.verification
    text = f"## Verification\n\n{v.rule}\n"
    if v.enabled:
        rows = [[k, str(n)] for k, n in sorted(v.outcomes.items())]
        rows += [["credit revoked", str(v.revoked)], ["leases copied", str(v.copies)]]
        text += "\n" + _table(rows, ["contributions", "count"]) + "\n"
    return text


def _provenance_section(record: Provenance) -> str:
    ch = record.chain
    g = ch.genesis
    state = "complete" if ch.complete else "INCOMPLETE (see provenance.json)"
    return (f"## Provenance\n\nEvery round's published int8 update, the contributions "
            f"aggregated in it and the checkpoint it produced are hashed into a chain "
            f"(`{ch.version}`), recorded in the run's ledger and in `{PROVENANCE_FILE}`. "
            f"The chain starts at checkpoint round {g.round if g else 'n/a'} "
            f"(sha256 `{g.checkpoint_sha256 if g else 'n/a'}`); its head is "
            f"`{ch.head or 'n/a'}` ({state}). With the run directory, anyone can "
            "replay the run from its initial checkpoint and check that these are exactly the "
            "weights it gives:\n\n```bash\ncrowdtrain verify path/to/this/folder RUN_DIR\n```\n")


def _usage_section(record: Provenance) -> str:
    if record.format_exported == "gguf":
        f = record.gguf.file
        return (f"## How to use\n\n```bash\nllama-cli -m {f} -p \"ROMEO:\" -n 100\n"
                f"# ollama: a Modelfile with the line `FROM ./{f}`, then\n"
                f"ollama create {record.run.name} -f Modelfile\n```\n\n"
                "or with transformers: `AutoModelForCausalLM.from_pretrained(folder, "
                f"gguf_file=\"{f}\")`.\n")
    return ("## How to use\n\n```python\nfrom transformers import AutoModelForCausalLM, "
            "AutoTokenizer\n\ntok = AutoTokenizer.from_pretrained(\"path/to/this/folder\")\n"
            "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n"
            "ids = tok(\"ROMEO:\", return_tensors=\"pt\").input_ids\n"
            "print(tok.decode(model.generate(ids, do_sample=True, max_new_tokens=100)[0]))\n"
            "```\n\nor `crowdtrain generate path/to/this/folder \"ROMEO:\"`.\n")


def read_card_metadata(card: str) -> dict:
    """The YAML front matter of a model card (for tests and tools)."""
    if not card.startswith("---\n"):
        raise CrowdtrainError("the model card has no metadata header")
    return yaml.safe_load(card.split("---\n", 2)[1]) or {}
