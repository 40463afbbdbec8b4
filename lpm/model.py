"""A model is a checked, printable plan of substeps plus named observables.

``Model.simulate`` runs the plan T times. The loop itself is trivial; recording,
checkpointing and progress are hooks that wrap it (see :mod:`lpm.recording`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from lpm.params import Params
from lpm.results import Results
from lpm.rng import Streams
from lpm.state import State
from lpm.substep import Substep

__all__ = ["Model", "Observable", "Hook", "Run", "ModelError"]


class ModelError(ValueError):
    """A model is assembled inconsistently (unknown fields, duplicate substeps, ...)."""


@dataclass(frozen=True)
class Observable:
    """A named measurement of the state after each step: ``fn(state) -> [] or [G]``."""

    fn: Callable[[State], Tensor]
    labels: Sequence[str] | None = None
    reads: tuple[str, ...] = ()
    doc: str = ""


@dataclass
class Run:
    """Mutable context of one simulation: what hooks may read or restore."""

    model: "Model"
    params: Params
    state: State
    steps: int
    seed: int
    streams: Streams
    step: int = 0
    records: dict[str, list[Tensor]] = field(default_factory=dict)
    grad: bool = False

    def observables_so_far(self) -> dict[str, Tensor]:
        """Observables stacked over the steps run so far."""
        return {k: torch.stack(v) if v else torch.empty(0) for k, v in self.records.items()}


class Hook(Protocol):
    """Something that wraps the loop: called at start, after each step and at the end."""

    def on_start(self, run: Run) -> None: ...

    def on_step(self, run: Run) -> None: ...

    def on_end(self, run: Run) -> None: ...


class Model:
    """An ordered plan of substeps over a state type, with named observables.

    The plan is checked when the model is built (``state_type`` given) and again against
    the actual state when it runs: every field a substep reads or writes must exist on the
    state, and a read field may not be ``None``; errors name the field and the substep.
    """

    def __init__(
        self,
        substeps: Sequence[Substep],
        observables: Mapping[str, Observable | Callable[[State], Tensor]] | None = None,
        *,
        state_type: type[State] | None = None,
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
        self.dt = float(dt)
        self.time_unit = time_unit
        self.name = name
        if state_type is not None:
            self._check_fields(set(state_type.field_names()), state_type.__name__)

    def _check_fields(self, available: set[str], type_name: str) -> None:
        for s in self.substeps:
            for f in s.reads:
                if f not in available:
                    raise ModelError(
                        f"substep {s.name!r} reads field {f!r}, which {type_name} does not provide; "
                        f"fields: {sorted(available)}"
                    )
            for f in s.writes:
                if f not in available:
                    raise ModelError(f"substep {s.name!r} writes field {f!r}, which {type_name} does not have")
        for name, obs in self.observables.items():
            for f in obs.reads:
                if f not in available:
                    raise ModelError(f"observable {name!r} reads field {f!r}, which {type_name} does not provide")

    def check(self, params: Params, state: State) -> dict[str, int]:
        """Validate the state and parameters against the plan; return symbolic dims (N, E...)."""
        self._check_fields(set(state.field_names()), type(state).__name__)
        for s in self.substeps:
            for f in s.reads:
                if getattr(state, f) is None:
                    raise ModelError(f"substep {s.name!r} reads field {f!r}, which is None in this state")
            params.require(*s.params, owner=f"substep {s.name!r}")
        return state.validate()

    def plan(self) -> str:
        """Printable plan: one line per substep and the observables."""
        lines = [f"Model {self.name!r}: 1 step = {self.dt:g} {self.time_unit}"]
        for i, s in enumerate(self.substeps, 1):
            lines.append(f"  {i}. {s.describe()}")
        if self.observables:
            lines.append("  observables: " + ", ".join(self.observables))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.plan()

    def step(self, params: Params, state: State, t: int, streams: Streams) -> State:
        """Apply every substep once, in order."""
        for s in self.substeps:
            state = s(params, state, t, streams[s.name])
        return state

    def observe(self, state: State) -> dict[str, Tensor]:
        """Evaluate every observable on ``state``."""
        return {k: o.fn(state) for k, o in self.observables.items()}

    def simulate(
        self,
        params: Params,
        state: State,
        steps: int,
        *,
        seed: int = 0,
        grad: bool = False,
        device: torch.device | str | None = None,
        hooks: Iterable[Hook] = (),
        progress: bool | None = None,
        checkpoint_every_steps: int | None = None,
    ) -> Results:
        """Run ``steps`` steps and return the observables.

        ``grad=False`` runs under ``torch.no_grad`` (fast path); ``grad=True`` keeps the
        autograd graph through the same code so observables can be differentiated with
        respect to ``params``. ``seed`` seeds one independent stream per substep.
        ``hooks`` wrap the loop (recording, checkpoints); ``progress`` shows a bar
        (default: on for runs of 200 steps or more when attached to a terminal).
        """
        if not isinstance(steps, int) or steps < 0:
            raise ModelError(f"steps: expected a non-negative int, got {steps!r}")
        if device is not None:
            state = state.to(device)
            params = params.to(device)
        self.check(params, state)
        streams = Streams(seed, [s.name for s in self.substeps], state.device)
        run = Run(self, params, state, steps, seed, streams, 0, {k: [] for k in self.observables}, grad)
        hooks = list(hooks)
        if progress is not False:
            from lpm.recording import ProgressBar

            hooks.append(ProgressBar(force=bool(progress)))
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for h in hooks:
                h.on_start(run)
            start = run.step
            while run.step < steps:
                run.state = self.step(params, run.state, run.step, streams)
                for k, v in self.observe(run.state).items():
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
        return Results(obs, labels, self.dt, 0, run.state, {"seed": seed, "steps": steps, "resumed_from": start})

    def replicate(self, params: Params, state: State, steps: int, seeds: Sequence[int], **kwargs: Any) -> dict[str, Tensor]:
        """Run one replicate per seed; observables stacked ``[R, T, ...]``."""
        return Results.stack([self.simulate(params, state, steps, seed=s, **kwargs) for s in seeds])
