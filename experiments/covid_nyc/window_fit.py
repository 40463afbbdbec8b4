"""Calibrate the NYC COVID-19 model to DOHMH daily cases and deaths, then forecast.

Run: ``lpm calibrate covid-nyc --train-end 2020-05-15 --forecast-days 28 --out out/nyc_cal
[--start 2020-03-01 --steps N --window 56 --scale 0.002 --seed 0 --replicates 4 --validate]``
(or ``python -m experiments.covid_nyc.window_fit ...``).

What it does:

1. builds the model (:func:`experiments.covid_nyc.build`) from ``--start`` to
   ``train_end + forecast_days`` and reads the observed frame **truncated at train_end**
   (``load_observed(start, train_end)``; :func:`observed_until` asserts no later row);
2. *fitted window*: only the last ``--window`` days (default 56) before ``train_end`` are
   fitted; the days before run on the model's prior without a graph (truncated gradient,
   :func:`calibration.rollout`), so the cost of a step grows slowly with the history;
3. adds a learned weekly contact multiplier on the window: a :class:`calibration.CovariateNet`
   on covariates of the window's dates only (day of week, policy dates, smooth time basis),
   weekly blocks aligned to ``train_end`` with the last block 14 days long (its value is
   better identified than the last week's), applied to every contact layer by
   :class:`calibration.ParamSchedule`; after ``train_end`` that last value is held;
4. *initial guess from the data*: the initial prevalence is the grid value whose first
   simulated weeks best match the shape of the first reported weeks (:func:`choose_prevalence`;
   it sets the timing of the first wave and so the depletion months later), and
   ascertainment and ifr_scale are rescaled so one simulation matches the window's observed
   case and death totals (:func:`data_init`);
5. fits ``beta``, ``ascertainment``, ``ifr_scale`` and the network by Adam (cosine learning-rate
   decay, the network's weights at a fifth of the rate, the best evaluated iterate kept) on
   the negative-binomial likelihood of daily cases
   and deaths per borough; ``--steps`` defaults to a number that keeps the run near 8 minutes
   on two loaded cores (:func:`default_steps`);
6. forecasts with an ensemble of ``--replicates`` simulations, each anchored to the observed
   last training week, with day-of-week factors, growth-rate uncertainty and
   negative-binomial noise of a dispersion fitted on training residuals, stacked with the
   last-week-flat baseline (see :mod:`calibration.forecast`); the same interval method gives
   the baseline's forecast, written as ``forecast_naive.csv``;
7. writes ``params.json``, ``calibration.h5`` (loss trace, forecast quantiles),
   ``forecast.csv`` (``date, area, series, median, lower_90, upper_90``) and PNG plots;
   with ``--validate`` it also reads the data after ``train_end`` (only after the forecast
   is written) and reports MAE, WIS and 90% coverage of the stacked, model-only and
   baseline forecasts in ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

import calibration as cal
from lpm import Model
from lpm.cli import date_arg, device_arg, positive_float, positive_int, probability
from lpm.errors import ConfigError
from lpm.outputs import OutputDir
from experiments import covid_nyc

__all__ = ["calibrate", "observed_until", "setup_problem", "CalibrationSetup", "DEFAULT_SCALE"]

DEFAULT_SCALE = 0.002
DEFAULT_WINDOW = 56
MIN_AGENTS_WEEK = 3.0  # below this many simulated agents in the last training week, a member's growth is noise
SERIES = ("cases", "deaths")
CITY = "NYC"  # the data's citywide area label: the sum of the simulated boroughs
POLICY_DATES = ("2020-03-16", "2020-03-22", "2020-06-08", "2020-06-22", "2020-07-06", "2020-07-20", "2020-09-30")
CASE_DELAY = (2.0, 1.5)  # mean, sd days from reporting at onset to diagnosis date (assumption)
# deaths are dated by date of death; this short kernel is not a reporting delay but spreads each
# simulated death over a few days, because at small scale one agent is hundreds of deaths and a
# daily series of 0s and 500s makes the likelihood (and its gradient) needlessly rough
DEATH_SMOOTH = (2.0, 1.5)


def observed_until(start: Any, train_end: Any, boroughs: Sequence[str] | None = None) -> pd.DataFrame:
    """Observed frame from ``start`` to ``train_end`` inclusive; raises if any later row slipped in."""
    df = covid_nyc.load_observed(start, train_end, boroughs)
    df = df[pd.to_datetime(df["date"]) <= pd.Timestamp(train_end)]
    if len(df) and pd.to_datetime(df["date"]).max() > pd.Timestamp(train_end):
        raise RuntimeError("observed data after train_end")
    return df


@dataclass
class CalibrationSetup:
    """What :func:`setup_problem` assembles: the built study, the model with its learned multiplier, and the data."""

    setup: covid_nyc.NYCSetup  # the prior model's build (system, state, dates, areas, scale)
    model: Model  # the prior plan plus the learned contact multiplier after the policies
    params: cal.CovariateNetParams  # the study's parameters plus the multiplier network
    obs_model: cal.ObservationModel
    data: cal.Observed  # the fitted window, boroughs only
    full: cal.Observed  # every training day, boroughs and the citywide total
    train_dates: pd.DatetimeIndex
    frame: pd.DataFrame  # the observed frame up to train_end
    grad_from: int  # first day with gradients (the start of the fitted window)
    data_warnings: list[str]


def setup_problem(train_end: str, forecast_days: int, *, start: str = "2020-03-01", scale: float = DEFAULT_SCALE,
                  seed: int = 0, device: str = "cpu", window: int = DEFAULT_WINDOW,
                  llm: str = "rule", initial_prevalence: float | None = None,
                  extrapolate: bool = False) -> CalibrationSetup:
    """Model (with learned contact multiplier), params, observation model and training data.

    ``window``: days before ``train_end`` that are fitted with gradients (the data before
    are masked and the simulation runs through them without a graph: truncated gradient).
    """
    train_end_ts = pd.Timestamp(train_end)
    days_train = int((train_end_ts - pd.Timestamp(start)).days) + 1
    if days_train < 14:
        raise ConfigError(f"--train-end: need at least 14 training days after {start}, got {days_train}")
    if window < 14:
        raise ConfigError(f"--window: expected >= 14 days, got {window}")
    cal.check_train_end(observed_until(start, train_end), start, train_end, min_days=14)  # before any simulation
    config = covid_nyc.NYCConfig(scale=scale, seed=seed, device=device, start=start,
                                 days=days_train + int(forecast_days), llm=llm, extrapolate=extrapolate)
    if initial_prevalence is not None:
        config = dataclasses.replace(config, initial_prevalence=float(initial_prevalence))
    setup = covid_nyc.build(config)
    train_dates = setup.dates[:days_train]
    grad_from = max(0, days_train - int(window))
    # the learned multiplier acts on the fitted window only: before it the model runs on its
    # prior (policies, testing), because a truncated gradient cannot see what a multiplier in
    # the warm-up would do to the window
    policy = [d for d in POLICY_DATES if train_dates[grad_from] < pd.Timestamp(d) <= train_end_ts]
    x = cal.covariates(train_dates[grad_from:], policy_dates=policy)
    net = cal.CovariateNet(x.shape[1], hidden=16, max_mult=3.0)
    params = cal.CovariateNetParams(setup.params, {"contact_mult": (net, x.to(device))}, weekly=True,
                               last_block=14).to(device)
    setup.params.freeze("ihr_scale", "isolation")
    if setup.decision is not None and setup.decision.link is not None:
        setup.decision.link.requires_grad_(False)  # answers -> compliance: not identifiable from case counts alone
    model = setup.model.inserted("policies", cal.ParamSchedule("calibrated_contacts", "layer_scale", "layer_scale",
                                                               "contact_mult", start=grad_from), name="covid-nyc-cal")
    areas = setup.areas
    obs_model = cal.ObservationModel([
        cal.Stream("cases", "cases", 1.0 / setup.scale, cal.gamma_delay(*CASE_DELAY)),
        cal.Stream("deaths", "deaths", 1.0 / setup.scale, cal.gamma_delay(*DEATH_SMOOTH))], areas, total=CITY)
    frame = observed_until(start, train_end)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", cal.DataWarning)
        full = cal.align(frame, train_dates, series=SERIES, areas=(*areas, CITY), end=train_end, device=device)
    fit_mask = {s: m[:, :len(areas)].clone() for s, m in full.mask.items()}
    for m in fit_mask.values():
        m[:grad_from] = False
    data = cal.Observed(full.dates, tuple(areas), {s: v[:, :len(areas)] for s, v in full.values.items()}, fit_mask,
                        full.freq, full.agg, full.masked)
    cal.require_observed(data, 7, what="fitted window")
    return CalibrationSetup(setup, model, params, obs_model, data, full, train_dates, frame, grad_from,
                            [str(m.message) for m in w])


PREVALENCE_GRID = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)


def choose_prevalence(train_end: str, *, start: str = "2020-03-01", scale: float = DEFAULT_SCALE, seed: int = 0,
                      device: str = "cpu", llm: str = "rule", weeks: int = 8,
                      grid: Sequence[float] = PREVALENCE_GRID) -> tuple[float, dict[str, float]]:
    """Initial prevalence from the first reported weeks: the grid value whose simulated citywide weekly
    cases best match the observed *shape* (log weekly counts up to a free level, which ascertainment
    absorbs) over the first ``weeks`` weeks (no later than ``train_end``). Returns the choice and the
    error per candidate. The timing of the first wave decides how depleted the model is months later."""
    days = min(7 * weeks, int((pd.Timestamp(train_end) - pd.Timestamp(start)).days) + 1)
    W = days // 7
    if W < 2:
        return float(grid[0]), {}
    frame = observed_until(start, min(pd.Timestamp(train_end), pd.Timestamp(start) + pd.Timedelta(days=days - 1)))
    obs = frame[(frame.area == CITY) & (frame.series == "cases")].sort_values("date")["value"].to_numpy(float)
    if len(obs) < 7 * W:
        return float(grid[0]), {}
    a = np.log1p(obs[:7 * W].reshape(W, 7).sum(1))
    errs = {}
    for prev in grid:  # a handful of candidates, each one short no-grad simulation
        setup = covid_nyc.build(covid_nyc.NYCConfig(scale=scale, seed=seed, device=device, start=start, days=days,
                                                    llm=llm, initial_prevalence=float(prev)))
        with torch.no_grad():
            sim, _ = cal.rollout(setup.model, setup.params, setup.system, setup.state, days, seed=int(seed), grad=False)
        cases = cal.convolve_delay(sim["cases"].double().sum(-1), cal.gamma_delay(*CASE_DELAY)).cpu().numpy()
        b = np.log1p(cases[:7 * W].reshape(W, 7).sum(1) / setup.scale)
        d = a - b
        errs[f"{prev:g}"] = float(((d - d.mean()) ** 2).mean())
    best = min(errs, key=errs.get)
    return float(best), errs


def data_init(p: CalibrationSetup, seed: int) -> dict[str, float]:
    """Initial guess from the data: rescale ascertainment and ifr_scale so that one simulation's cases and
    deaths over the fitted window match the observed totals (cases are linear in ascertainment, deaths
    nearly linear in ifr_scale); returns the ratios applied."""
    params, data = p.params, p.data
    T = len(p.train_dates)
    with torch.no_grad():
        sim, _ = cal.rollout(p.model, params, p.setup.system, p.setup.state, T, seed=int(seed), grad=False)
        pred = p.obs_model.predict(params, sim, data)
    out = {}
    for series, name, lo, hi in (("cases", "ascertainment", 0.02, 0.95), ("deaths", "ifr_scale", 0.1, 10.0)):
        m = data.mask[series]
        obs, sim_total = float(data.values[series][m].sum()), float(pred[series][m].sum())
        ratio = (obs + 1.0) / (sim_total + 1.0)
        cur = float(getattr(params, name).detach())
        params.set(**{name: float(np.clip(cur * ratio, lo, hi))})
        out[name] = ratio
    return out


def default_steps(days_train: int, window: int) -> int:
    """Optimizer iterations that keep the default run within about 8 minutes on 2 loaded cores.

    A gradient step costs about 3x a plain simulated day in the fitted window and 1x in the
    warm-up, per fit replicate (measured, 2 fit replicates: the whole run at train_end
    2020-05-15, 16 steps, takes ~50 s on a quiet 2-core machine; two runs side by side with
    other users' load took ~3.3 min each with 1 fit replicate).
    """
    warm = max(0, days_train - window)
    return int(np.clip(3200 // (warm + 3 * min(window, days_train)), 3, 16))


def forecast(p: CalibrationSetup, seeds: Sequence[int], *, draws: int = 100, seed: int = 0,
             fit_days: int = 28) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Ensemble forecast (model stacked with the baseline) and last-week-flat baseline (naive), same interval method.

    Returns tidy quantile frames over all dates (training days: the model's own NB draws; days after
    ``train_end``: :func:`calibration.anchored_draws` mixed with the baseline by
    :func:`calibration.model_weight`), the baseline's, and the fitted noise settings per series
    (with the model-only forecast frame under ``"model_only"``).
    """
    setup, model, params = p.setup, p.model, p.params
    T = len(setup.dates)
    T0 = len(p.train_dates)
    mus = {s: [] for s in SERIES}
    with torch.no_grad():
        for s in seeds:
            sim, _ = cal.rollout(model, params, setup.system, setup.state, T, seed=int(s), grad=False)
            daily = p.obs_model.expected_daily(params, sim)
            for name in SERIES:
                mus[name].append(torch.cat([daily[name], daily[name].sum(-1, keepdim=True)], -1).cpu())  # [T, A+1]
    areas = (*setup.areas, CITY)
    full = p.full
    rows, naive_rows, model_rows, noise = [], [], [], {}
    lo_fit = max(7, T0 - fit_days)
    for name in SERIES:
        mu = torch.stack(mus[name]).double()  # [R, T, A+1]
        y = full.values[name].cpu().double()  # [T0, A+1]
        ok = full.mask[name].cpu()
        dow = cal.weekday_factors(y[:, -1], p.train_dates)
        dow_t = dow.double()[torch.as_tensor(setup.dates.day_of_week.to_numpy().copy())].view(1, T, 1)
        # noise around the model's shape, level-corrected per area as the forecast's anchor does
        fit_mu = (mu.mean(0) * dow_t[0])[lo_fit:T0]
        fit_mu = fit_mu * (y[lo_fit:T0].sum(0) + 0.5) / (fit_mu.sum(0) + 0.5)
        k = cal.fit_dispersion(fit_mu, y[lo_fit:T0], ok[lo_fit:T0])
        # trend noise from reported cases (the largest counts): deaths follow infections, and
        # weekly death counts are too small for a stable estimate of their own
        sd = cal.trend_sd(full.values["cases"][:, -1].cpu())
        prev = torch.stack([y[t - 7:t].mean(0) for t in range(lo_fit, T0)]) * dow_t[0, lo_fit:T0]  # a few dozen days
        k_naive = cal.fit_dispersion(prev, y[lo_fit:T0], ok[lo_fit:T0])
        noise[name] = {"dispersion_k": k, "trend_sd_per_week": sd, "dispersion_k_naive": k_naive,
                       "weekday_factors": [round(float(v), 3) for v in dow]}
        train_q = cal.quantiles(cal.sample_counts((mu * dow_t)[:, :T0].float(), k=k, draws=max(1, draws // 10),
                                                  seed=seed).flatten(0, 1)).numpy()
        fut = cal.anchored_draws(mu, y, k=k, sd=sd, dow=dow, dates=setup.dates, draws=draws, seed=seed + 7,
                                 min_week=MIN_AGENTS_WEEK / setup.scale)
        noise[name]["flat_members"] = int((mu[:, T0 - 7:T0].sum(1) < MIN_AGENTS_WEEK / setup.scale).sum())
        flat = torch.cat([y, cal.naive_mean(y, T - T0).double()]).unsqueeze(0)
        nfut = cal.anchored_draws(flat, y, k=k_naive, sd=sd, dow=dow, dates=setup.dates, draws=draws * len(seeds),
                                  seed=seed + 11)
        w = cal.model_weight(mu[:, :T0], y)
        noise[name]["model_weight"] = w
        n_model = int(round(w * fut.shape[0]))
        mix = torch.cat([fut[:n_model], nfut[:fut.shape[0] - n_model]])
        q = np.concatenate([train_q, cal.quantiles(mix).numpy()], 1)  # [5, T, A+1]
        mq = cal.quantiles(fut).numpy()
        nq = cal.quantiles(nfut).numpy()
        for j, a in enumerate(areas):
            rows.append(pd.DataFrame({"date": setup.dates, "area": a, "series": name, "q05": q[0, :, j],
                                      "q25": q[1, :, j], "median": q[2, :, j], "q75": q[3, :, j], "q95": q[4, :, j]}))
            for qq, dest in ((nq, naive_rows), (mq, model_rows)):
                dest.append(pd.DataFrame({"date": setup.dates[T0:], "area": a, "series": name, "q05": qq[0, :, j],
                                          "q25": qq[1, :, j], "median": qq[2, :, j], "q75": qq[3, :, j],
                                          "q95": qq[4, :, j]}))
    noise["model_only"] = pd.concat(model_rows, ignore_index=True)
    return pd.concat(rows, ignore_index=True), pd.concat(naive_rows, ignore_index=True), noise


def score(fc: pd.DataFrame, obs: pd.DataFrame, after: pd.Timestamp | None, before: pd.Timestamp | None) -> dict[str, Any]:
    """MAE, WIS and 90% coverage per series over dates in (after, before] (None: open)."""
    m = fc.merge(obs.rename(columns={"value": "y"}), on=["date", "area", "series"])
    if after is not None:
        m = m[m["date"] > after]
    if before is not None:
        m = m[m["date"] <= before]
    m = m[np.isfinite(m["y"]) & (m["y"] >= 0)]
    out = {}
    for name, g in m.groupby("series"):
        for scope, gg in (("boroughs", g[g["area"] != CITY]), ("NYC", g[g["area"] == CITY])):
            if not len(gg):
                continue
            q = torch.tensor(gg[["q05", "q25", "median", "q75", "q95"]].to_numpy().T, dtype=torch.float32)
            y = torch.tensor(gg["y"].to_numpy(), dtype=torch.float32)
            out[f"{name}/{scope}"] = cal.scores(q, y, torch.ones_like(y, dtype=torch.bool))
    return out


def _plots(out: Path, fc: pd.DataFrame, frame: pd.DataFrame, train_end: pd.Timestamp, res: cal.FitResult,
           later: pd.DataFrame | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in SERIES:
        areas = list(fc["area"].unique())
        fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharex=True)
        for ax, a in zip(axes.ravel(), areas):
            f = fc[(fc.area == a) & (fc.series == name)]
            ax.fill_between(f.date, f.q05, f.q95, alpha=0.3, label="90% interval")
            ax.plot(f.date, f["median"], label="median")
            o = frame[(frame.area == a) & (frame.series == name)]
            ax.plot(pd.to_datetime(o.date), o.value, "k.", ms=3, label="observed (train)")
            if later is not None:
                o2 = later[(later.area == a) & (later.series == name)]
                ax.plot(pd.to_datetime(o2.date), o2.value, "r.", ms=3, label="observed (held out)")
            ax.axvline(train_end, color="grey", ls="--")
            ax.set_title(f"{a} {name}")
        axes.ravel()[0].legend(fontsize=7)
        fig.autofmt_xdate()
        fig.savefig(out / f"forecast_{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(res.sims, res.losses)
    ax.set_xlabel("simulations")
    ax.set_ylabel("loss (NB NLL per cell)")
    fig.savefig(out / "loss.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


#: files ``lpm calibrate covid-nyc`` writes into --out (checked up front, written atomically)
OUTPUT_FILES = ("forecast.csv", "forecast_naive.csv", "params.json", "calibration.h5", "summary.json",
                "forecast_cases.png", "forecast_deaths.png", "loss.png")
#: arguments that define the fitted problem: --resume with any of them changed is refused
FINGERPRINT_ARGS = ("train_end", "start", "scale", "seed", "window", "fit_replicates", "lr", "chunk", "dispersion",
                    "llm")


def calibrate(argv: Sequence[str]) -> int:
    """CLI: ``lpm calibrate covid-nyc --train-end DATE --forecast-days D --out DIR [...]``."""
    ap = argparse.ArgumentParser(prog="lpm calibrate covid-nyc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-end", required=True, type=date_arg, help="last date of data the fit may read (YYYY-MM-DD)")
    ap.add_argument("--forecast-days", type=positive_int, default=28)
    ap.add_argument("--out", default="out/covid_nyc_window_fit")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    ap.add_argument("--extrapolate", action="store_true",
                    help="allow forecast dates beyond the covariate data (2021-03-31): covariates are extended")
    ap.add_argument("--start", type=date_arg, default="2020-03-01")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer iterations (default: from the rollout length, about 8 minutes)")
    ap.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW, help="days before --train-end fitted by gradient")
    ap.add_argument("--scale", type=positive_float, default=DEFAULT_SCALE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicates", type=int, default=4, help="forecast ensemble simulations")
    ap.add_argument("--fit-replicates", type=int, default=2,
                    help="simulations per objective evaluation (common random numbers)")
    ap.add_argument("--draws", type=int, default=100, help="noise draws per ensemble simulation")
    ap.add_argument("--lr", type=float, default=0.02, help="Adam learning rate (cosine decay to lr/10)")
    ap.add_argument("--chunk", type=int, default=30, help="steps per gradient checkpoint chunk")
    ap.add_argument("--dispersion", type=float, default=5.0, help="negative-binomial k of the fitting loss")
    ap.add_argument("--initial-prevalence", type=probability, default=None,
                    help="share of agents exposed at --start (default: chosen from the first reported weeks)")
    ap.add_argument("--llm", default="rule", help="isolation behaviour backend passed to covid_nyc.build")
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("--resume", action="store_true", help="continue from DIR/calibration_state.pt if present")
    ap.add_argument("--validate", action="store_true", help="after writing the forecast, score it on held-out data")
    a = ap.parse_args(list(argv))
    t0 = time.perf_counter()
    # outputs checked before any work and staged; the checkpoint is written in place (for --resume)
    od = OutputDir(a.out, OUTPUT_FILES, overwrite=a.overwrite, resume=a.resume, keep=("calibration_state.pt",))
    out = od.staging
    torch.manual_seed(a.seed)
    state_file = od.final("calibration_state.pt")
    if state_file.exists() and not a.resume:
        state_file.unlink()  # a stale run (other train_end or scale) must not be resumed silently
    cal.check_train_end(observed_until(a.start, a.train_end), a.start, a.train_end, min_days=14)
    prevalence, prevalence_errors = (a.initial_prevalence, {}) if a.initial_prevalence is not None else \
        choose_prevalence(a.train_end, start=a.start, scale=a.scale, seed=a.seed, device=a.device, llm=a.llm)
    p = setup_problem(a.train_end, a.forecast_days, start=a.start, scale=a.scale, seed=a.seed, device=a.device,
                      window=a.window, llm=a.llm, initial_prevalence=prevalence, extrapolate=a.extrapolate)
    for w in p.data_warnings:
        print("data:", w)
    days_train = len(p.train_dates)
    steps = a.steps if a.steps is not None else default_steps(days_train, a.window)
    init = data_init(p, a.seed) if not (a.resume and state_file.exists()) else {}
    loss = cal.Loss("negbin", dispersion=a.dispersion)
    prob = cal.Problem(p.model, p.setup.system, p.setup.state, None, p.obs_model, p.data, loss,
                       seeds=tuple(a.seed + i for i in range(a.fit_replicates)), chunk=a.chunk, grad_from=p.grad_from)
    # the network's many weights all move one output: a fifth of the rate; cosine decay to a tenth
    opt = torch.optim.Adam(cal.param_groups(p.params, a.lr, scale={"nets.": 0.2}))
    fingerprint = {k: getattr(a, k) for k in FINGERPRINT_ARGS} | {"initial_prevalence": prevalence}
    res = cal.fit(prob, p.params, opt, steps, scheduler=cal.cosine_decay(opt, steps, final=0.1),
                  hooks=[cal.Checkpoint(state_file, fingerprint=fingerprint), cal.KeepBest(), cal.Progress()])
    fit_seconds = time.perf_counter() - t0
    fc, naive, noise = forecast(p, [a.seed + 100 + i for i in range(a.replicates)], draws=a.draws, seed=a.seed)
    model_only = noise.pop("model_only")
    train_end = pd.Timestamp(a.train_end)
    later_fc = fc[fc["date"] > train_end].rename(columns={"q05": "lower_90", "q95": "upper_90"})
    cols = ["date", "area", "series", "median", "lower_90", "upper_90"]
    later_fc[cols].to_csv(out / "forecast.csv", index=False, date_format="%Y-%m-%d")
    naive.rename(columns={"q05": "lower_90", "q95": "upper_90"})[cols].to_csv(out / "forecast_naive.csv", index=False,
                                                                              date_format="%Y-%m-%d")
    (out / "params.json").write_text(json.dumps(p.params.to_dict(), indent=2))
    import h5py

    with h5py.File(out / "calibration.h5", "w") as f:
        f["loss"] = np.asarray(res.losses, dtype=np.float64)
        f["simulations"] = np.asarray(res.sims, dtype=np.int64)
        g = f.create_group("forecast")
        g.attrs["train_end"] = str(train_end.date())
        g.attrs["quantiles"] = np.asarray(cal.QUANTILES)
        for name in SERIES:
            sub = fc[fc.series == name]
            for a_ in sub["area"].unique():
                s = sub[sub.area == a_]
                g[f"{name}/{a_}"] = s[["q05", "q25", "median", "q75", "q95"]].to_numpy(np.float32)
        g["dates"] = np.asarray(p.setup.dates.strftime("%Y-%m-%d").tolist(), dtype="S10")
    summary: dict[str, Any] = {"train_end": str(train_end.date()), "forecast_days": a.forecast_days, "scale": a.scale,
                               "steps": steps, "window": a.window, "grad_from_day": p.grad_from,
                               "simulations": res.sims[-1] if res.sims else 0, "data_init_ratios": init,
                               "initial_prevalence": prevalence, "prevalence_shape_errors": prevalence_errors,
                               "loss_first": res.losses[0] if res.losses else None,
                               "loss_last": res.losses[-1] if res.losses else None, "noise": noise,
                               "train_scores": score(fc, p.frame, None, train_end),
                               "data_warnings": p.data_warnings}
    later = None
    if a.validate:
        # read only now, after the forecast is on disk
        end = train_end + pd.Timedelta(days=a.forecast_days)
        later = covid_nyc.load_observed(train_end + pd.Timedelta(days=1), end)
        later["date"] = pd.to_datetime(later["date"])
        summary["validation_scores"] = score(fc, later, train_end, end)
        summary["naive_validation_scores"] = score(naive, later, train_end, end)
        summary["model_only_validation_scores"] = score(model_only, later, train_end, end)
    _plots(out, fc, p.frame, train_end, res, later)
    summary["seconds"] = time.perf_counter() - t0
    summary["fit_seconds"] = fit_seconds
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    od.commit()
    print(json.dumps(summary, indent=2, default=float))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(calibrate(sys.argv[1:]))
