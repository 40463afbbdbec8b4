"""Gradient validation: autograd vs central finite differences of the expected loss.

What the gradient estimates. Discrete events (infection, progression, branching) are
sampled exactly in the forward pass. Each realized event multiplies the agent's carrier
by a factor of value 1 whose gradient is ``d log p`` (``substeps/epidemic/substeps.py``);
observables sum the carriers of agents entering a stage, so their value is the count and
their gradient is ``sum_i d log P(path_i)`` over the agents counted. For an observable
that is a *linear* function of events this is the score-function (likelihood-ratio)
identity applied per agent: unbiased for ``d E[count]``, up to the effect of an agent's
event on *other* agents' event probabilities, which enters through the carriers in the
force of infection (the infector's carrier) and is therefore also included to first
order. For a *nonlinear* loss ``L(counts)`` autograd returns ``L'(counts) * d counts``:
the chain rule applied to a sample, not ``d E[L]``. The bias is of order
``Var(counts) * L'''``: it vanishes as the population grows (counts concentrate, the
relative noise falls like ``1/sqrt(N)``) and is small whenever the loss is smooth on the
scale of the simulation noise. The test suite checks agreement at a stated tolerance.

Finite differences use the same seeds at ``theta + h`` and ``theta - h`` (common random
numbers), which removes most noise; what remains is the discreteness of events (a step
function of ``theta`` for each seed), so ``h`` must be large enough to move many events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["GradCheck", "gradient_check"]


@dataclass
class GradCheck:
    """One parameter's autograd and finite-difference directional derivatives (unconstrained space)."""

    name: str
    autograd: float
    finite_diff: float
    fd_stderr: float

    @property
    def rel_error(self) -> float:
        """``|autograd - fd| / max(|fd|, tiny)``."""
        return abs(self.autograd - self.finite_diff) / max(abs(self.finite_diff), 1e-12)


def gradient_check(objective: Callable[[Any, int], Tensor], params: nn.Module, seeds: Sequence[int], *,
                   h: float = 0.05, names: Sequence[str] | None = None, direction_seed: int = 0) -> list[GradCheck]:
    """Compare ``d/dtheta mean_s objective(params, s)`` by autograd and central differences (CRN).

    Works on the unconstrained storage of each trainable tensor ``raw_<name>`` (or each
    named ``nn.Parameter``): for a tensor with several entries, along one random unit
    direction. ``fd_stderr``: standard error of the FD estimate across seeds.
    """
    named = dict(params.named_parameters())
    if names is None:
        names = [n for n, p in named.items() if p.requires_grad]
    out = []
    g = torch.Generator().manual_seed(direction_seed)
    for name in names:
        key = name if name in named else "raw_" + name
        if key not in named:
            raise KeyError(f"gradient_check: no trainable tensor {name!r}; have {sorted(named)}")
        p = named[key]
        d = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        d = d / d.norm() if p.numel() > 1 else torch.ones_like(p)
        ag, fds = [], []
        for s in seeds:
            params.zero_grad(set_to_none=True)
            L = objective(params, int(s))
            (gp,) = torch.autograd.grad(L, p)
            ag.append(float((gp * d).sum()))
            with torch.no_grad():
                base = p.detach().clone()
                p.copy_(base + h * d)
                lp = float(objective(params, int(s)))
                p.copy_(base - h * d)
                lm = float(objective(params, int(s)))
                p.copy_(base)
            fds.append((lp - lm) / (2 * h))
        fd = torch.tensor(fds)
        se = float(fd.std() / len(fds) ** 0.5) if len(fds) > 1 else float("nan")
        out.append(GradCheck(name, float(torch.tensor(ag).mean()), float(fd.mean()), se))
    return out
