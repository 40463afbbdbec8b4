"""A replicate axis: R replicates or counterfactual arms run as one batch.

The batch is the *disjoint union* of R systems and R states (each batched the same way, with
one layout): agent fields (a ``"N"`` axis) and edge fields
(an ``"E"`` axis) are concatenated, replicate-major, so agent ``i`` of replicate ``r`` is row
``offset_N[r] + i``; integer ``(2, "E")`` fields are agent ids and are shifted by the agent
offset; a CSR pointer (``"N+1"``) is shifted by the edge offset. Every other field (scalars,
per-layer or per-area tables) has no agent axis and must be equal in all replicates. Each
substep then runs once over R x N agents.

Randomness: replicate ``r`` has its own streams, seeded by ``seeds[r]`` exactly as a single
run. While a substep runs, a draw from its stream (``torch.rand``/``randn``/``randint`` with
``generator=rng``) whose size has an axis equal to the batch's total agents (or edges) is
drawn replicate by replicate from each replicate's own generator and concatenated along
that axis. Hence, **the equivalence**: replicate ``r`` of a batched run equals, bit for bit
on CPU, the single run with ``seed=seeds[r]`` and state ``states[r]``, for every substep that
is *block-local* (an agent's update depends only on agents and edges of its own replicate:
per-agent updates, gathers and scatters over edges) and whose written non-agent fields are
the same in every replicate (``shared``: e.g. ``layer_scale`` set from a schedule). The
networks live in the system, so the union of the systems holds the union of the networks. On CUDA
the same holds up to the order of floating-point sums in scatter kernels. A draw with no agent
or edge axis (e.g. ``randint(0, E, (m,))`` or ``randperm``) cannot be split and raises
:class:`ReplicateError` naming the substep. Substeps that couple all agents (a global test
capacity, per-area case windows) are not block-local and must not be batched.

Counterfactual arms are replicates that share a seed: arms ``[a, b]`` with ``seeds=[s, s]``
draw the same numbers as two single runs with seed ``s`` (common random numbers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lpm.kernels import register_replicated, unregister_replicated
from lpm.rng import Streams
from lpm.state import State, StateError, Struct, System

__all__ = ["Layout", "ReplicateError", "batch_states", "ReplicateDraws"]


class ReplicateError(StateError):
    """A state or a substep cannot be batched over replicates exactly."""


@dataclass(frozen=True)
class Layout:
    """Where each replicate lives in a batched state: per-replicate sizes of ``N`` and ``E``."""

    agents: tuple[int, ...]
    edges: tuple[int, ...]

    @property
    def num_replicates(self) -> int:
        """Number of replicates R."""
        return len(self.agents)

    def offsets(self, dim: str) -> list[int]:
        """Start row of each replicate along ``"N"`` or ``"E"`` (R + 1 entries)."""
        sizes = self.agents if dim == "N" else self.edges
        out = [0]
        for s in sizes:
            out.append(out[-1] + s)
        return out

    def part(self, state: Struct, r: int) -> Struct:
        """Replicate ``r`` of a batched state or system as one of its own (views, no copies)."""
        return _map_state(state, lambda name, f, v: _slice(name, f, v, self, r), self, r)


def _sizes(system: System, state: State) -> tuple[int, int]:
    dims = system.validate(state.validate())
    if "N" not in dims:
        raise ReplicateError(f"{type(system).__name__}, {type(state).__name__}: no field with an agent axis 'N'; "
                             "nothing to batch")
    return dims["N"], dims.get("E", 0)


def _shape(f: dataclasses.Field) -> tuple:
    return tuple(f.metadata.get("shape", ()))


def _is_agent_id(shape: tuple, v: Tensor) -> bool:
    return shape == (2, "E") and not v.is_floating_point() and v.dtype != torch.bool


def _axis(shape: tuple) -> tuple[str, int] | None:
    for i, sym in enumerate(shape):
        if sym in ("N", "E", "N+1"):
            return sym, i
    return None


def _map_state(state: Struct, fn: Callable[[str, dataclasses.Field, Any], Any], layout: Layout, r: int | None) -> Struct:
    changes = {}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, Struct):
            changes[f.name] = _map_state(v, fn, layout, r)
        else:
            changes[f.name] = fn(f.name, f, v)
    return dataclasses.replace(state, **changes)


def _slice(name: str, f: dataclasses.Field, v: Any, layout: Layout, r: int) -> Any:
    if f.metadata.get("static"):
        return layout.agents[r] if isinstance(v, int) and v == sum(layout.agents) else v
    if not isinstance(v, Tensor) or _axis(_shape(f)) is None:
        return v
    sym, ax = _axis(_shape(f))
    if sym == "N+1":
        off = layout.offsets("N")
        return v[off[r]:off[r + 1] + 1] - v[off[r]]
    off = layout.offsets(sym)
    part = v.narrow(ax, off[r], off[r + 1] - off[r])
    if _is_agent_id(_shape(f), v):
        part = part - layout.offsets("N")[r]
    return part


def batch_states(systems: Sequence[System], states: Sequence[State]) -> tuple[tuple[System, State], Layout]:
    """The disjoint unions of ``systems`` and of ``states`` (one type each) and their :class:`Layout`; see the module doc."""
    if not states:
        raise ReplicateError("states: expected at least one state")
    if len(systems) != len(states):
        raise ReplicateError(f"systems: expected {len(states)} (one per state), got {len(systems)}")
    for what, group in (("systems", systems), ("states", states)):
        kinds = {type(s) for s in group}
        if len(kinds) != 1:
            raise ReplicateError(f"{what}: expected one type, got {sorted(k.__name__ for k in kinds)}")
    sizes = [_sizes(y, s) for y, s in zip(systems, states)]
    layout = Layout(tuple(n for n, _ in sizes), tuple(e for _, e in sizes))
    return (_union(list(systems), layout, ""), _union(list(states), layout, "")), layout


def _union(states: list[Struct], layout: Layout, prefix: str) -> Struct:
    first = states[0]
    changes: dict[str, Any] = {}
    n_off, e_off = layout.offsets("N"), layout.offsets("E")
    for f in dataclasses.fields(first):
        name = prefix + f.name
        vals = [getattr(s, f.name) for s in states]
        v0 = vals[0]
        if isinstance(v0, Struct):
            changes[f.name] = _union(vals, layout, name + ".")
            continue
        if f.metadata.get("static"):
            # a static count of agents (e.g. Network.num_nodes) becomes the batch's count
            if all(isinstance(v, int) and v == n for v, n in zip(vals, layout.agents)):
                changes[f.name] = sum(layout.agents)
            elif any(v != v0 for v in vals):
                raise ReplicateError(f"{name}: static field differs between replicates ({v0!r} vs others)")
            continue
        axis = _axis(_shape(f)) if isinstance(v0, Tensor) else None
        if axis is None:
            if not all(_same(v, v0) for v in vals):
                raise ReplicateError(f"{name}: differs between replicates but has no agent or edge axis "
                                     f"(shape {_shape(f)}); only agent and edge fields may differ")
            changes[f.name] = v0
            continue
        sym, ax = axis
        if sym == "N+1":
            parts = [v[:-1] + e_off[r] for r, v in enumerate(vals)] + [vals[-1][-1:] + e_off[-2]]
            changes[f.name] = torch.cat(parts)
            continue
        if _is_agent_id(_shape(f), v0):
            vals = [v + n_off[r] for r, v in enumerate(vals)]
        changes[f.name] = torch.cat(vals, ax)
    return dataclasses.replace(first, **changes)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))
    return a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)


_SPLITTABLE = {torch.rand, torch.randn, torch.randint}


class ReplicateDraws(TorchFunctionMode):
    """While active, draws from ``token`` are made replicate by replicate from ``gens``."""

    def __init__(self, owner: str, token: torch.Generator, gens: Sequence[torch.Generator], layout: Layout) -> None:
        super().__init__()
        self.owner, self.token, self.gens, self.layout = owner, token, list(gens), layout

    def __enter__(self) -> "ReplicateDraws":
        # counter-based draws (lpm.kernels.counter_uniform) key each agent by its replicate's own stream
        register_replicated(self.token, self.gens, self.layout.agents)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        unregister_replicated(self.token)
        return super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is not self.token:
            return func(*args, **kwargs)
        if func not in _SPLITTABLE:
            raise ReplicateError(f"substep {self.owner!r} draws with {getattr(func, '__name__', func)}, which the "
                                 "replicate axis cannot split per replicate; run its replicates separately")
        head, size = self._size(func, args, kwargs)
        total_n, total_e = sum(self.layout.agents), sum(self.layout.edges)
        if func is torch.randint and any(isinstance(h, int) and h in (total_n, total_e) for h in head):
            raise ReplicateError(f"substep {self.owner!r} draws ids over all agents or edges (randint high={head[-1]}), "
                                 "which would cross replicates")
        for ax, s in enumerate(size):
            per = self.layout.agents if s == total_n else self.layout.edges if s == total_e else None
            if per is not None and self.layout.num_replicates > 1:
                break
        else:
            raise ReplicateError(f"substep {self.owner!r} draws {getattr(func, '__name__', func)} of size {tuple(size)}, "
                                 f"which has no agent ({total_n}) or edge ({total_e}) axis to split per replicate")
        parts = []
        for g, k in zip(self.gens, per):
            sub = list(size)
            sub[ax] = k
            kw = {**kwargs, "generator": g}
            kw.pop("size", None)
            parts.append(func(*head, tuple(sub), **kw))
        return torch.cat(parts, ax)

    @staticmethod
    def _size(func: Any, args: tuple, kwargs: dict) -> tuple[tuple, list[int]]:
        if "size" in kwargs:
            return tuple(args), list(kwargs["size"])
        if func is torch.randint:
            return tuple(args[:-1]), list(args[-1])
        if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
            return (), list(args[0])
        return (), [int(a) for a in args]


class ReplicateStreams:
    """One :class:`~lpm.rng.Streams` per replicate plus a token generator per substep."""

    def __init__(self, seeds: Sequence[int], names: Sequence[str], device: torch.device, layout: Layout) -> None:
        if len(seeds) != layout.num_replicates:
            raise ReplicateError(f"seeds: expected {layout.num_replicates} seeds (one per replicate), got {len(seeds)}")
        self.streams = [Streams(int(s), names, device) for s in seeds]
        self.layout = layout
        self.tokens = {n: torch.Generator(device=device) for n in names}

    def mode(self, name: str) -> ReplicateDraws:
        """The draw interceptor for substep ``name``."""
        return ReplicateDraws(name, self.tokens[name], [s[name] for s in self.streams], self.layout)

    def get_state(self) -> dict[str, Tensor]:
        """Every replicate's generator states, keyed ``r/name``."""
        return {f"{r}/{k}": v for r, s in enumerate(self.streams) for k, v in s.get_state().items()}

    def set_state(self, states: dict[str, Tensor]) -> None:
        """Restore states saved by :meth:`get_state`."""
        for r, s in enumerate(self.streams):
            s.set_state({k.split("/", 1)[1]: v for k, v in states.items() if k.startswith(f"{r}/")})
