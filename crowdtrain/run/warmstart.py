"""The run owner's warm start: before any volunteer joins, the owner's machine trains the
fresh model for the first steps of the schedule on K x the run's batch (K = `warm_start_batch`,
the global batch of a K-volunteer swarm), and that becomes checkpoint 0.

Measured (BENCHMARKS.md, convergence): DiLoCo's workers drift apart most while the model
changes fastest, at the very start; a short synchronous start removes that phase, and the swarm
then keeps data parallelism's quality at large H. The warm start's steps come out of the same
schedule (the swarm's first lease starts where it stopped) and its tokens, time and device are
recorded in checkpoint 0's metadata, so the model card reports them apart from the volunteers'.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from crowdtrain.run.data import ShardIndex, get_batch, load_masks, load_split
from crowdtrain.run.train import InnerLoop, Teacher, TrainConfig, pick_device


def warm_start(model: torch.nn.Module, data_dir: Path, index: ShardIndex, cfg: TrainConfig,
               steps: int, batch_multiple: int, seed: int, device: str = "auto",
               progress: bool = True, teacher: Teacher | None = None) -> dict:
    """Train `model` in place for schedule steps [0, `steps`) on `batch_multiple` x the batch;
    returns the record for checkpoint 0's metadata (steps, tokens, seconds, device, batch)."""
    big = dataclasses.replace(cfg, batch_size=cfg.batch_size * batch_multiple)
    dev = pick_device(device)
    train = load_split(data_dir, index, "train")
    masks = load_masks(data_dir, index, "train")  # a chat run's: loss on the answers only
    loop = InnerLoop(model, big, dev, teacher=teacher)  # a distillation run distils here too
    columns = [TextColumn("[bold]warm start"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
    t0 = time.perf_counter()
    if progress:
        print(f"warm start: {steps} steps of {big.batch_size} sequences on {dev.type} before "
              "any volunteer joins (`init --warm-start 0` skips it)", flush=True)
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("warm", total=steps, loss="-")
        st = loop.run(lambda s: get_batch(train, big.batch_size, big.seq_len, seed, s, masks), 0,
                      steps, on_step=lambda s, loss: bar.update(task, completed=s + 1,
                                                               loss=f"{loss:.3f}"))
    model.to("cpu")
    return {"steps": st.steps, "tokens": st.tokens, "batch_size": big.batch_size,
            "seconds": round(time.perf_counter() - t0, 3), "device": dev.type,
            "train_loss": st.mean_loss}
