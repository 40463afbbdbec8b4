"""Economy substeps: jobs, wages, taxes, transfers, spending and firms, one step per week.

See :mod:`substeps.economy.substeps` for the equations. :func:`economy_model` assembles the
plan with its observables; :func:`default_params` gives uncalibrated starting values;
:func:`prepare` sets the labour-supply heterogeneity and the pre-shock firm baselines of a
synthesized state.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lpm import Fixed, Interval, Model, Observable, Params, Positive, Substep, System
from substeps.economy.population import Dp03, load_dp03, synthesize
from substeps.economy.state import (AGE_BANDS, INCOME_BANDS, INCOME_EDGES, INDUSTRIES, INDUSTRY_LABELS, EconState,
                                    EconSystem)
from substeps.economy.substeps import (Fiscal, IllnessAbsence, LabourFlows, LabourSupply, PolicyClosure, Spending,
                                       conditional_mean_st, ui_benefit)
from substeps.economy.tax import (CURRENT_LAW, format_schedule, gini, parse_schedule, piecewise_tax, poverty_rate,
                                  weekly_tax)

__all__ = [
    "EconState", "EconSystem", "INDUSTRIES", "INDUSTRY_LABELS", "AGE_BANDS", "INCOME_BANDS", "INCOME_EDGES",
    "Dp03", "load_dp03", "synthesize",
    "PolicyClosure", "IllnessAbsence", "LabourSupply", "LabourFlows", "Fiscal", "Spending", "conditional_mean_st",
    "ui_benefit", "piecewise_tax", "weekly_tax", "parse_schedule", "format_schedule", "gini", "poverty_rate",
    "CURRENT_LAW", "default_params", "economy_observables", "economy_model", "prepare", "unemployment_by",
    "POVERTY_LINE",
]

#: US federal poverty guideline for one person, 2020 ($/year), applied per adult.
POVERTY_LINE = 12_760.0


def default_params(num_areas: int, tax_rates: Sequence[float] | Tensor = (0.0,), *, fit_tax: bool = False) -> Params:
    """Starting values (per week): fitted labour-market rates and fixed policy and behaviour constants."""
    A = num_areas
    rates = torch.as_tensor(tax_rates, dtype=torch.float32)
    return Params(
        sep_rate=Interval(torch.full((A,), 0.004), 1e-5, 0.2),
        find_rate=Interval(torch.full((A,), 0.08), 1e-4, 1.0),
        shock_sep=Interval(torch.full((A,), 30.0), 0.0, 500.0),
        shock_find=Interval(0.5, 0.0, 1.0),
        recall=Interval(0.05, 0.0, 1.0),
        season=Interval(torch.ones(12), 0.25, 4.0),
        quit_rate=Fixed(0.002),
        demand_sep=Fixed(0.5),
        ls_scale=Fixed(0.3),
        home_floor=Fixed(150.0),
        ui_rr=Fixed(0.5),
        ui_cap=Fixed(504.0),
        sick_pay=Fixed(1.0),
        wealth_mpc=Fixed(0.005),
        price_kappa=Fixed(0.1),
        tax_rates=Interval(rates, -0.99, 0.99) if fit_tax else Fixed(rates),
    )


def unemployment_by(system: EconSystem, state: EconState, group: Tensor, num_groups: int) -> Tensor:
    """Unemployed / labour force per group ``[num_groups]`` (differentiable in ``employed``)."""
    lf = system.in_lf.to(state.employed.dtype)
    un = lf * (1 - state.employed)
    g = group.long()
    return un.new_zeros(num_groups).index_add(0, g, un) / lf.new_zeros(num_groups).index_add(0, g, lf).clamp_min(1)


def economy_observables(system: EconSystem) -> dict[str, Observable]:
    """Named observables, each ``[R]`` (or ``[R, A]`` by area), recorded every week."""
    R, A = system.R, system.A
    rep_labels = [f"r{r}" for r in range(R)]
    area_labels = [f"r{r}/{a}" for r in range(R) for a in system.areas]

    def per_rep(x: Tensor, y: EconSystem) -> Tensor:
        n = torch.bincount(y.rep, minlength=R).to(x.dtype)
        return x.new_zeros(R).index_add(0, y.rep, x) / n

    return {
        "unemployment": Observable(lambda y, s: unemployment_by(y, s, y.rep, R), rep_labels, ("employed", "in_lf", "rep"),
                                   "unemployed / labour force"),
        "unemployment_area": Observable(lambda y, s: unemployment_by(y, s, y.rep_area, R * A).view(R, A), area_labels,
                                        ("employed", "in_lf", "rep_area"), "unemployed / labour force by area"),
        "consumption": Observable(lambda y, s: per_rep(s.consumption, y), rep_labels, ("consumption", "rep"),
                                  "mean consumption per adult, $/week"),
        "income": Observable(lambda y, s: per_rep(s.income, y), rep_labels, ("income", "rep"),
                             "mean disposable income per adult, $/week"),
        "gini": Observable(lambda y, s: gini(s.income, y.rep, R), rep_labels, ("income", "rep"),
                           "Gini of weekly disposable income across adults"),
        "poverty": Observable(lambda y, s: poverty_rate(s.income * 52.0, POVERTY_LINE, y.rep, R), rep_labels,
                              ("income", "rep"), "share of adults with annualised disposable income under the poverty line"),
        "gov_balance": Observable(lambda y, s: s.gov_balance / torch.bincount(y.rep, minlength=R).to(s.gov_balance.dtype),
                                  rep_labels, ("gov_balance", "rep"), "cumulative government balance per adult, $"),
        "gov_revenue": Observable(lambda y, s: s.gov_revenue, rep_labels, ("gov_revenue",), "tax revenue, $/week"),
        "gov_spending": Observable(lambda y, s: s.gov_spending, rep_labels, ("gov_spending",), "UI + UBI + pensions paid, $/week"),
        "cpi": Observable(lambda y, s: (s.price * y.spend_share).sum(1), rep_labels, ("price", "spend_share"),
                          "consumer price index (basket-weighted industry prices)"),
        "savings": Observable(lambda y, s: per_rep(s.savings, y), rep_labels, ("savings", "rep"), "mean savings, $"),
    }


def economy_model(system: EconSystem, *, decision: Substep | None = None, labour_supply: bool = True,
                  illness: Substep | None = None, extra: Sequence[Substep] = (), name: str = "economy",
                  observables: Sequence[str] | None = None) -> Model:
    """The weekly plan: closure, [illness absence], [spending decision], [labour supply], flows, fiscal, spending.

    ``observables`` keeps only the named ones (e.g. ``["unemployment_area"]`` while fitting).
    """
    steps: list[Substep] = [PolicyClosure()]
    if illness is not None:
        steps.append(illness)
    if decision is not None:
        steps.append(decision)
    if labour_supply:
        steps.append(LabourSupply())
    steps += [*extra, LabourFlows(), Fiscal(), Spending()]
    obs = economy_observables(system)
    if observables is not None:
        unknown = sorted(set(observables) - set(obs))
        if unknown:
            raise ValueError(f"observables: unknown {unknown}; known: {sorted(obs)}")
        obs = {k: obs[k] for k in observables}
    return Model(steps, obs, state_type=EconState, system_type=type(system), dt=7.0, time_unit="day", name=name)


@torch.no_grad()
def prepare(system: EconSystem, state: EconState, params: Params, *, baseline_accept: tuple[float, float] = (0.85, 0.99),
            seed: int = 0) -> tuple[EconSystem, EconState]:
    """Labour-supply heterogeneity and pre-shock firm baselines for a synthesized system and state.

    ``disutility`` is set so that at week 0's policy each agent's P(accept) is a draw from
    ``Uniform(baseline_accept)``; ``base_spend`` and ``base_labour`` are one fiscal + spending
    step of the initial state with every industry open, so demand = 1 before the shock.
    """
    g = torch.Generator().manual_seed(seed + 7919)
    ubi = system.ubi[0]
    c_work = (system.wage - weekly_tax(system.wage, system.tax_thresholds, params.tax_rates) + ubi).clamp_min(1.0)
    c_out = ui_benefit(params, system, 0) + ubi + params.home_floor
    lo, hi = baseline_accept
    a = lo + (hi - lo) * torch.rand(system.wage.shape, generator=g, dtype=torch.float64)
    dis = torch.log(c_work) - torch.log(c_out) - params.ls_scale * torch.logit(a).to(c_work.dtype)
    system = system.replace(disutility=dis.to(system.disutility.dtype))
    state = state.replace(accept=torch.sigmoid(torch.logit(a)).to(state.accept.dtype))
    open_state = state.replace(closed=torch.zeros_like(state.closed))
    s1 = Fiscal()(params, system, open_state, 0, g)
    R, J = state.firm_cash.shape
    present = state.employed.double()
    labour = present.new_zeros(R * J).index_add(0, system.rep_ind, present).view(R, J)
    big = system.replace(base_spend=torch.full_like(system.base_spend, 1e30), base_labour=labour.clamp_min(1.0))
    s2 = Spending()(params, big, s1, 0, g)
    sales = s2.firm_cash - s1.firm_cash
    return system.replace(base_spend=sales.clamp_min(1e-6), base_labour=labour.clamp_min(1.0)), state
