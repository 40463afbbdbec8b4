"""The command line fails early, in one line, with exit status 2 (issues 17 and 19), on the NYC study at tiny scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import torch

from lpm.cli import main
from lpm.errors import DataError

from reliability_server import Misbehaving, serve

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET-0123456789"
TINY = ["--scale", "0.005", "--days", "14", "--boroughs", "SI", "--checkpoint-every", "7"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("popcache")


@pytest.fixture()
def server() -> Iterator[tuple[str, Misbehaving]]:
    srv = Misbehaving()
    yield from ((url, srv) for url in serve(srv))


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """``lpm ARGS`` in-process: exit status (argparse's SystemExit included), stdout, stderr."""
    try:
        rc = main(args)
    except SystemExit as e:
        rc = int(e.code)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines, "no error message"
    return lines[-1]


# ----------------------------------------------------------------- probe 17.4: argument errors are one line, exit 2
@pytest.mark.parametrize("args,message", [
    (["run", "covid-nyc", "--params", "prior", "--scale", "0"], "argument --scale: expected a finite number > 0, got 0"),
    (["run", "covid-nyc", "--params", "prior", "--days", "0"], "argument --days: expected an integer > 0, got 0"),
    (["run", "covid-nyc", "--params", "prior", "--start", "2020-13-45"], "argument --start: expected a date YYYY-MM-DD"),
    (["run", "covid-nyc", "--params", "prior", "--device", "nonsense"], "argument --device: expected a device such as cpu, cuda"),
    (["calibrate", "covid-nyc", "--train-end", "notadate"], "argument --train-end: expected a date YYYY-MM-DD, got 'notadate'"),
    (["calibrate", "covid-nyc", "--train-end", "2020-05-01", "--forecast-days", "0"],
     "argument --forecast-days: expected an integer > 0, got 0"),
    (["calibrate", "covid-nyc", "--scale", "-1"], "argument --scale: expected a finite number > 0, got -1"),
    (["run", "covid-nyc", "--params", "prior", "--llm-fallback", "2"], "argument --llm-fallback: expected a number in [0, 1]"),
])
def test_bad_arguments_are_one_line_exit_2(args: list[str], message: str, capsys) -> None:
    rc, _, err = run(args, capsys)
    assert rc == 2 and message in one_line_error(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_on_a_cpu_build_is_one_line_exit_2(capsys) -> None:
    rc, _, err = run(["run", "covid-nyc", "--params", "prior", "--device", "cuda"], capsys)
    assert rc == 2 and "CUDA is not available" in one_line_error(err)


@pytest.mark.slow  # a fresh interpreter (~10 s of imports); the in-process tests cover the same path
def test_library_error_is_one_line_exit_2_from_the_console(tmp_path: Path) -> None:
    """End to end through a real process: an unknown borough (a library error) prints ``lpm: error:``, exits 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "lpm.cli", "run", "covid-nyc", "--params", "prior", "--boroughs", "XX", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 2, p.stderr
    assert one_line_error(p.stderr).startswith("lpm: error: boroughs: expected distinct codes")


def test_unexpected_exceptions_keep_their_traceback(monkeypatch) -> None:
    from experiments import covid_nyc as nyc

    monkeypatch.setattr(nyc.cli, "build", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["run", "covid-nyc", "--params", "prior", "--out", "/tmp/lpm-never-written-" + str(os.getpid())])


# ----------------------------------------------------------------- probe 17.3 / 19: dates within the data
def test_calibrate_train_end_after_the_data_is_an_error(tmp_path: Path, capsys) -> None:
    t0 = time.perf_counter()
    rc, _, err = run(["calibrate", "covid-nyc", "--train-end", "2030-01-01", "--out", str(tmp_path / "c")], capsys)
    line = one_line_error(err)
    assert rc == 2 and "--train-end 2030-01-01 is after the last observation (2021-03-31)" in line
    assert "the data cover 2020-03-01..2021-03-31" in line
    assert time.perf_counter() - t0 < 30  # before any population is built
    assert not (tmp_path / "c" / "forecast.csv").exists()


def test_calibrate_train_end_before_enough_data_is_an_error(tmp_path: Path, capsys) -> None:
    rc, _, err = run(["calibrate", "covid-nyc", "--train-end", "2020-03-05", "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and "need at least 14" in one_line_error(err)


@pytest.mark.parametrize("args", [["--start", "2024-01-01", "--days", "10"], ["--days", "2000"]])
def test_run_dates_outside_the_covariates_are_an_error(args: list[str], tmp_path: Path, capsys) -> None:
    rc, _, err = run(["run", "covid-nyc", "--params", "prior", "--boroughs", "SI", "--out", str(tmp_path / "o"), *args], capsys)
    assert rc == 2 and "outside the covariate data 2020-03-01..2021-03-31" in one_line_error(err)
    assert "--extrapolate" in err


def test_extrapolation_is_explicit_and_says_how(cache: Path) -> None:
    from experiments import covid_nyc as nyc

    with pytest.warns(nyc.DataWarning, match="after 2021-03-31 the last 7-day mean is held"):
        nyc.build(nyc.NYCConfig(0.005, 0, "cpu", "2021-03-28", 7, ("SI",), cache_dir=cache, llm="off", extrapolate=True))
    with pytest.raises(Exception, match="initial_prevalence: expected a share in \\[0, 1\\], got 1.5"):
        nyc.NYCConfig(0.005, 0, "cpu", "2020-03-01", 7, ("SI",), cache_dir=cache, llm="off", initial_prevalence=1.5)


def test_bad_mobility_values_are_errors_not_filled(tmp_path: Path, monkeypatch) -> None:
    from experiments import covid_nyc as nyc

    df = pd.read_csv(nyc.MTA_FILE)
    col = "Subways: % of Comparable Pre-Pandemic Day"
    df.loc[10, col] = -0.3
    bad = tmp_path / "mta.csv"
    df.to_csv(bad, index=False)
    monkeypatch.setattr(nyc.data, "MTA_FILE", bad)
    dates = pd.date_range("2020-03-01", periods=30)
    with pytest.raises(DataError, match=rf"mta.csv: column '{col}', row for 2020-03-11: expected a number >= 0"):
        nyc.area_schedule(dates, ("SI",))
    df.loc[10, col] = float("nan")
    df.to_csv(bad, index=False)
    with pytest.raises(DataError, match="row for 2020-03-11"):
        nyc.area_schedule(dates, ("SI",))


def test_case_data_is_validated_before_the_simulation(tmp_path: Path, monkeypatch, cache: Path, capsys) -> None:
    from experiments import covid_nyc as nyc

    df = pd.read_csv(nyc.CASES_FILE)
    df.loc[5, "SI_CASE_COUNT"] = -4
    bad = tmp_path / "cases.csv"
    df.to_csv(bad, index=False)
    monkeypatch.setattr(nyc.load_observed, "__defaults__", (None, bad))
    monkeypatch.setattr(nyc.NYCSetup, "simulate", lambda *a, **k: pytest.fail("simulated before validating the data"))
    rc, _, err = run(["run", "covid-nyc", "--params", "prior", *TINY, "--out", str(tmp_path / "o"), "--cache-dir", str(cache)], capsys)
    assert rc == 2 and "cases.csv" in one_line_error(err) and "SI_CASE_COUNT" in err


# ----------------------------------------------------------------- probe 17.5 / 19: outputs checked first, never mixed
def test_output_in_the_way_fails_before_any_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    (out / "results.h5").mkdir(parents=True)
    t0 = time.perf_counter()
    rc, _, err = run(["run", "covid-nyc", "--params", "prior", *TINY, "--out", str(out), "--overwrite"], capsys)
    assert rc == 2 and "'results.h5' exists and is not a regular file" in one_line_error(err)
    assert time.perf_counter() - t0 < 5


def test_non_empty_out_is_refused_unless_overwrite_and_resume_matches(tmp_path: Path, cache: Path, capsys) -> None:
    out = tmp_path / "o"
    base = ["run", "covid-nyc", "--params", "prior", *TINY, "--out", str(out), "--cache-dir", str(cache), "--llm-cache",
            str(tmp_path / "a.sqlite")]
    rc, stdout, _ = run(base, capsys)
    assert rc == 0 and "llm: 0 of 48 answers were fallbacks (0.0%)" in stdout  # the share, printed every run
    first = (out / "daily.csv").read_bytes()
    assert (out / "checkpoint.h5").exists() and not any(p.name.startswith(".staging") for p in out.iterdir())
    rc, _, err = run(base, capsys)
    assert rc == 2 and "not empty" in one_line_error(err) and "--overwrite" in err
    rc, _, _ = run([*base, "--resume"], capsys)  # resumes from the final checkpoint: the same run
    assert rc == 0 and (out / "daily.csv").read_bytes() == first
    assert json.loads((out / "summary.json").read_text())["resumed_from_day"] == 14
    rc, _, err = run([*base, "--resume", "--days", "10"], capsys)
    assert rc == 2 and "written by a different run" in one_line_error(err) and "steps: saved 14, now 10" in err
    rc, _, err = run([*base, "--resume", "--seed", "1"], capsys)
    assert rc == 2 and "seed 0 differs from this run's seed 1" in one_line_error(err)
    rc, _, _ = run([*base[:-2], "--overwrite", "--llm", "off"], capsys)  # a different run replaces all of the old one
    assert rc == 0 and not (out / "survey.csv").exists()


# ----------------------------------------------------------------- probe 17.1: a study does not run on invented behaviour
def test_study_against_401_server_stops_at_once_exit_2(server, tmp_path: Path, cache: Path, capsys, monkeypatch) -> None:
    url, srv = server
    srv.default = "401"
    monkeypatch.setenv("LPM_LLM_API_KEY", KEY)
    out = tmp_path / "o"
    t0 = time.perf_counter()
    rc, _, err = run(["run", "covid-nyc", "--params", "prior", *TINY, "--out", str(out), "--cache-dir", str(cache), "--llm", "http",
                      "--llm-url", url, "--llm-model", "m", "--llm-cache", str(tmp_path / "a.sqlite")], capsys)
    assert rc == 2 and "HTTP 401" in err and "API key" in one_line_error(err)
    assert time.perf_counter() - t0 < 60
    assert not (out / "summary.json").exists() and not (out / "survey.csv").exists()
    assert KEY not in err


def test_study_fallback_share_above_bound_stops_naming_the_error(server, tmp_path: Path, cache: Path, capsys,
                                                                  monkeypatch) -> None:
    url, srv = server
    srv.default = "invalid_json"
    monkeypatch.setenv("LPM_LLM_MAX_RETRIES", "0")
    out = tmp_path / "o"
    rc, stdout, err = run(["run", "covid-nyc", "--params", "prior", *TINY, "--out", str(out), "--cache-dir", str(cache), "--llm", "http",
                           "--llm-url", url, "--llm-model", "m", "--llm-cache", str(tmp_path / "a.sqlite"),
                           "--llm-fallback", "0.5", "--llm-max-fallback-share", "0.05"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "24 of 24 answers (100.0%) are the fallback value, more than max_fallback_share=0.05" in line
    assert "invalid JSON reply" in line
    assert "llm: 24 of 24 answers were fallbacks (100.0%)" in stdout


def test_http_study_run_keeps_the_key_out_of_every_file(server, tmp_path: Path, cache: Path, capsys,
                                                        monkeypatch) -> None:
    url, srv = server
    monkeypatch.setenv("LPM_LLM_API_KEY", KEY)
    out = tmp_path / "o"
    rc, stdout, err = run(["run", "covid-nyc", "--params", "prior", *TINY, "--out", str(out), "--cache-dir", str(cache), "--llm", "http",
                           "--llm-url", url, "--llm-model", "m", "--llm-cache", str(tmp_path / "a.sqlite")], capsys)
    assert rc == 0, err
    assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in srv.requests) and srv.requests
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "summary.json" for p in files) and any(p.suffix == ".sqlite" for p in files)
    assert not [p for p in files if KEY.encode() in p.read_bytes()]
    assert KEY not in stdout + err


# ----------------------------------------------------------------- the fitted replay (the default `lpm run covid-nyc`)
def test_fitted_replay_refuses_bad_arguments_and_outputs_in_the_way(tmp_path: Path, capsys) -> None:
    rc, _, err = run(["run", "covid-nyc", "--scale", "0", "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "argument --scale: expected a finite number > 0, got 0" in one_line_error(err)
    rc, _, err = run(["run", "covid-nyc", "--fit", str(tmp_path / "missing.json"), "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and "fit record not found" in one_line_error(err)
    out = tmp_path / "c"
    (out / "daily.csv").mkdir(parents=True)
    t0 = time.perf_counter()
    rc, _, err = run(["run", "covid-nyc", "--out", str(out), "--overwrite"], capsys)
    assert rc == 2 and "'daily.csv' exists and is not a regular file" in one_line_error(err)
    assert time.perf_counter() - t0 < 30  # refused before the replay
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("an earlier run")
    rc, _, err = run(["run", "covid-nyc", "--out", str(tmp_path / "d")], capsys)
    assert rc == 2 and "not empty" in one_line_error(err)
