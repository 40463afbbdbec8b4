"""Gradient estimators against finite differences, per case and horizon.

``python -m benchmarks.gradients [--quick] [--cases well-mixed,er,household,nyc,nyc-lag,nyc-fit,nyc-short] [--estimators presence,edge-presence,linear,perturbation]``

For each case (an SEIR with gamma latent 3 +- 1.5 and infectious 5 +- 2 days, 1% seeded, on
a well-mixed population, an Erdős–Rényi network of mean degree 10, or households (cliques
of mean size 3) + an Erdős–Rényi community of mean degree 6) and each horizon H, the target
is the gradient of an expected outcome: cumulative infections through day H with respect
to ``beta``. The NYC cases (``nyc``, ``nyc-short``) differentiate the calibrated model's weekly
symptomatic onsets with respect to one week's contact multiplier (see :func:`_nyc_case`; ``nyc-lag``
counts each horizon from the start of the perturbed week);
there a 10% step with ``--richardson`` removes the finite difference's curvature bias.
``nyc-fit`` is the shipped calibrated city (:func:`_nyc_fit_case`: scale 0.004, week j of
2020-10-05, horizons 8-150 days; the prior city has no transmission 150 days after March).
``--estimators perturbation`` is the smoothed-perturbation estimator of :mod:`lpm.perturbation`
(forward mode: one primal run with dual numbers plus ``--alternatives`` flipped runs per seed,
no backward; its "autograd" column is that estimate, its bytes retained 0). ``--fd-seeds`` sets
the finite differences' seed pairs apart from the estimators' seeds.
``--memory 1e5,1e6`` measures the bytes retained on the SEIR and shared SIR workloads. Printed
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
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from benchmarks.cases import SavedBytes
from substeps.epidemic.dynamics import ESTIMATORS

HORIZONS = (8, 30, 60, 150)
PROGRESS = False  # --progress: per-seed estimates on stderr (partial results of long runs)


@dataclass
class Case:
    """A differentiable simulation: ``run(theta, seed, grad) -> (outcomes [H], agent_days, theta_leaf)``."""

    name: str
    agents: int
    theta: float
    run: Callable[[float, int, bool, str], tuple[Tensor, Tensor | None]]
    horizons: tuple[int, ...]
    target: str
    lags: tuple[int, ...] | None = None  # the horizon each outcome is reported under (default: ``horizons``)


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
        # the perturbation estimator runs in forward mode: the carrier coupling plays no part
        estimator = estimator if estimator in ESTIMATORS else "presence"
        if estimator not in models:
            models[estimator] = Model([Transmission(disease, network=kind != "well-mixed", estimator=estimator), Progression(disease)],
                                      {"incidence": incidence(disease)}, state_type=EpiState, dt=disease.dt)
        return models[estimator]

    def run(theta: float | Tensor, seed: int, grad: bool, estimator: str) -> tuple[Tensor, Tensor | None]:
        if isinstance(theta, Tensor):
            # a forward-mode dual number (the perturbation estimator): read in place of the constrained beta
            from lpm.perturbation import with_value

            params = with_value(Params(beta=Positive(float(fwAD.unpack_dual(theta).primal))), "beta", theta)
        else:
            params = Params(beta=Positive(theta))
        res = model(estimator).simulate(params, system, state, T, seed=seed, grad=grad, progress=False)
        cum = res["incidence"].cumsum(0)
        out = torch.stack([cum[h - 1] for h in horizons])
        return out, (params.raw_beta if grad else None)

    return Case(name, n, beta, run, horizons, "d cum. infections(H) / d beta")


def _nyc_case(horizons: tuple[int, ...], scale: float = 0.01, week_day: int = 14, lags: bool = False) -> Case:
    """The calibrated NYC model: d (citywide cases-to-be in the week ending at day H) / d (contact multiplier of week j).

    ``lags``: ``horizons`` count from the start of week ``j`` (the gradient's span: the outcome week
    ends H days after the perturbed week begins), not from the simulation's start.

    ``theta`` multiplies the non-household contacts of every borough in week ``j`` (the week of
    day ``week_day``: 2020-03-15 by default, 2020-03-01 for the 8-day horizon, which ends before
    the week of 2020-03-15 begins); the outcome is the week's symptomatic onsets (``testable``,
    which reported cases are a linear image of: ascertainment times a delay), summed over the
    boroughs. The contact network of the fit (zero-initialised) gives a multiplier of 1 elsewhere.
    """
    import pandas as pd

    from experiments.covid_nyc import fit as nf
    from lpm.rng import Streams

    wk_start = week_day - int(pd.Timestamp("2020-03-01").day_of_week + week_day) % 7 if lags else 0
    ends = tuple(wk_start + h for h in horizons) if lags else tuple(horizons)
    T = max(ends)
    end = max(pd.Timestamp("2020-03-01") + pd.Timedelta(days=T), pd.Timestamp("2020-05-17"))
    cfg = nf.FitConfig(train_end=str(end.date()), scale=scale)
    p = nf.make_problem(cfg)
    wk = int(p.week[week_day])
    names = [s.name for s in p.model.substeps]
    base = p.params.delta.detach().clone()
    del p.params.delta  # replaced per run by a tensor that carries theta's gradient

    def run(theta: float | Tensor, seed: int, grad: bool, estimator: str) -> tuple[Tensor, Tensor | None]:
        tr = next(s for s in p.model.substeps if s.name == "transmission")
        tr.estimator = estimator if estimator in ESTIMATORS else "presence"
        raw, log_m = _log_multiplier(theta, grad)
        delta = base.clone()
        delta = torch.cat([delta[:wk], (delta[wk] + log_m).unsqueeze(0), delta[wk + 1:]])
        p.params.delta = delta
        _dual_week(p.params, "delta", delta, wk)
        with torch.set_grad_enabled(grad):
            from calibration import rollout

            sim, _ = rollout(p.model, p.params, p.system0, p.state0, T, grad=grad, streams=Streams(seed, names, p.state0.device))
        onsets = sim["testable"].sum(1)
        out = torch.stack([onsets[h - 7:h].sum() for h in ends])
        return out, (raw if grad else None)

    day = (pd.Timestamp("2020-03-01") + pd.Timedelta(days=week_day)).strftime("%m-%d")
    if lags:
        return Case(f"NYC {scale} ({p.population.num_agents // 1000}k), j={day}", p.population.num_agents, 1.0, run, ends,
                    f"d onsets(week ending H days after week j starts) / d contact multiplier(week j of 2020-{day})", tuple(horizons))
    return Case(f"NYC {scale} ({p.population.num_agents // 1000}k), j={day}", p.population.num_agents, 1.0, run, horizons,
                f"d onsets(week ending H) / d contact multiplier(week of 2020-{day})")


def _dual_week(params: Any, name: str, table: Tensor, wk: int) -> None:
    """Where ``table`` (``params.<name>``, ``[W, A]``) is a dual number, let only week ``wk`` read it.

    The other weeks read its primal values (bit for bit the same numbers), so the substeps of
    every other week run without dual numbers and the transmission steps there on the compiled
    kernels. Without a tangent the patch is removed: the other estimators run the class's method.
    """
    params.__dict__.pop("log_contact", None)
    tangent = fwAD.unpack_dual(table).tangent
    if tangent is None:
        return
    plain = fwAD.unpack_dual(table).primal
    cls = type(params)

    def log_contact(t: int) -> Tensor:
        w = int(params.week[min(t, params.week.shape[0] - 1)])
        setattr(params, name, table if w == wk else plain)
        return cls.log_contact(params, t)

    params.__dict__["log_contact"] = log_contact


def _nyc_fit_case(horizons: tuple[int, ...], week_day: int = 218) -> Case:
    """The shipped calibrated NYC city (``data/covid_nyc_fit/fit.json``: scale 0.004, its committed weekly
    contact multipliers, seeding and variant factor, as :func:`experiments.covid_nyc.fit.replay` sets them):
    d (onsets in the week ending H days after week j starts) / d (contact multiplier of week j).

    Week j is Mon 2020-10-05 .. Sun 10-11 by default (day 218), the start of the second wave: the
    prior city has no transmission left 150 days after March, the calibrated one has (the outcome
    weeks run to 2021-03-04). Only ``theta`` moves: the committed multiplier of week j is multiplied
    by it for every borough; the per-block hospital and death scales are left at 1 (onsets do not read them).
    """
    import pandas as pd

    from experiments.covid_nyc import fit as nf
    from lpm.rng import Streams

    p = nf.load_fit(json.loads(nf.FIT_FILE.read_text()))
    wk_start = week_day - int(p.dates[0].day_of_week + week_day) % 7
    ends = tuple(wk_start + h for h in horizons)
    T = max(ends)
    if T > len(p.dates):
        raise SystemExit(f"nyc-fit: horizon ends on day {T}, after the fit's last day {len(p.dates)}")
    base = p.params.committed.clone()
    wk = int(p.week[week_day])
    names = [s.name for s in p.model.substeps]
    prefix: dict = {}

    def run(theta: float | Tensor, seed: int, grad: bool, estimator: str) -> tuple[Tensor, Tensor | None]:
        from calibration import rollout

        tr = next(s for s in p.model.substeps if s.name == "transmission")
        tr.estimator = estimator if estimator in ESTIMATORS else "presence"
        raw, log_m = _log_multiplier(theta, grad)
        if prefix.get("seed") != seed:
            # the days before week j do not depend on theta: run them once per seed, continue from the saved state
            p.params.committed = base
            streams = Streams(seed, names, p.state0.device)
            with torch.no_grad():
                _, st = rollout(p.model, p.params, p.system0, p.state0, wk_start, grad=False, streams=streams)
            prefix.update(seed=seed, state=st, rng=streams.get_state())
        streams = Streams(seed, names, p.state0.device)
        streams.set_state(prefix["rng"])
        p.params.committed = torch.cat([base[:wk], (base[wk] + log_m).unsqueeze(0), base[wk + 1:]])
        _dual_week(p.params, "committed", p.params.committed, wk)
        with torch.set_grad_enabled(grad):
            sim, _ = rollout(p.model, p.params, p.system0, prefix["state"], T - wk_start, start=wk_start, grad=grad, streams=streams)
        onsets = sim["testable"].sum(1)
        return torch.stack([onsets[h - 7 - wk_start:h - wk_start].sum() for h in ends]), (raw if grad else None)

    day = (p.dates[0] + pd.Timedelta(days=week_day)).strftime("%Y-%m-%d")
    return Case(f"NYC fit {p.cfg.scale} ({p.population.num_agents // 1000}k), j={day[5:]}", p.population.num_agents, 1.0, run, ends,
                f"d onsets(week ending H days after week j starts) / d contact multiplier(week j of {day}), calibrated city", tuple(horizons))


def record_bytes(*outputs: Tensor) -> int:
    """Bytes the compiled transmission steps keep outside autograd's saved tensors (their per-step
    numpy records, :class:`substeps.epidemic.fast._StepRecord`), found by walking the graph of ``outputs``."""
    seen: set[int] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    total = 0
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        rec = getattr(node, "rec", None)
        if rec is not None:
            # every array the record owns (frontier, candidates, their edge lists, ...); the network and the
            # tables it points to are the system's, shared by every step
            total += sum(int(v.nbytes) for k, v in vars(rec).items() if isinstance(v, np.ndarray) and k != "iota")
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return total


def _log_multiplier(theta: float | Tensor, grad: bool) -> tuple[Tensor | None, Tensor]:
    """The raw parameter (None for a forward-mode dual ``theta``) and the log multiplier ``log theta`` it gives."""
    if isinstance(theta, Tensor):  # a forward-mode dual number (the perturbation estimator)
        return None, torch.log(theta).to(torch.float32)
    raw = torch.tensor(math.log(math.expm1(theta)), dtype=torch.float64, requires_grad=grad)
    return raw, torch.log(_constrained(raw)).to(torch.float32)


def _constrained(raw: Tensor) -> Tensor:
    """``softplus(raw)``: the Positive transform of :mod:`lpm.params` (checked by the tests)."""
    return torch.nn.functional.softplus(raw)


def finite_differences(case: Case, seeds: int, rel_step: float, richardson: bool = False) -> Tensor:
    """Central differences with common random numbers ``[seeds, H]`` (the forward pass is the same for every estimator).

    ``richardson``: ``(4 D(h) - D(2h)) / 3`` per seed, which cancels the ``h^2`` curvature term of
    the central difference (on the NYC case a 20% step overstates the 60-day derivative by ~10%).
    """

    def central(h: float) -> Tensor:
        fd = torch.zeros(seeds, len(case.horizons), dtype=torch.float64)
        with torch.no_grad():
            for s in range(seeds):
                up, _ = case.run(case.theta + h, 1000 + s, False, "presence")
                dn, _ = case.run(case.theta - h, 1000 + s, False, "presence")
                fd[s] = (up - dn).double() / (2 * h)
                if PROGRESS:
                    print(f"fd h={h:g} seed {1000 + s}: {fd[s].tolist()}", file=sys.stderr, flush=True)
        return fd

    h = rel_step * case.theta
    if not richardson:
        return central(h)
    return (4 * central(h) - central(2 * h)) / 3


def perturbation_grads(case: Case, seeds: int, alternatives: int = 1) -> tuple[Tensor, list[float], list[float]]:
    """Smoothed-perturbation derivatives ``[seeds, H]`` (:mod:`lpm.perturbation`), wall seconds and flip weights ``W`` per seed."""
    from lpm.perturbation import directional_derivative

    grads = torch.zeros(seeds, len(case.horizons), dtype=torch.float64)
    wall, weights = [], []
    for s in range(seeds):
        t0 = time.perf_counter()
        est = directional_derivative(lambda th: case.run(th, 1000 + s, False, "perturbation")[0], case.theta,
                                     alternatives=alternatives, seed=1000 + s)
        grads[s] = est.derivative
        wall.append(time.perf_counter() - t0)
        weights.append(est.weight)
        if PROGRESS:
            print(f"perturbation seed {1000 + s}: {grads[s].tolist()} W {est.weight:.4g} {wall[-1]:.1f} s", file=sys.stderr, flush=True)
    return grads, wall, weights


def measure(case: Case, estimator: str, seeds: int, rel_step: float, fd: Tensor | None = None, richardson: bool = False,
            alternatives: int = 1) -> list[dict]:
    """Autograd (or the perturbation estimator) and CRN finite differences over ``seeds`` seeds for every horizon of ``case`` (``fd``: reuse these)."""
    H = len(case.horizons)
    if estimator == "perturbation":
        grads, wall, weights = perturbation_grads(case, seeds, alternatives)
        # forward mode keeps no tape: what stays alive is the run's own state, as in a forward pass
        return _rows(case, f"perturbation x{alternatives}" if alternatives > 1 else estimator, seeds, rel_step, grads, wall, 0,
                     fd, richardson, extra={"alternatives": alternatives, "flip_weight": statistics.median(weights)})
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
    retained = saved.total + record_bytes(out)
    del out
    return _rows(case, estimator, seeds, rel_step, grads, wall, retained, fd, richardson)


def _rows(case: Case, estimator: str, seeds: int, rel_step: float, grads: Tensor, wall: list[float], retained: int,
          fd: Tensor | None, richardson: bool, extra: dict | None = None) -> list[dict]:
    """The table's rows: estimates ``grads [seeds, H]`` against finite differences (computed here when ``fd`` is None)."""
    days = max(case.horizons)
    if fd is None:
        fd = finite_differences(case, seeds, rel_step, richardson)
    rows = []
    for k, hz in enumerate(case.horizons):
        ag, f = grads[:, k], fd[:, k]
        a_m, a_se = float(ag.mean()), float(ag.std() / math.sqrt(ag.numel()))
        f_m, f_se = float(f.mean()), float(f.std() / math.sqrt(f.numel()))
        ratio = a_m / f_m if f_m != 0 else float("nan")
        rows.append(dict(case=case.name, estimator=estimator, horizon=case.lags[k] if case.lags else hz, outcome_end_day=hz, target=case.target, seeds=seeds, fd_seeds=int(f.numel()), rel_step=rel_step, richardson=richardson,
                         autograd=a_m, autograd_se=a_se, fd=f_m, fd_se=f_se,
                         ratio=ratio, ratio_se=abs(ratio) * math.sqrt((a_se / a_m) ** 2 + (f_se / f_m) ** 2) if a_m and f_m else float("nan"),
                         var_per_sim=float(ag.var()), wall_s=statistics.median(wall),
                         bytes_per_agent_day=retained / (case.agents * days), **(extra or {})))
    return rows


def memory(n: int, estimators: list[str], days: int = 50) -> list[dict]:
    """Bytes autograd retains per agent-day on the two workloads the project quotes, with the
    events that drive them: retained bytes are O(candidates + infectious frontier) per step,
    so bytes per agent-day follow the epidemic's activity, not N x T.

    * ``seir``: the SEIR scaling case of ``benchmarks.run`` (beta 0.06, 0.1% seeded);
    * ``sir``: the shared SIR workload (beta 0.03, recovery 0.1 a day, 1% seeded);

    both over ``days`` (50 for the shared workload; issue 6 quoted the SEIR case over 100).
    """
    import benchmarks.cases as bc
    from benchmarks import reference as ref
    from lpm import Model, Params, Positive
    from substeps.epidemic import (Dwell, EpiState, Progression, Transmission, epi_system, incidence, initial_state, prevalence,
                                   seir, sir)

    dev = torch.device("cpu")
    net = bc.er_network(n, 0, dev)
    works = {
        "seir": (seir(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0)), bc.BETA, max(1, n // 1000)),
        "sir": (sir(recovery=Dwell.geometric(-math.log(1 - bc.SIR_GAMMA))), bc.SIR_BETA, max(1, int(round(n * bc.SIR_SEEDED)))),
    }
    rows = []
    for name, (disease, beta, seeded) in works.items():
        state = initial_state(disease, n, torch.from_numpy(ref.seeds_mask(n, seeded, seed=0) == 1))
        system = epi_system(disease, network=net)
        for est in estimators:
            model = Model([Transmission(disease, estimator=est), Progression(disease)], {"incidence": incidence(disease)},
                          state_type=EpiState, dt=disease.dt)
            params = Params(beta=Positive(beta))
            saved = bc.SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                res = model.simulate(params, system, state, days, seed=1, grad=True, progress=False)
            kept = saved.total + record_bytes(res["incidence"])
            inc = res["incidence"].detach()
            attack = float(inc.sum() + seeded) / n
            # what the graph keeps grows with the infectious frontier (and the candidates it touches)
            counted = Model(model.substeps, {"infectious": prevalence(disease, ("I",))}, state_type=EpiState, dt=disease.dt)
            inf_days = float(counted.simulate(params, system, state, days, seed=1, progress=False)["infectious"].sum())
            (g,) = torch.autograd.grad(res["incidence"].sum(), params.raw_beta)
            rows.append(dict(workload=name, n=n, estimator=est, days=days, attack_rate=attack,
                             infectious_per_agent_day=inf_days / (n * days), bytes_per_infectious_day=kept / inf_days,
                             bytes_per_agent_day=kept / (n * days), grad_finite=bool(torch.isfinite(g))))
            print(f"memory {name:<5} N={n:.0e} {days:>3} d {est:<9} attack {attack:.3f}  infectious/agent-day {inf_days / (n * days):.3f}  "
                  f"retained {kept / (n * days):6.1f} B/agent-day = {kept / inf_days:6.1f} B/infectious agent-day", flush=True)
            del res, g
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
            out.append(_nyc_case((30, 60, 150) if not quick else (30, 60)))
        elif name == "nyc-lag":
            # outcome weeks ending 8, 22, 30, 52 and 60 days after the perturbed week (2020-03-09..15) starts:
            # all inside the first wave (22 and 52 are the weeks ending on days 30 and 60 of earlier runs);
            # 150 days after it the model city has no transmission (see benchmarks/results/cpu.md, section gradients)
            out.append(_nyc_case((8, 22, 30, 52, 60), lags=True))
        elif name == "nyc-fit":
            # the calibrated city (shipped fit): transmission left 150 days after the perturbed week
            out.append(_nyc_fit_case(HORIZONS))
        elif name == "nyc-short":
            # 8 days from 2020-03-01: no onsets yet at this scale (both sides are exactly 0); the week
            # right after the perturbed one (days 14-20) is the shortest non-trivial horizon
            out.append(_nyc_case((8,), week_day=0))
            out.append(_nyc_case((21,)))
        else:
            raise SystemExit(f"--cases: unknown case {name!r}; expected well-mixed, er, household, nyc, nyc-lag, nyc-fit, nyc-short")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print the table (and write JSON with --json)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gradients", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="well-mixed,er,household")
    ap.add_argument("--estimators", default="presence,linear")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--fd-seeds", type=int, default=None, help="seed pairs of the finite differences (default: --seeds)")
    ap.add_argument("--alternatives", type=int, default=1, help="perturbation estimator: flipped runs per primal run")
    ap.add_argument("--rel-step", type=float, default=0.05)
    ap.add_argument("--richardson", action="store_true", help="finite differences at steps h and 2h, extrapolated to h -> 0 (cancels curvature)")
    ap.add_argument("--quick", action="store_true", help="small populations, horizons up to 60 days, 8 seeds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true", help="print every seed's estimates to stderr")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--memory", default=None, help="comma-separated N: bytes retained per agent-day on the SEIR and shared SIR workloads, then exit")
    ap.add_argument("--memory-days", type=int, default=50, help="days simulated by --memory")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    ap.add_argument("--from-json", default=None, help="comma-separated JSON files of earlier runs: print (and --markdown) their rows, run nothing")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    global PROGRESS
    PROGRESS = a.progress
    seeds = 8 if a.quick and a.seeds == 16 else a.seeds
    if a.memory:
        mem = [r for n in a.memory.split(",") for r in memory(int(float(n)), a.estimators.split(","), a.memory_days)]
        if a.json:
            with open(a.json, "w") as f:
                json.dump(mem, f, indent=1)
        return 0
    rows = []
    hdr = f"{'case':<28}{'estimator':<16}{'H':>4} {'autograd':>19} {'finite diff':>19} {'ratio':>12} {'var/sim':>10} {'wall s':>7} {'B/agent-day':>11}"
    print(hdr)
    print("-" * len(hdr))
    if a.from_json:
        for path in a.from_json.split(","):
            with open(path) as f:
                rows += json.load(f)
        for r in rows:
            print(_line(r))
    for case in cases(a.cases.split(","), a.quick) if not a.from_json else []:
        fd = finite_differences(case, a.fd_seeds or seeds, a.rel_step, a.richardson)
        for est in a.estimators.split(","):
            for r in measure(case, est, seeds, a.rel_step, fd, a.richardson, a.alternatives):
                rows.append(r)
                print(_line(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(rows))
    return 0


def _line(r: dict) -> str:
    return (f"{r['case'][:27]:<28}{r['estimator']:<16}{r['horizon']:>4} {r['autograd']:>10.4g} ± {r['autograd_se']:<7.2g}"
            f"{r['fd']:>10.4g} ± {r['fd_se']:<7.2g}{r['ratio']:>6.3f} ± {r['ratio_se']:<5.3f}"
            f"{r['var_per_sim']:>10.3g} {r['wall_s']:>7.2f} {r['bytes_per_agent_day']:>11.1f}")


def markdown(rows: list[dict]) -> str:
    """The rows as one Markdown table (what ``benchmarks/results/cpu.md, section gradients`` holds)."""
    out = ["| case | target | estimator | seeds | H (days) | autograd ± s.e. | finite diff. ± s.e. (step) | ratio ± s.e. | variance / sim | wall s / sim | B retained / agent-day |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        end = r.get("outcome_end_day", r["horizon"])
        hz = f"{r['horizon']}" if end == r["horizon"] else f"{r['horizon']} (day {end})"
        out.append(f"| {r['case']} | {r.get('target', '')} | {r['estimator']} | {r.get('seeds', '')} | {hz} | {r['autograd']:.4g} ± {r['autograd_se']:.2g} | "
                   f"{r['fd']:.4g} ± {r['fd_se']:.2g} ({r.get('rel_step', float('nan')):.0%}{', R' if r.get('richardson') else ''}) | {r['ratio']:.3f} ± {r['ratio_se']:.3f} | "
                   f"{r['var_per_sim']:.3g} | {r['wall_s']:.2f} | {r['bytes_per_agent_day']:.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
