"""Atomic checkpoints: `ckpt-NNNNNN.safetensors` + `ckpt-NNNNNN.json` (metadata).

A checkpoint is complete when its JSON exists: the tensors are written first (temp file, fsync,
rename), then the JSON holding the tensor file's sha256 and size, the same way. A crash at any
moment leaves either a complete checkpoint or stray temp files, never a half-written one that
loads. Loading checks size, hash, header and (optionally) names and shapes against a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crowdtrain.errors import CorruptDataError, CrowdtrainError

_NAME = re.compile(r"^ckpt-(\d{6,})\.json$")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        atomic_move(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave half-written files behind
        raise


def atomic_move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make the file `src` durable and rename it to `dst` (same filesystem), durably: after a
    crash `dst` is either absent or complete."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        fd = os.open(Path(dst).parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Checkpoint:
    round: int
    tensors: dict[str, torch.Tensor]
    meta: dict


def tensor_path(ckpt_dir: Path, rnd: int) -> Path:
    return ckpt_dir / f"ckpt-{rnd:06d}.safetensors"


def meta_path(ckpt_dir: Path, rnd: int) -> Path:
    return ckpt_dir / f"ckpt-{rnd:06d}.json"


def save_checkpoint(
    ckpt_dir: str | os.PathLike, rnd: int, tensors: dict[str, torch.Tensor], meta: dict
) -> dict:
    """Write checkpoint `rnd` atomically; returns the metadata as stored (with sha256, bytes)."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    full = dict(meta)
    full.update(round=rnd, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob),
                saved_at=time.time())
    atomic_write(tensor_path(d, rnd), blob)
    atomic_write(meta_path(d, rnd), json.dumps(full, indent=1).encode())
    return full


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[int]:
    """Rounds that have a complete checkpoint, ascending."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _NAME.match(p.name)))


def read_meta(ckpt_dir: str | os.PathLike, rnd: int) -> dict:
    p = meta_path(Path(ckpt_dir), rnd)
    if not p.is_file():
        raise CrowdtrainError(f"no checkpoint for round {rnd} in {ckpt_dir}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"checkpoint metadata {p} is unreadable ({e})") from None


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    rnd: int | None = None,
    expected: dict[str, torch.Tensor] | None = None,
) -> Checkpoint:
    """Load round `rnd` (default: the latest), verifying size and sha256; with `expected`
    (a model's state dict) also the tensor names and shapes."""
    d = Path(ckpt_dir)
    if rnd is None:
        rounds = list_checkpoints(d)
        if not rounds:
            raise CrowdtrainError(f"no checkpoints in {d}")
        rnd = rounds[-1]
    meta = read_meta(d, rnd)
    p = tensor_path(d, rnd)
    if not p.is_file():
        raise CorruptDataError(f"checkpoint {p.name} is missing its tensor file")
    blob = p.read_bytes()
    if len(blob) != meta.get("bytes"):
        raise CorruptDataError(
            f"checkpoint {p.name} is truncated or altered: {len(blob)} bytes, "
            f"expected {meta.get('bytes')}"
        )
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CorruptDataError(f"checkpoint {p.name} does not match its sha256: it is corrupt")
    tensors = decode_tensors(blob, f"checkpoint {p.name}")
    if expected is not None:
        check_tensors_match(tensors, expected, f"checkpoint {p.name}")
    return Checkpoint(rnd, tensors, meta)


def decode_tensors(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptDataError(f"{what} is not valid safetensors ({e})") from None


def read_tensor_file(path: str | os.PathLike, what: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the str -> str metadata of a safetensors file of this machine's own
    (CorruptDataError, naming `what`, if it is not valid safetensors)."""
    from safetensors import safe_open

    tensors = decode_tensors(Path(path).read_bytes(), what)
    try:
        with safe_open(str(path), "pt") as f:
            return tensors, f.metadata() or {}
    except SafetensorError as e:
        raise CorruptDataError(f"{what} is not valid safetensors ({e})") from None


def check_tensors_match(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str
) -> None:
    """Same names, shapes and dtypes as `expected`, or a precise error."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise CorruptDataError(
            f"{what} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, t in expected.items():
        if got[k].shape != t.shape or got[k].dtype != t.dtype:
            raise CorruptDataError(
                f"{what}: tensor {k} is {got[k].dtype}{list(got[k].shape)}, "
                f"expected {t.dtype}{list(t.shape)}"
            )
