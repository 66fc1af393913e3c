"""Tensor <-> bytes codecs for pseudo-gradients on the wire.

This module owns the wire format of a worker's contribution: how a dict of float tensors is
encoded (blockwise absmax int8 or int4, fp16 or fp32), packed into safetensors bytes with a small
str->str metadata header, and parsed back with every field checked. It also owns worker-side
error feedback for the lossy codecs. It is pure (torch, safetensors and the standard library
only) and imports nothing else from crowdtrain, so both the coordinator and workers can use it.

int8 wire layout: each parameter `name` becomes two tensors, `name:q` (int8, flat, one byte
per element) and `name:scale` (float32, one per block of `block` elements). A value is
recovered as `q * scale` of its block; dequantization is a single float32 multiply so that
every machine decodes the same payload to the same bits.

int4 wire layout: the same two tensors, but `name:q` packs two values per byte (int8 dtype,
ceil(numel / 2) bytes): element 2i in the low nibble, 2i+1 in the high one, each stored as
value + 8 with values in [-7, 7] (absmax / 7 per block); the block must be even, and is 64 by
default (`default_block`), about 0.56 bytes per parameter against int8's 1.02.

sparse wire layout (crowdtrain.wire.sparse): per chunk of `block` values, the k largest in
magnitude as int16 offsets, `bits`-bit levels and one float32 scale; metadata `k` and `bits`.

Any malformed or mismatching payload raises `CodecError` (a `ValueError`) naming the tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from crowdtrain.wire import sparse

CODECS = ("int8", "int4", "fp16", "fp32", "sparse")
QUANTIZED = ("int8", "int4")
BLOCK = 256
INT4_BLOCK = 64

_MIN_BLOCK = 16
_MAX_BLOCK = 65536
_MAX_HEADER = 100 * 1024 * 1024
_Q_SUFFIX = ":q"
_SCALE_SUFFIX = ":scale"
_INT_RE = re.compile(r"[0-9]{1,6}")


class CodecError(ValueError):
    """A payload could not be encoded or decoded: malformed bytes, wrong names, shapes, dtypes
    or non-finite values. The message names the offending tensor where there is one."""


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def _check_block(block: int, codec: str | None = None) -> None:
    if isinstance(block, bool) or not isinstance(block, int):
        raise CodecError(f"block must be an int, got {type(block).__name__}")
    top = sparse.MAX_BLOCK if codec == "sparse" else _MAX_BLOCK
    if not _MIN_BLOCK <= block <= top:
        raise CodecError(f"block must be in [{_MIN_BLOCK}, {top}], got {block}")
    if codec == "int4" and block % 2:
        raise CodecError(f"int4 needs an even block, got {block}")


def default_block(codec: str) -> int:
    """The block a payload of `codec` is made with unless the caller names one."""
    return {"int4": INT4_BLOCK, "sparse": sparse.BLOCK}.get(codec, BLOCK)


SPARSE_DENSITY = 0.01  # the sparse codec's default fraction of values sent (run setting)
SPARSE_BITS = 2  # ... and bits per value sent
SPARSE_EF_DECAY = 0.95  # ... and the workers' error-feedback decay (`accumulate`)


def _sparse_options(block: int, k: int | None, bits: int | None) -> tuple[int, int]:
    """(k, bits) of a sparse payload: the defaults where not given, checked."""
    k = sparse.chunk_k(block, SPARSE_DENSITY) if k is None else k
    bits = SPARSE_BITS if bits is None else bits
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= block:
        raise CodecError(f"sparse k must be an int in [1, block {block}], got {k!r}")
    if bits not in sparse.BITS:
        raise CodecError(f"sparse bits must be one of {sparse.BITS}, got {bits!r}")
    return k, bits


def _nblocks(numel: int, block: int) -> int:
    return (numel + block - 1) // block


def _copy_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous CPU tensor of `dtype` holding `t` (never aliases the input)."""
    out = torch.empty(tuple(t.shape), dtype=dtype)
    out.copy_(t.detach())
    return out


def _absmax_quantize(x: torch.Tensor, block: int, levels: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of `x` (flattened as float32) to integers in
    [-levels, levels]: per block scale = absmax / levels (0 for an all-zero block; its values
    0). Returns (values: float32 of length numel, scale: float32 per block)."""
    flat = _copy_as(x, torch.float32).reshape(-1)
    numel = flat.numel()
    nb = _nblocks(numel, block)
    padded = torch.zeros(nb * block, dtype=torch.float32)
    padded[:numel] = flat
    blocks = padded.view(nb, block)
    scale = blocks.abs().amax(dim=1) / levels if nb else torch.zeros(0, dtype=torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp_(-levels, levels)
    q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q))
    return q.reshape(-1)[:numel], scale.contiguous()


def dequantize_values(values: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...],
                block: int) -> torch.Tensor:
    """float32 tensor of `shape` from int8 `values` (one per element, unpacked; extra trailing
    values are ignored) and per-block `scale`, as one float32 multiply per element: bit-for-bit
    reproducible across calls and machines. The one dequantization of int8 and int4, also
    for the slices payloads.py reads from payload files."""
    numel = math.prod(shape)
    nb = _nblocks(numel, block)
    padded = torch.zeros(nb * block, dtype=torch.int8)
    padded[:numel] = values.reshape(-1)[:numel]
    out = padded.view(nb, block).to(torch.float32) * scale.reshape(-1)[:, None]
    return out.reshape(-1)[:numel].reshape(shape)


def _check_quantized(n_values: int, want_values: int, scale: torch.Tensor, numel: int,
                     block: int, what: str, shape: tuple[int, ...]) -> None:
    if scale.dtype != torch.float32:
        raise CodecError(f"scales must be float32, got {scale.dtype}")
    if n_values != want_values:
        raise CodecError(f"expected {want_values} {what} for shape {shape}, got {n_values}")
    if scale.numel() != _nblocks(numel, block):
        raise CodecError(f"expected {_nblocks(numel, block)} scales for {numel} values (block "
                         f"{block}), got {scale.numel()}")


def quantize_int8(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax int8 quantization of `x` (any shape, flattened as float32).

    Pads to a multiple of `block` with zeros; per block scale = absmax / 127 (float32, 0 for an
    all-zero block); q = round(x / scale) clamped to [-127, 127] (0 where scale == 0).
    Returns (q: int8 of length numel, scale: float32 of length ceil(numel / block)).
    """
    if block < 1:
        raise CodecError(f"block must be positive, got {block}")
    q, scale = _absmax_quantize(x, block, 127)
    return q.to(torch.int8).clone(), scale


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], block: int = BLOCK
) -> torch.Tensor:
    """float32 tensor of `shape` from int8 `q` and per-block float32 `scale`.

    Computed as one float32 multiply per element (`q.to(float32) * scale[block]`, no fused ops),
    so the result is bit-for-bit reproducible across calls and machines.
    """
    if block < 1:
        raise CodecError(f"block must be positive, got {block}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if q.dtype != torch.int8:
        raise CodecError(f"quantized values must be int8, got {q.dtype}")
    _check_quantized(q.numel(), numel, scale, numel, block, "quantized values", shape)
    return dequantize_values(q, scale, shape, block)


def quantize_int4(x: torch.Tensor, block: int = INT4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization of `x`: scale = absmax / 7 per block, values
    round(x / scale) in [-7, 7], packed two per byte (see the module docstring).
    Returns (packed: int8 of length ceil(numel / 2), scale: float32 per block)."""
    if block < 2 or block % 2:
        raise CodecError(f"int4 needs an even block, got {block}")
    q, scale = _absmax_quantize(x, block, 7)
    nibbles = torch.full((q.numel() + q.numel() % 2,), 8, dtype=torch.int16)
    nibbles[: q.numel()] += q.to(torch.int16)
    pairs = nibbles.view(-1, 2)
    packed = (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8).view(torch.int8)
    return packed.clone(), scale


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], block: int = INT4_BLOCK
) -> torch.Tensor:
    """float32 tensor of `shape` from packed 4-bit values and per-block float32 `scale`, as one
    float32 multiply per element (bit-for-bit reproducible, like `dequantize_int8`)."""
    if block < 2 or block % 2:
        raise CodecError(f"int4 needs an even block, got {block}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if packed.dtype != torch.int8:
        raise CodecError(f"packed 4-bit values must be int8, got {packed.dtype}")
    _check_quantized(packed.numel(), (numel + 1) // 2, scale, numel, block, "packed bytes",
                     shape)
    return dequantize_values(unpack_int4(packed.reshape(-1)), scale, shape, block)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int8 values in [-8, 7] of packed 4-bit bytes: two per byte, low nibble first."""
    u = packed.view(torch.uint8).to(torch.int16)
    return torch.stack([(u & 0xF) - 8, (u >> 4) - 8], dim=1).reshape(-1).to(torch.int8)


def encode(
    tensors: Mapping[str, torch.Tensor], codec: str, block: int | None = None,
    k: int | None = None, bits: int | None = None,
) -> dict[str, torch.Tensor]:
    """Wire tensors for `tensors` (name -> float tensor of any shape).

    int8: name -> `name:q` (int8, flat) and `name:scale` (float32); fp16: name -> float16;
    fp32: name -> float32; int4: as int8 with two values per byte; sparse: `name:idx`,
    `name:q`, `name:scale` with `k` entries of `bits` bits per chunk of `block`. `block`
    defaults to `default_block(codec)`. Outputs are fresh contiguous CPU tensors. Non-finite
    inputs, and fp16 values that overflow, raise CodecError.
    """
    _check_codec(codec)
    block = default_block(codec) if block is None else block
    _check_block(block, codec)
    if codec == "sparse":
        k, bits = _sparse_options(block, k, bits)
    wire: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in wire:
            raise CodecError(f"wire name {key!r} is produced twice; rename the parameter")
        wire[key] = value

    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CodecError(f"tensor {name} must be a floating-point tensor")
        if not bool(torch.isfinite(t).all()):
            raise CodecError(f"tensor {name} has non-finite values")
        if codec in QUANTIZED:
            q, scale = (quantize_int8 if codec == "int8" else quantize_int4)(t, block)
            put(name + _Q_SUFFIX, q)
            put(name + _SCALE_SUFFIX, scale)
        elif codec == "sparse":
            idx, q, scale = sparse.encode(t, block, k, bits)
            put(name + sparse.IDX, idx)
            put(name + sparse.Q, q)
            put(name + sparse.SCALE, scale)
        elif codec == "fp16":
            h = _copy_as(t, torch.float16)
            if not bool(torch.isfinite(h).all()):
                raise CodecError(f"tensor {name} overflows float16; use codec fp32")
            put(name, h)
        else:
            put(name, _copy_as(t, torch.float32))
    return wire


def _keys_message(missing: list[str], extra: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", extra)):
        if keys:
            shown = ", ".join(keys[:3])
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {label} tensor(s): {shown}{more}")
    return "payload tensors do not match the model: " + "; ".join(parts)


def decode(
    wire: Mapping[str, torch.Tensor],
    codec: str,
    shapes: Mapping[str, Sequence[int]],
    block: int | None = None,
    k: int | None = None,
    bits: int | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of `encode`: float32 tensors of `shapes` (name -> shape) from wire tensors.

    Checks the codec, that the wire keys are exactly those expected, dtypes, lengths and
    shapes, that scales are finite and >= 0, and that every decoded value is finite.
    """
    _check_codec(codec)
    block = default_block(codec) if block is None else block
    _check_block(block, codec)
    if codec in QUANTIZED:
        expected = {n + sfx for n in shapes for sfx in (_Q_SUFFIX, _SCALE_SUFFIX)}
    elif codec == "sparse":
        k, bits = _sparse_options(block, k, bits)
        expected = {n + sfx for n in shapes for sfx in (sparse.IDX, sparse.Q, sparse.SCALE)}
    else:
        expected = set(shapes)
    got = set(wire)
    if got != expected:
        raise CodecError(_keys_message(sorted(expected - got), sorted(got - expected)))

    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if codec in QUANTIZED:
            q = wire[name + _Q_SUFFIX]
            scale = wire[name + _SCALE_SUFFIX]
            if q.dtype != torch.int8:
                raise CodecError(f"tensor {name}{_Q_SUFFIX} must be int8, got {q.dtype}")
            if scale.dtype != torch.float32:
                raise CodecError(
                    f"tensor {name}{_SCALE_SUFFIX} must be float32, got {scale.dtype}")
            numel = math.prod(shape)
            nb = _nblocks(numel, block)
            length = numel if codec == "int8" else (numel + 1) // 2
            if q.dim() != 1 or q.numel() != length:
                raise CodecError(f"tensor {name}{_Q_SUFFIX} has shape {tuple(q.shape)}, "
                                 f"expected ({length},) for parameter shape {shape}")
            if scale.dim() != 1 or scale.numel() != nb:
                raise CodecError(f"tensor {name}{_SCALE_SUFFIX} has shape "
                                 f"{tuple(scale.shape)}, expected ({nb},)")
            if not bool(torch.isfinite(scale).all()):
                raise CodecError(f"tensor {name}{_SCALE_SUFFIX} has non-finite values")
            if bool((scale < 0).any()):
                raise CodecError(f"tensor {name}{_SCALE_SUFFIX} has negative values")
            value = (dequantize_int8 if codec == "int8" else dequantize_int4)(
                q, scale, shape, block)
        elif codec == "sparse":
            value = _decode_sparse(wire, name, shape, block, k, bits)
        else:
            t = wire[name]
            want = torch.float16 if codec == "fp16" else torch.float32
            if t.dtype != want:
                raise CodecError(f"tensor {name} must be {want} for codec {codec}, got {t.dtype}")
            if tuple(t.shape) != shape:
                raise CodecError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
            value = _copy_as(t, torch.float32)
        if not bool(torch.isfinite(value).all()):
            raise CodecError(f"tensor {name} has non-finite values")
        out[name] = value
    return out


def to_bytes(
    tensors: Mapping[str, torch.Tensor],
    codec: str,
    meta: Mapping[str, str] | None = None,
    block: int | None = None,
    k: int | None = None,
    bits: int | None = None,
) -> bytes:
    """safetensors bytes of `encode(tensors, codec, block, k, bits)` (block:
    `default_block(codec)` unless given), with metadata {"codec": codec, "block": str(block),
    **meta} (+ "k" and "bits" for the sparse codec). `meta` must be str -> str and may not
    set those keys."""
    block = default_block(codec) if block is None else block
    wire = encode(tensors, codec, block, k, bits)
    head = {"codec": codec, "block": str(block)}
    if codec == "sparse":
        k, bits = _sparse_options(block, k, bits)
        head.update(k=str(k), bits=str(bits))
    extra = dict(meta or {})
    for key, v in extra.items():
        if not isinstance(key, str) or not isinstance(v, str):
            raise CodecError(f"metadata must be str -> str, got {key!r}: {type(v).__name__}")
        if key in ("codec", "block", "k", "bits"):
            raise CodecError(f"metadata key {key!r} is reserved")
    return _st_save(wire, metadata={**head, **extra})


def _decode_sparse(wire: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...],
                   block: int, k: int, bits: int) -> torch.Tensor:
    idx, q, scale = (wire[name + sfx] for sfx in (sparse.IDX, sparse.Q, sparse.SCALE))
    numel = math.prod(shape)
    n = sparse.entries(numel, block, k)
    for key, t, dtype, length in ((sparse.IDX, idx, torch.int16, n),
                                  (sparse.Q, q, torch.int8, sparse.packed_len(n, bits)),
                                  (sparse.SCALE, scale, torch.float32, _nblocks(numel, block))):
        if t.dtype != dtype:
            raise CodecError(f"tensor {name}{key} must be {dtype}, got {t.dtype}")
        if t.dim() != 1 or t.numel() != length:
            raise CodecError(f"tensor {name}{key} has shape {tuple(t.shape)}, expected "
                             f"({length},) for parameter shape {shape}")
    try:
        return sparse.decode(idx, q, scale, numel, block, k, bits).reshape(shape)
    except ValueError as e:
        raise CodecError(f"tensor {name}: {e}") from None


def sparse_options(meta: Mapping[str, str], block: int) -> tuple[int, int]:
    """(k, bits) from a sparse payload's metadata, checked."""
    raw_k, raw_bits = meta.get("k"), meta.get("bits")
    if raw_k is None or not _INT_RE.fullmatch(raw_k):
        raise CodecError(f"sparse payload metadata has invalid k {raw_k!r}")
    if raw_bits is None or not _INT_RE.fullmatch(raw_bits):
        raise CodecError(f"sparse payload metadata has invalid bits {raw_bits!r}")
    return _sparse_options(block, int(raw_k), int(raw_bits))


def _read_header(blob: bytes, total: int | None = None) -> dict:
    """The JSON header of a payload of `total` bytes (default len(blob)) whose start is `blob`."""
    total = len(blob) if total is None else total
    if total < 8:
        raise CodecError(f"payload truncated: {total} bytes, need at least 8")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > total - 8:
        raise CodecError(f"payload truncated: header length {n} exceeds the "
                         f"{total - 8} bytes after it")
    if n > _MAX_HEADER:
        raise CodecError(f"payload header too large: {n} bytes (max {_MAX_HEADER})")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"payload header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CodecError("payload header is not a JSON object")
    return header


_WIRE_DTYPES = frozenset({"I8", "I16", "F16", "F32"})
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}


def _check_header(header: dict) -> tuple[dict[str, str], str, int]:
    """(metadata, codec, block) of a parsed payload header; CodecError unless the metadata
    names a known codec and a valid block and every tensor has a dtype our codecs make."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise CodecError("payload has no metadata (need codec and block)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CodecError("payload metadata must be str -> str")
    codec = meta.get("codec")
    if codec not in CODECS:
        raise CodecError(f"payload metadata has unknown codec {codec!r}; "
                         f"expected one of {', '.join(CODECS)}")
    raw_block = meta.get("block")
    if raw_block is None or not _INT_RE.fullmatch(raw_block):
        raise CodecError(f"payload metadata has invalid block {raw_block!r}")
    block = int(raw_block)
    top = sparse.MAX_BLOCK if codec == "sparse" else _MAX_BLOCK
    if not _MIN_BLOCK <= block <= top:
        raise CodecError(f"payload metadata block {block} outside [{_MIN_BLOCK}, {top}]")
    if codec == "int4" and block % 2:
        raise CodecError(f"payload metadata block {block} is odd; int4 needs an even block")
    if codec == "sparse":
        sparse_options(meta, block)
    for name, info in header.items():  # only the dtypes our codecs produce; before parsing
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if name != "__metadata__" and (not isinstance(dtype, str) or dtype not in _WIRE_DTYPES):
            torch_name = _DTYPE_NAMES.get(dtype, "unsupported") if isinstance(dtype, str) \
                else "missing"
            raise CodecError(f"tensor {name!r} has dtype {dtype!r} ({torch_name}); payload "
                             "tensors must be int8, int16, float16 or float32")
    return meta, codec, block


def from_bytes(
    blob: bytes,
    shapes: Mapping[str, Sequence[int]],
    max_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse and validate safetensors bytes made by `to_bytes`.

    Returns (float32 tensors of `shapes`, metadata). Any problem (too large, truncated, bad
    header or metadata, unparsable tensors, mismatching names/shapes/dtypes, non-finite
    values) raises CodecError.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if max_bytes is not None and len(blob) > max_bytes:
        raise CodecError(f"payload too large: {len(blob)} bytes (max {max_bytes})")
    header = _read_header(blob)
    meta, codec, block = _check_header(header)
    try:
        wire = _st_load(blob)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError, KeyError) as e:
        raise CodecError(f"payload tensors could not be parsed: {e}") from None
    k, bits = sparse_options(meta, block) if codec == "sparse" else (None, None)
    return decode(wire, codec, shapes, block, k, bits), dict(meta)


def read_file_header(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, str]:
    """The metadata of the payload file at `path`, with the same header checks as `from_bytes`
    (size, header length and JSON, codec, block, dtypes) and without reading any tensor data.
    The tensors themselves are checked block by block by `payloads.check_payload_file`."""
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise CodecError(f"payload too large: {size} bytes (max {max_bytes})")
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if 0 < n <= min(size - 8, _MAX_HEADER):
            head += f.read(n)
    return _check_header(_read_header(head, size))[0]


def payload_bytes(numel: int, codec: str, block: int | None = None, k: int | None = None,
                  bits: int | None = None) -> int:
    """Approximate tensor bytes on the wire for `numel` parameters, excluding the header."""
    _check_codec(codec)
    block = default_block(codec) if block is None else block
    if codec == "sparse":
        return sparse.payload_bytes(numel, block, *_sparse_options(block, k, bits))
    if codec == "int8":
        return numel + 4 * _nblocks(numel, block)
    if codec == "int4":
        return (numel + 1) // 2 + 4 * _nblocks(numel, block)
    return (2 if codec == "fp16" else 4) * numel


def accumulate(delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None,
               decay: float = 1.0, inplace: bool = False) -> dict[str, torch.Tensor]:
    """What a worker compresses under error feedback: `delta + decay * residual`, where
    `residual` is what the last compression did not carry (None: nothing yet). With the codec
    c = decode(encode(e)) of this accumulator e, the next residual is e - c, so
    residual' + c = delta + decay * residual exactly (up to float32 rounding). decay 1 is plain
    error feedback (nothing lost); decay < 1 is SparseLoCo's decayed accumulator (arXiv
    2508.15706: e <- beta * e + delta, send Q(TopK(e)), e <- e - sent), which forgets unsent
    mass geometrically and stands in for the outer momentum. `inplace`: the sum is made in
    `delta`'s own tensors (the same values; no second copy of a model-sized delta)."""
    if not 0 <= decay <= 1:
        raise CodecError(f"error-feedback decay must be in [0, 1], got {decay!r}")
    if residual is None:
        return dict(delta)
    if inplace:
        for k in delta:
            delta[k].add_(residual[k] if decay == 1 else residual[k] * decay)
        return dict(delta)
    if decay == 1:
        return {k: delta[k] + residual[k] for k in delta}
    return {k: delta[k] + residual[k] * decay for k in delta}


class ErrorFeedback:
    """Worker-side error feedback for a lossy codec.

    Keeps, per name, the residual `x - decode(encode(x))` of the last compression and adds it
    to the next tensor of that name before compressing, so quantization error is carried
    forward instead of lost: over many steps the sum of what was decoded tracks the sum of
    what was given, off by at most the latest residual.
    """

    def __init__(self, codec: str, block: int | None = None, k: int | None = None,
                 bits: int | None = None) -> None:
        _check_codec(codec)
        block = default_block(codec) if block is None else block
        _check_block(block, codec)
        self.codec = codec
        self.block = block
        self.k, self.bits = _sparse_options(block, k, bits) if codec == "sparse" else (None,
                                                                                      None)
        self.residual: dict[str, torch.Tensor] = {}

    def compress(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Wire tensors (as `encode`) of `tensors` + residual; updates the residual. On error
        the residual is left unchanged."""
        wire: dict[str, torch.Tensor] = {}
        new_residual: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise CodecError(f"tensor {name} must be a floating-point tensor")
            x = _copy_as(t, torch.float32)
            r = self.residual.get(name)
            if r is not None:
                if r.shape != x.shape:
                    raise CodecError(f"tensor {name} has shape {tuple(x.shape)}, but its "
                                     f"residual has shape {tuple(r.shape)}; call reset()")
                x = x + r
            part = encode({name: x}, self.codec, self.block, self.k, self.bits)
            shapes = {name: tuple(x.shape)}
            decoded = decode(part, self.codec, shapes, self.block, self.k, self.bits)[name]
            new_residual[name] = x - decoded
            wire.update(part)
        self.residual.update(new_residual)
        return wire

    def reset(self) -> None:
        """Forget all residuals (e.g. after the worker resyncs to a new global model)."""
        self.residual.clear()
