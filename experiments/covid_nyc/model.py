"""NYC study assembly: the population (synthesized or cached), the system and state, the model and its parameters.

:func:`build` takes an :class:`NYCConfig` (run options: scale, seed, device, dates, boroughs,
behaviour backend, caches) and parameter values (``params={"beta": 0.3}``), and returns an
:class:`NYCSetup` whose system holds every constant of the run (network, attributes,
mobility, policy and vaccination schedules, archetype ids) so one ``.to(device)`` moves it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from lpm import CodeBook, Intervention, Model, Network, Params, tensor_field
from lpm.errors import CheckpointError, ConfigError
from lpm.networks import household_cliques
from lpm.population import Marginals, Population, marginal_errors, matrix_correlation, mixing_matrix, synthesize, unit_sbm
from lpm.tensorfile import load_tensors, save_tensors
from substeps.epidemic import initial_state
from substeps.epidemic.dynamics import ESTIMATORS
from substeps.epidemic.covid import (PARAM_DOCS, CovidState, CovidSystem, age_tables, covid_disease, covid_model,
                                     covid_params, covid_system)
from llm_archetypes import ArchetypeDecision, Asker, Backend, Link
from experiments.covid_nyc.behaviour import CASE_WINDOW, LLM_KINDS, isolation_decision, make_asker, nyc_archetypes
from experiments.covid_nyc.data import (AGE_LABELS, AGE_LOWER, AGE_UPPER, CENSUS_FILE, DP03_FILE, FLOWS_FILE, LAYERS,
                                        MATRIX_DIR, _check_boroughs, cache_root, load_contact_matrices, load_flows,
                                        load_marginals)
from experiments.covid_nyc.schedules import POLICIES, area_schedule, check_dates, policies, test_capacity, vaccination

__all__ = ["DEFAULT_SCALE", "NYC_DEFAULTS", "NYCConfig", "NYCState", "NYCSystem", "NYCSetup", "build", "build_population",
           "validate_setup"]

DEFAULT_SCALE = 0.02
CACHE_VERSION = "3"  # bump when synthesis code changes so old caches are not reused (3: data-only HDF5)
#: NYC starting values (uncalibrated): beta chosen so that the March 2020 hospital peak is of the observed order
NYC_DEFAULTS: dict[str, float] = {"beta": 0.25}
DEFAULT_PREVALENCE = 1e-3
LAST_DATE = "2021-03-31"  # end of the bundled data: the default last day of a run


@dataclass(frozen=True)
class NYCConfig:
    """Options of an NYC run (what to build and how), checked on construction; parameter values go in ``build(params=)``.

    ``days=None`` runs to 2021-03-31; ``boroughs=None`` is all five. ``initial_prevalence``:
    share of agents infected (E) at ``start``. ``disable``: policies to leave out
    (``school_closure``, ``stay_at_home``, ``reopening``, ``vaccination``). ``extrapolate``:
    allow dates outside the covariate data (2020-03-01..2021-03-31), with a
    :class:`~experiments.covid_nyc.data.DataWarning` saying how covariates are extended.
    ``cache_dir``/``use_cache``: the population cache. Behaviour: ``llm`` (``rule``,
    ``local`` offline Gemma 3 270M, ``http`` with ``llm_url``/``llm_model``, a
    :class:`~llm_archetypes.Backend`, or ``off``: every symptomatic agent complies);
    ``llm_cache`` (answer cache file; default ``<cache root>/covid_nyc/llm_answers.sqlite``,
    ``False``: none), ``llm_mode`` (``record`` or ``replay``: no backend calls),
    ``llm_fallback`` (P(yes) for an archetype whose answer failed after all attempts; default
    None: such a failure stops the run) and ``llm_max_fallback_share`` (default 0.05 with a fallback).
    """

    scale: float = DEFAULT_SCALE
    seed: int = 0
    device: str = "cpu"
    start: str = "2020-03-01"
    days: int | None = None
    boroughs: tuple[str, ...] | None = None
    initial_prevalence: float = DEFAULT_PREVALENCE
    disable: tuple[str, ...] = ()
    extrapolate: bool = False
    cache_dir: str | Path | None = None
    use_cache: bool = True
    llm: str | Backend = "rule"
    llm_cache: str | Path | bool | None = None
    llm_mode: str = "record"
    llm_url: str | None = None
    llm_model: str | None = None
    llm_fallback: float | None = None
    llm_max_fallback_share: float | None = None
    estimator: str = "presence"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (normalizing a frozen instance)
        set_("boroughs", None if self.boroughs is None else _check_boroughs(self.boroughs))
        if not float(self.scale) > 0:
            raise ConfigError(f"scale: expected agents per resident > 0, got {self.scale!r}")
        try:
            start = pd.Timestamp(self.start)
        except (ValueError, TypeError):
            raise ConfigError(f"start: expected a date YYYY-MM-DD, got {self.start!r}") from None
        set_("start", str(start.date()))
        if self.days is not None and int(self.days) <= 0:
            raise ConfigError(f"days: expected > 0, got {self.days}")
        set_("disable", tuple(self.disable))
        unknown = sorted(set(self.disable) - {*POLICIES, "vaccination"})
        if unknown:
            raise ConfigError(f"disable: unknown policies {unknown}; expected names from {[*POLICIES, 'vaccination']}")
        if not 0.0 <= float(self.initial_prevalence) <= 1.0:
            raise ConfigError(f"initial_prevalence: expected a share in [0, 1], got {self.initial_prevalence!r}")
        if not isinstance(self.llm, Backend) and self.llm not in LLM_KINDS:
            raise ConfigError(f"llm: expected one of {LLM_KINDS} or a Backend, got {self.llm!r}")
        if self.llm_mode not in ("record", "replay"):
            raise ConfigError(f"llm_mode: expected 'record' or 'replay', got {self.llm_mode!r}")
        if self.llm_fallback is not None and not 0.0 <= float(self.llm_fallback) <= 1.0:
            raise ConfigError(f"llm_fallback: expected P(yes) in [0, 1], got {self.llm_fallback!r}")
        if self.estimator not in ESTIMATORS:  # before the population is built, not after
            raise ConfigError(f"estimator: expected one of {ESTIMATORS}, got {self.estimator!r}")

    @property
    def areas(self) -> tuple[str, ...]:
        """The boroughs of the run, in the study's order."""
        return _check_boroughs(self.boroughs)

    @property
    def dates(self) -> pd.DatetimeIndex:
        """One date per daily step, from ``start`` for ``days`` (default: to 2021-03-31)."""
        start = pd.Timestamp(self.start)
        days = int((pd.Timestamp(LAST_DATE) - start).days) + 1 if self.days is None else int(self.days)
        if days <= 0:
            raise ConfigError(f"start: {self.start} is after {LAST_DATE}; give days")
        return pd.date_range(start, periods=days, freq="D")


@dataclass(frozen=True)
class NYCState(CovidState):
    """:class:`CovidState` plus the raw archetype answers kept between weekly decisions."""

    isolation_score: torch.Tensor | None = tensor_field(
        ("K",), torch.float32, "last raw answer per archetype (P(yes) to the isolation question)", optional=True)


@dataclass(frozen=True)
class NYCSystem(CovidSystem):
    """:class:`CovidSystem` plus the NYC schedules (``None`` when disabled) and each agent's archetype."""

    school_closure: torch.Tensor | None = tensor_field(("T", "L"), torch.float32, "school policy multiplier by day and layer",
                                                       optional=True)
    stay_at_home: torch.Tensor | None = tensor_field(("T", "L"), torch.float32, "NYS on PAUSE multiplier by day and layer",
                                                     optional=True)
    reopening: torch.Tensor | None = tensor_field(("T", "L"), torch.float32, "reopening phase multiplier by day and layer",
                                                  optional=True)
    vaccination: torch.Tensor | None = tensor_field(("T", "B"), torch.float32,
                                                    "susceptibility multiplier by day and age band (vaccination)",
                                                    optional=True)
    archetype: torch.Tensor | None = tensor_field(("N",), torch.int64, "archetype id of each agent (with llm)",
                                                  optional=True)


# ------------------------------------------------------------------------------ population
def _data_hash() -> str:
    h = hashlib.sha256()
    for f in (CENSUS_FILE, DP03_FILE, FLOWS_FILE, *sorted(MATRIX_DIR.glob("*_18.csv"))):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cache_path(cache_dir: str | Path | None, scale: float, seed: int, areas: Sequence[str]) -> Path:
    root = cache_root(cache_dir)
    key = hashlib.sha256(f"{CACHE_VERSION}|{scale!r}|{seed}|{','.join(areas)}|{_data_hash()}".encode()).hexdigest()[:20]
    return root / f"population_{key}.h5"


def build_population(scale: float, seed: int, areas: Sequence[str], cache_dir: str | Path | None = None,
                     use_cache: bool = True) -> tuple[Population, Network, Marginals, dict[str, Any]]:
    """Synthesize (or load from cache) the population and its four contact layers."""
    marg = load_marginals(areas)
    flows = load_flows(areas)
    path = _cache_path(cache_dir, scale, seed, areas)
    info: dict[str, Any] = {"cache": str(path)}
    t0 = time.perf_counter()
    expect = {"version": CACHE_VERSION, "scale": float(scale), "seed": int(seed), "areas": list(areas),
              "data_hash": _data_hash()}
    if use_cache and path.exists():
        pop, net = _read_population(path, expect)
        info.update(cached=True, build_seconds=time.perf_counter() - t0)
        return pop, net, marg, info
    pop = synthesize(marg, scale, seed, flows=flows)
    C = load_contact_matrices()
    gen = torch.Generator().manual_seed(seed + 7919)
    age = pop.age.long()
    layers = {
        "household": household_cliques(pop.household),
        "school": unit_sbm(pop.school, age, C["school"], gen, population_average=True),
        "work": unit_sbm(pop.workplace, age, C["work"], gen, population_average=True),
        "community": unit_sbm(pop.area.to(torch.int32), age, C["community"], gen),
    }
    net = Network.from_layers(layers, pop.num_agents)
    info.update(cached=False, build_seconds=time.perf_counter() - t0)
    if use_cache:
        tensors = {**{f"population/{k}": v for k, v in pop.items() if isinstance(v, torch.Tensor)},
                   **{f"network/{k}": getattr(net, k) for k in _NET_FIELDS}}
        meta = {**expect, "codebooks": {k: list(b.labels) for k, b in (pop.codebooks or {}).items()},
                "pop_scale": pop.scale, "num_nodes": net.num_nodes, "layer_names": list(net.layer_names)}
        save_tensors(path, tensors, meta)
    return pop, net, marg, info


_NET_FIELDS = ("edge_index", "weight", "layer", "rowptr")


def _read_population(path: Path, expect: dict[str, Any]) -> tuple[Population, Network]:
    """Load a cached population (data only, checksummed, keyed by the inputs' hash) and validate it like a fresh one."""
    tensors, meta = load_tensors(path, expect, what="population cache")
    try:
        pop = Population(**{k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("population/")},
                         codebooks={k: CodeBook(k, tuple(v)) for k, v in meta["codebooks"].items()},
                         scale=float(meta["pop_scale"]))
        net = Network(**{k: tensors[f"network/{k}"] for k in _NET_FIELDS}, num_nodes=int(meta["num_nodes"]),
                      layer_names=tuple(meta["layer_names"]))
        dims = pop.validate()
        net.validate(dims)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"population cache {path}: refused: {exc}; delete it to rebuild") from None
    return pop, net


# ------------------------------------------------------------------------------ the setup
@dataclass
class NYCSetup:
    """Everything a run or a calibration needs: model, parameters, system, initial state, dates, areas."""

    model: Model
    params: Params
    system: NYCSystem
    state: NYCState
    dates: pd.DatetimeIndex
    areas: tuple[str, ...]
    scale: float
    population: Population
    marginals: Marginals
    age_labels: tuple[str, ...] = AGE_LABELS
    info: dict[str, Any] = field(default_factory=dict)
    asker: Asker | None = None  # LLM backend + cache + counters (None with llm='off')
    decision: ArchetypeDecision | None = None  # the weekly isolation decision substep (archetypes, link)
    config: NYCConfig | None = None

    @property
    def steps(self) -> int:
        """Number of daily steps (one per date)."""
        return len(self.dates)

    def simulate(self, seed: int = 0, **kwargs: Any):
        """``model.simulate`` over all dates with the setup's parameters, system and state."""
        return self.model.simulate(self.params, self.system, self.state, self.steps, seed=seed, **kwargs)


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(NYCConfig))


def build(config: NYCConfig | None = None, /, *, params: Mapping[str, float] | None = None, **options: Any) -> NYCSetup:
    """Build the NYC COVID-19 model of ``config`` with parameter values ``params`` (default :data:`NYC_DEFAULTS`).

    ``options`` are :class:`NYCConfig` fields, a shorthand for ``build(NYCConfig(**options))``
    (or changes to ``config``); parameter values go in ``params`` (``params={"beta": 0.3}``).

    Isolation behaviour (``llm != 'off'``): once a week each archetype (age band x sex x
    borough x employment) answers whether its members isolate when symptomatic, given its
    borough's reported cases per 100k over the last week; a learnable
    :class:`~llm_archetypes.Link` (``params.isolation_link``, fitted with the rest) maps
    answers to per-agent compliance ``state.isolation``, and the parameter ``isolation`` is
    the share of non-household contacts an isolating agent drops.
    """
    if config is not None and not isinstance(config, NYCConfig):
        raise ConfigError(f"build: expected an NYCConfig (or options as keywords: build(scale=0.01, ...)), "
                          f"got {type(config).__name__} {config!r}")
    values = {**NYC_DEFAULTS, **dict(params or {})}
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        hint = [k for k in unknown if k in PARAM_DOCS]
        raise ConfigError(f"build: unknown option(s) {unknown}; options are NYCConfig fields {sorted(_CONFIG_FIELDS)}"
                          + (f"; {hint} are parameters: pass params={{{hint[0]!r}: ...}}" if hint else ""))
    cfg = dataclasses.replace(config, **options) if config is not None else NYCConfig(**options)
    areas, dates = cfg.areas, cfg.dates
    check_dates(dates, cfg.extrapolate)
    params_ = covid_params(**values)
    pop, net, marg, info = build_population(cfg.scale, cfg.seed, areas, cfg.cache_dir, cfg.use_cache)
    mid = [(lo + hi) / 2 for lo, hi in zip(AGE_LOWER, AGE_UPPER)]
    disease = covid_disease()
    tables = age_tables(mid)
    age = pop.age.long()
    N = pop.num_agents
    g = torch.Generator().manual_seed(cfg.seed + 104729)
    infected = torch.rand(N, generator=g) < cfg.initial_prevalence
    L = len(LAYERS)
    schedules = {iv.name: iv.schedule for iv in policies(dates, cfg.disable)}
    if "vaccination" not in cfg.disable:
        schedules["vaccination"] = vaccination(dates, pop.age).schedule
    asker, decide, behaviour, extra, state_kw = None, None, [], {}, {}
    if cfg.llm != "off":
        asker = make_asker(cfg)
        arch = nyc_archetypes(pop, areas)
        residents = torch.bincount(pop.area.long().cpu(), minlength=len(areas)).float()
        # identity at the start (compliance = the answer's P(yes)); slope and bias are fitted
        link = Link("logit_affine", low=0.0, high=1.0)
        params_.add_module("isolation_link", link)
        decide, extra = isolation_decision(arch, areas, residents, asker, link)
        behaviour = [decide]
        schedules["archetype"] = arch.archetype_id
        state_kw = {"isolation": torch.ones(N), "isolation_score": decide.initial_scores(),
                    "recent_cases": torch.zeros(CASE_WINDOW, len(areas))}
    system = covid_system(disease, age_mid=mid, area=pop.area, age=pop.age, area_schedule=area_schedule(dates, areas),
                          test_capacity=test_capacity(dates), reduced_layers=[name != "household" for name in LAYERS],
                          network=net, layer_scale_base=torch.ones(L), susceptibility_base=tables["susceptibility"][age],
                          system_type=NYCSystem, **schedules)
    epi = initial_state(disease, N, infected, seed=cfg.seed, susceptibility=tables["susceptibility"][age],
                        layer_scale=torch.ones(L), contact_factor=torch.ones(N, L))
    state = NYCState(**dict(epi.items()), contact_factor_base=torch.ones(N, L), reported=torch.zeros(N), **state_kw)
    # the model refers to the schedules by name: they are read from the system, on its device
    policy_ivs = [Intervention(name, name) for name in POLICIES if name in schedules]
    vacc = [Intervention("vaccination", "vaccination", group="age")] if "vaccination" in schedules else []
    model = covid_model(disease, areas=areas, age_labels=AGE_LABELS, policies=policy_ivs, vaccination=vacc,
                        name="covid-nyc", behaviour=behaviour, individual_isolation=decide is not None,
                        case_window=CASE_WINDOW if decide is not None else 0, observables=extra, state_type=NYCState,
                        system_type=NYCSystem, estimator=cfg.estimator)
    info.update(agents=N, edges=net.num_edges, **{k: v for k, v in net.summary().items() if k.startswith("mean_degree")})
    if decide is not None:
        info.update(llm=asker.backend.name, llm_model=asker.backend.model, archetypes=decide.archetypes.K,
                    llm_cache=str(asker.cache.path) if asker.cache is not None else None)
    dev = cfg.device
    return NYCSetup(model, params_.to(dev), system.to(dev), state.to(dev), dates, areas, float(cfg.scale), pop, marg,
                    AGE_LABELS, info, asker, decide, cfg)


def validate_setup(setup: NYCSetup) -> dict[str, Any]:
    """Synthesized marginals vs census, household sizes, and per-layer age mixing vs Mistry matrices."""
    pop, net = setup.population, setup.system.network.to("cpu")
    C = load_contact_matrices()
    age = pop.age.long()
    out: dict[str, Any] = {"marginals": marginal_errors(pop, setup.marginals)}
    sizes = torch.bincount(pop.household.long())
    hh_area = torch.zeros(sizes.numel(), dtype=torch.long).index_put_((pop.household.long(),), pop.area.long())
    out["household_size"] = {
        "mean_by_area": {a: float(sizes[hh_area == i].double().mean()) for i, a in enumerate(setup.areas)},
        "census_mean_by_area": {a: float(setup.marginals.age_counts[i].sum() / setup.marginals.households[i])
                                for i, a in enumerate(setup.areas)},
        "distribution": (torch.bincount(sizes, minlength=11)[1:].double() / sizes.numel()).tolist(),
    }
    layers = {}
    for name in LAYERS:
        ei, _ = net.layer_edges(name)
        syn = mixing_matrix(ei, age, len(AGE_LABELS))
        src = C[name]
        layers[name] = {"age_mixing_correlation": matrix_correlation(syn, src),
                        "mean_degree": ei.shape[1] / pop.num_agents,
                        "source_mean_contacts": float((src.sum(1) * torch.bincount(age, minlength=18).double()).sum() / pop.num_agents)}
    out["layers"] = layers
    return out

