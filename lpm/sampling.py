"""Differentiable discrete sampling: exact samples forward, named estimators backward.

Every sampler takes the uniforms (or Gumbel noise) explicitly, drawn by the caller from the
substep's own stream, so that two runs with the same stream see the same events
(common random numbers) whatever the parameters.

Estimators and their bias
-------------------------
* **Straight-through Bernoulli** (:func:`bernoulli_st`): forward ``x = 1[u < p]`` (exact),
  backward ``dx/dp = 1``. It is the derivative of the mean-field update ``E[x] = p``
  applied along the sampled path: unbiased for functions linear in ``x`` (e.g. a sum of
  events in one step); biased when the outcome is a nonlinear function of many events,
  because it ignores how an event's *absence* would have changed later probabilities
  (no discrete "jump" term). In epidemic rollouts the bias is of order a few percent to
  a few tens of percent near thresholds; tests measure it against finite differences.
* **Straight-through categorical** (:func:`categorical_st`): forward one-hot of an exact
  inverse-CDF draw, backward identity onto the probabilities; same bias profile.
* **Gumbel-softmax** (:func:`gumbel_softmax`): relaxed one-hot ``softmax((logits+g)/tau)``;
  with ``hard=True`` the forward is the exact one-hot argmax (a true categorical sample),
  backward the relaxed gradient. Bias grows with ``tau`` (smoothing) and variance as
  ``tau -> 0``; ``tau`` in [0.1, 1] is the usual compromise.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bernoulli_st", "categorical_st", "gumbel_softmax", "gumbel_noise", "categorical_sample",
           "NoGradientError", "guard_no_gradient"]


def bernoulli_st(p: Tensor, u: Tensor) -> Tensor:
    """Exact Bernoulli(p) sample as float, with a straight-through gradient onto ``p``."""
    hard = (u < p).to(p.dtype)
    if not p.requires_grad:
        return hard
    # value is exactly `hard`; the gradient is that of `p`
    return hard + (p - p.detach())


def categorical_sample(probs: Tensor, u: Tensor) -> Tensor:
    """Exact categorical draw by inverse CDF: ``probs [..., K]``, ``u [...]`` -> codes [...]."""
    cdf = probs.detach().cumsum(-1)
    # guard the last bin against rounding so every u < 1 lands somewhere
    cdf[..., -1] = torch.finfo(cdf.dtype).max
    return torch.searchsorted(cdf, u.unsqueeze(-1).to(cdf.dtype)).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def categorical_st(probs: Tensor, u: Tensor) -> Tensor:
    """Exact one-hot categorical sample ``[..., K]`` with a straight-through gradient."""
    idx = categorical_sample(probs, u)
    hard = torch.nn.functional.one_hot(idx, probs.shape[-1]).to(probs.dtype)
    if not probs.requires_grad:
        return hard
    return hard + (probs - probs.detach())


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard Gumbel noise from an explicit generator."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    neg_log_u = (-torch.log(u.clamp_min(tiny))).clamp_min(tiny)
    return -torch.log(neg_log_u)


def gumbel_softmax(logits: Tensor, gumbel: Tensor, tau: float = 0.5, hard: bool = True) -> Tensor:
    """Gumbel-softmax over the last axis; ``hard=True`` gives exact one-hot samples forward."""
    if tau <= 0:
        raise ValueError(f"gumbel_softmax: tau must be > 0, got {tau}")
    soft = torch.softmax((logits + gumbel) / tau, dim=-1)
    if not hard:
        return soft
    idx = (logits.detach() + gumbel).argmax(-1)
    one_hot = torch.nn.functional.one_hot(idx, logits.shape[-1]).to(soft.dtype)
    if not soft.requires_grad:
        return one_hot
    return one_hot + (soft - soft.detach())


class NoGradientError(RuntimeError):
    """A loss was differentiated through an observable that carries no gradient."""


class _NoGradient(torch.autograd.Function):
    """Identity forward; backward raises, naming the observable (never a silent zero)."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, name: str) -> Tensor:  # type: ignore[override]
        ctx.name = name
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        raise NoGradientError(
            f"observable {ctx.name!r} carries no gradient with respect to the parameters: its value does not "
            "depend on them through any differentiable path of this model (its substeps use no gradient "
            "estimator for it). Differentiate a differentiable observable instead, or detach this one.")


def guard_no_gradient(name: str, value: Tensor, anchor: Tensor | None) -> Tensor:
    """``value`` unchanged if it carries a gradient; otherwise a copy whose backward raises :class:`NoGradientError`.

    ``anchor`` is any tensor that requires grad (a parameter); with none, nothing can be differentiated
    and ``value`` is returned as is.
    """
    if value.requires_grad or anchor is None or not value.is_floating_point():
        return value
    return _NoGradient.apply(value, anchor, name)
