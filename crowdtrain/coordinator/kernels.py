"""Compiled loops for the close's hot paths (numba): the robust aggregation's first pass over
a block matrix, and the int8 payload decode that fills that matrix.

`aggregation._combine` decodes every contribution's block into an n x L float32 matrix and
then, for the trimmed mean and centered clipping, runs ~10 whole-matrix torch operations on
it (a selection network of elementwise min/max, a mask, two weighted sums, the norms, D and
its Gram matrix): each a pass over the matrix, each a Python call holding the GIL. `first_pass`
does all of it in one loop over tiles of the columns, each tile small enough to stay in the
core's L1/L2 cache, compiled by numba (llvmlite; no compiler needed at run time) and run
without the GIL, so the aggregation's threads run it side by side. The loops over a tile's
columns are the innermost, so LLVM vectorises them (the same network, min/max over many
columns at once); columns never mix, and every sum runs in one fixed order, so the result is
bit-identical run to run on a machine.

The int8 decodes (coordinator/rowdecode.py) write q x scale for whole int8 blocks straight
from the payloads' memory maps, one row (`dequantizer`) or a whole block matrix in one call
(`row_decoder`, what the aggregation uses): torch's mixed-dtype multiply (int8 x float32 into
float32) runs ~1.9 ns a value on one thread, these loops ~0.15 ns, the same single float32
product so the same bits; every pass of the close decodes every contribution again, so this
was most of a 100-contribution close.

numba is imported lazily: without it (or where it cannot compile) `first_pass` and
`dequantizer()` return None and the caller runs its torch operations instead;
`enabled = False` forces that path (tests).
The compiled code is cached on disk (`cache=True`: next to this file, or numba's user-wide
cache directory), so only the first process on a machine pays the JIT (~seconds, once).
Measured: BENCHMARKS.md, "Aggregation speed".
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import numpy as np
import torch

enabled = True  # False: callers use their torch operations (tests compare the two)

_lock = threading.Lock()


def _first_pass_py(x, w, k, ops, tile, v, sq, gram, want_sq, gram_mode):  # pragma: no cover
    """Per column of `x` (n x L float32): v = the weighted trimmed mean (k dropped at each end,
    ties broken by row order as a stable sort does; k = 0: the weighted mean); `sq[i]` +=
    the sum of squares of row i (when `want_sq`: float32 squares added in float64, as
    `aggregation._sumsq` adds them, so the norms hardly depend on the block size); with
    D = x - v, `gram` += D D^T (gram_mode 1) or its diagonal into gram[i, 0] (gram_mode 2).
    `ops`: the selection network's comparators (i, j, flags: 1 keep the minimum in i, 2 the
    maximum in j, 3 both). The other sums over a tile's columns are float32, added into the
    float64 outputs tile by tile. (Rows are taken as 1-D views and min/max written as
    selects: that is what LLVM vectorises.)"""
    n, length = x.shape
    work = np.empty((n, tile), dtype=np.float32)
    lo = np.empty(tile, dtype=np.float32)
    hi = np.empty(tile, dtype=np.float32)
    cl = np.empty(tile, dtype=np.float32)
    ch = np.empty(tile, dtype=np.float32)
    el = np.empty(tile, dtype=np.float32)
    eh = np.empty(tile, dtype=np.float32)
    num = np.empty(tile, dtype=np.float32)
    den = np.empty(tile, dtype=np.float32)
    vt = np.empty(tile, dtype=np.float32)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    nops = ops.shape[0]
    top = np.float32(n - k)
    kf = np.float32(k)
    for t0 in range(0, length, tile):
        m = min(tile, length - t0)
        if k > 0:
            for i in range(n):
                xr = x[i, t0:t0 + m]
                wr = work[i]
                for j in range(m):
                    wr[j] = xr[j]
            for c in range(nops):
                wa = work[ops[c, 0]]
                wb = work[ops[c, 1]]
                f = ops[c, 2]
                if f == 3:
                    for j in range(m):
                        p = wa[j]
                        q = wb[j]
                        wa[j] = p if p < q else q
                        wb[j] = q if p < q else p
                elif f == 1:
                    for j in range(m):
                        p = wa[j]
                        q = wb[j]
                        wa[j] = p if p < q else q
                else:
                    for j in range(m):
                        p = wa[j]
                        q = wb[j]
                        wb[j] = q if p < q else p
            wl = work[k]
            wh = work[n - k - 1]
            for j in range(m):
                lo[j] = wl[j]
                hi[j] = wh[j]
                cl[j] = zero
                ch[j] = zero
                el[j] = zero
                eh[j] = zero
                num[j] = zero
                den[j] = zero
            for i in range(n):  # how many values lie below L and below H
                xr = x[i, t0:t0 + m]
                for j in range(m):
                    xv = xr[j]
                    cl[j] += one if xv < lo[j] else zero
                    ch[j] += one if xv < hi[j] else zero
            for i in range(n):
                wi = w[i]
                xr = x[i, t0:t0 + m]
                for j in range(m):
                    xv = xr[j]
                    L = lo[j]
                    H = hi[j]
                    isl = xv == L
                    ish = xv == H
                    # a value equal to L (or H) has the stable rank: the values below it plus
                    # the earlier rows equal to it; it is kept when that rank is in [k, n - k)
                    r = cl[j] + el[j] if isl else ch[j] + eh[j]
                    keep = ((xv > L) & (xv < H)) | ((isl | ish) & (r >= kf) & (r < top))
                    el[j] += one if isl else zero
                    eh[j] += one if ish else zero
                    num[j] += wi * xv if keep else zero
                    den[j] += wi if keep else zero
            for j in range(m):
                vt[j] = num[j] / den[j]
        else:
            for j in range(m):
                vt[j] = zero
            tot = zero
            for i in range(n):
                tot += w[i]
            for i in range(n):
                wi = w[i] / tot
                xr = x[i, t0:t0 + m]
                for j in range(m):
                    vt[j] += wi * xr[j]
        vr = v[t0:t0 + m]
        for j in range(m):
            vr[j] = vt[j]
        if want_sq:
            for i in range(n):
                xr = x[i, t0:t0 + m]
                s64 = 0.0
                for j in range(m):
                    s64 += np.float64(xr[j] * xr[j])
                sq[i] += s64
        if gram_mode:
            for i in range(n):
                xr = x[i, t0:t0 + m]
                wr = work[i]
                for j in range(m):
                    wr[j] = xr[j] - vt[j]
            if gram_mode == 1:
                for p in range(n):
                    wp = work[p]
                    for q in range(p + 1):
                        wq = work[q]
                        s = zero
                        for j in range(m):
                            s += wp[j] * wq[j]
                        gram[p, q] += s
            else:
                for p in range(n):
                    wp = work[p]
                    s = zero
                    for j in range(m):
                        s += wp[j] * wp[j]
                    gram[p, 0] += s
    if gram_mode == 1:
        for p in range(n):
            for q in range(p):
                gram[q, p] = gram[p, q]


def _warm_first_pass(fn: Callable) -> None:
    x = np.zeros((3, 5), dtype=np.float32)
    fn(x, np.ones(3, dtype=np.float32), 1, np.array([[0, 1, 3]], dtype=np.int64), 16,
       np.empty(5, dtype=np.float32), np.zeros(3), np.zeros((3, 3)), True, 1)


def _warm_dequantize(fn: Callable) -> None:
    fn(np.zeros((2, 4), dtype=np.int8), np.ones(2, dtype=np.float32),
       np.empty((2, 4), dtype=np.float32))


def _warm_decode_rows(fn: Callable) -> None:
    q, scale = np.zeros((2, 16), dtype=np.int8), np.ones(2, dtype=np.float32)
    fn(np.array([q.ctypes.data], dtype=np.int64), np.array([scale.ctypes.data], dtype=np.int64),
       np.empty((1, 32), dtype=np.float32), 16)


def _load(name: str) -> Callable:
    """Kernel `name` compiled: `first_pass` from its Python loop here; the int8 decodes from
    coordinator/rowdecode.py (numba-only code: raw addresses)."""
    import numba

    if name == "first_pass":
        return numba.njit(nogil=True, cache=True, fastmath=True, boundscheck=False,
                          error_model="numpy")(_first_pass_py)
    from crowdtrain.coordinator import rowdecode

    return {"dequantize": rowdecode.dequantize_rows, "decode_rows": rowdecode.decode_rows}[name]


_WARM = {"first_pass": _warm_first_pass, "dequantize": _warm_dequantize,
         "decode_rows": _warm_decode_rows}


@functools.cache
def _compiled(name: str = "first_pass") -> Callable | None:
    """Kernel `name` compiled (cached on disk), or None where numba is missing or fails."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return None
    try:
        fn = _load(name)
        _WARM[name](fn)  # compile (or load from the cache) the one signature the callers use
        return fn
    except Exception:  # no cache directory, no LLVM target: the torch path does it
        return None


def available(name: str = "first_pass") -> bool:
    """Whether kernel `name` runs compiled code (numba importable, compiled, and `enabled`)."""
    if not enabled:
        return False
    with _lock:
        return _compiled(name) is not None


def dequantizer() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """The compiled int8 decode, `fn(q, scale, out)`: out = q * scale for `q` (r x block
    int8), `scale` (r float32, one a row) and `out` (r x block float32), numpy arrays (views,
    no copy); bit-identical to `torch.mul(q, scale[:, None], out=out)`, without the GIL. None
    where it is not available: the caller multiplies with torch. (A source looks it up once
    and calls it per block: every Python step per call counts, 100 contributions x ~300
    blocks x 4 passes a round.)"""
    return _compiled("dequantize") if available("dequantize") else None


def row_decoder() -> Callable[[np.ndarray, np.ndarray, np.ndarray, int], None] | None:
    """The compiled decode of a whole block matrix, `fn(qaddr, saddr, out, block)`: row i of
    `out` (n x L float32, C-contiguous, L a multiple of `block`) = the L int8 values at
    address qaddr[i] times, block by block, the float32 scales at saddr[i] (int64 arrays of
    addresses into arrays the caller keeps alive; coordinator/rowdecode.py). Bit-identical
    to the per-row decode. None where it is not available: the caller decodes row by row."""
    return _compiled("decode_rows") if available("decode_rows") else None


def tile_for(n: int) -> int:
    """Columns per tile: n x tile float32 within ~64 KB (L2-resident at worst), 64..512."""
    return int(max(64, min(512, (16384 // max(n, 1)) // 16 * 16)))


def first_pass(x: torch.Tensor, w: torch.Tensor, k: int, network: np.ndarray,
               v: torch.Tensor, norms: bool, gram_mode: int
               ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The first pass's math on one block matrix `x` (n x L float32, contiguous, CPU): writes
    the weighted trimmed mean of each column into `v` (L float32, contiguous; k = 0: the
    weighted mean by `w`) and returns (sum of squares of each row as float64 when `norms`,
    else None; the Gram matrix of D = x - v when gram_mode 1, its diagonal when 2, else None,
    float64). `network`: `network_array(n, k)`. None (nothing written) where numba is not
    available: the caller does it with torch."""
    if not available():
        return None
    fn = _compiled()
    n = x.shape[0]
    sq = np.zeros(n)
    gram = np.zeros((n, n) if gram_mode == 1 else (n, 1))
    fn(x.numpy(), w.numpy(), int(k), network, tile_for(n), v.numpy(), sq, gram, bool(norms),
       int(gram_mode))
    g = None
    if gram_mode == 1:
        g = torch.from_numpy(gram)
    elif gram_mode == 2:
        g = torch.from_numpy(gram[:, 0].copy())
    return (torch.from_numpy(sq) if norms else None), g


def network_array(ops: tuple[tuple[int, int, bool, bool], ...]) -> np.ndarray:
    """A selection network's comparators (trimmed.selection_network) as an int64 m x 3
    array (i, j, 1 * keep_min + 2 * keep_max) for `first_pass`."""
    if not ops:
        return np.zeros((0, 3), dtype=np.int64)
    return np.array([(i, j, int(lo) + 2 * int(hi)) for i, j, lo, hi in ops], dtype=np.int64)
