"""NYC study inputs: the bundled tables (census, commuting flows, contact matrices, mobility, cases), read and checked.

Every loader validates what it reads and raises an error naming the file, column and row.
File locations are module attributes (``experiments.covid_nyc.data.MTA_FILE``, ...) read at
call time, so a test or a user can point the study at other copies of the tables.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from lpm.data import data_path
from lpm.errors import DataError
from lpm.population import Marginals, PopulationError, check_table

__all__ = ["DATA", "BOROUGHS", "FIPS", "NAMES", "M50_NAMES", "LAYERS", "AGE_LOWER", "AGE_LABELS", "AGE_UPPER",
           "NYC_AGE_BANDS", "DataWarning", "load_contact_matrices", "load_marginals", "load_flows", "load_observed",
           "load_observed_age", "covariate_span"]

DATA = data_path()
BOROUGHS = ("BX", "BK", "MN", "QN", "SI")
FIPS = {"BX": 5, "BK": 47, "MN": 61, "QN": 81, "SI": 85}
NAMES = {"BX": "Bronx", "BK": "Brooklyn", "MN": "Manhattan", "QN": "Queens", "SI": "Staten Island"}
M50_NAMES = {"BX": "Bronx", "BK": "Kings County", "MN": "New York County", "QN": "Queens County", "SI": "Richmond County"}
LAYERS = ("household", "school", "work", "community")
SETTING_WEIGHTS = {"household": 4.11, "school": 11.41, "work": 8.07, "community": 2.79}  # Mistry et al. 2021
AGE_LOWER = tuple(range(0, 90, 5))
AGE_LABELS = tuple(f"{a}-{a + 4}" for a in AGE_LOWER[:-1]) + ("85+",)
AGE_UPPER = tuple(list(AGE_LOWER[1:]) + [95])
# ACS DP05 coarse bands (DP05_0005E..DP05_0017E) for each 5-year band
ACS_AGE_COLUMNS = tuple(f"DP05_{k:04d}E" for k in range(5, 18))
ACS_GROUP = (0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 10, 11, 11, 12)

CENSUS_FILE = DATA / "census_acs" / "ACSDP1Y2023.DP05-NYC.csv"
DP03_FILE = DATA / "acs_nyc" / "acs2019_1y_dp03_nyc_counties.csv"
FLOWS_FILE = DATA / "commuting" / "nyc_region_county_commuting_flows_acs2009_2013.csv"
MATRIX_DIR = DATA / "contact_matrices"
MTA_FILE = DATA / "mobility_nyc" / "mta_daily_ridership_2020_2021.csv"
M50_FILE = DATA / "mobility_nyc" / "nyc_county_dl_m50_index_daily.csv"
CASES_FILE = DATA / "covid_cases" / "nyc_data_by_day.csv"
AGE_RATE_FILE = DATA / "covid_cases" / "nyc_weekly_case_rate_age.csv"
INCOME_COLUMNS = tuple(f"DP03_{k:04d}E" for k in range(52, 62))
INCOME_LABELS = ("<10k", "10-15k", "15-25k", "25-35k", "35-50k", "50-75k", "75-100k", "100-150k", "150-200k", "200k+")



def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where the study caches populations and LLM answers: ``cache_dir``, else ``$LPM_CACHE_DIR``, else ``~/.cache/lpm``."""
    return Path(cache_dir or os.environ.get("LPM_CACHE_DIR") or Path.home() / ".cache" / "lpm") / "covid_nyc"


def _check_boroughs(boroughs: Sequence[str] | None) -> tuple[str, ...]:
    areas = tuple(boroughs) if boroughs else BOROUGHS
    bad = [b for b in areas if b not in BOROUGHS]
    if bad or len(set(areas)) != len(areas):
        raise PopulationError(f"boroughs: expected distinct codes from {BOROUGHS}, got {list(areas)}")
    return tuple(b for b in BOROUGHS if b in areas)


def _county_rows(df: pd.DataFrame, file: Path, areas: Sequence[str]) -> pd.DataFrame:
    check_table(df, file.name, ["GEO_ID"])
    geo = {f"0500000US36{FIPS[b]:03d}": b for b in areas}
    df = df[df["GEO_ID"].isin(geo)].copy()
    missing = [b for g, b in geo.items() if g not in set(df["GEO_ID"])]
    if missing:
        raise PopulationError(f"{file.name}: column 'GEO_ID' has no row for borough(s) {missing}")
    df["area"] = df["GEO_ID"].map(geo)
    return df.set_index("area").loc[list(areas)]


def load_contact_matrices(directory: Path = MATRIX_DIR) -> dict[str, torch.Tensor]:
    """Mistry et al. 2021 New York contacts per day by setting, 18 x 18 five-year bands: ``C_k = w_k F_k``."""
    out = {}
    for k, w in SETTING_WEIGHTS.items():
        f = directory / f"mistry2021_New_York_F_{k}_setting_18.csv"
        m = np.loadtxt(f, delimiter=",")
        if m.shape != (18, 18) or (m < 0).any():
            raise PopulationError(f"{f.name}: expected an 18 x 18 non-negative matrix, got shape {m.shape}")
        out[k] = torch.tensor(m * w, dtype=torch.float64)
    return out


def load_marginals(boroughs: Sequence[str] | None = None, census: Path = CENSUS_FILE, dp03: Path = DP03_FILE,
                   matrices: Path = MATRIX_DIR) -> Marginals:
    """Census marginals per borough (ACS DP05 age x sex, DP03 employment, households, income) with priors."""
    areas = _check_boroughs(boroughs)
    census, dp03 = Path(census), Path(dp03)
    c = pd.read_csv(census, skiprows=[1], encoding="utf-8-sig")
    cols = ["DP05_0001E", "DP05_0002E", "DP05_0003E", "DP05_0030E", "DP05_0031E", *ACS_AGE_COLUMNS]
    check_table(c, census.name, ["GEO_ID", *cols], nonnegative=cols)
    c = _county_rows(c, census, areas)
    d = pd.read_csv(dp03)
    dcols = ["DP03_0004E", "DP03_0051E", *INCOME_COLUMNS]
    check_table(d, dp03.name, ["GEO_ID", *dcols], nonnegative=dcols)
    d = _county_rows(d, dp03, areas)
    t = lambda df, cs: torch.tensor(df[list(cs)].apply(pd.to_numeric).to_numpy(dtype=np.float64))  # noqa: E731
    age_counts = t(c, ACS_AGE_COLUMNS)
    sex = t(c, ["DP05_0002E", "DP05_0003E"])
    old = t(c, ["DP05_0030E", "DP05_0031E"])
    prior = np.loadtxt(matrices / "mistry2021_New_York_age_distribution_18.csv", delimiter=",")[:, 1]
    F = {k: np.loadtxt(matrices / f"mistry2021_New_York_F_{k}_setting_18.csv", delimiter=",") for k in ("work", "school")}
    lower = torch.tensor(AGE_LOWER, dtype=torch.float64)
    return Marginals(
        areas=areas, age_labels=AGE_LABELS, age_lower=lower, age_upper=torch.tensor(AGE_UPPER, dtype=torch.float64),
        age_prior=torch.tensor(prior), age_groups=torch.tensor(ACS_GROUP), age_counts=age_counts, sex_counts=sex,
        employed=t(d, ["DP03_0004E"])[:, 0],
        # Mistry's share of each age band present in the work setting: the prior of employment by age
        employment_propensity=torch.tensor(F["work"].sum(1)).clamp(0, 1) * (lower >= 15).double(),
        households=t(d, ["DP03_0051E"])[:, 0], income_labels=INCOME_LABELS, income_counts=t(d, INCOME_COLUMNS),
        sex_by_age=((lower >= 65, old),),
        school_propensity=torch.tensor(F["school"].sum(1)).clamp(0, 1),
        source={"age_counts": census.name, "sex_counts": census.name, "employed": dp03.name, "households": dp03.name},
    )


def load_flows(boroughs: Sequence[str] | None = None, path: Path = FLOWS_FILE) -> torch.Tensor:
    """Workers commuting from home borough (rows) to work borough (columns) among ``boroughs``: ``[A, A]``."""
    areas = _check_boroughs(boroughs)
    path = Path(path)
    f = pd.read_csv(path)
    cols = ["h_state_fips", "h_county_fips", "w_state_fips", "w_county_fips", "flow"]
    check_table(f, path.name, cols, nonnegative=["flow"], numeric=cols[:4])
    f = f[(f["h_state_fips"] == 36) & (f["w_state_fips"] == 36)]
    code = {FIPS[b]: i for i, b in enumerate(areas)}
    for col in ("h_county_fips", "w_county_fips"):
        have = set(f[col].astype(int))
        missing = [b for b in areas if FIPS[b] not in have]
        if missing:
            raise PopulationError(f"{path.name}: column {col!r} has no flows for borough(s) {missing}: "
                                  f"the areas of the marginals do not match the commuting flows")
    f = f[f["h_county_fips"].isin(code) & f["w_county_fips"].isin(code)]
    m = torch.zeros(len(areas), len(areas), dtype=torch.float64)
    m[torch.tensor(f["h_county_fips"].map(code).to_numpy()), torch.tensor(f["w_county_fips"].map(code).to_numpy())] = \
        torch.tensor(f["flow"].to_numpy(dtype=np.float64))
    if bool((m.sum(1) == 0).any()):
        raise PopulationError(f"{path.name}: column 'flow' sums to zero for a home borough in {areas}")
    return m


def load_observed(start: str | pd.Timestamp, end: str | pd.Timestamp, boroughs: Sequence[str] | None = None,
                  path: Path = CASES_FILE) -> pd.DataFrame:
    """NYC DOHMH daily series, tidy: ``date, area, series, value``.

    ``series``: ``cases`` (confirmed, by diagnosis date), ``cases_all`` (confirmed + probable),
    ``hospitalizations`` (by admission date), ``deaths`` (by date of death). ``area``: the
    borough codes (all five, or ``boroughs``) and ``NYC`` (citywide; only when ``boroughs`` is None).
    Rows after ``end`` are never read into the result.
    """
    areas = _check_boroughs(boroughs)
    path = Path(path)
    df = pd.read_csv(path)
    check_table(df, path.name, ["date_of_interest"])
    df["date"] = pd.to_datetime(df["date_of_interest"], format="%m/%d/%Y")
    df = df[(df["date"] >= pd.Timestamp(start)) & (df["date"] <= pd.Timestamp(end))]
    frames = []
    prefixes = [(b, f"{b}_") for b in areas] + ([("NYC", "")] if boroughs is None else [])
    for area, p in prefixes:
        cols = {"cases": [f"{p}CASE_COUNT"], "cases_all": [f"{p}CASE_COUNT", f"{p}PROBABLE_CASE_COUNT"],
                "hospitalizations": [f"{p}HOSPITALIZED_COUNT"], "deaths": [f"{p}DEATH_COUNT"]}
        for series, cs in cols.items():
            check_table(df, path.name, cs, nonnegative=cs)
            frames.append(pd.DataFrame({"date": df["date"].to_numpy(), "area": area, "series": series,
                                        "value": df[cs].sum(axis=1).to_numpy(dtype=np.float64)}))
    return pd.concat(frames, ignore_index=True)


def load_observed_age(start: str | pd.Timestamp, end: str | pd.Timestamp, path: Path = AGE_RATE_FILE) -> pd.DataFrame:
    """Weekly NYC reported cases per 100,000 by age band, tidy: ``week_ending, age, value`` (blank = suppressed)."""
    path = Path(path)
    df = pd.read_csv(path)
    check_table(df, path.name, ["week_ending"])
    df["week_ending"] = pd.to_datetime(df["week_ending"], format="%m/%d/%Y")
    df = df[(df["week_ending"] >= pd.Timestamp(start)) & (df["week_ending"] <= pd.Timestamp(end))]
    long = df.drop(columns=["age_all_ages"], errors="ignore").melt("week_ending", var_name="age", value_name="value")
    long["age"] = long["age"].str.replace("age_", "", regex=False)
    return long


# NYC weekly-rate age bands as unions of our 5-year bands (approximate where bounds differ)
NYC_AGE_BANDS = {"0_4": (0,), "5_12": (1, 2), "13_17": (3,), "18_24": (4,), "25_34": (5, 6), "35_44": (7, 8),
                 "45_54": (9, 10), "55_64": (11, 12), "65_74": (13, 14), "75up": (15, 16, 17)}


def _trailing(x: pd.Series, window: int = 7) -> pd.Series:
    return x.rolling(window, min_periods=1).mean()


class DataWarning(UserWarning):
    """The run uses covariates extended beyond their data (``extrapolate=True``)."""


MAX_COVARIATE_GAP_DAYS = 10  # longest run of missing days in a covariate bridged by the trailing mean


def _checked_series(values: pd.Series, dates: pd.Series, file: str, column: str, low: float = 0.0) -> pd.Series:
    """A covariate column as floats indexed by date: numeric, finite, >= low, unique dates, short gaps only."""
    v = pd.to_numeric(values, errors="coerce")
    bad = v.isna() | ~np.isfinite(v.fillna(0)) | (v < low)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{file}: column {column!r}, row for {pd.Timestamp(dates.iloc[i]).date()}: expected a "
                        f"number >= {low:g}, got {values.iloc[i]!r} ({int(bad.sum())} bad row(s) in all)")
    s = pd.Series(v.to_numpy(dtype=float), index=pd.DatetimeIndex(dates))
    if s.index.has_duplicates:
        raise DataError(f"{file}: column {column!r}: duplicated date {s.index[s.index.duplicated()][0].date()}")
    s = s.sort_index()
    if len(s) > 1:
        # the source skips a few days (m50: 18 days, at most 8 in a row): the trailing mean bridges those;
        # a longer hole is not a gap in a series but missing data, and an error
        run = int((s.index.to_series().diff().dt.days.fillna(1) - 1).max())
        if run > MAX_COVARIATE_GAP_DAYS:
            at = s.index[int(np.argmax((s.index.to_series().diff().dt.days.fillna(1) - 1).to_numpy()))]
            raise DataError(f"{file}: column {column!r}: {run} consecutive missing days before {at.date()} (at most "
                            f"{MAX_COVARIATE_GAP_DAYS} are bridged by the trailing mean)")
    return s


def covariate_span() -> tuple[pd.Timestamp, pd.Timestamp]:
    """First and last date covered by every mobility covariate (MTA ridership and all boroughs' m50)."""
    mta = pd.to_datetime(pd.read_csv(MTA_FILE, usecols=["Date"])["Date"], format="%m/%d/%Y")
    m50 = pd.read_csv(M50_FILE, usecols=["admin2", "date"], parse_dates=["date"])
    per = m50.groupby("admin2")["date"].agg(["min", "max"])
    return max(mta.min(), per["min"].max()), min(mta.max(), per["max"].min())
