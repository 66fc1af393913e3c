"""Provenance: the ledger's hash chain, provenance.json and the model card rendered from it
(HF model-card metadata), anonymous volunteers, old ledgers."""

from __future__ import annotations

import json
import sqlite3

import pytest
from publish_helpers import run_swarm, train_briefly

from crowdtrain.errors import CorruptDataError
from crowdtrain.publish.export import export_model
from crowdtrain.publish.modelcard import read_card_metadata
from crowdtrain.publish.provenance import Provenance, read_provenance, refusal_category
from crowdtrain.run.data import file_sha256
from crowdtrain.run.ledger import Ledger, chain_genesis, chain_link
from crowdtrain.wire.protocol import JoinRequest


@pytest.fixture(scope="module")
def swarm(tiny_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("prov")
    run = run_swarm(tiny_run, base / "run", rounds=3)
    return run, export_model(run, base / "model")


def test_every_round_chains_to_the_previous_one_and_its_contributions(swarm):
    run, _ = swarm
    led = Ledger(run.ledger_path)
    try:
        g = led.chain_genesis()
        assert g["round"] == 0
        assert g["checkpoint_sha256"] == json.loads(
            (run.ckpt_dir / "ckpt-000000.json").read_text())["sha256"]
        prev = chain_genesis(g["checkpoint_sha256"])
        for r in range(3):
            row = led.round_row(r)
            ck = json.loads((run.ckpt_dir / f"ckpt-{r + 1:06d}.json").read_text())
            assert row["checkpoint_sha256"] == ck["sha256"]
            shas = [c["sha256"] for c in led.accepted(r) if not c["excluded"]]
            assert len(shas) == (3 if r == 1 else 2)
            assert row["chain_link"] == chain_link(prev, row["update_sha256"], shas,
                                                   ck["sha256"])
            prev = row["chain_link"]
        assert led.round_row(3)["chain_link"] is None  # still open
    finally:
        led.close()


def test_a_round_closed_by_crash_recovery_gets_its_link_at_the_next_close(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    vid, _ = led.add_volunteer("v", "cpu")
    for r in range(3):
        led.open_round(r, 0.0)
        led.accept(r + 1, vid, r, f"{r}" * 64, 10, 5, 100, 100.0, 4.0, 1.0, "p")
    led.close_round(0, "u0", checkpoint_sha256="c1", base_sha256="c0")
    led.close_round(1, "u1")  # what Coordinator._recover_ledger does: no checkpoint hash
    assert led.round_row(1)["chain_link"] is None
    led.close_round(2, "u2", checkpoint_sha256="c3", base_sha256="c2")
    l0 = chain_link(chain_genesis("c0"), "u0", ["0" * 64], "c1")
    l1 = chain_link(l0, "u1", ["1" * 64], "c2")
    assert [led.round_row(r)["chain_link"] for r in range(3)] == [
        l0, l1, chain_link(l1, "u2", ["2" * 64], "c3")]
    assert led.round_row(1)["checkpoint_sha256"] == "c2"
    led.close()


def test_a_ledger_from_before_provenance_is_migrated(tmp_path):
    p = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(p)
    db.executescript("""
        CREATE TABLE volunteers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, token_hash TEXT
            NOT NULL UNIQUE, created_at REAL NOT NULL, last_seen REAL, device TEXT,
            tokens_per_s REAL, banned INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE rounds (round INTEGER PRIMARY KEY, state TEXT NOT NULL, opened_at REAL
            NOT NULL, deadline REAL NOT NULL, closed_at REAL, contributions INTEGER NOT NULL
            DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0, train_loss REAL, val_loss REAL,
            update_sha256 TEXT, bytes_in INTEGER NOT NULL DEFAULT 0, bytes_out INTEGER NOT
            NULL DEFAULT 0);
        INSERT INTO volunteers (name, token_hash, created_at) VALUES ('old', 'h', 0);
        INSERT INTO rounds (round, state, opened_at, deadline) VALUES (0, 'open', 0, 0);
    """)
    db.close()
    led = Ledger(p)
    assert led.volunteers()[0]["anonymous"] == 0
    led.close_round(0, "u0", checkpoint_sha256="c1", base_sha256="c0")
    assert led.round_row(0)["chain_link"] == chain_link(chain_genesis("c0"), "u0", [], "c1")
    led.close()
    Ledger(p).close()  # opening again changes nothing


def test_provenance_records_data_rounds_contributors_refusals_and_compute(swarm):
    run, model = swarm
    prov = read_provenance(model)
    assert prov.run.trained_by == "swarm" and prov.model.checkpoint_round == 3
    d = prov.data
    assert [s.model_dump() for s in d.sources] == run.index.sources
    assert [s.sha256 for s in d.train_shards] == [e.sha256 for e in run.index.train]
    assert [s.sha256 for s in d.val_shards] == [e.sha256 for e in run.index.val]
    assert d.tokenizer.sha256 == file_sha256(run.tokenizer_path)
    assert prov.hyperparameters.train.lr == run.config.train.lr
    assert prov.hyperparameters.swarm.inner_steps == 5
    assert [r.round for r in prov.rounds] == [0, 1, 2]
    assert prov.chain.complete and prov.chain.head == prov.rounds[-1].chain_link
    # shares of tokens, by display name or "anonymous"
    people = {c.name: c for c in prov.contributors}
    assert set(people) == {"alice", "anonymous", "carol"}
    assert people["anonymous"].anonymous and people["anonymous"].rounds == 3
    total = sum(c.tokens for c in prov.contributors)
    assert total == prov.training.tokens_trained == sum(r.tokens for r in prov.rounds)
    assert abs(sum(c.share for c in prov.contributors) - 1) < 1e-9
    assert people["carol"].refused == 2 and people["carol"].rounds == 1
    assert prov.refused.total == 2 and prov.refused.by_reason == {
        "unknown lease N": 1, "payload is for lease N round N, not lease N round N": 1}
    curve = prov.loss_curve
    assert [p.val_loss for p in curve[:3]] == [6.0, 5.5, 5.0]  # the coordinator's evals
    assert curve[3].round == 3 and 0 < curve[3].val_loss < 10  # measured at export
    assert [p.tokens_trained for p in curve] == [0, 3000, 8560, 11560]
    c = prov.compute
    assert c.contributions == 7 and c.volunteer_seconds == 14.0
    assert c.training_flops_estimate == 6.0 * prov.model.params * total
    ev = prov.evaluation
    assert ev.bits_per_byte > 0 and ev.data.startswith("held-out split of")
    assert prov.files["model.safetensors"] == file_sha256(model / "model.safetensors")
    # the volunteer who opted out is named nowhere in what is published
    for name in ("provenance.json", "README.md"):
        assert "bob" not in (model / name).read_text()


def test_model_card_parses_as_hugging_face_metadata(swarm):
    from huggingface_hub import ModelCard

    _, model = swarm
    prov = read_provenance(model)
    card = ModelCard.load(model / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-generation"
    assert {"crowdtrain", "volunteer-computing"} <= set(data["tags"])
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["bits_per_byte"] == round(prov.evaluation.bits_per_byte, 5)
    assert results["perplexity"] == round(prov.evaluation.perplexity, 4)
    assert read_card_metadata(card.content)["model-index"][0]["name"] == prov.run.name
    text = card.text
    for needle in ("## Contributors", "| alice |", "| anonymous |", "unknown lease N",
                   prov.chain.head, "crowdtrain verify", "## Evaluation",
                   run_source_hash(prov), "bits per byte"):
        assert needle in text, needle


def run_source_hash(prov: Provenance) -> str:
    return prov.data.sources[0].sha256


def test_a_local_run_has_a_card_without_swarm_sections(tiny_run, tmp_path):
    from huggingface_hub import ModelCard

    run = train_briefly(tiny_run, tmp_path / "local", steps=2)
    out = export_model(run, tmp_path / "model")
    prov = read_provenance(out)
    assert prov.run.trained_by == "local" and prov.chain is None
    assert prov.contributors == [] and prov.rounds == []
    assert [p.round for p in prov.loss_curve] == [0, 1]
    card = ModelCard.load(out / "README.md")
    assert "trained on one machine" in card.text and "## Contributors" not in card.text
    assert card.data.eval_results[0].metric_type == "bits_per_byte"


def test_anonymous_is_opt_in_at_join():
    from crowdtrain.cli.main import build_parser

    assert JoinRequest(name="x", device="cpu", api_version=1).anonymous is False
    a = build_parser().parse_args(["join", "http://h:1", "--anonymous"])
    assert a.anonymous is True
    assert build_parser().parse_args(["join", "http://h:1"]).anonymous is False


def test_refusal_reasons_are_grouped_without_their_particulars():
    assert refusal_category("unknown lease 12") == refusal_category("unknown lease 7")
    assert refusal_category("stale: round 3 closed before ...") == "stale"
    assert refusal_category("verification: loss check: gain -0.06 below 0.5 x 0.1", True) == \
        refusal_category("verification: loss check: gain 0.01", True) == \
        "left out by verification (loss check)"
    assert refusal_category("norm 5.3 is 12x the median", True) == \
        "left out by robust aggregation (norm outlier)"
    assert refusal_category("norm 9.1 is 40x the round median 0.2 (limit 10x): refused",
                            left_out=True) == "left out by robust aggregation (norm outlier)"
    assert refusal_category(None) == "unspecified"


def test_a_record_from_an_earlier_version_reads_and_keeps_its_fields(swarm, tmp_path):
    """provenance.json as the first crowdtrain that wrote it did (none of the fields added
    since), with a field this version does not know: it reads, and writes back the same."""
    _, model = swarm
    raw = json.loads((model / "provenance.json").read_text())
    for part, key in [("model", "base_model"), ("model", "base_sha256"), ("model", "lora"),
                      ("training", "warm_start"), ("training", "teacher"),
                      ("compute", "warm_start_tokens"), ("compute", "warm_start_seconds")]:
        del raw[part][key]
    del raw["hyperparameters"]["swarm"]["inner_steps_growth"]
    raw["run"]["from_the_future"] = {"x": 1}
    (tmp_path / "provenance.json").write_text(json.dumps(raw))
    prov = read_provenance(tmp_path)
    assert prov.model.lora is None and prov.training.warm_start is None
    assert prov.hyperparameters.swarm.inner_steps_growth == 1.0
    assert prov.to_json() == raw
    raw["rounds"][0]["round"] = "first"
    (tmp_path / "provenance.json").write_text(json.dumps(raw))
    with pytest.raises(CorruptDataError, match=r"not a valid crowdtrain provenance record: "
                                               r"rounds\.0\.round"):
        read_provenance(tmp_path)


def test_the_card_of_a_minimal_record_is_hugging_face_metadata_too():
    """A GGUF converted from a folder without provenance: only the run's name and the
    parameters are known; its card says so, with the GGUF file's evaluation as the
    model-index and no library (llama.cpp runs it, not transformers)."""
    from huggingface_hub import ModelCard

    from crowdtrain.publish.modelcard import card_data, model_card
    from crowdtrain.publish.provenance import (
        FORMAT,
        Evaluation,
        GgufInfo,
        ModelInfo,
        RunInfo,
    )

    ev = Evaluation(data="t.txt", tokens=10, bytes=40, nats=20.0, loss=2.0,
                    perplexity=float("inf"), bits_per_byte=0.72)
    record = Provenance(format=FORMAT, crowdtrain_version="0", run=RunInfo(name="m"),
                        model=ModelInfo(params=1234), format_exported="gguf",
                        gguf=GgufInfo(file="m-f16.gguf", quant="f16", bytes=99,
                                      tensor_types={"F16": 2}, original_fp32_bytes=4936,
                                      evaluation=ev))
    assert ev.perplexity is None  # not finite: not a figure
    data = card_data(record)
    assert data.library_name is None and "gguf" in data.tags
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("bits_per_byte", 0.72), ("loss", 2.0)]
    card = ModelCard(str(model_card(record)))
    assert card.data.to_dict() == data.to_dict()
    assert card.data.to_dict()["model-index"][0]["name"] == "m"
    assert "# m\n" in card.text and "| parameters | 1,234 |" in card.text
    assert "llama-cli -m m-f16.gguf" in card.text and "## Contributors" not in card.text
