"""What replicated leases cost, by run length: the trust policy of coordinator/verification.py
simulated over many runs (issue 21's 10% target), next to bench/freeloaders.py's real
processes, whose single runs vary by several points of cost with who asks for a lease first.

The simulation follows the coordinator's rules (rules._new_lease, closecheck.RoundChecker):
every round each volunteer asks for one lease, in a random order; a volunteer takes the copy
of another's lease of the round whose copy is wanted and not yet made, if there is one, else a
new lease whose copy is wanted with `replication_probability(trust)` (after a suspect result:
always while unconfirmed, else at the newcomer's rate). In the close, two honest copies agree
and confirm both volunteers; a freeloader of the `half` kind (passes the loss check, fails
against an honest copy) is caught by an honest copy and then drawn at the newcomer's rate, two
half freeloaders agree with each other (but an agreement with a caught one confirms nobody, a
confirmation counts only while its confirmer is not caught, and a caught one is restored only
by a partner a third volunteer confirmed);
freeloaders of the other kinds fail the loss check every round and are never copied. Honest
contributions are suspect (below the round's medians only) with probability `--suspect`
(measured: 0 to 6 of 64 in 16 rounds, 0 to 3 of 128 in 32).

Cost, as bench/freeloaders.py counts it: the training of honest copies whose original was
honest too (the pair is aggregated at half weight: one lease's data for two leases' work),
plus the loss checks (4k forward passes per checked contribution, k = 4 at H = 200; a
freeloader's check counted at `--freeloader-check` of that: none for a sure copy, half for
noise), over the honest volunteers' other training (3 forward-equivalents a step).

    python bench/replication_cost.py                      # 4 honest + 2 half, 8/16/32/100 rounds
    python bench/replication_cost.py --trusted 0.03 --floor 0.01
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crowdtrain.coordinator import verification as V  # noqa: E402


@dataclasses.dataclass
class Volunteer:
    honest: bool
    half: bool = False          # a freeloader that passes the loss check (half the steps)
    state: V.TrustState = dataclasses.field(default_factory=V.TrustState)
    caught: bool = False
    failed: bool = False        # its last contribution failed an absolute test
    suspect: bool = False
    confirmers: list[int] = dataclasses.field(default_factory=list)


def wants_copy(v: Volunteer, vols: list[Volunteer], rng: np.random.Generator,
               cfg: V.VerifyConfig) -> bool:
    """closecheck.RoundChecker.wants_copy on the simulated state (confirmations count while
    their confirmer is not caught: Ledger.confirmations)."""
    if v.failed:
        return False
    confirmed = sum(not vols[c].caught for c in v.confirmers)
    state = V.TrustState() if v.caught else dataclasses.replace(v.state, replicas=confirmed)
    if v.suspect:
        if state.replicas == 0:
            return True
        state = V.TrustState()
    return rng.random() < V.replication_probability(state, cfg)


def one_run(rounds: int, honest: int, half: int, other: int, suspect: float, h: int,
            cfg: V.VerifyConfig, freeloader_check: float,
            rng: np.random.Generator) -> tuple[float, float]:
    """One simulated run: its verification cost over the honest volunteers' own training, and
    the share of the half freeloaders' contributions credited at its end (a catch revokes a
    volunteer's credit so far and withholds it after, so only one never caught keeps any)."""
    vols = [Volunteer(True) for _ in range(honest)]
    vols += [Volunteer(False, half=True) for _ in range(half)]
    vols += [Volunteer(False) for _ in range(other)]
    copies, own, checks = 0, 0, 0.0
    k = V.loss_batches_for(h, cfg)
    for _ in range(rounds):
        wanted: list[int] = []  # owners of leases whose copy is wanted and not yet made
        copier_of: dict[int, int] = {}  # original's owner -> the copier
        for i in (int(x) for x in rng.permutation(len(vols))):
            j = next((o for o in wanted if o != i), None)
            if j is not None:
                wanted.remove(j)
                copier_of[j] = i
            elif wants_copy(vols[i], vols, rng, cfg):
                wanted.append(i)
        copiers = set(copier_of.values())
        for i, v in enumerate(vols):
            checks += 4 * k * (1.0 if v.honest else freeloader_check)
            if v.honest:
                original = next((o for o, c in copier_of.items() if c == i), None)
                if original is not None and vols[original].honest:
                    copies += 1
                else:
                    own += 1
        for a, b in copier_of.items():
            va, vb = vols[a], vols[b]
            if (va.honest and vb.honest) or (va.half and vb.half):  # they agree
                vouched = [sum(not vols[c].caught for c in x.confirmers) > 0 for x in (va, vb)]
                for (v, w, idx), ok in zip(((va, vb, b), (vb, va, a)),
                                           (vouched[1], vouched[0]), strict=True):
                    agreed = not w.caught and (not v.caught or ok)
                    v.state = V.record_result(v.state, True, replicated=agreed)
                    if agreed:
                        v.confirmers.append(idx)
                        v.caught = False
                    v.suspect = False
                continue
            for v in (va, vb):
                if v.half:
                    v.caught = True
                    v.state = V.record_result(v.state, False)
                elif v.honest:
                    v.state = V.record_result(v.state, True)
                    v.suspect = False
                else:
                    v.failed = True
        for i, v in enumerate(vols):
            if i in copier_of or i in copiers:
                continue
            if v.honest:
                v.suspect = bool(rng.random() < suspect)
                if not v.suspect:
                    v.state = V.record_result(v.state, True)
            elif v.half:
                v.state = V.record_result(v.state, True)
            else:
                v.failed = True
                v.state = V.record_result(v.state, False)
    train = 3 * h * own
    halves = [v for v in vols if v.half]
    credited = sum(not v.caught for v in halves) / len(halves) if halves else float("nan")
    return (3 * h * copies + checks) / train if train else float("nan"), credited


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", default="8,16,32,100", help="comma list of run lengths")
    p.add_argument("--honest", type=int, default=4)
    p.add_argument("--half", type=int, default=2, help="freeloaders of the half kind")
    p.add_argument("--other", type=int, default=0,
                   help="freeloaders of the kinds the loss check fails (never copied)")
    p.add_argument("--suspect", type=float, default=0.04,
                   help="share of honest contributions suspect (measured: 0-6 of 64)")
    p.add_argument("--h", type=int, default=200, help="inner steps H")
    p.add_argument("--freeloader-check", type=float, default=1.0,
                   help="a freeloader's loss check, as a share of a full one")
    p.add_argument("--new", type=float, default=V.VerifyConfig.replicate_new)
    p.add_argument("--trusted", type=float, default=V.VerifyConfig.replicate_trusted)
    p.add_argument("--floor", type=float, default=V.VerifyConfig.replicate_min)
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = V.VerifyConfig(replicate_new=a.new, replicate_trusted=a.trusted, replicate_min=a.floor)
    rng = np.random.default_rng(a.seed)
    print(f"{a.honest} honest + {a.half} half + {a.other} other freeloaders, H = {a.h}, "
          f"k = {V.loss_batches_for(a.h, cfg)}; replicate new {a.new}, trusted {a.trusted}, "
          f"floor {a.floor}; suspect {a.suspect}; {a.runs} runs each")
    print("| rounds | mean cost | median | 90th percentile | runs over 10% | half freeloaders' "
          "contributions credited |")
    print("|---|---|---|---|---|---|")
    for rounds in (int(r) for r in a.rounds.split(",")):
        runs = [one_run(rounds, a.honest, a.half, a.other, a.suspect, a.h, cfg,
                        a.freeloader_check, rng) for _ in range(a.runs)]
        costs = [c for c, _ in runs]
        over = sum(c > 0.10 for c in costs) / len(costs)
        credited = statistics.fmean(x for _, x in runs) if a.half else float("nan")
        print(f"| {rounds} | {statistics.fmean(costs):.1%} | {statistics.median(costs):.1%} | "
              f"{float(np.quantile(costs, 0.9)):.1%} | {over:.0%} | {credited:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
