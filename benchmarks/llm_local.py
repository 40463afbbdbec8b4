"""Measure the local model: seconds per archetype call, answers across age and case levels, cache hits.

Run: ``python -m benchmarks.llm_local --out out/llm_bench`` (needs ``lpm[local-llm]``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from llm_archetypes.archetypes import Archetypes
from llm_archetypes.asking import Asker
from llm_archetypes.backends import TransformersBackend
from llm_archetypes.cache import AnswerCache
from llm_archetypes.examples import CASES_BUCKET, isolation_question
from llm_archetypes.survey import survey

AGES = ("18-29", "30-49", "50-64", "65+")
SEXES = ("male", "female")
BOROUGHS = ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")
EMPLOYMENT = ("essential worker", "remote worker", "unemployed")
CASE_LEVELS = (5.0, 30.0, 75.0, 150.0, 400.0)


def nyc_like_archetypes() -> Archetypes:
    """Every age x sex x borough x employment combination once (K = 120)."""
    grids = torch.cartesian_prod(*(torch.arange(len(x)) for x in (AGES, SEXES, BOROUGHS, EMPLOYMENT)))
    cols = dict(zip(("age_band", "sex", "borough", "employment"), grids.T))
    return Archetypes.from_attributes(cols, list(cols), codebooks={"age_band": AGES, "sex": SEXES,
                                                                   "borough": BOROUGHS, "employment": EMPLOYMENT})


def main(argv: Sequence[str] | None = None) -> int:
    """Time batch-16 scoring, tabulate a survey over age x case level, measure the re-run cache hit rate."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/llm_bench")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=None, help="answer cache file (default: a fresh temporary one)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backend = TransformersBackend.gemma(device=a.device, batch_size=16)
    load_s = time.perf_counter() - t0
    q = isolation_question(cases_phrase="reported COVID-19 cases in {borough}",
                           resident="A resident of New York City: age {age_band}, {sex}, lives in {borough}, "
                                    "employment: {employment}.")
    arch = nyc_like_archetypes()
    prompts = [q.render(arch.labels[k], {"cases": 150.0}) for k in range(16)]
    backend.score(prompts[:2], ["yes", "no"])  # warm-up
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        backend.score(prompts, ["yes", "no"])
        times.append(time.perf_counter() - t)
    per_call = min(times) / 16
    t = time.perf_counter()
    texts = backend.complete(prompts)
    gen_per_call = (time.perf_counter() - t) / 16

    cache_path = Path(a.cache) if a.cache else Path(tempfile.mkdtemp()) / "bench.sqlite"
    frames = []
    first = Asker(backend, cache=AnswerCache(cache_path))
    t = time.perf_counter()
    for cases in CASE_LEVELS:
        frames.append(survey(arch, q, first, {"cases": cases}))
    first_s = time.perf_counter() - t
    rerun = Asker(backend, cache=AnswerCache(cache_path))
    for cases in CASE_LEVELS:
        survey(arch, q, rerun, {"cases": cases})
    import pandas as pd

    df = pd.concat(frames, ignore_index=True)
    df.to_csv(out / "survey.csv", index=False)
    df["cases_level"] = df["context_cases"].map({CASES_BUCKET.labels[i]: i for i in range(len(CASES_BUCKET.labels))})
    table = df.pivot_table(index="age_band", columns="cases_level", values="p_yes", aggfunc="mean").loc[list(AGES)]
    table.columns = [CASES_BUCKET.labels[int(c)] for c in table.columns]
    by_emp = df.groupby("employment")["p_yes"].mean()
    by_sex = df.groupby("sex")["p_yes"].mean()
    summary = {
        "device": a.device, "threads": torch.get_num_threads(), "load_seconds": load_s,
        "score_seconds_per_archetype_call_batch16": per_call, "score_batch16_seconds": min(times),
        "generate_seconds_per_archetype_call_batch16": gen_per_call, "example_generations": texts[:3],
        "archetypes": arch.K, "calls_per_decision": arch.K, "first_run": first.stats.as_dict(), "first_run_seconds": first_s,
        "rerun": rerun.stats.as_dict(), "p_yes_by_employment": by_emp.to_dict(), "p_yes_by_sex": by_sex.to_dict(),
        "p_yes_range": [float(df["p_yes"].min()), float(df["p_yes"].max())], "case_levels": list(CASE_LEVELS),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table.to_csv(out / "p_yes_age_by_cases.csv")
    print(json.dumps(summary, indent=2))
    print("mean P(yes) by age band (rows) and weekly cases per 100k (columns):")
    print(table.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
