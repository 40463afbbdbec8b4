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
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from lpm.kernels import _MASK32, _MUL1, _MUL2_SIGNED

__all__ = ["uniform", "uniforms", "inverse_cdf", "prefetch", "unique_pair_keys", "stable_source_order", "csr_by_source", "pair_edges", "undirected_from_keys", "masked_sum", "masked_fill"]

@intrinsic
def _llvm_prefetch(typingctx, arr, idx):  # pragma: no cover - compiled
    """``llvm.prefetch`` (write intent, keep in all cache levels) of ``arr[idx]``."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always")
def _no_prefetch(arr, idx):  # pragma: no cover - compiled
    pass


@numba.njit(cache=True)
def _probe_prefetch(a):  # pragma: no cover - compiled
    _llvm_prefetch(a, 1)
    return a[0]


def _pick_prefetch():
    """The prefetch intrinsic where this LLVM accepts it, else a no-op (prefetching changes speed, never results)."""
    try:
        _probe_prefetch(np.zeros(2, np.uint8))
        return _llvm_prefetch
    except Exception:  # an LLVM without the opaque-pointer intrinsic name
        return _no_prefetch


#: ``prefetch(arr, i)``: ask the cache for ``arr[i]`` ahead of a random access (no bounds check: only pass valid i)
prefetch = _pick_prefetch()

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


@numba.njit(cache=True)
def _bucket_starts(keys, n):  # pragma: no cover - compiled
    """First pass of the two-level counting sorts: ``(shift, buckets, starts)`` for keys in ``[0, n)``
    grouped into at most 1024 buckets of consecutive keys (few write streams in the scatter pass)."""
    shift = 0
    while (n - 1) >> shift >= 1024:
        shift += 1
    nb = ((n - 1) >> shift) + 1
    bstart = np.zeros(nb + 1, np.int64)
    for k in range(keys.shape[0]):
        bstart[(keys[k] >> shift) + 1] += 1
    for b in range(nb):
        bstart[b + 1] += bstart[b]
    return shift, nb, bstart


@numba.njit(cache=True)
def unique_pair_keys(lo, hi, n):  # pragma: no cover - compiled
    """Sorted distinct ``lo * n + hi`` (``torch.unique``'s result) by bucket sorts on ``lo``: O(pairs + n), no comparison sort.

    As in :func:`csr_by_source`, first into at most 1024 buckets of consecutive ``lo`` (few write
    streams), then each bucket by ``lo`` in cache, each ``lo``'s few ``hi`` by insertion sort."""
    m = lo.shape[0]
    shift, nb, bstart = _bucket_starts(lo, n)
    fill = bstart[:-1].copy()
    t_lo = np.empty(m, np.int64)
    t_hi = np.empty(m, np.int64)
    for k in range(m):
        b = lo[k] >> shift
        p = fill[b]
        fill[b] = p + 1
        t_lo[p] = lo[k]
        t_hi[p] = hi[k]
    width = 1 << shift
    local = np.zeros(width + 1, np.int64)
    col = np.empty(m, np.int64)
    keys = np.empty(m, np.int64)
    u = 0
    for b in range(nb):
        a, z = bstart[b], bstart[b + 1]
        first = b << shift
        local[:] = 0
        for k in range(a, z):
            local[t_lo[k] - first + 1] += 1
        for i in range(width):
            local[i + 1] += local[i]
        for k in range(a, z):
            q = t_lo[k] - first
            col[a + local[q]] = t_hi[k]
            local[q] += 1
        # local[i] is now the end of lo = first + i; buckets hold a handful of pairs: insertion sort
        lo_start = a
        for i in range(min(width, n - first)):
            x0, x1 = lo_start, a + local[i]
            lo_start = x1
            for x in range(x0 + 1, x1):
                v = col[x]
                y = x - 1
                while y >= x0 and col[y] > v:
                    col[y + 1] = col[y]
                    y -= 1
                col[y + 1] = v
            for x in range(x0, x1):
                if x == x0 or col[x] != col[x - 1]:
                    keys[u] = np.int64(first + i) * n + col[x]
                    u += 1
    return keys[:u]


@numba.njit(cache=True)
def stable_source_order(src, n):  # pragma: no cover - compiled
    """``(order, rowptr)``: the stable ``argsort`` of ``src`` (ids in ``[0, n)``) by a counting sort, and the CSR pointer."""
    rowptr = np.zeros(n + 1, np.int64)
    for k in range(src.shape[0]):
        rowptr[src[k] + 1] += 1
    for i in range(n):
        rowptr[i + 1] += rowptr[i]
    fill = rowptr[:-1].copy()
    order = np.empty(src.shape[0], np.int64)
    for k in range(src.shape[0]):
        s = src[k]
        order[fill[s]] = k
        fill[s] += 1
    return order, rowptr


@numba.njit(cache=True)
def csr_by_source(src, dst, weight, layer, n, out_src, out_dst):  # pragma: no cover - compiled
    """Edges sorted by source, stably (the stable ``argsort``'s order), into ``out_src``/``out_dst``;
    returns ``(weight, layer, rowptr)`` in that order.

    Two stable counting passes instead of one: first into at most 1024 buckets of consecutive
    sources (few write streams), then each bucket by source, whose counters and output span stay
    in cache; one pass over 1e8 edges with random writes costs a cache and TLB miss per edge."""
    e = src.shape[0]
    shift, nb, bstart = _bucket_starts(src, n)
    fill = bstart[:-1].copy()
    t_src = np.empty(e, out_src.dtype)
    t_dst = np.empty(e, out_dst.dtype)
    t_w = np.empty_like(weight)
    t_l = np.empty_like(layer)
    for k in range(e):
        s = src[k]
        b = s >> shift
        p = fill[b]
        fill[b] = p + 1
        t_src[p] = s
        t_dst[p] = dst[k]
        t_w[p] = weight[k]
        t_l[p] = layer[k]
    w = np.empty_like(weight)
    lay = np.empty_like(layer)
    rowptr = np.zeros(n + 1, np.int64)
    width = 1 << shift
    local = np.zeros(width + 1, np.int64)
    for b in range(nb):
        a, z = bstart[b], bstart[b + 1]
        first = b << shift
        local[:] = 0
        for k in range(a, z):
            local[t_src[k] - first + 1] += 1
        for i in range(width):
            local[i + 1] += local[i]
        top = min(width, n - first)
        for i in range(top):
            rowptr[first + i + 1] = a + local[i + 1]
        for k in range(a, z):
            q = t_src[k] - first
            p = a + local[q]
            local[q] += 1
            out_src[p] = t_src[k]
            out_dst[p] = t_dst[k]
            w[p] = t_w[k]
            lay[p] = t_l[k]
    return w, lay, rowptr


@numba.njit(cache=True)
def pair_edges(a, b, n):  # pragma: no cover - compiled
    """``(lo [M], hi [M])`` of pairs ``a``, ``b`` with the self pairs dropped: ``minimum``/``maximum`` and the mask in one pass."""
    m = a.shape[0]
    lo = np.empty(m, np.int64)
    hi = np.empty(m, np.int64)
    u = 0
    for k in range(m):
        x, y = a[k], b[k]
        if x != y:
            lo[u] = min(x, y)
            hi[u] = max(x, y)
            u += 1
    return lo[:u], hi[:u]


@numba.njit(cache=True)
def undirected_from_keys(key, pick, n):  # pragma: no cover - compiled
    """``[2, 2M]`` edges of the keys ``key[pick]`` (``lo * n + hi``): each pair, then each reversed."""
    m = pick.shape[0]
    out = np.empty((2, 2 * m), np.int64)
    for k in range(m):
        x = key[pick[k]]
        lo, hi = x // n, x % n
        out[0, k] = lo
        out[1, k] = hi
        out[0, m + k] = hi
        out[1, m + k] = lo
    return out


@numba.njit(cache=True, fastmath=True)
def masked_sum(codes, code, values):  # pragma: no cover - compiled
    """Sum of ``values`` where ``codes == code``, accumulated in float64 (one pass, no temporaries)."""
    acc = 0.0
    for i in range(codes.shape[0]):
        acc += np.float64(values[i]) if codes[i] == code else 0.0
    return acc


@numba.njit(cache=True)
def masked_fill(codes, code, value, out):  # pragma: no cover - compiled
    """``out = value`` where ``codes == code``, else 0 (one branch-free pass)."""
    zero = np.float32(0)
    for i in range(codes.shape[0]):
        out[i] = value if codes[i] == code else zero
