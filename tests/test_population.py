"""Population synthesis: IPF, integerisation, households, contact layers, and bad input.

Tolerances: IPF margins to 1e-6 relative; integerised marginals within the
truncate-replicate-sample bound (fewer agents off than cells in the category); mean
household size within 1% of census persons/households; per-layer age-mixing correlation
with the Mistry et al. 2021 matrices above 0.5 (household), 0.9 (school, work), 0.75 (community; a ~5k-agent slice is noisy).
"""

from __future__ import annotations


import pandas as pd
import pytest
import torch

from experiments import covid_nyc as nyc
from lpm.population import (Constraint, PopulationError, integerise, ipf, marginal_errors, matrix_correlation,
                            mixing_matrix, synthesize, unit_sbm, ztp_pmf)

from conftest import DEVICE  # one source: the device fixture's value


def test_ipf_matches_every_margin_and_known_independence_solution():
    # seed uniform over a 3 x 4 table with row/col margins: the solution is the outer product / total
    rows = torch.tensor([[10.0, 30.0, 60.0]])
    cols = torch.tensor([[25.0, 25.0, 40.0, 10.0]])
    c = torch.arange(12)
    fit, err = ipf(torch.ones(1, 12), [Constraint("row", c // 4, rows), Constraint("col", c % 4, cols)])
    expected = (rows[0][:, None] * cols[0][None, :] / 100.0).reshape(1, 12)
    assert err < 1e-6
    assert torch.allclose(fit.float(), expected, rtol=1e-5)


def test_ipf_partial_constraint_and_seed_structure():
    # a zero seed cell stays zero; a constraint that covers only some cells (-1) is met
    seed = torch.tensor([[1.0, 2.0, 0.0, 4.0]])
    fit, err = ipf(seed, [Constraint("total", torch.zeros(4, dtype=torch.long), torch.tensor([[70.0]])),
                          Constraint("first_two", torch.tensor([0, 0, -1, -1]), torch.tensor([[30.0]]))])
    assert err < 1e-6 and float(fit[0, 2]) == 0.0
    assert abs(float(fit[0, :2].sum()) - 30) < 1e-6 and abs(float(fit.sum()) - 70) < 1e-6
    assert abs(float(fit[0, 1] / fit[0, 0]) - 2.0) < 1e-9  # proportions inside a constraint keep the seed's


def test_integerise_is_within_one_per_cell_and_keeps_totals():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 50, generator=g, dtype=torch.float64) * 7
    n = integerise(x, g)
    assert n.dtype == torch.long
    assert torch.equal(n.sum(1), x.sum(1).round().long())
    assert bool(((n - x).abs() < 1).all())


def test_ztp_pmf_has_requested_mean():
    mean = torch.tensor([1.5, 2.1, 2.9])
    p = ztp_pmf(mean, 10)
    got = (p * torch.arange(1, 11, dtype=torch.float64)).sum(1)
    assert torch.allclose(got, mean.double(), atol=1e-4)


def test_unit_sbm_reproduces_a_reciprocal_contact_matrix():
    # two groups of 3000 and 1000 in one unit; C reciprocal: n_g C_gh = n_h C_hg
    n = torch.tensor([3000, 1000])
    C = torch.tensor([[4.0, 1.0], [3.0, 2.0]])
    group = torch.repeat_interleave(torch.arange(2), n)
    unit = torch.zeros(4000, dtype=torch.int32)
    ei = unit_sbm(unit, group, C, torch.Generator().manual_seed(0))
    M = mixing_matrix(ei, group, 2)
    assert torch.allclose(M.float(), C, rtol=0.08), M
    # symmetric edge list, no self loops
    assert bool((ei[0] != ei[1]).all())
    assert ei.shape[1] % 2 == 0


@pytest.fixture(scope="module")
def si_setup(tmp_path_factory):
    """Staten Island at scale 0.01 (~4,900 agents), built once for this module."""
    return nyc.build(scale=0.01, seed=1, boroughs=["SI"], days=10, cache_dir=tmp_path_factory.mktemp("cache"))


def test_synthesized_marginals_match_census_within_rounding_bound(si_setup):
    err = marginal_errors(si_setup.population, si_setup.marginals)
    for name in ("age", "sex", "employed", "households"):
        assert err[name]["max_abs_error_agents"] < err[name]["rounding_bound_agents"], (name, err[name])
    # the whole borough, in agents: within 0.5% of the census total at this scale
    total = float(si_setup.marginals.age_counts.sum()) * si_setup.scale
    assert abs(si_setup.population.num_agents - total) / total < 0.005


def test_household_sizes_and_members(si_setup):
    pop = si_setup.population
    sizes = torch.bincount(pop.household.long())
    census_mean = float(si_setup.marginals.age_counts.sum() / si_setup.marginals.households.sum())
    assert abs(float(sizes.double().mean()) - census_mean) / census_mean < 0.01
    target = ztp_pmf(torch.tensor([census_mean]), 10)[0]
    got = torch.bincount(sizes, minlength=11)[1:].double() / sizes.numel()
    assert float((got - target).abs().sum()) / 2 < 0.05  # total variation distance
    # every household has an adult
    has_adult = torch.zeros(sizes.numel(), dtype=torch.bool).index_put_((pop.household.long()[pop.age_years >= 18],), torch.tensor(True))
    assert bool(has_adult.all())


def test_layer_age_mixing_matches_mistry_matrices(si_setup):
    v = nyc.validate_setup(si_setup)["layers"]
    assert v["household"]["age_mixing_correlation"] > 0.5
    assert v["school"]["age_mixing_correlation"] > 0.9
    assert v["work"]["age_mixing_correlation"] > 0.9
    assert v["community"]["age_mixing_correlation"] > 0.75  # ~14k edges: sampling noise over 324 cells
    for layer in ("community", "work", "school"):
        assert abs(v[layer]["mean_degree"] / v[layer]["source_mean_contacts"] - 1) < 0.35, (layer, v[layer])


def test_workers_follow_commuting_flows():
    flows = nyc.load_flows(["BK", "MN"])
    m = nyc.load_marginals(["BK", "MN"])
    pop = synthesize(m, 0.005, seed=2, flows=flows)
    w = pop.employed & (pop.work_area >= 0)
    got = torch.bincount(pop.area.long()[w] * 2 + pop.work_area.long()[w], minlength=4).view(2, 2).double()
    got = got / got.sum(1, keepdim=True)
    want = flows / flows.sum(1, keepdim=True)
    assert torch.allclose(got, want, atol=0.03), (got, want)


def test_synthesis_is_deterministic_given_seed():
    m = nyc.load_marginals(["SI"])
    a, b = synthesize(m, 0.003, seed=5), synthesize(m, 0.003, seed=5)
    c = synthesize(m, 0.003, seed=6)
    for f in ("age", "household", "school", "workplace"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.household, c.household)


# ------------------------------------------------------------------------- bad input
def _census_copy(tmp_path, mutate):
    df = pd.read_csv(nyc.CENSUS_FILE, encoding="utf-8-sig", dtype=str)
    df = mutate(df)
    p = tmp_path / "census.csv"
    df.to_csv(p, index=False)
    return p


def test_missing_column_names_file_and_column(tmp_path):
    p = _census_copy(tmp_path, lambda d: d.drop(columns=["DP05_0002E"]))
    with pytest.raises(PopulationError, match=r"census\.csv.*DP05_0002E"):
        nyc.load_marginals(census=p)


def test_negative_counts_name_file_and_column(tmp_path):
    def neg(d):
        d.loc[2, "DP05_0007E"] = "-5"
        return d
    p = _census_copy(tmp_path, neg)
    with pytest.raises(PopulationError, match=r"census\.csv.*DP05_0007E.*non-negative"):
        nyc.load_marginals(census=p)


def test_areas_not_matching_flows_name_file_and_column(tmp_path):
    f = pd.read_csv(nyc.FLOWS_FILE, dtype={"h_county_fips": int})
    f = f[f["h_county_fips"] != 85]  # no residents of Staten Island in the flows
    p = tmp_path / "flows.csv"
    f.to_csv(p, index=False)
    with pytest.raises(PopulationError, match=r"flows\.csv.*h_county_fips.*SI"):
        nyc.load_flows(path=p)


def test_bad_scale_is_rejected():
    with pytest.raises(PopulationError, match="scale"):
        synthesize(nyc.load_marginals(["SI"]), 0.0)


def test_matrix_correlation_detects_mismatch():
    a = torch.eye(5)
    assert matrix_correlation(a, a) == pytest.approx(1.0)
    assert matrix_correlation(a, 1 - a) < 0
