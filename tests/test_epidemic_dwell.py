"""A stated dwell of k days is k days of acting in the stage, whatever the order of the substeps.

Known contacts: a seed (agent 0) infects agent 1 for sure on its first infectious day, and
each of them has its own audience (groups A and B) of many agents reached by weak edges.
Audiences have no onward edges, so new infections in A (B) happen exactly on the days agent
0 (agent 1) transmits: with P(no infection in an audience | a transmitting day) ~ e^-90, the
days with incidence in A and B are the transmitting days, deterministically.
"""

from __future__ import annotations

import pytest
import torch

from lpm import Model, Network, Params, Positive
from substeps.epidemic import (Dwell, EpiState, EpiSystem, Progression, Transmission, epi_system, incidence, initial_state,
                               seir, sir, stage_counts)

AUDIENCE = 1500


def _known_contacts(disease, device: str) -> tuple[EpiSystem, EpiState]:
    """Agent 0 (seed) -> agent 1 (strong edge); 0 -> group A, 1 -> group B (weak edges)."""
    n = 2 + 2 * AUDIENCE
    a = torch.arange(2, 2 + AUDIENCE)
    b = a + AUDIENCE
    src = torch.cat([torch.tensor([0]), torch.zeros(AUDIENCE, dtype=torch.long), torch.ones(AUDIENCE, dtype=torch.long)])
    dst = torch.cat([torch.tensor([1]), a, b])
    weight = torch.cat([torch.tensor([1e4]), torch.ones(2 * AUDIENCE)])
    net = Network.from_layers({"contacts": (torch.stack([src, dst]), weight)}, n)
    group = torch.cat([torch.tensor([0, 0]), torch.ones(AUDIENCE), 2 * torch.ones(AUDIENCE)]).to(torch.int8)
    seeds = torch.zeros(n, dtype=torch.bool)
    seeds[0] = True
    return epi_system(disease, network=net, group=group, device=device), initial_state(disease, n, seeds, device=device)


def _transmitting_days(model: Model, pair: tuple[EpiSystem, EpiState], steps: int, device: str) -> tuple[list[int], list[int]]:
    res = model.simulate(Params(beta=Positive(0.06)).to(device), *pair, steps, seed=4, progress=False)
    inc = res["by_group"].cpu()
    return [int(d) for d in (inc[:, 1] > 0).nonzero().squeeze(1)], [int(d) for d in (inc[:, 2] > 0).nonzero().squeeze(1)]


def _models(disease):
    obs = {"by_group": incidence(disease, group="group", labels=("seeds", "A", "B")), **stage_counts(disease)}
    tp = Model([Transmission(disease), Progression(disease)], obs, state_type=EpiState)
    pt = Model([Progression(disease), Transmission(disease)], obs, state_type=EpiState)
    return {"transmission->progression": tp, "progression->transmission": pt}


@pytest.mark.parametrize("order", ["transmission->progression", "progression->transmission"])
@pytest.mark.parametrize("k", [1, 4])
def test_sir_infectious_agents_transmit_on_exactly_k_days(order: str, k: int, device: str) -> None:
    disease = sir(recovery=Dwell.fixed(k))
    days_a, days_b = _transmitting_days(_models(disease)[order], _known_contacts(disease, device), 3 * k + 4, device)
    # the seed acts on days 0 .. k-1; agent 1, infected on day 0, on days 1 .. k
    assert days_a == list(range(0, k)), (order, days_a)
    assert days_b == list(range(1, k + 1)), (order, days_b)


@pytest.mark.parametrize("order", ["transmission->progression", "progression->transmission"])
def test_seir_latent_and_infectious_dwells_are_exact(order: str, device: str) -> None:
    disease = seir(Dwell.fixed(2), Dwell.fixed(3))
    days_a, days_b = _transmitting_days(_models(disease)[order], _known_contacts(disease, device), 14, device)
    # seed: E on days 0-1, I on days 2-4; agent 1 infected on day 2: E on days 3-4, I on days 5-7
    assert days_a == [2, 3, 4], (order, days_a)
    assert days_b == [5, 6, 7], (order, days_b)
