"""NYC study schedules over a run's dates: mobility by borough and layer, dated policies, vaccination, test capacity.

Sources and assumptions are listed in the package docstring (:mod:`experiments.covid_nyc`).
Each function returns tensors over the run's dates; :func:`experiments.covid_nyc.build`
puts them in the system (:class:`~experiments.covid_nyc.model.NYCSystem`), so they move with
it to the run's device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from lpm import Intervention
from lpm.errors import ConfigError
from lpm.population import PopulationError, check_table
from experiments.covid_nyc import data
from experiments.covid_nyc.data import AGE_LOWER, LAYERS, M50_NAMES, _checked_series, _trailing

__all__ = ["POLICIES", "check_dates", "area_schedule", "policies", "vaccination", "test_capacity"]

#: names of the dated policies of :func:`policies` (each can be left out with ``disable``)
POLICIES = ("school_closure", "stay_at_home", "reopening")


def check_dates(dates: pd.DatetimeIndex, extrapolate: bool = False) -> None:
    """Raise unless the run's dates lie within the covariate data; with ``extrapolate``, warn how they are extended."""
    first, last = data.covariate_span()
    if dates[0] >= first and dates[-1] <= last:
        return
    where = f"run dates {dates[0].date()}..{dates[-1].date()} fall outside the covariate data {first.date()}..{last.date()}"
    if not extrapolate:
        raise ConfigError(f"{where} (MTA ridership, Descartes Labs m50); choose --start/--days within it, or pass "
                          f"--extrapolate (extrapolate=True) to extend the covariates")
    import warnings

    warnings.warn(f"{where}: covariates are extended: before {first.date()} mobility is pre-pandemic (ridership share "
                  f"1.0, m50 index 100); after {last.date()} the last 7-day mean is held (forward fill); policy and "
                  f"vaccination schedules keep their last value", data.DataWarning, stacklevel=3)


def area_schedule(dates: pd.DatetimeIndex, areas: Sequence[str]) -> torch.Tensor:
    """Per date, borough and layer: mobility multipliers ``[T, A, L]`` (household, school, work, community)."""
    end = dates[-1]
    mta = pd.read_csv(data.MTA_FILE)
    check_table(mta, data.MTA_FILE.name, ["Date", "Subways: % of Comparable Pre-Pandemic Day"])
    mta["date"] = pd.to_datetime(mta["Date"], format="%m/%d/%Y")
    mta = mta[mta["date"] <= end]
    col = "Subways: % of Comparable Pre-Pandemic Day"
    # clip at 1.2: a cap on the contact multiplier (busier than usual), not a repair of bad values, which are errors
    subway = _trailing(_checked_series(mta[col], mta["date"], data.MTA_FILE.name, col).clip(0, 1.2))
    work = subway.reindex(dates).ffill().fillna(1.0).to_numpy()
    m50 = pd.read_csv(data.M50_FILE, parse_dates=["date"])
    check_table(m50, data.M50_FILE.name, ["admin2", "date", "m50_index"])
    m50 = m50[m50["date"] <= end].pivot(index="date", columns="admin2", values="m50_index")
    T, A = len(dates), len(areas)
    out = torch.ones(T, A, len(LAYERS))
    for a, b in enumerate(areas):  # five boroughs
        if M50_NAMES[b] not in m50.columns:
            raise PopulationError(f"{data.M50_FILE.name}: column 'admin2' has no rows for {M50_NAMES[b]!r}")
        col = m50[M50_NAMES[b]].dropna()
        idx = _trailing(_checked_series(col, col.index.to_series(), data.M50_FILE.name, f"m50_index ({M50_NAMES[b]})"))
        idx = idx.reindex(dates).ffill().fillna(100.0).to_numpy()
        out[:, a, LAYERS.index("community")] = torch.tensor(0.3 + 0.7 * np.clip(idx / 100.0, 0, 1), dtype=torch.float32)
        out[:, a, LAYERS.index("work")] = torch.tensor(work, dtype=torch.float32)
    return out


def _steps(dates: pd.DatetimeIndex, changes: Sequence[tuple[str, float]], before: float = 1.0) -> torch.Tensor:
    """Piecewise-constant series over ``dates``: value changes at each (date, value)."""
    v = np.full(len(dates), before, dtype=np.float32)
    for d, x in changes:
        v[dates >= pd.Timestamp(d)] = x
    return torch.tensor(v)


def policies(dates: pd.DatetimeIndex, disable: Sequence[str] = ()) -> list[Intervention]:
    """Dated policies as ``[T, L]`` layer multipliers (sources in the module docstring)."""
    L = len(LAYERS)
    s, w, c = LAYERS.index("school"), LAYERS.index("work"), LAYERS.index("community")
    out = []
    school = torch.ones(len(dates), L)
    school[:, s] = _steps(dates, [("2020-03-16", 0.0), ("2020-09-29", 0.3), ("2020-11-19", 0.0), ("2020-12-07", 0.12),
                                  ("2021-02-25", 0.2), ("2021-03-22", 0.3)])
    out.append(Intervention("school_closure", school))
    pause = _steps(dates, [("2020-03-22", 0.5), ("2020-06-08", 1.0)])
    stay = torch.ones(len(dates), L)
    stay[:, w] = pause
    stay[:, c] = pause
    out.append(Intervention("stay_at_home", stay))
    phases = _steps(dates, [("2020-06-08", 0.6), ("2020-06-22", 0.7), ("2020-07-06", 0.75), ("2020-07-20", 0.8),
                            ("2020-09-30", 0.85), ("2020-12-14", 0.8), ("2021-02-12", 0.85)])
    reopen = torch.ones(len(dates), L)
    reopen[:, w] = phases
    reopen[:, c] = phases
    out.append(Intervention("reopening", reopen))
    return [iv for iv in out if iv.name not in disable]


def vaccination(dates: pd.DatetimeIndex, age_group: torch.Tensor, uptake: float = 0.006, cap: float = 0.6,
                efficacy: float = 0.8, lag_days: int = 14) -> Intervention:
    """Susceptibility multiplier ``1 - efficacy * coverage(t - lag, age band)`` as a ``[T, G]`` schedule."""
    lower = np.asarray(AGE_LOWER)
    eligible = [("2021-01-11", 75), ("2021-01-12", 65), ("2021-03-10", 60), ("2021-03-23", 50), ("2021-03-30", 30)]
    start = np.full(len(lower), np.datetime64("NaT"), dtype="datetime64[D]")
    for d, age in eligible:
        later = np.isnat(start) & (lower >= age)
        start[later] = np.datetime64(d)
    t = dates.to_numpy().astype("datetime64[D]")[:, None]
    days = (t - start[None, :] - np.timedelta64(lag_days, "D")).astype("float64")
    days = np.where(np.isnan(days), -1.0, days)
    cov = np.clip(days * uptake, 0.0, cap)
    return Intervention("vaccination", torch.tensor(1.0 - efficacy * cov, dtype=torch.float32), group=age_group)


def test_capacity(dates: pd.DatetimeIndex) -> torch.Tensor:
    """Relative testing capacity over dates (module docstring)."""
    x = ((dates - pd.Timestamp("2020-04-20")).days.to_numpy() / 10.0).astype(np.float64)
    return torch.tensor(0.15 + 0.85 / (1 + np.exp(-x)), dtype=torch.float32)
