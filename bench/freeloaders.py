"""Freeloaders against the verification (issue 21, "Credit only for real work"), with real
processes: a coordinator (`crowdtrain serve`) on a run with `verify` on, 4 honest
`crowdtrain join` workers and 2 freeloaders of one kind (tests/freeloader.py), per kind, plus
honest-only runs for reference (two by default). The kinds:

    noise       Gaussian noise at an honest delta's norm, no training
    half        the first half of the lease's steps trained, all of them reported
    copy        a perturbed (5%) copy of another volunteer's upload of the same round
    replay      its first lease trained honestly, then that delta resent (5% noise) each round
    othershard  all the steps trained, on a train shard other than the leased one

Every run is a copy of one base run (tiny preset, bundled corpus, same checkpoint 0),
stop-and-wait, int8 contributions, every round waiting for all its volunteers
(min_contributions = volunteers). After each run the ledger and the coordinator's log say:

- freeloading contributions: all of the freeloaders' (for `replay`, those after its honest
  first lease), and how many were credited (accepted, not left out, not revoked: a
  `contributions.revoked` column is used when the ledger has one);
- honest contributions flagged: verified 'failed', left out by the verification, or revoked;
- verification's cost: the loss and similarity checks' seconds (the coordinator logs "round
  N: verified K contribution(s) in S s") plus the training of the copies that duplicated work
  already in the model (`leases.replica_of`: an honest volunteer's copy whose original was
  aggregated too, the pair at half weight each; a copy of a left-out lease is that data's only
  use in the round, and a freeloader's copy costs nobody anything), over the honest
  volunteers' training (the freeloaders' reported work is not real, so this is the strict
  reading). "measured": seconds, the training at the seconds of one lease trained alone before
  the run (the workers' wall time in the ledger is inflated by 6 processes sharing the cores;
  the checks run while the workers wait); "count": forward-pass equivalents, 4k per loss
  check run in full (2 passes on k lease + k control batches, verification.loss_batches_for),
  2k for one that stopped at the lease's batches (no loss drop), none for a sure copy (its
  loss check is not run), + 3 per duplicated step, over 3 per honest training step;
- honest contributions credited as suspect (below the round's reference: their volunteer's
  next lease is copied), and the honest copies counted in the cost;
- held-out loss of the final checkpoint (evaluated here), and its ratio to the mean of the
  honest-only runs (the same run twice differs by a percent or two: leases go to whoever asks
  first, and copies to whoever asks next).

Then the issue's four targets over the five cheating runs, each met or missed: >= 95% of
freeloading contributions without credit; <= 1% of honest ones flagged (160+ of them);
verification <= 10% of the swarm's training compute; held-out loss <= 1.03x honest-only.

    python bench/freeloaders.py                          # 8 rounds, H 200, every kind
    python bench/freeloaders.py --quick                  # smoke test: 3 rounds, H 30, 2 kinds
    python bench/freeloaders.py --kinds half,replay --rounds 10 --keep --work /tmp/fl

H (inner steps) matters for the cost: the loss check's share is 4k / (3H) with k >= 4, so a
short H is over the 10% budget by construction (--quick is).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# the processes it starts import this checkout's package too
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

import torch  # noqa: E402
from benchlib import machine  # noqa: E402

from crowdtrain.cli.processes import LocalSwarm  # noqa: E402
from crowdtrain.coordinator.closecheck import SUSPECT  # noqa: E402
from crowdtrain.coordinator.verification import VerifyConfig, loss_batches_for  # noqa: E402
from crowdtrain.run.data import default_corpus, get_batch, load_split  # noqa: E402
from crowdtrain.run.folder import Run, SwarmConfig, init_run  # noqa: E402
from crowdtrain.run.model import state_dict_for_save  # noqa: E402
from crowdtrain.run.train import InnerLoop, evaluate  # noqa: E402

KINDS = ("noise", "half", "copy", "replay", "othershard")
FREELOADER = ROOT / "tests" / "freeloader.py"
HONEST, CHEATS = 4, 2
VERIFIED = re.compile(r"round (\d+): verified (\d+) contribution\(s\) in ([0-9.]+)s")
# the targets
MIN_UNCREDITED, MAX_FLAGGED, MIN_HONEST, MAX_COST, MAX_LOSS_RATIO = 0.95, 0.01, 160, 0.10, 1.03


@dataclasses.dataclass
class Outcome:
    kind: str                 # "honest" for the reference run
    minutes: float
    loss: float
    cheat_total: int = 0      # freeloading contributions (submitted, accepted or refused)
    cheat_credited: int = 0
    honest_total: int = 0
    honest_flagged: int = 0
    checked: int = 0          # contributions the close checked (the log's counts)
    verify_seconds: float = 0.0
    replica_steps: int = 0
    replica_seconds: float = 0.0
    honest_steps: int = 0     # non-replica honest training steps
    honest_seconds: float = 0.0  # their wall seconds as reported (contended)
    check_batches: int = 0    # k lease (= control) batches per checked contribution
    checks_full: int = 0      # loss checks run in full (4k passes)
    checks_lease: int = 0     # stopped at the lease batches: no loss drop (2k passes)
    checks_none: int = 0      # not run: a sure copy (0 passes)
    honest_suspect: int = 0   # honest contributions credited provisionally as suspect
    copies: int = 0           # honest copies of aggregated work (their steps: replica_steps)
    credited_how: dict[str, int] = dataclasses.field(default_factory=dict)
    flagged_why: list[str] = dataclasses.field(default_factory=list)
    cheat_verdicts: dict[str, int] = dataclasses.field(default_factory=dict)

    def cost_measured(self, step_seconds: float) -> float:
        train = self.honest_steps * step_seconds
        return (self.verify_seconds + self.replica_steps * step_seconds) / train \
            if train else float("nan")

    def cost_count(self) -> float:
        train = 3 * self.honest_steps
        passes = self.check_batches * (4 * self.checks_full + 2 * self.checks_lease)
        return (passes + 3 * self.replica_steps) / train \
            if train else float("nan")

    def cost_ledger(self) -> float:
        return (self.verify_seconds + self.replica_seconds) / self.honest_seconds \
            if self.honest_seconds else float("nan")


def make_base(work: Path, rounds: int, h: int, warm_start: float) -> Run:
    swarm = SwarmConfig(rounds=rounds, inner_steps=h, warm_start=warm_start, verify=True,
                        overlap=False, codec="int8")
    return init_run(work / "base", [default_corpus()], preset="tiny", progress=False,
                    swarm=swarm, train_overrides={"total_steps": swarm.total_steps()})


def prepare(base: Run, dst: Path, **swarm) -> Run:
    """A private copy of `base` before anyone served it, with `swarm` settings changed."""
    shutil.copytree(base.dir, dst)
    cfg = json.loads((dst / "run.json").read_text())
    cfg["swarm"].update(swarm)
    (dst / "run.json").write_text(json.dumps(cfg))
    return Run(dst)


def honest_lease(run: Run) -> tuple[float, float]:
    """One honest lease from checkpoint 0 trained here, alone, on one thread (as the workers
    train): the norm of its delta (what the noise freeloader aims at, as in
    tests/e2e/test_freeloader.py) and its seconds per step."""
    torch.set_num_threads(1)
    model, ckpt = run.load_model(0)
    tc, h = run.config.train, run.config.swarm.inner_steps
    data = load_split(run.data_dir, run.index, "train")[:1]
    loop = InnerLoop(model, tc, torch.device("cpu"))
    loop.run(lambda s: get_batch(data, tc.batch_size, tc.seq_len, 1, s), 0, 5)  # warm up
    model, ckpt = run.load_model(0)
    loop = InnerLoop(model, tc, torch.device("cpu"))
    st = loop.run(lambda s: get_batch(data, tc.batch_size, tc.seq_len, 1, s), 0, h)
    after = state_dict_for_save(model)
    norm = float(torch.sqrt(sum(((ckpt.tensors[k] - after[k]).double() ** 2).sum()
                                for k in after)))
    return norm, st.seconds / h


def held_out(run: Run, rnd: int) -> float:
    model, _ = run.load_model(rnd)
    return evaluate(model, run.val_windows(), torch.device("cpu"))


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def tally(run: Run, kind: str, log: str, cheats: set[str]) -> Outcome:
    """What the ledger and the coordinator's log say about one finished run."""
    db = sqlite3.connect(f"file:{run.ledger_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        revoked = "c.revoked" if "revoked" in columns(db, "contributions") else "0"
        # a copy wastes work only when its original went into the model too (the pair is then
        # aggregated at half weight each: one lease's data for two leases' training); a copy of
        # a lease whose original was left out is the round's only use of that data
        replica = ("l.replica_of IS NOT NULL AND EXISTS (SELECT 1 FROM contributions o WHERE "
                   "o.lease_id = l.replica_of AND o.status = 'accepted' AND o.excluded = 0)"
                   if "replica_of" in columns(db, "leases") else "0")
        verified = "c.verified" if "verified" in columns(db, "contributions") else "NULL"
        rows = db.execute(
            f"SELECT c.*, v.name AS who, {revoked} AS was_revoked, {replica} AS is_replica, "
            f"{verified} AS outcome, l.max_steps AS lease_steps FROM contributions c "
            "JOIN volunteers v ON v.id = c.volunteer_id "
            "LEFT JOIN leases l ON l.id = c.lease_id ORDER BY c.id").fetchall()
    finally:
        db.close()
    o = Outcome(kind, 0.0, float("nan"))
    first_lease = {}  # replay: each freeloader's first (honestly trained) lease
    for r in rows:
        if r["who"] in cheats and r["lease_id"] is not None:
            first_lease[r["who"]] = min(first_lease.get(r["who"], r["lease_id"]), r["lease_id"])
    steps_max = 0
    for r in rows:
        steps_max = max(steps_max, int(r["lease_steps"] or 0))
        credited = r["status"] == "accepted" and not r["excluded"] and not r["was_revoked"]
        why = r["reason"] or ""
        if r["outcome"] is not None and r["lease_id"] is not None and \
                not why.startswith("provisional: the verification could not run"):
            if "loss not measured" in why:
                o.checks_none += 1
            elif "no loss drop" in why:
                o.checks_lease += 1
            else:
                o.checks_full += 1
        if r["is_replica"] and r["who"] not in cheats and not r["excluded"]:  # real compute
            # spent on a copy of work already in the model (a freeloader's copy costs nobody
            # anything: it trains little or nothing)
            o.replica_steps += int(r["steps"] or 0)
            o.copies += 1
            o.replica_seconds += float(r["seconds"] or 0.0)
        if r["who"] in cheats:
            if kind == "replay" and r["lease_id"] == first_lease.get(r["who"]):
                continue  # its honest first lease: neither freeloading nor an honest volunteer's
            o.cheat_total += 1
            o.cheat_credited += credited
            what = "refused" if r["status"] == "refused" else str(r["outcome"])
            o.cheat_verdicts[what] = o.cheat_verdicts.get(what, 0) + 1
            if credited:
                o.credited_how[str(r["outcome"])] = o.credited_how.get(str(r["outcome"]), 0) + 1
            continue
        o.honest_total += 1
        by_check = r["outcome"] == "failed" or (
            r["excluded"] and (r["reason"] or "").startswith("verification:"))
        if by_check or r["was_revoked"]:
            o.honest_flagged += 1
            o.flagged_why.append(f"{r['who']} round {r['round']}: {(r['reason'] or '')[:160]}")
        o.honest_suspect += why.startswith(SUSPECT)
        if r["status"] == "accepted" and not r["is_replica"]:
            o.honest_steps += int(r["steps"] or 0)
            o.honest_seconds += float(r["seconds"] or 0.0)
    for m in VERIFIED.finditer(log):
        o.checked += int(m.group(2))
        o.verify_seconds += float(m.group(3))
    o.check_batches = loss_batches_for(steps_max or run.config.swarm.inner_steps, VerifyConfig())
    return o


def swarm_run(base: Run, work: Path, kind: str, norm: float, round_seconds: float,
              keep: bool, tag: str = "") -> Outcome:
    """One run: HONEST workers, plus CHEATS freeloaders of `kind` unless it is "honest"
    (`tag` tells repeated runs of one kind apart)."""
    cheats = [] if kind == "honest" else [f"{kind}-{i + 1}" for i in range(CHEATS)]
    volunteers = HONEST + len(cheats)
    run = prepare(base, work / f"{kind}{tag}", min_contributions=volunteers,
                  round_seconds=round_seconds)
    rounds = run.config.swarm.rounds
    timeout = rounds * round_seconds * 2 + 120
    logs = work / f"{kind}{tag}-logs"
    t0 = time.monotonic()
    with LocalSwarm(run.dir, logs) as swarm:
        swarm.serve()
        names = [f"honest-{i + 1}" for i in range(HONEST)]
        for n in names:
            swarm.join(n)
        for n in cheats:
            swarm.spawn(n, [sys.executable, str(FREELOADER), swarm.url, f"{norm:.6g}", n,
                            "--kind", kind, "--run-dir", str(run.dir)])
        deadline = time.monotonic() + timeout
        for n in names + cheats:
            try:
                code = swarm.procs[n].wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{kind}: {n} did not finish within {timeout:.0f}s: "
                                   f"{swarm.log(n)[-1500:]}") from None
            if code != 0:
                raise RuntimeError(f"{kind}: {n} exited with {code}: {swarm.log(n)[-1500:]}")
        st = swarm.status()
        if not st.finished:
            raise RuntimeError(f"{kind}: the run did not finish: round {st.round}")
    minutes = (time.monotonic() - t0) / 60
    o = tally(run, kind, swarm.log("coordinator"), set(cheats))
    o.minutes, o.loss = minutes, held_out(run, rounds)
    if not keep:
        shutil.rmtree(run.dir, ignore_errors=True)
    return o


def pct(a: int | float, b: int | float) -> str:
    return f"{100 * a / b:.1f}%" if b else "n/a"


def report(outcomes: list[Outcome], step_seconds: float, norm: float, a: argparse.Namespace,
           base: Run, started: float, load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    honest = [o.loss for o in outcomes if o.kind == "honest"]
    ref = sum(honest) / len(honest) if honest else None
    cheating = [o for o in outcomes if o.kind != "honest"]
    sw, tc = base.config.swarm, base.config.train
    head = "# Freeloaders against the verification (issue 21)"
    lines = [
        f"{head}{': ' + a.label if a.label else ''}", "",
        f"`bench/freeloaders.py`, {datetime.date.today().isoformat()}, "
        f"{(time.monotonic() - started) / 60:.1f} min in all. Machine: {machine()}; load "
        f"average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end.", "",
        "    " + shlex.join(["python", *sys.argv]), "",
        f"Runs: tiny preset (bundled corpus, {len(base.index.train)} train shards), "
        f"{sw.rounds} rounds x H = {sw.inner_steps}, batch {tc.batch_size} x {tc.seq_len}, "
        f"warm start {sw.warm_start:g}, stop-and-wait, int8, verify on, {HONEST} honest "
        f"workers + {CHEATS} freeloaders of one kind; every round waits for all. Noise norm "
        f"{norm:.4g} (one honest lease's delta from checkpoint 0); one training step alone on "
        f"one thread: {1000 * step_seconds:.1f} ms; loss check: k = "
        f"{loss_batches_for(sw.inner_steps)} lease + k control batches "
        f"(nominal cost 4k/3H = {4 * loss_batches_for(sw.inner_steps) / (3 * sw.inner_steps):.1%}"
        " per contribution)."
        + (f" Held-out reference: the mean of {len(honest)} honest-only runs, "
           f"{ref:.4f} (spread {min(honest):.4f} to {max(honest):.4f})." if honest else ""),
        "",
        "| run | freeloading contributions | credited | without credit | their verdicts | "
        "honest | flagged | suspect | checks (s) | full / lease only / none | copies | "
        "cost measured | cost count | cost, ledger s | held-out | vs honest | min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        ratio = o.loss / ref if ref else float("nan")
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(o.cheat_verdicts.items())) or "-"
        cheat = (f"{o.cheat_total} | {o.cheat_credited} | "
                 f"{pct(o.cheat_total - o.cheat_credited, o.cheat_total)} | {verdicts}") \
            if o.kind != "honest" else "- | - | - | -"
        lines.append(
            f"| {o.kind} | {cheat} | {o.honest_total} | {o.honest_flagged} | "
            f"{o.honest_suspect} | {o.verify_seconds:.1f} | "
            f"{o.checks_full} / {o.checks_lease} / {o.checks_none} | {o.copies} | "
            f"{o.cost_measured(step_seconds):.1%} | "
            f"{o.cost_count():.1%} | {o.cost_ledger():.1%} | {o.loss:.4f} | {ratio:.3f} | "
            f"{o.minutes:.1f} |")
    lines.append("")
    if cheating:
        ct = sum(o.cheat_total for o in cheating)
        cc = sum(o.cheat_credited for o in cheating)
        ht = sum(o.honest_total for o in cheating)
        hf = sum(o.honest_flagged for o in cheating)
        cost_m = max(o.cost_measured(step_seconds) for o in cheating)
        cost_c = max(o.cost_count() for o in cheating)
        worst = max(cheating, key=lambda o: o.loss)
        ratio = worst.loss / ref if ref else float("nan")

        def verdict(ok: bool) -> str:
            return "**met**" if ok else "**missed**"

        uncredited = (ct - cc) / ct if ct else float("nan")
        flagged = hf / ht if ht else float("nan")
        lines += [
            f"Targets over the {len(cheating)} cheating run(s) "
            f"({', '.join(o.kind for o in cheating)}):", "",
            "| target | measured | |", "|---|---|---|",
            f"| >= 95% of freeloading contributions get no credit | {ct - cc} of {ct} "
            f"({pct(ct - cc, ct)}) | {verdict(uncredited >= MIN_UNCREDITED)} |",
            f"| <= 1% of honest contributions flagged (160 or more) | {hf} of {ht} "
            f"({pct(hf, ht)}) | {verdict(flagged <= MAX_FLAGGED and ht >= MIN_HONEST)}"
            f"{'' if ht >= MIN_HONEST else f' (only {ht} honest contributions)'} |",
            f"| verification <= 10% of the training compute | worst run: {cost_m:.1%} "
            f"measured, {cost_c:.1%} counted | {verdict(max(cost_m, cost_c) <= MAX_COST)} |",
            f"| held-out loss <= 1.03x honest-only | worst: {worst.kind}, {ratio:.3f}x | "
            f"{verdict(ratio <= MAX_LOSS_RATIO)} |", "",
        ]
    notes = []
    for o in cheating:
        if o.credited_how:
            notes.append(f"- {o.kind}: credited freeloading contributions by verdict: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(o.credited_how.items())))
    for o in outcomes:
        for why in o.flagged_why:
            notes.append(f"- {o.kind} run, honest flagged: {why}")
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--inner-steps", type=int, default=200, help="H")
    p.add_argument("--kinds", help="comma list of " + ", ".join(KINDS) + " (default: all)")
    p.add_argument("--warm-start", type=float, default=0.0,
                   help="the run's warm start share (0, as the tests' tiny run)")
    p.add_argument("--round-seconds", type=float, default=600.0,
                   help="a round's deadline (rounds close when all volunteers reported)")
    p.add_argument("--honest-runs", type=int, default=2,
                   help="honest-only runs, the reference of the held-out ratio (their mean: "
                        "the same run twice differs by a percent or two, as leases go to "
                        "whoever asks first)")
    p.add_argument("--no-honest", action="store_true", help="skip the honest-only runs")
    p.add_argument("--work", type=Path, help="runs and logs here (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "freeloaders.md")
    p.add_argument("--append", action="store_true", help="append to --out, not replace it")
    p.add_argument("--label", default="", help="a title for this result in --out")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 rounds, H 30, noise and copy (unless --kinds is given)")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.inner_steps = 3, 30
    if a.kinds is None:
        a.kinds = "noise,copy" if a.quick else ",".join(KINDS)
    kinds = [k for k in a.kinds.split(",") if k]
    if bad := [k for k in kinds if k not in KINDS]:
        p.error(f"unknown kinds {bad}: choose among {', '.join(KINDS)}")
    started, load0 = time.monotonic(), os.getloadavg()
    work = a.work or Path(tempfile.mkdtemp(prefix="crowdtrain-freeloaders-"))
    work.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    try:
        base = make_base(work, a.rounds, a.inner_steps, a.warm_start)
        norm, step_seconds = honest_lease(base)
        print(f"tiny run, {a.rounds} rounds x H {a.inner_steps}; honest delta norm {norm:.4g}, "
              f"{1000 * step_seconds:.1f} ms a step alone; work in {work}", flush=True)
        plan = [("honest", f"-{i + 1}" if i else "")
                for i in range(0 if a.no_honest else a.honest_runs)] + [(k, "") for k in kinds]
        for kind, tag in plan:
            o = swarm_run(base, work, kind, norm, a.round_seconds, a.keep, tag)
            outcomes.append(o)
            print(f"{kind}: freeloading {o.cheat_total}, credited {o.cheat_credited}; honest "
                  f"{o.honest_total}, flagged {o.honest_flagged}; checks {o.verify_seconds:.1f}s "
                  f"({o.cost_measured(step_seconds):.1%} measured, {o.cost_count():.1%} "
                  f"counted); held-out {o.loss:.4f}; {o.minutes:.1f} min", flush=True)
        text = report(outcomes, step_seconds, norm, a, base, started, (load0, os.getloadavg()))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.append and a.out.is_file():
        a.out.write_text(a.out.read_text().rstrip("\n") + "\n\n" + text + "\n")
    else:
        a.out.write_text(text + "\n")
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
