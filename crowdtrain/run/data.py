"""Corpus -> tokenizer -> token shards (+ loss masks), and deterministic batches read from them.

Owns everything between data on disk and integer tensors for the model:
- reading the corpus, streamed (crowdtrain.run.sources: plain text, `.jsonl` texts and chats,
  `.parquet`, `datasets` save_to_disk folders);
- training a byte-level BPE tokenizer with HF `tokenizers`, or loading a `tokenizer.json`;
- the tokens that frame documents (`Specials`): our own tokenizers' `<|endoftext|>`, or a
  pretrained model's bos/eos/pad and chat template, read from its folder;
- writing fixed-size token shards (`<split>-NNNNN.bin`, raw uint16/uint32) plus `index.json`
  that records each shard's sha256 and the sources' hashes. Each document is framed as
  [bos if the model's tokenizer adds one] + its tokens + [eos]. The last `val_fraction` of the
  corpus (in source bytes, in the order the sources are given) is the held-out split: a plain
  text file is cut at a line end, the other sources at a document boundary;
- loss masks, when the corpus holds conversations: `<split>-NNNNN.mask` next to each shard, one
  uint8 per token, 1 where that token is a target that carries loss (the assistant's turns; every
  token of a text document), 0 elsewhere (system and user turns; see crowdtrain.run.chat);
- reading a shard (and its mask) back with its hash verified, and drawing a batch that depends
  only on (shards, seed, step), so any machine given the same shard reproduces the same batch;
  masked targets are -100 (what F.cross_entropy ignores). Held-out windows come from loaded
  shards (`eval_windows`) or straight from the data folder, a shard at a time (`split_windows`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from crowdtrain.errors import CorruptDataError, CrowdtrainError
from crowdtrain.run.sources import (
    Record,
    cut_text,
    iter_records,
    iter_texts,
    source_bytes,
    source_files,
    source_kind,
)
from crowdtrain.run.sources import iter_documents as iter_documents  # re-exported

EOT = "<|endoftext|>"
INDEX_NAME = "index.json"
INDEX_FORMAT = 2  # 2: bos_id, masked, mask_sha256; format 1 (no masks) still loads
INDEX_FORMATS = (1, 2)
IGNORE = -100  # the target of a masked position (F.cross_entropy's ignore_index)
Batch = tuple[torch.Tensor, torch.Tensor]


def default_corpus() -> Path:
    """The public-domain corpus shipped in the package (Tiny Shakespeare, 1.1 MB)."""
    return Path(str(resources.files("crowdtrain") / "corpus" / "tinyshakespeare.txt"))


@dataclass(frozen=True)
class DataConfig:
    """How a corpus is turned into shards (`vocab_size`, `text_column`: `crowdtrain init`
    options)."""

    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size"})
    shard_tokens: int = 1 << 17
    val_fraction: float = 0.1
    chunk_bytes: int = 1 << 18
    tokenizer_sample_bytes: int = 200 << 20
    text_column: str = field(default="text", metadata={
        "help": "the column (parquet, datasets folder) or field (.jsonl) holding each "
                "document's text"})

    def __post_init__(self) -> None:
        if not 260 <= self.vocab_size <= (1 << 32) - 1:
            raise CrowdtrainError(
                f"vocab_size must be at least 260 (256 bytes + specials), got {self.vocab_size}"
            )
        if self.shard_tokens < 1024:
            raise CrowdtrainError(f"shard_tokens must be >= 1024, got {self.shard_tokens}")
        if not 0.0 < self.val_fraction < 0.5:
            raise CrowdtrainError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.chunk_bytes < 1024:
            raise CrowdtrainError(f"chunk_bytes must be >= 1024, got {self.chunk_bytes}")
        if not isinstance(self.text_column, str) or not self.text_column.strip():
            raise CrowdtrainError("text_column must name a column or field, e.g. --text-column "
                                  "text")


# --------------------------------------------------------------------------- reading the corpus


def check_sources(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Validate corpus paths: they exist and are text, .jsonl or .parquet files or `datasets`
    save_to_disk folders, and are not all empty."""
    if not paths:
        raise CrowdtrainError("no data files given: pass --data FILE [FILE ...]")
    out = [Path(p) for p in paths]
    for p in out:
        source_kind(p)
    if sum(source_bytes(p) for p in out) == 0:
        raise CrowdtrainError("the corpus is empty: every data file has zero bytes")
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_sha256(path: Path) -> str:
    """sha256 of a source's bytes: its file, or a `datasets` folder's arrow files in order."""
    files = source_files(path)
    if len(files) == 1 and files[0] == path:
        return file_sha256(path)
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(paths: Sequence[Path], cfg: DataConfig) -> Tokenizer:
    """Train a byte-level BPE tokenizer on (a prefix of) the corpus' text, conversations'
    messages included; any text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def sample() -> Iterator[str]:
        seen = 0
        for p in paths:
            for text in iter_texts(p, cfg.chunk_bytes, cfg.text_column):
                yield text
                seen += len(text)
                if seen >= cfg.tokenizer_sample_bytes:
                    return

    tok.train_from_iterator(sample(), trainer)
    return tok


def load_tokenizer(path: str | os.PathLike, require_eot: bool = True) -> Tokenizer:
    """A `tokenizer.json` (or a folder holding one); `require_eot`: it must have our
    `<|endoftext|>` (False for a pretrained model's tokenizer: see `folder_specials`)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise CrowdtrainError(f"tokenizer not found: {p}")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise CrowdtrainError(f"cannot load tokenizer {p}: {e}") from None
    if require_eot and tok.token_to_id(EOT) is None:
        raise CrowdtrainError(f"tokenizer {p} has no {EOT} token; add it as a special token")
    return tok


@dataclass(frozen=True)
class Specials:
    """The tokens that frame documents, from the model's own tokenizer."""

    eos_id: int  # appended after every document; ShardIndex.eot_id records it
    bos_id: int | None = None  # prepended to every document when add_bos
    add_bos: bool = False  # the model's tokenizer adds a bos token to each text
    pad_id: int | None = None
    chat_template: str | None = None  # jinja source, for `messages` data

    def __post_init__(self) -> None:
        if self.eos_id < 0 or (self.bos_id is not None and self.bos_id < 0):
            raise CrowdtrainError(f"special token ids must be >= 0 ({self})")
        if self.add_bos and self.bos_id is None:
            raise CrowdtrainError("add_bos needs a bos token id")


def trained_specials(tok: Tokenizer) -> Specials:
    """Our own BPE tokenizers': `<|endoftext|>` ends documents (and is their bos and pad id,
    never added in front), no chat template."""
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise CrowdtrainError(f"this tokenizer has no {EOT} token; add it as a special token")
    return Specials(eos_id=eot, bos_id=eot, add_bos=False, pad_id=eot)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrowdtrainError(f"{path} is not valid JSON ({e}): download it again") from None
    return d if isinstance(d, dict) else {}


def _token_id(tok: Tokenizer, value: object) -> int | None:
    """The id of a special token named as tokenizer files name it (a string or a
    {"content": ...} dict), or None."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) and value else None


def _config_id(tok: Tokenizer, value: object) -> int | None:
    """A config's token id (an int, or a list whose first is taken), if the tokenizer has it."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool) and \
            0 <= value < tok.get_vocab_size():
        return value
    return None


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's (a string,
    or a list of {name, template}: the "default" one)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def folder_specials(folder: Path, tok: Tokenizer) -> Specials:
    """A pretrained Hugging Face folder's special tokens: bos/eos/pad as tokenizer_config.json
    names them (else special_tokens_map.json; a key present there decides, even as null),
    else the ids in generation_config.json / config.json; whether its tokenizer adds bos to
    every text (its post-processor does, or tokenizer_config's add_bos_token); its chat
    template. A folder that names no eos token is an error."""
    folder = Path(folder)
    tc = _read_json(folder / "tokenizer_config.json")
    stm = _read_json(folder / "special_tokens_map.json")
    configs = [_read_json(folder / "generation_config.json"), _read_json(folder / "config.json")]

    def find(key: str) -> int | None:
        for d in (tc, stm):
            if d.get(f"{key}_token") is not None:
                got = _token_id(tok, d[f"{key}_token"])
                if got is not None:
                    return got
            elif f"{key}_token" in d and key != "eos":  # named as null: the tokenizer has none
                return None
        for d in configs:
            got = _config_id(tok, d.get(f"{key}_token_id"))
            if got is not None:
                return got
        return None

    eos = find("eos")
    if eos is None:
        raise CrowdtrainError(
            f"{folder} names no end-of-sequence token (eos_token in tokenizer_config.json or "
            "eos_token_id in config.json): add one so that documents can be separated")
    bos = find("bos")
    added = bos is not None and tok.encode("a").ids[:1] == [bos]
    add_bos = bos is not None and (added or tc.get("add_bos_token") is True)
    return Specials(eos_id=eos, bos_id=bos, add_bos=add_bos, pad_id=find("pad"),
                    chat_template=_chat_template(folder, tc))


# --------------------------------------------------------------------------- shards


@dataclass
class ShardEntry:
    name: str
    tokens: int
    sha256: str
    mask_sha256: str | None = None  # of its mask file (`mask_name`), in a masked index


def mask_name(shard_name: str) -> str:
    """The loss mask file of a shard: "train-00000.bin" -> "train-00000.mask" (one uint8 per
    token, 1 = the target at this position carries loss)."""
    return shard_name.removesuffix(".bin") + ".mask"


@dataclass
class ShardIndex:
    """The `index.json` of a data folder: what shards exist and how to check them.

    `eot_id` is the token after every document (the model's eos), `bos_id` the one in front of
    every document (None: documents get none); `masked`: every shard has a loss mask."""

    dtype: str
    vocab_size: int
    eot_id: int
    shard_tokens: int
    sources: list[dict] = field(default_factory=list)
    train: list[ShardEntry] = field(default_factory=list)
    val: list[ShardEntry] = field(default_factory=list)
    format: int = INDEX_FORMAT
    bos_id: int | None = None
    masked: bool = False

    @property
    def train_tokens(self) -> int:
        return sum(e.tokens for e in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(e.tokens for e in self.val)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> ShardIndex:
        """The data folder's index (format 2, or format 1 of runs made before loss masks)."""
        p = Path(data_dir) / INDEX_NAME
        if not p.is_file():
            raise CrowdtrainError(f"no shard index at {p}: is this a run's data folder?")
        try:
            d = json.loads(p.read_text())
            d["train"] = [ShardEntry(**e) for e in d["train"]]
            d["val"] = [ShardEntry(**e) for e in d["val"]]
            idx = cls(**d)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptDataError(f"shard index {p} is unreadable ({e})") from None
        if idx.format not in INDEX_FORMATS or idx.dtype not in ("uint16", "uint32"):
            raise CorruptDataError(f"shard index {p} has an unsupported format or dtype")
        if idx.masked and any(e.mask_sha256 is None for e in idx.train + idx.val):
            raise CorruptDataError(f"shard index {p} is masked but a shard has no mask hash")
        return idx

    def entry(self, name: str) -> ShardEntry:
        for e in self.train + self.val:
            if e.name == name:
                return e
        raise CrowdtrainError(f"no shard named {name!r} in the index")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _write_atomic(path: Path, data: bytes) -> str:
    """Write `data` to `path` atomically; its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


class _ShardWriter:
    """Tokens (and their mask) of one split, written `shard_tokens` at a time. A shard's mask
    file is written once the corpus is known to need masks (`masked`); the shards written
    before that had no masked token, and get all-ones masks at the end (`finish`)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: str):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype = np.dtype(dtype)
        self.buf = np.empty(shard_tokens, dtype=self.dtype)
        self.mask = np.ones(shard_tokens, dtype=np.uint8)
        self.fill = 0
        self.masked = False
        self.entries: list[ShardEntry] = []

    def add(self, ids: Sequence[int] | np.ndarray, mask: np.ndarray | None = None) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        done = 0
        while done < len(arr):
            n = min(len(arr) - done, self.shard_tokens - self.fill)
            self.buf[self.fill: self.fill + n] = arr[done: done + n]
            self.mask[self.fill: self.fill + n] = 1 if mask is None else mask[done: done + n]
            self.fill += n
            done += n
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{self.split}-{len(self.entries):05d}.bin"
        entry = ShardEntry(name, self.fill,
                           _write_atomic(self.out_dir / name, self.buf[: self.fill].tobytes()))
        if self.masked:
            entry.mask_sha256 = _write_atomic(self.out_dir / mask_name(name),
                                              self.mask[: self.fill].tobytes())
        self.entries.append(entry)
        self.fill = 0

    def finish(self, masked: bool) -> list[ShardEntry]:
        """Flush the last shard; with `masked`, give every shard without a mask an all-ones
        one."""
        self.masked = masked
        self.flush()
        if masked:
            for e in self.entries:
                if e.mask_sha256 is None:
                    e.mask_sha256 = _write_atomic(self.out_dir / mask_name(e.name),
                                                  np.ones(e.tokens, np.uint8).tobytes())
        return self.entries


@dataclass
class _Piece:
    """Text to encode (part of a document) and where its tokens go."""

    text: str
    split: str
    starts: bool  # the first piece of its document: bos in front when the tokenizer adds one
    ends: bool  # the last piece: eos after it


class _Framer:
    """Documents -> framed tokens in the split writers: [bos] + ids + [eos] for text (encoded
    in batches of about `chunk_bytes`, with encode_batch), conversations through the chat
    template with their masks. Keeps the order of the corpus within each split."""

    def __init__(self, tokenizer: Tokenizer, specials: Specials,
                 writers: dict[str, _ShardWriter], chunk_bytes: int):
        self.tok, self.sp, self.writers, self.chunk = tokenizer, specials, writers, chunk_bytes
        self.pending: list[_Piece] = []
        self.pending_chars = 0
        self.chat_encoder = None
        self.masked = False

    def text(self, piece: _Piece) -> None:
        self.pending.append(piece)
        self.pending_chars += len(piece.text)
        if self.pending_chars >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets
        encs = encode([p.text for p in self.pending], add_special_tokens=False)
        for p, enc in zip(self.pending, encs, strict=True):
            w = self.writers[p.split]
            if p.starts and self.sp.add_bos:
                w.add([self.sp.bos_id])
            w.add(enc.ids)
            if p.ends:
                w.add([self.sp.eos_id])
        self.pending.clear()
        self.pending_chars = 0

    def chat(self, messages: list[dict], split: str, where: str) -> None:
        """A conversation: no bos (templates write their own), eos (mask 0) appended unless
        the rendering ends with it; loss on the assistant's tokens only."""
        if self.sp.chat_template is None:
            raise CrowdtrainError(f"{where}: chat `messages` need the model's chat template; "
                                  "this tokenizer has none")
        if self.chat_encoder is None:
            from crowdtrain.run.chat import ChatEncoder

            name = self.tok.id_to_token
            bos = name(self.sp.bos_id) if self.sp.bos_id is not None else None
            self.chat_encoder = ChatEncoder(self.tok, self.sp.chat_template, bos,
                                            name(self.sp.eos_id))
        self.flush()
        if not self.masked:  # from now on every shard is written with its mask
            self.masked = True
            for w in self.writers.values():
                w.masked = True
        ids, mask = self.chat_encoder.encode(messages, where)
        if not len(ids) or ids[-1] != self.sp.eos_id:
            ids, mask = np.append(ids, self.sp.eos_id), np.append(mask, np.uint8(0))
        self.writers[split].add(ids, mask)


def build_shards(
    paths: Sequence[Path],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    cfg: DataConfig,
    progress: bool = True,
    specials: Specials | None = None,
) -> ShardIndex:
    """Tokenize the corpus, streamed, and write train/val shards (+ masks when it holds
    conversations) plus `index.json`. `specials`: the model's framing tokens (default: our
    own tokenizer's, `trained_specials`)."""
    from rich.progress import Progress

    specials = specials or trained_specials(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab)
    writers = {s: _ShardWriter(out, s, cfg.shard_tokens, dtype) for s in ("train", "val")}
    framer = _Framer(tokenizer, specials, writers, cfg.chunk_bytes)
    sizes = [source_bytes(p) for p in paths]
    val_start = int(sum(sizes) * (1.0 - cfg.val_fraction))
    base = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("tokenizing", total=sum(sizes))
        for p, size in zip(paths, sizes, strict=True):
            plain = source_kind(p) == "text"
            starts = True
            for r in iter_records(p, cfg.chunk_bytes, cfg.text_column):
                if plain:
                    _plain_text(framer, r, base, val_start, starts)
                else:
                    split = "train" if base + r.start < val_start else "val"
                    if r.messages is not None:
                        framer.chat(r.messages, split, r.where)
                    else:
                        cuts = cut_text(r.text, cfg.chunk_bytes)
                        for i, t in enumerate(cuts):
                            framer.text(_Piece(t, split, i == 0, i == len(cuts) - 1))
                starts = r.ends
                if not framer.pending:
                    bar.update(task, completed=base + r.end)
            framer.flush()
            base += size
            bar.update(task, completed=base)
    masked = framer.masked
    index = ShardIndex(
        dtype=dtype,
        vocab_size=vocab,
        eot_id=specials.eos_id,
        shard_tokens=cfg.shard_tokens,
        sources=[{"name": p.name, "bytes": size, "sha256": source_sha256(p)}
                 for p, size in zip(paths, sizes, strict=True)],
        train=writers["train"].finish(masked),
        val=writers["val"].finish(masked),
        bos_id=specials.bos_id if specials.add_bos else None,
        masked=masked,
    )
    if not index.train or not index.val:
        raise CrowdtrainError(
            "the corpus is too small to split into train and validation data; give more text"
        )
    (out / INDEX_NAME).write_text(index.to_json())
    return index


def _plain_text(framer: _Framer, r: Record, base: int, val_start: int, starts: bool) -> None:
    """A chunk of a plain text file: the split is cut inside the chunk that straddles it, after
    a newline (the file's eos goes with its last piece)."""
    text, pos = r.text, base + r.start
    pieces = [(text, "train" if pos < val_start else "val")]
    if pos < val_start < base + r.end:
        raw = text.encode("utf-8")
        cut = raw.find(b"\n", val_start - pos) + 1
        if cut > 0:
            pieces = [(raw[:cut].decode(), "train"), (raw[cut:].decode(), "val")]
    for i, (piece, split) in enumerate(pieces):
        last = i == len(pieces) - 1
        if piece or (last and r.ends) or (i == 0 and starts):
            framer.text(_Piece(piece, split, starts and i == 0, r.ends and last))


def read_shard(data_dir: str | os.PathLike, entry: ShardEntry, dtype: str) -> np.ndarray:
    """Read one shard, checking its size and sha256 against the index."""
    p = Path(data_dir) / entry.name
    if not p.is_file():
        raise CrowdtrainError(f"shard {p} is missing")
    data = p.read_bytes()
    itemsize = np.dtype(dtype).itemsize
    if len(data) != entry.tokens * itemsize:
        raise CorruptDataError(
            f"shard {entry.name} is corrupt: {len(data)} bytes, expected {entry.tokens * itemsize}"
        )
    verify_sha256(data, entry.sha256, f"shard {entry.name}")
    return np.frombuffer(data, dtype=dtype)


def read_mask(data_dir: str | os.PathLike, entry: ShardEntry) -> np.ndarray:
    """Read one shard's loss mask (uint8 per token), checking its size and sha256."""
    name = mask_name(entry.name)
    p = Path(data_dir) / name
    if entry.mask_sha256 is None:
        raise CrowdtrainError(f"shard {entry.name} has no loss mask in the index")
    if not p.is_file():
        raise CrowdtrainError(f"loss mask {p} is missing")
    data = p.read_bytes()
    if len(data) != entry.tokens:
        raise CorruptDataError(
            f"loss mask {name} is corrupt: {len(data)} bytes, expected {entry.tokens}")
    verify_sha256(data, entry.mask_sha256, f"loss mask {name}")
    return np.frombuffer(data, dtype=np.uint8)


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise CorruptDataError(
            f"{what} is corrupt: sha256 {got[:12]}... != expected {expected[:12]}..."
        )


def load_split(data_dir: str | os.PathLike, index: ShardIndex, split: str) -> list[np.ndarray]:
    entries = index.train if split == "train" else index.val
    return [read_shard(data_dir, e, index.dtype) for e in entries]


def load_masks(data_dir: str | os.PathLike, index: ShardIndex,
               split: str) -> list[np.ndarray] | None:
    """The loss masks of a split's shards, in `load_split`'s order; None for an index
    without masks (every target carries loss)."""
    if not index.masked:
        return None
    entries = index.train if split == "train" else index.val
    return [read_mask(data_dir, e) for e in entries]


# --------------------------------------------------------------------------- batches


def _check_masks(shards: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(masks) != len(shards) or any(
            len(m) != len(s) for m, s in zip(masks, shards, strict=True)):
        raise CrowdtrainError("the loss masks do not match the shards (one per shard, one "
                              "value per token)")


def get_batch(
    shards: Sequence[np.ndarray], batch_size: int, seq_len: int, seed: int, step: int,
    masks: Sequence[np.ndarray] | None = None,
) -> Batch:
    """Random (input, target) windows; a pure function of (shards, masks, batch_size, seq_len,
    seed, step).

    Each row picks a shard with probability proportional to its usable length, then an offset.
    With `masks` (one per shard), a target whose position's mask is 0 is -100 (ignored by the
    loss); the draws are the same with or without them.
    """
    usable = np.array([max(0, len(s) - seq_len) for s in shards], dtype=np.int64)
    if usable.sum() == 0:
        raise CrowdtrainError(f"every shard is shorter than seq_len + 1 = {seq_len + 1} tokens")
    if masks is not None:
        _check_masks(shards, masks)
    rng = np.random.default_rng([seed, step])
    rows = rng.choice(len(shards), size=batch_size, p=usable / usable.sum())
    xs = np.empty((batch_size, seq_len + 1), dtype=np.int64)
    off = np.empty((batch_size, seq_len), dtype=bool) if masks is not None else None
    for i, r in enumerate(rows):
        start = int(rng.integers(0, usable[r]))
        xs[i] = shards[r][start : start + seq_len + 1]
        if off is not None:
            off[i] = masks[r][start + 1 : start + seq_len + 1] == 0
    t = torch.from_numpy(xs)
    if off is None:
        return t[:, :-1], t[:, 1:]
    y = t[:, 1:].clone()
    y[torch.from_numpy(off)] = IGNORE
    return t[:, :-1], y


def eval_windows(
    shards: Sequence[np.ndarray], seq_len: int, max_tokens: int,
    masks: Sequence[np.ndarray] | None = None,
) -> Iterator[torch.Tensor] | Iterator[Batch]:
    """Consecutive non-overlapping (seq_len + 1)-token windows of the validation data; with
    `masks`, (input, target) pairs whose masked targets are -100."""
    if masks is not None:
        _check_masks(shards, masks)
    return _windows(shards, seq_len, max_tokens, masks)


def _windows(shards, seq_len, max_tokens, masks):
    budget = max_tokens
    for j, s in enumerate(shards):
        for start in range(0, len(s) - seq_len, seq_len):
            if budget < seq_len:
                return
            w = torch.from_numpy(s[start : start + seq_len + 1].astype(np.int64))
            if masks is None:
                yield w
            else:
                y = w[1:].clone()
                y[torch.from_numpy(masks[j][start + 1 : start + seq_len + 1] == 0)] = IGNORE
                yield w[:-1], y
            budget -= seq_len


def split_windows(data_dir: str | os.PathLike, index: ShardIndex, split: str, seq_len: int,
                  max_tokens: int) -> Iterator[torch.Tensor] | Iterator[Batch]:
    """`eval_windows` of a split (with its masks when the index has them), its shards read one
    at a time as the windows reach them: the same windows as eval_windows(load_split(...),
    seq_len, max_tokens, load_masks(...)), without reading the whole split (a large corpus'
    validation split need not sit in memory for `max_tokens` of it)."""
    entries = index.train if split == "train" else index.val
    budget = max_tokens
    for e in entries:
        if budget < seq_len:
            return
        shard = read_shard(data_dir, e, index.dtype)
        masks = [read_mask(data_dir, e)] if index.masked else None
        for w in _windows([shard], seq_len, budget, masks):
            budget -= seq_len
            yield w


def unigram_loss(train: Sequence[np.ndarray], val: Sequence[np.ndarray], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the add-one unigram model of `train` on `val`: the floor
    any language model must beat."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for s in train:
        counts += np.bincount(s, minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for s in val:
        total -= float(logp[s].sum())
        n += len(s)
    return total / max(n, 1)
