"""Differentiable rollouts in chunks, with gradient checkpointing and exact recomputation.

``lpm.Model.simulate(grad=True)`` keeps every step's graph alive, which for a 400-day run
of a large population does not fit in memory. :func:`rollout` runs the same steps
(``model.step`` then ``model.observe``) in chunks of ``chunk`` steps, each wrapped in
``torch.utils.checkpoint``: only chunk boundaries are kept, and a chunk is recomputed
during the backward pass. The per-substep random streams are saved at the start of each
chunk and restored when the chunk is (re)computed, so the recomputation draws the same
numbers and produces the identical events: the gradient equals the unchunked one.

``grad_from``: steps before it run without a graph (a warm-up); the gradient then ignores
how the parameters shaped the state at ``grad_from`` (truncated backpropagation, as in
truncated BPTT). Long histories are fitted on a recent window at a fraction of the cost.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lpm.model import Model
from lpm.params import ParamsLike
from lpm.rng import Streams
from lpm.state import State, System

__all__ = ["rollout", "make_streams"]


def make_streams(model: Model, seed: int, device: torch.device | str) -> Streams:
    """One stream per substep of ``model``, seeded as ``Model.simulate`` seeds them."""
    return Streams(int(seed), [s.name for s in model.substeps], device)


def _run_steps(model: Model, params: ParamsLike, system: System, state: State, t0: int, t1: int, streams: Streams,
               rng_state: dict[str, Tensor] | None) -> tuple[State, dict[str, Tensor], dict[str, Tensor] | None]:
    if rng_state is not None:
        # a private copy: the recomputation in backward must not disturb the caller's streams
        streams = Streams(streams.seed, streams.names(), streams.device)
        streams.set_state(rng_state)
    records: dict[str, list[Tensor]] = {k: [] for k in model.observables}
    for t in range(t0, t1):
        state = model.step(params, system, state, t, streams)
        for k, v in model.observe(system, state).items():
            records[k].append(v)
    return state, {k: torch.stack(v) for k, v in records.items()}, (streams.get_state() if rng_state is not None else None)


def rollout(model: Model, params: ParamsLike, system: System, state: State, steps: int, *, seed: int = 0, start: int = 0,
            chunk: int | None = None, grad: bool = True, streams: Streams | None = None,
            grad_from: int = 0) -> tuple[dict[str, Tensor], State]:
    """Run steps ``start .. start + steps - 1`` over ``system``; return observables ``{name: [steps, ...]}`` and the final state.

    ``chunk``: steps per checkpointed chunk (None: keep the whole graph). ``streams``:
    continue from existing random streams (default: fresh ones from ``seed``).
    ``grad_from``: first step (absolute) recorded in the graph; earlier steps run without one.
    """
    streams = streams if streams is not None else make_streams(model, seed, state.device)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    parts: list[dict[str, Tensor]] = []
    end = start + steps
    t = start
    if grad and grad_from > start:
        with torch.no_grad():
            stop = min(end, grad_from)
            state, obs, _ = _run_steps(model, params, system, state, t, stop, streams, None)
            parts.append(obs)
            t = stop
    with ctx:
        while t < end:
            t1 = end if not chunk else min(end, t + chunk)
            if grad and chunk and torch.is_grad_enabled():
                saved = streams.get_state()
                state, obs, after = checkpoint(_run_steps, model, params, system, state, t, t1, streams, saved,
                                               use_reentrant=False, preserve_rng_state=False)
                streams.set_state(after)
            else:
                state, obs, _ = _run_steps(model, params, system, state, t, t1, streams, None)
            parts.append(obs)
            t = t1
    if not parts:
        return {k: torch.empty(0) for k in model.observables}, state
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if grad and hasattr(params, "parameters"):
        # as in Model.simulate: an observable without a gradient path fails loudly on backward, never a silent zero
        from lpm.sampling import guard_no_gradient

        anchor = next((p for p in params.parameters() if p.requires_grad), None)
        out = {k: guard_no_gradient(k, v, anchor) for k, v in out.items()}
    return out, state
