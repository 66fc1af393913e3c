"""`crowdtrain eval`: loss, perplexity and bits per byte (total nats / (ln 2 * UTF-8 bytes))."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.evaluate import (
    evaluate_model,
    evaluate_texts,
    heldout_texts,
    read_texts,
    score_documents,
)
from crowdtrain.publish.export import export_model

TEXTS = ["ROMEO:\nWhat light through yonder window breaks?\n", "Naïve café: ünïcödé bytes €\n"]


def run_cli(capsys, *args):
    from crowdtrain.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_bits_per_byte_of_a_uniform_model_is_tokens_ln_v_over_ln2_bytes(tiny_run):
    model, _ = tiny_run.load_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # tied: every logit is 0, a uniform guess
    tok = tiny_run.tokenizer
    r = evaluate_texts(model, tok, TEXTS)
    n = sum(len(tok.encode(t).ids) for t in TEXTS)
    nbytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    v = model.config.vocab_size
    assert r.tokens == n and r.bytes == nbytes > sum(len(t) for t in TEXTS)
    assert r.loss == pytest.approx(math.log(v), rel=1e-6)
    assert r.bits_per_byte == pytest.approx(n * math.log(v) / (math.log(2) * nbytes), rel=1e-6)
    assert r.perplexity == pytest.approx(v, rel=1e-5)


def test_every_token_is_scored_once_from_its_document_start(tiny_run):
    model, _ = tiny_run.load_model()
    model.eval()
    eot = tiny_run.index.eot_id
    ids = tiny_run.tokenizer.encode(TEXTS[0]).ids
    with torch.no_grad():
        x = torch.tensor([[eot] + ids])
        logits = model(input_ids=x[:, :-1]).logits[0]
        direct = float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
    nats, count = score_documents(model, [ids], eot, context=128)
    assert count == len(ids) and nats == pytest.approx(direct, rel=1e-5)
    # longer than the context: still every token once, in consecutive windows
    long = (ids * 20)[: 300]
    nats, count = score_documents(model, [long, ids], eot, context=64, batch_size=3)
    assert count == len(long) + len(ids)


def test_eval_cli_on_an_export_matches_its_model_card(tiny_run, tmp_path, capsys):
    out = export_model(tiny_run, tmp_path / "model")
    held = tmp_path / "heldout.txt"
    held.write_text("".join(heldout_texts(tiny_run)), encoding="utf-8")
    r = run_cli(capsys, "eval", out, "--data", held, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    card = json.loads((out / "provenance.json").read_text())["evaluation"]
    assert got["bits_per_byte"] == pytest.approx(card["bits_per_byte"], rel=1e-9)
    assert got["tokens"] == card["tokens"] and got["bytes"] == card["bytes"]
    # the held-out text is the validation split: about as many tokens as its shards
    assert abs(got["tokens"] - tiny_run.index.val_tokens) < 0.01 * tiny_run.index.val_tokens
    r = run_cli(capsys, "eval", out, "--data", held, "--max-bytes", "1000")
    assert r.returncode == 0 and "bits per byte" in r.stdout and "1,000 bytes" in r.stdout
    r = run_cli(capsys, "eval", tmp_path, "--data", held)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "config.json" in r.stderr


def test_read_texts_limits_bytes_on_character_boundaries(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS), encoding="utf-8")
    assert read_texts([p]) == TEXTS
    cut = read_texts([p], max_bytes=len(TEXTS[0].encode()) + 3)
    assert cut[0] == TEXTS[0] and cut[1] == "Na"  # "ï" is 2 bytes: not split
    with pytest.raises(CrowdtrainError, match="not found"):
        evaluate_model(tmp_path, [tmp_path / "missing.txt"])
