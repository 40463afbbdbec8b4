"""Forecasts with uncertainty, and their scores on held-out data.

Forecast recipe (:func:`anchored_draws`), used by the NYC study and its naive baseline alike:

1. *level anchor*: each ensemble member's forecast is rescaled, per area, so that its last
   training week sums to the observed last week (a common practice in operational
   forecasting; it removes level bias left by a short fit and keeps the model's growth);
2. *day-of-week factors* estimated on the last training weeks (reporting is weekly-periodic);
3. *trend uncertainty*: each draw gets a growth-rate error ``delta ~ N(0, sd)`` per week,
   i.e. a multiplier ``exp(delta * h / 7)`` at horizon ``h`` days, with ``sd`` the robust
   spread of week-to-week changes of the observed log weekly growth (:func:`trend_sd`);
4. *observation noise*: negative binomial with dispersion fitted on training residuals
   (:func:`fit_dispersion`);
5. *stacking with the baseline*: the predictive distribution is a mixture of the model's
   draws and the last-week-flat baseline's draws, the model's share set by
   :func:`model_weight` from a pseudo-forecast over the last training days (inverse mean
   squared log error, clamped to [0.05, 0.95]). It is in-sample for the model (its
   trajectory saw those days), so it favours the model: a model that loses even there is
   clearly off and is given little weight; the clamp keeps both components.

An ensemble is built from fitted parameter sets x simulation replicates; each member's
expected counts are turned into predictive draws by sampling the observation noise of the
fitted likelihood (negative binomial with dispersion ``k``, or Poisson), so intervals
include reporting noise and not only simulation noise. Scores: mean absolute error of the
median, weighted interval score (Bracher et al. 2021, with the median and the 50% and 90%
central intervals) and empirical coverage of the 90% interval.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["sample_counts", "quantiles", "interval_score", "wis", "scores", "QUANTILES", "fit_dispersion",
           "weekday_factors", "trend_sd", "anchored_draws", "naive_mean", "model_weight"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def sample_counts(mu: Tensor, *, k: float | None = None, draws: int = 20, seed: int = 0) -> Tensor:
    """Predictive draws ``[draws, *mu.shape]``: NB(mean mu, dispersion k) (Poisson if ``k`` is None)."""
    g = torch.Generator(device=mu.device).manual_seed(seed)
    mu = mu.detach().clamp_min(1e-9).unsqueeze(0).expand(draws, *mu.shape)
    if k is None:
        return torch.poisson(mu, generator=g)
    # gamma-Poisson mixture; the gamma sampler has no generator argument, so it runs under a
    # forked, seeded global RNG (deterministic, and the caller's RNG state is untouched)
    with torch.random.fork_rng(devices=[] if mu.device.type == "cpu" else [mu.device]):
        torch.manual_seed(seed)
        lam = torch.distributions.Gamma(torch.full_like(mu, float(k)), float(k) / mu).sample()
    return torch.poisson(lam, generator=g)


def quantiles(draws: Tensor, qs: Sequence[float] = QUANTILES) -> Tensor:
    """Quantiles over the leading (ensemble) axis: ``[len(qs), ...]``."""
    return torch.quantile(draws.float(), torch.tensor(qs, dtype=torch.float32, device=draws.device), dim=0)


def interval_score(lower: Tensor, upper: Tensor, y: Tensor, alpha: float) -> Tensor:
    """Interval score of the central ``1 - alpha`` interval (elementwise)."""
    return (upper - lower) + (2 / alpha) * (lower - y).clamp_min(0) + (2 / alpha) * (y - upper).clamp_min(0)


def wis(q: Tensor, y: Tensor, qs: Sequence[float] = QUANTILES) -> Tensor:
    """Weighted interval score from symmetric quantiles ``q [len(qs), ...]`` (elementwise)."""
    qs = list(qs)
    med = q[qs.index(0.5)]
    K = 0
    total = 0.5 * (y - med).abs()
    for lo in [x for x in qs if x < 0.5]:
        hi = 1 - lo
        j = min(range(len(qs)), key=lambda i: abs(qs[i] - hi))
        alpha = 2 * lo
        total = total + (alpha / 2) * interval_score(q[qs.index(lo)], q[j], y, alpha)
        K += 1
    return total / (K + 0.5)


def scores(q: Tensor, y: Tensor, mask: Tensor, qs: Sequence[float] = QUANTILES) -> dict[str, float]:
    """MAE of the median, mean WIS and 90% coverage over valid cells."""
    qs = list(qs)
    m = mask.bool()
    if int(m.sum()) == 0:
        return {"mae": float("nan"), "wis": float("nan"), "coverage_90": float("nan"), "n": 0}
    med = q[qs.index(0.5)]
    lo, hi = q[qs.index(0.05)], q[qs.index(0.95)]
    return {"mae": float((med - y).abs()[m].mean()), "wis": float(wis(q, y, qs)[m].mean()),
            "coverage_90": float(((y >= lo) & (y <= hi))[m].float().mean()), "n": int(m.sum())}


def fit_dispersion(mu: Tensor, y: Tensor, mask: Tensor | None = None, lo: float = 0.3, hi: float = 3000.0) -> float:
    """Maximum-likelihood negative-binomial dispersion ``k`` of ``y`` given means ``mu`` (grid over log k)."""
    from calibration.losses import negbin_nll

    mu, y = mu.detach().double().clamp_min(1e-3), y.detach().double()
    m = torch.ones_like(y, dtype=torch.bool) if mask is None else mask.bool()
    if int(m.sum()) == 0:
        return hi
    grid = torch.logspace(np.log10(lo), np.log10(hi), 60, dtype=torch.float64)
    nll = torch.stack([negbin_nll(mu[m], y[m], float(k)).sum() for k in grid])  # 60 grid points, not agents
    return float(grid[int(nll.argmin())])


def weekday_factors(y: Tensor, dates: pd.DatetimeIndex, weeks: int = 6) -> Tensor:
    """Multiplicative day-of-week factors ``[7]`` (Monday=0, mean 1) from the last ``weeks`` weeks of ``y [T, A]``.

    Each day's count is divided by its centred 7-day mean (pooled over areas); factors are
    the per-weekday means of these ratios, shrunk halfway to 1 when fewer than 3 weeks exist.
    """
    y = y.detach().double().reshape(len(dates), -1).sum(-1)
    T = y.shape[0]
    if T < 14:
        return torch.ones(7, dtype=torch.float32)
    kernel = torch.ones(7, dtype=torch.float64) / 7
    centred = torch.nn.functional.conv1d(y.view(1, 1, -1), kernel.view(1, 1, -1)).view(-1)  # [T - 6], centre t+3
    lo = max(0, T - 3 - 7 * weeks)
    idx = torch.arange(lo + 3, T - 3)
    ratio = (y[idx] + 0.5) / (centred[idx - 3] + 0.5)
    dow = torch.as_tensor(pd.DatetimeIndex(dates)[idx.numpy()].day_of_week.to_numpy().copy())
    f = torch.ones(7, dtype=torch.float64)
    for d in range(7):  # seven weekdays
        sel = dow == d
        if bool(sel.any()):
            f[d] = ratio[sel].mean()
    f = f / f.mean()
    if len(idx) < 21:
        f = 0.5 * (f + 1.0)
    return f.float()


def trend_sd(y: Tensor, weeks: int = 12, floor: float = 0.1) -> float:
    """Robust sd of week-to-week changes in log weekly growth of daily counts ``y [T]`` (last ``weeks`` weeks).

    ``floor``: the smallest sd returned (a short or smooth history must not give
    overconfident trends).
    """
    y = y.detach().double().reshape(-1)
    W = y.shape[0] // 7
    if W < 4:
        return max(floor, 0.3)
    wk = y[y.shape[0] - 7 * W:].view(W, 7).sum(1)[-weeks - 2:]
    g = torch.log(wk[1:] + 5) - torch.log(wk[:-1] + 5)
    d = g[1:] - g[:-1]
    mad = float((d - d.median()).abs().median()) * 1.4826
    return max(floor, mad)


def naive_mean(y: Tensor, horizon: int) -> Tensor:
    """Last-week-flat baseline: the mean of the last 7 days of ``y [T, A]`` repeated ``horizon`` times."""
    return y[-7:].double().mean(0, keepdim=True).expand(horizon, -1).float()


def anchored_draws(mu: Tensor, y_train: Tensor, *, k: float, sd: float, dow: Tensor | None = None,
                   dates: pd.DatetimeIndex | None = None, draws: int = 50, seed: int = 0,
                   anchor: bool = True, min_week: float = 0.0) -> Tensor:
    """Predictive draws ``[R * draws, H, A]`` for ``H`` days after training from member means ``mu [R, T0 + H, A]``.

    ``y_train [T0, A]``: observed training counts (only its last 7 days are read, for the
    anchor). ``dates``: the ``T0 + H`` dates (for ``dow`` factors). ``min_week``: a member
    whose simulated last training week is below it in an area (a near-extinct stochastic
    epidemic, whose growth is noise) is extrapolated flat there. See the module docstring.
    """
    R, T, A = mu.shape
    T0 = y_train.shape[0]
    H = T - T0
    if H <= 0:
        raise ValueError(f"anchored_draws: mu covers {T} days, training {T0}: nothing to forecast")
    mu = mu.detach().double()
    fut = mu[:, T0:]
    if anchor:
        obs_week = y_train[-7:].double().sum(0)  # [A]
        sim_week = mu[:, T0 - 7:T0].sum(1)  # [R, A]
        fut = fut * ((obs_week + 0.5) / (sim_week + 0.5)).unsqueeze(1)
        flat = (sim_week < min_week).unsqueeze(1)  # [R, 1, A]
        fut = torch.where(flat, (obs_week / 7).view(1, 1, A).expand_as(fut), fut)
    if dow is not None and dates is not None:
        wd = torch.as_tensor(pd.DatetimeIndex(dates)[T0:].day_of_week.to_numpy().copy())
        fut = fut * dow.double()[wd].view(1, H, 1)
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(R, draws, 1, 1, generator=g, dtype=torch.float64) * sd
    h = torch.arange(1, H + 1, dtype=torch.float64).view(1, 1, H, 1)
    m = (fut.unsqueeze(1) * torch.exp(delta * h / 7)).reshape(R * draws, H, A)
    return sample_counts(m.float(), k=k, draws=1, seed=seed + 1)[0]


def model_weight(mu: Tensor, y: Tensor, horizon: int = 14, lo: float = 0.05, hi: float = 0.95) -> float:
    """Mixture share of the model vs the flat baseline from a pseudo-forecast of the last ``horizon`` days.

    ``mu [R, T0, A]`` member means over the training days, ``y [T0, A]`` observed. Both
    forecasts start at ``T0 - horizon`` from the week before it (the model anchored to that
    week, as in :func:`anchored_draws`); errors are of ``log(1 + weekly sum)`` per area.
    """
    T0 = y.shape[0]
    o = T0 - horizon
    if o < 7 or horizon < 7:
        return 0.5
    y, mu = y.detach().double(), mu.detach().double().mean(0)
    obs_week = y[o - 7:o].sum(0)
    model = mu[o:] * (obs_week + 0.5) / (mu[o - 7:o].sum(0) + 0.5)
    flat = (obs_week / 7).expand(horizon, -1)
    W = horizon // 7
    wk = lambda x: torch.log1p(x[:7 * W].reshape(W, 7, -1).sum(1))  # noqa: E731
    e_model = float(((wk(model) - wk(y[o:])) ** 2).mean())
    e_flat = float(((wk(flat) - wk(y[o:])) ** 2).mean())
    return float(min(hi, max(lo, e_flat / max(e_model + e_flat, 1e-12))))
