"""Golden summaries of reference runs (``sir-demo``; 45 days of the NYC model): a change in results must be deliberate.

Refresh after an intended change (and say why in the commit)::

    python tests/test_golden.py --refresh
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("golden") / "sir_demo.json"
ARGS = {"agents": 5000, "days": 120, "seed": 0}
GOLDEN_NYC = Path(__file__).with_name("golden") / "covid_nyc_short.json"
NYC_ARGS = {"scale": 0.002, "days": 45, "seed": 0, "llm": "rule", "params": "prior"}


def sir_demo_summary() -> dict:
    """Totals, peaks and final compartments of sir-demo at ``ARGS`` on CPU (deterministic)."""
    from experiments import sir_demo

    torch.set_num_threads(1)
    model, params, system, state = sir_demo.build(ARGS["agents"], seed=ARGS["seed"])
    res = model.simulate(params, system, state, ARGS["days"], seed=ARGS["seed"], progress=False)
    inc = res["incidence"].double()
    return {"args": ARGS, "total_infections": float(inc.sum()), "peak_incidence": float(inc.max()),
            "peak_day": int(inc.argmax()) + 1, "final": {k: float(res[k][-1]) for k in ("S", "E", "I", "R")},
            "incidence_day_20_35_50": [float(inc[d - 1]) for d in (20, 35, 50)]}


def nyc_summary() -> dict:
    """Per-borough totals and the infection peak of the NYC model (prior parameters) at ``NYC_ARGS`` on CPU."""
    import tempfile

    from experiments import covid_nyc

    torch.set_num_threads(1)
    a = NYC_ARGS
    with tempfile.TemporaryDirectory() as cache:
        s = covid_nyc.build(scale=a["scale"], seed=a["seed"], days=a["days"], llm=a["llm"], cache_dir=cache)
        res = s.model.simulate(s.params, s.system, s.state, a["days"], seed=a["seed"], progress=False)
    totals = {k: dict(zip(s.areas, res[k].double().sum(0).tolist()))
              for k in ("infections", "symptomatic_onsets", "cases", "hospitalizations", "deaths")}
    city = res["infections"].double().sum(1)
    return {"args": a, "agents": int(s.state.stage.numel()), "totals": totals, "infection_peak_day": int(city.argmax()) + 1,
            "mean_isolation_answer": round(float(res["isolation_answers"].double().mean()), 4)}


def refresh() -> None:
    """Rewrite the golden files from the current code."""
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(sir_demo_summary(), indent=2) + "\n")
    GOLDEN_NYC.write_text(json.dumps(nyc_summary(), indent=2) + "\n")


def test_sir_demo_matches_golden_summary() -> None:
    want = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(sir_demo_summary()))
    assert got == want, f"sir-demo summary changed: {got} != golden {want}; if intended, run python {__file__} --refresh"


def test_short_nyc_run_matches_golden_summary() -> None:
    want = json.loads(GOLDEN_NYC.read_text())
    got = json.loads(json.dumps(nyc_summary()))
    assert got == want, f"NYC summary changed: {got} != golden {want}; if intended, run python {__file__} --refresh"


if __name__ == "__main__":
    if "--refresh" in sys.argv:
        refresh()
        print(GOLDEN.read_text(), GOLDEN_NYC.read_text())
    else:
        print(json.dumps(sir_demo_summary(), indent=2), json.dumps(nyc_summary(), indent=2))
