"""New York City's labour market and household budgets through the 2020 shutdown, weekly.

Agents: adults 16+ of the five boroughs synthesized from ACS 2019 DP03 (employment, industry,
household income) and ACS DP05 (age), one step per week. Shock: the dated NY PAUSE closures
and NY Forward reopening phases by industry (data/labor/nyc_closures_2020_2021.csv) and the
federal UI top-ups (data/labor/us_ui_policy_2020_2021.csv). See data/labor/README.md.

- ``lpm calibrate economy-nyc``: fit weekly separation and finding rates per borough, their
  shock multipliers, recall and seasonality by gradient (Adam) to the monthly LAUS
  unemployment rates of the Bronx, Brooklyn, Manhattan and Queens, 2019-01..2020-12; forecast
  2021-01..2021-03 and score it against the data and against persistence. Staten Island has
  no LAUS series in the bundle: it is left out of the fit, and in ``run`` it takes the
  labour-force-weighted mean of the four fitted boroughs' rates (a forecast, never scored).
  Data after 2021-03-31 are never read (project rule), so "2021" is scored on its first quarter.
- ``lpm run economy-nyc --ubi 1000 --tax SCHEDULE``: baseline (current law, no UBI) and
  scenario arms on the same agents and random streams, R replicates in one batched pass;
  tidy weekly table, per-replicate paired effects and plots. ``--planner`` adds the tax
  planner (gradient) and the Saez-style baseline on the same population.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lpm.errors import ConfigError, DataError
from lpm import Model, Params
from lpm.cli import Experiment
from substeps.economy import (CURRENT_LAW, INCOME_BANDS, INCOME_EDGES, INDUSTRIES, EconState, EconSystem, default_params,
                              economy_model, format_schedule, load_dp03, parse_schedule, piecewise_tax, prepare,
                              synthesize)
from substeps.economy.decision import spending_decision
from substeps.economy.planner import WELFARE, StaticEconomy, optimise_schedule, saez_rates
from substeps.economy.shock import closure_schedule, ui_schedule, weekly_dates

__all__ = ["build", "load_laus", "monthly", "calibrate", "run", "EXPERIMENT", "BOROUGHS", "FITTED_FILE"]

DATA = Path(__file__).resolve().parents[1] / "data"
DP03_FILE = DATA / "acs_nyc" / "acs2019_1y_dp03_nyc_counties.csv"
DP05_FILE = DATA / "census_acs" / "ACSDP1Y2023.DP05-NYC.csv"
LAUS_FILE = DATA / "labor" / "nyc_borough_laus_monthly_2019_2021q1.csv"
CLOSURE_FILE = DATA / "labor" / "nyc_closures_2020_2021.csv"
UI_FILE = DATA / "labor" / "us_ui_policy_2020_2021.csv"
FITTED_FILE = Path(__file__).resolve().parent / "economy_nyc_fitted.json"

BOROUGHS = ("BX", "BK", "MN", "QN", "SI")
FITTED_BOROUGHS = ("BX", "BK", "MN", "QN")
GEO = {"BX": "0500000US36005", "BK": "0500000US36047", "MN": "0500000US36061", "QN": "0500000US36081",
       "SI": "0500000US36085"}
LAUS_AREA = {"Bronx County": "BX", "Kings County": "BK", "New York County": "MN", "Queens County": "QN"}
FIT_START, FIT_END = "2019-01", "2020-12"
TEST_MONTHS = ("2021-01", "2021-02", "2021-03")
DATA_END = pd.Timestamp("2021-03-31")
SIM_START = "2018-10-06"   # 13 weeks of burn-in before the first fitted month
FITTED_NAMES = ("sep_rate", "find_rate", "shock_sep", "shock_find", "recall", "season")


# ----------------------------------------------------------------------------------------- data
def load_age_share(areas: Sequence[str], path: Path = DP05_FILE) -> Tensor:
    """Share of 16-24, 25-54 and 55+ among adults 16+ per borough ``[A, 3]`` (ACS DP05 five-year bands)."""
    df = pd.read_csv(path, skiprows=[1])
    cols = [f"DP05_{k:04d}E" for k in range(8, 18)]
    rows = []
    for a in areas:
        r = df[df["GEO_ID"] == GEO[a]]
        if len(r) != 1:
            raise DataError(f"{path.name}: column 'GEO_ID' has no single row for {a} ({GEO[a]})")
        v = pd.to_numeric(r[cols].iloc[0]).to_numpy(dtype=np.float64)
        rows.append([0.8 * v[0] + v[1], v[2] + v[3] + v[4], v[5:].sum()])
    x = torch.tensor(rows, dtype=torch.float64)
    return x / x.sum(1, keepdim=True)


def load_laus(path: Path = LAUS_FILE) -> pd.DataFrame:
    """Monthly LAUS unemployment rate (%), tidy: ``month`` (Period), ``area`` (code), ``rate``; nothing after 2021-03."""
    df = pd.read_csv(path)
    need = ["Area", "Year", "Month", "Unemployment Rate (%)"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {missing}")
    unknown = sorted(set(df["Area"]) - set(LAUS_AREA))
    if unknown:
        raise DataError(f"{path.name}: column 'Area' has unknown value(s) {unknown}")
    month = pd.to_datetime(df["Year"].astype(str) + "-" + df["Month"], format="%Y-%b").dt.to_period("M")
    out = pd.DataFrame({"month": month, "area": df["Area"].map(LAUS_AREA), "rate": df["Unemployment Rate (%)"].astype(float)})
    return out[out["month"].dt.to_timestamp() <= DATA_END].reset_index(drop=True)


def week_months(dates: pd.DatetimeIndex) -> pd.PeriodIndex:
    """Calendar month of each week (of its middle day)."""
    return (dates + pd.Timedelta(days=3)).to_period("M")


def monthly(weekly: Tensor, dates: pd.DatetimeIndex, months: Sequence[pd.Period]) -> Tensor:
    """Mean of weekly values ``[T, ...]`` over the weeks of each month: ``[len(months), ...]`` (differentiable)."""
    wm = week_months(dates)
    idx = torch.full((len(dates),), -1, dtype=torch.long)
    lookup = {m: i for i, m in enumerate(months)}
    for t, m in enumerate(wm):
        idx[t] = lookup.get(m, -1)
    keep = idx >= 0
    x = weekly[keep]
    out = x.new_zeros((len(months), *x.shape[1:])).index_add(0, idx[keep], x)
    n = torch.bincount(idx[keep], minlength=len(months)).to(x.dtype).clamp_min(1)
    return out / n.view(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------------------- model
def apply_fitted(params: Params, fitted: dict, areas: Sequence[str], lf_weight: dict[str, float]) -> None:
    """Set fitted values; boroughs without a fit (Staten Island) get the LF-weighted mean of the fitted ones."""
    src = fitted["areas"]
    vals = {}
    for name in FITTED_NAMES:
        v = torch.tensor(fitted["params"][name], dtype=torch.float32)
        if name in ("sep_rate", "find_rate", "shock_sep"):
            w = torch.tensor([lf_weight[a] for a in src], dtype=torch.float32)
            mean = (v * w).sum() / w.sum()
            v = torch.stack([v[src.index(a)] if a in src else mean for a in areas])
        vals[name] = v
    params.set(**vals)


def build(*, boroughs: Sequence[str] = BOROUGHS, agents: int = 20_000, replicates: int = 1, seed: int = 0,
          start: str = SIM_START, end: str = "2021-03-31", ubi_month: float = 0.0, ubi_start: str | None = None,
          tax: str | None = None, llm: str = "rule", fitted: dict | None = None, device: str = "cpu",
          observables: Sequence[str] | None = None) -> tuple[Model, Params, EconSystem, EconState, pd.DatetimeIndex]:
    """Model, parameters, system, initial state and week dates of NYC's economy (baseline policy unless ubi/tax given)."""
    areas = tuple(b for b in BOROUGHS if b in boroughs)
    if len(areas) != len(tuple(boroughs)):
        raise ConfigError(f"boroughs: expected distinct codes from {BOROUGHS}, got {list(boroughs)}")
    dp = load_dp03(DP03_FILE, {a: GEO[a] for a in areas})
    weeks = int((pd.Timestamp(end) - pd.Timestamp(start)).days // 7) + 1
    dates = weekly_dates(start, weeks)
    system, state = synthesize(dp, agents, age_share=load_age_share(areas), replicates=replicates, seed=seed)
    sup, max_weeks = ui_schedule(UI_FILE, dates)
    th, law = parse_schedule(CURRENT_LAW)
    system = system.replace(closure=closure_schedule(CLOSURE_FILE, INDUSTRIES, dates), ui_supplement=sup,
                          ui_max_weeks=max_weeks, ubi=torch.zeros(weeks), tax_thresholds=th,
                          month=torch.tensor((dates + pd.Timedelta(days=3)).month.to_numpy() - 1, dtype=torch.int64))
    base = default_params(len(areas), law)
    system, state = prepare(system, state, base, seed=seed)   # behaviour is anchored to current law without UBI
    th_s, rates = parse_schedule(tax) if tax else (th, law)
    if tax:
        system = system.replace(tax_thresholds=th_s)
    if ubi_month:
        on = torch.tensor(dates >= pd.Timestamp(ubi_start or start))
        system = system.replace(ubi=on.float() * float(ubi_month) * 12.0 / 52.0)
    params = default_params(len(areas), rates)
    if fitted is not None:
        src = load_dp03(DP03_FILE, {b: GEO[b] for b in fitted["areas"]})
        apply_fitted(params, fitted, areas, {b: float(v) for b, v in zip(src.areas, src.civ_lf)})
    return _assemble(system, state, params, dates, llm, device, observables)


LLM_KINDS = ("rule", "local", "http", "none")


def _assemble(system: EconSystem, state: EconState, params: Params, dates: pd.DatetimeIndex, llm: str, device: str,
              observables: Sequence[str] | None) -> tuple[Model, Params, EconSystem, EconState, pd.DatetimeIndex]:
    decision = None
    if llm not in LLM_KINDS:
        raise ConfigError(f"--llm: expected one of {LLM_KINDS}, got {llm!r}")
    if llm != "none":
        from llm_archetypes import AnswerCache, Asker, default_cache_dir, make_backend
        from substeps.economy.decision import spending_rule

        if llm == "rule":
            asker = Asker(make_backend("rule", rule=spending_rule, version="1"), cache=None, mode="off")
        else:
            cache_dir = default_cache_dir()
            cache_dir.mkdir(parents=True, exist_ok=True)
            asker = Asker(make_backend(llm, device=device), cache=AnswerCache(str(cache_dir / "economy_nyc.sqlite")),
                          mode="record", max_attempts=3, fallback={"spend_share": 0.8})
        decision = spending_decision(system, asker)
        state = state.replace(mpc_score=decision.initial_scores(0.8))
    model = economy_model(system, decision=decision, name="economy-nyc", observables=observables)
    return model, params.to(device), system.to(device), state.to(device), dates


# ----------------------------------------------------------------------------------------- calibration
def _observed(laus: pd.DataFrame, months: Sequence[pd.Period], areas: Sequence[str]) -> Tensor:
    """Observed rates (%) ``[M, A]`` for ``months`` x ``areas`` (error if any is missing)."""
    wide = laus.pivot(index="month", columns="area", values="rate")
    missing = [str(m) for m in months if m not in wide.index]
    if missing:
        raise DataError(f"{LAUS_FILE.name}: no unemployment rate for month(s) {missing}")
    return torch.tensor(wide.loc[list(months), list(areas)].to_numpy(dtype=np.float64), dtype=torch.float32)


def fit(model: Model, params: Params, system: EconSystem, state: EconState, dates: pd.DatetimeIndex, observed: Tensor,
        months: Sequence[pd.Period], *, iters: int = 60, lr: float = 0.05, seed: int = 0,
        log: bool = True) -> list[float]:
    """Adam on the fitted labour-market parameters: MSE (points^2) of monthly borough unemployment; returns losses."""
    opt = torch.optim.Adam([p for n, p in params.named_parameters()], lr=lr)
    losses = []
    T = len(dates)
    for it in range(iters):
        res = model.simulate(params, system, state, T, seed=seed, grad=True, progress=False)
        sim = monthly(res["unemployment_area"][:, 0, :] * 100.0, dates, months)
        loss = ((sim - observed) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (it % 5 == 0 or it == iters - 1):
            print(f"  iter {it:3d}  loss {losses[-1]:8.3f}  RMSE {losses[-1] ** 0.5:6.2f} pts", flush=True)
    return losses


def calibrate(argv: Sequence[str]) -> int:
    """CLI: fit 2019-01..2020-12 by gradient, forecast 2021-01..03, score against data and persistence."""
    ap = argparse.ArgumentParser(prog="lpm calibrate economy-nyc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=12_000, help="adults in the four fitted boroughs (per replicate)")
    ap.add_argument("--iters", type=int, default=80)
    ap.add_argument("--start", default=SIM_START, help="first simulated week (burn-in before 2019-01)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--replicates", type=int, default=4, help="replicates of the scored forecast (seeds in one pass)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llm", default="rule", choices=LLM_KINDS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/economy_nyc_calibration")
    ap.add_argument("--save-params", default=None, help=f"also write the fitted values here (e.g. {FITTED_FILE.name})")
    a = ap.parse_args(list(argv))
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    laus = load_laus()
    areas = FITTED_BOROUGHS
    model, params, system, state, dates = build(boroughs=areas, agents=a.agents, seed=a.seed, llm=a.llm, start=a.start,
                                        observables=["unemployment_area"])
    fit_months = list(pd.period_range(FIT_START, FIT_END, freq="M"))
    test_months = [pd.Period(m, "M") for m in TEST_MONTHS]
    obs_fit = _observed(laus, fit_months, areas)
    obs_test = _observed(laus, test_months, areas)
    print(model.plan())
    print(f"fitting {len(fit_months)} months x {len(areas)} boroughs with {state.wage.shape[0]:,} agents, {len(dates)} weeks")
    t0 = time.perf_counter()
    losses = fit(model, params, system, state, dates, obs_fit, fit_months, iters=a.iters, lr=a.lr, seed=a.seed)
    fit_secs = time.perf_counter() - t0
    # score with R fresh replicates (new seeds for both population and events) in one batched pass
    rmodel, _, rsystem, rstate, _ = build(boroughs=areas, agents=a.agents, replicates=a.replicates, seed=a.seed + 1000,
                                 llm=a.llm, start=a.start, observables=["unemployment_area"])
    with torch.no_grad():
        res = rmodel.simulate(params, rsystem, rstate, len(dates), seed=a.seed + 1000, progress=False)
    all_months = fit_months + test_months
    sim = monthly(res["unemployment_area"] * 100.0, dates, all_months)  # [M, R, A]
    sim_fit, sim_test = sim[: len(fit_months)], sim[len(fit_months):]
    mae_fit_r = (sim_fit - obs_fit.unsqueeze(1)).abs().mean((0, 2))           # [R]
    mae_fit_area = (sim_fit.mean(1) - obs_fit).abs().mean(0)                  # [A]
    mae_test_r = (sim_test - obs_test.unsqueeze(1)).abs().mean((0, 2))
    persistence = obs_fit[-1].unsqueeze(0).expand_as(obs_test)
    mae_persist = float((persistence - obs_test).abs().mean())
    mae_2019 = float((sim_fit[:12].mean(1) - obs_fit[:12]).abs().mean())
    mae_2020 = float((sim_fit[12:].mean(1) - obs_fit[12:]).abs().mean())
    fitted = {"areas": list(areas), "params": {n: params.values()[n].tolist() for n in FITTED_NAMES},
              "fit_window": [FIT_START, FIT_END], "agents": a.agents, "iters": a.iters, "seed": a.seed}
    summary = {
        "command": "lpm calibrate economy-nyc " + " ".join(argv),
        "in_sample_mae_points": {"mean": float(mae_fit_r.mean()), "sd_over_replicates": float(mae_fit_r.std()),
                                 "by_borough": dict(zip(areas, mae_fit_area.tolist())), "2019": mae_2019, "2020": mae_2020},
        "forecast_2021q1_mae_points": {"model_mean": float(mae_test_r.mean()), "model_sd": float(mae_test_r.std()),
                                       "persistence": mae_persist,
                                       "skill_vs_persistence": 1 - float(mae_test_r.mean()) / mae_persist},
        "forecast_scored_months": list(TEST_MONTHS),
        "staten_island": "no LAUS series bundled: not fitted; run uses the LF-weighted mean of the four fitted boroughs",
        "loss_first_last": [losses[0], losses[-1]], "fit_seconds": fit_secs, "fitted": fitted,
    }
    (out / "calibration.json").write_text(json.dumps(summary, indent=2))
    if a.save_params:
        Path(a.save_params).write_text(json.dumps(fitted, indent=2))
    rows = []
    for i, m in enumerate(all_months):
        for j, ar in enumerate(areas):
            o = (obs_fit if i < len(fit_months) else obs_test)[i if i < len(fit_months) else i - len(fit_months), j]
            s = sim[i, :, j]
            rows.append({"month": str(m), "area": ar, "observed": float(o), "model_mean": float(s.mean()),
                         "model_min": float(s.min()), "model_max": float(s.max()),
                         "window": "fit" if i < len(fit_months) else "forecast"})
    table = pd.DataFrame(rows)
    table.to_csv(out / "fit.csv", index=False)
    _plot_fit(table, out / "fit.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "fitted"}, indent=2))
    return 0


def _plot_fit(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    areas = list(dict.fromkeys(table["area"]))
    fig, axes = plt.subplots(1, len(areas), figsize=(4 * len(areas), 3.4), sharey=True)
    for ax, ar in zip(np.atleast_1d(axes), areas):
        t = table[table["area"] == ar]
        x = pd.PeriodIndex(t["month"], freq="M").to_timestamp()
        ax.plot(x, t["observed"], "k.-", label="LAUS")
        ax.plot(x, t["model_mean"], "C0-", label="model")
        ax.fill_between(x, t["model_min"], t["model_max"], color="C0", alpha=0.25)
        ax.axvline(pd.Timestamp("2021-01-01"), color="grey", ls=":")
        ax.set_title(ar)
        ax.tick_params(axis="x", rotation=45)
    np.atleast_1d(axes)[0].set_ylabel("unemployment rate, %")
    np.atleast_1d(axes)[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- scenarios
SCENARIO_OBS = ("unemployment", "consumption", "income", "gini", "poverty", "gov_balance", "cpi")


def _load_fitted(path: str | None) -> dict | None:
    p = Path(path) if path else FITTED_FILE
    if path == "none":
        return None
    if not p.exists():
        if path:
            raise ConfigError(f"--params: file {p} not found")
        return None
    return json.loads(p.read_text())


def run_arms(a: argparse.Namespace, fitted: dict | None) -> tuple[dict[str, dict[str, Tensor]], pd.DatetimeIndex, float, EconSystem]:
    """Baseline and scenario arms on the same agents and streams: ``{arm: {observable: [T, R, ...]}}``, dates, seconds."""
    arms = {"baseline": {"ubi_month": 0.0, "tax": None}, "scenario": {"ubi_month": a.ubi, "tax": a.tax}}
    out: dict[str, dict[str, Tensor]] = {}
    secs = 0.0
    state0 = None
    for arm, policy in arms.items():
        model, params, system, state, dates = build(boroughs=a.boroughs.split(","), agents=a.agents, replicates=a.replicates,
                                            seed=a.seed, start=a.start, end=a.end, ubi_start=a.ubi_start,
                                            llm=a.llm, fitted=fitted, device=a.device, **policy)
        if state0 is None:
            print(model.plan())
            print(f"{system.wage.shape[0]:,} agents ({a.replicates} replicates), {len(dates)} weeks, "
                  f"{(state.nbytes() + system.nbytes()) / system.wage.shape[0]:.0f} bytes/agent")
            state0 = system
        t0 = time.perf_counter()
        res = model.simulate(params, system, state, len(dates), seed=a.seed, progress=False)
        secs += time.perf_counter() - t0
        out[arm] = {k: v.detach().cpu() for k, v in res.observables.items()}
    return out, dates, secs, state0


def run(argv: Sequence[str]) -> int:
    """CLI: baseline vs scenario (UBI, tax schedule), tidy table, paired effects over replicates, plots, planner."""
    ap = argparse.ArgumentParser(prog="lpm run economy-nyc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ubi", type=float, default=0.0, help="universal basic income, $ per adult per month")
    ap.add_argument("--ubi-start", default="2020-04-01", help="first day UBI is paid")
    ap.add_argument("--tax", default=None, help=f"income tax schedule THRESHOLD:RATE,... ($/year; default current law {CURRENT_LAW})")
    ap.add_argument("--agents", type=int, default=20_000, help="adults per replicate (five boroughs)")
    ap.add_argument("--replicates", type=int, default=4, help="independent populations and streams, run in one pass")
    ap.add_argument("--boroughs", default=",".join(BOROUGHS))
    ap.add_argument("--start", default="2019-10-05")
    ap.add_argument("--end", default="2021-03-31")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--params", default=None, help=f"fitted values (default {FITTED_FILE.name} if present; 'none' for defaults)")
    ap.add_argument("--llm", default="rule", choices=LLM_KINDS, help="backend of the per-archetype spending decision")
    ap.add_argument("--planner", default="none", choices=("none", *WELFARE, "both"),
                    help="also optimise the tax schedule by gradient for this welfare function, against Saez")
    ap.add_argument("--planner-steps", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/economy_nyc")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(list(argv))
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    fitted = _load_fitted(a.params)
    arms, dates, secs, state0 = run_arms(a, fitted)
    T = len(dates)
    agent_weeks = state0.wage.shape[0] * T * len(arms)
    frames = []
    for arm, obs in arms.items():
        for name in SCENARIO_OBS:
            v = obs[name].double().numpy()           # [T, R]
            R = v.shape[1]
            frames.append(pd.DataFrame({"week": np.repeat(dates.date, R), "arm": arm, "replicate": np.tile(np.arange(R), T),
                                        "observable": name, "value": v.reshape(-1)}))
    tidy = pd.concat(frames, ignore_index=True)
    tidy.to_csv(out / "weekly.csv", index=False)
    window = torch.tensor(dates >= pd.Timestamp(a.ubi_start if a.ubi else a.start))
    effects = {}
    for name in SCENARIO_OBS:
        b, s = arms["baseline"][name].double(), arms["scenario"][name].double()
        if name == "gov_balance":
            d = (s[-1] - b[-1])                       # cumulative, per adult, at the end
        else:
            d = (s[window] - b[window]).mean(0)       # mean weekly difference over the policy window, per replicate
        n = d.shape[0]
        half = 1.96 * float(d.std()) / max(n, 1) ** 0.5 if n > 1 else float("nan")
        effects[name] = {"baseline": float(b[window].mean()) if name != "gov_balance" else float(b[-1].mean()),
                         "effect_mean": float(d.mean()), "effect_sd_over_replicates": float(d.std()) if n > 1 else float("nan"),
                         "ci95": [float(d.mean()) - half, float(d.mean()) + half], "per_replicate": d.tolist()}
    summary = {
        "command": "lpm run economy-nyc " + " ".join(argv),
        "ubi_per_month": a.ubi, "tax": a.tax or CURRENT_LAW, "replicates": a.replicates,
        "agents_per_replicate": int(state0.wage.shape[0] // a.replicates), "weeks": T,
        "policy_window_start": a.ubi_start if a.ubi else a.start,
        "fitted_params": "default (uncalibrated)" if fitted is None else (a.params or FITTED_FILE.name),
        "effects": effects, "units": {"unemployment": "share of labour force", "consumption": "$/week per adult",
                                      "income": "$/week per adult", "gini": "weekly disposable income",
                                      "poverty": "share of adults", "gov_balance": "$ per adult, cumulative at the end",
                                      "cpi": "index"},
        "seconds_simulating": secs, "agent_weeks_per_second": agent_weeks / max(secs, 1e-9),
        "system_bytes_per_agent": state0.nbytes() / state0.wage.shape[0],
    }
    if a.planner != "none":
        summary["planner"] = plan_taxes(state0, a, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not a.no_plots:
        _plot_arms(arms, dates, out / "scenario.png", f"UBI ${a.ubi:g}/month" + (f", tax {a.tax}" if a.tax else ""))
    print(json.dumps({k: v for k, v in summary.items() if k != "effects"}, indent=2, default=str))
    for name, e in effects.items():
        print(f"  {name:<13} baseline {e['baseline']:12.4f}  effect {e['effect_mean']:+12.4f} "
              f"(sd {e['effect_sd_over_replicates']:.4f}, 95% CI {e['ci95'][0]:+.4f} .. {e['ci95'][1]:+.4f})")
    return 0


def _plot_arms(arms: dict[str, dict[str, Tensor]], dates: pd.DatetimeIndex, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    names = ("unemployment", "consumption", "gini", "poverty", "gov_balance", "cpi")
    for ax, name in zip(axes.ravel(), names):
        for arm, color in (("baseline", "k"), ("scenario", "C1")):
            v = arms[arm][name].double().numpy()
            ax.plot(dates, v.mean(1), color=color, label=arm)
            ax.fill_between(dates, v.min(1), v.max(1), color=color, alpha=0.2)
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=45)
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- planner
def plan_taxes(state: EconSystem, a: argparse.Namespace, out: Path) -> dict:
    """Gradient planner vs Saez (2002) on replicate 0's steady state; revenue-neutral w.r.t. current law."""
    params = default_params(state.A, parse_schedule(CURRENT_LAW)[1])
    keep = state.rep == 0
    th_law, law = parse_schedule(CURRENT_LAW)
    econ0 = StaticEconomy(state.wage[keep].cpu(), state.disutility[keep].cpu(), state.in_lf[keep].cpu(),
                          state.income_band[keep].cpu(), float(params.ls_scale), float(params.home_floor), 0.0)
    T_law = piecewise_tax(econ0.wage.double() * 52.0, th_law, law) / 52.0
    r_req = float(econ0.allocation(T_law, iters=1).P.mul(T_law).mean())  # b = 0 at current law
    econ = StaticEconomy(econ0.wage, econ0.disutility, econ0.in_lf, econ0.band, econ0.ls_scale, econ0.home, r_req)
    # planner brackets at the ACS income-band edges
    th = torch.tensor((0.0, *INCOME_EDGES), dtype=torch.float64)
    start = torch.tensor([float(law[(th_law <= x).nonzero().max()]) for x in th], dtype=torch.float64)
    nb = len(INCOME_BANDS)
    law_alloc = econ.allocation(T_law)
    kinds = WELFARE if a.planner == "both" else (a.planner,)
    result = {"revenue_requirement_per_adult_week": r_req, "brackets_per_year": th.tolist(),
              "current_law": {"schedule": CURRENT_LAW, "transfer_b_week": float(law_alloc.b),
                              "band_participation_tax": econ.band_rates(law_alloc, nb).tolist()}}
    rows = []
    for kind in kinds:
        rates, path = optimise_schedule(econ, th, start, kind, steps=a.planner_steps)
        T_opt = piecewise_tax(econ.wage.double() * 52.0, th, rates) / 52.0
        opt = econ.allocation(T_opt)
        _, saez = saez_rates(econ, nb, kind)
        r_opt, tau = econ.band_rates(opt, nb), econ.band_rates(saez, nb)
        result[kind] = {
            "planner_schedule": format_schedule(th, rates), "planner_transfer_b_week": float(opt.b),
            "planner_welfare_ce_week": econ.certainty_equivalent(opt, kind),
            "saez_transfer_b_week": float(saez.b), "saez_welfare_ce_week": econ.certainty_equivalent(saez, kind),
            "current_law_welfare_ce_week": econ.certainty_equivalent(law_alloc, kind),
            "band_participation_tax_planner": r_opt.tolist(), "band_participation_tax_saez": tau.tolist(),
            "mean_abs_gap_planner_vs_saez": float((r_opt - tau).abs().mean()),
            "welfare_path_first_last": [path[0], path[-1]],
            "participation_planner": float(opt.P.sum() / econ.in_lf.sum()),
            "participation_saez": float(saez.P.sum() / econ.in_lf.sum()),
        }
        for k in range(nb):
            rows.append({"welfare": kind, "band": INCOME_BANDS[k], "current_law": float(result["current_law"]["band_participation_tax"][k]),
                         "planner": float(r_opt[k]), "saez": float(tau[k])})
    pd.DataFrame(rows).to_csv(out / "planner_bands.csv", index=False)
    if not a.no_plots and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        df = pd.DataFrame(rows)
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.8), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            d = df[df["welfare"] == kind]
            x = np.arange(nb)
            ax.plot(x, d["current_law"], "k.-", label="current law")
            ax.plot(x, d["planner"], "C0o-", label="gradient planner (piecewise-linear)")
            ax.plot(x, d["saez"], "C3s--", label="Saez (2002) formula")
            ax.set_xticks(x, INCOME_BANDS, rotation=60, fontsize="small")
            ax.set_ylabel("participation tax rate T(w)/w")
            ax.set_title(kind)
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "planner.png", dpi=110)
        plt.close(fig)
    return result


EXPERIMENT = Experiment("economy-nyc", "NYC labour market, spending, taxes and UBI through the 2020 shutdown (weekly)",
                        run, calibrate)
