"""Weekly economy substeps: closures, illness absence, labour supply, job flows, fiscal, spending.

One step is one week. In order (see :func:`substeps.economy.economy_model`):

1. :class:`PolicyClosure`: ``closed[j] = closure[t, j]`` (share of industry j shut by policy).
2. :class:`IllnessAbsence` (only when coupled to an epidemic): employed agents in an
   ill stage are absent (paid ``sick_pay`` of their wage, produce nothing).
3. :class:`LabourSupply`: P(take or keep a job) at the after-tax wage, extensive margin::

       accept_i = sigmoid((log c_work - log c_out - disutility_i) / ls_scale)
       c_work = wage_i - T(wage_i) + ubi_t,   c_out = UI_i(t) + ubi_t + home_floor

4. :class:`LabourFlows`: separations and job finding, hazards per week::

       h_sep  = sep_rate[a] season[m(t)] (1 + shock_sep[a] closed[j]) (1 + demand_sep (1 - demand[j])^+)
                + quit_rate (1 - accept)
       h_find = find_rate[a] (1 - shock_find closed[j]) accept + recall temp_layoff (1 - closed[j])
       P(separate) = 1 - exp(-h_sep),  P(find) = 1 - exp(-h_find)

   Workers separated while their industry is closed are on temporary layoff (recall-eligible)
   until they find a job.

   With constant rates the unemployment rate tends to ``s / (s + f)`` (tested).
5. :class:`Fiscal`: earnings, tax ``T`` from the piecewise-linear schedule, UI
   (``min(ui_rr wage, ui_cap) + supplement`` while ``unemp_weeks <= ui_max_weeks``), UBI,
   pensions (all levels of government are one budget);
   firms pay the wage bill, the government collects and pays; households receive.
6. :class:`Spending`: consumption ``min(open (mpc income + wealth_mpc savings), savings)``,
   closed shares of the basket are not bought (forced saving); sales go to the industries'
   firms; demand and price indices per industry.

Money moves only between households, firms and the government, so ``EconState.money(system)``
is conserved by every substep (tested), and ``gov_balance`` changes by revenue minus
spending every step (the budget identity, tested).

Gradients: employment events are exact Bernoulli draws forward; backward uses the
*conditional-mean straight-through* estimator: ``e' = hard + (m - sg(m))`` with
``m = e (1 - s) + (1 - e) ((1 - l) f0 + l f1)`` where ``e`` and the temporary-layoff flag
``l`` (same estimator) carry the previous step's gradient. Because an agent's chain over
(employed, temporary layoff, other unemployed) is linear in its indicators when its rates do
not depend on its own past, ``E[de_T/dtheta]`` equals ``dE[e_T]/dtheta`` exactly (unbiased at
any horizon, unlike plain straight-through on ``p``, which tests/test_economy.py shows to be
7x too small at 40 weeks); feedback through aggregate demand and labour supply adds a
bias, measured against finite differences.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lpm import Params, Substep, System
from substeps.economy.state import EconState, EconSystem
from substeps.economy.tax import weekly_tax

__all__ = ["PolicyClosure", "IllnessAbsence", "LabourSupply", "LabourFlows", "Fiscal", "Spending",
           "conditional_mean_st", "ui_benefit"]


def conditional_mean_st(hard: Tensor, mean: Tensor) -> Tensor:
    """Exact sample ``hard`` forward; gradient of the conditional mean ``mean`` backward."""
    hard = hard.to(mean.dtype)
    if not mean.requires_grad:
        return hard
    return hard + (mean - mean.detach())


def _at(schedule: Tensor, t: int) -> Tensor:
    return schedule[min(t, schedule.shape[0] - 1)]


def ui_benefit(params: Params, system: EconSystem, t: int) -> Tensor:
    """Weekly UI an unemployed agent would receive in week ``t`` (ignoring duration): ``[N]``."""
    return torch.minimum(params.ui_rr * system.wage, params.ui_cap.to(system.wage.dtype)) + _at(system.ui_supplement, t)


class PolicyClosure(Substep):
    """``closed = closure[t]``: the dated per-industry shutdown (data, not a parameter)."""

    name = "policy_closure"
    reads = ("closure",)
    writes = ("closed",)

    def __call__(self, params: Params, system: EconSystem, state: EconState, t: int, rng: torch.Generator) -> EconState:
        return state.replace(closed=_at(system.closure, t))


class IllnessAbsence(Substep):
    """Employed agents whose disease ``stage`` is one of ``ill_codes`` are absent this week."""

    def __init__(self, ill_codes: Sequence[int], name: str = "illness_absence") -> None:
        if not ill_codes:
            raise ValueError("ill_codes: expected at least one disease stage code that keeps people off work")
        self.name = name
        self.codes = tuple(int(c) for c in ill_codes)
        self.reads = ("stage", "employed")
        self.writes = ("absent",)

    def __call__(self, params: Params, system: EconSystem, state: EconState, t: int, rng: torch.Generator) -> EconState:
        ill = torch.zeros_like(state.stage, dtype=torch.bool)
        for c in self.codes:
            ill |= state.stage == c
        return state.replace(absent=state.employed.detach() * ill.to(state.employed.dtype))


class LabourSupply(Substep):
    """Extensive-margin labour supply at the after-tax wage (see module docstring)."""

    name = "labour_supply"
    reads = ("wage", "disutility", "ubi", "ui_supplement", "tax_thresholds", "accept")  # accept: its dtype
    writes = ("accept",)
    params = ("tax_rates", "ui_rr", "ui_cap", "ls_scale", "home_floor")

    def __call__(self, params: Params, system: EconSystem, state: EconState, t: int, rng: torch.Generator) -> EconState:
        ubi = _at(system.ubi, t)
        c_work = system.wage - weekly_tax(system.wage, system.tax_thresholds, params.tax_rates) + ubi
        c_out = ui_benefit(params, system, t) + ubi + params.home_floor
        z = (torch.log(c_work.clamp_min(1.0)) - torch.log(c_out) - system.disutility) / params.ls_scale
        return state.replace(accept=torch.sigmoid(z).to(state.accept.dtype))


class LabourFlows(Substep):
    """Job separations and job finding by area and industry, shocked by closures (see module docstring)."""

    name = "labour_flows"
    reads = ("employed", "temp_layoff", "unemp_weeks", "in_lf", "area", "industry", "accept", "closed",
             "demand", "rep_ind", "month")
    writes = ("employed", "temp_layoff", "unemp_weeks")
    params = ("sep_rate", "find_rate", "shock_sep", "shock_find", "recall", "season", "quit_rate", "demand_sep")

    def rates(self, params: Params, system: EconSystem, state: EconState, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """Weekly probabilities ``[N]``: separation, finding without recall, finding with recall (temporary layoffs)."""
        a = system.area.long()
        closed = state.closed[system.industry.long()]
        dem = state.demand.reshape(-1)[system.rep_ind]
        season = params.season[_at(system.month, t)]
        h_sep = (params.sep_rate[a] * season * (1 + params.shock_sep[a] * closed)
                 * (1 + params.demand_sep * (1 - dem).clamp_min(0))
                 + params.quit_rate * (1 - state.accept))
        h_find = params.find_rate[a] * (1 - params.shock_find * closed) * state.accept
        h_recall = h_find + params.recall * (1 - closed)
        return -torch.expm1(-h_sep), -torch.expm1(-h_find), -torch.expm1(-h_recall)

    def __call__(self, params: Params, system: EconSystem, state: EconState, t: int, rng: torch.Generator) -> EconState:
        s, f0, f1 = self.rates(params, system, state, t)
        e, tl = state.employed, state.temp_layoff
        lf = system.in_lf
        u = torch.rand(e.shape, generator=rng, device=e.device, dtype=s.dtype)
        was = e.detach() > 0.5
        temp = tl.detach() > 0.5
        f = torch.where(temp, f1, f0)
        now = torch.where(was, u >= s.detach(), u < f.detach()) & lf
        separated = was & ~now
        closed = state.closed[system.industry.long()]
        shut = closed > 0
        new_temp = (separated & shut) | (~was & ~now & temp & lf)
        # the chain over (employed, temporary layoff, permanent) is linear in the indicators:
        # conditional means written that way carry unbiased gradients through both
        lff = lf.to(s.dtype)
        mean_e = lff * (e * (1 - s) + (1 - e) * ((1 - tl) * f0 + tl * f1))
        mean_t = lff * (e * s * shut.to(s.dtype) + (1 - e) * tl * (1 - f1))
        employed = conditional_mean_st(now, mean_e).to(e.dtype)
        temp_layoff = conditional_mean_st(new_temp, mean_t).to(tl.dtype)
        weeks = torch.where(now | ~lf, torch.zeros_like(state.unemp_weeks), (state.unemp_weeks + 1).clamp_max(32000))
        return state.replace(employed=employed, temp_layoff=temp_layoff, unemp_weeks=weeks)


class Fiscal(Substep):
    """Earnings, income tax, UI and UBI; firms pay wages, the government collects and pays."""

    name = "fiscal"
    reads = ("employed", "absent", "wage", "pension", "in_lf", "unemp_weeks", "ubi", "ui_supplement", "ui_max_weeks",
             "tax_thresholds", "savings", "firm_cash", "gov_balance", "rep", "rep_ind")
    writes = ("earnings", "tax", "benefits", "income", "savings", "firm_cash", "gov_balance", "gov_revenue",
              "gov_spending")
    params = ("tax_rates", "ui_rr", "ui_cap", "sick_pay")

    def __call__(self, params: Params, system: EconSystem, state: EconState, t: int, rng: torch.Generator) -> EconState:
        R, J = state.firm_cash.shape
        dt = state.savings.dtype
        e = state.employed.to(dt)
        earnings = e * system.wage.to(dt) * (1 - state.absent.to(dt) * (1 - params.sick_pay.to(dt)))
        tax = weekly_tax(earnings, system.tax_thresholds, params.tax_rates)
        max_weeks = _at(system.ui_max_weeks, t)
        eligible = system.in_lf & (e.detach() < 0.5) & (state.unemp_weeks >= 1) & (state.unemp_weeks.to(dt) <= max_weeks)
        ui = (1 - e) * eligible.to(dt) * ui_benefit(params, system, t).to(dt)
        benefits = ui + _at(system.ubi, t).to(dt) + system.pension.to(dt)
        income = earnings - tax + benefits
        revenue = tax.new_zeros(R).index_add(0, system.rep, tax)
        spending = benefits.new_zeros(R).index_add(0, system.rep, benefits)
        wage_bill = earnings.new_zeros(R * J).index_add(0, system.rep_ind, earnings).view(R, J)
        return state.replace(
            earnings=earnings, tax=tax, benefits=benefits, income=income, savings=state.savings + income,
            firm_cash=state.firm_cash - wage_bill, gov_balance=state.gov_balance + revenue - spending,
            gov_revenue=revenue, gov_spending=spending,
        )


class Spending(Substep):
    """Household consumption and saving; firms' sales, demand and price indices by industry."""

    name = "spending"
    reads = ("income", "savings", "mpc", "closed", "spend_share", "rep", "rep_ind", "firm_cash", "base_spend",
             "base_labour", "employed", "absent", "demand", "price")  # demand, price: their dtypes
    writes = ("consumption", "savings", "firm_cash", "demand", "price")
    params = ("wealth_mpc", "price_kappa")

    def __call__(self, params: Params, system: EconSystem, state: EconState, t: int, rng: torch.Generator) -> EconState:
        R, J = state.firm_cash.shape
        dt = state.savings.dtype
        basket = system.spend_share.to(dt) * (1 - state.closed.to(dt))
        open_share = basket.sum()
        cash = state.savings.clamp_min(0)
        desired = state.mpc.to(dt) * state.income.clamp_min(0) + params.wealth_mpc.to(dt) * cash
        c = torch.minimum(desired * open_share, cash)
        total = c.new_zeros(R).index_add(0, system.rep, c)
        sales = total.unsqueeze(1) * (basket / open_share.clamp_min(1e-12)).unsqueeze(0)
        demand = sales / system.base_spend.clamp_min(1e-12)
        present = (state.employed * (1 - state.absent)).to(dt)
        labour = present.new_zeros(R * J).index_add(0, system.rep_ind, present).view(R, J)
        capacity = (labour / system.base_labour.clamp_min(1e-12)).clamp_min(1e-3)
        price = (demand.clamp_min(1e-3) / capacity) ** params.price_kappa.to(dt)
        return state.replace(consumption=c, savings=state.savings - c, firm_cash=state.firm_cash + sales,
                             demand=demand.to(state.demand.dtype), price=price.to(state.price.dtype))
