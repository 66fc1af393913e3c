"""`crowdtrain verify`: an honest export replays exactly; an altered weight, ledger row, update
file or initial checkpoint fails, naming the first bad link."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest
import torch
from publish_helpers import run_swarm, train_briefly
from safetensors.torch import load_file, save_file

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.export import export_model
from crowdtrain.publish.provenance import read_provenance
from crowdtrain.publish.verify import verify_model
from crowdtrain.run.folder import Run


@pytest.fixture(scope="module")
def published(tiny_run, tmp_path_factory):
    """(run dir, model dir) of a 3-round swarm run exported at its latest checkpoint."""
    base = tmp_path_factory.mktemp("verify")
    run = run_swarm(tiny_run, base / "run", rounds=3)
    return run.dir, export_model(run, base / "model", evaluate=False)


@pytest.fixture
def copies(published, tmp_path):
    """Private copies to tamper with."""
    run_dir, model_dir = published
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copytree(model_dir, tmp_path / "model")
    return tmp_path / "run", tmp_path / "model"


def run_cli(capsys, *args):
    from crowdtrain.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_an_honest_export_is_exactly_the_replay(published, capsys):
    run_dir, model_dir = published
    rep = verify_model(model_dir, run_dir)
    assert rep.ok and rep.failure is None and rep.rounds == 3
    assert rep.lines[0].startswith("ok  genesis") and "round 2" in rep.lines[3]
    r = run_cli(capsys, "verify", model_dir, run_dir)
    assert r.returncode == 0, r.out
    assert r.stdout.strip().splitlines()[-1].startswith("verified: ")


def test_an_altered_weight_fails(copies, capsys):
    run_dir, model_dir = copies
    w = load_file(model_dir / "model.safetensors")
    k = "model.layers.1.mlp.up_proj.weight"
    w[k][3, 5] += 1e-6  # one float, barely
    save_file(w, model_dir / "model.safetensors", metadata={"format": "pt"})
    rep = verify_model(model_dir, run_dir)
    assert not rep.ok
    assert rep.failure.startswith("published weights (checkpoint 3, after link 2)")
    assert f"tensor {k} differs in 1 of" in rep.failure
    r = run_cli(capsys, "verify", model_dir, run_dir, "--quiet")
    assert r.returncode == 1 and r.stdout.startswith("FAILED: published weights")


def test_an_altered_contribution_row_names_its_round(copies):
    run_dir, model_dir = copies
    db = sqlite3.connect(Run(run_dir).ledger_path)
    with db:
        db.execute("UPDATE contributions SET sha256 = ? WHERE id = (SELECT MIN(id) FROM "
                   "contributions WHERE round = 1 AND status = 'accepted')", ("0" * 64,))
    db.close()
    rep = verify_model(model_dir, run_dir)
    assert not rep.ok and rep.failure.startswith("round 1 (link 1): the ledger's rows do not")
    assert rep.rounds == 1  # round 0 still checked out


def test_an_altered_round_row_or_update_file_names_its_round(copies):
    run_dir, model_dir = copies
    up = run_dir / "updates" / "update-000002.safetensors"
    blob = bytearray(up.read_bytes())
    blob[-1] ^= 1  # one bit of one int8 value
    up.write_bytes(bytes(blob))
    rep = verify_model(model_dir, run_dir)
    assert rep.failure.startswith("round 2 (link 2): update-000002.safetensors has sha256")
    # and if the ledger row is "fixed" to the altered file's hash, the chain link breaks
    import hashlib

    db = sqlite3.connect(Run(run_dir).ledger_path)
    with db:
        db.execute("UPDATE rounds SET update_sha256 = ? WHERE round = 2",
                   (hashlib.sha256(bytes(blob)).hexdigest(),))
    db.close()
    rep = verify_model(model_dir, run_dir)
    assert rep.failure.startswith("round 2 (link 2): the ledger's rows do not hash")


def test_a_consistently_forged_chain_still_fails_the_replay(copies):
    """Rewrite round 1's update AND every hash and link after it, as a forger with write
    access to the run would: the links agree, but the replay gives other weights."""
    import hashlib

    from crowdtrain.run.ledger import Ledger, chain_genesis, chain_link
    from crowdtrain.wire import codecs

    run_dir, model_dir = copies
    up = run_dir / "updates" / "update-000001.safetensors"
    shapes = {k: tuple(v.shape) for k, v in load_file(model_dir / "model.safetensors").items()}
    forged, _ = codecs.from_bytes(up.read_bytes(), shapes)
    forged = {k: v * 1.01 for k, v in forged.items()}
    up.write_bytes(codecs.to_bytes(forged, "int8"))
    led = Ledger(Run(run_dir).ledger_path)
    prev = chain_genesis(led.chain_genesis()["checkpoint_sha256"])
    for row in led.rounds()[:3]:
        sha = hashlib.sha256((run_dir / "updates" /
                              f"update-{row['round']:06d}.safetensors").read_bytes()).hexdigest()
        link = chain_link(prev, sha, led.aggregated_sha256s(row["round"]),
                          row["checkpoint_sha256"])
        with led.tx() as db:
            db.execute("UPDATE rounds SET update_sha256 = ?, chain_link = ? WHERE round = ?",
                       (sha, link, row["round"]))
        prev = link
    led.close()
    rep = verify_model(model_dir, run_dir)
    assert not rep.ok
    # the forged links disagree with the ones published in the model's provenance ...
    assert rep.failure.startswith("round 1 (link 1): the model's provenance records link")
    # ... and with the provenance rewritten too, the replay itself exposes the forgery
    prov = json.loads((model_dir / "provenance.json").read_text())
    led = Ledger(Run(run_dir).ledger_path)
    for r in prov["rounds"]:
        r["chain_link"] = led.round_row(r["round"])["chain_link"]
    prov["chain"]["head"] = prov["rounds"][-1]["chain_link"]
    led.close()
    (model_dir / "provenance.json").write_text(json.dumps(prov))
    rep = verify_model(model_dir, run_dir)
    assert rep.failure.startswith("round 1 (link 1): replaying update 1 gives checkpoint 2 "
                                  "with sha256")


def test_an_altered_initial_checkpoint_fails_at_the_genesis(copies):
    run_dir, model_dir = copies
    from crowdtrain.run.checkpoint import save_checkpoint

    ck = load_file(run_dir / "checkpoints" / "ckpt-000000.safetensors")
    ck["model.norm.weight"] = ck["model.norm.weight"] * 1.001
    save_checkpoint(run_dir / "checkpoints", 0, ck, {"source": "init"})  # self-consistent
    rep = verify_model(model_dir, run_dir)
    assert rep.failure.startswith("genesis (link before round 0): checkpoint 0 on disk has")


def test_missing_pieces_are_named(copies):
    run_dir, model_dir = copies
    (run_dir / "updates" / "update-000001.safetensors").unlink()
    rep = verify_model(model_dir, run_dir)
    assert rep.failure == (f"round 1 (link 1): the update file update-000001.safetensors is "
                           f"missing from {run_dir / 'updates'}; the replay needs every update")
    (run_dir / "checkpoints" / "ckpt-000000.safetensors").unlink()
    assert "checkpoint 0, where the chain starts, is missing" in \
        verify_model(model_dir, run_dir).failure


def test_replay_is_bit_exact_with_the_coordinators_checkpoints(published):
    """The replay reproduces every checkpoint the coordinator kept, bit for bit."""
    from crowdtrain.run.checkpoint import list_checkpoints, load_checkpoint
    from crowdtrain.run.folder import Run

    run_dir, model_dir = published
    run = Run(run_dir)
    last = list_checkpoints(run.ckpt_dir)[-1]
    pub = load_file(model_dir / "model.safetensors")
    ck = load_checkpoint(run.ckpt_dir, last).tensors
    assert set(pub) == set(ck) and all(torch.equal(pub[k], ck[k]) for k in ck)


def test_local_runs_and_wrong_inputs_are_refused_in_one_line(tiny_run, published, tmp_path,
                                                              capsys):
    run = train_briefly(tiny_run, tmp_path / "local", steps=2)
    local = export_model(run, tmp_path / "local-model", evaluate=False)
    with pytest.raises(CrowdtrainError, match="trained on one machine"):
        verify_model(local, run.dir)
    r = run_cli(capsys, "verify", local, run.dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and "only swarm runs" in r.stderr
    run_dir, model_dir = published
    with pytest.raises(CrowdtrainError, match="never served a swarm run"):
        verify_model(model_dir, run.dir)
    with pytest.raises(CrowdtrainError, match="has no provenance.json"):
        verify_model(run_dir, run_dir)


def test_pruned_checkpoints_restarts_and_crash_recovery_still_verify(tiny_run, tmp_path):
    """Checkpoints pruned to the last one, a coordinator restart, and a round whose ledger close
    was lost in a crash (recovered without its link, completed at the next close)."""
    from publish_helpers import contribution, copy_run

    from crowdtrain.coordinator.rules import Coordinator
    from crowdtrain.run.checkpoint import list_checkpoints
    from crowdtrain.run.ledger import Ledger
    from crowdtrain.wire.protocol import JoinRequest, LeaseRequest

    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=10, round_seconds=60,
                   keep_last=1, keep_every=100)
    for session in range(2):
        c = Coordinator(run, evaluate_rounds=False)
        vol = c.authenticate(c.join(JoinRequest(name=f"v{session}", device="cpu",
                                                api_version=1)).token)
        for _ in range(2):
            lease = c.lease(vol, LeaseRequest()).lease
            c.submit(vol, lease.lease_id, contribution(lease, c.shapes, 1000, lease.round))
            assert c.tick()
        c.close()
        if session == 0:  # as if the coordinator died after checkpoint 2, before the ledger
            led = Ledger(run.ledger_path)
            with led.tx() as db:
                db.execute("UPDATE rounds SET state = 'open', chain_link = NULL, "
                           "checkpoint_sha256 = NULL WHERE round = 1")
                db.execute("DELETE FROM rounds WHERE round = 2")
            led.close()
    assert list_checkpoints(run.ckpt_dir) == [0, 4]
    rep = verify_model(export_model(run, tmp_path / "m4", evaluate=False), run.dir)
    assert rep.ok and rep.rounds == 4, rep.failure


def test_an_earlier_checkpoint_verifies_up_to_its_round(published, tmp_path):
    run_dir, _ = published
    from crowdtrain.run.folder import Run

    out = export_model(Run(run_dir), tmp_path / "m2", rnd=2, evaluate=False)
    rep = verify_model(out, run_dir)
    assert rep.ok and rep.rounds == 2


def test_a_checkpoint_trained_locally_after_the_swarm_is_refused(published, tmp_path):
    from crowdtrain.run.folder import Run
    from crowdtrain.run.solo import train_local

    run_dir, _ = published
    shutil.copytree(run_dir, tmp_path / "run")
    run = Run(tmp_path / "run")
    train_local(run, steps=1, eval_every=1, progress=False)
    out = export_model(run, tmp_path / "m", evaluate=False)
    with pytest.raises(CrowdtrainError, match="checkpoint 4, made by `crowdtrain train`"):
        verify_model(out, run.dir)


def test_a_lora_run_verifies_its_adapter_and_merged_weights(tiny_run, corpus, tmp_path):
    pytest.importorskip("peft")
    from publish_helpers import close_rounds

    from crowdtrain.run.folder import SwarmConfig, init_run
    from crowdtrain.run.lora import LoraSettings

    pre = export_model(tiny_run, tmp_path / "pretrained", evaluate=False)
    run = init_run(tmp_path / "lora", [corpus], from_pretrained=pre, progress=False,
                   lora=LoraSettings(rank=4), swarm=SwarmConfig(inner_steps=5, rounds=5,
                                                                round_seconds=60))
    close_rounds(run, 2)
    out = export_model(run, tmp_path / "m", evaluate=False)
    m = read_provenance(out).model
    assert m.lora.rank == 4 and m.base_model == "pretrained"
    assert "LoRA | rank 4" in (out / "README.md").read_text()
    rep = verify_model(out, run.dir)
    assert rep.ok and rep.rounds == 2, rep.failure
    assert "published adapter" in rep.lines[-2] and "base with the replayed" in rep.lines[-1]
    merged = load_file(out / "model.safetensors")
    merged["model.norm.weight"][0] += 0.01
    save_file(merged, tmp_path / "merged.safetensors", metadata={"format": "pt"})
    shutil.copy(out / "model.safetensors", tmp_path / "honest.safetensors")
    shutil.copy(tmp_path / "merged.safetensors", out / "model.safetensors")
    assert verify_model(out, run.dir).failure.startswith(
        "published weights (checkpoint 2): not the base with the replayed adapters merged: "
        "tensor model.norm.weight differs in 1 of")
    shutil.copy(tmp_path / "honest.safetensors", out / "model.safetensors")
    adapter = out / "adapter" / "adapter_model.safetensors"
    w = load_file(adapter)
    k = sorted(w)[0]
    w[k] = w[k] * 1.0001
    save_file(w, adapter)
    assert verify_model(out, run.dir).failure.startswith(
        "published adapter (checkpoint 2, after link 1): not what the replay gives: tensor")
