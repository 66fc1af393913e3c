"""Helpers for the publishing tests: a small swarm run driven through the coordinator in process
(named, anonymous and refused contributions), and a briefly trained local run."""

from __future__ import annotations

from pathlib import Path

import torch
from swarm_helpers import copy_run

from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.errors import Refused
from crowdtrain.run.folder import Run
from crowdtrain.wire import codecs
from crowdtrain.wire.protocol import JoinRequest, LeaseRequest, SubmitStats


def contribution(lease, shapes: dict, tokens: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
    st = SubmitStats(lease_id=lease.lease_id, round=lease.round, steps=5, tokens=tokens,
                     mean_loss=4.0, seconds=2.0)
    return codecs.to_bytes(delta, "int8", meta={"stats": st.model_dump_json()})


def run_swarm(tiny_run: Run, dst: Path, rounds: int = 3) -> Run:
    """`rounds` closed rounds: alice (named) and bob (anonymous) contribute every round, carol
    in round 1; a submission on an unknown lease and one for the wrong round are refused."""
    run = copy_run(tiny_run, dst, inner_steps=5, rounds=rounds + 2, round_seconds=60)
    c = Coordinator(run, evaluate_rounds=False)
    try:
        def join(name: str, anonymous: bool = False):
            resp = c.join(JoinRequest(name=name, device="cpu", api_version=1,
                                      anonymous=anonymous))
            return c.authenticate(resp.token)

        alice, bob, carol = join("alice"), join("bob", anonymous=True), join("carol")
        for r in range(rounds):
            vols = [alice, bob] + ([carol] if r == 1 else [])
            leases = [c.lease(v, LeaseRequest()).lease for v in vols]
            if r == 1:  # an unknown lease, a payload claiming another round: refused
                wrong = contribution(leases[2].model_copy(update={"round": 0}), c.shapes, 500, 99)
                for lease_id, blob in ((10_000, b"not a payload"), (leases[2].lease_id, wrong)):
                    try:
                        c.submit(carol, lease_id, blob)
                    except Refused:
                        pass
            for i, (v, lease) in enumerate(zip(vols, leases, strict=True)):
                c.submit(v, lease.lease_id, contribution(lease, c.shapes, 1000 * (i + 1),
                                                         seed=10 * r + i))
            c.ledger.set_val_loss(r, 6.0 - 0.5 * r)
            assert c.tick(), f"round {r} should close"
    finally:
        c.close()
    return Run(dst)


def train_briefly(tiny_run: Run, dst: Path, steps: int) -> Run:
    from crowdtrain.run.solo import train_local

    run = copy_run(tiny_run, dst)
    train_local(run, steps=steps, eval_every=steps, progress=False)
    return run


def close_rounds(run: Run, n: int) -> None:
    """`n` rounds of one volunteer's contributions, through the coordinator in process."""
    c = Coordinator(run, evaluate_rounds=False)
    try:
        vol = c.authenticate(c.join(JoinRequest(name="solo", device="cpu",
                                                api_version=1)).token)
        for _ in range(n):
            lease = c.lease(vol, LeaseRequest()).lease
            c.submit(vol, lease.lease_id, contribution(lease, c.shapes, 1000, lease.round))
            assert c.tick()
    finally:
        c.close()
