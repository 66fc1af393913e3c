"""Poisoning with real processes: a coordinator, K-1 honest `crowdtrain join` workers and one
malicious worker (bench/adversary.py) on loopback, per attack, with the run's robust
aggregation and without it (plain mean), against the honest-only run.

Each run is a copy of one base run (same initial checkpoint, same data, lr schedule over
exactly the run's steps); every round waits for every leased worker, so each round aggregates
the K-1 honest deltas plus the attacker's. Prints, per (attack, aggregation): the final
held-out loss, its ratio to the honest-only run, what the ledger says about the attacker's
contributions (accepted / clipped / left out / refused), and whether the 3% target holds.

    python bench/poisoning_swarm.py [RUN_DIR] --rounds 10 --inner-steps 30   # full, ~15 min
    python bench/poisoning_swarm.py --quick                                  # ~2 minutes
    python bench/poisoning_swarm.py --codec sparse --attacks scaled_x100,noise,sign_flip

Without RUN_DIR a `tiny` run is made from the bundled corpus in a temporary folder.
`--quick` runs one attack (scaled_x100) with and without the defence: a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crowdtrain.cli.processes import LocalSwarm  # noqa: E402
from crowdtrain.run.data import default_corpus  # noqa: E402
from crowdtrain.run.folder import Run, SwarmConfig, init_run  # noqa: E402
from crowdtrain.run.ledger import Ledger  # noqa: E402
from crowdtrain.run.train import evaluate  # noqa: E402
from crowdtrain.wire.codecs import CODECS  # noqa: E402

ATTACKS = ("scaled_x100", "noise", "sign_flip", "alie", "liar", "nan")
ADVERSARY = Path(__file__).resolve().parent / "adversary.py"
TOLERANCE = 0.03


@dataclasses.dataclass
class Outcome:
    attack: str | None
    aggregation: str
    loss: float
    initial: float
    seconds: float
    attacker: dict[str, int] = dataclasses.field(default_factory=dict)


def prepare(base: Run, dst: Path, rounds: int, inner_steps: int, **swarm) -> Run:
    """A private copy of `base` (ledger-free) whose lr schedule spans exactly the run."""
    shutil.copytree(base.dir, dst, ignore=shutil.ignore_patterns(
        "ledger.sqlite*", "contributions", "updates", "outer", "admin*"))
    for p in (dst / "checkpoints").iterdir():
        if not p.name.startswith("ckpt-000000."):
            p.unlink()
    cfg = json.loads((dst / "run.json").read_text())
    steps = rounds * inner_steps
    cfg["train"].update(total_steps=steps, warmup_steps=max(1, min(50, steps // 10)))
    cfg["swarm"].update(rounds=rounds, inner_steps=inner_steps, **swarm)
    (dst / "run.json").write_text(json.dumps(cfg))
    return Run(dst)


def held_out(run: Run, rnd: int) -> float:
    model, _ = run.load_model(rnd)
    return evaluate(model, run.val_windows(), torch.device("cpu"))


def swarm_run(base: Run, work: Path, attack: str | None, aggregation: str, *, honest: int = 3,
              rounds: int = 4, inner_steps: int = 10, round_seconds: float = 120.0,
              timeout: float = 900.0, codec: dict | None = None) -> Outcome:
    """One run: `honest` honest workers plus an attacker (none if `attack` is None); `codec`:
    the run's codec and outer settings (codec, sparse_density, sparse_bits, sparse_ef_decay,
    outer_lr, outer_momentum; default the base run's)."""
    name = f"{attack or 'honest'}-{aggregation}"
    run = prepare(base, work / name, rounds, inner_steps, aggregation=aggregation,
                  round_seconds=round_seconds, min_contributions=honest, **(codec or {}))
    t0 = time.monotonic()
    with LocalSwarm(run.dir, work / f"{name}-logs") as swarm:
        swarm.serve()
        workers = [f"honest-{i + 1}" for i in range(honest)]
        for w in workers:
            swarm.join(w)
        if attack:
            swarm.spawn("mallory", [sys.executable, str(ADVERSARY), swarm.url, "--attack",
                                    attack, "--name", "mallory", "--home",
                                    str(swarm.home("mallory")), "--peek", str(run.dir),
                                    "--honest", str(honest)])
            workers.append("mallory")
        for w in workers:
            code = swarm.wait(w, timeout)
            if code != 0:
                raise RuntimeError(f"{name}: {w} exited with {code}: {swarm.log(w)[-1500:]}")
        st = swarm.status()
        if not st.finished:
            raise RuntimeError(f"{name}: the run did not finish: round {st.round}")
    seconds = time.monotonic() - t0
    tally: dict[str, int] = {}
    if attack:
        for r in Ledger(run.dir / "ledger.sqlite").query(
                "SELECT c.status, c.excluded, c.reason FROM contributions c "
                "JOIN volunteers v ON v.id = c.volunteer_id WHERE v.name = 'mallory'"):
            kind = ("refused" if r["status"] == "refused" else "left out" if r["excluded"]
                    else "clipped" if r["reason"] else "accepted")
            tally[kind] = tally.get(kind, 0) + 1
    return Outcome(attack, aggregation, held_out(run, rounds), held_out(run, 0), seconds,
                   tally)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=30)
    p.add_argument("--honest", type=int, default=3)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defence", default=SwarmConfig().aggregation,
                   help="aggregation to test (default: the run default)")
    p.add_argument("--codec", choices=CODECS, default=SwarmConfig().codec,
                   help="how the workers' contributions travel (the attacker's too)")
    p.add_argument("--sparse-density", type=float, default=SwarmConfig().sparse_density)
    p.add_argument("--sparse-bits", type=int, default=SwarmConfig().sparse_bits)
    p.add_argument("--sparse-ef-decay", type=float, default=SwarmConfig().sparse_ef_decay)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, help="keep the runs and logs here")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.inner_steps, a.attacks = 3, 5, "scaled_x100"
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-poison-"))
    base = Run(a.run_dir) if a.run_dir else init_run(work / "base", [default_corpus()],
                                                     preset="tiny", progress=False,
                                                     swarm=SwarmConfig(warm_start=0.0))
    codec = {"codec": a.codec, "sparse_density": a.sparse_density,
             "sparse_bits": a.sparse_bits, "sparse_ef_decay": a.sparse_ef_decay}
    own = SwarmConfig(**codec)  # checked before any run
    # the codec's own outer optimizer defaults (sparse: lr 1, no momentum), not the base run's
    codec.update(outer_lr=own.outer_lr, outer_momentum=own.outer_momentum)
    kw = dict(honest=a.honest, rounds=a.rounds, inner_steps=a.inner_steps, codec=codec)
    what = (f"sparse {a.sparse_density:g} x {a.sparse_bits} bits, error feedback decayed by "
            f"{a.sparse_ef_decay:g}" if a.codec == "sparse" else a.codec)
    what += f", outer SGD lr {own.outer_lr:g} momentum {own.outer_momentum:g}"
    print(f"{base.config.preset}: {a.honest} honest workers + 1 attacker, {a.rounds} rounds "
          f"x {a.inner_steps} inner steps, {what} contributions; defence {a.defence!r} vs "
          f"plain mean; work in {work}")
    ref = swarm_run(base, work, None, a.defence, **kw)
    print(f"honest only ({a.defence}): held-out {ref.loss:.4f} (initial {ref.initial:.4f}, "
          f"{ref.seconds:.0f}s): the reference of every ratio below")
    if not a.quick:  # what the defence costs when nobody attacks
        plain = swarm_run(base, work, None, "mean", **kw)
        print(f"honest only (mean): held-out {plain.loss:.4f} (ratio {plain.loss / ref.loss:.3f})")
    print(f"{'attack':<12} {'aggregation':<14} {'held-out':>9} {'ratio':>7}  attacker's "
          "contributions")
    worst = {a.defence: 1.0, "mean": 1.0}
    for attack in a.attacks.split(","):
        for agg in (a.defence, "mean"):
            # a NaN is refused before aggregation whatever the method: no need to run both;
            # rounds then end at their deadline (the refused attacker keeps asking for leases)
            if attack == "nan" and agg == "mean":
                continue
            o = swarm_run(base, work, attack, agg, **kw,
                          round_seconds=30.0 if attack == "nan" else 120.0)
            ratio = o.loss / ref.loss
            worst[agg] = max(worst[agg], ratio)
            print(f"{attack:<12} {agg:<14} {o.loss:>9.4f} {ratio:>7.3f}  "
                  f"{json.dumps(o.attacker)}  ({o.seconds:.0f}s)", flush=True)
    for agg, w in worst.items():
        verdict = "within" if w <= 1 + TOLERANCE else "NOT within"
        print(f"worst ratio, {agg}: {w:.3f} ({verdict} {TOLERANCE:.0%} of honest-only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
