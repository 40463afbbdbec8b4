"""Any place: ACS data profiles, Mistry matrices and county flows for counties other than NYC."""

from __future__ import annotations

import pytest
import torch

from lpm.census import (DP05_AGE_BANDS, acs_marginals, county_geo_id, read_acs_profile, read_county_flows,
                        read_mistry_matrices)
from lpm.data import data_path
from lpm.population import PopulationError, marginal_errors, synthesize

DP05 = data_path("census_acs", "ACSDP1Y2023.DP05-Data.csv")
MISTRY = data_path("contact_matrices")
ERIE = county_geo_id(36, 29)


def test_nyc_is_one_configuration_of_the_generic_reader() -> None:
    from experiments import covid_nyc as nyc

    ref = nyc.load_marginals()
    got = acs_marginals({b: county_geo_id(36, nyc.FIPS[b]) for b in nyc.BOROUGHS}, DP05, mistry_dir=MISTRY,
                        mistry_region="New_York", dp03=data_path("acs_nyc", "acs2019_1y_dp03_nyc_counties.csv"))
    for name in ("age_counts", "sex_counts", "employed", "households", "income_counts", "age_prior", "age_groups",
                 "employment_propensity", "school_propensity", "age_lower", "age_upper"):
        assert torch.equal(getattr(got, name).double(), getattr(ref, name).double()), name
    assert got.age_labels == ref.age_labels and torch.equal(got.sex_by_age[0][1], ref.sex_by_age[0][1])
    flows = read_county_flows(data_path("commuting", "nyc_region_county_commuting_flows_acs2009_2013.csv"),
                              [(36, nyc.FIPS[b]) for b in nyc.BOROUGHS])
    assert torch.equal(flows, nyc.load_flows())
    assert all(torch.equal(a, b) for a, b in zip(read_mistry_matrices(MISTRY, "New_York").values(),
                                                  nyc.load_contact_matrices().values()))


def test_erie_county_population_matches_its_census_marginals() -> None:
    df, _ = read_acs_profile(DP05)
    housing_units = float(df.loc[ERIE, "DP05_0091E"])
    # Erie has no DP03 in the bundle: households and employment are stated assumptions here,
    # not library defaults (90% of housing units occupied; employment from the Mistry work prior)
    probe = acs_marginals({"Erie": ERIE}, DP05, mistry_dir=MISTRY, mistry_region="New_York",
                          employed=torch.zeros(1), households=torch.ones(1))
    share = probe.age_prior / torch.zeros(len(DP05_AGE_BANDS), dtype=torch.float64).index_add(
        0, probe.age_groups, probe.age_prior)[probe.age_groups]
    fine = probe.age_counts[0, probe.age_groups] * share
    employed = (fine * probe.employment_propensity).sum().reshape(1)
    m = acs_marginals({"Erie": ERIE}, DP05, mistry_dir=MISTRY, mistry_region="New_York", employed=employed,
                      households=torch.tensor([0.9 * housing_units]))
    assert 940_000 < float(m.age_counts.sum()) < 960_000  # Erie County, 2023: ~946k residents
    pop = synthesize(m, scale=0.01, seed=0)
    err = marginal_errors(pop, m)
    print("Erie County, NY (scale 0.01):", pop.num_agents, "agents;", err)
    for name in ("age", "sex", "employed", "households"):
        assert err[name]["max_abs_error_agents"] <= err[name]["rounding_bound_agents"], (name, err[name])
    assert err["age"]["max_rel_error"] < 0.02 and err["sex"]["max_rel_error"] < 0.01


def test_missing_county_and_missing_inputs_are_named() -> None:
    with pytest.raises(PopulationError, match="has no row for \\['0500000US36999'\\]"):
        acs_marginals({"X": county_geo_id(36, 999)}, DP05, mistry_dir=MISTRY, mistry_region="New_York",
                      employed=torch.ones(1), households=torch.ones(1))
    with pytest.raises(PopulationError, match="without a DP03 file, pass employed"):
        acs_marginals({"Erie": ERIE}, DP05, mistry_dir=MISTRY, mistry_region="New_York")
    with pytest.raises(PopulationError, match="expected one file matching"):
        read_mistry_matrices(MISTRY, "Ohio")
    with pytest.raises(PopulationError, match="no flows for \\(state, county\\) \\[\\(36, 29\\)\\]"):
        read_county_flows(data_path("commuting", "nyc_region_county_commuting_flows_acs2009_2013.csv"), [(36, 29)])
