"""Corpus -> tokenizer -> token shards, and deterministic batches read from shards.

Owns everything between text files on disk and integer tensors for the model:
- reading `.txt` files (streamed in chunks) and `.jsonl` files (a document per line, `text`);
- training a byte-level BPE tokenizer with HF `tokenizers`, or loading a local `tokenizer.json`;
- writing fixed-size token shards (`<split>-NNNNN.bin`, raw uint16/uint32) plus `index.json`
  that records each shard's sha256 and the source files' hashes. The last `val_fraction` of the
  corpus bytes (in the order the files are given) is the held-out validation split;
- reading a shard back with its hash verified, and drawing a batch that depends only on
  (shards, seed, step), so any machine given the same shard reproduces the same batch.
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

EOT = "<|endoftext|>"
INDEX_NAME = "index.json"
INDEX_FORMAT = 1


def default_corpus() -> Path:
    """The public-domain corpus shipped in the package (Tiny Shakespeare, 1.1 MB)."""
    return Path(str(resources.files("crowdtrain") / "corpus" / "tinyshakespeare.txt"))


@dataclass(frozen=True)
class DataConfig:
    """How a corpus is turned into shards (`vocab_size`: a `crowdtrain init` option)."""

    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size"})
    shard_tokens: int = 1 << 17
    val_fraction: float = 0.1
    chunk_bytes: int = 1 << 18
    tokenizer_sample_bytes: int = 200 << 20

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


# --------------------------------------------------------------------------- reading the corpus


def check_sources(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Validate corpus paths: they exist, are files, have a supported suffix, are not all empty."""
    if not paths:
        raise CrowdtrainError("no data files given: pass --data FILE [FILE ...]")
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise CrowdtrainError(f"data file not found: {p}")
        if not p.is_file():
            raise CrowdtrainError(f"data path is not a file: {p} (pass text or .jsonl files)")
        if p.suffix.lower() not in (".txt", ".jsonl", ".md", ".text"):
            raise CrowdtrainError(
                f"unsupported data file {p}: use plain text (.txt, .md) or .jsonl "
                "with a 'text' field"
            )
        out.append(p)
    if sum(p.stat().st_size for p in out) == 0:
        raise CrowdtrainError("the corpus is empty: every data file has zero bytes")
    return out


def iter_documents(path: Path, chunk_bytes: int) -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) pieces of one file without loading it whole.

    A text file is one document read in chunks cut after a newline; a `.jsonl` file yields one
    document per line (its `text` field).
    """
    if path.suffix.lower() == ".jsonl":
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CrowdtrainError(
                        f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})"
                    ) from None
                if not isinstance(text, str):
                    raise CrowdtrainError(f"{path}:{lineno}: 'text' must be a string")
                yield text, True
        return
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
                yield block[:cut], False
            yield carry, True
    except UnicodeDecodeError as e:
        raise CrowdtrainError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_corpus(paths: Sequence[Path], chunk_bytes: int) -> Iterator[tuple[str, bool]]:
    for p in paths:
        yield from iter_documents(p, chunk_bytes)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(paths: Sequence[Path], cfg: DataConfig) -> Tokenizer:
    """Train a byte-level BPE tokenizer on (a prefix of) the corpus; any text round-trips."""
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
        for text, _ in iter_corpus(paths, cfg.chunk_bytes):
            yield text
            seen += len(text)
            if seen >= cfg.tokenizer_sample_bytes:
                return

    tok.train_from_iterator(sample(), trainer)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise CrowdtrainError(f"tokenizer not found: {p}")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise CrowdtrainError(f"cannot load tokenizer {p}: {e}") from None
    if tok.token_to_id(EOT) is None:
        raise CrowdtrainError(f"tokenizer {p} has no {EOT} token; add it as a special token")
    return tok


# --------------------------------------------------------------------------- shards


@dataclass
class ShardEntry:
    name: str
    tokens: int
    sha256: str


@dataclass
class ShardIndex:
    """The `index.json` of a data folder: what shards exist and how to check them."""

    dtype: str
    vocab_size: int
    eot_id: int
    shard_tokens: int
    sources: list[dict] = field(default_factory=list)
    train: list[ShardEntry] = field(default_factory=list)
    val: list[ShardEntry] = field(default_factory=list)
    format: int = INDEX_FORMAT

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
        if idx.format != INDEX_FORMAT or idx.dtype not in ("uint16", "uint32"):
            raise CorruptDataError(f"shard index {p} has an unsupported format or dtype")
        return idx

    def entry(self, name: str) -> ShardEntry:
        for e in self.train + self.val:
            if e.name == name:
                return e
        raise CrowdtrainError(f"no shard named {name!r} in the index")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: str):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype = np.dtype(dtype)
        self.buf = np.empty(shard_tokens, dtype=self.dtype)
        self.fill = 0
        self.entries: list[ShardEntry] = []

    def add(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while len(arr):
            n = min(len(arr), self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + n] = arr[:n]
            self.fill += n
            arr = arr[n:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        data = self.buf[: self.fill].tobytes()
        name = f"{self.split}-{len(self.entries):05d}.bin"
        tmp = self.out_dir / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.out_dir / name)
        self.entries.append(ShardEntry(name, self.fill, hashlib.sha256(data).hexdigest()))
        self.fill = 0


def build_shards(
    paths: Sequence[Path],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    cfg: DataConfig,
    progress: bool = True,
) -> ShardIndex:
    """Tokenize the corpus in chunks and write train/val shards plus `index.json`."""
    from rich.progress import Progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab_size()
    eot = tokenizer.token_to_id(EOT)
    dtype = token_dtype(vocab)
    writers = {s: _ShardWriter(out, s, cfg.shard_tokens, dtype) for s in ("train", "val")}
    total = sum(p.stat().st_size for p in paths)
    val_start = int(total * (1.0 - cfg.val_fraction))
    pos = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("tokenizing", total=total)
        for text, ends_doc in iter_corpus(paths, cfg.chunk_bytes):
            raw = text.encode("utf-8")
            pieces = [(text, "train" if pos < val_start else "val")]
            if pos < val_start < pos + len(raw):  # this chunk straddles the split: cut at a newline
                cut = raw.find(b"\n", val_start - pos) + 1
                if cut > 0:
                    pieces = [(raw[:cut].decode(), "train"), (raw[cut:].decode(), "val")]
            for piece, split in pieces:
                if piece:
                    writers[split].add(tokenizer.encode(piece).ids)
            if ends_doc:
                writers[pieces[-1][1]].add([eot])
            pos += len(raw)
            bar.update(task, completed=pos)
    for w in writers.values():
        w.flush()
    index = ShardIndex(
        dtype=dtype,
        vocab_size=vocab,
        eot_id=eot,
        shard_tokens=cfg.shard_tokens,
        sources=[{"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in paths],
        train=writers["train"].entries,
        val=writers["val"].entries,
    )
    if not index.train or not index.val:
        raise CrowdtrainError(
            "the corpus is too small to split into train and validation data; give more text"
        )
    (out / INDEX_NAME).write_text(index.to_json())
    return index


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


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise CorruptDataError(
            f"{what} is corrupt: sha256 {got[:12]}... != expected {expected[:12]}..."
        )


def load_split(data_dir: str | os.PathLike, index: ShardIndex, split: str) -> list[np.ndarray]:
    entries = index.train if split == "train" else index.val
    return [read_shard(data_dir, e, index.dtype) for e in entries]


# --------------------------------------------------------------------------- batches


def get_batch(
    shards: Sequence[np.ndarray], batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (input, target) windows; a pure function of (shards, batch_size, seq_len, seed, step).

    Each row picks a shard with probability proportional to its usable length, then an offset.
    """
    usable = np.array([max(0, len(s) - seq_len) for s in shards], dtype=np.int64)
    if usable.sum() == 0:
        raise CrowdtrainError(f"every shard is shorter than seq_len + 1 = {seq_len + 1} tokens")
    rng = np.random.default_rng([seed, step])
    rows = rng.choice(len(shards), size=batch_size, p=usable / usable.sum())
    xs = np.empty((batch_size, seq_len + 1), dtype=np.int64)
    for i, r in enumerate(rows):
        start = int(rng.integers(0, usable[r]))
        xs[i] = shards[r][start : start + seq_len + 1]
    t = torch.from_numpy(xs)
    return t[:, :-1], t[:, 1:]


def eval_windows(
    shards: Sequence[np.ndarray], seq_len: int, max_tokens: int
) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping (seq_len + 1)-token windows of the validation data."""
    budget = max_tokens
    for s in shards:
        for start in range(0, len(s) - seq_len, seq_len):
            if budget < seq_len:
                return
            yield torch.from_numpy(s[start : start + seq_len + 1].astype(np.int64))
            budget -= seq_len


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
