"""Compiled (numba) building blocks for CPU kernels; imported only when numba is available.

The functions here are the compiled twins of torch code elsewhere in :mod:`lpm`: the
counter uniform of :func:`lpm.kernels.counter_uniform` (bit for bit the same numbers) and
an inverse-CDF lookup. Domain kernels (e.g. :mod:`substeps.epidemic.fast`) call them from
inside their own compiled loops; the torch versions stay the reference they are tested
against, and :func:`lpm.kernels.compiled_available` decides whether they are used.
"""

from __future__ import annotations

import numba
import numpy as np

from lpm.kernels import _MASK32, _MUL1, _MUL2_SIGNED

__all__ = ["uniform", "uniforms", "inverse_cdf"]

_M1 = np.int64(_MUL1)
_M2 = np.int64(_MUL2_SIGNED)
_MASK = np.int64(_MASK32)
_SCALE = np.float32(1.0 / (1 << 24))


@numba.njit(inline="always", cache=True)
def _mix(x):  # pragma: no cover - compiled
    x ^= x >> 16
    x = (x * _M1) & _MASK
    x ^= x >> 15
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


@numba.njit(inline="always", cache=True)
def uniform(i, k1, k2):  # pragma: no cover - compiled
    """Counter uniform of agent ``i`` under key ``(k1, k2)``: float32 in [0, 1)."""
    x = _mix((np.int64(i) ^ np.int64(k1)) & _MASK)
    x = _mix(x ^ np.int64(k2))
    return np.float32(x >> 8) * _SCALE


@numba.njit(cache=True)
def uniforms(index, k1, k2):  # pragma: no cover - compiled
    """Counter uniforms of the agents ``index`` (for tests against the torch version)."""
    out = np.empty(index.shape[0], dtype=np.float32)
    for k in range(index.shape[0]):
        out[k] = uniform(index[k], k1, k2)
    return out


@numba.njit(inline="always", cache=True)
def inverse_cdf(cdf, c, u):  # pragma: no cover - compiled
    """Steps drawn from row ``c`` of stacked CDFs ``[C, D]`` at uniform ``u`` (0 where the row is -1).

    The same comparisons as the torch version (``searchsorted`` over rows shifted by their code).
    """
    if cdf[c, 0] < 0:
        return np.int16(0)
    D = cdf.shape[1]
    q = min(max(np.float64(u), 0.0), 1.0 - 1e-12) + c
    lo, hi = 0, D
    while lo < hi:
        mid = (lo + hi) >> 1
        if max(cdf[c, mid], 0.0) + c <= q:
            lo = mid + 1
        else:
            hi = mid
    return np.int16(min(max(lo + 1, 1), D))
