"""Scaling with model size: how the coordinator's aggregation time and a volunteer's round time
grow from 1M to 100M parameters, and whether the cost per parameter stays flat.

Per model size (Llama shapes of bench/benchlib.py SHAPES; batch 8 x 64 tokens throughout):

- coordinator: the real `Coordinator` in this process (one torch thread, no evaluation
  thread) takes K contributions (real int8 payloads through `submit`: validation, file,
  ledger) and closes the round (`close_round`: robust aggregation block by block from the
  files, outer step, int8 update with error feedback, atomic checkpoint). Reported: submit
  time per contribution and close time, and both per parameter (ns).
- worker: the real `crowdtrain join` worker (crowdtrain.volunteer.worker.Worker, one torch thread)
  against a coordinator process on loopback, 2 rounds of H inner steps (H shrinks with size:
  the 100M point uses 2); round 2 (steady state) is reported: its wall time, the training
  part per step and per parameter-token, and everything else (update download and replay,
  compression, upload, waiting for the close, local saves) per parameter.

Target: the cost per parameter stays flat from 1M to 100M (within a factor of ~2; small
models pay fixed per-request and per-tensor costs, large ones memory bandwidth).

    python bench/scaling.py                    # full: 1M, 3M, 10M, 30M, 100M (~10 min)
    python bench/scaling.py --quick            # 1M and 3M, K=2; worker: 1M, H=2 (~40 s)
    python bench/scaling.py --sizes 10M,100M --contributions 8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import (  # noqa: E402
    Payloads,
    base_run,
    header,
    load,
    make_run,
    median,
    params_of,
    run_instrumented_worker,
    serve,
)

from crowdtrain.cli.processes import LocalSwarm  # noqa: E402
from crowdtrain.coordinator.rules import Coordinator, Volunteer  # noqa: E402
from crowdtrain.run.folder import Run  # noqa: E402
from crowdtrain.wire import protocol  # noqa: E402

STEPS = {"1M": 10, "3M": 8, "10M": 5, "30M": 3, "100M": 2}
FULL_SIZES = ("1M", "3M", "10M", "30M", "100M")


@dataclasses.dataclass
class Point:
    size: str
    params: int
    submit_s: float = 0.0
    close_s: float = 0.0
    h: int = 0
    round_s: float = 0.0
    train_s: float = 0.0
    tokens: int = 0
    overhead_s: float = 0.0
    parts: dict = dataclasses.field(default_factory=dict)


def coordinator_side(template: Run, work: Path, k: int, pt: Point) -> None:
    run = make_run(template, work / f"coord-{pt.size}", swarm={
        "rounds": 10, "inner_steps": 10, "round_seconds": 3600.0, "min_contributions": k,
        "verify": False})  # random deltas
    coord = Coordinator(run, evaluate_rounds=False)
    try:
        payloads = Payloads(coord.shapes, variants=min(k, 4))
        tcfg = run.config.train
        times = []
        for i in range(k):
            resp = coord.join(protocol.JoinRequest(name=f"v{i}", device="cpu",
                                                   api_version=protocol.API_VERSION))
            vol = Volunteer(resp.volunteer_id, resp.name)
            lease = coord.lease(vol, protocol.LeaseRequest()).lease
            stats = protocol.SubmitStats(lease_id=lease.lease_id, round=lease.round,
                                         steps=lease.max_steps, mean_loss=5.0, seconds=1.0,
                                         tokens=lease.max_steps * tcfg.batch_size * tcfg.seq_len)
            blob = payloads.make(i, stats)
            t0 = time.perf_counter()
            coord.submit(vol, lease.lease_id, blob)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        coord.close_round()
        pt.close_s = time.perf_counter() - t0
        pt.submit_s = median(times)
    finally:
        coord.close()


def worker_side(template: Run, work: Path, pt: Point) -> None:
    run = make_run(template, work / f"worker-{pt.size}", swarm={
        "rounds": 2, "inner_steps": pt.h, "round_seconds": 3600.0, "min_contributions": 1})
    with LocalSwarm(run.dir, work / f"worker-{pt.size}-logs") as swarm:
        serve(swarm)
        t = run_instrumented_worker(swarm.url, work / f"home-{pt.size}", "w", 2)
    r2 = t.rounds[1]
    pt.round_s = t.submitted_at[1] - t.submitted_at[0]
    pt.train_s, pt.tokens = r2["train_s"], r2["tokens"]
    pt.overhead_s = pt.round_s - pt.train_s
    pt.parts = {"first step after start": t.to_first_step,
                "model download (round 1)": t.sync}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--sizes", default=",".join(FULL_SIZES),
                   help=f"comma-separated, among {', '.join(STEPS)}")
    p.add_argument("--contributions", type=int, default=4, help="K, per coordinator round")
    p.add_argument("--no-worker", action="store_true", help="coordinator side only")
    p.add_argument("--work", type=Path, help="keep runs and logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = a.sizes.split(",")
    if a.quick:
        sizes, a.contributions = ["1M", "3M"], 2
    for s in sizes:
        if s not in STEPS:
            p.error(f"unknown size {s!r}: choose among {', '.join(STEPS)}")
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-scaling-"))
    header("scaling: coordinator aggregation and worker round time vs model size")
    base = base_run(work / "cache", "tiny")
    tc = base.config.train
    print(f"# batch {tc.batch_size} x {tc.seq_len}; coordinator: K={a.contributions} "
          f"contributions, aggregation {base.config.swarm.aggregation!r}; worker: 2 rounds, "
          "round 2 reported", flush=True)
    points = []
    for s in sizes:
        template = make_run(base, work / f"template-{s}", s)
        pt = Point(s, params_of(template), h=2 if a.quick else STEPS[s])
        coordinator_side(template, work, a.contributions, pt)
        with_worker = not a.no_worker and not (a.quick and points)
        if with_worker:
            worker_side(template, work, pt)
        points.append(pt)
        n = pt.params
        line = (f"{s:>5} {n / 1e6:6.2f}M  coordinator: submit {pt.submit_s:6.2f}s "
                f"({pt.submit_s / n * 1e9:5.1f} ns/param), close K={a.contributions} "
                f"{pt.close_s:6.2f}s ({pt.close_s / n * 1e9:6.1f} ns/param)")
        if with_worker:
            steps = pt.h
            line += (f"  worker: round {pt.round_s:6.1f}s = train {pt.train_s:6.1f}s "
                     f"({pt.train_s / steps:5.2f}s/step, "
                     f"{pt.train_s / (pt.tokens * n) * 1e12:5.1f} ps/param-token) + rest "
                     f"{pt.overhead_s:5.2f}s ({pt.overhead_s / n * 1e9:5.1f} ns/param); "
                     f"start to first step {pt.parts['first step after start']:.1f}s")
        print(line + f"  [{load()}]", flush=True)
    if len(points) > 1:
        def spread(xs: list[float]) -> str:
            return f"{max(xs) / min(xs):.2f}x" if min(xs) > 0 else "n/a"

        print("\nmax/min over sizes of the cost per parameter:")
        print(f"  coordinator close     {spread([q.close_s / q.params for q in points])}")
        print(f"  coordinator submit    {spread([q.submit_s / q.params for q in points])}")
        wp = [q for q in points if q.tokens]
        if len(wp) > 1:
            print(f"  worker non-training   {spread([q.overhead_s / q.params for q in wp])}")
            print(f"  worker training       "
                  f"{spread([q.train_s / (q.tokens * q.params) for q in wp])} "
                  "(per parameter-token)")
    print(f"# {load()} at the end; work in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
