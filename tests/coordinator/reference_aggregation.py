"""The aggregation as it was before the block-matrix rewrite (commit d8ed2d8's
coordinator/aggregation.py, unchanged below its docstring): one source at a time, a pass per
centered-clipping iteration. Kept as the reference the fast aggregation must equal within
1e-6 relative (test_aggregation.py, bench/coordinator_load.py --part aggregation)."""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

METHODS = ("mean", "clip_mean", "trimmed_mean", "centered_clip")

Screening = list[tuple[float, str | None]]


@dataclass(frozen=True)
class RobustConfig:
    """How a round's contributions are screened and combined.

    method: one of METHODS. clip_factor: a delta whose global L2 norm exceeds clip_factor x
    the round's median norm is scaled down to exactly that (>= 1, may be inf: no clipping).
    refuse_factor: a delta whose norm exceeds refuse_factor x the median is refused outright
    (>= clip_factor, may be inf: never refuse). trim_fraction: for "trimmed_mean", the fraction
    of contributions dropped at each end per coordinate, floor(trim_fraction * n) of them
    (in [0, 0.5)); "centered_clip" starts from that trimmed mean. cc_iters: centered-clipping
    iterations for "centered_clip" (1..100).
    """

    method: str = "centered_clip"
    clip_factor: float = 2.0
    trim_fraction: float = 0.25
    refuse_factor: float = 10.0
    cc_iters: int = 3

    def __post_init__(self) -> None:
        def real(x: object) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool) \
                and not math.isnan(float(x))

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not real(self.clip_factor) or not self.clip_factor >= 1:
            raise ValueError(f"clip_factor must be >= 1 (inf disables clipping), "
                             f"got {self.clip_factor!r}")
        if not real(self.refuse_factor) or not self.refuse_factor >= self.clip_factor:
            raise ValueError(f"refuse_factor must be >= clip_factor ({self.clip_factor!r}; "
                             f"inf disables refusing), got {self.refuse_factor!r}")
        if not real(self.trim_fraction) or not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if isinstance(self.cc_iters, bool) or not isinstance(self.cc_iters, int) \
                or not 1 <= self.cc_iters <= 100:
            raise ValueError(f"cc_iters must be an int in [1, 100], got {self.cc_iters!r}")


def screen(norms: Sequence[float], cfg: RobustConfig) -> Screening:
    """Per contribution, (multiplier for its delta, reason or None), from global L2 norms.

    Against the round's median norm m: norm > refuse_factor * m -> (0.0, "...: refused");
    norm > clip_factor * m -> (clip_factor * m / norm, "norm clipped from ..."); else
    (1.0, None). A non-finite norm is refused. Nothing is screened (all (1.0, None)) when
    the method is "mean" (no defence), with fewer than 3 contributions (a median of 1 or 2
    values says nothing about which one is wrong), or when the median norm is 0.
    """
    n = len(norms)
    if cfg.method == "mean" or n < 3:
        return [(1.0, None)] * n
    finite = [float(x) for x in norms if math.isfinite(float(x))]
    med = statistics.median(finite) if finite else 0.0
    out: Screening = []
    for x in map(float, norms):
        if not math.isfinite(x):
            out.append((0.0, f"norm {x} is not finite: refused"))
        elif med <= 0:
            out.append((1.0, None))
        elif x > cfg.refuse_factor * med:
            out.append((0.0, f"norm {x:.4g} is {x / med:.0f}x the round median {med:.4g} "
                             f"(limit {cfg.refuse_factor:g}x): refused"))
        elif x > cfg.clip_factor * med:
            target = cfg.clip_factor * med
            out.append((target / x, f"norm clipped from {x:.4g} to {target:.4g} "
                                    f"({cfg.clip_factor:g}x the round median {med:.4g})"))
        else:
            out.append((1.0, None))
    return out


# ---------------------------------------------------------------------------- sources


@runtime_checkable
class DeltaSource(Protocol):
    """One contribution's delta, readable a slice at a time."""

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Flat float32 elements [a, b) of parameter `name` (flattened row-major)."""
        ...


class TensorSource:
    """A DeltaSource over a dict of in-memory tensors (for tests and simulations)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = {k: v.detach().reshape(-1) for k, v in tensors.items()}

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Flat float32 elements [a, b) of `name`."""
        t = self.tensors[name]
        if not 0 <= a <= b <= t.numel():
            raise ValueError(f"range [{a}, {b}) is outside {name} ({t.numel()} elements)")
        return t[a:b].to(torch.float32)


# ---------------------------------------------------------------------------- aggregation


def param_blocks(names_shapes: Mapping[str, Sequence[int]],
            block_elems: int) -> Iterator[tuple[str, int, int]]:
    """(name, a, b) covering every parameter in order, b - a <= block_elems."""
    for name, shape in names_shapes.items():
        numel = math.prod(int(s) for s in shape)
        for a in range(0, numel, block_elems):
            yield name, a, min(a + block_elems, numel)


def read_slice(src: DeltaSource, name: str, a: int, b: int) -> torch.Tensor:
    """`src.read(name, a, b)`, checked to be the flat slice asked for, as float32."""
    t = src.read(name, a, b)
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != b - a:
        raise ValueError(f"source returned a bad slice for {name}[{a}:{b}]")
    return t.to(torch.float32)


def _trim_count(n: int, fraction: float) -> int:
    """Values dropped at each end: floor(fraction * n), leaving at least one; 0 for n <= 2."""
    if n <= 2:
        return 0
    return min(int(math.floor(fraction * n + 1e-9)), (n - 1) // 2)


def weighted_trimmed_mean(x: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Coordinate-wise weighted trimmed mean of `x` (workers x elements), float32.

    Per coordinate, the k lowest and k highest values (stable sort by value) are dropped and
    the rest averaged with their workers' weights. k = 0 gives the weighted mean.
    """
    n = x.shape[0]
    if k == 0:
        w = weights.to(torch.float32) / weights.sum()
        return (x * w[:, None]).sum(0)
    vals, idx = torch.sort(x, dim=0, stable=True)
    vals, idx = vals[k:n - k], idx[k:n - k]
    w = weights.to(torch.float32)[idx]
    return (vals * w).sum(0) / w.sum(0)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def block_for(n: int, budget_bytes: int = 256 << 20) -> int:
    """`block_elems` for aggregating `n` deltas within about `budget_bytes` of working memory
    (~16 bytes per value and delta: the copies `trimmed_mean` and `centered_clip` work on), so
    a round's memory stays flat however many volunteers report; between 4,096 and 2**20."""
    return max(1 << 12, min(1 << 20, budget_bytes // (16 * max(n, 1))))


def robust_aggregate(
    sources: Sequence[DeltaSource],
    weights: Sequence[float],
    names_shapes: Mapping[str, Sequence[int]],
    cfg: RobustConfig,
    block_elems: int = 1 << 20,
) -> tuple[dict[str, torch.Tensor], Screening]:
    """Aggregate the deltas of `sources` (one per contribution, `weights` > 0 e.g. tokens)
    into float32 tensors of `names_shapes`, and the per-contribution screening (multiplier,
    reason) as `screen` returns it (multiplier 0.0: refused and left out of the aggregate).

    Passes over the model block by block (`block_elems` elements at most, never spanning two
    parameters): for every method but "mean", one pass computes each source's global L2 norm
    (float64) for `screen`; then one pass aggregates (mean / trimmed mean), or 2 + cc_iters
    passes for "centered_clip" (trimmed mean, distances, iterations). Refused contributions
    are dropped and the weights of the rest renormalised; clipped ones keep their weight. With
    method "mean" this equals `outer.weighted_mean` of the fully decoded deltas. Peak
    memory besides the output: about n x block_elems x 16 bytes for "trimmed_mean" and
    "centered_clip" (values, sorted values, int64 indices), one or two slices for the means.
    """
    n = len(sources)
    if n == 0:
        raise ValueError("robust_aggregate needs at least one contribution")
    if len(weights) != n:
        raise ValueError(f"got {n} sources but {len(weights)} weights")
    ws: list[float] = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) \
                or not w > 0:
            raise ValueError(f"weight {i} must be positive and finite, got {w!r}")
        ws.append(float(w))
    if isinstance(block_elems, bool) or not isinstance(block_elems, int) or block_elems < 1:
        raise ValueError(f"block_elems must be a positive int, got {block_elems!r}")
    blocks = list(param_blocks(names_shapes, block_elems))

    if cfg.method == "mean":
        screening: Screening = [(1.0, None)] * n
    else:
        parts: list[list[float]] = [[] for _ in range(n)]
        for name, a, b in blocks:
            for i, src in enumerate(sources):
                parts[i].append(float(read_slice(src, name, a, b).to(torch.float64).pow(2).sum()))
        screening = screen([math.sqrt(math.fsum(p)) for p in parts], cfg)

    keep = [i for i in range(n) if screening[i][0] > 0]
    mult = [screening[i][0] for i in keep]
    total = math.fsum(ws[i] for i in keep)
    coef = [ws[i] / total * m for i, m in zip(keep, mult, strict=True)]
    out = {name: torch.zeros(math.prod(int(s) for s in shape), dtype=torch.float32)
           for name, shape in names_shapes.items()}

    def scaled(j: int, name: str, a: int, b: int) -> torch.Tensor:
        t = read_slice(sources[keep[j]], name, a, b)
        return t if mult[j] == 1.0 else t * mult[j]

    if cfg.method in ("trimmed_mean", "centered_clip"):
        k = _trim_count(len(keep), cfg.trim_fraction)
        wt = torch.tensor([ws[i] for i in keep], dtype=torch.float64)
        for name, a, b in blocks:
            if k == 0:
                acc = read_slice(sources[keep[0]], name, a, b) * coef[0]
                for j in range(1, len(keep)):
                    acc = acc + read_slice(sources[keep[j]], name, a, b) * coef[j]
                out[name][a:b] = acc
            else:
                x = torch.stack([scaled(j, name, a, b) for j in range(len(keep))])
                out[name][a:b] = weighted_trimmed_mean(x, wt, k)
        if cfg.method == "centered_clip" and len(keep) >= 3:
            _centered_clip(out, blocks, scaled, [ws[i] / total for i in keep], cfg.cc_iters)
    else:
        # weighted mean of the screened deltas, same order and arithmetic as weighted_mean
        for name, a, b in blocks:
            acc = read_slice(sources[keep[0]], name, a, b) * coef[0]
            for j in range(1, len(keep)):
                acc = acc + read_slice(sources[keep[j]], name, a, b) * coef[j]
            out[name][a:b] = acc
    result = {name: out[name].reshape(tuple(int(s) for s in shape))
              for name, shape in names_shapes.items()}
    return result, screening


def _centered_clip(out: dict[str, torch.Tensor], blocks: list[tuple[str, int, int]],
                   scaled: Callable[[int, str, int, int], torch.Tensor], p: list[float],
                   iters: int) -> None:
    """In place: v <- v + sum_i p_i min(1, tau / |x_i - v|) (x_i - v), `iters` times, with
    tau the median distance |x_i - v| at that iteration. Distances for the next iteration are
    accumulated while each block is updated, so each iteration is a single pass."""
    n = len(p)

    def sqdist(x: torch.Tensor, v: torch.Tensor) -> float:
        return float((x - v).to(torch.float64).pow(2).sum())

    parts: list[list[float]] = [[] for _ in range(n)]
    for name, a, b in blocks:
        v = out[name][a:b]
        for j in range(n):
            parts[j].append(sqdist(scaled(j, name, a, b), v))
    dist = [math.sqrt(math.fsum(q)) for q in parts]
    for it in range(iters):
        tau = _median(dist)
        if tau <= 0:
            return
        c = [pj * min(1.0, tau / d) if d > 0 else pj for pj, d in zip(p, dist, strict=True)]
        last = it == iters - 1
        parts = [[] for _ in range(n)]
        for name, a, b in blocks:
            v = out[name][a:b]
            xs = [scaled(j, name, a, b) for j in range(n)]
            step = torch.zeros_like(v)
            for j in range(n):
                step += (xs[j] - v) * c[j]
            v_new = v + step
            out[name][a:b] = v_new
            if not last:
                for j in range(n):
                    parts[j].append(sqdist(xs[j], v_new))
        dist = [math.sqrt(math.fsum(q)) for q in parts]
