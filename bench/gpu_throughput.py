"""A swarm worker's training throughput on a GPU against a plain transformers training loop on
the same model, batches and optimizer settings (bf16 autocast, AdamW), measured in one run.

    python bench/gpu_throughput.py --work /tmp/gt [--preset base] [--steps 60]

1. `init` a run of the preset on the bundled corpus (no warm start).
2. The plain loop: `AutoModelForCausalLM.from_config` of the run's model config on the GPU,
   `torch.optim.AdamW(fused=True)`, bf16 autocast, the run's batch and sequence length and the
   same batches (`data.get_batch`), gradient clipping; tokens per second over --steps steps
   after 5 warm-up steps.
3. The swarm: a real coordinator and one real `crowdtrain join --device cuda` worker process
   on loopback, 3 rounds of --steps inner steps; the worker's own tokens per second while
   training (its log) and over each round's wall time (the coordinator's round open/close).
Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from crowdtrain.cli.processes import LocalSwarm  # noqa: E402
from crowdtrain.run.data import default_corpus, get_batch, load_split  # noqa: E402
from crowdtrain.run.folder import Run, SwarmConfig, init_run  # noqa: E402


def plain_loop(run: Run, steps: int, device: str, warmup: int = 5) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = run.config.train
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    model = AutoModelForCausalLM.from_config(run.model_config()).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=cuda)
    shards = load_split(run.data_dir, run.index, "train")

    def step(i: int) -> None:
        x, y = get_batch(shards, cfg.batch_size, cfg.seq_len, 0, i)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync()
    secs = time.perf_counter() - t0
    tokens = steps * cfg.batch_size * cfg.seq_len
    return {"steps": steps, "seconds": secs, "tokens_per_s": tokens / secs,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def swarm(run: Run, work: Path, rounds: int, device: str) -> dict:
    with LocalSwarm(run.dir, work / "logs") as s:
        s.serve()
        s.join("gpu", "--device", device, "--max-rounds", rounds, threads=4)
        rc = s.wait("gpu", timeout=1800)
        log = s.log("gpu")
        st = s.status()
    if rc != 0:
        raise SystemExit(f"worker failed ({rc}): {log[-3000:]}")
    rates = [float(x) for x in re.findall(r"round \d+: \d+ steps, loss [\d.]+, (\d+) tok/s", log)]
    per_round = []
    for r in st.rounds:
        if r.state == "closed" and r.closed_at and r.contributions:
            per_round.append({"round": r.round, "tokens": r.tokens,
                              "wall_s": r.closed_at - r.opened_at,
                              "wall_tokens_per_s": r.tokens / (r.closed_at - r.opened_at)})
    return {"training_tokens_per_s": rates, "rounds": per_round}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=60, help="inner steps per round / timed steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda (the figure) or cpu (a smoke run)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    t0 = time.perf_counter()
    run = init_run(a.work / "run", [default_corpus()], preset=a.preset, progress=False,
                   force=True, swarm=SwarmConfig(warm_start=0.0, rounds=a.rounds,
                                                 inner_steps=a.steps, round_seconds=3600))
    print(f"init {a.preset}: {time.perf_counter() - t0:.0f} s; batch "
          f"{run.config.train.batch_size} x {run.config.train.seq_len}; "
          f"{name}", flush=True)
    plain = plain_loop(run, a.steps, a.device)
    print(f"plain transformers loop: {plain['tokens_per_s']:,.0f} tok/s "
          f"(peak {plain['peak_gib']} GiB)", flush=True)
    if a.device == "cuda":
        torch.cuda.empty_cache()
    sw = swarm(run, a.work, a.rounds, a.device)
    print(f"swarm worker while training: {sw['training_tokens_per_s']} tok/s", flush=True)
    for r in sw["rounds"]:
        print(f"  round {r['round']}: {r['tokens']:,} tokens in {r['wall_s']:.1f} s wall = "
              f"{r['wall_tokens_per_s']:,.0f} tok/s", flush=True)
    steady = sw["training_tokens_per_s"][-1] if sw["training_tokens_per_s"] else 0.0
    print(f"ratio worker/plain (last round, training): {steady / plain['tokens_per_s']:.3f}")
    if a.json:
        a.json.write_text(json.dumps({"device": name,
                                      "preset": a.preset, "plain": plain, "swarm": sw},
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
