"""Bounded-confidence opinion dynamics: averaging (Hegselmann-Krause) and pairwise (Deffuant).

Update rules (edge ``j -> i`` with weight ``w_ji`` times the feed's exposure ``f_ji``;
distance ``d_ji = ||x_j - x_i||``; confidence gate ``g = 1[d < eps]``; repulsion gate
``r = 1[d > rho]``)::

    averaging: x_i <- x_i + mu * sum_j w f (g - lam r) (x_j - x_i) / Z_i
    pairwise : for sampled edges j -> i:  x_i <- x_i + mu g (x_j - x_i)   (and x_j too if symmetric)
    anchoring: x_i <- (1 - s_i) x_i + s_i a_i                              (Friedkin-Johnsen)

``Z_i`` is ``sum_j w f`` (``normalize="degree"``, the default) or ``sum_j w f g``
(``normalize="confidence"``, classic Hegselmann-Krause). **Conservation law** of the
default: on a symmetric graph (``w_ij = w_ji``, all edges exposed, no repulsion, no
stubbornness) the gated terms cancel in pairs, so ``sum_i k_i x_i`` with ``k_i = sum_j w_ji``
(weighted degree) is exactly invariant: averaging that reaches consensus reaches the
**degree-weighted mean** of the initial opinions.

Gradient estimator (named: *straight-through sigmoid gate*): the forward pass uses the exact
hard gates; the backward pass differentiates ``sigmoid((eps - d) / tau)`` (and
``sigmoid((d - rho) / tau)``) instead, i.e. a kernel-smoothed delta at the threshold of
width ``tau``. It gives gradients with respect to the confidence bound ``eps`` (and through
``d`` to the opinions), which a hard gate has almost nowhere. Its bias is that of replacing
the sum over pairs crossing the threshold by a kernel density estimate of width ``tau``:
small when ``tau`` is small against the scale over which the density of pair distances
near ``eps`` changes, noisy when ``tau`` is much smaller than the typical gap between pair
distances. Tests compare it with finite differences under common random numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm import Params, Substep
from substeps.opinion.state import OpinionState, OpinionSystem

__all__ = ["BoundedConfidence", "PairwiseBoundedConfidence", "st_gate", "Anchoring"]


def st_gate(margin: Tensor, tau: float) -> Tensor:
    """``1[margin > 0]`` forward; gradient of ``sigmoid(margin / tau)`` backward."""
    hard = (margin > 0).to(margin.dtype)
    if not margin.requires_grad:
        return hard
    soft = torch.sigmoid(margin / tau)
    return hard + (soft - soft.detach())


def _distance(diff: Tensor) -> Tensor:
    # 1-d: |diff| (no sqrt at 0, whose gradient is undefined); D > 1: Euclidean norm
    if diff.shape[1] == 1:
        return diff[:, 0].abs()
    return diff.square().sum(1).clamp_min(1e-12).sqrt()


class BoundedConfidence(Substep):
    """Averaging bounded confidence over the exposed followees (see module docstring)."""

    def __init__(self, name: str = "opinion", *, normalize: str = "degree", repulsion: bool = False,
                 tau: float = 0.02, use_exposure: bool = True, clamp: bool = True) -> None:
        if normalize not in ("degree", "confidence"):
            raise ConfigError(f"normalize: expected 'degree' or 'confidence', got {normalize!r}")
        if tau <= 0:
            raise ConfigError(f"tau: expected > 0 (gate temperature), got {tau}")
        self.name = name
        self.normalize = normalize
        self.repulsion = repulsion
        self.tau = float(tau)
        self.use_exposure = use_exposure
        self.clamp = clamp
        self.reads = ("opinion", "network") + (("exposure",) if use_exposure else ())
        self.writes = ("opinion",)
        self.params = ("confidence", "convergence") + (("repulsion_threshold", "repulsion_strength") if repulsion else ())

    def __call__(self, params: Params, system: OpinionSystem, state: OpinionState, t: int, rng: torch.Generator) -> OpinionState:
        net = state.network
        x = state.opinion
        src, dst = net.edge_index[0].long(), net.edge_index[1].long()
        w = net.weight.to(x.dtype)
        if self.use_exposure and state.exposure is not None:
            w = w * state.exposure.to(x.dtype)
        diff = x[src] - x[dst]
        d = _distance(diff)
        g = st_gate(params.confidence - d, self.tau)
        coef = g
        if self.repulsion:
            coef = g - params.repulsion_strength * st_gate(d - params.repulsion_threshold, self.tau)
        n = x.shape[0]
        num = x.new_zeros(x.shape).index_add(0, dst, (w * coef).unsqueeze(1) * diff)
        z = x.new_zeros(n).index_add(0, dst, w * g if self.normalize == "confidence" else w)
        step = num / z.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(1)
        x = x + params.convergence * step
        if self.clamp:
            x = x.clamp(-1.0, 1.0)
        return state.replace(opinion=x)


class PairwiseBoundedConfidence(Substep):
    """Deffuant-Weisbuch: ``rate * N`` random exposed edges per step; gated pairwise moves."""

    def __init__(self, name: str = "pairwise", *, rate: float = 0.5, symmetric: bool = True, tau: float = 0.02,
                 use_exposure: bool = True) -> None:
        if rate <= 0:
            raise ConfigError(f"rate: expected > 0 (sampled edges per agent per step), got {rate}")
        self.name = name
        self.rate = float(rate)
        self.symmetric = symmetric
        self.tau = float(tau)
        self.use_exposure = use_exposure
        self.reads = ("opinion", "network") + (("exposure",) if use_exposure else ())
        self.writes = ("opinion",)
        self.params = ("confidence", "convergence")

    def __call__(self, params: Params, system: OpinionSystem, state: OpinionState, t: int, rng: torch.Generator) -> OpinionState:
        net = state.network
        x = state.opinion
        n, e = x.shape[0], net.num_edges
        m = max(1, int(round(self.rate * n)))
        pick = torch.randint(0, e, (m,), generator=rng, device=x.device)
        src, dst = net.edge_index[0, pick].long(), net.edge_index[1, pick].long()
        ok = torch.ones(m, dtype=x.dtype, device=x.device)
        if self.use_exposure and state.exposure is not None:
            # an unexposed sampled edge is a wasted encounter (the feed did not show it)
            ok = state.exposure[pick].to(x.dtype)
        diff = x[src] - x[dst]
        g = st_gate(params.confidence - _distance(diff), self.tau) * ok
        move = params.convergence * g.unsqueeze(1) * diff
        x_new = x.index_add(0, dst, move)
        if self.symmetric:
            x_new = x_new.index_add(0, src, -move)
        return state.replace(opinion=x_new.clamp(-1.0, 1.0))


class Anchoring(Substep):
    """Friedkin-Johnsen anchoring: ``x <- (1 - s) x + s * anchor`` with per-agent stubbornness."""

    name = "anchoring"
    reads = ("opinion", "anchor", "stubbornness")
    writes = ("opinion",)

    def __init__(self, name: str = "anchoring") -> None:
        self.name = name

    def __call__(self, params: Params, system: OpinionSystem, state: OpinionState, t: int, rng: torch.Generator) -> OpinionState:
        s = system.stubbornness.to(state.opinion.dtype).unsqueeze(1)
        return state.replace(opinion=(1 - s) * state.opinion + s * system.anchor)
