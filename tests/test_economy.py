"""Economy substeps: analytic limits, accounting identities, inequality measures, gradients, coupling."""

from __future__ import annotations

import math

import pytest
import torch

from lpm import Params
from lpm.rng import Streams
from substeps.economy import (CURRENT_LAW, Dp03, EconState, EconSystem, IllnessAbsence, default_params, economy_model, gini,
                              parse_schedule, piecewise_tax, poverty_rate, prepare, synthesize, weekly_tax)
from substeps.economy.planner import StaticEconomy, optimise_schedule, saez_rates
from substeps.economy.substeps import LabourFlows


def small_dp03(areas: int = 2) -> Dp03:
    """Hand-made DP03 marginals: 13 industries, 10 income brackets, pensions."""
    A = areas
    return Dp03(
        areas=tuple(f"A{i}" for i in range(A)),
        pop16=torch.full((A,), 1000.0), civ_lf=torch.full((A,), 650.0), unemployed=torch.full((A,), 40.0),
        industry=torch.arange(1, 14, dtype=torch.float64).repeat(A, 1),
        income=torch.tensor([5, 5, 10, 10, 15, 20, 15, 10, 5, 5], dtype=torch.float64).repeat(A, 1),
        pensions=torch.tensor([[100.0, 20_000.0, 40.0, 15_000.0]]).repeat(A, 1).double(),
    )


def make_state(agents: int = 4000, *, areas: int = 2, replicates: int = 1, weeks: int = 60, seed: int = 0,
               tax: str = CURRENT_LAW, ubi_week: float = 0.0) -> tuple[EconSystem, EconState, Params]:
    """A synthetic economy with a current-law tax schedule, open industries and no UI top-up."""
    sy, st = synthesize(small_dp03(areas), agents, age_share=torch.tensor([[0.15, 0.55, 0.30]] * areas),
                    replicates=replicates, seed=seed)
    th, rates = parse_schedule(tax)
    J = sy.J
    sy = sy.replace(closure=torch.zeros(weeks, J), ui_supplement=torch.zeros(weeks), ui_max_weeks=torch.full((weeks,), 26.0),
                    ubi=torch.full((weeks,), float(ubi_week)), month=torch.arange(weeks) % 12, tax_thresholds=th)
    params = default_params(areas, rates)
    sy, st = prepare(sy, st, params, seed=seed)
    return sy, st, params


def constant_rates(params: Params, sep: float, find: float) -> None:
    """Turn off everything but the base separation and finding hazards (use with ``accept = 1``)."""
    A = params.sep_rate.shape[0]
    params.set(sep_rate=torch.full((A,), sep), find_rate=torch.full((A,), find), season=torch.ones(12),
               quit_rate=0.0, demand_sep=0.0, recall=1e-6, shock_sep=torch.full((A,), 1e-6), shock_find=1e-6)


# ------------------------------------------------------------------------------ labour market
def test_steady_state_unemployment_is_s_over_s_plus_f():
    sy, st, params = make_state(20_000, areas=1, weeks=120)
    st = st.replace(accept=torch.ones_like(st.accept))
    h_s, h_f = 0.02, 0.15
    constant_rates(params, h_s, h_f)
    model = economy_model(sy, labour_supply=False, observables=["unemployment"])
    res = model.simulate(params, sy, st, 120, seed=1, progress=False)
    s, f = -math.expm1(-h_s), -math.expm1(-h_f)
    expected = s / (s + f)
    u = res["unemployment"][40:, 0].double()
    lf = int(sy.in_lf.sum())
    # weekly rates are autocorrelated (persistence 1 - s - f); allow 4 effective standard errors
    se = math.sqrt(expected * (1 - expected) / lf) * math.sqrt((2 - s - f) / (s + f) / u.numel())
    assert abs(float(u.mean()) - expected) < 4 * se + 1e-4, (float(u.mean()), expected)
    # and it is a real limit: doubling separations moves it
    assert abs(float(u.mean()) - 2 * s / (2 * s + f)) > 0.02


def test_closure_raises_separations_in_closed_industry_only():
    sy, st, params = make_state(10_000, areas=1, weeks=20)
    st = st.replace(accept=torch.ones_like(st.accept))
    constant_rates(params, 0.01, 0.1)
    params.set(shock_sep=torch.tensor([20.0]))
    closure = torch.zeros(20, sy.J)
    closure[5:, 10] = 1.0
    sy = sy.replace(closure=closure)
    res = economy_model(sy, labour_supply=False).simulate(params, sy, st, 20, seed=0, progress=False)
    fin = res.final_state
    ind = sy.industry.long()
    lf = sy.in_lf
    u_closed = float((1 - fin.employed[lf & (ind == 10)]).mean())
    u_open = float((1 - fin.employed[lf & (ind != 10)]).mean())
    assert u_closed > 0.5 and u_open < 0.15, (u_closed, u_open)


def test_gradient_of_unemployment_wrt_separation_rate_matches_finite_differences():
    weeks = 40
    sy, st, params = make_state(20_000, areas=1, weeks=weeks)
    st = st.replace(accept=torch.ones_like(st.accept))
    constant_rates(params, 0.01, 0.1)
    model = economy_model(sy, labour_supply=False, observables=["unemployment"])

    def mean_u(p: Params, seed: int, grad: bool) -> torch.Tensor:
        return model.simulate(p, sy, st, weeks, seed=seed, grad=grad, progress=False)["unemployment"].mean()

    seeds = range(3)
    grads = []
    for sd in seeds:
        params.zero_grad()
        u = mean_u(params, sd, True)
        (g,) = torch.autograd.grad(u, params.raw_sep_rate)
        # d/d raw -> d/d value through the Interval transform (value = lo + (hi - lo) sigmoid(raw))
        lo, hi = 1e-5, 0.2
        z = (params.sep_rate.detach() - lo) / (hi - lo)
        grads.append(float(g) / float((hi - lo) * z * (1 - z)))
    auto = sum(grads) / len(grads)
    h = 0.002
    fd = []
    for sd in seeds:
        with torch.no_grad():
            params.set(sep_rate=torch.tensor([0.01 + h]))
            up = float(mean_u(params, sd, False))
            params.set(sep_rate=torch.tensor([0.01 - h]))
            dn = float(mean_u(params, sd, False))
            params.set(sep_rate=torch.tensor([0.01]))
        fd.append((up - dn) / (2 * h))
    fd_mean = sum(fd) / len(fd)
    # exact expectation of the linear chain: u' = u (1 - f) + (1 - u) s, averaged over weeks
    hs = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    f = -math.expm1(-0.1)
    s = -torch.expm1(-hs)
    u0 = float((1 - st.employed[sy.in_lf]).mean())
    u, acc = torch.tensor(u0, dtype=torch.float64), 0.0
    for _ in range(weeks):
        u = u * (1 - f) + (1 - u) * s
        acc = acc + u
    (exact,) = torch.autograd.grad(acc / weeks, hs)
    exact = float(exact)
    assert exact > 0
    assert abs(auto - exact) / exact < 0.08, (auto, exact, fd_mean)
    assert abs(fd_mean - exact) / exact < 0.15, (auto, exact, fd_mean)


# ------------------------------------------------------------------------------ accounting
def _steps(model, params, system, state, weeks, seed=0):
    streams = Streams(seed, [s.name for s in model.substeps])
    for t in range(weeks):
        new = model.step(params, system, state, t, streams)
        yield state, new
        state = new


def test_government_budget_identity_holds_every_step():
    sy, st, params = make_state(6000, replicates=2, weeks=30, ubi_week=50.0)
    sup = torch.zeros(30)
    sup[10:20] = 600.0
    closure = torch.zeros(30, sy.J)
    closure[8:, 10] = 0.8
    sy = sy.replace(ui_supplement=sup, closure=closure)
    params.set(shock_sep=torch.full((2,), 30.0))
    model = economy_model(sy)
    n_ui = 0
    with torch.no_grad():
        for old, new in _steps(model, params, sy, st, 30):
            d_balance = new.gov_balance - old.gov_balance
            flow = new.gov_revenue - new.gov_spending
            scale = float(old.gov_balance.abs().max()) + float(new.gov_spending.max()) + 1.0
            assert torch.allclose(d_balance, flow, rtol=0, atol=1e-12 * scale)
            rev = torch.zeros(2, dtype=torch.float64).index_add(0, sy.rep, new.tax)
            spend = torch.zeros(2, dtype=torch.float64).index_add(0, sy.rep, new.benefits)
            assert torch.allclose(rev, new.gov_revenue, rtol=1e-13) and torch.allclose(spend, new.gov_spending, rtol=1e-13)
            # total money (households + firms + government) never changes
            assert torch.allclose(new.money(sy), old.money(sy), rtol=1e-13)
            n_ui += int(((new.benefits > 60.0) & (new.employed == 0) & sy.in_lf).sum())
    assert n_ui > 0  # UI was actually paid


def test_money_conserved_between_households_and_firms_when_no_one_is_taxed_or_paid():
    sy, st, params = make_state(5000, weeks=25, tax="0:0")
    sy = sy.replace(pension=torch.zeros_like(sy.pension))
    params.set(ui_rr=0.0, ui_cap=0.0)
    closure = torch.zeros(25, sy.J)
    closure[5:, 4] = 0.5
    sy = sy.replace(closure=closure)
    model = economy_model(sy)
    start = float(st.savings.sum() + st.firm_cash.sum())
    moved = 0.0
    with torch.no_grad():
        for old, new in _steps(model, params, sy, st, 25):
            assert float(new.gov_balance.abs().max()) == 0.0
            assert float(new.tax.abs().max()) == 0.0 and float(new.benefits.abs().max()) == 0.0
            total = float(new.savings.sum() + new.firm_cash.sum())
            assert abs(total - start) <= 1e-12 * start
            moved += float(new.consumption.sum())
    assert moved > 0.01 * start  # money did circulate
    # and breaking conservation is caught: a UBI paid by nobody changes the total
    sy2 = sy.replace(ubi=torch.full((25,), 10.0))
    with torch.no_grad():
        _, new = next(_steps(economy_model(sy2), params, sy2, st, 1))
    assert abs(float(new.savings.sum() + new.firm_cash.sum()) - start) > 1.0


# ------------------------------------------------------------------------------ tax and inequality
def test_piecewise_tax_schedule():
    th, rates = parse_schedule("0:0,10000:0.1,50000:0.3")
    y = torch.tensor([0.0, 5000.0, 10000.0, 30000.0, 50000.0, 100000.0], dtype=torch.float64)
    expected = torch.tensor([0, 0, 0, 2000, 4000, 4000 + 15000], dtype=torch.float64)
    assert torch.allclose(piecewise_tax(y, th, rates), expected)
    assert torch.allclose(weekly_tax(y / 52, th, rates), expected / 52)
    with pytest.raises(ValueError, match="THRESHOLD:RATE"):
        parse_schedule("0-0.1")
    with pytest.raises(ValueError, match="increasing"):
        parse_schedule("0:0,5000:0.1,4000:0.2")


def test_gini_of_known_distributions():
    n = 1000
    assert float(gini(torch.full((n,), 3.0))) == pytest.approx(0.0, abs=1e-12)
    one = torch.zeros(n, dtype=torch.float64)
    one[17] = 5.0
    assert float(gini(one)) == pytest.approx((n - 1) / n, abs=1e-12)
    assert float(gini(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))) == pytest.approx(0.25, abs=1e-12)
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(gini(u)) == pytest.approx(1 / 3, abs=5e-3)
    # per group, order and permutation invariant
    x = torch.cat([torch.full((10,), 2.0), one[:10] + torch.tensor([0.0] * 9 + [1.0], dtype=torch.float64)])
    grp = torch.tensor([0] * 10 + [1] * 10)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    g = gini(x[perm], grp[perm], 2)
    assert torch.allclose(g, torch.tensor([0.0, 0.9], dtype=torch.float64), atol=1e-12)
    xr = torch.rand(50, dtype=torch.float64, requires_grad=True)
    gini(xr).backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def test_poverty_rate():
    inc = torch.tensor([1000.0, 20000.0, 5000.0, 30000.0])
    assert torch.allclose(poverty_rate(inc, 12760.0), torch.tensor([0.5]))


# ------------------------------------------------------------------------------ behaviour
def test_ubi_and_ui_lower_labour_supply_and_taxes_raise_revenue():
    sy, st, params = make_state(4000, weeks=12)
    model = economy_model(sy)
    base = model.simulate(params, sy, st, 12, seed=0, progress=False)
    sy_ubi = sy.replace(ubi=torch.full((12,), 1000.0 * 12 / 52))
    ubi = model.simulate(params, sy_ubi, st, 12, seed=0, progress=False)
    assert float(ubi.final_state.accept.mean()) < float(base.final_state.accept.mean()) - 0.02
    assert float(ubi["consumption"][-4:].mean()) > float(base["consumption"][-4:].mean())
    assert float(ubi["poverty"][-1].mean()) < float(base["poverty"][-1].mean())
    assert float(ubi["gini"][-1].mean()) < float(base["gini"][-1].mean())
    assert float(ubi["gov_balance"][-1].mean()) < float(base["gov_balance"][-1].mean())


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="age_share"):
        synthesize(small_dp03(2), 100, age_share=torch.ones(3, 3))
    with pytest.raises(ValueError, match="agents"):
        synthesize(small_dp03(2), 1, age_share=torch.ones(2, 3))
    sy, st, params = make_state(500, weeks=3)
    with pytest.raises(ValueError, match="tax_rates"):
        weekly_tax(sy.wage, sy.tax_thresholds, torch.zeros(2))


# ------------------------------------------------------------------------------ coupling with the epidemic
def test_epidemic_stage_marks_workers_absent_on_the_same_population():
    from substeps.economy.coupling import couple, coupled_model
    from substeps.economy.substeps import Fiscal, LabourFlows, PolicyClosure, Spending
    from substeps.epidemic import epi_system, initial_state, sir, stage_counts

    sy, st, params = make_state(6000, areas=1, weeks=10)
    params.set(sick_pay=0.0)
    disease = sir(recovery_rate=0.2)
    N = sy.wage.shape[0]
    G = 1
    epi = initial_state(disease, N, 300, seed=0)
    system = couple(sy, epi_system(disease, group=torch.zeros(N, dtype=torch.int64), mixing=torch.full((G, G), 1.0)))
    both = couple(st, epi)
    params.add("beta", 0.6)
    ill = disease.code("I")
    econ = [PolicyClosure(), IllnessAbsence([ill]), LabourFlows(), Fiscal(), Spending()]
    obs = {**stage_counts(disease), "absent": lambda y, s: s.absent.sum(), "earnings": lambda y, s: s.earnings.sum()}
    model = coupled_model(disease, econ, obs)
    streams = Streams(0, [s.name for s in model.substeps])
    s = both
    checked = 0
    with torch.no_grad():
        for t in range(21):
            s = model.step(params, system, s, t, streams)
            if t % 7 == 6:
                sick_workers = (s.employed > 0) & (s.stage == ill)
                # absence was marked before this week's flows; those still employed and ill earn nothing
                assert int(s.absent.sum()) > 0
                assert torch.all(s.earnings[(s.absent > 0) & (s.employed > 0)] == 0)
                assert int(((s.absent > 0) & (s.employed > 0)).sum()) <= int(sick_workers.sum()) + int(s.absent.sum())
                checked += 1
    assert checked == 3
    # without illness nobody is absent and earnings are higher
    s0 = couple(st, initial_state(disease, N, 0, seed=0))
    r1 = model.simulate(params, system, both, 14, seed=0, progress=False)
    r0 = model.simulate(params, system, s0, 14, seed=0, progress=False)
    assert float(r0["absent"][6]) == 0.0 and float(r1["absent"][6]) > 0
    assert float(r1["earnings"][13]) < float(r0["earnings"][13])


# ------------------------------------------------------------------------------ planner
@pytest.mark.slow
def test_tax_planner_improves_welfare_balances_budget_and_meets_saez_at_the_top():
    from substeps.economy import INCOME_EDGES

    sy, st, params = make_state(1500, weeks=2)
    th_law, law = parse_schedule(CURRENT_LAW)
    annual = sy.wage.double() * 52
    T_law = piecewise_tax(annual, th_law, law) / 52
    e0 = StaticEconomy(sy.wage, sy.disutility, sy.in_lf, sy.income_band, float(params.ls_scale), float(params.home_floor), 0.0)
    r_req = float((e0.allocation(T_law, iters=1).P * T_law).mean())
    econ = StaticEconomy(sy.wage, sy.disutility, sy.in_lf, sy.income_band, float(params.ls_scale), float(params.home_floor), r_req)
    law_alloc = econ.allocation(T_law)
    th = torch.tensor((0.0, *INCOME_EDGES), dtype=torch.float64)
    start = torch.tensor([float(law[(th_law <= x).nonzero().max()]) for x in th], dtype=torch.float64)
    b = {}
    for kind in ("utilitarian", "atkinson2"):
        rates, path = optimise_schedule(econ, th, start, kind, steps=60, lr=0.08)
        opt = econ.allocation(piecewise_tax(annual, th, rates) / 52)
        # balanced budget: taxes paid by workers fund the transfer and the revenue requirement
        assert float((opt.P * opt.T).mean() - opt.b) == pytest.approx(r_req, abs=1e-6 * (1 + abs(r_req)) + 1e-3)
        assert path[-1] > path[0]
        assert econ.certainty_equivalent(opt, kind) > econ.certainty_equivalent(law_alloc, kind)
        _, saez = saez_rates(econ, 10, kind, iters=100)
        top_planner = float(econ.band_rates(opt, 10)[-1])
        top_saez = float(econ.band_rates(saez, 10)[-1])
        assert abs(top_planner - top_saez) < 0.1, (kind, top_planner, top_saez)
        b[kind] = float(opt.b)
    # more inequality aversion, a larger universal transfer
    assert b["atkinson2"] > b["utilitarian"]


def test_planner_gradient_step_improves_welfare_at_balanced_budget():
    sy, st, params = make_state(800, weeks=2)
    th, law = parse_schedule(CURRENT_LAW)
    annual = sy.wage.double() * 52
    econ = StaticEconomy(sy.wage, sy.disutility, sy.in_lf, sy.income_band, float(params.ls_scale),
                         float(params.home_floor), 20.0)
    rates, path = optimise_schedule(econ, th, law, "utilitarian", steps=8, lr=0.05)
    assert path[-1] > path[0]
    opt = econ.allocation(piecewise_tax(annual, th, rates) / 52)
    assert float((opt.P * opt.T).mean() - opt.b) == pytest.approx(20.0, abs=1e-3)
