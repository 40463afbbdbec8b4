"""One population, two models: the economy (weekly) on the agents of an epidemic (daily).

:class:`EconEpiState` is the union of :class:`~substeps.economy.state.EconState` and
:class:`~substeps.epidemic.EpiState`, so the epidemic's substeps (transmission,
progression) and the economy's run on the same rows. :class:`Weekly` runs an economy
substep on the last day of each week with the week index, so weekly schedules (closures,
UI, UBI) stay indexed by week while the epidemic steps daily. :class:`IllnessAbsence`
reads the epidemic ``stage`` and marks ill workers absent; closures come from policy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from lpm import Model, Params, State, Substep, System
from substeps.economy.state import EconState, EconSystem
from substeps.epidemic import DiseaseModel, EpiState, EpiSystem, Progression, Transmission

__all__ = ["EconEpiState", "EconEpiSystem", "Weekly", "couple", "coupled_model"]


@dataclass(frozen=True, kw_only=True)
class EconEpiState(EconState, EpiState):
    """Economy and epidemic fields of the same N agents (see both parents for the fields)."""


@dataclass(frozen=True, kw_only=True)
class EconEpiSystem(EconSystem, EpiSystem):
    """Economy and epidemic constants of the same N agents (see both parents for the fields)."""


class Weekly(Substep):
    """Run ``inner`` on day ``7 w + 6`` as week ``w``; leave the state unchanged on other days."""

    def __init__(self, inner: Substep, days: int = 7) -> None:
        self.inner = inner
        self.days = int(days)
        self.name = inner.name
        self.reads, self.writes, self.params = inner.reads, inner.writes, inner.params

    def __call__(self, params: Params, system: System, state: State, t: int, rng: torch.Generator) -> State:
        if t % self.days != self.days - 1:
            return state
        return self.inner(params, system, state, t // self.days, rng)


def couple(econ: EconSystem | EconState, epi: EpiSystem | EpiState) -> EconEpiSystem | EconEpiState:
    """Join the economy's and the epidemic's systems (or states) of the same agents (same N, same order)."""
    joint = EconEpiSystem if isinstance(econ, EconSystem) else EconEpiState
    values = {f.name: getattr(epi, f.name) for f in fields(epi)}
    values.update({f.name: getattr(econ, f.name) for f in fields(econ)})
    out = joint(**values)
    out.validate()  # one agent axis: a population mismatch is an error naming the field
    return out


def coupled_model(disease: DiseaseModel, economy: Sequence[Substep], observables: dict, *, network: bool = False,
                  name: str = "economy+epidemic") -> Model:
    """Daily plan: epidemic progression and transmission, then the economy substeps once a week."""
    steps = [Progression(disease), Transmission(disease, network=network), *[Weekly(s) for s in economy]]
    return Model(steps, observables, state_type=EconEpiState, system_type=EconEpiSystem, dt=1.0, time_unit="day", name=name)
