"""The provenance record of an exported model (`provenance.json`), gathered from a run.

What it holds: the data (source files, token shards and tokenizer, each with its sha256), the
hyperparameters, every round (contributions, tokens, losses, the sha256 of its published update
and resulting checkpoint, its chain link), the hash chain's start and head, each contributor's
share of the tokens (by the display name they chose, or "anonymous" when they opted out at
join), refused contributions counted by reason, the held-out loss curve, the total compute, the
held-out evaluation, the exported format and the sha256 of every file exported.
The model card (modelcard.py) is rendered from this record, and `crowdtrain verify`
(verify.py) checks a model against it and the run.

The record is a tree of pydantic models (`Provenance` at its root), built once by
`build_provenance` (a run's export: export.py passes what it measured and wrote), by
distill.py (a distilled student) or read back with `read_provenance`. In the file, a part is
written when it was given: a distilled student's record has no rounds, a run's export has no
distillation, and a record read back is written again with exactly the keys it had (and any
this version does not know). The JSON's field names are the format: records written by earlier
versions read the same.

Only the rounds before the exported checkpoint count: checkpoint N is the result of rounds
0..N-1. Everything here reads the run; nothing writes to it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crowdtrain import __version__
from crowdtrain.errors import CorruptDataError, CrowdtrainError
from crowdtrain.run.checkpoint import list_checkpoints, read_meta
from crowdtrain.run.data import file_sha256
from crowdtrain.run.folder import Run
from crowdtrain.run.ledger import CHAIN_VERSION, Ledger, chain_genesis

PROVENANCE_FILE = "provenance.json"
FORMAT = "crowdtrain-provenance-1"
ANONYMOUS = "anonymous"


def _finite(x: float | None) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def refusal_category(reason: str | None, left_out: bool = False) -> str:
    """A reason without its particulars (ids, numbers), so equal causes count together."""
    if left_out and reason and "verification:" in reason:  # the contribution checks
        what = re.split(r"[:;(]", reason.split("verification:", 1)[1], maxsplit=1)[0]
        return f"left out by verification ({re.sub(r'[0-9.]+', 'N', what.strip())})"
    if left_out:
        why = "norm not finite" if reason and "not finite" in reason else "norm outlier"
        return f"left out by robust aggregation ({why})"
    if not reason:
        return "unspecified"
    head = reason.split(":", 1)[0].strip()
    return re.sub(r"\d+(\.\d+)?", "N", head)


# --------------------------------------------------------------------------- the record


class Part(BaseModel):
    """A part of the record. A record written by another crowdtrain version keeps the fields
    this one does not know: they are read back and written again as they were."""

    model_config = ConfigDict(extra="allow")


class RunInfo(Part):
    name: str
    preset: str | None = None
    created_at: float | None = None
    trained_by: Literal["swarm", "local", "distillation"] | None = None


class LoraInfo(Part):
    """A LoRA run's adapters (run.lora.LoraSettings)."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]


class ModelInfo(Part):
    architecture: str | None = None
    params: int | None = None
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    context: int | None = None
    vocab_size: int | None = None
    checkpoint_round: int | None = None
    checkpoint_sha256: str | None = None
    checkpoint_source: str | None = None  # "swarm", "local", "warm start", "init"
    base_model: str | None = None  # fine-tuned from this pretrained model (Hub id or name)
    base_sha256: str | None = None
    # the pretrained source: its Hub id (when given as one), a sha256 over its weight files,
    # its license (from its model card) and the dtype its weights were stored (and exported) in
    base_hub_id: str | None = None
    base_weights_sha256: str | None = None
    base_license: str | None = None
    dtype: str | None = None
    lora: LoraInfo | None = None


class SourceFile(Part):
    name: str
    bytes: int
    sha256: str


class TokenizerInfo(Part):
    file: str
    sha256: str
    vocab_size: int
    type: str


class ShardInfo(Part):
    name: str
    tokens: int
    sha256: str


class DataInfo(Part):
    """The text trained on; a run's export also has its tokenizer and token shards."""

    sources: list[SourceFile]
    tokenizer: TokenizerInfo | None = None
    train_shards: list[ShardInfo] | None = None
    val_shards: list[ShardInfo] | None = None
    train_tokens: int | None = None
    val_tokens: int | None = None
    val_fraction: float | None = None


class TrainSettings(Part):
    """The run's inner-loop settings (run.train.TrainConfig, all of its fields): those the
    model card reads are named here."""

    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float


class SwarmSettings(Part):
    """The run's swarm settings (run.folder.SwarmConfig, all of its fields): those the model
    card reads are named here."""

    inner_steps: int
    inner_steps_growth: float = 1.0  # recorded since the schedule of H could grow
    outer_lr: float
    outer_momentum: float
    nesterov: bool
    aggregation: str


class Hyperparameters(Part):
    seed: int
    eval_tokens: int
    train: TrainSettings
    swarm: SwarmSettings
    data: dict[str, Any]  # run.data.DataConfig


class WarmStart(Part):
    """The run owner's own steps before the swarm (run.warmstart)."""

    steps: int
    tokens: int
    batch_size: int
    seconds: float
    device: str
    train_loss: float | None = None


class TeacherInfo(Part):
    """A distillation run's teacher (run.folder.TeacherSettings)."""

    name: str
    sha256: str
    alpha: float
    temperature: float


class Training(Part):
    tokens_trained: int
    inner_steps: int
    rounds: int
    warm_start: WarmStart | None = None
    teacher: TeacherInfo | None = None  # a distillation run: every inner step learned from it


class RoundRecord(Part):
    round: int
    opened_at: float
    closed_at: float | None
    contributions: int
    refused: int
    tokens: int
    tokens_before: int
    train_loss: float | None
    val_loss: float | None
    bytes_in: int
    bytes_out: int
    update_sha256: str | None
    contribution_sha256s: list[str]
    checkpoint_sha256: str | None
    chain_link: str | None


class Genesis(Part):
    """Where the chain starts: a checkpoint and the link it gives."""

    round: int
    checkpoint_sha256: str
    link: str


class Chain(Part):
    version: str
    genesis: Genesis | None
    head: str | None
    complete: bool
    head_round: int | None = None  # written when a round is chained


class Contributor(Part):
    name: str  # the display name, or "anonymous"
    anonymous: bool
    tokens: int
    rounds: int
    accepted: int
    refused: int
    seconds: float
    share: float  # of all contributors' tokens


class Refusals(Part):
    total: int = 0
    by_reason: dict[str, int] = Field(default_factory=dict)  # most frequent first


class Verification(Part):
    """What the run checked of its contributions before crediting them (`init --verify`,
    coordinator/verification.py) and how it came out, in the rounds of the export."""

    enabled: bool
    replicated: bool  # leases copied to a second volunteer and compared (dense codecs)
    rule: str  # what was verified and how, and the provisional-credit rule, in words
    outcomes: dict[str, int] = Field(default_factory=dict)  # valid, provisional, failed, ...
    revoked: int = 0  # contributions whose credit was revoked (their volunteer was caught)
    copies: int = 0  # leases given to a second volunteer


def verification_rule(enabled: bool, replicated: bool) -> str:
    """The verification's rule in words, for the record and the model card."""
    if not enabled:
        return ("Contributions were not verified: robust aggregation bounded their effect on "
                "the model, and every accepted one was credited.")
    text = ("Every contribution was checked in its round's close, before it was credited: "
            "the round's model with the contribution applied must lower the loss on a secret "
            "sample of its lease's own batches, and more than on control batches it was not "
            "leased; it must not be a near-copy of another contribution of the round, of an "
            "earlier one or of a published update. A contribution failing an absolute test "
            "was left out and got no credit. One below the round's medians only, or that "
            "could not be checked (a round too small for a reference, work trained ahead or "
            "late, the check broke), was credited provisionally: nothing honest was lost for "
            "a check.")
    if replicated:
        text += (" Every lease started from the round's model with new optimizer state, and "
                 "a sample (BOINC-style: new volunteers often, trusted ones rarely, always "
                 "after a provisional result below the round's medians, always while no copy "
                 "had confirmed the volunteer's work) was given to a second "
                 "volunteer: when the two deltas disagreed, the one with the lower loss drop "
                 "on the lease's batches was left out and its volunteer lost the credit of "
                 "all its contributions so far (they stay in the model).")
    return text


class LossPoint(Part):
    round: int
    tokens_trained: int
    val_loss: float


class Compute(Part):
    tokens_trained: int
    training_flops_estimate: float
    volunteer_seconds: float
    local_seconds: float
    warm_start_tokens: int = 0
    warm_start_seconds: float = 0.0
    contributions: int
    bytes_uploaded: int
    bytes_downloaded: int


class Evaluation(Part):
    """Held-out figures (evaluate.EvalResult.to_dict()); a figure that is not finite is None
    (JSON has no inf or nan)."""

    data: str | None = None  # what was evaluated, in words
    tokens: int
    bytes: int
    nats: float | None
    loss: float | None
    perplexity: float | None
    bits_per_byte: float | None

    @field_validator("nats", "loss", "perplexity", "bits_per_byte", mode="before")
    @classmethod
    def _finite_or_none(cls, v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v


class GgufInfo(Part):
    file: str
    quant: str
    bytes: int
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    original_fp32_bytes: int
    evaluation: Evaluation | None = None  # the GGUF file's own held-out figures


class ConvertedFrom(Part):
    """The Hugging Face folder a GGUF export was converted from."""

    folder: str
    model_safetensors: str | None = Field(alias="model.safetensors")  # its sha256


class DistilledTeacher(Part):
    folder: str
    params: int
    bytes: int
    sha256: str | None
    chain_head: str | None
    run: str | None
    bits_per_byte: float | None
    evaluation: Evaluation | None


class DistilledStudent(Part):
    params: int
    bytes: int
    bits_per_byte: float | None


class Distillation(Part):
    """`crowdtrain distill`: the teacher, the student (this model) and the settings."""

    teacher: DistilledTeacher
    student: DistilledStudent
    alpha: float
    temperature: float
    steps: int
    tokens: int
    batch_size: int
    seq_len: int
    lr: float
    seconds: float
    train_loss: float
    settings: dict[str, Any]  # distill.DistillConfig
    train: dict[str, Any]  # run.train.TrainConfig


class Provenance(Part):
    """provenance.json. `run` and `model` are always there; the other parts where the model
    has them (see the module's docstring)."""

    format: Literal["crowdtrain-provenance-1"]
    crowdtrain_version: str
    created_at: float | None = None
    run: RunInfo
    model: ModelInfo
    data: DataInfo | None = None
    hyperparameters: Hyperparameters | None = None
    training: Training | None = None
    rounds: list[RoundRecord] = Field(default_factory=list)
    chain: Chain | None = None
    contributors: list[Contributor] = Field(default_factory=list)
    refused: Refusals = Field(default_factory=Refusals)
    verification: Verification | None = None
    loss_curve: list[LossPoint] = Field(default_factory=list)
    compute: Compute | None = None
    evaluation: Evaluation | None = None
    files: dict[str, str] = Field(default_factory=dict)  # exported file name -> sha256
    format_exported: Literal["hf", "gguf"] | None = None
    gguf: GgufInfo | None = None
    converted_from: ConvertedFrom | None = None
    distillation: Distillation | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as provenance.json holds it: the parts given, by their JSON names."""
        return self.model_dump(exclude_unset=True, by_alias=True)


# --------------------------------------------------------------------------- built from a run


def data_record(run: Run) -> DataInfo:
    idx = run.index
    shard = lambda e: ShardInfo(name=e.name, tokens=e.tokens, sha256=e.sha256)  # noqa: E731
    return DataInfo(
        sources=[SourceFile(**s) for s in idx.sources],
        tokenizer=TokenizerInfo(file="tokenizer.json", sha256=file_sha256(run.tokenizer_path),
                                vocab_size=idx.vocab_size, type="byte-level BPE"),
        train_shards=[shard(e) for e in idx.train],
        val_shards=[shard(e) for e in idx.val],
        train_tokens=idx.train_tokens,
        val_tokens=idx.val_tokens,
        val_fraction=run.config.data.val_fraction,
    )


def hyperparameters(run: Run) -> Hyperparameters:
    cfg = run.config
    return Hyperparameters(seed=cfg.seed, eval_tokens=cfg.eval_tokens, train=asdict(cfg.train),
                           swarm=asdict(cfg.swarm), data=asdict(cfg.data))


def _checkpoint_metas(run: Run, upto: int) -> dict[int, dict]:
    out = {}
    for r in list_checkpoints(run.ckpt_dir):
        if r <= upto:
            try:
                out[r] = read_meta(run.ckpt_dir, r)
            except CrowdtrainError:
                continue
    return out


@dataclass
class SwarmRecord:
    """What the ledger says of the rounds before the exported checkpoint."""

    rounds: list[RoundRecord]
    chain: Chain
    contributors: list[Contributor]
    refused: Refusals
    verification: dict[str, int]  # Ledger.verification_totals
    volunteer_seconds: float
    contributions: int  # accepted
    bytes_in: int  # uploaded by the volunteers
    bytes_out: int  # downloaded by them


def _chain(genesis: dict | None, rounds: list[RoundRecord], upto: int) -> Chain:
    if genesis is None:
        return Chain(version=CHAIN_VERSION, genesis=None, head=None, complete=False)
    start = Genesis(**genesis, link=chain_genesis(genesis["checkpoint_sha256"]))
    chained = [r for r in rounds if r.round >= start.round]
    if not chained:
        return Chain(version=CHAIN_VERSION, genesis=start, head=None, complete=False)
    return Chain(version=CHAIN_VERSION, genesis=start, head=chained[-1].chain_link,
                 head_round=chained[-1].round,
                 complete=(all(r.chain_link for r in chained)
                           and chained[0].round == start.round
                           and len(chained) == upto - start.round))


def _contributors(ledger: Ledger, upto: int) -> list[Contributor]:
    rows = [v for v in ledger.contributor_totals(upto) if v["tokens"]]
    total = sum(int(v["tokens"]) for v in rows)
    return [Contributor(name=ANONYMOUS if v["anonymous"] else v["name"],
                        anonymous=bool(v["anonymous"]), tokens=int(v["tokens"]),
                        rounds=v["rounds"], accepted=v["accepted"], refused=v["refused"],
                        seconds=round(v["seconds"], 3),
                        share=int(v["tokens"]) / total if total else 0.0)
            for v in rows]


def _refusals(ledger: Ledger, upto: int) -> Refusals:
    by_reason: dict[str, int] = {}
    for c in ledger.refused_or_left_out(upto):
        key = refusal_category(c["reason"], left_out=c["status"] == "accepted")
        by_reason[key] = by_reason.get(key, 0) + 1
    return Refusals(total=sum(by_reason.values()),
                    by_reason=dict(sorted(by_reason.items(), key=lambda kv: -kv[1])))


def swarm_record(ledger: Ledger, upto: int, base_tokens: int = 0) -> SwarmRecord:
    """Rounds, chain, contributors, refusals and compute of rounds < `upto` from the ledger."""
    rows = [r for r in ledger.rounds() if r["round"] < upto and r["state"] == "closed"]
    rounds, tokens = [], base_tokens
    for r in rows:
        rounds.append(RoundRecord(
            round=r["round"], opened_at=r["opened_at"], closed_at=r["closed_at"],
            contributions=r["contributions"], refused=r["refused"],
            tokens=r["tokens"], tokens_before=tokens,
            train_loss=_finite(r["train_loss"]), val_loss=_finite(r["val_loss"]),
            bytes_in=r["bytes_in"], bytes_out=r["bytes_out"],
            update_sha256=r["update_sha256"],
            contribution_sha256s=ledger.aggregated_sha256s(r["round"]),
            checkpoint_sha256=r["checkpoint_sha256"], chain_link=r["chain_link"],
        ))
        tokens += r["tokens"]
    contributions, seconds = ledger.accepted_totals(upto)
    return SwarmRecord(
        rounds=rounds, chain=_chain(ledger.chain_genesis(), rounds, upto),
        contributors=_contributors(ledger, upto), refused=_refusals(ledger, upto),
        verification=ledger.verification_totals(upto), volunteer_seconds=seconds,
        contributions=contributions,
        bytes_in=sum(r.bytes_in for r in rounds), bytes_out=sum(r.bytes_out for r in rounds))


def _swarm(run: Run, metas: dict[int, dict], upto: int) -> SwarmRecord | None:
    """The swarm's part of checkpoint `upto`: None for a run that no swarm round trained."""
    if not run.ledger_path.is_file():
        return None
    ledger = Ledger(run.ledger_path)
    try:
        genesis = ledger.chain_genesis()
        base = 0
        if genesis and genesis["round"] in metas:
            base = int(metas[genesis["round"]].get("tokens_trained", 0))
        swarm = swarm_record(ledger, upto, base)
    finally:
        ledger.close()
    return swarm if swarm.rounds else None


def _verification(cfg, swarm: SwarmRecord) -> Verification:
    totals = dict(swarm.verification)
    revoked, copies = totals.pop("revoked", 0), totals.pop("copies", 0)
    return Verification(enabled=cfg.verify, replicated=cfg.fresh_leases,
                        rule=verification_rule(cfg.verify, cfg.fresh_leases),
                        outcomes=totals, revoked=revoked, copies=copies)


def _loss_curve(metas: dict[int, dict], meta: dict, swarm: SwarmRecord | None,
                measure_val_loss: Callable[[], float] | None) -> list[LossPoint]:
    upto = int(meta["round"])
    curve: dict[int, LossPoint] = {}
    for r, m in metas.items():
        if _finite(m.get("val_loss")) is not None:
            curve[r] = LossPoint(round=r, tokens_trained=int(m.get("tokens_trained", 0)),
                                 val_loss=m["val_loss"])
    for rr in swarm.rounds if swarm else []:
        if rr.val_loss is not None:
            curve[rr.round] = LossPoint(round=rr.round, tokens_trained=rr.tokens_before,
                                        val_loss=rr.val_loss)
    if _finite(meta.get("val_loss")) is not None:  # the exported checkpoint itself
        curve[upto] = LossPoint(round=upto, tokens_trained=int(meta.get("tokens_trained", 0)),
                                val_loss=meta["val_loss"])
    points = [curve[r] for r in sorted(curve)]
    if measure_val_loss is not None and (not points or points[-1].round != upto):
        # the curve's last point: the exported checkpoint, measured at export
        points.append(LossPoint(round=upto, tokens_trained=int(meta.get("tokens_trained", 0)),
                                val_loss=measure_val_loss()))
    return points


def architecture(config) -> str:
    """The model class a config names (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...)."""
    if config.architectures:
        return str(config.architectures[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)


def _source_fields(source) -> dict:
    """ModelInfo's fields about a fine-tuning run's pretrained source (none without one)."""
    if source is None:
        return {}
    return {"base_hub_id": source.hub_id, "base_weights_sha256": source.weights_sha256,
            "base_license": source.license, "dtype": source.dtype}


def build_provenance(run: Run, meta: dict, params: int, *, exported: Literal["hf", "gguf"],
                     files: dict[str, str], evaluation: Evaluation | None = None,
                     gguf: GgufInfo | None = None,
                     measure_val_loss: Callable[[], float] | None = None) -> Provenance:
    """The provenance record of checkpoint `meta["round"]` of `run`, exported as `exported`
    (with `gguf`, the GGUF file's record) into files whose sha256 are `files`. `evaluation`:
    the export's held-out figures; `measure_val_loss`: the exported model's loss on the run's
    validation windows, called when the run recorded none for that checkpoint."""
    upto = int(meta["round"])
    metas = _checkpoint_metas(run, upto)
    swarm = _swarm(run, metas, upto)
    tokens = int(meta.get("tokens_trained", 0))
    local_seconds = sum(float(m.get("seconds", 0) or 0) for m in metas.values()
                        if m.get("source") == "local")
    # the run owner's own steps before the swarm, counted apart (warmstart.py)
    warm = metas.get(0, {}).get("warm_start")
    cfg = run.config
    mc = run.model_config()
    lora = getattr(cfg, "lora", None)
    teacher = getattr(cfg, "teacher", None)
    return Provenance(
        format=FORMAT,
        crowdtrain_version=__version__,
        created_at=time.time(),
        run=RunInfo(name=cfg.name, preset=cfg.preset, created_at=cfg.created_at,
                    trained_by="swarm" if swarm else "local"),
        model=ModelInfo(
            architecture=architecture(mc), params=params,
            layers=mc.num_hidden_layers, hidden=mc.hidden_size,
            heads=mc.num_attention_heads, context=mc.max_position_embeddings,
            vocab_size=mc.vocab_size,
            checkpoint_round=upto, checkpoint_sha256=meta.get("sha256"),
            checkpoint_source=meta.get("source"),
            base_model=getattr(cfg, "base_model", None),
            base_sha256=getattr(cfg, "base_sha256", None),
            lora=lora.to_dict() if lora is not None else None,
            **_source_fields(getattr(cfg, "source", None)),
        ),
        data=data_record(run),
        hyperparameters=hyperparameters(run),
        training=Training(tokens_trained=tokens, inner_steps=int(meta.get("steps", 0)),
                          rounds=len(swarm.rounds) if swarm else 0, warm_start=warm,
                          teacher=asdict(teacher) if teacher else None),
        rounds=swarm.rounds if swarm else [],
        chain=swarm.chain if swarm else None,
        contributors=swarm.contributors if swarm else [],
        refused=swarm.refused if swarm else Refusals(total=0, by_reason={}),
        **({"verification": _verification(cfg.swarm, swarm)} if swarm else {}),
        loss_curve=_loss_curve(metas, meta, swarm, measure_val_loss),
        compute=Compute(
            tokens_trained=tokens,
            training_flops_estimate=6.0 * params * tokens,
            volunteer_seconds=swarm.volunteer_seconds if swarm else 0.0,
            local_seconds=local_seconds,
            warm_start_tokens=int((warm or {}).get("tokens", 0)),
            warm_start_seconds=float((warm or {}).get("seconds", 0.0)),
            contributions=swarm.contributions if swarm else 0,
            bytes_uploaded=swarm.bytes_in if swarm else 0,
            bytes_downloaded=swarm.bytes_out if swarm else 0,
        ),
        evaluation=evaluation,
        files=files,
        format_exported=exported,
        **({"gguf": gguf} if gguf is not None else {}),  # an HF export's record has none
    )


# --------------------------------------------------------------------------- the file


def write_provenance(out_dir: str | os.PathLike, record: Provenance) -> Path:
    p = Path(out_dir) / PROVENANCE_FILE
    p.write_text(json.dumps(record.to_json(), indent=1, allow_nan=False))
    return p


def read_provenance(model_dir: str | os.PathLike) -> Provenance:
    """The provenance record of the exported model in `model_dir`."""
    p = Path(model_dir) / PROVENANCE_FILE
    if not p.is_file():
        raise CrowdtrainError(f"{model_dir} has no {PROVENANCE_FILE}: export it with "
                              "`crowdtrain export RUN_DIR OUT_DIR`")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{p} is unreadable ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CorruptDataError(f"{p} is not a crowdtrain provenance record ({FORMAT})")
    try:
        return Provenance.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise CorruptDataError(f"{p} is not a valid crowdtrain provenance record: {where}: "
                               f"{first['msg']} ({e.error_count()} error(s))") from None


def load_provenance(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of `model_dir` as plain JSON (checked as `read_provenance` checks it), for
    tools that index it by key; crowdtrain reads it with `read_provenance`."""
    return read_provenance(model_dir).to_json()
