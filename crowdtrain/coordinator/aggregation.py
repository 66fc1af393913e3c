"""Poisoning-robust aggregation of pseudo-gradients, streamed block by block from disk.

The coordinator's plain token-weighted mean (`outer.weighted_mean`) lets one volunteer
move the global model anywhere: a delta scaled x100 is applied at 25x among four workers. This
module screens each round's contributions by their global L2 norm (refusing absurd ones,
clipping large ones to a multiple of the round's median norm) and then aggregates with one of:

- "mean": no defence; `outer.weighted_mean` up to float32 rounding (no screening either).
- "clip_mean": screening, then the token-weighted mean of the screened deltas.
- "trimmed_mean": screening, then a coordinate-wise weighted trimmed mean.
- "centered_clip": screening, then centered clipping (Karimireddy et al. 2021) started from
  the trimmed mean, with the clipping radius set to the median distance to the centre.

Deltas are never loaded whole: a `DeltaSource` yields a flat float32 slice of one parameter,
and `robust_aggregate` reads the model in blocks of `block_elems` elements, every
contribution's block decoded into one preallocated workers x block float32 matrix, so beyond
the output itself peak memory is O(threads x workers x block_elems), not O(workers x model).
On that matrix every method is a few whole-matrix operations, no per-contribution Python
loop and no sort: matrix-vector products for the means, a selection network of elementwise
min/max for the trimmed mean (`weighted_trimmed_mean`), a matrix product for centered
clipping's Gram matrix (or, from `PASSES_FROM` contributions, two matrix-vector products in
a pass per iteration). Where numba is installed, the trimmed mean, the norms and the Gram
matrix (or its diagonal) of a block are instead one compiled loop over it
(`kernels.first_pass`: ~4-20x less time than the torch operations, and no GIL held); the
torch operations stay as the fallback and the tests' reference. A block whose columns are
mostly all zero (sparse payloads) does its math on the other columns alone. Blocks run on a
thread pool (and on a GPU when the coordinator has one). An honest round costs one pass
over the contributions (two for centered clipping, whose iterations run on the small Gram
matrix instead of passes, or cc_iters + 1 from `PASSES_FROM` contributions: see the notes
above `robust_aggregate`); a round in which someone is clipped or refused costs one more.
Contribution files on disk are read as DeltaSources by coordinator.payloads (memory-mapped,
one slice at a time, bit-identical to `codecs.from_bytes`). Speed, measured against the
implementation this replaced: BENCHMARKS.md, "Aggregation speed".

The default method was chosen by measurement, `python bench/poisoning.py --rounds 10
--inner-steps 30` (a fresh `tiny` run from the bundled corpus; K=4 workers of which 1 is
malicious, H=30, 10 rounds, outer lr 1.0 without momentum, int8 payloads read from disk by
payloads.py; 2-core CPU, torch 2.13). Worst held-out loss over the attacks (none, scaled x100,
same-norm noise, sign flip, A Little Is Enough z=1, token liar), as a ratio to the honest-only
run (3 honest workers, plain mean: 3.9115): mean 2.891 (x100 scaling: 11.31), clip_mean 1.102,
trimmed_mean 1.046, centered_clip 1.029 (sign flip, 4.0239; every other attack <= 1.006).
"centered_clip" is the only method within 3% of honest-only. The margin is thin and from one
seed: centered clipping started from the clipped mean instead of the trimmed mean measured
1.030 (+3.00%) on the same run. Sign flip at an honest norm is the attack that no norm screen
can see; every method bounds the x100 attack by refusing it.

Sparse payloads defeat centered clipping's view of an in-norm attack (their supports overlap
little, so nobody is nearer the centre than anybody else); for rounds of sparse contributions
every method but "mean" also runs the agreement screen (coordinator.agreement: refuse the
contribution whose cosine with the others' mean, on the entries it sent, is far below the
round's), one pass over the sparse blocks per contribution it refuses, plus one.

The default is "centered_clip" (also the run config's `swarm.aggregation`). Unlike
"clip_mean" it changes honest rounds too; its cost there, measured on `crowdtrain demo` (small,
3 honest workers, 5 rounds x H=30): held-out 4.477 against 4.458 with clip_mean (+0.4%),
still below the lone-worker floor (4.547).

Pure functions and small classes; imports only torch, numpy, the standard library, kernels.py
(numba, lazily) and the method names (METHODS, defined with the run's settings in
crowdtrain.run.folder).
"""

from __future__ import annotations

import math
import numbers
import statistics
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from crowdtrain.coordinator import agreement, kernels, trimmed
from crowdtrain.coordinator.trimmed import selection_network, weighted_trimmed_mean
from crowdtrain.run.folder import AGGREGATION_METHODS as METHODS

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
    iterations for "centered_clip" (1..100). agreement_factor: in rounds of sparse payloads
    (every source's `sparse` is true), a contribution whose agreement with the others
    (`agreement.agreements`) is below agreement_factor x the round's median is refused, one
    at a time (in [0, 1); 0: no agreement screen).
    """

    method: str = "centered_clip"
    clip_factor: float = 2.0
    trim_fraction: float = 0.25
    refuse_factor: float = 10.0
    cc_iters: int = 3
    agreement_factor: float = 0.25

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
        if not real(self.agreement_factor) or not 0 <= self.agreement_factor < 1:
            raise ValueError(f"agreement_factor must be in [0, 1), got "
                             f"{self.agreement_factor!r}")


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
    """One contribution's delta, readable a slice at a time.

    A source may also offer `read_into(name, a, b, out)`, writing the same values as
    `read(name, a, b)` into `out` (a contiguous float32 tensor of b - a elements) without
    allocating: `robust_aggregate` then decodes every contribution's block straight into one
    preallocated matrix (the payload sources of coordinator.payloads do). An int8 payload
    source also offers `int8_rows(name)` (its blocks and scales as arrays): when every source
    does, a block matrix is decoded in one compiled call (`kernels.row_decoder`)."""

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Flat float32 elements [a, b) of parameter `name` (flattened row-major)."""
        ...


class TensorSource:
    """A DeltaSource over a dict of in-memory tensors (for tests and simulations); `sparse`:
    whether they stand for sparse payloads (the agreement screen then applies, as it does
    to payloads.SafetensorsSparseSource)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], sparse: bool = False) -> None:
        self.tensors = {k: v.detach().reshape(-1) for k, v in tensors.items()}
        self.sparse = sparse

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Flat float32 elements [a, b) of `name`."""
        t = self.tensors[name]
        if not 0 <= a <= b <= t.numel():
            raise ValueError(f"range [{a}, {b}) is outside {name} ({t.numel()} elements)")
        return t[a:b].to(torch.float32)

    def read_into(self, name: str, a: int, b: int, out: torch.Tensor) -> None:
        """`read(name, a, b)` written into `out`."""
        out.copy_(self.read(name, a, b))


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


def _filler(src: DeltaSource) -> Callable[[str, int, int, torch.Tensor], None]:
    """`src.read_into` where the source has one, else a `read_slice` copied into `out`."""
    into = getattr(src, "read_into", None)
    if callable(into):
        return into

    def fill(name: str, a: int, b: int, out: torch.Tensor) -> None:
        out.copy_(read_slice(src, name, a, b))

    return fill


# ---------------------------------------------------------------------------- the math
# (the trimmed mean by selection networks: trimmed.py)


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each row of `x` (or of a 1-D `x`) as float64: the float32 norms of
    runs of 4096 values (one fused reduction, nothing written), squared and added in float64
    (within ~1e-7 relative of an all-float64 sum, at a twentieth of its cost); a last run of
    fewer values as float32 squares added in float64."""
    rows = x.reshape(-1, x.shape[-1])
    cut = rows.shape[1] // 4096 * 4096
    total = torch.square(rows[:, cut:]).sum(1, dtype=torch.float64)
    if cut:
        part = torch.linalg.vector_norm(rows[:, :cut].unflatten(1, (-1, 4096)), dim=2)
        total += part.to(torch.float64).square().sum(1)
    return total if x.dim() > 1 else total[0]


def _support(x: torch.Tensor) -> torch.Tensor | None:
    """The columns of `x` (n x L, on the CPU) where some value is not zero, as int64 indices,
    when they are at most half of them (sparse payloads: ~1% sent a contribution), else None.
    Every method gives 0 on a column of zeros (the means and the trimmed mean are 0, so is
    centered clipping's D = X - v0 there), so the math can run on the other columns alone.
    Row 0 denser than half: None at once (the union is denser still)."""
    length = x.shape[1]
    if length < 1024 or 2 * int(torch.count_nonzero(x[0])) > length:
        return None
    # max |x| per column, zero exactly where the column is (torch.aminmax along dim 0 is
    # ~10x slower than amax and amin apart, and so are boolean ops on the columns)
    cols = torch.maximum(x.amax(0), x.amin(0).neg_()).nonzero().squeeze(1)
    return cols if 2 * cols.numel() <= length else None


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _centered_clip_coefficients(diag: torch.Tensor, times_g: Callable[[list[float]],
                                torch.Tensor], p: list[float], iters: int) -> list[float]:
    """The coefficients a of centered clipping's result v0 + D^T a, from G = D D^T given as
    its diagonal and a product `times_g(a)` = G a (float64): `iters` times
    v <- v + sum_j p_j min(1, tau / |x_j - v|) (x_j - v), with tau the median distance
    |x_j - v| at that iteration (a coefficient vector a tracks v - v0 = D^T a). G a is asked
    for iters - 1 times (a = 0 at the first iteration)."""
    d = diag.to(torch.float64)
    n = len(p)
    a = torch.zeros(n, dtype=torch.float64)
    for it in range(iters):
        ga = times_g([float(x) for x in a]).to(torch.float64) if it else torch.zeros_like(a)
        sq = d - 2 * ga + a @ ga
        dist = [math.sqrt(max(float(s), 0.0)) for s in sq]
        tau = _median(dist)
        if tau <= 0:
            break
        c = torch.tensor([pj * min(1.0, tau / dj) if dj > 0 else pj
                          for pj, dj in zip(p, dist, strict=True)], dtype=torch.float64)
        a = a * (1 - float(c.sum())) + c
    return [float(x) for x in a]


def gram_by_passes(n: int, iters: int) -> bool:
    """Whether centered clipping over n contributions gets G a by a pass over the blocks for
    each of its iters - 1 products (decode, two matrix-vector products: ~0.75 ns a value at
    n = 100) rather than by the Gram matrix in the first pass (n multiply-adds a value: ~2.2
    ns at n = 100, 0.36 at n = 8). Measured (one thread, int8 payloads, 3 iterations: 7.00
    against 7.74 ns a value at n = 100, 6.24 against 6.18 at 64, idle; equal at load 7):
    bench/results/aggregation.md, section 0.2."""
    return n >= PASSES_FROM * max(iters - 1, 1)


PASSES_FROM = 34  # contributions per G a product from which passes beat the Gram matrix


# ---------------------------------------------------------------------------- the passes


def block_for(n: int, budget_bytes: int = 256 << 20, threads: int = 1) -> int:
    """`block_elems` for aggregating `n` deltas on `threads` threads: a power of two, at most
    2**17 values, at most 2**22 / n (the n x block float32 matrix stays within 16 MB, in the
    last-level cache) and within `budget_bytes` for the working set, n x block x 12 bytes per
    thread (the block matrix and two scratch matrices), but never under 2**12 (a sparse
    payload's chunk): a round's memory stays flat however many volunteers report. Measured
    (8 x 20M, 2 threads: 2**17 vs 2**16 vs 2**15: 2.45, 2.63, 3.57 ns a value; 100 x 10M, one
    thread: 2**15 7.7 s, 2**14 8.8 s, 2**16 8.2 s): smaller blocks pay more per-call overhead
    (~100 operations a block, and the GIL between threads), larger ones fall out of cache."""
    n, threads = max(n, 1), max(threads, 1)
    fit = min(1 << 17, (1 << 22) // n, budget_bytes // (12 * n * threads))
    return max(1 << 12, 1 << (max(fit, 1).bit_length() - 1))


@dataclass
class _Block:
    """What one pass learned about one block (summed over blocks in block order)."""

    sq: torch.Tensor | None = None  # per contribution: sum of squares (float64)
    gram: torch.Tensor | None = None  # D D^T of this block (float64)
    dd: torch.Tensor | None = None  # its diagonal alone (when G a comes from passes)
    ga: torch.Tensor | None = None  # D (D^T a) of this block (float64)
    agree: torch.Tensor | None = None  # agreement.block_stats of this block (float64)

    def add(self, other: _Block) -> None:
        """Add `other`'s figures to these, in float64 on the CPU."""
        for field in ("sq", "gram", "dd", "ga", "agree"):
            part = getattr(other, field)
            if part is not None:
                part = part.to("cpu", torch.float64)
                mine = getattr(self, field)
                setattr(self, field, part.clone() if mine is None else mine.add_(part))


class _Passes:
    """The passes of one `robust_aggregate` call: block reads into per-thread matrices, the
    thread pool, the device."""

    def __init__(self, sources, names_shapes, block_elems, threads, device):
        self.sources = list(sources)
        # sparse payloads only (the agreement screen's rounds)
        self.sparse = all(getattr(s, "sparse", False) for s in self.sources)
        self.fill = [_filler(s) for s in sources]
        self.decode_rows = kernels.row_decoder()
        self._int8: dict[str, tuple | None] = {}  # name -> `_int8_table`
        self._int8_lock = threading.Lock()
        self.blocks = list(param_blocks(names_shapes, block_elems))
        self.threads = max(1, threads)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.shapes = {name: tuple(int(s) for s in shape)
                       for name, shape in names_shapes.items()}
        # every pass writes every block, so the output needs no zeros
        self.out = {name: torch.empty(math.prod(shape), dtype=torch.float32)
                    for name, shape in self.shapes.items()}
        self.local = threading.local()

    def buffer(self, tag: str, rows: int, cols: int, device: torch.device | None = None
               ) -> torch.Tensor:
        """This thread's float32 scratch matrix `tag`, rows x cols (reused from block to
        block: nothing is allocated per block once the largest block has been seen)."""
        store = self.local.__dict__.setdefault("buffers", {})
        device = device or self.device
        buf = store.get(tag)
        if buf is None or buf.numel() < rows * cols:
            buf = torch.empty(rows * cols, dtype=torch.float32, device=device)
            store[tag] = buf
        return buf[:rows * cols].view(rows, cols)

    def matrix(self, rows: Sequence[int], mult: torch.Tensor | None, name: str, a: int,
               b: int, compact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block [a, b) of `name` of the contributions `rows` (row j scaled by mult[j]
        when given), decoded into this thread's rows x (b - a) float32 matrix on the device,
        and None; or, when `compact` and the block is mostly columns of zeros (`_support`,
        on the CPU), the matrix of its other columns alone and their indices."""
        cpu = self.device.type == "cpu"
        x = self.buffer("x" if cpu else "host", len(rows), b - a, torch.device("cpu"))
        table = self._int8_table(name)
        if table is not None and a % table[2] == 0 and (b - a) % table[2] == 0 \
                and b <= table[3]:  # every row int8 and whole blocks: one compiled call
            qbase, sbase, bs, _ = table
            idx = list(rows)
            self.decode_rows(qbase[idx] + a, sbase[idx] + 4 * (a // bs), x.numpy(), bs)
        else:
            for i, row in zip(rows, x.unbind(0), strict=True):
                self.fill[i](name, a, b, row)
        cols = _support(x) if compact and cpu else None
        if cols is not None:
            x = torch.index_select(x, 1, cols, out=self.buffer("xs", len(rows), cols.numel()))
        if not cpu:
            x = self.buffer("x", len(rows), b - a).copy_(x)
        if mult is not None:
            x.mul_(mult[:, None])
        return x, cols

    def _int8_table(self, name: str) -> tuple | None:
        """For `kernels.row_decoder`: (the address of every source's int8 blocks of `name`,
        of its scales, the block, how many values the whole blocks cover), when every source
        offers them (`int8_rows`: int8 payloads) with one block size and no scale that could
        overflow a value (those are checked row by row); else None. Made once per name."""
        with self._int8_lock:
            if name in self._int8:
                return self._int8[name]
            got = None
            offers = [getattr(s, "int8_rows", None) for s in self.sources]
            if self.decode_rows is not None and all(callable(f) for f in offers):
                parts = [f(name) for f in offers]
                ok = all(p is not None and not p[3] and p[0].flags.c_contiguous
                         and p[1].flags.c_contiguous for p in parts)
                if ok and len({(p[0].shape, p[2]) for p in parts}) == 1:
                    got = (np.array([p[0].ctypes.data for p in parts], dtype=np.int64),
                           np.array([p[1].ctypes.data for p in parts], dtype=np.int64),
                           parts[0][2], parts[0][0].size)
            self._int8[name] = got
            return got

    def scratch(self, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two scratch matrices for the block math: n + 1 and n rows of `length`."""
        return self.buffer("work", n + 1, length), self.buffer("keep", n, length)

    def target(self, name: str, a: int, b: int) -> torch.Tensor:
        """Where a block's result goes: the output itself, or a device buffer."""
        if self.device.type == "cpu":
            return self.out[name][a:b]
        return self.buffer("v", 1, b - a)[0]

    def put(self, name: str, a: int, b: int, v: torch.Tensor,
            cols: torch.Tensor | None = None) -> None:
        """Write a block's result: `v` for all of [a, b), or for the columns `cols` alone
        (the others 0)."""
        dst = self.out[name][a:b]
        if cols is not None:
            dst.zero_()
            dst.index_copy_(0, cols, v.to(dst.device))
        elif v.data_ptr() != dst.data_ptr():
            dst.copy_(v)

    def get(self, name: str, a: int, b: int) -> torch.Tensor:
        return self.out[name][a:b].to(self.device)

    def run(self, fn: Callable[[str, int, int], _Block]) -> _Block:
        """`fn` over every block, on the thread pool; what the blocks return summed in block
        order as they come (float64: deterministic, and no per-block results kept)."""
        total = _Block()
        if self.threads == 1 or len(self.blocks) == 1:
            for blk in self.blocks:
                total.add(fn(*blk))
            return total
        # one intra-op thread in every worker too: a new thread does not inherit the
        # caller's setting, and torch's intra-op threads inside concurrent blocks
        # oversubscribe the cores (measured 4x slower for the mean on 2 loaded cores)
        with ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            for part in pool.map(lambda blk: fn(*blk), self.blocks):
                total.add(part)
        return total


# The work is organised in passes over the model, one block of `block_elems` coordinates at a
# time: every contribution's block is decoded into one n x L float32 matrix (payload sources
# write straight into it), on which each method is a handful of whole-matrix operations: a
# matrix-vector product for the means, a selection network and two small matrix products for
# the trimmed mean (`weighted_trimmed_mean`), a matrix product for the Gram matrix of
# centered clipping. The blocks are independent, so they run on a thread pool (and on a GPU
# when one is given), each thread with its own matrices; whatever crosses blocks (norms, the
# Gram matrix) is summed in block order afterwards, in float64, so the result does not depend
# on which thread ran which block.
#
# Honest rounds take one pass (two for centered clipping): the first pass computes the norms
# for screening and, assuming nobody is clipped, the method's result; only when screening
# clips or refuses someone does a second pass redo it with the multipliers.
#
# Centered clipping needs no pass per iteration. With v0 the (trimmed-mean) start and
# D = X - v0 (rows: contributions), every iterate is v_t = v0 + D^T a_t for a small vector
# a_t: v_{t+1} = v_t + sum_j c_j (x_j - v_t) gives a_{t+1} = (1 - sum c) a_t + c, and the
# distances it needs are |x_j - v_t|^2 = G_jj - 2 (G a_t)_j + a_t^T G a_t with G = D D^T.
# One pass computes v0 and G, the iterations run on n x n numbers, and a last pass writes
# v0 + D^T a = (1 - sum a) v0 + X^T a. G costs n multiply-adds a value, so from
# `gram_by_passes` contributions (~68 for 3 iterations) the first pass keeps only G's diagonal
# and each later iteration gets G a_t = D (D^T a_t) from a pass of its own (decode, D, two
# matrix-vector products: ~0.75 ns a value, against ~2.2 ns for the 100 x 100 Gram matrix).
#
# Sparse payloads: a contribution sends ~1% of each chunk, so most columns of a block matrix
# are all zero, and on such a column every method gives 0 (so does D = X - v0). The first
# pass (`_support`) keeps the columns where someone sent a value, when they are at most
# half, and runs the method on those alone; the means and the cheap passes (G a, the last) do
# not bother (one matrix-vector product costs less than finding the columns).


def robust_aggregate(
    sources: Sequence[DeltaSource],
    weights: Sequence[float],
    names_shapes: Mapping[str, Sequence[int]],
    cfg: RobustConfig,
    block_elems: int | None = None,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], Screening]:
    """Aggregate the deltas of `sources` (one per contribution, `weights` > 0 e.g. tokens)
    into float32 tensors of `names_shapes`, and the per-contribution screening (multiplier,
    reason) as `screen` returns it (multiplier 0.0: refused and left out of the aggregate).

    Reads the model block by block (`block_elems` elements at most, never spanning two
    parameters; default `block_for(n, threads=threads)`), every contribution's block at once,
    on `threads` threads (default: torch's thread count) and on `device` (default: the CPU).
    Screening uses each source's global L2 norm. Refused contributions are dropped and the
    weights of the rest renormalised; clipped ones keep their weight. With method "mean" this
    equals `outer.weighted_mean` of the fully decoded deltas up to float32 rounding. The
    result is the same for any block size, thread count and device up to float32 rounding,
    and bit-identical run to run for a given block size and thread count. Peak memory
    besides the output: about threads x n x block_elems x 12 bytes.
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
    threads = threads if threads is not None else torch.get_num_threads()
    if block_elems is None:
        block_elems = block_for(n, threads=threads)
    if isinstance(block_elems, bool) or not isinstance(block_elems, int) or block_elems < 1:
        raise ValueError(f"block_elems must be a positive int, got {block_elems!r}")
    # threads across blocks, each block's ops on one thread: the blocks' operations are too
    # small for intra-op threads (on 2 loaded cores, 2 intra-op threads made one-thread
    # aggregation 20x slower), and inside concurrent blocks they oversubscribe the cores
    intra = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        passes = _Passes(sources, names_shapes, block_elems, threads, device)
        return _aggregate(passes, cfg, ws)
    finally:
        torch.set_num_threads(intra)


def _aggregate(passes: _Passes, cfg: RobustConfig, ws: list[float]
               ) -> tuple[dict[str, torch.Tensor], Screening]:
    n = len(ws)
    screening: Screening = [(1.0, None)] * n
    everyone = list(range(n))
    # pass 1: the norms, and the result as if nobody were clipped
    blocks = _combine(passes, cfg, everyone, [1.0] * n, ws, norms=cfg.method != "mean")
    if cfg.method != "mean":
        screening = screen([math.sqrt(float(s)) for s in blocks.sq], cfg)
    if cfg.method != "mean" and cfg.agreement_factor > 0 and passes.sparse:
        screening = _agreement_screen(passes, cfg, screening, ws)
    if any(m != 1.0 for m, _ in screening):  # pass 2: again, with the multipliers
        keep = [i for i in range(n) if screening[i][0] > 0]
        mult = [screening[i][0] for i in keep]
        blocks = _combine(passes, cfg, keep, mult, ws, norms=False)
    else:
        keep, mult = everyone, [1.0] * n
    if cfg.method == "centered_clip" and len(keep) >= 3:
        total = math.fsum(ws[i] for i in keep)
        scale = _multipliers(mult, passes.device)
        if blocks.gram is not None:
            gram = blocks.gram
            diag = torch.diagonal(gram)

            def times_g(a: list[float]) -> torch.Tensor:
                return gram @ torch.tensor(a, dtype=torch.float64)
        else:
            diag = blocks.dd

            def times_g(a: list[float]) -> torch.Tensor:
                return _times_gram(passes, keep, scale, a)
        a = _centered_clip_coefficients(diag, times_g, [ws[i] / total for i in keep],
                                        cfg.cc_iters)
        if any(x != 0.0 for x in a):  # last pass: v0 + D^T a = (1 - sum a) v0 + X^T a
            coef = torch.tensor(a, dtype=torch.float32, device=passes.device)
            beta = 1.0 - math.fsum(a)

            def finish(name: str, a_: int, b: int) -> _Block:
                x, _ = passes.matrix(keep, scale, name, a_, b)  # too cheap to compact
                v0 = passes.get(name, a_, b)
                passes.put(name, a_, b, torch.addmv(v0, x.t(), coef, beta=beta))
                return _Block()

            passes.run(finish)
    result = {name: passes.out[name].reshape(passes.shapes[name]) for name in passes.out}
    return result, screening


def _agreement_screen(passes: _Passes, cfg: RobustConfig, screening: Screening,
                      ws: list[float]) -> Screening:
    """`screening` with the contributions the agreement screen refuses (coordinator.agreement)
    set to (0.0, reason): the least agreeing one at a time, measured again on the rest after
    each, while at least 3 remain and at most (n - 1) // 2 of those kept by the norm screen
    are refused. One pass over the (sparse) blocks per measurement."""
    keep = [i for i, (m, _) in enumerate(screening) if m > 0]
    out = list(screening)
    for _ in range((len(keep) - 1) // 2):
        if len(keep) < 3:
            break
        total = math.fsum(ws[i] for i in keep)
        p = torch.tensor([ws[i] / total for i in keep], dtype=torch.float32,
                         device=passes.device)
        scale = _multipliers([out[i][0] for i in keep], passes.device)
        rows = list(keep)

        def block(name: str, a: int, b: int, rows=rows, p=p, scale=scale) -> _Block:
            x, _ = passes.matrix(rows, scale, name, a, b, compact=True)
            work = passes.buffer("keep", len(rows), x.shape[1])
            return _Block(agree=agreement.block_stats(x, p, work))

        got = agreement.least_agreeing(agreement.agreements(passes.run(block).agree),
                                       cfg.agreement_factor)
        if got is None:
            break
        j, reason = got
        out[keep.pop(j)] = (0.0, reason)
    return out


def _multipliers(mult: Sequence[float], device: torch.device) -> torch.Tensor | None:
    """The screening multipliers as a float32 column scale, or None when all are 1."""
    if all(m == 1.0 for m in mult):
        return None
    return torch.tensor(mult, dtype=torch.float32, device=device)


def _times_gram(passes: _Passes, rows: list[int], scale: torch.Tensor | None,
                a: list[float]) -> torch.Tensor:
    """One pass: G a = D (D^T a) with D = X - v0 (v0: `passes.out`, the start) over the
    contributions `rows` (scaled by `scale`), summed over blocks in float64. D is not formed:
    u = D^T a = X^T a - (sum a) v0 and D u = X u - (v0 . u) 1, two matrix-vector products on
    the block matrix as decoded. (Where X is close to v0 both lose digits to cancellation, but
    only in proportion to |v0| / |D|, and the result v0 + D^T a multiplies that back by |D|:
    its error stays ~eps |v0|.)"""
    coef = torch.tensor(a, dtype=torch.float32, device=passes.device)
    total = math.fsum(a)

    def block(name: str, a_: int, b: int) -> _Block:
        x, _ = passes.matrix(rows, scale, name, a_, b)
        v0 = passes.get(name, a_, b)
        u = torch.mv(x.t(), coef).sub_(v0, alpha=total)
        g = torch.mv(x, u).sub_(torch.dot(v0, u))
        return _Block(ga=g.to(torch.float64))

    return passes.run(block).ga


def _combine(passes: _Passes, cfg: RobustConfig, rows: list[int], mult: list[float],
             ws: list[float], norms: bool) -> _Block:
    """One pass: writes the method's combination of the contributions `rows` (scaled by
    `mult`) into `passes.out` (the weighted mean, or the trimmed mean that centered clipping
    starts from), and returns what crosses blocks: the sum of squares of every row (when
    `norms`, of the unscaled rows: norms are taken in the first pass, where `mult` is all 1)
    and, for centered clipping, the Gram matrix of the rows minus that start (or, where G a
    comes from passes, `gram_by_passes`, its diagonal alone)."""
    total = math.fsum(ws[i] for i in rows)
    robust = cfg.method in ("trimmed_mean", "centered_clip")
    k = trimmed.trim_count(len(rows), cfg.trim_fraction) if robust else 0
    cc = cfg.method == "centered_clip" and len(rows) >= 3
    gram = cc and not gram_by_passes(len(rows), cfg.cc_iters)
    wt = torch.tensor([ws[i] for i in rows], dtype=torch.float32, device=passes.device)
    coef = torch.tensor([ws[i] / total for i in rows], dtype=torch.float32,
                        device=passes.device)
    scale = _multipliers(mult, passes.device)
    # the trimmed mean, the norms and centered clipping's Gram matrix (or its diagonal) in
    # one compiled loop over the block (kernels.first_pass), where numba is there
    fused = (bool(k) or cc) and passes.device.type == "cpu" and kernels.available()
    network = kernels.network_array(selection_network(len(rows), (k, len(rows) - k - 1))
                                    if k else ())
    gram_mode = (1 if gram else 2) if cc else 0

    def block(name: str, a: int, b: int) -> _Block:
        # (the means are one matrix-vector product: cheaper than finding the support)
        x, cols = passes.matrix(rows, scale, name, a, b, compact=bool(k) or cc)
        length = x.shape[1]
        v = passes.target(name, a, b) if cols is None else passes.buffer("vs", 1, length)[0]
        if fused:
            got = kernels.first_pass(x, wt, k, network, v, norms, gram_mode)
            if got is not None:
                passes.put(name, a, b, v, cols)
                sq, g = got
                return _Block(sq=sq, gram=g if gram_mode == 1 else None,
                              dd=g if gram_mode == 2 else None)
        work, keep = passes.scratch(len(rows), length)
        res = _Block(sq=_sumsq(x) if norms else None)
        if k:
            weighted_trimmed_mean(x, wt, k, (work, keep), out=v)
        else:
            torch.mv(x.t(), coef, out=v)
        passes.put(name, a, b, v, cols)
        if cc:
            d = torch.sub(x, v, out=keep)
            if gram:
                res.gram = torch.mm(d, d.t()).to(torch.float64)
            else:
                res.dd = _sumsq(d)
        return res

    return passes.run(block)
