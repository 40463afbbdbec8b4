"""Compact kernels shared by substeps: work proportional to the active set, not to N.

A step of an epidemic touches few agents: the infectious frontier, its contacts and the
agents whose timers run out. These helpers take the *indices* of such agents and do the
gathers, scatters and edge visits on them only, with int32 indices where torch's kernels
accept them (halving what autograd saves for backward). Every function is one code path
for CPU and CUDA and is differentiable through ordinary autograd ops.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["stage_mask", "frontier_edges", "push_compact", "mark_indices"]


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
