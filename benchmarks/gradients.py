"""Gradient estimators against finite differences, per case and horizon.

``python -m benchmarks.gradients [--quick] [--cases well-mixed,er,household,nyc] [--estimators presence,linear]``

For each case (an SEIR with gamma latent 3 +- 1.5 and infectious 5 +- 2 days, 1% seeded, on
a well-mixed population, an Erdős–Rényi network of mean degree 10, or households (cliques
of mean size 3) + an Erdős–Rényi community of mean degree 6) and each horizon H, the target
is the gradient of an expected outcome: cumulative infections through day H with respect
to ``beta``. Printed
per row: the autograd estimate (mean ± s.e. over seeds), the central finite difference with
common random numbers (mean ± s.e. over seed pairs), their ratio, the variance of one
simulation's gradient, the wall time of one differentiable simulation, and the bytes
autograd retains per agent-day. One differentiable rollout of the longest horizon gives
every horizon (one backward per horizon).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from benchmarks.cases import SavedBytes

HORIZONS = (8, 30, 60, 150)


@dataclass
class Case:
    """A differentiable simulation: ``run(theta, seed, grad) -> (outcomes [H], agent_days, theta_leaf)``."""

    name: str
    agents: int
    theta: float
    run: Callable[[float, int, bool, str], tuple[Tensor, Tensor | None]]
    horizons: tuple[int, ...]
    target: str


def _seir():
    from substeps.epidemic import Dwell, seir

    return seir(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0))


def _epi_case(name: str, n: int, kind: str, beta: float, horizons: tuple[int, ...]) -> Case:
    from lpm import Model, Network, Params, Positive
    from lpm.networks import erdos_renyi, household_cliques
    from substeps.epidemic import EpiState, Progression, Transmission, epi_system, incidence, initial_state

    disease = _seir()
    g = torch.Generator().manual_seed(11)
    state = initial_state(disease, n, max(5, n // 100), seed=3)
    if kind == "well-mixed":
        system = epi_system(disease, group=torch.zeros(n, dtype=torch.int8), mixing=torch.ones(1, 1))
    elif kind == "er":
        system = epi_system(disease, network=Network.from_layers({"community": erdos_renyi(n, 10.0, seed=1)}, n))
    else:
        hh = torch.randint(0, max(1, n // 3), (n,), generator=g)
        net = Network.from_layers({"household": household_cliques(hh), "community": erdos_renyi(n, 6.0, seed=1)}, n)
        system = epi_system(disease, network=net)
    T = max(horizons)
    models: dict[str, Model] = {}

    def model(estimator: str) -> Model:
        if estimator not in models:
            models[estimator] = Model([Transmission(disease, network=kind != "well-mixed", estimator=estimator), Progression(disease)],
                                      {"incidence": incidence(disease)}, state_type=EpiState, dt=disease.dt)
        return models[estimator]

    def run(theta: float, seed: int, grad: bool, estimator: str) -> tuple[Tensor, Tensor | None]:
        params = Params(beta=Positive(theta))
        res = model(estimator).simulate(params, system, state, T, seed=seed, grad=grad, progress=False)
        cum = res["incidence"].cumsum(0)
        out = torch.stack([cum[h - 1] for h in horizons])
        return out, (params.raw_beta if grad else None)

    return Case(name, n, beta, run, horizons, "d cum. infections(H) / d beta")


def _nyc_case(horizons: tuple[int, ...], scale: float = 0.01, week_day: int = 14) -> Case:
    """The calibrated NYC model: d (citywide cases-to-be in the week ending at day H) / d (contact multiplier of week j).

    ``theta`` multiplies the non-household contacts of every borough in week ``j`` (the week of
    day ``week_day``, 2020-03-15); the outcome is the week's symptomatic onsets (``testable``,
    which reported cases are a linear image of: ascertainment times a delay), summed over the
    boroughs. The contact network of the fit (zero-initialised) gives a multiplier of 1 elsewhere.
    """
    import pandas as pd

    from experiments import covid_nyc_fit as nf
    from lpm.rng import Streams

    T = max(horizons)
    end = max(pd.Timestamp("2020-03-01") + pd.Timedelta(days=T), pd.Timestamp("2020-05-17"))
    cfg = nf.FitConfig(train_end=str(end.date()), scale=scale)
    p = nf.make_problem(cfg)
    wk = int(p.week[week_day])
    names = [s.name for s in p.model.substeps]
    base = p.params.delta.detach().clone()
    del p.params.delta  # replaced per run by a tensor that carries theta's gradient

    def run(theta: float, seed: int, grad: bool, estimator: str) -> tuple[Tensor, Tensor | None]:
        tr = next(s for s in p.model.substeps if s.name == "transmission")
        tr.estimator = estimator
        raw = torch.tensor(math.log(math.expm1(theta)), dtype=torch.float64, requires_grad=grad)
        log_m = torch.log(_constrained(raw)).to(torch.float32)
        delta = base.clone()
        delta = torch.cat([delta[:wk], (delta[wk] + log_m).unsqueeze(0), delta[wk + 1:]])
        p.params.delta = delta
        with torch.set_grad_enabled(grad):
            from calibration import rollout

            sim, _ = rollout(p.model, p.params, p.system0, p.state0, T, grad=grad, streams=Streams(seed, names, p.state0.device))
        onsets = sim["testable"].sum(1)
        out = torch.stack([onsets[h - 7:h].sum() for h in horizons])
        return out, (raw if grad else None)

    return Case(f"NYC (scale {scale}, {p.population.num_agents:,} agents)", p.population.num_agents, 1.0, run, horizons,
                "d onsets(week ending H) / d contact multiplier(week of 2020-03-15)")


def _constrained(raw: Tensor) -> Tensor:
    """``softplus(raw)``: the Positive transform of :mod:`lpm.params` (checked by the tests)."""
    return torch.nn.functional.softplus(raw)


def measure(case: Case, estimator: str, seeds: int, rel_step: float) -> list[dict]:
    """Autograd and CRN finite differences over ``seeds`` seeds for every horizon of ``case``."""
    H = len(case.horizons)
    grads = torch.zeros(seeds, H, dtype=torch.float64)
    wall = []
    for s in range(seeds):
        t0 = time.perf_counter()
        out, leaf = case.run(case.theta, 1000 + s, True, estimator)
        # the leaf is a raw (unconstrained) parameter: divide by d theta / d raw
        dtheta = float(torch.autograd.grad(_constrained(leaf), leaf)[0])
        for k in range(H):
            (g,) = torch.autograd.grad(out[k], leaf, retain_graph=k < H - 1, allow_unused=True)
            grads[s, k] = float(g) / dtheta if g is not None else 0.0
        wall.append(time.perf_counter() - t0)
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        out, _ = case.run(case.theta, 1000, True, estimator)
    del out
    days = max(case.horizons)
    h = rel_step * case.theta
    fd = torch.zeros(seeds, H, dtype=torch.float64)
    with torch.no_grad():
        for s in range(seeds):
            up, _ = case.run(case.theta + h, 1000 + s, False, estimator)
            dn, _ = case.run(case.theta - h, 1000 + s, False, estimator)
            fd[s] = (up - dn).double() / (2 * h)
    rows = []
    for k, hz in enumerate(case.horizons):
        ag, f = grads[:, k], fd[:, k]
        a_m, a_se = float(ag.mean()), float(ag.std() / math.sqrt(seeds))
        f_m, f_se = float(f.mean()), float(f.std() / math.sqrt(seeds))
        ratio = a_m / f_m if f_m != 0 else float("nan")
        rows.append(dict(case=case.name, estimator=estimator, horizon=hz, autograd=a_m, autograd_se=a_se, fd=f_m, fd_se=f_se,
                         ratio=ratio, ratio_se=abs(ratio) * math.sqrt((a_se / a_m) ** 2 + (f_se / f_m) ** 2) if a_m and f_m else float("nan"),
                         var_per_sim=float(ag.var()), wall_s=statistics.median(wall),
                         bytes_per_agent_day=saved.total / (case.agents * days)))
    return rows


def cases(names: list[str], quick: bool) -> list[Case]:
    """The benchmark cases by name."""
    n = 2000 if quick else 5000
    hz = (8, 30, 60) if quick else HORIZONS
    out = []
    for name in names:
        if name == "well-mixed":
            out.append(_epi_case("well-mixed SEIR", n, "well-mixed", 0.5, hz))
        elif name == "er":
            out.append(_epi_case("ER SEIR (k=10)", n, "er", 0.05, hz))
        elif name == "household":
            out.append(_epi_case("household+community SEIR", n, "household", 0.05, hz))
        elif name == "nyc":
            out.append(_nyc_case((14, 30, 60, 150) if not quick else (14, 30, 60)))
        else:
            raise SystemExit(f"--cases: unknown case {name!r}; expected well-mixed, er, household, nyc")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print the table (and write JSON with --json)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gradients", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="well-mixed,er,household")
    ap.add_argument("--estimators", default="presence,linear")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--rel-step", type=float, default=0.05)
    ap.add_argument("--quick", action="store_true", help="small populations, horizons up to 60 days, 8 seeds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    seeds = 8 if a.quick and a.seeds == 16 else a.seeds
    rows = []
    hdr = f"{'case':<28}{'estimator':<10}{'H':>4} {'autograd':>19} {'finite diff':>19} {'ratio':>12} {'var/sim':>10} {'wall s':>7} {'B/agent-day':>11}"
    print(hdr)
    print("-" * len(hdr))
    for case in cases(a.cases.split(","), a.quick):
        for est in a.estimators.split(","):
            for r in measure(case, est, seeds, a.rel_step):
                rows.append(r)
                print(f"{r['case']:<28}{r['estimator']:<10}{r['horizon']:>4} {r['autograd']:>10.4g} ± {r['autograd_se']:<7.2g}"
                      f"{r['fd']:>10.4g} ± {r['fd_se']:<7.2g}{r['ratio']:>6.3f} ± {r['ratio_se']:<5.3f}"
                      f"{r['var_per_sim']:>10.3g} {r['wall_s']:>7.2f} {r['bytes_per_agent_day']:>11.1f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
