"""Synthetic populations from marginal tables: IPF, integerisation, households, schools, work.

Method (documented so that results can be reproduced and criticised):

1. **Joint table by iterative proportional fitting (IPF).** For each area the cells are
   ``age band x sex x employed``. A seed table (a prior age profile within coarse census
   bands, times an employment propensity by age) is scaled alternately to every
   marginal constraint (coarse age bands, sex, sex within age ranges, employed vs not)
   until the largest relative error falls below ``tol`` (Deming & Stephan 1940).
2. **Integerisation** by truncate-replicate-sample (Lovelace & Ballas 2013): each cell
   keeps ``floor(x)`` agents and the remaining ``round(sum x) - sum floor(x)`` agents go to
   cells drawn without replacement with probability proportional to the fractional parts.
   Every cell is off by less than one agent, so a marginal category summing ``m`` cells
   is off by less than ``m`` agents: the bound the validation reports and tests assert.
3. **Households.** Per area ``H = households x scale``; sizes follow a zero-truncated
   Poisson whose mean matches ``persons / households`` (capped at ``max_household``).
   One adult per household is its head (heads closest to age 42 go to the largest
   households); other members are matched to household slots by sorting both on an age
   key (children: own age + 28, adults: own age; heads: head age), which reproduces
   the parent-child and partner structure of household contact matrices.
4. **Schools.** Enrolment with probability ``school_propensity[age band]`` (children, and
   employed adults as staff); students are sorted by age within area and cut into schools
   of about ``school_size``; staff are spread at random over their area's schools.
5. **Work.** Employed agents (not school staff) draw a work area from the row-normalised
   commuting flows ``flows[home, work]``; workers of one work area are cut at random into
   workplaces of about ``workplace_size``.
6. **Contacts.** :func:`unit_sbm` gives age-structured contacts inside units (a household,
   school, workplace or the home area as "community"): each member draws
   ``Poisson(sum_h C[g, h] / 2)`` partners, their age band from row ``g`` of the setting's
   contact matrix ``C`` and the partner uniformly among the unit's members of that band;
   edges are symmetrised so each agent of band g meets ~``C[g, h]`` agents of band h.

Everything is vectorized (sorts, ``repeat_interleave``, ``searchsorted``); the only
Python loops run over constraints, IPF iterations or a handful of fix-up rounds.
Deterministic given ``seed``. Nothing here knows about any particular city.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from lpm.state import CodeBook, StateError, Struct, static_field, tensor_field

__all__ = [
    "PopulationError", "check_table", "Constraint", "ipf", "integerise", "Marginals", "Population",
    "synthesize", "ztp_pmf", "unit_sbm", "mixing_matrix", "matrix_correlation", "marginal_errors",
    "draw_destinations", "cut_units",
]


class PopulationError(StateError):
    """An input table is malformed: the message names the file and the column."""


def check_table(df: "object", file: str, columns: Sequence[str], *, nonnegative: Sequence[str] = (),
                numeric: Sequence[str] = ()) -> None:
    """Raise :class:`PopulationError` naming ``file`` and the column if a column is missing or bad."""
    import pandas as pd

    present = set(df.columns)
    for c in columns:
        if c not in present:
            raise PopulationError(f"{file}: missing column {c!r} (expected columns include {list(columns)})")
    for c in dict.fromkeys([*numeric, *nonnegative]):
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            bad = df[c][v.isna()].iloc[0]
            raise PopulationError(f"{file}: column {c!r} must be numeric, found {bad!r}")
        if c in nonnegative and (v < 0).any():
            raise PopulationError(f"{file}: column {c!r} must be non-negative counts, found {float(v.min())}")


@dataclass(frozen=True)
class Constraint:
    """One marginal: ``index[c]`` = category of cell ``c`` (-1: not counted), ``target [A, K]``."""

    name: str
    index: Tensor
    target: Tensor


def ipf(seed: Tensor, constraints: Sequence[Constraint], *, tol: float = 1e-8, max_iter: int = 500) -> tuple[Tensor, float]:
    """Iterative proportional fitting of ``seed [A, C]`` to all constraints; returns (table, max rel. error)."""
    x = seed.double().clone()
    if x.dim() != 2:
        raise PopulationError(f"ipf: seed must be [A, C], got shape {tuple(seed.shape)}")
    A, C = x.shape
    prepared = []
    for con in constraints:
        idx = con.index.long()
        if idx.shape != (C,):
            raise PopulationError(f"ipf: constraint {con.name}: index must have {C} entries, got {tuple(idx.shape)}")
        tgt = con.target.double()
        if tgt.dim() != 2 or tgt.shape[0] != A:
            raise PopulationError(f"ipf: constraint {con.name}: target must be [{A}, K], got {tuple(tgt.shape)}")
        if bool((tgt < 0).any()):
            raise PopulationError(f"ipf: constraint {con.name}: negative target counts")
        keep = idx >= 0
        prepared.append((con.name, idx.clamp_min(0), keep, tgt))
    err = math.inf
    for _ in range(max_iter):
        for _, idx, keep, tgt in prepared:
            cur = x.new_zeros(A, tgt.shape[1]).index_add(1, idx[keep], x[:, keep])
            ratio = torch.where(cur > 0, tgt / cur.clamp_min(1e-300), torch.zeros_like(cur))
            x[:, keep] = x[:, keep] * ratio[:, idx[keep]]
        err = 0.0
        for _, idx, keep, tgt in prepared:
            cur = x.new_zeros(A, tgt.shape[1]).index_add(1, idx[keep], x[:, keep])
            rel = ((cur - tgt).abs() / tgt.clamp_min(1.0)).max()
            err = max(err, float(rel))
        if err < tol:
            break
    return x, err


def integerise(table: Tensor, generator: torch.Generator) -> Tensor:
    """Truncate-replicate-sample each row of ``table [A, C]`` to integers summing to ``round(row sum)``."""
    t = table.double()
    base = t.floor()
    frac = t - base
    out = base.long()
    need = (t.sum(1).round() - base.sum(1)).long()
    for a in range(t.shape[0]):  # loop over areas (a handful)
        k = int(need[a])
        if k > 0:
            w = frac[a].clone()
            if int((w > 0).sum()) < k:
                w = w + 1e-12
            pick = torch.multinomial(w.float(), k, replacement=False, generator=generator)
            out[a, pick] += 1
    return out


def ztp_pmf(mean: Tensor, max_size: int) -> Tensor:
    """Zero-truncated Poisson pmf over sizes 1..max_size with the given means ``[A]``: ``[A, S]``."""
    m = mean.double().clamp(1.0 + 1e-6, float(max_size) - 1e-3)
    lam = m.clone()
    sizes = torch.arange(1, max_size + 1, dtype=torch.float64)
    for _ in range(60):  # Newton-like steps on log lam: E[size | 1 <= size <= max] = m
        logp = sizes * torch.log(lam[:, None]) - lam[:, None] - torch.lgamma(sizes + 1)
        p = torch.softmax(logp, 1)
        mu = (p * sizes).sum(1)
        var = (p * sizes**2).sum(1) - mu**2
        lam = (lam * torch.exp((m - mu) / var.clamp_min(1e-9))).clamp(1e-6, 1e3)
    logp = sizes * torch.log(lam[:, None]) - lam[:, None] - torch.lgamma(sizes + 1)
    return torch.softmax(logp, 1)


@dataclass(frozen=True)
class Marginals:
    """Per-area census marginals (counts at full scale) and priors that drive :func:`synthesize`.

    ``age_labels`` / ``age_lower`` / ``age_upper`` describe G fine age bands; ``age_groups [G]``
    maps each to one of the K coarse census bands whose counts are ``age_counts [A, K]``.
    """

    areas: tuple[str, ...]
    age_labels: tuple[str, ...]
    age_lower: Tensor          # [G] years
    age_upper: Tensor          # [G] years (exclusive)
    age_prior: Tensor          # [G] relative size of fine bands (splits coarse bands)
    age_groups: Tensor         # [G] coarse band index
    age_counts: Tensor         # [A, K] persons per coarse band
    sex_counts: Tensor         # [A, 2] male, female
    employed: Tensor           # [A] employed persons
    employment_propensity: Tensor  # [G] prior P(employed | age band)
    households: Tensor         # [A] number of households
    income_labels: tuple[str, ...] = ()
    income_counts: Tensor | None = None   # [A, I] households per income bracket
    sex_by_age: tuple[tuple[Tensor, Tensor], ...] = ()  # (mask [G], counts [A, 2]) extra constraints
    school_propensity: Tensor | None = None  # [G] P(in the school setting | age band)
    source: Mapping[str, str] = field(default_factory=dict)  # constraint name -> file it came from

    def validate(self) -> None:
        """Check shapes and non-negativity; errors name the field and its source file."""
        A, G = len(self.areas), len(self.age_labels)
        checks = {"age_counts": (self.age_counts, 2), "sex_counts": (self.sex_counts, 2), "employed": (self.employed, 1),
                  "households": (self.households, 1)}
        for name, (t, d) in checks.items():
            src = self.source.get(name, "marginals")
            if t.dim() != d or t.shape[0] != A:
                raise PopulationError(f"{src}: {name} must have one row per area ({A}), got shape {tuple(t.shape)}")
            if bool((t < 0).any()) or not bool(torch.isfinite(t.double()).all()):
                raise PopulationError(f"{src}: {name} must be finite, non-negative counts")
        for name in ("age_lower", "age_upper", "age_prior", "age_groups", "employment_propensity"):
            if getattr(self, name).shape != (G,):
                raise PopulationError(f"marginals: {name} must have {G} entries (one per age band)")
        if int(self.age_groups.max()) >= self.age_counts.shape[1]:
            raise PopulationError("marginals: age_groups refers to a coarse band beyond age_counts' columns")


@dataclass(frozen=True)
class Population(Struct):
    """Synthetic agents: integer-coded attributes, households, schools and workplaces."""

    area: Tensor = tensor_field(("N",), torch.int8, "home area code (codebooks['area'])")
    age: Tensor = tensor_field(("N",), torch.int8, "age band code (codebooks['age'])")
    age_years: Tensor = tensor_field(("N",), torch.int16, "age in years (uniform within the band)")
    sex: Tensor = tensor_field(("N",), torch.int8, "0 male, 1 female (codebooks['sex'])")
    employed: Tensor = tensor_field(("N",), torch.bool, "employed (civilian, 16+)")
    household: Tensor = tensor_field(("N",), torch.int32, "household id (0..H-1)")
    income: Tensor = tensor_field(("N",), torch.int8, "household income bracket code (-1 unknown)")
    school: Tensor = tensor_field(("N",), torch.int32, "school id, -1 if none (students and staff)")
    workplace: Tensor = tensor_field(("N",), torch.int32, "workplace id, -1 if none")
    work_area: Tensor = tensor_field(("N",), torch.int8, "work area code, -1 if not working")
    codebooks: dict | None = static_field("name -> CodeBook of each categorical attribute", default=None)
    scale: float = static_field("agents per real person", default=1.0)

    @property
    def num_agents(self) -> int:
        """Number of agents N."""
        return int(self.area.numel())


def _rank_within(key_sorted_groups: Tensor) -> Tensor:
    """Position of each element inside its run of equal (sorted) group ids."""
    n = key_sorted_groups.numel()
    if n == 0:
        return key_sorted_groups.new_zeros(0)
    _, counts = torch.unique_consecutive(key_sorted_groups, return_counts=True)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return torch.arange(n) - starts


def cut_units(member: Tensor, area: Tensor, key: Tensor, unit_size: float, num_areas: int) -> tuple[Tensor, int]:
    """Cut members of each area, ordered by ``key``, into consecutive units of ~``unit_size``: ids ``[N]`` (-1 none)."""
    idx = member.nonzero().squeeze(1)
    out = torch.full((member.numel(),), -1, dtype=torch.int32)
    if idx.numel() == 0:
        return out, 0
    a = area[idx].long()
    order = torch.argsort(a.double() * 1e6 + key[idx].double())
    idx, a = idx[order], a[order]
    n_a = torch.bincount(a, minlength=num_areas)
    units_a = torch.where(n_a > 0, torch.ceil(n_a / unit_size).clamp_min(1), torch.zeros_like(n_a, dtype=torch.float64)).long()
    offset = units_a.cumsum(0) - units_a
    rank = _rank_within(a)
    per = n_a[a].double() / units_a[a].clamp_min(1).double()
    unit = offset[a] + torch.minimum((rank.double() / per).floor().long(), units_a[a] - 1)
    out[idx] = unit.to(torch.int32)
    return out, int(units_a.sum())


def draw_destinations(origin: Tensor, flows: Tensor, generator: torch.Generator) -> Tensor:
    """Destination code per agent from row-normalised ``flows [A, B]`` by inverse CDF: ``[N]`` int64."""
    p = flows.double() / flows.double().sum(1, keepdim=True).clamp_min(1e-300)
    cdf = p.cumsum(1)
    cdf[:, -1] = 1.0 + 1e-9
    u = torch.rand(origin.numel(), generator=generator, dtype=torch.float64)
    return torch.searchsorted(cdf[origin.long()], u.unsqueeze(1)).squeeze(1).clamp_max(flows.shape[1] - 1)


def unit_sbm(unit: Tensor, group: Tensor, contacts: Tensor, generator: torch.Generator, *,
             population_average: bool = False) -> Tensor:
    """Age-structured contacts inside units (school, workplace, area): undirected edges ``[2, E]``.

    ``unit [N]`` (-1 = not in this setting), ``group [N]`` codes < G, ``contacts [G, G]`` mean
    daily contacts of a g-member with h-members. With ``population_average`` the rows are
    averages over *all* agents of band g (as in setting matrices that fold in the share of
    each age present in the setting), so each member's rate is divided by that share.
    See the module docstring, step 6.
    """
    G = contacts.shape[0]
    C = contacts.double()
    members = (unit >= 0).nonzero().squeeze(1)
    if members.numel() == 0:
        return torch.zeros(2, 0, dtype=torch.long)
    if population_average:
        share = torch.bincount(group[members].long(), minlength=G).double() / torch.bincount(group.long(), minlength=G).double().clamp_min(1)
        C = torch.where(share[:, None] > 0, C / share.clamp_min(1e-12)[:, None], torch.zeros_like(C))
    u_id = unit[members].long()
    g_id = group[members].long()
    key = u_id * G + g_id
    order = torch.argsort(key, stable=True)
    members, key = members[order], key[order]
    U = int(u_id.max()) + 1
    counts = torch.bincount(key, minlength=U * G)
    starts = counts.cumsum(0) - counts
    g_sorted = key % G
    u_sorted = key // G
    rowsum = C.sum(1)
    k = torch.poisson((rowsum[g_sorted] / 2).float(), generator=generator).long()
    total = int(k.sum())
    if total == 0:
        return torch.zeros(2, 0, dtype=torch.long)
    src_pos = torch.repeat_interleave(torch.arange(members.numel()), k, output_size=total)
    gs = g_sorted[src_pos]
    cdf = (C / rowsum.clamp_min(1e-300)[:, None]).cumsum(1)
    cdf[:, -1] = 1.0 + 1e-9
    flat = (cdf + torch.arange(G, dtype=torch.float64)[:, None]).reshape(-1)
    u = torch.rand(2, total, generator=generator, dtype=torch.float64)
    h = (torch.searchsorted(flat, u[0] + gs.double(), right=True) - gs * G).clamp(0, G - 1)
    tkey = u_sorted[src_pos] * G + h
    cnt = counts[tkey]
    ok = cnt > 0
    pick = starts[tkey] + (u[1] * cnt.double()).floor().long().clamp_max((cnt - 1).clamp_min(0))
    a = members[src_pos[ok]]
    b = members[pick[ok]]
    keep = a != b
    ei = torch.stack([a[keep], b[keep]])
    return torch.cat([ei, ei.flip(0)], 1)


def mixing_matrix(edge_index: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Contacts per person of group g with group h in a layer: ``[G, G]`` (directed edges / n_g)."""
    g = group.long()
    ei = edge_index.long()
    m = torch.bincount(g[ei[0]] * num_groups + g[ei[1]], minlength=num_groups * num_groups).double().view(num_groups, num_groups)
    n = torch.bincount(g, minlength=num_groups).double().clamp_min(1)
    return m / n[:, None]


def matrix_correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two matrices' entries."""
    x, y = a.double().flatten(), b.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-300))


def marginal_errors(pop: Population, m: Marginals) -> dict[str, dict[str, float]]:
    """Synthesized vs census marginals (census scaled): max |error| in agents and max relative error."""
    A = len(m.areas)
    s = pop.scale
    area = pop.area.long()
    out: dict[str, dict[str, float]] = {}

    def record(name: str, synth: Tensor, target: Tensor, cells_per_category: int) -> None:
        t = target.double() * s
        err = (synth.double() - t).abs()
        out[name] = {"max_abs_error_agents": float(err.max()), "max_rel_error": float((err / t.clamp_min(1)).max()),
                     "rounding_bound_agents": float(cells_per_category)}

    K = m.age_counts.shape[1]
    coarse = m.age_groups.long()[pop.age.long()]
    record("age", torch.bincount(area * K + coarse, minlength=A * K).view(A, K), m.age_counts,
           2 * 2 * int(torch.bincount(m.age_groups.long()).max()))
    record("sex", torch.bincount(area * 2 + pop.sex.long(), minlength=A * 2).view(A, 2), m.sex_counts, 2 * len(m.age_labels))
    record("employed", torch.bincount(area[pop.employed], minlength=A), m.employed, 2 * len(m.age_labels))
    hh_area = torch.zeros(int(pop.household.max()) + 1, dtype=torch.long).index_put_((pop.household.long(),), area)
    record("households", torch.bincount(hh_area, minlength=A), m.households, A + 1)
    if m.income_counts is not None and pop.income.numel():
        I = m.income_counts.shape[1]
        inc = torch.zeros(int(pop.household.max()) + 1, dtype=torch.long).index_put_((pop.household.long(),), pop.income.long())
        record("income", torch.bincount(hh_area * I + inc, minlength=A * I).view(A, I), m.income_counts, 1)
    return out


def synthesize(
    m: Marginals,
    scale: float = 0.01,
    seed: int = 0,
    *,
    flows: Tensor | None = None,
    max_household: int = 10,
    school_size: float = 500.0,
    workplace_size: float = 50.0,
    adult_age: int = 18,
) -> Population:
    """Agents, households, schools and workplaces from marginals (see the module docstring)."""
    m.validate()
    if not 0 < scale <= 1.0:
        raise PopulationError(f"scale: expected 0 < scale <= 1 (1.0 = the full population), got {scale}")
    A, G = len(m.areas), len(m.age_labels)
    gen = torch.Generator().manual_seed(int(seed))
    # cells: (age g, sex s, employed e) -> c = (g * 2 + s) * 2 + e
    c = torch.arange(G * 4)
    cg, cs, ce = c // 4, (c // 2) % 2, c % 2
    prop = m.employment_propensity.double().clamp(0, 1)
    prior = m.age_prior.double() / torch.zeros(m.age_counts.shape[1], dtype=torch.float64).index_add(
        0, m.age_groups.long(), m.age_prior.double()).clamp_min(1e-300)[m.age_groups.long()]
    seed_row = prior[cg] * 0.5 * torch.where(ce == 1, prop[cg], 1 - prop[cg])
    seed_tab = seed_row.unsqueeze(0).repeat(A, 1)
    total = m.age_counts.double().sum(1)
    cons = [Constraint("age", m.age_groups.long()[cg], m.age_counts.double()),
            Constraint("sex", cs, m.sex_counts.double() * (total / m.sex_counts.double().sum(1).clamp_min(1))[:, None]),
            Constraint("employed", ce, torch.stack([total - m.employed.double(), m.employed.double()], 1))]
    for i, (mask, counts) in enumerate(m.sex_by_age):
        cons.append(Constraint(f"sex_by_age{i}", torch.where(mask.bool()[cg], cs, -1), counts.double()))
    table, _ = ipf(seed_tab, cons)
    counts = integerise(table * scale, gen)
    # agents: repeat cell codes
    N = int(counts.sum())
    if N == 0:
        raise PopulationError(f"scale {scale}: the population rounds to zero agents")
    flat = counts.reshape(-1)
    cell = torch.repeat_interleave(torch.arange(A * G * 4), flat)
    area = cell // (G * 4)
    cc = cell % (G * 4)
    age, sex, emp = cc // 4, (cc // 2) % 2, (cc % 2).bool()
    lo, hi = m.age_lower.double(), m.age_upper.double()
    years = (lo[age] + torch.rand(N, generator=gen, dtype=torch.float64) * (hi[age] - lo[age])).floor()

    # households ------------------------------------------------------------------------
    n_a = torch.bincount(area, minlength=A)
    H_a = (m.households.double() * scale).round().long().clamp_min(1)
    H_a = torch.where(n_a > 0, H_a, torch.zeros_like(H_a))
    adult = years >= adult_age
    adults_a = torch.bincount(area[adult], minlength=A)
    if bool((H_a > adults_a).any()):
        bad = int((H_a > adults_a).nonzero()[0])
        raise PopulationError(f"{m.source.get('households', 'marginals')}: area {m.areas[bad]} has more households "
                              f"({int(H_a[bad])}) than adults ({int(adults_a[bad])}) at scale {scale}")
    pmf = ztp_pmf(n_a.double() / H_a.clamp_min(1).double(), max_household)
    size_counts = integerise(pmf * H_a[:, None].double(), gen)  # [A, S]
    S = max_household
    sizes = torch.repeat_interleave(torch.arange(1, S + 1).repeat(A), size_counts.reshape(-1))
    h_area = torch.repeat_interleave(torch.arange(A).repeat_interleave(S), size_counts.reshape(-1))
    for _ in range(50):  # fix-up rounds: make household sizes add up to each area's persons
        diff = n_a - torch.bincount(h_area, weights=sizes.double(), minlength=A).long()
        if not bool(diff.any()):
            break
        key = torch.rand(sizes.numel(), generator=gen, dtype=torch.float64)
        grow = (diff[h_area] > 0) & (sizes < S)
        shrink = (diff[h_area] < 0) & (sizes > 1)
        eligible = grow | shrink
        key = torch.where(eligible, key, torch.full_like(key, 2.0))
        order = torch.argsort(h_area.double() * 4 + key)
        rank = torch.empty_like(order)
        rank[order] = _rank_within(h_area[order])
        change = eligible & (rank < diff.abs()[h_area])
        sizes = sizes + torch.where(change, torch.where(grow, 1, -1), 0)
    else:
        raise PopulationError("households: could not match household sizes to persons per area; raise max_household")
    H = sizes.numel()
    # order households by area then size (ids are contiguous per area)
    order = torch.argsort(h_area * (S + 1) + sizes, stable=True)
    sizes, h_area = sizes[order], h_area[order]
    # heads: per area, the H_a adults chosen at random; the ones nearest 42 lead the largest households
    r = torch.rand(N, generator=gen, dtype=torch.float64)
    akey = torch.where(adult, area.double() * 4 + r, torch.full((N,), 1e9, dtype=torch.float64))
    ord_a = torch.argsort(akey)
    rank_a = torch.empty(N, dtype=torch.long)
    rank_a[ord_a] = _rank_within(area[ord_a])
    head = adult & (rank_a < H_a[area])
    heads = head.nonzero().squeeze(1)
    hk = area[heads].double() * 1e4 - (years[heads] - 42).abs() + torch.rand(heads.numel(), generator=gen, dtype=torch.float64) * 10
    heads = heads[torch.argsort(hk)]
    household = torch.empty(N, dtype=torch.long)
    household[heads] = torch.arange(H)
    # slots of the other members, keyed by the head's age
    extra = sizes - 1
    slot_h = torch.repeat_interleave(torch.arange(H), extra)
    head_age = torch.empty(H, dtype=torch.float64)
    head_age[household[heads]] = years[heads]
    slot_key = h_area[slot_h].double() * 1e4 + head_age[slot_h] + torch.randn(slot_h.numel(), generator=gen, dtype=torch.float64) * 3
    others = (~head).nonzero().squeeze(1)
    oy = years[others]
    okey = area[others].double() * 1e4 + torch.where(oy < adult_age, oy + 28, oy) + torch.randn(others.numel(), generator=gen, dtype=torch.float64) * 3
    household[others[torch.argsort(okey)]] = slot_h[torch.argsort(slot_key)]

    # income per household: brackets integerised per area, shuffled within area ----------
    income = torch.full((N,), -1, dtype=torch.int8)
    if m.income_counts is not None:
        I = m.income_counts.shape[1]
        share = m.income_counts.double() / m.income_counts.double().sum(1, keepdim=True).clamp_min(1)
        inc_counts = integerise(share * torch.bincount(h_area, minlength=A).double()[:, None], gen)
        inc_codes = torch.repeat_interleave(torch.arange(I).repeat(A), inc_counts.reshape(-1))
        inc_area = torch.repeat_interleave(torch.arange(A).repeat_interleave(I), inc_counts.reshape(-1))
        inc_codes = inc_codes[torch.argsort(inc_area.double() * 2 + torch.rand(inc_codes.numel(), generator=gen, dtype=torch.float64))]
        income = inc_codes[household].to(torch.int8)

    # schools -----------------------------------------------------------------------------
    school = torch.full((N,), -1, dtype=torch.int32)
    staff = torch.zeros(N, dtype=torch.bool)
    if m.school_propensity is not None:
        p_school = m.school_propensity.double().clamp(0, 1)[age]
        enrol = torch.rand(N, generator=gen, dtype=torch.float64) < p_school
        student = enrol & (years < 20)
        staff = enrol & (years >= 20) & emp
        school, n_schools = cut_units(student, area, years + torch.rand(N, generator=gen, dtype=torch.float64), school_size, A)
        if n_schools:
            per_area = torch.zeros(A, dtype=torch.long).index_add(0, area[student], torch.ones_like(area[student]))
            sch_lo = torch.full((A,), -1, dtype=torch.long)
            sch_hi = torch.full((A,), -1, dtype=torch.long)
            sid = school[student].long()
            sch_lo = sch_lo.scatter_reduce(0, area[student], sid, "amin", include_self=False)
            sch_hi = sch_hi.scatter_reduce(0, area[student], sid, "amax", include_self=False)
            staff = staff & (per_area[area] > 0)
            st = staff.nonzero().squeeze(1)
            span = (sch_hi - sch_lo + 1)[area[st]]
            pick = sch_lo[area[st]] + (torch.rand(st.numel(), generator=gen, dtype=torch.float64) * span).floor().long()
            school[st] = pick.to(torch.int32)
        else:
            staff = torch.zeros(N, dtype=torch.bool)

    # work --------------------------------------------------------------------------------
    worker = emp & ~staff
    work_area = torch.full((N,), -1, dtype=torch.int8)
    if flows is not None:
        if flows.shape != (A, A):
            raise PopulationError(f"flows: expected [{A}, {A}] (home area x work area), got {tuple(flows.shape)}")
        wa = draw_destinations(area[worker], flows, gen)
    else:
        wa = area[worker]
    work_area[worker] = wa.to(torch.int8)
    workplace, _ = cut_units(worker, work_area.long().clamp_min(0), torch.rand(N, generator=gen, dtype=torch.float64), workplace_size, A)

    books = {"area": CodeBook("area", tuple(m.areas)), "age": CodeBook("age", tuple(m.age_labels)),
             "sex": CodeBook("sex", ("male", "female"))}
    if m.income_labels:
        books["income"] = CodeBook("income", tuple(m.income_labels))
    return Population(area=area.to(torch.int8), age=age.to(torch.int8), age_years=years.to(torch.int16),
                      sex=sex.to(torch.int8), employed=emp, household=household.to(torch.int32), income=income,
                      school=school, workplace=workplace, work_area=work_area, codebooks=books, scale=float(scale))
