"""Transmission and stage progression: vectorized, differentiable epidemic substeps.

Transmission (force of infection, per step of ``dt`` days)::

    lambda_i = beta * s_i * dt * F_i,
    F_i = sum_{e: j -> i} w_e * scale[layer_e] * c_{j,layer_e} * iota[stage_j] * carrier_j   (network)
    F_i = sum_h M[g_i, h] * I_h / N_h                                                         (well-mixed)
    P(infected this step) = 1 - exp(-lambda_i)

Gradients (the *path-likelihood carrier* estimator): every step an at-risk agent's
``carrier`` is multiplied by ``q / sg(q)`` where ``q`` is the probability of what actually
happened to it (``p`` if infected, ``1 - p`` if it stayed susceptible; branch probabilities
likewise). The value stays exactly 1, so the forward pass is the exact agent-based model;
the gradient of the carrier is ``d log P(agent's own path | forces)``. Observables sum
carriers (of agents entering a stage, or in it), so their gradient is the agent-local score
function, and infectious agents push ``iota * carrier`` to their contacts, which couples
each agent's score to its infectors'. Three couplings (``Transmission(estimator=...)``):

* ``"presence"`` (default): ``"edge-presence"`` across contacts, and inside the cliques of
  the layer ``clique_layer`` (default ``"household"``, when the network has it) the score
  function: every event's factor also multiplies the carriers of its still-susceptible
  clique mates (:meth:`Transmission._share_in_cliques`), and clique edges push no gradient
  onto their sources' carriers. The per-edge credit below drops the interaction between two
  infectors of one target when one infected the other (removing ``l`` also removes the
  housemate ``l`` infected, whose hazard on ``k`` the per-edge ratio keeps), which is what
  households are made of: 0.80 of the exact derivative on isolated households of 5 (Reed-Frost,
  ``test_isolated_households_gradient_exact``), 0.64 against finite differences on households
  of 5 with SEIR dwell, 0.43 of 8; the clique score function is exact for the household's
  internal randomness (``E[1[k] sum of scores] = dE[1[k]]``) at the price of the score
  function's variance over a few housemates. Measured table: ``benchmarks/results/cpu.md, section gradients``.
  Under autograd on a network with the clique layer this runs on the torch path (the
  compiled kernels have no clique sharing). Only one layer of disjoint cliques is exact: a
  clique member's carrier holds its own clique's events, which members of another group it
  belongs to do not collect (naming NYC's school and work layers too gave 0.2-0.6, far lower).
* ``"edge-presence"``: the credit an infector ``l`` receives from a contact ``k``'s path
  is the likelihood ratio of that path with and without ``l``, ``1 - P(path | no l) /
  P(path | l)``. This is the score-function identity ``dE[f] = sum_l E[s_l (f - f_{-l})]``
  (``f_{-l}``, the outcome without ``l``, is a valid baseline for ``l``'s score) with the
  counterfactual estimated by importance weights on the direct contacts, and recursively
  down the infection tree (each factor has mean 1, so dropping the cross terms adds no
  bias for independent contacts; where contacts of one infector also infect each other,
  households, the dropped interaction biases it low, see above). Per-edge
  terms are recomputed in backward (:class:`_PresenceCoupling`), so memory is that of the
  linear coupling; time is about 1.5-2x. The hazard an infector has put on a contact so far
  is the edge's constant part (``beta dt w`` times the contact's current susceptibility) times
  the infector's summed per-layer source factor (infectiousness x contact factor x layer
  scale over the steps it transmitted: ``source_load [N, K]``, written in gradient runs), so
  isolation, contact schedules and stage changes during the infectious period are exact
  (1.005 of the exact derivative on two-generation trees with a time-varying hazard).
* ``"linear"``: the coupling is the derivative of the force with respect to a scaling of the
  infector's infectiousness. First-order exact when each contact's hazard is small
  (well-mixed); on networks it credits an infection with ``h e^-L / (1 - e^-L) - A`` instead
  of ``1 - R`` and underestimates gradients that compound over generations (0.75-0.8 at
  30-60 days on network SEIRs, 0.78 on the tree).

All three are identical for well-mixed transmission (no per-contact terms).

The unbiased alternative is forward mode, outside autograd: :mod:`lpm.perturbation`
(smoothed perturbation, the StochasticAD approach). In its passes this substep runs its torch
path and draws its infections through :func:`lpm.perturbation.bernoulli`, which records each
candidate's flip weight (``p' / (1 - p)`` or ``|p'| / p``, ``p'`` from the dual numbers) on the
primal run and forces the kept flip on the alternative; a forced infection draws its dwell from
``(u - p) / (1 - p)``, the uniform left over by the non-event. Progression's dwells and branches
and the NYC model's importation and testing draws do not depend on contact multipliers or
``beta``, so this is the only tracked draw (their probabilities carry no tangent). On NYC, where
the carriers are 0.80-0.89 of finite differences at 22-60 days after a perturbed week of
contacts, it gives 0.96-1.16: ``benchmarks/results/cpu.md``, section ``gradients_perturbation``. The full score
function (``f - b`` times every agent's path score) is unbiased but its variance grows
with the number of events (it sums N x T scores); the pruned single-alternative
(StochasticAD-style) estimator needs a coupled perturbed rollout per derivative. The
presence coupling keeps the pathwise estimator's variance at the cost of one extra edge
pass in backward.
One uniform per
agent and step is drawn from the substep's stream; the dwell of the new stage reuses it
through the conditional uniform ``u / p``, so event and dwell draws stay aligned across
parameter values (common random numbers).

Uniforms are counter-based (:func:`lpm.kernels.counter_uniform`, keyed by the substep's
stream, the step and the agent), so only candidates and movers draw, and the compiled
kernels of :mod:`substeps.epidemic.fast` (used for the forward pass when numba is
installed) reproduce the torch path's trajectories exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpm import perturbation
from lpm.kernels import counter_uniform, frontier_edges, mark_indices, push_compact, stage_mask, stream_key
from lpm.errors import ConfigError, ParamError
from lpm.params import Params
from lpm.state import lookup
from lpm.substep import Substep
from substeps.epidemic.disease import DiseaseModel, EpiState, EpiSystem
from substeps.epidemic.fast import fused_progression, fused_transmission

__all__ = ["Transmission", "Progression", "initial_state", "event_carrier", "compartment_counts", "ESTIMATORS"]

_TINY = 1e-30

#: gradient estimators of :class:`Transmission` (see the module docstring)
ESTIMATORS = ("presence", "edge-presence", "linear")


def event_carrier(q: Tensor, mask: Tensor) -> Tensor:
    """Factor with value 1 whose gradient is ``d log q`` where ``mask``, 0 elsewhere.

    ``q`` is the probability of what actually happened to the agent this step (the
    event's probability, or one minus it when the event did not happen).
    """
    if not q.requires_grad:
        return torch.ones_like(q)
    return torch.where(mask, q / q.detach().clamp_min(_TINY), torch.ones_like(q))


def _entered_this_step(state: EpiState, t: int) -> Tensor:
    """``entered`` as written earlier in step ``t``, or all -1 when this is the step's first writer.

    This makes transmission and progression independent of their order in the plan.
    """
    if state.entered_step is None:
        return torch.full_like(state.entered, -1)
    return torch.where(state.entered_step == t, state.entered, torch.full_like(state.entered, -1))


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


def _presence_delta(spec, idx: Tensor, src_stage: Tensor, src_load: Tensor, src_cf: Tensor | None, cand: Tensor,
                    em: Tensor, hit: Tensor, susc: Tensor | None, scale: Tensor | None, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per frontier edge into an at-risk agent: ``(source [A], candidate slot [A], delta [A])``; ``em [C] = expm1(-lambda)``.

    For an edge ``l -> k`` with hazard ``h`` this step and ``A`` accumulated over the earlier
    steps ``l`` transmitted (``src_load [F, K]``: ``l``'s summed source factor per layer, see
    :meth:`Transmission._accumulate_load`), the linear carrier credits ``d log P_k / d c_l`` with
    ``-h`` for a survival and ``h e^-L / (1 - e^-L)`` for an infection (``L``: total hazard on ``k``).
    The presence credit of ``k``'s whole path is ``1 - R``, ``R = P(path | no l) / P(path | l)``:
    survival steps add ``-e^A (e^h - 1)`` (so a survived window totals ``1 - e^A``) and the
    infection step ``e^A (1 - (1 - e^-(L - h)) / (1 - e^-L))``. ``delta`` is the difference.
    """
    net, iota, dt, clique = spec
    N = net.num_nodes
    pos, local = frontier_edges(net.rowptr, idx)
    dst = net.edge_index[1].index_select(0, pos).long()
    slot = torch.full((N,), -1, dtype=torch.int64, device=cand.device).index_put_((cand,), torch.arange(cand.numel(), device=cand.device))
    where = slot.index_select(0, dst)
    inside = where >= 0
    if clique is not None:
        # inside a clique the score function carries the dependence (see Transmission._share_in_cliques)
        inside = inside & ~clique.index_select(0, net.layer.index_select(0, pos).long())
    keep = inside.nonzero().squeeze(1)
    pos, local, where = pos[keep], local[keep].long(), where[keep]
    # per-edge hazard = edge part (constant over the source's infectious period) x source part (this step)
    edge = beta.to(em.dtype) * dt * net.weight.index_select(0, pos).to(em.dtype)
    if susc is not None:
        edge = edge * susc.to(em.dtype).index_select(0, where)
    src = iota.index_select(0, src_stage.index_select(0, local).long()).to(em.dtype)
    lay = net.layer.index_select(0, pos).long() if src_load.shape[1] > 1 else torch.zeros_like(local)
    if scale is not None:
        src = src * scale.to(em.dtype).index_select(0, lay)
    if src_cf is not None:
        src = src * src_cf.to(em.dtype)[local, lay]
    h = edge * src
    # the hazard l put on k over its earlier steps, at the edge's current susceptibility
    A = edge * src_load.to(em.dtype)[local, lay]
    # the candidates' expm1(-lambda), which the linear path keeps for backward anyway
    L = -torch.log1p(em.index_select(0, where))
    eA = torch.exp(A)
    pL = (-torch.expm1(-L)).clamp_min(_TINY)
    on_infection = eA * (1 - (-torch.expm1(-(L - h).clamp_min(0))) / pL) - h * torch.exp(-L) / pL
    on_survival = h - eA * torch.expm1(h)
    delta = torch.where(hit.index_select(0, where), on_infection, on_survival)
    return idx.index_select(0, local), where, delta


class _PresenceCoupling(torch.autograd.Function):
    """Value 0 ``[C]``; gradient ``sum_e delta_e dc_l`` onto the carriers of the infectors.

    Nothing per edge is kept for backward: the frontier's edges and their ``delta`` are
    recomputed from the frontier (indices, stage codes, steps transmitted) and the candidates'
    hazards, which the linear path keeps anyway, so the estimator costs time, not memory.
    """

    @staticmethod
    def forward(ctx, carrier, spec, idx, src_stage, src_load, src_cf, cand, em, hit, susc, scale, beta):  # type: ignore[override]
        ctx.spec = spec
        ctx.n = carrier.shape[0]
        ctx.save_for_backward(idx, src_stage, src_load, src_cf, cand, em, hit, susc, scale, beta)
        return carrier.new_zeros(cand.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        idx, src_stage, src_load, src_cf, cand, em, hit, susc, scale, beta = ctx.saved_tensors
        src, where, delta = _presence_delta(ctx.spec, idx, src_stage, src_load, src_cf, cand, em, hit, susc, scale, beta)
        g = grad.new_zeros(ctx.n).index_add(0, src, delta.to(grad.dtype) * grad.index_select(0, where))
        return (g,) + (None,) * 11


class Transmission(Substep):
    """Infection of susceptible agents over a layered network or by well-mixed contact."""

    def __init__(self, disease: DiseaseModel, *, network: bool = True, beta: str = "beta", name: str = "transmission",
                 use_layer_scale: bool = False, use_contact_factor: bool = False, use_susceptibility: bool = False,
                 estimator: str = "presence", clique_layer: str | tuple[str, ...] | None = "household") -> None:
        if estimator not in ESTIMATORS:
            raise ConfigError(f"Transmission estimator: expected one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.clique_layer = (clique_layer,) if isinstance(clique_layer, str) else tuple(clique_layer or ())
        self.disease = disease
        self.name = name
        self.network = network
        self.beta = beta
        self.use_layer_scale = use_layer_scale
        self.use_contact_factor = use_contact_factor
        self.use_susceptibility = use_susceptibility
        reads = ["stage", "timer", "carrier", "entered", "entered_step", "infectiousness", "dwell_cdf"]
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
        self.writes = ("stage", "timer", "carrier", "entered", "entered_step")
        if network and estimator != "linear":
            self.writes += ("source_load",)
        self.params = (beta,)
        self._infectious_codes = [c for c, s in enumerate(disease.stages) if disease.infectiousness.get(s, 0.0) > 0]

    def _force(self, system: EpiSystem, state: EpiState, iota: Tensor, idx: Tensor | None = None,
               clique: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Force ``[N]`` and, on a network, the targets ``[A]`` of the infectious agents' edges (``idx``: the frontier);
        ``clique``: a layer whose pushes carry no gradient onto the sources' carriers."""
        if self.network:
            # only the infectious frontier is visited: gathers, products and edges are O(active)
            if idx is None:
                idx = stage_mask(state.stage, self._infectious_codes).nonzero().squeeze(1)
            io = iota.index_select(0, state.stage.index_select(0, idx).long())
            value = io * state.carrier.index_select(0, idx)
            if self.use_contact_factor:
                value = value.unsqueeze(1) * state.contact_factor.index_select(0, idx)
            net = system.network
            if clique is not None:
                # the clique's dependence on its infected members is the members' score (_share_in_cliques):
                # coupling it through the carrier as well would count it twice (the contact factor keeps its gradient)
                held = io * state.carrier.detach().index_select(0, idx)
                held = held.unsqueeze(1) * state.contact_factor.index_select(0, idx) if self.use_contact_factor else held.unsqueeze(1)
                if value.dim() == 1:
                    value = value.unsqueeze(1)
                value = torch.where(clique, held, value).expand(-1, net.num_layers)
            scale = state.layer_scale if self.use_layer_scale else None
            return push_compact(net.edge_index[1], net.weight, net.layer, net.rowptr, net.num_nodes, idx, value, scale)
        inf = iota[state.stage.long()]
        value = inf * state.carrier
        mixing = lookup(system, state, "mixing")  # constant (system) or time-varying (state)
        G = mixing.shape[0]
        g = system.group.long()
        sizes = torch.bincount(g, minlength=G).to(value.dtype).clamp_min(1)
        prevalence = value.new_zeros(G).index_add(0, g, value) / sizes
        return (mixing.to(value.dtype) @ prevalence)[g], None

    def _needs_grad(self, beta: Tensor, state: EpiState) -> bool:
        """Whether this step's hazards or carriers carry a gradient."""
        if not torch.is_grad_enabled():
            return False
        xs = [beta, state.carrier]
        xs += [state.contact_factor] if self.use_contact_factor else []
        xs += [state.layer_scale] if self.use_layer_scale else []
        xs += [state.susceptibility] if self.use_susceptibility else []
        return any(x is not None and x.requires_grad for x in xs)

    def _hazard_inputs(self, system: EpiSystem, state: EpiState) -> list[Tensor]:
        """The tensors besides ``beta`` that this step's infection probabilities are a smooth function of."""
        xs = [state.contact_factor] if self.use_contact_factor else []
        xs += [state.layer_scale] if self.use_layer_scale else []
        xs += [state.susceptibility] if self.use_susceptibility else []
        return xs + ([] if self.network else [lookup(system, state, "mixing")])

    def _clique_code(self, system: EpiSystem) -> Tensor | None:
        """``[K] bool``: the layers of ``clique_layer`` when the presence estimator runs on a network that has one, else None."""
        if self.estimator != "presence" or not self.network or not self.clique_layer:
            return None
        names = system.network.layer_names
        if not any(n in names for n in self.clique_layer):
            return None
        return torch.tensor([n in self.clique_layer for n in names], device=system.network.layer.device)

    def _share_in_cliques(self, system: EpiSystem, stage: Tensor, carrier: Tensor, cand: Tensor, factor: Tensor,
                          clique: Tensor) -> Tensor:
        """``carrier`` with each candidate's ``factor`` applied to itself and to its clique mates still susceptible.

        The per-edge presence credit drops the interaction between infectors of one target (a
        housemate infected by ``l`` and ``l`` itself both act on ``k``; removing ``l`` removes
        both), which biases gradients low where a household's members infect one another
        (0.64 on isolated households of 5). Inside a clique the dependence is instead carried by
        the score function: a susceptible agent's carrier collects the path scores of its
        housemates' events (value 1, gradient ``d log P``), so ``E[1[k] * sum of scores] =
        dE[1[k]]`` is exact for the clique's internal randomness, and each event's factor
        still holds the presence coupling to infectors outside the clique. Events after an
        agent's own infection do not change whether it is counted, so only the susceptible
        mates (stage at the start of the step) collect them.
        """
        net = system.network
        d = self.disease
        pos, local = frontier_edges(net.rowptr, cand)
        on = clique.index_select(0, net.layer.index_select(0, pos).long()).nonzero().squeeze(1)
        pos, local = pos.index_select(0, on), local.index_select(0, on).long()
        mates = net.edge_index[1].index_select(0, pos).long()
        sus = (stage.index_select(0, mates) == d.code(d.susceptible)).nonzero().squeeze(1)
        mates, local = mates.index_select(0, sus), local.index_select(0, sus)
        # value exactly 0 (factor is q / q + 0 = 1): the product below leaves every carrier's value unchanged
        logf = torch.log(factor.clamp_min(_TINY))
        who, inv = torch.unique(torch.cat([cand, mates]), return_inverse=True)
        total = logf.new_zeros(who.numel()).index_add(0, inv, torch.cat([logf, logf.index_select(0, local)]))
        return carrier.index_put((who,), carrier.index_select(0, who) * torch.exp(total))

    def _load_width(self, system: EpiSystem) -> int:
        """Layers the source factor varies over: the network's when a per-layer factor is read, else 1."""
        return system.network.num_layers if (self.use_layer_scale or self.use_contact_factor) else 1

    def _source_factor(self, state: EpiState, iota: Tensor, idx: Tensor) -> Tensor:
        """Per frontier agent and layer ``[F, K]``: the factor of its edges' hazards that varies over time."""
        f = iota.index_select(0, state.stage.index_select(0, idx).long()).unsqueeze(1)
        if self.use_contact_factor:
            f = f * state.contact_factor.detach().index_select(0, idx)
        if self.use_layer_scale:
            f = f * state.layer_scale.detach().to(f.dtype).unsqueeze(0)
        return f.float()

    def _accumulate_load(self, system: EpiSystem, state: EpiState, load: Tensor, iota: Tensor, idx: Tensor) -> Tensor:
        """``load`` ``[N, K]`` plus this step's source factor of every transmitting agent.

        Isolation, contact schedules and stage changes make an infector's hazard vary over its
        infectious period; the presence credit needs the hazard it has *accumulated* on each
        contact, which is this sum times the edge's constant part (``beta dt w susceptibility``).
        """
        return load.index_put((idx,), load.index_select(0, idx) + self._source_factor(state, iota, idx))

    def _presence(self, params: Params, system: EpiSystem, state: EpiState, iota: Tensor, cand: Tensor, hit: Tensor, em: Tensor,
                  load: Tensor, idx: Tensor) -> Tensor:
        """Term ``[C]`` with value 0 that turns each infector's linear coupling into a presence/absence
        likelihood ratio (the *presence* estimator; see :class:`_PresenceCoupling`); ``em = expm1(-lambda)``."""
        src_stage = state.stage.index_select(0, idx)
        src_load = load.index_select(0, idx)
        src_cf = state.contact_factor.detach().index_select(0, idx) if self.use_contact_factor else None
        susc = state.susceptibility.detach().index_select(0, cand) if self.use_susceptibility else None
        scale = state.layer_scale.detach() if self.use_layer_scale else None
        beta = getattr(params, self.beta).detach().reshape(())
        spec = (system.network, iota, self.disease.dt, self._clique_code(system))
        corr = _PresenceCoupling.apply(state.carrier, spec, idx, src_stage, src_load, src_cf, cand, em, hit, susc, scale, beta)
        return corr

    def __call__(self, params: Params, system: EpiSystem, state: EpiState, t: int, rng: torch.Generator) -> EpiState:
        d = self.disease
        stage = state.stage
        iota, cdf = system.infectiousness, system.dwell_cdf
        beta = getattr(params, self.beta)
        if beta.numel() != 1:
            raise ParamError(f"parameter {self.beta}: expected a scalar, got shape {tuple(beta.shape)}")
        clique = self._clique_code(system) if self._needs_grad(beta, state) else None
        # the compiled kernels have no clique sharing: under autograd with a clique layer the torch path runs
        # a smoothed-perturbation pass (lpm.perturbation) tracks this step's draws on the torch path
        tracked = perturbation.active() is not None and perturbation.tracks(self.name, t, beta,
                                                                             *self._hazard_inputs(system, state))
        fast = fused_transmission(self, params, system, state, t, rng) if clique is None and not tracked else None  # the compiled twin of what follows
        if fast is not None:
            return fast
        idx = stage_mask(stage, self._infectious_codes).nonzero().squeeze(1) if self.network else None
        F, targets = self._force(system, state, iota, idx, clique)
        at_risk = stage == d.code(d.susceptible)
        # only at-risk agents that feel a force can change (or carry a score): F = 0 elsewhere
        # gives p = 0, no event and a survival factor of exactly 1, so the rest is O(candidates)
        if targets is not None:
            at_risk = at_risk & mark_indices(targets, stage.numel())
        cand = at_risk.nonzero().squeeze(1)
        lam = beta * d.dt * F.index_select(0, cand)
        if self.use_susceptibility:
            lam = lam * state.susceptibility.index_select(0, cand)
        em = torch.expm1(-lam)
        p = -em
        u_c = counter_uniform(stream_key(rng, t), cand)
        hit = u_c < p
        # a perturbation pass may flip an event; the dwell then takes the event's conditional uniform
        drawn = perturbation.bernoulli(self.name, t, cand, p, u_c) if tracked else None
        hit = drawn[0] if drawn is not None else hit
        ev = cand[hit]
        entry = d.code(d.entry)
        entry_t = torch.tensor(entry, dtype=stage.dtype, device=stage.device)
        u_dwell = drawn[1][hit] if drawn is not None else u_c[hit] / p.detach()[hit].clamp_min(_TINY)
        # pending (negative) timer: the dwell starts counting at the next progression, whatever the order
        timer = -_draw_dwell(cdf, torch.full((ev.numel(),), entry, dtype=stage.dtype, device=stage.device), u_dwell)
        carrier = state.carrier
        extra = {}
        if lam.requires_grad:
            # survival (1 - p = exp(-lambda)) and infection both enter the agent's path likelihood
            factor = event_carrier(torch.where(hit, p, torch.exp(-lam)), torch.ones_like(hit))
            if targets is not None and self.estimator != "linear":
                load = state.source_load
                if load is None:
                    load = torch.zeros((stage.numel(), self._load_width(system)), dtype=torch.float32, device=stage.device)
                # value 0: added, not multiplied, so that nothing more per candidate is kept for backward
                factor = factor + self._presence(params, system, state, iota, cand, hit, em.detach(), load, idx)
                extra["source_load"] = self._accumulate_load(system, state, load, iota, idx)
            if clique is not None:
                carrier = self._share_in_cliques(system, stage, carrier, cand, factor, clique)
            else:
                carrier = carrier.index_put((cand,), carrier.index_select(0, cand) * factor)
        return state.replace(
            **extra,
            stage=stage.index_put((ev,), entry_t),
            timer=state.timer.index_put((ev,), timer),
            carrier=carrier,
            entered=_entered_this_step(state, t).index_put((ev,), entry_t),
            entered_step=torch.tensor(t, device=stage.device),
        )


class Progression(Substep):
    """Timed exits from stages, with optional branching (e.g. recovery vs death).

    A call closes one day: agents that acted in their stage on it count down, those whose
    dwell is used up move on. Agents infected since the last progression hold a pending
    (negative) timer and only start counting (no move, no count-down), so an agent infected
    on day t with a dwell of k acts on days t + 1 .. t + k whatever the order of the
    substeps (see the within-day convention in :mod:`substeps.epidemic`). Placed before
    transmission, the call on the first step has no previous day to close and does nothing.
    """

    def __init__(self, disease: DiseaseModel, name: str = "progression") -> None:
        self.disease = disease
        self.name = name
        extra_reads = sorted({f for tr in disease.transitions.values() for f in tr.alt_reads})
        self.reads = ("stage", "timer", "carrier", "entered", "entered_step", "next_stage", "dwell_cdf", *extra_reads)
        self.writes = ("stage", "timer", "carrier", "entered", "entered_step")
        self.params = tuple(sorted({p for tr in disease.transitions.values() for p in tr.alt_params}))
        self._alts = [(disease.code(src), disease.code(tr.alt), tr.alt_prob)
                      for src, tr in disease.transitions.items() if tr.alt is not None]

    def __call__(self, params: Params, system: EpiSystem, state: EpiState, t: int, rng: torch.Generator) -> EpiState:
        fast = fused_progression(self, params, system, state, t, rng)  # the compiled twin of what follows, when it applies
        if fast is not None:
            return fast
        to, cdf = system.next_stage, system.dwell_cdf
        stage, timer = state.stage, state.timer
        earlier = _entered_this_step(state, t)
        # entered earlier in this step (positive timer, as a dense reference writes it) or pending
        fresh = (earlier >= 0) | (timer < 0)
        if state.entered_step is None:
            # progression before anything else on the first step: no day has been lived yet
            fresh = torch.ones_like(fresh)
        # only agents whose timer runs out move: everything but the countdown is O(movers)
        mv = ((timer == 1) & ~fresh).nonzero().squeeze(1)
        old = stage.index_select(0, mv)
        new_stage = to.index_select(0, old.long())
        carrier = state.carrier
        u_mv = counter_uniform(stream_key(rng, t), mv)
        u_dwell = u_mv
        factor = None
        for src, alt, prob_fn in self._alts:
            q = prob_fn(params, system, state)
            q = torch.as_tensor(q, device=stage.device).to(torch.float32).expand(stage.shape).index_select(0, mv)
            branching = old == src
            take_alt = branching & (u_mv < q)
            new_stage = torch.where(take_alt, torch.tensor(alt, dtype=torch.int8, device=stage.device), new_stage)
            qd = q.detach()
            u_dwell = torch.where(branching, torch.where(u_mv < qd, u_mv / qd.clamp_min(_TINY), (u_mv - qd) / (1 - qd).clamp_min(_TINY)), u_dwell)
            if q.requires_grad:
                f = event_carrier(torch.where(take_alt, q, 1 - q), branching)
                factor = f if factor is None else factor * f
        if factor is not None:
            carrier = carrier.index_put((mv,), carrier.index_select(0, mv) * factor)
        # fresh agents start their dwell (pending timers become positive) and count down from the next day
        new_timer = torch.where(fresh, timer.abs(), (timer - 1).clamp_min_(0)).index_put_((mv,), _draw_dwell(cdf, new_stage, u_dwell))
        return state.replace(
            stage=stage.index_put((mv,), new_stage),
            timer=new_timer,
            carrier=carrier,
            entered=earlier.index_put((mv,), new_stage),
            entered_step=torch.tensor(t, device=stage.device),
        )


def initial_state(
    disease: DiseaseModel,
    num_agents: int,
    initial_infected: int | Tensor,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    state_type: type[EpiState] = EpiState,
    **fields: Tensor,
) -> EpiState:
    """All susceptible but ``initial_infected`` agents (a count drawn at random, or a bool mask) in the entry stage.

    ``fields`` set further state fields; the network and other constants go to the system
    (:func:`~substeps.epidemic.disease.epi_system`).
    """
    if num_agents <= 0:
        raise ConfigError(f"num_agents: expected > 0, got {num_agents}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    stage = torch.full((num_agents,), disease.code(disease.susceptible), dtype=torch.int8)
    if isinstance(initial_infected, Tensor):
        if initial_infected.shape != (num_agents,) or initial_infected.dtype != torch.bool:
            raise ConfigError(f"initial_infected: expected a bool mask of shape ({num_agents},), got {initial_infected.dtype} {tuple(initial_infected.shape)}")
        seeds = initial_infected.cpu().nonzero().squeeze(1)
    else:
        if not 0 <= int(initial_infected) <= num_agents:
            raise ConfigError(f"initial_infected: expected 0..{num_agents}, got {initial_infected}")
        seeds = torch.randperm(num_agents, generator=g)[: int(initial_infected)]
    entry = disease.code(disease.entry)
    stage[seeds] = entry
    cdf = disease.dwell_table()
    timer = torch.zeros(num_agents, dtype=torch.int16)
    timer[seeds] = _draw_dwell(cdf, torch.full((seeds.numel(),), entry, dtype=torch.int8), torch.rand(seeds.numel(), generator=g))
    entered = torch.full((num_agents,), -1, dtype=torch.int8)
    unknown = sorted(set(fields) - set(state_type.field_names()))
    if unknown:
        raise ConfigError(f"initial_state: {state_type.__name__} has no field(s) {unknown} (constants such as the network "
                         "belong to the system: epi_system)")
    state = state_type(stage=stage, timer=timer, carrier=torch.ones(num_agents), entered=entered, **fields)
    return state.to(device)


def compartment_counts(state: EpiState, num_stages: int) -> Tensor:
    """Agents per stage code ``[C]``: the sum of their carriers, so the exact counts with the estimator's gradient."""
    return state.carrier.new_zeros(num_stages).index_add(0, state.stage.long(), state.carrier)
