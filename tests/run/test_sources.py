"""Reading the corpus (run/sources.py): every kind of source as records, in order, with their
place in source bytes; the clear errors of paths and rows that cannot be read."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.data import check_sources
from crowdtrain.run.sources import (
    cut_text,
    iter_documents,
    iter_records,
    iter_texts,
    source_bytes,
)

DOCS = [f"document {i}: " + "words and more words. " * (i % 7 + 1) for i in range(50)]
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write_parquet(path, columns: dict, row_group_size: int = 16):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_datasets_folder(folder, columns: dict, files: int = 2, batch_rows: int = 7):
    """A folder as `datasets`' save_to_disk writes it: arrow streams of record batches,
    state.json listing them, dataset_info.json."""
    folder.mkdir(parents=True)
    table = pa.table(columns)
    per = -(-table.num_rows // files)
    names = []
    for k in range(files):
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        part = table.slice(k * per, per)
        with pa.OSFile(str(folder / name), "wb") as sink, \
                pyarrow.ipc.new_stream(sink, table.schema) as writer:
            for batch in part.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16,
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_every_kind_yields_the_same_documents_in_order(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    parquet = write_parquet(tmp_path / "d.parquet", {"text": DOCS})
    folder = write_datasets_folder(tmp_path / "ds", {"text": DOCS, "id": list(range(50))})
    for src in (jsonl, parquet, folder):
        assert [t for t, _ in iter_documents(src, 1024)] == DOCS, src
        recs = list(iter_records(src, 1024))
        # positions: contiguous, increasing, from 0 to the source's size
        assert recs[0].start == 0 and recs[-1].end == source_bytes(src)
        assert all(a.end == b.start for a, b in zip(recs, recs[1:], strict=False))
        assert all(r.start < r.end for r in recs)
    assert source_bytes(folder) == sum(f.stat().st_size for f in folder.glob("*.arrow"))


def test_jsonl_positions_are_the_lines_bytes(tmp_path):
    src = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "é" * i}) + "\n" for i in range(5)]
    src.write_text(lines[0] + "\n" + "".join(lines[1:]), encoding="utf-8")  # a blank line
    recs = list(iter_records(src, 1024))
    assert [r.where for r in recs] == [f"{src}:{n}" for n in (1, 3, 4, 5, 6)]
    raw = src.read_bytes()
    assert [raw[r.start:r.end].decode() for r in recs] == lines


def test_plain_text_is_one_document_in_line_cut_chunks(tmp_path):
    src = tmp_path / "a.txt"
    text = "".join(f"line {i} with some text\n" for i in range(500))
    src.write_text(text)
    pieces = list(iter_documents(src, 1024))
    assert "".join(t for t, _ in pieces) == text
    assert [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(t.endswith("\n") for t, _ in pieces[:-1]) and len(pieces) > 5


def test_chats_are_records_and_their_text_feeds_the_tokenizer(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    recs = list(iter_records(src, 1024))
    assert recs[0].text == "plain" and recs[0].messages is None
    assert recs[1].text is None and recs[1].messages == CHAT
    assert [t for t, _ in iter_documents(src, 1024)] == ["plain"]  # chats are not plain text
    assert list(iter_texts(src, 1024)) == ["plain", "hi\nhello"]
    pq_src = write_parquet(tmp_path / "c.parquet", {"messages": [CHAT, CHAT]})
    assert [r.messages for r in iter_records(pq_src, 1024)] == [CHAT, CHAT]


def test_a_named_text_column_is_read(tmp_path):
    src = write_parquet(tmp_path / "d.parquet", {"body": DOCS[:3], "text_len": [1, 2, 3]})
    assert [t for t, _ in iter_documents(src, 1024, text_column="body")] == DOCS[:3]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "x", "text": "not this"}) + "\n")
    assert [t for t, _ in iter_documents(jsonl, 1024, text_column="body")] == ["x"]


def test_missing_columns_and_bad_rows_are_named(tmp_path):
    src = write_parquet(tmp_path / "d.parquet", {"content": ["a"], "meta": ["b"]})
    with pytest.raises(CrowdtrainError, match=r"no 'text' column.*its columns: content, meta"):
        list(iter_records(src, 1024))
    folder = write_datasets_folder(tmp_path / "ds", {"content": ["a", "b"]}, files=1)
    with pytest.raises(CrowdtrainError, match=r"no 'text' column.*content"):
        list(iter_records(folder, 1024))
    nulls = write_parquet(tmp_path / "n.parquet", {"text": ["a", None]})
    with pytest.raises(CrowdtrainError, match=r"n.parquet row 1: 'text' is empty"):
        list(iter_records(nulls, 1024))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(CrowdtrainError, match=r"bad.jsonl:2: 'messages' must be"):
        list(iter_records(bad, 1024))
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(CrowdtrainError, match=r"bad.jsonl:2: 'text' must be a string"):
        list(iter_records(bad, 1024))
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CrowdtrainError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_records(bad, 1024))


def test_check_sources_accepts_the_kinds_and_rejects_the_rest(tmp_path):
    parquet = write_parquet(tmp_path / "d.parquet", {"text": DOCS})
    folder = write_datasets_folder(tmp_path / "ds", {"text": DOCS})
    assert check_sources([parquet, folder]) == [parquet, folder]
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CrowdtrainError, match="folder without state.json"):
        check_sources([plain])
    dd = tmp_path / "dd"
    write_datasets_folder(dd / "train", {"text": DOCS})
    (dd / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(CrowdtrainError, match=r"DatasetDict: pass one of them, e.g. .*train"):
        check_sources([dd])
    csv = tmp_path / "d.csv"
    csv.write_text("text\nx\n")
    with pytest.raises(CrowdtrainError, match="unsupported data file"):
        check_sources([csv])
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "gone.arrow"}]}))
    with pytest.raises(CrowdtrainError, match="lists gone.arrow"):
        check_sources([folder])


def test_cut_text_cuts_after_newlines_and_loses_nothing():
    text = "".join(f"row {i}\n" for i in range(1000))
    parts = cut_text(text, 100)
    assert "".join(parts) == text and all(p.endswith("\n") for p in parts)
    assert max(map(len, parts)) <= 100
    long_line = "x" * 5000
    parts = cut_text(long_line, 100)
    assert "".join(parts) == long_line and max(map(len, parts)) <= 1600
    assert cut_text("short", 100) == ["short"]
