"""Dated policy tables -> weekly schedule tensors (closures by industry, UI top-ups and durations).

Tables are step functions: a row ``date, key, value`` sets ``value`` from ``date`` on, until
the next row for the same key. A week's value is the mean over its 7 days, so a closure
starting on a Sunday evening counts for the days it covers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lpm.errors import ConfigError, DataError

__all__ = ["weekly_dates", "step_table", "closure_schedule", "ui_schedule"]


def weekly_dates(start: str | pd.Timestamp, weeks: int) -> pd.DatetimeIndex:
    """First day of each of ``weeks`` consecutive weeks from ``start``."""
    if weeks < 1:
        raise ConfigError(f"weeks: expected >= 1, got {weeks}")
    return pd.date_range(pd.Timestamp(start), periods=weeks, freq="7D")


def step_table(df: pd.DataFrame, key: str, value: str, keys: Sequence[str], week_starts: pd.DatetimeIndex,
               file: str = "table") -> Tensor:
    """Weekly means ``[T, len(keys)]`` of the step functions in ``df`` (columns ``date``, ``key``, ``value``)."""
    for c in ("date", key, value):
        if c not in df.columns:
            raise DataError(f"{file}: missing column {c!r}")
    unknown = sorted(set(df[key]) - set(keys))
    if unknown:
        raise DataError(f"{file}: column {key!r} has unknown value(s) {unknown}; expected one of {list(keys)}")
    days = pd.date_range(week_starts[0], week_starts[-1] + pd.Timedelta(days=6), freq="D")
    out = np.zeros((len(days), len(keys)))
    df = df.assign(date=pd.to_datetime(df["date"])).sort_values("date")
    for j, k in enumerate(keys):
        rows = df[df[key] == k]
        if rows.empty:
            raise DataError(f"{file}: no rows for {key}={k!r}")
        series = pd.Series(rows[value].to_numpy(dtype=np.float64), index=rows["date"])
        series = series[~series.index.duplicated(keep="last")]
        filled = series.reindex(series.index.union(days)).ffill().reindex(days)
        if filled.isna().any():
            raise DataError(f"{file}: {key}={k!r} has no value before {days[int(np.argmax(filled.isna().to_numpy()))].date()}")
        out[:, j] = filled.to_numpy()
    T = len(week_starts)
    return torch.tensor(out.reshape(T, 7, len(keys)).mean(1), dtype=torch.float32)


def closure_schedule(path: str | Path, industries: Sequence[str], week_starts: pd.DatetimeIndex) -> Tensor:
    """Share of each industry closed by policy in each week ``[T, J]`` from a ``date,industry,closed_share`` table."""
    path = Path(path)
    df = pd.read_csv(path)
    x = step_table(df, "industry", "closed_share", industries, week_starts, path.name)
    if bool((x < 0).any()) or bool((x > 1).any()):
        raise DataError(f"{path.name}: column 'closed_share' must lie in [0, 1]")
    return x


def ui_schedule(path: str | Path, week_starts: pd.DatetimeIndex) -> tuple[Tensor, Tensor]:
    """Weekly UI top-up ($/week) and maximum duration (weeks), each ``[T]``, from ``date,ui_supplement,ui_max_weeks``."""
    path = Path(path)
    df = pd.read_csv(path)
    long = pd.concat([df[["date"]].assign(key=c, value=df[c]) for c in ("ui_supplement", "ui_max_weeks")])
    x = step_table(long, "key", "value", ("ui_supplement", "ui_max_weeks"), week_starts, path.name)
    return x[:, 0], x[:, 1]
