"""One calibration loop for direct parameters and covariate networks: an ordinary torch loop.

:func:`fit` minimises ``E_seeds[ loss(obs_model(rollout(params)), data) ]`` (a
:class:`Problem`) over every trainable tensor of ``params`` (anything :class:`~lpm.params.ParamsLike`:
an ``lpm.Params``, or a :class:`~calibration.covariate_net.CovariateNetParams` whose network
weights are trained with the base parameters) with the optimizer and optional learning-rate
scheduler the caller constructs::

    prob = Problem(model, system, state, None, obs_model, data, Loss("negbin"), seeds=(0, 1))
    opt = torch.optim.Adam(param_groups(params, lr=0.02, scale={"nets.": 0.2}))
    res = fit(prob, params, opt, 40, scheduler=cosine_decay(opt, 40, final=0.1),
              hooks=[Checkpoint("run.pt"), KeepBest(), Progress()])

The expectation is estimated by ``R`` replicates whose seeds stay the same every iteration
(common random numbers), so successive iterates see the same noise and the objective is a
fixed function of the parameters. Gradients come from the model's event estimators (see
:func:`calibration.gradcheck.gradient_check` for what they estimate and their bias).

Everything else is a hook (:class:`FitHook`), called at the start, after each objective
evaluation, before and right after each optimizer step, after each recorded iteration, and
at the end: :class:`Progress` (a
progress bar), :class:`Checkpoint` (resumable runs), :class:`KeepBest` (restore the best
evaluated iterate), :class:`TrustRegion` (bound an L-BFGS step), :class:`OnStep` (any callable).

A run is resumable with :class:`Checkpoint`: the parameters, optimizer and scheduler
states, torch RNG state, iteration and traces are saved every ``every`` iterations
(``torch.save``, atomic rename), and a later call with the same path continues from there to
the identical result as an uninterrupted run. Checkpoints are read with
``torch.load(weights_only=True)`` (tensors and plain containers, never code) and carry the
caller's ``fingerprint``: a file that is not a checkpoint, or one of a different problem, is
refused with a message naming the file or the difference.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from lpm.errors import CheckpointError, ConfigError
from lpm.model import Model
from lpm.params import ParamsLike, check_params
from lpm.state import State, System
from calibration.losses import Loss
from calibration.observation import ObservationModel, Observed
from calibration.rollout import rollout
from calibration.validation import require_observed

__all__ = ["Problem", "FitResult", "FitRun", "FitHook", "Progress", "Checkpoint", "KeepBest", "TrustRegion", "OnStep",
           "fit", "param_groups", "cosine_decay", "nelder_mead", "random_search", "raw_vector", "set_raw_vector"]


@dataclass
class Problem:
    """What a calibration simulates and compares: model, system, initial state, steps, observation model, data, loss.

    ``steps=None``: one simulated step per data day (``data.agg``'s columns, else
    ``len(data.dates)``). ``average="prediction"`` (default): loss of the replicate-mean
    prediction, an estimate of the expected observable that is smoother at small counts;
    ``"loss"``: mean of the per-replicate losses (the expected loss). ``grad_from``: truncated
    gradient (see :func:`calibration.rollout.rollout`).
    """

    model: Model
    system: System
    state: State
    steps: int | None
    obs_model: ObservationModel
    data: Observed
    loss: Loss
    seeds: Sequence[int] = (0,)
    chunk: int | None = None
    average: str = "prediction"
    grad_from: int = 0

    def __post_init__(self) -> None:
        if self.average not in ("prediction", "loss"):
            raise ConfigError(f"average: expected 'prediction' or 'loss', got {self.average!r}")
        if self.steps is None:
            self.steps = self.data.agg.shape[1] if self.data.agg is not None else len(self.data.dates)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ConfigError("seeds: expected at least one replicate seed, got none")

    def predict(self, params: ParamsLike, seed: int, grad: bool = True) -> dict[str, Tensor]:
        """Expected data on the data grid from one simulation."""
        sim, _ = rollout(self.model, params, self.system, self.state, self.steps, seed=int(seed), chunk=self.chunk,
                         grad=grad, grad_from=self.grad_from)
        return self.obs_model.predict(params, sim, self.data)

    def objective(self, params: ParamsLike, grad: bool = True) -> Tensor:
        """Loss over the replicate seeds (one simulation per seed), averaged as ``average`` says."""
        with torch.enable_grad() if grad else torch.no_grad():
            preds = [self.predict(params, s, grad) for s in self.seeds]
            if self.average == "loss":
                return sum(self.loss(p, self.data, params) for p in preds) / len(preds)
            mean = {k: sum(p[k] for p in preds) / len(preds) for k in preds[0]}
            return self.loss(mean, self.data, params)


@dataclass
class FitResult:
    """Trace of a calibration: loss per iteration, simulations used, parameter values, wall time."""

    params: ParamsLike
    losses: list[float] = field(default_factory=list)
    sims: list[int] = field(default_factory=list)
    values: list[dict[str, list]] = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0
    best_loss: float = math.inf
    best_state: dict[str, Any] | None = None

    @property
    def final_loss(self) -> float:
        """Last recorded loss."""
        return self.losses[-1] if self.losses else math.nan


@dataclass
class FitRun:
    """What hooks see: the problem, parameters, optimizer, scheduler, iterations asked for, and the trace so far."""

    problem: Problem
    params: ParamsLike
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: int
    result: FitResult


class FitHook:
    """A piece of a fit's bookkeeping; override the events it needs (each default does nothing)."""

    def start(self, run: FitRun) -> None:
        """Before the first iteration (e.g. restore a checkpoint)."""

    def evaluated(self, run: FitRun, loss: float) -> None:
        """After each objective evaluation and backward pass, before the optimizer moves the parameters."""

    def before_step(self, run: FitRun) -> None:
        """Before each optimizer step."""

    def stepped(self, run: FitRun) -> None:
        """Right after each optimizer step, before the parameters are checked and recorded (e.g. to project them)."""

    def after_step(self, run: FitRun) -> None:
        """After each iteration is recorded in ``run.result``."""

    def end(self, run: FitRun) -> None:
        """After the last iteration."""


class OnStep(FitHook):
    """Call ``fn(iteration, loss, params)`` after every iteration."""

    def __init__(self, fn: Callable[[int, float, ParamsLike], None]) -> None:
        self.fn = fn

    def after_step(self, run: FitRun) -> None:
        """Call the function with the iteration just done."""
        self.fn(run.result.iterations, run.result.losses[-1], run.params)


class Progress(FitHook):
    """A tqdm progress bar over the iterations, showing the last loss."""

    def __init__(self, desc: str = "calibrate") -> None:
        self.desc = desc
        self.bar: Any = None

    def start(self, run: FitRun) -> None:
        """Open the bar at the iteration the run starts from (after a resume: the checkpoint's)."""
        from tqdm.auto import tqdm

        if run.result.iterations < run.steps:
            self.bar = tqdm(total=run.steps, initial=run.result.iterations, desc=self.desc, unit="it", leave=False)

    def after_step(self, run: FitRun) -> None:
        """Advance the bar."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{run.result.losses[-1]:.4g}")
            self.bar.update(1)

    def end(self, run: FitRun) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class KeepBest(FitHook):
    """Remember the parameters of the lowest evaluated loss and restore them at the end.

    Under common random numbers the objective is a fixed function of the parameters, so
    this is a legitimate choice, not a noisy one. The best loss and state are kept in the
    result (and so in a checkpoint).
    """

    def evaluated(self, run: FitRun, loss: float) -> None:
        """Snapshot the parameters just evaluated if their loss is the lowest so far."""
        if loss < run.result.best_loss:
            run.result.best_loss = loss
            run.result.best_state = {k: v.detach().clone() for k, v in run.params.state_dict().items()}

    def end(self, run: FitRun) -> None:
        """Load the best parameters."""
        if run.result.best_state is not None:
            run.params.load_state_dict(run.result.best_state)


class TrustRegion(FitHook):
    """Pull an optimizer step longer than ``max_step`` (raw, unconstrained units) back to that radius.

    With a noisy (sampled) objective the curvature pairs of L-BFGS can be wrong and one step
    can throw a rate to the edge of its domain, where its gradient vanishes for good; a
    clipped step also invalidates the stored curvature, so the optimizer's state is reset.
    """

    def __init__(self, max_step: float = 1.0) -> None:
        if not max_step > 0:
            raise ConfigError(f"max_step: expected > 0, got {max_step!r}")
        self.max_step = float(max_step)
        self.before: list[Tensor] = []

    def _trainable(self, run: FitRun) -> list[Tensor]:
        return [p for p in run.params.parameters() if p.requires_grad]

    def before_step(self, run: FitRun) -> None:
        """Remember where the step starts."""
        self.before = [p.detach().clone() for p in self._trainable(run)]

    def stepped(self, run: FitRun) -> None:
        """Clip the step just taken to the radius."""
        trainable = self._trainable(run)
        with torch.no_grad():
            deltas = [p - b for p, b in zip(trainable, self.before)]
            norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas)))
            if norm > self.max_step:
                for p, b, d in zip(trainable, self.before, deltas):
                    p.copy_(b + d * (self.max_step / norm))
                run.optimizer.state.clear()


class Checkpoint(FitHook):
    """Save the run to ``path`` every ``every`` iterations (and at the last); resume from it if it exists.

    ``fingerprint``: a JSON-ready record of what defines the problem (scale, dates, window,
    ...), saved in the file; resuming with a different one is an error naming the
    difference. Put it first among the hooks, so the others start from the restored run.
    """

    def __init__(self, path: str | os.PathLike, every: int = 1, fingerprint: Mapping[str, Any] | None = None) -> None:
        if int(every) < 1:
            raise ConfigError(f"every: expected >= 1 iterations between checkpoints, got {every!r}")
        self.path = Path(path)
        self.every = int(every)
        self.fingerprint = None if fingerprint is None else dict(fingerprint)

    def _fp(self) -> str | None:
        return None if self.fingerprint is None else json.dumps(self.fingerprint, sort_keys=True, default=str)

    def start(self, run: FitRun) -> None:
        """Restore parameters, optimizer, scheduler, RNG and traces from the file, if there is one."""
        if not self.path.exists():
            return
        path, res = self.path, run.result
        ck = _load(path)
        saved_fp = ck.get("fingerprint")
        if self.fingerprint is not None and saved_fp != self._fp():
            diff = _fp_diff(json.loads(saved_fp) if isinstance(saved_fp, str) else {}, self.fingerprint)
            raise CheckpointError(f"checkpoint {path}: written by a different calibration; cannot resume: "
                                  f"{'; '.join(diff)} (use another --out, or drop --resume)")
        if list(ck["seeds"]) != list(run.problem.seeds):
            raise CheckpointError(f"checkpoint {path}: saved with seeds {ck['seeds']}, resumed with "
                                  f"{list(run.problem.seeds)}")
        run.params.load_state_dict(ck["params"])
        check_params(run.params, f"restored from checkpoint {path}")
        run.optimizer.load_state_dict(ck["optimizer"])
        if run.scheduler is not None and ck.get("scheduler") is not None:
            run.scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        res.losses, res.sims, res.values = list(ck["losses"]), list(ck["sims"]), list(ck["values"])
        res.iterations, res.seconds = int(ck["iteration"]), float(ck["seconds"])
        res.best_loss, res.best_state = float(ck.get("best_loss", math.inf)), ck.get("best_state")

    def after_step(self, run: FitRun) -> None:
        """Save every ``every`` iterations and at the last."""
        res = run.result
        if res.iterations % self.every == 0 or res.iterations == run.steps:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            torch.save({"params": run.params.state_dict(), "optimizer": run.optimizer.state_dict(),
                        "scheduler": None if run.scheduler is None else run.scheduler.state_dict(),
                        "iteration": res.iterations, "losses": res.losses, "sims": res.sims, "values": res.values,
                        "seconds": res.seconds, "torch_rng": torch.get_rng_state(), "seeds": list(run.problem.seeds),
                        "best_loss": res.best_loss, "best_state": res.best_state, "fingerprint": self._fp()}, tmp)
            os.replace(tmp, self.path)


def _snapshot(params: ParamsLike) -> dict[str, list]:
    return {n: getattr(params, n).detach().cpu().tolist() for n in params.fitted()}


def _load(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain containers only, never code."""
    try:
        ck = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle safely means: refuse the file
        raise CheckpointError(f"checkpoint {path}: refused: not a calibration checkpoint that loads as data only "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); delete it to start "
                              f"afresh") from None
    if not isinstance(ck, dict) or not {"params", "optimizer", "seeds", "iteration"} <= set(ck):
        raise CheckpointError(f"checkpoint {path}: not a calibration checkpoint (keys "
                              f"{sorted(ck) if isinstance(ck, dict) else type(ck).__name__})")
    return ck


def _fp_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: saved {saved.get(k)!r}, now {json.loads(json.dumps(now.get(k), default=str))!r}" for k in keys
            if saved.get(k) != json.loads(json.dumps(now.get(k), default=str))] or ["no fingerprint in the file"]


def param_groups(params: ParamsLike, lr: float, scale: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups: trainable tensors at ``lr`` times the factor of their name's first matching prefix.

    E.g. ``scale={"nets.": 0.2}`` for a network whose many weights all move one output.
    """
    groups: dict[float, list[Tensor]] = {}
    for n, p in params.named_parameters():
        if p.requires_grad:
            f = next((v for k, v in (scale or {}).items() if n.startswith(k)), 1.0)
            groups.setdefault(float(f), []).append(p)
    return [{"params": ps, "lr": lr * f} for f, ps in groups.items()]


def cosine_decay(optimizer: torch.optim.Optimizer, steps: int, final: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of every group's learning rate to ``final`` times its initial value over ``steps`` iterations."""
    if steps < 1 or not 0.0 <= final <= 1.0:
        raise ConfigError(f"cosine_decay: expected steps >= 1 and final in [0, 1], got {steps!r}, {final!r}")

    def factor(i: int) -> float:
        return final + 0.5 * (1.0 - final) * (1 + math.cos(math.pi * min(1.0, i / max(1, steps - 1))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(problem: Problem, params: ParamsLike, optimizer: torch.optim.Optimizer, steps: int, *,
        scheduler: Any = None, hooks: Sequence[FitHook] = (), max_grad_norm: float | None = 10.0) -> FitResult:
    """Run ``optimizer`` on ``problem``'s objective until ``steps`` iterations are done; returns the trace.

    The parameters are updated in place. Each iteration is ``optimizer.step(closure)`` (one
    evaluation for Adam; L-BFGS may evaluate several times, and every evaluation is counted
    in ``sims``), gradients clipped to ``max_grad_norm``, then ``scheduler.step()``. The
    parameters are checked finite and in their domain after every step (a NaN stops the fit
    naming the parameter), and so is the loss.
    """
    require_observed(problem.data, 1, what="fit: data")
    trainable = [p for p in params.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("fit: params has no trainable tensors")
    res = FitResult(params)
    run = FitRun(problem, params, optimizer, scheduler, int(steps), res)
    for h in hooks:
        h.start(run)
    sims = res.sims[-1] if res.sims else 0
    t0 = time.perf_counter() - res.seconds
    while res.iterations < steps:
        evals, last = 0, math.nan

        def closure() -> Tensor:
            nonlocal evals, last
            optimizer.zero_grad(set_to_none=True)
            L = problem.objective(params, grad=True)
            L.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            evals += 1
            last = float(L.detach())
            for h in hooks:
                h.evaluated(run, last)
            return L

        for h in hooks:
            h.before_step(run)
        optimizer.step(closure)
        for h in hooks:
            h.stepped(run)
        if scheduler is not None:
            scheduler.step()
        check_params(params, f"after fit iteration {res.iterations + 1}")
        sims += evals * len(problem.seeds)
        if not math.isfinite(last):
            raise FloatingPointError(f"fit: loss became {last} at iteration {res.iterations}")
        res.iterations += 1
        res.losses.append(last)
        res.sims.append(sims)
        res.values.append(_snapshot(params))
        res.seconds = time.perf_counter() - t0
        for h in hooks:
            h.after_step(run)
    for h in hooks:
        h.end(run)
    return res


def raw_vector(params: ParamsLike) -> Tensor:
    """All trainable tensors of ``params`` flattened into one unconstrained vector (detached)."""
    return torch.cat([p.detach().reshape(-1) for p in params.parameters() if p.requires_grad])


def set_raw_vector(params: ParamsLike, x: Tensor) -> None:
    """Write an unconstrained vector back into ``params``' trainable tensors (inverse of :func:`raw_vector`)."""
    i = 0
    with torch.no_grad():
        for p in params.parameters():
            if p.requires_grad:
                n = p.numel()
                p.copy_(x[i:i + n].view_as(p).to(p.dtype))
                i += n


def nelder_mead(prob: Problem, params: ParamsLike, budget: int, *, step: float = 0.5,
                progress: bool = False) -> FitResult:
    """Gradient-free baseline: Nelder–Mead on the unconstrained parameter vector.

    ``budget`` counts simulations (each objective evaluation costs ``len(prob.seeds)``),
    so the comparison with :func:`fit` is at equal simulation cost. Records the best loss
    so far after every evaluation. Standard coefficients (reflection 1, expansion 2,
    contraction 0.5, shrink 0.5).
    """
    t0 = time.perf_counter()
    res = FitResult(params)
    R = len(prob.seeds)
    x0 = raw_vector(params).double()
    n = x0.numel()
    best = [math.inf, x0.clone()]

    def f(x: Tensor) -> float:
        set_raw_vector(params, x)
        with torch.no_grad():
            v = float(prob.objective(params, grad=False))
        if not math.isfinite(v):
            v = math.inf
        if v < best[0]:
            best[0], best[1] = v, x.clone()
        sims = (res.sims[-1] if res.sims else 0) + R
        res.sims.append(sims)
        res.losses.append(best[0])
        return v

    simplex = [x0] + [x0 + step * torch.eye(n, dtype=x0.dtype, device=x0.device)[i] for i in range(n)]
    fx = []
    for x in simplex:
        if (res.sims[-1] if res.sims else 0) + R > budget:
            break
        fx.append(f(x))
    simplex = simplex[:len(fx)]

    def left() -> bool:
        return (res.sims[-1] if res.sims else 0) + R <= budget

    while len(fx) == n + 1 and left():
        order = sorted(range(n + 1), key=lambda i: fx[i])
        simplex = [simplex[i] for i in order]
        fx = [fx[i] for i in order]
        c = torch.stack(simplex[:-1]).mean(0)
        xr = c + (c - simplex[-1])
        fr = f(xr)
        if fr < fx[0]:
            if not left():
                simplex[-1], fx[-1] = xr, fr
                break
            xe = c + 2 * (c - simplex[-1])
            fe = f(xe)
            simplex[-1], fx[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < fx[-2]:
            simplex[-1], fx[-1] = xr, fr
        else:
            if not left():
                break
            xc = c + 0.5 * (simplex[-1] - c)
            fc = f(xc)
            if fc < fx[-1]:
                simplex[-1], fx[-1] = xc, fc
            else:
                for i in range(1, n + 1):
                    if not left():
                        break
                    simplex[i] = simplex[0] + 0.5 * (simplex[i] - simplex[0])
                    fx[i] = f(simplex[i])
        res.iterations += 1
    set_raw_vector(params, best[1])
    res.values.append(_snapshot(params))
    res.seconds = time.perf_counter() - t0
    return res


def random_search(prob: Problem, params: ParamsLike, budget: int, *, scale: float = 1.0, seed: int = 0) -> FitResult:
    """Gradient-free baseline: Gaussian random search around the best point (``budget`` simulations)."""
    t0 = time.perf_counter()
    res = FitResult(params)
    R = len(prob.seeds)
    g = torch.Generator().manual_seed(seed)
    x = raw_vector(params).double()
    best_x, best = x.clone(), math.inf
    used = 0
    while used + R <= budget:
        cand = best_x if used == 0 else best_x + scale * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        set_raw_vector(params, cand)
        with torch.no_grad():
            v = float(prob.objective(params, grad=False))
        used += R
        if math.isfinite(v) and v < best:
            best, best_x = v, cand.clone()
        res.sims.append(used)
        res.losses.append(best)
        res.iterations += 1
    set_raw_vector(params, best_x)
    res.values.append(_snapshot(params))
    res.seconds = time.perf_counter() - t0
    return res
