"""What the coordinator publishes about its run: `RunInfo` (`GET /v1/info`: what a worker needs
to take part: model, schedule, shards, LoRA base, teacher) from the run directory, and the
public status (`GET /v1/status`: the dashboard, `/metrics` and `crowdtrain status` read it)
from the ledger: rounds, volunteers (by display name, or "anonymous"), the latest refusals and
contributions left out (with their reasons) and the open round's deadline."""

from __future__ import annotations

import json

from crowdtrain.run.folder import TEACHER_CONFIG, TEACHER_WEIGHTS, Run
from crowdtrain.run.ledger import Ledger
from crowdtrain.wire import codecs
from crowdtrain.wire.protocol import (
    API_VERSION,
    Refusal,
    RoundSummary,
    RunInfo,
    ShardInfo,
    Status,
    SwarmSchedule,
    TeacherInfo,
    VolunteerSummary,
)


def run_info(run: Run, *, round: int, finished: bool, params: int,
             teacher: TeacherInfo | None) -> RunInfo:
    """The run as a worker sees it with round `round` open (H may depend on the round)."""
    rc, sw = run.config, run.config.swarm
    lora = rc.lora is not None
    return RunInfo(
        api_version=API_VERSION, run_name=rc.name, preset=rc.preset,
        model_config_json=run.model_config().to_dict(), train=rc.train.__dict__,
        schedule=SwarmSchedule(inner_steps=sw.round_steps(round),
                               inner_steps_growth=sw.inner_steps_growth,
                               round_seconds=sw.round_seconds, rounds=sw.rounds,
                               min_contributions=sw.min_contributions, codec=sw.codec,
                               block=codecs.default_block(sw.codec),
                               sparse_k=sw.codec_options().get("k"),
                               sparse_bits=sw.codec_options().get("bits"),
                               sparse_ef_decay=sw.sparse_ef_decay if sw.codec == "sparse"
                               else None,
                               overlap=sw.overlap, stale_weight=sw.stale_weight),
        dtype=run.index.dtype,
        train_shards=[ShardInfo(name=e.name, sha256=e.sha256, tokens=e.tokens,
                                mask_sha256=e.mask_sha256) for e in run.index.train],
        round=round, finished=finished, params=params,
        lora=rc.lora.to_dict() if lora else None,
        base_sha256=rc.base_sha256 if lora else None,
        base_bytes=run.base_path.stat().st_size if lora else None,
        teacher=teacher)


def teacher_info(run: Run) -> TeacherInfo | None:
    """A distillation run's teacher as workers fetch it (None for other runs)."""
    t = run.config.teacher
    if t is None:
        return None
    md = run.model_dir
    return TeacherInfo(name=t.name, sha256=t.sha256, bytes=(md / TEACHER_WEIGHTS).stat().st_size,
                       config_json=json.loads((md / TEACHER_CONFIG).read_text()),
                       alpha=t.alpha, temperature=t.temperature)


def run_status(ledger: Ledger, *, run_name: str, round: int, finished: bool, params: int,
               payload_bytes: int, min_contributions: int = 1, max_extensions: int = 3
               ) -> Status:
    """`round` is the open round; `params` the model's parameters; `payload_bytes` one
    contribution's size on the wire; the round's closing rule (`min_contributions`,
    `max_extensions`) explains a round that waits."""
    rounds = [RoundSummary(
        round=r["round"], state=r["state"], opened_at=r["opened_at"],
        closed_at=r["closed_at"], contributions=r["contributions"], refused=r["refused"],
        tokens=r["tokens"], train_loss=r["train_loss"], val_loss=r["val_loss"],
        bytes_in=r["bytes_in"], bytes_out=r["bytes_out"]) for r in ledger.rounds()]
    vols = [VolunteerSummary(
        name="anonymous" if v["anonymous"] else v["name"], device=v["device"],
        last_seen=v["last_seen"], rounds=v["rounds"],
        tokens=int(v["credit_tokens"]), accepted=v["accepted"], refused=v["refused"],
        tokens_per_s=v["tokens_per_s"], left_out=v["left_out"],
        provisional=v["provisional"]) for v in ledger.volunteers()]
    first = ledger.round_row(0)
    # refused on arrival, or accepted and then left out of the round (robust aggregation,
    # the verification: the reason says which)
    refusals = [Refusal(round=r["round"], volunteer="anonymous" if r["anonymous"] else r["name"],
                        reason=r["reason"] or "left out", at=r["received_at"],
                        left_out=bool(r["left_out"])) for r in ledger.latest_refusals(50)]
    current = ledger.round_row(round)
    live = current is not None and not finished
    waiting = None
    if live and (n := len(ledger.accepted(round))) < min_contributions:
        left = max_extensions - current["extensions"]
        waiting = (f"{n} of {min_contributions} contribution(s) needed; deadline extended "
                   f"{current['extensions']} of {max_extensions} time(s)"
                   + (", then it closes with what it has" if left <= 0 else
                      f"; {left} more extension(s) at most, then it closes with what it has"))
    return Status(
        api_version=API_VERSION, run_name=run_name, round=round, finished=finished,
        params=params, payload_bytes=payload_bytes, full_model_bytes=4 * params, rounds=rounds,
        volunteers=vols, initial_val_loss=first["val_loss"] if first else None,
        refusals=refusals,
        round_deadline=current["deadline"] if live else None,
        round_extensions=current["extensions"] if live else 0, round_waiting=waiting)
