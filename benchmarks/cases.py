"""One benchmark case per process: ``python -m benchmarks.cases CASE --n N ...`` prints one JSON line.

Running each (case, N) in its own process makes peak RSS a per-case number and frees
memory between sizes. Cases: ``seir`` (Erdős–Rényi, mean degree 10, with the three
reference kernels on the same graph), ``layered`` (household/school/work/community),
``nyc`` (experiments.covid_nyc at a scale), ``opinion``, ``information`` and ``llm``
(archetype layer cost). A case whose module is missing reports ``skipped`` with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

BETA = 0.06  # SEIR case: per contact per day, R0 about 3 with mean degree 10 and 5 infectious days
GAMMA = 0.2  # SEIR case: recovery probability per day of the SIR twin and references

# The shared workload the peers are compared on (issue 13): stochastic SIR on a static
# Erdős–Rényi graph, mean degree 10, 1% seeded, 50 days, one thread; equal work is
# checked by the final attack rate, which every engine must land in ATTACK_RANGE.
SIR_BETA = 0.03  # per contact per day
SIR_GAMMA = 0.1  # recovery probability per day
SIR_SEEDED = 0.01
SIR_DAYS = 50
ATTACK_RANGE = (0.82, 0.86)  # widened by 3 / sqrt(N) for small N


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss` (bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count at the current RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: the timer of this process's measurements (``--clock``; see :data:`benchmarks.reference.CLOCKS`)
CLOCK = "wall"


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, list[float], Any]:
    """Median seconds of ``fn`` over ``repeats`` runs on :data:`CLOCK` (all times and the last result returned)."""
    from benchmarks.reference import CLOCKS

    now = CLOCKS["wall" if device.type != "cpu" else CLOCK]
    times, out = [], None
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = now()
        out = fn()
        sync(device)
        times.append(now() - t0)
    return statistics.median(times), times, out


class SavedBytes:
    """Sum of the distinct storages autograd saves for backward (``saved_tensors_hooks``)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, str], int] = {}

    def pack(self, t: Tensor) -> Tensor:
        """Record the tensor's storage once; pass it through unchanged."""
        st = t.untyped_storage()
        self.seen[(st.data_ptr(), str(t.device))] = st.nbytes()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        """Identity."""
        return t

    @property
    def total(self) -> int:
        """Bytes retained by the graph."""
        return sum(self.seen.values())


def tensor_bytes(obj: Any, dim: int | None = None, size: int | None = None) -> int:
    """Bytes of the tensor fields of a state (optionally only those whose ``dim`` has ``size``)."""
    total = 0
    for _, v in obj.items():
        if isinstance(v, Tensor) and (size is None or (v.dim() > (dim or 0) and v.shape[dim or 0] == size)):
            total += v.numel() * v.element_size()
    return total


def network_bytes(net: Any) -> dict[str, float]:
    """Bytes per edge (ids, weight, layer) and per agent (CSR pointer) of a network."""
    e = max(1, net.num_edges)
    per_edge = (net.edge_index.numel() * net.edge_index.element_size() + net.weight.numel() * net.weight.element_size()
                + net.layer.numel() * net.layer.element_size()) / e
    return {"edges": net.num_edges, "bytes_per_edge": per_edge, "network_bytes_per_agent": net.rowptr.element_size() * (net.num_nodes + 1) / net.num_nodes}


# ----------------------------------------------------------------------------- networks

def er_network(n: int, seed: int, device: torch.device):
    """Erdős–Rényi contact network with mean degree 10 (one layer)."""
    from lpm import Network
    from lpm.networks import erdos_renyi

    # generated on the device itself: on a GPU the 1e7-agent graph takes seconds, not minutes
    return Network.from_layers({"community": erdos_renyi(n, 10.0, seed=seed, device=device)}, n, coalesce=False)


def _group_pairs(group: Tensor, contacts: float, g: torch.Generator) -> Tensor:
    """Each member draws ``contacts / 2`` random partners in its own group; undirected ``[2, E]``."""
    order = torch.argsort(group, stable=True)
    gs = group[order]
    _, size = torch.unique_consecutive(gs, return_counts=True)
    start = torch.repeat_interleave(size.cumsum(0) - size, size)
    size_of = torch.repeat_interleave(size, size)
    k = max(1, int(round(contacts / 2)))
    a = torch.arange(gs.numel()).repeat_interleave(k)
    u = torch.rand(a.numel(), generator=g)
    b = start[a] + (u * size_of[a]).long().clamp_max(size_of[a] - 1)
    keep = a != b
    ei = torch.stack([order[a[keep]], order[b[keep]]])
    return torch.cat([ei, ei.flip(0)], 1)


def layered_network(n: int, seed: int, device: torch.device):
    """Synthetic city: households (cliques), schools (children), workplaces (adults), community (ER)."""
    from lpm import Network
    from lpm.networks import erdos_renyi, household_cliques

    g = torch.Generator().manual_seed(seed)
    household = torch.randint(0, max(1, int(n / 2.6)), (n,), generator=g)
    age = torch.rand(n, generator=g)
    child = age < 0.22
    worker = (age >= 0.22) & (age < 0.82)
    kids = child.nonzero().squeeze(1)
    workers = worker.nonzero().squeeze(1)
    layers = {"household": household_cliques(household)}
    if kids.numel() > 1:
        school = torch.randint(0, max(1, kids.numel() // 500), (kids.numel(),), generator=g)
        layers["school"] = kids[_group_pairs(school, 8.0, g)]
    if workers.numel() > 1:
        work = torch.randint(0, max(1, workers.numel() // 20), (workers.numel(),), generator=g)
        layers["work"] = workers[_group_pairs(work, 6.0, g)]
    layers["community"] = erdos_renyi(n, 3.0, seed=seed + 1)
    return Network.from_layers(layers, n, coalesce=False).to(device)


# ----------------------------------------------------------------------------- engine

def seir_model(disease, use_layer_scale: bool = False):
    """Transmission + progression with the incidence observable (the differentiated scalar)."""
    from lpm import Model
    from substeps.epidemic import EpiState, EpiSystem, Progression, Transmission, incidence

    return Model([Transmission(disease, use_layer_scale=use_layer_scale), Progression(disease)],
                 {"incidence": incidence(disease)}, state_type=EpiState, system_type=EpiSystem, dt=disease.dt,
                 name="bench-seir")


def engine_case(disease, net, n: int, days: int, repeats: int, device: torch.device, grad: bool,
                layered: bool = False) -> dict[str, Any]:
    """Forward (and optionally differentiable) agent-days/s of the engine on ``net``."""
    from lpm import Params, Positive
    from substeps.epidemic import epi_system, initial_state

    extra = {"layer_scale": torch.ones(net.num_layers)} if layered else {}
    state = initial_state(disease, n, max(1, n // 1000), seed=0, device=device, **extra)
    system = epi_system(disease, network=net, device=device)
    model = seir_model(disease, use_layer_scale=layered)
    params = Params(beta=Positive(BETA)).to(device)
    out: dict[str, Any] = {"state_bytes_per_agent": tensor_bytes(state, 0, n) / n, **network_bytes(net)}

    def fwd():
        return model.simulate(params, system, state, days, seed=1, progress=False)

    fwd()  # warm-up (allocator, lazy imports)
    sec, times, res = median_time(fwd, repeats, device)
    out.update(forward_s=sec, forward_times=times, forward_agent_days_per_s=n * days / sec,
               attack_rate=float(res.observables["incidence"].sum()) / n)
    if grad:
        def diff():
            params.zero_grad(set_to_none=True)
            r = model.simulate(params, system, state, days, seed=1, grad=True, progress=False)
            r.observables["incidence"].sum().backward()
            return next(iter(params.parameters())).grad

        gsec, gtimes, gr = median_time(diff, repeats, device)
        saved = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            r = model.simulate(params, system, state, days, seed=1, grad=True, progress=False)
        del r
        out.update(grad_s=gsec, grad_times=gtimes, grad_agent_days_per_s=n * days / gsec,
                   retained_bytes=saved.total, retained_bytes_per_agent_day=saved.total / (n * days),
                   grad_finite=bool(torch.isfinite(gr).all()) if gr is not None else False)
    return out


def case_seir(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """ER network SEIR (engine), its SIR twin, and the three reference kernels on the same graph."""
    from benchmarks import reference as ref
    from substeps.epidemic import Dwell, seir, sir

    n = a.n
    t0 = time.perf_counter()
    net = er_network(n, a.seed, device)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0}
    disease = seir(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0))
    out["seir"] = engine_case(disease, net, n, a.days, a.repeats, device, grad=n <= a.grad_max_n)
    twin = sir(recovery=Dwell.geometric(-math.log(1 - GAMMA)))
    out["sir"] = engine_case(twin, net, n, a.days, a.repeats, device, grad=False)
    state0 = ref.seeds_mask(n, max(1, n // 1000), seed=0)
    out["reference"] = reference_kernels(net, state0, BETA, GAMMA, a.days, a, device)
    return out


def case_sir(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The shared workload: engine SIR (compiled forward, torch forward, differentiable) and the references.

    One process, one graph, one seeding; peak RSS is measured per phase (graph build,
    engine forward, differentiable, references) by resetting the kernel's high-water mark.
    """
    from benchmarks import reference as ref
    from lpm import Params, Positive
    from lpm.kernels import compiled_available, compiled_kernels
    from substeps.epidemic import Dwell, epi_system, initial_state, sir

    n, days = a.n, a.days
    seeded = max(1, int(round(n * SIR_SEEDED)))
    t0 = time.perf_counter()
    reset_peak_rss()
    net = er_network(n, a.seed, device)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0, "build_peak_rss_bytes": peak_rss_bytes(), "seeded": seeded,
                           "beta": SIR_BETA, "gamma": SIR_GAMMA, **network_bytes(net)}
    disease = sir(recovery=Dwell.geometric(-math.log(1 - SIR_GAMMA)))  # recovery probability SIR_GAMMA per day
    state0 = ref.seeds_mask(n, seeded, seed=0)
    state = initial_state(disease, n, torch.from_numpy(state0 == 1), device=device)
    system = epi_system(disease, network=net, device=device)
    out["state_bytes_per_agent"] = tensor_bytes(state, 0, n) / n
    model = seir_model(disease)
    params = Params(beta=Positive(SIR_BETA)).to(device)
    engines: dict[str, Any] = {}

    def forward(label: str, compiled: bool) -> None:
        with compiled_kernels(compiled):
            run = lambda: model.simulate(params, system, state, days, seed=1, progress=False)  # noqa: E731
            run()  # warm-up: compiles or loads the kernels, touches the allocator
            reset_peak_rss()
            sec, times, res = median_time(run, a.repeats, device)
        engines[label] = {"agent_days_per_s": n * days / sec, "seconds": sec, "times": times,
                          "attack_rate": float(res.observables["incidence"].sum() + seeded) / n,
                          "peak_rss_bytes": peak_rss_bytes()}

    if compiled_available() and device.type == "cpu":
        forward("lpm_forward", True)
        if n <= a.torch_max_n:
            forward("lpm_forward_torch", False)
    else:
        forward("lpm_forward", False)
    if n <= a.grad_max_n:
        def diff():
            params.zero_grad(set_to_none=True)
            r = model.simulate(params, system, state, days, seed=1, grad=True, progress=False)
            r.observables["incidence"].sum().backward()
            return r, next(iter(params.parameters())).grad

        diff()
        reset_peak_rss()
        gsec, gtimes, (gr, grad) = median_time(diff, a.repeats, device)
        engines["lpm_differentiable"] = {"agent_days_per_s": n * days / gsec, "seconds": gsec, "times": gtimes,
                                         "attack_rate": float(gr.observables["incidence"].detach().sum() + seeded) / n,
                                         "peak_rss_bytes": peak_rss_bytes(), "grad": float(grad), "grad_finite": bool(torch.isfinite(grad))}
        del gr
    out["engine"] = engines
    out["reference"] = reference_kernels(net, state0, SIR_BETA, SIR_GAMMA, days, a, device)
    rates = {k: v["attack_rate"] for k, v in {**engines, **out["reference"]}.items() if "attack_rate" in v}
    # the range widens by three binomial-ish standard errors at small N, where runs scatter
    slack = 3.0 / math.sqrt(n)
    lo, hi = ATTACK_RANGE[0] - slack, ATTACK_RANGE[1] + slack
    out["equal_work"] = {"attack_rates": rates, "range": (lo, hi), "ok": all(lo <= r <= hi for r in rates.values())}
    return out


def reference_kernels(net: Any, state0: Any, beta: float, gamma: float, days: int, a: argparse.Namespace,
                      device: torch.device) -> dict[str, Any]:
    """The three reference SIR kernels on ``net`` from ``state0``: speed, attack rate and peak RSS each."""
    from benchmarks import reference as ref

    n = net.num_nodes
    refs: dict[str, Any] = {}

    def record(name: str, fn: Callable[[], tuple[float, int]], dev: torch.device) -> None:
        reset_peak_rss()
        _, _, res = median_time(fn, a.repeats, dev)
        refs[name] = {"agent_days_per_s": n * days / res[0], "seconds": res[0], "final_R": res[1],
                      "attack_rate": res[2] / n, "peak_rss_bytes": peak_rss_bytes()}

    rowptr = net.rowptr.cpu().numpy()
    col = net.edge_index[1].cpu().numpy()
    if ref.numba_available():
        record("numba_csr", lambda: ref.numba_csr_sir(rowptr, col, state0, beta, gamma, days, threads=torch.get_num_threads(),
                                                      clock=CLOCK),
               torch.device("cpu"))
    else:
        refs["numba_csr"] = {"skipped": "numba not installed (pip install lpm[fast])"}
    if n <= a.numpy_max_n:
        record("numpy_frontier", lambda: ref.numpy_frontier_sir(rowptr, col, state0, beta, gamma, days, clock=CLOCK),
               torch.device("cpu"))
    if n <= a.scatter_max_n:
        src, dst = net.edge_index[0], net.edge_index[1]
        record("torch_scatter", lambda: ref.torch_scatter_sir(src, dst, state0, beta, gamma, days,
                                                              clock=CLOCK if device.type == "cpu" else "wall"), device)
    return refs


def case_layered(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Layered city network SEIR with per-layer scales: build time, speed, memory."""
    from substeps.epidemic import Dwell, seir

    t0 = time.perf_counter()
    net = layered_network(a.n, a.seed, device)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0, "layers": dict(net.summary())}
    disease = seir(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0))
    out["seir"] = engine_case(disease, net, a.n, a.days, a.repeats, device, grad=a.n <= a.grad_max_n, layered=True)
    return out


def case_nyc(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """NYC COVID-19 model at ``--scale``: seconds per simulated day, forward and differentiable."""
    try:
        from experiments import covid_nyc
    except Exception as exc:  # the experiment is optional: report why it did not run
        return {"skipped": f"experiments.covid_nyc unavailable: {type(exc).__name__}: {exc}"}
    t0 = time.perf_counter()
    setup = covid_nyc.build(scale=a.scale, days=a.days, device=str(device))
    n = int(setup.state.stage.numel())
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0, "agents": n, "scale": a.scale,
                           "state_bytes_per_agent": tensor_bytes(setup.state, 0, n) / n,
                           "system_bytes_per_agent": tensor_bytes(setup.system, 0, n) / n, **network_bytes(setup.system.network)}
    sec, times, _ = median_time(lambda: setup.simulate(seed=1, progress=False), a.repeats, device)
    out.update(forward_s=sec, seconds_per_day=sec / a.days, forward_agent_days_per_s=n * a.days / sec)
    if n <= a.grad_max_n:
        def diff():
            r = setup.simulate(seed=1, grad=True, progress=False)
            loss = sum(v.float().sum() for v in r.observables.values() if v.requires_grad)
            if isinstance(loss, Tensor):
                loss.backward()
        gsec, _, _ = median_time(diff, 1, device)
        out.update(grad_s=gsec, grad_agent_days_per_s=n * a.days / gsec)
    return out


def case_opinion(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Bounded-confidence opinion dynamics on an ER follow graph."""
    try:
        from lpm import Model, Params, Positive
        from substeps.opinion import BoundedConfidence, OpinionState, initial_opinions, variance
    except Exception as exc:
        return {"skipped": f"substeps.opinion unavailable: {type(exc).__name__}: {exc}"}
    n = a.n
    net = er_network(n, a.seed, device)
    x = torch.rand(n, generator=torch.Generator().manual_seed(a.seed)).mul(2).sub(1).to(device)
    system, state = initial_opinions(x, net)
    model = Model([BoundedConfidence(use_exposure=False)], {"variance": lambda y, s: variance(s.opinion)}, state_type=OpinionState)
    params = Params(confidence=Positive(0.3), convergence=Positive(0.2)).to(device)
    sec, _, _ = median_time(lambda: model.simulate(params, system, state, a.days, seed=1, progress=False), a.repeats, device)
    out: dict[str, Any] = {"forward_agent_days_per_s": n * a.days / sec}
    if n <= a.grad_max_n:
        def diff():
            r = model.simulate(params, system, state, a.days, seed=1, grad=True, progress=False)
            r.observables["variance"].sum().backward()
        gsec, _, _ = median_time(diff, a.repeats, device)
        out["grad_agent_days_per_s"] = n * a.days / gsec
    return out


def case_information(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Ignorant/spreader/stifler information spread on an ER network."""
    try:
        from lpm import Interval, Model, Params
        from substeps.information import InfoState, Spread, initial_information, information_observables
    except Exception as exc:
        return {"skipped": f"substeps.information unavailable: {type(exc).__name__}: {exc}"}
    n = a.n
    net = er_network(n, a.seed, device)
    system, state = initial_information(n, torch.arange(max(1, n // 1000)), network=net, device=device)
    model = Model([Spread()], information_observables(), state_type=InfoState)
    params = Params(share_rate=Interval(0.2, 0, 1), stifle=Interval(0.1, 0, 1), prebunk_efficacy=Interval(0.5, 0, 1)).to(device)
    sec, _, _ = median_time(lambda: model.simulate(params, system, state, a.days, seed=1, progress=False), a.repeats, device)
    out: dict[str, Any] = {"forward_agent_days_per_s": n * a.days / sec}
    if n <= a.grad_max_n:
        def diff():
            r = model.simulate(params, system, state, a.days, seed=1, grad=True, progress=False)
            r.observables["reach"].sum().backward()
        gsec, _, _ = median_time(diff, a.repeats, device)
        out["grad_agent_days_per_s"] = n * a.days / gsec
    return out


def case_llm(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Per-step cost of the archetype decision layer (K fixed) for N agents, deterministic backend."""
    try:
        from lpm import State, System
        from lpm.state import tensor_field
        from llm_archetypes.archetypes import Archetypes
        from llm_archetypes.asking import Asker
        from llm_archetypes.backends import RuleBackend
        from llm_archetypes.decision import ArchetypeDecision
        from llm_archetypes.examples import isolation_question, isolation_rule
    except Exception as exc:
        return {"skipped": f"llm_archetypes unavailable: {type(exc).__name__}: {exc}"}

    @dataclass(frozen=True)
    class DecisionState(State):
        """Minimal state for the archetype layer."""

        compliance: Tensor = tensor_field(("N",), torch.float32, "per-agent answer")
        scores: Tensor = tensor_field(("K",), torch.float32, "per-archetype answer")

    n = a.n
    g = torch.Generator().manual_seed(a.seed)
    cols = {"age_band": torch.randint(0, 4, (n,), generator=g), "sex": torch.randint(0, 2, (n,), generator=g),
            "borough": torch.randint(0, 5, (n,), generator=g), "employment": torch.randint(0, 3, (n,), generator=g)}
    books = {"age_band": ("18-29", "30-49", "50-64", "65+"), "sex": ("male", "female"),
             "borough": ("Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island"),
             "employment": ("essential worker", "remote worker", "unemployed")}
    t0 = time.perf_counter()
    arch = Archetypes.from_attributes(cols, list(cols), codebooks=books)
    if hasattr(arch, "to"):
        arch = arch.to(device)
    group_s = time.perf_counter() - t0
    asker = Asker(RuleBackend(isolation_rule), mode="off")
    sub = ArchetypeDecision("isolation", archetypes=arch, question=isolation_question(), asker=asker,
                            context=lambda y, s, t: {"cases": 150.0}, target="compliance", store="scores", every=1)
    state = DecisionState(torch.zeros(n, device=device), sub.initial_scores(device=device))
    rng = torch.Generator(device=device)
    sub(None, System(), state, 0, rng)
    sec, _, _ = median_time(lambda: sub(None, System(), state, 0, rng), a.repeats, device)
    return {"K": int(arch.K), "grouping_s": group_s, "step_s": sec}


CASES = {"sir": case_sir, "seir": case_seir, "layered": case_layered, "nyc": case_nyc, "opinion": case_opinion,
         "information": case_information, "llm": case_llm}


def main(argv: list[str] | None = None) -> int:
    """Run one case and print its JSON record as the last line of stdout."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--grad-max-n", type=int, default=1_000_000)
    ap.add_argument("--numpy-max-n", type=int, default=10_000_000)
    ap.add_argument("--scatter-max-n", type=int, default=10_000_000)
    ap.add_argument("--torch-max-n", type=int, default=10_000_000, help="largest N for the engine's torch forward path")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="timer: wall seconds, or this process's CPU seconds (one thread on a shared machine)")
    a = ap.parse_args(argv)
    global CLOCK
    CLOCK = a.clock
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    record: dict[str, Any] = {"case": a.case, "n": a.n, "days": a.days, "repeats": a.repeats, "device": str(device),
                              "threads": torch.get_num_threads(), "clock": a.clock if device.type == "cpu" else "wall"}
    try:
        record.update(CASES[a.case](a, device))
    except Exception as exc:  # one failing case must not hide the others: record it with its traceback
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=6)
    record["peak_rss_bytes"] = peak_rss_bytes()
    if device.type == "cuda":
        record["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    sys.stdout.flush()
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
