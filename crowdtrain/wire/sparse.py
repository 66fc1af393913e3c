"""The sparse low-bit codec's math (codec "sparse", after SparseLoCo, arXiv 2508.15706): per
chunk of `block` consecutive values of a parameter, only the `k` largest in magnitude travel,
each as a `bits`-bit level of the chunk's absmax, with its offset in the chunk.

Wire layout of one parameter `name` (numel values, C = block, chunks of C, the last one
shorter; every chunk sends k entries, the last one min(k, its length)):
- `name:idx`   int16, one per entry: the entry's offset in its chunk, strictly increasing
               within a chunk (so no duplicates), in [0, chunk length);
- `name:q`     int8 bytes holding one `bits`-bit level per entry, packed low bits first
               (8 / bits levels a byte, the last byte padded with zeros);
- `name:scale` float32, one per chunk: absmax / (2^bits - 1), 0 for an all-zero chunk.
A level q in [0, 2^bits) decodes to (2q - (2^bits - 1)) * scale: the levels are symmetric
around zero and the largest ones are +-absmax (2 bits: -1, -1/3, 1/3, 1 times absmax).
Decoding is one float32 multiply per entry, so every machine decodes a payload to the same
bits. Everything not sent stays in the worker's error-feedback residual.

At k = 41 of 4096 (1%) and 2 bits a parameter costs about 0.024 bytes, 43x fewer than int8.
Pure: torch and the standard library; problems raise ValueError (codecs turns them into
CodecError with the tensor's name).
"""

from __future__ import annotations

import math

import torch

BLOCK = 4096  # values per chunk (offsets fit int16)
MAX_BLOCK = 32768
BITS = (2, 4, 8)
IDX, Q, SCALE = ":idx", ":q", ":scale"


def chunk_k(block: int, density: float) -> int:
    """Entries sent per chunk of `block` values at `density` (at least 1)."""
    return max(1, min(block, round(density * block)))


def entries(numel: int, block: int, k: int) -> int:
    """Entries a parameter of `numel` values sends: k per chunk, min(k, length) for the last."""
    if numel == 0:
        return 0
    full, rest = divmod(numel, block)
    return full * k + (min(k, rest) if rest else 0)


def packed_len(n_entries: int, bits: int) -> int:
    """Bytes holding `n_entries` levels of `bits` bits."""
    return (n_entries * bits + 7) // 8


def payload_bytes(numel: int, block: int, k: int, bits: int) -> int:
    """Tensor bytes of one parameter on the wire (offsets, levels, scales)."""
    n = entries(numel, block, k)
    return 2 * n + packed_len(n, bits) + 4 * math.ceil(numel / block)


def _chunks(flat: torch.Tensor, block: int, k: int) -> list[tuple[torch.Tensor, int]]:
    """The full chunks as one [chunks, block] matrix and the last partial chunk as a
    [1, length] one, each with the entries it sends."""
    numel = flat.numel()
    full = numel // block
    groups = []
    if full:
        x = flat[: full * block].view(full, block)
        groups.append((x, k))
    if numel % block:
        x = flat[full * block:].view(1, -1)
        groups.append((x, min(k, x.shape[1])))
    return groups


def encode(x: torch.Tensor, block: int, k: int, bits: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets int16, packed levels int8, scales float32) of `x` (any shape, as float32)."""
    flat = x.detach().to(torch.float32).reshape(-1).contiguous()
    top = 2 ** bits - 1
    offs, levels, scales = [], [], []
    for chunk, kk in _chunks(flat, block, k):
        idx = torch.topk(chunk.abs(), kk, dim=1, sorted=False).indices.sort(dim=1).values
        vals = chunk.gather(1, idx)
        absmax = vals.abs().amax(dim=1)
        scale = absmax / top
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((vals / safe[:, None] + top) / 2).clamp_(0, top)
        offs.append(idx.reshape(-1))
        levels.append(q.reshape(-1))
        scales.append(scale)
    if not offs:
        return (torch.zeros(0, dtype=torch.int16), torch.zeros(0, dtype=torch.int8),
                torch.zeros(0, dtype=torch.float32))
    return (torch.cat(offs).to(torch.int16), pack(torch.cat(levels).to(torch.uint8), bits),
            torch.cat(scales).contiguous())


def pack(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 levels < 2^bits, packed 8 / bits a byte, low bits first, as int8."""
    per = 8 // bits
    n = levels.numel()
    padded = torch.zeros(packed_len(n, bits) * per, dtype=torch.uint8)
    padded[:n] = levels
    lanes = padded.view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (lanes << shifts).sum(dim=1).to(torch.uint8).view(torch.int8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` levels (int32) of `packed` bytes."""
    per = 8 // bits
    u = packed.reshape(-1).view(torch.uint8).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((u[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:n]


def check_offsets(idx: torch.Tensor, lengths: torch.Tensor, k_per: torch.Tensor) -> None:
    """ValueError unless every chunk's offsets (`idx`, chunks laid out one after another with
    `k_per` entries each) are strictly increasing and below the chunk's length."""
    if idx.numel() == 0:
        return
    i = idx.to(torch.int64)
    if bool((i < 0).any()):
        raise ValueError("offsets out of range (negative)")
    chunk = torch.repeat_interleave(torch.arange(k_per.numel()), k_per)
    if bool((i >= lengths[chunk]).any()):
        raise ValueError("offsets out of range (past the end of their chunk)")
    same = chunk[1:] == chunk[:-1]
    if bool((same & (i[1:] <= i[:-1])).any()):
        raise ValueError("offsets repeated or out of order within a chunk")


def layout(numel: int, block: int, k: int, first_chunk: int = 0, last_chunk: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, entries) of chunks [first_chunk, last_chunk) of a parameter of `numel`."""
    n_chunks = math.ceil(numel / block)
    last_chunk = n_chunks if last_chunk is None else last_chunk
    c = torch.arange(first_chunk, last_chunk, dtype=torch.int64)
    lengths = torch.clamp(numel - c * block, max=block)
    return lengths, torch.clamp(lengths, max=k)


def decode(idx: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, numel: int,
           block: int, k: int, bits: int, first_chunk: int = 0, skip: int = 0
           ) -> torch.Tensor:
    """Dense float32 values of the chunks starting at `first_chunk` that `scale` covers (one
    scale per chunk; `idx` holds exactly their entries, `packed` their levels after `skip`
    levels of earlier entries), zeros where nothing was sent. Checks offsets and scales."""
    n_chunks = scale.numel()
    lengths, k_per = layout(numel, block, k, first_chunk, first_chunk + n_chunks)
    n = int(k_per.sum())
    if idx.numel() != n:
        raise ValueError(f"expected {n} offsets, got {idx.numel()}")
    if packed.numel() < packed_len(n + skip, bits):
        raise ValueError(f"expected {packed_len(n + skip, bits)} packed bytes, got "
                         f"{packed.numel()}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("scales must be finite and >= 0")
    check_offsets(idx, lengths, k_per)
    out = torch.zeros(int(lengths.sum()), dtype=torch.float32)
    if n == 0:
        return out
    chunk = torch.repeat_interleave(torch.arange(n_chunks), k_per)
    pos = chunk * block + idx.to(torch.int64)
    level = (2 * unpack(packed, bits, n + skip)[skip:] - (2 ** bits - 1)).to(torch.float32)
    out[pos] = level * scale[chunk]
    if not bool(torch.isfinite(out).all()):
        raise ValueError("decoded values overflow float32")
    return out
