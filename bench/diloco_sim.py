"""DiLoCo in one process, for sweeping outer-optimizer settings quickly and exactly.

K simulated workers train in turn (each with its own persistent AdamW state, its own shard and
batch seed per round, as leases assign them), send int8 deltas with error feedback, and the
coordinator's own math merges them: token-weighted mean -> outer SGD -> int8 update with
coordinator-side error feedback -> `apply_update`. No HTTP, so a sweep costs only compute.

    python bench/diloco_sim.py RUN_DIR --workers 3 --inner-steps 30 --rounds 5 \
        --outer 0.7:0.9 --outer 1.0:0.0

RUN_DIR is any run made by `crowdtrain init` (its preset, data, schedule and round-0 weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from crowdtrain import compress
from crowdtrain.aggregate import OuterConfig, apply_update, outer_step, weighted_mean
from crowdtrain.data import get_batch, load_split
from crowdtrain.model import load_into, state_dict_for_save
from crowdtrain.rundir import Run
from crowdtrain.train import InnerLoop, evaluate


def simulate(run: Run, workers: int, inner_steps: int, rounds: int, outer: OuterConfig,
             codec: str = "int8") -> tuple[float, float]:
    """Held-out loss after `rounds` DiLoCo rounds, and wall seconds."""
    cfg = dataclasses.replace(run.config.train, total_steps=rounds * inner_steps,
                              warmup_steps=max(1, min(50, rounds * inner_steps // 10)))
    shards = load_split(run.data_dir, run.index, "train")
    global_model, ck = run.load_model(0)
    theta = {k: v.clone() for k, v in ck.tensors.items()}
    shapes = {k: tuple(v.shape) for k, v in theta.items()}
    loops = []
    for _ in range(workers):
        m, _ = run.load_model(0)
        loops.append(InnerLoop(m, cfg, torch.device("cpu")))
    worker_residual: list[dict | None] = [None] * workers
    residual = {k: torch.zeros_like(v) for k, v in theta.items()}
    momentum = None
    lease = 0
    t0 = time.perf_counter()
    for r in range(rounds):
        deltas, weights = [], []
        for w, loop in enumerate(loops):
            shard = [shards[lease % len(shards)]]
            seed = run.config.seed * 1_000_003 + lease
            lease += 1
            load_into(loop.model, theta)
            st = loop.run(lambda s, sh=shard, sd=seed: get_batch(sh, cfg.batch_size, cfg.seq_len,
                                                                 sd, s),
                          r * inner_steps, inner_steps)
            params = state_dict_for_save(loop.model)
            delta = {k: theta[k] - params[k] for k in theta}
            if worker_residual[w] is not None and codec != "fp32":
                delta = {k: delta[k] + worker_residual[w][k] for k in delta}
            sent, _ = compress.from_bytes(compress.to_bytes(delta, codec), shapes)
            worker_residual[w] = {k: delta[k] - sent[k] for k in delta}
            deltas.append(sent)
            weights.append(st.tokens)
        update, momentum = outer_step(theta, weighted_mean(deltas, weights), momentum, outer)
        target = {k: update[k] + residual[k] for k in update}
        applied, _ = compress.from_bytes(compress.to_bytes(target, "int8"), shapes)
        residual = {k: target[k] - applied[k] for k in target}
        theta = apply_update(theta, applied)
    load_into(global_model, theta)
    return evaluate(global_model, run.val_windows(), torch.device("cpu")), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--inner-steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--outer", action="append", default=[], metavar="LR:MOMENTUM",
                    help="outer SGD settings to compare (Nesterov when momentum > 0)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = Run(a.run_dir)
    for spec in a.outer or ["0.7:0.9"]:
        lr, mom = map(float, spec.split(":"))
        loss, secs = simulate(run, a.workers, a.inner_steps, a.rounds,
                              OuterConfig(lr=lr, momentum=mom, nesterov=mom > 0))
        print(f"K={a.workers} H={a.inner_steps} rounds={a.rounds} outer lr {lr} momentum "
              f"{mom}: held-out {loss:.4f} ({secs:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
