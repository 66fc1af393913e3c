"""End to end with real processes: three honest `crowdtrain join` workers and a freeloader
(tests/freeloader.py: joins, leases, uploads noise at a typical honest norm) on a run that
verifies its contributions (issue 21). The freeloader's contributions are accepted on arrival,
then left out in each round's close with the reason in the ledger: it gets no credit, while
every honest contribution is credited."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from swarm_helpers import Swarm, copy_run

from crowdtrain.coordinator.closecheck import SUSPECT
from crowdtrain.run.data import get_batch, load_split
from crowdtrain.run.ledger import Ledger
from crowdtrain.run.model import state_dict_for_save
from crowdtrain.run.train import InnerLoop

pytestmark = pytest.mark.slow

FREELOADER = Path(__file__).resolve().parents[1] / "freeloader.py"
H, ROUNDS = 20, 3


def honest_norm(run) -> float:
    """The norm of one honest lease's delta from checkpoint 0: what a freeloader would aim
    its noise at to look like work."""
    model, ckpt = run.load_model(0)
    tc = run.config.train
    data = load_split(run.data_dir, run.index, "train")[:1]
    InnerLoop(model, tc, torch.device("cpu")).run(
        lambda s: get_batch(data, tc.batch_size, tc.seq_len, 1, s), 0, H)
    after = state_dict_for_save(model)
    return float(torch.sqrt(sum(((ckpt.tensors[k] - after[k]).double() ** 2).sum()
                                for k in after)))


def test_a_freeloader_is_left_out_and_gets_no_credit(tiny_run, tmp_path):
    # stop-and-wait and 4 contributions a round: every round holds all four (a reference)
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=H, rounds=ROUNDS, round_seconds=60,
                   min_contributions=4, overlap=False, verify=True)
    norm = honest_norm(run)
    s = Swarm(run, tmp_path)
    honest = ("ann", "ben", "cat")
    try:
        s.serve()
        for name in honest:
            s.join(name)
        s.spawn("freeloader", [sys.executable, str(FREELOADER), s.url, f"{norm:.6g}"])
        for name in (*honest, "freeloader"):
            assert s.wait(name, timeout=120) == 0, s.log(name)
        status = s.status()
    finally:
        s.stop()
    assert f"freeloader done: {ROUNDS} sent" in s.log("freeloader"), s.log("freeloader")
    ledger = Ledger(run.ledger_path)
    try:
        names = {v["id"]: v["name"] for v in ledger.volunteers()}
        rows = [r for r in ledger.contributions() if r["status"] == "accepted"]
        mine = [r for r in rows if names[r["volunteer_id"]] == "freeloader"]
        theirs = [r for r in rows if names[r["volunteer_id"]] != "freeloader"]
        assert len(mine) == ROUNDS and len(theirs) == 3 * ROUNDS
        for r in mine:
            assert r["excluded"] == 1 and r["verified"] == "failed", dict(r)
            assert r["reason"].startswith("verification: "), dict(r)
        for r in theirs:  # credited: valid, or suspect and credited for now (closecheck)
            assert r["excluded"] == 0 and r["revoked"] == 0, (r["reason"], dict(r))
            assert r["verified"] == "valid" or r["reason"].startswith(SUSPECT), dict(r)
        credit = {v["name"]: v["credit_tokens"] for v in ledger.volunteers()}
        assert credit["freeloader"] == 0 and all(credit[n] > 0 for n in honest), credit
        trust = {names[v]: ledger.trust(v) for v in names}  # (copies: by the secret draw)
        assert trust["freeloader"][:3] == (0, 0, ROUNDS)
        valid = Counter(names[r["volunteer_id"]] for r in theirs if r["verified"] == "valid")
        assert all(trust[n][1:3] == (valid[n], 0) for n in honest), trust
    finally:
        ledger.close()
    # the public status shows why, and the freeloader's (zero) credit
    shown = [f for f in status.refusals if f.volunteer == "freeloader"]
    assert len(shown) == ROUNDS and all(f.left_out for f in shown)
    vols = {v.name: v for v in status.volunteers}
    assert vols["freeloader"].tokens == 0 and vols["freeloader"].left_out == ROUNDS
    assert vols["freeloader"].rounds == 0 and all(vols[n].rounds == ROUNDS for n in honest)
