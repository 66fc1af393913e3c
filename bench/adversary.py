"""A malicious volunteer for the poisoning experiments: a real `crowdtrain` worker process
that trains like any other, then tampers with what it sends. Never part of the package.

    python bench/adversary.py URL --attack sign_flip --name mallory [--home DIR]

Attacks (what goes on the wire instead of its honest delta, in the run's codec: int8, or the
sparse codec's top-k of the tampered delta with the run's k and bits):
- scaled_x100: 100 x its delta;
- noise: Gaussian noise with the L2 norm of its delta;
- sign_flip: minus its delta;
- alie: "A Little Is Enough" (Baruch et al. 2019), omniscient: it waits until the round's
  honest contributions are on the coordinator's disk (--peek RUN_DIR, --honest N), reads them
  and sends mean - z * std coordinate-wise: in-distribution, hard to spot by norm;
- liar: an honest delta that reports 100x the tokens it trained (the coordinator must cap
  its weight at the lease's budget);
- nan: a delta with a NaN (must be refused at validation, 422).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crowdtrain.volunteer.config import WorkerConfig  # noqa: E402
from crowdtrain.volunteer.worker import Worker  # noqa: E402
from crowdtrain.wire import codecs, protocol  # noqa: E402

ATTACKS = ("scaled_x100", "noise", "sign_flip", "alie", "liar", "nan")
log = logging.getLogger("crowdtrain.adversary")


def norm(d: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in d.values()))


def tamper(attack: str, delta: dict[str, torch.Tensor], peers: list[dict[str, torch.Tensor]],
           seed: int, z: float = 1.0) -> dict[str, torch.Tensor]:
    """The delta the attacker sends instead of its honest `delta` (pure)."""
    if attack == "scaled_x100":
        return {k: v * 100.0 for k, v in delta.items()}
    if attack == "sign_flip":
        return {k: -v for k, v in delta.items()}
    if attack == "noise":
        g = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(delta[k].shape, generator=g) for k in sorted(delta)}
        scale = norm(delta) / norm(noise)
        return {k: v * scale for k, v in noise.items()}
    if attack == "alie":
        if len(peers) < 2:
            return {k: -v for k, v in delta.items()}  # nothing to hide among: plain sign flip
        out = {}
        for k in delta:
            x = torch.stack([p[k] for p in peers])
            out[k] = x.mean(0) - z * x.std(0)
        return out
    if attack == "nan":
        out = {k: v.clone() for k, v in delta.items()}
        next(iter(out.values())).view(-1)[0] = float("nan")
        return out
    if attack == "liar":
        return delta
    raise ValueError(f"unknown attack {attack!r}")


class Adversary(Worker):
    def __init__(self, cfg: WorkerConfig, attack: str, peek: Path | None, honest: int,
                 z: float) -> None:
        super().__init__(cfg)
        self.attack, self.peek, self.honest, self.z = attack, peek, honest, z
        self.lease_deadline = 0.0

    def round(self, lease: protocol.Lease, stop, bar=None) -> None:
        self.lease_deadline = time.monotonic() + lease.seconds
        super().round(lease, stop, bar)

    def _peers(self, rnd: int) -> list[dict[str, torch.Tensor]]:
        """The round's honest contributions, read from the coordinator's disk once `honest` of
        them are there (or the lease is about to run out)."""
        if self.peek is None:
            return []
        d = self.peek / "contributions" / f"r{rnd:06d}"
        while time.monotonic() < self.lease_deadline - 1.0:
            files = sorted(d.glob("lease-*.safetensors")) if d.is_dir() else []
            if len(files) >= self.honest:
                break
            time.sleep(0.1)
        else:
            files = sorted(d.glob("lease-*.safetensors")) if d.is_dir() else []
        return [codecs.from_bytes(f.read_bytes(), self.shapes)[0] for f in files]

    def _payload(self, delta: dict[str, torch.Tensor], stats: protocol.SubmitStats,
                 feedback: bool = True) -> bytes:  # no error feedback of its own either way
        peers = self._peers(stats.round) if self.attack == "alie" else []
        bad = tamper(self.attack, delta, peers, seed=stats.lease_id, z=self.z)
        if self.attack == "liar":
            stats = stats.model_copy(update={"tokens": stats.tokens * 100})
        log.info("round %d: sending %s (honest norm %.4g, sent norm %.4g)", stats.round,
                 self.attack, norm(delta), norm(bad))
        codec, opts = self.info.schedule.codec, self.codec_options  # the run's (k, bits)
        if self.attack == "nan":  # the encoder refuses NaN; a hostile client writes its own
            from safetensors.torch import save
            wire = codecs.encode(delta, codec, **opts)
            first = next(k for k in sorted(wire) if wire[k].is_floating_point())
            wire[first].view(-1)[0] = float("nan")
            head = {"codec": codec, "block": str(opts.get("block", codecs.default_block(codec)))}
            head.update({k: str(v) for k, v in opts.items() if k != "block"})
            return save(wire, metadata={**head, "stats": stats.model_dump_json()})
        return codecs.to_bytes(bad, codec, meta={"stats": stats.model_dump_json()}, **opts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--attack", choices=ATTACKS, required=True)
    p.add_argument("--name", default="mallory")
    p.add_argument("--home", type=Path, required=True, help="identity and caches folder")
    p.add_argument("--peek", type=Path, help="the run directory (alie reads honest deltas)")
    p.add_argument("--honest", type=int, default=3, help="honest contributions per round")
    p.add_argument("--z", type=float, default=1.0, help="alie: standard deviations to shift")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = WorkerConfig(url=a.url, name=a.name, home=a.home, threads=a.threads,
                       error_feedback=False, progress=False)
    s = Adversary(cfg, a.attack, a.peek, a.honest, a.z).run()
    log.info("adversary done: %d rounds, %d accepted, %d refused (%s)", s.rounds, s.accepted,
             s.refused, s.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
