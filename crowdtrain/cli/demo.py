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
from dataclasses import dataclass, field
from pathlib import Path

from crowdtrain.cli.processes import cli_command, free_port, get_status, wait_until_up
from crowdtrain.cli.processes import tail as _tail
from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.data import default_corpus
from crowdtrain.run.folder import SwarmConfig, init_run
from crowdtrain.run.model import PRESETS
from crowdtrain.wire import protocol


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings; the fields with a "help" are `crowdtrain demo` options
    (crowdtrain.cli.options)."""

    workers: int = field(default=3, metadata={"help": "worker processes"})
    rounds: int = field(default=5, metadata={"help": "DiLoCo rounds"})
    inner_steps: int = field(default=30, metadata={"help": "H: inner steps per round"})
    preset: str = field(default="small", metadata={"help": f"model size: {', '.join(PRESETS)}"})
    out_dir: str | None = field(default=None, metadata={
        "flag": "out", "metavar": "DIR", "help": "keep everything here",
        "default_help": "a temp folder"})
    round_seconds: float = 90.0
    port: int | None = None  # default: a free one
    aggregation: str | None = None  # default: the run's (SwarmConfig.aggregation)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.rounds < 1 or self.inner_steps < 1:
            raise CrowdtrainError("--workers, --rounds and --inner-steps must be at least 1")


@dataclass
class DemoResult:
    out_dir: Path
    run_dir: Path
    model_dir: Path
    status: protocol.Status
    seconds: float
    sample: str


# seconds the demo waits on a round whose close keeps failing (the coordinator retries every
# 10 s: a failure that lasts this long is no passing hiccup) before it stops with the reason
CLOSE_PATIENCE = 25.0


def run_demo(cfg: DemoConfig | None = None, say=print) -> DemoResult:
    """Create the run, serve it to `cfg.workers` workers until its rounds are done, export the
    model and sample from it; `say` gets the progress lines."""
    cfg = cfg or DemoConfig()
    t0 = time.monotonic()
    out = Path(cfg.out_dir) if cfg.out_dir else Path(tempfile.mkdtemp(prefix="crowdtrain-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    say(f"creating a run on the bundled corpus in {run_dir} ...")
    create_run(run_dir, cfg)
    swarm = Swarm(out, run_dir, cfg)
    try:
        swarm.start(say)
        st = swarm.follow(say)
    finally:
        swarm.stop()
    model_dir, sample = publish(run_dir, out)
    return DemoResult(out, run_dir, model_dir, st, time.monotonic() - t0, sample)


def create_run(run_dir: Path, cfg: DemoConfig) -> None:
    """The demo's run on the bundled corpus: `cfg.rounds` rounds of `cfg.inner_steps`."""
    # A 5-round run is too short for outer momentum: measured (BENCHMARKS.md), plain
    # averaging beats lr 0.7 / Nesterov 0.9 here (4.45 vs 4.64 held-out) and beats the
    # lone-worker floor (4.55); momentum pays off over many rounds.
    # No owner warm start (a run's default, `init --warm-start`): the demo shows what the
    # volunteers alone make of a fresh model, and its figures in BENCHMARKS.md are measured so.
    swarm = SwarmConfig(inner_steps=cfg.inner_steps, rounds=cfg.rounds,
                        round_seconds=cfg.round_seconds, min_contributions=1, outer_lr=1.0,
                        outer_momentum=0.0, warm_start=0.0,
                        **({"aggregation": cfg.aggregation} if cfg.aggregation else {}))
    init_run(run_dir, [default_corpus()], preset=cfg.preset, force=True, progress=False,
             train_overrides={"total_steps": swarm.total_steps(),
                              "warmup_steps": max(1, min(50, swarm.total_steps() // 10))},
             swarm=swarm)


class Swarm:
    """The coordinator (procs[0]) and the workers of the demo: processes on loopback, each
    logging into a file of `out` (logs[i] is procs[i]'s)."""

    def __init__(self, out: Path, run_dir: Path, cfg: DemoConfig):
        self.out, self.run_dir, self.cfg = out, run_dir, cfg
        self.port = cfg.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _spawn(self, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
        self.logs.append(log)
        self.procs.append(subprocess.Popen(cli_command("--log-level", "info", *args),
                                           stdout=log.open("w"), stderr=subprocess.STDOUT,
                                           env=env))
        return self.procs[-1]

    def start(self, say) -> None:
        """The coordinator, once it answers, then the workers, each with its own home."""
        coordinator = self._spawn(self.out / "coordinator.log", "serve", str(self.run_dir),
                                  "--port", str(self.port), "--threads", "1")
        wait_until_up(self.url, coordinator, self.logs[0])
        say(f"coordinator up: {self.url}  (status: {self.url}{protocol.STATUS}, API: "
            f"{self.url}/docs)")
        for i in range(1, self.cfg.workers + 1):
            env = dict(os.environ, CROWDTRAIN_HOME=str(self.out / "volunteers" / f"v{i}"))
            self._spawn(self.out / f"worker-{i}.log", "join", self.url, "--name",
                        f"volunteer-{i}", "--threads", str(self.threads), "--quiet", env=env)
        say(f"started {self.cfg.workers} workers ({self.threads} torch thread(s) each); "
            f"{self.cfg.rounds} rounds of {self.cfg.inner_steps} inner steps")

    def follow(self, say) -> protocol.Status:
        """Report each round as it closes until the run is finished and the workers have
        left; then the status once the last round's held-out loss is in (at most 2 minutes
        more)."""
        reported = 0
        failing_since = None
        while True:
            st = get_status(self.url)
            failing_since = (failing_since or time.monotonic()) if st.close_failing else None
            if failing_since is not None and time.monotonic() - failing_since > CLOSE_PATIENCE:
                raise CrowdtrainError(f"the coordinator cannot close round {st.round}: "
                                      f"{st.close_failing} (its log: {self.logs[0]})")
            for r in st.rounds:
                if r.state == "closed" and r.round >= reported:
                    reported = r.round + 1
                    say(f"round {r.round + 1}/{self.cfg.rounds} closed: {r.contributions} "
                        f"contributions, {r.tokens:,} tokens, train loss "
                        f"{r.train_loss or float('nan'):.3f}, {r.bytes_in / 1e6:.1f} MB in, "
                        f"{r.bytes_out / 1e6:.1f} MB out, "
                        f"{(r.closed_at or 0) - r.opened_at:.0f}s")
            if st.finished and not any(p.poll() is None for p in self.procs[1:]):
                break
            self._check_alive()
            time.sleep(1.0)
        end = time.monotonic() + 120
        while st.rounds[-1].val_loss is None and time.monotonic() < end:
            time.sleep(0.5)
            st = get_status(self.url)
        return st

    def _check_alive(self) -> None:
        """CrowdtrainError when every worker, or the coordinator, has died."""
        failed = [(i, p) for i, p in enumerate(self.procs[1:], 1) if p.poll() not in (None, 0)]
        if failed and len(failed) == self.cfg.workers:
            i, p = failed[0]
            raise CrowdtrainError(f"every worker failed; worker {i}: {_tail(self.logs[i])}")
        if self.procs[0].poll() is not None:
            raise CrowdtrainError(f"the coordinator died: {_tail(self.logs[0])}")

    def stop(self) -> None:
        """Terminate whatever still runs, last started first; kill what does not exit."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def publish(run_dir: Path, out: Path) -> tuple[Path, str]:
    """The run's model exported to out/model, and a sample of its text."""
    from crowdtrain.publish.export import export_model
    from crowdtrain.publish.generate import generate_text
    from crowdtrain.run.folder import Run

    model_dir = export_model(Run(run_dir), out / "model", force=True)
    return model_dir, generate_text(model_dir, "ROMEO:", max_new_tokens=80, seed=0)
