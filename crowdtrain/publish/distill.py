"""`crowdtrain distill`: train a smaller student on a teacher's logits, locally, and export it.

The teacher is any causal LM folder (any family). The student is a fresh Llama of a named
preset, or of any architecture from a config.json (`--student-config`), with the teacher's
tokenizer and special tokens (distilling on logits needs the same vocabulary); documents are
framed with the teacher's own tokens, as a run's shards are (data.Specials). Each step it sees
a batch of the given text (deterministic
batches, `data.get_batch`, so a run with and one without the teacher see the same tokens) and
minimises

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

with the same AdamW loop, schedule and clipping as `crowdtrain train` (train.InnerLoop with a
`Teacher`; `crowdtrain init --teacher DIR` runs the same loss on the swarm's volunteers).
`alpha = 0` trains the same student on the text alone: the baseline distillation is measured
against. The last `val_fraction` of the text's bytes is held out; the student and the teacher
are both evaluated on it in bits per byte (evaluate.py). The student is exported like any
model: a Hugging Face folder with README.md and provenance.json (teacher, data hashes,
settings, both evaluations).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from crowdtrain import __version__
from crowdtrain.errors import CrowdtrainError, check_settings
from crowdtrain.publish.evaluate import (
    EvalResult,
    document_ids,
    document_start,
    evaluate_texts,
    read_texts,
)
from crowdtrain.run.data import file_sha256, get_batch
from crowdtrain.run.model import (
    PRESETS,
    build_model,
    check_causal_lm,
    count_params,
    get_preset,
    load_pretrained,
    preset_config,
)
from crowdtrain.run.train import PRESET_TRAINING, InnerLoop, Teacher, TrainConfig, pick_device


@dataclass(frozen=True)
class DistillConfig:
    """A distillation's settings; the fields with a "help" are `crowdtrain distill` options
    (crowdtrain.cli.options)."""

    preset: str = field(default="tiny", metadata={"choices": tuple(PRESETS),
                                                  "help": "student size"})
    steps: int = field(default=300, metadata={"help": "training steps"})
    # 0 = no teacher (plain cross-entropy)
    alpha: float = field(default=0.9, metadata={
        "help": "weight of the teacher (KL) term; 1 - alpha weighs the text's cross-entropy"})
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature of the KL term"})
    lr: float | None = field(default=None, metadata={
        "help": "peak AdamW learning rate", "default_help": "the preset's"})
    batch_size: int | None = field(default=None, metadata={
        "help": "sequences per step", "default_help": "the preset's"})
    seq_len: int | None = field(default=None, metadata={
        "help": "tokens per sequence", "default_help": "the preset's"})
    seed: int = field(default=0, metadata={"help": "seed of the student and the batches"})
    student_config: str | None = field(default=None, metadata={
        "metavar": "CONFIG_JSON", "help": "a config.json of any architecture for the student "
        "(its vocab_size and special token ids become the teacher's)",
        "default_help": "a --preset Llama"})
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        get_preset(self.preset)
        check_settings("distillation", {
            "steps": self.steps >= 1,
            "alpha": 0.0 <= self.alpha <= 1.0,
            "temperature": self.temperature > 0,
            "lr": self.lr is None or 0 < self.lr < 1,
            "batch_size": self.batch_size is None or self.batch_size >= 1,
            "seq_len": self.seq_len is None or self.seq_len >= 8,
            "val_fraction": 0 < self.val_fraction < 0.5,
        }, self)


@dataclass
class DistillResult:
    out_dir: Path | None
    student: EvalResult
    teacher: EvalResult
    student_params: int
    teacher_params: int
    student_bytes: int  # float32 weights
    teacher_bytes: int
    steps: int
    tokens: int
    seconds: float
    train_loss: float


def split_texts(texts: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: the last `val_fraction` of the bytes, cut at a newline."""
    total = sum(len(t.encode("utf-8")) for t in texts)
    start = int(total * (1 - val_fraction))
    train, val, pos = [], [], 0
    for t in texts:
        n = len(t.encode("utf-8"))
        if pos + n <= start:
            train.append(t)
        elif pos >= start:
            val.append(t)
        else:
            raw = t.encode("utf-8")
            cut = raw.find(b"\n", start - pos) + 1 or len(raw)
            a, b = raw[:cut].decode("utf-8", "ignore"), raw[cut:].decode("utf-8", "ignore")
            train += [a] if a else []
            val += [b] if b else []
        pos += n
    if not train or not val:
        raise CrowdtrainError("the text is too small to hold out a validation part; give more")
    return train, val


def _load_teacher(teacher_dir: Path):
    """(model, tokenizer, special tokens) of the teacher folder, frozen."""
    from crowdtrain.run.data import folder_specials, load_tokenizer

    model = load_pretrained(teacher_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok_path = teacher_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CrowdtrainError(f"{teacher_dir} has no tokenizer.json")
    tok = load_tokenizer(tok_path, require_eot=False)
    if tok.get_vocab_size() > model.config.vocab_size:
        raise CrowdtrainError(f"the teacher's tokenizer has {tok.get_vocab_size()} tokens, its "
                              f"model only {model.config.vocab_size}")
    return model, tok, folder_specials(teacher_dir, tok)


def student_config(cfg: DistillConfig, teacher_config, specials):
    """The student's config: a `cfg.preset` Llama, or `cfg.student_config`'s architecture,
    with the teacher's vocabulary size and special token ids."""
    if cfg.student_config is None:
        return preset_config(cfg.preset, teacher_config.vocab_size, specials.eos_id,
                             bos_id=specials.bos_id, pad_id=specials.pad_id)
    import json

    from crowdtrain.run.model import config_from_dict

    path = Path(cfg.student_config)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CrowdtrainError(f"cannot read the student config {path} ({e})") from None
    if not isinstance(d, dict):
        raise CrowdtrainError(f"{path} is not a model config (a JSON object)")
    d.update(vocab_size=teacher_config.vocab_size, eos_token_id=specials.eos_id,
             bos_token_id=specials.bos_id, pad_token_id=specials.pad_id)
    config = config_from_dict(d)
    check_causal_lm(config, path)
    return config


def distill(teacher_dir: str | os.PathLike, data: Sequence[str | os.PathLike],
            cfg: DistillConfig | None = None, out_dir: str | os.PathLike | None = None,
            device: str = "cpu", force: bool = False,
            on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Distil the model in `teacher_dir` into a fresh `cfg.preset` student on the text files
    `data`; export it to `out_dir` (if given) and report both models' held-out bits per byte."""
    cfg = cfg or DistillConfig()
    teacher_dir = Path(teacher_dir)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and any(out.iterdir()):
        if not force:
            raise CrowdtrainError(f"{out} is not empty; choose a new folder or pass --force")
        if not (out / "config.json").exists():
            raise CrowdtrainError(f"refusing to --force over {out}: it is not a model folder")
    teacher, tok, specials = _load_teacher(teacher_dir)
    train_texts, val_texts = split_texts(read_texts(data), cfg.val_fraction)
    bos = [specials.bos_id] if specials.add_bos and specials.bos_id is not None else []
    ids: list[int] = []
    for t in train_texts:
        ids += bos + document_ids(tok, t) + [specials.eos_id]
    stream = np.asarray(ids, dtype=np.int64)

    p = get_preset(cfg.preset)
    base = PRESET_TRAINING[cfg.preset]
    student_cfg = student_config(cfg, teacher.config, specials)
    seq = min(cfg.seq_len or base.seq_len, p.context, teacher.config.max_position_embeddings,
              student_cfg.max_position_embeddings)
    if len(stream) <= seq + 1:
        raise CrowdtrainError(f"the training text is only {len(stream)} tokens; need more than "
                              f"{seq + 1}")
    tcfg = replace(base, total_steps=cfg.steps, seq_len=seq, seed=cfg.seed,
                   lr=cfg.lr or base.lr, batch_size=cfg.batch_size or base.batch_size,
                   warmup_steps=min(base.warmup_steps, max(cfg.steps // 10, 1)))
    dev = pick_device(device)
    student = build_model(student_cfg, seed=cfg.seed)
    loop = InnerLoop(student, tcfg, dev, teacher=Teacher(teacher, cfg.alpha, cfg.temperature)
                     if cfg.alpha > 0 else None)
    t0 = time.perf_counter()
    st = loop.run(lambda s: get_batch([stream], tcfg.batch_size, tcfg.seq_len, cfg.seed, s),
                  0, cfg.steps, on_step=on_step)
    seconds = time.perf_counter() - t0
    student = student.to("cpu").eval()
    teacher = teacher.to("cpu")
    start = document_start(specials)
    s_eval = evaluate_texts(student, tok, val_texts, start)
    t_eval = evaluate_texts(teacher, tok, val_texts, start)
    res = DistillResult(None, s_eval, t_eval, count_params(student), count_params(teacher),
                        4 * count_params(student), 4 * count_params(teacher), st.steps,
                        st.tokens, seconds, st.mean_loss)
    if out is not None:
        res.out_dir = _export_student(student, teacher_dir, out, data, cfg, tcfg, res)
    return res


def _export_student(student, teacher_dir: Path, out: Path, data, cfg: DistillConfig,
                    tcfg: TrainConfig, res: DistillResult) -> Path:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from crowdtrain.publish.modelcard import write_model_card
    from crowdtrain.publish.provenance import (
        FORMAT,
        DataInfo,
        Distillation,
        DistilledStudent,
        DistilledTeacher,
        Evaluation,
        ModelInfo,
        Provenance,
        RunInfo,
        SourceFile,
        architecture,
        read_provenance,
        write_provenance,
    )

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    c = student.config
    student.generation_config = GenerationConfig(
        do_sample=True, temperature=0.8, top_k=50, max_new_tokens=200,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else c.eos_token_id)
    student.save_pretrained(str(out), safe_serialization=True)
    from crowdtrain.run.folder import SOURCE_FILES

    kept = [n for n in SOURCE_FILES if n != "generation_config.json"
            and (teacher_dir / n).is_file()]
    if "tokenizer_config.json" in kept:  # the teacher's tokenizer files, unchanged
        for n in kept:
            shutil.copyfile(teacher_dir / n, out / n)
    else:
        PreTrainedTokenizerFast.from_pretrained(str(teacher_dir)).save_pretrained(str(out))
    try:
        tprov = read_provenance(teacher_dir)
    except CrowdtrainError:
        tprov = None
    tweights = teacher_dir / "model.safetensors"
    t_bytes = tweights.stat().st_size if tweights.is_file() else res.teacher_bytes
    s_bytes = (out / "model.safetensors").stat().st_size
    res.student_bytes, res.teacher_bytes = s_bytes, t_bytes
    sources = [SourceFile(name=Path(p).name, bytes=Path(p).stat().st_size,
                          sha256=file_sha256(Path(p))) for p in data]
    pc = student.config
    record = Provenance(
        format=FORMAT,
        crowdtrain_version=__version__,
        created_at=time.time(),
        run=RunInfo(name=out.name, preset=cfg.preset, trained_by="distillation"),
        model=ModelInfo(architecture=architecture(pc), params=res.student_params,
                        layers=pc.num_hidden_layers, hidden=pc.hidden_size,
                        heads=pc.num_attention_heads, context=pc.max_position_embeddings,
                        vocab_size=pc.vocab_size),
        data=DataInfo(sources=sources),
        distillation=Distillation(
            teacher=DistilledTeacher(
                folder=teacher_dir.name, params=res.teacher_params, bytes=t_bytes,
                sha256=file_sha256(tweights) if tweights.is_file() else None,
                chain_head=tprov.chain.head if tprov and tprov.chain else None,
                run=tprov.run.name if tprov else None,
                bits_per_byte=res.teacher.bits_per_byte,
                evaluation=Evaluation(**res.teacher.to_dict())),
            student=DistilledStudent(params=res.student_params, bytes=s_bytes,
                                     bits_per_byte=res.student.bits_per_byte),
            alpha=cfg.alpha, temperature=cfg.temperature, steps=res.steps,
            tokens=res.tokens, batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
            lr=tcfg.lr, seconds=res.seconds, train_loss=res.train_loss,
            settings=asdict(cfg), train=asdict(tcfg),
        ),
        evaluation=Evaluation(data=f"held-out last {cfg.val_fraction:.0%} of "
                                   f"{', '.join(s.name for s in sources)}",
                              **res.student.to_dict()),
        files={p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()},
    )
    write_provenance(out, record)
    write_model_card(out, record)
    return out
