"""Interventions as tensors: a schedule, an eligibility mask and a multiplier on a field.

An intervention never is a callback. It is data::

    lockdown = Intervention("stay_home", schedule=mult_by_day)        # [T] or [T, K]
    Modulate("contacts", target="layer_scale", base="layer_scale_base",
             interventions=[lockdown, school_closure])

:class:`Modulate` is an ordinary substep that recomputes ``target = base * prod_i m_i(t)``
every step, so interventions compose, are batched, and are differentiable: the schedule
may be an ``nn.Parameter`` (optimize intervention strength).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lpm.params import Params
from lpm.state import State, StateError, System, check_tensor, lookup
from lpm.substep import Substep

__all__ = ["Intervention", "Modulate", "group_sum", "group_mean"]


@dataclass(frozen=True)
class Intervention:
    """Multiplier ``schedule[t]`` (``[T]`` scalar per step, or ``[T, K]`` per layer/group).

    ``eligible [N] bool`` restricts a per-agent target to eligible agents (others keep 1);
    ``group [N]`` picks, for a per-agent target, column ``group[i]`` of a ``[T, K]``
    schedule. Steps beyond the schedule's end keep its last value.
    """

    name: str
    schedule: Tensor
    eligible: Tensor | None = None
    group: Tensor | None = None

    def __post_init__(self) -> None:
        if self.schedule.dim() not in (1, 2):
            raise StateError(f"intervention {self.name}: schedule must be [T] or [T, K], got shape {tuple(self.schedule.shape)}")
        check_tensor(f"intervention {self.name}: schedule", self.schedule, None, (), low=0.0)
        if self.eligible is not None:
            check_tensor(f"intervention {self.name}: eligible", self.eligible, ("N",), (torch.bool,))
        if self.group is not None and self.schedule.dim() != 2:
            raise StateError(f"intervention {self.name}: group needs a [T, K] schedule")

    def at(self, t: int) -> Tensor:
        """Multiplier at step ``t`` (``[]`` or ``[K]``)."""
        return self.schedule[min(t, self.schedule.shape[0] - 1)]

    def to(self, device: torch.device | str) -> "Intervention":
        """Move tensors to ``device``."""
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Intervention(self.name, self.schedule.to(device), mv(self.eligible), mv(self.group))


class Modulate(Substep):
    """``target = base * prod_i multiplier_i(t)``; recomputed each step (no compounding).

    ``base`` is a field of the system (usually: a constant, e.g. ``layer_scale_base``) or of
    the state; ``target`` is a state field.
    """

    def __init__(self, name: str, target: str, base: str, interventions: Sequence[Intervention]) -> None:
        self.name = name
        self.reads = (base,)
        self.writes = (target,)
        self.target = target
        self.base = base
        self.interventions = tuple(interventions)

    def __call__(self, params: Params, system: System, state: State, t: int, rng: torch.Generator) -> State:
        value = lookup(system, state, self.base)
        for iv in self.interventions:
            m = iv.at(t).to(value.device, value.dtype)
            if iv.group is not None:
                m = m[iv.group.long()]
            if iv.eligible is not None:
                m = torch.where(iv.eligible, m, torch.ones_like(m) if m.dim() else torch.ones((), dtype=value.dtype, device=value.device))
            value = value * m
        return state.replace(**{self.target: value})


def group_sum(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Differentiable sum of ``values [N, ...]`` per group id ``[N]``: ``[G, ...]``."""
    out = values.new_zeros((num_groups, *values.shape[1:]))
    return out.index_add(0, group.long(), values)


def group_mean(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Mean of ``values [N]`` per group (0 for empty groups)."""
    s = group_sum(values, group, num_groups)
    n = torch.bincount(group.long(), minlength=num_groups).to(values.dtype).clamp_min(1)
    return s / n.view(-1, *([1] * (values.dim() - 1)))
