"""Calibration networks: covariates -> time-varying parameters read by the model.

A small MLP maps per-day covariates ``[T, F]`` (mobility, day of week, policy steps, a
smooth time basis) to a positive multiplier ``[T]`` (or ``[T, K]``), e.g. a transmission
multiplier. :class:`CovariateNetParams` wraps an ``lpm.Params`` and exposes the network output
as one more named parameter, so substeps read it like any other parameter; the substep
:class:`ParamSchedule` applies it as ``target = base * params.<name>[t]`` each step (the
``Modulate`` pattern with a learned schedule). Both the base parameters and the network
weights are fitted by the same loop (:func:`calibration.fit`).

With ``weekly=True`` the multiplier is constant within each 7-day block (the mean of the
network's daily output over the block), a weekly transmission rate. Blocks are aligned
to the *end* of the covariate window and the last block spans ``last_block`` days: the
most recent days' transmission is barely visible in data yet (incubation and reporting
delays), so it is pooled with the week before, and this better-identified value is the
one held for a forecast (:class:`ParamSchedule` holds the last value after the window).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from lpm.errors import DataError
from lpm.params import Params, ParamsLike
from lpm.state import State, System, lookup
from lpm.substep import Substep

__all__ = ["CovariateNet", "CovariateNetParams", "ParamSchedule", "covariates"]


def covariates(dates: Sequence, *, mobility: pd.Series | None = None, policy_dates: Sequence[Any] = (),
               n_basis: int = 4) -> Tensor:
    """Covariates ``[T, F]`` for ``dates``: standardized mobility (if given, forward-filled),
    day-of-week sin/cos, one step per policy date, and ``n_basis`` smooth time bases."""
    d = pd.DatetimeIndex(pd.to_datetime(list(dates))).normalize()
    cols = []
    if mobility is not None:
        m = mobility.copy()
        m.index = pd.DatetimeIndex(pd.to_datetime(m.index)).normalize()
        m = m.reindex(d).ffill().bfill()
        if m.isna().all():
            raise DataError("covariates: mobility series has no values in the simulated window")
        v = m.to_numpy(float)
        cols.append((v - v.mean()) / (v.std() + 1e-9))
    dow = d.day_of_week.to_numpy()
    cols += [np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7)]
    for p in policy_dates:
        cols.append((d >= pd.Timestamp(p)).astype(float))
    x = np.linspace(0, 1, len(d))
    for k in range(1, n_basis + 1):
        cols.append(np.cos(np.pi * k * x))
    return torch.as_tensor(np.stack(cols, 1), dtype=torch.float32)


class CovariateNet(nn.Module):
    """MLP ``[T, F] -> [T, K]`` positive multipliers in ``(0, max_mult)``, starting at 1."""

    def __init__(self, n_features: int, hidden: int = 16, outputs: int = 1, max_mult: float = 3.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, outputs))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)
        self.max_mult = float(max_mult)
        self.outputs = outputs
        # sigmoid(b0) * max_mult = 1 at initialisation
        self._offset = float(np.log(1.0 / (max_mult - 1.0)))

    def forward(self, x: Tensor) -> Tensor:
        """Multipliers ``[T]`` (one output) or ``[T, K]``."""
        y = self.max_mult * torch.sigmoid(self.body(x) + self._offset)
        return y.squeeze(-1) if self.outputs == 1 else y


class CovariateNetParams(nn.Module):
    """``lpm.Params`` plus named parameters computed by networks from fixed covariates.

    Reads of a network-backed name return ``net(covariates)`` (``[T]`` or ``[T, K]``);
    every other name is forwarded to ``base``. ``parameters()`` holds both.
    """

    def __init__(self, base: Params, nets: dict[str, tuple[nn.Module, Tensor]], weekly: bool = False,
                 last_block: int = 7) -> None:
        super().__init__()
        self.base = base
        self.nets = nn.ModuleDict({k: v[0] for k, v in nets.items()})
        for k, (_, x) in nets.items():
            self.register_buffer("cov_" + k, x.float())
        self.weekly = weekly
        self.last_block = int(last_block)

    def _net_value(self, name: str) -> Tensor:
        y = self.nets[name](self._buffers["cov_" + name])
        if self.weekly:
            T = y.shape[0]
            back = (T - 1 - torch.arange(T, device=y.device) - max(0, self.last_block - 7)).clamp_min(0)
            rev = back // 7  # 0 = the last block, counted backwards from the end
            W = int(rev[0]) + 1
            idx = W - 1 - rev
            sums = y.new_zeros((W, *y.shape[1:])).index_add(0, idx, y)
            cnt = torch.bincount(idx, minlength=W).to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
            y = (sums / cnt)[idx]
        return y

    def __getattr__(self, name: str) -> Any:
        mods = self.__dict__.get("_modules", {})
        if "nets" in mods and name in mods["nets"]:
            return self._net_value(name)
        if name in ("base", "nets") or name.startswith("cov_") or name in ("weekly", "last_block"):
            return super().__getattr__(name)
        if "base" in mods:
            return getattr(mods["base"], name)
        return super().__getattr__(name)

    def names(self) -> tuple[str, ...]:
        """All readable names: base parameters and network outputs."""
        return (*self.base.names(), *self.nets.keys())

    def require(self, *names: str, owner: str = "model") -> None:
        """Raise if a name is neither a base parameter nor a network output."""
        self.base.require(*[n for n in names if n not in self.nets], owner=owner)

    def fitted(self) -> Iterator[str]:
        """Fitted names (base trainables and network outputs)."""
        yield from self.base.fitted()
        yield from self.nets.keys()

    def values(self) -> dict[str, Tensor]:
        """Current values, detached."""
        out = self.base.values()
        for k in self.nets:
            out[k] = self._net_value(k).detach().clone()
        return out

    def set(self, **values: Any) -> None:
        """Set base parameters (network outputs are set through their weights)."""
        self.base.set(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: base parameters and each network's output series."""
        out = self.base.to_dict()
        for k in self.nets:
            out[k] = {"value": self._net_value(k).detach().cpu().tolist(), "low": 0.0,
                      "high": getattr(self.nets[k], "max_mult", None), "fitted": True, "network": True}
        return out


class ParamSchedule(Substep):
    """``target = base * params.<param>[t - start]`` each step (``base``: a system or state field; ``target``: a state field).

    Before ``start`` the target is ``base`` (multiplier 1); after the schedule's end its last
    value is held (a forecast uses no future covariates).
    """

    def __init__(self, name: str, target: str, base: str, param: str, start: int = 0) -> None:
        self.name = name
        self.reads = (base,)
        self.writes = (target,)
        self.params = (param,)
        self.target, self.base, self.param = target, base, param
        self.start = int(start)

    def __call__(self, params: ParamsLike, system: System, state: State, t: int, rng: torch.Generator) -> State:
        value = lookup(system, state, self.base)
        if t < self.start:
            return state.replace(**{self.target: value})
        sched = getattr(params, self.param)
        m = sched[min(t - self.start, sched.shape[0] - 1)] if sched.dim() >= 1 else sched
        return state.replace(**{self.target: value * m.to(value.dtype)})
