"""Checkpoint -> a published model folder, with its model card and provenance record.

`--format hf` (default): `save_pretrained` weights and config, the tokenizer as a
`PreTrainedTokenizerFast`, a generation config. `--format gguf`: one GGUF file (gguf_export.py)
that llama.cpp and ollama run. Either way the folder also gets `provenance.json`
(provenance.py: data hashes, contributors, rounds, hash chain, refusals, compute, evaluation)
and a README.md model card rendered from it, with the Hugging Face model-card metadata header
(YAML front matter, including a `model-index` with the held-out evaluation). The held-out
evaluation (evaluate.py: loss, perplexity, bits per byte) runs on the run's validation split
unless other text is given.

The source is a run directory, or (for GGUF) an exported model folder such as a distilled
student, whose provenance record is carried over.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import yaml
from transformers import GenerationConfig, PreTrainedTokenizerFast

from crowdtrain import __version__
from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.provenance import (
    PROVENANCE_FILE,
    build_provenance,
    finite,
    load_provenance,
    write_provenance,
)
from crowdtrain.run.data import EOT, file_sha256
from crowdtrain.run.folder import RUN_FILE, Run
from crowdtrain.run.model import count_params

FORMATS = ("hf", "gguf")


def _check_out(out: Path, force: bool) -> bool:
    """Whether `out` holds an export to replace (only with `force`); raises otherwise."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CrowdtrainError(f"{out} is not empty; choose a new folder or pass --force")
        if not ((out / "config.json").exists() or (out / PROVENANCE_FILE).exists()
                or any(out.glob("*.gguf"))):
            raise CrowdtrainError(f"refusing to --force over {out}: it is not a model folder")
        return True
    return False


def _prepare_out(out: Path, force: bool) -> None:
    if _check_out(out, force):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _evaluation(model, tokenizer, eval_data, run: Run | None) -> dict | None:
    """Held-out figures of `model`: on `eval_data` files, else the run's validation split."""
    from crowdtrain.publish.evaluate import evaluate_texts, heldout_texts, read_texts

    if eval_data:
        texts, what = read_texts(eval_data), ", ".join(Path(p).name for p in eval_data)
    elif run is not None:
        texts = heldout_texts(run)
        what = f"held-out split of {', '.join(s['name'] for s in run.index.sources)}"
    else:
        return None
    res = evaluate_texts(model, tokenizer, texts)
    return finite({"data": what, **res.to_dict()})


def export_model(run: Run | str | os.PathLike, out_dir: str | os.PathLike,
                 rnd: int | None = None, force: bool = False, fmt: str = "hf",
                 quant: str = "q8_0", eval_data: list[str] | None = None,
                 evaluate: bool = True) -> Path:
    """Write checkpoint `rnd` (default: latest) of `run` as a model folder at `out_dir`:
    Hugging Face (`fmt="hf"`) or GGUF (`fmt="gguf"`, `quant` q8_0 or f16), with README.md and
    provenance.json. `run` may also be an exported model folder when `fmt` is "gguf"."""
    if fmt not in FORMATS:
        raise CrowdtrainError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    src = run if isinstance(run, Run) else Path(run)
    if isinstance(src, Path) and not (src / RUN_FILE).is_file() \
            and (src / "config.json").is_file():
        if fmt != "gguf":
            raise CrowdtrainError(f"{src} is already a Hugging Face model folder; "
                                  "`--format gguf` converts it")
        if rnd is not None:
            raise CrowdtrainError("--round applies to a run directory, not a model folder")
        return _gguf_from_folder(src, Path(out_dir), quant, force, eval_data, evaluate)
    if isinstance(src, Path):
        src = Run(src)
    run = src
    out = Path(out_dir)
    _check_out(out, force)
    model, ckpt = run.load_model(rnd)  # fails before touching `out` when rnd is unknown
    _prepare_out(out, force)
    from crowdtrain.run.lora import export_adapter  # LoRA run: out/adapter/ (peft), then merged

    model = export_adapter(run, model, out)
    model.eval()
    evaluation = _evaluation(model, run.tokenizer, eval_data, run) if evaluate else None
    record = build_provenance(run, ckpt.meta, count_params(model), evaluation)
    curve = record["loss_curve"]
    if evaluate and (not curve or curve[-1]["round"] != ckpt.round):
        # the loss curve's last point: the exported checkpoint on the run's validation windows
        import torch

        from crowdtrain.run.train import evaluate as val_loss

        curve.append({"round": ckpt.round,
                      "tokens_trained": int(ckpt.meta.get("tokens_trained", 0)),
                      "val_loss": val_loss(model, run.val_windows(), torch.device("cpu"))})
    if fmt == "hf":
        model.generation_config = GenerationConfig(
            do_sample=True, temperature=0.8, top_k=50, max_new_tokens=200,
            bos_token_id=run.index.eot_id, eos_token_id=run.index.eot_id,
            pad_token_id=run.index.eot_id,
        )
        model.save_pretrained(str(out), safe_serialization=True)
        hf_tokenizer(run).save_pretrained(str(out))
        record["format_exported"] = "hf"
    else:
        _write_gguf(model, run.tokenizer, out, run.config.name, quant, run.index.eot_id, record,
                    eval_data, run, evaluate)
    record["files"] = _file_hashes(out)
    write_provenance(out, record)
    (out / "README.md").write_text(model_card(record))
    return out


def _file_hashes(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.iterdir())
            if p.is_file() and p.name not in ("README.md", PROVENANCE_FILE)}


def _write_gguf(model, tokenizer, out: Path, name: str, quant: str, eot_id: int, record: dict,
                eval_data, run: Run | None, evaluate: bool) -> None:
    """The GGUF file, and (when evaluating) the GGUF's own held-out figures next to the
    original's, measured by loading the file back with transformers."""
    from crowdtrain.publish.gguf_file import write_gguf

    info = write_gguf(model, tokenizer, out / f"{name}-{quant}.gguf", quant, name=name,
                      eot_id=eot_id)
    gguf = {"file": info.path.name, "quant": quant, "bytes": info.bytes,
            "tensor_types": info.tensor_types,
            "original_fp32_bytes": 4 * count_params(model)}
    if evaluate and (eval_data or run is not None):
        from crowdtrain.publish.evaluate import load_for_eval

        gmodel, gtok, _ = load_for_eval(info.path)
        gguf["evaluation"] = _evaluation(gmodel, gtok, eval_data, run)
    record["format_exported"] = "gguf"
    record["gguf"] = gguf


def _gguf_from_folder(src: Path, out: Path, quant: str, force: bool, eval_data,
                      evaluate: bool) -> Path:
    """An exported Hugging Face folder (e.g. a distilled student) -> GGUF folder."""
    from tokenizers import Tokenizer

    from crowdtrain.run.model import load_pretrained

    model = load_pretrained(src).eval()
    if not (src / "tokenizer.json").is_file():
        raise CrowdtrainError(f"{src} has no tokenizer.json")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    try:
        record = load_provenance(src)
    except CrowdtrainError:
        record = {"format": "crowdtrain-provenance-1", "crowdtrain_version": __version__,
                  "run": {"name": src.name}, "model": {"params": count_params(model)}}
    record["converted_from"] = {"folder": src.name,
                                "model.safetensors": file_sha256(src / "model.safetensors")
                                if (src / "model.safetensors").is_file() else None}
    _prepare_out(out, force)
    if evaluate and eval_data:
        record["evaluation"] = _evaluation(model, tok, eval_data, None)
    name = str(record.get("run", {}).get("name") or src.name)
    _write_gguf(model, tok, out, name, quant, tok.token_to_id(EOT), record, eval_data, None,
                evaluate)
    record["files"] = _file_hashes(out)
    write_provenance(out, record)
    (out / "README.md").write_text(model_card(record))
    return out


def hf_tokenizer(run: Run) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=run.tokenizer, bos_token=EOT, eos_token=EOT, pad_token=EOT,
        model_max_length=run.model_config().max_position_embeddings,
    )


# --------------------------------------------------------------------------- the model card


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) \
        else f"{x:.{digits}f}"


def card_metadata(record: dict) -> dict:
    """The YAML front matter: Hugging Face model-card metadata, with the evaluation as a
    `model-index` entry when there is one."""
    gguf = record.get("format_exported") == "gguf"
    meta: dict = {}
    if not gguf:
        meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["license"] = "apache-2.0"
    tags = ["crowdtrain", "llama", "text-generation"]
    if record.get("distillation") or (record.get("training") or {}).get("teacher"):
        tags.append("distillation")
    if record.get("run", {}).get("trained_by") == "swarm":
        tags.append("volunteer-computing")
    if gguf:
        tags.append("gguf")
    meta["tags"] = tags
    ev = (record.get("gguf") or {}).get("evaluation") if gguf else None
    ev = ev or record.get("evaluation")
    name = str(record.get("run", {}).get("name", "model"))
    if ev and ev.get("bits_per_byte") is not None:
        metrics = [{"type": "bits_per_byte", "value": round(ev["bits_per_byte"], 5),
                    "name": "bits per byte"}]
        if ev.get("perplexity") is not None:
            metrics.append({"type": "perplexity", "value": round(ev["perplexity"], 4),
                            "name": "perplexity (per token)"})
        if ev.get("loss") is not None:
            metrics.append({"type": "loss", "value": round(ev["loss"], 5),
                            "name": "cross-entropy (nats per token)"})
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation", "name": "Text generation"},
            "dataset": {"type": "text", "name": str(ev.get("data", "held-out text"))},
            "metrics": metrics,
        }]}]
    return meta


def _table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(record: dict) -> str:
    """README.md: metadata header plus a human-readable account of the provenance record."""
    front = yaml.safe_dump(card_metadata(record), sort_keys=False, allow_unicode=True)
    run, m = record.get("run", {}), record.get("model", {})
    name = run.get("name", "model")
    out = [f"---\n{front}---\n", f"# {name}\n"]
    if record.get("distillation"):
        d = record["distillation"]
        out.append(f"A causal language model distilled with [crowdtrain]"
                   f"(https://pypi.org/project/crowdtrain/) (version "
                   f"{record.get('crowdtrain_version', __version__)}) from the teacher "
                   f"`{d['teacher']['folder']}` on the teacher's logits (KL, temperature "
                   f"{d['temperature']}, weight {d['alpha']}) and the text (cross-entropy).\n")
    else:
        how = ("by volunteers in a crowdtrain swarm (DiLoCo rounds over HTTP)"
               if run.get("trained_by") == "swarm" else "on one machine")
        out.append(f"A causal language model trained {how} with [crowdtrain]"
                   f"(https://pypi.org/project/crowdtrain/) (version "
                   f"{record.get('crowdtrain_version', __version__)}), from run `{name}`, "
                   f"checkpoint round {m.get('checkpoint_round', 'n/a')}.\n")
        if t := (record.get("training") or {}).get("teacher"):
            out.append(f"Every inner step distilled the teacher `{t['name']}` (weights sha256 "
                       f"`{t['sha256']}`): KL on its logits at temperature {t['temperature']} "
                       f"with weight {t['alpha']}, plus the text's cross-entropy.\n")
    if "params" in m:
        out.append("## Architecture\n")
        out.append(_table([
            ["architecture", "Llama (`LlamaForCausalLM`)"],
            ["preset", f"`{run.get('preset', 'n/a')}`"],
            ["parameters", f"{m['params']:,}"],
            ["layers / hidden / heads",
             f"{m.get('layers', '?')} / {m.get('hidden', '?')} / {m.get('heads', '?')}"],
            ["context length", str(m.get("context", "n/a"))],
            ["vocabulary", f"{m.get('vocab_size', 'n/a')} (byte-level BPE)"],
        ] + _base_rows(m), ["", ""]) + "\n")
    out.append(_evaluation_section(record))
    if record.get("gguf"):
        out.append(_gguf_section(record))
    if record.get("distillation"):
        out.append(_distill_section(record))
    if record.get("data"):
        out.append(_data_section(record))
    if record.get("hyperparameters"):
        out.append(_training_section(record))
    if record.get("contributors") is not None and run.get("trained_by") == "swarm":
        out.append(_contributors_section(record))
    if record.get("chain"):
        out.append(_provenance_section(record))
    out.append(_usage_section(record))
    return "\n".join(out)


def _base_rows(m: dict) -> list[list[str]]:
    """Rows for a model fine-tuned from a pretrained one (in full, or with LoRA adapters)."""
    if not m.get("base_model"):
        return []
    rows = [["fine-tuned from", f"`{m['base_model']}`"]]
    if m.get("lora"):
        lo = m["lora"]
        rows.append(["LoRA", f"rank {lo['rank']}, alpha {lo['alpha']}, on "
                             f"{', '.join(lo['targets'])}; adapter in `adapter/`, merged here"])
    if m.get("base_sha256"):
        rows.append(["base weights sha256", f"`{m['base_sha256']}`"])
    return rows


def _evaluation_section(record: dict) -> str:
    rows = []
    for label, ev in (("this model", record.get("evaluation")),
                      ("this GGUF file", (record.get("gguf") or {}).get("evaluation"))):
        if ev:
            rows.append([label, ev.get("data", ""), f"{ev['tokens']:,}", f"{ev['bytes']:,}",
                         _fmt(ev.get("loss")), _fmt(ev.get("perplexity"), 2),
                         _fmt(ev.get("bits_per_byte"))])
    if not rows:
        return "## Evaluation\n\nNot evaluated at export.\n"
    return ("## Evaluation\n\nMeasured by `crowdtrain eval` at export. Bits per byte (total "
            "nats / (ln 2 x UTF-8 bytes)) compares across tokenizers.\n\n"
            + _table(rows, ["model", "text", "tokens", "bytes", "loss (nats/token)",
                            "perplexity", "bits per byte"]) + "\n")


def _gguf_section(record: dict) -> str:
    g = record["gguf"]
    types = ", ".join(f"{n} x {k}" for k, n in sorted(g["tensor_types"].items()))
    return (f"## GGUF\n\n`{g['file']}`: {g['quant']} ({types}), {g['bytes']:,} bytes "
            f"(the float32 weights are {g['original_fp32_bytes']:,} bytes). It runs in "
            "llama.cpp and ollama (architecture `llama`, tokenizer `gpt2` byte-level BPE).\n")


def _distill_section(record: dict) -> str:
    d = record["distillation"]
    t, s = d["teacher"], d["student"]
    rows = [["teacher", f"{t['params']:,}", f"{t['bytes']:,}", _fmt(t.get("bits_per_byte"))],
            ["student (this model)", f"{s['params']:,}", f"{s['bytes']:,}",
             _fmt(s.get("bits_per_byte"))]]
    return ("## Distillation\n\n" + _table(rows, ["", "parameters", "model.safetensors bytes",
                                                  "held-out bits per byte"])
            + f"\n\nTeacher `model.safetensors` sha256 `{t.get('sha256', 'n/a')}`"
            + (f", provenance chain head `{t['chain_head']}`" if t.get("chain_head") else "")
            + f". {d['steps']} steps of {d['batch_size']} x {d['seq_len']} tokens "
              f"({d['tokens']:,} tokens), AdamW lr {d['lr']}.\n")


def _data_section(record: dict) -> str:
    d = record["data"]
    src = _table([[s["name"], f"{s['bytes']:,}", f"`{s['sha256']}`"] for s in d["sources"]],
                 ["file", "bytes", "sha256"])
    text = f"## Data\n\n{src}\n"
    if "train_shards" in d:
        text += (f"\nTokenized into {len(d['train_shards'])} training shards "
                 f"({d['train_tokens']:,} tokens) and {len(d['val_shards'])} held-out "
                 f"validation shards ({d['val_tokens']:,} tokens): the last "
                 f"{d['val_fraction']:.0%} of the corpus bytes. Tokenizer sha256 "
                 f"`{d['tokenizer']['sha256']}`; every shard's sha256 is in "
                 f"`{PROVENANCE_FILE}`.\n")
    return text


def _training_section(record: dict) -> str:
    h, t, c = record["hyperparameters"], record.get("training", {}), record.get("compute", {})
    tr = h["train"]
    rows = [
        ["tokens trained", f"{t.get('tokens_trained', 0):,}"],
        ["inner steps", f"{t.get('inner_steps', 0):,}"],
        ["optimizer", f"AdamW, lr {tr['lr']}, warmup {tr['warmup_steps']} + cosine"],
        ["AdamW betas / weight decay", f"{tr['beta1']}, {tr['beta2']} / {tr['weight_decay']}"],
        ["batch", f"{tr['batch_size']} x {tr['seq_len']} tokens"],
    ]
    if record.get("run", {}).get("trained_by") == "swarm":
        s = h["swarm"]
        nesterov = " (Nesterov)" if s["nesterov"] and s["outer_momentum"] else ""
        rows += [
            ["DiLoCo rounds", f"{t.get('rounds', 0)} of {s['inner_steps']} inner steps" + (
                f" on average, growing {s['inner_steps_growth']:g}x over the run"
                if s.get("inner_steps_growth", 1) != 1 else "")],
            ["outer optimizer",
             f"SGD lr {s['outer_lr']}, momentum {s['outer_momentum']}{nesterov}"],
            ["aggregation", f"{s['aggregation']}, updates published as int8"],
        ]
    ws = t.get("warm_start")
    if ws:
        rows.append(["warm start (the run owner, one machine, before the swarm)",
                     f"{ws['steps']:,} steps x {ws['batch_size']} sequences = {ws['tokens']:,} "
                     f"tokens in {ws['seconds']:.0f} s on {ws['device']} (included in tokens "
                     "trained)"])
    rows += [
        ["training compute (6 x params x tokens)",
         f"{c.get('training_flops_estimate', 0):.3g} FLOPs"],
        ["volunteer compute time", f"{c.get('volunteer_seconds', 0) / 3600:.2f} h"
                                   if c.get("volunteer_seconds") else "n/a"],
        ["checkpoint sha256", f"`{record.get('model', {}).get('checkpoint_sha256', 'n/a')}`"],
    ]
    text = "## Training\n\n" + _table(rows, ["", ""]) + "\n"
    curve = record.get("loss_curve") or []
    if curve:
        text += ("\nHeld-out loss curve (nats/token, the run's validation windows):\n\n"
                 + _table([[str(p["round"]), f"{p['tokens_trained']:,}", _fmt(p["val_loss"])]
                           for p in curve], ["round", "tokens trained", "held-out loss"]) + "\n")
    return text


def _contributors_section(record: dict) -> str:
    rows = [[c["name"], f"{c['tokens']:,}", f"{c['share']:.1%}", str(c["rounds"]),
             str(c["accepted"])] for c in record["contributors"]]
    text = "## Contributors\n\n"
    text += (_table(rows, ["volunteer", "tokens", "share", "rounds", "contributions"])
             if rows else "No contributions.") + "\n"
    text += ("\nVolunteers appear by the display name they chose, or as anonymous when they "
             "opted out at join.\n")
    ref = record.get("refused") or {}
    if ref.get("total"):
        text += ("\nRefused or left-out contributions (no credit):\n\n"
                 + _table([[k, str(n)] for k, n in ref["by_reason"].items()],
                          ["reason", "count"]) + "\n")
    else:
        text += "\nNo contribution was refused.\n"
    return text


def _provenance_section(record: dict) -> str:
    ch = record["chain"]
    g = ch.get("genesis") or {}
    state = "complete" if ch.get("complete") else "INCOMPLETE (see provenance.json)"
    return (f"## Provenance\n\nEvery round's published int8 update, the contributions "
            f"aggregated in it and the checkpoint it produced are hashed into a chain "
            f"(`{ch['version']}`), recorded in the run's ledger and in `{PROVENANCE_FILE}`. "
            f"The chain starts at checkpoint round {g.get('round', 'n/a')} "
            f"(sha256 `{g.get('checkpoint_sha256', 'n/a')}`); its head is "
            f"`{ch.get('head') or 'n/a'}` ({state}). With the run directory, anyone can "
            "replay the run from its initial checkpoint and check that these are exactly the "
            "weights it gives:\n\n```bash\ncrowdtrain verify path/to/this/folder RUN_DIR\n```\n")


def _usage_section(record: dict) -> str:
    if record.get("format_exported") == "gguf":
        f = record["gguf"]["file"]
        return (f"## How to use\n\n```bash\nllama-cli -m {f} -p \"ROMEO:\" -n 100\n"
                f"# ollama: a Modelfile with the line `FROM ./{f}`, then\n"
                f"ollama create {record.get('run', {}).get('name', 'model')} -f Modelfile\n```\n\n"
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

