"""NYC calibration study: the forecast never reads data after --train-end."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("experiments.covid_nyc")

from experiments import covid_nyc
from experiments.covid_nyc import window_fit as study  # noqa: E402


def _spy(monkeypatch) -> list[pd.Timestamp]:
    ends: list[pd.Timestamp] = []
    real = covid_nyc.load_observed

    def spy(start, end, boroughs=None, **kw):
        ends.append(pd.Timestamp(end))
        return real(start, end, boroughs, **kw)

    monkeypatch.setattr(covid_nyc, "load_observed", spy)
    return ends


def test_observed_until_truncates_at_train_end(monkeypatch) -> None:
    ends = _spy(monkeypatch)
    df = study.observed_until("2020-03-01", "2020-04-15")
    assert pd.to_datetime(df["date"]).max() == pd.Timestamp("2020-04-15")
    assert ends == [pd.Timestamp("2020-04-15")]


def test_calibrate_cli_reads_no_data_after_train_end(monkeypatch, tmp_path) -> None:
    ends = _spy(monkeypatch)
    rc = study.calibrate(["--train-end", "2020-03-20", "--forecast-days", "3", "--steps", "1", "--scale", "0.0005",
                          "--replicates", "1", "--draws", "5", "--window", "14", "--out", str(tmp_path)])
    assert rc == 0
    assert ends and max(ends) <= pd.Timestamp("2020-04-05")
    fc = pd.read_csv(tmp_path / "forecast.csv", parse_dates=["date"])
    assert list(fc.columns) == ["date", "area", "series", "median", "lower_90", "upper_90"]
    assert fc["date"].min() == pd.Timestamp("2020-03-21") and fc["date"].max() == pd.Timestamp("2020-03-23")
    assert len(fc) == 3 * 6 * 2 and set(fc["area"]) == {"BX", "BK", "MN", "QN", "SI", "NYC"}
    assert (fc["lower_90"] <= fc["median"]).all() and (fc["median"] <= fc["upper_90"]).all()
    for f in ("params.json", "calibration.h5", "forecast_cases.png", "loss.png", "forecast_naive.csv"):
        assert (tmp_path / f).exists(), f
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["initial_prevalence"] in study.PREVALENCE_GRID  # chosen from the first (training) weeks
    assert len(summary["prevalence_shape_errors"]) == len(study.PREVALENCE_GRID)


def test_default_steps_shrink_with_the_rollout_and_stay_bounded() -> None:
    assert study.default_steps(76, 56) == 16
    assert 3 <= study.default_steps(396, 56) < study.default_steps(260, 56) < study.default_steps(76, 56)
    assert study.default_steps(20, 56) == 16
