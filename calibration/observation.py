"""Observation model: from simulated quantities to what the data measures, aligned by date.

A simulation gives per-step observables ``[T]`` or ``[T, G]`` (e.g. new infections per
borough). Surveillance data measure something else: a fraction of infections, reported
after a delay; deaths after a lag; sometimes weekly sums, sometimes a citywide total. One
:class:`Stream` per data series states that mapping::

    expected_cases[t, a] = ascertainment_a * sum_k delay[k] * infections[t - k, a]

The convolution is a differentiable ``conv1d``; the ascertainment may be a number or the
name of a (fitted) parameter, scalar or one value per area. :func:`align` turns a tidy
frame ``(date, area, series, value)`` into tensors on the simulation's date grid with a
validity mask: data dates outside the simulated window, missing (NaN) values and negative
counts are masked, each with a :class:`DataWarning` that says how many.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lpm.errors import ConfigError, DataError

__all__ = ["DataWarning", "Stream", "ObservationModel", "Observed", "align", "gamma_delay", "lag_delay",
           "convolve_delay", "aggregation_matrix"]


class DataWarning(UserWarning):
    """Observed data had values that were masked (out of window, NaN, negative)."""


def gamma_delay(mean_days: float, sd_days: float, max_days: int | None = None, lag: int = 0) -> Tensor:
    """Discretized gamma delay pmf ``[D]`` over whole days ``0..D-1`` (optionally shifted by ``lag``)."""
    if mean_days <= 0 or sd_days <= 0:
        raise ConfigError(f"gamma_delay: mean_days and sd_days must be > 0, got {mean_days}, {sd_days}")
    shape = (mean_days / sd_days) ** 2
    scale = sd_days**2 / mean_days
    D = int(max_days or math.ceil(mean_days + 6 * sd_days)) + 1
    edges = torch.arange(0, D + 1, dtype=torch.float64) - 0.5
    cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), edges.clamp_min(0) / scale)
    pmf = (cdf[1:] - cdf[:-1]).clamp_min(0)
    pmf = pmf / pmf.sum()
    return lag_delay(lag, pmf.float())


def lag_delay(lag: int, pmf: Tensor | None = None) -> Tensor:
    """Pure lag of ``lag`` days (pmf ``[lag + 1]`` with mass at the end), or ``pmf`` shifted by it."""
    if lag < 0:
        raise ConfigError(f"lag: expected >= 0 days, got {lag}")
    base = torch.ones(1) if pmf is None else pmf.float()
    return torch.cat([torch.zeros(lag), base])


def convolve_delay(x: Tensor, pmf: Tensor) -> Tensor:
    """Causal convolution along time: ``y[t] = sum_k pmf[k] x[t - k]`` for ``x [T]`` or ``[T, G]``."""
    if pmf.dim() != 1:
        raise ConfigError(f"delay pmf: expected 1-D, got shape {tuple(pmf.shape)}")
    squeeze = x.dim() == 1
    xs = x.unsqueeze(1) if squeeze else x
    T, G = xs.shape
    D = pmf.numel()
    inp = torch.nn.functional.pad(xs.t().unsqueeze(1), (D - 1, 0))  # [G, 1, T + D - 1]
    w = pmf.to(xs.dtype).to(xs.device).flip(0).view(1, 1, D)
    y = torch.nn.functional.conv1d(inp, w).squeeze(1).t()  # [T, G]
    return y.squeeze(1) if squeeze else y


def aggregation_matrix(dates: pd.DatetimeIndex, freq: str) -> tuple[Tensor, pd.DatetimeIndex]:
    """Matrix ``[P, T]`` summing days into complete periods, and the period labels (period end dates).

    ``freq``: ``"D"`` (identity) or a pandas weekly alias such as ``"W-SAT"`` (weeks ending
    Saturday, as NYC DOHMH reports). Incomplete periods at either end are dropped.
    """
    if freq == "D":
        return torch.eye(len(dates)), pd.DatetimeIndex(dates)
    per = pd.DatetimeIndex(dates).to_period(freq)
    labels, codes = np.unique(per.asi8, return_inverse=True)
    counts = np.bincount(codes)
    length = {p: (pi.end_time.normalize() - pi.start_time.normalize()).days + 1
              for p, pi in zip(labels, pd.PeriodIndex.from_ordinals(labels, freq=per.freq))}
    keep = [i for i, p in enumerate(labels) if counts[i] == length[p]]
    M = torch.zeros(len(keep), len(dates))
    for row, i in enumerate(keep):  # loop over a handful of weeks, not agents
        M[row, torch.as_tensor(np.nonzero(codes == i)[0])] = 1.0
    ends = pd.DatetimeIndex([pd.Period(ordinal=labels[i], freq=per.freq).end_time.normalize() for i in keep])
    return M, ends


@dataclass(frozen=True)
class Stream:
    """How one data series arises from one simulated observable.

    ``source``: observable name (``[T]`` or ``[T, G]`` with labels = area codes).
    ``scale``: ascertainment (a number or the name of a parameter, scalar or ``[G]``).
    ``delay``: pmf ``[D]`` over days 0..D-1 (None: no delay); use :func:`lag_delay` for a pure lag.
    """

    series: str
    source: str
    scale: float | str = 1.0
    delay: Tensor | None = None

    def expected(self, params: Any, sim: Mapping[str, Tensor]) -> Tensor:
        """Expected reported counts ``[T, G]`` (or ``[T]``) from simulated observables."""
        if self.source not in sim:
            raise ConfigError(f"stream {self.series!r}: observable {self.source!r} not simulated; have {sorted(sim)}")
        x = sim[self.source]
        if self.delay is not None:
            x = convolve_delay(x, self.delay)
        s = getattr(params, self.scale) if isinstance(self.scale, str) else self.scale
        return x * s


@dataclass
class Observed:
    """Data aligned to a date grid: per series ``values [P, A]`` and ``mask [P, A]`` (True = use)."""

    dates: pd.DatetimeIndex
    areas: tuple[str, ...]
    values: dict[str, Tensor]
    mask: dict[str, Tensor]
    freq: str = "D"
    agg: Tensor | None = None  # [P, T] day -> period sums
    masked: dict[str, int] = field(default_factory=dict)

    @property
    def series(self) -> tuple[str, ...]:
        """Series names."""
        return tuple(self.values)

    def to(self, device: torch.device | str) -> "Observed":
        """Move tensors to ``device``."""
        return Observed(self.dates, self.areas, {k: v.to(device) for k, v in self.values.items()},
                        {k: v.to(device) for k, v in self.mask.items()}, self.freq,
                        None if self.agg is None else self.agg.to(device), dict(self.masked))


class ObservationModel:
    """Maps simulated observables to expected data series on the data's grid (areas, days or weeks).

    ``areas``: the area labels of the simulated ``[T, G]`` observables, in order. ``total``:
    the label of a data area that is the sum over all simulated areas (e.g. a city over its
    boroughs; the study names it), or None.
    """

    def __init__(self, streams: Sequence[Stream], areas: Sequence[str] | None = None, *, total: str | None = None) -> None:
        names = [s.series for s in streams]
        if len(set(names)) != len(names):
            raise ConfigError(f"streams: series names must be unique, got {names}")
        self.streams = {s.series: s for s in streams}
        self.areas = tuple(areas) if areas is not None else None
        if total is not None and self.areas is not None and total in self.areas:
            raise ConfigError(f"total: {total!r} is also a simulated area {self.areas}; the total must be a separate label")
        self.total = total

    def expected_daily(self, params: Any, sim: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per series expected daily counts ``[T, G]`` (simulated areas, no citywide column)."""
        out = {}
        for name, s in self.streams.items():
            x = s.expected(params, sim)
            out[name] = x.unsqueeze(-1) if x.dim() == 1 else x
        return out

    def on_grid(self, daily: Mapping[str, Tensor], obs: Observed) -> dict[str, Tensor]:
        """Select/aggregate daily ``[..., T, G]`` predictions onto ``obs``'s grid ``[..., P, A]``."""
        out = {}
        for name in obs.series:
            x = daily[name]
            cols = []
            for a in obs.areas:
                if self.total is not None and a == self.total:
                    cols.append(x.sum(-1))
                else:
                    if self.areas is None:
                        if x.shape[-1] != 1:
                            raise ConfigError(f"series {name!r}: area {a!r} requested but the model's areas are unnamed")
                        cols.append(x[..., 0])
                    else:
                        if a not in self.areas:
                            raise ConfigError(f"series {name!r}: area {a!r} not among the model's areas {self.areas}")
                        cols.append(x[..., self.areas.index(a)])
            y = torch.stack(cols, -1)  # [..., T, A]
            agg = obs.agg.to(y.device, y.dtype) if obs.agg is not None else None
            out[name] = y if agg is None else torch.einsum("pt,...ta->...pa", agg, y)
        return out

    def predict(self, params: Any, sim: Mapping[str, Tensor], obs: Observed) -> dict[str, Tensor]:
        """Expected data ``{series: [P, A]}`` on ``obs``'s grid."""
        return self.on_grid(self.expected_daily(params, sim), obs)


def align(frame: pd.DataFrame, dates: Sequence, *, series: Sequence[str] | None = None,
          areas: Sequence[str] | None = None, freq: str = "D", end: Any = None,
          device: torch.device | str = "cpu") -> Observed:
    """Align a tidy frame ``(date, area, series, value)`` to the simulated dates ``dates`` (one per step).

    ``end``: last date of data that may be read (later rows are dropped before anything
    else: a forecast made at ``end`` cannot see them). Rows dated outside the simulated
    window are dropped; NaN and negative values are masked; simulated dates without data
    are masked. Each category is reported in one :class:`DataWarning` with its count.
    With a weekly ``freq`` the data are summed by week and a week with any masked day is masked.
    """
    for col in ("date", "area", "series", "value"):
        if col not in frame.columns:
            raise DataError(f"observed frame: missing column {col!r}; columns: {list(frame.columns)}")
    df = frame[["date", "area", "series", "value"]].copy()
    df["date"] = pd.to_datetime(df["date"]).dt.normalize()
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    if end is not None:
        df = df[df["date"] <= pd.Timestamp(end)]
    sim_dates = pd.DatetimeIndex(pd.to_datetime(list(dates))).normalize()
    if sim_dates.has_duplicates or not sim_dates.is_monotonic_increasing:
        raise DataError("dates: expected strictly increasing simulation dates (one per step)")
    series = tuple(series) if series is not None else tuple(sorted(df["series"].unique()))
    areas = tuple(areas) if areas is not None else tuple(sorted(df["area"].unique()))
    df = df[df["series"].isin(series) & df["area"].isin(areas)]
    dup = df.duplicated(["date", "area", "series"])
    if dup.any():
        raise DataError(f"observed frame: {int(dup.sum())} duplicated (date, area, series) rows, e.g. "
                         f"{df[dup].iloc[0][['date', 'area', 'series']].tolist()}")
    outside = ~df["date"].isin(sim_dates)
    if outside.any():
        warnings.warn(f"observed data: {int(outside.sum())} rows dated outside the simulated window "
                      f"{sim_dates[0].date()}..{sim_dates[-1].date()} were dropped", DataWarning, stacklevel=2)
    df = df[~outside]
    n_nan = int(df["value"].isna().sum())
    n_neg = int((df["value"] < 0).sum())
    if n_nan:
        warnings.warn(f"observed data: {n_nan} missing (NaN) values masked", DataWarning, stacklevel=2)
    if n_neg:
        warnings.warn(f"observed data: {n_neg} negative counts masked", DataWarning, stacklevel=2)
    values, mask, masked = {}, {}, {"outside": int(outside.sum()), "nan": n_nan, "negative": n_neg}
    no_data = 0
    for s in series:
        sub = df[df["series"] == s]
        wide = sub.pivot(index="date", columns="area", values="value").reindex(index=sim_dates, columns=list(areas))
        v = wide.to_numpy(dtype=float)
        ok = np.isfinite(v) & (v >= 0)
        no_data += int(wide.isna().to_numpy().sum()) - int(sub["value"].isna().sum())
        values[s] = torch.as_tensor(np.where(ok, v, 0.0), dtype=torch.float32)
        mask[s] = torch.as_tensor(ok)
    if no_data:
        warnings.warn(f"observed data: {no_data} (date, area, series) cells in the simulated window have no data "
                      f"and are masked", DataWarning, stacklevel=2)
    masked["no_data"] = no_data
    agg, grid = None, sim_dates
    if freq != "D":
        agg, grid = aggregation_matrix(sim_dates, freq)
        for s in series:
            m = mask[s].float()
            full = (agg @ m) == agg.sum(1, keepdim=True)
            values[s] = agg @ values[s]
            mask[s] = full
    out = Observed(grid, areas, values, mask, freq, agg, masked)
    return out.to(device)

