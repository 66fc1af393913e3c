"""A volunteer's training efficiency: its throughput as a ratio to the plain `crowdtrain train`
loop's on the same model, batch and device, measured side by side on this machine.

Trials alternate (plain, swarm, plain, swarm, ...) and the ratio of each pair is reported with
the median over pairs, so a load that changes during the run hits both sides alike.

- plain: `crowdtrain train RUN --steps R*H --threads T` (a subprocess, on a copy of the run);
  its tokens/s over the training loop (evaluation excluded).
- swarm: a coordinator (`crowdtrain serve`, its own process) and one volunteer, the real
  `crowdtrain join` worker (crowdtrain.volunteer.worker.Worker, run in this process with its methods
  wrapped by timers), for R rounds of H inner steps. A newcomer each time: it joins, downloads
  the model and its shard in round 1.

Reported ratios (swarm / plain):
- while training: tokens / seconds inside the inner loop;
- over wall time, steady state: tokens of rounds 2..R / wall time from round 1's submit to
  round R's (whole rounds: update download and replay, training, compression, upload, waiting
  for the round to close, local saves);
- over wall time from `join`: all tokens / wall time from the worker's start to its last
  submit (adds start-up: joining, model and shard download);
- and, within each swarm trial (so insensitive to the load changing between trials), the
  share of the steady-state wall time spent in the inner loop;
and where a round's time went, and the time from the worker's start to its first inner step.

Target: >= 0.95 over wall time.

    python bench/efficiency.py          # full: small preset, H=30, 3 rounds, 3 pairs (~15 min)
    python bench/efficiency.py --quick  # tiny preset, H=5, 2 rounds, 1 pair (~30 s)

The coordinator evaluates each round's model in a background thread; the run copies use a
256-token held-out set so that this stays small next to the worker's compute (on a real swarm
the coordinator is another machine).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    WorkerTimes,
    base_run,
    header,
    load,
    make_run,
    median,
    params_of,
    run_instrumented_worker,
    serve,
)

from crowdtrain.cli.processes import LocalSwarm, cli_command  # noqa: E402
from crowdtrain.run.folder import Run  # noqa: E402

TARGET = 0.95


def plain_trial(base: Run, work: Path, steps: int, threads: int) -> tuple[float, float]:
    """(tokens/s of the training loop, seconds) of `crowdtrain train` on a copy of `base`."""
    run = make_run(base, work / "plain-run")
    out = subprocess.run(cli_command("train", str(run.dir), "--steps", str(steps),
                                     "--eval-every", str(steps), "--threads", str(threads),
                                     "--quiet"),
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"([\d,]+) tokens in \d+s \(([\d,]+) tok/s\)", out)
    if not m:
        raise RuntimeError(f"cannot read the throughput from: {out!r}")
    tokens, rate = (float(g.replace(",", "")) for g in m.groups())
    return rate, tokens / rate


def swarm_trial(base: Run, work: Path, rounds: int, inner_steps: int, threads: int,
                name: str) -> WorkerTimes:
    run = make_run(base, work / f"{name}-run", swarm={
        "rounds": rounds, "inner_steps": inner_steps, "round_seconds": 3600.0,
        "min_contributions": 1})
    with LocalSwarm(run.dir, work / f"{name}-logs") as swarm:
        serve(swarm)
        return run_instrumented_worker(swarm.url, work / f"{name}-home", name, rounds,
                                       threads=threads)


def utilisation(t: WorkerTimes) -> float:
    """Training seconds / wall seconds from round 1's submit to the last round's."""
    w = t.window(0, len(t.at_submit) - 1)
    return w["train"] / w["wall"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--inner-steps", type=int, default=30, help="H, inner steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per swarm trial (>= 2)")
    p.add_argument("--pairs", type=int, default=3, help="(plain, swarm) pairs to alternate")
    p.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    p.add_argument("--work", type=Path, help="keep runs and logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.inner_steps, a.rounds, a.pairs = "tiny", 5, 2, 1
    if a.rounds < 2:
        p.error("--rounds must be at least 2 (round 1 includes start-up)")
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-efficiency-"))
    header("efficiency: a volunteer worker vs the plain `crowdtrain train` loop")
    base = base_run(work / "cache", a.preset, corpus_chars=300_000 if a.quick else None)
    cfg = base.config.train
    steps = a.rounds * a.inner_steps
    print(f"# {a.preset} ({params_of(base):,} parameters), batch {cfg.batch_size} x "
          f"{cfg.seq_len} tokens, {a.threads} torch thread(s) per process; swarm: 1 worker, "
          f"{a.rounds} rounds x H={a.inner_steps}; plain: {steps} steps; {a.pairs} pair(s)",
          flush=True)
    rows: list[tuple[float, WorkerTimes]] = []
    for i in range(a.pairs):
        plain_rate, plain_s = plain_trial(base, work, steps, a.threads)
        print(f"pair {i + 1}: plain  {plain_rate:8,.0f} tok/s ({plain_s:.0f}s)   [{load()}]",
              flush=True)
        t = swarm_trial(base, work, a.rounds, a.inner_steps, a.threads, f"w{i + 1}")
        rows.append((plain_rate, t))
        print(f"pair {i + 1}: swarm  {t.train_rate():8,.0f} tok/s training, "
              f"{t.steady_rate():,.0f} steady, {t.wall_rate():,.0f} from join "
              f"({t.wall:.0f}s)   ratios {t.train_rate() / plain_rate:.3f} / "
              f"{t.steady_rate() / plain_rate:.3f} / {t.wall_rate() / plain_rate:.3f}; "
              f"training share of steady wall time {utilisation(t):.3f}   [{load()}]",
              flush=True)
    train_r = median([t.train_rate() / pr for pr, t in rows])
    steady_r = median([t.steady_rate() / pr for pr, t in rows])
    wall_r = median([t.wall_rate() / pr for pr, t in rows])
    util = median([utilisation(t) for _, t in rows])
    print("\nmedian ratios, swarm worker / plain loop:")
    print(f"  while training                       {train_r:.3f}")
    print(f"  over wall time, steady state         {steady_r:.3f}  (target >= {TARGET}: "
          f"{'met' if steady_r >= TARGET else 'MISSED'})")
    print(f"  over wall time from join             {wall_r:.3f}  (target >= {TARGET}: "
          f"{'met' if wall_r >= TARGET else 'MISSED'})")
    print(f"  share of the worker's steady-state wall time spent training: {util:.3f} (the "
          "wall-time ratio if the inner loop ran exactly as fast as the plain loop; measured "
          "within each swarm trial, so insensitive to load changing between trials)")
    per = a.rounds * len(rows)
    cols = ("train", "sync", "compress", "upload", "lease", "local_disk")
    print(f"\nwhere a worker's time went, seconds per round (mean of {per} rounds, round 1 "
          "with start-up included):")
    for c in cols:
        print(f"  {c:<28} {sum(getattr(t, c) for _, t in rows) / per:7.2f}")
    print(f"  {'waiting for close + other':<28} {sum(t.other for _, t in rows) / per:7.2f}")
    print(f"time from the worker's start to its first inner step: median "
          f"{median([t.to_first_step for _, t in rows]):.2f}s")
    sent = median([t.bytes_sent / a.rounds for _, t in rows])
    print(f"bytes sent per round: {sent / 1e6:.2f} MB; received over the trial (model, shard, "
          f"updates): {median([t.bytes_received for _, t in rows]) / 1e6:.2f} MB")
    print(f"# {load()} at the end; work in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
