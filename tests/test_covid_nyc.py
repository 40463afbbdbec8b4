"""The NYC COVID-19 experiment on a small real slice: end to end, interventions, gradients, data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import covid_nyc as nyc
from lpm.errors import ConfigError
from llm_archetypes import RuleBackend
from llm_archetypes.examples import isolation_rule
from substeps.epidemic.covid import age_tables

SERIES = ("infections", "symptomatic_onsets", "cases", "hospitalizations", "deaths")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One population cache for the module (the first build writes it, the others load it)."""
    return tmp_path_factory.mktemp("popcache")


def test_one_borough_end_to_end_aligned_with_observed(cache, device: str):
    setup = nyc.build(scale=0.01, seed=0, device=device, days=45, boroughs=["SI"], cache_dir=cache)
    res = setup.simulate(seed=0)
    assert setup.areas == ("SI",) and len(setup.dates) == 45
    for s in SERIES:
        v = res[s]
        assert v.shape == (45, 1) and res.labels[s] == ("SI",)
        assert bool(torch.isfinite(v).all()) and bool((v >= 0).all())
    assert float(res["infections"].sum()) > 0  # the seeded epidemic takes off
    # plausible: reported cases <= symptomatic onsets <= infections (cumulative), deaths <= hospitalizations + seeds
    assert float(res["cases"].sum()) <= float(res["infections"].sum())
    assert float(res["hospitalizations"].sum()) <= float(res["symptomatic_onsets"].sum())
    obs = nyc.load_observed(setup.dates[0], setup.dates[-1], ["SI"])
    obs_dates = pd.DatetimeIndex(sorted(obs["date"].unique()))
    assert obs_dates.equals(setup.dates)
    assert set(obs["area"]) == {"SI"} and {"cases", "hospitalizations", "deaths"} <= set(obs["series"])
    # simulated hospitalisations, rescaled to the borough, within a factor 2 of the observed
    # (measured: 1600 simulated vs 1620 observed over these 45 days)
    sim = float(res["hospitalizations"].sum()) / setup.scale
    o = float(obs[obs.series == "hospitalizations"]["value"].sum())
    assert o / 2 < sim < o * 2


def test_stay_at_home_lowers_incidence_from_its_date(cache, device: str):
    kw = dict(scale=0.01, seed=0, device=device, days=45, boroughs=["SI"], cache_dir=cache)
    with_order = nyc.build(**kw).simulate(seed=3)
    without = nyc.build(**kw, disable=("stay_at_home",)).simulate(seed=3)
    a, b = with_order["infections"].sum(1), without["infections"].sum(1)
    start = 21  # 2020-03-22: PAUSE takes effect; before it, the two runs are identical (common random numbers)
    assert torch.equal(a[:start], b[:start])
    assert float(a[start:].sum()) < 0.8 * float(b[start:].sum())


def test_policy_schedules_act_on_their_dates():
    dates = pd.date_range("2020-03-01", "2021-03-31")
    ivs = {iv.name: iv.schedule for iv in nyc.policies(dates)}
    s, w, c = (nyc.LAYERS.index(k) for k in ("school", "work", "community"))
    i = lambda d: int((pd.Timestamp(d) - dates[0]).days)  # noqa: E731
    assert float(ivs["school_closure"][i("2020-03-15"), s]) == 1.0 and float(ivs["school_closure"][i("2020-03-16"), s]) == 0.0
    assert float(ivs["stay_at_home"][i("2020-03-21"), c]) == 1.0 and float(ivs["stay_at_home"][i("2020-03-22"), c]) < 1.0
    assert float(ivs["stay_at_home"][i("2020-03-22"), nyc.LAYERS.index("household")]) == 1.0
    assert float(ivs["reopening"][i("2020-06-08"), w]) > float(ivs["stay_at_home"][i("2020-06-07"), w])
    vac = nyc.vaccination(dates, torch.zeros(3, dtype=torch.int8)).schedule
    old = len(nyc.AGE_LOWER) - 1
    assert float(vac[i("2021-01-24"), old]) == 1.0 and float(vac[i("2021-03-01"), old]) < 1.0
    assert float(vac[i("2021-03-01"), 4]) == 1.0  # 20-24 not yet eligible


def test_mobility_covariates_read_only_up_to_end():
    dates = pd.date_range("2020-03-01", "2020-04-30")
    sched = nyc.area_schedule(dates, ["BX", "SI"])
    assert sched.shape == (61, 2, 4)
    work = sched[:, 0, nyc.LAYERS.index("work")]
    assert float(work[0]) > 0.8 and float(work[-1]) < 0.3  # subway ridership collapsed in April 2020
    # a shorter run sees the same values on its dates: nothing after the end is used
    short = nyc.area_schedule(dates[:30], ["BX", "SI"])
    assert torch.allclose(short, sched[:30])


def test_cases_are_differentiable_in_fitted_parameters(cache, device: str):
    setup = nyc.build(scale=0.01, seed=0, device=device, days=30, boroughs=["SI"], cache_dir=cache)
    res = setup.simulate(seed=1, grad=True)
    loss = res["cases"].sum() + res["deaths"].sum() + res["hospitalizations"].sum()
    grads = torch.autograd.grad(loss, [setup.params.raw_ascertainment, setup.params.raw_beta, setup.params.raw_ihr_scale])
    assert all(bool(torch.isfinite(g)) for g in grads)
    assert float(grads[0]) > 0  # more ascertainment, more reported cases
    assert float(grads[2]) > 0  # higher hospitalisation ratio, more admissions


def test_age_tables_follow_published_shape():
    t = age_tables([2.5, 32.5, 52.5, 87.5])
    assert bool((t["ifr"][1:] > t["ifr"][:-1]).all())  # IFR rises with age (Levin 2020)
    assert float(t["ifr"][2]) == pytest.approx(10 ** (-3.27 + 0.0524 * 52.5) / 100, rel=1e-5)
    assert float(t["susceptibility"][0]) < float(t["susceptibility"][1])  # children less susceptible (Davies 2020)
    assert bool(((t["p_hosp"] >= 0) & (t["p_hosp"] <= 1) & (t["p_death"] <= 0.95)).all())


def test_load_observed_tidy_and_windowed():
    obs = nyc.load_observed("2020-04-01", "2020-04-30")
    assert list(obs.columns) == ["date", "area", "series", "value"]
    assert set(obs["area"]) == {"BX", "BK", "MN", "QN", "SI", "NYC"}
    assert obs["date"].max() == pd.Timestamp("2020-04-30") and obs["date"].min() == pd.Timestamp("2020-04-01")
    city = obs[(obs.area == "NYC") & (obs.series == "cases")]["value"].to_numpy()
    boro = obs[(obs.area != "NYC") & (obs.series == "cases")].groupby("date")["value"].sum().to_numpy()
    assert np.abs(city - boro).max() <= 0.05 * city.max()  # boroughs add up to the city (up to unknown borough)


def test_cli_writes_outputs(tmp_path, cache, device: str):
    out = tmp_path / "out"
    rc = nyc.run(["--params", "prior", "--scale", "0.005", "--days", "20", "--boroughs", "SI", "--out", str(out),
                  "--cache-dir", str(cache), "--device", device])
    assert rc == 0
    for f in ("results.h5", "daily.csv", "validation.json", "summary.json", "cases_by_borough.png", "age_profile.png"):
        assert (out / f).exists(), f
    daily = pd.read_csv(out / "daily.csv")
    assert list(daily.columns) == ["date", "area", "series", "value"]
    assert set(daily["area"]) == {"SI", "NYC"} and (daily["value"] >= 0).all()
    survey = pd.read_csv(out / "survey.csv")
    assert list(survey.columns) == ["week", "date", "archetype", "age_band", "sex", "borough", "employment", "size",
                                    "cases_per_100k", "cases_level", "answer", "compliance"]
    assert sorted(survey["week"].unique()) == [0, 1, 2]  # days 0, 7, 14 of 20
    assert set(survey["borough"]) == {"Staten Island"} and survey["answer"].between(0, 1).all()
    assert survey.groupby("week")["size"].sum().eq(int(survey["size"].sum()) // 3).all()  # every agent, every week
    summary = json.loads((out / "summary.json").read_text())
    assert summary["llm"]["weeks"] == 3 and summary["llm"]["archetypes"] == survey["archetype"].nunique()


# ------------------------------------------------------------------ LLM archetype isolation (rule backend)
BASE = dict(scale=0.01, seed=0, boroughs=["SI"])  # plus the device fixture's device


class Fixed(RuleBackend):
    """Every archetype answers P(yes) = p (a rule, named per p so cache keys differ)."""

    def __init__(self, p: float) -> None:
        super().__init__(lambda prompt: [p, 1.0 - p], version=f"fixed-{p}")


class Raising(RuleBackend):
    """Looks like the default rule backend (same cache keys) but fails on any call."""

    def score(self, prompts, options):
        raise AssertionError("replay must not call the backend")

    def complete(self, prompts):
        raise AssertionError("replay must not call the backend")


def test_one_call_per_nonempty_archetype_per_week(cache, device: str):
    setup = nyc.build(**BASE, device=device, days=22, cache_dir=cache, llm_cache=False)
    res = setup.simulate(seed=0)
    pop = setup.population
    band = np.zeros(len(nyc.AGE_LABELS), dtype=int)
    for k, codes in enumerate(nyc.ARCHETYPE_AGE_BANDS.values()):
        band[list(codes)] = k
    combos = pd.DataFrame({"a": band[pop.age.long().numpy()], "s": pop.sex.numpy(), "b": pop.area.numpy(),
                           "e": pop.employed.numpy()}).drop_duplicates()
    K = len(combos)
    assert setup.decision.archetypes.K == K and res["isolation_answers"].shape == (22, K)
    st = setup.asker.stats
    assert st.decisions == 4 and st.calls == 4 * K  # days 0, 7, 14, 21; no cache: every prompt is a call
    assert st.cache_hits == 0 and st.fallbacks == 0
    # the per-agent compliance is the (identity) link of the archetype's answer
    final = res.final_state
    torch.testing.assert_close(final.isolation, final.isolation_score[setup.decision.archetypes.archetype_id.to(device)],
                               atol=2e-4, rtol=0)


def test_weekly_context_is_last_weeks_reported_cases_per_100k(cache, device: str):
    setup = nyc.build(**BASE, device=device, days=40, cache_dir=cache, llm_cache=False,
                      params={"ascertainment": 0.9, "beta": 0.5})
    res = setup.simulate(seed=2)
    cases = res["cases"][:, 0].detach().cpu().double()
    n = float((setup.population.area == 0).sum())
    want = torch.stack([cases[max(0, t - 6):t + 1].sum() for t in range(40)]) / n * 1e5
    got = res["weekly_cases_per_100k"][:, 0].detach().cpu().double()
    assert float(want[-1]) > 0  # the test sees cases
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_higher_compliance_means_fewer_infections(cache, device: str):
    kw = dict(**BASE, device=device, days=45, cache_dir=cache, llm_cache=False, params={"isolation": 0.99})
    low = nyc.build(**kw, llm=Fixed(0.05)).simulate(seed=4)["infections"].sum(1)
    high = nyc.build(**kw, llm=Fixed(0.95)).simulate(seed=4)["infections"].sum(1)
    first = int(torch.nonzero(low != high)[0]) if bool((low != high).any()) else 45
    assert first >= 3  # nobody is symptomatic before the latent + pre-symptomatic periods: identical start
    assert float(high.sum()) < 0.85 * float(low.sum())


def test_replay_with_raising_backend_is_identical(cache, tmp_path, device: str):
    kw = dict(**BASE, device=device, days=22, cache_dir=cache, llm_cache=tmp_path / "answers.sqlite")
    first = nyc.build(**kw)
    a = first.simulate(seed=5)
    assert first.asker.stats.calls > 0
    again = nyc.build(**kw, llm=Raising(isolation_rule), llm_mode="replay")
    b = again.simulate(seed=5)
    assert again.asker.stats.calls == 0 and again.asker.stats.cache_hits == 4 * again.decision.archetypes.K
    for name in a.observables:
        assert torch.equal(a[name], b[name]), name


def test_gradient_reaches_the_isolation_link(cache, device: str):
    setup = nyc.build(**BASE, device=device, days=30, cache_dir=cache, llm_cache=False, params={"beta": 0.5})
    link = setup.params.isolation_link
    assert {id(p) for p in link.parameters()} <= {id(p) for p in setup.params.parameters()}  # the optimiser sees it
    res = setup.simulate(seed=1, grad=True)
    loss = res["infections"].sum() + res["cases"].sum()
    g_slope, g_bias = torch.autograd.grad(loss, [link.slope, link.bias])
    assert bool(torch.isfinite(g_slope).all()) and bool(torch.isfinite(g_bias).all())
    assert float(g_bias.abs().sum()) > 0 and float(g_slope.abs().sum()) > 0


def test_llm_off_keeps_the_plain_model(cache, device: str):
    setup = nyc.build(**BASE, device=device, days=10, cache_dir=cache, llm="off")
    assert setup.asker is None and setup.state.isolation is None
    assert "isolation_decision" not in [s.name for s in setup.model.substeps]
    with pytest.raises(ValueError, match="llm: expected one of"):
        nyc.build(**BASE, device=device, days=10, cache_dir=cache, llm="gpt")


def test_config_holds_options_and_params_hold_values(cache, device: str):
    """Options are NYCConfig fields, checked on construction; parameter values go through params=."""
    with pytest.raises(ConfigError, match=r"disable: unknown policies \['lockdown'\]"):
        nyc.NYCConfig(disable=("lockdown",))
    with pytest.raises(ConfigError, match=r"days: expected > 0, got 0"):
        nyc.NYCConfig(days=0)
    with pytest.raises(ConfigError, match=r"estimator: expected one of .*'presence'.* got 'exact'"):
        nyc.NYCConfig(estimator="exact")
    with pytest.raises(ConfigError, match=r"\['beta'\] are parameters: pass params=\{'beta': ...\}"):
        nyc.build(nyc.NYCConfig(**BASE, days=5, cache_dir=cache, llm="off"), beta=0.3)
    with pytest.raises(ConfigError, match=r"build: unknown option\(s\) \['betta'\]"):
        nyc.build(nyc.NYCConfig(**BASE, days=5, cache_dir=cache, llm="off"), betta=0.3)
    with pytest.raises(ConfigError, match=r"build: expected an NYCConfig .* got float 0.01"):
        nyc.build(0.01)
    cfg = nyc.NYCConfig(**BASE, device=device, days=5, cache_dir=cache, llm="off")
    assert cfg.boroughs == ("SI",) and cfg.dates[-1] == pd.Timestamp("2020-03-05")
    setup = nyc.build(cfg, params={"beta": 0.4, "ascertainment": 0.2})
    assert setup.config == cfg
    assert abs(float(setup.params.beta) - 0.4) < 1e-6 and abs(float(setup.params.ascertainment) - 0.2) < 1e-6
    assert abs(float(nyc.build(cfg).params.beta) - nyc.NYC_DEFAULTS["beta"]) < 1e-6


def test_schedules_and_archetype_ids_live_in_the_system(cache, device: str):
    """Policies, vaccination and archetype ids are system fields on the run's device; substeps name them."""
    setup = nyc.build(**BASE, device=device, days=12, cache_dir=cache, llm_cache=False)
    sy, dates = setup.system, setup.dates
    for iv in nyc.policies(dates):
        torch.testing.assert_close(getattr(sy, iv.name).cpu(), iv.schedule)
    torch.testing.assert_close(sy.vaccination.cpu(), nyc.vaccination(dates, setup.population.age).schedule)
    torch.testing.assert_close(sy.archetype.cpu(), setup.decision.archetypes.archetype_id)
    for name in ("school_closure", "stay_at_home", "reopening", "vaccination", "archetype", "area_schedule"):
        assert getattr(sy, name).device.type == torch.device(device).type, name
    mods = {s.name: s for s in setup.model.substeps}
    assert [iv.schedule for iv in mods["policies"].interventions] == ["school_closure", "stay_at_home", "reopening"]
    assert {"school_closure", "stay_at_home", "reopening"} <= set(mods["policies"].reads)
    assert {"vaccination", "age"} <= set(mods["vaccination"].reads) and setup.decision.ids == "archetype"
    off = nyc.build(**BASE, device=device, days=12, cache_dir=cache, llm="off", disable=("reopening", "vaccination"))
    assert off.system.reopening is None and off.system.vaccination is None and off.system.archetype is None


def test_package_runs_as_a_module(tmp_path):
    """``python -m experiments.covid_nyc`` is ``lpm run covid-nyc``: a bad option is one error line, exit status 2."""
    import subprocess
    import sys
    from pathlib import Path

    p = subprocess.run([sys.executable, "-m", "experiments.covid_nyc", "--params", "prior", "--boroughs", "XX",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1], env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    assert "lpm: error: boroughs: expected distinct codes" in p.stderr and not (tmp_path / "o").exists()
