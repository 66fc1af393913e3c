"""Ranks 1..N-1 of a volunteer of several processes (`join --nproc N`, torchrun): they train
what rank 0 (the Worker, which alone talks to the coordinator) hands over through
crowdtrain.volunteer.ranks, lease by lease, until it says exit."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from crowdtrain.run.data import get_batch
from crowdtrain.run.model import (
    build_model,
    config_from_dict,
    load_frozen,
    load_into,
    state_dict_for_save,
)
from crowdtrain.run.train import InnerLoop, Teacher, TrainConfig
from crowdtrain.volunteer.config import WorkerConfig, WorkerSummary
from crowdtrain.volunteer.ranks import Ranks
from crowdtrain.wire import protocol


def _batch(shards: list[np.ndarray], masks: list[np.ndarray] | None, tcfg: TrainConfig,
           seed: int, step: int):
    return get_batch(shards, tcfg.batch_size, tcfg.seq_len, seed, step, masks)


def follow(cfg: WorkerConfig, ranks: Ranks) -> WorkerSummary:
    """Ranks 1..N-1 of a volunteer: train what rank 0 hands over, until it says exit."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = protocol.RunInfo.model_validate(ranks.bcast_json())
    tcfg = TrainConfig(**info.train)
    if info.lora is None:
        model = build_model(config_from_dict(info.model_config_json))
    else:  # rank 0 names the base weights it cached (and checked)
        from crowdtrain.run.lora import LoraSettings, build_lora_model, load_base

        base = load_base(ranks.bcast_json()["base"], info.base_sha256 or "")
        model = build_lora_model(config_from_dict(info.model_config_json),
                                 LoraSettings(**info.lora), base)
    shapes = {k: tuple(v.shape) for k, v in state_dict_for_save(model).items()}
    teacher = None
    if info.teacher is not None:  # rank 0 names the teacher weights it cached (and checked)
        t = info.teacher
        teacher = Teacher(load_frozen(t.config_json, Path(ranks.bcast_json()["teacher"]),
                                      t.sha256), t.alpha, t.temperature)
    loop = InnerLoop(model, tcfg, ranks.device, ranks=ranks.world, rank=ranks.rank,
                     compile_backend="inductor" if cfg.compile else None, teacher=teacher)
    rounds = 0
    while True:
        msg = ranks.bcast_json()
        if msg["cmd"] == "exit":
            return WorkerSummary(rounds=rounds, reason=f"rank {ranks.rank} of {ranks.world}")
        lease = protocol.Lease.model_validate(msg["lease"])
        load_into(model, ranks.bcast_tensors(None, shapes))
        if msg["optimizer"]:
            loop.load_optimizer_tensors(ranks.bcast_tensors(None, msg["optimizer"]))
        elif lease.fresh:  # new AdamW state, as rank 0's (worker.round)
            loop.reset_optimizer()
        shards = [np.fromfile(p, dtype=info.dtype) for p in msg["shards"]]
        masks = [np.fromfile(p, dtype=np.uint8) for p in msg["masks"]] \
            if msg.get("masks") else None
        loop.run(functools.partial(_batch, shards, masks, tcfg, lease.seed), lease.start_step,
                 lease.max_steps)
        rounds += 1
