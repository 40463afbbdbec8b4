"""COVID-19 on a contact network: SEIRM-style stages, age-specific risks, isolation, testing.

Stages (one step = ``dt`` days, default 1 day)::

    S -> E -> Ip -> Is -> R            E: latent, not infectious
              |      \\-> H -> R        Ip: pre-symptomatic, infectious
              |            \\-> D       Is: symptomatic;  H: hospitalised (isolated, not infectious)
              \\-> Ia -> R              Ia: asymptomatic (relative infectiousness ``rel_inf_asymptomatic``)

Branches, by age band (tables from :func:`age_tables`, held by the system, :class:`CovidSystem`):

* ``E -> Ia`` with probability ``1 - p_symptomatic(age)``;
* ``Is -> H`` with probability ``min(1, ihr_scale * IHR(age) / p_symptomatic(age))``;
* ``H -> D`` with probability ``min(0.95, ifr_scale * IFR(age) / IHR(age))`` (every death
  passes through H: a simplification; NYC also counted deaths at home and in care homes).

Published defaults (``ihr_scale = ifr_scale = 1`` reproduce them; calibration fits the scales):

* susceptibility and clinical (symptomatic) fraction by age: Davies N.G. et al., "Age-dependent
  effects in the transmission and control of COVID-19 epidemics", Nat Med 26:1205 (2020),
  posterior medians by decade (susceptibility ~0.4 under 20 vs ~0.8 above; clinical fraction
  0.29 at 10-19 rising to 0.69 at 70+);
* infection fatality ratio: Levin A.T. et al., "Assessing the age specificity of infection
  fatality rates for COVID-19", Eur J Epidemiol 35:1123 (2020): ``log10 IFR(%) = -3.27 + 0.0524 age``;
* infection hospitalisation ratio: Salje H. et al., "Estimating the burden of SARS-CoV-2 in
  France", Science 369:208 (2020), P(hospital | infection) by decade;
* latent period ~3 days and pre-symptomatic infectious period ~2 days (incubation ~5 days):
  Lauer S.A. et al., Ann Intern Med 172:577 (2020); He X. et al., Nat Med 26:672 (2020);
* relative infectiousness of asymptomatic infections 0.5: between Buitrago-Garcia D. et al.,
  PLoS Med 17:e1003346 (2020) (~0.35) and CDC planning scenarios (0.75).

Isolation (:class:`Isolation`): symptomatic agents reduce their non-household contacts by
the fitted fraction ``isolation`` (on the system's ``reduced_layers``) by writing
``contact_factor [N, L]`` (a differentiable path).
With ``individual=True`` the state also carries a per-agent compliance ``isolation [N]``
(P(an agent isolates when symptomatic), e.g. written weekly by a behaviour substep) and the
parameter ``isolation`` becomes the effectiveness of isolating (share of non-household
contacts an isolating agent drops): a symptomatic agent keeps ``1 - isolation * compliance``
of those contacts, the expected value over whether it complies (mean field, so the path
stays differentiable in both). Compliance 1 everywhere gives back the plain model exactly.
:class:`ReportedWindow` keeps the last ``W`` days of reported cases per area in the state,
so behaviour can react to what residents saw on the dashboards without breaking purity.
Testing (:class:`Testing`): an agent entering ``Is`` (or ``Ia``, at relative rate
``asymptomatic_testing``) is tested and *reported* with probability
``ascertainment * test_capacity[t]`` (system tables); ``reported [N]`` holds the event's gradient carrier, so
reported cases are differentiable in ``ascertainment`` and, through the carrier, in every
upstream parameter. Nothing here knows a city.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from lpm.errors import ConfigError, ParamError
from lpm.interventions import Intervention, Modulate
from lpm.model import Model, Observable
from lpm.params import Interval, Params, Positive
from lpm.kernels import stage_mask
from lpm.state import State, System, tensor_field
from lpm.substep import Substep
from substeps.epidemic.disease import DiseaseModel, Dwell, EpiState, EpiSystem, Transition, epi_system
from substeps.epidemic.dynamics import Progression, Transmission, event_carrier

__all__ = ["CovidState", "CovidSystem", "covid_system", "age_tables", "covid_disease", "covid_params", "AreaContacts", "Isolation",
           "ReportedWindow", "Testing", "covid_model", "covid_observables", "STAGES", "PARAM_DOCS"]

STAGES = ("S", "E", "Ip", "Ia", "Is", "H", "R", "D")

#: parameter name -> meaning (fitted unless noted)
PARAM_DOCS = {
    "beta": "transmission probability per contact-day with a fully infectious agent",
    "ihr_scale": "multiplier of the age-specific infection hospitalisation ratio (Salje 2020)",
    "ifr_scale": "multiplier of the age-specific infection fatality ratio (Levin 2020)",
    "ascertainment": "probability that a symptomatic infection is tested and reported at full testing capacity",
    "isolation": "fraction of non-household contacts a symptomatic agent drops (with per-agent compliance: "
                 "an agent who isolates drops)",
}

# decade tables, index k covers ages [10k, 10k+10), last row 80+
_DAVIES_SUSCEPTIBILITY = (0.40, 0.38, 0.79, 0.86, 0.80, 0.82, 0.88, 0.74, 0.74)
_DAVIES_CLINICAL = (0.29, 0.21, 0.27, 0.33, 0.40, 0.49, 0.63, 0.69, 0.69)
_SALJE_IHR = (0.001, 0.001, 0.005, 0.011, 0.014, 0.029, 0.058, 0.093, 0.262)


def age_tables(age_mid: Sequence[float] | Tensor) -> dict[str, Tensor]:
    """Per age band (given by its mid age in years): susceptibility, p_symptomatic, ihr, ifr, p_hosp, p_death."""
    mid = torch.as_tensor(age_mid, dtype=torch.float64)
    dec = (mid // 10).long().clamp(0, 8)
    sus = torch.tensor(_DAVIES_SUSCEPTIBILITY, dtype=torch.float64)[dec]
    sym = torch.tensor(_DAVIES_CLINICAL, dtype=torch.float64)[dec]
    ihr = torch.tensor(_SALJE_IHR, dtype=torch.float64)[dec]
    ifr = 10 ** (-3.27 + 0.0524 * mid) / 100
    ihr = torch.maximum(ihr, ifr * 1.25)  # every death passes through hospital
    return {"susceptibility": sus.float(), "p_symptomatic": sym.float(), "ihr": ihr.float(), "ifr": ifr.float(),
            "p_hosp": (ihr / sym).clamp_max(1.0).float(), "p_death": (ifr / ihr).clamp_max(0.95).float()}


@dataclass(frozen=True)
class CovidSystem(EpiSystem):
    """:class:`EpiSystem` plus the attributes, schedules and tables the COVID-19 substeps read.

    ``B`` age bands, ``A`` areas, ``L`` layers, ``T`` (``Tc``) days of mobility (testing) schedules; the last value holds after.
    """

    area: Tensor = tensor_field(("N",), torch.int8, "home area code", default=None)
    age: Tensor = tensor_field(("N",), torch.int8, "age band code (rows of the age tables)", default=None)
    susceptibility_base: Tensor | None = tensor_field(("N",), torch.float32, "susceptibility before vaccination", optional=True)
    p_asymptomatic: Tensor = tensor_field(("B",), torch.float32, "P(E -> Ia) per age band (1 - Davies clinical fraction)", default=None)
    p_hosp: Tensor = tensor_field(("B",), torch.float32, "P(Is -> H) per age band at ihr_scale 1", default=None)
    p_death: Tensor = tensor_field(("B",), torch.float32, "P(H -> D) per age band at ifr_scale 1", default=None)
    area_schedule: Tensor = tensor_field(("T", "A", "L"), torch.float32, "contact multiplier by day, area and layer (mobility)", default=None)
    test_capacity: Tensor = tensor_field(("Tc",), torch.float32, "testing capacity by day (1 = full)", default=None)
    test_rate: Tensor = tensor_field(("C+1",), torch.float32, "relative testing rate on entering each stage (last: entered nothing)", default=None)
    reduced_layers: Tensor = tensor_field(("L",), torch.float32, "1 for layers a symptomatic agent reduces when isolating", default=None)


def covid_system(disease: DiseaseModel, *, age_mid: Sequence[float] | Tensor, area: Tensor, age: Tensor,
                 area_schedule: Tensor, test_capacity: Tensor, reduced_layers: Sequence[bool],
                 test_rates: Mapping[str, float] | None = None, system_type: type[CovidSystem] = CovidSystem,
                 device: torch.device | str = "cpu", **fields: Any) -> CovidSystem:
    """The constants of a COVID-19 run: disease and age tables (bands with mid ages ``age_mid``), schedules, attributes.

    ``test_rates``: relative testing rate of agents entering each stage (default ``Is`` 1,
    ``Ia`` 0.1); ``fields``: the network, ``layer_scale_base`` and other system fields.
    """
    if area_schedule.dim() != 3:
        raise ConfigError(f"area_schedule: expected [T, A, L], got shape {tuple(area_schedule.shape)}")
    t = age_tables(age_mid)
    rates = dict(test_rates or {"Is": 1.0, "Ia": 0.1})
    table = torch.zeros(len(disease.stages) + 1)
    for st, r in rates.items():
        table[disease.code(st)] = float(r)
    return epi_system(disease, system_type=system_type, device=device, area=area, age=age,
                      p_asymptomatic=1.0 - t["p_symptomatic"], p_hosp=t["p_hosp"], p_death=t["p_death"],
                      area_schedule=area_schedule.float(), test_capacity=test_capacity.float(), test_rate=table,
                      reduced_layers=torch.tensor([float(r) for r in reduced_layers]), **fields)


@dataclass(frozen=True)
class CovidState(EpiState):
    """:class:`EpiState` plus what the COVID-19 substeps change (see :class:`CovidSystem` for the constants)."""

    contact_factor_base: Tensor | None = tensor_field(("N", "L"), torch.float32, "per-agent layer multiplier before isolation (area mobility)", optional=True)
    reported: Tensor | None = tensor_field(("N",), torch.float32, "carrier of agents reported (tested positive) this step, 0 otherwise", optional=True)
    isolation: Tensor | None = tensor_field(("N",), torch.float32, "P(isolates | symptomatic) per agent (compliance); None: everyone complies", optional=True)
    recent_cases: Tensor | None = tensor_field(("W", "A"), torch.float32, "reported cases per area on each of the last W days (ring buffer, row t % W)", optional=True)


class _AgeProb:
    """Branch probability ``clamp(params[scale] * system.<table>[system.age])`` (a picklable closure)."""

    def __init__(self, table: str, scale: str | None, cap: float) -> None:
        self.table, self.scale, self.cap = table, scale, cap

    def __call__(self, params: Params, system: System, state: State) -> Tensor:
        p = getattr(system, self.table)[system.age.long()]
        if self.scale is not None:
            p = p * getattr(params, self.scale)
        return p.clamp(0.0, self.cap)


def covid_disease(*, dt: float = 1.0, rel_inf_asymptomatic: float = 0.5,
                  latent: Dwell | None = None, presymptomatic: Dwell | None = None, symptomatic: Dwell | None = None,
                  asymptomatic: Dwell | None = None, hospital: Dwell | None = None) -> DiseaseModel:
    """The stage graph above with age-specific branches (their tables are on the system: :func:`covid_system`)."""
    lat = latent or Dwell.gamma(3.0, 1.5, dt)
    # the latent dwell is at least 2 steps, so an infection is never overwritten in ``entered`` by a
    # progression in the same step (Transmission runs before Progression)
    lat = Dwell((0.0, *lat.pmf), f"1 + {lat.label}") if lat.pmf[0] > 0 else lat
    return DiseaseModel(
        stages=STAGES,
        infectiousness={"Ip": 1.0, "Is": 1.0, "Ia": rel_inf_asymptomatic},
        entry="E",
        dwell={"E": lat, "Ip": presymptomatic or Dwell.gamma(2.0, 1.0, dt), "Ia": asymptomatic or Dwell.gamma(5.0, 2.0, dt),
               "Is": symptomatic or Dwell.gamma(6.0, 2.5, dt), "H": hospital or Dwell.gamma(10.0, 5.0, dt)},
        transitions={
            "E": Transition("Ip", "Ia", _AgeProb("p_asymptomatic", None, 1.0), ("age", "p_asymptomatic"), ()),
            "Ip": Transition("Is"),
            "Ia": Transition("R"),
            "Is": Transition("R", "H", _AgeProb("p_hosp", "ihr_scale", 1.0), ("age", "p_hosp"), ("ihr_scale",)),
            "H": Transition("R", "D", _AgeProb("p_death", "ifr_scale", 0.95), ("age", "p_death"), ("ifr_scale",)),
        },
        dt=dt,
    )


def covid_params(**overrides: object) -> Params:
    """Default parameters (see :data:`PARAM_DOCS`); keyword overrides replace a spec or value."""
    specs: dict[str, object] = {
        "beta": Positive(0.05),
        "ihr_scale": Positive(1.0),
        "ifr_scale": Positive(1.0),
        "ascertainment": Interval(0.35, 0.0, 1.0),
        "isolation": Interval(0.5, 0.0, 1.0),
    }
    for k, v in overrides.items():
        if k not in specs:
            raise ParamError(f"covid_params: unknown parameter {k!r}; known: {sorted(specs)}")
        specs[k] = _respec(specs[k], float(v)) if isinstance(v, (int, float)) else v
    return Params(**specs)


def _respec(spec: object, value: float) -> object:
    from lpm.params import ParamSpec

    assert isinstance(spec, ParamSpec)
    return ParamSpec(value, spec.low, spec.high, spec.trainable)


class AreaContacts(Substep):
    """``contact_factor_base[i, l] = area_schedule[t, area_i, l]``: area- and layer-specific mobility."""

    def __init__(self, name: str = "area_contacts") -> None:
        self.name = name
        self.reads = ("area", "area_schedule")
        self.writes = ("contact_factor_base",)

    def __call__(self, params: Params, system: CovidSystem, state: CovidState, t: int, rng: torch.Generator) -> CovidState:
        s = system.area_schedule
        return state.replace(contact_factor_base=s[min(t, s.shape[0] - 1)][system.area.long()])


class Isolation(Substep):
    """Symptomatic agents keep ``1 - isolation`` (``individual``: ``1 - isolation * compliance``) of the system's ``reduced_layers``' contacts."""

    def __init__(self, disease: DiseaseModel, stages: Sequence[str] = ("Is",), name: str = "isolation",
                 individual: bool = False) -> None:
        self.name = name
        self.codes = [disease.code(s) for s in stages]
        self.individual = bool(individual)
        self.reads = ("stage", "contact_factor_base", "reduced_layers") + (("isolation",) if individual else ())
        self.writes = ("contact_factor",)
        self.params = ("isolation",)

    def __call__(self, params: Params, system: CovidSystem, state: CovidState, t: int, rng: torch.Generator) -> CovidState:
        base = state.contact_factor_base
        iso = stage_mask(state.stage, self.codes)
        drop = params.isolation * system.reduced_layers  # [L]
        if self.individual:
            drop = state.isolation.to(base.dtype)[:, None] * drop  # [N, L]: expected drop over compliance
        keep = 1.0 - drop
        return state.replace(contact_factor=torch.where(iso[:, None], base * keep, base))


class ReportedWindow(Substep):
    """``recent_cases[t % W] = reported cases per area this step``: the last W days, summed by readers."""

    def __init__(self, num_areas: int, window: int = 7, name: str = "reported_window") -> None:
        if window < 1 or num_areas < 1:
            raise ConfigError(f"{name}: expected window >= 1 and num_areas >= 1, got {window}, {num_areas}")
        self.num_areas = int(num_areas)
        self.window = int(window)
        self.name = name
        self.reads = ("reported", "area", "recent_cases")
        self.writes = ("recent_cases",)

    def empty(self, device: torch.device | str | None = None) -> Tensor:
        """An all-zero ``[W, A]`` window for the initial state."""
        return torch.zeros(self.window, self.num_areas, device=device)

    def __call__(self, params: Params, system: CovidSystem, state: CovidState, t: int, rng: torch.Generator) -> CovidState:
        # counts only: the window feeds discrete (bucketed) decisions, not a gradient path
        today = state.reported.detach().new_zeros(self.num_areas).index_add(0, system.area.long(), state.reported.detach())
        window = state.recent_cases.clone()
        window[t % self.window] = today
        return state.replace(recent_cases=window)


class Testing(Substep):
    """Agents entering a stage are reported with prob ``ascertainment * test_capacity[t] * test_rate[stage]`` (system tables)."""

    def __init__(self, name: str = "testing") -> None:
        self.name = name
        self.reads = ("entered", "carrier", "test_capacity", "test_rate")
        self.writes = ("reported",)
        self.params = ("ascertainment",)

    def __call__(self, params: Params, system: CovidSystem, state: CovidState, t: int, rng: torch.Generator) -> CovidState:
        dev = state.entered.device
        capacity = system.test_capacity
        cap = capacity[min(t, capacity.shape[0] - 1)]
        rate = system.test_rate[state.entered.long()]  # last entry: "entered nothing" (-1)
        q = (params.ascertainment * cap * rate).clamp(0.0, 1.0)
        u = torch.rand(state.entered.shape, generator=rng, device=dev)
        event = (rate > 0) & (u < q)
        q_full = q.expand_as(rate)
        w = torch.where(event, state.carrier * event_carrier(q_full, event), torch.zeros_like(state.carrier))
        return state.replace(reported=w)


def covid_observables(disease: DiseaseModel, areas: Sequence[str], age_labels: Sequence[str]) -> dict[str, Observable]:
    """Per-area daily counts ``[A]`` (infections, symptomatic_onsets, cases, hospitalizations, deaths) and cases/infections by age ``[G]``."""
    A, G = len(areas), len(age_labels)

    def entries(stage: str, by: str, n: int, labels: Sequence[str]) -> Observable:
        code = disease.code(stage)

        def fn(y: CovidSystem, s: CovidState) -> Tensor:
            v = torch.where(s.entered == code, s.carrier, torch.zeros_like(s.carrier))
            return v.new_zeros(n).index_add(0, getattr(y, by).long(), v)

        return Observable(fn, labels=tuple(labels), reads=("entered", "carrier", by), doc=f"new entries into {stage} by {by}")

    def reported(by: str, n: int, labels: Sequence[str]) -> Observable:
        return Observable(lambda y, s: s.reported.new_zeros(n).index_add(0, getattr(y, by).long(), s.reported),
                          labels=tuple(labels), reads=("reported", by), doc=f"reported cases by {by}")

    return {
        "infections": entries("E", "area", A, areas),
        "symptomatic_onsets": entries("Is", "area", A, areas),
        "cases": reported("area", A, areas),
        "hospitalizations": entries("H", "area", A, areas),
        "deaths": entries("D", "area", A, areas),
        "cases_by_age": reported("age", G, age_labels),
        "infections_by_age": entries("E", "age", G, age_labels),
        "deaths_by_age": entries("D", "age", G, age_labels),
    }


def covid_model(disease: DiseaseModel, *, areas: Sequence[str], age_labels: Sequence[str],
                policies: Sequence[Intervention] = (), vaccination: Sequence[Intervention] = (),
                name: str = "covid", behaviour: Sequence[Substep] = (),
                individual_isolation: bool = False, case_window: int = 0,
                observables: Mapping[str, Observable] | None = None, state_type: type[CovidState] = CovidState,
                system_type: type[CovidSystem] = CovidSystem, estimator: str = "presence") -> Model:
    """Assemble the plan: mobility -> policies -> vaccination -> behaviour -> isolation -> transmission -> progression -> testing.

    ``estimator`` is the :class:`Transmission` gradient estimator (``presence``, ``edge-presence``
    or ``linear``; it changes gradients only, never the forward run).

    ``behaviour`` substeps (e.g. a weekly compliance decision writing ``isolation``) run just
    before :class:`Isolation`, which reads per-agent compliance when ``individual_isolation``;
    ``case_window > 0`` appends a :class:`ReportedWindow` of that many days; ``observables``
    are added to :func:`covid_observables`. Schedules, capacities and tables come with the
    system (:func:`covid_system`).
    """
    steps: list[Substep] = [AreaContacts()]
    steps.append(Modulate("policies", "layer_scale", "layer_scale_base", list(policies)))
    steps.append(Modulate("vaccination", "susceptibility", "susceptibility_base", list(vaccination)))
    steps += list(behaviour)
    steps += [Isolation(disease, individual=individual_isolation),
              Transmission(disease, use_layer_scale=True, use_contact_factor=True, use_susceptibility=True,
                           estimator=estimator),
              Progression(disease),
              Testing()]
    if case_window > 0:
        steps.append(ReportedWindow(len(areas), case_window))
    obs = {**covid_observables(disease, areas, age_labels), **dict(observables or {})}
    return Model(steps, obs, state_type=state_type, system_type=system_type, dt=disease.dt, name=name)
