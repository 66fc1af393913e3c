"""`crowdtrain train`: the plain one-machine loop on a run, the baseline the swarm is measured
against. It continues from the run's latest checkpoint and writes the next one; Ctrl-C stops
early and still saves what was trained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from crowdtrain.run.checkpoint import save_checkpoint
from crowdtrain.run.data import get_batch, load_masks, load_split, unigram_loss
from crowdtrain.run.folder import Run
from crowdtrain.run.interrupt import GracefulInterrupt
from crowdtrain.run.model import state_dict_for_save
from crowdtrain.run.train import InnerLoop, evaluate, pick_device

log = logging.getLogger(__name__)


@dataclass
class LocalResult:
    round: int
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    train_loss: float
    val_loss: float
    unigram_loss: float
    interrupted: bool


def train_local(
    run: Run,
    steps: int | None = None,
    minutes: float | None = None,
    device: str = "auto",
    eval_every: int = 100,
    progress: bool = True,
) -> LocalResult:
    """Train `steps` inner steps (default: the rest of the schedule) or until `minutes` pass."""
    cfg = run.config.train
    dev = pick_device(device)
    model, ckpt = run.load_model()
    start = int(ckpt.meta.get("steps", 0))
    if steps is None:
        steps = max(cfg.total_steps - start, 0) or cfg.total_steps
    train = load_split(run.data_dir, run.index, "train")
    masks = load_masks(run.data_dir, run.index, "train")  # a chat run's: the answers only
    unigram = unigram_loss(train, load_split(run.data_dir, run.index, "val"),
                           run.index.vocab_size)
    loop = InnerLoop(model, cfg, dev, teacher=run.load_teacher())  # a distillation run: KD
    deadline = time.monotonic() + minutes * 60 if minutes else None
    done = tokens = 0
    loss_sum = seconds = 0.0
    val_loss = float(ckpt.meta.get("val_loss", float("nan")))
    interrupted = False

    def batches(step: int):
        return get_batch(train, cfg.batch_size, cfg.seq_len, cfg.seed, step, masks)

    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=steps, info="")

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step - start + 1,
                       info=f"loss {loss:.3f}  val {val_loss:.3f}  {tokens_per_s:,.0f} tok/s")

        tokens_per_s = 0.0
        with GracefulInterrupt("stopping after this step and saving a checkpoint") as stop:
            while done < steps and not stop and (deadline is None or time.monotonic() < deadline):
                chunk = min(eval_every, steps - done)
                st = loop.run(batches, start + done, chunk, deadline=deadline, on_step=on_step,
                              stop=lambda: bool(stop))
                done += st.steps
                tokens += st.tokens
                seconds += st.seconds
                loss_sum += st.mean_loss * st.steps
                tokens_per_s = tokens / seconds if seconds else 0.0
                val_loss = evaluate(model, run.val_windows(), dev)
                log.info("step %d train_loss %.4f val_loss %.4f tokens/s %.0f",
                         start + done, st.mean_loss, val_loss, tokens_per_s)
            interrupted = bool(stop)
    rnd = ckpt.round + 1
    save_checkpoint(run.ckpt_dir, rnd, state_dict_for_save(model), {
        "source": "local",
        "steps": start + done,
        "tokens_trained": int(ckpt.meta.get("tokens_trained", 0)) + tokens,
        "val_loss": val_loss,
        "params": ckpt.meta.get("params"),
        "device": dev.type,
        "seconds": seconds,
    })
    return LocalResult(rnd, done, tokens, seconds, tokens / seconds if seconds else 0.0,
                       loss_sum / max(done, 1), val_loss, unigram, interrupted)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
