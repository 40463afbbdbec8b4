"""Network SEIR demo: an epidemic on an Erdős–Rényi contact graph, with a lockdown.

Run: ``lpm run sir-demo --agents 100000 --days 150 --out out/sir_demo``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from lpm import Intervention, Model, Modulate, Network, Params, Positive
from lpm.cli import Experiment
from lpm.outputs import OutputDir
from lpm.networks import erdos_renyi, household_cliques
from substeps.epidemic import (Dwell, EpiState, EpiSystem, Progression, Transmission, epi_system, incidence, initial_state,
                               seir, stage_counts)


def build(agents: int = 100_000, mean_degree: float = 10.0, lockdown: tuple[int, int] | None = (40, 80),
          seed: int = 0, device: str = "cpu") -> tuple[Model, Params, EpiSystem, EpiState]:
    """Model, parameters, system and initial state of the demo (households + random community)."""
    disease = seir(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0))
    household = torch.randint(0, max(1, agents // 3), (agents,), generator=torch.Generator().manual_seed(seed))
    net = Network.from_layers({"household": household_cliques(household),
                               "community": erdos_renyi(agents, mean_degree, seed=seed + 1)}, agents)
    system = epi_system(disease, network=net, layer_scale_base=torch.ones(2), device=device)
    state = initial_state(disease, agents, max(1, agents // 10_000), seed=seed, layer_scale=torch.ones(2))
    days = 400
    schedule = torch.ones(days, 2)
    if lockdown is not None:
        schedule[lockdown[0]:lockdown[1], 1] = 0.3
    model = Model(
        [Modulate("lockdown", "layer_scale", "layer_scale_base", [Intervention("community_lockdown", schedule)]),
         Progression(disease), Transmission(disease, use_layer_scale=True)],
        {"incidence": incidence(disease), **stage_counts(disease)},
        state_type=EpiState, system_type=EpiSystem, dt=disease.dt, name="sir-demo",
    )
    return model, Params(beta=Positive(0.06)), system, state.to(device)


def run(argv: Sequence[str]) -> int:
    """CLI: build, run, and write results (HDF5, tidy CSV, plot) to --out."""
    ap = argparse.ArgumentParser(prog="lpm run sir-demo", description=__doc__)
    ap.add_argument("--agents", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-lockdown", action="store_true")
    ap.add_argument("--out", default="out/sir_demo")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    a = ap.parse_args(list(argv))
    # every output is checked before any work, and staged: a failed run leaves no partial files
    od = OutputDir(a.out, ("results.h5", "daily.csv", "epidemic.png", "summary.json"), overwrite=a.overwrite)
    out = od.staging
    model, params, system, state = build(a.agents, lockdown=None if a.no_lockdown else (40, 80), seed=a.seed, device=a.device)
    print(model.plan())
    t0 = time.perf_counter()
    res = model.simulate(params, system, state, a.days, seed=a.seed, progress=True)
    secs = time.perf_counter() - t0
    res.to_hdf5(str(out / "results.h5"), mode="w")
    res.to_pandas(start_date="2020-03-01").to_csv(out / "daily.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = res.plot(["incidence", "I"])
    ax.set_title(f"SEIR on a household + community network, N={a.agents:,}")
    plt.savefig(out / "epidemic.png", dpi=120, bbox_inches="tight")
    summary = {"agents": a.agents, "days": a.days, "seconds": secs,
               "agent_days_per_second": a.agents * a.days / secs,
               "attack_rate": float(res["R"][-1] + res["I"][-1] + res["E"][-1]) / a.agents}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    od.commit()
    print(json.dumps(summary, indent=2))
    return 0


EXPERIMENT = Experiment("sir-demo", "SEIR on a household + random network with a community lockdown", run)
