"""Contribution files on the coordinator's disk, read without loading them whole: each payload
file (`codecs.to_bytes`, any codec) is memory-mapped with safetensors and read as an
`aggregation.DeltaSource`, one slice at a time, decoded bit-identically to `codecs.from_bytes`;
`check_payload_file` validates an upload the way `from_bytes` validates bytes, one block at a
time, so checking costs memory ~ one block whatever the model size.

The int8/int4 and sparse sources also decode a slice straight into a caller's buffer
(`read_into`), which is how `aggregation.robust_aggregate` fills its block matrices: one
multiply per value from zero-copy views of the file for int8, one scatter of the sent entries
for sparse. Their per-tensor checks (scales, sparse offsets) run once per tensor, on its first
read, instead of on every slice."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from crowdtrain.coordinator import kernels
from crowdtrain.coordinator.aggregation import param_blocks, read_slice
from crowdtrain.wire import codecs, sparse

# per-block scales up to this keep every dequantized value (|q| <= 128) finite in float32
QUANT_SCALE_SAFE = torch.finfo(torch.float32).max / 128


def _check_slice(path: Path, key: str, sl, dtype: str, shape: tuple[int, ...]) -> None:
    """ValueError unless the safetensors slice `sl` has `dtype` and `shape`."""
    if sl.get_dtype() != dtype:
        raise ValueError(f"{path}: tensor {key} has dtype {sl.get_dtype()}, expected {dtype}")
    if tuple(sl.get_shape()) != tuple(shape):
        raise ValueError(f"{path}: tensor {key} has shape {tuple(sl.get_shape())}, expected "
                         f"{tuple(shape)}")


class _MappedFile:
    """A payload file memory-mapped with `safetensors.safe_open`, as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._f = safe_open(str(self.path), "pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{self.path}: cannot open payload: {e}") from None

    def close(self) -> None:
        """Release the memory maps (idempotent)."""
        self._views = {}
        if getattr(self, "_mm", None) is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still referenced somewhere: the GC closes it
                pass
            self._mm = None
        if getattr(self, "_f", None) is not None:
            self._f.__exit__(None, None, None)
            self._f = None

    def _check_range(self, name: str, a: int, b: int) -> int:
        """`name`'s element count, after checking the source is open and [a, b) inside it."""
        if self._f is None:
            raise ValueError(f"{self.path}: source is closed")
        numel = self.numel[name]
        if not 0 <= a <= b <= numel:
            raise ValueError(f"range [{a}, {b}) is outside {name} ({numel} elements)")
        return numel

    def map_views(self) -> None:
        """Memory-map the file privately (copy-on-write) for `view`; safetensors has already
        checked its header (offsets inside the file) when it opened."""
        self._views: dict[str, torch.Tensor] = {}
        with open(self.path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n \
                else None
        self._offsets = {k: (8 + n + v["data_offsets"][0],
                             v["data_offsets"][1] - v["data_offsets"][0])
                         for k, v in header.items() if k != "__metadata__"}

    def view(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `key` as a flat zero-copy view of the file's bytes (`map_views` first), or
        `get_slice`'s copy where a view is not possible (an unaligned or empty tensor).
        Slicing a view copies nothing and holds no lock, so concurrent blocks read in
        parallel."""
        got = self._views.get(key)
        if got is not None:
            return got
        start, size = self._offsets[key]
        item = torch.empty(0, dtype=dtype).element_size()
        if self._mm is None or size == 0 or start % item or size % item:
            view = self._f.get_slice(key)[:]
        else:
            view = torch.frombuffer(self._mm, dtype=dtype, count=size // item, offset=start)
        self._views[key] = view
        return view

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsQuantSource(_MappedFile):
    """A DeltaSource over an int8 or int4 payload file (`codecs.to_bytes(..., "int8")` or
    "int4").

    The file is memory-mapped with `safetensors.safe_open`; `read` touches only the quantized
    values (4-bit ones unpacked) and the scales of the requested range, and dequantizes them
    with `codecs.dequantize_values`, as `codecs.from_bytes` does, so slices are
    bit-identical to it. The header (codec, block, names, dtypes, lengths) is checked
    against `shapes` on opening; scales and values are checked finite per slice. Problems
    raise ValueError naming the file and tensor. Use as a context manager or call `close()`.
    """

    def __init__(self, path: str | Path, shapes: Mapping[str, Sequence[int]]) -> None:
        super().__init__(path)
        try:
            self._check_header(shapes)
            self.map_views()
            self._checked: dict[str, tuple[torch.Tensor, bool]] = {}
            self._rows: dict[str, tuple] = {}
            self._dequantize = kernels.dequantizer() if self.codec == "int8" else None
        except Exception:
            self.close()
            raise

    def _check_header(self, shapes: Mapping[str, Sequence[int]]) -> None:
        meta = self._f.metadata() or {}
        self.codec = meta.get("codec")
        if self.codec not in codecs.QUANTIZED:
            raise ValueError(f"{self.path}: codec is {self.codec!r}, expected 'int8' or 'int4'")
        raw = meta.get("block", "")
        if not raw.isdigit() or not 16 <= int(raw) <= 65536 or (
                self.codec == "int4" and int(raw) % 2):
            raise ValueError(f"{self.path}: invalid block {raw!r}")
        self.block = int(raw)
        keys = set(self._f.keys())
        want = {n + s for n in shapes for s in (":q", ":scale")}
        if keys != want:
            missing, extra = sorted(want - keys)[:3], sorted(keys - want)[:3]
            raise ValueError(f"{self.path}: tensors do not match the model: missing {missing}, "
                             f"unexpected {extra}")
        self.numel: dict[str, int] = {}
        for name, shape in shapes.items():
            numel = math.prod(int(s) for s in shape)
            nb = (numel + self.block - 1) // self.block
            nq = numel if self.codec == "int8" else (numel + 1) // 2
            for key, dtype, length in ((name + ":q", "I8", nq),
                                       (name + ":scale", "F32", nb)):
                sl = self._f.get_slice(key)
                _check_slice(self.path, key, sl, dtype, (length,))
            self.numel[name] = numel

    def _scales(self, name: str) -> tuple[torch.Tensor, bool]:
        """`name`'s scales (a view of the file) and whether any is large enough to overflow
        a dequantized value, checked finite and >= 0 on the first call (then cached)."""
        got = self._checked.get(name)
        if got is None:
            scale = self.view(name + ":scale", torch.float32)
            if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                raise ValueError(f"{self.path}: tensor {name}:scale has non-finite or negative "
                                 "values")
            got = self._checked[name] = (scale, bool((scale > QUANT_SCALE_SAFE).any()))
        return got

    def _values(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """The quantized values [lo, hi) of `name` as int8 (4-bit ones unpacked); lo is a
        block boundary."""
        if self.codec == "int8":
            return self.view(name + ":q", torch.int8)[lo:hi]
        # two values a byte; blocks are even, so lo is a byte boundary
        q = codecs.unpack_int4(self.view(name + ":q", torch.int8)[lo // 2:(hi + 1) // 2])
        return q[:hi - lo]

    def _check_finite(self, name: str, out: torch.Tensor, big: bool) -> None:
        # |q| <= 128: only a scale this large can overflow float32
        if big and not bool(torch.isfinite(out).all()):
            raise ValueError(f"{self.path}: tensor {name} has non-finite values")

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Flat float32 elements [a, b) of `name`, dequantized exactly as `from_bytes`."""
        numel = self._check_range(name, a, b)
        if a == b:
            return torch.zeros(0, dtype=torch.float32)
        scale_all, big = self._scales(name)
        bs = self.block
        b0, b1 = a // bs, (b + bs - 1) // bs  # the scale blocks covering [a, b)
        scale = scale_all[b0:b1]
        lo, hi = b0 * bs, min(b1 * bs, numel)
        q = self._values(name, lo, hi)
        if (hi - lo) % bs == 0:  # whole blocks: the same float32 multiply, without padding
            vals = (q.view(-1, bs).to(torch.float32) * scale[:, None]).view(-1)
        else:
            vals = codecs.dequantize_values(q, scale, (hi - lo,), bs)
        out = vals[a - lo: b - lo] if (a, b) != (lo, hi) else vals
        self._check_finite(name, out, big)
        return out

    def read_into(self, name: str, a: int, b: int, out: torch.Tensor) -> None:
        """`read(name, a, b)` written into `out` (contiguous float32, b - a values): from a
        block boundary, one int8 x float32 multiply per value with no copy in between."""
        numel = self._check_range(name, a, b)
        bs = self.block
        whole = (b - a) // bs * bs if a % bs == 0 else 0
        if whole:
            dst = out.view(-1, bs) if whole == b - a else out[:whole].view(-1, bs)
            r0, r1 = a // bs, (a + whole) // bs
            if self.codec == "int8":
                q, scale, big, qn, sn = self._blocks(name, numel)
                if self._dequantize is not None:  # compiled (kernels.dequantizer)
                    self._dequantize(qn[r0:r1], sn[r0:r1], dst.numpy())
                else:
                    torch.mul(q[r0:r1], scale[r0:r1], out=dst)
            else:
                scale, big = self._scales(name)
                torch.mul(self._values(name, a, a + whole).view(-1, bs), scale[r0:r1, None],
                          out=dst)
            self._check_finite(name, dst, big)
        if whole < b - a:
            out[whole:].copy_(self.read(name, a + whole, b))

    def int8_rows(self, name: str) -> tuple[np.ndarray, np.ndarray, int, bool] | None:
        """For the aggregation's whole-matrix decode (`kernels.row_decoder`): int8 `name`'s
        whole blocks (blocks x block int8, a view of the file), its scales (float32, one a
        block), the block, and whether a scale is large enough to overflow a value; None for
        int4. Valid while the source is open."""
        if self.codec != "int8":
            return None
        self._check_range(name, 0, 0)
        _, _, big, qn, sn = self._blocks(name, self.numel[name])
        return qn, sn, self.block, big

    def _blocks(self, name: str, numel: int) -> tuple:
        """int8 `name`'s whole blocks as a blocks x block view of the file, its scales as a
        column, `_scales`'s overflow flag, and the same two views as numpy arrays (cached: a
        read then slices only rows)."""
        got = self._rows.get(name)
        if got is None:
            scale, big = self._scales(name)
            rows = numel // self.block
            q = self.view(name + ":q", torch.int8)[:rows * self.block].view(rows, self.block)
            got = self._rows[name] = (q, scale[:rows, None], big, q.numpy(),
                                      scale[:rows].numpy())
        return got


class SafetensorsFloatSource(_MappedFile):
    """A DeltaSource over an fp16 or fp32 payload file (`codecs.to_bytes(..., "fp16")` or
    "fp32"): tensors keep their shapes there, so `read` loads the rows of the leading
    dimension that cover [a, b) and converts them to float32, bit-identical to
    `codecs.from_bytes`. Header checked on opening, values checked finite per slice."""

    def __init__(self, path: str | Path, shapes: Mapping[str, Sequence[int]]) -> None:
        super().__init__(path)
        try:
            codec = (self._f.metadata() or {}).get("codec")
            if codec not in ("fp16", "fp32"):
                raise ValueError(f"{self.path}: codec is {codec!r}, expected 'fp16' or 'fp32'")
            keys = set(self._f.keys())
            if keys != set(shapes):
                missing, extra = sorted(set(shapes) - keys)[:3], sorted(keys - set(shapes))[:3]
                raise ValueError(f"{self.path}: tensors do not match the model: missing "
                                 f"{missing}, unexpected {extra}")
            want = "F16" if codec == "fp16" else "F32"
            self.shapes = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
            self.numel = {n: math.prod(shape) for n, shape in self.shapes.items()}
            for name, shape in self.shapes.items():
                _check_slice(self.path, name, self._f.get_slice(name), want, shape)
        except Exception:
            self.close()
            raise

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Flat float32 elements [a, b) of `name`, converted exactly as `from_bytes`."""
        numel = self._check_range(name, a, b)
        shape = self.shapes[name]
        if a == b:
            return torch.zeros(0, dtype=torch.float32)
        if len(shape) == 0:
            flat, start = self._f.get_tensor(name).reshape(-1), 0
        else:
            row = numel // shape[0] if shape[0] else 1
            r0, r1 = a // row, (b + row - 1) // row
            flat, start = self._f.get_slice(name)[r0:r1].reshape(-1), r0 * row
        out = flat[a - start: b - start].to(torch.float32).clone()
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{self.path}: tensor {name} has non-finite values")
        return out



class SafetensorsSparseSource(_MappedFile):
    """A DeltaSource over a sparse payload file (`codecs.to_bytes(..., "sparse")`): `read`
    touches only the entries and scales of the chunks covering [a, b) and decodes them with
    `sparse.decode` (the decoding `codecs.from_bytes` uses), checking offsets (in range, no
    repeats) and scales on the way. The header (block, k, bits, names, dtypes, lengths) is
    checked against `shapes` on opening. `sparse` (true) puts its rounds under the agreement
    screen (aggregation.RobustConfig.agreement_factor)."""

    sparse = True

    def __init__(self, path: str | Path, shapes: Mapping[str, Sequence[int]]) -> None:
        super().__init__(path)
        try:
            meta = self._f.metadata() or {}
            if meta.get("codec") != "sparse":
                raise ValueError(f"{self.path}: codec is {meta.get('codec')!r}, expected "
                                 "'sparse'")
            raw = meta.get("block", "")
            if not raw.isdigit() or not 16 <= int(raw) <= sparse.MAX_BLOCK:
                raise ValueError(f"{self.path}: invalid block {raw!r}")
            self.block = int(raw)
            self.k, self.bits = codecs.sparse_options(meta, self.block)
            keys = set(self._f.keys())
            want = {n + s for n in shapes for s in (sparse.IDX, sparse.Q, sparse.SCALE)}
            if keys != want:
                missing, extra = sorted(want - keys)[:3], sorted(keys - want)[:3]
                raise ValueError(f"{self.path}: tensors do not match the model: missing "
                                 f"{missing}, unexpected {extra}")
            self.numel: dict[str, int] = {}
            for name, shape in shapes.items():
                numel = math.prod(int(s) for s in shape)
                n = sparse.entries(numel, self.block, self.k)
                for key, dtype, length in (
                        (name + sparse.IDX, "I16", n),
                        (name + sparse.Q, "I8", sparse.packed_len(n, self.bits)),
                        (name + sparse.SCALE, "F32", (numel + self.block - 1) // self.block)):
                    _check_slice(self.path, key, self._f.get_slice(key), dtype, (length,))
                self.numel[name] = numel
            self.map_views()
            self._checked: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = {}
            self._chunks = torch.zeros(0, dtype=torch.int64)
            # the decoded levels (2q - (2^bits - 1), as float32) of every byte, low bits first
            top = 2 ** self.bits - 1
            self._levels = (2 * sparse.unpack(torch.arange(256, dtype=torch.uint8), self.bits,
                                              256 * 8 // self.bits) - top
                            ).to(torch.float32).view(256, 8 // self.bits)
        except codecs.CodecError as e:
            self.close()
            raise ValueError(f"{self.path}: {e}") from None
        except Exception:
            self.close()
            raise

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Flat float32 elements [a, b) of `name`, zeros where nothing was sent."""
        numel = self._check_range(name, a, b)
        if a == b:
            return torch.zeros(0, dtype=torch.float32)
        bs, k, bits = self.block, self.k, self.bits
        c0, c1 = a // bs, (b + bs - 1) // bs  # the chunks covering [a, b)
        e0 = sparse.entries(c0 * bs, bs, k)  # entries before chunk c0 (all full chunks)
        e1 = e0 + sparse.entries(min(c1 * bs, numel) - c0 * bs, bs, k)
        byte0 = e0 * bits // 8
        skip = (e0 * bits - 8 * byte0) // bits
        try:
            vals = sparse.decode(
                self._f.get_slice(name + sparse.IDX)[e0:e1],
                self._f.get_slice(name + sparse.Q)[byte0:sparse.packed_len(e1, bits)],
                self._f.get_slice(name + sparse.SCALE)[c0:c1], numel, bs, k, bits,
                first_chunk=c0, skip=skip)
        except ValueError as e:
            raise ValueError(f"{self.path}: tensor {name}: {e}") from None
        return vals[a - c0 * bs: b - c0 * bs]

    def _tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """`name`'s offsets, packed levels and scales (views of the file) and whether a scale
        is large enough to overflow a decoded value; offsets and scales checked as
        `sparse.decode` checks them, over the whole tensor, on the first call (then cached)."""
        got = self._checked.get(name)
        if got is None:
            idx = self.view(name + sparse.IDX, torch.int16)
            packed = self.view(name + sparse.Q, torch.int8)
            scale = self.view(name + sparse.SCALE, torch.float32)
            try:
                if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                    raise ValueError("scales must be finite and >= 0")
                sparse.check_offsets(idx, *sparse.layout(self.numel[name], self.block, self.k))
            except ValueError as e:
                raise ValueError(f"{self.path}: tensor {name}: {e}") from None
            big = bool((scale > torch.finfo(torch.float32).max / (2 ** self.bits - 1)).any())
            got = self._checked[name] = (idx, packed, scale, big)
        return got

    def _chunk_of(self, n_entries: int) -> torch.Tensor:
        """int64 [0, 0, .. 1, 1, ..]: the chunk of each of the first `n_entries` entries of
        a run of full chunks (k entries each), cached and grown as needed."""
        got = self._chunks
        if got.numel() < n_entries:
            got = self._chunks = torch.arange(n_entries, dtype=torch.int64) // self.k
        return got[:n_entries]

    def read_into(self, name: str, a: int, b: int, out: torch.Tensor) -> None:
        """`read(name, a, b)` written into `out` (contiguous float32, b - a values): zeros,
        then one scatter of the entries sent for [a, b), decoded as `sparse.decode` does."""
        numel = self._check_range(name, a, b)
        out.zero_()
        if a == b:
            return
        idx, packed, scale, big = self._tensor(name)
        bs, k, bits = self.block, self.k, self.bits
        c0, c1 = a // bs, (b + bs - 1) // bs  # the chunks covering [a, b)
        e0 = c0 * k  # entries before chunk c0 (all full chunks)
        e1 = e0 + sparse.entries(min(c1 * bs, numel) - c0 * bs, bs, k)
        if e1 == e0:
            return
        chunk = self._chunk_of(e1 - e0)
        pos = torch.add(idx[e0:e1], chunk, alpha=bs)  # from the start of chunk c0
        per = 8 // bits  # levels a byte
        byte = packed[e0 // per:sparse.packed_len(e1, bits)].view(torch.uint8).to(torch.int32)
        level = self._levels.index_select(0, byte).view(-1)[e0 % per:e0 % per + e1 - e0]
        if e1 - e0 == (c1 - c0) * k:  # k entries in every chunk: one scale a row
            vals = torch.mul(level.view(-1, k), scale[c0:c1, None]).view(-1)
        else:
            vals = torch.mul(level, scale[c0:c1][chunk])
        if big and not bool(torch.isfinite(vals).all()):
            raise ValueError(f"{self.path}: tensor {name}: decoded values overflow float32")
        start = a - c0 * bs
        if start or c1 * bs > b:  # [a, b) does not begin or end at a chunk boundary
            inside = (pos >= start) & (pos < start + b - a)
            pos, vals = pos[inside] - start, vals[inside]
        out.scatter_(0, pos, vals)


def open_payload(
    path: str | Path, shapes: Mapping[str, Sequence[int]]
) -> SafetensorsQuantSource | SafetensorsFloatSource | SafetensorsSparseSource:
    """The streaming DeltaSource for a payload file of any codec, chosen by the codec in the
    file's own metadata (so a contribution whose codec differs from the run's still opens).
    ValueError if the file is not a payload for `shapes`. Close it when done."""
    try:
        with safe_open(str(path), "pt") as f:
            codec = (f.metadata() or {}).get("codec")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot open payload: {e}") from None
    if codec in codecs.QUANTIZED:
        return SafetensorsQuantSource(path, shapes)
    if codec == "sparse":
        return SafetensorsSparseSource(path, shapes)
    return SafetensorsFloatSource(path, shapes)


def check_payload_file(path: str | Path, shapes: Mapping[str, Sequence[int]],
                       max_bytes: int | None = None,
                       block_elems: int = 1 << 20) -> dict[str, str]:
    """Validate the payload file at `path` as `codecs.from_bytes` validates bytes (header,
    codec, block, names, dtypes, shapes, finite values), holding at most `block_elems` decoded
    values at a time, so checking an upload costs memory ~ one block, not one model.
    Returns the payload's metadata; any problem raises `codecs.CodecError`."""
    meta = codecs.read_file_header(path, max_bytes)
    try:
        with open_payload(path, shapes) as src:
            for name, a, b in param_blocks(shapes, block_elems):
                read_slice(src, name, a, b)
    except ValueError as e:
        raise codecs.CodecError(str(e).replace(f"{path}: ", "")) from None
    return meta
