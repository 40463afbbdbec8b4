"""Commons study: analytic optimum and Nash of the fish war, simulated paths, institutions, 1e6 agents."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.commons import (
    CommonsGame, analytic_path, commons_rule, gini, harvest_question, make_archetypes, nash_fraction,
    optimum_fraction, simulate, steady_stock,
)
from llm_archetypes import Asker, RuleBackend


def _value(game: CommonsGame, own: float, others: float, rounds: int = 400) -> float:
    """One agent's discounted log harvest when it takes fraction ``own`` of the stock and each other ``others``."""
    x, v = 1.0, 0.0
    for t in range(rounds):
        v += game.delta ** t * math.log(own * x)
        x = max(x * (1 - own - (game.n_agents - 1) * others), 1e-300) ** game.alpha
    return v


def _welfare(game: CommonsGame, total: float, rounds: int = 400) -> float:
    x, v = 1.0, 0.0
    for t in range(rounds):
        v += game.delta ** t * game.n_agents * math.log(total * x / game.n_agents)
        x = (x * (1 - total)) ** game.alpha
    return v


@pytest.mark.parametrize("n", [2, 5])
def test_nash_fraction_is_a_best_response(n: int) -> None:
    """Given the others play the analytic Nash share, no other constant share does better for one agent."""
    game = CommonsGame(alpha=0.5, delta=0.9, n_agents=n)
    phi = nash_fraction(game) / n
    best = _value(game, phi, phi)
    for eps in (-0.05, -0.01, 0.01, 0.05):
        assert _value(game, phi + eps, phi) < best


def test_optimum_maximises_welfare() -> None:
    game = CommonsGame(alpha=0.6, delta=0.95, n_agents=4)
    f = optimum_fraction(game)
    best = _welfare(game, f)
    for eps in (-0.05, -0.01, 0.01, 0.05):
        assert _welfare(game, f + eps) < best


def test_nash_harvests_more_than_optimum_and_tends_to_all() -> None:
    g1 = CommonsGame(n_agents=1)
    assert nash_fraction(g1) == pytest.approx(optimum_fraction(g1))   # a sole owner is the planner
    shares = [nash_fraction(CommonsGame(n_agents=n)) for n in (2, 10, 1000, 1_000_000)]
    assert all(a < b for a, b in zip(shares, shares[1:]))
    assert shares[0] > optimum_fraction(g1)
    assert shares[-1] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("which", ["optimum", "nash"])
def test_rule_agents_reach_the_analytic_steady_state(which: str) -> None:
    game = CommonsGame(alpha=0.5, delta=0.95, n_agents=3000)
    arch = make_archetypes(game.n_agents, seed=1)
    m = optimum_fraction(game) if which == "optimum" else nash_fraction(game)
    r = simulate(game, arch, None, 30, fraction=m)
    assert r["final_stock"] == pytest.approx(steady_stock(game, m), rel=1e-6)
    assert torch.allclose(r["stock"], analytic_path(game, m, 30), rtol=1e-9)
    assert r["gini"] == pytest.approx(0.0, abs=1e-12)                  # identical agents, identical harvests


@pytest.mark.parametrize("n", [200_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_optimum_rule_agents_persist_and_nash_collapses(n: int) -> None:
    game = CommonsGame(alpha=0.5, delta=0.95, n_agents=n)
    arch = make_archetypes(game.n_agents, seed=0)
    coop = simulate(game, arch, None, 20, fraction=optimum_fraction(game))
    nash = simulate(game, arch, None, 20, fraction=nash_fraction(game))
    assert coop["survival"] == 20 and coop["final_stock"] == pytest.approx(0.475, rel=1e-6)
    # Nash with many agents: the steady stock is (ad / (N - (N-1) ad))^(a/(1-a)), ~ 9e-7 at a million
    assert steady_stock(game, nash_fraction(game)) == pytest.approx(0.475 / (n - (n - 1) * 0.475), rel=1e-6)
    assert nash["survival"] == 1 and nash["final_stock"] < 1e-4
    assert nash["total_harvest"] < coop["total_harvest"]


def _rule_asker() -> Asker:
    return Asker(RuleBackend(commons_rule), mode="off")


def test_institutions_with_rule_archetypes() -> None:
    game = CommonsGame(n_agents=20_000)
    arch = make_archetypes(game.n_agents, seed=0)
    base = simulate(game, arch, _rule_asker(), 25)
    quota = simulate(game, arch, _rule_asker(), 25, quota=True)
    report = simulate(game, arch, _rule_asker(), 25, report=True)
    m_star = optimum_fraction(game)
    # the quota (enforced) brings every harvest to the sustainable share: the optimum's steady state
    assert quota["mean_share"] == pytest.approx(m_star, abs=1e-3)
    assert quota["final_stock"] == pytest.approx(steady_stock(game, m_star), rel=2e-3)
    assert base["mean_share"] > report["mean_share"] > quota["mean_share"]
    assert base["final_stock"] < report["final_stock"] < quota["final_stock"]
    assert base["gini"] > 0.05 > quota["gini"]                         # mixed norms harvest unequally


def test_harvest_question_renders_and_rule_reads_context() -> None:
    q = harvest_question()
    p = q.render({"norm": "conditional", "need": "low"},
                 {"stock": 0.5, "sustainable": "52.5", "quota": "",
                  "report": "Public report: last round the average fisher took far above the sustainable share.\n"})
    assert "moderate" in p and "52.5%" in p and p.endswith("Answer:")
    assert commons_rule(p) == 100.0
    quiet = q.render({"norm": "conditional", "need": "low"},
                     {"stock": 0.9, "sustainable": "52.5", "quota": "", "report": ""})
    assert commons_rule(quiet) == pytest.approx(76.2, abs=0.1)


def test_gini_known_values() -> None:
    assert float(gini(torch.ones(10))) == pytest.approx(0.0)
    x = torch.zeros(100)
    x[0] = 1.0
    assert float(gini(x)) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="gini"):
        gini(torch.ones(2, 2))


def test_bad_game_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="alpha"):
        CommonsGame(alpha=1.0)
    with pytest.raises(ValueError, match="shares"):
        make_archetypes(10, (0.5, 0.5, 0.5))


def test_cli_run_commons(tmp_path) -> None:
    from lpm.cli import main

    out = tmp_path / "commons"
    assert main(["run", "commons", "--agents", "5000", "--rounds", "10", "--out", str(out)]) == 0
    import pandas as pd

    t = pd.read_csv(out / "commons.csv").set_index("arm")
    assert {"no institution", "quota", "public report", "quota + report", "optimum (analytic)",
            "nash (analytic)"} <= set(t.index)
    assert (out / "stock.png").exists()
