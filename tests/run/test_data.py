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
    Specials,
    build_shards,
    check_sources,
    default_corpus,
    eval_windows,
    file_sha256,
    folder_specials,
    get_batch,
    load_masks,
    load_split,
    load_tokenizer,
    mask_name,
    read_mask,
    read_shard,
    split_windows,
    train_tokenizer,
    trained_specials,
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


# --------------------------------------------------------------------------- any model's tokens

FAMILY_NAMES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from families import make_family

    base = tmp_path_factory.mktemp("families")
    return {n: make_family(n, base / n) for n in FAMILY_NAMES}


def family(family_dirs, name):
    """(folder, tokenizer, specials) of a family's download."""
    d = family_dirs[name]
    tok = load_tokenizer(d, require_eot=False)
    return d, tok, folder_specials(d, tok)


# name -> (bos, added in front of every text, eos, pad, has a chat template)
EXPECTED = {
    "llama": ("<s>", True, "</s>", None, True),
    "qwen2": (None, False, "<|endoftext|>", "<|endoftext|>", True),
    "mistral": ("<s>", True, "</s>", None, True),
    "gemma": ("<bos>", True, "<eos>", "<pad>", False),
    "phi3": ("<s>", False, "<|endoftext|>", "<|endoftext|>", False),
    "gpt2": ("<|endoftext|>", False, "<|endoftext|>", None, False),
}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_specials_come_from_each_familys_folder(family_dirs, name):
    _, tok, sp = family(family_dirs, name)
    bos, add_bos, eos, pad, chat = EXPECTED[name]
    ids = {t: tok.token_to_id(t) for t in (bos, eos, pad) if t is not None}
    assert sp.eos_id == ids[eos]
    assert sp.bos_id == (ids[bos] if bos else None)
    assert sp.add_bos is add_bos
    assert sp.pad_id == (ids[pad] if pad else None)
    assert (sp.chat_template is not None) is chat


def test_our_tokenizers_frame_with_endoftext(tiny_run):
    tok = tiny_run.tokenizer
    sp = trained_specials(tok)
    eot = tok.token_to_id(EOT)
    assert sp == Specials(eos_id=eot, bos_id=eot, add_bos=False, pad_id=eot)
    assert tiny_run.index.eot_id == eot and tiny_run.index.bos_id is None


def test_pretrained_tokenizers_need_no_endoftext(family_dirs):
    d = family_dirs["llama"]
    with pytest.raises(CrowdtrainError, match="no <\\|endoftext\\|> token"):
        load_tokenizer(d)
    assert load_tokenizer(d / "tokenizer.json", require_eot=False).token_to_id("</s>") == 1


def test_folder_specials_read_every_way_a_folder_names_them(family_dirs, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    tj = json.loads((family_dirs["llama"] / "tokenizer.json").read_text())
    tj["post_processor"] = None  # this copy does not add <s> by itself
    (d / "tokenizer.json").write_text(json.dumps(tj))
    tok = load_tokenizer(d, require_eot=False)
    assert tok.encode("a").ids[0] != tok.token_to_id("<s>")
    s_id, e_id, unk = (tok.token_to_id(t) for t in ("<s>", "</s>", "<unk>"))
    # {"content": ...} dicts, add_bos_token, a list of named templates
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": {"content": "</s>"},
        "add_bos_token": True,
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "D"}]}))
    sp = folder_specials(d, tok)
    assert (sp.bos_id, sp.eos_id, sp.add_bos, sp.chat_template) == (s_id, e_id, True, "D")
    # special_tokens_map.json, then the config's ids (a list of eos ids: the first);
    # chat_template.json over tokenizer_config's
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "ignored"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": [e_id, s_id],
                                               "bos_token_id": s_id}))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    sp = folder_specials(d, tok)
    assert (sp.bos_id, sp.eos_id, sp.pad_id, sp.chat_template) == (s_id, e_id, unk, "J")
    assert sp.add_bos is False  # neither its post-processor nor add_bos_token adds <s>
    (d / "chat_template.jinja").write_text("{{ messages }}")
    assert folder_specials(d, tok).chat_template == "{{ messages }}"
    # a bos named null in tokenizer_config.json: the tokenizer has none, whatever the config
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
    assert folder_specials(d, tok).bos_id is None
    (d / "config.json").write_text(json.dumps({"eos_token_id": None}))
    with pytest.raises(CrowdtrainError, match=f"{d.name} names no end-of-sequence token"):
        folder_specials(d, tok)


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in docs), encoding="utf-8")
    return path


FAMILY_DOCS = [f"Document {i} tells the swarm about round {i}.\n" * (1 + i % 3)
               for i in range(60)]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "gpt2"])
def test_shards_are_framed_with_the_familys_tokens(family_dirs, tmp_path, name):
    _, tok, sp = family(family_dirs, name)
    src = write_jsonl(tmp_path / "d.jsonl", FAMILY_DOCS)
    cfg = DataConfig(vocab_size=tok.get_vocab_size(), shard_tokens=1024)
    idx = build_shards([src], tok, tmp_path / "data", cfg, progress=False, specials=sp)
    assert idx.eot_id == sp.eos_id and idx.bos_id == (sp.bos_id if sp.add_bos else None)
    ids = np.concatenate(load_split(tmp_path / "data", idx, "train")
                         + load_split(tmp_path / "data", idx, "val")).tolist()
    # every document is [bos if the family adds one] + its own tokens + [eos], nothing more
    docs, cur = [], []
    for i in ids:
        cur.append(i)
        if i == sp.eos_id:
            docs.append(cur)
            cur = []
    assert not cur and len(docs) == len(FAMILY_DOCS)
    for doc, text in zip(docs, FAMILY_DOCS, strict=True):
        body = tok.encode(text, add_special_tokens=False).ids
        assert doc == ([sp.bos_id] if sp.add_bos else []) + body + [sp.eos_id]
    if sp.add_bos:  # the tokenizer's own post-processor never adds a second one
        assert ids.count(sp.bos_id) == len(FAMILY_DOCS)
        assert tok.decode(docs[0], skip_special_tokens=False).startswith(
            tok.id_to_token(sp.bos_id) + "Document 0")


def test_jsonl_splits_at_a_document_boundary_near_the_end(tmp_path, family_dirs):
    _, tok, sp = family(family_dirs, "qwen2")
    src = write_jsonl(tmp_path / "d.jsonl", FAMILY_DOCS)
    idx = build_shards([src], tok, tmp_path / "data", DataConfig(shard_tokens=1024),
                       progress=False, specials=sp)
    val = np.concatenate(load_split(tmp_path / "data", idx, "val")).tolist()
    texts = tok.decode(val, skip_special_tokens=False).split("<|endoftext|>")[:-1]
    assert texts == FAMILY_DOCS[-len(texts):]  # whole documents, the last ones
    # the first document of val is the first to start past 90% of the file's bytes
    lines = src.read_bytes().splitlines(keepends=True)
    starts = np.cumsum([0] + [len(x) for x in lines[:-1]])
    first_val = int(np.argmax(starts >= int(0.9 * len(src.read_bytes()))))
    assert len(texts) == len(FAMILY_DOCS) - first_val


def test_parquet_and_datasets_folders_give_the_same_shards_as_jsonl(tmp_path, family_dirs):
    from test_sources import write_datasets_folder, write_parquet

    _, tok, sp = family(family_dirs, "llama")
    docs = [f"Row {i}: " + "the community trains a model. " * (i % 5 + 1) for i in range(300)]
    cfg = DataConfig(shard_tokens=1024, text_column="body")
    jsonl = write_jsonl(tmp_path / "d.jsonl", docs, key="body")
    parquet = write_parquet(tmp_path / "d.parquet", {"id": list(range(300)), "body": docs})
    folder = write_datasets_folder(tmp_path / "ds", {"body": docs}, files=3, batch_rows=32)
    got = {}
    for src in (jsonl, parquet, folder):
        out = tmp_path / f"data-{src.name}"
        idx = build_shards([src], tok, out, cfg, progress=False, specials=sp)
        got[src.name] = (np.concatenate(load_split(out, idx, "train")),
                         np.concatenate(load_split(out, idx, "val")))
        assert not idx.masked and not list(out.glob("*.mask"))
    # the same documents, the same tokens; the split may fall a document apart (bytes differ)
    whole = {k: np.concatenate(v) for k, v in got.items()}
    assert np.array_equal(whole["d.jsonl"], whole["d.parquet"])
    assert np.array_equal(whole["d.jsonl"], whole["ds"])
    for train, val in got.values():
        assert 0.04 < len(val) / (len(train) + len(val)) < 0.2


def test_missing_text_column_and_bad_text_column(tmp_path):
    from test_sources import write_parquet

    src = write_parquet(tmp_path / "d.parquet", {"content": ["a b c"] * 10})
    with pytest.raises(CrowdtrainError, match=r"no 'text' column.*its columns: content"):
        train_tokenizer([src], DataConfig(vocab_size=300))
    with pytest.raises(CrowdtrainError, match="text_column"):
        DataConfig(text_column=" ")


def test_a_format_1_index_still_loads():
    from pathlib import Path

    d = Path(__file__).resolve().parents[1] / "data" / "run-v0.1-25178b3" / "data"
    idx = ShardIndex.load(d)
    assert idx.format == 1 and not idx.masked and idx.bos_id is None
    assert all(e.mask_sha256 is None for e in idx.train + idx.val)
    assert load_masks(d, idx, "train") is None
    assert len(read_shard(d, idx.train[1], idx.dtype)) == idx.train[1].tokens


def test_masked_batches_ignore_exactly_the_masked_targets():
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 500, n).astype(np.uint16) for n in (3000, 700, 5000)]
    masks = [rng.integers(0, 2, len(s)).astype(np.uint8) for s in shards]
    x0, y0 = get_batch(shards, 8, 64, seed=3, step=11)
    x1, y1 = get_batch(shards, 8, 64, seed=3, step=11, masks=masks)
    x2, y2 = get_batch(shards, 8, 64, seed=3, step=11, masks=masks)
    assert torch.equal(x0, x1) and torch.equal(x1, x2) and torch.equal(y1, y2)  # same draws
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # x unchanged by masking y
    ignored = y1 == -100
    assert torch.equal(y1[~ignored], y0[~ignored]) and 0.3 < ignored.float().mean() < 0.7
    # find each row's place to check the mask of every target position
    for row in range(8):
        hits = [(k, s) for k, sh in enumerate(shards) for s in range(len(sh) - 64)
                if np.array_equal(sh[s:s + 65], np.r_[x0[row, :1].numpy(), y0[row].numpy()])]
        k, s = hits[0]
        assert torch.equal(ignored[row], torch.from_numpy(masks[k][s + 1:s + 65] == 0))
    _, y3 = get_batch(shards, 8, 64, seed=3, step=12, masks=masks)
    assert not torch.equal(y1, y3)
    with pytest.raises(CrowdtrainError, match="masks do not match"):
        get_batch(shards, 8, 64, seed=3, step=11, masks=masks[:2])


def test_masked_eval_windows_are_pairs():
    s = np.arange(1000, dtype=np.uint16)
    m = (np.arange(1000) % 3 != 0).astype(np.uint8)
    plain = list(eval_windows([s], 64, 10_000))
    pairs = list(eval_windows([s], 64, 10_000, masks=[m]))
    assert len(plain) == len(pairs) == 15
    for w, (x, y) in zip(plain, pairs, strict=True):
        assert torch.equal(x, w[:-1])
        assert torch.equal(y == -100, w[1:] % 3 == 0)
        assert torch.equal(y[y != -100], w[1:][w[1:] % 3 != 0])


def test_corrupt_masks_are_detected(tmp_path, family_dirs):
    _, tok, sp = family(family_dirs, "qwen2")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(300)))
    idx = build_shards([src], tok, tmp_path / "data", DataConfig(shard_tokens=1024),
                       progress=False, specials=sp)
    e = idx.train[0]
    assert read_mask(tmp_path / "data", e).sum() > 0
    p = tmp_path / "data" / mask_name(e.name)
    raw = bytearray(p.read_bytes())
    raw[5] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="sha256"):
        read_mask(tmp_path / "data", e)
    p.unlink()
    with pytest.raises(CrowdtrainError, match="is missing"):
        load_masks(tmp_path / "data", idx, "train")


def test_split_windows_read_only_the_shards_they_need(tmp_path, family_dirs):
    _, tok, sp = family(family_dirs, "qwen2")
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"messages": chat}) + "\n" + json.dumps(
        {"text": f"text {i} " * 30}) + "\n" for i in range(600)))
    out = tmp_path / "data"
    idx = build_shards([src], tok, out, DataConfig(shard_tokens=1024), progress=False,
                       specials=sp)
    assert idx.masked and len(idx.val) >= 4
    for split, budget in (("val", 2500), ("val", 10**9), ("train", 700)):
        whole = list(eval_windows(load_split(out, idx, split), 64, budget,
                                  load_masks(out, idx, split)))
        lazy = list(split_windows(out, idx, split, 64, budget))
        assert len(lazy) == len(whole) > 0
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(lazy, whole, strict=True))
    # only what the budget reaches is read: the shards past it may be gone
    for e in idx.val[3:]:  # 2500 // 64 = 39 windows: 15 from each of the first three
        (out / e.name).unlink()
    assert len(list(split_windows(out, idx, "val", 64, 2500))) == 2500 // 64
