"""A tax planner: optimise a piecewise-linear schedule by gradient, against a Saez-style baseline.

The planner works on the steady state of the labour-supply substep (extensive margin, no
shock, no UI): each labour-force member i with weekly wage ``w_i`` works with probability::

    P_i = sigmoid((log c_w - log c_0 - d_i) / s),   c_w = w_i - T(w_i) + b,   c_0 = b + h

(``T`` the schedule, ``b`` a universal transfer, ``h`` home production, ``s`` = ``ls_scale``),
and has expected utility ``V_i = s log(exp((log c_w - d_i) / s) + exp(log c_0 / s))`` (the
logit inclusive value); people outside the labour force get ``V_i = log c_0``. The budget
``sum_i P_i T(w_i) = N b + N r`` (``r`` the revenue requirement per adult, e.g. that of current
law) fixes ``b`` by an unrolled fixed-point iteration, so ``b`` is a differentiable function
of the rates. Welfare functions (stated):

- ``utilitarian``: ``W = mean_i V_i`` (sum of log-consumption utilities net of work cost);
- ``atkinson2``: ``W = -mean_i exp(-V_i)``: CRRA with inequality aversion 2 on each person's
  certainty-equivalent consumption ``exp(V_i)`` (more weight on the worse off).

Saez-style baseline (Saez 2002, "Optimal income transfer programs: intensive versus
extensive labor supply responses", QJE 117(3), pure extensive margin): for each income band
k the participation tax rate ``tau_k = (T_k - T_0) / w_k`` satisfies
``(T_k - T_0) / (c_k - c_0) = (1 - g_k) / eta_k`` where ``eta_k`` is the participation
elasticity ``d log P / d log(c_w - c_0)`` and ``g_k`` the social marginal welfare weight of
band-k workers normalised so that the population average weight is 1. Here
``c_k - c_0 = w - h - (T_k - T_0)`` (home production ``h`` is given up by working), so with
``x_k = (1 - g_k) / eta_k`` the optimal participation tax is
``T_k - T_0 = x_k / (1 + x_k) (w - h)``. Both ``g`` and ``eta`` depend on the allocation, so
the formula is iterated to a fixed point on the same agents. With ``T_0 = -b`` the
participation tax rate of a worker under any schedule is ``T(w) / w`` (what is compared).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lpm.errors import ConfigError
from substeps.economy.tax import piecewise_tax

__all__ = ["StaticEconomy", "Allocation", "optimise_schedule", "saez_rates", "WELFARE"]

WELFARE = ("utilitarian", "atkinson2")


@dataclass(frozen=True)
class StaticEconomy:
    """Steady-state labour supply of a population: wages, work costs and who is in the labour force."""

    wage: Tensor        # [N] $/week
    disutility: Tensor  # [N]
    in_lf: Tensor       # [N] bool
    band: Tensor        # [N] income band code
    ls_scale: float
    home: float         # $/week home production of non-workers
    revenue_req: float  # $/week per adult the budget must raise net of the transfer

    def allocation(self, tax_of_wage: Tensor, iters: int = 25) -> "Allocation":
        """Participation, transfer ``b`` (balanced budget) and utilities for a tax ``T(w_i)`` per agent ``[N]``."""
        w = self.wage.double()
        T = tax_of_wage.double()
        lf = self.in_lf.double()
        d = self.disutility.double()
        s = self.ls_scale
        b = w.new_zeros(())
        N = w.shape[0]
        for _ in range(iters):
            c_w = (w - T + b).clamp_min(1.0)
            c_0 = b + self.home
            P = lf * torch.sigmoid((torch.log(c_w) - torch.log(c_0) - d) / s)
            b = ((P * T).sum() / N - self.revenue_req).clamp_min(-0.9 * self.home)
        c_w = (w - T + b).clamp_min(1.0)
        c_0 = b + self.home
        z = (torch.log(c_w) - torch.log(c_0) - d) / s
        P = lf * torch.sigmoid(z)
        v_lf = s * torch.logaddexp((torch.log(c_w) - d) / s, torch.log(c_0) / s)
        V = torch.where(self.in_lf, v_lf, torch.log(c_0).expand_as(v_lf))
        return Allocation(P, b, c_w, c_0, V, T)

    def welfare(self, alloc: "Allocation", kind: str) -> Tensor:
        """Social welfare of an allocation (see module docstring)."""
        if kind == "utilitarian":
            return alloc.V.mean()
        if kind == "atkinson2":
            return -torch.exp(-alloc.V).mean()
        raise ConfigError(f"welfare: expected one of {WELFARE}, got {kind!r}")

    def certainty_equivalent(self, alloc: "Allocation", kind: str) -> float:
        """Welfare as the equally-distributed consumption that gives the same W, $/week."""
        W = float(self.welfare(alloc, kind))
        return float(torch.exp(torch.tensor(W))) if kind == "utilitarian" else -1.0 / W

    def band_rates(self, alloc: "Allocation", num_bands: int) -> Tensor:
        """Participation-weighted mean participation tax rate ``T(w)/w`` per band ``[num_bands]``."""
        rate = alloc.T / self.wage.double()
        wgt = alloc.P.detach()
        num = rate.new_zeros(num_bands).index_add(0, self.band.long(), wgt * rate)
        den = rate.new_zeros(num_bands).index_add(0, self.band.long(), wgt)
        return num / den.clamp_min(1e-12)


@dataclass(frozen=True)
class Allocation:
    """Outcome of a schedule: participation ``P [N]``, transfer ``b``, consumptions, utilities ``V [N]``, taxes ``T [N]``."""

    P: Tensor
    b: Tensor
    c_w: Tensor
    c_0: Tensor
    V: Tensor
    T: Tensor


def optimise_schedule(econ: StaticEconomy, thresholds: Tensor, start_rates: Tensor, welfare: str, *,
                      steps: int = 300, lr: float = 0.05, low: float = -0.5, high: float = 0.95) -> tuple[Tensor, list[float]]:
    """Marginal rates ``[B]`` maximising ``welfare`` by Adam (rates kept in ``(low, high)``); returns rates and the W path."""
    th = thresholds.double()
    z0 = ((start_rates.double() - low) / (high - low)).clamp(1e-4, 1 - 1e-4)
    raw = torch.logit(z0).clone().requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=lr)
    annual = econ.wage.double() * 52.0
    path = []
    for _ in range(steps):
        rates = low + (high - low) * torch.sigmoid(raw)
        T = piecewise_tax(annual, th, rates) / 52.0
        W = econ.welfare(econ.allocation(T), welfare)
        opt.zero_grad()
        (-W).backward()
        opt.step()
        path.append(float(W.detach()))
    with torch.no_grad():
        return low + (high - low) * torch.sigmoid(raw), path


def saez_rates(econ: StaticEconomy, num_bands: int, welfare: str, *, iters: int = 200, damping: float = 0.3,
               start: Tensor | None = None) -> tuple[Tensor, Allocation]:
    """Saez (2002) extensive-margin optimum: ``tau [num_bands]`` (tax = ``tau_k (w - h)``) at the fixed point, and its allocation."""
    if welfare not in WELFARE:
        raise ConfigError(f"welfare: expected one of {WELFARE}, got {welfare!r}")
    tau = torch.full((num_bands,), 0.2, dtype=torch.float64) if start is None else start.double().clone()
    band = econ.band.long()
    w = econ.wage.double()
    lf = econ.in_lf
    s = econ.ls_scale
    gain = w - econ.home
    for _ in range(iters):
        alloc = econ.allocation(tau[band] * gain)
        P, c_w, c_0 = alloc.P, alloc.c_w, alloc.c_0
        # participation elasticity w.r.t. c_w - c_0 of each labour-force member
        eta_i = (1 - P / lf.double().clamp_min(1e-12)).clamp_min(0) / s * (c_w - c_0) / c_w
        marg = torch.exp(-alloc.V) if welfare == "atkinson2" else torch.ones_like(alloc.V)
        g_w = marg / c_w                      # weight of a worker's marginal dollar
        g_0 = marg / c_0                      # weight of a non-worker's marginal dollar
        N = w.shape[0]
        lam = ((P * g_w).sum() + ((1 - P) * g_0).sum()) / N
        num = torch.zeros(num_bands, dtype=torch.float64)
        eta = num.index_add(0, band, P * eta_i)
        gk = torch.zeros(num_bands, dtype=torch.float64).index_add(0, band, P * g_w / lam)
        den = torch.zeros(num_bands, dtype=torch.float64).index_add(0, band, P).clamp_min(1e-12)
        eta, gk = eta / den, gk / den
        x = (1 - gk) / eta.clamp_min(1e-6)
        new = (x / (1 + x)).clamp(-0.9, 0.95)
        tau = (1 - damping) * tau + damping * new
    return tau, econ.allocation(tau[band] * gain)
