"""One calibration loop for direct parameters and calibration networks.

:func:`fit` minimises ``E_seeds[ loss(obs_model(rollout(params)), data) ]`` over every
trainable tensor of ``params`` (an ``lpm.Params``, or a :class:`NetworkParams` whose
network weights are trained with the base parameters). The expectation is estimated by
``R`` replicates whose seeds stay the same every iteration (common random numbers), so
successive iterates see the same noise and the objective is a fixed function of the
parameters. Gradients come from the model's event estimators (see
:func:`calibration.gradcheck.gradient_check` for what they estimate and their bias).

A run is resumable: with ``checkpoint=path`` the parameters, optimizer state, RNG states
(torch global and the replicate seeds), iteration and traces are saved every
``checkpoint_every`` iterations (``torch.save``, atomic rename), and a later call with
the same path continues from there to the identical result as an uninterrupted run.
Checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain containers,
never code) and carry the caller's ``fingerprint``: a file that is not a checkpoint, or one
of a different problem, is refused with a message naming the file or the difference.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from lpm.errors import CheckpointError
from lpm.model import Model
from lpm.params import check_params
from lpm.state import State, StateError, System
from calibration.losses import Loss
from calibration.observation import ObservationModel, Observed
from calibration.rollout import rollout
from calibration.validation import require_observed

__all__ = ["Problem", "FitResult", "fit", "nelder_mead", "random_search", "raw_vector", "set_raw_vector"]


@dataclass
class Problem:
    """What a calibration simulates and compares: model, system, initial state, steps, observation model, data, loss."""

    model: Model
    system: System
    state: State
    steps: int
    obs_model: ObservationModel
    data: Observed
    loss: Loss
    seeds: Sequence[int] = (0,)
    chunk: int | None = None
    average: str = "prediction"
    grad_from: int = 0

    def predict(self, params: Any, seed: int, grad: bool = True) -> dict[str, Tensor]:
        """Expected data on the data grid from one simulation."""
        sim, _ = rollout(self.model, params, self.system, self.state, self.steps, seed=int(seed), chunk=self.chunk, grad=grad,
                         grad_from=self.grad_from)
        return self.obs_model.predict(params, sim, self.data)

    def objective(self, params: Any, grad: bool = True) -> Tensor:
        """Loss over the replicate seeds (one simulation per seed).

        ``average="prediction"`` (default): loss of the replicate-mean prediction, an
        estimate of the expected observable that is smoother at small counts;
        ``"loss"``: mean of the per-replicate losses (the expected loss).
        """
        if self.average not in ("prediction", "loss"):
            raise StateError(f"average: expected 'prediction' or 'loss', got {self.average!r}")
        with torch.enable_grad() if grad else torch.no_grad():
            preds = [self.predict(params, s, grad) for s in self.seeds]
            if self.average == "loss":
                return sum(self.loss(p, self.data, params) for p in preds) / len(preds)
            mean = {k: sum(p[k] for p in preds) / len(preds) for k in preds[0]}
            return self.loss(mean, self.data, params)


@dataclass
class FitResult:
    """Trace of a calibration: loss per iteration, simulations used, parameter values, wall time."""

    params: Any
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


def _snapshot(params: Any) -> dict[str, list]:
    out = {}
    for n in params.fitted():
        v = getattr(params, n).detach().cpu()
        out[n] = v.tolist()
    return out


def _save(path: Path, params: nn.Module, opt: torch.optim.Optimizer, res: FitResult, seeds: Sequence[int],
          fingerprint: dict[str, Any] | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"params": params.state_dict(), "optimizer": opt.state_dict(), "iteration": res.iterations,
                "losses": res.losses, "sims": res.sims, "values": res.values, "seconds": res.seconds,
                "torch_rng": torch.get_rng_state(), "seeds": list(map(int, seeds)),
                "best_loss": res.best_loss, "best_state": res.best_state,
                "fingerprint": None if fingerprint is None else json.dumps(fingerprint, sort_keys=True, default=str)},
               tmp)
    os.replace(tmp, path)


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


def _limit_step(trainable: Sequence[Tensor], before: Sequence[Tensor], max_step: float | None,
                opt: torch.optim.Optimizer) -> None:
    """Trust region for L-BFGS: pull a step longer than ``max_step`` (raw units) back to that radius.

    With a noisy (sampled) objective the curvature pairs can be wrong and one L-BFGS step
    can throw a rate to the edge of its domain, where its gradient vanishes for good; a
    clipped step also invalidates the stored curvature, so the history is reset.
    """
    if max_step is None:
        return
    with torch.no_grad():
        deltas = [p - b for p, b in zip(trainable, before)]
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas)))
        if norm > max_step:
            for p, b, d in zip(trainable, before, deltas):
                p.copy_(b + d * (max_step / norm))
            opt.state.clear()


def fit(model: Model, params: nn.Module, data: Observed, loss: Loss, steps: int, *, system: System, state: State,
        obs_model: ObservationModel, sim_steps: int | None = None, seeds: Sequence[int] = (0,),
        optimizer: str = "adam", lr: float = 0.05, chunk: int | None = None,
        checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1, progress: bool = True,
        callback: Callable[[int, float, Any], None] | None = None, max_grad_norm: float | None = 10.0,
        average: str = "prediction", lr_min: float | None = None, grad_from: int = 0,
        keep_best: bool = False, lr_steps: int | None = None, lr_scale: dict[str, float] | None = None,
        max_step: float | None = 1.0, fingerprint: dict[str, Any] | None = None) -> FitResult:
    """Fit ``params`` for ``steps`` optimizer iterations; returns the trace (params are updated in place).

    ``sim_steps``: simulated steps per rollout (default: one per data day, ``data.agg``'s
    columns or ``len(data.dates)``). ``optimizer``: ``"adam"`` or ``"lbfgs"`` (one
    L-BFGS iteration may evaluate the objective several times; every evaluation is
    counted in ``sims``). ``lr_min``: with Adam, cosine decay of the learning rate from
    ``lr`` to ``lr_min`` over ``lr_steps`` iterations (default ``steps``; a function of the
    iteration number, so a resumed run with the same ``lr_steps`` follows the same
    schedule). ``grad_from``: truncated gradient (see :func:`calibration.rollout.rollout`).
    ``keep_best`` (Adam): at the end, restore the
    parameters with the lowest evaluated loss (the objective is a fixed function under
    common random numbers, so this is a legitimate choice, not a noisy one). ``lr_scale``
    (Adam): learning-rate factor per parameter-name prefix, e.g. ``{"nets.": 0.2}`` for a
    network whose many weights all move one output. ``fingerprint``: a JSON-ready record of
    what defines the problem (scale, dates, window, ...), saved in the checkpoint; resuming
    with a different one is an error naming the difference. Parameters are checked finite
    and in their domain after every step (a NaN stops the fit naming the parameter).
    """
    require_observed(data, 1, what="fit: data")
    T = sim_steps or (data.agg.shape[1] if data.agg is not None else len(data.dates))
    prob = Problem(model, system, state, T, obs_model, data, loss, tuple(seeds), chunk, average, grad_from)
    trainable = [p for p in params.parameters() if p.requires_grad]
    if not trainable:
        raise StateError("fit: params has no trainable tensors")
    if optimizer == "adam":
        groups: dict[float, list[Tensor]] = {}
        for n, p in params.named_parameters():
            if p.requires_grad:
                f = next((v for k, v in (lr_scale or {}).items() if n.startswith(k)), 1.0)
                groups.setdefault(float(f), []).append(p)
        opt: torch.optim.Optimizer = torch.optim.Adam(
            [{"params": ps, "lr": lr * f, "scale": f} for f, ps in groups.items()], lr=lr)
    elif optimizer == "lbfgs":
        opt = torch.optim.LBFGS(trainable, lr=lr, max_iter=4, history_size=10)
    else:
        raise StateError(f"optimizer: expected 'adam' or 'lbfgs', got {optimizer!r}")
    res = FitResult(params)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        ck = _load(path)
        saved_fp = ck.get("fingerprint")
        if fingerprint is not None and saved_fp != json.dumps(fingerprint, sort_keys=True, default=str):
            diff = _fp_diff(json.loads(saved_fp) if isinstance(saved_fp, str) else {}, fingerprint)
            raise CheckpointError(f"checkpoint {path}: written by a different calibration; cannot resume: "
                                  f"{'; '.join(diff)} (use another --out, or drop --resume)")
        if list(ck["seeds"]) != list(map(int, seeds)):
            raise StateError(f"checkpoint {path}: saved with seeds {ck['seeds']}, resumed with {list(seeds)}")
        params.load_state_dict(ck["params"])
        check_params(params, f"restored from checkpoint {path}")
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        res.losses, res.sims, res.values = list(ck["losses"]), list(ck["sims"]), list(ck["values"])
        res.iterations, res.seconds = int(ck["iteration"]), float(ck["seconds"])
        res.best_loss, res.best_state = float(ck.get("best_loss", math.inf)), ck.get("best_state")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=min(res.iterations, steps), desc="calibrate", unit="it", leave=False)
    sims = res.sims[-1] if res.sims else 0
    if res.iterations >= steps and bar is not None:
        bar.close()
        bar = None
    t0 = time.perf_counter() - res.seconds
    while res.iterations < steps:
        evals = [0]

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            L = prob.objective(params, grad=True)
            L.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            evals[0] += 1
            closure.last = float(L.detach())  # type: ignore[attr-defined]
            return L

        if optimizer == "adam" and lr_min is not None:
            frac = res.iterations / max(1, (lr_steps or steps) - 1)
            for group in opt.param_groups:
                group["lr"] = group["scale"] * (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(1.0, frac))))
        if optimizer == "lbfgs":
            before = [p.detach().clone() for p in trainable]
            opt.step(closure)
            _limit_step(trainable, before, max_step, opt)
        else:
            closure()
            if keep_best and closure.last < res.best_loss:  # type: ignore[attr-defined]
                res.best_loss = closure.last  # type: ignore[attr-defined]
                res.best_state = {k: v.detach().clone() for k, v in params.state_dict().items()}
            opt.step()
        check_params(params, f"after fit iteration {res.iterations + 1}")
        sims += evals[0] * len(prob.seeds)
        L = closure.last  # type: ignore[attr-defined]
        if not math.isfinite(L):
            raise FloatingPointError(f"fit: loss became {L} at iteration {res.iterations}")
        res.iterations += 1
        res.losses.append(L)
        res.sims.append(sims)
        res.values.append(_snapshot(params))
        res.seconds = time.perf_counter() - t0
        if bar is not None:
            bar.set_postfix(loss=f"{L:.4g}")
            bar.update(1)
        if callback is not None:
            callback(res.iterations, L, params)
        if path is not None and (res.iterations % checkpoint_every == 0 or res.iterations == steps):
            _save(path, params, opt, res, seeds, fingerprint)
    if bar is not None:
        bar.close()
    if keep_best and res.best_state is not None:
        params.load_state_dict(res.best_state)
    return res


def raw_vector(params: nn.Module) -> Tensor:
    """All trainable tensors of ``params`` flattened into one unconstrained vector (detached)."""
    return torch.cat([p.detach().reshape(-1) for p in params.parameters() if p.requires_grad])


def set_raw_vector(params: nn.Module, x: Tensor) -> None:
    """Write an unconstrained vector back into ``params``' trainable tensors (inverse of :func:`raw_vector`)."""
    i = 0
    with torch.no_grad():
        for p in params.parameters():
            if p.requires_grad:
                n = p.numel()
                p.copy_(x[i:i + n].view_as(p).to(p.dtype))
                i += n


def nelder_mead(prob: Problem, params: nn.Module, budget: int, *, step: float = 0.5,
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


def random_search(prob: Problem, params: nn.Module, budget: int, *, scale: float = 1.0, seed: int = 0) -> FitResult:
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
