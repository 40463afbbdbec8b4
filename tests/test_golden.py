"""Golden summary of a reference run of ``sir-demo``: a change in results must be deliberate.

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


def refresh() -> None:
    """Rewrite the golden file from the current code."""
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(sir_demo_summary(), indent=2) + "\n")


def test_sir_demo_matches_golden_summary() -> None:
    want = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(sir_demo_summary()))
    assert got == want, f"sir-demo summary changed: {got} != golden {want}; if intended, run python {__file__} --refresh"


if __name__ == "__main__":
    if "--refresh" in sys.argv:
        refresh()
        print(GOLDEN.read_text())
    else:
        print(json.dumps(sir_demo_summary(), indent=2))
