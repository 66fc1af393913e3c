"""A run directory: its layout, its validated config, and `init` that creates one.

    RUN_DIR/
      run.json          RunConfig (written last: its presence marks a complete init)
      tokenizer.json    HF tokenizers file
      model/config.json the HF model config
      model/base.safetensors  LoRA runs only: the frozen pretrained weights (see lora.py)
      data/             token shards + index.json (see data.py)
      checkpoints/      ckpt-NNNNNN.safetensors + .json (see checkpoint.py); round 0 = init
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from tokenizers import Tokenizer

from crowdtrain import __version__
from crowdtrain.errors import CrowdtrainError, check_settings
from crowdtrain.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from crowdtrain.run.data import (
    DataConfig,
    ShardIndex,
    Specials,
    build_shards,
    check_sources,
    file_sha256,
    folder_specials,
    load_tokenizer,
    split_windows,
    train_tokenizer,
    trained_specials,
)
from crowdtrain.run.lora import BASE_FILE, LoraSettings
from crowdtrain.run.model import (
    PRESETS,
    build_model,
    check_causal_lm,
    count_params,
    get_preset,
    load_config,
    load_frozen,
    load_into,
    load_pretrained,
    preset_config,
    resolve_source,
    source_dtype,
    state_dict_for_save,
)
from crowdtrain.run.schedule import inner_steps_schedule
from crowdtrain.run.train import PRESET_TRAINING, Teacher, TrainConfig, evaluate
from crowdtrain.wire import sparse
from crowdtrain.wire.codecs import CODECS, SPARSE_BITS, SPARSE_DENSITY, SPARSE_EF_DECAY

RUN_FILE = "run.json"

ACCESS = ("open", "invite")  # who may join a run (SwarmConfig.access)
# how the coordinator combines a round's contributions (crowdtrain.coordinator.aggregation)
AGGREGATION_METHODS = ("mean", "clip_mean", "trimmed_mean", "centered_clip")


@dataclass(frozen=True)
class SwarmConfig:
    """DiLoCo round schedule and outer optimizer of a run hosted by a coordinator. The fields
    with a "help" are `crowdtrain init` options (crowdtrain.cli.options)."""

    # the mean H of the run when inner_steps_growth > 1
    inner_steps: int = field(default=50, metadata={"help": "H: inner steps per round"})
    inner_steps_growth: float = field(default=1.0, metadata={  # crowdtrain.run.schedule
        "metavar": "RATIO", "help": "grow H over the run: last round's H / first round's, at "
                                    "the same total steps; 1: fixed H"})
    # the owner's warm start (crowdtrain.run.warmstart): this fraction of the run's steps, trained
    # by `crowdtrain init` on warm_start_batch x the batch before anyone joins
    warm_start: float = field(default=0.2, metadata={
        "metavar": "FRACTION", "help": "this share of the run's steps (at most 1,000) is "
        "trained here, on 4x the batch, before anyone joins; 0 to skip: the swarm then keeps "
        "data parallelism's quality at large H (BENCHMARKS.md)"})
    warm_start_batch: int = 4
    warm_start_max_steps: int = 1000  # "short": a long run's warm start is capped
    round_seconds: float = field(default=120.0, metadata={
        "help": "time budget and deadline of a round, in seconds"})
    rounds: int = field(default=10, metadata={
        "help": "DiLoCo rounds when served; 0: until stopped"})
    min_contributions: int = field(default=1, metadata={
        "help": "contributions a round needs before it closes"})
    # a round still short of min_contributions at its deadline is extended by round_seconds,
    # at most this many times; then it closes with what it has (nothing: the model stays)
    max_extensions: int = field(default=3, metadata={
        "help": "times a round short of --min-contributions has its deadline extended by "
                "--round-seconds before it closes with what it has; a round with no "
                "contribution then leaves the model unchanged"})
    codec: str = field(default="int8", metadata={
        "choices": CODECS, "help": "how volunteers' contributions travel: int8 (~1 byte per "
        "parameter), int4 (~0.56 bytes: half the upload, same quality in BENCHMARKS.md; needs "
        "workers of crowdtrain API v2), fp16, fp32, or sparse (the largest --sparse-density of "
        "each chunk of 4096 values at --sparse-bits each, the rest carried over to the next "
        "round: ~0.024 bytes at 1% and 2 bits; needs workers of crowdtrain API v3; its own "
        "outer defaults, lr 1 without momentum, and --sparse-ef-decay: measured +9% held-out "
        "against int8 at H=100 (12 rounds), best at H of 10-30, see bench/results/sparse.md)"})
    # the sparse codec's k (sparse.chunk_k of the density) and bits, fixed for the run
    sparse_density: float = field(default=SPARSE_DENSITY, metadata={
        "metavar": "FRACTION", "help": "with --codec sparse: the share of each chunk's values "
                                       "a contribution sends"})
    sparse_bits: int = field(default=SPARSE_BITS, metadata={
        "choices": sparse.BITS, "help": "with --codec sparse: bits per value sent"})
    sparse_ef_decay: float = field(default=SPARSE_EF_DECAY, metadata={
        "metavar": "BETA", "help": "with --codec sparse: each volunteer's error feedback "
        "keeps BETA x what it did not send, then adds the new pseudo-gradient (SparseLoCo's "
        "decayed accumulator); 1: keep all of it"})
    # None: the codec's default (`__post_init__`): DiLoCo's lr 0.7 and Nesterov momentum 0.9,
    # but lr 1 and no momentum for the sparse codec, whose decayed error feedback is the
    # momentum (SparseLoCo; measured in bench/results/sparse.md), and momentum 0.8 for
    # overlapped rounds, whose contributions start a round late (within 1% of stop-and-wait
    # at H=30 and H=100 with the update a quarter round late; 0.9: +1.46% at H=100;
    # bench/results/overlap-convergence.md)
    outer_lr: float | None = field(default=None, metadata={
        "help": "outer SGD learning rate", "default_help": "0.7; 1 with --codec sparse"})
    outer_momentum: float | None = field(default=None, metadata={
        "help": "outer Nesterov momentum; 0 for plain averaging",
        "default_help": "0.9; 0.8 with --overlap; 0 with --codec sparse, whose error "
                        "feedback plays its part (momentum 0.9 on top of it: +17% held-out at "
                        "H=100)"})
    nesterov: bool = True
    keep_last: int = 3
    keep_every: int = 10
    access: str = field(default="open", metadata={
        "choices": ACCESS, "help": "open: anyone may join; invite: joining needs a key from "
                                   "`crowdtrain invite`"})
    aggregation: str = "centered_clip"  # one of AGGREGATION_METHODS
    # not the default: with outer momentum 0.8 within 1% of stop-and-wait's held-out loss at
    # H=30 and H=100 when the update comes a quarter round late, +1.2% and more when later
    # (+2% half a round late with 0.9): it depends on the link and the close, which the run
    # does not control; better held-out at equal wall time and shares of time training of
    # 0.98+ (BENCHMARKS.md, overlapped rounds)
    overlap: bool = field(default=False, metadata={
        "help": "overlapped rounds: a volunteer that has sent its work trains the next round at "
                "once and folds the closing round's update in when it comes (a one-round-"
                "delayed outer step): no volunteer waits for a round to close; held-out loss "
                "per round within 1% of stop-and-wait when the update comes within a quarter "
                "of a round, 1-2% when half a round late (BENCHMARKS.md); default: "
                "stop-and-wait"})
    stale_weight: float = field(default=0.5, metadata={
        "metavar": "SHARE", "help": "a contribution that arrives after its round closed is "
        "applied in the next round at this share of its weight; 0: refused as stale (the "
        "reason goes in the ledger either way)"})
    # crowdtrain.coordinator.verification, run by coordinator/closecheck.py in each round's close
    # opt-in for now: on a fine-tuning run whose shards all read alike (tests/e2e/
    # test_fine_tune_swarm.py's LoRA run) honest contributions failed the lease-vs-control
    # loss check and were left out; the rule needs a control that differs from the lease's data
    verify: bool = field(default=False, metadata={
        "help": "check every contribution before it is credited: a loss check on a sample of "
                "its lease's batches, a similarity check against the round's others and "
                "earlier ones, and (dense codecs) a sample of leases given to two volunteers "
                "and compared; a failing contribution is left out and gets no credit, a "
                "volunteer caught by a replica loses its credit so far (not yet the default: "
                "data whose shards all read alike can fail honest work)"})

    def __post_init__(self) -> None:
        lr, momentum = (1.0, 0.0) if self.codec == "sparse" else (
            (0.7, 0.8) if self.overlap else (0.7, 0.9))
        if self.outer_lr is None:
            object.__setattr__(self, "outer_lr", lr)
        if self.outer_momentum is None:
            object.__setattr__(self, "outer_momentum", momentum)
        checks = {
            "inner_steps": self.inner_steps >= 1,
            "inner_steps_growth": 1 <= self.inner_steps_growth <= 100 and (
                self.inner_steps_growth == 1 or self.rounds >= 1),
            "warm_start": 0 <= self.warm_start <= 0.5,
            "warm_start_batch": 1 <= self.warm_start_batch <= 1024,
            "warm_start_max_steps": self.warm_start_max_steps >= 0,
            "round_seconds": self.round_seconds >= 1,
            "rounds": self.rounds >= 0,
            "min_contributions": self.min_contributions >= 1,
            "max_extensions": self.max_extensions >= 0,
            "codec": self.codec in CODECS,
            "sparse_density": 0 < self.sparse_density <= 1,
            "sparse_bits": self.sparse_bits in sparse.BITS,
            "sparse_ef_decay": 0 <= self.sparse_ef_decay <= 1,
            "outer_lr": 0 < self.outer_lr <= 10,
            "outer_momentum": 0 <= self.outer_momentum < 1,
            "keep_last": self.keep_last >= 1,
            "keep_every": self.keep_every >= 1,
            "access": self.access in ACCESS,
            "aggregation": self.aggregation in AGGREGATION_METHODS,
            "stale_weight": 0 <= self.stale_weight <= 1,
            "verify": isinstance(self.verify, bool),
        }
        check_settings("swarm", checks, self)

    def codec_options(self) -> dict[str, int]:
        """The keywords `codecs.to_bytes` and `codecs.payload_bytes` take for this run's
        contributions: k (entries per chunk of `sparse.BLOCK`) and bits for the sparse codec,
        none for the others."""
        if self.codec != "sparse":
            return {}
        return {"k": sparse.chunk_k(sparse.BLOCK, self.sparse_density), "bits": self.sparse_bits}

    def warm_start_steps(self) -> int:
        """Steps of the owner's warm start: `warm_start` of the run's total steps (warm start
        + rounds x inner_steps), at most `warm_start_max_steps`; 0 for a run without a fixed
        number of rounds."""
        if self.rounds < 1 or self.warm_start == 0 or self.warm_start_max_steps == 0:
            return 0
        return min(self.warm_start_max_steps, max(1, round(
            self.warm_start / (1 - self.warm_start) * self.rounds * self.inner_steps)))

    def total_steps(self) -> int:
        """The inner learning-rate schedule's length for a run with these settings."""
        return self.warm_start_steps() + self.rounds * self.inner_steps

    @property
    def fresh_leases(self) -> bool:
        """Whether the leases on the open round are fresh (`Lease.fresh`: from theta_r, new
        AdamW state, no error feedback), so any of them can be replicated and the copies
        compared: runs that verify, with a dense codec (the sparse codec needs its residual)."""
        return self.verify and self.codec != "sparse"

    def round_steps(self, rnd: int) -> int:
        """H of round `rnd`: `inner_steps`, or its place in a growing schedule of the same
        total (rounds x inner_steps) when `inner_steps_growth` > 1."""
        if self.inner_steps_growth == 1 or self.rounds < 1:
            return self.inner_steps
        hs = inner_steps_schedule(self.rounds * self.inner_steps, self.rounds,
                                  self.inner_steps_growth)
        return hs[min(max(rnd, 0), self.rounds - 1)]


PRETRAINED = "pretrained"  # the `preset` of a run started from a pretrained folder
TEACHER_WEIGHTS, TEACHER_CONFIG = "teacher.safetensors", "teacher.json"  # in model/


@dataclass(frozen=True)
class TeacherSettings:
    """A distillation run's teacher: every volunteer's inner loop learns from its logits
    (train.distillation_loss), weighted `alpha` against the text at `temperature`."""

    name: str  # the teacher folder's name, for the record
    sha256: str  # of model/teacher.safetensors, checked wherever it is loaded
    alpha: float = field(default=0.9, metadata={  # `crowdtrain init --distill-alpha`
        "metavar": "A", "help": "weight of the KL term against the text's cross-entropy"})
    temperature: float = field(default=1.0, metadata={
        "metavar": "T", "help": "softmax temperature of both models"})

    def __post_init__(self) -> None:
        check_settings("distillation", {"alpha": 0 < self.alpha <= 1,
                                        "temperature": self.temperature > 0,
                                        "sha256": len(self.sha256) == 64}, self)


# a pretrained folder's files the run keeps in model/ for the export, which ships the source's
# tokenizer (special tokens and chat template unchanged) and generation config
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class PretrainedSource:
    """Where a fine-tuning run's model came from, for the record and the export: the folder's
    name, its Hub id when it was given as one, a sha256 over its weight files, the dtype its
    weights are stored in (the export writes it back), its architecture and license."""

    name: str
    weights_sha256: str
    dtype: str = "float32"
    model_type: str = "llama"
    hub_id: str | None = None
    license: str | None = None

    def __post_init__(self) -> None:
        check_settings("source", {"weights_sha256": len(self.weights_sha256) == 64,
                                  "dtype": self.dtype in ("float32", "bfloat16", "float16")},
                       self)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; every machine taking part reads the same copy.

    A run made with `--from-pretrained DIR` has preset "pretrained", `base_model` = DIR's name
    and checkpoint 0 = DIR's weights; with LoRA (`lora`), the frozen weights are in
    model/base.safetensors (`base_sha256`) and the checkpoints hold the adapters only."""

    name: str
    preset: str = field(default="small", metadata={  # `crowdtrain init --preset`, --seed
        "help": f"model size: {', '.join(PRESETS)}"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and batches"})
    eval_tokens: int = 32768
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    created_at: float = 0.0
    crowdtrain_version: str = __version__
    base_model: str | None = None
    base_sha256: str | None = None
    lora: LoraSettings | None = None
    teacher: TeacherSettings | None = None
    source: PretrainedSource | None = None

    def __post_init__(self) -> None:
        if self.preset != PRETRAINED or self.base_model is None:
            get_preset(self.preset)
        if self.eval_tokens < 256:
            raise CrowdtrainError(f"eval_tokens must be >= 256, got {self.eval_tokens}")
        if self.lora is not None and (self.base_model is None or not self.base_sha256):
            raise CrowdtrainError("a LoRA run needs a pretrained base model and its sha256")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        d["data"] = DataConfig(**d.get("data", {}))
        d["train"] = TrainConfig(**d.get("train", {}))
        d["swarm"] = SwarmConfig(**d.get("swarm", {}))
        if d.get("lora") is not None:
            d["lora"] = LoraSettings(**d["lora"])
        if d.get("teacher") is not None:
            d["teacher"] = TeacherSettings(**d["teacher"])
        if d.get("source") is not None:
            d["source"] = PretrainedSource(**d["source"])
        return cls(**d)


class Run:
    """An opened run directory. Every path in it is named here, the files the coordinator
    writes while it serves the run included (the ledger, the updates, the contributions)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        p = self.dir / RUN_FILE
        if not p.is_file():
            raise CrowdtrainError(
                f"{self.dir} is not a crowdtrain run (no {RUN_FILE}); "
                f"create one with `crowdtrain init {self.dir}`"
            )
        try:
            self.config = RunConfig.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise CrowdtrainError(f"{p} is not a valid run config ({e})") from None

    data_dir = property(lambda self: self.dir / "data")
    ckpt_dir = property(lambda self: self.dir / "checkpoints")
    model_dir = property(lambda self: self.dir / "model")
    tokenizer_path = property(lambda self: self.dir / "tokenizer.json")
    # written by the coordinator: the ledger (see ledger.py), the update each round published,
    # the contributions it accepted (spooled under incoming/ while they arrive)
    ledger_path = property(lambda self: self.dir / "ledger.sqlite")
    updates_dir = property(lambda self: self.dir / "updates")
    contributions_dir = property(lambda self: self.dir / "contributions")
    spool_dir = property(lambda self: self.contributions_dir / "incoming")
    # the immutable files volunteers download, by sha256, for any web server to serve
    # (crowdtrain.coordinator.public)
    public_dir = property(lambda self: self.dir / "public")

    def update_path(self, rnd: int) -> Path:
        """The int8 update round `rnd` published (`updates/update-NNNNNN.safetensors`)."""
        return self.updates_dir / f"update-{rnd:06d}.safetensors"

    def outer_path(self, rnd: int) -> Path:
        """The outer optimiser's state (momentum, residual) that round `rnd` starts from."""
        return self.ckpt_dir / f"outer-{rnd:06d}.safetensors"

    def contribution_path(self, rnd: int, lease_id: int) -> Path:
        """Where the contribution accepted for lease `lease_id` of round `rnd` is kept."""
        return self.contributions_dir / f"r{rnd:06d}" / f"lease-{lease_id}.safetensors"

    @cached_property
    def index(self) -> ShardIndex:
        return ShardIndex.load(self.data_dir)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path, require_eot=False)

    def model_config(self):
        return load_config(self.model_dir)

    @property
    def base_path(self) -> Path:
        """The frozen base weights of a LoRA run."""
        return self.model_dir / BASE_FILE

    def build_model(self) -> torch.nn.Module:
        """The run's model before any checkpoint: a fresh init, or for a LoRA run the frozen
        base (sha256-checked) wrapped with adapters."""
        if self.config.lora is None:
            return build_model(self.model_config(), seed=self.config.seed)
        from crowdtrain.run.lora import build_lora_model, load_base

        return build_lora_model(self.model_config(), self.config.lora,
                                load_base(self.base_path, self.config.base_sha256),
                                seed=self.config.seed)

    def load_model(self, rnd: int | None = None) -> tuple[torch.nn.Module, Checkpoint]:
        """The model with the weights of checkpoint `rnd` (default: latest)."""
        model = self.build_model()
        ckpt = load_checkpoint(self.ckpt_dir, rnd, expected=state_dict_for_save(model))
        load_into(model, ckpt.tensors)
        return model, ckpt

    def check_teacher(self) -> None:
        """CrowdtrainError unless a distillation run's teacher files are present and intact."""
        t = self.config.teacher
        weights, config = self.model_dir / TEACHER_WEIGHTS, self.model_dir / TEACHER_CONFIG
        if t is None:
            return
        if not weights.is_file() or not config.is_file():
            raise CrowdtrainError(f"this run distils {t.name}, but {weights.name} or "
                                  f"{config.name} is missing from {self.model_dir}")
        if file_sha256(weights) != t.sha256:
            raise CrowdtrainError(f"{weights} does not match the sha256 in run.json: the "
                                  "teacher was altered or damaged")

    def load_teacher(self) -> Teacher | None:
        """A distillation run's teacher (weights sha256-checked), or None."""
        t = self.config.teacher
        if t is None:
            return None
        config = json.loads((self.model_dir / TEACHER_CONFIG).read_text())
        return Teacher(load_frozen(config, self.model_dir / TEACHER_WEIGHTS, t.sha256),
                       t.alpha, t.temperature)

    def val_windows(self):
        """The held-out windows the run's loss is measured on (a chat run's with its mask)."""
        return split_windows(self.data_dir, self.index, "val", self.config.train.seq_len,
                             self.config.eval_tokens)

    def source_files(self) -> list[Path]:
        """The tokenizer files and generation config a run kept from the pretrained model (or
        the teacher) whose tokenizer it uses (SOURCE_FILES); none for a run with its own."""
        if not (self.model_dir / "tokenizer_config.json").is_file():
            return []
        return [self.tokenizer_path] + [self.model_dir / n for n in SOURCE_FILES
                                        if n != "tokenizer.json" and (self.model_dir / n).is_file()]

    def specials(self) -> Specials:
        """The run's special tokens and chat template: the pretrained model's (or teacher's)
        own, or `<|endoftext|>` for a tokenizer the run trained."""
        if self.source_files():
            return folder_specials(self.model_dir, self.tokenizer)
        return trained_specials(self.tokenizer)


def init_run(
    run_dir: str | os.PathLike,
    data: list[str | os.PathLike],
    preset: str = RunConfig.preset,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    seed: int = RunConfig.seed,
    force: bool = False,
    progress: bool = True,
    train_overrides: dict | None = None,
    swarm: SwarmConfig | None = None,
    from_pretrained: str | os.PathLike | None = None,
    lora: LoraSettings | None = None,
    teacher: str | os.PathLike | None = None,
    distill_alpha: float = TeacherSettings.alpha,
    distill_temperature: float = TeacherSettings.temperature,
    download: bool = False,
    data_config: DataConfig | None = None,
) -> Run:
    """Create a run: tokenizer, shards, model config and the initial checkpoint (round 0).

    With `from_pretrained` (a local Hugging Face folder of any causal LM with a tokenizer.json,
    or a Hub id found in the local cache; `download` fetches a missing one) the run uses that
    model's tokenizer, special tokens, chat template, config and weights (checkpoint 0, fp32),
    and `preset` only picks the training defaults; with `lora` too, the weights are frozen in
    model/base.safetensors and the run trains (and the swarm moves) LoRA adapters only. With
    `teacher` (a folder or Hub id likewise) the run distils it: a fresh `preset` student with
    the teacher's tokenizer, every inner step (the owner's warm start and the volunteers')
    learning from the teacher's logits; the teacher's weights are kept in model/ for the
    volunteers to fetch. `data_config` sets how the corpus is read and cut (text column, ...).

    The steps: the mode and its inputs checked, the folder cleared, the config, the tokenizer
    and shards, the model (LoRA: its frozen base; distillation: the teacher kept), checkpoint
    0 (after the owner's warm start), and run.json last: its presence marks a complete run."""
    run_dir, model_dir = Path(run_dir), Path(run_dir) / "model"
    get_preset(preset)
    sources = check_sources(data)
    start = _model_start(preset, tokenizer, vocab_size, from_pretrained, lora, teacher,
                         distill_alpha, distill_temperature, download)
    _clear_run_dir(run_dir, force)
    cfg = _run_config(run_dir.name, preset, seed, vocab_size, train_overrides, swarm, start,
                      data_config)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = start.tokenizer
    if tok is None:
        tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(sources, cfg.data)
    tok.save(str(run_dir / "tokenizer.json"))
    specials = start.specials or trained_specials(tok)
    index = build_shards(sources, tok, run_dir / "data", cfg.data, progress=progress,
                         specials=specials)
    model, meta = _initial_model(model_dir, start, preset, tok, index.eot_id, seed)
    if start.pretrained is not None or start.teacher_path is not None:
        _keep_source_files(start.pretrained or start.teacher_path, model_dir)
    if lora is not None:
        cfg, model = _freeze_base(model_dir, cfg, model, lora)
    kept = None
    if teacher is not None:
        kept = _keep_teacher(start.teacher_path, model_dir, distill_alpha, distill_temperature,
                             start.teacher_name)
        cfg = replace(cfg, teacher=kept.settings)
    _checkpoint_zero(run_dir, cfg, model, index, meta, warm=start.pretrained is None,
                     progress=progress, teacher=kept and kept.teacher)
    (run_dir / RUN_FILE).write_text(cfg.to_json())
    return Run(run_dir)


@dataclass
class _ModelStart:
    """What a new run's model starts from, by mode: a preset (a fresh model, its config made
    once the tokenizer is known); a pretrained folder (`pretrained`: its config, tokenizer,
    special tokens and weights, `source` its record); a teacher (a fresh model with the
    teacher's tokenizer, `teacher_config`)."""

    context: int  # the longest seq_len the model takes
    what: str  # the model, as the context error names it
    config: object | None = None  # the pretrained folder's config
    tokenizer: Tokenizer | None = None  # the pretrained folder's or the teacher's
    specials: Specials | None = None  # their special tokens and chat template
    pretrained: Path | None = None
    source: PretrainedSource | None = None
    teacher_config: object | None = None
    teacher_path: Path | None = None
    teacher_name: str | None = None


def _model_start(preset: str, tokenizer, vocab_size, from_pretrained, lora, teacher,
                 distill_alpha: float, distill_temperature: float,
                 download: bool = False) -> _ModelStart:
    """The mode of a new run, its inputs checked (nothing is written for a run that cannot
    be made)."""
    if teacher is not None and from_pretrained is not None:
        raise CrowdtrainError("--teacher trains a fresh student: drop --from-pretrained")
    if teacher is not None:  # the teacher's tokenizer is the run's; the model is a fresh one
        TeacherSettings("-", "0" * 64, distill_alpha, distill_temperature)  # settings first
        t = _check_pretrained(teacher, lora, tokenizer, vocab_size, "--teacher", download)
        context = min(get_preset(preset).context, t.config.max_position_embeddings)
        return _ModelStart(context, preset, tokenizer=t.tokenizer, specials=t.specials,
                           teacher_config=t.config, teacher_path=t.folder,
                           teacher_name=t.source.hub_id or t.source.name)
    pre = _check_pretrained(from_pretrained, lora, tokenizer, vocab_size, download=download)
    if pre is not None:
        return _ModelStart(pre.config.max_position_embeddings, f"{pre.source.name} model",
                           pre.config, pre.tokenizer, pre.specials, pre.folder, pre.source)
    return _ModelStart(get_preset(preset).context, preset)


def _clear_run_dir(run_dir: Path, force: bool) -> None:
    """Make way for a new run in `run_dir`: only an empty folder, or with `force` a run."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            what = "a run" if (run_dir / RUN_FILE).exists() else "files"
            raise CrowdtrainError(
                f"{run_dir} already holds {what}; choose a new folder or pass --force to replace it"
            )
        if not (run_dir / RUN_FILE).exists():
            raise CrowdtrainError(f"refusing to --force over {run_dir}: it is not a crowdtrain run")
        shutil.rmtree(run_dir)


def _run_config(name: str, preset: str, seed: int, vocab_size: int | None,
                train_overrides: dict | None, swarm: SwarmConfig | None,
                start: _ModelStart, data_config: DataConfig | None = None) -> RunConfig:
    """The new run's config (before LoRA and the teacher): the preset's training with the
    overrides, the vocabulary of the tokenizer it starts from (or `vocab_size`, or the
    preset's); its seq_len checked against the model's context."""
    train_cfg = PRESET_TRAINING[preset]
    if train_overrides:
        train_cfg = TrainConfig(**{**asdict(train_cfg), **train_overrides, "seed": seed})
    tok, source = start.tokenizer, start.source
    vocab = tok.get_vocab_size() if tok else vocab_size or get_preset(preset).vocab_size
    cfg = RunConfig(
        name=name,
        preset=PRETRAINED if source is not None else preset,
        seed=seed,
        data=replace(data_config or DataConfig(), vocab_size=vocab),
        train=train_cfg,
        swarm=swarm or SwarmConfig(),
        created_at=time.time(),
        base_model=(source.hub_id or source.name) if source is not None else None,
        source=source,
    )
    if cfg.train.seq_len > start.context:
        raise CrowdtrainError(
            f"seq_len {cfg.train.seq_len} exceeds the {start.what} context {start.context}")
    return cfg


def _initial_model(model_dir: Path, start: _ModelStart, preset: str, tok: Tokenizer,
                   eot_id: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """The model of checkpoint 0 (its config saved in model/), and the checkpoint's meta so
    far: a fresh `preset` model for the run's tokenizer, or the pretrained one (fp32 master
    weights whatever the dtype of its files)."""
    model_cfg = start.config
    if model_cfg is None:
        vocab = (start.teacher_config.vocab_size if start.teacher_config is not None
                 else tok.get_vocab_size())
        sp = start.specials
        model_cfg = preset_config(preset, vocab, eot_id, bos_id=sp and sp.bos_id,
                                  pad_id=sp and sp.pad_id)
    model_cfg.save_pretrained(str(model_dir))
    if start.pretrained is None:
        model, source = build_model(model_cfg, seed=seed), "init"
    else:
        model, source = load_pretrained(start.pretrained), "pretrained"
    return model, {"tokens_trained": 0, "steps": 0, "params": count_params(model),
                   "source": source}


def _keep_source_files(src: Path, model_dir: Path) -> None:
    """Copy the pretrained folder's tokenizer files and generation config into model/, for
    the export to ship unchanged (tokenizer.json is the run's own, at the run's top)."""
    for name in SOURCE_FILES:
        if name != "tokenizer.json" and (src / name).is_file():
            shutil.copyfile(src / name, model_dir / name)


def _freeze_base(model_dir: Path, cfg: RunConfig, model: torch.nn.Module,
                 lora: LoraSettings) -> tuple[RunConfig, torch.nn.Module]:
    """A LoRA run: the pretrained weights frozen in model/base.safetensors (their sha256 in
    the config), and the model wrapped with the adapters that train and travel, on the
    layers `lora` names for this architecture (recorded by name in run.json)."""
    from safetensors.torch import save_file

    from crowdtrain.run.lora import base_sha256, resolve_targets, wrap

    lora = resolve_targets(lora, model)
    save_file(state_dict_for_save(model), str(model_dir / BASE_FILE),
              metadata={"base_model": cfg.base_model})
    cfg = replace(cfg, lora=lora, base_sha256=base_sha256(model_dir / BASE_FILE))
    return cfg, wrap(model, lora, seed=cfg.seed)


def _checkpoint_zero(run_dir: Path, cfg: RunConfig, model: torch.nn.Module, index: ShardIndex,
                     meta: dict, warm: bool, progress: bool, teacher: Teacher | None) -> None:
    """Checkpoint 0: the model after the owner's warm start (`warm`: a fresh model only, a
    pretrained one is its own), with its held-out loss."""
    steps = cfg.swarm.warm_start_steps() if warm else 0
    if steps:
        from crowdtrain.run.warmstart import warm_start

        record = warm_start(model, run_dir / "data", index, cfg.train, steps,
                            cfg.swarm.warm_start_batch, cfg.seed, progress=progress,
                            teacher=teacher)
        meta.update(steps=record["steps"], tokens_trained=record["tokens"],
                    source="warm start", warm_start=record)
    val = split_windows(run_dir / "data", index, "val", cfg.train.seq_len, cfg.eval_tokens)
    meta["val_loss"] = evaluate(model, val, torch.device("cpu"))
    save_checkpoint(run_dir / "checkpoints", 0, state_dict_for_save(model), meta)


@dataclass
class _KeptTeacher:
    settings: TeacherSettings
    teacher: Teacher


def _keep_teacher(src: Path, model_dir: Path, alpha: float, temperature: float,
                  name: str | None = None) -> _KeptTeacher:
    """Copy a teacher folder's weights and config into the run (model/teacher.*), as the
    volunteers will load them: safetensors of `state_dict_for_save` plus the config as JSON."""
    from safetensors.torch import save_file

    model = load_pretrained(src)
    weights = model_dir / TEACHER_WEIGHTS
    save_file(state_dict_for_save(model), str(weights))
    (model_dir / TEACHER_CONFIG).write_text(json.dumps(model.config.to_dict()))
    settings = TeacherSettings(name or Path(src).name, file_sha256(weights), alpha, temperature)
    return _KeptTeacher(settings, Teacher(model, alpha, temperature))


@dataclass
class _Pretrained:
    """A checked pretrained model to start from or distil: its local folder, config,
    tokenizer, special tokens and the record of where it came from."""

    folder: Path
    config: object
    tokenizer: Tokenizer
    specials: Specials
    source: PretrainedSource


def _check_pretrained(src, lora: LoraSettings | None, tokenizer, vocab_size,
                      flag: str | None = None, download: bool = False) -> _Pretrained | None:
    """A pretrained folder or Hub id to start from (or, `flag` "--teacher", to distil), each
    part checked; None without."""
    flag = flag or "--from-pretrained"
    if src is None:
        if lora is not None:
            raise CrowdtrainError("LoRA adapts a pretrained model: pass --from-pretrained DIR")
        return None
    if flag == "--teacher" and lora is not None:
        raise CrowdtrainError("a distillation run trains a fresh student: drop --lora")
    if tokenizer is not None or vocab_size is not None:
        raise CrowdtrainError(f"{flag} uses the model's own tokenizer: drop "
                              "--tokenizer and --vocab-size")
    folder, hub_id = resolve_source(src, download, flag)
    config = load_config(folder)
    check_causal_lm(config, folder)
    if not (folder / "tokenizer.json").is_file():
        raise CrowdtrainError(f"{folder} has no tokenizer.json (a Hugging Face fast tokenizer): "
                              "save one with AutoTokenizer.from_pretrained(DIR)"
                              ".save_pretrained(DIR)")
    tok = load_tokenizer(folder / "tokenizer.json", require_eot=False)
    if tok.get_vocab_size() > config.vocab_size:
        raise CrowdtrainError(f"the tokenizer of {folder} has {tok.get_vocab_size()} tokens, "
                              f"more than the model's vocab_size {config.vocab_size}")
    source = PretrainedSource(name=folder.name if hub_id is None else hub_id.split("/")[-1],
                              weights_sha256=weights_sha256(folder),
                              dtype=source_dtype(config), model_type=config.model_type,
                              hub_id=hub_id, license=card_license(folder))
    return _Pretrained(folder, config, tok, folder_specials(folder, tok), source)


def weights_sha256(folder: Path) -> str:
    """A sha256 naming a model folder's weights: over each weight file's name and sha256, in
    name order (sharded or not)."""
    import hashlib

    files = sorted(p for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise CrowdtrainError(f"{folder} has no weight files (*.safetensors)")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name} {file_sha256(p)}\n".encode())
    return h.hexdigest()


def card_license(folder: Path) -> str | None:
    """The license in a model folder's README.md card metadata, if it has one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        lic = ModelCard.load(str(readme)).data.license
    except Exception:  # a card that is not valid: no license to carry
        return None
    return lic if isinstance(lic, str) and lic else None
