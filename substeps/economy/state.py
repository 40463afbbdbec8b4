"""The economy's system (attributes, schedules, baselines) and state: workers, money, firms, a government.

Time unit: one step is one week. Money is in US dollars; flows (wages, taxes, transfers,
consumption) are dollars per week, stocks (savings, firm cash, government balance) dollars.
Replicates: ``R`` independent copies of the population live side by side (a disjoint union
with a replicate id), so aggregates are ``[R]`` or ``[R, J]`` and one pass runs every seed.

Agent attributes are small integer codes (``area``, ``age_band``, ``industry``,
``income_band``) with code books in :data:`CODEBOOKS`-like static fields; employment is a
float 0/1 tensor so that it can carry gradients (see :mod:`substeps.economy.substeps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lpm import State, System, static_field, tensor_field

__all__ = ["EconState", "EconSystem", "INDUSTRIES", "INDUSTRY_LABELS", "AGE_BANDS", "INCOME_BANDS", "INCOME_EDGES"]

#: DP03_0033..DP03_0045 industry groups (short names; labels in :data:`INDUSTRY_LABELS`).
INDUSTRIES = ("agriculture_mining", "construction", "manufacturing", "wholesale", "retail", "transport_utilities",
              "information", "finance_real_estate", "professional_admin", "education_health",
              "arts_food_accommodation", "other_services", "public_admin")
INDUSTRY_LABELS = ("agriculture or mining", "construction", "manufacturing", "wholesale trade", "retail trade",
                   "transportation, warehousing or utilities", "information and media", "finance, insurance or real estate",
                   "professional, management or administrative services", "education, health care or social assistance",
                   "arts, entertainment, hotels or restaurants", "other services", "public administration")
#: Age bands of the population 16+ (codes 0..2).
AGE_BANDS = ("16-24", "25-54", "55+")
#: Annual income bracket edges (ACS DP03_0052..0061), dollars; 10 bands.
INCOME_EDGES = (10_000.0, 15_000.0, 25_000.0, 35_000.0, 50_000.0, 75_000.0, 100_000.0, 150_000.0, 200_000.0)
INCOME_BANDS = ("under $10k", "$10k-15k", "$15k-25k", "$25k-35k", "$35k-50k", "$50k-75k", "$75k-100k",
                "$100k-150k", "$150k-200k", "$200k or more")

_F = (torch.float32, torch.float64)
_I = (torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True, kw_only=True)
class EconSystem(System):
    """What never changes during an economy run: ``R`` replicate populations' attributes, policy schedules, baselines.

    Shapes: ``N`` agents (all replicates), ``R`` replicates, ``A`` areas, ``J`` industries,
    ``T`` weeks of schedules, ``B`` tax brackets.
    """

    # -- attributes ----------------------------------------------------------------------
    area: Tensor = tensor_field(("N",), torch.int8, "home area code (codebooks['area'])")
    age_band: Tensor = tensor_field(("N",), torch.int8, "age band code (AGE_BANDS)")
    industry: Tensor = tensor_field(("N",), torch.int8, "industry of the current or last job (INDUSTRIES); NILF agents keep a drawn one")
    income_band: Tensor = tensor_field(("N",), torch.int8, "band of the annualised potential wage (INCOME_BANDS)")
    in_lf: Tensor = tensor_field(("N",), torch.bool, "in the civilian labour force")
    wage: Tensor = tensor_field(("N",), _F, "gross weekly earnings when employed, $/week")
    disutility: Tensor = tensor_field(("N",), _F, "log-consumption cost of working (labour-supply heterogeneity)")
    pension: Tensor = tensor_field(("N",), _F, "Social Security and retirement income paid by the government, $/week")
    rep: Tensor = tensor_field(("N",), torch.int64, "replicate id 0..R-1")
    rep_area: Tensor = tensor_field(("N",), torch.int64, "rep * A + area (group id of area aggregates)")
    rep_ind: Tensor = tensor_field(("N",), torch.int64, "rep * J + industry (group id of firm aggregates)")
    # -- policy and data schedules -------------------------------------------------------
    closure: Tensor = tensor_field(("T", "J"), _F, "share of each industry closed by policy in week t")
    ui_supplement: Tensor = tensor_field(("T",), _F, "federal UI top-up in week t (FPUC/LWA), $/week")
    ui_max_weeks: Tensor = tensor_field(("T",), _F, "maximum UI duration in week t (regular + extensions), weeks")
    ubi: Tensor = tensor_field(("T",), _F, "universal transfer to every adult in week t, $/week")
    month: Tensor = tensor_field(("T",), torch.int64, "calendar month 0..11 of week t (seasonality)")
    tax_thresholds: Tensor = tensor_field(("B",), _F, "lower edges of the tax brackets, $/year (first is 0)")
    spend_share: Tensor = tensor_field(("J",), _F, "consumption basket: share of spending on each industry")
    # -- pre-shock firm baselines (per replicate) ----------------------------------------
    base_spend: Tensor = tensor_field(("R", "J"), _F, "pre-shock weekly sales of each industry, $/week")
    base_labour: Tensor = tensor_field(("R", "J"), _F, "pre-shock workers present in each industry")
    # -- sizes and code books -----------------------------------------------------------
    num_replicates: int = static_field("R", default=1)
    areas: tuple[str, ...] = static_field("area names by code", default=())
    codebooks: dict | None = static_field("name -> CodeBook of each categorical attribute", default=None)

    @property
    def R(self) -> int:
        """Number of replicates."""
        return int(self.num_replicates)

    @property
    def A(self) -> int:
        """Number of areas."""
        return len(self.areas)

    @property
    def J(self) -> int:
        """Number of industries."""
        return int(self.spend_share.shape[0])


@dataclass(frozen=True, kw_only=True)
class EconState(State):
    """Labour market, household money, firms and government of the replicate populations (see :class:`EconSystem`).

    Shapes: ``N`` agents (all replicates), ``R`` replicates, ``J`` industries, ``K`` archetypes.
    """

    # -- agent state -------------------------------------------------------------------
    employed: Tensor = tensor_field(("N",), _F, "1 employed, 0 not (value exact 0/1; carries gradients)")
    temp_layoff: Tensor = tensor_field(("N",), _F, "1 if separated while the industry was closed (recall-eligible)")
    unemp_weeks: Tensor = tensor_field(("N",), torch.int16, "weeks in the current unemployment spell")
    absent: Tensor = tensor_field(("N",), _F, "1 if employed but off work ill this week")
    accept: Tensor = tensor_field(("N",), _F, "P(take or keep a job at the after-tax wage) from labour supply")
    mpc: Tensor = tensor_field(("N",), _F, "share of this week's disposable income spent (archetype answer)")
    savings: Tensor = tensor_field(("N",), _F, "household money, $")
    income: Tensor = tensor_field(("N",), _F, "disposable income this week, $/week")
    earnings: Tensor = tensor_field(("N",), _F, "gross earnings this week, $/week")
    tax: Tensor = tensor_field(("N",), _F, "income tax paid this week, $/week")
    benefits: Tensor = tensor_field(("N",), _F, "UI + UBI + pension received this week, $/week")
    consumption: Tensor = tensor_field(("N",), _F, "nominal consumption this week, $/week")
    mpc_score: Tensor | None = tensor_field(("K",), _F, "raw archetype answers of the spending decision", optional=True)
    closed: Tensor = tensor_field(("J",), _F, "closure of this week")
    # -- firms and government (per replicate) --------------------------------------------
    firm_cash: Tensor = tensor_field(("R", "J"), _F, "money held by the firms of each industry, $")
    demand: Tensor = tensor_field(("R", "J"), _F, "sales relative to base_spend this week")
    price: Tensor = tensor_field(("R", "J"), _F, "price index of each industry (1 = pre-shock)")
    gov_balance: Tensor = tensor_field(("R",), _F, "government money: cumulative revenue minus spending, $")
    gov_revenue: Tensor = tensor_field(("R",), _F, "tax revenue this week, $/week")
    gov_spending: Tensor = tensor_field(("R",), _F, "UI + UBI + pensions paid this week, $/week")

    def money(self, system: EconSystem) -> Tensor:
        """Total money per replicate ``[R]``: households + firms + government (conserved)."""
        hh = self.savings.new_zeros(system.R).index_add(0, system.rep, self.savings)
        return hh + self.firm_cash.sum(1) + self.gov_balance
