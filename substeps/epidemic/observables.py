"""Observables of epidemic states: counts per stage, incidence, prevalence.

Every observable sums the agents' gradient carriers (value exactly 1) rather than counting
booleans, so its value is the exact count and its gradient is the estimator's (see
:mod:`substeps.epidemic.dynamics`): stage counts and prevalence are differentiable like
incidence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpm.kernels import masked_sum, stage_mask
from lpm.model import Observable
from lpm.state import lookup
from substeps.epidemic.disease import DiseaseModel, EpiState, EpiSystem

__all__ = ["stage_counts", "incidence", "prevalence"]


def stage_counts(disease: DiseaseModel) -> dict[str, Observable]:
    """One observable per stage: the number of agents in it after each step."""

    def make(code: int) -> Observable:
        return Observable(lambda y, s: torch.where(s.stage == code, s.carrier, torch.zeros_like(s.carrier)).sum(),
                          reads=("stage", "carrier"), doc=f"agents in {disease.stages[code]}")

    return {name: make(c) for c, name in enumerate(disease.stages)}


def incidence(disease: DiseaseModel, stage: str | None = None, group: str | None = None,
              labels: tuple[str, ...] | None = None) -> Observable:
    """Agents entering ``stage`` (default: the entry stage) this step; carries gradients.

    With ``group`` (a field of integer codes, of the system or the state) the result is ``[G]`` per group.
    """
    code = disease.code(stage or disease.entry)
    if group is None:
        return Observable(lambda y, s: masked_sum(s.entered, code, s.carrier),
                          reads=("entered", "carrier"), doc=f"new entries into {stage or disease.entry}")
    G = len(labels) if labels else None

    def fn(y: EpiSystem, s: EpiState) -> Tensor:
        v = torch.where(s.entered == code, s.carrier, torch.zeros_like(s.carrier))
        g = lookup(y, s, group).long()
        return v.new_zeros(G or int(g.max()) + 1).index_add(0, g, v)

    return Observable(fn, labels=labels, reads=("entered", "carrier", group))


def prevalence(disease: DiseaseModel, stages: tuple[str, ...]) -> Observable:
    """Agents in any of ``stages`` after each step (carries gradients)."""
    codes = [disease.code(s) for s in stages]

    def fn(y: EpiSystem, s: EpiState) -> Tensor:
        inside = stage_mask(s.stage, codes)
        return torch.where(inside, s.carrier, torch.zeros_like(s.carrier)).sum()

    return Observable(fn, reads=("stage", "carrier"))
