"""The inner loop: schedule, device choice, early stop, and that it actually learns."""

from __future__ import annotations

import math
import time

import pytest
import torch

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.data import get_batch, load_split
from crowdtrain.run.train import InnerLoop, TrainConfig, evaluate, lr_at, pick_device


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=False))
    assert lrs[110] == pytest.approx(1e-4) and lrs[129] == pytest.approx(1e-4)


def test_invalid_config_names_the_setting():
    with pytest.raises(CrowdtrainError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(CrowdtrainError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(CrowdtrainError, match="unknown device"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(CrowdtrainError, match="no CUDA"):
            pick_device("cuda")


def test_training_lowers_held_out_loss(tiny_run):
    model, _ = tiny_run.load_model(0)
    cfg = tiny_run.config.train
    dev = torch.device("cpu")
    before = evaluate(model, tiny_run.val_windows(), dev)
    train = load_split(tiny_run.data_dir, tiny_run.index, "train")
    loop = InnerLoop(model, cfg, dev)
    seen = []
    stats = loop.run(lambda s: get_batch(train, cfg.batch_size, cfg.seq_len, 0, s), 0, 200,
                     on_step=lambda s, loss: seen.append((s, loss)))
    after = evaluate(model, tiny_run.val_windows(), dev)
    assert stats.steps == 200 and stats.tokens == 200 * cfg.batch_size * cfg.seq_len
    assert stats.tokens_per_s > 0 and math.isfinite(stats.mean_loss)
    assert [s for s, _ in seen][:2] == [9, 19]
    assert after < 0.8 * before, (before, after)


def test_stop_and_deadline_end_the_loop_early(tiny_run):
    model, _ = tiny_run.load_model(0)
    cfg = tiny_run.config.train
    train = load_split(tiny_run.data_dir, tiny_run.index, "train")
    loop = InnerLoop(model, cfg, torch.device("cpu"))
    batches = lambda s: get_batch(train, cfg.batch_size, cfg.seq_len, 0, s)  # noqa: E731
    calls = []
    st = loop.run(batches, 0, 100, stop=lambda: calls.append(1) or len(calls) > 5)
    assert st.steps == 5
    st = loop.run(batches, 0, 10_000, deadline=time.monotonic() + 0.3)
    assert 1 <= st.steps < 10_000


def _two_loops(tiny_run, **second):
    cfg = tiny_run.config.train
    shards = load_split(tiny_run.data_dir, tiny_run.index, "train")
    loops = []
    for kw in ({}, second):
        model, _ = tiny_run.load_model(0)
        loops.append(InnerLoop(model, cfg, torch.device("cpu"), **kw))
    return loops, (lambda step: get_batch(shards, cfg.batch_size, cfg.seq_len, 7, step))


def _assert_same_params(a: InnerLoop, b: InnerLoop) -> None:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    worst = max(float((pa[k] - pb[k]).detach().abs().max()) for k in pa)
    assert worst < 1e-5, worst


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_update(tiny_run, monkeypatch):
    (whole, small), batches = _two_loops(tiny_run)
    real_loss = small.loss

    def loss_that_fits_two_rows(x, y):  # an injected device: more than 2 rows -> OOM
        if x.size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(x, y)

    monkeypatch.setattr(small, "loss", loss_that_fits_two_rows)
    a = whole.run(batches, 0, 3)
    b = small.run(batches, 0, 3)
    assert small.micro_batch == 2 and whole.micro_batch == tiny_run.config.train.batch_size
    assert b.steps == a.steps == 3 and b.tokens == a.tokens
    assert b.mean_loss == pytest.approx(a.mean_loss, abs=1e-5)
    _assert_same_params(whole, small)


def test_out_of_memory_at_one_row_is_a_clear_error(tiny_run, monkeypatch):
    (_, loop), batches = _two_loops(tiny_run, micro_batch=1)

    def no_memory(x, y):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop, "loss", no_memory)
    with pytest.raises(CrowdtrainError, match="out of cpu memory even at micro-batch 1"):
        loop.run(batches, 0, 1)


def test_a_run_batch_that_does_not_split_across_processes_is_refused(tiny_run):
    model, _ = tiny_run.load_model(0)
    with pytest.raises(CrowdtrainError, match="does not split across 3 processes"):
        InnerLoop(model, tiny_run.config.train, torch.device("cpu"), ranks=3)


def test_worker_remembers_the_micro_batch_that_fit_its_device(tmp_path):
    from crowdtrain.volunteer.files import RunFolder

    folder = RunFolder(tmp_path)  # the volunteer's files for one run
    assert folder.micro_batch("cpu") is None
    folder.remember_micro_batch("cpu", 4)  # what InnerLoop settled on after an OOM
    assert folder.micro_batch("cpu") == 4
    assert folder.micro_batch("cuda:0") is None  # another device starts from the whole batch
    (tmp_path / "device.json").write_text("{not json")
    assert folder.micro_batch("cpu") is None


def test_a_compiled_loop_trains_the_same_parameters(tiny_run):
    # "aot_eager": dynamo's graph capture and AOT autograd without a C++ compiler, so it runs
    # on any CI machine; the worker's --compile uses "inductor" (the same path plus codegen)
    (plain, compiled), batches = _two_loops(tiny_run, compile_backend="aot_eager")
    assert compiled.net is not compiled.model  # the forward really goes through dynamo
    a = plain.run(batches, 0, 3)
    b = compiled.run(batches, 0, 3)
    assert b.steps == a.steps == 3
    assert b.mean_loss == pytest.approx(a.mean_loss, abs=1e-4)
    _assert_same_params(plain, compiled)
    assert set(compiled.optimizer_tensors()) == set(plain.optimizer_tensors())


def test_distillation_loss_weighs_the_teachers_kl_against_the_text():
    from crowdtrain.run.train import distillation_loss

    g = torch.Generator().manual_seed(0)
    logits, other = torch.randn(12, 7, generator=g), torch.randn(12, 7, generator=g)
    y = torch.randint(0, 7, (12,), generator=g)
    ce = torch.nn.functional.cross_entropy(logits, y)
    # a teacher that agrees with the student adds nothing: only (1 - alpha) of the text's CE
    assert torch.allclose(distillation_loss(logits, logits, y, 0.9, 2.0), 0.1 * ce)
    assert torch.allclose(distillation_loss(logits, other, y, 0.0, 1.0), ce)
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits / 2, -1),
                                    torch.log_softmax(other / 2, -1), log_target=True,
                                    reduction="batchmean")
    assert torch.allclose(distillation_loss(logits, other, y, 0.9, 2.0),
                          0.9 * 4 * kl + 0.1 * ce)
