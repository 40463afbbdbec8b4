"""Transmission and stage progression: vectorized, differentiable epidemic substeps.

Transmission (force of infection, per step of ``dt`` days)::

    lambda_i = beta * s_i * dt * F_i,
    F_i = sum_{e: j -> i} w_e * scale[layer_e] * c_{j,layer_e} * iota[stage_j] * carrier_j   (network)
    F_i = sum_h M[g_i, h] * I_h / N_h                                                         (well-mixed)
    P(infected this step) = 1 - exp(-lambda_i)

Gradients: each realized event multiplies the agent's ``carrier`` by
``1 + (p - sg(p)) / sg(p)`` (value 1, gradient d log p): an agent's later infectiousness
and outcomes then carry d log P(its path), so ``E[1_event * dlog p] = dp`` gives a
first-order unbiased estimate of how event probabilities change downstream quantities
(see :mod:`lpm.sampling` for the straight-through family this extends). One uniform per
agent and step is drawn from the substep's stream; the dwell of the new stage reuses it
through the conditional uniform ``u / p``, so event and dwell draws stay aligned across
parameter values (common random numbers).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpm.params import Params
from lpm.state import State, StateError
from lpm.substep import Substep
from substeps.epidemic.disease import DiseaseModel, EpiState

__all__ = ["Transmission", "Progression", "initial_state", "event_carrier", "compartment_counts"]

_TINY = 1e-30


def event_carrier(p: Tensor, event: Tensor) -> Tensor:
    """Factor with value 1 whose gradient is ``d log p`` on events and 0 elsewhere."""
    if not p.requires_grad:
        return torch.ones_like(p)
    pd = p.detach().clamp_min(_TINY)
    return torch.where(event, 1.0 + (p - p.detach()) / pd, torch.ones_like(p))


def _draw_dwell(cdf: Tensor, codes: Tensor, u: Tensor) -> Tensor:
    """Steps to spend in stage ``codes`` by inverse CDF of row ``codes`` at ``u``: int16."""
    C, D = cdf.shape
    # one flat search over the stacked rows: row c lives in [c, c + 1]
    offset = torch.arange(C, device=cdf.device, dtype=cdf.dtype).unsqueeze(1)
    flat = (cdf.clamp_min(0) + offset).reshape(-1)
    c = codes.long()
    q = u.to(cdf.dtype).clamp(0, 1 - 1e-12) + c.to(cdf.dtype)
    k = torch.searchsorted(flat, q, right=True) - c * D
    steps = (k + 1).clamp(1, D)
    no_dwell = cdf[c, 0] < 0
    return torch.where(no_dwell, torch.zeros_like(steps), steps).to(torch.int16)


class Transmission(Substep):
    """Infection of susceptible agents over a layered network or by well-mixed contact."""

    def __init__(self, disease: DiseaseModel, *, network: bool = True, beta: str = "beta", name: str = "transmission",
                 use_layer_scale: bool = False, use_contact_factor: bool = False, use_susceptibility: bool = False) -> None:
        self.disease = disease
        self.name = name
        self.network = network
        self.beta = beta
        self.use_layer_scale = use_layer_scale
        self.use_contact_factor = use_contact_factor
        self.use_susceptibility = use_susceptibility
        reads = ["stage", "timer", "carrier"]
        if network:
            reads.append("network")
            if use_layer_scale:
                reads.append("layer_scale")
            if use_contact_factor:
                reads.append("contact_factor")
        else:
            reads += ["group", "mixing"]
        if use_susceptibility:
            reads.append("susceptibility")
        self.reads = tuple(reads)
        self.writes = ("stage", "timer", "carrier", "entered")
        self.params = (beta,)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Infectiousness ``[C]`` and dwell CDF ``[C, D]`` on ``device`` (cached, constant)."""
        if device not in self._tables:
            self._tables[device] = (self.disease.infectiousness_table(device), self.disease.dwell_table(device))
        return self._tables[device]

    def force(self, params: Params, state: EpiState, iota: Tensor) -> Tensor:
        """Force of infection on each agent ``[N]`` before ``beta`` and ``dt``."""
        inf = iota[state.stage.long()]
        active = inf > 0
        value = inf * state.carrier
        if self.network:
            if self.use_contact_factor:
                value = value.unsqueeze(1) * state.contact_factor
            scale = state.layer_scale if self.use_layer_scale else None
            return state.network.push(value, active=active, layer_scale=scale)
        G = state.mixing.shape[0]
        g = state.group.long()
        sizes = torch.bincount(g, minlength=G).to(value.dtype).clamp_min(1)
        prevalence = value.new_zeros(G).index_add(0, g, value) / sizes
        return (state.mixing.to(value.dtype) @ prevalence)[g]

    def __call__(self, params: Params, state: EpiState, t: int, rng: torch.Generator) -> EpiState:
        d = self.disease
        iota, cdf = self.tables(state.stage.device)
        beta = getattr(params, self.beta)
        if beta.numel() != 1:
            raise StateError(f"parameter {self.beta}: expected a scalar, got shape {tuple(beta.shape)}")
        F = self.force(params, state, iota)
        lam = beta * d.dt * F
        if self.use_susceptibility:
            lam = lam * state.susceptibility
        p = -torch.expm1(-lam)
        u = torch.rand(state.stage.shape, generator=rng, device=state.stage.device)
        event = (state.stage == d.code(d.susceptible)) & (u < p)
        entry = d.code(d.entry)
        u_dwell = u / p.detach().clamp_min(_TINY)
        timer = _draw_dwell(cdf, torch.full_like(state.stage, entry), u_dwell)
        return state.replace(
            stage=torch.where(event, torch.tensor(entry, dtype=torch.int8, device=state.stage.device), state.stage),
            timer=torch.where(event, timer, state.timer),
            carrier=state.carrier * event_carrier(p, event),
            entered=torch.where(event, entry, -1).to(torch.int8),
        )


class Progression(Substep):
    """Timed exits from stages, with optional branching (e.g. recovery vs death).

    Must run after :class:`Transmission` in a step: it adds its moves to ``entered``.
    """

    def __init__(self, disease: DiseaseModel, name: str = "progression") -> None:
        self.disease = disease
        self.name = name
        extra_reads = sorted({f for tr in disease.transitions.values() for f in tr.alt_reads})
        self.reads = ("stage", "timer", "carrier", "entered", *extra_reads)
        self.writes = ("stage", "timer", "carrier", "entered")
        self.params = tuple(sorted({p for tr in disease.transitions.values() for p in tr.alt_params}))
        C = len(disease.stages)
        to = [-1] * C
        for src, tr in disease.transitions.items():
            to[disease.code(src)] = disease.code(tr.to)
        self._to = torch.tensor(to, dtype=torch.int8)
        self._alts = [(disease.code(src), disease.code(tr.alt), tr.alt_prob)
                      for src, tr in disease.transitions.items() if tr.alt is not None]
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Destination code ``[C]`` and dwell CDF ``[C, D]`` on ``device``."""
        if device not in self._tables:
            self._tables[device] = (self._to.to(device), self.disease.dwell_table(device))
        return self._tables[device]

    def __call__(self, params: Params, state: EpiState, t: int, rng: torch.Generator) -> EpiState:
        to, cdf = self.tables(state.stage.device)
        stage, timer = state.stage, state.timer
        u = torch.rand(stage.shape, generator=rng, device=stage.device)
        moving = timer == 1
        new_stage = torch.where(moving, to[stage.long()], stage)
        carrier = state.carrier
        u_dwell = u
        for src, alt, prob_fn in self._alts:
            q = prob_fn(params, state)
            q = torch.as_tensor(q, device=stage.device).to(torch.float32).expand(stage.shape)
            branching = moving & (stage == src)
            take_alt = branching & (u < q)
            new_stage = torch.where(take_alt, torch.tensor(alt, dtype=torch.int8, device=stage.device), new_stage)
            qd = q.detach()
            u_dwell = torch.where(branching, torch.where(u < qd, u / qd.clamp_min(_TINY), (u - qd) / (1 - qd).clamp_min(_TINY)), u_dwell)
            if q.requires_grad:
                carrier = carrier * torch.where(branching, torch.where(take_alt, event_carrier(q, take_alt), event_carrier(1 - q, branching & ~take_alt)), torch.ones_like(carrier))
        new_timer = torch.where(moving, _draw_dwell(cdf, new_stage, u_dwell), (timer - 1).clamp_min(0).to(torch.int16))
        return state.replace(
            stage=new_stage,
            timer=new_timer,
            carrier=carrier,
            entered=torch.where(moving, new_stage, state.entered),
        )


def initial_state(
    disease: DiseaseModel,
    num_agents: int,
    initial_infected: int | Tensor,
    *,
    seed: int = 0,
    network=None,
    device: torch.device | str = "cpu",
    **fields: Tensor,
) -> EpiState:
    """All susceptible but ``initial_infected`` agents (a count drawn at random, or a bool mask) in the entry stage."""
    if num_agents <= 0:
        raise StateError(f"num_agents: expected > 0, got {num_agents}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    stage = torch.full((num_agents,), disease.code(disease.susceptible), dtype=torch.int8)
    if isinstance(initial_infected, Tensor):
        if initial_infected.shape != (num_agents,) or initial_infected.dtype != torch.bool:
            raise StateError(f"initial_infected: expected a bool mask of shape ({num_agents},), got {initial_infected.dtype} {tuple(initial_infected.shape)}")
        seeds = initial_infected.cpu().nonzero().squeeze(1)
    else:
        if not 0 <= int(initial_infected) <= num_agents:
            raise StateError(f"initial_infected: expected 0..{num_agents}, got {initial_infected}")
        seeds = torch.randperm(num_agents, generator=g)[: int(initial_infected)]
    entry = disease.code(disease.entry)
    stage[seeds] = entry
    cdf = disease.dwell_table()
    timer = torch.zeros(num_agents, dtype=torch.int16)
    timer[seeds] = _draw_dwell(cdf, torch.full((seeds.numel(),), entry, dtype=torch.int8), torch.rand(seeds.numel(), generator=g))
    entered = torch.full((num_agents,), -1, dtype=torch.int8)
    state = EpiState(stage=stage, timer=timer, carrier=torch.ones(num_agents), entered=entered, network=network,
                     stages=disease.stages, **fields)
    return state.to(device)


def compartment_counts(state: EpiState, num_stages: int) -> Tensor:
    """Agents per stage code ``[C]`` (float)."""
    return torch.bincount(state.stage.long(), minlength=num_stages).float()
