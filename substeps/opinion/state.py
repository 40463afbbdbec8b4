"""Opinions on a directed follow graph: the system (anchors, stubbornness, archetypes) and the state.

The follow graph is *state* here, not system: :class:`~substeps.opinion.HomophilousRewiring`
rewires it during a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lpm import Network, State, StateError, System, check_tensor, static_field, tensor_field

__all__ = ["OpinionState", "OpinionSystem", "initial_opinions", "as_matrix"]

_FLOAT = (torch.float32, torch.float64)


def as_matrix(x: Tensor) -> Tensor:
    """View opinions ``[N]`` as ``[N, 1]``; ``[N, D]`` unchanged."""
    return x.unsqueeze(1) if x.dim() == 1 else x


@dataclass(frozen=True)
class OpinionSystem(System):
    """What an opinion run never changes: each agent's anchor, stubbornness and archetype."""

    anchor: Tensor = tensor_field(("N", "D"), _FLOAT, "initial (anchoring) opinion")
    stubbornness: Tensor = tensor_field(("N",), _FLOAT, "weight in [0, 1] of the anchor each step (Friedkin-Johnsen)")
    archetype: Tensor | None = tensor_field(("N",), (torch.int8, torch.int16, torch.int32, torch.int64), "archetype code", optional=True)
    archetype_names: tuple[str, ...] = static_field("label of each archetype code", default=())


@dataclass(frozen=True)
class OpinionState(State):
    """Agents' opinions on a follow graph (edge ``j -> i``: ``i`` sees ``j``'s posts).

    Opinions live in ``[-1, 1]^D`` (``D = 1``: left-right, -1 extremely liberal, +1 extremely
    conservative). One step is one day of feed reading.
    """

    opinion: Tensor = tensor_field(("N", "D"), _FLOAT, "current opinion in [-1, 1] per dimension")
    network: Network = tensor_field((), None, "directed follow graph, source -> follower (rewired during a run)")
    last_post: Tensor = tensor_field(("N",), (torch.int32, torch.int64), "step of each agent's latest post (-1: never)")
    exposure: Tensor | None = tensor_field(("E",), _FLOAT, "1 where the feed shows edge e's post this step", optional=True)


def initial_opinions(opinion: Tensor, network: Network, *, stubbornness: Tensor | float = 0.0,
                  archetype: Tensor | None = None, archetype_names: tuple[str, ...] = ()) -> tuple[OpinionSystem, OpinionState]:
    """Initial system and state from opinions ``[N]`` or ``[N, D]`` and a follow graph (anchor = opinion)."""
    check_tensor("opinion", opinion, None, _FLOAT)
    x = as_matrix(opinion)
    n = x.shape[0]
    if network.num_nodes != n:
        raise StateError(f"network: expected {n} agents (rows of opinion), got num_nodes={network.num_nodes}")
    s = stubbornness if isinstance(stubbornness, Tensor) else torch.full((n,), float(stubbornness), dtype=x.dtype, device=x.device)
    check_tensor("stubbornness", s, (n,), _FLOAT, low=0.0, high=1.0)
    shown = torch.ones(network.num_edges, dtype=x.dtype, device=x.device)  # before any feed: every post visible
    system = OpinionSystem(x.clone(), s.to(x.dtype), archetype, tuple(archetype_names))
    state = OpinionState(x.clone(), network, torch.full((n,), -1, dtype=torch.int32, device=x.device), shown)
    state.validate(system.validate())
    return system, state
