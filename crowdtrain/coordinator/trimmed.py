"""The coordinate-wise weighted trimmed mean, by selection networks: no sort.

For a block matrix x (n contributions x L values) and the contributions' weights, the trimmed
mean drops, per column, the k smallest and k largest values and takes the weighted mean of the
rest. Sorting every column is the obvious way and the slow one; here a selection network (the
comparators of Batcher's odd-even merge sort that the k-th and (n-k-1)-th ranks depend on,
`selection_network`) finds the two cut values by elementwise min/max over whole rows, and the
mean of what lies between them (ties across the cut shared out as a stable sort would) is two
small matrix products (`weighted_trimmed_mean`). kernels.first_pass runs the same network in a
compiled loop; aggregation.py uses both. Pure: torch and the standard library.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch


def trim_count(n: int, fraction: float) -> int:
    """Values dropped at each end: floor(fraction * n), leaving at least one; 0 for n <= 2."""
    if n <= 2:
        return 0
    return min(int(math.floor(fraction * n + 1e-9)), (n - 1) // 2)


def sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for `n` wires as comparators (i, j), i < j: after each,
    wire i holds the smaller value. Built for the next power of two, less the comparators that
    touch a wire >= n (those wires would hold +inf)."""
    size = 1 << max(0, (n - 1).bit_length())
    out = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    lo, hi = i + j, i + j + k
                    if lo // (2 * p) == hi // (2 * p) and hi < n:
                        out.append((lo, hi))
            k //= 2
        p *= 2
    return out


@functools.lru_cache(maxsize=128)
def selection_network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of `sorting_network(n)` that the values at `ranks` (0 = smallest)
    depend on, as (i, j, keep_min, keep_max): only the outputs read later are computed (one
    elementwise op where only one is)."""
    need = set(ranks)
    ops = []
    for i, j in reversed(sorting_network(n)):
        lo, hi = i in need, j in need
        if lo or hi:
            ops.append((i, j, lo, hi))
            need |= {i, j}
    return tuple(reversed(ops))


def order_statistics(x: torch.Tensor, ranks: Sequence[int],
                     work: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per column of `x` (n x L), the values of rank `ranks` (0 = smallest), by a selection
    network of elementwise minimum/maximum over whole rows (vectorised over the columns; no
    sort). `x` is not written: a wire's first result goes to a row of `work` (n + 1 x L, same
    dtype and device; allocated when not given), and the returned rows are views into it
    (or rows of `x` for a network with no comparator, n = 1)."""
    n = x.shape[0]
    if work is None:
        work = torch.empty((n + 1, x.shape[1]), dtype=x.dtype, device=x.device)
    wires = list(x.unbind(0))
    owned = [False] * n  # wire i's row is one of `work`'s (else still x's own row)
    free = list(work.unbind(0))

    def target(i: int) -> torch.Tensor:
        if owned[i]:
            return wires[i]
        owned[i] = True
        return free.pop()

    for i, j, lo, hi in selection_network(n, tuple(ranks)):
        a, b = wires[i], wires[j]
        if lo and hi:
            low = free.pop()  # both outputs read a and b: the minimum goes to a fresh row
            torch.minimum(a, b, out=low)
            wires[j] = torch.maximum(a, b, out=target(j))
            if owned[i]:
                free.append(a)
            wires[i], owned[i] = low, True
        elif lo:
            wires[i] = torch.minimum(a, b, out=target(i))
        else:
            wires[j] = torch.maximum(a, b, out=target(j))
    return [wires[r] for r in ranks]


def _stable_trimmed_mean(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """The definition of `weighted_trimmed_mean` by a stable sort along the workers."""
    n = x.shape[0]
    vals, idx = torch.sort(x, dim=0, stable=True)
    vals, idx = vals[k:n - k], idx[k:n - k]
    kw = w[idx]
    return (vals * kw).sum(0) / kw.sum(0)


def weighted_trimmed_mean(x: torch.Tensor, weights: torch.Tensor, k: int,
                          scratch: Sequence[torch.Tensor] | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise weighted trimmed mean of `x` (workers x elements), float32.

    Per coordinate, the k lowest and k highest values are dropped (ties broken by worker
    order, as a stable sort by value does: among equal values the first workers count as
    lower) and the rest averaged with their workers' weights. k = 0 gives the weighted mean.

    No sort: a selection network (`order_statistics`) finds each column's smallest and
    largest kept values L and H; the kept values are those in [L, H], masked and summed with
    their weights by two small matrix products. That is exact unless a value equal to L or H
    was also dropped (a tie across the cut, seen as more than n - 2k values in [L, H]): where
    L == H the result is L (up to rounding), and the few columns left are redone by a stable
    sort.
    `scratch`: optional (n + 1 x L, n x L) float32 buffers; `out`: where to write.
    """
    n, length = x.shape
    w = weights.to(device=x.device, dtype=torch.float32)
    if k == 0:
        return torch.mv(x.t(), w / w.sum(), out=out)
    if scratch is None:
        scratch = (torch.empty((n + 1, length), dtype=x.dtype, device=x.device),
                   torch.empty_like(x))
    work, keep = scratch[0], scratch[1]
    lo, hi = order_statistics(x, (k, n - k - 1), work)
    torch.clamp(x, lo, hi, out=keep)
    torch.eq(keep, x, out=keep)  # 1.0 where L <= x <= H (x unchanged by the clamp)
    den_cnt = torch.mm(torch.stack([w, torch.ones_like(w)]), keep)  # kept weight, kept count
    keep.mul_(x)
    v = torch.mv(keep.t(), w, out=out)
    v.div_(den_cnt[0])
    cnt = den_cnt[1]
    if float(cnt.max()) > n - 2 * k:  # ties across the cut somewhere
        # where L == H every value in [L, H] is L, and so is v (up to rounding: a weighted
        # mean of equal values); the other columns with a tie are redone by a stable sort.
        # They are few (int8 payloads: ~60 in 2**17), so they are found in two steps: the
        # groups of 64 columns with one, then the columns of those groups (boolean work and
        # `nonzero` over a whole block row cost ~1 ns a column)
        ex = cnt.sub_(n - 2 * k).clamp_(min=0)  # > 0 at a tie across the cut
        ex.mul_(torch.gt(hi, lo, out=keep[0]))  # ... where L < H (keep: free again)
        group = 64
        full = length // group * group
        cand = ex[:full].view(-1, group).amax(1).nonzero()
        cand = (cand * group + torch.arange(group, device=x.device)).view(-1)
        if full < length:
            cand = torch.cat([cand, torch.arange(full, length, device=x.device)])
        rest = cand[ex[cand] > 0]
        if rest.numel():
            v[rest] = _stable_trimmed_mean(x[:, rest], w, k)
    return v
