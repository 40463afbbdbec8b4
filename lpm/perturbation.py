"""Unbiased forward-mode derivatives of expectations over discrete randomness (smoothed perturbation).

A stochastic simulation ``f(theta)`` whose Bernoulli events have probabilities ``p_i(theta)``
has ``d E[f] / d theta`` = (the pathwise derivative of ``f`` with every event held fixed) +
(the effect of flipping events). For one event drawn 0 with ``p' > 0`` the flip ``0 -> 1``
happens at rate ``w = p' / (1 - p)`` per unit of ``theta``; for one drawn 1 with ``p' < 0``,
``1 -> 0`` at rate ``w = |p'| / p``. Following Arya et al. ("Automatic differentiation of
programs with discrete randomness", NeurIPS 2022; the StochasticAD approach) with one
pruned alternative:

* the **primal** run carries ``theta`` as a forward-mode dual number
  (:mod:`torch.autograd.forward_ad`), so every tracked event knows its ``p'``; its flip
  weights are summed into ``W`` and one event is kept with probability proportional to its
  weight (a one-item reservoir over the whole run, which is what pruning a chain of
  alternatives step by step amounts to when flips on the alternative are ignored);
* the **alternative** is the same run (same seed: the engine's counter-based uniforms make
  every later draw common to both) with that one event flipped;
* the estimate is ``tangent(f) + W * (f(alternative) - f(primal))``, unbiased for every
  output at once; ``alternatives=K`` keeps ``K`` independent reservoirs and averages.

A substep opts in by asking :func:`tracks` whether a pass tracks its step (on the primal run:
where its probabilities carry a non-zero tangent; on an alternative: at the flip) and then
routing its Bernoulli draws through :func:`bernoulli` on its torch path; untracked steps may
run compiled kernels, which reproduce the torch path's draws bit for bit. What follows
an event (a dwell drawn from the same uniform) must use the *conditional* uniform that
:func:`bernoulli` returns: ``u / p`` for an event that happened, ``(u - p) / (1 - p)`` for
one forced by a flip, both uniform and independent of the event, so flipping an event
never moves the draws that follow it.

When to use: few parameter directions (one forward-mode run per direction), long horizons
(no backward tape: memory is that of a forward run), and models where the pathwise and
score-function approximations are biased (interacting infectors). Cost: the primal run
with dual numbers (torch path wherever the parameter acts) plus one forward run per
alternative. Its
variance grows with ``W`` (the expected number of events the parameter moves per unit),
so it is noisiest for parameters that touch many events at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from lpm.errors import ConfigError

__all__ = ["Flip", "Perturbation", "PerturbationEstimate", "active", "bernoulli", "directional_derivative",
           "simulate_derivative", "tracks", "with_value"]

_TINY = 1e-30


@dataclass(frozen=True)
class Flip:
    """One tracked event: call ``call`` of site ``site`` at step ``step``, agent ``agent``; ``up``: 0 -> 1."""

    site: str
    step: int
    call: int
    agent: int
    up: bool


@dataclass
class Perturbation:
    """What one pass does at the tracked Bernoulli draws: record flip weights (primal) or apply a flip (alternative)."""

    mode: str  # "primal" or "alternative"
    alternatives: int = 1
    generator: torch.Generator | None = None
    flip: Flip | None = None
    weight: float = 0.0  # W: total flip weight of the primal run
    kept: list[Flip | None] = field(default_factory=list)  # one reservoir per alternative
    hits: dict[tuple[str, int, int], int] = field(default_factory=dict)  # events per site call (reproducibility check)
    calls: dict[tuple[str, int], int] = field(default_factory=dict)
    applied: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("primal", "alternative"):
            raise ConfigError(f"Perturbation.mode: expected 'primal' or 'alternative', got {self.mode!r}")
        if self.alternatives < 1:
            raise ConfigError(f"Perturbation.alternatives: expected >= 1, got {self.alternatives}")
        if not self.kept:
            self.kept = [None] * self.alternatives

    def _call_id(self, site: str, t: int) -> int:
        k = (site, int(t))
        c = self.calls.get(k, 0)
        self.calls[k] = c + 1
        return c

    def draw(self, site: str, t: int, index: Tensor, p: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(hit [C] bool, v [C])`` for the agents ``index`` with probabilities ``p`` and uniforms ``u``.

        ``v`` is the event's conditional uniform: ``u / p`` where it happened, ``(u - p) / (1 - p)``
        where it did not (or where an alternative forced it), independent of the event.
        """
        pd = fwAD.unpack_dual(p)
        p0 = pd.primal.detach()
        for name, x in (("index", index), ("u", u)):
            if x.shape != p0.shape:
                raise ConfigError(f"perturbation draw at {site!r}, step {t}: {name}: expected shape {tuple(p0.shape)} "
                                  f"(that of p), got {tuple(x.shape)}")
        if p0.numel() and not bool(((p0 >= 0) & (p0 <= 1)).all()):  # NaN fails too: it would drop the step's weight
            raise ConfigError(f"perturbation draw at {site!r}, step {t}: p: expected probabilities in [0, 1], "
                              f"got min {float(p0.min())}, max {float(p0.max())}, {int(torch.isnan(p0).sum())} NaN")
        call = self._call_id(site, t)
        hit = u < p0
        v = torch.where(hit, u / p0.clamp_min(_TINY), (u - p0) / (1 - p0).clamp_min(_TINY)).clamp(0, 1)
        key = (site, int(t), call)
        if self.mode == "primal":
            self.hits[key] = int(hit.sum())
            if pd.tangent is not None and index.numel():
                self._offer(site, int(t), call, index, p0.double(), pd.tangent.detach().double(), hit)
            return hit, v
        f = self.flip
        if f is None or (f.site, f.step, f.call) != key:
            return hit, v
        if key in self.hits and self.hits[key] != int(hit.sum()):
            raise RuntimeError(f"perturbation: the alternative diverged from the primal run before its flip at {key} "
                               f"({int(hit.sum())} events, primal {self.hits[key]}): the run is not reproducible for a fixed seed")
        at = (index.to(torch.int64) == f.agent).nonzero().squeeze(1)
        if at.numel() != 1:
            raise RuntimeError(f"perturbation: agent {f.agent} is not a candidate of {site!r} at step {t} in the alternative run")
        hit = hit.index_put((at,), torch.tensor(f.up, device=hit.device))
        self.applied = True
        return hit, v

    def _offer(self, site: str, t: int, call: int, index: Tensor, p: Tensor, dp: Tensor, hit: Tensor) -> None:
        """Add this draw's flips to ``W`` and to each reservoir (kept with probability ``w_step / W``)."""
        up = (dp > 0) & ~hit
        down = (dp < 0) & hit
        w = torch.where(up, dp / (1 - p).clamp_min(_TINY), torch.where(down, -dp / p.clamp_min(_TINY), torch.zeros_like(dp)))
        step_w = float(w.sum())
        if not step_w > 0:
            return
        self.weight += step_w
        keep = torch.rand(self.alternatives, generator=self.generator, dtype=torch.float64) < step_w / self.weight
        chosen = keep.nonzero().squeeze(1).tolist()
        w_cpu = w.float().cpu() if chosen else None  # one copy for every reservoir that takes this step
        for k in chosen:
            j = int(torch.multinomial(w_cpu, 1, generator=self.generator))
            self.kept[k] = Flip(site, t, call, int(index[j]), bool(up[j]))


    def tracks(self, site: str, t: int, inputs: tuple[Tensor | None, ...]) -> bool:
        """Whether a site's draws at step ``t`` go through :meth:`draw`: on the primal run where a probability
        input has a non-zero tangent, on an alternative at its flip (elsewhere the compiled kernels may run)."""
        if self.mode == "alternative":
            return self.flip is not None and (self.flip.site, self.flip.step) == (site, int(t))
        for x in inputs:
            tan = fwAD.unpack_dual(x).tangent if isinstance(x, Tensor) else None
            if tan is not None and bool((tan != 0).any()):
                return True
        return False


_ACTIVE: list[Perturbation] = []


def active() -> Perturbation | None:
    """The perturbation pass running now, or None (the ordinary run)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def _running(pert: Perturbation) -> Iterator[Perturbation]:
    _ACTIVE.append(pert)
    try:
        yield pert
    finally:
        _ACTIVE.pop()


def tracks(site: str, t: int, *inputs: Tensor | None) -> bool:
    """Whether the running perturbation pass tracks site ``site``'s draws at step ``t`` (False outside a pass).

    ``inputs``: the tensors the draws' probabilities are a smooth function of. A tracked site must
    draw through :func:`bernoulli` on its torch path; an untracked one may run compiled kernels
    (they reproduce the torch path's draws exactly, so the alternative stays coupled).
    """
    pert = active()
    return pert is not None and pert.tracks(site, t, inputs)


def bernoulli(site: str, t: int, index: Tensor, p: Tensor, u: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(hit, conditional uniform)`` through the running perturbation pass, or None outside one (draw as usual)."""
    pert = active()
    return pert.draw(site, t, index, p, u) if pert is not None else None


@dataclass
class PerturbationEstimate:
    """Outputs of the primal run and their directional derivative (same structure as ``run``'s output)."""

    value: Any
    derivative: Any
    pathwise: Any
    weight: float
    flips: list[Flip | None]
    alternatives: list[Any]


def _map(fn: Callable[..., Tensor], *xs: Any) -> Any:
    if isinstance(xs[0], Mapping):
        return {k: fn(*(x[k] for x in xs)) for k in xs[0]}
    return fn(*xs)


def directional_derivative(run: Callable[[Tensor], Any], theta: Tensor | float, direction: Tensor | float = 1.0, *,
                           alternatives: int = 1, seed: int = 0) -> PerturbationEstimate:
    """``d E[run(theta)] / d theta`` along ``direction``: one forward-mode primal run plus ``alternatives`` flipped runs.

    ``run(theta)`` returns a tensor or a dict of tensors and must be reproducible (fix its own
    seed): the alternatives rerun it with one event flipped. ``seed`` seeds only the choice of
    the flipped events.
    """
    if alternatives < 1:
        raise ConfigError(f"alternatives: expected >= 1, got {alternatives}")
    theta = torch.as_tensor(theta, dtype=torch.float32)
    direction = torch.as_tensor(direction, dtype=theta.dtype)
    if direction.dim() > theta.dim() or any(d not in (1, t) for d, t in zip(direction.shape[::-1], theta.shape[::-1])):
        raise ConfigError(f"direction: expected a scalar or shape {tuple(theta.shape)} (theta's), got {tuple(direction.shape)}")
    direction = direction.expand_as(theta)
    for name, x in (("theta", theta), ("direction", direction)):
        if not bool(torch.isfinite(x).all()):
            raise ConfigError(f"{name}: expected finite values, got {x.tolist()}")
    g = torch.Generator().manual_seed(int(seed))
    primal = Perturbation("primal", alternatives=alternatives, generator=g)
    with torch.no_grad(), fwAD.dual_level(), _running(primal):
        out = run(fwAD.make_dual(theta, direction))
        value = _map(lambda x: fwAD.unpack_dual(x).primal.detach().clone(), out)
        pathwise = _map(lambda x: (fwAD.unpack_dual(x).tangent if fwAD.unpack_dual(x).tangent is not None
                                   else torch.zeros_like(fwAD.unpack_dual(x).primal)).detach().clone().double(), out)
        del out
    alts, diffs = [], []
    for flip in primal.kept:
        if flip is None:
            alts.append(value)
            diffs.append(_map(lambda v: torch.zeros_like(v, dtype=torch.float64), value))
            continue
        alt = Perturbation("alternative", flip=flip, hits=primal.hits)
        with torch.no_grad(), _running(alt):
            f_alt = run(theta)
        if not alt.applied:
            raise RuntimeError(f"perturbation: the alternative run never reached its flip {flip}")
        alts.append(f_alt)
        diffs.append(_map(lambda a, v: a.double() - v.double(), f_alt, value))
    W = primal.weight
    deriv = _map(lambda pw, *ds: pw + W * torch.stack(list(ds)).mean(0), pathwise, *diffs)
    return PerturbationEstimate(value, deriv, pathwise, W, list(primal.kept), alts)


class _WithValue(nn.Module):
    """``params`` with attribute ``name`` read as ``value`` (a dual number): everything else delegates."""

    def __init__(self, params: nn.Module, name: str, value: Tensor) -> None:
        super().__init__()
        self.base = params
        self.__dict__["_override"] = (name, value)

    def __getattr__(self, name: str) -> Any:
        ov = self.__dict__.get("_override")
        if ov is not None and name == ov[0]:
            return ov[1]
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["base"], name)


def _current(params: nn.Module, name: str, owner: str) -> Tensor:
    """The (constrained) parameter ``name`` of ``params``; an error naming it and its user if it does not exist."""
    require = getattr(params, "require", None)
    try:
        if callable(require):
            require(name, owner=owner)  # lpm.Params: its own error, listing the parameters
        return getattr(params, name)
    except AttributeError:
        raise ConfigError(f"{owner}: param: {name!r} is not a parameter of {type(params).__name__}") from None


def with_value(params: nn.Module, name: str, value: Tensor) -> nn.Module:
    """A view of ``params`` whose (constrained) parameter ``name`` reads ``value``."""
    cur = _current(params, name, "with_value")
    v = fwAD.unpack_dual(value).primal if isinstance(value, Tensor) else value
    if not isinstance(v, Tensor) or v.shape != torch.as_tensor(cur).shape or not bool(torch.isfinite(v).all()):
        got = f"shape {tuple(v.shape)}, finite {bool(torch.isfinite(v).all())}" if isinstance(v, Tensor) else repr(v)
        raise ConfigError(f"with_value: value of {name!r}: expected a finite tensor of shape "
                          f"{tuple(torch.as_tensor(cur).shape)}, got {got}")
    return _WithValue(params, name, value)


def simulate_derivative(model: Any, params: nn.Module, system: Any, state: Any, steps: int, *, param: str, seed: int = 0,
                        alternatives: int = 1, direction: float = 1.0) -> PerturbationEstimate:
    """Observables of ``model.simulate`` and their derivative with respect to the (constrained) parameter ``param``.

    ``derivative[name]`` is ``d E[observable] / d param`` by smoothed perturbation (see the module
    docstring); ``seed`` seeds the simulation (the flip choice uses ``seed`` too, on its own generator).
    """
    if steps < 1:
        raise ConfigError(f"steps: expected >= 1, got {steps}")
    theta = _current(params, param, "simulate_derivative").detach()

    def run(value: Tensor) -> dict[str, Tensor]:
        res = model.simulate(with_value(params, param, value), system, state, steps, seed=seed, progress=False)
        return dict(res.observables.items())

    return directional_derivative(run, theta, direction, alternatives=alternatives, seed=seed)
