"""The provenance record of an exported model (`provenance.json`), gathered from a run.

What it holds: the data (source files, token shards and tokenizer, each with its sha256), the
hyperparameters, every round (contributions, tokens, losses, the sha256 of its published update
and resulting checkpoint, its chain link), the hash chain's start and head, each contributor's
share of the tokens (by the display name they chose, or "anonymous" when they opted out at
join), refused contributions counted by reason, the held-out loss curve and the total compute.
The model card (export.py) is rendered from this record, and `crowdtrain verify` (verify.py)
checks a model against it and the run.

Only the rounds before the exported checkpoint count: checkpoint N is the result of rounds
0..N-1. Everything here reads the run; nothing writes to it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict
from pathlib import Path

from crowdtrain import __version__
from crowdtrain.errors import CorruptDataError, CrowdtrainError
from crowdtrain.run.checkpoint import list_checkpoints, read_meta
from crowdtrain.run.data import file_sha256
from crowdtrain.run.folder import Run
from crowdtrain.run.ledger import CHAIN_VERSION, Ledger, chain_genesis

PROVENANCE_FILE = "provenance.json"
FORMAT = "crowdtrain-provenance-1"
ANONYMOUS = "anonymous"
LEDGER_FILE = "ledger.sqlite"


def _finite(x: float | None) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def finite(d: dict | None) -> dict | None:
    """`d` with its non-finite float values as None (JSON has no inf or nan)."""
    if d is None:
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in d.items()}


def refusal_category(reason: str | None, left_out: bool = False) -> str:
    """A reason without its particulars (ids, numbers), so equal causes count together."""
    if left_out:
        why = "norm not finite" if reason and "not finite" in reason else "norm outlier"
        return f"left out by robust aggregation ({why})"
    if not reason:
        return "unspecified"
    head = reason.split(":", 1)[0].strip()
    return re.sub(r"\d+(\.\d+)?", "N", head)


def data_record(run: Run) -> dict:
    idx = run.index
    shard = lambda e: {"name": e.name, "tokens": e.tokens, "sha256": e.sha256}  # noqa: E731
    return {
        "sources": [dict(s) for s in idx.sources],
        "tokenizer": {"file": "tokenizer.json", "sha256": file_sha256(run.tokenizer_path),
                      "vocab_size": idx.vocab_size, "type": "byte-level BPE"},
        "train_shards": [shard(e) for e in idx.train],
        "val_shards": [shard(e) for e in idx.val],
        "train_tokens": idx.train_tokens,
        "val_tokens": idx.val_tokens,
        "val_fraction": run.config.data.val_fraction,
    }


def hyperparameters(run: Run) -> dict:
    cfg = run.config
    return {"seed": cfg.seed, "eval_tokens": cfg.eval_tokens, "train": asdict(cfg.train),
            "swarm": asdict(cfg.swarm), "data": asdict(cfg.data)}


def _checkpoint_metas(run: Run, upto: int) -> dict[int, dict]:
    out = {}
    for r in list_checkpoints(run.ckpt_dir):
        if r <= upto:
            try:
                out[r] = read_meta(run.ckpt_dir, r)
            except CrowdtrainError:
                continue
    return out


def swarm_record(ledger: Ledger, upto: int, base_tokens: int = 0) -> dict:
    """Rounds, chain, contributors, refusals and compute of rounds < `upto` from the ledger."""
    rows = [r for r in ledger.rounds() if r["round"] < upto and r["state"] == "closed"]
    rounds, tokens = [], base_tokens
    for r in rows:
        rounds.append({
            "round": r["round"], "opened_at": r["opened_at"], "closed_at": r["closed_at"],
            "contributions": r["contributions"], "refused": r["refused"],
            "tokens": r["tokens"], "tokens_before": tokens,
            "train_loss": _finite(r["train_loss"]), "val_loss": _finite(r["val_loss"]),
            "bytes_in": r["bytes_in"], "bytes_out": r["bytes_out"],
            "update_sha256": r["update_sha256"],
            "contribution_sha256s": ledger.aggregated_sha256s(r["round"]),
            "checkpoint_sha256": r["checkpoint_sha256"], "chain_link": r["chain_link"],
        })
        tokens += r["tokens"]
    genesis = ledger.chain_genesis()
    chain = {"version": CHAIN_VERSION, "genesis": None, "head": None, "complete": False}
    if genesis is not None:
        chain["genesis"] = {**genesis, "link": chain_genesis(genesis["checkpoint_sha256"])}
        chained = [r for r in rounds if r["round"] >= genesis["round"]]
        if chained:
            chain["head"] = chained[-1]["chain_link"]
            chain["head_round"] = chained[-1]["round"]
            chain["complete"] = (all(r["chain_link"] for r in chained)
                                 and chained[0]["round"] == genesis["round"]
                                 and len(chained) == upto - genesis["round"])
    contributors = []
    for v in ledger.contributor_totals(upto):
        if not v["tokens"]:
            continue
        contributors.append({"name": ANONYMOUS if v["anonymous"] else v["name"],
                             "anonymous": bool(v["anonymous"]), "tokens": int(v["tokens"]),
                             "rounds": v["rounds"], "accepted": v["accepted"],
                             "refused": v["refused"], "seconds": round(v["seconds"], 3)})
    total = sum(c["tokens"] for c in contributors)
    for c in contributors:
        c["share"] = c["tokens"] / total if total else 0.0
    by_reason: dict[str, int] = {}
    for c in ledger.refused_or_left_out(upto):
        key = refusal_category(c["reason"], left_out=c["status"] == "accepted")
        by_reason[key] = by_reason.get(key, 0) + 1
    contributions, seconds = ledger.accepted_totals(upto)
    return {
        "rounds": rounds, "chain": chain, "contributors": contributors,
        "refused": {"total": sum(by_reason.values()),
                    "by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1]))},
        "volunteer_seconds": seconds, "contributions": contributions,
        "bytes_in": sum(r["bytes_in"] for r in rounds),
        "bytes_out": sum(r["bytes_out"] for r in rounds),
    }


def build_provenance(run: Run, meta: dict, params: int, evaluation: dict | None = None) -> dict:
    """The provenance record of checkpoint `meta["round"]` of `run` (no file hashes of the
    export yet: the exporter adds them under "files")."""
    upto = int(meta["round"])
    metas = _checkpoint_metas(run, upto)
    ledger_path = run.dir / LEDGER_FILE
    swarm = None
    if ledger_path.is_file():
        ledger = Ledger(ledger_path)
        try:
            genesis = ledger.chain_genesis()
            base = 0
            if genesis and genesis["round"] in metas:
                base = int(metas[genesis["round"]].get("tokens_trained", 0))
            swarm = swarm_record(ledger, upto, base)
        finally:
            ledger.close()
    if swarm is not None and not swarm["rounds"]:
        swarm = None
    curve: dict[int, dict] = {}
    for r, m in metas.items():
        if _finite(m.get("val_loss")) is not None:
            curve[r] = {"round": r, "tokens_trained": int(m.get("tokens_trained", 0)),
                        "val_loss": m["val_loss"]}
    for r in (swarm or {}).get("rounds", []):
        if r["val_loss"] is not None:
            curve[r["round"]] = {"round": r["round"], "tokens_trained": r["tokens_before"],
                                 "val_loss": r["val_loss"]}
    if _finite(meta.get("val_loss")) is not None:  # the exported checkpoint itself
        curve[upto] = {"round": upto, "tokens_trained": int(meta.get("tokens_trained", 0)),
                       "val_loss": meta["val_loss"]}
    tokens = int(meta.get("tokens_trained", 0))
    local_seconds = sum(float(m.get("seconds", 0) or 0) for m in metas.values()
                        if m.get("source") == "local")
    # the run owner's own steps before the swarm, counted apart (warmstart.py)
    warm = metas.get(0, {}).get("warm_start")
    cfg = run.config
    mc = run.model_config()
    return {
        "format": FORMAT,
        "crowdtrain_version": __version__,
        "created_at": time.time(),
        "run": {"name": cfg.name, "preset": cfg.preset, "created_at": cfg.created_at,
                "trained_by": "swarm" if swarm else "local"},
        "model": {
            "architecture": "LlamaForCausalLM", "params": params,
            "layers": mc.num_hidden_layers, "hidden": mc.hidden_size,
            "heads": mc.num_attention_heads, "context": mc.max_position_embeddings,
            "vocab_size": mc.vocab_size,
            "checkpoint_round": upto, "checkpoint_sha256": meta.get("sha256"),
            "checkpoint_source": meta.get("source"),
            "base_model": getattr(cfg, "base_model", None),
            "base_sha256": getattr(cfg, "base_sha256", None),
            "lora": cfg.lora.to_dict() if getattr(cfg, "lora", None) is not None else None,
        },
        "data": data_record(run),
        "hyperparameters": hyperparameters(run),
        "training": {"tokens_trained": tokens, "inner_steps": int(meta.get("steps", 0)),
                     "rounds": len(swarm["rounds"]) if swarm else 0,
                     "warm_start": warm,
                     # a distillation run: every inner step learned from this teacher
                     "teacher": asdict(cfg.teacher) if getattr(cfg, "teacher", None) else None},
        "rounds": swarm["rounds"] if swarm else [],
        "chain": swarm["chain"] if swarm else None,
        "contributors": swarm["contributors"] if swarm else [],
        "refused": swarm["refused"] if swarm else {"total": 0, "by_reason": {}},
        "loss_curve": [curve[r] for r in sorted(curve)],
        "compute": {
            "tokens_trained": tokens,
            "training_flops_estimate": 6.0 * params * tokens,
            "volunteer_seconds": swarm["volunteer_seconds"] if swarm else 0.0,
            "local_seconds": local_seconds,
            "warm_start_tokens": int((warm or {}).get("tokens", 0)),
            "warm_start_seconds": float((warm or {}).get("seconds", 0.0)),
            "contributions": swarm["contributions"] if swarm else 0,
            "bytes_uploaded": swarm["bytes_in"] if swarm else 0,
            "bytes_downloaded": swarm["bytes_out"] if swarm else 0,
        },
        "evaluation": evaluation,
        "files": {},
    }


def write_provenance(out_dir: str | os.PathLike, record: dict) -> Path:
    p = Path(out_dir) / PROVENANCE_FILE
    p.write_text(json.dumps(record, indent=1, allow_nan=False))
    return p


def load_provenance(model_dir: str | os.PathLike) -> dict:
    p = Path(model_dir) / PROVENANCE_FILE
    if not p.is_file():
        raise CrowdtrainError(f"{model_dir} has no {PROVENANCE_FILE}: export it with "
                              "`crowdtrain export RUN_DIR OUT_DIR`")
    try:
        record = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{p} is unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptDataError(f"{p} is not a crowdtrain provenance record ({FORMAT})")
    return record
