"""Credit only for real work: checks that tell a contribution that trained its lease from one
that did not (issue 21). Pure functions and small frozen classes, no ledger, no HTTP: the
coordinator's rules call them and store what they return.

A lease says which data to train on (one shard, a batch seed, the global steps
[start_step, start_step + max_steps)) and every batch is a pure function of that
(`run.data.get_batch`), so the coordinator can recompute any batch the volunteer saw. Three
independent checks use that, each cheap enough to run on every contribution or on a sample:

1. The loss check (`loss_check`, every contribution). Apply the contribution alone to the
   round's model, theta_r - scale * delta_i (with scale 1 and a lossless codec this is the
   volunteer's own local model), and measure the loss drop on a few of the lease's own batches
   (steps drawn with a secret seed, one per stratum of the step range) and on as many control
   batches the volunteer did not train on (a shard other than the leased one, or held-out).

       gain        = mean loss drop on the lease's batches
       specificity = gain - mean loss drop on the control batches

   Training moves the loss most on the very batches it saw (and on their shard's text), so an
   honest contribution has gain > 0 and specificity > 0. The rule is relative to the round, so
   it needs no tuning per model, data or stage of training: with the round's medians (most
   contributions honest) as reference,

       ok  iff  gain >= min_gain_ratio * median gain          (useful work at all)
           and  specificity >= min_specificity_ratio * median specificity   (on ITS lease)
           and  both are > 0,

   falling back to the two "> 0" tests alone when the round has fewer than
   `min_reference` measured contributions. The lease steps measured are drawn from the steps
   the volunteer reports; a lease cut short by its time budget scales the gain threshold by
   its fraction of the steps. Noise at the honest norm raises the loss (gain < 0);
   a delta trained on another shard generalises to the lease's batches about as well as to the
   control's (specificity ~ 0, or < 0 when the control is the shard it trained on); a copy of
   another volunteer's delta is trained on that volunteer's lease, so it fails the same way.
   Half the steps reported as all still shows most of the gain (the loss falls fastest in a
   lease's first steps): the loss check does not catch it reliably, replication does.

2. Replication (`compare_replicas`, on a sample the trust policy draws). The same lease is
   given to a second volunteer. Workers normally carry AdamW state and an error-feedback
   residual across rounds, so the two copies would differ by that private state. In a run
   that verifies (`init --verify`, dense codecs) EVERY lease on the open round is therefore
   FRESH (`Lease.fresh`): the worker starts it from the round's parameters theta_r with new
   AdamW state (step 0) and sends this lease's delta alone in the run's codec, with no error
   feedback; so a replicated lease looks like any other to the volunteer (it cannot train
   honestly only when watched), and its copy is another volunteer's lease on the same shard,
   seed and steps (`leases.replica_of`), measured on the same secret batches. Both copies
   must train all max_steps (a copy that reports fewer is inconclusive, not a failure). When
   the two disagree, the one whose loss drop on the lease's batches is the lower fails:
   a volunteer that trained half the steps loses to an honest copy. Leases trained ahead
   (overlapped runs) start from the worker's own parameters and sparse runs need the
   residual, so neither is fresh nor replicated: the loss check and the similarity check are
   theirs. The two deltas of honest copies differ
   only by floating-point nondeterminism: measured (bench/results/verification.md), thread
   counts change nothing on one CPU, the reduction order (micro-batches) ~1e-6 relative after
   100 steps, bf16 autocast vs fp32 ~4e-2; the thresholds (cosine >= 0.98, relative
   difference <= 0.2) sit 5x above that, and a half-steps delta (0.57-0.72) far outside.

3. Similarity (`similarity`, every contribution). Exact replays are already refused by the
   coordinator's sha256 of stored contributions; a perturbed copy of another volunteer's delta
   of the same round, or a perturbed replay of an earlier delta (the volunteer's own, another's,
   or a published update), is found by cosine similarity, computed blockwise from DeltaSources
   (one Gram matrix, never a whole contribution in memory). Honest deltas of one round share a
   common direction (median cosine ~0.75 early in training, ~0.36 later: measured), so the
   rule is relative too: flag a
   contribution whose distance 1 - max cosine to any other is below `copy_distance_ratio` times
   the round's median pairwise distance (or whose max cosine is above `copy_max_cosine`). The
   median is taken over the contributions that passed the loss check: a round's noise is
   near-orthogonal to everything and would drag it down.

The round medians assume most of a round's contributions are honest; where they are not, the
absolute tests (gain > 0, specificity > 0, cosine >= copy_max_cosine) still stand. With the
sparse codec a contribution is the top ~1% of (delta + the worker's decayed residual), not
this round's work alone: its loss check is weaker (small gains, compared only with the
round's other sparse contributions); fresh (replicated) leases have no residual and compare
as any codec's.

Trust (`TrustState`, `replication_probability`, `should_replicate`): BOINC's adaptive
replication. A volunteer is replicated with probability `replicate_new` until a replica has
confirmed its work once, then `replicate_trusted`, decaying with its streak of valid results
to `replicate_min`; a failure resets the streak and multiplies the probability. Decisions are
deterministic given (seed, lease id). A volunteer caught by a replica loses the credit of all
its contributions so far (their credit was provisional on this; the model keeps them), and
its credit stays withheld until a copy of a later lease agrees with it. Two volunteers doing
the same cheat send the same delta and agree, so a confirmation counts only while the one who
confirmed is not caught (the ledger's `confirmations`), and a caught volunteer's credit comes
back only through a copy by a volunteer that a third one has confirmed (closecheck).

How the coordinator uses the verdicts (coordinator/closecheck.py): an absolute failure (no
loss drop, no specificity, a cosine above `copy_max_cosine`) leaves the contribution out; a
failure of the round-relative rules only is suspect in a run that copies leases (credited
provisionally, the volunteer's next lease copied), because the round's medians vary with the
lease's shard and the stage of training (measured from a random model: honest contributions
down to 0.04x the median specificity and 0.45x the median gain; two honest deltas of one
shard late in training up to cosine 0.85 against a round median of 0.3); without copies
(sparse, overlapped) it fails as before.

Cost (`loss_check_cost`, `loss_batches_for`): the loss check is 2 forward passes on k lease
batches and k control batches, against 3 forward-equivalents (forward + backward) for each of
the lease's H training steps: cost = 4k / (3H), with k the most that fits `loss_budget` (3%)
and at least `min_batches` (4: 2.7% at H = 200). `check_round` runs the cheapest checks first:
the similarity check costs no forward pass, and a sure copy (`sure_copies`) is not
loss-checked at all; a delta that does not lower the loss on its lease's batches is not
measured on the control batches (half the passes). Replication's mean rate is 14% over a
volunteer's first 8 leases, 7.8% over its first 16 and 2.9% over its first 100
(`expected_replication`: probation costs most in short runs), so the total stays within 10%
of the swarm's training compute once volunteers stay for a while (bench/freeloaders.py
measures it).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from crowdtrain.coordinator.aggregation import DeltaSource, TensorSource, param_blocks, read_slice
from crowdtrain.errors import check_settings
from crowdtrain.run.data import get_batch
from crowdtrain.run.model import load_into, traveling_parameters

Batch = tuple[torch.Tensor, torch.Tensor]
Delta = Mapping[str, torch.Tensor] | DeltaSource
Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of the checks; every threshold is explained in the module docstring and
    measured in bench/results/verification.md."""

    # loss check
    lease_batches: int = 8            # lease batches measured (at most; see loss_batches_for)
    control_batches: int = 8          # control batches (another shard or held-out)
    min_batches: int = 4              # never fewer, whatever the budget says
    eval_rows: int = 16               # rows per forward pass
    delta_scale: float = 1.0          # the check applies theta_r - delta_scale * delta
    min_gain_ratio: float = 0.25      # gain >= this x the round's median gain
    min_specificity_ratio: float = 0.1  # specificity >= this x the round's median
    min_reference: int = 3            # measured contributions for a round reference
    loss_budget: float = 0.03         # the loss check's share of the swarm's training compute
    # replication
    replica_min_cosine: float = 0.98
    replica_max_rel_diff: float = 0.2
    replicate_new: float = 0.25       # probability while no replica has confirmed its work
    replicate_trusted: float = 0.05   # after the first confirmation, decaying with the streak
    replicate_min: float = 0.02       # the floor, for long-trusted volunteers
    streak_scale: float = 3.0         # p = replicate_new / (1 + streak / streak_scale)
    failure_boost: float = 0.0        # p x (1 + failure_boost x failures)
    # similarity
    copy_max_cosine: float = 0.99     # flag above this whatever the round looks like
    copy_distance_ratio: float = 0.35  # flag when 1 - cos < this x the median 1 - cos
    block_elems: int = 1 << 20        # values per block read from a source

    def __post_init__(self) -> None:
        checks = {
            "lease_batches": self.lease_batches >= 1,
            "control_batches": self.control_batches >= 1,
            "min_batches": 1 <= self.min_batches <= min(self.lease_batches,
                                                       self.control_batches),
            "eval_rows": self.eval_rows >= 1,
            "delta_scale": 0 < self.delta_scale <= 10,
            "min_gain_ratio": 0 <= self.min_gain_ratio <= 1,
            "min_specificity_ratio": 0 <= self.min_specificity_ratio <= 1,
            "min_reference": self.min_reference >= 1,
            "loss_budget": 0 < self.loss_budget <= 1,
            "replica_min_cosine": -1 <= self.replica_min_cosine <= 1,
            "replica_max_rel_diff": self.replica_max_rel_diff > 0,
            "replicate_new": 0 <= self.replicate_new <= 1,
            "replicate_trusted": 0 <= self.replicate_trusted <= self.replicate_new,
            "replicate_min": 0 <= self.replicate_min <= self.replicate_trusted,
            "streak_scale": self.streak_scale > 0,
            "failure_boost": self.failure_boost >= 0,
            "copy_max_cosine": -1 < self.copy_max_cosine <= 1,
            "copy_distance_ratio": 0 <= self.copy_distance_ratio < 1,
            "block_elems": self.block_elems >= 1,
        }
        check_settings("verification", checks, self)


@dataclass(frozen=True)
class Finding:
    """One failed test of a verdict: its words; whether it is round-relative (below the
    round's medians, or closer to another delta than the round's median pair) rather than
    absolute (no loss drop, no specificity, a cosine above copy_max_cosine); whether it is the
    similarity check's (a near-copy, which the close may resolve: the copy of a replicated
    lease is near its twin by design, and of a same-round pair only the later upload is the
    copy)."""

    text: str
    relative: bool = False
    near_copy: bool = False


@dataclass(frozen=True)
class Verdict:
    """One check's result: `ok`, what failed (none when ok), the numbers measured."""

    ok: bool
    findings: tuple[Finding, ...] = ()
    numbers: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The findings in words (empty when ok)."""
        return "; ".join(f.text for f in self.findings)

    @property
    def relative(self) -> bool:
        """Failed the round-relative tests only."""
        return not self.ok and bool(self.findings) and all(f.relative for f in self.findings)

    def without_near_copy(self) -> Verdict:
        """The verdict with the similarity check's near-copy findings dropped (ok if nothing
        else failed)."""
        rest = tuple(f for f in self.findings if not f.near_copy)
        return replace(self, ok=not rest, findings=rest)


def _failed(text: str, numbers: dict[str, float], relative: bool = False,
            near_copy: bool = False) -> Verdict:
    return Verdict(False, (Finding(text, relative, near_copy),), numbers)


# ------------------------------------------------------------------------------ cost


def loss_check_cost(lease_batches: int, control_batches: int, h: int) -> float:
    """Fraction of a lease's training compute the loss check spends: 2 forward passes (before
    and after) per measured batch, against ~3 forward-equivalents per training step."""
    return 2 * (lease_batches + control_batches) / (3 * max(1, h))


def loss_batches_for(h: int, cfg: VerifyConfig = VerifyConfig()) -> int:
    """Batches of each kind (lease, control) for a lease of `h` steps: as many as fit in
    `cfg.loss_budget` (4k / 3h <= budget), at most `cfg.lease_batches`, at least
    `cfg.min_batches` (short leases then cost more than the budget: say so in the report)."""
    k = math.floor(cfg.loss_budget * 3 * h / 4)
    return max(cfg.min_batches, min(cfg.lease_batches, cfg.control_batches, k))


# ------------------------------------------------------------------------------ batches


def check_steps(start_step: int, max_steps: int, k: int, secret: int) -> list[int]:
    """`k` global steps of the lease [start_step, start_step + max_steps) to measure, one drawn
    in each of k equal strata (every part of the lease is looked at), by `secret` (the
    coordinator's, never told to the volunteer, so it cannot train only those)."""
    if max_steps < 1 or k < 1:
        return []
    k = min(k, max_steps)
    rng = np.random.default_rng([secret & (2**63 - 1), start_step])
    edges = [start_step + (i * max_steps) // k for i in range(k + 1)]
    return [int(rng.integers(edges[i], edges[i + 1])) for i in range(k)]


def batches_at(shards: Sequence[np.ndarray], batch_size: int, seq_len: int, seed: int,
               steps: Sequence[int], masks: Sequence[np.ndarray] | None = None) -> list[Batch]:
    """The batches of `steps` as a worker holding `shards` with batch `seed` draws them: the
    lease's own (its shard and seed), or a control (another shard, or the held-out split, with
    the same seed and steps)."""
    return [get_batch(shards, batch_size, seq_len, seed, s, masks) for s in steps]


# ------------------------------------------------------------------------------ loss check


@torch.no_grad()
def batch_losses(model: torch.nn.Module, batches: Sequence[Batch], rows: int = 16) -> list[float]:
    """Mean next-token cross-entropy of each batch (targets of -100 left out), `rows` rows per
    forward pass, in eval mode (restored)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x, y in batches:
        total, count = 0.0, 0
        for a in range(0, x.size(0), rows):
            xa, ya = x[a:a + rows].to(device), y[a:a + rows].to(device)
            logits = model(input_ids=xa).logits.float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), ya.reshape(-1),
                                           reduction="sum", ignore_index=-100))
            count += int((ya != -100).sum())
        out.append(total / count if count else float("nan"))
    model.train(was)
    return out


def _as_source(delta: Delta) -> DeltaSource:
    return TensorSource(delta) if isinstance(delta, Mapping) else delta


@torch.no_grad()
def _load_moved(model: torch.nn.Module, theta: Mapping[str, torch.Tensor], delta: Delta,
                scale: float) -> None:
    """model <- theta - scale * delta (delta read one parameter at a time)."""
    src = _as_source(delta)
    for name, p in traveling_parameters(model):
        d = read_slice(src, name, 0, p.numel()).view(p.shape)
        p.copy_(theta[name].to(p.device, p.dtype) - scale * d.to(p.device, p.dtype))


@dataclass(frozen=True)
class LossMeasure:
    """What the loss check measured for one contribution (nats per token)."""

    lease_before: float
    lease_after: float
    control_before: float
    control_after: float
    gain_se: float  # standard error of `gain` (over the lease batches)
    batches: int

    @property
    def gain(self) -> float:
        return self.lease_before - self.lease_after

    @property
    def control_gain(self) -> float:
        return self.control_before - self.control_after

    @property
    def specificity(self) -> float:
        return self.gain - self.control_gain

    def numbers(self) -> dict[str, float]:
        return {"lease_before": self.lease_before, "lease_after": self.lease_after,
                "control_before": self.control_before, "control_after": self.control_after,
                "gain": self.gain, "control_gain": self.control_gain,
                "specificity": self.specificity, "gain_se": self.gain_se,
                "batches": float(self.batches)}


def measure_losses(model: torch.nn.Module, theta: Mapping[str, torch.Tensor], delta: Delta,
                   lease_batches: Sequence[Batch], control_batches: Sequence[Batch],
                   scale: float = 1.0, rows: int = 16, early_exit: bool = False) -> LossMeasure:
    """Losses of theta (the round's parameters, as `state_dict_for_save` names them) and of
    theta - scale * delta on the lease's batches and on the control batches. `model` is any
    module of the run's architecture: its parameters are overwritten, and left at theta.
    `early_exit`: when the loss does not drop on the lease's batches the contribution fails
    whatever the control says (`judge_loss`), so the control batches are not measured (their
    losses are nan): half the check's forward passes saved on noise and stale deltas."""
    if not lease_batches or not control_batches:
        raise ValueError("the loss check needs lease batches and control batches")
    load_into(model, theta)
    lb0 = batch_losses(model, lease_batches, rows)
    _load_moved(model, theta, delta, scale)
    lb1 = batch_losses(model, lease_batches, rows)
    gains = np.asarray(lb0) - np.asarray(lb1)
    se = float(gains.std(ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else float("nan")
    if early_exit and not float(np.mean(lb0)) - float(np.mean(lb1)) > 0:
        load_into(model, theta)
        return LossMeasure(float(np.mean(lb0)), float(np.mean(lb1)), math.nan, math.nan, se,
                           len(lease_batches))
    cb1 = batch_losses(model, control_batches, rows)
    load_into(model, theta)
    cb0 = batch_losses(model, control_batches, rows)
    return LossMeasure(float(np.mean(lb0)), float(np.mean(lb1)), float(np.mean(cb0)),
                       float(np.mean(cb1)), se, len(lease_batches))


@dataclass(frozen=True)
class Reference:
    """The round's medians the relative rule compares a contribution with."""

    gain: float
    specificity: float
    n: int


def round_reference(measures: Sequence[LossMeasure],
                    cfg: VerifyConfig = VerifyConfig()) -> Reference | None:
    """Median gain and specificity of a round's measured contributions (robust while most are
    honest); None with fewer than `cfg.min_reference` (then only the absolute tests apply)."""
    ok = [m for m in measures if math.isfinite(m.gain) and math.isfinite(m.specificity)]
    if len(ok) < cfg.min_reference:
        return None
    return Reference(statistics.median(m.gain for m in ok),
                     statistics.median(m.specificity for m in ok), len(ok))


def judge_loss(m: LossMeasure, cfg: VerifyConfig = VerifyConfig(),
               reference: Reference | None = None, steps_fraction: float = 1.0) -> Verdict:
    """The decision rule of the module docstring on one measured contribution.
    `steps_fraction`: the steps it reports over the lease's max_steps (a lease cut short by
    its time budget): the gain threshold scales by it (leniently: the loss falls fastest in
    the first steps, so an honest partial lease keeps more than its share of the gain)."""
    nums = m.numbers() | {"steps_fraction": steps_fraction}
    if not math.isfinite(m.gain):
        return _failed("the loss after the contribution is not finite", nums)
    if m.gain <= 0:
        return _failed(f"no loss drop on the lease's batches ({m.gain:+.4f} nats)", nums)
    if not math.isfinite(m.specificity):
        return _failed("the loss after the contribution is not finite", nums)
    if m.specificity <= 0:
        return _failed(f"the loss drops no more on the lease's batches than on others "
                       f"(specificity {m.specificity:+.4f} nats)", nums)
    if reference is not None:
        nums |= {"ref_gain": reference.gain, "ref_specificity": reference.specificity}
        need = cfg.min_gain_ratio * min(1.0, max(0.0, steps_fraction)) * reference.gain
        if reference.gain > 0 and m.gain < need:
            return _failed(f"loss drop {m.gain:.4f} below {need:.4f} "
                           f"({cfg.min_gain_ratio:g} x the round's median "
                           f"{reference.gain:.4f} x {steps_fraction:.2f} of the steps)",
                           nums, relative=True)
        if reference.specificity > 0 and \
                m.specificity < cfg.min_specificity_ratio * reference.specificity:
            return _failed(f"specificity {m.specificity:.4f} below "
                           f"{cfg.min_specificity_ratio:g} x the round's median "
                           f"{reference.specificity:.4f}: not trained on its lease", nums,
                           relative=True)
    return Verdict(True, (), nums)


def loss_check(model: torch.nn.Module, theta: Mapping[str, torch.Tensor], delta: Delta,
               lease_batches: Sequence[Batch], control_batches: Sequence[Batch],
               cfg: VerifyConfig = VerifyConfig(), reference: Reference | None = None,
               steps_fraction: float = 1.0) -> Verdict:
    """`measure_losses` then `judge_loss`: one contribution's verdict. For the round-relative
    rule, measure every contribution of the round first, then `round_reference` and
    `judge_loss` each (this function with `reference` does the same for one)."""
    m = measure_losses(model, theta, delta, lease_batches, control_batches,
                       cfg.delta_scale, cfg.eval_rows)
    return judge_loss(m, cfg, reference, steps_fraction)


# ------------------------------------------------------------------------------ Gram matrix


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def gram(sources: Sequence[Delta], shapes: Shapes,
         block_elems: int = 1 << 20) -> torch.Tensor:
    """The (n, n) float64 matrix of inner products <d_i, d_j> of n deltas (dicts of tensors
    or DeltaSources), read one block of every source at a time: memory ~ n x block."""
    srcs = [_as_source(s) for s in sources]
    n = len(srcs)
    g = torch.zeros(n, n, dtype=torch.float64)
    for name, a, b in param_blocks(shapes, block_elems):
        m = torch.stack([read_slice(s, name, a, b) for s in srcs]).to(torch.float64)
        g += m @ m.T
    return g


def _cosines(g: torch.Tensor) -> torch.Tensor:
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))


# ------------------------------------------------------------------------------ replication


def compare_replicas(a: Delta, b: Delta, cfg: VerifyConfig = VerifyConfig(),
                     shapes: Shapes | None = None) -> Verdict:
    """Two deltas of one lease trained from the same fresh start (module docstring, 2.):
    ok when cosine >= `replica_min_cosine` and ||a - b|| / mean(||a||, ||b||) <=
    `replica_max_rel_diff`. `shapes` is needed when neither is a dict of tensors."""
    if shapes is None:
        dicts = [d for d in (a, b) if isinstance(d, Mapping)]
        if not dicts:
            raise ValueError("compare_replicas needs `shapes` for two DeltaSources")
        shapes = shapes_of(dicts[0])
    g = gram([a, b], shapes, cfg.block_elems)
    na, nb = math.sqrt(max(0.0, float(g[0, 0]))), math.sqrt(max(0.0, float(g[1, 1])))
    diff = math.sqrt(max(0.0, float(g[0, 0] + g[1, 1] - 2 * g[0, 1])))
    cos = float(g[0, 1]) / (na * nb) if na > 0 and nb > 0 else 0.0
    rel = diff / ((na + nb) / 2) if na + nb > 0 else 0.0
    nums = {"cosine": cos, "rel_diff": rel, "norm_a": na, "norm_b": nb,
            "norm_ratio": min(na, nb) / max(na, nb) if max(na, nb) > 0 else 1.0}
    if cos < cfg.replica_min_cosine:
        return _failed(f"replicas disagree: cosine {cos:.4f} < {cfg.replica_min_cosine:g}",
                       nums)
    if rel > cfg.replica_max_rel_diff:
        return _failed(f"replicas disagree: relative difference {rel:.4f} > "
                       f"{cfg.replica_max_rel_diff:g}", nums)
    return Verdict(True, (), nums)


# ------------------------------------------------------------------------------ similarity


@dataclass(frozen=True)
class Similarity:
    """Per contribution of the round: its largest cosine with any other delta (this round's
    or an earlier one's), which one (an index into current + previous), and the round's
    medians the relative rule compares with."""

    max_cosine: list[float]
    nearest: list[int]
    median_round: float      # median pairwise cosine among this round's contributions
    median_previous: float   # median cosine of this round's with the previous ones (nan: none)


def cosine_matrix(deltas: Sequence[Delta], shapes: Shapes,
                  block_elems: int = 1 << 20) -> torch.Tensor:
    """The (n, n) matrix of pairwise cosines of n deltas, from one blockwise Gram matrix."""
    return _cosines(gram(deltas, shapes, block_elems))


def similarity(current: Sequence[Delta], shapes: Shapes, previous: Sequence[Delta] = (),
               block_elems: int = 1 << 20,
               reference: Sequence[bool] | None = None) -> Similarity:
    """Cosine similarities of this round's contributions with each other and with `previous`
    deltas (the volunteers' earlier contributions, published updates), from one blockwise
    Gram matrix (`similarity_of` on `cosine_matrix`). Cost: one read of every source,
    (n + m)^2 multiply-adds per value."""
    return similarity_of(cosine_matrix([*current, *previous], shapes, block_elems),
                         len(current), reference)


def similarity_of(cos: torch.Tensor, n: int,
                  reference: Sequence[bool] | None = None) -> Similarity:
    """The similarity summary of a cosine matrix whose first `n` rows are this round's
    contributions and the rest earlier deltas. `reference`: which of the round's the medians
    are taken over (default all). A round's noise is near-orthogonal to everything, so its
    pairs would drag the median cosine down and make honest pairs look like copies:
    `check_round` takes the medians over the contributions that passed the loss check
    (measured: a round of 3 honest + 1 noise had a median of 0.33 over all pairs while its
    honest pairs were at ~0.8)."""
    use = list(reference) if reference is not None else [True] * n
    if len(use) != n:
        raise ValueError("`reference` needs one flag per current contribution")
    best, which = [], []
    for i in range(n):
        row = cos[i].clone()
        row[i] = -math.inf
        j = int(row.argmax()) if row.numel() > 1 else i
        best.append(float(row[j]) if row.numel() > 1 else float("nan"))
        which.append(j)
    pairs = [float(cos[i, j]) for i in range(n) for j in range(i + 1, n) if use[i] and use[j]]
    cross = [float(cos[i, j]) for i in range(n) for j in range(n, cos.size(0)) if use[i]]
    return Similarity(best, which, statistics.median(pairs) if pairs else float("nan"),
                      statistics.median(cross) if cross else float("nan"))


def similarity_flags(s: Similarity, cfg: VerifyConfig = VerifyConfig()) -> list[Verdict]:
    """A verdict per contribution: not ok when its nearest delta is closer than
    `copy_distance_ratio` x the median distance (1 - cosine) of its kind (this round's pairs
    for a current neighbour, current-vs-previous for an earlier one), or above
    `copy_max_cosine`. For a same-round pair both are flagged: the integrator decides which
    (the later upload, or replicate both)."""
    n = len(s.max_cosine)
    out = []
    for c, j in zip(s.max_cosine, s.nearest, strict=True):
        same = j < n
        median = s.median_round if same else s.median_previous
        nums = {"max_cosine": c, "nearest": float(j), "median_cosine": median}
        if not math.isfinite(c):
            out.append(Verdict(True, (), nums))
            continue
        what = "another contribution of this round" if same else "an earlier delta"
        if c >= cfg.copy_max_cosine:
            out.append(_failed(f"cosine {c:.4f} with {what} (#{j})", nums, near_copy=True))
        elif math.isfinite(median) and median < 1 and \
                1 - c < cfg.copy_distance_ratio * (1 - median):
            out.append(_failed(f"cosine {c:.4f} with {what} (#{j}), against a median of "
                               f"{median:.4f}", nums, relative=True, near_copy=True))
        else:
            out.append(Verdict(True, (), nums))
    return out


def sure_copies(s: Similarity, twins: Sequence[int | None],
                cfg: VerifyConfig = VerifyConfig()) -> list[bool]:
    """Which of a round's contributions fail the similarity check whatever their losses: the
    nearest delta, above `copy_max_cosine`, is an earlier one (a previous round's, a
    published update) or an earlier upload of this round (index order is upload order) that
    is not its replica twin (`twins[i]`: the index of the other copy of its lease). Their
    loss check need not run (`check_round`)."""
    n = len(s.max_cosine)
    return [math.isfinite(c) and c >= cfg.copy_max_cosine and (j >= n or (j < i and j != t))
            for i, (c, j, t) in enumerate(zip(s.max_cosine, s.nearest, twins, strict=True))]


# ------------------------------------------------------------------------------ trust


@dataclass(frozen=True)
class TrustState:
    """A volunteer's record with the checks: its current streak of valid results, all valid
    results, all failures, and how many of its replicated leases a replica confirmed. Stored
    in the ledger per volunteer."""

    streak: int = 0
    valid: int = 0
    failures: int = 0
    replicas: int = 0


def record_result(state: TrustState, ok: bool, replicated: bool = False) -> TrustState:
    """The state after one checked result: a valid one extends the streak (and, `replicated`:
    a replica of its lease agreed, counts as a confirmation), a failure resets it (and
    counts). Inconclusive results (a replica that did fewer steps) are not recorded."""
    if ok:
        return replace(state, streak=state.streak + 1, valid=state.valid + 1,
                       replicas=state.replicas + int(replicated))
    return replace(state, streak=0, failures=state.failures + 1)


def replication_probability(state: TrustState, cfg: VerifyConfig = VerifyConfig()) -> float:
    """BOINC's adaptive replication: `replicate_new` until a replica has confirmed the
    volunteer's work once (the loss check alone does not catch a volunteer training half the
    steps, so its valid results do not lower this), then replicate_trusted / (1 + streak /
    streak_scale), at least replicate_min; times (1 + failure_boost x failures), at most 1."""
    if state.replicas == 0:
        p = cfg.replicate_new
    else:
        p = max(cfg.replicate_min, cfg.replicate_trusted / (1 + state.streak / cfg.streak_scale))
    return min(1.0, p * (1 + cfg.failure_boost * state.failures))


def _uniform(seed: int, lease_id: int) -> float:
    h = hashlib.sha256(f"crowdtrain-verify:{seed}:{lease_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def should_replicate(state: TrustState, seed: int, lease_id: int,
                     cfg: VerifyConfig = VerifyConfig()) -> bool:
    """Whether lease `lease_id` is replicated: a deterministic draw from (seed, lease_id) (the
    coordinator's secret seed) against `replication_probability`."""
    return _uniform(seed, lease_id) < replication_probability(state, cfg)


def expected_replication(n_leases: int, cfg: VerifyConfig = VerifyConfig()) -> float:
    """Mean replication probability over an honest volunteer's first `n_leases` leases, each
    found valid (the streak grows with every contribution's verdict, replicated or not) and
    its first replicated lease confirmed (counted as replicated at its expected position,
    1 / replicate_new): the replication's share of its compute. A replicated pair's copy is
    another volunteer's lease, so a pair confirms two volunteers; this counts each copy once
    per volunteer, an upper bound."""
    state, total = TrustState(), 0.0
    first = max(1, round(1 / cfg.replicate_new)) if cfg.replicate_new > 0 else n_leases + 1
    for i in range(n_leases):
        p = replication_probability(state, cfg)
        total += p
        state = record_result(state, True, replicated=i + 1 == first)
    return total / max(1, n_leases)


# ------------------------------------------------------------------------------ one round


@dataclass(frozen=True)
class Contribution:
    """What the round check needs of one contribution: its delta (a dict of tensors or the
    payload's DeltaSource) and the batches of its loss check (`check_steps` + `batches_at`:
    the lease's shard and seed; a control shard or held-out text, chosen by the coordinator)."""

    delta: Delta
    lease_batches: Sequence[Batch]
    control_batches: Sequence[Batch]
    steps_fraction: float = 1.0  # steps reported / the lease's max_steps
    copy: bool = False  # a copy of another one's lease in the round: counted once in the medians
    twin: int | None = None  # the index of the other copy of its lease in the round, if any


def check_round(model: torch.nn.Module, theta: Mapping[str, torch.Tensor],
                contributions: Sequence[Contribution], previous: Sequence[Delta] = (),
                cfg: VerifyConfig = VerifyConfig()) -> list[Verdict]:
    """Every contribution of a round through the similarity check (against each other and
    `previous`: earlier contributions of these volunteers, recent published updates) and the
    loss check (round-relative). One verdict each: ok when both checks pass; the reasons of
    those that failed; the numbers of both ("sim_" prefixed). Cheapest first: the Gram
    matrix costs no forward pass, and a sure copy (`sure_copies`) fails whatever its losses,
    so its loss check is not run; the loss check stops at the lease's batches when the loss
    does not drop there (`measure_losses(early_exit=True)`). Replicas are compared
    separately (`compare_replicas`), when both copies have arrived."""
    n = len(contributions)
    cos = cosine_matrix([*(c.delta for c in contributions), *previous], shapes_of(theta),
                        cfg.block_elems) if n + len(previous) > 1 else None
    sure = sure_copies(similarity_of(cos, n), [c.twin for c in contributions], cfg) \
        if cos is not None else [False] * n
    measures = [None if skip else measure_losses(model, theta, c.delta, c.lease_batches,
                                                 c.control_batches, cfg.delta_scale,
                                                 cfg.eval_rows, early_exit=True)
                for c, skip in zip(contributions, sure, strict=True)]
    # the reference is taken over the contributions measured in full (not a sure copy, not
    # stopped at the lease's batches), their own leases first
    pairs = [(m, c) for m, c in zip(measures, contributions, strict=True)
             if m is not None and math.isfinite(m.gain) and math.isfinite(m.specificity)]
    own = [(m, c) for m, c in pairs if not c.copy]
    if len(own) < cfg.min_reference:  # too few leases of their own: the copies count too
        own = pairs
    full = [m for m, c in own if c.steps_fraction >= 1]
    ref = round_reference(full if len(full) >= cfg.min_reference else [m for m, _ in own], cfg)
    loss = [_failed("loss not measured: a copy", {"loss_skipped": 1.0}) if m is None
            else judge_loss(m, cfg, ref, c.steps_fraction)
            for m, c in zip(measures, contributions, strict=True)]
    if cos is not None:
        # the medians over the contributions that passed the loss check (all of them when
        # fewer than two did): noise must not make honest pairs look alike
        passed = [v.ok for v in loss]
        sim = similarity_flags(similarity_of(cos, n, passed if sum(passed) >= 2 else None),
                               cfg)
    else:
        sim = [Verdict(True) for _ in contributions]
    out = []
    for lv, sv in zip(loss, sim, strict=True):
        nums = lv.numbers | {f"sim_{k}": v for k, v in sv.numbers.items()}
        out.append(Verdict(lv.ok and sv.ok, lv.findings + sv.findings, nums))
    return out
