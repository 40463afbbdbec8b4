"""Workers from ACS DP03 (Selected Economic Characteristics) tables, for any set of counties.

:func:`load_dp03` reads a data.census.gov DP03 export (one row per ``GEO_ID``) into
per-area marginals; :func:`synthesize` draws agents aged 16+ from them:

- area: proportional to the population 16+ (``DP03_0001E``);
- age band (16-24, 25-54, 55+): from ``age_share [A, 3]`` given by the caller (DP03 has no
  age), and labour-force participation by age band from a national-pattern prior
  (0.55, 0.82, 0.38) scaled per area to the civilian labour force share (``DP03_0003E``);
- employed within the labour force: from the area's unemployment rate (``DP03_0005E /
  DP03_0003E``) unless ``initial_unemployment`` is given;
- industry: from the civilian employed by industry (``DP03_0033E..0045E``), drawn for every
  agent (the unemployed keep their last industry; those outside the labour force carry one
  that is never used);
- potential wage: an annual amount drawn from the area's household income brackets
  (``DP03_0052E..0061E``; uniform within a bracket, Pareto(2) above $200k capped at $2M),
  scaled by an age profile (0.55, 1.0, 0.9). Household income stands in for the
  worker's earnings potential: DP03's earnings by industry are not bundled. Documented
  approximation, not an estimate;
- savings: 8 weeks of potential wage times a lognormal(0, 1) factor;
- pensions: adults 55+ outside the labour force receive Social Security (mean
  ``DP03_0067E``) and, with probability households-with-retirement / households-with-SS,
  retirement income (mean ``DP03_0069E``); one recipient per household with Social Security
  is assumed, drawn among the 55+ outside the labour force (capped at all of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lpm.errors import ConfigError, DataError
from lpm import CodeBook
from substeps.economy.state import AGE_BANDS, INCOME_BANDS, INCOME_EDGES, INDUSTRIES, EconState, EconSystem

__all__ = ["Dp03", "load_dp03", "synthesize", "LF_PRIOR", "AGE_WAGE"]

LF_PRIOR = (0.55, 0.82, 0.38)
AGE_WAGE = (0.55, 1.0, 0.9)
INDUSTRY_COLUMNS = tuple(f"DP03_{k:04d}E" for k in range(33, 46))
INCOME_COLUMNS = tuple(f"DP03_{k:04d}E" for k in range(52, 62))
PENSION_COLUMNS = ("DP03_0066E", "DP03_0067E", "DP03_0068E", "DP03_0069E")
_BRACKET_LO = (0.0, *INCOME_EDGES)
_BRACKET_HI = (*INCOME_EDGES, 200_000.0)


@dataclass(frozen=True)
class Dp03:
    """Per-area DP03 marginals (counts of people or households)."""

    areas: tuple[str, ...]
    pop16: Tensor          # [A] population 16+
    civ_lf: Tensor         # [A] civilian labour force
    unemployed: Tensor     # [A] unemployed
    industry: Tensor       # [A, J] civilian employed by industry
    income: Tensor         # [A, 10] households by income bracket
    pensions: Tensor       # [A, 4] households with Social Security, its mean ($/yr), with retirement income, its mean

    @property
    def unemployment_rate(self) -> Tensor:
        """Unemployed / civilian labour force ``[A]``."""
        return self.unemployed / self.civ_lf


def load_dp03(path: str | Path, geo_ids: Mapping[str, str]) -> Dp03:
    """Read a DP03 export; ``geo_ids`` maps area names to ``GEO_ID`` (e.g. ``{"BX": "0500000US36005"}``)."""
    path = Path(path)
    df = pd.read_csv(path)
    cols = ["DP03_0001E", "DP03_0003E", "DP03_0005E", *INDUSTRY_COLUMNS, *INCOME_COLUMNS, *PENSION_COLUMNS]
    missing = [c for c in ["GEO_ID", *cols] if c not in df.columns]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {missing}")
    rows = []
    for name, geo in geo_ids.items():
        r = df[df["GEO_ID"] == geo]
        if len(r) != 1:
            raise DataError(f"{path.name}: column 'GEO_ID' has {len(r)} rows for {name}={geo!r}, expected 1")
        vals = pd.to_numeric(r[cols].iloc[0], errors="coerce")
        if vals.isna().any() or (vals < 0).any():
            bad = list(vals.index[vals.isna() | (vals < 0)])
            raise DataError(f"{path.name}: {name}: columns {bad} must be non-negative numbers")
        rows.append(vals.to_numpy(dtype=np.float64))
    m = torch.tensor(np.stack(rows))
    nj = len(INDUSTRY_COLUMNS)
    ni = len(INCOME_COLUMNS)
    return Dp03(tuple(geo_ids), m[:, 0], m[:, 1], m[:, 2], m[:, 3:3 + nj], m[:, 3 + nj:3 + nj + ni], m[:, 3 + nj + ni:])


def _draw_wage(income_counts: Tensor, area: Tensor, g: torch.Generator) -> Tensor:
    """Annual amounts from each agent's area bracket distribution ``[N]`` (float64)."""
    share = income_counts / income_counts.sum(1, keepdim=True)
    u = torch.rand(area.shape[0], generator=g, dtype=torch.float64)
    cdf = share.cumsum(1)[area]
    cdf[:, -1] = 2.0
    b = torch.searchsorted(cdf, u.unsqueeze(1)).squeeze(1).clamp_max(share.shape[1] - 1)
    lo = torch.tensor(_BRACKET_LO, dtype=torch.float64)[b]
    hi = torch.tensor(_BRACKET_HI, dtype=torch.float64)[b]
    v = torch.rand(area.shape[0], generator=g, dtype=torch.float64)
    top = b == share.shape[1] - 1
    pareto = (200_000.0 / (1 - v).sqrt()).clamp_max(2_000_000.0)
    return torch.where(top, pareto, lo + (hi - lo) * v).clamp_min(2_000.0)


def synthesize(dp03: Dp03, agents: int, *, age_share: Tensor, replicates: int = 1, seed: int = 0,
               initial_unemployment: Tensor | None = None, savings_weeks: float = 8.0,
               dtype: torch.dtype = torch.float32) -> tuple[EconSystem, EconState]:
    """``replicates`` independent populations of about ``agents`` adults each, as one :class:`EconSystem` and :class:`EconState`.

    Schedules (closure, UI, UBI, months) are set to one open, policy-free week; use
    ``system.replace`` (see :mod:`substeps.economy.shock`) to give them dates. Tax rates live
    in the parameters; ``tax_thresholds`` is a single 0 bracket until replaced.
    """
    A, J = len(dp03.areas), dp03.industry.shape[1]
    if agents < A:
        raise ConfigError(f"agents: expected at least one per area ({A}), got {agents}")
    if replicates < 1:
        raise ConfigError(f"replicates: expected >= 1, got {replicates}")
    age_share = torch.as_tensor(age_share, dtype=torch.float64)
    if age_share.shape != (A, len(AGE_BANDS)) or bool((age_share < 0).any()):
        raise ConfigError(f"age_share: expected non-negative [A={A}, {len(AGE_BANDS)}], got {tuple(age_share.shape)}")
    g = torch.Generator().manual_seed(seed)
    per_area = torch.round(dp03.pop16 / dp03.pop16.sum() * agents).long().clamp_min(1)
    area1 = torch.repeat_interleave(torch.arange(A), per_area)
    n1 = area1.shape[0]
    R = replicates
    area = area1.repeat(R)
    rep = torch.arange(R).repeat_interleave(n1)
    N = area.shape[0]
    # age band, then labour-force participation scaled to the area's civilian LF share
    ash = age_share / age_share.sum(1, keepdim=True)
    age = torch.multinomial(ash[area], 1, generator=g).squeeze(1)
    prior = torch.tensor(LF_PRIOR, dtype=torch.float64)
    k = (dp03.civ_lf / dp03.pop16) / (ash * prior).sum(1)
    p_lf = (k.unsqueeze(1) * prior).clamp(0, 0.98)[area, age]
    in_lf = torch.rand(N, generator=g, dtype=torch.float64) < p_lf
    urate = dp03.unemployment_rate if initial_unemployment is None else torch.as_tensor(initial_unemployment, dtype=torch.float64)
    if urate.shape != (A,) or bool((urate < 0).any()) or bool((urate >= 1).any()):
        raise ConfigError(f"initial_unemployment: expected [A={A}] rates in [0, 1), got {urate.tolist()}")
    employed = in_lf & (torch.rand(N, generator=g, dtype=torch.float64) >= urate[area])
    ish = dp03.industry / dp03.industry.sum(1, keepdim=True)
    industry = torch.multinomial(ish[area], 1, generator=g).squeeze(1)
    annual = _draw_wage(dp03.income, area, g) * torch.tensor(AGE_WAGE, dtype=torch.float64)[age]
    band = torch.bucketize(annual, torch.tensor(INCOME_EDGES, dtype=torch.float64), right=True)
    wage = annual / 52.0
    savings = savings_weeks * wage * torch.exp(torch.randn(N, generator=g, dtype=torch.float64))
    old_out = ~in_lf & (age == len(AGE_BANDS) - 1)
    n_old = torch.zeros(A, dtype=torch.float64).index_add(0, area, old_out.double()) / R
    scale = per_area.double() / dp03.pop16        # agents per person
    p_ss = (dp03.pensions[:, 0] * scale / n_old.clamp_min(1)).clamp(0, 1)
    p_ret = (dp03.pensions[:, 2] / dp03.pensions[:, 0].clamp_min(1)).clamp(0, 1)
    ss = old_out & (torch.rand(N, generator=g, dtype=torch.float64) < p_ss[area])
    ret = ss & (torch.rand(N, generator=g, dtype=torch.float64) < p_ret[area])
    pension = (ss.double() * dp03.pensions[area, 1] + ret.double() * dp03.pensions[area, 3]) / 52.0
    zeros = torch.zeros(N, dtype=dtype)
    f64 = torch.zeros(N, dtype=torch.float64)
    books = {"area": CodeBook("area", dp03.areas), "age_band": CodeBook("age_band", AGE_BANDS),
             "industry": CodeBook("industry", INDUSTRIES[:J] if J == len(INDUSTRIES) else tuple(f"industry {j}" for j in range(J))),
             "income_band": CodeBook("income_band", INCOME_BANDS)}
    ind_share = (dp03.industry.sum(0) / dp03.industry.sum()).to(dtype)
    system = EconSystem(
        area=area.to(torch.int8), age_band=age.to(torch.int8), industry=industry.to(torch.int8),
        income_band=band.to(torch.int8), in_lf=in_lf, wage=wage.to(dtype), disutility=zeros.clone(),
        rep=rep, rep_area=rep * A + area, rep_ind=rep * J + industry, pension=pension.to(dtype),
        closure=torch.zeros(1, J, dtype=dtype),
        ui_supplement=torch.zeros(1, dtype=dtype), ui_max_weeks=torch.full((1,), 26.0, dtype=dtype),
        ubi=torch.zeros(1, dtype=dtype), month=torch.zeros(1, dtype=torch.int64),
        tax_thresholds=torch.zeros(1, dtype=torch.float64), spend_share=ind_share,
        base_spend=torch.ones(R, J, dtype=torch.float64), base_labour=torch.ones(R, J, dtype=torch.float64),
        num_replicates=R, areas=tuple(dp03.areas), codebooks=books,
    )
    state = EconState(
        employed=employed.to(dtype), temp_layoff=zeros.clone(),
        unemp_weeks=(in_lf & ~employed).to(torch.int16) * 8, absent=zeros.clone(), accept=torch.ones(N, dtype=dtype),
        mpc=torch.full((N,), 0.8, dtype=dtype), savings=savings, income=f64.clone(), earnings=f64.clone(),
        tax=f64.clone(), benefits=f64.clone(), consumption=f64.clone(), closed=torch.zeros(J, dtype=dtype),
        firm_cash=torch.zeros(R, J, dtype=torch.float64), demand=torch.ones(R, J, dtype=dtype),
        price=torch.ones(R, J, dtype=dtype), gov_balance=torch.zeros(R, dtype=torch.float64),
        gov_revenue=torch.zeros(R, dtype=torch.float64), gov_spending=torch.zeros(R, dtype=torch.float64),
    )
    return system, state
