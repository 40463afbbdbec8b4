"""Polarization metrics on opinions ``[N]`` / ``[N, D]`` and the observables that record them.

One-dimensional metrics use the first opinion dimension (left-right).

* ``variance``: total variance (sum over dimensions); differentiable.
* ``bimodality``: Sarle's coefficient ``(g^2 + 1) / (kappa_excess + 3 (n-1)^2 / ((n-2)(n-3)))``
  (> 5/9, the uniform's value, suggests bimodality); differentiable.
* ``esteban_ray``: ``sum_ij p_i^(1+alpha) p_j |y_i - y_j|`` over a histogram of ``bins``
  equal bins on [-1, 1] (Esteban & Ray 1994, alpha = 1.6 by default). The histogram is
  *soft* (linear interpolation between neighbouring bin centres), so the index is
  continuous and differentiable almost everywhere.
* ``neighbour_correlation``: Pearson correlation of opinions across follow edges (source,
  follower): the echo-chamber index.
* ``cluster_count``: number of opinion clusters: groups of sorted opinions separated by
  gaps wider than ``gap`` that hold at least ``min_share`` of the agents.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lpm import Network, Observable
from substeps.opinion.state import OpinionState, OpinionSystem, as_matrix

__all__ = ["variance", "bimodality", "esteban_ray", "neighbour_correlation", "cluster_count",
           "soft_histogram", "polarization_observables"]


def variance(x: Tensor) -> Tensor:
    """Total variance of opinions (sum over dimensions)."""
    x = as_matrix(x)
    return (x - x.mean(0)).square().mean(0).sum()


def bimodality(x: Tensor) -> Tensor:
    """Sarle's bimodality coefficient of the first opinion dimension (sample-size corrected)."""
    y = as_matrix(x)[:, 0]
    n = y.numel()
    c = y - y.mean()
    m2 = c.square().mean().clamp_min(1e-12)
    g = c.pow(3).mean() / m2.pow(1.5)
    k_excess = c.pow(4).mean() / m2.square() - 3
    return (g.square() + 1) / (k_excess + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def soft_histogram(y: Tensor, bins: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Shares ``[bins]`` by linear interpolation between bin centres (sums to 1, differentiable)."""
    width = (high - low) / bins
    pos = ((y.clamp(low, high) - low) / width - 0.5).clamp(0, bins - 1)
    lo = pos.detach().floor().clamp_max(bins - 2 if bins > 1 else 0)
    frac = pos - lo
    h = y.new_zeros(bins)
    h = h.index_add(0, lo.long(), 1 - frac)
    h = h.index_add(0, (lo.long() + 1).clamp_max(bins - 1), frac)
    return h / y.numel()


def esteban_ray(x: Tensor, bins: int = 20, alpha: float = 1.6) -> Tensor:
    """Esteban-Ray polarization index on a soft histogram of the first dimension on [-1, 1]."""
    p = soft_histogram(as_matrix(x)[:, 0], bins)
    centres = torch.linspace(-1 + 1 / bins, 1 - 1 / bins, bins, dtype=p.dtype, device=p.device)
    dist = (centres[:, None] - centres[None, :]).abs()
    return (p.clamp_min(0).pow(1 + alpha)[:, None] * p[None, :] * dist).sum()


def neighbour_correlation(x: Tensor, network: Network, exposure: Tensor | None = None) -> Tensor:
    """Pearson correlation of first-dimension opinions across edges (weighted by exposure)."""
    y = as_matrix(x)[:, 0]
    a, b = y[network.edge_index[0].long()], y[network.edge_index[1].long()]
    w = network.weight.to(y.dtype) if exposure is None else network.weight.to(y.dtype) * exposure.to(y.dtype)
    sw = w.sum().clamp_min(1e-12)
    ma, mb = (w * a).sum() / sw, (w * b).sum() / sw
    cov = (w * (a - ma) * (b - mb)).sum() / sw
    va, vb = (w * (a - ma).square()).sum() / sw, (w * (b - mb).square()).sum() / sw
    return cov / (va * vb).clamp_min(1e-24).sqrt()


def cluster_count(x: Tensor, gap: float = 0.05, min_share: float = 0.01) -> Tensor:
    """Number of opinion clusters (first dimension) holding at least ``min_share`` of agents."""
    y = torch.sort(as_matrix(x)[:, 0].detach()).values
    label = torch.cat([y.new_zeros(1, dtype=torch.long), (y.diff() > gap).long().cumsum(0)])
    sizes = torch.bincount(label)
    return (sizes >= min_share * y.numel()).sum()


def polarization_observables(*, bins: int = 20, gap: float = 0.05, min_share: float = 0.01,
                             echo: bool = True) -> dict[str, Observable]:
    """Observables: variance, bimodality, Esteban-Ray, clusters, mean |opinion| (and echo chambers)."""

    def on(fn: Callable[[Tensor], Tensor]) -> Callable[[OpinionSystem, OpinionState], Tensor]:
        return lambda y, s: fn(s.opinion)

    obs = {
        "variance": Observable(on(variance), reads=("opinion",), doc="total opinion variance"),
        "bimodality": Observable(on(bimodality), reads=("opinion",), doc="Sarle's bimodality coefficient"),
        "esteban_ray": Observable(on(lambda x: esteban_ray(x, bins)), reads=("opinion",), doc="Esteban-Ray index"),
        "clusters": Observable(on(lambda x: cluster_count(x, gap, min_share).to(x.dtype)), reads=("opinion",),
                               doc="number of opinion clusters"),
        "extremity": Observable(on(lambda x: as_matrix(x)[:, 0].abs().mean()), reads=("opinion",),
                                doc="mean |left-right opinion|"),
    }
    if echo:
        obs["neighbour_corr"] = Observable(lambda y, s: neighbour_correlation(s.opinion, s.network),
                                           reads=("opinion", "network"), doc="opinion correlation across follow edges")
    return obs
