"""The contribution checks of a round's close (`init --verify`, issue 21): before a round is
aggregated, every accepted contribution is checked by `verification.check_round` on batches
this module draws from the coordinator's own data (a secret sample of its lease's batches and
control batches it was not leased), and the outcome goes in the ledger: failed ones are left
out of the aggregate and get no credit, valid and failed ones move the volunteer's trust.
The math of the checks is coordinator/verification.py; the rules deciding a close are
coordinator/rules.py, which calls `RoundChecker.check` from `close_round`."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from crowdtrain.coordinator import verification as V
from crowdtrain.coordinator.payloads import open_payload
from crowdtrain.run.data import mask_name
from crowdtrain.run.folder import Run
from crowdtrain.run.ledger import Ledger
from crowdtrain.wire import codecs

log = logging.getLogger(__name__)

# the ledger's meta key of the verification's secret seed (never sent to anyone): which of a
# lease's steps the loss check measures, and the control batches' shard and seed
VERIFY_SECRET = "verify_secret"
# a contribution trained ahead or late that fails the round-relative rule is still credited
# provisionally above these shares of the round's median gain and specificity (measured:
# honest ones ahead down to 0.27x and 0.19x; noise passing the absolute tests, 0.04x gain)
AHEAD_GAIN_RATIO = 0.1
# the reason of a contribution that lost to the copy of its lease
CAUGHT = "the copy of its lease by another volunteer disagrees"
# the credit of a volunteer caught by a replica stays withheld until a copy agrees with it
WITHHELD = ("credit withheld: a replica caught this volunteer; a copy of a later lease that "
            "agrees restores its credit from then on")
# the note of a contribution that passed the absolute checks but not the round-relative ones,
# in a run that can copy leases: credited provisionally, its volunteer's next lease copied
SUSPECT = "provisional: below the round's reference, its next lease is copied to check"
AHEAD_SPECIFICITY_RATIO = 0.05


@dataclass(frozen=True)
class ReplicaPair:
    """One side of a replicated lease in a close: the index of the other side, whether the
    two agreed, whether this side lost a disagreement, and the note for the ledger."""

    other: int
    agreed: bool = False
    lost: bool = False
    note: str = ""


class RoundChecker:
    """Checks a closing round's contributions for one run; keeps a model of the run's
    architecture and the memory-mapped shards between rounds."""

    def __init__(self, run: Run, ledger: Ledger, shapes: dict[str, tuple[int, ...]]) -> None:
        self.run, self.ledger, self.shapes = run, ledger, shapes
        self._vmodel: torch.nn.Module | None = None
        self._vshards: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def wants_copy(self, volunteer_id: int, key: int) -> bool:
        """Whether a new fresh lease of this volunteer gets a copy: BOINC's adaptive
        replication (`verification.should_replicate` on its trust, drawn with the secret seed
        and `key`, unique per lease). When its last checked contribution is suspect (below the
        round's reference only): always while no copy has confirmed its work yet, else as
        often as a newcomer's until a result is back above the reference (honest volunteers
        dip below the round's medians now and then: measured, 0 to 6 of 64 honest
        contributions in 16 rounds of bench/freeloaders.py, each forced copy then costing a
        whole lease)."""
        last = self.ledger.last_verification(volunteer_id)
        if last is not None and last["verified"] == "failed" and \
                CAUGHT not in (last["reason"] or ""):
            return False  # it fails the checks as it is: a copy would waste another's work
        # caught: as often as a newcomer, until a copy agrees (its credit is withheld meanwhile)
        # confirmed: by a copy whose volunteer has not been caught since (`Ledger.confirmations`)
        state = V.TrustState() if self.ledger.caught(volunteer_id) else \
            replace(V.TrustState(*self.ledger.trust(volunteer_id)),
                    replicas=self.ledger.confirmations(volunteer_id))
        if last is not None and (last["reason"] or "").startswith(SUSPECT):
            if state.replicas == 0:
                return True
            state = V.TrustState()
        return V.should_replicate(state, self._secret(), key)

    def aggregation_weights(self, rows) -> list[float]:
        """Each contribution's weight in the round's mean: its tokens, halved for both sides
        of a replicated lease aggregated together (a copy checks the work, it is not new
        data: the pair weighs as one lease, or its shard would count twice). Credit is not
        touched: both volunteers did the work."""
        leases = {r["lease_id"]: self.ledger.lease(r["lease_id"]) for r in rows
                  if r["lease_id"] is not None}
        paired = {lease["replica_of"] for lease in leases.values()
                  if lease is not None and lease["replica_of"] in leases}
        paired |= {i for i, lease in leases.items()
                   if lease is not None and lease["replica_of"] in paired}
        return [float(r["weight"]) * (0.5 if r["lease_id"] in paired else 1.0) for r in rows]

    def _secret(self) -> int:
        return int(self.ledger.secret_value(VERIFY_SECRET), 16) & (2**62 - 1)

    def check(self, rnd: int, rows, theta: dict[str, torch.Tensor]) -> None:
        """Check every accepted contribution of round `rnd` before it is aggregated (the
        close, off the request path): `verification.check_round` on the round's parameters
        `theta`, with each contribution's loss check on a sample of its lease's batches and on
        control batches, and its similarity with the round's others, the previous round's
        contributions and the previous published update. The outcome goes in the ledger:

        - failed: left out of the aggregate exactly as robust aggregation's refusals are
          (excluded, the reason after "verification:"), so it gets no credit;
        - valid: passed the round-relative rule (the round's medians as reference);
        - provisional: credited, but the check could not decide: the round had fewer than
          `VerifyConfig.min_reference` measured contributions for a reference (then only the
          absolute tests ran: the loss must drop on the lease's own batches, and more than on
          the control's), or the check could not run at all (its lease unknown, an error).
          Nothing honest is lost that way; a provisional result does not move the
          volunteer's trust.

        Valid and failed results update the volunteer's trust (streak, valid, failures:
        `verification.record_result`). Late contributions (reason "late: ...", trained for
        round `rnd` - 1 from theta_{rnd-1}) and those trained ahead (overlapped: the first
        steps at the worker's own parameters, before the fold) are checked like the others,
        against this round's theta and in its reference: a contribution is its lease's own
        progress wherever it started (ARCHITECTURE.md, overlapped rounds), so applying it
        must still lower the loss on its lease's batches, and more than elsewhere (the
        absolute tests: noise fails them). But how much it lowers it depends on where it
        started, so one that fails only the round-relative part is credited provisionally
        (`_not_from_theta`; measured case in the code). A round closed again after a crash
        keeps the outcomes already recorded (the check is deterministic anyway)."""
        if all(r["verified"] is not None for r in rows):
            return
        cfg = V.VerifyConfig()
        started = time.perf_counter()
        sources, checked, contribs, previous, leases = [], [], [], [], []
        try:
            secret = self._secret()
            for r in rows:
                lease = self.ledger.lease(r["lease_id"]) if r["lease_id"] is not None else None
                if lease is None:
                    self._record_verdict(r, "provisional", "provisional: no lease to check "
                                                           "the contribution against")
                    continue
                src = open_payload(self.run.dir / r["path"], self.shapes)
                sources.append(src)
                lb, cb, frac = self._check_batches(lease, r["steps"], secret, cfg)
                contribs.append(V.Contribution(src, lb, cb, frac))
                checked.append(r)
                leases.append(lease)
            if not checked:
                return
            # a copy whose original is here too: both sides know the other (`twin`)
            where = {int(lease["id"]): i for i, lease in enumerate(leases)}
            twins = {where[lease["replica_of"]]: i for i, lease in enumerate(leases)
                     if lease["replica_of"] in where}
            twins |= {b: a for a, b in twins.items()}
            contribs = [replace(c, copy=lease["replica_of"] in where, twin=twins.get(i))
                        for i, (c, lease) in enumerate(zip(contribs, leases, strict=True))]
            for r in self.ledger.accepted(rnd - 1) if rnd > 0 else []:
                if r["excluded"]:  # left out (noise is near-orthogonal to everything: it
                    continue  # would drag the earlier deltas' median cosine down)
                p = self.run.dir / r["path"] if r["path"] else None
                if p is not None and p.is_file():
                    sources.append(open_payload(p, self.shapes))
                    previous.append(sources[-1])
            if rnd > 0 and self.run.update_path(rnd - 1).is_file():
                # u = theta_r - theta_{r-1}: a replayed pseudo-gradient would point along -u
                update, _ = codecs.from_bytes(self.run.update_path(rnd - 1).read_bytes(),
                                              self.shapes)
                previous.append({k: -v for k, v in update.items()})
            verdicts = V.check_round(self._model(), theta, contribs, previous,
                                     cfg)
            pairs = self._replica_pairs(checked, leases, contribs, verdicts, cfg)
        except Exception as e:  # the check itself broke: nothing honest is lost for it
            log.exception("round %d: the verification could not run", rnd)
            for r in rows:
                if r["verified"] is None:
                    self._record_verdict(r, "provisional", "provisional: the verification "
                                         f"could not run ({type(e).__name__})")
            return
        finally:
            for src in sources:
                if hasattr(src, "close"):
                    src.close()
        ids = [r["id"] for r in checked]
        for i, (r, v) in enumerate(zip(checked, verdicts, strict=True)):
            near = int(v.numbers.get("sim_nearest", -1))
            pair = pairs.get(i)
            if not v.ok and pair is not None and near == pair.other:
                v = v.without_near_copy()  # its twin is its nearest: the point of a copy
            if pair is not None and pair.lost:
                v = V.Verdict(False, (V.Finding(pair.note),), v.numbers)
            if not v.ok and 0 <= near < len(checked) and ids[near] > r["id"]:
                # a near-copy within the round: only the later upload of the pair is the copy
                v = v.without_near_copy()
            relative = v.relative
            if relative and pair is not None and pair.agreed:
                v = V.Verdict(True, (), v.numbers)  # a copy of its lease confirmed the work
            ok, reason = v.ok, v.reason
            if relative and self._not_from_theta(rnd, r) and self._near_the_round(v.numbers):
                # trained ahead or late, it failed only the round-relative part: measured in a
                # real overlapped swarm (3 honest workers, every lease ahead), one honest
                # volunteer's contributions had 0.27x the round's median gain (0.09 vs 0.33)
                # and 0.19x its median specificity, while the absolute tests held: not
                # enough to leave honest work out, so it is credited provisionally, within
                # looser bounds (AHEAD_GAIN_RATIO: noise that passed the absolute tests by
                # chance in the same runs had at most 0.04x the median gain)
                outcome, note = "provisional", (
                    "provisional: trained ahead or late, not from this round's model; it "
                    f"passed the absolute checks, not the round-relative one ({reason})")
                ok = True
            elif relative and self.run.config.swarm.fresh_leases and self._useful(v.numbers):
                # only below the round's medians, which vary with the lease's shard and the
                # stage of training (measured: honest ones down to 0.04x the median
                # specificity, 0.45x the median gain, from a random model): suspect, not
                # failed; credited for now and the volunteer's next lease is copied
                # (`wants_copy`), which settles it. Almost no gain at all still fails.
                outcome, note = "provisional", f"{SUSPECT}: {reason}"
                ok = True
            elif not ok:
                outcome, note = "failed", f"verification: {reason}"
            elif "ref_gain" not in v.numbers:
                outcome, note = "provisional", (
                    f"provisional: {len(checked)} contribution(s) in the round, fewer than "
                    f"{cfg.min_reference} of them measured in full for its reference; credited "
                    "on the absolute checks")
            else:
                outcome, note = "valid", None
            if pair is not None and pair.note and outcome != "failed":
                note = pair.note if note is None else f"{note}; {pair.note}"
            if r["verified"] is None:
                vid = r["volunteer_id"]
                agreed = pair is not None and pair.agreed
                self._record_verdict(r, outcome, note, replicated=agreed,
                                     confirmed_by=checked[pair.other]["volunteer_id"]
                                     if agreed else None)
                if pair is not None and pair.lost:
                    self.ledger.set_caught(vid, True)
                    n = self.ledger.revoke_credit(vid, (
                        f"credit revoked: caught by a replica in round {rnd}"))
                    log.warning("round %d: volunteer %d caught by a replica; credit of %d "
                                "contribution(s) revoked", rnd, vid, n)
                elif pair is not None and pair.agreed and outcome != "failed":
                    self.ledger.set_caught(vid, False)  # its credit counts again from here
                elif self.ledger.caught(vid):
                    self.ledger.revoke_credit(vid, WITHHELD)
            if not ok:
                log.warning("round %d: contribution %d left out: %s", rnd, r["id"], reason)
        log.info("round %d: verified %d contribution(s) in %.2fs", rnd, len(checked),
                 time.perf_counter() - started)

    @staticmethod
    def _useful(nums: dict[str, float]) -> bool:
        """Whether a contribution's gain is at least AHEAD_GAIN_RATIO of the round's median
        (for its share of the steps): noise that passes the absolute tests by chance does not
        reach it (measured at most 0.04x)."""
        return nums.get("gain", 0.0) >= AHEAD_GAIN_RATIO * min(
            1.0, nums.get("steps_fraction", 1.0)) * nums.get("ref_gain", 0.0)

    @staticmethod
    def _near_the_round(nums: dict[str, float]) -> bool:
        """The looser round-relative bounds of a contribution trained ahead or late."""
        need = AHEAD_GAIN_RATIO * min(1.0, nums.get("steps_fraction", 1.0)) * \
            nums.get("ref_gain", 0.0)
        return nums.get("gain", 0.0) >= need and \
            nums.get("specificity", 0.0) >= AHEAD_SPECIFICITY_RATIO * \
            nums.get("ref_specificity", 0.0)

    def _not_from_theta(self, rnd: int, row) -> bool:
        """Whether contribution `row` of round `rnd` was not trained from theta_rnd: late
        (its lease's round closed before it arrived) or trained ahead (its lease was given
        before its round opened: the first steps at the worker's own parameters)."""
        lease = self.ledger.lease(row["lease_id"]) if row["lease_id"] is not None else None
        if lease is None or lease["round"] < rnd:
            return True
        opened = self.ledger.round_row(lease["round"])
        return opened is not None and lease["issued_at"] < opened["opened_at"]

    def _replica_pairs(self, checked, leases, contribs, verdicts, cfg: V.VerifyConfig
                       ) -> dict[int, ReplicaPair]:
        """The copies among the checked contributions (a lease and its copy, `replica_of`,
        both in this close), compared (`verification.compare_replicas`): by index in
        `checked`, each side's outcome. Both must report all the lease's steps, else the pair
        is inconclusive (noted, nobody loses). When they disagree, the one whose loss drop on
        the lease's batches (the same secret batches for both) is the lower has lost: an
        honest copy beats one that trained half the steps, or on other data."""
        where = {int(lease["id"]): i for i, lease in enumerate(leases)}
        pairs: dict[int, ReplicaPair] = {}
        for b, lease in enumerate(leases):
            a = where.get(lease["replica_of"]) if lease["replica_of"] is not None else None
            if a is None:
                continue
            ra, rb = checked[a], checked[b]
            full = all(int(r["steps"] or 0) >= int(lease["max_steps"]) for r in (ra, rb))
            if not full:
                note = (f"replicated: lease {leases[a]['id']} and its copy {lease['id']} not "
                        "both trained in full; inconclusive")
                pairs[a], pairs[b] = ReplicaPair(b, note=note), ReplicaPair(a, note=note)
                continue
            v = V.compare_replicas(contribs[a].delta, contribs[b].delta, cfg, self.shapes)
            if v.ok:
                # an agreement confirms a side only if the other side's volunteer is not
                # caught itself (two cheaters doing the same half work agree with each other;
                # what one confirmed counts no more once it is caught: `confirmations`), and
                # gives a caught side its credit back only if a third volunteer's copy has
                # confirmed the other side's work
                caught = [self.ledger.caught(r["volunteer_id"]) for r in (ra, rb)]
                vouched = [self.ledger.confirmations(r["volunteer_id"]) > 0 for r in (ra, rb)]
                note = (f"replicated: agrees with the copy of its lease (cosine "
                        f"{v.numbers.get('cosine', 1.0):.4f})")
                pairs[a] = ReplicaPair(b, agreed=not caught[1] and (not caught[0] or vouched[1]),
                                       note=note)
                pairs[b] = ReplicaPair(a, agreed=not caught[0] and (not caught[1] or vouched[0]),
                                       note=note)
                continue
            gain = [float(verdicts[i].numbers.get("gain", float("-inf"))) for i in (a, b)]
            lose, win = (a, b) if gain[0] < gain[1] else (b, a)
            note = (f"{CAUGHT} ({v.reason}) and its loss drop on the lease's batches is the lower "
                    f"({gain[0 if lose == a else 1]:.4g} vs {gain[0 if win == a else 1]:.4g})")
            pairs[lose] = ReplicaPair(win, lost=True, note=note)
            pairs[win] = ReplicaPair(lose, note="replicated: its copy disagreed and lost")
        return pairs

    def _record_verdict(self, row, outcome: str, note: str | None,
                        replicated: bool = False, confirmed_by: int | None = None) -> None:
        """The outcome in the ledger, with the volunteer's trust moved by a decided one
        (`replicated`: a copy of its lease, by volunteer `confirmed_by`, agreed)."""
        trust = None
        if outcome in ("valid", "failed"):
            state = V.record_result(V.TrustState(*self.ledger.trust(row["volunteer_id"])),
                                    outcome == "valid", replicated)
            trust = (state.streak, state.valid, state.failures, state.replicas)
        self.ledger.record_verification(row["id"], outcome, note, trust,
                                        confirmed_by if outcome != "failed" else None)

    def _model(self) -> torch.nn.Module:
        """A model of the run's architecture for the loss checks, made once; its parameters
        are overwritten by each check (the evaluator's model is another)."""
        if self._vmodel is None:
            self._vmodel = self.run.build_model().eval()
        return self._vmodel

    def _tokens(self, entry, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        """A shard's tokens (and loss mask), memory-mapped once: the coordinator's own data
        files, checked when the run loaded."""
        cache = self._vshards
        if entry.name not in cache:
            toks = np.memmap(self.run.data_dir / entry.name, dtype=self.run.index.dtype,
                             mode="r")
            mask = np.memmap(self.run.data_dir / mask_name(entry.name), dtype=np.uint8,
                             mode="r") if entry.mask_sha256 else None
            cache[entry.name] = (toks, mask)
        return cache[entry.name]

    def _check_batches(self, lease, steps: int | None, secret: int, cfg: V.VerifyConfig):
        """The loss check's batches of one contribution: k of its lease's own (shards, seed,
        steps drawn by the secret among the steps it reports) and k control batches on the
        same steps from a train shard it was not leased (chosen by the secret) or, with a
        single train shard, the held-out split, drawn with a secret seed; and the share of
        the lease's steps it reports."""
        index = self.run.index
        max_steps = int(lease["max_steps"])
        done = max(1, min(int(steps or max_steps), max_steps))
        k = V.loss_batches_for(max_steps, cfg)
        # a copy is measured on its original's batches: the two are compared
        key = int(lease["replica_of"] if lease["replica_of"] is not None else lease["id"])
        mine = V.check_steps(int(lease["start_step"]), done, k, secret + key)
        names = json.loads(lease["shards"])
        leased = [self._tokens(index.entry(n), "train") for n in names]
        others = [e for e in index.train if e.name not in names]
        rng = np.random.default_rng([secret, key])
        if others:
            control = [self._tokens(others[int(rng.integers(len(others)))], "train")]
        else:
            control = [self._tokens(e, "val") for e in index.val]
        bs, sl = self.run.config.train.batch_size, self.run.config.train.seq_len

        def batches(data, seed):
            masks = [m for _, m in data] if all(m is not None for _, m in data) else None
            return V.batches_at([t for t, _ in data], bs, sl, seed, mine, masks)

        return (batches(leased, int(lease["seed"])),
                batches(control, int(rng.integers(2**62))), done / max_steps)
