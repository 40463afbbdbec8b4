"""COVID-19 in New York City, March 2020 - March 2021, on a synthetic population from census tables.

Run: ``lpm run covid-nyc [--out out/covid_nyc]`` replays the shipped calibration
(``data/covid_nyc_fit/fit.json``, see :mod:`experiments.covid_nyc_fit`);
``lpm run covid-nyc --params prior [--scale 0.02 --days 396 --device cpu --seed 0 --out out/covid_nyc]``
runs the uncalibrated model described here.

Writes to ``--out``: ``results.h5`` (observables at simulation scale), ``daily.csv`` (tidy ``date,
area, series, value``; values divided by ``scale``, i.e. city-equivalent counts; area = borough
code or NYC), ``cases_by_borough.png`` / ``hospitalizations_by_borough.png`` /
``deaths_by_borough.png`` (simulated vs observed, 7-day means), ``age_profile.png`` (cumulative
reported cases per 100,000 by NYC age band, simulated vs observed), ``validation.json``
(synthesized marginals vs census, household sizes, per-layer age-mixing correlation and mean
degree vs the Mistry matrices), ``summary.json`` (timings, peak memory, totals, LLM calls and cache
hits) and ``survey.csv`` (tidy weekly isolation answers: ``week, date, archetype, age_band, sex,
borough, employment, size, cases_per_100k, cases_level, answer, compliance``).
Behaviour: ``--llm rule|local|http|off`` (default ``rule``) answers weekly, per archetype, whether
its members isolate when symptomatic (see :func:`build`); ``--llm-cache PATH`` (default beside the
population cache), ``--llm-mode replay`` reproduces a recorded run with no model present,
``--llm-url``/``--llm-model`` for ``http``.
The population is cached in ``~/.cache/lpm/covid_nyc`` (or ``--cache-dir`` / ``$LPM_CACHE_DIR``),
keyed by scale, seed, boroughs and a hash of the input tables.

Python API (used by calibration)::

    from experiments.covid_nyc import build, load_observed
    setup = build(scale=0.01, seed=0, device="cpu", start="2020-03-01", days=None, boroughs=None)
    res = setup.model.simulate(setup.params, setup.system, setup.state, len(setup.dates), seed=0, grad=True)
    res["cases"]                  # [T, A] reported cases per day and borough (labels = setup.areas)
    obs = load_observed("2020-03-01", "2021-03-31")   # tidy: date, area, series, value

Observables ``[T, A]`` (agents at simulation scale; divide by ``setup.scale`` for city counts):
``infections`` (entries into E), ``symptomatic_onsets`` (into Is), ``cases`` (reported: tested at
onset), ``hospitalizations`` (into H), ``deaths`` (into D); ``cases_by_age``, ``infections_by_age``,
``deaths_by_age`` ``[T, G]``. All carry gradients to the parameters via the carrier mechanism.
With archetypes (``llm != 'off'``): ``isolation_answers [T, K]`` (raw answer per archetype, updated
every 7 days; labels = archetype attributes) and ``weekly_cases_per_100k [T, A]`` (reported cases
per 100k per borough over the last 7 days: what the next decision sees). ``setup.asker.stats``
counts calls and cache hits; ``setup.decision.archetypes`` holds the K archetypes.

Parameters (``setup.params``; :data:`substeps.epidemic.covid.PARAM_DOCS`): ``beta`` (per
contact-day), ``ihr_scale``, ``ifr_scale`` (multipliers of the published age tables),
``ascertainment`` (P(report | symptomatic) at full testing capacity), ``isolation`` (share of
non-household contacts dropped by a symptomatic agent who isolates; with archetypes, each agent
isolates with its archetype's weekly compliance ``state.isolation``), and the link
``isolation_link.slope/bias`` (answer -> compliance, identity at the start).

Data (``data/``, each folder with its README and licence): ACS 2023 DP05 (age x sex per
borough), ACS 2019 DP03 (employment, households, household income), ACS 2009-2013 commuting
flows, Mistry et al. 2021 New York contact matrices, MTA ridership and Descartes Labs m50
mobility, NYC DOHMH daily cases / hospitalisations / deaths. Covariates are read only up
to the run's last date.

Contact layers: household (cliques), school (age-structured within schools), work
(workplaces in the commuting-flow work borough), community (age-structured within the home
borough). Per-layer contacts per day follow the Mistry matrices ``C_k = w_k F_k`` with
``w = (4.11, 11.41, 8.07, 2.79)`` (household, school, work, community).

Time-varying contact multipliers (all tensors over the run's dates):

* mobility (``AreaContacts``, per borough and layer): work = MTA subway ridership share of the
  comparable pre-pandemic day (trailing 7-day mean); community = ``0.3 + 0.7 min(1, m50/100)``
  with the borough's Descartes Labs m50 index (trailing 7-day mean); days the source skips (m50:
  18 days, at most 8 in a row) carry the last mean forward; a non-numeric or negative value, or
  more than 10 missing days in a row, is an error naming the file, column and date. Dates
  outside the covariates (2020-03-01..2021-03-31) need ``extrapolate=True`` (``--extrapolate``);
* ``school_closure`` (school layer): NYC DOE schools closed 2020-03-16 (Mayor's announcement of
  2020-03-15); blended learning from 2020-09-29 at ~30% in-person attendance; all buildings
  closed 2020-11-19; elementary reopened 2020-12-07, middle schools 2021-02-25, high schools
  2021-03-22 (NYC DOE announcements);
* ``stay_at_home`` (work and community): New York State on PAUSE, Executive Order 202.8,
  effective 2020-03-22, until Phase 1 reopening 2020-06-08 (multiplier 0.5: distancing and
  closures beyond what ridership shows; an assumption to calibrate);
* ``reopening`` (work and community): NYC Phase 1 2020-06-08 (0.6), Phase 2 2020-06-22 (0.7),
  Phase 3 2020-07-06 (0.75), Phase 4 2020-07-20 (0.8), indoor dining 2020-09-30 (0.85), indoor
  dining closed 2020-12-14 (0.8), reopened 2021-02-12 (0.85) (NYS Forward announcements);
* ``vaccination`` (susceptibility by age band): NYS eligibility 75+ from 2021-01-11, 65-74 from
  2021-01-12, 60-64 from 2021-03-10, 50-59 from 2021-03-23, 30-49 from 2021-03-30; uptake 0.6%
  of the band per day up to 60%, efficacy against infection 0.8 after 14 days (Polack et al.
  NEJM 2020 report 95% against symptomatic disease; 0.8 is a conservative assumption);
* testing capacity (``Testing``): ``0.15 + 0.85 / (1 + exp(-(t - 2020-04-20) / 10 days))``, the
  scale-up of NYC testing from a few thousand to tens of thousands of tests a day by mid-May
  2020 (an assumption; ``ascertainment`` is fitted on top).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from lpm import CodeBook, Intervention, Model, Network, Observable, Params, State, System, check_tensor, tensor_field
from lpm.cli import Experiment, add_output_args, date_arg, device_arg, positive_float, positive_int, probability
from lpm.data import data_path
from lpm.errors import ConfigError, DataError
from lpm.outputs import OutputDir
from lpm.tensorfile import load_tensors, save_tensors
from lpm.networks import household_cliques
from lpm.population import (Marginals, Population, PopulationError, check_table, marginal_errors, matrix_correlation,
                            mixing_matrix, synthesize, unit_sbm)
from substeps.epidemic import initial_state
from substeps.epidemic.covid import CovidState, CovidSystem, age_tables, covid_disease, covid_model, covid_params, covid_system
from llm_archetypes import AnswerCache, ArchetypeDecision, Archetypes, Asker, Backend, Link, Question, make_backend
from llm_archetypes.examples import CASES_BUCKET, isolation_question, isolation_rule

__all__ = ["build", "load_observed", "load_observed_age", "NYCSetup", "NYCState", "BOROUGHS", "DEFAULT_SCALE", "load_marginals",
           "load_flows", "load_contact_matrices", "validate_setup", "nyc_archetypes", "nyc_isolation_question",
           "BoroughDecision", "survey_table", "EXPERIMENT"]

DATA = data_path()
BOROUGHS = ("BX", "BK", "MN", "QN", "SI")
FIPS = {"BX": 5, "BK": 47, "MN": 61, "QN": 81, "SI": 85}
NAMES = {"BX": "Bronx", "BK": "Brooklyn", "MN": "Manhattan", "QN": "Queens", "SI": "Staten Island"}
M50_NAMES = {"BX": "Bronx", "BK": "Kings County", "MN": "New York County", "QN": "Queens County", "SI": "Richmond County"}
DEFAULT_SCALE = 0.02
LAYERS = ("household", "school", "work", "community")
SETTING_WEIGHTS = {"household": 4.11, "school": 11.41, "work": 8.07, "community": 2.79}  # Mistry et al. 2021
AGE_LOWER = tuple(range(0, 90, 5))
AGE_LABELS = tuple(f"{a}-{a + 4}" for a in AGE_LOWER[:-1]) + ("85+",)
AGE_UPPER = tuple(list(AGE_LOWER[1:]) + [95])
# ACS DP05 coarse bands (DP05_0005E..DP05_0017E) for each 5-year band
ACS_AGE_COLUMNS = tuple(f"DP05_{k:04d}E" for k in range(5, 18))
ACS_GROUP = (0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 10, 11, 11, 12)
CACHE_VERSION = "3"  # bump when synthesis code changes so old caches are not reused (3: data-only HDF5)
#: NYC starting values (uncalibrated): beta chosen so that the March 2020 hospital peak is of the observed order
NYC_DEFAULTS: dict[str, float] = {"beta": 0.25}
DEFAULT_PREVALENCE = 1e-3

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


# ----------------------------------------------------------------------------------------- data
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


# ------------------------------------------------------------------------------ covariates
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


def check_dates(dates: pd.DatetimeIndex, extrapolate: bool = False) -> None:
    """Raise unless the run's dates lie within the covariate data; with ``extrapolate``, warn how they are extended."""
    first, last = covariate_span()
    if dates[0] >= first and dates[-1] <= last:
        return
    where = f"run dates {dates[0].date()}..{dates[-1].date()} fall outside the covariate data {first.date()}..{last.date()}"
    if not extrapolate:
        raise ConfigError(f"{where} (MTA ridership, Descartes Labs m50); choose --start/--days within it, or pass "
                          f"--extrapolate (extrapolate=True) to extend the covariates")
    import warnings

    warnings.warn(f"{where}: covariates are extended: before {first.date()} mobility is pre-pandemic (ridership share "
                  f"1.0, m50 index 100); after {last.date()} the last 7-day mean is held (forward fill); policy and "
                  f"vaccination schedules keep their last value", DataWarning, stacklevel=3)


def area_schedule(dates: pd.DatetimeIndex, areas: Sequence[str]) -> torch.Tensor:
    """Per date, borough and layer: mobility multipliers ``[T, A, L]`` (household, school, work, community)."""
    end = dates[-1]
    mta = pd.read_csv(MTA_FILE)
    check_table(mta, MTA_FILE.name, ["Date", "Subways: % of Comparable Pre-Pandemic Day"])
    mta["date"] = pd.to_datetime(mta["Date"], format="%m/%d/%Y")
    mta = mta[mta["date"] <= end]
    col = "Subways: % of Comparable Pre-Pandemic Day"
    # clip at 1.2: a cap on the contact multiplier (busier than usual), not a repair of bad values, which are errors
    subway = _trailing(_checked_series(mta[col], mta["date"], MTA_FILE.name, col).clip(0, 1.2))
    work = subway.reindex(dates).ffill().fillna(1.0).to_numpy()
    m50 = pd.read_csv(M50_FILE, parse_dates=["date"])
    check_table(m50, M50_FILE.name, ["admin2", "date", "m50_index"])
    m50 = m50[m50["date"] <= end].pivot(index="date", columns="admin2", values="m50_index")
    T, A = len(dates), len(areas)
    out = torch.ones(T, A, len(LAYERS))
    for a, b in enumerate(areas):  # five boroughs
        if M50_NAMES[b] not in m50.columns:
            raise PopulationError(f"{M50_FILE.name}: column 'admin2' has no rows for {M50_NAMES[b]!r}")
        col = m50[M50_NAMES[b]].dropna()
        idx = _trailing(_checked_series(col, col.index.to_series(), M50_FILE.name, f"m50_index ({M50_NAMES[b]})"))
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


# ------------------------------------------------------------------------------ population
def _data_hash() -> str:
    h = hashlib.sha256()
    for f in (CENSUS_FILE, DP03_FILE, FLOWS_FILE, *sorted(MATRIX_DIR.glob("*_18.csv"))):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cache_path(cache_dir: str | Path | None, scale: float, seed: int, areas: Sequence[str]) -> Path:
    root = Path(cache_dir or os.environ.get("LPM_CACHE_DIR") or Path.home() / ".cache" / "lpm") / "covid_nyc"
    key = hashlib.sha256(f"{CACHE_VERSION}|{scale!r}|{seed}|{','.join(areas)}|{_data_hash()}".encode()).hexdigest()[:20]
    return root / f"population_{key}.h5"


def build_population(scale: float, seed: int, areas: Sequence[str], cache_dir: str | Path | None = None,
                     use_cache: bool = True) -> tuple[Population, Network, Marginals, dict[str, Any]]:
    """Synthesize (or load from cache) the population and its four contact layers."""
    marg = load_marginals(areas)
    flows = load_flows(areas)
    path = _cache_path(cache_dir, scale, seed, areas)
    info: dict[str, Any] = {"cache": str(path)}
    t0 = time.perf_counter()
    expect = {"version": CACHE_VERSION, "scale": float(scale), "seed": int(seed), "areas": list(areas),
              "data_hash": _data_hash()}
    if use_cache and path.exists():
        pop, net = _read_population(path, expect)
        info.update(cached=True, build_seconds=time.perf_counter() - t0)
        return pop, net, marg, info
    pop = synthesize(marg, scale, seed, flows=flows)
    C = load_contact_matrices()
    gen = torch.Generator().manual_seed(seed + 7919)
    age = pop.age.long()
    layers = {
        "household": household_cliques(pop.household),
        "school": unit_sbm(pop.school, age, C["school"], gen, population_average=True),
        "work": unit_sbm(pop.workplace, age, C["work"], gen, population_average=True),
        "community": unit_sbm(pop.area.to(torch.int32), age, C["community"], gen),
    }
    net = Network.from_layers(layers, pop.num_agents)
    info.update(cached=False, build_seconds=time.perf_counter() - t0)
    if use_cache:
        tensors = {**{f"population/{k}": v for k, v in pop.items() if isinstance(v, torch.Tensor)},
                   **{f"network/{k}": getattr(net, k) for k in _NET_FIELDS}}
        meta = {**expect, "codebooks": {k: list(b.labels) for k, b in (pop.codebooks or {}).items()},
                "pop_scale": pop.scale, "num_nodes": net.num_nodes, "layer_names": list(net.layer_names)}
        save_tensors(path, tensors, meta)
    return pop, net, marg, info


_NET_FIELDS = ("edge_index", "weight", "layer", "rowptr")


def _read_population(path: Path, expect: dict[str, Any]) -> tuple[Population, Network]:
    """Load a cached population (data only, checksummed, keyed by the inputs' hash) and validate it like a fresh one."""
    from lpm.errors import CheckpointError

    tensors, meta = load_tensors(path, expect, what="population cache")
    try:
        pop = Population(**{k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("population/")},
                         codebooks={k: CodeBook(k, tuple(v)) for k, v in meta["codebooks"].items()},
                         scale=float(meta["pop_scale"]))
        net = Network(**{k: tensors[f"network/{k}"] for k in _NET_FIELDS}, num_nodes=int(meta["num_nodes"]),
                      layer_names=tuple(meta["layer_names"]))
        dims = pop.validate()
        net.validate(dims)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"population cache {path}: refused: {exc}; delete it to rebuild") from None
    return pop, net


# ------------------------------------------------------------------------------ behaviour (LLM archetypes)
#: coarse age bands of the archetypes as unions of the 5-year codes (AGE_LABELS); labels start with the lower age
ARCHETYPE_AGE_BANDS = {"under 20": (0, 1, 2, 3), "20 to 29": (4, 5), "30 to 44": (6, 7, 8), "45 to 64": (9, 10, 11, 12),
                       "65 to 74": (13, 14), "75 or older": (15, 16, 17)}
EMPLOYMENT_LABELS = ("not employed (unemployed, student, retired or not in the labor force)", "employed")
CASE_WINDOW = 7  # days of reported cases behind the weekly context
DECISION_EVERY = 7  # days between isolation decisions
ISOLATION_QUESTION = "isolate_if_symptomatic"
LLM_KINDS = ("rule", "local", "http", "off")


@dataclass(frozen=True)
class NYCState(CovidState):
    """:class:`CovidState` plus the raw archetype answers kept between weekly decisions."""

    isolation_score: torch.Tensor | None = tensor_field(
        ("K",), torch.float32, "last raw answer per archetype (P(yes) to the isolation question)", optional=True)


def nyc_isolation_question(name: str = ISOLATION_QUESTION) -> Question:
    """'Will this person stay home this week if they have symptoms?' with the borough's weekly reported cases."""
    return isolation_question(name, cases_phrase="reported COVID-19 cases in {borough}",
                              resident="A resident of New York City: age {age_band}, {sex}, lives in {borough}, "
                                       "employment: {employment}.")


def nyc_archetypes(pop: Population, areas: Sequence[str]) -> Archetypes:
    """Archetypes by coarse age band x sex x borough x employment (at most 6 x 2 x 5 x 2 = 120)."""
    band_of = torch.zeros(len(AGE_LABELS), dtype=torch.int8)
    for k, codes in enumerate(ARCHETYPE_AGE_BANDS.values()):
        band_of[list(codes)] = k
    attrs = {"age_band": band_of[pop.age.long().cpu()], "sex": pop.sex.cpu(), "borough": pop.area.cpu(),
             "employment": pop.employed.cpu().to(torch.int8)}
    books = {"age_band": tuple(ARCHETYPE_AGE_BANDS), "sex": ("male", "female"),
             "borough": tuple(NAMES[a] for a in areas), "employment": EMPLOYMENT_LABELS}
    return Archetypes.from_attributes(attrs, list(attrs), codebooks=books)


class WeeklyCases:
    """Context of each archetype: reported cases per 100,000 in its borough over the last ``CASE_WINDOW`` days."""

    def __init__(self, archetypes: Archetypes, population: torch.Tensor | None = None) -> None:
        self.borough = archetypes.codes[:, archetypes.attributes.index("borough")].long()  # [K] area codes
        # residents per area [A], fixed: a partitioned run (lpm.distributed) holds only some agents per rank
        self.population = population

    def per_area(self, system: System, state: State) -> torch.Tensor:
        """Reported cases per 100,000 per area over the window ``[A]`` (population: given, else counted from ``area``)."""
        window = state.recent_cases
        if self.population is not None:
            n = self.population.to(window.device, window.dtype)
        else:
            n = torch.bincount(system.area.long(), minlength=window.shape[1]).to(window.dtype)
        return window.sum(0) / n.clamp_min(1.0) * 1e5

    def __call__(self, system: System, state: State, t: int) -> list[dict[str, float]]:
        rate = self.per_area(system, state).detach().cpu()[self.borough]
        return [{"cases": float(r)} for r in rate.tolist()]


class BoroughDecision(ArchetypeDecision):
    """:class:`ArchetypeDecision` whose context is per archetype (``context(system, state, t) -> K dicts``): its own borough's cases."""

    def __call__(self, params: Params, system: System, state: State, t: int, rng: torch.Generator) -> State:
        scores = getattr(state, self.store)
        check_tensor(f"{self.name}: {self.store}", scores, (self.archetypes.K,))
        if self.is_decision_step(t):
            contexts = self.context(system, state, t)
            if len(contexts) != self.archetypes.K:
                raise ValueError(f"{self.name}: context returned {len(contexts)} dicts, expected one per archetype "
                                 f"(K={self.archetypes.K})")
            prompts = [self.question.render(self.archetypes.labels[k], contexts[k]) for k in range(self.archetypes.K)]
            self.asker.stats.decisions += 1
            ans = self.asker.ask(self.question, prompts)
            scores = ans.scores.to(device=scores.device, dtype=scores.dtype)
        value = self.link(scores) if self.link is not None else scores
        if self.archetypes.archetype_id.device != value.device:  # move the [N] ids once, not every step
            self.archetypes = self.archetypes.to(value.device)
        per_agent = self.archetypes.broadcast(value).to(torch.float32)
        return state.replace(**{self.target: per_agent, self.store: scores})


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or os.environ.get("LPM_CACHE_DIR") or Path.home() / ".cache" / "lpm") / "covid_nyc"


def _make_asker(llm: str | Backend, device: str, cache_dir: str | Path | None, llm_cache: str | Path | bool | None,
                llm_mode: str, llm_url: str | None, llm_model: str | None, llm_fallback: float | None = None,
                llm_max_fallback_share: float | None = None) -> Asker:
    backend = llm if isinstance(llm, Backend) else make_backend(llm, rule=isolation_rule, url=llm_url, model=llm_model,
                                                                device=device)
    # no fallback unless asked for: a run must not finish on invented behaviour
    fallback = None if llm_fallback is None else {ISOLATION_QUESTION: [float(llm_fallback), 1.0 - float(llm_fallback)]}
    share = None if llm_fallback is None else (0.05 if llm_max_fallback_share is None else llm_max_fallback_share)
    if llm_cache is False:
        return Asker(backend, mode="off", fallback=fallback, max_fallback_share=share)
    path = _cache_root(cache_dir) / "llm_answers.sqlite" if llm_cache in (None, True) else Path(llm_cache)
    return Asker(backend, cache=AnswerCache(path), mode=llm_mode, fallback=fallback, max_fallback_share=share)


def survey_table(setup: "NYCSetup", answers: torch.Tensor, cases_per_100k: torch.Tensor) -> pd.DataFrame:
    """Tidy weekly survey: week, date, archetype attributes, size, borough's cases per 100k and bucket, answer, compliance.

    ``answers [T, K]`` is the ``isolation_answers`` observable, ``cases_per_100k [T, A]`` the
    ``weekly_cases_per_100k`` observable (the decision at step t saw the value after step t-1).
    """
    decide = setup.decision
    if decide is None:
        raise ValueError("survey_table: this setup has no archetype decision (built with llm='off')")
    arch = decide.archetypes
    base = arch.to_pandas()
    boro = arch.codes[:, arch.attributes.index("borough")].long().cpu()
    ans = answers.detach().cpu().double()
    cases = cases_per_100k.detach().cpu().double()
    frames = []
    with torch.no_grad():
        for week, t in enumerate(t for t in range(ans.shape[0]) if decide.is_decision_step(t)):
            seen = cases[t - 1, boro] if t > 0 else torch.zeros(arch.K, dtype=torch.float64)
            df = base.copy()
            df.insert(0, "date", setup.dates[t].date())
            df.insert(0, "week", week)
            df["cases_per_100k"] = seen.numpy()
            df["cases_level"] = [CASES_BUCKET(float(v)) for v in seen.tolist()]
            df["answer"] = ans[t].numpy()
            df["compliance"] = decide.link(ans[t].float().to(decide.link.slope.device)).double().cpu().numpy() if decide.link is not None else ans[t].numpy()
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------ the setup
@dataclass
class NYCSetup:
    """Everything a run or a calibration needs: model, parameters, system, initial state, dates, areas."""

    model: Model
    params: Params
    system: CovidSystem
    state: CovidState
    dates: pd.DatetimeIndex
    areas: tuple[str, ...]
    scale: float
    population: Population
    marginals: Marginals
    age_labels: tuple[str, ...] = AGE_LABELS
    info: dict[str, Any] = field(default_factory=dict)
    asker: Asker | None = None  # LLM backend + cache + counters (None with llm='off')
    decision: ArchetypeDecision | None = None  # the weekly isolation decision substep (archetypes, link)

    @property
    def steps(self) -> int:
        """Number of daily steps (one per date)."""
        return len(self.dates)

    def simulate(self, seed: int = 0, **kwargs: Any):
        """``model.simulate`` over all dates with the setup's parameters, system and state."""
        return self.model.simulate(self.params, self.system, self.state, self.steps, seed=seed, **kwargs)


def build(scale: float = DEFAULT_SCALE, seed: int = 0, device: str = "cpu", start: str = "2020-03-01",
          days: int | None = None, boroughs: Sequence[str] | None = None, *, llm: str | Backend = "rule",
          llm_cache: str | Path | bool | None = None, llm_mode: str = "record", llm_url: str | None = None,
          llm_model: str | None = None, llm_fallback: float | None = None, llm_max_fallback_share: float | None = None,
          extrapolate: bool = False, **overrides: Any) -> NYCSetup:
    """Build the NYC COVID-19 model.

    ``days=None`` runs to 2021-03-31. ``overrides``: parameter values by name (``beta=0.06``),
    ``initial_prevalence`` (share of agents infected (E) at ``start``, default 1e-3),
    ``disable`` (names of policies to leave out: ``school_closure``, ``stay_at_home``,
    ``reopening``, ``vaccination``), ``cache_dir``, ``use_cache`` (default True).

    Isolation behaviour: ``llm`` (``rule`` default, ``local`` offline Gemma 3 270M, ``http``
    with ``llm_url``/``llm_model``, a :class:`~llm_archetypes.Backend`, or ``off``) answers
    once a week per archetype (age band x sex x borough x employment) whether its members
    isolate when symptomatic, given the borough's reported cases per 100k over the last
    week; a learnable :class:`~llm_archetypes.Link` (``params.isolation_link``, fitted with
    the rest) maps answers to per-agent compliance ``state.isolation``, and the parameter
    ``isolation`` is the share of non-household contacts an isolating agent drops.
    ``llm='off'``: every symptomatic agent complies (the model before archetypes).
    ``llm_fallback``: P(yes) used for an archetype whose answer failed after all attempts
    (default None: such a failure stops the run); with it, ``llm_max_fallback_share``
    (default 0.05) bounds the share of fallback answers before the run stops.
    ``extrapolate``: allow dates outside the covariate data (2020-03-01..2021-03-31), with a
    :class:`DataWarning` saying how covariates are extended (default: an error).
    ``llm_cache``: answer cache file (default ``<cache root>/covid_nyc/llm_answers.sqlite``;
    ``False``: no cache); ``llm_mode``: ``record`` or ``replay`` (no backend calls).
    """
    areas = _check_boroughs(boroughs)
    try:
        start_ts = pd.Timestamp(start)
    except (ValueError, TypeError):
        raise ConfigError(f"start: expected a date YYYY-MM-DD, got {start!r}") from None
    if days is None:
        days = int((pd.Timestamp("2021-03-31") - start_ts).days) + 1
    if days <= 0:
        raise ConfigError(f"days: expected > 0, got {days}")
    dates = pd.date_range(start_ts, periods=days, freq="D")
    check_dates(dates, extrapolate)
    disable = tuple(overrides.pop("disable", ()))
    prevalence = float(overrides.pop("initial_prevalence", DEFAULT_PREVALENCE))
    if not 0.0 <= prevalence <= 1.0:
        raise ConfigError(f"initial_prevalence: expected a share in [0, 1], got {prevalence!r}")
    if llm_fallback is not None and not 0.0 <= float(llm_fallback) <= 1.0:
        raise ConfigError(f"llm_fallback: expected P(yes) in [0, 1], got {llm_fallback!r}")
    overrides = {**NYC_DEFAULTS, **overrides}
    cache_dir = overrides.pop("cache_dir", None)
    use_cache = bool(overrides.pop("use_cache", True))
    params = covid_params(**overrides)
    pop, net, marg, info = build_population(scale, seed, areas, cache_dir, use_cache)
    mid = [(lo + hi) / 2 for lo, hi in zip(AGE_LOWER, AGE_UPPER)]
    disease = covid_disease()
    tables = age_tables(mid)
    age = pop.age.long()
    N = pop.num_agents
    g = torch.Generator().manual_seed(seed + 104729)
    infected = torch.rand(N, generator=g) < prevalence
    L = len(LAYERS)
    system = covid_system(disease, age_mid=mid, area=pop.area, age=pop.age, area_schedule=area_schedule(dates, areas),
                          test_capacity=test_capacity(dates), reduced_layers=[name != "household" for name in LAYERS],
                          network=net, layer_scale_base=torch.ones(L), susceptibility_base=tables["susceptibility"][age])
    epi = initial_state(disease, N, infected, seed=seed, susceptibility=tables["susceptibility"][age],
                        layer_scale=torch.ones(L), contact_factor=torch.ones(N, L))
    if not isinstance(llm, Backend) and llm not in LLM_KINDS:
        raise ValueError(f"llm: expected one of {LLM_KINDS} or a Backend, got {llm!r}")
    asker, decide, behaviour, extra = None, None, [], {}
    state_kw: dict[str, Any] = {}
    if llm != "off":
        asker = _make_asker(llm, device, cache_dir, llm_cache, llm_mode, llm_url, llm_model, llm_fallback,
                            llm_max_fallback_share)
        arch = nyc_archetypes(pop, areas)
        residents = torch.bincount(pop.area.long().cpu(), minlength=len(areas)).float()
        # identity at the start (compliance = the answer's P(yes)); slope and bias are fitted
        link = Link("logit_affine", low=0.0, high=1.0)
        params.add_module("isolation_link", link)
        decide = BoroughDecision("isolation_decision", archetypes=arch, question=nyc_isolation_question(), asker=asker,
                                 context=WeeklyCases(arch, residents), context_reads=("recent_cases", "area"), target="isolation",
                                 store="isolation_score", every=DECISION_EVERY, link=link)
        behaviour = [decide]
        cases = WeeklyCases(arch, residents)
        extra = {"isolation_answers": decide.observable(),
                 "weekly_cases_per_100k": Observable(lambda y, s: cases.per_area(y, s).detach().clone(), labels=areas,
                                                     reads=("recent_cases",),
                                                     doc="reported cases per 100k per borough over the last 7 days")}
        state_kw = {"isolation": torch.ones(N), "isolation_score": decide.initial_scores(),
                    "recent_cases": torch.zeros(CASE_WINDOW, len(areas))}
    state = NYCState(**dict(epi.items()), contact_factor_base=torch.ones(N, L), reported=torch.zeros(N), **state_kw)
    vacc = [] if "vaccination" in disable else [vaccination(dates, pop.age.to(device))]
    model = covid_model(disease, areas=areas, age_labels=AGE_LABELS,
                        policies=[iv.to(device) for iv in policies(dates, disable)], vaccination=vacc, name="covid-nyc",
                        behaviour=behaviour, individual_isolation=decide is not None,
                        case_window=CASE_WINDOW if decide is not None else 0, observables=extra, state_type=NYCState)
    info.update(agents=N, edges=net.num_edges, **{k: v for k, v in net.summary().items() if k.startswith("mean_degree")})
    if decide is not None:
        info.update(llm=asker.backend.name, llm_model=asker.backend.model, archetypes=decide.archetypes.K,
                    llm_cache=str(asker.cache.path) if asker.cache is not None else None)
    return NYCSetup(model, params.to(device), system.to(device), state.to(device), dates, areas, float(scale), pop, marg,
                    AGE_LABELS, info,
                    asker, decide)


def validate_setup(setup: NYCSetup) -> dict[str, Any]:
    """Synthesized marginals vs census, household sizes, and per-layer age mixing vs Mistry matrices."""
    pop, net = setup.population, setup.system.network.to("cpu")
    C = load_contact_matrices()
    age = pop.age.long()
    out: dict[str, Any] = {"marginals": marginal_errors(pop, setup.marginals)}
    sizes = torch.bincount(pop.household.long())
    hh_area = torch.zeros(sizes.numel(), dtype=torch.long).index_put_((pop.household.long(),), pop.area.long())
    out["household_size"] = {
        "mean_by_area": {a: float(sizes[hh_area == i].double().mean()) for i, a in enumerate(setup.areas)},
        "census_mean_by_area": {a: float(setup.marginals.age_counts[i].sum() / setup.marginals.households[i])
                                for i, a in enumerate(setup.areas)},
        "distribution": (torch.bincount(sizes, minlength=11)[1:].double() / sizes.numel()).tolist(),
    }
    layers = {}
    for name in LAYERS:
        ei, _ = net.layer_edges(name)
        syn = mixing_matrix(ei, age, len(AGE_LABELS))
        src = C[name]
        layers[name] = {"age_mixing_correlation": matrix_correlation(syn, src),
                        "mean_degree": ei.shape[1] / pop.num_agents,
                        "source_mean_contacts": float((src.sum(1) * torch.bincount(age, minlength=18).double()).sum() / pop.num_agents)}
    out["layers"] = layers
    return out


# ------------------------------------------------------------------------------ CLI
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
        from experiments.covid_nyc_fit import run_fitted  # imported on use: it imports this module

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
    boroughs = a.boroughs.split(",") if a.boroughs else None
    # every output is checked before any work, and staged: a failed run leaves no partial files
    with OutputDir(a.out, OUTPUT_FILES, overwrite=a.overwrite, resume=a.resume, keep=(CHECKPOINT_FILE,)) as od:
        t0 = time.perf_counter()
        setup = build(a.scale, a.seed, a.device, a.start, a.days, boroughs, cache_dir=a.cache_dir,
                      use_cache=not a.no_cache, llm=a.llm, llm_cache=a.llm_cache, llm_mode=a.llm_mode,
                      llm_url=a.llm_url, llm_model=a.llm_model, llm_fallback=a.llm_fallback,
                      llm_max_fallback_share=a.llm_max_fallback_share, extrapolate=a.extrapolate)
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
    """CLI: ``lpm calibrate covid-nyc`` (the sequential whole-history calibration in experiments.covid_nyc_fit)."""
    # imported on use: the calibration study itself imports this module
    from experiments.covid_nyc_fit import calibrate as run_calibration

    return run_calibration(argv)


def run_ranks(argv: Sequence[str], ranks: int) -> int:
    """CLI: ``lpm run covid-nyc --ranks N`` (the prior model partitioned over N processes; experiments.covid_nyc_distributed)."""
    from experiments.covid_nyc_distributed import run_ranks as run_partitioned

    return run_partitioned(argv, ranks)


EXPERIMENT = Experiment("covid-nyc", "COVID-19 in New York City 2020-03..2021-03 on a synthetic census population", run,
                        calibrate=calibrate, run_ranks=run_ranks)
