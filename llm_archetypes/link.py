"""Calibration link: a learnable map from a raw answer score in [0, 1] to a behavioural parameter.

The language model's answer is a *score*, not a calibrated probability. A :class:`Link`
maps it to the parameter the simulation uses, with learnable slope and bias (one per
question, or one per archetype), fitted by the same optimizer as the rest of the model::

    link = Link(kind="logit_affine", low=0.0, high=0.95)      # per question
    params.add_module("isolation_link", link)                 # params.parameters() now fits it
    p = link(scores)                                          # [K] -> [K], differentiable

``logit_affine``: ``low + (high - low) * sigmoid(slope * logit(score) + bias)``; with
slope 1, bias 0 and range [0, 1] it is the identity on (0, 1).
``affine``: ``low + (high - low) * clamp(slope * score + bias, 0, 1)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lpm.errors import ConfigError
from lpm import StateError

__all__ = ["Link"]


class Link(nn.Module):
    """Learnable ``score [K] -> parameter [K]`` (``num`` = 1 per question, or K per archetype)."""

    def __init__(self, kind: str = "logit_affine", *, num: int = 1, low: float = 0.0, high: float = 1.0,
                 slope: float = 1.0, bias: float = 0.0, eps: float = 1e-4) -> None:
        super().__init__()
        if kind not in ("logit_affine", "affine"):
            raise ConfigError(f"Link kind: expected 'logit_affine' or 'affine', got {kind!r}")
        if not low < high:
            raise ConfigError(f"Link: expected low < high, got ({low}, {high})")
        if num < 1:
            raise ConfigError(f"Link num: expected >= 1 (1 per question or K per archetype), got {num}")
        self.kind = kind
        self.low = float(low)
        self.high = float(high)
        self.eps = float(eps)
        self.slope = nn.Parameter(torch.full((num,), float(slope)))
        self.bias = nn.Parameter(torch.full((num,), float(bias)))

    def forward(self, score: Tensor) -> Tensor:
        """Map raw scores ``[K]`` (in [0, 1]) to parameters ``[K]`` in ``[low, high]``."""
        num = self.slope.shape[0]
        if num != 1 and (score.dim() == 0 or score.shape[0] != num):
            raise StateError(f"Link: per-archetype link has {num} entries but scores have shape {tuple(score.shape)}")
        s = score.to(self.slope.dtype)
        if self.kind == "logit_affine":
            s = s.clamp(self.eps, 1.0 - self.eps)
            z = torch.sigmoid(self.slope * torch.logit(s) + self.bias)
        else:
            z = (self.slope * s + self.bias).clamp(0.0, 1.0)
        return self.low + (self.high - self.low) * z

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num={self.slope.shape[0]}, range=[{self.low:g}, {self.high:g}]"
