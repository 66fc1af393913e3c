"""What the verification checks (crowdtrain/coordinator/verification.py) measure on real
training: honest contributions and each cheat of issue 21, over several trials, and the
difference between two honest replicas of one lease trained with 1 and 2 torch threads.

Setup: the tiny Llama preset on byte-level tokens of the bundled tinyshakespeare (vocab 256),
cut into `--shards` contiguous train shards + a held-out piece; the round's model is a warm
start of `--warm` steps; each lease trains H = `--steps` AdamW steps on one shard with the
run's batch seed, from the round's parameters with fresh AdamW state (the replicated-lease
start). Per trial, a round of one honest volunteer per shard plus the cheats:

  noise   Gaussian noise scaled to the honest delta's norm
  half    the lease's first H/2 steps, reported as H
  shard   H steps on another shard (not the control's: the worst case for the check)
  copy    another volunteer's delta + noise at `--copy-noise` x its norm
  replay  the same volunteer's delta of the previous round + noise

Printed: per contribution the loss check's gain and specificity and its verdict; the
similarity check's max cosine and verdict; the replicas' cosine and relative difference
(threads 1 vs 2, and half-steps vs full). Results: bench/results/verification.md.

    python bench/verification_tolerance.py --trials 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from crowdtrain.coordinator import verification as V  # noqa: E402
from crowdtrain.run.data import default_corpus, get_batch  # noqa: E402
from crowdtrain.run.model import (  # noqa: E402
    build_model,
    load_into,
    preset_config,
    state_dict_for_save,
)
from crowdtrain.run.train import InnerLoop, TrainConfig  # noqa: E402

TCFG = TrainConfig(batch_size=8, seq_len=64, lr=3e-3, warmup_steps=20, total_steps=2000)


def byte_shards(n: int, size: int) -> tuple[list[np.ndarray], np.ndarray]:
    raw = np.frombuffer(default_corpus().read_bytes(), dtype=np.uint8).astype(np.int64)
    return [raw[i * size:(i + 1) * size] for i in range(n)], raw[n * size:(n + 1) * size]


def train(cfg, theta, shards, seed, start, steps, threads=None, micro=None, bf16=False):
    """theta - (theta after `steps` fresh AdamW steps on `shards`): one lease's delta.
    `threads`: torch threads; `micro`: rows per forward/backward (gradient accumulation, as
    after an out-of-memory halving); `bf16`: bf16 autocast as on a GPU volunteer."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = build_model(cfg, 0)
        load_into(model, theta)
        loop = InnerLoop(model, TCFG, torch.device("cpu"), micro_batch=micro)
        if bf16:
            loop.autocast_dtype = torch.bfloat16
        loop.run(
            lambda s: get_batch(shards, TCFG.batch_size, TCFG.seq_len, seed, s), start, steps)
        return {k: theta[k] - v for k, v in state_dict_for_save(model).items()}
    finally:
        torch.set_num_threads(old)


def noisy(d, frac, gen):
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in d.items()}
    scale = frac * norm(d) / norm(noise)
    return {k: d[k] + scale * noise[k] for k in d}


def norm(d) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))


def trial(t: int, args, cfg, theta0, shards, val):
    gen = torch.Generator().manual_seed(t)
    vc = V.VerifyConfig(lease_batches=args.k, control_batches=args.k, min_batches=args.k)
    h, n = args.steps, len(shards)
    start = args.warm
    # round r - 1 (for the replay), then round r from its mean
    prev = [train(cfg, theta0, [shards[i]], 10_000 * t + i, start, h) for i in range(n)]
    theta = {k: theta0[k] - sum(d[k] for d in prev) / n for k in theta0}
    start += h
    seeds = [10_000 * t + 100 + i for i in range(n)]
    t0 = time.perf_counter()
    honest = [train(cfg, theta, [shards[i]], seeds[i], start, h) for i in range(n)]
    train_s = (time.perf_counter() - t0) / n
    other = (0 + 2) % n  # the shard the cheater trains on: neither the lease's nor control's
    cheats = {
        "noise": ({k: v * 0 for k, v in honest[0].items()}, None),
        "half": (train(cfg, theta, [shards[0]], seeds[0], start, h // 2), None),
        "shard": (train(cfg, theta, [shards[other]], seeds[0], start, h), None),
        "copy": (noisy(honest[1], args.copy_noise, gen), None),
        "replay": (noisy(prev[0], args.copy_noise, gen), None),
    }
    z = {k: torch.randn(v.shape, generator=gen) for k, v in honest[0].items()}
    s = norm(honest[0]) / norm(z)
    cheats["noise"] = ({k: v * s for k, v in z.items()}, None)

    model = build_model(cfg, 0)
    secret = 777 + t
    steps = V.check_steps(start, h, args.k, secret)
    lease_b = V.batches_at([shards[0]], TCFG.batch_size, TCFG.seq_len, seeds[0], steps)
    control_of = {i: (i + 1) % n for i in range(n)}

    def measure(delta, i, control="shard"):
        lb = lease_b if i == 0 else V.batches_at(
            [shards[i]], TCFG.batch_size, TCFG.seq_len, seeds[i],
            V.check_steps(start, h, args.k, secret + i))
        src = [shards[control_of[i]]] if control == "shard" else [val]
        cb = V.batches_at(src, TCFG.batch_size, TCFG.seq_len, seeds[i] + 1, steps)
        return V.measure_losses(model, theta, delta, lb, cb, rows=vc.eval_rows)

    out = {"honest": [], "cheats": {}, "replica": {}}
    t0 = time.perf_counter()
    hm = [measure(d, i) for i, d in enumerate(honest)]
    check_s = (time.perf_counter() - t0) / n
    hv = [measure(d, i, "val") for i, d in enumerate(honest)]
    cm = {name: measure(d, 0) for name, (d, _) in cheats.items()}
    cv = {name: measure(d, 0, "val") for name, (d, _) in cheats.items()}
    ref = V.round_reference(hm, vc)
    ref_v = V.round_reference(hv, vc)
    for i, (m, mv) in enumerate(zip(hm, hv, strict=True)):
        out["honest"].append({"vol": i, "gain": m.gain, "spec": m.specificity,
                              "gain_ratio": m.gain / ref.gain,
                              "spec_ratio": m.specificity / ref.specificity,
                              "ok": V.judge_loss(m, vc, ref).ok, "spec_val": mv.specificity,
                              "ok_val": V.judge_loss(mv, vc, ref_v).ok})
    sim = V.similarity([*honest, cheats["copy"][0], cheats["replay"][0]],
                       V.shapes_of(theta), prev, vc.block_elems)
    flags = V.similarity_flags(sim, vc)
    sim_h = V.similarity(honest, V.shapes_of(theta), prev, vc.block_elems)  # no cheat in it
    flags_h = V.similarity_flags(sim_h, vc)
    for i in range(n):
        out["honest"][i] |= {"max_cos": sim_h.max_cosine[i], "sim_ok": flags_h[i].ok}
    for name in cheats:
        m, mv = cm[name], cv[name]
        out["cheats"][name] = {"gain": m.gain, "spec": m.specificity,
                               "gain_ratio": m.gain / ref.gain,
                               "ok": V.judge_loss(m, vc, ref).ok, "spec_val": mv.specificity,
                               "ok_val": V.judge_loss(mv, vc, ref_v).ok}
    for name, idx in (("copy", n), ("replay", n + 1)):
        out["cheats"][name] |= {"max_cos": sim.max_cosine[idx], "sim_ok": flags[idx].ok,
                                "nearest": sim.nearest[idx]}
    out["median_round_cos"] = sim.median_round
    out["median_prev_cos"] = sim.median_previous
    # replicas: the same lease with 1 and 2 threads; same threads twice (determinism)
    r1 = train(cfg, theta, [shards[0]], seeds[0], start, h, threads=1)
    r2 = train(cfg, theta, [shards[0]], seeds[0], start, h, threads=2)
    rm = train(cfg, theta, [shards[0]], seeds[0], start, h, micro=TCFG.batch_size // 2)
    rm1 = train(cfg, theta, [shards[0]], seeds[0], start, h, micro=1)
    rb = train(cfg, theta, [shards[0]], seeds[0], start, h, bf16=True)
    pairs = {"threads 1 vs 2": (r1, r2), "micro 8 vs 4": (r1, rm), "micro 8 vs 1": (r1, rm1),
             "fp32 vs bf16": (r1, rb), "half vs full": (cheats["half"][0], r1),
             "half vs bf16": (cheats["half"][0], rb), "shard vs full": (cheats["shard"][0], r1)}
    if args.replica_preset and t == 0:  # a wider model, where thread counts change the arithmetic
        rcfg = preset_config(args.replica_preset, 256, 0)
        big = build_model(rcfg, t)
        InnerLoop(big, TCFG, torch.device("cpu")).run(
            lambda s: get_batch(shards, TCFG.batch_size, TCFG.seq_len, 7, s), 0, args.warm // 3)
        bt = {k: v.clone() for k, v in state_dict_for_save(big).items()}
        b1 = train(rcfg, bt, [shards[0]], seeds[0], start, h, threads=1)
        b2 = train(rcfg, bt, [shards[0]], seeds[0], start, h, threads=2)
        b1b = train(rcfg, bt, [shards[0]], seeds[0], start, h, threads=1)
        bh = train(rcfg, bt, [shards[0]], seeds[0], start, h // 2, threads=2)
        pairs |= {f"{args.replica_preset} 1 vs 2": (b1, b2),
                  f"{args.replica_preset} 1 vs 1": (b1, b1b),
                  f"{args.replica_preset} half": (bh, b1)}
    for name, (a, b) in pairs.items():
        v = V.compare_replicas(a, b, vc)
        out["replica"][name] = {"cosine": v.numbers["cosine"], "rel_diff": v.numbers["rel_diff"],
                                "ok": v.ok}
    out["check_seconds"] = check_s
    out["train_seconds"] = train_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-bytes", type=int, default=100_000)
    ap.add_argument("--warm", type=int, default=150)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--k", type=int, default=8, help="lease and control batches measured")
    ap.add_argument("--copy-noise", type=float, default=0.3)
    ap.add_argument("--replica-preset", default="small",
                    help="also replicate a lease of this preset's model ('' for none)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shards, val = byte_shards(args.shards, args.shard_bytes)
    cfg = preset_config("tiny", 256, 0)
    model = build_model(cfg, 0)
    InnerLoop(model, TCFG, torch.device("cpu")).run(
        lambda s: get_batch(shards, TCFG.batch_size, TCFG.seq_len, 7, s), 0, args.warm)
    theta0 = {k: v.clone() for k, v in state_dict_for_save(model).items()}
    results = []
    for t in range(args.trials):
        t0 = time.perf_counter()
        r = trial(t, args, cfg, theta0, shards, val)
        results.append(r)
        print(f"trial {t} ({time.perf_counter() - t0:.1f} s): median cos round "
              f"{r['median_round_cos']:.3f} previous {r['median_prev_cos']:.3f}; "
              f"loss check {r['check_seconds']:.3f} s a contribution, training "
              f"{r['train_seconds']:.3f} s a lease")
        for h in r["honest"]:
            print(f"  honest {h['vol']}  gain {h['gain']:+.4f} spec {h['spec']:+.4f} "
                  f"(val {h['spec_val']:+.4f}) loss {'ok' if h['ok'] else 'FAIL'}"
                  f"/{'ok' if h['ok_val'] else 'FAIL'}  max cos {h['max_cos']:.3f} "
                  f"{'ok' if h['sim_ok'] else 'FLAG'}")
        for name, c in r["cheats"].items():
            extra = (f"  max cos {c['max_cos']:.3f} {'ok' if c['sim_ok'] else 'FLAG'}"
                     if "max_cos" in c else "")
            print(f"  {name:7s}  gain {c['gain']:+.4f} spec {c['spec']:+.4f} "
                  f"(val {c['spec_val']:+.4f}) loss {'ok' if c['ok'] else 'FAIL'}"
                  f"/{'ok' if c['ok_val'] else 'FAIL'}{extra}")
        for name, c in r["replica"].items():
            print(f"  replica {name:15s} cos {c['cosine']:.6f} rel diff {c['rel_diff']:.2e} "
                  f"{'ok' if c['ok'] else 'FAIL'}")
    print("summary over", args.trials, "trials")
    hon = [h for r in results for h in r["honest"]]
    print(f"  honest loss-check false failures: shard control "
          f"{sum(not h['ok'] for h in hon)}/{len(hon)}, val control "
          f"{sum(not h['ok_val'] for h in hon)}/{len(hon)}; similarity flags "
          f"{sum(not h['sim_ok'] for h in hon)}/{len(hon)}")
    for name in results[0]["cheats"]:
        cs = [r["cheats"][name] for r in results]
        caught = sum(not c["ok"] for c in cs)
        caught_v = sum(not c["ok_val"] for c in cs)
        sim = sum(not c.get("sim_ok", True) for c in cs)
        print(f"  {name:7s} caught by loss check {caught}/{len(cs)} (val control {caught_v}), "
              f"by similarity {sim}/{len(cs)}")
    for name in results[0]["replica"]:
        cs = [r["replica"][name] for r in results if name in r["replica"]]
        print(f"  replica {name:15s} cos min {min(c['cosine'] for c in cs):.6f} rel diff max "
              f"{max(c['rel_diff'] for c in cs):.2e}, passes {sum(c['ok'] for c in cs)}/"
              f"{len(cs)}")
    print(f"  honest gain / round median: min {min(h['gain_ratio'] for h in hon):.3f}; "
          f"spec / median: min {min(h['spec_ratio'] for h in hon):.3f}; half-steps gain / "
          f"median: max {max(r['cheats']['half']['gain_ratio'] for r in results):.3f}")
    ratio = [r["check_seconds"] / r["train_seconds"] for r in results]
    print(f"  loss check / lease training time: median {statistics.median(ratio):.3f} "
          f"(formula {V.loss_check_cost(args.k, args.k, args.steps):.3f})")
    print(f"  honest specificity median {statistics.median(h['spec'] for h in hon):.4f}, "
          f"min {min(h['spec'] for h in hon):.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
