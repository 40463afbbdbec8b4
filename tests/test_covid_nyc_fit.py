"""Calibrated NYC model: inputs against the data files, no look-ahead, synthetic recovery, backtest scoring."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from calibration.backtest import LEVELS, baseline_point, baseline_quantiles, score_table, summarize_scores
from experiments import covid_nyc as nyc
from experiments.covid_nyc import fit as fit


def test_serosurvey_target_is_the_documented_fact() -> None:
    text = (fit.DATA / "covid_cases" / "README.md").read_text()
    m = re.search(r"was (\d+\.\d)%\s+\(95% CI (\d+\.\d)-(\d+\.\d)%\)", text.replace("\n", " "))
    assert m, "serosurvey sentence not found in data/covid_cases/README.md"
    assert np.allclose((fit.SERO["value"], fit.SERO["low"], fit.SERO["high"]), [float(g) / 100 for g in m.groups()])
    assert pd.Timestamp(fit.SERO["date"]) < pd.Timestamp("2020-04-19")  # before the survey: antibodies lag infection


def test_vaccination_of_agents_follows_the_coverage_files() -> None:
    n = 60000
    g = torch.Generator().manual_seed(1)
    age = torch.randint(0, 18, (n,), generator=g, dtype=torch.int8)
    area = torch.randint(0, 5, (n,), generator=g, dtype=torch.int8)
    dates = pd.date_range("2020-03-01", "2021-03-31")
    d1, d2 = fit.dose_days(age, area, dates, "2021-03-31", seed=0)
    assert bool((d2.long() >= d1.long()).all())  # the second dose never precedes the first
    t_end = len(dates) - 1
    va = pd.read_csv(fit.VACC_AGE_FILE)
    last = va[va["DATE"] == "2021-03-31"].iloc[0]
    # 65-74: our codes 13 (65-69) and 14 (70-74)
    sel = (age == 13) | (age == 14)
    share1 = float((d1[sel].long() <= t_end).double().mean())
    # agents are spread evenly over boroughs here, so the borough factors average out only roughly
    assert abs(share1 - float(last["PERC_1PLUS_65_74"]) / 100) < 0.06
    first_day = int((d1.long()).min())
    assert dates[first_day] >= pd.Timestamp("2020-12-14")  # nobody before the first dose in the files
    cov1, covf, bands = fit.vaccination_coverage(dates, "2021-03-31")
    assert cov1.shape == (len(dates), len(bands), 5) and (covf <= cov1 + 1e-9).all()
    # as of an earlier date, nothing later is read: coverage is extrapolated, not the real rise
    c_early, _, _ = fit.vaccination_coverage(dates, "2021-02-01")
    assert np.allclose(c_early[: int((pd.Timestamp("2021-02-01") - dates[0]).days) + 1],
                       cov1[: int((pd.Timestamp("2021-02-01") - dates[0]).days) + 1])


def test_variant_share_uses_only_periods_known_at_the_date() -> None:
    dates = pd.date_range("2020-03-01", "2021-06-30")
    assert (fit.variant_share(dates, "2021-01-29") == 0).all()  # no period ended yet
    s = fit.variant_share(dates, "2021-03-31")
    i = int((pd.Timestamp("2021-03-13") - dates[0]).days)  # midpoint of the last period
    assert 0.5 < s[i] < 0.8  # 64% non-ancestral in the 4 weeks to 2021-03-27
    assert np.all(np.diff(s) >= 0)


def test_covariates_after_asof_are_held() -> None:
    dates = pd.date_range("2020-03-01", "2020-08-31")
    x_a, names = fit.covariates(dates, nyc.BOROUGHS, "2020-06-30")
    x_b, _ = fit.covariates(dates, nyc.BOROUGHS, "2020-08-31")
    wk = fit._week_index(dates)
    w_cut = int(wk[int((pd.Timestamp("2020-06-28") - dates[0]).days)])  # last complete week before as-of
    assert torch.allclose(x_a[: w_cut + 1], x_b[: w_cut + 1])
    j = names.index("log_cli")
    assert torch.allclose(x_a[-1, :, j], x_a[-2, :, j])  # held after as-of
    assert not torch.allclose(x_b[-1, :, j], x_a[-1, :, j])


def test_baselines_and_scores_by_the_same_code() -> None:
    hist = np.array([100.0, 200.0, 400.0, 800.0])
    assert baseline_point(hist, 1, "persistence") == 800.0
    assert abs(baseline_point(hist, 1, "trend") - 1600.0) < 5.0  # doubling per week (on log(1 + y))
    q = baseline_quantiles(np.arange(1, 30, dtype=float) * 10, [1, 2], "trend")
    assert q.shape == (2, len(LEVELS)) and (np.diff(q, axis=1) >= 0).all()
    rows = pd.DataFrame([{"method": "m", "horizon": 1, "y": 10.0, **{f"q{lv:g}": 10.0 for lv in LEVELS}},
                         {"method": "m", "horizon": 1, "y": 20.0, **{f"q{lv:g}": 10.0 for lv in LEVELS}}])
    s = summarize_scores(score_table(rows))
    assert float(s["mae"].iloc[0]) == 5.0 and float(s["cov90"].iloc[0]) == 0.5
    assert float(s["wis"].iloc[0]) > 0


def _corrupt_after(src, dst, date_col, fmt, train_end) -> None:
    df = pd.read_csv(src)
    d = pd.to_datetime(df[date_col], format=fmt)
    num = [c for c in df.columns if c != date_col and pd.api.types.is_numeric_dtype(df[c])]
    df.loc[d > pd.Timestamp(train_end), num] = df.loc[d > pd.Timestamp(train_end), num] * 7 + 3
    df.to_csv(dst, index=False)


@pytest.mark.slow
@pytest.mark.parametrize("candidates", [1, 3])
def test_forecast_reads_nothing_after_train_end(tmp_path, monkeypatch, candidates: int) -> None:
    train_end = "2020-05-24"
    args = ["--train-end", train_end, "--forecast-days", "7", "--scale", "0.0005", "--iters", "1",
            "--iters-first", "1", "--replicates", "2", "--draws", "5", "--commit-candidates", str(candidates)]
    assert fit.calibrate([*args, "--out", str(tmp_path / "a")]) == 0
    if candidates > 1:  # the block particle filter spliced boroughs from different realisations
        windows = json.loads((tmp_path / "a" / "fit.json").read_text())["windows"]
        assert all(w["candidates"] == candidates for w in windows)
        assert any(len(set(w["realisation"])) > 1 for w in windows), windows
        blob = json.loads((tmp_path / "a" / "fit.json").read_text())
        blob["windows"][0]["realisation"] = blob["windows"][0]["realisation"][:-1]  # a borough short
        with pytest.raises(ValueError, match=r"windows\[0\].*realisation"):
            fit.replay(blob, progress=False)
    # lpm run covid-nyc replays the fit record (the block filter's choices too): the same committed history, exactly
    assert nyc.run(["--fit", str(tmp_path / "a" / "fit.json"), "--out", str(tmp_path / "run")]) == 0
    daily = pd.read_csv(tmp_path / "run" / "daily.csv")
    ins = pd.read_csv(tmp_path / "a" / "insample.csv")
    d = daily[(daily.series == "cases") & (daily.area != "NYC")].merge(ins[ins.series == "cases"], on=["date", "area"])
    assert len(d) == 5 * 85 and np.allclose(d["value"], d["fitted"], rtol=1e-9, atol=1e-9)
    files = {"cases": (nyc.CASES_FILE, "date_of_interest", "%m/%d/%Y"), "mta": (nyc.MTA_FILE, "Date", "%m/%d/%Y"),
             "m50": (nyc.M50_FILE, "date", "%Y-%m-%d"), "cli": (fit.CLI_FILE, "Date", "%Y-%m-%d"),
             "vacc_age": (fit.VACC_AGE_FILE, "DATE", "%Y-%m-%d"), "vacc_boro": (fit.VACC_BORO_FILE, "DATE", "%Y-%m-%d")}
    bad = {}
    for k, (src, col, fmt) in files.items():
        bad[k] = tmp_path / src.name
        _corrupt_after(src, bad[k], col, fmt, train_end)
    shutil.copy(fit.VARIANT_FILE, tmp_path / "variants.csv")
    v = pd.read_csv(tmp_path / "variants.csv")
    v["Other percent"] = 1
    v.to_csv(tmp_path / "variants.csv", index=False)
    real_obs, real_cli, real_var = nyc.load_observed, fit.load_cli, fit.variant_share
    monkeypatch.setattr(nyc, "load_observed", lambda s, e, b=None: real_obs(s, e, b, path=bad["cases"]))
    monkeypatch.setattr(nyc, "MTA_FILE", bad["mta"])
    monkeypatch.setattr(nyc, "M50_FILE", bad["m50"])
    monkeypatch.setattr(fit, "load_cli", lambda e, a=nyc.BOROUGHS: real_cli(e, a, path=bad["cli"]))
    monkeypatch.setattr(fit, "VACC_AGE_FILE", bad["vacc_age"])
    monkeypatch.setattr(fit, "VACC_BORO_FILE", bad["vacc_boro"])
    monkeypatch.setattr(fit, "variant_share", lambda d, a: real_var(d, a, path=tmp_path / "variants.csv"))
    assert fit.calibrate([*args, "--out", str(tmp_path / "b")]) == 0
    a = pd.read_csv(tmp_path / "a" / "forecast.csv")
    b = pd.read_csv(tmp_path / "b" / "forecast.csv")
    assert list(a.columns) == ["date", "area", "series", "median", "lower_90", "upper_90"]
    assert set(a["area"]) == {*nyc.BOROUGHS, "NYC"} and set(a["series"]) == {"cases", "hospitalizations", "deaths"}
    assert pd.to_datetime(a["date"]).min() == pd.Timestamp("2020-05-25")
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "forecast_raw.csv"),
                                  pd.read_csv(tmp_path / "b" / "forecast_raw.csv"))


def _week_transmission(p, lm: torch.Tensor, starts: list, weeks: range, reps: int = 6) -> torch.Tensor:
    """New infections per borough ``[len(weeks), A]`` in each week from the true epidemic's state at its start.

    Mean over ``reps`` streams, the same streams for every ``lm`` (common random numbers), so the
    ratio of two schedules' values is the ratio of the reproduction numbers they imply that week.
    """
    names = [s.name for s in p.model.substeps]
    p.params.committed[: lm.shape[0]] = lm
    out = []
    for w in weeks:
        t, state = starts[w]
        tot = torch.zeros(len(p.areas), dtype=torch.float64)
        for r in range(reps):
            streams = fit.Streams(1000 + r, names, "cpu")
            with torch.no_grad():
                sim, _ = fit.cal.rollout(p.model, p.params, p.system0, state, 7, start=t, grad=False, streams=streams)
            tot += sim["infections"].double().sum(0)
        out.append(tot / reps)
    return torch.stack(out)


#: the fit's options this test measures, all off by default (fit.py, "Options": with the first four the real fit's
#: first window diverged; with the block particle filter its backtest lost to persistence at one week)
SYNTHETIC_OPTIONS = dict(fit_replicates=4, fresh_streams=True, policy_jump_sd=1.5, hosp_lit_sd=0.25, pause_init=2.0,
                         iters_first=60, iters=28, avg_lr_factor=0.3, commit_candidates=64)


@pytest.mark.slow
def test_synthetic_truth_is_recovered(monkeypatch) -> None:
    """A synthetic city with known weekly transmission and ascertainment: the fit recovers both within 15%.

    The truth is NYC-like (about 18% of adults infected by the serosurvey date, a PAUSE-like step
    in week 3 and a lockdown; Brooklyn stricter from week 6), simulated on a random stream (99)
    that the fit never uses. "Recovered", as an epidemiologist would judge it:

    * transmission: for each week after the first month and each borough, the new infections that
      the *true* epidemic's state at the week's start produces in that week under the fitted contacts,
      over those under the true contacts (common random numbers), i.e. the ratio of the effective
      reproduction numbers the two schedules imply; the multiplier of the non-household layers
      itself is not compared, because under lockdown household transmission dominates and a 30%
      error on a multiplier of 0.08 moves R by a few per cent, which no data can see.
      Infection-weighted mean |ratio - 1| per borough and citywide <= 15%.
    * ascertainment: each borough's case-weighted mean fitted ascertainment from the fourth week
      on within 15% of the truth;
    * the share infected by the survey date within 15% (the level the two above rest on).

    The committed history is a block particle filter's (``commit_candidates``): each borough's
    agents from the realisation whose level fits its admissions and deaths; one citywide draw
    left the share 7-31% high and some borough's ascertainment 26-54% off (fit.py, "Options").
    The fit is not bit-reproducible: five of six runs passed, the worst numbers of those share
    +0.6%, transmission 12.5%, ascertainment 13.0% (README, "Synthetic recovery"; without the
    survey term in the choices three of five runs passed).
    """
    # scale 0.004: at 0.002 Staten Island had a few simulated onsets a week
    cfg = fit.FitConfig(train_end="2020-05-31", scale=0.004, seed=3, **SYNTHETIC_OPTIONS)
    p = fit.make_problem(cfg)
    T0 = p.blocks[-1][1]
    W = int(p.week[T0 - 1]) + 1
    truth_lm = torch.full((W, 5), -2.5)
    truth_lm[:3] = 1.0
    truth_lm[3] = -1.0  # a PAUSE-like step, then a lockdown
    truth_lm[6:, 1] = -2.8  # Brooklyn stricter
    truth_asc = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.12], dtype=torch.float64)
    params = p.params
    params.committed[:W] = truth_lm
    params.log_seed.data.fill_(np.log(1e-4))
    streams = fit.Streams(99, [s.name for s in p.model.substeps], "cpu")
    starts, parts, state = {}, [], p.state0
    with torch.no_grad():
        for w in range(W):  # week by week, keeping the state at each week's start
            days = np.nonzero(p.week[:T0] == w)[0]
            starts[w] = (int(days[0]), state)
            part, state = fit.cal.rollout(p.model, params, p.system0, state, len(days), start=int(days[0]), grad=False,
                                          streams=streams)
            parts.append(part)
    sim = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
    base = fit.base_series(p, {k: v.double() for k, v in sim.items()})
    dow = fit.weekday_factor(p, T0)
    p.obs["cases"] = np.round((base["cases"] * truth_asc * dow[:T0, None]).numpy())
    p.obs["hospitalizations"] = np.round((base["hospitalizations"] * 1.0).numpy())
    p.obs["deaths"] = np.round((base["deaths"] * 1.0).numpy())
    for s in fit.SERIES:
        p.obs_city[s] = p.obs[s].sum(1)
    # the serosurvey term sees the synthetic city's own share infected by the survey date
    ts = int((pd.Timestamp(fit.SERO["date"]) - p.dates[0]).days)
    share = float(sim["adult_infections"][: ts + 1].sum()) / p.adults
    monkeypatch.setitem(fit.SERO, "value", share)
    params.committed.fill_(float("nan"))
    params.log_seed.data.fill_(np.log(cfg.seed_init))
    rec = fit.sequential_fit(p, progress=False)
    fitted_share = float(rec.hist["adult_infections"][: ts + 1].sum()) / p.adults
    fitted_lm = rec.log_contact[:W].clone()  # the record holds the parameters' table, which the replays below rewrite
    weeks = range(4, W - 1)  # after the first month (a few hundred infected agents) and before the last week
    true_inf = _week_transmission(p, truth_lm, starts, weeks)
    fit_inf = _week_transmission(p, fitted_lm, starts, weeks)
    ratio = fit_inf / true_inf.clamp_min(1e-9)
    err_boro = ((ratio - 1).abs() * true_inf).sum(0) / true_inf.sum(0)
    city_ratio = fit_inf.sum(1) / true_inf.sum(1)
    err_city = float(((city_ratio - 1).abs() * true_inf.sum(1)).sum() / true_inf.sum())
    d0 = int(np.nonzero(p.week == 4)[0][0])
    cases = torch.tensor(p.obs["cases"][d0:T0])
    asc = (rec.scales["cases"][d0:T0] * cases).sum(0) / cases.sum(0)
    asc_err = (asc / truth_asc - 1).abs()
    print("share infected by the survey date: truth %.3f fitted %.3f" % (share, fitted_share))
    print("transmission ratio fitted/true by week (rows) and borough:\n", ratio.numpy().round(2))
    print("weighted |ratio - 1| per borough", err_boro.numpy().round(3), "citywide %.3f" % err_city)
    print("ascertainment fitted", asc.numpy().round(3), "truth", truth_asc.numpy(), "rel err", asc_err.numpy().round(3))
    print("multiplier fitted/true by week:\n", torch.exp(fitted_lm[4:W - 1] - truth_lm[4:W - 1]).numpy().round(2))
    assert abs(fitted_share / share - 1) < 0.15, (fitted_share, share)
    assert float(err_boro.max()) < 0.15 and err_city < 0.15, (err_boro, err_city)
    assert float(asc_err.max()) < 0.15, asc


def test_policy_steps_loosen_the_random_walk_only_where_policy_changes() -> None:
    from types import SimpleNamespace

    dates = pd.date_range("2020-03-01", "2020-05-31")
    x, names = fit.covariates(dates, nyc.BOROUGHS, "2020-05-31")
    p = SimpleNamespace(cfg=fit.FitConfig(policy_jump_sd=1.5), feature_names=names)
    sd = fit._step_sd(p, SimpleNamespace(x=x), 0, x.shape[0]).squeeze(-1)
    pol = x[:, 0, [names.index(n) for n in fit.POLICY_FEATURES]].double()
    jump = pol.diff(dim=0).abs().sum(-1)
    assert bool((jump > 0.5).any())  # PAUSE (2020-03-22) and the school closure are in these weeks
    assert torch.allclose(sd[jump == 0], torch.tensor(p.cfg.rw_sd))
    assert bool((sd[jump > 0.5] > 0.75).all())
    p.cfg = fit.FitConfig()  # default: the plain random walk
    assert torch.allclose(fit._step_sd(p, SimpleNamespace(x=x), 0, x.shape[0]), torch.tensor(p.cfg.rw_sd))


def test_replicate_mean_averages_the_streams(monkeypatch) -> None:
    calls = []

    def fake_run(p, params, state, rng, t0, t1, grad):
        calls.append(rng["k"])
        return {"cases": torch.full((t1 - t0, 2), float(rng["k"]))}, state, rng

    monkeypatch.setattr(fit, "_run", fake_run)
    out = fit._run_mean(None, None, None, [{"k": 1}, {"k": 3}], 0, 5, grad=False)
    assert calls == [1, 3] and torch.allclose(out["cases"], torch.full((5, 2), 2.0))
    assert torch.equal(fit._run_mean(None, None, None, [{"k": 4}], 0, 5, grad=False)["cases"], torch.full((5, 2), 4.0))


def test_blocks_and_segments_tile_the_history() -> None:
    start, te = pd.Timestamp("2020-03-01"), pd.Timestamp("2021-03-31")
    blocks = fit._blocks(start, pd.Timestamp("2020-05-03"), te, 14)
    T = int((te - start).days) + 1
    assert blocks[0] == (0, 64) and blocks[-1][1] == T
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(t1 - t0 == 14 for t0, t1 in blocks[1:-1]) and 7 <= blocks[-1][1] - blocks[-1][0] < 21
    seg = fit._segments(blocks)
    assert seg[0][0] == 0 and seg[-1][1] == T and all(a[1] == b[0] for a, b in zip(seg, seg[1:]))
    assert max(t1 - t0 for t0, t1 in seg) <= 20 and {t1 for _, t1 in blocks} <= {t1 for _, t1 in seg}
    dates = pd.date_range(start, te)
    origins = [dates[t0] for t0, _ in blocks[1:] if dates[t0] >= pd.Timestamp("2020-06-01")]
    assert pd.Timestamp("2020-06-01") in origins and pd.Timestamp("2021-02-22") in origins  # backtest origins are block starts


def _mini_problem(hosp_obs: np.ndarray) -> object:
    """The fields the observation priors read: config, dates, segments, observed admissions."""
    from types import SimpleNamespace

    dates = pd.date_range("2020-03-01", periods=len(hosp_obs))
    blocks = fit._blocks(dates[0], pd.Timestamp("2020-05-03"), dates[-1], 14)
    return SimpleNamespace(cfg=fit.FitConfig(), dates=dates, segments=fit._segments(blocks),
                           obs={"hospitalizations": hosp_obs[:, None]})


def test_hospital_scale_prior_pins_the_simulated_level() -> None:
    T = 120
    p = _mini_problem(np.full(T, 100.0))
    t0, t1 = 64, 92  # a window of two 14-day blocks after the first wave
    # expected admissions at exactly observed / 0.8 in every segment: on the prior's mean, no penalty
    e = torch.full((T, 1), (100.0 + 0.5 / 14) / 0.8, dtype=torch.float64, requires_grad=True)
    pen = fit._hosp_scale_prior(p, {"hospitalizations": e}, t0, t1, {"prev": 0.8, "anchor": 0.8})
    assert float(pen.detach()) < 1e-6
    # a simulated epidemic twice as large (same admissions explained by half the scale) is penalised,
    # and the gradient lowers the simulated level rather than moving the (profiled) scale
    e2 = (2 * e.detach()).requires_grad_(True)
    pen2 = fit._hosp_scale_prior(p, {"hospitalizations": e2}, t0, t1, {"prev": 0.8, "anchor": 0.8})
    log2 = math.log(2.0)
    sd_rw, sd_a = p.cfg.hosp_rw_sd, p.cfg.hosp_anchor_sd
    # two segments: one random-walk step from the previous block, then none between them; two anchor terms
    assert abs(float(pen2.detach()) - (0.5 * (log2 / sd_rw) ** 2 + 2 * 0.5 * (log2 / sd_a) ** 2)) < 1e-3
    pen2.backward()
    assert float(e2.grad[t0:t1].sum()) > 0 and float(e2.grad[:t0].abs().sum()) == 0.0
    # without a previous scale or anchor (the first window) only the chain inside the window counts, unless the
    # literature prior (hosp_lit_sd) is on
    assert float(fit._hosp_scale_prior(p, {"hospitalizations": e2.detach()}, t0, t1, {})) < 1e-6
    p.cfg = fit.FitConfig(hosp_lit_sd=0.25)  # the option: scale 0.4 in both segments against the literature's 1
    pen3 = fit._hosp_scale_prior(p, {"hospitalizations": e2.detach()}, t0, t1, {})
    assert abs(float(pen3) - 2 * 0.5 * (math.log(0.4) / 0.25) ** 2) < 1e-2


def test_model_errors_use_only_weeks_before_the_origin() -> None:
    T = 120
    p = _mini_problem(np.zeros(T))
    rng = np.random.default_rng(0)
    p.obs = {s: rng.poisson(200, (T, 5)).astype(float) for s in fit.SERIES}
    p.obs_city = {s: p.obs[s].sum(1) for s in fit.SERIES}
    point = {s: np.full((4, 6), 7 * 200.0) for s in fit.SERIES}
    point["cases"][:, 5] = 7 * 1000.0
    fcs = {o: {"weekly_point": point} for o in (40, 54, 68)}
    errs = fit.model_log_errors(p, fcs, 80)
    # target weeks must end by day 80 (the origin reads days < 80): origin 40 gives h = 1..4 (ends 47..68),
    # 54 gives h = 1..3 (61..75; h = 4 ends at 82), 68 gives h = 1 (75); each pooled over 6 columns
    n = {h: e.shape for h, e in errs["cases"].items()}
    assert n == {1: (3, 6), 2: (2, 6), 3: (2, 6), 4: (1, 6)}, n
    obs_w = np.concatenate([p.obs["cases"], p.obs_city["cases"][:, None]], 1)[40:47].sum(0)
    assert np.allclose(errs["cases"][1][0], np.log1p(obs_w) - np.log1p(point["cases"][0]))
    # data from the origin on is never read
    p.obs["cases"][80:] *= 50
    p.obs_city["cases"][80:] *= 50
    errs2 = fit.model_log_errors(p, fcs, 80)
    assert all(np.array_equal(errs["cases"][h], errs2["cases"][h]) for h in errs["cases"])


def test_growth_skill_recovers_the_slope_from_weeks_before_the_origin() -> None:
    T = 160
    p = _mini_problem(np.zeros(T))
    rng = np.random.default_rng(1)
    y = rng.poisson(300, (T, 5)).astype(float)
    p.obs = {s: y.copy() for s in fit.SERIES}
    p.obs_city = {s: p.obs[s].sum(1) for s in fit.SERIES}
    obs_all = np.concatenate([y, y.sum(1, keepdims=True)], 1)
    origins = list(range(14, 120, 7))
    fcs = {}
    for o in origins:
        y0 = obs_all[o - 7:o].sum(0)
        # realised growth = 0.4 x the model's growth + noise: the fit must find b ~ 0.4 at every horizon
        real = np.stack([np.log1p(obs_all[o + 7 * h:o + 7 * h + 7].sum(0)) - np.log1p(y0) for h in range(4)])
        g = real / 0.4 + rng.normal(0, 0.01, real.shape)
        fcs[o] = {"weekly_growth": {s: g for s in fit.SERIES}, "level0": {s: y0 for s in fit.SERIES}}
    sk = fit.growth_skill(p, fcs, 130, weeks=26, shrink=0.0)
    assert all(abs(sk["cases"][h] - 0.4) < 0.02 for h in range(1, 5)), sk["cases"]
    # shrinkage: n / (n + shrink) with n = pairs x 6 columns; no pairs -> no horizon
    n1 = sum(1 for o in origins if o + 7 <= 130) * 6
    sk2 = fit.growth_skill(p, fcs, 130, weeks=26, shrink=float(n1))
    assert abs(sk2["cases"][1] - 0.5 * sk["cases"][1]) < 1e-9
    assert fit.growth_skill(p, fcs, 20, weeks=26)["cases"] == {}
    # a model whose growth anti-correlates with the truth gets b = 0 (clipped), never negative
    neg = {o: {"weekly_growth": {s: -fc["weekly_growth"][s] for s in fit.SERIES}, "level0": fc["level0"]}
           for o, fc in fcs.items()}
    assert all(v == 0.0 for v in fit.growth_skill(p, neg, 130)["cases"].values())
    # data from the origin on is never read
    p.obs["cases"][130:] *= 50
    p.obs_city["cases"][130:] *= 50
    assert fit.growth_skill(p, fcs, 130, weeks=26, shrink=0.0) == sk


def test_skill_scales_the_simulated_city_growth_over_the_model_own_last_week() -> None:
    from dataclasses import replace

    T, origin, H, A = 120, 100, 14, 5
    p = _mini_problem(np.zeros(T))
    y = np.full((T, A), 100.0)
    y[origin - 7:origin] = [50.0, 100.0, 200.0, 100.0, 100.0]  # observed last week: 350..1400 a week
    p.obs = {s: y.copy() for s in fit.SERIES}
    p.obs_city = {s: y.sum(1) for s in fit.SERIES}
    # the simulated boroughs grow at their own rates from a level unlike the observed one (model week 0: 7 x 10)
    rate = np.array([0.3, -0.2, 0.0, 0.1, -0.1])
    mu = torch.tensor(10.0 * np.exp(rate[None, :] * (np.arange(H)[:, None] // 7 + 1)))[None].repeat(2, 1, 1)
    m0 = np.full(A, 70.0)
    sim_out = {"origin": origin, "horizon": H, "rw_sd": 0.1, "assimilation": {}, "mu": {s: mu for s in fit.SERIES},
               "fit_mu": {s: np.full((28, A), 100.0) for s in fit.SERIES}, "fit_obs": {s: y[origin - 28:origin]
                                                                                        for s in fit.SERIES},
               "model0": {s: np.append(m0, m0.sum()) for s in fit.SERIES}}
    skill = {s: {1: 0.5, 2: 0.5} for s in fit.SERIES}
    fc = fit.issue_forecast(p, sim_out, draws=3, skill=skill)
    wk = 70.0 * np.exp(rate[None, :] * np.array([[1], [2]]))  # [2 weeks, A] simulated weekly totals
    g_city = np.log1p(wk.sum(1)) - np.log1p(m0.sum())
    y0 = np.append(y[origin - 7:origin].sum(0), y[origin - 7:origin].sum())
    assert np.allclose(fc["weekly_growth"]["cases"], g_city[:, None].repeat(A + 1, 1))
    assert np.allclose(np.log1p(fc["weekly_point"]["cases"]), np.log1p(y0)[None] + 0.5 * g_city[:, None])
    # growth_pool 1: each borough's own simulated growth, still over the model's own week 0
    p.cfg = replace(p.cfg, growth_pool=1.0)
    own = fit.issue_forecast(p, sim_out, draws=3, skill=skill)["weekly_growth"]["cases"]
    assert np.allclose(own[:, :A], np.log1p(wk) - np.log1p(70.0))


def test_error_draws_resample_centred_errors_and_widen_with_horizon() -> None:
    g = np.random.default_rng(0)
    e = {1: np.linspace(-0.2, 0.2, 30) + 0.5}  # biased by +0.5: centred before use
    d = fit._error_draws(e, 4, (4000, 6), g)
    assert abs(float(np.median(d[:, 0]))) < 0.03 and float(d[:, 0].max()) <= 0.2 + 1e-9
    # horizons without errors: the last known horizon's errors scaled by sqrt(h / h_last)
    assert abs(float(d[:, 3].std()) / float(d[:, 0].std()) - 2.0) < 0.1
    # too few errors: normal with sd 0.3 sqrt(h)
    d0 = fit._error_draws({1: np.zeros(3)}, 2, (20000, 1), g)
    assert abs(float(d0[:, 1].std()) - 0.3 * math.sqrt(2)) < 0.01
    # per area: an area with wider past errors (and enough of them) gets wider intervals; with too few
    # per area, all areas share the pooled errors
    e_area = np.tile(np.linspace(-0.2, 0.2, 8)[:, None], (1, 6)) * np.array([1, 1, 1, 1, 1, 3])
    d1 = fit._error_draws({1: e_area}, 1, (4000, 6), g)[:, 0]
    assert abs(float(d1[:, 5].std()) / float(d1[:, 0].std()) - 3.0) < 0.3
    d2 = fit._error_draws({1: e_area[:2]}, 1, (4000, 6), g)[:, 0]
    assert abs(float(d2[:, 5].std()) / float(d2[:, 0].std()) - 1.0) < 0.15
    # pool: every area resamples the errors pooled over areas, however many of its own it has
    d3 = fit._error_draws({1: e_area}, 1, (4000, 6), g, pool=True)[:, 0]
    assert abs(float(d3[:, 5].std()) / float(d3[:, 0].std()) - 1.0) < 0.15


def _asc_problem(scale: float, obs_cases: np.ndarray, sd: float = 0.15) -> object:
    """The fields :func:`profile_scales` reads, one borough."""
    from types import SimpleNamespace

    T = len(obs_cases)
    dates = pd.date_range("2020-05-04", periods=T)
    segs = [(t, min(T, t + 14)) for t in range(0, T, 14)]
    obs = {"cases": obs_cases[:, None], "hospitalizations": np.ones((T, 1)), "deaths": np.ones((T, 1))}
    return SimpleNamespace(cfg=fit.FitConfig(asc_rw_sd=sd), dates=dates, segments=segs, obs=obs, areas=("X",),
                           scale=scale)


def test_ascertainment_random_walk_smooths_sampling_noise_not_data() -> None:
    T = 112  # eight 14-day segments
    obs = np.repeat(np.array([30.0, 70.0] * 4), 14)  # observed/expected jumps 0.3 <-> 0.7 every segment
    base = {s: torch.full((T, 1), 100.0, dtype=torch.float64) for s in fit.SERIES}
    dow = torch.ones(T, dtype=torch.float64)
    prev = torch.tensor([0.3], dtype=torch.float64)

    def asc(scale: float, prev_asc=prev) -> np.ndarray:
        sc = fit.profile_scales(_asc_problem(scale, obs), base, dow, 0, T, prev_asc)["cases"][:, 0].numpy()
        return sc[::14]

    # a large simulated city (expected onsets known precisely): ascertainment follows most of each jump
    # (log 0.7/0.3 = 0.85; only the NB likelihood's own overdispersion is weighed against the prior)
    big = asc(1.0)
    assert float(np.abs(np.diff(np.log(big))).min()) > 0.5 and 0.55 < big[1] < 0.7 and 0.3 < big[2] < 0.4, big
    # a few simulated agents per segment: the jumps are sampling noise of the simulation, smoothed away
    small = asc(0.002)  # 100 expected a day x 14 days x 0.002 = 2.8 agents per segment
    assert float(np.abs(np.diff(np.log(small))).max()) < 0.2, small
    assert 0.25 < float(small.min()) and float(small.max()) < 0.45
    # without a previous value or a prior, each segment is its own ratio; never above the plausible ceiling
    raw = asc(0.002, None)
    assert abs(raw[0] - (30 * 14 + 0.5) / 1400) < 1e-6
    off = fit.profile_scales(_asc_problem(0.002, obs, sd=0.0), base, dow, 0, T, prev)["cases"][::14, 0].numpy()
    assert np.allclose(off, np.repeat([(30 * 14 + 0.5) / 1400, (70 * 14 + 0.5) / 1400], 1)[np.arange(8) % 2])
    # before asc_prior_from (testing ramped up in spring 2020) segments are not tied together
    early = _asc_problem(0.002, obs)
    early.dates = pd.date_range("2020-03-01", periods=T)
    sp = fit.profile_scales(early, base, dow, 0, T, prev)["cases"][::14, 0].numpy()
    assert np.allclose(sp[:5], off[:5]) and not np.allclose(sp[5:], off[5:])
    high = fit.profile_scales(_asc_problem(1.0, np.full(T, 500.0)), base, dow, 0, T, None)["cases"]
    assert float(high.max()) == fit.FitConfig().asc_bounds[1]


@pytest.mark.slow
def test_assimilation_follows_the_observed_growth_and_reads_nothing_later() -> None:
    cfg = fit.FitConfig(train_end="2020-05-17", scale=0.001, seed=1)
    p = fit.make_problem(cfg, cache_dir=None)
    p.params.committed[:] = -0.5
    p.params.log_seed.data.fill_(np.log(1e-4))
    t_back, origin = 36, 50  # 2020-04-06..04-19: the synthetic epidemic is growing in every borough
    streams = fit.Streams(5, [s.name for s in p.model.substeps], "cpu")
    with torch.no_grad():
        sim, st = fit.cal.rollout(p.model, p.params, p.system0, p.state0, t_back, grad=False, streams=streams)
    full = {k: v.double() for k, v in sim.items()}
    # the last block's weeks are not committed yet: the forecast fits them (network + residual)
    p.params.committed[np.unique(p.week[t_back:])] = float("nan")

    def set_growth(g: np.ndarray) -> None:
        p.obs["cases"][origin - 14:origin - 7] = 1000.0
        p.obs["cases"][origin - 7:origin] = (np.expm1(np.log1p(7000.0) + g) / 7)[None, :]

    set_growth(np.zeros(5))
    _, _, h, info = fit.assimilate_growth(p, p, p.params, st, full, t_back, origin)
    assert h["infections"].shape[0] == origin
    G = np.asarray(info["grid_growth"])  # [3 shifts -0.5, 0, 0.5, 5 boroughs], common random numbers
    mono = (G[1] > G[0] + 0.05) & (G[2] > G[1] + 0.05)
    assert mono.sum() >= 3, G  # a higher multiplier makes the simulated block grow faster
    # an observed growth equal to the unshifted simulation's needs no shift; halfway to the +0.5 run's, +0.25
    set_growth(G[1])
    d0, _, _, _ = fit.assimilate_growth(p, p, p.params, st, full, t_back, origin)
    assert np.allclose(d0.numpy()[mono], 0.0, atol=1e-4), d0
    set_growth((G[1] + G[2]) / 2)
    offsets = {"falling": None}
    d1, _, _, _ = fit.assimilate_growth(p, p, p.params, st, full, t_back, origin)
    assert np.allclose(d1.numpy()[mono], 0.25, atol=1e-4), d1
    set_growth(G[0] - 1.0)  # beyond the grid: clipped to its end
    offsets["falling"], _, _, _ = fit.assimilate_growth(p, p, p.params, st, full, t_back, origin)
    assert np.allclose(offsets["falling"].numpy(), -0.5)
    # observed days from the origin on are never read
    p.obs["cases"][origin:] *= 50
    d2, _, _, _ = fit.assimilate_growth(p, p, p.params, st, full, t_back, origin)
    assert torch.equal(d2, offsets["falling"])
    assert bool(torch.isnan(p.params.committed[int(p.week[origin - 1])]).all())  # the table is restored


@pytest.mark.slow
def test_skill_calibrated_point_is_the_last_week_times_the_scaled_model_growth() -> None:
    cfg = fit.FitConfig(train_end="2020-05-17", scale=0.001, seed=1, replicates=2, draws=5)
    p = fit.make_problem(cfg, cache_dir=None)
    p.params.committed[:] = -0.5
    p.params.log_seed.data.fill_(np.log(1e-4))
    origin = 50
    streams = fit.Streams(5, [s.name for s in p.model.substeps], "cpu")
    with torch.no_grad():
        sim, st = fit.cal.rollout(p.model, p.params, p.system0, p.state0, origin, grad=False, streams=streams)
    full = {k: v.double() for k, v in sim.items()}
    sc = {s: torch.full((origin, 5), 0.3, dtype=torch.float64) for s in fit.SERIES}
    dow = fit.weekday_factor(p, origin)
    out = {}
    for b in (0.0, 0.5, 1.0):
        sk = {s: {1: b, 2: b} for s in fit.SERIES}
        out[b] = fit.forecast_from(p, origin, st, p.params, full, sc, dow, 14, skill=sk)
    raw, y0, g = out[1.0]["weekly_point_raw"]["cases"], out[1.0]["level0"]["cases"], out[1.0]["weekly_growth"]["cases"]
    obs_all = np.concatenate([p.obs["cases"], p.obs_city["cases"][:, None]], 1)
    assert np.allclose(y0, obs_all[origin - 7:origin].sum(0))
    # the growth is the simulated city's over the model's own week before the origin, in every borough
    g_city = np.log1p(raw[:, -1]) - np.log1p(out[1.0]["model0"]["cases"][-1])
    assert np.allclose(g, g_city[:, None].repeat(g.shape[1], 1))
    assert np.allclose(out[1.0]["model0"]["cases"][-1], out[1.0]["model0"]["cases"][:-1].sum())
    assert np.allclose(np.log1p(out[1.0]["weekly_point"]["cases"]), np.log1p(y0) + g)  # b = 1: the model's growth
    assert np.allclose(out[0.0]["weekly_point"]["cases"], y0[None].repeat(2, 0))  # b = 0: no growth
    assert np.allclose(np.log1p(out[0.5]["weekly_point"]["cases"]), np.log1p(y0) + 0.5 * g)
    assert np.abs(g).max() > 0.05  # the test has growth to scale
    # the raw trajectory's draws do not depend on the skill; the issued ones do
    assert np.array_equal(out[0.0]["cases_raw"], out[1.0]["cases_raw"])
    assert not np.allclose(out[0.0]["cases"], out[1.0]["cases"])


def test_block_filter_pays_the_serosurvey_where_the_window_holds_it(monkeypatch) -> None:
    """Around the survey date the boroughs' choices also match the city's share infected."""
    from types import SimpleNamespace

    T, A = 90, 3
    dates = pd.date_range("2020-03-01", periods=T)
    blocks = fit._blocks(dates[0], pd.Timestamp("2020-05-03"), dates[-1], 14)
    onsets = torch.full((T, A), 25.0, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    p = SimpleNamespace(cfg=fit.FitConfig(), dates=dates, segments=fit._segments(blocks), areas=("a", "b", "c"),
                        scale=0.01, delays={s: one for s in fit.SERIES}, adults=10000.0)
    truth = fit.base_series(p, {"testable": onsets, "hosp_risk": 0.1 * onsets, "death_risk": 0.02 * onsets})
    p.obs = {s: truth[s].numpy().round() for s in fit.SERIES}
    t0, t1 = 36, 64
    ts = int((pd.Timestamp(fit.SERO["date"]) - dates[0]).days)
    assert t0 <= ts < t1
    sims = [{"testable": onsets[t0:t1] * lv, "hosp_risk": 0.1 * onsets[t0:t1] * lv,
             "death_risk": 0.02 * onsets[t0:t1] * lv, "adult_infections": onsets[t0:t1] * lv} for lv in (1.0, 1.1)]
    hist = {k: torch.zeros(T, A, dtype=torch.float64) for k in sims[0]}
    dow = torch.ones(T, dtype=torch.float64)
    per_area = (ts + 1 - t0) * 25.0 / p.adults  # one borough's share at level 1
    monkeypatch.setitem(fit.SERO, "value", 3 * per_area)  # the survey agrees with level 1 everywhere
    assert fit.choose_realisations(p, hist, sims, t0, t1, dow) == [0, 0, 0]
    monkeypatch.setitem(fit.SERO, "value", 3.1 * per_area)  # one borough's worth of the 10% larger epidemic
    chosen = fit.choose_realisations(p, hist, sims, t0, t1, dow)
    assert sorted(chosen) == [0, 0, 1], chosen
    assert fit.choose_realisations(p, hist, sims, 64, 90, dow) == [0, 0, 0]  # no survey in this window


def test_fit_refuses_fewer_than_one_candidate_or_replicate() -> None:
    from types import SimpleNamespace

    for name in ("commit_candidates", "fit_replicates"):
        with pytest.raises(fit.ConfigError, match=f"FitConfig.{name}"):
            fit.sequential_fit(SimpleNamespace(cfg=fit.FitConfig(**{name: 0})), progress=False)


def test_block_filter_scores_each_borough_by_its_own_level() -> None:
    """Three realisations at 0.8, 1.0 and 1.25 times the truth's level: each borough picks the one at its level."""
    from types import SimpleNamespace

    T, A = 90, 3
    dates = pd.date_range("2020-03-01", periods=T)
    blocks = fit._blocks(dates[0], pd.Timestamp("2020-05-03"), dates[-1], 14)
    g = torch.Generator().manual_seed(0)
    onsets = 20 + 10 * torch.rand(T, A, generator=g, dtype=torch.float64)  # agents a day per borough
    one = torch.ones(1, dtype=torch.float64)
    p = SimpleNamespace(cfg=fit.FitConfig(), dates=dates, segments=fit._segments(blocks), areas=("a", "b", "c"),
                        scale=0.01, delays={s: one for s in fit.SERIES})
    truth = fit.base_series(p, {"testable": onsets, "hosp_risk": 0.1 * onsets, "death_risk": 0.02 * onsets})
    p.obs = {s: truth[s].numpy().round() for s in fit.SERIES}
    # borough b's realisations are the truth times 0.8, 1 and 1.25 in a rotated order: its right one is b
    levels = torch.tensor([[1.0, 0.8, 1.25], [1.25, 1.0, 0.8], [0.8, 1.25, 1.0]], dtype=torch.float64)  # [C, A]
    sims = [{"testable": onsets * lv, "hosp_risk": 0.1 * onsets * lv, "death_risk": 0.02 * onsets * lv}
            for lv in levels]
    hist = {k: torch.zeros(T, A, dtype=torch.float64) for k in sims[0]}
    t0, t1 = 64, 90
    sims = [{k: v[t0:t1] for k, v in s.items()} for s in sims]
    dow = torch.ones(T, dtype=torch.float64)
    scores = fit.area_scores(p, hist, sims, t0, t1, dow)
    assert scores.shape == (3, A) and scores.argmin(0).tolist() == [0, 1, 2]
    # realisations at 1.3 and 0.77 times the level everywhere lose to the one at the data's level, although each
    # explains the data as well with its own scale: the scales are the realisations' mean
    flat = [{k: v * lv for k, v in sims[0].items()} for lv in (0.77, 1.0, 1.3)]
    flat = [{k: v / levels[0] for k, v in s.items()} for s in flat]  # undo borough rotation of realisation 0
    assert fit.area_scores(p, hist, flat, t0, t1, dow).argmin(0).tolist() == [1, 1, 1]
    # so a city whose every realisation is 1.25x high cannot be told apart
    high = [{k: v * 1.25 for k, v in s.items()} for s in sims]
    assert fit.area_scores(p, hist, high, t0, t1, dow).argmin(0).tolist() == [0, 1, 2]
