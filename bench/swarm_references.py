"""Reference points for a swarm result, measured on the same machine and run: the ceiling
(plain loop at equal tokens: the data-parallel equivalent, global batch = workers x batch) and
the floor (one worker alone: same steps and batch as one swarm worker).

    python bench/swarm_references.py RUN_DIR --workers 3 --steps 150 [--round N]

RUN_DIR is a run a swarm trained (e.g. `crowdtrain demo --out DIR` leaves DIR/run); both
references start from its round-0 checkpoint and use its schedule and held-out split, and the
swarm's own figure is read from its checkpoint of round N (default: latest).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from crowdtrain.run.data import get_batch, load_split
from crowdtrain.run.folder import Run
from crowdtrain.run.train import InnerLoop, evaluate


def plain_loop(run: Run, batch_size: int, steps: int) -> tuple[float, float]:
    cfg = dataclasses.replace(run.config.train, batch_size=batch_size, total_steps=steps)
    model, _ = run.load_model(0)
    train = load_split(run.data_dir, run.index, "train")
    loop = InnerLoop(model, cfg, torch.device("cpu"))
    t = time.perf_counter()
    loop.run(lambda s: get_batch(train, cfg.batch_size, cfg.seq_len, cfg.seed, s), 0, steps)
    return evaluate(model, run.val_windows(), torch.device("cpu")), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--steps", type=int, required=True, help="inner steps of one swarm worker")
    ap.add_argument("--round", type=int, help="swarm checkpoint to score (default: latest)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = Run(a.run_dir)
    b = run.config.train.batch_size
    swarm_model, ck = run.load_model(a.round)
    swarm = evaluate(swarm_model, run.val_windows(), torch.device("cpu"))
    init = float(run.load_model(0)[1].meta["val_loss"])
    floor, tf = plain_loop(run, b, a.steps)
    ceiling, tc = plain_loop(run, b * a.workers, a.steps)
    print(f"initial model                          held-out {init:.4f}")
    print(f"floor   (1 worker, batch {b}, {a.steps} steps)      held-out {floor:.4f} ({tf:.0f}s)")
    print(f"swarm   ({a.workers} workers, round {ck.round})              held-out {swarm:.4f}")
    print(f"ceiling (plain loop, batch {b * a.workers}, {a.steps} steps)  held-out {ceiling:.4f}"
          f" ({tc:.0f}s)")
    gap = (swarm - ceiling) / (floor - ceiling) if floor != ceiling else float("nan")
    print(f"swarm beats the floor by {floor - swarm:.4f} nats; gap to the ceiling "
          f"{swarm - ceiling:.4f} nats ({gap:.0%} of the floor-ceiling range)")


if __name__ == "__main__":
    main()
