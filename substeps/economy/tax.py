"""Piecewise-linear tax schedules as tensors, and inequality measures.

A schedule is two tensors ``thresholds [B]`` (lower edge of each bracket, $/year, first 0)
and ``rates [B]`` (marginal rate in each bracket). The tax on annual income ``y`` is::

    T(y) = sum_b (rates[b] - rates[b-1]) * max(y - thresholds[b], 0),   rates[-1] = 0

which is continuous, piecewise linear and differentiable in ``rates`` (and in ``y`` away
from the kinks). Written as differences of rates so one ``[N, B]`` product does it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm import check_tensor

__all__ = ["piecewise_tax", "weekly_tax", "parse_schedule", "format_schedule", "gini", "poverty_rate",
           "CURRENT_LAW", "WEEKS_PER_YEAR"]

WEEKS_PER_YEAR = 52.0

#: A stylised combined federal + NY State + NYC income tax on individual earnings, 2019
#: (single filer, standard deduction folded into a 0% first bracket). Marginal rates are the
#: statutory federal (10/12/22/24/32/35/37%) plus about 10% state and city on top of
#: the deduction; payroll taxes are left out. Thresholds in $/year.
CURRENT_LAW = "0:0,12200:0.16,21900:0.18,51000:0.28,96000:0.30,176000:0.38,220000:0.41,523000:0.47"


def _check_schedule(thresholds: Tensor, rates: Tensor) -> None:
    check_tensor("tax_thresholds", thresholds, ("B",))
    check_tensor("tax_rates", rates, (thresholds.shape[0],))
    if float(thresholds[0]) != 0.0:
        raise ConfigError(f"tax_thresholds: the first bracket must start at 0 $/year, got {float(thresholds[0])}")
    if bool((thresholds[1:] <= thresholds[:-1]).any()):
        raise ConfigError(f"tax_thresholds: expected strictly increasing $/year, got {thresholds.tolist()}")


def piecewise_tax(income: Tensor, thresholds: Tensor, rates: Tensor) -> Tensor:
    """Tax owed ``[...]`` on annual ``income [...]`` under the schedule ``(thresholds [B], rates [B])``."""
    _check_schedule(thresholds, rates)
    th = thresholds.to(income.dtype)
    r = rates.to(income.dtype)
    step = torch.cat([r[:1], r[1:] - r[:-1]])
    above = (income.unsqueeze(-1) - th).clamp_min(0)
    return (above * step).sum(-1)


def weekly_tax(earnings: Tensor, thresholds: Tensor, rates: Tensor) -> Tensor:
    """Tax per week on weekly ``earnings`` as if earned all year (annualised, then /52)."""
    return piecewise_tax(earnings * WEEKS_PER_YEAR, thresholds, rates) / WEEKS_PER_YEAR


def parse_schedule(text: str) -> tuple[Tensor, Tensor]:
    """``"0:0,12000:0.1,50000:0.3"`` (threshold $/year : marginal rate) -> ``(thresholds [B], rates [B])``."""
    pairs = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.count(":") != 1:
            raise ConfigError(f"--tax: expected THRESHOLD:RATE pairs separated by commas, got {part!r} in {text!r}")
        a, b = part.split(":")
        try:
            pairs.append((float(a), float(b)))
        except ValueError:
            raise ConfigError(f"--tax: {part!r} is not two numbers THRESHOLD:RATE") from None
    if not pairs:
        raise ConfigError(f"--tax: empty schedule {text!r}")
    th = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    r = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    if bool((r <= -1).any()) or bool((r >= 1).any()):
        raise ConfigError(f"--tax: marginal rates must lie in (-1, 1), got {r.tolist()}")
    _check_schedule(th, r)
    return th, r


def format_schedule(thresholds: Tensor, rates: Tensor) -> str:
    """Inverse of :func:`parse_schedule`."""
    return ",".join(f"{float(a):g}:{float(b):.4g}" for a, b in zip(thresholds, rates))


def gini(x: Tensor, group: Tensor | None = None, num_groups: int = 1) -> Tensor:
    """Gini coefficient of non-negative ``x [N]`` within each group: ``[num_groups]``.

    ``G = sum_i (2 i - n - 1) x_(i) / (n sum x)`` over the sorted values (ranks i = 1..n):
    0 when everyone holds the same, ``(n - 1) / n`` when one holds everything. Differentiable
    in ``x`` (the sort is piecewise constant). Negative values are clamped to 0.
    """
    x = x.clamp_min(0)
    if group is None:
        group = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    group = group.long()
    # one sort on (group, value): values are offset by group * (max + 1), exact in float64
    xd = x.detach().double()
    order = torch.argsort(group.double() * (float(xd.max()) + 1.0) + xd)
    xs, gs = x[order], group[order]
    n = torch.bincount(group, minlength=num_groups)
    start = torch.cumsum(n, 0) - n
    rank = torch.arange(x.shape[0], device=x.device) - start[gs] + 1
    nf = n.to(x.dtype)
    w = (2 * rank.to(x.dtype) - nf[gs] - 1) * xs
    num = x.new_zeros(num_groups).index_add(0, gs, w)
    tot = x.new_zeros(num_groups).index_add(0, gs, xs)
    return num / (nf.clamp_min(1) * tot.clamp_min(torch.finfo(x.dtype).tiny))


def poverty_rate(annual_income: Tensor, line: float, group: Tensor | None = None, num_groups: int = 1) -> Tensor:
    """Share of agents with ``annual_income`` below ``line`` in each group ``[num_groups]`` (no gradient)."""
    if group is None:
        group = torch.zeros(annual_income.shape[0], dtype=torch.long, device=annual_income.device)
    poor = (annual_income.detach() < line).to(annual_income.dtype)
    n = torch.bincount(group.long(), minlength=num_groups).to(annual_income.dtype).clamp_min(1)
    return poor.new_zeros(num_groups).index_add(0, group.long(), poor) / n
