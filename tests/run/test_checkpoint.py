"""Checkpoints: round trip, atomicity markers, and corrupt files refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.errors import CorruptDataError, CrowdtrainError
from crowdtrain.run.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    meta_path,
    save_checkpoint,
    tensor_path,
)


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(7, generator=g)}


def test_round_trip(tmp_path, tensors):
    meta = save_checkpoint(tmp_path, 3, tensors, {"val_loss": 1.5})
    ck = load_checkpoint(tmp_path, expected=tensors)
    assert ck.round == 3 and ck.meta["val_loss"] == 1.5 and ck.meta["sha256"] == meta["sha256"]
    assert all(torch.equal(ck.tensors[k], tensors[k]) for k in tensors)


def test_latest_and_incomplete(tmp_path, tensors):
    save_checkpoint(tmp_path, 1, tensors, {})
    save_checkpoint(tmp_path, 2, tensors, {})
    # a crash between the tensor file and its metadata leaves round 3 incomplete: not listed
    tensor_path(tmp_path, 3).write_bytes(b"partial")
    (tmp_path / ".ckpt-000004.json.123.tmp").write_text("{")
    assert list_checkpoints(tmp_path) == [1, 2]
    assert load_checkpoint(tmp_path).round == 2
    with pytest.raises(CrowdtrainError, match="no checkpoint for round 3"):
        load_checkpoint(tmp_path, 3)


def test_truncated_checkpoint_is_refused(tmp_path, tensors):
    save_checkpoint(tmp_path, 1, tensors, {})
    p = tensor_path(tmp_path, 1)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CorruptDataError, match="truncated"):
        load_checkpoint(tmp_path, 1)


def test_altered_checkpoint_is_refused(tmp_path, tensors):
    save_checkpoint(tmp_path, 1, tensors, {})
    p = tensor_path(tmp_path, 1)
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="sha256"):
        load_checkpoint(tmp_path, 1)
    meta_path(tmp_path, 1).write_text("{not json")
    with pytest.raises(CorruptDataError, match="unreadable"):
        load_checkpoint(tmp_path, 1)


def test_shape_and_name_mismatch_named(tmp_path, tensors):
    save_checkpoint(tmp_path, 1, tensors, {})
    wrong = dict(tensors, **{"a.weight": torch.zeros(64, 33)})
    with pytest.raises(CorruptDataError, match=r"a.weight is torch.float32\[64, 32\]"):
        load_checkpoint(tmp_path, 1, expected=wrong)
    with pytest.raises(CorruptDataError, match="missing \\['c'\\]"):
        load_checkpoint(tmp_path, 1, expected=dict(tensors, c=torch.zeros(1)))
