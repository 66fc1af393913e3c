"""Reading a corpus, streamed: every kind of data source as a sequence of records.

The sources a run can be made from, each read a piece at a time (a corpus of many GB never sits
in memory):
- plain text (`.txt`, `.md`, `.text`): one document per file, read in chunks cut after a newline;
- `.jsonl`: a document per line, a text (the `text_column` field) or a conversation
  (`messages`: a list of {role, content});
- `.parquet`: a document per row, the `text_column` column (or `messages`), read in batches;
- a `datasets` save_to_disk folder (`state.json` + `*.arrow` streams): like parquet, its arrow
  files read batch by batch with pyarrow.ipc (no `datasets` package needed).

Each record says where it lies in its source in "source bytes" (the file's bytes; a parquet
file's size in proportion to its rows), so a corpus can be split into train and validation data
by position. Pure readers: no tokenizer, no shards (crowdtrain.run.data does those).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.errors import CrowdtrainError

TEXT_SUFFIXES = (".txt", ".md", ".text")
STATE_FILE = "state.json"  # a `datasets` save_to_disk folder's list of arrow files
MESSAGES = "messages"  # the field / column of a conversation
PARQUET_BATCH_ROWS = 256
KINDS = ("text", "jsonl", "parquet", "arrow")


@dataclass(frozen=True)
class Record:
    """One piece of a source: a text (a whole document, or a chunk of a plain text file) or a
    conversation (`messages`), with its place in the source.

    `start` and `end` are the source bytes before and after it (within its own source);
    `where` names it in errors ("file:line", "file row N")."""

    text: str | None
    messages: list[dict] | None
    ends: bool  # the last piece of its document
    start: int
    end: int
    where: str


def source_kind(path: Path) -> str:
    """"text", "jsonl", "parquet" or "arrow" (a `datasets` folder); a clear error otherwise."""
    if not path.exists():
        raise CrowdtrainError(f"data file not found: {path}")
    if path.is_dir():
        if (path / STATE_FILE).is_file():
            return "arrow"
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / STATE_FILE).is_file())
            raise CrowdtrainError(
                f"{path} holds several splits of a `datasets` DatasetDict: pass one of them, "
                f"e.g. {path / (splits[0] if splits else 'train')}")
        raise CrowdtrainError(
            f"data path {path} is a folder without {STATE_FILE}: pass data files, or a folder "
            "written by the `datasets` library's save_to_disk")
    if not path.is_file():
        raise CrowdtrainError(f"data path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in (".jsonl", ".parquet"):
        return suffix[1:]
    raise CrowdtrainError(
        f"unsupported data file {path}: use plain text (.txt, .md), .jsonl (a 'text' field or "
        "chat 'messages' per line), .parquet, or a `datasets` save_to_disk folder")


def source_files(path: Path) -> list[Path]:
    """The files that hold a source's data: the file itself, or a `datasets` folder's arrow
    files in the order its state.json lists them."""
    if not path.is_dir():
        return [path]
    state = path / STATE_FILE
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CrowdtrainError(f"{state} is not a `datasets` state file ({e!r}): "
                              "save the dataset again with save_to_disk") from None
    files = [path / n for n in names]
    for f in files:
        if not f.is_file() or f.parent != path:
            raise CrowdtrainError(f"{state} lists {f.name}, which is not in {path}")
    return files


def source_bytes(path: Path) -> int:
    """The size of a source: its file's bytes, or a `datasets` folder's arrow files'."""
    return sum(f.stat().st_size for f in source_files(path))


def iter_records(path: Path, chunk_bytes: int, text_column: str = "text") -> Iterator[Record]:
    """Every record of one source, streamed (see the module docstring for the kinds)."""
    kind = source_kind(path)
    if kind == "text":
        yield from _text_records(path, chunk_bytes)
    elif kind == "jsonl":
        yield from _jsonl_records(path, text_column)
    elif kind == "parquet":
        yield from _parquet_records(path, text_column)
    else:
        yield from _arrow_records(path, text_column)


def iter_documents(path: Path, chunk_bytes: int,
                   text_column: str = "text") -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of one source's text documents, without loading it whole.

    A plain text file is one document read in chunks cut after a newline; the other kinds
    yield one document per line or row. Conversations (`messages`) are skipped: they are not
    plain text until a chat template renders them."""
    for r in iter_records(path, chunk_bytes, text_column):
        if r.text is not None:
            yield r.text, r.ends


def iter_texts(path: Path, chunk_bytes: int, text_column: str = "text") -> Iterator[str]:
    """All the text of one source, conversations' message contents included (what a
    tokenizer is trained on)."""
    for r in iter_records(path, chunk_bytes, text_column):
        if r.text is not None:
            yield r.text
        else:
            yield "\n".join(m["content"] for m in r.messages)


def cut_text(text: str, chunk_chars: int) -> list[str]:
    """`text` in pieces of about `chunk_chars` characters, each cut after a newline where
    there is one (at most 16 x `chunk_chars` without), as plain text files are read."""
    if len(text) <= chunk_chars:
        return [text]
    out, start = [], 0
    while len(text) - start > chunk_chars:
        end = text.rfind("\n", start, start + chunk_chars) + 1
        if end == 0:
            end = text.find("\n", start + chunk_chars, start + 16 * chunk_chars) + 1
            if end == 0:
                end = start + 16 * chunk_chars
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


# --------------------------------------------------------------------------- the readers


def _text_records(path: Path, chunk_bytes: int) -> Iterator[Record]:
    pos = 0
    try:
        with path.open("r", encoding="utf-8", newline="") as f:
            carry = ""
            while True:
                block = f.read(chunk_bytes)
                if not block:
                    break
                block = carry + block
                cut = block.rfind("\n") + 1
                if cut == 0:  # no newline: keep accumulating (bounded by the next newline)
                    carry = block
                    if len(carry) < 16 * chunk_bytes:
                        continue
                    cut = len(block)
                carry = block[cut:]
                size = len(block[:cut].encode("utf-8"))
                yield Record(block[:cut], None, False, pos, pos + size, str(path))
                pos += size
            yield Record(carry, None, True, pos, pos + len(carry.encode("utf-8")), str(path))
    except UnicodeDecodeError as e:
        raise CrowdtrainError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _document(value: object, where: str, text_column: str) -> tuple[str | None, list | None]:
    """(text, messages) of one JSON object or row, checked."""
    if not isinstance(value, dict):
        raise CrowdtrainError(f"{where}: expected a JSON object with a {text_column!r} field "
                              f"or chat {MESSAGES!r}")
    if text_column in value:
        text = value[text_column]
        if not isinstance(text, str):
            raise CrowdtrainError(f"{where}: {text_column!r} must be a string, "
                                  f"not {type(text).__name__}")
        return text, None
    if MESSAGES in value:
        return None, check_messages(value[MESSAGES], where)
    raise CrowdtrainError(f"{where}: expected a {text_column!r} field (text) or "
                          f"{MESSAGES!r} (a chat); it has {sorted(value)}")


def check_messages(messages: object, where: str) -> list[dict]:
    """A conversation's messages: a non-empty list of {role, content} with string values."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise CrowdtrainError(f"{where}: {MESSAGES!r} must be a non-empty list of "
                              "{\"role\": ..., \"content\": ...} objects with string values")
    return messages


def _jsonl_records(path: Path, text_column: str) -> Iterator[Record]:
    pos = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, pos = pos, pos + len(raw)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CrowdtrainError(f"{where}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise CrowdtrainError(f"{where}: not valid JSON ({e.msg})") from None
            text, messages = _document(value, where, text_column)
            yield Record(text, messages, True, start, pos, where)


def _pick_column(names: list[str], text_column: str, where: Path) -> str:
    if text_column in names:
        return text_column
    if MESSAGES in names:
        return MESSAGES
    raise CrowdtrainError(f"{where} has no {text_column!r} column (nor chat {MESSAGES!r}); "
                          f"its columns: {', '.join(names)}. Pass --text-column NAME")


def _column_records(path: Path, column: str, values: list, row0: int,
                    at) -> Iterator[Record]:
    """Records of one batch of a column: `at(i)` is the source bytes before row i."""
    for i, value in enumerate(values):
        row = row0 + i
        where = f"{path} row {row}"
        if value is None:
            raise CrowdtrainError(f"{where}: {column!r} is empty (null)")
        if column == MESSAGES:
            text, messages = None, check_messages(value, where)
        elif isinstance(value, str):
            text, messages = value, None
        else:
            raise CrowdtrainError(f"{where}: {column!r} must hold strings, "
                                  f"not {type(value).__name__}")
        yield Record(text, messages, True, at(row), at(row + 1), where)


def _parquet_records(path: Path, text_column: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise CrowdtrainError(f"{path} is not a readable parquet file ({e})") from None
    column = _pick_column(pf.schema_arrow.names, text_column, path)
    rows, size = max(pf.metadata.num_rows, 1), path.stat().st_size

    def at(row: int) -> int:
        return size * row // rows

    row0 = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        values = batch.column(0).to_pylist()
        yield from _column_records(path, column, values, row0, at)
        row0 += len(values)


def _arrow_records(folder: Path, text_column: str) -> Iterator[Record]:
    """A `datasets` folder's rows; a batch's place is the bytes of the stream read up to it
    (each file's first batch from the file's start, its last to its end)."""
    import pyarrow as pa
    import pyarrow.ipc

    base, row0 = 0, 0
    for file in source_files(folder):
        size = file.stat().st_size
        with pa.OSFile(str(file)) as f:
            try:
                reader = pyarrow.ipc.open_stream(f)
            except pa.ArrowInvalid as e:
                raise CrowdtrainError(f"{file} is not an arrow stream ({e})") from None
            column = _pick_column(reader.schema.names, text_column, file)
            index = reader.schema.get_field_index(column)
            before = 0
            batch, read_to = _next_batch(reader, file), f.tell()
            while batch is not None:
                following, following_to = _next_batch(reader, file), f.tell()
                after = read_to if following is not None else size
                n = max(batch.num_rows, 1)

                def at(row: int, r0=row0, lo=base + before, hi=base + after, n=n) -> int:
                    return lo + (hi - lo) * (row - r0) // n

                values = batch.column(index).to_pylist()
                yield from _column_records(folder, column, values, row0, at)
                row0 += batch.num_rows
                batch, before, read_to = following, after, following_to
        base += size


def _next_batch(reader, file: Path):
    """The stream's next record batch, or None at its end."""
    import pyarrow as pa

    try:
        return reader.read_next_batch()
    except StopIteration:
        return None
    except (pa.ArrowInvalid, OSError) as e:
        raise CrowdtrainError(f"{file} is damaged ({e}): save the dataset again") from None
