"""NYC study command line: ``lpm run covid-nyc`` (fitted replay or the prior model), ``lpm calibrate covid-nyc``, plots.

``run`` dispatches ``--params fitted`` (default) to :mod:`experiments.covid_nyc.fit` and
``--params prior`` to :func:`run_prior`; ``--ranks N`` to :mod:`experiments.covid_nyc.distributed`.
The outputs are listed in the package docstring (:mod:`experiments.covid_nyc`).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from lpm.cli import Experiment, add_output_args, date_arg, device_arg, positive_float, positive_int, probability
from lpm.outputs import OutputDir
from llm_archetypes import Asker
from experiments.covid_nyc.behaviour import LLM_KINDS, survey_table
from experiments.covid_nyc.data import AGE_LABELS, NAMES, NYC_AGE_BANDS, load_observed, load_observed_age
from experiments.covid_nyc.model import DEFAULT_SCALE, NYCConfig, NYCSetup, build, validate_setup

__all__ = ["OUTPUT_FILES", "CHECKPOINT_FILE", "run", "run_prior", "calibrate", "run_ranks", "EXPERIMENT"]


def _tidy(res: Any, setup: NYCSetup) -> pd.DataFrame:
    rows = []
    for series in ("infections", "symptomatic_onsets", "cases", "hospitalizations", "deaths"):
        v = res[series].detach().cpu().double().numpy() / setup.scale
        df = pd.DataFrame(v, index=setup.dates, columns=list(setup.areas))
        df["NYC"] = v.sum(1)
        long = df.rename_axis("date").reset_index().melt("date", var_name="area", value_name="value")
        long.insert(2, "series", series)
        rows.append(long)
    return pd.concat(rows, ignore_index=True)[["date", "area", "series", "value"]]


def _plots(out: Path, setup: NYCSetup, daily: pd.DataFrame, res: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obs = load_observed(setup.dates[0], setup.dates[-1], None if len(setup.areas) == 5 else setup.areas)
    panels = list(setup.areas) + (["NYC"] if len(setup.areas) == 5 else [])
    for series, fname in (("cases", "cases_by_borough.png"), ("hospitalizations", "hospitalizations_by_borough.png"),
                          ("deaths", "deaths_by_borough.png")):
        fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True)
        for ax, area in zip(axes.flat, panels):
            s = daily[(daily.area == area) & (daily.series == series)].set_index("date")["value"]
            o = obs[(obs.area == area) & (obs.series == series)].set_index("date")["value"]
            ax.plot(o.index, o.rolling(7, min_periods=1).mean(), color="k", label="observed (NYC DOHMH, 7-day mean)")
            ax.plot(s.index, s.rolling(7, min_periods=1).mean(), color="tab:red", label=f"simulated (scale {setup.scale:g}, rescaled)")
            ax.set_title(f"{NAMES.get(area, 'New York City')}: daily {series}")
            ax.tick_params(axis="x", rotation=30)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    # age profile: cumulative reported cases per 100,000 by NYC age band
    rates = load_observed_age(setup.dates[0], setup.dates[-1])
    obs_age = rates.groupby("age")["value"].sum()
    cases_age = res["cases_by_age"].detach().cpu().double().sum(0)
    inf_age = res["infections_by_age"].detach().cpu().double().sum(0)
    n_age = torch.bincount(setup.population.age.long(), minlength=len(AGE_LABELS)).double()
    labels = list(NYC_AGE_BANDS)
    sim = [float(cases_age[list(b)].sum() / n_age[list(b)].sum().clamp_min(1) * 1e5) for b in NYC_AGE_BANDS.values()]
    sim_inf = [float(inf_age[list(b)].sum() / n_age[list(b)].sum().clamp_min(1) * 1e5) for b in NYC_AGE_BANDS.values()]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [float(obs_age.get(k, np.nan)) for k in labels], 0.4, color="k", label="observed reported cases")
    ax.bar(x + 0.2, sim, 0.4, color="tab:red", label="simulated reported cases")
    ax.plot(x, sim_inf, "o--", color="tab:blue", label="simulated infections")
    ax.set_xticks(x, labels)
    ax.set_ylabel("cumulative per 100,000")
    ax.set_yscale("log")
    ax.set_title(f"Age profile {setup.dates[0].date()} .. {setup.dates[-1].date()}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "age_profile.png", dpi=110)
    plt.close(fig)


#: every file ``lpm run covid-nyc`` may write into --out (checked before the run, replaced by --overwrite)
OUTPUT_FILES = ("results.h5", "daily.csv", "validation.json", "cases_by_borough.png", "hospitalizations_by_borough.png",
                "deaths_by_borough.png", "age_profile.png", "summary.json", "survey.csv")
CHECKPOINT_FILE = "checkpoint.h5"


def run(argv: Sequence[str]) -> int:
    """CLI: ``--params fitted`` (default) replays the shipped calibration; ``--params prior`` runs the model below."""
    argv = list(argv)
    if "--params" not in argv or argv[argv.index("--params") + 1:argv.index("--params") + 2] != ["prior"]:
        from experiments.covid_nyc.fit import run_fitted  # imported on use: it imports this module

        return run_fitted(argv)
    return run_prior(argv)


def run_prior(argv: Sequence[str]) -> int:
    """CLI (``--params prior``): build (or load) the population, simulate, write results.h5, daily.csv, plots and JSON records."""
    ap = argparse.ArgumentParser(prog="lpm run covid-nyc --params prior",
                                 description="COVID-19 in New York City, 2020-03-01..2021-03-31 (uncalibrated prior)")
    ap.add_argument("--params", default="prior", choices=("prior",), help="the uncalibrated model (this parser)")
    ap.add_argument("--scale", type=positive_float, default=DEFAULT_SCALE,
                    help="agents per resident (1.0 = 8.3 million agents)")
    ap.add_argument("--days", type=positive_int, default=None, help="days to simulate (default: to 2021-03-31)")
    ap.add_argument("--start", type=date_arg, default="2020-03-01")
    ap.add_argument("--extrapolate", action="store_true",
                    help="allow dates outside the covariate data 2020-03-01..2021-03-31 (covariates are extended; "
                         "a warning says how)")
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boroughs", default=None, help="comma-separated subset of BX,BK,MN,QN,SI")
    ap.add_argument("--cache-dir", default=None, help="population cache (default ~/.cache/lpm or $LPM_CACHE_DIR)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: per-step tensors are small, and extra threads thrash a shared "
                         "machine; 0 keeps torch's default)")
    add_output_args(ap, "out/covid_nyc")
    ap.add_argument("--checkpoint-every", type=int, default=50,
                    help=f"days between checkpoints ({CHECKPOINT_FILE} in --out; 0: none), for --resume")
    ap.add_argument("--llm", default="rule", choices=LLM_KINDS,
                    help="who answers the weekly isolation question per archetype: rule (fast, deterministic), local "
                         "(offline Gemma 3 270M, needs the local-llm extra), http (OpenAI-compatible server), off "
                         "(every symptomatic agent isolates)")
    ap.add_argument("--llm-cache", default=None,
                    help="answer cache (SQLite; default <population cache dir>/covid_nyc/llm_answers.sqlite)")
    ap.add_argument("--llm-mode", default="record", choices=("record", "replay"),
                    help="record: answer from the cache, ask the backend on a miss; replay: cache only, never call it")
    ap.add_argument("--llm-url", default=None, help="--llm http: server base URL (or $LPM_LLM_URL; key: $LPM_LLM_API_KEY)")
    ap.add_argument("--llm-model", default=None, help="--llm http: model name (or $LPM_LLM_MODEL)")
    ap.add_argument("--llm-fallback", type=probability, default=None, metavar="P_YES",
                    help="answer used for an archetype whose question failed after all attempts (P(yes) to "
                         "isolating); default: none, a failure stops the run")
    ap.add_argument("--llm-max-fallback-share", type=probability, default=0.05,
                    help="with --llm-fallback: stop the run when more than this share of answers are fallbacks "
                         "(default 0.05)")
    a = ap.parse_args(list(argv))
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    # the options are checked (NYCConfig) before --out is touched
    config = NYCConfig(scale=a.scale, seed=a.seed, device=a.device, start=a.start, days=a.days,
                       boroughs=tuple(a.boroughs.split(",")) if a.boroughs else None, extrapolate=a.extrapolate,
                       cache_dir=a.cache_dir, use_cache=not a.no_cache, llm=a.llm, llm_cache=a.llm_cache,
                       llm_mode=a.llm_mode, llm_url=a.llm_url, llm_model=a.llm_model, llm_fallback=a.llm_fallback,
                       llm_max_fallback_share=a.llm_max_fallback_share)
    # every output is checked before any work, and staged: a failed run leaves no partial files
    with OutputDir(a.out, OUTPUT_FILES, overwrite=a.overwrite, resume=a.resume, keep=(CHECKPOINT_FILE,)) as od:
        t0 = time.perf_counter()
        setup = build(config)
        # the observed series are validated before the simulation, not after it
        obs = load_observed(setup.dates[0], setup.dates[-1])
        t_build = time.perf_counter() - t0
        print(setup.model.plan())
        print(f"{setup.info['agents']:,} agents, {setup.info['edges']:,} directed edges; built in {t_build:.1f}s "
              f"({'cache' if setup.info['cached'] else 'synthesized'})")
        hooks = []
        if a.checkpoint_every > 0 or a.resume:
            from lpm.recording import Checkpoint

            hooks.append(Checkpoint(od.final(CHECKPOINT_FILE), every=max(1, a.checkpoint_every), resume=a.resume))
        t1 = time.perf_counter()
        try:
            res = setup.simulate(seed=a.seed, progress=True, hooks=hooks)
        except BaseException:
            if setup.asker is not None:
                _print_fallbacks(setup.asker)
            raise
        t_sim = time.perf_counter() - t1
        out = od.staging
        res.to_hdf5(str(out / "results.h5"), mode="w")
        daily = _tidy(res, setup)
        daily.to_csv(out / "daily.csv", index=False)
        validation = validate_setup(setup)
        (out / "validation.json").write_text(json.dumps(validation, indent=2))
        _plots(out, setup, daily, res)
        totals = {s: {"simulated": float(daily[(daily.area == "NYC") & (daily.series == s)]["value"].sum()),
                      "observed": float(obs[(obs.area == "NYC") & (obs.series == s)]["value"].sum())}
                  for s in ("cases", "hospitalizations", "deaths")} if len(setup.areas) == 5 else {}
        summary = {"scale": a.scale, "agents": setup.info["agents"], "edges": setup.info["edges"], "days": setup.steps,
                   "build_seconds": t_build, "population_cached": setup.info["cached"], "simulate_seconds": t_sim,
                   "resumed_from_day": res.meta.get("resumed_from", 0),
                   "seconds_per_day": t_sim / setup.steps,
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   "params": {**setup.params.to_dict(),
                              **({"isolation_link": {"slope": setup.decision.link.slope.tolist(),
                                                     "bias": setup.decision.link.bias.tolist()}} if setup.decision else {})},
                   "totals_city": totals,
                   "mean_degree": {k: v for k, v in setup.info.items() if k.startswith("mean_degree")}}
        if setup.decision is not None:
            survey_table(setup, res["isolation_answers"], res["weekly_cases_per_100k"]).to_csv(out / "survey.csv",
                                                                                               index=False)
            st = setup.asker.stats
            weeks = max(st.decisions, 1)
            summary["llm"] = {"backend": setup.asker.backend.name, "model": setup.asker.backend.model,
                              "cache": setup.info["llm_cache"], "mode": a.llm_mode,
                              "archetypes": setup.decision.archetypes.K, "weeks": st.decisions,
                              "calls_per_week": st.calls / weeks, "cache_hits_per_week": st.cache_hits / weeks,
                              "seconds_per_call": st.seconds / max(st.calls, 1), "fallback_value": a.llm_fallback,
                              "max_fallback_share": a.llm_max_fallback_share if a.llm_fallback is not None else None,
                              **st.as_dict()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        od.commit()
    print(json.dumps({k: v for k, v in summary.items() if k != "params"}, indent=2, default=str))
    if setup.asker is not None:
        _print_fallbacks(setup.asker)
    return 0


def _print_fallbacks(asker: Asker) -> None:
    st = asker.stats
    print(f"llm: {st.fallbacks} of {st.answers} answers were fallbacks ({st.fallback_share:.1%}); "
          f"{st.failures} failed attempts" + (f"; last error: {st.last_error}" if st.last_error else ""), flush=True)


def calibrate(argv: Sequence[str]) -> int:
    """CLI: ``lpm calibrate covid-nyc`` (the sequential whole-history calibration in experiments.covid_nyc.fit)."""
    # imported on use: the calibration study itself imports this module
    from experiments.covid_nyc.fit import calibrate as run_calibration

    return run_calibration(argv)


def run_ranks(argv: Sequence[str], ranks: int) -> int:
    """CLI: ``lpm run covid-nyc --ranks N`` (the prior model partitioned over N processes; experiments.covid_nyc.distributed)."""
    from experiments.covid_nyc.distributed import run_ranks as run_partitioned

    return run_partitioned(argv, ranks)


EXPERIMENT = Experiment("covid-nyc", "COVID-19 in New York City 2020-03..2021-03 on a synthetic census population", run,
                        calibrate=calibrate, run_ranks=run_ranks)
