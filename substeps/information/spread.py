"""Spread of a story: ignorant / spreader / stifler dynamics with roles, belief and interventions.

States (floats that are exactly 0/1 forward and carry gradients): ``heard`` (ever reached),
``spreading`` (currently passing it on); ignorant = 1 - heard, stifler = heard - spreading.

One step (Maki-Thompson on a network or well mixed)::

    q_i     = share_rate * propensity[arch_i] * role_share[role_i] * share_mult_i * (1 - removed_i)
    share_i ~ Bernoulli(q_i) among spreaders                         (straight-through, lpm.sampling)
    contact : one uniformly random follower of i (network) or agent (well mixed);
              the post is seen with probability visibility_i (feed down-ranking)
    ignorant j reached  -> heard; becomes a spreader w.p. accept_j, else a stifler;
                           belief_j = accept_j
    informed j reached  -> the sharer i becomes a stifler w.p. ``stifle``
    accept_j = convincing[arch_j, stance] * role_accept[role_j] * (1 - prebunk_efficacy * prebunked_j)
               * label_belief ** (share_mult_j < 1)

With all multipliers 1, ``accept = stifle = 1`` and well mixed, this is the Maki-Thompson
rumour in discrete time (``q`` = contacts per step); as ``q -> 0`` the share never hearing
tends to ``theta = exp(-2 (1 - theta)) ~ 0.2032``.

Gradient estimator: straight-through Bernoulli (:func:`lpm.sampling.bernoulli_st`) for
sharing, acceptance and stifling; a reached ignorant agent's indicator is
``S_j / max(S_j, 1)`` over the ``S_j`` shares that reached it (exactly 1 forward, each share
contributing ``1/S_j`` backward). Tests check d(final reach)/d(share_rate) against finite
differences under common random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm import Network, Params, State, StateError, Substep, System, check_tensor, static_field, tensor_field
from lpm.sampling import bernoulli_st

__all__ = ["InfoState", "InfoSystem", "Spread", "initial_information", "ROLES", "top_spreaders"]

ROLES = ("bystander", "spreader", "commentator", "verifier")
_F = (torch.float32, torch.float64)
_I = (torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class InfoSystem(System):
    """What a spread run never changes: roles, archetypes and their tables, interventions' bases, the follow graph."""

    role: Tensor = tensor_field(("N",), _I, "role code, see ROLES")
    archetype: Tensor = tensor_field(("N",), _I, "archetype code (row of the judgement tables)")
    convincing: Tensor = tensor_field(("K",), _F, "convincingness of this story's stance per archetype")
    propensity: Tensor = tensor_field(("K",), _F, "relative sharing propensity per archetype")
    share_mult_base: Tensor = tensor_field(("N",), _F, "share_mult without interventions")
    visibility_base: Tensor = tensor_field(("N",), _F, "visibility without interventions")
    removed: Tensor = tensor_field(("N",), torch.bool, "deplatformed agents (never share)")
    prebunked: Tensor = tensor_field(("N",), torch.bool, "agents inoculated before the story")
    network: Network | None = tensor_field((), None, "follow graph (None: well mixed)", optional=True)
    stance: float = static_field("the story's stance in [-1, 1]", default=0.0)


@dataclass(frozen=True)
class InfoState(State):
    """Who has heard / is spreading one story; per-agent belief; this step's intervention multipliers."""

    heard: Tensor = tensor_field(("N",), _F, "1 if the agent has heard the story (0/1, gradient carrier)")
    spreading: Tensor = tensor_field(("N",), _F, "1 if the agent currently spreads it (0/1, gradient carrier)")
    belief: Tensor = tensor_field(("N",), _F, "probability the agent believes the story (0 if not heard)")
    share_mult: Tensor = tensor_field(("N",), _F, "multiplier on sharing (fact-check label); Modulate target")
    visibility: Tensor = tensor_field(("N",), _F, "probability a post is shown in feeds (down-ranking); Modulate target")


def initial_information(num_agents: int, spreaders: Tensor, *, network: Network | None = None, role: Tensor | None = None,
                        archetype: Tensor | None = None, convincing: Tensor | None = None, propensity: Tensor | None = None,
                        removed: Tensor | None = None, prebunked: Tensor | None = None, stance: float = 0.0,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> tuple[InfoSystem, InfoState]:
    """Initial system and state: agents ``spreaders`` (ids) spread; defaults are the classic one-archetype rumour."""
    n = num_agents
    check_tensor("spreaders", spreaders, ("S",), _I, low=0, high=n - 1)
    heard = torch.zeros(n, dtype=dtype, device=device)
    heard[spreaders.long().to(device)] = 1
    ones = torch.ones(n, dtype=dtype, device=device)
    no = torch.zeros(n, dtype=torch.bool, device=device)
    sy = InfoSystem(
        torch.ones(n, dtype=torch.int8, device=device) if role is None else role.to(device),
        torch.zeros(n, dtype=torch.int16, device=device) if archetype is None else archetype.to(device),
        torch.ones(1, dtype=dtype, device=device) if convincing is None else convincing.to(device, dtype),
        torch.ones(1, dtype=dtype, device=device) if propensity is None else propensity.to(device, dtype),
        ones.clone(), ones.clone(),
        no if removed is None else removed.to(device), no.clone() if prebunked is None else prebunked.to(device),
        network, float(stance))
    st = InfoState(heard, heard.clone(), heard.clone(), ones, ones.clone())
    st.validate(sy.validate())
    if int(sy.archetype.max()) >= sy.convincing.numel():
        raise StateError(f"archetype: codes must be < K = {sy.convincing.numel()} (rows of convincing)")
    if int(sy.role.max()) >= len(ROLES) or int(sy.role.min()) < 0:
        raise StateError(f"role: codes must be in [0, {len(ROLES)}) ({ROLES})")
    return sy, st


def top_spreaders(network: Network, share: float) -> Tensor:
    """Mask ``[N]`` of the ``share`` of agents with the most followers (out-degree)."""
    if not 0 <= share <= 1:
        raise ConfigError(f"share: expected in [0, 1], got {share}")
    n = network.num_nodes
    k = int(round(share * n))
    mask = torch.zeros(n, dtype=torch.bool, device=network.rowptr.device)
    if k:
        mask[torch.topk(network.out_degree().double(), k).indices] = True
    return mask


class Spread(Substep):
    """Ignorant/spreader/stifler step with roles, belief and interventions (module docstring)."""

    def __init__(self, name: str = "spread", *, role_share: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
                 role_accept: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0), label_belief: float = 1.0) -> None:
        if len(role_share) != len(ROLES) or len(role_accept) != len(ROLES):
            raise ConfigError(f"role_share, role_accept: expected {len(ROLES)} values ({ROLES})")
        if not 0 <= label_belief <= 1:
            raise ConfigError(f"label_belief: expected in [0, 1], got {label_belief}")
        self.name = name
        self.role_share = torch.tensor(role_share, dtype=torch.float32)
        self.role_accept = torch.tensor(role_accept, dtype=torch.float32)
        self.label_belief = float(label_belief)
        self.reads = ("heard", "spreading", "belief", "role", "archetype", "convincing", "propensity",
                      "share_mult", "visibility", "removed", "prebunked")
        self.optional_reads = ("network",)  # None: well mixed
        self.writes = ("heard", "spreading", "belief")
        self.params = ("share_rate", "stifle", "prebunk_efficacy")

    def __call__(self, params: Params, y: InfoSystem, s: InfoState, t: int, rng: torch.Generator) -> InfoState:
        n = s.heard.shape[0]
        dev, dt = s.heard.device, s.heard.dtype
        # per-agent uniforms, drawn densely so that every agent keeps its own numbers whatever
        # the parameters (common random numbers) and whichever agents are visited below
        u = torch.rand(3, n, generator=rng, device=dev, dtype=dt)
        uc = torch.rand(2, n, generator=rng, device=dev, dtype=torch.float64)
        if s.spreading.requires_grad:
            # gradient mode: visit every agent, so that would-be spreaders (0 forward, nonzero
            # tangent) pass their tangent on along the contacts their own numbers pick
            idx = torch.arange(n, device=dev)
        else:
            idx = (s.spreading > 0).nonzero().squeeze(1)
        m = idx.numel()
        if m == 0:
            return s
        role_share = self.role_share.to(dev, dt)
        q = (params.share_rate * y.propensity[y.archetype[idx].long()] * role_share[y.role[idx].long()]
             * s.share_mult[idx] * (~y.removed[idx]).to(dt)).clamp(0, 1)
        # every visited agent draws a contact, sharing or not: a non-sharer's event is 0 forward
        # but its straight-through gradient d share / d q = 1 reaches the contact it would make
        share = bernoulli_st(q, u[0, idx]) * s.spreading[idx]
        if y.network is None:
            contact = (uc[0, idx] * n).long().clamp_max(n - 1)
            has = torch.ones(m, dtype=dt, device=dev)
        else:
            net = y.network
            deg = net.rowptr[idx + 1] - net.rowptr[idx]
            off = (uc[0, idx] * deg.double()).long().clamp_max((deg - 1).clamp_min(0))
            pos = (net.rowptr[idx] + off).clamp_max(max(net.num_edges - 1, 0))
            contact = net.edge_index[1, pos].long()
            has = (deg > 0).to(dt)
        seen = bernoulli_st(s.visibility[idx], uc[1, idx].to(dt)) * has
        ev = share * seen
        informed = s.heard[contact]
        # ignorant contacts: reached indicator S/max(S,1) over the S shares that hit them (0/1 forward)
        fresh = informed.detach() == 0
        uj, inv = torch.unique(contact[fresh], return_inverse=True)
        hits = ev.new_zeros(uj.numel()).index_add(0, inv, ev[fresh] * (1 - informed[fresh]))
        reached = hits / hits.detach().clamp_min(1)
        arch_j, role_j = y.archetype[uj].long(), y.role[uj].long()
        labelled = s.share_mult[uj] < 1
        accept = (y.convincing[arch_j] * self.role_accept.to(dev, dt)[role_j]
                  * (1 - params.prebunk_efficacy * y.prebunked[uj].to(dt))
                  * torch.where(labelled, torch.full_like(hits, self.label_belief), torch.ones_like(hits))).clamp(0, 1)
        new_spreader = reached * bernoulli_st(accept, u[1, uj])
        # informed contacts stifle the sharer (Maki-Thompson: only the initiator stops)
        stop = ev * informed * bernoulli_st(params.stifle.to(dt).expand(m), u[2, idx])
        heard = s.heard.index_add(0, uj, (1 - s.heard[uj]) * reached)
        spreading = s.spreading.index_add(0, idx, -s.spreading[idx] * stop).index_add(0, uj, new_spreader)
        belief = s.belief.index_add(0, uj, reached * (accept - s.belief[uj]))
        return s.replace(heard=heard, spreading=spreading, belief=belief)
