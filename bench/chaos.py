"""Chaos: a run with K workers where a script SIGKILLs a random worker every few seconds
(restarting it a moment later, as a volunteer whose machine rebooted) and SIGKILLs the
coordinator twice (restarting it on the same port), against the same run undisturbed.

Checks, from the ledger, the checkpoints and the workers' own logs:
- the run completes all its rounds;
- no acknowledged work is lost: every "accepted for round r" a worker logged is an accepted
  contribution of round r in the ledger, and every accepted contribution of round r is in
  checkpoint r+1 (its `contributions` count) and in the round's row;
- the final held-out loss is within 3% of the undisturbed run's.

    python bench/chaos.py [RUN_DIR] --rounds 12 --inner-steps 30    # full: ~10 minutes
    python bench/chaos.py --quick                                   # ~2 minutes

Without RUN_DIR a `tiny` run is made from the bundled corpus in a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poisoning_swarm import held_out, prepare  # noqa: E402

from crowdtrain.cli.processes import LocalSwarm  # noqa: E402
from crowdtrain.run.checkpoint import load_checkpoint  # noqa: E402
from crowdtrain.run.data import default_corpus  # noqa: E402
from crowdtrain.run.folder import Run, SwarmConfig, init_run  # noqa: E402
from crowdtrain.run.ledger import Ledger  # noqa: E402

TOLERANCE = 0.03


@dataclasses.dataclass
class ChaosOutcome:
    loss: float
    initial: float
    seconds: float
    rounds: int
    worker_kills: int = 0
    coordinator_kills: int = 0
    accepted: int = 0
    acknowledged: int = 0
    resumed: int = 0  # leases a restarted worker took up again from its snapshot
    problems: list[str] = dataclasses.field(default_factory=list)


def audit(run: Run, swarm: LocalSwarm, names: list[str], rounds: int) -> tuple[int, int,
                                                                                list[str]]:
    """(accepted contributions, acknowledgements the workers logged, problems found)."""
    problems: list[str] = []
    ledger = Ledger(run.dir / "ledger.sqlite")
    rows = {r["round"]: r for r in ledger.rounds()}
    acked = 0
    for name in names:
        heard = sorted(int(r) for r in re.findall(r"round (\d+): .* accepted for round",
                                                  swarm.log(name)))
        acked += len(heard)
        got = sorted(x["round"] for x in ledger.query(
            "SELECT c.round FROM contributions c JOIN volunteers v ON v.id = c.volunteer_id "
            "WHERE v.name = ? AND c.status = 'accepted'", (name,)))
        missing = Counter(heard) - Counter(got)  # an OK lost in transit is no loss: not vice versa
        if missing:
            problems.append(f"{name}: acknowledged in rounds {sorted(missing.elements())} "
                            f"but not accepted in the ledger ({got})")
    accepted = 0
    for r in range(rounds):
        row = rows.get(r)
        if row is None or row["state"] != "closed":
            problems.append(f"round {r} is not closed")
            continue
        mine = [a for a in ledger.accepted(r) if not a["excluded"]]
        accepted += len(mine)
        meta = load_checkpoint(run.ckpt_dir, r + 1).meta if (
            run.ckpt_dir / f"ckpt-{r + 1:06d}.json").exists() else None
        if row["contributions"] != len(mine):
            problems.append(f"round {r}: row counts {row['contributions']}, ledger has "
                            f"{len(mine)} accepted")
        if meta is not None and meta["contributions"] != len(mine):
            problems.append(f"round {r}: checkpoint {r + 1} aggregated {meta['contributions']}"
                            f", ledger has {len(mine)} accepted")
        late = [a["id"] for a in mine if a["received_at"] > row["closed_at"]]
        if late:
            problems.append(f"round {r}: contributions {late} accepted after it closed")
    return accepted, acked, problems


def chaos_run(base: Run, work: Path, *, chaos: bool, workers: int = 4, rounds: int = 6,
              inner_steps: int = 10, round_seconds: float = 15.0, kill_every: float = 6.0,
              coordinator_kills: int = 2, seed: int = 0, timeout: float = 900.0) -> ChaosOutcome:
    name = "chaos" if chaos else "undisturbed"
    # keep every checkpoint: the audit reads each round's
    run = prepare(base, work / name, rounds, inner_steps, round_seconds=round_seconds,
                  min_contributions=1, keep_last=rounds + 1)
    rng = random.Random(seed)
    names = [f"w{i + 1}" for i in range(workers)]
    # the coordinator dies early in the round after these rounds closed
    kill_after = sorted(rng.sample(range(1, rounds), min(coordinator_kills, rounds - 1)))
    out = ChaosOutcome(0.0, 0.0, 0.0, rounds)
    t0 = time.monotonic()
    with LocalSwarm(run.dir, work / f"{name}-logs") as swarm:
        swarm.serve("coordinator")
        for w in names:
            swarm.join(w)
        next_kill = time.monotonic() + kill_every
        # every round loses at least one worker, however fast the machine runs it
        round_with_kill_due = -1
        restarts: dict[str, float] = {}
        while time.monotonic() - t0 < timeout:
            if all(not swarm.alive(w) for w in names if w not in restarts):
                if not restarts:
                    break
            now = time.monotonic()
            for w, at in list(restarts.items()):
                if now >= at:
                    swarm.join(w)
                    del restarts[w]
            if not chaos:
                time.sleep(0.5)
                continue
            st_round = _round_on_disk(run)
            if kill_after and st_round >= kill_after[0]:
                kill_after.pop(0)
                time.sleep(rng.uniform(0.5, 3.0))  # mid-round: training, uploading, closing
                swarm.kill("coordinator")
                out.coordinator_kills += 1
                time.sleep(rng.uniform(0.5, 2.0))
                swarm.serve("coordinator")
            if round_with_kill_due < st_round < rounds:
                round_with_kill_due = st_round
                next_kill = min(next_kill, now + rng.uniform(0.5, 3.0))
            if now >= next_kill:
                alive = [w for w in names if swarm.alive(w)]
                if alive and _round_on_disk(run) < rounds:
                    victim = rng.choice(alive)
                    swarm.kill(victim)
                    out.worker_kills += 1
                    restarts[victim] = now + rng.uniform(0.5, 2.0)
                next_kill = now + kill_every * rng.uniform(0.5, 1.5)
            time.sleep(0.1)
        for w in names:
            if swarm.wait(w, 120) != 0:
                out.problems.append(f"{w} exited with an error: {swarm.log(w)[-500:]}")
        st = swarm.status()
        if not st.finished:
            out.problems.append(f"the run did not finish: round {st.round} of {rounds}")
        out.accepted, out.acknowledged, problems = audit(run, swarm, names, rounds)
        out.resumed = sum(swarm.log(w).count("resuming lease") for w in names)
        out.problems += problems
    out.seconds = time.monotonic() - t0
    out.loss, out.initial = held_out(run, rounds), held_out(run, 0)
    return out


def _round_on_disk(run: Run) -> int:
    """The newest checkpoint's round (read from disk: the coordinator may be down)."""
    ckpts = sorted(run.ckpt_dir.glob("ckpt-*.json"))
    return int(ckpts[-1].stem.split("-")[1]) if ckpts else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--inner-steps", type=int, default=30)
    p.add_argument("--round-seconds", type=float, default=20.0)
    p.add_argument("--kill-every", type=float, default=6.0,
                   help="mean seconds between worker kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, help="keep the runs and logs here")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.inner_steps = 5, 10
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-chaos-"))
    base = Run(a.run_dir) if a.run_dir else init_run(work / "base", [default_corpus()],
                                                     preset="tiny", progress=False,
                                                     swarm=SwarmConfig(warm_start=0.0))
    kw = dict(workers=a.workers, rounds=a.rounds, inner_steps=a.inner_steps,
              round_seconds=a.round_seconds, kill_every=a.kill_every, seed=a.seed)
    print(f"{base.config.preset}: {a.workers} workers, {a.rounds} rounds x {a.inner_steps} "
          f"inner steps; a worker killed every ~{a.kill_every:.0f}s, the coordinator twice; "
          f"work in {work}")
    ref = chaos_run(base, work, chaos=False, **kw)
    print(f"undisturbed: held-out {ref.loss:.4f} (initial {ref.initial:.4f}), "
          f"{ref.accepted} contributions, {ref.seconds:.0f}s")
    o = chaos_run(base, work, chaos=True, **kw)
    print(f"chaos:       held-out {o.loss:.4f}, {o.accepted} contributions, {o.seconds:.0f}s; "
          f"{o.worker_kills} worker kills, {o.coordinator_kills} coordinator kills, "
          f"{o.resumed} leases resumed after a kill; "
          f"{o.acknowledged} acknowledgements, all in the ledger: {not o.problems}")
    ratio = o.loss / ref.loss
    print(f"ratio to undisturbed: {ratio:.3f} "
          f"({'within' if ratio <= 1 + TOLERANCE else 'NOT within'} {TOLERANCE:.0%})")
    for problem in ref.problems + o.problems:
        print("PROBLEM:", problem)
    return 1 if o.problems or ref.problems or ratio > 1 + TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
