"""Compartments, dwell-time distributions, the epidemic system (constant) and state (changing).

Time unit: one model step of ``dt`` days. Dwell times are probability mass functions
over whole steps (1, 2, ..., D), drawn by inverse CDF when an agent enters a stage; the
geometric case reproduces exponential (memoryless) ODE compartments as ``dt -> 0``,
``fixed`` gives deterministic delays, and ``gamma`` a discretized gamma (Erlang-like,
peaked) dwell as used for COVID-19 incubation and infectious periods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm.networks import Network
from lpm.params import Params
from lpm.state import CodeBook, State, System, static_field, tensor_field

__all__ = ["Dwell", "Transition", "DiseaseModel", "EpiState", "EpiSystem", "epi_system", "sir", "seir", "seirm"]


@dataclass(frozen=True)
class Dwell:
    """Distribution of whole steps spent in a stage: ``pmf[k]`` = P(dwell = k + 1)."""

    pmf: tuple[float, ...]
    label: str = ""

    def __post_init__(self) -> None:
        p = torch.tensor(self.pmf, dtype=torch.float64)
        if p.numel() == 0 or bool((p < 0).any()) or not math.isclose(float(p.sum()), 1.0, abs_tol=1e-6):
            raise ConfigError(f"Dwell {self.label}: pmf must be non-negative and sum to 1, got sum {float(p.sum()):.6f}")
        if p.numel() > 32000:
            raise ConfigError(f"Dwell {self.label}: at most 32000 steps (int16 timers), got {p.numel()}")

    @property
    def mean(self) -> float:
        """Mean dwell in steps."""
        return float(sum((k + 1) * q for k, q in enumerate(self.pmf)))

    @staticmethod
    def geometric(rate_per_day: float, dt: float = 1.0, tail: float = 1e-7) -> "Dwell":
        """Memoryless exit with probability ``1 - exp(-rate dt)`` per step (mean ~ 1/rate days)."""
        if not rate_per_day > 0 or math.isinf(rate_per_day):  # "not >" also refuses NaN
            raise ConfigError(f"Dwell.geometric: rate_per_day must be a finite number > 0, got {rate_per_day}")
        q = -math.expm1(-rate_per_day * dt)
        n = max(1, min(32000, int(math.ceil(math.log(tail) / math.log1p(-q))) if q < 1 else 1))
        pmf = [q * (1 - q) ** k for k in range(n)]
        pmf[-1] += 1.0 - sum(pmf)
        return Dwell(tuple(pmf), f"geometric(rate={rate_per_day}/day)")

    @staticmethod
    def fixed(days: float, dt: float = 1.0) -> "Dwell":
        """Deterministic dwell of ``round(days / dt)`` steps (at least one)."""
        if not 0 < days < math.inf:
            raise ConfigError(f"Dwell.fixed: days must be a finite number > 0, got {days}")
        k = max(1, int(round(days / dt)))
        return Dwell(tuple([0.0] * (k - 1) + [1.0]), f"fixed({days} days)")

    @staticmethod
    def gamma(mean_days: float, sd_days: float, dt: float = 1.0, tail: float = 1e-6) -> "Dwell":
        """Gamma(mean, sd) discretized to steps by CDF differences (peaked for sd < mean)."""
        if not (0 < mean_days < math.inf and 0 < sd_days < math.inf):
            raise ConfigError(f"Dwell.gamma: mean_days and sd_days must be finite numbers > 0, got {mean_days}, {sd_days}")
        shape = (mean_days / sd_days) ** 2
        scale = sd_days**2 / mean_days
        upper = mean_days + 12 * sd_days
        n = max(1, int(math.ceil(upper / dt)))
        edges = torch.arange(0, n + 1, dtype=torch.float64) * dt
        edges[0] = 1e-12
        cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), edges / scale)
        pmf = (cdf[1:] - cdf[:-1]).clamp_min(0)
        pmf[0] += cdf[0]
        pmf = pmf / pmf.sum()
        # drop a negligible right tail so tables stay short
        keep = int((pmf.cumsum(0) < 1 - tail).sum()) + 1
        pmf = pmf[:keep] / pmf[:keep].sum()
        return Dwell(tuple(pmf.tolist()), f"gamma(mean={mean_days}, sd={sd_days} days)")


@dataclass(frozen=True)
class Transition:
    """When the dwell in a stage ends: go to ``to``, or to ``alt`` with probability ``alt_prob``.

    ``alt_prob(params, system, state) -> [N] or []`` gives the per-agent branch probability
    (e.g. age-specific fatality); ``alt_reads`` names the fields it reads, for the plan.
    """

    to: str
    alt: str | None = None
    alt_prob: Callable[[Params, System, State], Tensor] | None = None
    alt_reads: tuple[str, ...] = ()
    alt_params: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiseaseModel:
    """Stages, their relative infectiousness, dwell distributions and transitions."""

    stages: tuple[str, ...]
    infectiousness: Mapping[str, float]
    entry: str
    dwell: Mapping[str, Dwell]
    transitions: Mapping[str, Transition]
    susceptible: str = "S"
    dt: float = 1.0

    def __post_init__(self) -> None:
        known = set(self.stages)
        if len(self.stages) > 127:
            raise ConfigError("stages: at most 127 (int8 codes)")
        for name in [self.entry, self.susceptible, *self.infectiousness, *self.dwell, *self.transitions]:
            if name not in known:
                raise ConfigError(f"DiseaseModel: stage {name!r} is not in stages {self.stages}")
        for src, tr in self.transitions.items():
            for dst in (tr.to, tr.alt):
                if dst is not None and dst not in known:
                    raise ConfigError(f"DiseaseModel: transition {src}->{dst}: unknown stage {dst!r}")
            if src not in self.dwell:
                raise ConfigError(f"DiseaseModel: stage {src!r} has a transition but no dwell distribution")
            if (tr.alt is None) != (tr.alt_prob is None):
                raise ConfigError(f"DiseaseModel: transition from {src!r} needs both alt and alt_prob, or neither")
        for s, v in self.infectiousness.items():
            if v < 0:
                raise ConfigError(f"infectiousness[{s!r}]: expected >= 0, got {v}")

    @property
    def codebook(self) -> CodeBook:
        """Code book of the stage codes."""
        return CodeBook("stage", self.stages)

    def code(self, stage: str) -> int:
        """Integer code of a stage."""
        return self.codebook.code(stage)

    def next_stage_table(self, device: torch.device | str = "cpu") -> Tensor:
        """Destination code of each stage's timed exit ``[C]`` (int8; -1: absorbing)."""
        to = [-1] * len(self.stages)
        for src, tr in self.transitions.items():
            to[self.code(src)] = self.code(tr.to)
        return torch.tensor(to, dtype=torch.int8, device=device)

    def infectiousness_table(self, device: torch.device | str = "cpu") -> Tensor:
        """Relative infectiousness per stage code ``[C]`` (float32)."""
        return torch.tensor([float(self.infectiousness.get(s, 0.0)) for s in self.stages], dtype=torch.float32, device=device)

    def dwell_table(self, device: torch.device | str = "cpu") -> Tensor:
        """Stacked CDFs ``[C, D]``; stages without dwell have CDF 1 (timer 0, absorbing)."""
        D = max([len(d.pmf) for d in self.dwell.values()] + [1])
        rows = []
        for s in self.stages:
            if s in self.dwell:
                pmf = torch.tensor(self.dwell[s].pmf, dtype=torch.float64)
                cdf = torch.ones(D, dtype=torch.float64)
                cdf[: pmf.numel()] = pmf.cumsum(0).clamp_max(1.0)
                cdf[pmf.numel() - 1:] = 1.0
            else:
                cdf = torch.full((D,), -1.0, dtype=torch.float64)  # marks "no dwell"
            rows.append(cdf)
        return torch.stack(rows).to(device)


@dataclass(frozen=True)
class EpiSystem(System):
    """What an epidemic run never changes: the disease's tables and the contact structure of N agents.

    ``C`` stage codes, ``D`` steps of the longest dwell, ``L`` network layers, ``G`` mixing groups.
    Built by :func:`epi_system` from a :class:`DiseaseModel`, whose substeps read these tables.
    """

    infectiousness: Tensor = tensor_field(("C",), torch.float32, "relative infectiousness per stage code")
    dwell_cdf: Tensor = tensor_field(("C", "D"), torch.float64, "dwell CDF per stage code over steps 1..D (-1: no dwell)")
    next_stage: Tensor = tensor_field(("C",), torch.int8, "destination code of each stage's timed exit (-1: absorbing)")
    network: Network | None = tensor_field((), None, "contact network (None: well-mixed)", optional=True)
    layer_scale_base: Tensor | None = tensor_field(("L",), (torch.float32, torch.float64), "per-layer contact multiplier before interventions", optional=True)
    group: Tensor | None = tensor_field(("N",), (torch.int8, torch.int16, torch.int32, torch.int64), "mixing group code for well-mixed transmission", optional=True)
    mixing: Tensor | None = tensor_field(("G", "G"), (torch.float32, torch.float64), "contacts per day of a g-member with group h (well-mixed)", optional=True)
    stages: tuple[str, ...] = static_field("stage names by code", default=())


def epi_system(disease: DiseaseModel, *, system_type: type[EpiSystem] = EpiSystem, device: torch.device | str = "cpu",
               **fields: object) -> EpiSystem:
    """The system of ``disease`` (its tables) plus ``fields`` (network, mixing, agent attributes...), on ``device``."""
    names = set(system_type.field_names())
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConfigError(f"epi_system: {system_type.__name__} has no field(s) {unknown}; fields: {sorted(names)}")
    system = system_type(infectiousness=disease.infectiousness_table(), dwell_cdf=disease.dwell_table(),
                         next_stage=disease.next_stage_table(), stages=disease.stages, **fields)
    return system.to(device)


@dataclass(frozen=True)
class EpiState(State):
    """What changes in an epidemic on N agents (time unit: one step of dt days); see :class:`EpiSystem`."""

    stage: Tensor = tensor_field(("N",), torch.int8, "disease stage code (DiseaseModel.codebook)")
    timer: Tensor = tensor_field(("N",), torch.int16, "steps left in the current stage; 0 = no timed exit; -k = k steps, starting at the next progression")
    carrier: Tensor = tensor_field(("N",), (torch.float32, torch.float64), "gradient carrier: value 1, accumulates d log P of the agent's events")
    entered: Tensor = tensor_field(("N",), torch.int8, "stage code entered during the last step, -1 if none")
    susceptibility: Tensor | None = tensor_field(("N",), (torch.float32, torch.float64), "relative susceptibility (1 = baseline)", optional=True)
    layer_scale: Tensor | None = tensor_field(("L",), (torch.float32, torch.float64), "per-layer contact multiplier this step", optional=True)
    contact_factor: Tensor | None = tensor_field(("N", "L"), (torch.float32, torch.float64), "per-agent, per-layer multiplier of onward contacts (isolation)", optional=True)
    entered_step: Tensor | None = tensor_field((), (torch.int64,), "step at which `entered` was last reset (None: never)", optional=True)
    source_load: Tensor | None = tensor_field(("N", "K"), torch.float32, "summed per-layer source factor of the agent's transmitting steps (written by gradient runs of the presence estimator)", optional=True)


def _const(value: float) -> Callable[[Params, System, State], Tensor]:
    return lambda params, system, state: torch.tensor(value, device=state.stage.device)


def sir(recovery_rate: float = 0.1, dt: float = 1.0, recovery: Dwell | None = None) -> DiseaseModel:
    """S -> I -> R with geometric (exponential) recovery unless ``recovery`` is given."""
    return DiseaseModel(
        stages=("S", "I", "R"),
        infectiousness={"I": 1.0},
        entry="I",
        dwell={"I": recovery or Dwell.geometric(recovery_rate, dt)},
        transitions={"I": Transition("R")},
        dt=dt,
    )


def seir(latent: Dwell, infectious: Dwell, dt: float = 1.0) -> DiseaseModel:
    """S -> E -> I -> R with the given latent and infectious dwell distributions."""
    return DiseaseModel(
        stages=("S", "E", "I", "R"),
        infectiousness={"I": 1.0},
        entry="E",
        dwell={"E": latent, "I": infectious},
        transitions={"E": Transition("I"), "I": Transition("R")},
        dt=dt,
    )


def seirm(latent: Dwell, infectious: Dwell, fatality: float | Callable[[Params, System, State], Tensor],
          dt: float = 1.0, fatality_reads: Sequence[str] = (), fatality_params: Sequence[str] = ()) -> DiseaseModel:
    """S -> E -> I -> R or M (mortality) with probability ``fatality`` at the end of I."""
    prob = _const(float(fatality)) if isinstance(fatality, (int, float)) else fatality
    return DiseaseModel(
        stages=("S", "E", "I", "R", "M"),
        infectiousness={"I": 1.0},
        entry="E",
        dwell={"E": latent, "I": infectious},
        transitions={"E": Transition("I"), "I": Transition("R", "M", prob, tuple(fatality_reads), tuple(fatality_params))},
        dt=dt,
    )
