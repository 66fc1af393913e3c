"""Checkpoint -> a published model folder, with its model card and provenance record.

`--format hf` (default): `save_pretrained` weights and config in the model's own architecture.
A run fine-tuned from a pretrained model (or distilled with a teacher's tokenizer) ships the
source's tokenizer files and generation config unchanged (special tokens, chat template) and,
for a fine-tuned model, the source's dtype (bf16 weights stay bf16); a run with a tokenizer of
its own gets it as a `PreTrainedTokenizerFast` and a generation config. `--format gguf`: one
GGUF file (gguf_file.py; Llama, Mistral and Qwen2 models) that llama.cpp and ollama run.
Either way the folder also gets `provenance.json`
(provenance.py: data hashes, contributors, rounds, hash chain, refusals, compute, evaluation,
the files exported), built once the model files are written, and a README.md model card
rendered from it (modelcard.py), with the Hugging Face model-card metadata header (YAML front
matter, including a `model-index` with the held-out evaluation). The held-out evaluation
(evaluate.py: loss, perplexity, bits per byte) runs on the run's validation split unless other
text is given.

The source is a run directory, or (for GGUF) an exported model folder such as a distilled
student, whose provenance record is carried over.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerFast

from crowdtrain import __version__
from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.modelcard import write_model_card
from crowdtrain.publish.provenance import (
    FORMAT,
    PROVENANCE_FILE,
    ConvertedFrom,
    Evaluation,
    GgufInfo,
    ModelInfo,
    Provenance,
    RunInfo,
    build_provenance,
    read_provenance,
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


def _evaluation(model, tokenizer, eval_data, run: Run | None,
                start_id: int | None = None) -> Evaluation | None:
    """Held-out figures of `model`: on `eval_data` files, else the run's validation split."""
    from crowdtrain.publish.evaluate import evaluate_texts, heldout_texts, read_texts

    if eval_data:
        texts, what = read_texts(eval_data), ", ".join(Path(p).name for p in eval_data)
    elif run is not None:
        texts = heldout_texts(run)
        what = f"held-out split of {', '.join(s['name'] for s in run.index.sources)}"
    else:
        return None
    res = evaluate_texts(model, tokenizer, texts, start_id)
    return Evaluation(data=what, **res.to_dict())


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
    from crowdtrain.publish.evaluate import document_start

    specials = run.specials()
    evaluation = (_evaluation(model, run.tokenizer, eval_data, run, document_start(specials))
                  if evaluate else None)
    gguf = None
    if fmt == "hf":
        _save_hf(run, model, out, specials)
    else:
        gguf = _write_gguf(model, run.tokenizer, out, run.config.name, quant, specials,
                           eval_data, run, evaluate)

    def measure_val_loss() -> float:
        """The exported checkpoint on the run's validation windows (the loss curve's last
        point when the run recorded none for it)."""
        import torch

        from crowdtrain.run.train import evaluate as loss_on

        return loss_on(model, run.val_windows(), torch.device("cpu"))

    record = build_provenance(run, ckpt.meta, count_params(model), exported=fmt,
                              files=_file_hashes(out), evaluation=evaluation, gguf=gguf,
                              measure_val_loss=measure_val_loss if evaluate else None)
    write_provenance(out, record)
    write_model_card(out, record)
    return out


def _save_hf(run: Run, model, out: Path, specials) -> None:
    """The model in its own architecture, with the run's tokenizer: the source's files as they
    were (a pretrained or teacher tokenizer), or the run's own as a PreTrainedTokenizerFast.
    A fine-tuned model's weights go out in the source's dtype; the model in memory stays fp32
    (the export's evaluation and the provenance record measure it)."""
    kept = run.source_files()
    dtype = run.config.source.dtype if run.config.source is not None else "float32"
    if not kept:
        model.generation_config = GenerationConfig(
            do_sample=True, temperature=0.8, top_k=50, max_new_tokens=200,
            bos_token_id=specials.bos_id if specials.bos_id is not None else specials.eos_id,
            eos_token_id=specials.eos_id,
            pad_token_id=specials.pad_id if specials.pad_id is not None else specials.eos_id)
    if dtype == "float32":
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        import copy

        from crowdtrain.run.model import DTYPES

        copy.deepcopy(model).to(DTYPES[dtype]).save_pretrained(str(out), safe_serialization=True)
    if kept:
        for p in kept:
            shutil.copyfile(p, out / p.name)
    else:
        hf_tokenizer(run).save_pretrained(str(out))


def _file_hashes(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.iterdir())
            if p.is_file() and p.name not in ("README.md", PROVENANCE_FILE)}


def _write_gguf(model, tokenizer, out: Path, name: str, quant: str, specials, eval_data,
                run: Run | None, evaluate: bool) -> GgufInfo:
    """The GGUF file, and its record: with (when evaluating) the GGUF's own held-out figures
    next to the original's, measured by loading the file back with transformers."""
    from crowdtrain.publish.gguf_file import write_gguf

    info = write_gguf(model, tokenizer, out / f"{name}-{quant}.gguf", quant, name=name,
                      bos_id=specials.bos_id, eos_id=specials.eos_id, pad_id=specials.pad_id,
                      add_bos=specials.add_bos, chat_template=specials.chat_template)
    evaluation = None
    if evaluate and (eval_data or run is not None):
        from crowdtrain.publish.evaluate import load_for_eval

        gmodel, gtok, start = load_for_eval(info.path)
        evaluation = _evaluation(gmodel, gtok, eval_data, run, start)
    return GgufInfo(file=info.path.name, quant=quant, bytes=info.bytes,
                    tensor_types=info.tensor_types,
                    original_fp32_bytes=4 * count_params(model),
                    **({"evaluation": evaluation} if evaluation is not None else {}))


def _gguf_from_folder(src: Path, out: Path, quant: str, force: bool, eval_data,
                      evaluate: bool) -> Path:
    """An exported Hugging Face folder (e.g. a distilled student) -> GGUF folder, its
    provenance record carried over with what the conversion adds."""
    from crowdtrain.run.data import folder_specials, load_tokenizer
    from crowdtrain.run.model import load_pretrained

    model = load_pretrained(src).eval()
    if not (src / "tokenizer.json").is_file():
        raise CrowdtrainError(f"{src} has no tokenizer.json")
    tok = load_tokenizer(src / "tokenizer.json", require_eot=False)
    specials = folder_specials(src, tok)
    try:
        carried = read_provenance(src)
    except CrowdtrainError:
        carried = Provenance(format=FORMAT, crowdtrain_version=__version__,
                             run=RunInfo(name=src.name),
                             model=ModelInfo(params=count_params(model)))
    weights = src / "model.safetensors"
    converted = ConvertedFrom.model_validate({
        "folder": src.name,
        "model.safetensors": file_sha256(weights) if weights.is_file() else None})
    _prepare_out(out, force)
    update: dict = {"converted_from": converted}
    if evaluate and eval_data:
        from crowdtrain.publish.evaluate import document_start

        update["evaluation"] = _evaluation(model, tok, eval_data, None, document_start(specials))
    name = str(carried.run.name or src.name)
    gguf = _write_gguf(model, tok, out, name, quant, specials, eval_data, None, evaluate)
    record = carried.model_copy(update={**update, "format_exported": "gguf", "gguf": gguf,
                                        "files": _file_hashes(out)})
    write_provenance(out, record)
    write_model_card(out, record)
    return out


def hf_tokenizer(run: Run) -> PreTrainedTokenizerFast:
    """A run's own byte-level BPE tokenizer as transformers saves it (`<|endoftext|>` begins,
    ends and pads)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=run.tokenizer, bos_token=EOT, eos_token=EOT, pad_token=EOT,
        model_max_length=run.model_config().max_position_embeddings,
    )
