"""Compact kernels shared by substeps: work proportional to the active set, not to N.

A step of an epidemic touches few agents: the infectious frontier, its contacts and the
agents whose timers run out. These helpers take the *indices* of such agents and do the
gathers, scatters and edge visits on them only, with int32 indices where torch's kernels
accept them (halving what autograd saves for backward). Every function is one code path
for CPU and CUDA and is differentiable through ordinary autograd ops.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["stage_mask", "frontier_edges", "push_compact", "mark_indices", "stream_key", "counter_uniform",
           "GlobalKey", "register_global_ids", "unregister_global_ids", "compiled_available", "compiled_kernels",
           "masked_sum"]


def stage_mask(stage: Tensor, codes: Sequence[int]) -> Tensor:
    """``[N] bool``: agents whose stage code is in ``codes`` (one compare per code, no int64 copy)."""
    codes = list(codes)
    if not codes:
        return torch.zeros(stage.shape, dtype=torch.bool, device=stage.device)
    mask = stage == codes[0]
    for c in codes[1:]:
        mask |= stage == c
    return mask


def frontier_edges(rowptr: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Edges of the sources ``idx`` in a CSR edge list: ``(pos [A] int64, local [A] int32)``.

    ``pos`` indexes the edge arrays; ``local`` is the position of each edge's source in ``idx``.
    """
    starts = rowptr[idx]
    counts = rowptr[idx + 1] - starts
    total = int(counts.sum()) if idx.numel() else 0
    if total == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=rowptr.device)
        return empty, empty.to(torch.int32)
    # edge k of the frontier sits at the start of its source block plus its offset inside it
    block_shift = starts - (counts.cumsum(0) - counts)
    local = torch.repeat_interleave(torch.arange(idx.numel(), device=idx.device, dtype=torch.int32), counts, output_size=total)
    pos = torch.arange(total, device=idx.device) + block_shift.index_select(0, local)
    return pos, local


def push_compact(
    edge_target: Tensor,
    weight: Tensor,
    layer: Tensor,
    rowptr: Tensor,
    num_nodes: int,
    idx: Tensor,
    vals: Tensor,
    layer_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum ``w_e * layer_scale[l_e] * vals[source]`` over the edges of sources ``idx`` into ``[N]``.

    ``vals`` is ``[K]`` or ``[K, L]`` (per-layer value) for the ``K`` sources in ``idx``.
    Returns ``(force [N], targets [A] int32)``, the targets of every visited edge.
    """
    pos, local = frontier_edges(rowptr, idx)
    dst = edge_target.index_select(0, pos)
    dtype = vals.dtype
    if pos.numel() == 0:
        return vals.new_zeros(num_nodes), dst
    need_layer = layer_scale is not None or vals.dim() == 2
    lay = layer.index_select(0, pos).long() if need_layer else None
    if vals.dim() == 2:
        v = vals.reshape(-1).index_select(0, local.long() * vals.shape[1] + lay)
    else:
        v = vals.index_select(0, local)
    v = v * weight.index_select(0, pos).to(dtype)
    if layer_scale is not None:
        v = v * layer_scale.to(dtype).index_select(0, lay)
    return vals.new_zeros(num_nodes).index_add(0, dst, v), dst


def mark_indices(index: Tensor, num_nodes: int) -> Tensor:
    """``[N] bool`` that is True at every entry of ``index`` (duplicates allowed)."""
    mask = torch.zeros(num_nodes, dtype=torch.bool, device=index.device)
    if index.numel():
        mask[index] = True  # int32 indices index directly: no int64 copy of the frontier
    return mask


# ----------------------------------------------------------------------------- counter-based uniforms
#
# A uniform for (stream, step, draw, agent) is a hash of those numbers, so a substep draws
# only for the agents where an event can happen (candidates, movers) and still gets common
# random numbers: agent i's uniform at step t does not depend on which other agents drew,
# on the order of the draws, or on the device. The hash is two rounds of a 32-bit integer
# mixer (xor-shift-multiply, "lowbias32" constants) on int64 tensors; the second multiplier
# is used in its negative (two's complement) form, so no product leaves int64 and the
# result is the same on CPU, CUDA and in the compiled kernels of :func:`compiled`.

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_MUL2_SIGNED = _MUL2 - (1 << 32)
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """One step of SplitMix64 on a Python int (keys only; never per agent)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class ReplicatedKey(tuple):
    """A stream key of a replicate batch: one ``(k1, k2)`` per replicate and the replicates' agent blocks.

    :func:`counter_uniform` gives agent ``i`` of replicate ``r`` the uniform that agent
    ``i - start[r]`` gets in a single run with replicate ``r``'s stream, so a batched run
    reproduces its single runs (:mod:`lpm.replicates`).
    """

    keys: list[tuple[int, int]]
    agents: list[int]

    def __new__(cls, keys: list[tuple[int, int]], agents: list[int]) -> "ReplicatedKey":
        obj = super().__new__(cls, keys[0])
        obj.keys, obj.agents = keys, agents
        return obj


#: token generator id -> (the replicates' generators, agents per replicate), while a replicate batch runs a substep
_REPLICATED: dict[int, tuple[list[torch.Generator], list[int]]] = {}


def register_replicated(token: torch.Generator, gens: Sequence[torch.Generator], agents: Sequence[int]) -> None:
    """Make :func:`stream_key` of ``token`` a :class:`ReplicatedKey` over ``gens`` (see :mod:`lpm.replicates`)."""
    _REPLICATED[id(token)] = (list(gens), [int(a) for a in agents])


def unregister_replicated(token: torch.Generator) -> None:
    """Undo :func:`register_replicated`."""
    _REPLICATED.pop(id(token), None)


class GlobalKey(tuple):
    """A stream key whose draws are indexed by global agent id: ``ids[i]`` is local row ``i``'s id.

    A shard of a partitioned run (:mod:`lpm.distributed`) holds some agents of a population
    under local row numbers; :func:`counter_uniform` gives local row ``i`` the uniform that
    agent ``ids[i]`` gets in the whole population's run, so results do not depend on the ranks.
    """

    ids: Tensor

    def __new__(cls, key: tuple[int, int], ids: Tensor) -> "GlobalKey":
        obj = super().__new__(cls, key)
        obj.ids = ids
        return obj


#: token generator id -> global agent id of each local row, while a shard runs a substep
_GLOBAL_IDS: dict[int, Tensor] = {}


def register_global_ids(token: torch.Generator, ids: Tensor) -> None:
    """Make :func:`stream_key` of ``token`` a :class:`GlobalKey` over ``ids`` (see :mod:`lpm.distributed`)."""
    _GLOBAL_IDS[id(token)] = ids


def unregister_global_ids(token: torch.Generator) -> None:
    """Undo :func:`register_global_ids`."""
    _GLOBAL_IDS.pop(id(token), None)


def is_replicated(rng: torch.Generator | int) -> bool:
    """Whether ``rng``'s keys are not a plain ``(k1, k2)`` over row numbers (a replicate batch or a shard)."""
    return isinstance(rng, torch.Generator) and (id(rng) in _REPLICATED or id(rng) in _GLOBAL_IDS)


def stream_key(rng: torch.Generator | int, t: int, draw: int = 0) -> tuple[int, int]:
    """Two 32-bit keys for draw number ``draw`` of step ``t`` of a stream (its generator or seed)."""
    if isinstance(rng, torch.Generator) and id(rng) in _GLOBAL_IDS:
        ids = _GLOBAL_IDS.pop(id(rng))
        try:
            return GlobalKey(stream_key(rng, t, draw), ids)
        finally:
            _GLOBAL_IDS[id(rng)] = ids
    if is_replicated(rng):
        gens, agents = _REPLICATED[id(rng)]
        return ReplicatedKey([stream_key(g, t, draw) for g in gens], agents)
    seed = rng.initial_seed() if isinstance(rng, torch.Generator) else int(rng)
    z = _splitmix64(_splitmix64(seed & _MASK64) ^ (int(t) * 0xD1B54A32D192ED03 & _MASK64) ^ (int(draw) * 0x8CB92BA72F3D8DD7 & _MASK64))
    return z & _MASK32, (z >> 32) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """The 32-bit mixer on an int64 tensor holding values in ``[0, 2^32)`` (modified in place)."""
    x ^= x >> 16
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(_MUL2_SIGNED).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def counter_uniform(key: tuple[int, int], index: Tensor) -> Tensor:
    """``float32 [K]`` uniforms in ``[0, 1)`` (24-bit) for the agents ``index`` under ``key``."""
    if isinstance(key, GlobalKey):
        # a shard's local row draws as its agent does in the whole population's run
        index = key.ids.index_select(0, index.to(torch.int64))
    if isinstance(key, ReplicatedKey):
        # each agent draws as agent (index - block start) of its replicate's single run
        dev = index.device
        ends = torch.tensor(key.agents, dtype=torch.int64, device=dev).cumsum(0)
        r = torch.searchsorted(ends, index.to(torch.int64), right=True)
        start = (ends - torch.tensor(key.agents, dtype=torch.int64, device=dev)).index_select(0, r)
        k = torch.tensor(key.keys, dtype=torch.int64, device=dev)
        x = (index.to(torch.int64) - start) ^ k[:, 0].index_select(0, r)
        x.bitwise_and_(_MASK32)
        x = _mix32(x)
        x ^= k[:, 1].index_select(0, r)
        x = _mix32(x)
        return (x >> 8).to(torch.float32).mul_(1.0 / (1 << 24))
    x = index.to(torch.int64) ^ key[0]
    x.bitwise_and_(_MASK32)
    x = _mix32(x)
    x ^= key[1]
    x = _mix32(x)
    return (x >> 8).to(torch.float32).mul_(1.0 / (1 << 24))


def _hash_uniform_py(key: tuple[int, int], i: int) -> float:
    """The same uniform for one agent in plain Python (the tests' specification)."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * _MUL1) & _MASK32
        x ^= x >> 15
        x = (x * _MUL2) & _MASK32
        return x ^ (x >> 16)

    return (mix(mix((i ^ key[0]) & _MASK32) ^ key[1]) >> 8) / float(1 << 24)


# ----------------------------------------------------------------------------- compiled kernels (numba)

_COMPILED: dict[str, object] = {}
_ENABLED = os.environ.get("LPM_COMPILED", "1") != "0"


def compiled_available() -> bool:
    """Whether compiled CPU kernels can run: numba importable and not disabled (``LPM_COMPILED=0``)."""
    if not _ENABLED:
        return False
    if "numba" not in _COMPILED:
        try:
            import numba  # noqa: F401

            _COMPILED["numba"] = True
        except Exception:  # numba is an optional extra: the torch path is always there
            _COMPILED["numba"] = False
    return bool(_COMPILED["numba"])


@contextlib.contextmanager
def compiled_kernels(enabled: bool) -> Iterator[None]:
    """Turn the compiled CPU kernels on or off inside a ``with`` block (tests, comparisons)."""
    global _ENABLED
    old = _ENABLED
    _ENABLED = bool(enabled)
    try:
        yield
    finally:
        _ENABLED = old


def masked_sum(codes: Tensor, code: int, values: Tensor) -> Tensor:
    """``torch.where(codes == code, values, 0).sum()``; one compiled pass on CPU (also under autograd).

    An observable such as incidence is a full-N pass every step: at N = 1e5 the torch version
    (a comparison, a where, a zeros tensor and a sum) costs as much as a step's transmission kernel.
    The compiled sum accumulates in float64: on carriers (each exactly 1) both give the exact count.
    Under autograd the gradient (``grad`` where ``codes == code``, else 0) is one compiled pass too.
    """
    if (codes.device.type == "cpu" and codes.dim() == 1 and values.shape == codes.shape and values.dtype == torch.float32
            and codes.is_contiguous() and values.is_contiguous()
            and codes.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64) and compiled_available()):
        if torch.is_grad_enabled() and values.requires_grad:
            return _MaskedSum.apply(codes, int(code), values)
        from lpm.compiled import masked_sum as compiled_sum

        return torch.tensor(compiled_sum(codes.numpy(), int(code), values.detach().numpy()), dtype=values.dtype)
    return torch.where(codes == code, values, torch.zeros_like(values)).sum()


class _MaskedSum(torch.autograd.Function):
    """:func:`masked_sum` under autograd: the compiled sum forward, the masked gradient in one compiled pass."""

    @staticmethod
    def forward(ctx, codes: Tensor, code: int, values: Tensor) -> Tensor:  # type: ignore[override]
        """The compiled masked sum (``codes`` kept by reference: an in-place change later is an autograd error)."""
        from lpm.compiled import masked_sum as compiled_sum

        ctx.save_for_backward(codes)
        ctx.code = code
        return torch.tensor(compiled_sum(codes.numpy(), code, values.detach().numpy()), dtype=values.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        """``grad`` where ``codes == code``, else 0."""
        from lpm.compiled import masked_fill

        (codes,) = ctx.saved_tensors
        out = torch.empty(codes.shape, dtype=torch.float32)
        masked_fill(codes.numpy(), ctx.code, np.float32(grad.detach().to(torch.float32).item()), out.numpy())
        return None, None, out.to(grad.dtype)
