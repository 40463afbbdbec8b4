"""Checks on what a calibration reads, made before any simulation: dates, windows, observed cells.

A fit on a window without data has a loss of exactly 0 and a forecast from nowhere; these
checks turn that into an error that says which dates the data cover.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from lpm.errors import ConfigError, DataError

from calibration.observation import Observed

__all__ = ["data_span", "check_train_end", "require_observed", "check_share"]


def data_span(frame: pd.DataFrame, column: str = "date") -> tuple[pd.Timestamp, pd.Timestamp]:
    """First and last date of a tidy frame with a non-missing value."""
    if column not in frame.columns:
        raise DataError(f"observed frame: missing column {column!r}; columns: {list(frame.columns)}")
    rows = frame[frame["value"].notna()] if "value" in frame.columns else frame
    if not len(rows):
        raise DataError("observed frame: no rows with a value")
    d = pd.to_datetime(rows[column])
    return d.min().normalize(), d.max().normalize()


def check_train_end(frame: pd.DataFrame, start: Any, train_end: Any, *, min_days: int = 14) -> None:
    """``start <= train_end``, ``train_end`` within the data, and at least ``min_days`` data days before it."""
    first, last = data_span(frame)
    s, e = pd.Timestamp(start), pd.Timestamp(train_end)
    span = f"the data cover {first.date()}..{last.date()}"
    if e < s:
        raise ConfigError(f"--train-end {e.date()} is before --start {s.date()}; {span}")
    if e > last:
        raise ConfigError(f"--train-end {e.date()} is after the last observation ({last.date()}): nothing after "
                          f"{last.date()} can be fitted; {span}")
    if e < first:
        raise ConfigError(f"--train-end {e.date()} is before the first observation ({first.date()}); {span}")
    have = pd.to_datetime(frame["date"])
    n = int(have[(have >= max(s, first)) & (have <= e)].dt.normalize().nunique())
    if n < min_days:
        raise ConfigError(f"--start {s.date()} .. --train-end {e.date()}: {n} observed day(s), need at least "
                          f"{min_days}; {span}")


def require_observed(data: Observed, min_days: int = 1, *, what: str = "fitted window") -> int:
    """Raise unless at least ``min_days`` dates of ``data`` have an unmasked cell; returns that number."""
    if not data.mask:
        raise DataError(f"{what}: no data series")
    any_cell = None
    for m in data.mask.values():
        row = m.reshape(m.shape[0], -1).any(-1).cpu()
        any_cell = row if any_cell is None else (any_cell | row)
    n = int(any_cell.sum()) if any_cell is not None else 0
    if n < min_days:
        dates = data.dates
        observed = dates[any_cell.numpy()] if any_cell is not None and n else []
        have = f"observed dates {observed[0].date()}..{observed[-1].date()}" if n else "no observed date"
        raise DataError(f"{what} {dates[0].date()}..{dates[-1].date()}: {n} date(s) with data ({have}), need at "
                        f"least {min_days}; every cell is masked (dates outside the data, missing or negative values)"
                        if n == 0 else
                        f"{what} {dates[0].date()}..{dates[-1].date()}: {n} date(s) with data ({have}), need at "
                        f"least {min_days}")
    return n


def check_share(name: str, value: float) -> float:
    """A share such as an initial prevalence: a finite number in [0, 1]."""
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name}: expected a share in [0, 1], got {value!r}")
    return v
