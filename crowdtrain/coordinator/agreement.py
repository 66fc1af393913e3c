"""The agreement screen: a sparse contribution that points against the round's consensus.

Centered clipping catches a delta sent at an honest norm but in a harmful direction (a sign
flip, same-norm noise) because honest dense deltas cluster: the attacker is farther from the
centre than the honest ones and is clipped. Sparse contributions (codec "sparse": the top-k
entries of every chunk) do not cluster: four 1% supports share only 30-40% of their entries,
so every contribution is about as far from any centre as its own norm, the trimmed mean that
centered clipping starts from is zero wherever fewer than two contributions sent a value, and
the result is close to the plain mean. One flipped contribution of four then halves the
averaged step where it overlaps the others and pushes the wrong way where it does not.

What does separate them is the sign where they overlap. A contribution's *agreement* is the
cosine, on the entries it sent, between it and the weighted mean of the others:

    a_j = <x_j, o_j> / (|x_j| |o_j restricted to x_j's nonzero entries|),
    o_j = sum_{i != j} p_i x_i.

Entries that no one else sent add nothing to either side, so a_j is the cosine on the
overlap. Measured on `tiny` (four workers, 1% at 2 bits, decayed error feedback, 6 rounds of
H=30): honest 0.38-0.57; a sign flip of an honest delta -0.38 to -0.56; same-norm noise
through the codec -0.02 to 0.01. With the flipped one in the round an honest contribution
overlapping it most fell to 0.02 (the flip cancels the others' mean on its entries), so the
screen removes one contribution at a time, the least agreeing, and measures again.

Rule (`least_agreeing`): the least agreeing contribution is refused when its agreement is
below factor x the round's median m (`RobustConfig.agreement_factor`, default 0.25) while
m >= `AGREEMENT_FLOOR` (below it the round has no consensus to measure against), or when it
is below `OPPOSED` whatever the median (two flipped deltas of five cancel the honest ones'
consensus until one of them is gone). The coordinator (aggregation.py) repeats this on the
rest while at least three remain and at most (n - 1) // 2 were refused, so an honest
majority is never outvoted. Pure: torch and the standard library.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

AGREEMENT_FLOOR = 0.05  # a median agreement below this: no consensus to be far below
OPPOSED = -0.2  # an agreement below this is refused whatever the median


def block_stats(x: torch.Tensor, p: torch.Tensor, work: torch.Tensor | None = None
                ) -> torch.Tensor:
    """For one block matrix `x` (n contributions x L values) and the weights `p` (n), a 3 x n
    float64 tensor: per row j, <x_j, o_j>, the sum of o_j^2 over the columns where x_j is
    not zero, and |x_j|^2, with o_j = sum_{i != j} p_i x_i. Summed over blocks they give
    `agreements`. `work` (n x L float32, optional) is scratch for o."""
    total = torch.mv(x.t(), p)
    o = torch.mul(x, p[:, None].neg(), out=work) if work is not None else x * -p[:, None]
    o.add_(total)
    num = (x * o).sum(1, dtype=torch.float64)
    own = (x != 0).to(o.dtype).mul_(o).mul_(o).sum(1, dtype=torch.float64)
    sq = (x * x).sum(1, dtype=torch.float64)
    return torch.stack((num, own, sq))


def agreements(stats: torch.Tensor) -> list[float]:
    """Each contribution's agreement from `block_stats` summed over the blocks: the cosine on
    its own entries with the others' weighted mean; 0 where it or that mean is all zero
    there (nothing to agree with)."""
    out = []
    for num, own, sq in stats.t().tolist():
        den = math.sqrt(max(own, 0.0) * max(sq, 0.0))
        out.append(num / den if den > 0 and math.isfinite(num / den) else 0.0)
    return out


def least_agreeing(agree: Sequence[float], factor: float) -> tuple[int, str] | None:
    """The index of the contribution to refuse and the reason, or None: the least agreeing
    one when it is below `factor` x the median agreement (that median at least
    AGREEMENT_FLOOR) or below OPPOSED, with at least 3 contributions measured."""
    if len(agree) < 3 or not factor > 0:
        return None
    med = statistics.median(agree)
    j = min(range(len(agree)), key=lambda i: (agree[i], i))
    if med >= AGREEMENT_FLOOR and agree[j] < factor * med:
        return j, (f"points against the round: cosine {agree[j]:.3f} with the other "
                   f"contributions' mean on the entries it sent, below {factor:g}x the round "
                   f"median {med:.3f}: refused")
    if agree[j] < OPPOSED:
        return j, (f"points against the round: cosine {agree[j]:.3f} with the other "
                   f"contributions' mean on the entries it sent (below {OPPOSED:g}): refused")
    return None
