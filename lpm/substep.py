"""Substeps: pure functions ``(params, system, state, t, rng) -> state`` that declare reads/writes."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lpm.params import Params
from lpm.state import State, System

__all__ = ["Substep", "substep", "FunctionSubstep"]


class Substep:
    """One vectorized update of the population.

    Subclasses set ``name``, ``reads`` and ``writes`` (field names), ``optional_reads``
    (fields read only when not None, e.g. a network that may be absent) and ``params``
    (parameter names), and implement ``__call__(params, system, state, t, rng) -> state``
    without side effects: all randomness comes from ``rng`` (this substep's own stream).
    A read name is resolved against the model's system first, then its state; a written
    name must be a state field (the system never changes during a run).
    """

    name: str = "substep"
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    optional_reads: tuple[str, ...] = ()
    params: tuple[str, ...] = ()

    def __call__(self, params: Params, system: System, state: State, t: int, rng: torch.Generator) -> State:
        raise NotImplementedError

    def describe(self) -> str:
        """One line: name, reads, writes and parameters."""
        p = f"  params: {', '.join(self.params)}" if self.params else ""
        reads = [*self.reads, *(f"{f}?" for f in self.optional_reads)]
        return f"{self.name}: reads {', '.join(reads) or '-'} -> writes {', '.join(self.writes) or '-'}{p}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class FunctionSubstep(Substep):
    """A substep made from a plain function by :func:`substep`."""

    def __init__(self, fn: Callable[[Params, System, State, int, torch.Generator], State], name: str,
                 reads: Sequence[str], writes: Sequence[str], params: Sequence[str]) -> None:
        self.fn = fn
        self.name = name
        self.reads = tuple(reads)
        self.writes = tuple(writes)
        self.params = tuple(params)
        self.__doc__ = fn.__doc__

    def __call__(self, params: Params, system: System, state: State, t: int, rng: torch.Generator) -> State:
        return self.fn(params, system, state, t, rng)


def substep(*, reads: Sequence[str] = (), writes: Sequence[str] = (), params: Sequence[str] = (),
            name: str | None = None) -> Callable[[Callable[..., State]], FunctionSubstep]:
    """Decorator turning ``fn(params, system, state, t, rng) -> state`` into a declared substep."""

    def wrap(fn: Callable[..., State]) -> FunctionSubstep:
        return FunctionSubstep(fn, name or fn.__name__, reads, writes, params)

    return wrap
