"""A commons study in the spirit of GovSim: archetypes harvest a shared, regenerating resource.

Run: ``lpm run commons [--agents 1000000 --rounds 40 --llm rule|local|http --out DIR]``.

The game (Levhari & Mirman's "great fish war", 1980), one round per time step:
the stock ``x_t`` (1 = pristine) is shared by N agents; agent i harvests
``c_i = m_i * x_t / N``, a fraction ``m_i`` in [0, 1] of its equal share of the stock (so the
total never exceeds the stock); what is left regenerates as ``x_{t+1} = (x_t - sum_i c_i)^alpha``
with ``0 < alpha < 1``. Each agent values a harvest stream by ``sum_t delta^t log c_{i,t}``.

Analytic references (value functions ``A log x + B``; derivation below):

- **Social optimum** (a planner maximising the sum of members' values): harvest the
  total fraction ``F* = 1 - alpha delta`` of the stock each round, i.e. every agent takes
  ``m* = 1 - alpha delta`` of its equal share. The stock converges to
  ``x* = (alpha delta)^(alpha / (1 - alpha))`` and the harvest per round to ``F* x*``.
  (Planner: ``V = N/(1 - alpha delta) log x + B``; the first-order condition
  ``N / C = delta alpha V'(.)`` gives ``C = (1 - alpha delta) x``.)
- **Nash (Markov-perfect) equilibrium**: each agent takes the fraction of the stock
  ``phi = (1 - alpha delta) / (N - (N - 1) alpha delta)``, i.e. ``m_nash = N phi`` of its equal
  share. (Given the others' ``phi``, the agent's value is ``1/(1 - alpha delta) log x + B``
  and its first-order condition gives ``c = (1 - alpha delta)(1 - (N - 1) phi) x``; symmetry
  gives ``phi``.) The stock converges to
  ``x_nash = (alpha delta / (N - (N - 1) alpha delta))^(alpha / (1 - alpha))``, which tends to 0
  as N grows: with 1e6 agents the commons collapses (the tragedy of the commons).
- Under any constant total fraction F the log stock is linear:
  ``log x_t = (1 - alpha^t) * alpha/(1 - alpha) * log(1 - F) + alpha^t log x_0``, so the
  round at which the stock first falls below a collapse threshold is known in closed form
  (:func:`analytic_path`).

Agents belong to archetypes (norm x need): cooperative, conditional (reciprocating) and
selfish norms, low and high household need. Each round every archetype is asked (once, K
prompts, never N) what percentage of its equal share it takes, given the bucketed stock
and the institutions' context; the answer is broadcast to the members by archetype id.
Institutions: a **quota** caps each harvest at the sustainable share ``m* x / N``
(enforced); a **public report** tells everyone last round's average harvest relative to
the sustainable share (conditional cooperators reciprocate it). The ``rule`` backend
encodes these norms transparently; ``local`` and ``http`` ask a language model.

Reported per arm: survival time (rounds until the stock first falls below
``collapse`` x pristine; the horizon if never), total harvest, steady harvest per round
(last round), final stock, Gini of the agents' cumulative harvests, against the social
optimum and the Nash references of the same game.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from lpm.cli import Experiment
from llm_archetypes.archetypes import Archetypes
from llm_archetypes.asking import Asker
from llm_archetypes.backends import make_backend
from llm_archetypes.cache import AnswerCache
from llm_archetypes.questions import Bucket, Number, Prompt, Question

__all__ = ["CommonsGame", "optimum_fraction", "nash_fraction", "steady_stock", "analytic_path", "gini",
           "simulate", "harvest_question", "commons_rule", "make_archetypes", "main", "EXPERIMENT"]

NORMS = ("cooperative", "conditional", "selfish")
NEEDS = ("low", "high")
#: Stock relative to pristine, in words (so prompts repeat and the cache answers them).
STOCK_BUCKET = Bucket((0.05, 0.2, 0.4, 0.7),
                      ("collapsed (under 5% of its original size)", "very low (5-20% of original)",
                       "low (20-40% of original)", "moderate (40-70% of original)", "healthy (over 70% of original)"))
REPORT_BUCKET = Bucket((0.9, 1.1, 1.5),
                       ("below the sustainable share", "about the sustainable share",
                        "somewhat above the sustainable share", "far above the sustainable share"))


@dataclass(frozen=True)
class CommonsGame:
    """Parameters of the game: regeneration exponent ``alpha`` in (0, 1), discount ``delta`` in (0, 1], N agents."""

    alpha: float = 0.5
    delta: float = 0.95
    n_agents: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha: expected a value in (0, 1), got {self.alpha}")
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"delta: expected a value in (0, 1], got {self.delta}")
        if self.n_agents < 1:
            raise ValueError(f"n_agents: expected >= 1, got {self.n_agents}")


def optimum_fraction(game: CommonsGame) -> float:
    """Social optimum: share ``m* = 1 - alpha delta`` of each agent's equal share (total fraction of the stock)."""
    return 1.0 - game.alpha * game.delta


def nash_fraction(game: CommonsGame) -> float:
    """Markov-perfect Nash: share ``N phi`` of the equal share, ``phi = (1 - ad) / (N - (N - 1) ad)``."""
    ad, n = game.alpha * game.delta, game.n_agents
    return n * (1.0 - ad) / (n - (n - 1) * ad)


def steady_stock(game: CommonsGame, total_fraction: float) -> float:
    """Steady stock ``(1 - F)^(alpha / (1 - alpha))`` when the total fraction F is harvested each round."""
    if not 0.0 <= total_fraction <= 1.0:
        raise ValueError(f"total_fraction: expected a value in [0, 1], got {total_fraction}")
    return (1.0 - total_fraction) ** (game.alpha / (1.0 - game.alpha))


def analytic_path(game: CommonsGame, total_fraction: float, rounds: int, x0: float = 1.0) -> Tensor:
    """Stock ``[rounds + 1]`` (float64) under a constant total fraction, in closed form."""
    a = game.alpha
    t = torch.arange(rounds + 1, dtype=torch.float64)
    if total_fraction >= 1.0:
        return torch.where(t == 0, torch.tensor(float(x0), dtype=torch.float64), torch.zeros(()))
    at = a ** t
    return torch.exp((1 - at) * a / (1 - a) * math.log(1.0 - total_fraction) + at * math.log(x0))


def gini(x: Tensor) -> Tensor:
    """Gini coefficient of non-negative values ``[N]`` (0 equal, -> 1 one holds all), by sorting."""
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"gini: expected a non-empty [N] tensor, got shape {tuple(x.shape)}")
    s, _ = torch.sort(x.to(torch.float64))
    n = s.numel()
    total = s.sum()
    if float(total) <= 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return ((2 * i - n - 1) * s).sum() / (n * total)


# --------------------------------------------------------------------------- agents


def harvest_question() -> Question:
    """'What percentage of your equal share of the fish do you take this round?' (a number 0-100)."""
    template = (
        "You are one of many fishers who share a lake. Your attitude: {norm}. Your household's need for food "
        "is {need}.\nThe fish stock is {stock}. Fish that are left regrow, but the more is taken, the less "
        "regrows; if the stock collapses, nobody can fish again.\nYour equal share is the stock divided by the "
        "number of fishers. Taking {sustainable}% of your equal share each round keeps the lake at its most "
        "productive level.\n{quota}{report}Question: what percentage of your equal share will you take this round?"
    )
    return Question("harvest_share", template, Number(0.0, 100.0), buckets={"stock": STOCK_BUCKET})


def commons_rule(prompt: Prompt) -> float:
    """Transparent norms: cooperative takes the sustainable share, selfish all of it, conditional reciprocates.

    Conditional cooperators match the reported average (the sustainable share when it is
    at or below it, all when it is far above) and, without a report, hedge halfway.
    High need adds 10 points; a quota announcement makes cooperative and conditional
    agents keep to it.
    """
    a, ctx = prompt.attributes, prompt.context
    sustainable = float(ctx["sustainable"])
    quota = "quota" in ctx.get("quota", "").lower()
    if a["norm"] == "selfish":
        pct = 100.0
    elif a["norm"] == "cooperative":
        pct = sustainable
    else:
        level = next((i for i, lab in enumerate(REPORT_BUCKET.labels) if lab in ctx.get("report", "")), None)
        if level is None:
            pct = 0.5 * (sustainable + 100.0)
        else:
            pct = (sustainable, sustainable, min(100.0, 1.3 * sustainable), 100.0)[level]
    if a["need"] == "high" and a["norm"] != "selfish":
        pct = min(100.0, pct + 10.0)
    if quota and a["norm"] != "selfish":
        pct = min(pct, sustainable)
    return float(round(pct, 1))


def make_archetypes(n: int, shares: Sequence[float] = (0.4, 0.4, 0.2), seed: int = 0,
                    device: str | torch.device = "cpu") -> Archetypes:
    """N agents with a norm (cooperative/conditional/selfish by ``shares``) and a need (low/high, half each)."""
    if len(shares) != len(NORMS) or abs(sum(shares) - 1.0) > 1e-9 or min(shares) < 0:
        raise ValueError(f"shares: expected {len(NORMS)} non-negative shares summing to 1, got {list(shares)}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    norm = torch.multinomial(torch.tensor(shares, dtype=torch.float64), n, replacement=True, generator=g)
    need = torch.randint(0, 2, (n,), generator=g)
    return Archetypes.from_attributes({"norm": norm.to(device), "need": need.to(device)}, ["norm", "need"],
                                      codebooks={"norm": NORMS, "need": NEEDS})


def simulate(game: CommonsGame, archetypes: Archetypes, asker: Asker | None, rounds: int, *, quota: bool = False,
             report: bool = False, fraction: float | Tensor | None = None, collapse: float = 0.05,
             x0: float = 1.0) -> dict[str, Any]:
    """Play ``rounds`` rounds; harvest shares from the archetypes' answers (or a fixed ``fraction`` per agent or archetype).

    Vectorized over agents: shares ``[K]`` are gathered to ``[N]`` by archetype id, the
    quota is a ``clamp``, cumulative harvests are one ``[N]`` float64 tensor.
    Returns the stock path ``[rounds + 1]``, harvest per round ``[rounds]``, per-archetype
    shares per round ``[rounds, K]``, survival round, totals and Gini.
    """
    if archetypes.N != game.n_agents:
        raise ValueError(f"archetypes: expected {game.n_agents} agents (game.n_agents), got {archetypes.N}")
    if asker is None and fraction is None:
        raise ValueError("simulate: pass an asker (archetype answers) or a fixed fraction")
    dev = archetypes.archetype_id.device
    n, m_star = game.n_agents, optimum_fraction(game)
    ids = archetypes.archetype_id
    question = harvest_question()
    cum = torch.zeros(n, dtype=torch.float64, device=dev)
    x = torch.tensor(float(x0), dtype=torch.float64, device=dev)
    stocks, harvests, shares_t, mean_t = [x.clone()], [], [], []
    last_ratio: float | None = None
    for t in range(rounds):
        if fraction is not None:
            m = torch.as_tensor(fraction, dtype=torch.float64, device=dev)
            m_k = m.expand(archetypes.K) if m.dim() == 0 else m
        else:
            ctx: dict[str, Any] = {"stock": float(x), "sustainable": f"{100 * m_star:.1f}",
                                   "quota": (f"Rule: a quota, enforced by inspectors, limits everyone to "
                                             f"{100 * m_star:.1f}% of their equal share.\n" if quota else ""),
                                   "report": (f"Public report: last round the average fisher took "
                                              f"{REPORT_BUCKET(last_ratio)}.\n"
                                              if report and last_ratio is not None else "")}
            prompts = [question.render(archetypes.labels[k], ctx) for k in range(archetypes.K)]
            ans = asker.ask(question, prompts)
            m_k = ans.scores.to(device=dev, dtype=torch.float64)          # percentage / 100
        if m_k.shape != (archetypes.K,):
            raise ValueError(f"fraction: expected a scalar or [K={archetypes.K}] shares, got {tuple(m_k.shape)}")
        if quota:
            m_k = m_k.clamp(max=m_star)
        m_i = m_k[ids]                                                   # [N]
        c = m_i * (x / n)                                                # never more than x in total
        total = c.sum()
        cum += c
        x = (x - total).clamp_min(0.0) ** game.alpha
        stocks.append(x.clone())
        harvests.append(total)
        shares_t.append(m_k)
        mean_t.append(m_i.mean())
        last_ratio = float(mean_t[-1] / m_star)
    stock = torch.stack(stocks)
    below = (stock < collapse * x0).nonzero()
    survival = int(below[0]) if below.numel() else rounds
    harvest = torch.stack(harvests)
    return {"stock": stock.cpu(), "harvest": harvest.cpu(), "shares": torch.stack(shares_t).cpu(),
            "survival": survival, "total_harvest": float(harvest.sum()), "final_stock": float(stock[-1]),
            "last_harvest": float(harvest[-1]), "gini": float(gini(cum)),
            "mean_share": float(torch.stack(mean_t).mean())}


# ------------------------------------------------------------------------------ run


def references(game: CommonsGame, rounds: int, collapse: float) -> pd.DataFrame:
    """Analytic optimum and Nash rows (survival, totals, steady stock), from the closed form."""
    rows = []
    for name, m in (("optimum (analytic)", optimum_fraction(game)), ("nash (analytic)", nash_fraction(game))):
        path = analytic_path(game, min(m, 1.0), rounds)
        below = (path < collapse).nonzero()
        harvest = m * path[:-1]
        rows.append({"arm": name, "mean_share": m, "survival": int(below[0]) if below.numel() else rounds,
                     "total_harvest": float(harvest.sum()), "final_stock": float(path[-1]),
                     "last_harvest": float(harvest[-1]), "steady_stock": steady_stock(game, min(m, 1.0)),
                     "gini": 0.0})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``lpm run commons``: four institutional arms against the analytic optimum and Nash."""
    ap = argparse.ArgumentParser(prog="lpm run commons", description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--delta", type=float, default=0.95)
    ap.add_argument("--collapse", type=float, default=0.05, help="collapse threshold (share of the pristine stock)")
    ap.add_argument("--shares", default="0.4,0.4,0.2", help="cooperative,conditional,selfish shares of agents")
    ap.add_argument("--llm", choices=("rule", "local", "http"), default="rule")
    ap.add_argument("--url", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/commons")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    game = CommonsGame(a.alpha, a.delta, a.agents)
    arch = make_archetypes(a.agents, [float(s) for s in a.shares.split(",")], seed=a.seed, device=a.device)
    if a.llm == "rule":
        backend = make_backend("rule", rule=commons_rule, version="commons-1")
    elif a.llm == "local":
        backend = make_backend("local", device=a.device)
    else:
        backend = make_backend("http", url=a.url, model=a.model, max_tokens=8)
    asker = Asker(backend, cache=AnswerCache(out / "llm_cache.sqlite"), max_attempts=3)
    rows, paths = [], {}
    t0 = time.perf_counter()
    for arm, quota, report in (("no institution", False, False), ("quota", True, False),
                               ("public report", False, True), ("quota + report", True, True)):
        r = simulate(game, arch, asker, a.rounds, quota=quota, report=report, collapse=a.collapse)
        paths[arm] = r["stock"]
        rows.append({"arm": arm, **{k: r[k] for k in ("mean_share", "survival", "total_harvest", "final_stock",
                                                      "last_harvest", "gini")}})
    seconds = time.perf_counter() - t0
    ref = references(game, a.rounds, a.collapse)
    table = pd.concat([pd.DataFrame(rows), ref], ignore_index=True)
    table.to_csv(out / "commons.csv", index=False)
    for _, row in ref.iterrows():
        paths[row["arm"]] = analytic_path(game, min(row["mean_share"], 1.0), a.rounds)
    pd.DataFrame({k: v.numpy() for k, v in paths.items()}).rename_axis("round").to_csv(out / "stock.csv")
    _plot(paths, out / "stock.png", a.collapse)
    info = {"agents": a.agents, "rounds": a.rounds, "alpha": a.alpha, "delta": a.delta, "K": arch.K,
            "optimum_share": optimum_fraction(game), "nash_share": nash_fraction(game),
            "optimum_steady_stock": steady_stock(game, optimum_fraction(game)),
            "nash_steady_stock": steady_stock(game, nash_fraction(game)), "seconds": seconds,
            "backend": f"{backend.name}:{backend.model}", "stats": asker.stats.as_dict()}
    (out / "run.json").write_text(json.dumps(info, indent=2))
    print(table.round(4).to_string(index=False))
    print(f"{a.agents} agents, {arch.K} archetypes, {a.rounds} rounds x 4 arms in {seconds:.1f} s; "
          f"wrote {out}/commons.csv, stock.csv, stock.png, run.json")
    return 0


def _plot(paths: dict[str, Tensor], path: Path, collapse: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, s in paths.items():
        ax.plot(s.numpy(), label=name, ls="--" if "analytic" in name else "-")
    ax.axhline(collapse, color="k", lw=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("stock (pristine = 1)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


EXPERIMENT = Experiment("commons", "archetypes harvest a regenerating commons (GovSim-like) vs optimum and Nash",
                        run=main)

if __name__ == "__main__":
    raise SystemExit(main())
