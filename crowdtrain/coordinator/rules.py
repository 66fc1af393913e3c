"""The coordinator's logic: rounds, leases, contributions, the DiLoCo outer step. No HTTP here
(server.py is the transport), so every rule is testable by calling methods.

A round r, top to bottom:
1. `lease()` hands each volunteer a lease on round r: shards to sample, a batch seed, the global
   schedule position, a budget of inner steps and seconds (whichever first) ending before the
   round's deadline. A volunteer joining mid-round gets the rest of the open round.
2. `submit()` validates the compressed pseudo-gradient (shapes, finiteness, lease, round,
   replay), writes it to disk, records it in the ledger, and only then says OK.
3. `tick()` closes the round at its deadline, or as soon as every leased volunteer has reported,
   provided at least `min_contributions` were accepted (otherwise the deadline is extended).
4. `close_round()`: token-weighted mean of the deltas -> outer Nesterov SGD -> the update,
   quantised to int8 with coordinator-side error feedback, published as `updates/update-r`;
   theta_{r+1} = theta_r + dequant(update_r) exactly as every worker computes it; checkpoint
   r+1 written atomically; round r+1 opened; the new model evaluated in the background
   (roundeval.py). The close runs off the request path (`closing`): no request waits for it.

Overlapped rounds (`init --overlap`; crowdtrain.volunteer.overlap): a volunteer that has sent
round r's work, or is uploading it, and asks `ahead` gets its lease on round r+1 at once,
before round r closes (never two rounds ahead); its contribution goes into round r+1. Each
round's leases are paced (pacing.py) to end their training when the fastest volunteer
finishes the round's steps, so slower ones train fewer steps instead of holding the round back.
A contribution that arrives after its round closed (its lease was still open then) goes into
the next round at `stale_weight` of its weight, with the reason in the ledger; later than that
it is refused as stale, with the reason in the ledger too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crowdtrain.coordinator import owner
from crowdtrain.coordinator.aggregation import RobustConfig, block_for, robust_aggregate
from crowdtrain.coordinator.closecheck import RoundChecker
from crowdtrain.coordinator.pacing import Pacer
from crowdtrain.coordinator.payloads import check_payload_file, open_payload
from crowdtrain.coordinator.public import PublicFolder
from crowdtrain.coordinator.reports import run_info, run_status, teacher_info
from crowdtrain.coordinator.roundeval import RoundEvaluator
from crowdtrain.errors import Refused
from crowdtrain.run.checkpoint import (
    atomic_move,
    atomic_write,
    list_checkpoints,
    meta_path,
    save_checkpoint,
    tensor_path,
)
from crowdtrain.run.data import mask_name
from crowdtrain.run.folder import TEACHER_WEIGHTS, Run
from crowdtrain.run.ledger import Ledger
from crowdtrain.run.model import count_params
from crowdtrain.wire import codecs
from crowdtrain.wire.outer import OuterConfig, apply_update, outer_step
from crowdtrain.wire.protocol import (
    INT64_MAX,
    LEASE_SILENCE_SECONDS,
    AdminAck,
    AdminVolunteer,
    Alive,
    AliveResponse,
    Artifacts,
    JoinRequest,
    JoinResponse,
    Lease,
    LeaseRequest,
    LeaseResponse,
    RunInfo,
    Status,
    SubmitResponse,
    SubmitStats,
)

log = logging.getLogger(__name__)

MIN_LEASE_SECONDS = 2.0
# volunteers waiting for their round to close ask again every max(0.5 s, leases of the round /
# this): 100 volunteers every 2.5 s. At 0.5 s, 100 volunteers' 200 requests a second held the
# GIL for ~1.5 s of a 4.8 s close of 100 x 10M (bench/coordinator_load.py)
WAIT_POLLS_PER_SECOND = 40.0


@dataclass
class Volunteer:
    id: int
    name: str
    banned: bool = False


UPDATES_ANNOUNCED = 32  # the latest rounds' updates a worker may replay instead of the model


class Coordinator:
    def __init__(self, run: Run, evaluate_rounds: bool = True, public_url: str | None = None):
        """`public_url`: where volunteers fetch the run's immutable files (a web server serving
        the public folder); None: from this coordinator."""
        self.run = run
        self.public_url = public_url.rstrip("/") if public_url else None
        self.cfg = run.config.swarm
        self.tcfg = run.config.train
        self.lock = threading.RLock()
        self.closing: int | None = None  # the round being aggregated (close_round), if any
        self.close_failure: str | None = None  # why the last close failed, until one succeeds
        self.ledger = Ledger(run.ledger_path)
        run.updates_dir.mkdir(exist_ok=True)
        run.contributions_dir.mkdir(exist_ok=True)
        # uploads are spooled here while they arrive and are checked; never read back after a
        # restart (a half-received upload was never acknowledged)
        shutil.rmtree(run.spool_dir, ignore_errors=True)
        run.spool_dir.mkdir()
        model, ckpt = run.load_model()
        self.model = model.eval()
        self.round = ckpt.round
        self.ckpt_meta = ckpt.meta
        self.theta = {k: v.clone() for k, v in ckpt.tensors.items()}
        self.shapes = {k: tuple(v.shape) for k, v in self.theta.items()}
        # the model's parameters (a LoRA run: the frozen base's) and those that travel
        self.wire_params = sum(v.numel() for v in self.theta.values())
        self.params = count_params(model) - (self.wire_params if run.config.lora else 0)
        # one contribution's tensor bytes, parameter by parameter, in the run's codec (and its
        # k and bits); the largest accepted upload is that plus header room
        self.wire_bytes = sum(codecs.payload_bytes(v.numel(), self.cfg.codec,
                                                   **self.cfg.codec_options())
                              for v in self.theta.values())
        self.upload_limit = self.wire_bytes + (1 << 20)
        self.base_path = run.base_path if run.config.lora is not None else None
        if run.config.teacher is not None:  # what volunteers will fetch must be there, intact
            run.check_teacher()
        self.teacher_info = teacher_info(run)  # fixed for the run: read once
        self.momentum, self.residual = self._load_outer_state(self.round)
        # what volunteers may download by sha256: the train shards and a chat run's masks
        self.shard_paths = {e.sha256: run.data_dir / e.name for e in run.index.train}
        self.shard_paths.update({e.mask_sha256: run.data_dir / mask_name(e.name)
                                 for e in run.index.train if e.mask_sha256})
        self._recover_ledger()
        self.checker = RoundChecker(run, self.ledger, self.shapes)
        self.public = PublicFolder(run.public_dir)
        self._announce_all()
        # response bytes per route, counted by the HTTP transport (Status.bytes_served)
        self.served: Counter[str] = Counter()
        self.pacer = Pacer(self.cfg.overlap, self.cfg.round_seconds)  # overlapped rounds' pace
        self.evaluator = RoundEvaluator(run, self.ledger, self.model) if evaluate_rounds \
            else None
        if self.evaluator is not None and self.ledger.round_row(self.round)["val_loss"] is None:
            self.evaluator.submit(self.round)

    # ------------------------------------------------------------------ the public folder

    def _announce_all(self) -> None:
        """Link what volunteers may download into the public folder: the shards and masks,
        the base and the teacher, the open round's checkpoint and the latest updates."""
        for sha, path in self.shard_paths.items():
            self.public.add(path, sha)
        if self.base_path is not None:
            self.public.add(self.base_path, self.run.config.base_sha256)
        if self.run.config.teacher is not None:
            self.public.add(self.run.model_dir / TEACHER_WEIGHTS, self.run.config.teacher.sha256)
        self.updates: dict[int, str] = {}
        for row in self.ledger.rounds():
            rnd, sha = row["round"], row["update_sha256"]
            if sha and self.round - UPDATES_ANNOUNCED <= rnd < self.round \
                    and self.run.update_path(rnd).is_file():
                self._announce_update(rnd, sha)
        self.public.add(tensor_path(self.run.ckpt_dir, self.round), self.ckpt_meta["sha256"],
                        model=True)

    def _announce_update(self, rnd: int, sha256: str) -> None:
        self.public.add(self.run.update_path(rnd), sha256)
        self.updates[rnd] = sha256
        for old in [r for r in self.updates if r < rnd - UPDATES_ANNOUNCED + 1]:
            self.updates.pop(old)

    def artifacts(self) -> Artifacts:
        """What a worker may fetch now, by sha256 (from `public_url` or GET BLOB)."""
        with self.lock:
            size = self.ckpt_meta.get("bytes") or \
                tensor_path(self.run.ckpt_dir, self.round).stat().st_size
            return Artifacts(round=self.round, model_sha256=self.ckpt_meta["sha256"],
                             model_bytes=int(size), updates=dict(self.updates))

    def count_served(self, route: str, n: int) -> None:
        """`n` response bytes sent on `route` (the HTTP transport's count, per route)."""
        with self.lock:
            self.served[route] += n

    # ------------------------------------------------------------------ state on disk

    def _load_outer_state(self, rnd: int):
        p = self.run.outer_path(rnd)
        residual = {k: torch.zeros_like(v) for k, v in self.theta.items()}
        if not p.is_file():
            return None, residual
        t = st_load(p.read_bytes())  # our own file, written atomically by close_round
        # no momentum yet when every round so far was empty
        momentum = {k: t[f"momentum:{k}"] for k in self.theta} if any(
            name.startswith("momentum:") for name in t) else None
        residual = {k: t[f"residual:{k}"] for k in self.theta}
        return momentum, residual

    def _recover_ledger(self) -> None:
        """Make the ledger agree with the checkpoints after a restart or a crash mid-close."""
        for row in self.ledger.rounds():
            if row["state"] == "open" and row["round"] < self.round:
                upd = self.run.update_path(row["round"])
                sha = hashlib.sha256(upd.read_bytes()).hexdigest() if upd.exists() else ""
                self.ledger.close_round(row["round"], sha)
        if self.ledger.round_row(self.round) is None:
            self.ledger.open_round(self.round, time.time() + self.cfg.round_seconds)

    @property
    def finished(self) -> bool:
        return (bool(self.cfg.rounds) and self.round >= self.cfg.rounds) or self.ended is not None

    @property
    def ended(self) -> str | None:
        """Why the owner ended the run, or None."""
        return self.ledger.get_meta("ended")

    # ------------------------------------------------------------------ join and info

    def join(self, req: JoinRequest) -> JoinResponse:
        if self.cfg.access == "invite":
            if not req.invite or not self.ledger.use_invite(req.invite):
                raise Refused(403, "this run is invite-only and the key is missing, unknown or "
                                   "used up: ask the owner for one (`crowdtrain invite RUN_DIR`) "
                                   "and join with --invite KEY")
        vid, token = self.ledger.add_volunteer(req.name, req.device, anonymous=req.anonymous)
        log.info("volunteer %d (%s, %s) joined", vid, req.name, req.device)
        return JoinResponse(volunteer_id=vid, name=req.name, token=token)

    def authenticate(self, token: str) -> Volunteer:
        row = self.ledger.volunteer_by_token(token)
        if row is None:
            raise Refused(401, "unknown volunteer token: join again with `crowdtrain join URL`")
        if row["banned"]:
            raise Refused(403, "this volunteer is banned from the run")
        return Volunteer(row["id"], row["name"], bool(row["banned"]))

    def info(self) -> RunInfo:
        info = run_info(self.run, round=self.round, finished=self.finished, params=self.params,
                        teacher=self.teacher_info)
        return info.model_copy(update={"public_url": self.public_url})

    # ------------------------------------------------------------------ the owner's controls
    # (the rules are owner.py's, shared with `crowdtrain admin RUN_DIR`)

    def new_admin_token(self, rotate: bool = False) -> str | None:
        """The owner's admin token, returned once; None if one exists and not `rotate`."""
        return owner.new_admin_token(self.ledger, rotate)

    def check_admin(self, token: str) -> None:
        """Refuse (403) anything but the owner's admin token."""
        owner.check_admin(self.ledger, token)

    def admin_volunteers(self) -> list[AdminVolunteer]:
        return owner.volunteers(self.ledger)

    def set_banned(self, who: str, banned: bool) -> AdminAck:
        """Ban or unban a volunteer by id or name."""
        return owner.set_banned(self.ledger, who, banned)

    def end_run(self) -> AdminAck:
        """The owner ends the run: no more leases; workers are told so and exit."""
        return owner.end_run(self.ledger)

    # ------------------------------------------------------------------ model downloads

    def model_file(self) -> tuple[int, Path, str]:
        """The current round, its checkpoint's tensor file and that file's sha256."""
        with self.lock:
            return self.round, tensor_path(self.run.ckpt_dir, self.round), self.ckpt_meta["sha256"]

    def base_file(self) -> tuple[Path, str]:
        """A LoRA run's frozen base weights and their sha256 (checked when the run loaded)."""
        if self.base_path is None:
            raise Refused(404, "this run trains every parameter: it has no separate base weights")
        return self.base_path, self.run.config.base_sha256

    def teacher_file(self) -> tuple[Path, str]:
        """A distillation run's teacher weights and their sha256 (as recorded at init)."""
        if self.run.config.teacher is None:
            raise Refused(404, "this run distils no teacher")
        return self.run.model_dir / TEACHER_WEIGHTS, self.run.config.teacher.sha256

    def update_file(self, rnd: int) -> Path:
        p = self.run.update_path(rnd)
        if not p.is_file():
            if rnd >= self.round:
                raise Refused(404, f"round {rnd} is not closed yet (the open round is "
                                   f"{self.round}); its update does not exist")
            raise Refused(404, f"the update of round {rnd} is not kept; download the model")
        return p

    def count_bytes_out(self, n: int) -> None:
        self.ledger.add_bytes_out(self.round, n)

    # ------------------------------------------------------------------ leases

    def lease(self, vol: Volunteer, req: LeaseRequest) -> LeaseResponse:
        """A lease on the open round; or, to a volunteer that has sent the open round's work and
        can train ahead (`req.ahead`, overlapped runs), a lease on the next round at once:
        it trains from its own parameters while the open round closes (`Lease.ahead`). No
        volunteer gets further ahead than that (staleness at most one round)."""
        self.ledger.touch(vol.id, req.device, req.tokens_per_s)
        with self.lock:
            if self.finished:
                why = self.ended or f"the run finished at round {self.round}"
                return LeaseResponse(status="done", message=f"{why}; thank you for contributing")
            self.pacer.heard(vol.id, req.tokens_per_s, time.time())
            rnd = self.round
            leases = self.ledger.leases_of_round(rnd)
            # sent: accepted, or (overlapped) being uploaded while its worker trains on
            sent = any(r["volunteer_id"] == vol.id and (r["state"] == "submitted" or (
                r["state"] == "open" and r["id"] == req.sending and req.ahead))
                for r in leases)
            if sent or self.closing == rnd:
                last = bool(self.cfg.rounds) and rnd + 1 >= self.cfg.rounds
                if sent and req.ahead and self.cfg.overlap and not last:
                    return self._lease_on(vol, req, rnd + 1, ahead=True)
                # every volunteer of the round polls until the next opens: together at most
                # WAIT_POLLS_PER_SECOND, so a large round's waiting leaves the close its core
                retry = max(0.5, len(leases) / WAIT_POLLS_PER_SECOND)
                if self.closing == rnd:  # its contributions are being merged: the next opens soon
                    return LeaseResponse(status="wait", retry_after=retry, message=(
                        f"round {rnd} is closing; the next opens soon"))
                return LeaseResponse(status="wait", retry_after=retry, message=(
                    f"your contribution to round {rnd} is in; waiting for the round to close"))
            return self._lease_on(vol, req, rnd, ahead=False)

    def _lease_on(self, vol: Volunteer, req: LeaseRequest, rnd: int, ahead: bool
                  ) -> LeaseResponse:
        """The volunteer's lease on round `rnd` (the open round, or the next one `ahead`):
        the one it asks to resume, or a fresh one. Called under the lock."""
        now = time.time()
        mine = [r for r in self.ledger.leases_of_round(rnd) if r["volunteer_id"] == vol.id]
        if any(r["state"] == "submitted" or (r["state"] == "open" and r["id"] == req.sending)
               for r in mine):  # ahead: both rounds' work is in (or on its way)
            return LeaseResponse(status="wait", retry_after=0.5, message=(
                f"your contributions to rounds {rnd - 1} and {rnd} are in; waiting for round "
                f"{rnd - 1} to close"))
        if mine:  # a restarted worker: its earlier lease is void unless resumed below
            self.ledger.expire_leases(rnd, vol.id)
        if self.ledger.refused_for_cause(vol.id, rnd):
            # no second try in a round it sent a bad payload to: a broken or hostile worker
            # must not hold the round open until its deadline by re-leasing (a refusal it did
            # not cause, a voided or replaced lease, does not count)
            return LeaseResponse(status="wait", retry_after=5.0, message=(
                f"your contribution to round {rnd} was refused; you can take part again from "
                f"round {rnd + 1}"))
        steps0 = int(self.ckpt_meta.get("steps", 0))
        if ahead:  # its deadline is provisional: the round opens when the open one closes
            deadline, start_step = now + self.cfg.round_seconds, \
                steps0 + self.cfg.round_steps(rnd - 1)
        else:
            deadline, start_step = self.ledger.round_row(rnd)["deadline"], steps0
        remaining = deadline - now
        if remaining < MIN_LEASE_SECONDS + 1:
            return LeaseResponse(status="wait", retry_after=min(max(remaining, 0.2), 2.0),
                                 message=f"round {rnd} is closing; the next opens soon")
        seconds = remaining - max(1.0, min(10.0, 0.1 * self.cfg.round_seconds))
        round_tokens = self.cfg.round_steps(rnd) * self.tcfg.batch_size * self.tcfg.seq_len
        if (end := self.pacer.end(rnd, round_tokens, now)) is not None:
            seconds = max(MIN_LEASE_SECONDS, min(seconds, end - now))
        held = next((r for r in mine if r["id"] == req.resume), None)
        if held is not None:  # the same batches and budget, from where its worker stopped
            self.ledger.revive_lease(held["id"], now)
            log.info("volunteer %d (%s) resumes lease %d of round %d", vol.id, vol.name,
                     held["id"], rnd)
        else:
            held = self._new_lease(vol, rnd, deadline, start_step,
                                   fresh=self.cfg.fresh_leases and not ahead)
        return LeaseResponse(status="lease", lease=Lease(
            lease_id=held["id"], round=rnd, shards=json.loads(held["shards"]), seed=held["seed"],
            start_step=held["start_step"], max_steps=held["max_steps"], seconds=seconds,
            deadline_in=remaining, ahead=ahead, fresh=bool(held["fresh"])))

    def _new_lease(self, vol: Volunteer, rnd: int, deadline: float, start_step: int,
                   fresh: bool = False):
        """Record a new lease on round `rnd`: the shard this round has used least (voided
        leases do not count, so a worker that died and came back does not skew the round's
        data), the next in turn among those; a new batch seed; the round's step budget from
        the schedule position `start_step` (the open round's checkpoint's; one round further
        for a lease ahead). A `fresh` lease (a run that verifies by replication) is the copy
        of another volunteer's lease of the round whose copy is wanted, if there is one (same
        shard, seed and steps: `replica_of`); otherwise a new one whose copy is wanted with
        the volunteer's replication probability (`RoundChecker.wants_copy`)."""
        shards = self.run.index.train
        n_leases = self.ledger.count_leases()
        max_steps = self.cfg.round_steps(rnd)
        tokens = max_steps * self.tcfg.batch_size * self.tcfg.seq_len
        if fresh and (orig := self.ledger.wanted_copy(rnd, vol.id)) is not None:
            lease_id = self.ledger.add_lease(
                vol.id, rnd, deadline, orig["start_step"], orig["max_steps"],
                orig["max_tokens"], orig["seed"], json.loads(orig["shards"]), fresh=True,
                replica_of=orig["id"])
            log.info("round %d: lease %d of volunteer %d (%s) is a copy of lease %d",
                     rnd, lease_id, vol.id, vol.name, orig["id"])
            return self.ledger.lease(lease_id)
        used = Counter(name for r in self.ledger.leases_of_round(rnd) if r["state"] != "expired"
                       for name in json.loads(r["shards"]))
        turn = n_leases % len(shards)
        shard = min(shards, key=lambda s: (used[s.name], (shards.index(s) - turn) % len(shards)))
        lease_id = self.ledger.add_lease(
            vol.id, rnd, deadline, start_step, max_steps, tokens,
            self.run.config.seed * 1_000_003 + n_leases, [shard.name], fresh=fresh,
            replicate=fresh and self.checker.wants_copy(vol.id, n_leases))
        return self.ledger.lease(lease_id)

    # ------------------------------------------------------------------ contributions

    def spool(self) -> tuple[Path, BinaryIO]:
        """A fresh file to receive one upload into (on the contributions' filesystem, so an
        accepted one is moved into place, not copied). The caller writes, closes, and hands
        the path to `submit_file`, which always consumes it."""
        fd, name = tempfile.mkstemp(dir=self.run.spool_dir, suffix=".upload")
        return Path(name), os.fdopen(fd, "wb")

    def submit(self, vol: Volunteer, lease_id: int, blob: bytes) -> SubmitResponse:
        """`submit_file` for a payload held in memory (tools and tests)."""
        path, f = self.spool()
        with f:
            try:
                f.write(blob)
            except OSError:
                path.unlink(missing_ok=True)
                raise
        return self.submit_file(vol, lease_id, path, hashlib.sha256(blob).hexdigest())

    def submit_file(self, vol: Volunteer, lease_id: int, path: Path, sha: str
                    ) -> SubmitResponse:
        """Check the spooled upload at `path` (sha256 `sha`) and accept it for its lease, or
        refuse it (`Refused`, with the reason recorded in the ledger). The payload is checked
        block by block from the file, so memory stays ~ one block whatever the model size;
        on acceptance the file becomes the stored contribution, otherwise it is deleted."""
        try:
            return self._submit_file(vol, lease_id, path, sha)
        finally:
            path.unlink(missing_ok=True)

    def _sparse_mismatch(self, head: dict[str, str]) -> str | None:
        """Why a sparse payload's header (checked by read_file_header) is not made as this run's
        contributions are (block, k, bits), or None."""
        block = int(head["block"])
        k, bits = codecs.sparse_options(head, block)
        want = {"block": codecs.default_block("sparse"), **self.cfg.codec_options()}
        if (block, k, bits) == (want["block"], want["k"], want["bits"]):
            return None
        return (f"sparse payload has block {block}, k {k}, bits {bits}; this run's are block "
                f"{want['block']}, k {want['k']}, bits {want['bits']} (density "
                f"{self.cfg.sparse_density:g}): restart the worker (it reads them from the "
                "run's info)")

    def _submit_file(self, vol: Volunteer, lease_id: int, path: Path, sha: str
                     ) -> SubmitResponse:
        size = path.stat().st_size
        lease = self.ledger.lease(lease_id) if 0 <= lease_id <= INT64_MAX else None
        rnd = lease["round"] if lease is not None else self.round

        def refuse(status: int, reason: str, blameless: bool = False) -> Refused:
            self.ledger.refuse(lease_id if lease is not None else None, vol.id, rnd, sha,
                               size, reason, blameless)
            log.info("refused contribution from %s: %s", vol.name, reason)
            return Refused(status, reason)

        if lease is None:
            raise refuse(404, f"unknown lease {lease_id}")
        if lease["volunteer_id"] != vol.id:
            raise refuse(403, f"lease {lease_id} belongs to another volunteer")
        if lease["state"] == "submitted":
            raise refuse(409, f"lease {lease_id} already has an accepted contribution")
        if self.ledger.was_accepted(sha):
            raise refuse(409, "replayed payload: this exact contribution was already accepted")
        try:
            head = codecs.read_file_header(path)  # before scanning the file
            codec = head.get("codec")
            if codec != self.cfg.codec:
                raise refuse(422, f"payload codec {codec!r} is not this run's "
                                  f"{self.cfg.codec!r}")
            if codec == "sparse" and (why := self._sparse_mismatch(head)):
                raise refuse(422, why)
            meta = check_payload_file(path, self.shapes, self.upload_limit)
            stats = SubmitStats.model_validate_json(meta.get("stats", ""))
        except codecs.CodecError as e:
            raise refuse(422, f"invalid payload: {e}") from None
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            raise refuse(422, f"invalid stats in payload metadata: {e}") from None
        if stats.lease_id != lease_id or stats.round != lease["round"]:
            raise refuse(422, f"payload is for lease {stats.lease_id} round {stats.round}, "
                              f"not lease {lease_id} round {lease['round']}")
        weight = min(stats.tokens, lease["max_tokens"])
        if weight <= 0:
            raise refuse(422, "contribution reports no tokens trained")
        with self.lock:  # the round must not close between this check and the ledger write
            # read again under the lock: while the file was checked, the lease may have been
            # voided (a newer lease, a resume) or taken by a concurrent upload
            lease = self.ledger.lease(lease_id)
            into, late = self._round_for(lease)
            if into is None:
                raise refuse(409, late, blameless=True)
            if late:
                weight *= self.cfg.stale_weight
            stored = self.run.contribution_path(into, lease_id)
            stored.parent.mkdir(exist_ok=True)
            try:
                atomic_move(path, stored)
            except OSError as e:
                log.error("cannot store a contribution: %s", e)
                raise Refused.cannot_store(e) from None
            note = "; ".join(filter(None, (late, self._throughput_flag(vol, stats))))
            cid = self.ledger.accept(lease_id, vol.id, into, sha, size, stats.steps,
                                     stats.tokens, float(weight), stats.mean_loss,
                                     stats.seconds, str(stored.relative_to(self.run.dir)),
                                     note=note or None)
        rnd = into
        log.info("round %d: accepted contribution %d from %s (%d tokens, loss %.3f)",
                 rnd, cid, vol.name, weight, stats.mean_loss)
        return SubmitResponse(accepted=True, contribution_id=cid, round=rnd,
                              message=f"accepted for round {rnd}")

    def _round_for(self, lease) -> tuple[int | None, str]:
        """The round a contribution to `lease` goes into now, with the note of a late one; or
        (None, why it is refused). Called under the lock. New work goes into the open round
        (the next one while the open round is closing); a lease ahead (overlapped) into its
        own round; a lease whose round closed while it was still open, into the next round at
        `stale_weight` of its weight (the staleness rule: one round late at most)."""
        lr, state = lease["round"], lease["state"]
        target = self.round + (1 if self.closing == self.round else 0)
        if state == "submitted":
            return None, f"lease {lease['id']} already has an accepted contribution"
        if state == "open" and lr in (target, self.round + 1):
            return lr, ""
        outlived = state == "open" or bool(lease["outlived"])
        if lr == target - 1 and outlived and self.cfg.stale_weight > 0:
            return target, (f"late: trained for round {lr}, which closed before it arrived; "
                            f"applied in round {target} at {self.cfg.stale_weight:g} of its "
                            "weight")
        if state == "expired" and not outlived and lr == self.round:
            return None, (f"lease {lease['id']} was given up: no heartbeat for "
                          f"{LEASE_SILENCE_SECONDS:.0f}s (or a newer lease replaced it); it "
                          "was not applied")
        return None, (f"stale: round {lr} closed before this contribution arrived (the open "
                      f"round is {self.round}); it was not applied")

    def _throughput_flag(self, vol: Volunteer, stats: SubmitStats) -> str | None:
        """A note when the reported throughput is far beyond this volunteer's history."""
        if stats.seconds <= 0:
            return "flagged: reports zero seconds of training"
        rate = stats.tokens / stats.seconds
        best, n = self.ledger.best_throughput(vol.id)
        if n >= 3 and rate > 10 * best:
            log.warning("volunteer %s reports %.0f tok/s, %.0fx its best", vol.name, rate,
                        rate / best)
            return (f"flagged: throughput {rate:,.0f} tok/s is {rate / best:.0f}x this "
                    "volunteer's best")
        return None

    def alive(self, vol: Volunteer, lease_id: int, msg: Alive) -> AliveResponse:
        """A heartbeat of the worker training `lease_id`; ok=False once the lease is closed."""
        lease = self.ledger.lease(lease_id) if 0 <= lease_id <= INT64_MAX else None
        if lease is None:
            raise Refused(404, f"unknown lease {lease_id}")
        if lease["volunteer_id"] != vol.id:
            raise Refused(403, f"lease {lease_id} belongs to another volunteer")
        ok = self.ledger.lease_alive(lease_id, time.time())
        return AliveResponse(ok=ok, round=self.round, finish=ok and self._finish_unpaced(lease))

    def _finish_unpaced(self, lease) -> bool:
        """Whether an open lease should end its training now: its round is overlapped but was
        not paced (`Pacer.end`: no two volunteers' speeds were known when its leases were given,
        as in round 0), and a contribution to it is already in. Its fastest volunteer has sent its
        work, so the slower ones send theirs too, as a paced round would have had them do,
        instead of holding the round, and every volunteer waiting on it, for their whole H."""
        rnd = lease["round"]
        return bool(self.cfg.overlap and not self.pacer.paced(rnd)
                    and self.ledger.accepted(rnd))

    # ------------------------------------------------------------------ closing rounds

    def tick(self) -> bool:
        """Close the open round if it is due; returns whether a round closed. The decision is
        taken under the lock, the close itself (`close_round`) runs without it."""
        with self.lock:
            if self.finished or self.closing is not None:
                return False
            rnd = self.round
            if not self._due(rnd):
                return False
        try:
            self.close_round(rnd)
        except Exception as e:  # the caller retries; status says why meanwhile
            self.close_failure = f"{type(e).__name__}: {e}"
            raise
        self.close_failure = None
        return True

    def _due(self, rnd: int) -> bool:
        """Whether round `rnd` (open) closes now; extends its deadline when it is short of
        contributions (at most max_extensions times). Called under the lock."""
        row = self.ledger.round_row(rnd)
        n = len(self.ledger.accepted(rnd))
        now = time.time()
        silent = self.ledger.expire_silent_leases(rnd, now - LEASE_SILENCE_SECONDS)
        if silent:  # their workers died or lost the network: close without them
            log.info("round %d: gave up lease(s) %s, silent for %.0fs", rnd, silent,
                     LEASE_SILENCE_SECONDS)
        open_leases = self.ledger.leases_of_round(rnd, "open")
        everyone = not open_leases and not self._still_coming(rnd, now)
        if n >= self.cfg.min_contributions and (now >= row["deadline"] or everyone):
            return True
        if now < row["deadline"]:
            return False
        if row["extensions"] >= self.cfg.max_extensions:  # no round waits for ever
            log.warning("round %d: %d of %d contributions needed after %d extension(s) of "
                        "its deadline; closing with what it has%s", rnd, n,
                        self.cfg.min_contributions, row["extensions"],
                        "" if n else " (nothing: the model stays as it is)")
            return True
        done = self.ledger.extend_round(rnd, now + self.cfg.round_seconds)
        log.warning("round %d reached its deadline with %d of %d contributions needed; "
                    "extended by %.0fs (%d of %d extensions; then it closes with what it "
                    "has)", rnd, n, self.cfg.min_contributions, self.cfg.round_seconds,
                    done, self.cfg.max_extensions)
        return False

    def _still_coming(self, rnd: int, now: float) -> set[int]:
        """Overlapped runs: the volunteers that contributed to round `rnd` - 1, are still
        around (a lease request in the last LEASE_SILENCE_SECONDS) and have no lease on round
        `rnd` yet. A round opened with only the work sent ahead must not close before they
        lease (with min_contributions 1 it would close at once, with one volunteer's work)."""
        if not self.cfg.overlap or rnd == 0:
            return set()
        before = {r["volunteer_id"] for r in self.ledger.accepted(rnd - 1)}
        leased = {r["volunteer_id"] for r in self.ledger.leases_of_round(rnd)}
        return self.ledger.seen_since(before - leased, now - LEASE_SILENCE_SECONDS)

    def close_round(self, rnd: int | None = None) -> None:
        """Close the open round (if it is still `rnd`, when given): aggregate its
        contributions, publish the update and the next checkpoint, open the next round. The
        aggregation and the files are made without the lock (`closing` names the round
        meanwhile), so no join, lease, heartbeat, submit or status request waits for them:
        leases are told to wait a moment (or, to who sent its work, given ahead), and a
        contribution to the closing round goes into the next one (`_round_for`). With
        `SwarmConfig.verify` (`init --verify`) every contribution is checked first (closecheck):
        one that fails is left out of the aggregate and gets no credit. The ledger records
        the close last, so a crash at any point recovers as before."""
        with self.lock:
            if self.closing is not None or rnd not in (None, self.round):
                return  # another thread is closing it, or has closed it
            rnd = self.round
            self.closing = rnd
            rows = self.ledger.accepted(rnd)
            theta0, momentum0, residual0 = self.theta, self.momentum, self.residual
            steps0 = int(self.ckpt_meta.get("steps", 0))
            tokens0 = int(self.ckpt_meta.get("tokens_trained", 0))
            base_sha = self.ckpt_meta.get("sha256")
        try:
            if rows and self.cfg.verify:
                self.checker.check(rnd, rows, theta0)
                # left out by the verification: not aggregated, no credit (robust aggregation
                # still screens every other one, as after a crash mid-close)
                rows = [r for r in self.ledger.accepted(rnd) if r["verified"] != "failed"]
            if rows:
                mean = self._aggregate(rnd, rows)
                ocfg = OuterConfig(self.cfg.outer_lr, self.cfg.outer_momentum,
                                   self.cfg.nesterov)
                update, momentum = outer_step(theta0, mean, momentum0, ocfg)
                target = {k: update[k] + residual0[k] for k in update}
            else:  # an empty round (closed after its extensions): publish a zero update, so
                # the model, the outer momentum and the residual stay as they are
                momentum = momentum0
                target = {k: torch.zeros_like(v) for k, v in theta0.items()}
            blob = codecs.to_bytes(target, "int8", meta={"round": str(rnd)})
            applied, _ = codecs.from_bytes(blob, self.shapes)
            residual = {k: target[k] - applied[k] for k in target} if rows else residual0
            theta = apply_update(theta0, applied)
            atomic_write(self.run.update_path(rnd), blob)
            outer = {f"momentum:{k}": v for k, v in (momentum or {}).items()}
            outer.update({f"residual:{k}": v for k, v in residual.items()})
            atomic_write(self.run.outer_path(rnd + 1), st_save(outer))
            rows = [r for r in self.ledger.accepted(rnd) if not r["excluded"]]
            tokens = int(sum(r["weight"] for r in rows))
            meta = save_checkpoint(self.run.ckpt_dir, rnd + 1, theta, {
                "source": "swarm",
                # an empty round trained nothing: the schedule does not move
                "steps": steps0 + (self.cfg.round_steps(rnd) if rows else 0),
                "tokens_trained": tokens0 + tokens,
                "params": self.params,
                "contributions": len(rows),
                "update_sha256": hashlib.sha256(blob).hexdigest(),
            })
            with self.lock:
                self.ledger.close_round(rnd, meta["update_sha256"],
                                        checkpoint_sha256=meta["sha256"], base_sha256=base_sha)
                self._announce_update(rnd, meta["update_sha256"])
                self.public.add(tensor_path(self.run.ckpt_dir, rnd + 1), meta["sha256"],
                                model=True)
                self.theta, self.momentum, self.residual = theta, momentum, residual
                self.round, self.ckpt_meta = rnd + 1, meta
                self.ledger.open_round(self.round, time.time() + self.cfg.round_seconds)
                self._prune()
        finally:
            with self.lock:
                self.closing = None
        log.info("round %d closed: %d contributions, %d tokens; round %d open",
                 rnd, len(rows), tokens, rnd + 1)
        if self.evaluator is not None:
            self.evaluator.submit(rnd + 1)

    def _aggregate(self, rnd: int, rows) -> dict[str, torch.Tensor]:
        """Robust token-weighted mean of the round's deltas, read block by block from disk;
        clipped or refused contributions get the reason in the ledger (refused: weight 0)."""
        sources = []
        try:
            for r in rows:  # memory-mapped, read block by block: the blocks shrink as workers
                # grow, so the working memory stays ~ a fixed budget (aggregation.block_for)
                sources.append(open_payload(self.run.dir / r["path"], self.shapes))
            mean, screening = robust_aggregate(sources, self.checker.aggregation_weights(rows),
                                               self.shapes, RobustConfig(self.cfg.aggregation),
                                               block_elems=block_for(len(rows)))
        finally:
            for src in sources:
                src.close()
        for r, (mult, reason) in zip(rows, screening, strict=True):
            if reason:
                self.ledger.annotate(r["id"], reason, excluded=mult == 0.0)
                log.warning("round %d: contribution %d: %s", rnd, r["id"], reason)
        return mean

    def _prune(self) -> None:
        """Keep round 0, the last `keep_last` checkpoints and every `keep_every`-th."""
        rounds = list_checkpoints(self.run.ckpt_dir)
        keep = set(rounds[-self.cfg.keep_last:]) | {0}
        for r in rounds:
            if r in keep or r % self.cfg.keep_every == 0:
                continue
            for p in (meta_path(self.run.ckpt_dir, r), tensor_path(self.run.ckpt_dir, r),
                      self.run.outer_path(r)):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ evaluation

    def wait_for_eval(self, timeout: float = 60.0) -> None:
        """Block until queued evaluations are done (for tests and the demo's summary)."""
        if self.evaluator is not None:
            self.evaluator.wait(timeout)

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
        self.ledger.close()

    # ------------------------------------------------------------------ status

    def status(self) -> Status:
        st = run_status(self.ledger, run_name=self.run.config.name, round=self.round,
                        finished=self.finished, params=self.params,
                        payload_bytes=self.wire_bytes,
                        min_contributions=self.cfg.min_contributions,
                        max_extensions=self.cfg.max_extensions)
        with self.lock:
            return st.model_copy(update={"bytes_served": dict(self.served),
                                         "close_failing": self.close_failure})
