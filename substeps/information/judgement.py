"""Archetype judgement of a story: a ``[K, S]`` convincingness table and ``[K]`` sharing propensity.

Both are plain tensors computed once per run by a pluggable function
``judge(profile, stances) -> Judgement``. :func:`rule_judgement` is the fast, deterministic
default; an experiment can pass any other function (e.g. one that asks a language model
once per archetype and stance through ``llm_archetypes``) with the same signature.

Rule (stated assumptions, not fitted): a story of stance ``s`` in [-1, 1] convinces an
archetype of mean ideology ``m`` with probability
``sigmoid(c0 - c1 |m - s| + c2 * (1 - degree))`` (congenial stories convince more;
education lowers credulity) and the archetype shares what it believes with relative
propensity ``1 + a1 * (age - 45) / 20`` clamped to [0.2, 3] (older people shared more
false news in 2016; Guess, Nagler & Tucker 2019), normalized to mean 1 over archetypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm.state import check_tensor

__all__ = ["ArchetypeProfile", "Judgement", "JudgeFn", "rule_judgement"]


@dataclass(frozen=True)
class ArchetypeProfile:
    """What a judge may know about each of ``K`` archetypes."""

    names: tuple[str, ...]  # [K] labels
    ideology: Tensor  # [K] mean left-right in [-1, 1]
    age: Tensor  # [K] mean age (years)
    degree: Tensor  # [K] share with a college degree in [0, 1]

    def __post_init__(self) -> None:
        k = len(self.names)
        check_tensor("profile.ideology", self.ideology, (k,), low=-1.0, high=1.0)
        check_tensor("profile.age", self.age, (k,), low=0.0)
        check_tensor("profile.degree", self.degree, (k,), low=0.0, high=1.0)


@dataclass(frozen=True)
class Judgement:
    """``convincing [K, S]`` probabilities and ``share_propensity [K]`` relative rates."""

    convincing: Tensor
    share_propensity: Tensor
    stances: Tensor  # [S]
    source: str = "rule"

    def __post_init__(self) -> None:
        dims = check_tensor("judgement.convincing", self.convincing, ("K", "S"), low=0.0, high=1.0)
        check_tensor("judgement.share_propensity", self.share_propensity, ("K",), dims=dims, low=0.0)
        check_tensor("judgement.stances", self.stances, ("S",), dims=dims)


JudgeFn = Callable[[ArchetypeProfile, Tensor], Judgement]


def rule_judgement(profile: ArchetypeProfile, stances: Tensor, *, c0: float = 1.0, c1: float = 2.5,
                   c2: float = 0.5, a1: float = 0.5) -> Judgement:
    """Deterministic rule-based judgement (see module docstring for the rule)."""
    check_tensor("stances", stances, ("S",), low=-1.0, high=1.0)
    if len(profile.names) == 0:
        raise ConfigError("profile: expected at least one archetype")
    dist = (profile.ideology[:, None] - stances[None, :].to(profile.ideology.dtype)).abs()
    conv = torch.sigmoid(c0 - c1 * dist + c2 * (1 - profile.degree)[:, None])
    prop = (1 + a1 * (profile.age - 45) / 20).clamp(0.2, 3.0)
    return Judgement(conv.float(), (prop / prop.mean()).float(), stances.float(), "rule")
