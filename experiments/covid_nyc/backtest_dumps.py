"""Rebuild the NYC rolling-origin backtest offline from the origins a calibration dumped (``--dump-dir``).

Run: ``python -m experiments.covid_nyc.backtest_dumps --dumps DIR --out DIR [--sim-cache DIR]``.

``lpm calibrate covid-nyc --backtest --dump-dir DIR`` saves, at every forecast origin, the
states, histories, parameters and observation scales the forecast starts from
(``origin_<t>.pt``). This re-runs :func:`~experiments.covid_nyc.fit.simulate_forecast` on each
(cached in ``--sim-cache``, so a change to the issue stage costs seconds, not a calibration)
and then issues the forecasts in time order exactly as the pass does, each origin's errors
and skill from the earlier origins only, and writes the backtest tables
(``backtest_scores.csv`` and the per-row ``backtest_forecasts.csv``) and a growth diagnostic
(``growth_skill.csv``: correlation of each growth definition with the realised growth).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from calibration.backtest import score_table, summarize_scores
from experiments.covid_nyc import fit

__all__ = ["load_problems", "simulate_all", "issue_all", "growth_table", "main"]


def load_problems(cfg: fit.FitConfig, horizon: int, cache_dir: str | None = None) -> tuple[fit.Problem, fit.Problem]:
    """The fitted-scale problem and its shadow city (``cfg.forecast_scale``), as the calibration built them."""
    p = fit.make_problem(cfg, horizon=horizon, cache_dir=cache_dir)
    ps = fit.make_problem(replace(cfg, scale=cfg.forecast_scale), horizon=horizon, cache_dir=cache_dir)
    return p, ps


def _sim_key(cfg: fit.FitConfig) -> str:
    """Hash of the options that change the simulation stage (cache key)."""
    keep = {k: v for k, v in asdict(cfg).items()
            if k in ("replicates", "anchor_days", "forecast_scale", "forecast_rw", "assimilate", "shadow_anchor_range",
                     "assimilate_grid", "assimilate_steps", "assimilate_shrink", "assimilate_city", "seed", "scale")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]


def simulate_all(p: fit.Problem, ps: fit.Problem, dumps: Path, cache: Path | None, log: Any = print
                 ) -> dict[int, dict[str, Any]]:
    """The simulation stage at every dumped origin (read from / written to ``cache``)."""
    out = {}
    files = sorted(dumps.glob("origin_*.pt"), key=lambda f: int(f.stem.split("_")[1]))
    key = _sim_key(p.cfg)
    for f in files:
        t = int(f.stem.split("_")[1])
        cf = None if cache is None else cache / f"sim_{t}_{key}.pt"
        if cf is not None and cf.exists():
            out[t] = torch.load(cf, weights_only=False)
            continue
        d = torch.load(f, weights_only=False)
        p.params.load_state_dict(d["params"])
        out[t] = fit.simulate_forecast(p, t, d["state"], p.params, d["full"], d["sc"], d["dow"], d["horizon"],
                                       sim=ps, back=d["back"])
        log(f"simulated origin {p.dates[t].date()}")
        if cf is not None:
            cf.parent.mkdir(parents=True, exist_ok=True)
            torch.save(out[t], cf)
    return out


def issue_all(p: fit.Problem, sims: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Issue every origin's forecast in time order, each from the earlier ones' errors and skill (as the pass does)."""
    cfg = p.cfg
    fcs: dict[int, dict[str, Any]] = {}
    for t in sorted(sims):
        errs = fit.model_log_errors(p, fcs, t, cfg.error_weeks)
        errs_raw = fit.model_log_errors(p, fcs, t, cfg.error_weeks, key="weekly_point_raw")
        skill = fit.growth_skill(p, fcs, t, cfg.error_weeks, cfg.skill_shrink)
        fcs[t] = fit.issue_forecast(p, sims[t], errors=errs, errors_raw=errs_raw, skill=skill)
    return fcs


def backtest_table(p: fit.Problem, fcs: dict[int, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scored rows at the backtest origins and the weekly-case summary (the calibration's backtest_scores.csv)."""
    origins = [t for t in fit.backtest_origins(p) if t in fcs]
    bt = score_table(pd.concat([fit.backtest_rows(p, fcs[o]) for o in origins], ignore_index=True))
    return bt, summarize_scores(bt[bt.series == "cases"])


def growth_table(p: fit.Problem, sims: dict[int, dict[str, Any]], fcs: dict[int, dict[str, Any]],
                 origins: Sequence[int]) -> pd.DataFrame:
    """Correlation with the realised weekly log growth of weekly cases (boroughs + NYC) per horizon and definition.

    ``raw``: model week h over the observed week 0 (the earlier definition); ``self``: model
    week h over the model's own week 0, per borough; ``city``: the same for the boroughs' sum,
    in every column (what the skill calibration scales with ``growth_pool`` 0); ``issued``:
    the issued point over the observed week 0; ``trend``: the log-linear baseline's growth.
    """
    from calibration.backtest import baseline_point

    obs_all = np.concatenate([p.obs["cases"], p.obs_city["cases"][:, None]], 1)
    T0 = obs_all.shape[0]
    rows = []
    for h in (1, 2, 3, 4):
        acc: dict[str, list[float]] = {"real": [], "raw": [], "self": [], "city": [], "trend": [], "issued": []}
        for o in origins:
            if o + 7 * h > T0 or o not in fcs:
                continue
            fc, sm = fcs[o], sims[o]
            y0 = obs_all[o - 7:o].sum(0)
            yh = obs_all[o + 7 * (h - 1):o + 7 * h].sum(0)
            wp = fc["weekly_point_raw"]["cases"][h - 1]
            acc["real"] += list(np.log1p(yh) - np.log1p(y0))
            acc["raw"] += list(np.log1p(wp) - np.log1p(y0))
            g_self = np.log1p(wp) - np.log1p(sm["model0"]["cases"])
            acc["self"] += list(g_self)
            acc["city"] += [float(g_self[-1])] * len(g_self)
            acc["issued"] += list(np.log1p(fc["weekly_point"]["cases"][h - 1]) - np.log1p(y0))
            hist_w, _ = fit._weekly(obs_all[:o], p.dates[:o])
            acc["trend"] += [float(np.log1p(baseline_point(hist_w[:, j], h, "trend")) - np.log1p(y0[j]))
                             for j in range(obs_all.shape[1])]
        r = np.asarray(acc["real"])
        for k in ("raw", "self", "city", "trend", "issued"):
            g = np.asarray(acc[k])
            rows.append({"horizon": h, "growth": k, "corr": float(np.corrcoef(g, r)[0, 1]) if len(r) > 2 else np.nan,
                         "slope": float((g * r).sum() / max((g * g).sum(), 1e-12)),
                         "rmse": float(np.sqrt(np.mean((g - r) ** 2))), "n": len(r)})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: rebuild the backtest from dumped origins."""
    ap = argparse.ArgumentParser(prog="python -m experiments.covid_nyc.backtest_dumps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dumps", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sim-cache", default=None, help="cache of the simulation stage (default: DUMPS/sim_cache)")
    ap.add_argument("--train-end", default="2021-03-31")
    ap.add_argument("--scale", type=float, default=fit.FitConfig.scale)
    ap.add_argument("--horizon", type=int, default=91, help="the calibration's problem horizon (max of --forecast-days, 28)")
    ap.add_argument("--set", action="append", default=[], help="FitConfig override NAME=JSON_VALUE (repeatable)")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(None if argv is None else list(argv))
    torch.set_num_threads(1)
    over = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        val = json.loads(v)
        over[k] = tuple(val) if isinstance(val, list) else val
    cfg = replace(fit.FitConfig(), train_end=a.train_end, scale=a.scale, **over)
    p, ps = load_problems(cfg, a.horizon, a.cache_dir)
    dumps = Path(a.dumps)
    cache = Path(a.sim_cache) if a.sim_cache else dumps / "sim_cache"
    sims = simulate_all(p, ps, dumps, cache)
    fcs = issue_all(p, sims)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bt, summ = backtest_table(p, fcs)
    bt.to_csv(out / "backtest_forecasts.csv", index=False, date_format="%Y-%m-%d")
    summ.to_csv(out / "backtest_scores.csv", index=False)
    gt = growth_table(p, sims, fcs, fit.backtest_origins(p))
    gt.to_csv(out / "growth_skill.csv", index=False)
    pd.set_option("display.width", 200)
    print(summ.to_string(index=False))
    print(gt.pivot(index="growth", columns="horizon", values="corr").round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
