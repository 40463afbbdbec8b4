"""Invariants and directional effects of the network epidemic."""

from __future__ import annotations

import torch

from lpm import Model, Network, Params, Positive
from lpm.networks import erdos_renyi, household_cliques
from substeps.epidemic import (DiseaseModel, Dwell, EpiState, Progression, Transition, Transmission, epi_system,
                               epidemic_model, incidence, initial_state, seir, seirm, stage_counts)

N = 4000


def setup(device: str, seed: int = 0):
    disease = seirm(Dwell.gamma(3.0, 1.0), Dwell.gamma(5.0, 2.0), fatality=0.05)
    hh = torch.randint(0, N // 3, (N,), generator=torch.Generator().manual_seed(seed))
    net = Network.from_layers({"household": household_cliques(hh), "community": erdos_renyi(N, 6.0, seed=seed + 1)}, N)
    state = initial_state(disease, N, 20, seed=seed, device=device)
    return disease, epidemic_model(disease), epi_system(disease, network=net, device=device), state


def attack(res, n: int = N) -> float:
    return float(res["R"][-1] + res["M"][-1] + res["I"][-1] + res["E"][-1]) / n


def test_conservation_and_non_negativity(device: str) -> None:
    disease, model, system, state = setup(device)
    res = model.simulate(Params(beta=Positive(0.06)).to(device), system, state, 80, seed=1)
    total = sum(res[s] for s in disease.stages)
    assert bool((total == N).all())
    for s in disease.stages:
        assert bool((res[s] >= 0).all())
    assert bool((res["incidence"] >= 0).all())
    # cumulative incidence equals everyone who left S, minus the initial seeds
    assert int(res["incidence"].sum()) == N - int(res["S"][-1]) - 20
    # R and M only grow
    assert bool((res["R"].diff() >= 0).all()) and bool((res["M"].diff() >= 0).all())


def test_beta_zero_means_no_infections(device: str) -> None:
    _, model, system, state = setup(device)
    res = model.simulate(Params(beta=Positive(1e-30)).to(device), system, state, 40, seed=1)
    assert int(res["incidence"].sum()) == 0 and int(res["S"][-1]) == N - 20


def test_higher_beta_higher_attack_rate(device: str) -> None:
    _, model, system, state = setup(device)
    rates = []
    for beta in (0.02, 0.05, 0.1):
        runs = [attack(model.simulate(Params(beta=Positive(beta)).to(device), system, state, 120, seed=s)) for s in range(4)]
        rates.append(sum(runs) / len(runs))
    assert rates[0] < rates[1] < rates[2], rates


def test_fatality_branch_share(device: str) -> None:
    _, model, system, state = setup(device)
    res = model.simulate(Params(beta=Positive(0.1)).to(device), system, state, 160, seed=3)
    dead, rec = float(res["M"][-1]), float(res["R"][-1])
    share = dead / (dead + rec)
    # binomial sd with ~3000 resolved cases is ~0.004
    assert abs(share - 0.05) < 0.015, share


def test_fixed_dwell_is_exact(device: str) -> None:
    disease = DiseaseModel(("S", "E", "I", "R"), {"I": 1.0}, "E", {"E": Dwell.fixed(3), "I": Dwell.fixed(4)},
                           {"E": Transition("I"), "I": Transition("R")})
    n = 50
    state = initial_state(disease, n, torch.ones(n, dtype=torch.bool), device=device)
    system = epi_system(disease, network=Network.from_layers({"r": erdos_renyi(n, 2.0)}, n), device=device)
    res = epidemic_model(disease).simulate(Params(beta=Positive(0.1)).to(device), system, state, 10)
    # all start in E (dwell 3) -> I at step 3 -> R at step 7
    assert res["E"].tolist() == [n, n, 0, 0, 0, 0, 0, 0, 0, 0]
    assert res["I"].tolist() == [0, 0, n, n, n, n, 0, 0, 0, 0]


def test_order_of_substeps_does_not_change_dwell_semantics(device: str) -> None:
    disease = seir(Dwell.fixed(2), Dwell.fixed(3))
    n = 2000
    net = Network.from_layers({"r": erdos_renyi(n, 6.0, seed=2)}, n)
    state = initial_state(disease, n, 10, device=device)
    system = epi_system(disease, network=net, device=device)
    obs = {"incidence": incidence(disease), **stage_counts(disease)}
    a = Model([Progression(disease), Transmission(disease)], obs, state_type=EpiState).simulate(Params(beta=Positive(0.1)).to(device), system, state, 30, seed=1)
    b = Model([Transmission(disease), Progression(disease)], obs, state_type=EpiState).simulate(Params(beta=Positive(0.1)).to(device), system, state, 30, seed=1)
    assert int(a["incidence"].sum()) > 100
    # the same streams are drawn; only who sees whose infectiousness within a step differs
    for res in (a, b):
        assert int(res["incidence"].sum()) == n - 10 - int(res["S"][-1])
        assert bool((res["S"] + res["E"] + res["I"] + res["R"] == n).all())


def test_permuting_agent_labels_leaves_aggregates_unchanged_in_distribution(device: str) -> None:
    disease = seir(Dwell.gamma(3.0, 1.0), Dwell.geometric(0.25))
    n = 3000
    ei = erdos_renyi(n, 6.0, seed=4)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(9))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    seeds_mask = torch.zeros(n, dtype=torch.bool)
    seeds_mask[:15] = True
    model = epidemic_model(disease)
    params = Params(beta=Positive(0.07)).to(device)
    s1 = initial_state(disease, n, seeds_mask, device=device)
    s2 = initial_state(disease, n, seeds_mask[inv], device=device)
    y1 = epi_system(disease, network=Network.from_layers({"r": ei}, n), device=device)
    y2 = epi_system(disease, network=Network.from_layers({"r": perm[ei]}, n), device=device)
    a = torch.tensor([float(model.simulate(params, y1, s1, 100, seed=k)["incidence"].sum()) for k in range(12)])
    b = torch.tensor([float(model.simulate(params, y2, s2, 100, seed=100 + k)["incidence"].sum()) for k in range(12)])
    se = ((a.var() + b.var()) / 12).sqrt()
    assert abs(float(a.mean() - b.mean())) < 4 * float(se) + 20, (a.mean(), b.mean(), se)
