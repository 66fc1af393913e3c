"""Held-out evaluation of a causal LM on text: loss, perplexity and bits per byte.

Bits per byte = total nats over the text / (ln 2 * number of UTF-8 bytes of the text). Unlike
loss per token it does not depend on the tokenizer, so models with different vocabularies (a
teacher and its student, a GGUF and its original) compare on the same scale.

Every document is scored as [start] + its tokens, where start is the model's beginning-of-
sequence token when its tokenizer adds one (Llama 2, Mistral, Gemma) and its end-of-sequence
token otherwise (GPT-2's, Qwen2's `<|endoftext|>`; our own tokenizers' EOT): the token the
training stream put before each document (`document_start`). Each token is predicted once,
from up to a full context of the tokens before it in its document stream (consecutive
non-overlapping windows of the model's context length); the start token is context only.
A model is an exported Hugging Face folder or a `.gguf` file (loaded with transformers).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.data import EOT, check_sources, iter_documents

LN2 = math.log(2.0)


@dataclass(frozen=True)
class EvalResult:
    """Totals over the evaluated text; the figures people compare are properties."""

    tokens: int  # tokens predicted
    bytes: int  # UTF-8 bytes of the text
    nats: float  # summed cross-entropy

    @property
    def loss(self) -> float:
        """Mean cross-entropy in nats per token."""
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 50 else float("inf")

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (LN2 * self.bytes) if self.bytes else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def read_texts(paths: Sequence[str | os.PathLike], max_bytes: int | None = None) -> list[str]:
    """The documents of text / .jsonl files (as `crowdtrain init` reads them), at most
    `max_bytes` UTF-8 bytes in all (the last document cut at a character boundary)."""
    docs: list[str] = []
    budget = max_bytes if max_bytes is not None else math.inf
    for p in check_sources(paths):
        parts: list[str] = []
        for text, ends in iter_documents(p, 1 << 20):
            raw = text.encode("utf-8")
            if len(raw) > budget:
                text = raw[: int(budget)].decode("utf-8", errors="ignore")
                raw = text.encode("utf-8")
            parts.append(text)
            budget -= len(raw)
            if ends or budget <= 0:
                if "".join(parts):
                    docs.append("".join(parts))
                parts = []
            if budget <= 0:
                return docs
    return docs


def document_ids(tokenizer: Tokenizer, text: str, chunk_chars: int = 1 << 18) -> list[int]:
    """Token ids of one document, encoded in newline-cut chunks (as the shards are built)."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end) + 1
            end = cut if cut > start else end
        ids.extend(tokenizer.encode(text[start:end], add_special_tokens=False).ids)
        start = end
    return ids


@torch.no_grad()
def score_documents(model: torch.nn.Module, docs: Iterable[Sequence[int]], bos_id: int,
                    context: int, batch_size: int = 8,
                    device: torch.device | None = None) -> tuple[float, int]:
    """(summed nats, tokens predicted) of token documents, each prefixed with `bos_id`."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    streams, masks = [], []
    for d in docs:
        streams.append(np.concatenate([[bos_id], np.asarray(d, dtype=np.int64)]))
        masks.append(np.arange(len(d) + 1) > 0)  # the leading EOT is context, not a target
    if not streams or sum(len(x) for x in streams) < 2:
        model.train(was_training)
        return 0.0, 0
    s = torch.from_numpy(np.concatenate(streams).astype(np.int64))
    m = torch.from_numpy(np.concatenate(masks))
    total, count = 0.0, 0
    windows = [(i, min(i + context, len(s) - 1)) for i in range(0, len(s) - 1, context)]
    # full windows in batches, then the shorter last one on its own
    full = [w for w in windows if w[1] - w[0] == context]
    rest = [w for w in windows if w[1] - w[0] != context]
    for group in [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + \
            [[w] for w in rest]:
        x = torch.stack([s[a:b] for a, b in group]).to(device)
        y = torch.stack([s[a + 1:b + 1] for a, b in group]).to(device)
        keep = torch.stack([m[a + 1:b + 1] for a, b in group]).to(device)
        logits = model(input_ids=x).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                              reduction="none")
        total += float(nll[keep.reshape(-1)].double().sum())
        count += int(keep.sum())
    model.train(was_training)
    return total, count


def document_start(specials) -> int:
    """The token before each document in the training stream (a run.data.Specials): bos when
    the tokenizer adds one, else the eos that ended the previous document."""
    if specials.add_bos and specials.bos_id is not None:
        return int(specials.bos_id)
    return int(specials.eos_id)


def evaluate_texts(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str],
                   bos_id: int | None = None, batch_size: int = 8) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` on `texts` (a list of documents)."""
    if bos_id is None:
        bos_id = tokenizer.token_to_id(EOT)
        if bos_id is None:
            raise CrowdtrainError(f"the tokenizer has no {EOT} token to start documents with")
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    if nbytes == 0:
        raise CrowdtrainError("no text to evaluate on: the data is empty")
    context = int(model.config.max_position_embeddings)
    nats, tokens = score_documents(model, (document_ids(tokenizer, t) for t in texts), bos_id,
                                   context, batch_size)
    return EvalResult(tokens=tokens, bytes=nbytes, nats=nats)


def heldout_texts(run) -> list[str]:
    """A run's held-out validation split as text documents (the val shards decoded, cut at
    every EOT): what the model card's bits per byte is measured on."""
    from crowdtrain.run.data import load_split

    ids = np.concatenate(load_split(run.data_dir, run.index, "val"))
    eot = run.index.eot_id
    cuts = np.flatnonzero(ids == eot)
    docs, start = [], 0
    for c in list(cuts) + [len(ids)]:
        if c > start:
            docs.append(run.tokenizer.decode(ids[start:c].tolist(), skip_special_tokens=True))
        start = c + 1
    return [d for d in docs if d]


def load_for_eval(model_path: str | os.PathLike) -> tuple[torch.nn.Module, Tokenizer, int]:
    """(model, tokenizer, document start id) from an exported Hugging Face folder or a .gguf
    file."""
    p = Path(model_path)
    if p.is_file() and p.suffix == ".gguf":
        return _load_gguf(p)
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0])
    from crowdtrain.run.data import folder_specials, load_tokenizer
    from crowdtrain.run.model import load_pretrained

    model = load_pretrained(p)
    tok_path = p / "tokenizer.json"
    if not tok_path.is_file():
        raise CrowdtrainError(f"{p} has no tokenizer.json")
    tok = load_tokenizer(tok_path, require_eot=False)
    return model.eval(), tok, document_start(folder_specials(p, tok))


def _load_gguf(path: Path) -> tuple[torch.nn.Module, Tokenizer, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise CrowdtrainError(f"loading a GGUF file needs extra packages ({e})") from None
    except (OSError, ValueError) as e:
        raise CrowdtrainError(f"cannot load {path} ({e})") from None
    adds_bos = bool(getattr(tok, "add_bos_token", False)) and tok.bos_token_id is not None
    start = tok.bos_token_id if adds_bos else tok.eos_token_id
    if start is None:
        start = model.config.bos_token_id
    if start is None:
        raise CrowdtrainError(f"{path} has no BOS/EOS token id")
    return model.eval(), tok.backend_tokenizer, int(start)


def evaluate_model(model_path: str | os.PathLike, data: Sequence[str | os.PathLike],
                   max_bytes: int | None = None) -> EvalResult:
    """`crowdtrain eval`: a model folder or .gguf file on text files."""
    texts = read_texts(data, max_bytes)  # bad data fails before a model is loaded
    model, tok, bos = load_for_eval(model_path)
    return evaluate_texts(model, tok, texts, bos)
