"""Readers of published formats that population synthesis needs, for any place.

Nothing here names a place: a study chooses its areas (county GEO_IDs) and files.

* **ACS data profiles** (data.census.gov CSV exports of DP05 "Demographic and Housing
  Estimates" and DP03 "Selected Economic Characteristics"): one row per geography, ``GEO_ID``
  (``0500000US`` + state FIPS + county FIPS for a county) and ``NAME``, then ``<code>E``
  estimates. An export may keep its second header row of labels (``Estimate!!SEX AND AGE!!...``);
  DP05 quantities are then found by label, so any year's layout works; without labels the
  2019-2023 column codes are used.
* **Mistry et al. (2021) contact matrices**: headerless ``B x B`` CSVs named
  ``..._{region}_F_{setting}_setting_{B}.csv`` (per-capita contact probability by setting,
  row = age of the person) and ``..._{region}_age_distribution_{B}.csv`` (``bin, count``); any
  US state or other region of that release.
* **ACS county-to-county commuting flows** (Census "Table 1. Residence County to Workplace
  County Commuting Flows" as CSV): ``h_state_fips, h_county_fips, w_state_fips, w_county_fips,
  flow``.

:func:`acs_marginals` turns these into :class:`~lpm.population.Marginals` for any set of counties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lpm.population import Marginals, PopulationError, check_table

__all__ = ["read_acs_profile", "acs_rows", "county_geo_id", "read_mistry_matrices", "read_mistry_age_distribution",
           "read_county_flows", "acs_marginals", "DP05_AGE_BANDS", "MISTRY_SETTING_WEIGHTS"]

#: DP05 age bands (label suffix, lower, upper years) in table order
DP05_AGE_BANDS = (("Under 5 years", 0, 5), ("5 to 9 years", 5, 10), ("10 to 14 years", 10, 15),
                  ("15 to 19 years", 15, 20), ("20 to 24 years", 20, 25), ("25 to 34 years", 25, 35),
                  ("35 to 44 years", 35, 45), ("45 to 54 years", 45, 55), ("55 to 59 years", 55, 60),
                  ("60 to 64 years", 60, 65), ("65 to 74 years", 65, 75), ("75 to 84 years", 75, 85),
                  ("85 years and over", 85, 95))
# label paths under "Estimate!!" and the 2019-2023 codes used when an export has no label row
_DP05 = {"total": ("SEX AND AGE!!Total population", "DP05_0001E"),
         "male": ("SEX AND AGE!!Total population!!Male", "DP05_0002E"),
         "female": ("SEX AND AGE!!Total population!!Female", "DP05_0003E"),
         "male65": ("SEX AND AGE!!Total population!!65 years and over!!Male", "DP05_0030E"),
         "female65": ("SEX AND AGE!!Total population!!65 years and over!!Female", "DP05_0031E"),
         **{f"age{i}": (f"SEX AND AGE!!Total population!!{lab}", f"DP05_{5 + i:04d}E")
            for i, (lab, _, _) in enumerate(DP05_AGE_BANDS)}}
#: DP03 (2019 layout) codes: employed civilians 16+, total households, 10 household income brackets
DP03_EMPLOYED, DP03_HOUSEHOLDS = "DP03_0004E", "DP03_0051E"
DP03_INCOME = tuple(f"DP03_{k:04d}E" for k in range(52, 62))
DP03_INCOME_LABELS = ("<10k", "10-15k", "15-25k", "25-35k", "35-50k", "50-75k", "75-100k", "100-150k", "150-200k", "200k+")
#: Mistry et al. 2021: contacts per day = w_k F_k summed over settings
MISTRY_SETTING_WEIGHTS = {"household": 4.11, "school": 11.41, "work": 8.07, "community": 2.79}


def county_geo_id(state_fips: int, county_fips: int) -> str:
    """ACS ``GEO_ID`` of a county, e.g. ``(36, 1)`` -> ``0500000US36001``."""
    return f"0500000US{int(state_fips):02d}{int(county_fips):03d}"


def read_acs_profile(path: str | Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """An ACS data-profile export: (table indexed by ``GEO_ID``, ``{label path: code}`` if labelled)."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str, encoding="utf-8-sig")
    check_table(df, path.name, ["GEO_ID", "NAME"])
    labels: dict[str, str] = {}
    if len(df) and df["GEO_ID"].iloc[0] == "Geography":
        for code, lab in df.iloc[0].items():
            if str(lab).startswith("Estimate!!"):
                labels.setdefault(str(lab).removeprefix("Estimate!!"), str(code))
        df = df.iloc[1:]
    return df.set_index("GEO_ID", drop=False), labels


def acs_rows(df: pd.DataFrame, geo_ids: Sequence[str], file: str) -> pd.DataFrame:
    """Rows of ``geo_ids`` in that order; the error names the file and the missing GEO_IDs."""
    missing = [g for g in geo_ids if g not in df.index]
    if missing:
        raise PopulationError(f"{file}: column 'GEO_ID' has no row for {missing}; the file covers "
                              f"{len(df)} geographies (e.g. {list(df.index[:3])})")
    return df.loc[list(geo_ids)]


def _numbers(rows: pd.DataFrame, cols: Sequence[str], file: str) -> Tensor:
    check_table(rows, file, list(cols), nonnegative=list(cols))
    return torch.tensor(rows[list(cols)].apply(pd.to_numeric).to_numpy(dtype=np.float64))


def _dp05_columns(labels: Mapping[str, str]) -> dict[str, str]:
    if not labels:
        return {k: code for k, (_, code) in _DP05.items()}
    out = {}
    for k, (path, _) in _DP05.items():
        if path not in labels:
            raise PopulationError(f"DP05: no column labelled 'Estimate!!{path}' in the export's label row")
        out[k] = labels[path]
    return out


def read_mistry_matrices(directory: str | Path, region: str, bins: int = 18,
                         weights: Mapping[str, float] = MISTRY_SETTING_WEIGHTS) -> dict[str, Tensor]:
    """Contacts per day by setting ``w_k F_k`` ``[bins, bins]`` for ``region`` (e.g. ``"New_York"``)."""
    return {k: torch.tensor(_mistry_f(directory, region, k, bins) * w, dtype=torch.float64) for k, w in weights.items()}


def _mistry_f(directory: str | Path, region: str, setting: str, bins: int) -> np.ndarray:
    f = _one(Path(directory), f"*{region}_F_{setting}_setting_{bins}.csv")
    m = np.loadtxt(f, delimiter=",")
    if m.shape != (bins, bins) or (m < 0).any():
        raise PopulationError(f"{f.name}: expected a {bins} x {bins} non-negative matrix, got shape {m.shape}")
    return m


def read_mistry_age_distribution(directory: str | Path, region: str, bins: int = 18) -> Tensor:
    """Population count per age bin ``[bins]`` behind the Mistry matrices of ``region``."""
    f = _one(Path(directory), f"*{region}_age_distribution_{bins}.csv")
    a = np.loadtxt(f, delimiter=",")
    if a.shape != (bins, 2) or (a[:, 1] < 0).any():
        raise PopulationError(f"{f.name}: expected {bins} rows 'bin,count' with non-negative counts, got shape {a.shape}")
    return torch.tensor(a[:, 1], dtype=torch.float64)


def _one(directory: Path, pattern: str) -> Path:
    hits = sorted(directory.glob(pattern))
    if len(hits) != 1:
        raise PopulationError(f"{directory}: expected one file matching {pattern!r}, found {[h.name for h in hits]}")
    return hits[0]


def read_county_flows(path: str | Path, counties: Sequence[tuple[int, int]]) -> Tensor:
    """Workers from home county (rows) to work county (columns) among ``(state, county)`` FIPS pairs: ``[A, A]``."""
    path = Path(path)
    f = pd.read_csv(path)
    cols = ["h_state_fips", "h_county_fips", "w_state_fips", "w_county_fips", "flow"]
    check_table(f, path.name, cols, nonnegative=["flow"], numeric=cols[:2])
    f = f.dropna(subset=["w_county_fips"])
    key = {(int(s), int(c)): i for i, (s, c) in enumerate(counties)}
    h = [key.get((int(s), int(c)), -1) for s, c in zip(f["h_state_fips"], f["h_county_fips"])]
    w = [key.get((int(s), int(c)), -1) for s, c in zip(pd.to_numeric(f["w_state_fips"]), pd.to_numeric(f["w_county_fips"]))]
    h, w = torch.tensor(h, dtype=torch.long), torch.tensor(w, dtype=torch.long)
    A = len(counties)
    for name, idx in (("h_county_fips", h), ("w_county_fips", w)):
        missing = [counties[i] for i in range(A) if not bool((idx == i).any())]
        if missing:
            raise PopulationError(f"{path.name}: column {name!r} has no flows for (state, county) {missing}")
    ok = (h >= 0) & (w >= 0)
    m = torch.zeros(A * A, dtype=torch.float64).index_add(0, (h * A + w)[ok], torch.tensor(f["flow"].to_numpy(np.float64))[ok])
    return m.view(A, A)


def acs_marginals(
    areas: Mapping[str, str],
    dp05: str | Path,
    *,
    mistry_dir: str | Path,
    mistry_region: str,
    dp03: str | Path | None = None,
    employed: Tensor | None = None,
    households: Tensor | None = None,
) -> Marginals:
    """:class:`Marginals` for ``areas`` (``{label: GEO_ID}``) from ACS DP05 (+ DP03) and Mistry priors.

    Age x sex come from DP05 (13 census bands split into 18 five-year bands by the Mistry
    age distribution, 65+ by sex as an extra constraint); employment, households and income
    from DP03. Without a DP03 file, ``employed [A]`` and ``households [A]`` must be given
    (no silent default): e.g. from a labour-force table of the study's own.
    """
    labels_, geo = tuple(areas), [areas[a] for a in areas]
    dp05 = Path(dp05)
    df, lab = read_acs_profile(dp05)
    rows = acs_rows(df, geo, dp05.name)
    col = _dp05_columns(lab)
    K = len(DP05_AGE_BANDS)
    age_counts = _numbers(rows, [col[f"age{i}"] for i in range(K)], dp05.name)
    sex = _numbers(rows, [col["male"], col["female"]], dp05.name)
    old = _numbers(rows, [col["male65"], col["female65"]], dp05.name)
    lower = torch.arange(0, 90, 5, dtype=torch.float64)
    upper = torch.cat([lower[1:], torch.tensor([95.0])])
    fine = [f"{int(a)}-{int(a) + 4}" for a in lower[:-1]] + ["85+"]
    # each five-year band belongs to the DP05 band that contains it
    coarse = torch.tensor([next(i for i, (_, lo, hi) in enumerate(DP05_AGE_BANDS) if lo <= a < hi) for a in lower.tolist()])
    prior = read_mistry_age_distribution(mistry_dir, mistry_region)
    # row sums of F: the share of each age band present in the work / school setting
    share = {k: torch.tensor(_mistry_f(mistry_dir, mistry_region, k, 18).sum(1)) for k in ("work", "school")}
    source = {"age_counts": dp05.name, "sex_counts": dp05.name}
    income_counts, income_labels = None, ()
    if dp03 is not None:
        dp03 = Path(dp03)
        d, _ = read_acs_profile(dp03)
        drows = acs_rows(d, geo, dp03.name)
        employed = _numbers(drows, [DP03_EMPLOYED], dp03.name)[:, 0]
        households = _numbers(drows, [DP03_HOUSEHOLDS], dp03.name)[:, 0]
        income_counts, income_labels = _numbers(drows, DP03_INCOME, dp03.name), DP03_INCOME_LABELS
        source.update(employed=dp03.name, households=dp03.name)
    elif employed is None or households is None:
        raise PopulationError("acs_marginals: without a DP03 file, pass employed [A] and households [A] "
                              f"for areas {list(labels_)}")
    else:
        source.update(employed="given", households="given")
    return Marginals(
        areas=labels_, age_labels=tuple(fine), age_lower=lower, age_upper=upper, age_prior=prior, age_groups=coarse,
        age_counts=age_counts, sex_counts=sex, employed=torch.as_tensor(employed, dtype=torch.float64),
        # Mistry's share of each age band present in the work setting: the prior of employment by age
        employment_propensity=share["work"].clamp(0, 1) * (lower >= 15).double(),
        households=torch.as_tensor(households, dtype=torch.float64), income_labels=income_labels,
        income_counts=income_counts, sex_by_age=((lower >= 65, old),),
        school_propensity=share["school"].clamp(0, 1), source=source,
    )
