"""Tokenizer, sharding and batches: round trips, hashes, corruption, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crowdtrain.errors import CorruptDataError, CrowdtrainError
from crowdtrain.run.data import (
    EOT,
    DataConfig,
    ShardIndex,
    build_shards,
    check_sources,
    default_corpus,
    file_sha256,
    get_batch,
    load_split,
    load_tokenizer,
    read_shard,
    train_tokenizer,
    unigram_loss,
)


def decode_split(tok, data_dir, index, split):
    ids = np.concatenate(load_split(data_dir, index, split)).tolist()
    return tok.decode(ids, skip_special_tokens=False)


def test_bundled_corpus_ships_with_package():
    p = default_corpus()
    assert p.is_file() and p.stat().st_size > 1_000_000
    assert "ROMEO" in p.read_text(encoding="utf-8")


def test_tokenizer_round_trips_any_text(tiny_run):
    tok = tiny_run.tokenizer
    for text in ["First Citizen:\nBefore we proceed any further, hear me speak.\n",
                 "  leading spaces, tabs\tand unicode: é, 日本語, emoji 🙂\r\n", ""]:
        assert tok.decode(tok.encode(text).ids) == text


def test_shards_reproduce_the_corpus_with_val_at_the_end(tiny_run, corpus):
    text = corpus.read_text(encoding="utf-8")
    tok, idx = tiny_run.tokenizer, tiny_run.index
    train = decode_split(tok, tiny_run.data_dir, idx, "train")
    val = decode_split(tok, tiny_run.data_dir, idx, "val")
    assert train + val.removesuffix(EOT) == text
    # the held-out split is the last ~10% of the bytes, cut at a line end
    assert len(val.encode()) == pytest.approx(0.1 * len(text.encode()), rel=0.05)
    assert text.endswith(val.removesuffix(EOT))
    assert idx.sources[0]["sha256"] == file_sha256(corpus)


def test_index_hashes_match_files(tiny_run):
    import hashlib

    idx = tiny_run.index
    for e in idx.train + idx.val:
        data = (tiny_run.data_dir / e.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e.sha256
        assert len(data) == e.tokens * 2  # uint16 for a 512-token vocabulary
    assert all(e.tokens == idx.shard_tokens for e in idx.train[:-1])


def test_corrupt_and_truncated_shards_are_detected(tiny_run, tmp_path):
    import shutil

    d = tmp_path / "data"
    shutil.copytree(tiny_run.data_dir, d)
    idx = ShardIndex.load(d)
    e = idx.train[0]
    raw = bytearray((d / e.name).read_bytes())
    raw[100] ^= 0xFF
    (d / e.name).write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="sha256"):
        read_shard(d, e, idx.dtype)
    (d / e.name).write_bytes(bytes(raw[:-2]))
    with pytest.raises(CorruptDataError, match="bytes, expected"):
        read_shard(d, e, idx.dtype)


def test_small_chunks_stream_and_still_round_trip(tmp_path, corpus):
    text = corpus.read_text(encoding="utf-8")[:40_000]
    src = tmp_path / "c.txt"
    src.write_text(text, encoding="utf-8")
    cfg = DataConfig(vocab_size=300, shard_tokens=1024, chunk_bytes=1024)
    tok = train_tokenizer([src], cfg)
    idx = build_shards([src], tok, tmp_path / "data", cfg, progress=False)
    assert len(idx.train) > 5
    got = decode_split(tok, tmp_path / "data", idx, "train") + decode_split(
        tok, tmp_path / "data", idx, "val")
    assert got.removesuffix(EOT) == text


def test_jsonl_documents_end_with_eot(tmp_path):
    docs = [{"text": f"document number {i} says hello.\n" * 20} for i in range(40)]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    cfg = DataConfig(vocab_size=300, shard_tokens=1024)
    tok = train_tokenizer([src], cfg)
    idx = build_shards([src], tok, tmp_path / "data", cfg, progress=False)
    eot = tok.token_to_id(EOT)
    ids = np.concatenate(load_split(tmp_path / "data", idx, "train")
                         + load_split(tmp_path / "data", idx, "val"))
    assert int((ids == eot).sum()) == len(docs)
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert text.split(EOT)[:-1] == [d["text"] for d in docs]


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(CrowdtrainError, match="not found"):
        check_sources([tmp_path / "missing.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CrowdtrainError, match="empty"):
        check_sources([empty])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    cfg = DataConfig(vocab_size=300)
    with pytest.raises(CrowdtrainError, match=r"bad.jsonl:2"):
        train_tokenizer([bad], cfg)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1") * 10)
    with pytest.raises(CrowdtrainError, match="not UTF-8"):
        train_tokenizer([latin1], cfg)
    with pytest.raises(CrowdtrainError, match="vocab_size"):
        DataConfig(vocab_size=10)
    with pytest.raises(CrowdtrainError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.json")


def test_batches_are_deterministic_and_shifted(tiny_run):
    shards = load_split(tiny_run.data_dir, tiny_run.index, "train")
    x1, y1 = get_batch(shards, 4, 32, seed=7, step=3)
    x2, y2 = get_batch(shards, 4, 32, seed=7, step=3)
    x3, _ = get_batch(shards, 4, 32, seed=7, step=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (4, 32) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])


def test_unigram_baseline_is_between_zero_and_uniform(tiny_run):
    tr = load_split(tiny_run.data_dir, tiny_run.index, "train")
    va = load_split(tiny_run.data_dir, tiny_run.index, "val")
    u = unigram_loss(tr, va, tiny_run.index.vocab_size)
    assert 2.0 < u < np.log(tiny_run.index.vocab_size)
