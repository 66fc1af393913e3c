"""`crowdtrain demo`: a whole swarm on one machine. Creates a run on the bundled corpus, starts
the coordinator and N volunteer workers as real processes talking HTTP on loopback, prints
each round as it closes, then exports the model and prints a sample of generated text.

Workers get `max(1, cores // workers)` torch threads each so they do not oversubscribe the
cores (two 2-thread processes on 2 cores run ~10x slower than two 1-thread ones).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.cli.processes import cli_command, free_port, get_status, wait_until_up
from crowdtrain.cli.processes import tail as _tail
from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.data import default_corpus
from crowdtrain.run.folder import SwarmConfig, init_run
from crowdtrain.wire import protocol


@dataclass
class DemoResult:
    out_dir: Path
    run_dir: Path
    model_dir: Path
    status: protocol.Status
    seconds: float
    sample: str


def run_demo(
    out_dir: str | os.PathLike | None = None,
    workers: int = 3,
    rounds: int = 5,
    inner_steps: int = 30,
    preset: str = "small",
    round_seconds: float = 90.0,
    port: int | None = None,
    aggregation: str | None = None,
    say=print,
) -> DemoResult:
    if workers < 1 or rounds < 1 or inner_steps < 1:
        raise CrowdtrainError("--workers, --rounds and --inner-steps must be at least 1")
    t0 = time.monotonic()
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="crowdtrain-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    say(f"creating a run on the bundled corpus in {run_dir} ...")
    # A 5-round run is too short for outer momentum: measured (BENCHMARKS.md), plain
    # averaging beats lr 0.7 / Nesterov 0.9 here (4.45 vs 4.64 held-out) and beats the
    # lone-worker floor (4.55); momentum pays off over many rounds.
    # No owner warm start (a run's default, `init --warm-start`): the demo shows what the
    # volunteers alone make of a fresh model, and its figures in BENCHMARKS.md are measured so.
    swarm = SwarmConfig(inner_steps=inner_steps, rounds=rounds, round_seconds=round_seconds,
                        min_contributions=1, outer_lr=1.0, outer_momentum=0.0, warm_start=0.0,
                        **({"aggregation": aggregation} if aggregation else {}))
    init_run(run_dir, [default_corpus()], preset=preset, force=True, progress=False,
             train_overrides={"total_steps": swarm.total_steps(),
                              "warmup_steps": max(1, min(50, swarm.total_steps() // 10))},
             swarm=swarm)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        log = out / "coordinator.log"
        logs.append(log)
        procs.append(subprocess.Popen(
            cli_command("--log-level", "info", "serve", str(run_dir), "--port", str(port),
                        "--threads", "1"),
            stdout=log.open("w"), stderr=subprocess.STDOUT))
        wait_until_up(url, procs[0], log)
        say(f"coordinator up: {url}  (status: {url}{protocol.STATUS}, API: {url}/docs)")
        for i in range(workers):
            wlog = out / f"worker-{i + 1}.log"
            logs.append(wlog)
            env = dict(os.environ, CROWDTRAIN_HOME=str(out / "volunteers" / f"v{i + 1}"))
            procs.append(subprocess.Popen(
                cli_command("--log-level", "info", "join", url, "--name",
                            f"volunteer-{i + 1}", "--threads", str(threads), "--quiet"),
                stdout=wlog.open("w"), stderr=subprocess.STDOUT, env=env))
        say(f"started {workers} workers ({threads} torch thread(s) each); "
            f"{rounds} rounds of {inner_steps} inner steps")
        reported = 0
        while True:
            st = get_status(url)
            for r in st.rounds:
                if r.state == "closed" and r.round >= reported:
                    reported = r.round + 1
                    say(f"round {r.round + 1}/{rounds} closed: {r.contributions} contributions, "
                        f"{r.tokens:,} tokens, train loss {r.train_loss or float('nan'):.3f}, "
                        f"{r.bytes_in / 1e6:.1f} MB in, {r.bytes_out / 1e6:.1f} MB out, "
                        f"{(r.closed_at or 0) - r.opened_at:.0f}s")
            alive = [p for p in procs[1:] if p.poll() is None]
            if st.finished and not alive:
                break
            failed = [(i, p) for i, p in enumerate(procs[1:], 1) if p.poll() not in (None, 0)]
            if failed and len(failed) == workers:
                i, p = failed[0]
                raise CrowdtrainError(f"every worker failed; worker {i}: {_tail(logs[i])}")
            if procs[0].poll() is not None:
                raise CrowdtrainError(f"the coordinator died: {_tail(logs[0])}")
            time.sleep(1.0)
        end = time.monotonic() + 120
        while st.rounds[-1].val_loss is None and time.monotonic() < end:
            time.sleep(0.5)
            st = get_status(url)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    from crowdtrain.publish.export import export_model
    from crowdtrain.publish.generate import generate_text
    from crowdtrain.run.folder import Run

    model_dir = export_model(Run(run_dir), out / "model", force=True)
    sample = generate_text(model_dir, "ROMEO:", max_new_tokens=80, seed=0)
    return DemoResult(out, run_dir, model_dir, st, time.monotonic() - t0, sample)
