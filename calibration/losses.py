"""Losses between expected counts and observed counts, masked and weighted per series.

* Poisson negative log-likelihood: ``mu - y log mu + lgamma(y + 1)``.
* Negative binomial (mean ``mu``, dispersion ``k``; variance ``mu + mu^2 / k``).
* MSE on ``log(1 + x)``: scale-free, robust to the huge range of epidemic counts.

Each series' loss is the mean over its valid (unmasked) cells, so series weights are
relative importances independent of how many points a series has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm.params import ParamsLike

__all__ = ["poisson_nll", "negbin_nll", "mse_log1p", "Loss"]

_EPS = 1e-6


def poisson_nll(mu: Tensor, y: Tensor) -> Tensor:
    """Elementwise Poisson negative log-likelihood of counts ``y`` given means ``mu``."""
    mu = mu.clamp_min(_EPS)
    return mu - y * torch.log(mu) + torch.lgamma(y + 1)


def negbin_nll(mu: Tensor, y: Tensor, k: Tensor | float) -> Tensor:
    """Elementwise negative-binomial NLL, mean ``mu``, dispersion ``k`` (variance ``mu + mu^2/k``)."""
    mu = mu.clamp_min(_EPS)
    k = torch.as_tensor(k, dtype=mu.dtype, device=mu.device)
    return -(torch.lgamma(y + k) - torch.lgamma(k) - torch.lgamma(y + 1)
             + k * (torch.log(k) - torch.log(k + mu)) + y * (torch.log(mu) - torch.log(k + mu)))


def mse_log1p(mu: Tensor, y: Tensor) -> Tensor:
    """Elementwise squared error on ``log(1 + x)``."""
    return (torch.log1p(mu.clamp_min(0)) - torch.log1p(y)) ** 2


@dataclass
class Loss:
    """A masked, per-series weighted loss: ``kind`` in {"poisson", "negbin", "mse_log1p"}.

    ``dispersion``: negative-binomial ``k`` (a number or the name of a fitted parameter).
    """

    kind: str = "negbin"
    weights: Mapping[str, float] = field(default_factory=dict)
    dispersion: float | str = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "negbin", "mse_log1p"):
            raise ConfigError(f"loss kind: expected poisson, negbin or mse_log1p, got {self.kind!r}")

    def elementwise(self, mu: Tensor, y: Tensor, params: ParamsLike | None = None) -> Tensor:
        """Elementwise loss of ``mu`` vs ``y`` (same shape)."""
        if self.kind == "poisson":
            return poisson_nll(mu, y)
        if self.kind == "negbin":
            k = getattr(params, self.dispersion) if isinstance(self.dispersion, str) else self.dispersion
            return negbin_nll(mu, y, k)
        return mse_log1p(mu, y)

    def per_series(self, pred: Mapping[str, Tensor], obs: Any, params: ParamsLike | None = None) -> dict[str, Tensor]:
        """Mean loss over valid cells, per series (``obs`` is an :class:`~calibration.observation.Observed`)."""
        out = {}
        for s in obs.series:
            if s not in pred:
                raise ConfigError(f"loss: no prediction for series {s!r}; have {sorted(pred)}")
            m = obs.mask[s]
            y = obs.values[s]
            if pred[s].shape[-2:] != y.shape:
                raise ConfigError(f"loss: series {s!r} prediction shape {tuple(pred[s].shape)} vs data {tuple(y.shape)}")
            e = self.elementwise(pred[s], y, params)
            out[s] = torch.where(m, e, torch.zeros_like(e)).sum((-2, -1)) / m.sum().clamp_min(1)
        return out

    def __call__(self, pred: Mapping[str, Tensor], obs: Any, params: ParamsLike | None = None) -> Tensor:
        """Weighted sum over series of the per-series mean losses."""
        parts = self.per_series(pred, obs, params)
        return sum(float(self.weights.get(s, 1.0)) * v for s, v in parts.items())
