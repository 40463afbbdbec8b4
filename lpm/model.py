"""A model is a checked, printable plan of substeps plus named observables.

``Model.simulate(params, system, state, steps)`` runs the plan T times: each substep maps
``(params, system, state, t, rng)`` to a new state; the system (what never changes during
a run) is read, never written. The loop itself is trivial; recording,
checkpointing and progress are hooks that wrap it (see :mod:`lpm.recording`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from lpm.errors import LPMError
from lpm.params import ParamsLike, check_params
from lpm.results import Results
from lpm.rng import Streams
from lpm.state import State, Struct, System
from lpm.substep import Substep

__all__ = ["Model", "Observable", "Hook", "Run", "ModelError", "DataflowError"]


class ModelError(LPMError, ValueError):
    """A model is assembled inconsistently (unknown fields, duplicate substeps, ...)."""


class DataflowError(ModelError):
    """Check mode saw a substep or observable touch a field it does not declare."""


_RECORDING_TYPES: dict[type, type] = {}


def _recording_type(cls: type) -> type:
    """A subclass of ``cls`` whose instances wrap a state and log direct field reads."""
    if cls not in _RECORDING_TYPES:
        names = frozenset(cls.field_names())

        def __getattribute__(self: Any, name: str) -> Any:
            get = object.__getattribute__
            if name in names:
                get(self, "_lpm_reads").add(name)
            elif name in ("_lpm_reads", "_lpm_state"):
                return get(self, name)
            # methods and properties run on the wrapped state, so `replace`, `device` or a
            # derived property do not count as reading every field
            return getattr(get(self, "_lpm_state"), name)

        _RECORDING_TYPES[cls] = type(f"Recording{cls.__name__}", (cls,), {"__getattribute__": __getattribute__})
    return _RECORDING_TYPES[cls]


def recording(state: Struct) -> tuple[Struct, set[str]]:
    """A view of ``state`` or a system (same type, ``isinstance`` holds) and the set of fields read through it."""
    reads: set[str] = set()
    view = object.__new__(_recording_type(type(state)))
    object.__setattr__(view, "_lpm_state", state)
    object.__setattr__(view, "_lpm_reads", reads)
    return view, reads


def changed_fields(before: State, after: State) -> set[str]:
    """Fields whose value object differs between two states (a replaced field counts as written)."""
    return {f for f in before.field_names() if getattr(after, f, None) is not getattr(before, f)}


@dataclass(frozen=True)
class Observable:
    """A named measurement after each step: ``fn(system, state) -> [] or [G]``; ``reads`` from either."""

    fn: Callable[[System, State], Tensor]
    labels: Sequence[str] | None = None
    reads: tuple[str, ...] = ()
    doc: str = ""


@dataclass
class Run:
    """Mutable context of one simulation: what hooks may read or restore."""

    model: "Model"
    params: ParamsLike
    system: System
    state: State
    steps: int
    seed: int
    streams: Streams
    step: int = 0
    records: dict[str, list[Tensor]] = field(default_factory=dict)
    grad: bool = False


class Hook(Protocol):
    """Something that wraps the loop: called at start, after each step and at the end."""

    def on_start(self, run: Run) -> None: ...

    def on_step(self, run: Run) -> None: ...

    def on_end(self, run: Run) -> None: ...


class Model:
    """An ordered plan of substeps over a system and a state type, with named observables.

    The plan is checked when the model is built (``state_type`` and ``system_type`` given)
    and again against the actual system and state when it runs: every field a substep reads
    must exist on the system or the state (names are resolved against the system first), every
    field it writes on the state (writing a system field is an error), a read field may not be
    ``None``, and no name may be a field of both; errors name the field and the substep.
    """

    def __init__(
        self,
        substeps: Sequence[Substep],
        observables: Mapping[str, Observable | Callable[[System, State], Tensor]] | None = None,
        *,
        state_type: type[State] | None = None,
        system_type: type[System] | None = None,
        dt: float = 1.0,
        time_unit: str = "day",
        name: str = "model",
    ) -> None:
        if not substeps:
            raise ModelError("substeps: expected at least one substep")
        names = [s.name for s in substeps]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ModelError(f"substeps: names must be unique (they key random streams), duplicated: {dup}")
        if dt <= 0:
            raise ModelError(f"dt: expected > 0 ({time_unit}s per step), got {dt}")
        self.substeps = tuple(substeps)
        self.observables: dict[str, Observable] = {
            k: (v if isinstance(v, Observable) else Observable(v)) for k, v in (observables or {}).items()
        }
        self.state_type = state_type
        self.system_type = system_type
        self.dt = float(dt)
        self.time_unit = time_unit
        self.name = name
        if state_type is not None:
            self._check_fields(state_type, system_type)

    def inserted(self, after: str, *substeps: Substep, name: str | None = None) -> "Model":
        """A copy of this model with ``substeps`` placed right after the substep named ``after`` (checked again)."""
        names = [s.name for s in self.substeps]
        if after not in names:
            raise ModelError(f"after: no substep named {after!r}; the plan is {names}")
        at = names.index(after) + 1
        return Model([*self.substeps[:at], *substeps, *self.substeps[at:]], self.observables, state_type=self.state_type,
                     system_type=self.system_type, dt=self.dt, time_unit=self.time_unit, name=name or self.name)

    def _check_fields(self, state_type: type[State], system_type: type[System] | None) -> None:
        """Check declarations against the types; reads only when the system type is known."""
        state_fields = set(state_type.field_names())
        system_fields = set(system_type.field_names()) if system_type is not None else set()
        both = sorted(state_fields & system_fields)
        if both:
            raise ModelError(f"field(s) {both} are on both the system {system_type.__name__} and the state "
                             f"{state_type.__name__}; a field is either constant during a run (system) or not (state)")
        available = state_fields | system_fields
        where = f"{getattr(system_type, '__name__', '-')} (system) or {state_type.__name__} (state)"
        for s in self.substeps:
            for f in (*s.reads, *getattr(s, "optional_reads", ())):
                if system_type is not None and f not in available:
                    raise ModelError(f"substep {s.name!r} reads field {f!r}, which neither {where} provides; "
                                     f"system fields: {sorted(system_fields)}; state fields: {sorted(state_fields)}")
            for f in s.writes:
                if f in system_fields:
                    raise ModelError(f"substep {s.name!r} writes field {f!r}, which is a field of the system "
                                     f"{where.split(' ')[0]} (constant during a run), not of the state "
                                     f"{state_type.__name__}; move it to the state or stop writing it")
                if f not in state_fields:
                    raise ModelError(f"substep {s.name!r} writes field {f!r}, which {state_type.__name__} does not have")
        for name, obs in self.observables.items():
            for f in obs.reads:
                if system_type is not None and f not in available:
                    raise ModelError(f"observable {name!r} reads field {f!r}, which neither {where} provides")

    def check(self, params: ParamsLike, system: System, state: State) -> dict[str, int]:
        """Validate the system, state and parameters against the plan; return symbolic dims (N, E...)."""
        if not isinstance(system, System):
            raise ModelError(f"system: expected a System (what never changes during a run), got {type(system).__name__}")
        if not isinstance(state, State):
            raise ModelError(f"state: expected a State, got {type(state).__name__}")
        if self.system_type is not None and not isinstance(system, self.system_type):
            raise ModelError(f"system: model {self.name!r} expects a {self.system_type.__name__}, got {type(system).__name__}")
        self._check_fields(type(state), type(system))
        system_fields = set(system.field_names())
        for s in self.substeps:
            for f in s.reads:
                # a field the substep also writes may start as None: the substep initialises it
                value = getattr(system, f) if f in system_fields else getattr(state, f)
                if value is None and f not in s.writes:
                    where = "system" if f in system_fields else "state"
                    raise ModelError(f"substep {s.name!r} reads field {f!r}, which is None in this {where}")
            params.require(*s.params, owner=f"substep {s.name!r}")
        check_params(params, "checked before simulating")
        return system.validate(state.validate())

    def plan(self) -> str:
        """Printable plan: one line per substep (reads of the system named, when its type is known) and the observables."""
        lines = [f"Model {self.name!r}: 1 step = {self.dt:g} {self.time_unit}"]
        constant = set(self.system_type.field_names()) if self.system_type is not None else set()
        for i, s in enumerate(self.substeps, 1):
            fixed = [f for f in (*s.reads, *getattr(s, "optional_reads", ())) if f in constant]
            lines.append(f"  {i}. {s.describe()}" + (f"  [from the system: {', '.join(fixed)}]" if fixed else ""))
        if self.observables:
            lines.append("  observables: " + ", ".join(self.observables))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.plan()

    def step(self, params: ParamsLike, system: System, state: State, t: int, streams: Streams) -> State:
        """Apply every substep once, in order."""
        for s in self.substeps:
            state = s(params, system, state, t, streams[s.name])
        return state

    def observe(self, system: System, state: State) -> dict[str, Tensor]:
        """Evaluate every observable on ``system`` and ``state``."""
        return {k: o.fn(system, state) for k, o in self.observables.items()}

    def step_checked(self, params: ParamsLike, system: System, state: State, t: int, streams: Streams,
                     seen: dict[str, dict[str, set[str]]]) -> State:
        """:meth:`step` that records each substep's reads (of system and state) and writes and fails on undeclared ones."""
        for s in self.substeps:
            sys_view, sys_reads = recording(system)
            view, reads = recording(state)
            out = s(params, sys_view, view, t, streams[s.name])
            if out is view:
                out = state
            if isinstance(out, System) or not isinstance(out, type(state)):
                raise DataflowError(f"check: substep {s.name!r} returned a {type(out).__name__} at step {t}; expected "
                                    f"the state ({type(state).__name__})")
            reads = reads | sys_reads
            writes = changed_fields(state, out)
            log = seen.setdefault(s.name, {"reads": set(), "writes": set()})
            log["reads"] |= reads
            log["writes"] |= writes
            for f in sorted(reads - set(s.reads) - set(getattr(s, "optional_reads", ()))):
                raise DataflowError(f"check: substep {s.name!r} read field {f!r} at step {t} but does not declare it "
                                    f"in reads {s.reads}")
            for f in sorted(writes - set(s.writes)):
                raise DataflowError(f"check: substep {s.name!r} wrote field {f!r} at step {t} but does not declare it "
                                    f"in writes {s.writes}")
            state = out
        return state

    def observe_checked(self, system: System, state: State, seen: dict[str, dict[str, set[str]]]) -> dict[str, Tensor]:
        """:meth:`observe` that fails when an observable declaring reads touches an undeclared field."""
        out = {}
        for k, o in self.observables.items():
            sys_view, sys_reads = recording(system)
            view, reads = recording(state)
            out[k] = o.fn(sys_view, view)
            reads = reads | sys_reads
            seen.setdefault(f"observable:{k}", {"reads": set(), "writes": set()})["reads"] |= reads
            # observables built from a bare function declare nothing; only declared ones are held to it
            extra = sorted(reads - set(o.reads)) if o.reads else []
            if extra:
                raise DataflowError(f"check: observable {k!r} read field {extra[0]!r} but does not declare it "
                                    f"in reads {o.reads}")
        return out

    def simulate(
        self,
        params: ParamsLike,
        system: System,
        state: State,
        steps: int,
        *,
        seed: int = 0,
        grad: bool = False,
        device: torch.device | str | None = None,
        hooks: Iterable[Hook] = (),
        progress: bool | None = None,
        check: bool = False,
    ) -> Results:
        """Run ``steps`` steps and return the observables.

        ``system`` holds what never changes during the run (read, never written); ``state``
        the initial values of what does. ``grad=False`` runs under ``torch.no_grad`` (fast path); ``grad=True`` keeps the
        autograd graph through the same code so observables can be differentiated with
        respect to ``params``. ``seed`` seeds one independent stream per substep.
        ``hooks`` wrap the loop (recording, checkpoints); ``progress`` shows a bar
        (default: on for runs of 200 steps or more when attached to a terminal).
        ``check=True`` runs the same steps through recording views of the state and raises
        :class:`DataflowError` naming the substep (or observable) and the field as soon as one
        reads or writes a field it does not declare; ``results.meta["dataflow"]`` then holds
        what each one actually read and wrote. Results are identical to ``check=False``.
        """
        if not isinstance(steps, int) or steps < 0:
            raise ModelError(f"steps: expected a non-negative int, got {steps!r}")
        if device is not None:
            system, state, params = system.to(device), state.to(device), params.to(device)
        self.check(params, system, state)
        streams = Streams(seed, [s.name for s in self.substeps], _device(system, state))
        run = Run(self, params, system, state, steps, seed, streams, 0, {k: [] for k in self.observables}, grad)
        hooks = list(hooks)
        if progress is not False:
            from lpm.recording import ProgressBar

            hooks.append(ProgressBar(force=bool(progress)))
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for h in hooks:
                h.on_start(run)
            start = run.step
            seen: dict[str, dict[str, set[str]]] = {}
            while run.step < steps:
                if check:
                    run.state = self.step_checked(params, system, run.state, run.step, streams, seen)
                    observed = self.observe_checked(system, run.state, seen)
                else:
                    run.state = self.step(params, system, run.state, run.step, streams)
                    observed = self.observe(system, run.state)
                for k, v in observed.items():
                    run.records[k].append(v)
                run.step += 1
                for h in hooks:
                    h.on_step(run)
            for h in hooks:
                h.on_end(run)
        obs = {k: (torch.stack(v) if v else torch.empty(0)) for k, v in run.records.items()}
        if grad:
            # an observable without a gradient path must fail loudly on backward, never give a silent zero
            from lpm.sampling import guard_no_gradient

            anchor = next((p for p in params.parameters() if p.requires_grad), None)
            obs = {k: guard_no_gradient(k, v, anchor) for k, v in obs.items()}
        labels = {k: (tuple(o.labels) if o.labels is not None else None) for k, o in self.observables.items()}
        meta: dict[str, Any] = {"seed": seed, "steps": steps, "resumed_from": start}
        if check:
            meta["dataflow"] = {k: {rw: tuple(sorted(v)) for rw, v in d.items()} for k, d in seen.items()}
        return Results(obs, labels, self.dt, 0, run.state, meta)

    def replicate(
        self,
        params: ParamsLike,
        systems: System | Sequence[System],
        states: State | Sequence[State],
        steps: int,
        *,
        seeds: Sequence[int],
        shared: Sequence[str] = (),
        grad: bool = False,
        device: torch.device | str | None = None,
    ) -> Results:
        """Run R replicates or counterfactual arms as one batch; observables ``[T, R, ...]``.

        ``systems`` and ``states``: one each (repeated R times) or one per replicate (arms that
        differ in agent or edge fields, networks included); both are batched as one disjoint
        union; ``seeds[r]`` seeds replicate ``r``'s streams, so replicate ``r`` equals
        ``simulate(params, systems[r], states[r], steps, seed=seeds[r])`` for block-local substeps
        (see :mod:`lpm.replicates` for the exact statement). ``shared`` names written fields
        without an agent axis whose value is the same in every replicate (e.g. a schedule's
        ``layer_scale``); any other such write would mix replicates and is an error.
        """
        from lpm.replicates import ReplicateStreams, batch_states

        if not isinstance(steps, int) or steps < 0:
            raise ModelError(f"steps: expected a non-negative int, got {steps!r}")
        seeds = [int(s) for s in seeds]
        states = [states] * len(seeds) if isinstance(states, State) else list(states)
        systems = [systems] * len(states) if isinstance(systems, System) else list(systems)
        if len(systems) != len(states):
            raise ModelError(f"systems: expected one system or {len(states)} (one per state), got {len(systems)}")
        (system, batch), layout = batch_states(systems, states)
        fields = {f.name: f for f in dataclasses.fields(batch)}
        for s in self.substeps:
            for f in s.writes:
                meta = fields[f].metadata if f in fields else {}
                agent_axis = any(d in ("N", "E") for d in meta.get("shape", ())) or isinstance(getattr(batch, f, None), Struct)
                if not agent_axis and f not in shared:
                    raise ModelError(f"replicate: substep {s.name!r} writes field {f!r}, which has no agent axis and "
                                     f"would be shared by all replicates; pass shared=({f!r}, ...) if its value does "
                                     "not depend on the replicate")
        if device is not None:
            system, batch, params = system.to(device), batch.to(device), params.to(device)
        self.check(params, system, batch)
        streams = ReplicateStreams(seeds, [s.name for s in self.substeps], _device(system, batch), layout)
        records: dict[str, list[Tensor]] = {k: [] for k in self.observables}
        state = batch
        with torch.enable_grad() if grad else torch.no_grad():
            for t in range(steps):
                for s in self.substeps:
                    with streams.mode(s.name):
                        state = s(params, system, state, t, streams.tokens[s.name])
                parts = [(layout.part(system, r), layout.part(state, r)) for r in range(layout.num_replicates)]
                for k, o in self.observables.items():
                    records[k].append(torch.stack([o.fn(y, p) for y, p in parts]))
        obs = {k: (torch.stack(v) if v else torch.empty(0)) for k, v in records.items()}
        labels = {k: (tuple(o.labels) if o.labels is not None else None) for k, o in self.observables.items()}
        meta = {"seeds": seeds, "steps": steps, "replicates": layout.num_replicates, "layout": layout}
        return Results(obs, labels, self.dt, 0, state, meta)


def _device(system: System, state: State) -> torch.device:
    """The run's device: the state's, or the system's when the state holds no tensor."""
    return state.device if state.flat_tensors() else system.device
