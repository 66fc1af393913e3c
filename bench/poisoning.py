"""Poisoning benchmark: how each aggregation method of coordinator.aggregation holds up when one of
K volunteers is malicious; picks `RobustConfig.method`'s default.

DiLoCo in one process (as bench/diloco_sim.py: persistent AdamW per worker, int8 deltas with
worker-side error feedback, outer SGD, int8 update with coordinator-side error feedback,
`apply_update`), except that each round's contributions are written to disk as int8 payload
files and merged by `aggregation.robust_aggregate` over `SafetensorsQuantSource`s, the coordinator's
path. K-1 honest workers; worker K is the attacker:

- none: no attacker at all (the K-1 honest workers only); none + mean is the reference.
- scaled_x100: trains honestly, sends 100 x its delta.
- noise: Gaussian noise with the global L2 norm of its honest delta.
- sign_flip: sends -delta.
- alie: "A Little Is Enough" (Baruch et al. 2019): mean - z * std of the round's honest deltas,
  coordinate-wise (z = 1 by default); it does not train.
- liar: trains honestly but reports 100x its tokens; the coordinator caps a contribution's
  weight at its lease's max tokens, simulated as weight = min(reported, max).

Honest workers see the same shards and batch seeds in every scenario, so differences come from
the aggregation only. Prints held-out loss and its ratio to the honest-only mean run per
(attack, method), each method's worst ratio, and the cheapest method within 3% of honest-only
(the full run's pick is RobustConfig's default; --quick only checks that everything runs).

    python bench/poisoning.py [RUN_DIR] --rounds 10 --inner-steps 30
    python bench/poisoning.py --quick        # ~1-2 minutes: 3 rounds of 5 steps, a smoke test

Without RUN_DIR a `tiny` run is made from the bundled corpus in a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

# run from anywhere: prefer this checkout's crowdtrain over any installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crowdtrain.coordinator.aggregation import METHODS, RobustConfig, robust_aggregate  # noqa: E402
from crowdtrain.coordinator.payloads import SafetensorsQuantSource  # noqa: E402
from crowdtrain.run.data import default_corpus, get_batch, load_split  # noqa: E402
from crowdtrain.run.folder import Run, SwarmConfig, init_run  # noqa: E402
from crowdtrain.run.model import load_into, state_dict_for_save  # noqa: E402
from crowdtrain.run.train import InnerLoop, evaluate  # noqa: E402
from crowdtrain.wire import codecs  # noqa: E402
from crowdtrain.wire.outer import OuterConfig, apply_update, outer_step  # noqa: E402

ATTACKS = ("none", "scaled_x100", "noise", "sign_flip", "alie", "liar")
TOLERANCE = 0.03


@dataclasses.dataclass
class Result:
    loss: float
    seconds: float
    attacker_refused: int = 0
    attacker_clipped: int = 0
    honest_screened: int = 0


def _attack(kind: str, own: dict[str, torch.Tensor] | None, honest: list[dict],
            z: float, seed: int) -> dict[str, torch.Tensor]:
    """The malicious worker's delta for this round."""
    if kind == "scaled_x100":
        return {k: v * 100.0 for k, v in own.items()}
    if kind == "sign_flip":
        return {k: -v for k, v in own.items()}
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(own[k].shape, generator=g) for k in sorted(own)}  # fixed order
        target = math.sqrt(sum(float(v.double().pow(2).sum()) for v in own.values()))
        have = math.sqrt(sum(float(v.double().pow(2).sum()) for v in noise.values()))
        return {k: v * (target / have) for k, v in noise.items()}
    if kind == "alie":
        out = {}
        for k in honest[0]:
            x = torch.stack([d[k] for d in honest])
            out[k] = x.mean(0) - z * x.std(0)
        return out
    if kind == "liar":
        return own
    raise ValueError(f"unknown attack {kind!r}")


def simulate(run: Run, attack: str, method: str, workers: int, inner_steps: int, rounds: int,
             outer: OuterConfig, work: Path, z: float = 1.0,
             robust: RobustConfig | None = None, eval_tokens: int | None = None) -> Result:
    """Held-out loss after `rounds` rounds with `workers - 1` honest workers and one
    attacker (none for attack "none"), aggregated by `method` (other settings from
    `robust`, default RobustConfig()), on the first `eval_tokens` validation tokens (default:
    the run's eval_tokens)."""
    rcfg = dataclasses.replace(robust or RobustConfig(), method=method)
    cfg = dataclasses.replace(run.config.train, total_steps=rounds * inner_steps,
                              warmup_steps=max(1, min(50, rounds * inner_steps // 10)))
    max_tokens = inner_steps * cfg.batch_size * cfg.seq_len
    shards = load_split(run.data_dir, run.index, "train")
    global_model, ck = run.load_model(0)
    theta = {k: v.clone() for k, v in ck.tensors.items()}
    shapes = {k: tuple(v.shape) for k, v in theta.items()}
    trains_attacker = attack not in ("none", "alie")
    n_train = workers if trains_attacker else workers - 1
    loops = []
    for _ in range(n_train):
        m, _ = run.load_model(0)
        loops.append(InnerLoop(m, cfg, torch.device("cpu")))
    worker_residual: list[dict | None] = [None] * n_train
    residual = {k: torch.zeros_like(v) for k, v in theta.items()}
    momentum = None
    res = Result(0.0, 0.0)
    t0 = time.perf_counter()
    for r in range(rounds):
        sent_all, weights, raw = [], [], []
        for w, loop in enumerate(loops):
            lease = r * workers + w  # the same data for worker w in every scenario
            shard = [shards[lease % len(shards)]]
            seed = run.config.seed * 1_000_003 + lease
            load_into(loop.model, theta)
            st = loop.run(lambda s, sh=shard, sd=seed: get_batch(sh, cfg.batch_size, cfg.seq_len,
                                                                 sd, s),
                          r * inner_steps, inner_steps)
            params = state_dict_for_save(loop.model)
            delta = {k: theta[k] - params[k] for k in theta}
            raw.append(delta)
            if w < workers - 1:  # honest: error feedback as a real worker does
                if worker_residual[w] is not None:
                    delta = {k: delta[k] + worker_residual[w][k] for k in delta}
                sent, _ = codecs.from_bytes(codecs.to_bytes(delta, "int8"), shapes)
                worker_residual[w] = {k: delta[k] - sent[k] for k in delta}
                sent_all.append(sent)
                weights.append(min(st.tokens, max_tokens))
        if attack != "none":
            own = raw[workers - 1] if trains_attacker else None
            bad = _attack(attack, own, sent_all, z, seed=1000 + r)
            sent_all.append(bad)
            reported = 100 * max_tokens if attack == "liar" else max_tokens
            weights.append(min(reported, max_tokens))
        rdir = work / f"{attack}-{method}" / f"r{r:03d}"
        rdir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, d in enumerate(sent_all):
            p = rdir / f"c{i}.safetensors"
            p.write_bytes(codecs.to_bytes(d, "int8"))
            paths.append(p)
        sources = [SafetensorsQuantSource(p, shapes) for p in paths]
        try:
            agg, screening = robust_aggregate(sources, weights, shapes, rcfg)
        finally:
            for s in sources:
                s.close()
        for p in paths:
            p.unlink()
        if attack != "none":
            mult, _ = screening[-1]
            res.attacker_refused += mult == 0.0
            res.attacker_clipped += 0.0 < mult < 1.0
            res.honest_screened += sum(m != 1.0 for m, _ in screening[:-1])
        else:
            res.honest_screened += sum(m != 1.0 for m, _ in screening)
        update, momentum = outer_step(theta, agg, momentum, outer)
        target = {k: update[k] + residual[k] for k in update}
        applied, _ = codecs.from_bytes(codecs.to_bytes(target, "int8"), shapes)
        residual = {k: target[k] - applied[k] for k in target}
        theta = apply_update(theta, applied)
    load_into(global_model, theta)
    windows = run.val_windows()
    if eval_tokens is not None:
        windows = itertools.islice(windows, max(1, eval_tokens // cfg.seq_len))
    loss = evaluate(global_model, windows, torch.device("cpu"))
    res.loss = loss if math.isfinite(loss) else float("inf")
    res.seconds = time.perf_counter() - t0
    return res


def pick_default(ratios: dict[str, dict[str, float]], methods: list[str]) -> tuple[str, bool]:
    """The cheapest method (METHODS order) whose worst ratio is within TOLERANCE, and True;
    else the method with the smallest worst ratio, and False."""
    worst = {m: max(ratios[a][m] for a in ratios) for m in methods}
    for m in METHODS:
        if m in worst and worst[m] <= 1 + TOLERANCE:
            return m, True
    return min(worst, key=worst.get), False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", help="a run made by `crowdtrain init` "
                    "(default: a new tiny run in a temporary folder)")
    ap.add_argument("--workers", type=int, default=4, help="K, the attacker included")
    ap.add_argument("--inner-steps", type=int, default=None, help="H (default 30; quick 5)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 10; quick 3)")
    ap.add_argument("--outer", default="1.0:0.0", metavar="LR:MOMENTUM")
    ap.add_argument("--z", type=float, default=1.0, help="ALIE's z")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="held-out tokens evaluated (default: the run's; quick 8192)")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds of 5 steps, 8192 held-out tokens (~1-2 minutes)")
    a = ap.parse_args()
    if a.workers < 3:
        ap.error("--workers must be >= 3 (2 honest + the attacker)")
    inner = a.inner_steps or (5 if a.quick else 30)
    rounds = a.rounds or (3 if a.quick else 10)
    eval_tokens = a.eval_tokens or (8192 if a.quick else None)
    methods = [m for m in a.methods.split(",") if m]
    attacks = [x for x in a.attacks.split(",") if x]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}")
    for x in attacks:
        if x not in ATTACKS:
            ap.error(f"unknown attack {x!r}")
    if "none" not in attacks:
        attacks.insert(0, "none")
    if "mean" not in methods:
        methods.insert(0, "mean")
    lr, mom = map(float, a.outer.split(":"))
    outer = OuterConfig(lr=lr, momentum=mom, nesterov=mom > 0)
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory(prefix="poisoning-") as tmp:
        tmp = Path(tmp)
        if a.run_dir:
            run = Run(a.run_dir)
        else:
            run = init_run(tmp / "run", [default_corpus()], preset="tiny", progress=False,
                           swarm=SwarmConfig(warm_start=0.0))
        print(f"preset {run.config.preset}, K={a.workers} (1 attacker), H={inner}, "
              f"rounds={rounds}, outer lr {lr} momentum {mom}, ALIE z={a.z}, held-out tokens "
              f"{eval_tokens or run.config.eval_tokens}", flush=True)
        results: dict[str, dict[str, Result]] = {}
        t0 = time.perf_counter()
        for attack in attacks:
            for method in methods:
                r = simulate(run, attack, method, a.workers, inner, rounds, outer, tmp / "w",
                             a.z, eval_tokens=eval_tokens)
                results.setdefault(attack, {})[method] = r
                print(f"  {attack:12s} {method:14s} held-out {r.loss:.4f}  attacker refused "
                      f"{r.attacker_refused}/{rounds} clipped {r.attacker_clipped}/{rounds}, "
                      f"honest screened {r.honest_screened} ({r.seconds:.0f}s)", flush=True)
    ref = results["none"]["mean"].loss
    ratios = {x: {m: results[x][m].loss / ref for m in methods} for x in attacks}
    head = "| attack | " + " | ".join(methods) + " |"
    print(f"\nheld-out loss (ratio to honest-only mean, {a.workers - 1} honest workers: "
          f"{ref:.4f})\n")
    print(head)
    print("|" + "---|" * (len(methods) + 1))
    for x in attacks:
        cells = [f"{results[x][m].loss:.4f} ({ratios[x][m]:.3f})" for m in methods]
        print(f"| {x} | " + " | ".join(cells) + " |")
    worst = {m: max(ratios[x][m] for x in attacks) for m in methods}
    print("| **worst ratio** | " + " | ".join(f"**{worst[m]:.3f}**" for m in methods) + " |")
    best, ok = pick_default(ratios, methods)
    if ok:
        why = f"the cheapest method whose worst case is within {TOLERANCE:.0%} of honest-only"
    else:
        why = (f"no method is within {TOLERANCE:.0%} of honest-only in the worst case; this "
               "one has the smallest worst case")
    if a.quick:
        why += "; --quick is a smoke test, RobustConfig's default comes from the full run"
    print(f"\npick: {best} ({why})")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
