"""A round in progress, kept on the volunteer's disk so that a worker that dies mid-round (a
crash, a reboot, SIGKILL, a laptop lid) picks the round up where it stopped.

While it trains, the worker snapshots its local parameters, its AdamW state and the steps done
so far (`RoundSnapshots`: written atomically; the first after `min_interval` seconds, then as
often as keeps their cost under ~1% of the training time, and when training ends if one is due, so
a worker killed while uploading usually resends instead of retraining). On restart it asks for
that lease back (`LeaseRequest.resume`); if the round is still open, the coordinator hands the
same lease back and the worker trains only the steps that remain: the same batches, the same
schedule positions, the same int8 error-feedback residual: the same upload, bit for bit, as a
worker that never died would have sent.
Otherwise the snapshot is dropped.

The file is this machine's own (never sent, never received), read with safetensors only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.checkpoint import atomic_write, check_tensors_match, read_tensor_file
from crowdtrain.run.train import StepStats
from crowdtrain.wire import protocol

log = logging.getLogger(__name__)

PARAM, OPT, RESIDUAL, ANCHOR = "param/", "opt/", "residual/", "anchor/"


@dataclass
class PartialRound:
    """What a worker had done of `lease` when it last snapshotted."""

    lease: protocol.Lease
    theta_round: int  # the round of the parameters the local training started from
    stats: StepStats  # steps, tokens, mean loss and seconds trained so far
    params: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    # the int8 error-feedback residual the worker carried into this round (None: none yet)
    residual: dict[str, torch.Tensor] | None = None
    # a lease trained ahead (overlapped rounds), snapshotted before theta of its round was
    # folded in: the worker's own parameters it started from, which the contribution and the
    # pending fold are measured against (crowdtrain.volunteer.overlap); None: theta_round's
    anchor: dict[str, torch.Tensor] | None = None

    def matches(self, lease: protocol.Lease, theta_round: int | None) -> bool:
        """Whether `lease` (from the coordinator) is this snapshot's lease, resumable from
        parameters of round `theta_round` (or, trained ahead, from its own anchor)."""
        return (lease.lease_id == self.lease.lease_id and lease.round == self.lease.round
                and (self.anchor is not None or self.theta_round == lease.round == theta_round)
                and self.stats.steps <= lease.max_steps)


def merge_stats(before: StepStats, after: StepStats) -> StepStats:
    """The statistics of a lease trained in two pieces (before and after a restart)."""
    steps = before.steps + after.steps
    loss = (before.mean_loss * before.steps + after.mean_loss * after.steps) / max(steps, 1)
    return StepStats(steps, before.tokens + after.tokens, loss, before.seconds + after.seconds)


def save_partial(path: Path, part: PartialRound) -> None:
    tensors = {PARAM + k: v.detach().to("cpu").float().contiguous()
               for k, v in part.params.items()}
    tensors.update({OPT + k: v for k, v in part.optimizer.items()})
    tensors.update({RESIDUAL + k: v.contiguous() for k, v in (part.residual or {}).items()})
    tensors.update({ANCHOR + k: v.contiguous() for k, v in (part.anchor or {}).items()})
    meta = {"lease": part.lease.model_dump_json(), "theta_round": str(part.theta_round),
            "stats": json.dumps([part.stats.steps, part.stats.tokens, part.stats.mean_loss,
                                 part.stats.seconds])}
    atomic_write(path, st_save(tensors, metadata=meta))


def load_partial(path: Path, model_params: dict[str, torch.Tensor]) -> PartialRound | None:
    """The snapshot at `path` if there is one and it fits this model; None otherwise (a
    damaged or foreign file is logged and ignored: the worker then starts the round afresh).
    Temporary files of a snapshot whose writing was interrupted are removed."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    if not path.is_file():
        return None
    try:
        tensors, meta = read_tensor_file(path, "saved round in progress")
        lease = protocol.Lease.model_validate_json(meta["lease"])
        steps, tokens, loss, seconds = json.loads(meta["stats"])
        stats = StepStats(int(steps), int(tokens), float(loss), float(seconds))
        params = {k[len(PARAM):]: v for k, v in tensors.items() if k.startswith(PARAM)}
        check_tensors_match(params, model_params, "saved round in progress")
        opt = {k[len(OPT):]: v for k, v in tensors.items() if k.startswith(OPT)}
        residual = {k[len(RESIDUAL):]: v for k, v in tensors.items() if k.startswith(RESIDUAL)}
        if residual:
            check_tensors_match(residual, model_params, "saved error-feedback residual")
        anchor = {k[len(ANCHOR):]: v for k, v in tensors.items() if k.startswith(ANCHOR)}
        if anchor:
            check_tensors_match(anchor, model_params, "saved anchor of a lease ahead")
        if stats.steps < 1:
            raise ValueError("no steps recorded")
        return PartialRound(lease, int(meta["theta_round"]), stats, params, opt,
                            residual or None, anchor or None)
    except (CrowdtrainError, KeyError, ValueError, TypeError, OSError) as e:
        log.warning("ignoring the saved round in progress at %s (%s)", path, e)
        path.unlink(missing_ok=True)
        return None


class RoundSnapshots:
    """Decides when to snapshot the round in progress, and writes it.

    `due()` is cheap (a clock read) and is asked between inner steps; `save(stats)` writes the
    snapshot. The interval adapts to the snapshot's own cost so it stays under `max_overhead`
    of the time spent training (a large model on a slow disk snapshots seldom, a small one
    every `min_interval` seconds)."""

    def __init__(self, path: Path, lease: protocol.Lease, theta_round: int,
                 state: Callable[[], tuple[dict, dict, dict | None, dict | None]],
                 before: StepStats | None = None,
                 min_interval: float = 2.0, max_overhead: float = 0.01):
        self.path, self.lease, self.theta_round = path, lease, theta_round
        # () -> (parameters, optimizer tensors, residual or None, anchor or None), on CPU
        self.state = state
        self.before = before  # what an earlier life of this worker did of the lease
        self.min_interval, self.max_overhead = min_interval, max_overhead
        self.interval = min_interval
        self.last = time.monotonic()
        self.saved = 0

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def save(self, stats: StepStats) -> None:
        t0 = time.monotonic()
        params, opt, residual, anchor = self.state()
        total = stats if self.before is None else merge_stats(self.before, stats)
        try:
            save_partial(self.path, PartialRound(self.lease, self.theta_round, total, params,
                                                 opt, residual, anchor))
        except OSError as e:  # a full disk must not stop the training itself
            log.warning("cannot save the round in progress (%s); training goes on", e)
        cost = time.monotonic() - t0
        self.last = time.monotonic()
        self.interval = max(self.min_interval, cost / self.max_overhead)
        self.saved += 1

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
