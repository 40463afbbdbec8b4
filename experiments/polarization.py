"""Polarization and echo chambers: feeds and homophilous rewiring on a follow graph.

Initial left-right opinions are drawn from ANES 1996 per archetype (party id x education).
Three scenarios share the population, the follow graph and the seed:

* ``chronological``: feed ranked by recency, no rewiring;
* ``echo``: feed ranked by similarity, unfollowing of distant accounts and following of
  similar ones (homophilous rewiring);
* ``diverse``: the same rewiring, but the feed puts cross-cutting posts first.

Opinions move by averaging bounded confidence over the posts shown (Hegselmann-Krause
normalization) with anchoring to one's initial opinion. Echo chambers are measured by
the opinion correlation across follow edges (network) and across shown posts (exposure).

Run: ``lpm run polarization --agents 1000000 --steps 25 --out out/polarization``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from lpm import Fixed, Interval, Model, Network, Observable, Params
from lpm.cli import Experiment
from lpm.outputs import OutputDir
from lpm.networks import follow_graph, friendship_paradox
from substeps.opinion import (
    Anchoring,
    BoundedConfidence,
    Feed,
    HomophilousRewiring,
    OpinionState,
    OpinionSystem,
    anes_population,
    neighbour_correlation,
    initial_opinions,
    polarization_observables,
)

SCENARIOS = {
    "chronological": {"ranking": "recency", "rewire": False},
    "echo": {"ranking": "similarity", "rewire": True},
    "diverse": {"ranking": "diversity", "rewire": True},
}


def build_population(agents: int, follows: int, seed: int, device: str) -> tuple[OpinionSystem, OpinionState, dict]:
    """ANES-drawn opinions on a preferential-attachment follow graph; partisans more stubborn."""
    pop = anes_population(agents, seed=seed, device=device)
    ei = follow_graph(agents, follows, reciprocity=0.3, seed=seed + 1, device=device)
    net = Network.from_layers({"follow": ei}, agents, coalesce=False)
    strong = (pop.pid == 0) | (pop.pid == 6)
    stub = torch.where(strong, 0.05, 0.01).to(device)
    system, state = initial_opinions(pop.opinion, net, stubbornness=stub, archetype=pop.archetype, archetype_names=pop.names)
    return system, state, {"names": pop.names, "share": pop.share.tolist()}


def scenario_model(name: str, feed_k: int, repulsion: bool) -> Model:
    """The plan of one scenario: [rewiring], feed, bounded confidence, anchoring."""
    spec = SCENARIOS[name]
    steps = ([HomophilousRewiring(rate=0.05, window=200)] if spec["rewire"] else [])
    steps += [Feed(feed_k, spec["ranking"], post_rate=0.5),
              BoundedConfidence(normalize="confidence", repulsion=repulsion), Anchoring()]
    obs = polarization_observables()
    obs["exposure_corr"] = Observable(lambda y, s: neighbour_correlation(s.opinion, s.network, s.exposure),
                                      reads=("opinion", "network", "exposure"), doc="opinion correlation across shown posts")
    return Model(steps, obs, state_type=OpinionState, system_type=OpinionSystem, name=f"polarization-{name}")


def lr_distribution(x: torch.Tensor) -> list[float]:
    """Shares of the 7 ANES left-right categories (opinion mapped back to 1..7 and rounded)."""
    c = (x[:, 0].detach().cpu() * 3 + 4).round().clamp(1, 7).long()
    return (torch.bincount(c, minlength=8)[1:].double() / c.numel()).tolist()


def run(argv: Sequence[str]) -> int:
    """CLI: build the ANES population and follow graph, run the scenarios, write HDF5, PNG, JSON."""
    ap = argparse.ArgumentParser(prog="lpm run polarization", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=25, help="days of feed reading")
    ap.add_argument("--follows", type=int, default=5, help="accounts each new account follows")
    ap.add_argument("--feed-k", type=int, default=5, help="posts shown per agent per day")
    ap.add_argument("--confidence", type=float, default=0.4, help="bounded-confidence radius on [-1, 1]")
    ap.add_argument("--convergence", type=float, default=0.3)
    ap.add_argument("--unfollow", type=float, default=0.6, help="unfollow threshold (opinion distance)")
    ap.add_argument("--repulsion", action="store_true", help="repel opinions farther than 1.2 (strength 0.1)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/polarization")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    a = ap.parse_args(list(argv))
    names = [s for s in a.scenarios.split(",") if s]
    bad = [s for s in names if s not in SCENARIOS]
    if bad:
        ap.error(f"--scenarios: unknown {bad}; known: {list(SCENARIOS)}")
    # every output is checked before any work, and staged: a failed run leaves no partial files
    od = OutputDir(a.out, ("results.h5", "summary.json", "polarization_metrics.png", "opinion_distribution.png"), overwrite=a.overwrite)
    out = od.staging
    t0 = time.perf_counter()
    system, state, meta = build_population(a.agents, a.follows, a.seed, a.device)
    build_s = time.perf_counter() - t0
    und = torch.cat([state.network.edge_index.long(), state.network.edge_index.long().flip(0)], 1)
    from lpm.networks import symmetrize

    fp = friendship_paradox(symmetrize(und, a.agents), a.agents)
    params = Params(confidence=Interval(a.confidence, 0, 3), convergence=Interval(a.convergence, 0, 1),
                    unfollow_threshold=Fixed(a.unfollow), repulsion_threshold=Fixed(1.2), repulsion_strength=Fixed(0.1))
    summary: dict = {"agents": a.agents, "steps": a.steps, "seed": a.seed, "device": a.device,
                     "edges": state.network.num_edges, "build_seconds": build_s,
                     "friendship_paradox": {k: v for k, v in fp.items() if k != "knn"},
                     "initial_lr_distribution": lr_distribution(state.opinion), "scenarios": {}}
    results = {}
    for name in names:
        model = scenario_model(name, a.feed_k, a.repulsion)
        print(model.plan())
        t1 = time.perf_counter()
        res = model.simulate(params, system, state, a.steps, seed=a.seed, device=a.device, progress=False).detach()
        secs = time.perf_counter() - t1
        results[name] = res
        res.to_hdf5(str(out / "results.h5"), group=name, mode="a" if len(results) > 1 else "w")
        fin = res.final_state
        summary["scenarios"][name] = {
            "seconds": secs, "agent_steps_per_second": a.agents * a.steps / secs,
            "final": {k: float(v[-1]) for k, v in res.observables.items()},
            "initial_step": {k: float(v[0]) for k, v in res.observables.items()},
            "final_lr_distribution": lr_distribution(fin.opinion),
            "final_mean": float(fin.opinion[:, 0].mean()), "final_sd": float(fin.opinion[:, 0].std()),
        }
        print(name, json.dumps(summary["scenarios"][name]["final"]))
    _plots(results, state, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    od.commit()
    print(json.dumps({k: v for k, v in summary.items() if k != "scenarios"}, indent=2))
    return 0


def _plots(results: dict, initial: OpinionState, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["variance", "bimodality", "esteban_ray", "clusters", "neighbour_corr", "exposure_corr"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, k in zip(axes.flat, keys):
        for name, res in results.items():
            ax.plot(res.time.numpy(), res[k].numpy(), label=name)
        ax.set_title(k)
        ax.set_xlabel("day")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out / "polarization_metrics.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = torch.linspace(-1, 1, 43).numpy()
    ax.hist(initial.opinion[:, 0].cpu().numpy(), bins=bins, histtype="step", lw=2, color="k", label="initial (ANES 1996)", density=True)
    for name, res in results.items():
        ax.hist(res.final_state.opinion[:, 0].cpu().numpy(), bins=bins, histtype="step", lw=1.5, label=name, density=True)
    ax.set_xlabel("left-right opinion (-1 extremely liberal, +1 extremely conservative)")
    ax.legend()
    fig.savefig(out / "opinion_distribution.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


EXPERIMENT = Experiment("polarization", "Echo chambers from similarity feeds and homophilous rewiring (ANES 1996 start)", run)
