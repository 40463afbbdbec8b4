"""The replicate axis: R replicates or arms in one batch equal the single runs they stand for."""

from __future__ import annotations

import pytest
import torch

from lpm import Intervention, Model, ModelError, Modulate, Network, Params, Positive, System
from lpm.networks import erdos_renyi, household_cliques
from lpm.replicates import ReplicateError, batch_states
from substeps.epidemic import (Dwell, EpiState, EpiSystem, Progression, Transmission, epi_system, incidence, initial_state,
                               seir, stage_counts)

SHARED = ("layer_scale", "entered_step")


def _seir(device: str, n: int = 2000, infected: int = 8, seed: int = 0):
    disease = seir(Dwell.gamma(3.0, 1.5), Dwell.gamma(5.0, 2.0))
    hh = torch.randint(0, n // 3, (n,), generator=torch.Generator().manual_seed(seed))
    net = Network.from_layers({"household": household_cliques(hh), "community": erdos_renyi(n, 6.0, seed=seed + 1)}, n)
    state = initial_state(disease, n, infected, seed=seed, layer_scale=torch.ones(2)).to(device)
    system = epi_system(disease, network=net, layer_scale_base=torch.ones(2), device=device)
    sched = torch.ones(60, 2)
    sched[10:30, 1] = 0.3
    model = Model([Modulate("lockdown", "layer_scale", "layer_scale_base", [Intervention("lockdown", sched)]),
                   Progression(disease), Transmission(disease, use_layer_scale=True)],
                  {"incidence": incidence(disease), **stage_counts(disease)}, state_type=EpiState, system_type=EpiSystem)
    return model, Params(beta=Positive(0.08)).to(device), system, state, disease


def test_replicate_r_equals_single_run_with_seed_r(device: str) -> None:
    model, params, system, state, _ = _seir(device)
    seeds = [3, 0, 11]
    batch = model.replicate(params, system, state, 40, seeds=seeds, shared=SHARED)
    assert batch["incidence"].shape == (40, 3) and batch["S"].shape == (40, 3)
    for r, s in enumerate(seeds):
        single = model.simulate(params, system, state, 40, seed=s, progress=False)
        for k in single.names:
            assert torch.equal(batch[k][:, r], single[k]), (k, r)
        part = batch.meta["layout"].part(batch.final_state, r)
        assert torch.equal(part.stage, single.final_state.stage)
    # different seeds give different replicates (the axis is not a copy)
    assert not torch.equal(batch["incidence"][:, 0], batch["incidence"][:, 1])
    tidy = batch.to_pandas(names=["incidence"])
    assert len(tidy) == 40 * 3 and tidy["group"].str.startswith("2/").any()


def test_counterfactual_arms_share_streams(device: str) -> None:
    model, params, system, state, disease = _seir(device)
    n = state.stage.numel()
    # arm b: a third of agents half as susceptible; same seed -> common random numbers
    half = torch.where(torch.arange(n, device=device) % 3 == 0, 0.5, 1.0)
    model_s = Model([*model.substeps[:2], Transmission(disease, use_layer_scale=True, use_susceptibility=True)],
                    model.observables, state_type=EpiState)
    arms = [state.replace(susceptibility=torch.ones(n, device=device)), state.replace(susceptibility=half)]
    batch = model_s.replicate(params, system, arms, 40, seeds=[7, 7], shared=SHARED)
    for r in range(2):
        single = model_s.simulate(params, system, arms[r], 40, seed=7, progress=False)
        assert torch.equal(batch["incidence"][:, r], single["incidence"])
    same = model_s.replicate(params, system, [arms[0], arms[0]], 40, seeds=[7, 7], shared=SHARED)
    assert torch.equal(same["incidence"][:, 0], same["incidence"][:, 1])
    assert batch["incidence"][:, 1].sum() < batch["incidence"][:, 0].sum()


def test_arms_with_different_networks_batch_as_one_system(device: str) -> None:
    """Systems are batched like states: replicate r runs on its own network (disjoint union of the graphs)."""
    model, params, system, state, disease = _seir(device, n=1500)
    n = state.stage.numel()
    sparse = system.replace(network=Network.from_layers({"household": (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)),
                                                         "community": erdos_renyi(n, 2.0, seed=9)}, n).to(device))
    batch = model.replicate(params, [system, sparse], state, 40, seeds=[5, 5], shared=SHARED)
    assert batch.meta["layout"].edges == (system.network.num_edges, sparse.network.num_edges)
    for r, y in enumerate([system, sparse]):
        single = model.simulate(params, y, state, 40, seed=5, progress=False)
        for k in single.names:
            assert torch.equal(batch[k][:, r], single[k]), (k, r)
    assert batch["incidence"][:, 1].sum() < batch["incidence"][:, 0].sum()


def test_misinformation_spread_batches_exactly(device: str) -> None:
    from lpm.networks import preferential_attachment
    from substeps.information import Spread, initial_information, information_observables
    from lpm import Fixed

    n = 1500
    net = Network.from_layers({"f": preferential_attachment(n, 3, seed=2, device=device)}, n, coalesce=False)
    system, base = initial_information(n, torch.arange(10, device=device), network=net, device=device)
    prebunked = torch.rand(n, generator=torch.Generator().manual_seed(0)).to(device) < 0.3
    arms = [system, system.replace(prebunked=prebunked)]
    model = Model([Spread()], information_observables())
    p = Params(share_rate=Fixed(0.3), stifle=Fixed(0.3), prebunk_efficacy=Fixed(0.6)).to(device)
    batch = model.replicate(p, arms, base, 30, seeds=[1, 1])
    for r in range(2):
        single = model.simulate(p, arms[r], base, 30, seed=1, progress=False)
        for k in single.names:
            assert torch.equal(batch[k][:, r], single[k]), k


def test_unbatchable_plans_fail_with_names(device: str) -> None:
    model, params, system, state, _ = _seir(device, n=300)
    with pytest.raises(ModelError, match="substep 'lockdown' writes field 'layer_scale', which has no agent axis"):
        model.replicate(params, system, state, 2, seeds=[0, 1])
    from substeps.opinion import OpinionState, PairwiseBoundedConfidence, initial_opinions
    from lpm import Interval

    x = torch.linspace(-1, 1, 300, device=device)
    sy, st = initial_opinions(x, Network.from_layers({"f": erdos_renyi(300, 4.0)}, 300).to(device))
    pw = Model([PairwiseBoundedConfidence(use_exposure=False)], state_type=OpinionState)
    with pytest.raises(ReplicateError, match="substep 'pairwise' draws"):
        pw.replicate(Params(confidence=Interval(0.5, 0, 3), convergence=Interval(0.3, 0, 1)).to(device), sy, st, 2,
                     seeds=[0, 1])
    other = system.replace(layer_scale_base=torch.full((2,), 0.5, device=device))
    with pytest.raises(ReplicateError, match="layer_scale_base: differs between replicates"):
        batch_states([system, other], [state, state])
