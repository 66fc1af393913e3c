"""A freeloader, for the end-to-end test of the verification (tests/e2e/test_freeloader.py)
and the freeloading benchmark (bench/freeloaders.py, issue 21): it joins over the HTTP API,
takes every lease like a worker and uploads, in the run's codec, something that is not the
lease's work, reporting the lease's full steps and tokens. One kind per process (`--kind`):

- noise (the default): trains nothing, sends Gaussian noise scaled to NORM (a typical honest
  contribution's norm);
- half: trains the first half of the lease's steps, reports all of them;
- othershard: trains all the lease's steps, on a train shard other than the leased one (the
  next in the run's index), and reports the leased one;
- copy: a colluder that obtains another volunteer's upload of the same round (read from the
  coordinator's run folder) and sends it with Gaussian noise of 5% of its norm added;
- replay: trains its first lease honestly, then sends that delta again for every later lease,
  with fresh 5% noise each time.

Every lease that trains is trained like a worker's "fresh" lease: from the round's parameters
(GET /v1/model), with a new AdamW state and no error-feedback residual; the delta is theta
minus the trained parameters (the worker's sign, `volunteer.overlap.Anchors.delta`). The kinds
other than noise need the run folder (`--run-dir`): the model is built from it and the shards
are memory-mapped from its data files (they are the ones the coordinator serves).

    python tests/freeloader.py URL NORM [NAME] [--kind KIND] [--run-dir RUN_DIR]

Prints a line per lease (kind, lease, round, HTTP status) and "freeloader done: N sent"."""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import load

from crowdtrain.wire import codecs, protocol

KINDS = ("noise", "half", "copy", "replay", "othershard")
NEEDS_RUN_DIR = ("half", "copy", "replay", "othershard")


def norm_of(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in tensors.values())))


def perturbed(delta: dict[str, torch.Tensor], share: float, seed: int) -> dict[str, torch.Tensor]:
    """`delta` + Gaussian noise of `share` x its norm (seeded)."""
    g = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(v.shape, generator=g) for k, v in delta.items()}
    scale = share * norm_of(delta) / max(norm_of(noise), 1e-30)
    return {k: delta[k].float() + scale * noise[k] for k in delta}


class Freeloader:
    """One freeloading volunteer of one kind (module docstring)."""

    def __init__(self, url: str, norm: float, name: str, kind: str, run_dir: Path | None,
                 seconds: float = 1.0, share: float = 0.05, copy_timeout: float = 600.0):
        self.norm, self.kind, self.seconds, self.share = norm, kind, seconds, share
        self.copy_timeout = copy_timeout
        self.http = httpx.Client(base_url=url, timeout=60,
                                 headers={protocol.API_HEADER: str(protocol.API_VERSION)})
        self.info = protocol.RunInfo.model_validate(self.http.get(protocol.INFO).json())
        joined = self.http.post(protocol.JOIN, json=protocol.JoinRequest(
            name=name, device="cpu", api_version=protocol.API_VERSION).model_dump())
        joined.raise_for_status()
        self.me = protocol.JoinResponse.model_validate(joined.json())
        self.http.headers["Authorization"] = f"Bearer {self.me.token}"
        # the shapes of what travels: from the model it is asked to train
        theta, _ = self.theta()
        self.shapes = {k: tuple(v.shape) for k, v in theta.items()}
        self.tokens_per_step = self.info.train["batch_size"] * self.info.train["seq_len"]
        self.run = None
        if kind in NEEDS_RUN_DIR:
            from crowdtrain.run.folder import Run
            from crowdtrain.run.train import TrainConfig
            from crowdtrain.volunteer.worker import codec_options

            self.run = Run(run_dir)
            self.tcfg = TrainConfig(**self.info.train)
            self.model = self.run.build_model()
            self.codec_options = codec_options(self.info.schedule)
        else:
            self.codec_options = {}
        self.first: tuple[dict[str, torch.Tensor], protocol.SubmitStats] | None = None  # replay

    # -- what it would download or read
    def theta(self) -> tuple[dict[str, torch.Tensor], int]:
        """The open round's parameters (fp32, as `state_dict_for_save` names them) and round."""
        r = self.http.get(protocol.MODEL)
        r.raise_for_status()
        return load(r.content), int(r.headers.get(protocol.ROUND_HEADER, -1))

    def shard(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """A train shard (and its loss mask) memory-mapped from the run folder's data files."""
        from crowdtrain.run.data import mask_name

        entry = self.run.index.entry(name)
        toks = np.memmap(self.run.data_dir / name, dtype=self.run.index.dtype, mode="r")
        mask = np.memmap(self.run.data_dir / mask_name(name), dtype=np.uint8, mode="r") \
            if entry.mask_sha256 else None
        return toks, mask

    def other_shard(self, leased: list[str]) -> str:
        """The train shard after the (first) leased one in the run's index, wrapping round."""
        names = [e.name for e in self.run.index.train]
        if len(names) < 2:
            raise SystemExit("othershard needs a run of two or more train shards")
        return names[(names.index(leased[0]) + 1) % len(names)]

    # -- training, as a fresh lease
    def train(self, lease: protocol.Lease, steps: int, shards: list[str]
              ) -> tuple[dict[str, torch.Tensor], float, float] | None:
        """`steps` inner steps of `lease` (its seed and start step) on `shards`, from the
        lease's round's parameters with a new AdamW state: (delta = theta - trained, mean
        loss, seconds); None if the open round is no longer the lease's."""
        from crowdtrain.run.data import get_batch
        from crowdtrain.run.model import load_into, state_dict_for_save
        from crowdtrain.run.train import InnerLoop

        theta, rnd = self.theta()
        if rnd != lease.round:
            return None
        load_into(self.model, theta)
        data = [self.shard(n) for n in shards]
        toks = [t for t, _ in data]
        masks = [m for _, m in data] if all(m is not None for _, m in data) else None
        bs, sl = self.tcfg.batch_size, self.tcfg.seq_len
        st = InnerLoop(self.model, self.tcfg, torch.device("cpu")).run(
            lambda s: get_batch(toks, bs, sl, lease.seed, s, masks), lease.start_step, steps)
        after = state_dict_for_save(self.model)
        return {k: theta[k].float() - after[k].float() for k in theta}, st.mean_loss, st.seconds

    # -- the colluder's copy
    def copied(self, lease: protocol.Lease) -> tuple[dict[str, torch.Tensor], float, float] | None:
        """Another volunteer's accepted contribution of the lease's round (the earliest, so
        never another copy), read from the run folder once it exists: (delta, its reported
        mean loss, seconds); None when the round closes first or the wait times out."""
        db = sqlite3.connect(f"file:{self.run.ledger_path}?mode=ro", uri=True, timeout=30)
        end = time.monotonic() + self.copy_timeout
        try:
            while time.monotonic() < end:
                row = db.execute(
                    "SELECT c.path, c.mean_loss, c.seconds FROM contributions c "
                    "WHERE c.round = ? AND c.status = 'accepted' AND c.path IS NOT NULL "
                    "AND c.volunteer_id != ? ORDER BY c.id LIMIT 1",
                    (lease.round, self.me.volunteer_id)).fetchone()
                if row is not None:
                    try:
                        blob = (self.run.dir / row[0]).read_bytes()
                    except OSError:
                        time.sleep(0.2)  # being moved into place: try again
                        continue
                    delta, _ = codecs.from_bytes(blob, self.shapes)
                    return delta, float(row[1] or 4.0), float(row[2] or self.seconds)
                state = db.execute("SELECT state FROM rounds WHERE round = ?",
                                   (lease.round,)).fetchone()
                if state is not None and state[0] == "closed":
                    return None
                time.sleep(0.3)
        finally:
            db.close()
        return None

    # -- one lease
    def work(self, lease: protocol.Lease) -> tuple[dict[str, torch.Tensor], float, float] | None:
        """What this freeloader sends for `lease`: (delta, mean loss, seconds) to report, or
        None for nothing."""
        t0 = time.monotonic()
        if self.kind == "noise":
            time.sleep(self.seconds)  # "training"
            g = torch.Generator().manual_seed(lease.lease_id)
            noise = {k: torch.randn(s, generator=g) for k, s in self.shapes.items()}
            total = norm_of(noise)
            return {k: v * (self.norm / total) for k, v in noise.items()}, 4.0, self.seconds
        if self.kind == "half":
            got = self.train(lease, lease.max_steps // 2, lease.shards)
            return None if got is None else (got[0], got[1], 2 * got[2])  # claims it all
        if self.kind == "othershard":
            return self.train(lease, lease.max_steps, [self.other_shard(lease.shards)])
        if self.kind == "copy":
            got = self.copied(lease)
            if got is None:
                return None
            return perturbed(got[0], self.share, lease.lease_id), got[1], \
                max(got[2], time.monotonic() - t0)
        # replay
        if self.first is None:
            got = self.train(lease, lease.max_steps, lease.shards)
            if got is not None:
                self.first = got
            return got
        delta, loss, seconds = self.first
        return perturbed(delta, self.share, lease.lease_id), loss, seconds

    def loop(self) -> int:
        sent = 0
        while True:
            r = self.http.post(protocol.LEASE, json=protocol.LeaseRequest().model_dump())
            r.raise_for_status()
            resp = protocol.LeaseResponse.model_validate(r.json())
            if resp.status == "done":
                break
            if resp.status == "wait":
                time.sleep(max(0.2, resp.retry_after))
                continue
            lease = resp.lease
            got = self.work(lease)
            if got is None:
                print(f"{self.kind} lease {lease.lease_id} round {lease.round}: nothing to send "
                      "(the round moved on)", flush=True)
                continue
            delta, mean_loss, seconds = got
            stats = protocol.SubmitStats(lease_id=lease.lease_id, round=lease.round,
                                         steps=lease.max_steps,
                                         tokens=lease.max_steps * self.tokens_per_step,
                                         mean_loss=mean_loss, seconds=seconds)
            blob = codecs.to_bytes(delta, self.info.schedule.codec,
                                   meta={"stats": stats.model_dump_json()}, **self.codec_options)
            up = self.http.post(protocol.SUBMIT.format(lease_id=lease.lease_id), content=blob,
                                headers={"Content-Type": "application/octet-stream"})
            sent += up.status_code == 200
            print(f"{self.kind} lease {lease.lease_id} round {lease.round}: {up.status_code} "
                  f"{up.text[:200]}", flush=True)
        return sent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("norm", type=float, help="the noise's norm (a typical honest delta's)")
    p.add_argument("name", nargs="?", default="freeloader")
    p.add_argument("--kind", choices=KINDS, default="noise")
    p.add_argument("--run-dir", type=Path, help="the coordinator's run folder (every kind "
                   "but noise)")
    p.add_argument("--seconds", type=float, default=1.0, help="noise: seconds of 'training'")
    p.add_argument("--share", type=float, default=0.05,
                   help="copy, replay: the added noise's norm over the delta's")
    p.add_argument("--copy-timeout", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a = p.parse_args(argv)
    if a.kind in NEEDS_RUN_DIR and a.run_dir is None:
        p.error(f"--kind {a.kind} needs --run-dir")
    torch.set_num_threads(a.threads)
    f = Freeloader(a.url, a.norm, a.name, a.kind, a.run_dir, a.seconds, a.share,
                   a.copy_timeout)
    sent = f.loop()
    print(f"freeloader done: {sent} sent", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
