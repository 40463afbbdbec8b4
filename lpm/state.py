"""Frozen, typed dataclasses of tensors: a run's *system* (constant) and *state* (changing).

Two kinds share one machinery (:class:`Struct`): a :class:`System` holds what never changes
during a run (networks, agent attributes such as age and area, schedules, dwell and age
tables, capacities, mixing matrices); a :class:`State` holds only what changes (stages,
timers, opinions, recent counts). Substeps read both and return a new state; both move with
one ``.to(device)``. Each is a ``@dataclass(frozen=True)`` subclass. Each tensor field
declares its shape and dtype with :func:`tensor_field` so that the model can validate a
state before running it and the error names the field. Shapes use symbols: ``"N"``
(agents), ``"E"`` (edges), ``"L"`` (network layers), ``"G"`` (groups) or integers.

Example::

    @dataclass(frozen=True)
    class SIRState(State):
        stage: Tensor = tensor_field(("N",), torch.int8, "stage code, see CodeBook")
        timer: Tensor = tensor_field(("N",), torch.int16, "steps left in stage")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Self, Sequence

import torch
from torch import Tensor

from lpm.errors import ConfigError, LPMError

__all__ = [
    "Struct",
    "State",
    "System",
    "tensor_field",
    "static_field",
    "CodeBook",
    "StateError",
    "check_tensor",
    "lookup",
    "splice",
]


class StateError(LPMError, ValueError):
    """A state, parameter or input violates its declared shape, dtype or range."""


def tensor_field(
    shape: Sequence[str | int],
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    doc: str = "",
    *,
    optional: bool = False,
    default: Any = dataclasses.MISSING,
) -> Any:
    """Declare a tensor field with its symbolic shape, dtype(s) and meaning."""
    dtypes = (dtype,) if isinstance(dtype, torch.dtype) else (tuple(dtype) if dtype else ())
    meta = {"shape": tuple(shape), "dtypes": dtypes, "doc": doc, "optional": optional}
    if optional and default is dataclasses.MISSING:
        default = None
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def static_field(doc: str = "", default: Any = dataclasses.MISSING) -> Any:
    """Declare a non-tensor field (names, code books, sizes) that never moves device."""
    meta = {"static": True, "doc": doc}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def check_tensor(
    name: str,
    value: Any,
    shape: Sequence[str | int] | None = None,
    dtypes: Sequence[torch.dtype] = (),
    dims: dict[str, int] | None = None,
    *,
    finite: bool = True,
    low: float | None = None,
    high: float | None = None,
) -> dict[str, int]:
    """Validate one tensor against a symbolic shape, dtypes and range; return bound dims."""
    dims = {} if dims is None else dict(dims)
    if not isinstance(value, Tensor):
        raise StateError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if shape is not None:
        if value.dim() != len(shape):
            raise StateError(
                f"{name}: expected {len(shape)} dimension(s) {tuple(shape)}, got shape {tuple(value.shape)}"
            )
        for sym, size in zip(shape, value.shape):
            if isinstance(sym, int):
                if size != sym:
                    raise StateError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
            elif sym in dims and dims[sym] != size:
                raise StateError(
                    f"{name}: dimension {sym} should be {dims[sym]} (from other fields), got {size} "
                    f"in shape {tuple(value.shape)}"
                )
            else:
                dims[sym] = size
    if dtypes and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise StateError(f"{name}: expected dtype {names}, got {str(value.dtype).replace('torch.', '')}")
    if value.is_floating_point() and value.numel():
        if finite and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise StateError(f"{name}: expected finite values, found {bad} NaN/inf entries")
    if value.numel() and (low is not None or high is not None):
        v = value.detach()
        if low is not None and bool((v < low).any()):
            raise StateError(f"{name}: expected values >= {low}, found minimum {float(v.min())}")
        if high is not None and bool((v > high).any()):
            raise StateError(f"{name}: expected values <= {high}, found maximum {float(v.max())}")
    return dims


@dataclass(frozen=True)
class Struct:
    """Base class of frozen tensor dataclasses with ``replace``, ``to`` and validation."""

    def replace(self, **changes: Any) -> Self:
        """Return a copy with the named fields replaced (unknown names are an error)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise StateError(
                f"{type(self).__name__}.replace: unknown field(s) {unknown}; fields are {sorted(names)}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all fields, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def items(self) -> Iterator[tuple[str, Any]]:
        """Iterate over ``(name, value)`` pairs."""
        for f in dataclasses.fields(self):
            yield f.name, getattr(self, f.name)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Self:
        """Move every tensor (recursively) to ``device``; ``dtype`` applies to floating fields."""

        def move(v: Any) -> Any:
            if isinstance(v, Tensor):
                if dtype is not None and v.is_floating_point():
                    return v.to(device=device, dtype=dtype)
                return v.to(device=device)
            if isinstance(v, Struct):
                return v.to(device, dtype)
            return v

        return dataclasses.replace(self, **{k: move(v) for k, v in self.items()})

    @property
    def device(self) -> torch.device:
        """Device of the first tensor field (all fields share it after ``to``)."""
        for _, v in self.items():
            if isinstance(v, Tensor):
                return v.device
            if isinstance(v, Struct):
                return v.device
        return torch.device("cpu")

    def validate(self, dims: dict[str, int] | None = None, prefix: str = "", *, finite: bool = True) -> dict[str, int]:
        """Check every declared field's shape, dtype and (unless ``finite`` is False) finiteness; raise naming it."""
        dims = {} if dims is None else dims
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            name = f"{prefix}{f.name}"
            if f.metadata.get("static"):
                continue
            if value is None:
                if f.metadata.get("optional"):
                    continue
                raise StateError(f"{name}: required field is None")
            if isinstance(value, Struct):
                dims = value.validate(dims, prefix=f"{name}.", finite=finite)
                continue
            if "shape" in f.metadata:
                dims = check_tensor(name, value, f.metadata["shape"], f.metadata["dtypes"], dims, finite=finite)
        return dims

    def flat_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """All tensor fields keyed ``a/b`` (for serialisation only, never for access)."""
        out: dict[str, Tensor] = {}
        for name, value in self.items():
            if isinstance(value, Tensor):
                out[prefix + name] = value
            elif isinstance(value, Struct):
                out.update(value.flat_tensors(prefix + name + "/"))
        return out

    def with_flat_tensors(self, flat: Mapping[str, Tensor], prefix: str = "") -> Self:
        """Inverse of :meth:`flat_tensors`: replace tensor fields from a flat mapping."""
        changes: dict[str, Any] = {}
        for name, value in self.items():
            key = prefix + name
            if isinstance(value, Tensor) and key in flat:
                changes[name] = flat[key].to(value.device)
            elif value is None and key in flat:  # an optional field set during the run (e.g. from a checkpoint)
                changes[name] = flat[key].to(self.device)
            elif isinstance(value, Struct):
                changes[name] = value.with_flat_tensors(flat, key + "/")
        return dataclasses.replace(self, **changes)

    def nbytes(self) -> int:
        """Total bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.flat_tensors().values())

    def describe(self) -> str:
        """One line per field: name, shape, dtype and documented meaning."""
        lines = [f"{type(self).__name__}:"]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            doc = f.metadata.get("doc", "")
            if isinstance(v, Tensor):
                lines.append(f"  {f.name:<20} {str(tuple(v.shape)):<16} {str(v.dtype)[6:]:<8} {doc}")
            elif isinstance(v, Struct):
                lines.append(f"  {f.name:<20} {type(v).__name__:<25} {doc}")
            else:
                lines.append(f"  {f.name:<20} {type(v).__name__:<25} {doc}")
        return "\n".join(lines)


@dataclass(frozen=True)
class State(Struct):
    """What changes during a run (stages, timers, opinions, counts): substeps return a new one each step."""


@dataclass(frozen=True)
class System(Struct):
    """What never changes during a run (networks, agent attributes, schedules, tables, capacities).

    Substeps read it and never write it; it is moved to the device once, fingerprinted but
    not checkpointed. ``System()`` itself is the empty system of a model whose every field changes.
    """


def lookup(system: System, state: State, name: str) -> Any:
    """Field ``name`` of the system if it has one, else of the state (how reads are resolved)."""
    if name in type(system).field_names():
        return getattr(system, name)
    return getattr(state, name)


@dataclass(frozen=True)
class CodeBook:
    """Labels of a categorical attribute stored as small integer codes."""

    name: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"CodeBook {self.name}: labels must be unique, got {self.labels}")

    def __len__(self) -> int:
        return len(self.labels)

    def code(self, label: str) -> int:
        """Integer code of ``label``."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise ConfigError(f"CodeBook {self.name}: unknown label {label!r}; known: {self.labels}") from None

    def encode(self, labels: Sequence[str], dtype: torch.dtype = torch.int8) -> Tensor:
        """Codes of a sequence of labels as a tensor."""
        return torch.tensor([self.code(s) for s in labels], dtype=dtype)

    def decode(self, codes: Tensor | Sequence[int]) -> list[str]:
        """Labels of a tensor of codes."""
        values = codes.tolist() if isinstance(codes, Tensor) else list(codes)
        return [self.labels[int(c)] for c in values]

    @property
    def dtype(self) -> torch.dtype:
        """Smallest integer dtype that holds every code."""
        return torch.int8 if len(self.labels) <= 127 else torch.int16 if len(self.labels) <= 32767 else torch.int32


def splice(states: Sequence[Struct], choice: Tensor, group: Tensor, group_dim: str | None = None) -> Struct:
    """One state from several runs: each group of agents (and its ``group_dim`` slots) from the run ``choice`` names.

    ``states``: runs of the same model from the same start (the particles); ``choice [G]``:
    the run each group is taken from; ``group [N]``: each agent's group. A field whose shape
    starts with ``"N"`` is taken per agent, a field with the symbol ``group_dim`` per slot of
    that dimension; every other field must be equal in all runs (else the error names it):
    a block particle filter resamples each region's agents from its own best particle.
    """
    if not states:
        raise StateError("splice: states: expected at least one state, got none")
    first = states[0]
    if any(type(s) is not type(first) for s in states):
        raise StateError(f"splice: states: expected one type, got {sorted({type(s).__name__ for s in states})}")
    choice = torch.as_tensor(choice).long().to(group.device)
    if choice.dim() != 1 or bool((choice < 0).any()) or bool((choice >= len(states)).any()):
        raise StateError(f"splice: choice: expected a 1-d index into {len(states)} states, got {choice.tolist()}")
    group = group.long()
    if group.dim() != 1:
        raise StateError(f"splice: group: expected a 1-d tensor of group ids, got shape {tuple(group.shape)}")
    if group.numel() and (int(group.min()) < 0 or int(group.max()) >= choice.numel()):
        raise StateError(f"splice: group: expected group ids in 0..{choice.numel() - 1} (len(choice)), "
                         f"got {int(group.min())}..{int(group.max())}")
    for f in dataclasses.fields(first):
        v = getattr(first, f.name)
        if tuple(f.metadata.get("shape", ()))[:1] == ("N",) and isinstance(v, Tensor) and v.shape[0] != group.numel():
            raise StateError(f"splice: group: expected one group id per agent ({v.shape[0]}, from {f.name}), "
                             f"got {group.numel()}")
    owner = choice[group]  # [N] the run each agent comes from
    picked = [int(c) for c in torch.unique(choice)]
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(first):
        if f.metadata.get("static"):
            continue
        vals = [getattr(s, f.name) for s in states]
        if all(v is None for v in vals):
            continue
        if any(not isinstance(v, Tensor) for v in vals):
            raise StateError(f"splice: {f.name}: expected a tensor in every state (or None in all)")
        shape = tuple(f.metadata.get("shape", ()))
        if shape[:1] == ("N",):
            out = vals[picked[0]].clone()
            for c in picked[1:]:
                m = owner == c
                out[m] = vals[c][m]
        elif group_dim is not None and group_dim in shape:
            d = shape.index(group_dim)
            out = torch.stack([vals[int(c)].select(d, g) for g, c in enumerate(choice.tolist())], dim=d)
        else:
            if any(not torch.equal(vals[0], v) for v in vals[1:]):
                raise StateError(f"splice: {f.name}: shape {shape} is neither per agent nor per {group_dim!r} "
                                 "and differs between the states")
            out = vals[0]
        changes[f.name] = out
    return dataclasses.replace(first, **changes)
