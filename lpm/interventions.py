"""Interventions as tensors: a schedule, an eligibility mask and a multiplier on a field.

An intervention never is a callback. It is data::

    lockdown = Intervention("stay_home", schedule=mult_by_day)        # [T] or [T, K]
    Modulate("contacts", target="layer_scale", base="layer_scale_base",
             interventions=[lockdown, school_closure])

:class:`Modulate` is an ordinary substep that recomputes ``target = base * prod_i m_i(t)``
every step, so interventions compose, are batched, and are differentiable: the schedule
may be an ``nn.Parameter`` (optimize intervention strength).

The schedule, eligibility and group may also be *names* of system fields, so that the
tensors travel with the system (one ``system.to(device)``) and the substep declares them as
reads::

    Intervention("vaccination", schedule="vaccination", group="age")  # system.vaccination [T, G]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lpm.params import Params
from lpm.errors import ConfigError
from lpm.state import State, System, check_tensor, lookup
from lpm.substep import Substep

__all__ = ["Intervention", "Modulate", "group_sum", "group_mean"]


@dataclass(frozen=True)
class Intervention:
    """Multiplier ``schedule[t]`` (``[T]`` scalar per step, or ``[T, K]`` per layer/group).

    ``eligible [N] bool`` restricts a per-agent target to eligible agents (others keep 1);
    ``group [N]`` picks, for a per-agent target, column ``group[i]`` of a ``[T, K]``
    schedule. Steps beyond the schedule's end keep its last value. Each of the three may be
    a tensor or the name of a system field holding it (read each step, moved with the system).
    """

    name: str
    schedule: Tensor | str
    eligible: Tensor | str | None = None
    group: Tensor | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.schedule, Tensor):
            self.check_schedule(self.schedule)
        elif not isinstance(self.schedule, str):
            raise ConfigError(f"intervention {self.name}: schedule: expected a [T] or [T, K] tensor or a system field "
                              f"name, got {type(self.schedule).__name__}")
        if isinstance(self.eligible, Tensor):
            check_tensor(f"intervention {self.name}: eligible", self.eligible, ("N",), (torch.bool,))

    def check_schedule(self, schedule: Tensor) -> None:
        """Raise unless ``schedule`` is a non-negative ``[T]`` or ``[T, K]`` tensor (``[T, K]`` with a group)."""
        if schedule.dim() not in (1, 2):
            raise ConfigError(f"intervention {self.name}: schedule must be [T] or [T, K], got shape {tuple(schedule.shape)}")
        check_tensor(f"intervention {self.name}: schedule", schedule, None, (), low=0.0)
        if self.group is not None and schedule.dim() != 2:
            raise ConfigError(f"intervention {self.name}: group needs a [T, K] schedule")

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the system fields this intervention reads (its string-valued parts)."""
        return tuple(x for x in (self.schedule, self.eligible, self.group) if isinstance(x, str))

    def at(self, t: int, system: System | None = None, state: State | None = None) -> Tensor:
        """Multiplier at step ``t`` (``[]`` or ``[K]``); a named schedule is looked up in ``system``."""
        schedule = self._get(self.schedule, system, state)
        return schedule[min(t, schedule.shape[0] - 1)]

    def _get(self, x: Tensor | str | None, system: System | None, state: State | None) -> Tensor | None:
        if not isinstance(x, str):
            return x
        if system is None:
            raise ConfigError(f"intervention {self.name}: {x!r} names a system field; pass the system")
        return lookup(system, state, x)

    def to(self, device: torch.device | str) -> "Intervention":
        """Move tensors to ``device`` (named fields move with the system)."""
        mv = lambda x: x.to(device) if isinstance(x, Tensor) else x  # noqa: E731
        return Intervention(self.name, mv(self.schedule), mv(self.eligible), mv(self.group))


class Modulate(Substep):
    """``target = base * prod_i multiplier_i(t)``; recomputed each step (no compounding).

    ``base`` is a field of the system (usually: a constant, e.g. ``layer_scale_base``) or of
    the state; ``target`` is a state field. Interventions given by field names read them from
    the system (declared among the substep's reads); tensors held by an intervention itself
    follow the base's device each step.
    """

    def __init__(self, name: str, target: str, base: str, interventions: Sequence[Intervention]) -> None:
        self.name = name
        self.reads = tuple(dict.fromkeys((base, *(f for iv in interventions for f in iv.fields))))
        self.writes = (target,)
        self.target = target
        self.base = base
        self.interventions = tuple(interventions)

    def __call__(self, params: Params, system: System, state: State, t: int, rng: torch.Generator) -> State:
        value = lookup(system, state, self.base)
        for iv in self.interventions:
            m = iv.at(t, system, state).to(value.device, value.dtype)
            group = iv._get(iv.group, system, state)
            if group is not None:
                m = m[group.to(value.device).long()]
            eligible = iv._get(iv.eligible, system, state)
            if eligible is not None:
                m = torch.where(eligible.to(value.device), m,
                                torch.ones_like(m) if m.dim() else torch.ones((), dtype=value.dtype, device=value.device))
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
