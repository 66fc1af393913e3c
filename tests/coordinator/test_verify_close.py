"""The verification in the coordinator's close (issue 21: credit only for real work), through
the Coordinator on the tiny run: honest contributions are real deltas, trained a few steps with
InnerLoop on their lease's batches; a noise contribution at the honest norm and a perturbed copy
of another's delta are left out with the reason in the ledger and get no credit; a round too
small for a reference credits provisionally; trust is kept per volunteer."""

from __future__ import annotations

import json
import time

import pytest
import torch
from swarm_helpers import copy_run, payload

from crowdtrain.cli.admin import run_admin
from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.data import get_batch, load_split
from crowdtrain.run.folder import SwarmConfig
from crowdtrain.run.model import load_into, state_dict_for_save
from crowdtrain.run.train import InnerLoop
from crowdtrain.wire.protocol import JoinRequest, LeaseRequest

H = 10


@pytest.fixture
def coord(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=H, rounds=4, round_seconds=60,
                   overlap=False, verify=True)
    c = Coordinator(run, evaluate_rounds=False)
    yield c
    c.close()


def join(c, name):
    return c.authenticate(c.join(JoinRequest(name=name, device="cpu", api_version=1)).token)


def honest(c, lease):
    """The delta a worker sends for `lease`: theta_r - theta after its H AdamW steps on the
    lease's batches."""
    run, tc = c.run, c.run.config.train
    names = [e.name for e in run.index.train]
    data = [load_split(run.data_dir, run.index, "train")[names.index(n)] for n in lease.shards]
    model = run.build_model()
    load_into(model, c.theta)
    InnerLoop(model, tc, torch.device("cpu")).run(
        lambda s: get_batch(data, tc.batch_size, tc.seq_len, lease.seed, s),
        lease.start_step, lease.max_steps)
    return {k: c.theta[k] - v for k, v in state_dict_for_save(model).items()}


def norm(d) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))


def noise_like(d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = {k: torch.randn(v.shape, generator=g) for k, v in d.items()}
    s = scale * norm(d) / norm(z)
    return {k: v * s for k, v in z.items()}


def close(c):
    rnd = c.round
    c.ledger.extend_round(rnd, time.time() - 1)
    assert c.tick()
    return {r["volunteer_id"]: r for r in c.ledger.accepted(rnd)}


def credits(c):
    return {v["name"]: v["credit_tokens"] for v in c.ledger.volunteers()}


def test_honest_round_passes_and_noise_is_left_out(coord):
    vols = [join(coord, n) for n in ("ann", "ben", "cat", "mallory")]
    leases = [coord.lease(v, LeaseRequest()).lease for v in vols]
    deltas = [honest(coord, ls) for ls in leases[:3]]
    deltas.append(noise_like(deltas[0], seed=7))  # noise at the honest norm
    for v, ls, d in zip(vols, leases, deltas, strict=True):
        coord.submit(v, ls.lease_id, payload(ls, coord.shapes, tokens=1000, delta=d))
    rows = close(coord)
    ids = {v.name: v.id for v in vols}
    for name in ("ann", "ben", "cat"):
        r = rows[ids[name]]
        assert (r["verified"], r["excluded"], r["reason"]) == ("valid", 0, None), dict(r)
    bad = rows[ids["mallory"]]
    assert bad["verified"] == "failed" and bad["excluded"] == 1
    assert bad["reason"].startswith("verification: ")
    assert credits(coord) == {"ann": 1000, "ben": 1000, "cat": 1000, "mallory": 0}
    assert coord.ledger.round_row(0)["contributions"] == 3
    assert bad["sha256"] not in coord.ledger.aggregated_sha256s(0)  # nor in the chain
    # trust: one valid result each, mallory's failure
    assert coord.ledger.trust(ids["ann"]) == (1, 1, 0)
    assert coord.ledger.trust(ids["mallory"]) == (0, 0, 1)
    listed = {v.name: v for v in coord.admin_volunteers()}
    assert (listed["ann"].trust_streak, listed["ann"].trust_failures) == (1, 0)
    assert (listed["mallory"].left_out, listed["mallory"].trust_failures) == (1, 1)
    table = run_admin(str(coord.run.dir), "list")
    assert "trust" in table and "0/1" in table.splitlines()[4]
    # the dashboard's status shows the left-out contribution with its reason
    st = coord.status()
    shown = [f for f in st.refusals if f.volunteer == "mallory"]
    assert shown and shown[0].left_out and shown[0].reason.startswith("verification: ")
    assert {v.name: v.left_out for v in st.volunteers}["mallory"] == 1


def test_a_perturbed_copy_of_another_delta_is_flagged(coord):
    vols = [join(coord, n) for n in ("ann", "ben", "cat", "copycat")]
    leases = [coord.lease(v, LeaseRequest()).lease for v in vols]
    deltas = [honest(coord, ls) for ls in leases[:3]]
    z = noise_like(deltas[0], seed=3, scale=0.3)
    deltas.append({k: deltas[0][k] + z[k] for k in z})  # ann's work + 30% noise
    for v, ls, d in zip(vols, leases, deltas, strict=True):
        coord.submit(v, ls.lease_id, payload(ls, coord.shapes, tokens=1000, delta=d))
    rows = close(coord)
    copy, original = rows[vols[3].id], rows[vols[0].id]
    assert copy["verified"] == "failed" and copy["excluded"] == 1, dict(copy)
    assert copy["reason"].startswith("verification: ")
    # the original (the earlier upload of the pair) keeps its credit
    assert original["verified"] == "valid" and original["excluded"] == 0, dict(original)
    assert credits(coord)["copycat"] == 0 and credits(coord)["ann"] == 1000


def test_a_round_too_small_for_a_reference_credits_provisionally(coord):
    ann, bob = join(coord, "ann"), join(coord, "bob")
    la, lb = coord.lease(ann, LeaseRequest()).lease, coord.lease(bob, LeaseRequest()).lease
    good = honest(coord, la)
    coord.submit(ann, la.lease_id, payload(la, coord.shapes, tokens=1000, delta=good))
    coord.submit(bob, lb.lease_id, payload(lb, coord.shapes, tokens=1000,
                                           delta=noise_like(good, seed=1)))
    rows = close(coord)
    a, b = rows[ann.id], rows[bob.id]
    # two contributions: no round reference; the absolute checks still stand
    assert a["verified"] == "provisional" and a["excluded"] == 0
    assert a["reason"].startswith("provisional: ")
    assert b["verified"] == "failed" and b["excluded"] == 1
    assert credits(coord) == {"ann": 1000, "bob": 0}
    assert coord.ledger.trust(ann.id) == (0, 0, 0)  # provisional: trust does not move
    assert coord.status().volunteers[0].provisional == 1


def test_verification_can_be_turned_off_and_is_validated(tiny_run, tmp_path):
    with pytest.raises(CrowdtrainError, match="verify"):
        SwarmConfig(verify="yes")  # type: ignore[arg-type]
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=H, rounds=2, round_seconds=60,
                   verify=False)
    assert json.loads((run.dir / "run.json").read_text())["swarm"]["verify"] is False
    c = Coordinator(run, evaluate_rounds=False)
    try:
        vol = join(c, "ann")
        ls = c.lease(vol, LeaseRequest()).lease
        c.submit(vol, ls.lease_id, payload(ls, c.shapes, tokens=1000))  # random: unchecked
        row = close(c)[vol.id]
        assert row["verified"] is None and row["excluded"] == 0
    finally:
        c.close()
