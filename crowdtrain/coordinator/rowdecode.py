"""The int8 decode of a whole block matrix in one compiled call (numba), for the aggregation's
passes: row i of the n x L float32 matrix is contribution i's int8 values times its per-block
scales, read straight from the payload's memory map at the addresses `aggregation._Passes`
computes from the numpy views the payload sources hand out (`int8_rows`).

One call a block instead of one per contribution: in a 100 x 10M round the 130,800 per-row
calls cost as much Python as the decode itself. The row loop is `dequantize_rows`, compiled
for numpy arrays (so LLVM vectorises it; also the per-row decode, `kernels.dequantizer`);
each row is a `numba.carray` over the given addresses, which
the caller guarantees lie inside arrays that stay alive (the sources are open) and hold the
whole blocks asked for. This module imports numba: kernels.py imports it only where numba is
installed, and falls back to the per-row decode otherwise.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic


@intrinsic
def _int8_at(typingctx, addr):
    """An int8 pointer from an address (int64)."""
    sig = types.CPointer(types.int8)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int8)))

    return sig, codegen


@intrinsic
def _float32_at(typingctx, addr):
    """A float32 pointer from an address (int64)."""
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

    return sig, codegen


@numba.njit(nogil=True, cache=True, boundscheck=False)
def dequantize_rows(q, scale, out):  # pragma: no cover (compiled)
    """out[r, j] = float32(q[r, j]) * scale[r]: one float32 product a value, as torch's."""
    for r in range(q.shape[0]):
        s = scale[r]
        qr = q[r]
        orow = out[r]
        for j in range(q.shape[1]):
            orow[j] = np.float32(qr[j]) * s


@numba.njit(nogil=True, cache=True, boundscheck=False)
def decode_rows(qaddr, saddr, out, block):  # pragma: no cover (compiled)
    """Row i of `out` (n x L float32, C-contiguous, L a multiple of `block`) from the L int8
    values at address qaddr[i] and the L / block float32 scales at saddr[i]."""
    n, length = out.shape
    nb = length // block
    for i in range(n):
        q = numba.carray(_int8_at(qaddr[i]), (nb, block))
        s = numba.carray(_float32_at(saddr[i]), (nb,))
        dequantize_rows(q, s, out[i].reshape((nb, block)))
