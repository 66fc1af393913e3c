"""Export: the folder loads with plain transformers and gives the same logits; generation."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.export import export_model
from crowdtrain.publish.generate import generate_text


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    return export_model(tiny_run, tmp_path_factory.mktemp("export") / "model")


def test_export_writes_a_hugging_face_folder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names


def test_exported_model_matches_in_memory_logits(tiny_run, exported):
    ours, _ = tiny_run.load_model()
    hf = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True,
                                              dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tiny_run.tokenizer.encode(text).ids
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        diff = (ours.eval()(input_ids=ids).logits - hf.eval()(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-4


def test_model_card_has_metadata_and_provenance(tiny_run, exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and "crowdtrain" in meta["tags"]
    src = tiny_run.index.sources[0]
    assert src["sha256"] in card and src["name"] in card
    assert f"{tiny_run.index.train_tokens:,}" in card
    assert "from_pretrained" in card


def test_export_refuses_to_overwrite(tiny_run, exported):
    with pytest.raises(CrowdtrainError, match="not empty"):
        export_model(tiny_run, exported)
    with pytest.raises(CrowdtrainError, match="no checkpoint for round 99"):
        export_model(tiny_run, exported.parent / "other", rnd=99)


def test_generate_is_seeded_and_continues_the_prompt(exported):
    a = generate_text(exported, "ROMEO:", max_new_tokens=20, seed=1)
    b = generate_text(exported, "ROMEO:", max_new_tokens=20, seed=1)
    c = generate_text(exported, "ROMEO:", max_new_tokens=20, seed=2)
    assert a == b and a.startswith("ROMEO:") and len(a) > len("ROMEO:")
    assert a != c
    with pytest.raises(CrowdtrainError, match="temperature"):
        generate_text(exported, "x", temperature=0)


def test_export_cli_reports_the_evaluation_and_can_skip_it(tiny_run, tmp_path, capsys):
    import json

    from crowdtrain.cli.main import main

    assert main(["export", str(tiny_run.dir), str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "held-out" in out
    assert main(["export", str(tiny_run.dir), str(tmp_path / "a"), "--force", "--no-eval"]) == 0
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert prov["evaluation"] is None and "Not evaluated" in (tmp_path / "a" / "README.md"
                                                                 ).read_text()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_run.dir), str(tmp_path / "b"), "--force"]) == 2
    assert "not a model folder" in capsys.readouterr().err
