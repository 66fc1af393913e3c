"""A volunteer worker (`crowdtrain join URL`): join -> lease -> sync -> train -> upload, repeat.

Top to bottom, one round:
1. ask for a lease (round r, shards, seed, schedule position, budget of steps and seconds);
2. bring the parameters to theta_r: apply the published int8 updates to the copy held from the
   previous round (bit-exact, about 1 byte per parameter) or, for a newcomer, download the full
   checkpoint; download the lease's shards once (content-addressed, sha256-checked). In a
   LoRA run the parameters are the adapters, on frozen base weights downloaded once
   (`GET /v1/base`, sha256-checked, cached by hash);
3. run the inner loop from theta_r (AdamW state carries over from round to round and across
   restarts, saved on local disk) until the step or time budget is spent;
4. send delta = theta_r - theta_local, int8-compressed with error feedback, with the stats.

Overlapped (where the run enables it, `init --overlap`; one process only: volunteer/overlap.py)
the upload runs in the background and the worker asks at once for a lease ahead on round r+1,
which it trains from its own parameters, folding theta_{r+1} in between two steps when round r
closes; `--no-overlap` keeps stop-and-wait.

Network failures are retried with exponential backoff; refusals (4xx) come back in words.
The first Ctrl-C finishes the round early and sends the work done; a second abandons it.
Outbound HTTP(S) only: works behind any NAT, on any OS.
"""

from __future__ import annotations

import logging
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.checkpoint import check_tensors_match, decode_tensors
from crowdtrain.run.data import file_sha256, get_batch, verify_sha256
from crowdtrain.run.interrupt import GracefulInterrupt
from crowdtrain.run.model import (
    build_model,
    config_from_dict,
    load_frozen,
    load_into,
    state_dict_for_save,
)
from crowdtrain.run.train import InnerLoop, StepStats, Teacher, TrainConfig, pick_device
from crowdtrain.volunteer.client import Client, CoordinatorRefused, Heartbeat
from crowdtrain.volunteer.config import WorkerConfig, WorkerSummary
from crowdtrain.volunteer.files import BackgroundSaves, LocalState
from crowdtrain.volunteer.overlap import Anchors, PendingTheta, Uploader
from crowdtrain.volunteer.progress import RoundProgress
from crowdtrain.volunteer.ranks import Ranks
from crowdtrain.volunteer.resume import PartialRound, RoundSnapshots, load_partial, merge_stats
from crowdtrain.wire import codecs, protocol
from crowdtrain.wire.outer import apply_update

log = logging.getLogger(__name__)

MAX_UPDATES_TO_REPLAY = 20


# ---------------------------------------------------------------------- the worker


class Worker:
    """The volunteer (or rank 0 of a multi-process volunteer: `ranks`)."""

    def __init__(self, cfg: WorkerConfig, ranks: Ranks | None = None):
        self.cfg = cfg
        self.ranks = ranks
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.client = Client(cfg.url, cfg.retry_for)
        self.local = LocalState(cfg.home, cfg.url)
        self.info = protocol.RunInfo.model_validate(self.client.call("GET", protocol.INFO).json())
        self.client.public_url = self.info.public_url
        if ranks is not None:
            ranks.bcast_json(self.info.model_dump(mode="json"))
        self.device = ranks.device if ranks is not None else pick_device(cfg.device)
        if cfg.max_memory and self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(cfg.max_memory, self.device)
        self.name = self.local.default_name(
            f"volunteer-{platform.node()[:20] or 'anon'}") if cfg.name is None else cfg.name
        self.local.claim(self.name)  # one process per volunteer (and run folder)
        self.folder = self.local.run_folder(self.info.run_name, self.name)
        self._join()
        self.tcfg = TrainConfig(**self.info.train)
        self.model = self._build_model()
        self.teacher = self._teacher()
        self.codec_options = codec_options(self.info.schedule)
        self.shapes = {k: tuple(v.shape) for k, v in state_dict_for_save(self.model).items()}
        self.loop = InnerLoop(self.model, self.tcfg, self.device,
                              micro_batch=self.folder.micro_batch(str(self.device)),
                              ranks=ranks.world if ranks else 1,
                              compile_backend="inductor" if cfg.compile else None,
                              teacher=self.teacher)
        self.theta, self.theta_round = self.folder.load_params(state_dict_for_save(self.model))
        if (opt := self.folder.load_optimizer()) is not None:
            try:
                self.loop.load_optimizer_tensors(opt)
                log.info("resumed AdamW state from %s", self.folder.optimizer)
            except CrowdtrainError as e:
                log.warning("ignoring saved optimizer state (%s)", e)
        # a round this worker was training when it last stopped (one process only: ranks > 1
        # start their rounds afresh)
        self.partial: PartialRound | None = None if ranks is not None else load_partial(
            self.folder.in_progress, state_dict_for_save(self.model))
        self._ranks_have_optimizer = False
        self.residual: dict[str, torch.Tensor] | None = None
        self._encoded = threading.Event()  # clear while a contribution is being encoded
        self._encoded.set()
        self.shard_data: dict[str, np.ndarray] = {}
        self.mask_data: dict[str, np.ndarray] = {}
        self.saves = BackgroundSaves()  # parameters and AdamW state, off the critical path
        self.tokens_per_s: float | None = None
        self.summary = WorkerSummary()
        # overlapped rounds (crowdtrain.volunteer.overlap): one process only
        self.overlap = cfg.overlap and self.info.schedule.overlap and ranks is None
        self.uploader = Uploader()
        self.live = False  # the model holds this worker's own progress (a lease ahead follows)
        self.anchor: Anchors | None = None  # what the lease in progress is measured against
        self._bg: Client | None = None  # the background fetches' own connection
        self._up: Client | None = None  # and the background uploads'

    # -- identity
    def _join(self, force: bool = False) -> None:
        ident = None if force else self.local.identity(self.name)
        if ident is None:
            req = protocol.JoinRequest(name=self.name, device=self.device.type,
                                       api_version=protocol.API_VERSION,
                                       invite=self.cfg.invite, anonymous=self.cfg.anonymous)
            r = self.client.call("POST", protocol.JOIN, json_body=req.model_dump())
            resp = protocol.JoinResponse.model_validate(r.json())
            ident = {"volunteer_id": resp.volunteer_id, "token": resp.token, "name": resp.name}
            self.local.save_identity(ident)
            log.info("joined %s as %s (volunteer %d)", self.cfg.url, resp.name, resp.volunteer_id)
        self.client.token = ident["token"]

    # -- the model
    def _build_model(self) -> torch.nn.Module:
        """The run's model; for a LoRA run, the cached base weights wrapped with adapters (the
        other ranks of this volunteer read the same cached file)."""
        config = config_from_dict(self.info.model_config_json)
        if self.info.lora is None:
            return build_model(config)
        from safetensors.torch import load_file

        from crowdtrain.run.lora import LoraSettings, build_lora_model

        path = self._base_file()
        if self.ranks is not None:
            self.ranks.bcast_json({"base": str(path)})
        return build_lora_model(config, LoraSettings(**self.info.lora), load_file(str(path)))

    def _base_file(self) -> Path:
        """The LoRA run's frozen base weights: cached by sha256, else downloaded once and
        checked against the sha256 the run info names (safetensors only, never pickle)."""
        from crowdtrain.run.lora import base_sha256

        sha = self.info.base_sha256 or ""
        p = self.local.home / "bases" / f"{sha}.safetensors"
        if p.is_file() and base_sha256(p) == sha:
            return p
        self.client.fetch(sha, p, "the base weights")
        log.info("downloaded the base weights (%.1f MB)", p.stat().st_size / 1e6)
        return p

    def _teacher(self) -> Teacher | None:
        """A distillation run's teacher: cached by sha256, else downloaded once and checked
        (safetensors only); the other ranks of this volunteer read the same cached file."""
        t = self.info.teacher
        if t is None:
            return None
        p = self.local.home / "teachers" / f"{t.sha256}.safetensors"
        if not (p.is_file() and file_sha256(p) == t.sha256):
            self.client.fetch(t.sha256, p, f"the teacher {t.name}")
            log.info("downloaded the teacher %s (%.1f MB)", t.name, p.stat().st_size / 1e6)
        if self.ranks is not None:
            self.ranks.bcast_json({"teacher": str(p)})
        return Teacher(load_frozen(t.config_json, p, t.sha256), t.alpha, t.temperature)

    # -- local persistence (files.RunFolder)
    def _save_params(self) -> None:
        """theta of the round (a new dict each round, never changed in place), in the
        background."""
        self.saves.put("parameters", self.folder.save_params, self.theta, self.theta_round)

    def _train_state(self) -> tuple[dict, dict, dict | None, dict | None]:
        """What a snapshot of the round in progress keeps (crowdtrain.volunteer.resume): the
        parameters, AdamW's state, the residual, and a lease ahead's own anchor until the fold
        (the delayed update still pending)."""
        anchor = self.anchor.current if self.anchor is not None and self.anchor.local else None
        self._encoded.wait()  # the contribution before in the making: its residual comes next
        return state_dict_for_save(self.model), self.loop.optimizer_tensors(), self.residual, \
            anchor

    def _partial_for(self, lease: protocol.Lease) -> PartialRound | None:
        """The snapshot an earlier life of this worker left of `lease`, if it is resumable now
        (else it is dropped and the lease starts afresh)."""
        part, self.partial = self.partial, None
        if part is None:
            return None
        if not part.matches(lease, self.theta_round):
            self.folder.in_progress.unlink(missing_ok=True)
            return None
        try:  # the optimizer first: it is left as it was if the snapshot's does not fit
            self.loop.load_optimizer_tensors(part.optimizer)
        except CrowdtrainError as e:
            log.warning("ignoring the saved round in progress (%s); starting the lease afresh",
                        e)
            self.folder.in_progress.unlink(missing_ok=True)
            return None
        self.residual = part.residual
        log.info("resuming lease %d of round %d after step %d of %d", lease.lease_id,
                 lease.round, part.stats.steps, lease.max_steps)
        return part

    def _save_optimizer(self) -> None:
        """The AdamW state as it is now (copied: training goes on changing it in place), in the
        background."""
        state = {k: v.clone() for k, v in self.loop.optimizer_tensors().items()}
        self.saves.put("optimizer state", self.folder.save_optimizer, state)

    # -- parameters and data
    def _sync(self, target: int) -> None:
        """Bring self.theta to round `target` (see `_theta_at`)."""
        self.theta, self.theta_round = self._theta_at(self.client, self.theta, self.theta_round,
                                                      target)

    def _theta_at(self, client: Client, theta: dict | None, theta_round: int | None,
                  target: int, art: protocol.Artifacts | None = None) -> tuple[dict, int]:
        """theta of round `target` from `theta` of `theta_round`: replay the announced updates,
        or download the open round's checkpoint (each file by sha256, resumable, from the
        public URL or the coordinator); returns (theta, its round)."""
        if art is None:
            art = protocol.Artifacts.model_validate(client.call("GET", protocol.ARTIFACTS).json())
        behind = None if theta_round is None else target - theta_round
        rounds = range(theta_round or 0, target)
        if behind is not None and 0 <= behind <= MAX_UPDATES_TO_REPLAY and target <= art.round \
                and all(r in art.updates for r in rounds):
            try:
                for rnd in rounds:
                    blob = self._fetch_blob(client, art.updates[rnd],
                                            f"the update of round {rnd}")
                    try:
                        upd, _ = codecs.from_bytes(blob, self.shapes)
                    except codecs.CodecError as e:
                        raise CrowdtrainError(f"the coordinator sent a corrupt update for round "
                                              f"{rnd} ({e}); try again later or tell the "
                                              "run's owner") from None
                    theta, theta_round = apply_update(theta, upd), rnd + 1
                return theta, theta_round
            except CoordinatorRefused as e:
                log.info("cannot replay updates (%s); downloading the model", e.detail)
                art = protocol.Artifacts.model_validate(
                    client.call("GET", protocol.ARTIFACTS).json())
        data = self._fetch_blob(client, art.model_sha256, f"the model of round {art.round}")
        tensors = decode_tensors(data, "downloaded model")
        check_tensors_match(tensors, state_dict_for_save(self.model), "downloaded model")
        log.info("downloaded the model of round %d (%.1f MB)", art.round, len(data) / 1e6)
        return tensors, art.round

    def _pending_theta(self, lease: protocol.Lease, beat: Heartbeat) -> PendingTheta:
        """The latest theta this worker can fold in (of a round among `self.anchor.unfolded`),
        fetched in the background from the theta at hand once it is published: the lease says
        which round was open when it was given, its heartbeats which round is open now."""
        if self._bg is None:
            self._bg = Client(self.cfg.url, self.cfg.retry_for)
            self._bg.token, self._bg.public_url = self.client.token, self.client.public_url
        bg, theta, theta_round, anchors = self._bg, self.theta, self.theta_round, self.anchor

        def fetch(cancel) -> tuple[dict, int] | None:
            while True:
                published = max(beat.open_round if beat.open_round is not None else -1,
                                lease.round - 1 if lease.ahead else lease.round)
                ready = [r for r in list(anchors.unfolded) if r <= published]
                if ready:
                    break
                if cancel.wait(0.2):
                    return None
            got = self._theta_at(bg, theta, theta_round, max(ready))
            return got if got[1] == max(ready) else None

        return PendingTheta(fetch, lease.round)

    def _fetch_blob(self, client: Client, sha256: str, what: str) -> bytes:
        """A file the coordinator announced, read once and not kept (a model, an update)."""
        p = self.local.home / "downloads" / f"{sha256}.{threading.get_ident()}"
        try:
            return client.fetch(sha256, p, what).read_bytes()
        finally:
            p.unlink(missing_ok=True)

    def _shards(self, names: list[str]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """The lease's shards (and a chat run's loss masks), from the cache or the coordinator,
        each sha256-checked."""
        by_name = {s.name: s for s in self.info.train_shards}
        for name in names:
            if name not in self.shard_data:
                s = by_name[name]
                data = self._fetch_cached(s.sha256, ".bin", f"shard {name}")
                self.shard_data[name] = np.frombuffer(data, dtype=self.info.dtype)
                if s.mask_sha256:
                    mask = self._fetch_cached(s.mask_sha256, ".mask", f"loss mask of {name}")
                    if len(mask) != s.tokens:
                        raise CrowdtrainError(f"the loss mask of shard {name} has {len(mask)} "
                                              f"entries for {s.tokens} tokens; tell the run's "
                                              "owner")
                    self.mask_data[name] = np.frombuffer(mask, dtype=np.uint8)
        shards = [self.shard_data[n] for n in names]
        if not any(by_name[n].mask_sha256 for n in names):
            return shards, None
        return shards, [self.mask_data[n] for n in names]

    def _fetch_cached(self, sha256: str, suffix: str, what: str) -> bytes:
        """A file the coordinator announced by sha256 (a shard or a mask), kept in the cache
        (checked again when read from it)."""
        p = self.local.shards / f"{sha256}{suffix}"
        if not p.is_file():
            self.client.fetch(sha256, p, what)
        data = p.read_bytes()
        verify_sha256(data, sha256, what)
        return data

    def _payload(self, delta: dict[str, torch.Tensor], stats: protocol.SubmitStats,
                 feedback: bool = True) -> bytes:
        """The contribution in the run's codec (and, sparse, its block, k and bits); with error
        feedback the residual keeps what it did not carry (sparse: all that was not sent,
        decayed by the run's sparse_ef_decay before the next delta is added). A fresh lease
        (`feedback` False) sends its own delta alone, so a copy elsewhere matches it. `delta`
        is consumed: with feedback its tensors become the residual."""
        codec, opts = self.info.schedule.codec, self.codec_options
        if feedback and self.cfg.error_feedback and codec != "fp32":
            decay = self.info.schedule.sparse_ef_decay if codec == "sparse" else None
            # in place (`delta` is this call's own): overlapped, this runs beside the next
            # lease's training, so no model-sized copy more than needed
            e = codecs.accumulate(delta, self.residual, 1.0 if decay is None else decay,
                                  inplace=True)
            blob = codecs.to_bytes(e, codec, meta={"stats": stats.model_dump_json()}, **opts)
            sent, _ = codecs.from_bytes(blob, self.shapes)
            for k in list(sent):
                e[k].sub_(sent.pop(k))
            self.residual = e
            return blob
        return codecs.to_bytes(delta, codec, meta={"stats": stats.model_dump_json()}, **opts)

    # -- one round
    def _start(self, lease: protocol.Lease, part: PartialRound | None, beat: Heartbeat,
               before: Anchors | None) -> PendingTheta | None:
        """Set the model and `self.anchor` for `lease`; returns the pending fetch of a theta to
        fold in when it trains ahead (None: it starts from theta of the lease's round).
        `before`: the anchors of the lease before, whose unfolded ones carry over."""
        if self.overlap and (lease.ahead or (part is not None and part.anchor is not None)):
            if part is not None:  # a lease ahead, snapshotted before its fold
                load_into(self.model, part.params)
                self.anchor = Anchors(part.anchor, lease.round, local=True)
            else:
                if self.theta is None:  # nothing at hand: the open round's parameters
                    self._sync(lease.round - 1)
                if not self.live:
                    load_into(self.model, self.theta)
                unfolded = before.unfolded if self.live and before is not None else {}
                self.anchor = Anchors({k: v.clone() for k, v in
                                       state_dict_for_save(self.model).items()}, lease.round,
                                      local=True, unfolded=unfolded)
            log.info("round %d: training ahead from this worker's own parameters; the "
                     "parameters of round %d are folded in when they are published",
                     lease.round, lease.round)
            beat.every = protocol.HEARTBEAT_AHEAD_SECONDS  # to hear of the close soon
            return self._pending_theta(lease, beat)
        self._sync(lease.round)
        if self.theta_round != lease.round:
            return None
        load_into(self.model, self.theta if part is None else part.params)
        self.anchor = Anchors(self.theta, lease.round, local=False)
        self._save_params()
        return None

    def round(self, lease: protocol.Lease, stop, bar=None) -> None:
        # heartbeats from the start: syncing, loading shards and saving parameters can take
        # longer than the coordinator's silence allowance on a large model or a slow disk
        with Heartbeat(self.client, lease.lease_id) as beat:
            part = self._partial_for(lease)
            before_anchors, self.anchor = self.anchor, None
            pending = self._start(lease, part, beat, before_anchors)
            if self.anchor is None:
                log.info("round %d closed while syncing; asking for a new lease", lease.round)
                return
            shards, masks = self._shards(lease.shards)
            if lease.fresh and part is None:  # from theta_r with new AdamW state: a copy of
                self.loop.reset_optimizer()  # this lease elsewhere must come out alike
            if self.ranks is not None:
                self._brief_ranks(lease)

            def batches(step: int):
                return get_batch(shards, self.tcfg.batch_size, self.tcfg.seq_len, lease.seed,
                                 step, masks)

            def on_step(step: int, loss: float) -> None:
                beat.step = step - lease.start_step + 1
                if bar is not None:
                    bar(lease, step - lease.start_step + 1, loss)

            before = part.stats if part is not None else None
            done = before.steps if before else 0

            def fold(steps: int) -> None:
                nonlocal pending
                got = pending.result() if pending is not None else None
                if got is None:
                    return
                theta, rnd = got
                self.anchor.fold(self.model, theta, rnd)
                self.theta, self.theta_round = theta, rnd
                if snaps is not None:  # snapshots from here on resume from theta of the round
                    snaps.theta_round = rnd
                self._save_params()
                log.info("round %d: folded in the update of round %d after step %d of the "
                         "lease", lease.round, rnd - 1, done + steps)
                pending = self._pending_theta(lease, beat) if self.anchor.local else None
                if pending is None:
                    beat.every = protocol.HEARTBEAT_SECONDS

            snaps = None if self.ranks is not None else RoundSnapshots(
                self.folder.in_progress, lease, self.theta_round, self._train_state, before)
            beat.step = done
            st = self.loop.run(batches, lease.start_step + done, lease.max_steps - done,
                               deadline=time.monotonic() + lease.seconds, on_step=on_step,
                               # `finish` after one step at least: a lease given after the
                               # round's first contribution still sends some work
                               stop=lambda: bool(stop) or beat.closed
                               or (beat.finish and beat.step > done), snapshots=snaps,
                               between_steps=fold if pending is not None else None,
                               step_pause=self.cfg.step_pause)
            fold(st.steps)  # theta came with the last step: fold now, the next lease needs it
        if pending is not None:
            pending.cancel()
        self.summary.train_seconds += st.seconds
        log.info("round %d: trained %d steps in %.2fs", lease.round, st.steps, st.seconds)
        if beat.closed and not (self.info.schedule.stale_weight > 0 and st.steps):
            log.info("round %d closed while training; dropping this lease's work", lease.round)
            self.live, self.anchor = False, None
            if snaps is not None:
                snaps.discard()
            return
        if beat.finish and not beat.closed:
            log.info("round %d: its first contribution is in and it was not paced; sending the "
                     "%d steps done", lease.round, st.steps)
        if beat.closed:
            log.info("round %d closed while training; sending the %d steps done (applied late, "
                     "at %g of their weight)", lease.round, st.steps,
                     self.info.schedule.stale_weight)
        if snaps is not None and st.steps and snaps.due() and not self.overlap:
            snaps.save(st)  # killed while uploading: resend
        if before is not None:
            st = merge_stats(before, st)
        if st.steps == 0:
            return
        self.tokens_per_s = st.tokens_per_s
        delta = self.anchor.delta(state_dict_for_save(self.model))
        stats = protocol.SubmitStats(lease_id=lease.lease_id, round=lease.round, steps=st.steps,
                                     tokens=st.tokens, mean_loss=st.mean_loss,
                                     seconds=st.seconds, device=self.device.type)
        self.summary.rounds += 1

        def encode() -> bytes:  # the codec and the error feedback: seconds on a large model
            try:
                return self._payload(delta, stats, feedback=not lease.fresh)
            finally:
                self._encoded.set()

        self.uploader.wait()  # the contribution before is made (the residual is its own)
        self._encoded.clear()
        if self.overlap:  # made and sent in the background while the next lease trains
            if snaps is not None:
                snaps.discard()
            self.live = True
            self.uploader.send(lease.lease_id, lambda: self._upload(lease, st, encode, bar))
        else:
            self._upload(lease, st, encode, bar)
            if snaps is not None:
                snaps.discard()
        self._save_optimizer()
        self.folder.remember_micro_batch(str(self.device), self.loop.micro_batch)
        self.summary.last_round = lease.round

    def _upload(self, lease: protocol.Lease, st: StepStats, encode: Callable[[], bytes],
                bar=None) -> None:
        """Make (`encode`) and send a lease's contribution; heartbeats go on meanwhile: on a
        home uplink a large model's upload takes minutes, and a lease silent for
        LEASE_SILENCE_SECONDS is given up. Overlapped, this runs on the uploader's thread, with
        its own connection, so the encoding too hides behind the next lease's steps."""
        client = self.client
        if self.overlap:
            if self._up is None:
                self._up = Client(self.cfg.url, self.cfg.retry_for)
                self._up.token = self.client.token
            client = self._up
        with Heartbeat(client, lease.lease_id) as sending:
            sending.step = st.steps
            blob = encode()
            upload_started = time.monotonic()
            try:
                r = client.call("POST", protocol.SUBMIT.format(lease_id=lease.lease_id),
                                content=blob)
                self.summary.accepted += 1
                self.summary.tokens += st.tokens
                verdict = protocol.SubmitResponse.model_validate(r.json()).message
            except CoordinatorRefused as e:
                self.summary.refused += 1
                verdict = f"refused: {e.detail}"
                log.warning("round %d: %s", lease.round, verdict)
            upload_s = time.monotonic() - upload_started  # retries included: what it cost us
        log.info("round %d: %d steps, loss %.3f, %.0f tok/s, sent %.2f MB in %.1fs, %s",
                 lease.round, st.steps, st.mean_loss, st.tokens_per_s, len(blob) / 1e6,
                 upload_s, verdict)
        if bar is not None:
            bar.done(lease, st, len(blob), verdict, upload_s)

    def _brief_ranks(self, lease: protocol.Lease) -> None:
        """Hand the other ranks this round: the lease, where its shards are on this machine,
        theta_r, and (once) the AdamW state this process resumed from."""
        by_name = {s.name: s for s in self.info.train_shards}
        opt = None if self._ranks_have_optimizer else self.loop.optimizer_tensors()
        self.ranks.bcast_json({
            "cmd": "round", "lease": lease.model_dump(mode="json"),
            "shards": [str(self.local.shards / f"{by_name[n].sha256}.bin") for n in lease.shards],
            "masks": [str(self.local.shards / f"{by_name[n].mask_sha256}.mask")
                      for n in lease.shards] if by_name[lease.shards[0]].mask_sha256 else None,
            "optimizer": {k: list(v.shape) for k, v in opt.items()} if opt else None})
        self.ranks.bcast_tensors(self.theta, self.shapes)
        if opt:
            self.ranks.bcast_tensors(opt, {k: v.shape for k, v in opt.items()})
        self._ranks_have_optimizer = True

    # -- the loop
    def run(self) -> WorkerSummary:
        try:
            return self._run()
        finally:
            self.saves.close()  # what is queued is written before the worker lets go
            self.local.release()
            if self.ranks is not None:  # release the other ranks
                self.ranks.bcast_json({"cmd": "exit"})

    def _run(self) -> WorkerSummary:
        started = time.monotonic()
        with GracefulInterrupt("Ctrl-C: finishing this round early and sending the work done "
                               "(Ctrl-C again to abandon it)") as stop, RoundProgress(
                                   self.cfg.progress, self.name) as bar:
            while not stop:
                if self.cfg.max_rounds and self.summary.rounds >= self.cfg.max_rounds:
                    self.summary.reason = f"did the {self.cfg.max_rounds} rounds asked for"
                    break
                if self.cfg.max_hours and time.monotonic() - started > self.cfg.max_hours * 3600:
                    self.summary.reason = f"reached --max-hours {self.cfg.max_hours}"
                    break
                req = protocol.LeaseRequest(
                    have_round=self.theta_round, device=self.device.type,
                    tokens_per_s=self.tokens_per_s,
                    resume=self.partial.lease.lease_id if self.partial else None,
                    ahead=self.overlap, sending=self.uploader.in_flight)
                try:
                    r = self.client.call("POST", protocol.LEASE, json_body=req.model_dump())
                except CoordinatorRefused as e:
                    if e.status != 401:
                        raise
                    log.warning("the coordinator does not know our token; joining again")
                    self._join(force=True)
                    continue
                resp = protocol.LeaseResponse.model_validate(r.json())
                if resp.status == "done":
                    self.summary.reason = resp.message
                    self.folder.in_progress.unlink(missing_ok=True)
                    break
                if resp.status == "wait":
                    end = time.monotonic() + resp.retry_after
                    while time.monotonic() < end and not stop:
                        time.sleep(0.05)
                    continue
                try:
                    self.round(resp.lease, stop, bar)
                except KeyboardInterrupt:
                    print(f"abandoned round {resp.lease.round}: its work was not sent",
                          file=sys.stderr)
                    raise
            self.uploader.wait()  # the last contribution is sent before the worker leaves
            if stop and not self.summary.reason:
                self.summary.reason = "stopped by Ctrl-C after sending the round's work"
        self.summary.wall_seconds = time.monotonic() - started
        clients = [c for c in (self.client, self._bg, self._up) if c is not None]
        self.summary.bytes_sent = sum(c.bytes_out for c in clients)
        self.summary.bytes_received = sum(c.bytes_in for c in clients)
        for c in clients:
            c.close()
        log.info("trained %.1f%% of %.0f s", 100 * self.summary.train_share,
                 self.summary.wall_seconds)
        return self.summary


def codec_options(schedule: protocol.SwarmSchedule) -> dict[str, int]:
    """The `codecs.to_bytes` keywords this worker's contributions are made with: for a sparse
    run the block, k and bits the coordinator publishes (checked here, so a worker that cannot
    make them stops before it trains); none for the other codecs."""
    if schedule.codec != "sparse":
        return {}
    opts = {"block": schedule.block, "k": schedule.sparse_k, "bits": schedule.sparse_bits}
    try:
        if schedule.sparse_k is None or schedule.sparse_bits is None:
            raise codecs.CodecError("its run info names no k or bits")
        codecs.ErrorFeedback("sparse", **opts)
    except codecs.CodecError as e:
        raise CrowdtrainError(f"the coordinator's sparse codec settings are not usable ({e}); "
                              "tell the run's owner") from None
    return opts
