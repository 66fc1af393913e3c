"""DiLoCo in one process, exactly and quickly: the sweeps of bench/communication.py run here.

K simulated workers train in turn (each with its own persistent AdamW state, its own shard and
batch seed per lease, as the coordinator assigns them), send their deltas through the real
codec with worker-side error feedback, and the coordinator's own math merges them: token-
weighted mean -> outer SGD (crowdtrain.wire.outer) -> the update through the codec with
coordinator-side error feedback -> `apply_update`. No HTTP, so a sweep costs only compute.

A `Recipe` is one way of running the swarm: the inner steps of every round (fixed or growing
H), the outer optimizer and its learning-rate schedule, the codecs, and an optional warm start
(the run owner trains the first steps alone on the swarm's global batch before the volunteers
join; those steps come out of the same token budget and are reported separately). Codecs are
the wire's (int8, int4, fp16, fp32, sparse), measured against each other; the sparse codec's
density and bits go with its name: sparse/0.01/2 (see `codec_options`).

Rounds are stop-and-wait (every worker starts round r from theta_r) or, with `overlap_delay` f,
overlapped as the volunteers run them (crowdtrain.volunteer.overlap, its `Anchors` here): a
worker trains round r+1 on from its own parameters while round r closes, and folds theta_{r+1}
in after round(f x H) of its steps (f = 1: at the start of round r+2); the coordinator's side
is the same either way.

    python bench/diloco_sim.py RUN_DIR --workers 4 --steps 1500 --h 100 \
        --recipe plain:0.7:0.9 --recipe plain:1.0:0.0

RUN_DIR is any run made by `crowdtrain init` (its preset, data, schedule and round-0 weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crowdtrain.run.data import get_batch, load_split  # noqa: E402
from crowdtrain.run.folder import Run  # noqa: E402
from crowdtrain.run.model import load_into, state_dict_for_save  # noqa: E402
from crowdtrain.run.schedule import inner_steps_schedule  # noqa: E402
from crowdtrain.run.train import InnerLoop, TrainConfig, evaluate  # noqa: E402
from crowdtrain.volunteer.overlap import Anchors  # noqa: E402
from crowdtrain.wire import codecs, sparse  # noqa: E402
from crowdtrain.wire.outer import OuterConfig, apply_update, outer_step, weighted_mean  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the swarm runs: `h` inner steps per round (its length is the number of rounds),
    outer SGD (learning rate, momentum, Nesterov), `up`/`down` codecs (specs of
    `codec_options`), and `warm` steps the owner trains alone on K x the batch first."""

    name: str
    h: tuple[int, ...]
    outer_lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    up: str = "int8"
    down: str = "int8"
    warm: int = 0
    ef_decay: float = 1.0  # the workers' error-feedback decay (sparse uploads; 1: plain EF)
    # None: stop-and-wait (every round starts from theta_r); a fraction f in [0, 1]: overlapped
    # rounds (crowdtrain.volunteer.overlap), round r's update reaches every worker after
    # round(f * H) of round r+1's steps (f = 1: after the last, so folded at round r+2's start)
    overlap_delay: float | None = None
    # how an overlapped worker starts a round: "fold", the workers' rule (from its own
    # parameters); "eager", a variant measured here only (Kale et al. 2025, eager updates): from
    # its own estimate of theta_r, the outer step of theta_{r-1} on round r-2's mean with its
    # own contribution of round r-1 in place of its round r-2 one; folded in the same way
    overlap_rule: str = "fold"

    @property
    def steps(self) -> int:
        return self.warm + sum(self.h)


@dataclasses.dataclass
class Result:
    recipe: str
    loss: float
    sent: int          # bytes one worker sent (its payloads)
    received: int      # bytes one worker received (the updates)
    rounds: int
    owner_tokens: int  # tokens of the owner's warm start (0 without)
    worker_tokens: int  # tokens one worker trained
    seconds: float


def schedule(train: TrainConfig, steps: int) -> TrainConfig:
    """The run's inner settings over exactly `steps` steps."""
    return dataclasses.replace(train, total_steps=steps,
                               warmup_steps=max(1, min(50, steps // 10)))


def codec_options(spec: str) -> tuple[str, dict]:
    """(codec, to_bytes options) of a codec spec: a wire codec's name, or for the sparse codec
    `sparse[/DENSITY[/BITS]]` (e.g. sparse/0.03/2: 3% of each chunk of 4096 at 2 bits; the
    codec's defaults where left out)."""
    name, *opts = spec.split("/")
    if name not in codecs.CODECS or (opts and name != "sparse") or len(opts) > 2:
        raise ValueError(f"unknown codec spec {spec!r}: one of {', '.join(codecs.CODECS)}, or "
                         "sparse/DENSITY/BITS")
    if name != "sparse":
        return name, {}
    block = codecs.default_block("sparse")
    density = float(opts[0]) if opts else codecs.SPARSE_DENSITY
    bits = int(opts[1]) if len(opts) > 1 else codecs.SPARSE_BITS
    return name, {"block": block, "k": sparse.chunk_k(block, density), "bits": bits}


def transmit(tensors: dict[str, torch.Tensor], codec: str,
             shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], int]:
    """(what the receiver decodes, bytes on the wire) through the real codec (`codec`: a spec
    of `codec_options`)."""
    name, opts = codec_options(codec)
    blob = codecs.to_bytes(tensors, name, **opts)
    return codecs.from_bytes(blob, shapes)[0], len(blob)


def simulate(run: Run, workers: int, recipe: Recipe) -> Result:
    """Held-out loss and bytes per worker of `recipe` with `workers` workers."""
    t0 = time.perf_counter()
    cfg = schedule(run.config.train, recipe.steps)
    shards = load_split(run.data_dir, run.index, "train")
    global_model, ck = run.load_model(0)
    theta = {k: v.clone() for k, v in ck.tensors.items()}
    shapes = {k: tuple(v.shape) for k, v in theta.items()}
    owner_tokens = 0
    if recipe.warm:
        big = dataclasses.replace(cfg, batch_size=cfg.batch_size * workers)
        owner = InnerLoop(global_model, big, torch.device("cpu"))
        st = owner.run(lambda s: get_batch(shards, big.batch_size, big.seq_len,
                                           run.config.seed * 7 + 1, s), 0, recipe.warm)
        owner_tokens = st.tokens
        theta = {k: v.detach().clone() for k, v in state_dict_for_save(global_model).items()}
    loops = [InnerLoop(run.load_model(0)[0], cfg, torch.device("cpu")) for _ in range(workers)]
    worker_residual: list[dict | None] = [None] * workers
    residual = {k: torch.zeros_like(v) for k, v in theta.items()}
    momentum = None
    lease = sent = received = worker_tokens = 0
    step0 = recipe.warm
    outer = OuterConfig(lr=recipe.outer_lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    overlap = recipe.overlap_delay
    if overlap is not None and not 0 <= overlap <= 1:
        raise ValueError(f"overlap_delay {overlap} is not a fraction in [0, 1]")
    if recipe.overlap_rule not in ("fold", "eager"):
        raise ValueError(f"unknown overlap_rule {recipe.overlap_rule!r}: fold or eager")
    # eager: (theta, momentum before the close, contributions, weights) of the last two rounds
    closes: dict[int, tuple[dict, dict | None, list, list]] = {}
    anchors: list[Anchors | None] = [None] * workers
    thetas = {0: theta}  # theta of each round still to be folded in (overlapped)
    for rnd, h in enumerate(recipe.h):
        deltas, weights = [], []
        for w, loop in enumerate(loops):
            shard = [shards[lease % len(shards)]]
            seed = run.config.seed * 1_000_003 + lease
            lease += 1
            fold = None
            if overlap is None:
                load_into(loop.model, theta)
            elif rnd == 0:  # round 0 starts from theta_0, as stop-and-wait
                load_into(loop.model, theta)
                anchors[w] = Anchors(theta, 0, local=False)
            elif recipe.overlap_rule == "eager" and rnd >= 2:  # from its estimate of theta_rnd
                th, mom, _, _ = closes[rnd - 1]
                _, _, old, old_w = closes[rnd - 2]
                own = [d for i, d in enumerate(old) if i != w] + [closes[rnd - 1][2][w]]
                own_w = [x for i, x in enumerate(old_w) if i != w] + [closes[rnd - 1][3][w]]
                guess = apply_update(th, outer_step(th, weighted_mean(own, own_w), mom, outer)[0])
                load_into(loop.model, guess)
                anchors[w] = Anchors(guess, rnd, local=True)  # theta_{rnd-1} is in it
            else:  # ahead: from the worker's own parameters, theta_rnd folded in when it comes
                before = anchors[w]
                anchors[w] = Anchors({k: v.clone() for k, v in
                                      state_dict_for_save(loop.model).items()}, rnd, local=True,
                                     unfolded=before.unfolded if before else None)
            if overlap is not None and rnd >= 1:
                arrives = round(overlap * h)  # theta_rnd comes after this many of its steps

                def fold(done: int, w: int = w, rnd: int = rnd, arrives: int = arrives,
                         thetas: dict = thetas) -> None:
                    here = rnd if done >= arrives else rnd - 1  # the latest theta published
                    ready = [r for r in anchors[w].unfolded if r <= here]
                    if ready:  # the latest, as the worker (it holds every earlier round's work)
                        anchors[w].fold(loops[w].model, thetas[max(ready)], max(ready))
            st = loop.run(lambda s, sh=shard, sd=seed: get_batch(sh, cfg.batch_size, cfg.seq_len,
                                                                 sd, s), step0, h,
                          between_steps=fold)
            if w == 0:
                worker_tokens += st.tokens
            params = state_dict_for_save(loop.model)
            if overlap is None:
                delta = {k: theta[k] - params[k] for k in theta}
            else:  # the lease's progress, against theta_rnd once folded, else its own start
                delta = anchors[w].delta(params)
            if recipe.up != "fp32":
                decay = recipe.ef_decay if recipe.up.startswith("sparse") else 1.0
                delta = codecs.accumulate(delta, worker_residual[w], decay)
            got, nbytes = transmit(delta, recipe.up, shapes)
            sent += nbytes
            worker_residual[w] = {k: delta[k] - got[k] for k in delta}
            deltas.append(got)
            weights.append(st.tokens)
        step0 += h
        if recipe.overlap_rule == "eager":
            closes = {r: c for r, c in closes.items() if r >= rnd - 1}
            closes[rnd] = (theta, momentum, deltas, weights)
        update, momentum = outer_step(theta, weighted_mean(deltas, weights), momentum, outer)
        target = {k: update[k] + residual[k] for k in update}
        applied, nbytes = transmit(target, recipe.down, shapes)
        received += nbytes
        residual = {k: target[k] - applied[k] for k in target}
        theta = apply_update(theta, applied)
        if overlap is not None:  # keep the thetas some worker may still fold in
            thetas[rnd + 1] = theta
            keep = min([min(a.unfolded, default=rnd + 1) for a in anchors if a] + [rnd + 1])
            thetas = {r: t for r, t in thetas.items() if r >= keep}
    load_into(global_model, theta)
    loss = evaluate(global_model, run.val_windows(), torch.device("cpu"))
    return Result(recipe.name, loss, sent // workers, received, len(recipe.h), owner_tokens,
                  worker_tokens, time.perf_counter() - t0)


def parse_recipe(spec: str, steps: int, h: int) -> Recipe:
    """NAME:LR:MOMENTUM[:GROWTH[:WARM[:CODEC[:DOWN[:DECAY]]]]] -> a Recipe over `steps` steps at
    mean H `h` (GROWTH = last H / first H of a geometric schedule; WARM = owner steps; CODEC the
    uploads' and, unless DOWN names another (empty: the same), the updates' codec: specs of
    `codec_options`; DECAY the workers' error-feedback decay with sparse uploads, default 1)."""
    f = spec.split(":")
    lr, mom = float(f[1]), float(f[2])
    growth = float(f[3]) if len(f) > 3 else 1.0
    warm = int(f[4]) if len(f) > 4 else 0
    codec = f[5] if len(f) > 5 else "int8"
    down = f[6] if len(f) > 6 and f[6] else codec
    decay = float(f[7]) if len(f) > 7 else 1.0
    codec_options(codec), codec_options(down)  # a bad spec fails before any training
    rounds = max(1, round((steps - warm) / h))
    hs = tuple(inner_steps_schedule(steps - warm, rounds, growth))
    return Recipe(f[0], hs, outer_lr=lr, momentum=mom, nesterov=mom > 0, warm=warm,
                  up=codec, down=down, ef_decay=decay)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--h", type=int, default=100, help="mean inner steps per round")
    ap.add_argument("--recipe", action="append", default=[],
                    metavar="NAME:LR:MOMENTUM[:GROWTH[:WARM[:CODEC[:DOWN[:DECAY]]]]]")
    ap.add_argument("--overlap", type=float, default=None, metavar="F",
                    help="overlapped rounds, each round's update folded in after F x H of the "
                         "next round's steps (default: stop-and-wait)")
    ap.add_argument("--overlap-rule", choices=["fold", "eager"], default="fold",
                    help="with --overlap: the workers' fold (default) or the eager variant")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = Run(a.run_dir)
    for spec in a.recipe or ["plain:0.7:0.9"]:
        rec = dataclasses.replace(parse_recipe(spec, a.steps, a.h), overlap_delay=a.overlap,
                                  overlap_rule=a.overlap_rule)
        res = simulate(run, a.workers, rec)
        print(f"{spec} K={a.workers} H={list(rec.h)}: held-out {res.loss:.4f}, sent "
              f"{res.sent / 1e6:.2f} MB/worker, received {res.received / 1e6:.2f} MB "
              f"({res.seconds:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
