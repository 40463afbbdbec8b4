"""Initial opinions from the ANES 1996 survey (``data/opinion/anes96_train.csv``).

Archetypes are party identification (7 codes, 0 strong Democrat .. 6 strong Republican)
x education (``no degree``: educ 1-5, ``degree``: educ 6-7, BA or more): 14 archetypes.
A synthetic population is drawn in two stages, both from the survey's own frequencies
(the 756 respondents are an unweighted sample): an agent's archetype with the archetype's
share among respondents, then its left-right self-placement (``selfLR``, 1 extremely
liberal .. 7 extremely conservative) from the empirical distribution of ``selfLR``
*within that archetype*. The 7-point answer ``c`` maps to ``(c - 4) / 3`` in [-1, 1];
optional uniform jitter of half a category (``+-1/6``) spreads ties within the answer's
bin so continuous models do not start from exact ties (clamped to [-1, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from lpm.errors import ConfigError, DataError
from lpm.sampling import categorical_sample

__all__ = ["AnesPopulation", "load_anes96", "anes_population", "default_anes_path", "PID_LABELS"]

PID_LABELS = ("strong Dem", "weak Dem", "ind-Dem", "independent", "ind-Rep", "weak Rep", "strong Rep")
EDU_LABELS = ("no degree", "degree")
_COLUMNS = ("selfLR", "PID", "educ", "age", "TVnews")


def default_anes_path() -> Path:
    """``opinion/anes96_train.csv`` of the shipped data (:func:`lpm.data.data_path`)."""
    from lpm.data import data_path

    return data_path("opinion", "anes96_train.csv")


def load_anes96(path: str | Path | None = None) -> pd.DataFrame:
    """Read the ANES 1996 table and check the columns and codes this module uses."""
    p = Path(path) if path is not None else default_anes_path()
    if not p.exists():
        raise FileNotFoundError(f"ANES 1996 file not found: {p} (expected data/opinion/anes96_train.csv)")
    df = pd.read_csv(p)
    missing = [c for c in _COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{p}: missing column(s) {missing}; expected {list(_COLUMNS)}")
    for col, lo, hi in (("selfLR", 1, 7), ("PID", 0, 6), ("educ", 1, 7)):
        v = df[col]
        if v.isna().any() or (v < lo).any() or (v > hi).any() or (v != v.round()).any():
            raise DataError(f"{p}: column {col} must hold integer codes {lo}..{hi}")
    return df


@dataclass(frozen=True)
class AnesPopulation:
    """A synthetic population drawn from ANES 1996: per-agent codes and per-archetype tables."""

    opinion: Tensor  # [N] float32 left-right in [-1, 1]
    archetype: Tensor  # [N] int16 code = 2 * PID + degree
    pid: Tensor  # [N] int8 party identification 0..6
    names: tuple[str, ...]  # [K] archetype labels
    share: Tensor  # [K] share of respondents per archetype
    lr_table: Tensor  # [K, 7] empirical selfLR distribution per archetype
    mean_age: Tensor  # [K] mean respondent age per archetype (years)
    mean_tv: Tensor  # [K] mean days/week of TV news per archetype
    ideology: Tensor  # [K] mean left-right of the archetype in [-1, 1]


def anes_population(num_agents: int, seed: int = 0, path: str | Path | None = None, jitter: bool = True,
                    device: torch.device | str = "cpu") -> AnesPopulation:
    """Draw ``num_agents`` agents: archetype by survey share, opinion from its selfLR distribution."""
    if num_agents < 1:
        raise ConfigError(f"num_agents: expected >= 1, got {num_agents}")
    df = load_anes96(path)
    pid = torch.tensor(df["PID"].to_numpy(), dtype=torch.long)
    degree = torch.tensor((df["educ"] >= 6).to_numpy(), dtype=torch.long)
    arche = 2 * pid + degree
    lr = torch.tensor(df["selfLR"].to_numpy(), dtype=torch.long) - 1
    K = 14
    counts = torch.bincount(arche, minlength=K).double()
    table = torch.zeros(K, 7, dtype=torch.float64).index_put_((arche, lr), torch.ones(len(df), dtype=torch.float64), accumulate=True)
    lr_table = table / table.sum(1, keepdim=True).clamp_min(1)
    share = counts / counts.sum()
    mean_age = torch.zeros(K, dtype=torch.float64).index_add(0, arche, torch.tensor(df["age"].to_numpy(), dtype=torch.float64)) / counts.clamp_min(1)
    mean_tv = torch.zeros(K, dtype=torch.float64).index_add(0, arche, torch.tensor(df["TVnews"].to_numpy(), dtype=torch.float64)) / counts.clamp_min(1)
    values = (torch.arange(7, dtype=torch.float64) - 3) / 3
    ideology = (lr_table * values).sum(1)
    g = torch.Generator(device=device).manual_seed(int(seed))
    a = categorical_sample(share.to(device), torch.rand(num_agents, generator=g, device=device, dtype=torch.float64))
    c = categorical_sample(lr_table.to(device)[a], torch.rand(num_agents, generator=g, device=device, dtype=torch.float64))
    x = (c.double() - 3) / 3
    if jitter:
        x = (x + (torch.rand(num_agents, generator=g, device=device, dtype=torch.float64) - 0.5) / 3).clamp(-1, 1)
    names = tuple(f"{PID_LABELS[k // 2]}, {EDU_LABELS[k % 2]}" for k in range(K))
    return AnesPopulation(x.float(), a.to(torch.int16), (a // 2).to(torch.int8), names, share.float(),
                          lr_table.float(), mean_age.float(), mean_tv.float(), ideology.float())
