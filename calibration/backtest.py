"""Rolling-origin evaluation of weekly forecasts: baselines, quantile scores and tables.

A forecast at an origin (a date; it may read data up to the day before) predicts the weekly
totals of the ``h = 1..H`` weeks that start at the origin. Every method, the model and the
baselines, hands over quantiles at the same levels :data:`LEVELS`, and
:func:`score_table` scores all of them by the same code:

* MAE of the median;
* WIS, the weighted interval score of Bracher et al. (PLoS Comput Biol 2021) over the
  central 50, 80, 90 and 95% intervals and the median (lower is better);
* empirical coverage of the central 50% and 90% intervals.

Baselines (:func:`baseline_quantiles`): *persistence* (the last complete week held flat) and
*trend* (log-linear least-squares fit of the last three weeks, extrapolated). Their
intervals are the empirical quantiles of the same method's own past errors on the log
scale, ``log(1 + y) - log(1 + yhat)`` at that horizon, from weeks before the origin only
(at least :data:`MIN_ERRORS` of them; otherwise a log-normal with sd 0.3 h^0.5).
Nothing here knows a place or a disease.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from calibration.forecast import wis

__all__ = ["LEVELS", "baseline_point", "baseline_quantiles", "weekly_totals", "score_table", "summarize_scores",
           "MIN_ERRORS"]

LEVELS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.975)
MIN_ERRORS = 6


def weekly_totals(daily: pd.Series, week_starts: Sequence[pd.Timestamp]) -> np.ndarray:
    """Sum of a daily series over the 7 days from each week start (NaN when a day is missing)."""
    s = daily.sort_index()
    out = []
    for w in week_starts:
        part = s.loc[pd.Timestamp(w): pd.Timestamp(w) + pd.Timedelta(days=6)]
        out.append(float(part.sum()) if len(part) == 7 else float("nan"))
    return np.asarray(out, dtype=np.float64)


def baseline_point(history: np.ndarray, h: int, method: str) -> float:
    """Point forecast ``h`` weeks ahead from complete weekly totals ``history`` (oldest first)."""
    if len(history) == 0:
        raise ValueError("baseline_point: history is empty")
    if method == "persistence":
        return float(history[-1])
    if method == "trend":
        y = np.log1p(np.asarray(history[-3:], dtype=np.float64))
        if len(y) < 2:
            return float(history[-1])
        x = np.arange(len(y), dtype=np.float64)
        slope, icpt = np.polyfit(x, y, 1)
        return float(np.expm1(icpt + slope * (len(y) - 1 + h)).clip(0.0))
    raise ValueError(f"method: expected 'persistence' or 'trend', got {method!r}")


def baseline_quantiles(history: np.ndarray, horizons: Sequence[int], method: str,
                       levels: Sequence[float] = LEVELS) -> np.ndarray:
    """Quantiles ``[len(horizons), len(levels)]`` of a baseline from weekly totals up to the origin.

    Interval widths come from the method's own past log errors at each horizon (weeks before
    the origin only).
    """
    hist = np.asarray(history, dtype=np.float64)
    out = np.zeros((len(horizons), len(levels)))
    for i, h in enumerate(horizons):
        point = baseline_point(hist, h, method)
        errs = []
        for end in range(3, len(hist) - h + 1):  # past origins whose target week is also in the past
            yhat = baseline_point(hist[:end], h, method)
            errs.append(np.log1p(hist[end + h - 1]) - np.log1p(yhat))
        errs_a = np.asarray(errs[-26:])  # the last half year of errors
        if len(errs_a) >= MIN_ERRORS:
            q = np.quantile(errs_a - np.median(errs_a), levels)
        else:
            z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(list(levels), dtype=torch.float64)).numpy()
            q = z * 0.3 * np.sqrt(h)
        out[i] = np.expm1(np.log1p(point) + q).clip(0.0)
    return out


def score_table(forecasts: pd.DataFrame, levels: Sequence[float] = LEVELS) -> pd.DataFrame:
    """Score rows ``origin, area, series, horizon, method, y, q<level>...``: adds ``ae, wis, cov50, cov90``."""
    qcols = [f"q{lv:g}" for lv in levels]
    missing = [c for c in ("y", *qcols) if c not in forecasts.columns]
    if missing:
        raise ValueError(f"score_table: forecasts lack columns {missing}")
    df = forecasts.copy()
    q = torch.tensor(df[qcols].to_numpy(np.float64).T)
    y = torch.tensor(df["y"].to_numpy(np.float64))
    lv = list(levels)
    df["ae"] = (q[lv.index(0.5)] - y).abs().numpy()
    df["wis"] = wis(q, y, lv).numpy()
    df["cov50"] = ((y >= q[lv.index(0.25)]) & (y <= q[lv.index(0.75)])).double().numpy()
    df["cov90"] = ((y >= q[lv.index(0.05)]) & (y <= q[lv.index(0.95)])).double().numpy()
    return df


def summarize_scores(scored: pd.DataFrame, by: Sequence[str] = ("method", "horizon")) -> pd.DataFrame:
    """Mean MAE, WIS and coverage per group (rows with a finite truth only)."""
    s = scored[np.isfinite(scored["y"])]
    g = s.groupby(list(by))
    return pd.DataFrame({"mae": g["ae"].mean(), "wis": g["wis"].mean(), "cov50": g["cov50"].mean(),
                         "cov90": g["cov90"].mean(), "n": g["ae"].size()}).reset_index()
