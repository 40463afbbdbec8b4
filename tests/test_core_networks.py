"""Layered networks and generators: degrees, mixing, CSR push, torch-geometric interop."""

from __future__ import annotations

import pytest
import torch

from lpm import Network, StateError
from lpm.networks import configuration_model, contact_matrix_sbm, erdos_renyi, household_cliques


def test_erdos_renyi_mean_degree_simple_symmetric() -> None:
    ei = erdos_renyi(20_000, 10.0, seed=3)
    assert abs(ei.shape[1] / 20_000 - 10.0) < 0.05
    assert bool((ei[0] != ei[1]).all())
    key = ei[0] * 20_000 + ei[1]
    assert key.unique().numel() == key.numel()  # no multi-edges
    rev = ei[1] * 20_000 + ei[0]
    assert torch.equal(key.sort().values, rev.sort().values)  # undirected


def test_configuration_model_keeps_degrees() -> None:
    g = torch.Generator().manual_seed(0)
    deg = torch.randint(1, 20, (10_000,), generator=g)
    ei = configuration_model(deg, seed=1)
    got = torch.bincount(ei[0], minlength=10_000)
    # erasing self-loops and multi-edges removes only a small share of stubs
    assert float(got.sum()) / float(deg.sum()) > 0.99
    assert torch.corrcoef(torch.stack([got.float(), deg.float()]))[0, 1] > 0.99


def test_household_cliques_are_complete() -> None:
    hh = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])[torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    ei = household_cliques(hh)
    assert ei.shape[1] == 3 * 2 + 0 + 2 * 1 + 4 * 3
    assert bool((hh[ei[0]] == hh[ei[1]]).all()) and bool((ei[0] != ei[1]).all())


def test_contact_matrix_sbm_reproduces_the_matrix() -> None:
    G = 4
    gen = torch.Generator().manual_seed(5)
    group = torch.randint(0, G, (40_000,), generator=gen)
    sizes = torch.bincount(group, minlength=G).double()
    raw = torch.rand(G, G, generator=gen).double() * 4
    # a reciprocal matrix: n_g C_gh == n_h C_hg
    pair = (raw + raw.T) / 2
    C = pair / sizes[:, None] * 10_000
    ei = contact_matrix_sbm(group, C, seed=2)
    counts = torch.zeros(G, G, dtype=torch.float64).index_put_((group[ei[0]], group[ei[1]]), torch.ones(ei.shape[1], dtype=torch.float64), accumulate=True)
    got = counts / sizes[:, None]
    assert torch.corrcoef(torch.stack([got.flatten(), C.flatten()]))[0, 1] > 0.99
    assert torch.allclose(got, C, rtol=0.08)


def test_push_matches_dense_and_frontier_is_exact(device: str) -> None:
    n = 300
    a = erdos_renyi(n, 6.0, seed=1)
    b = erdos_renyi(n, 3.0, seed=2)
    wb = torch.rand(b.shape[1], generator=torch.Generator().manual_seed(0))
    net = Network.from_layers({"a": a, "b": (b, wb)}, n).to(device)
    value = torch.rand(n, device=device)
    scale = torch.tensor([0.5, 2.0], device=device)
    dense = torch.zeros(n, n, dtype=torch.float64)
    dense.index_put_((a[1], a[0]), torch.full((a.shape[1],), 0.5, dtype=torch.float64), accumulate=True)
    dense.index_put_((b[1], b[0]), 2.0 * wb.double(), accumulate=True)
    expected = (dense @ value.cpu().double()).float()
    got = net.push(value, layer_scale=scale)
    assert torch.allclose(got.cpu(), expected, atol=1e-5)
    active = torch.rand(n, device=device) < 0.2
    masked = torch.where(active, value, torch.zeros_like(value))
    assert torch.allclose(net.push(masked, active=active, layer_scale=scale), net.push(masked, layer_scale=scale), atol=1e-6)
    per_layer = torch.stack([value, torch.zeros_like(value)], 1)  # only layer a contributes
    only_a = (dense.clone().index_put_((b[1], b[0]), -2.0 * wb.double(), accumulate=True) @ value.cpu().double()).float()
    assert torch.allclose(net.push(per_layer, layer_scale=scale).cpu(), only_a, atol=1e-5)


def test_network_validation_and_pyg_roundtrip() -> None:
    with pytest.raises(StateError, match=r"layers\['work'\].edge_index: expected ids in \[0, 10\)"):
        Network.from_layers({"work": torch.tensor([[0, 1], [1, 10]])}, 10)
    with pytest.raises(StateError, match=r"edge_index: expected 2 dimension"):
        Network.from_layers({"work": torch.tensor([0, 1])}, 10)
    with pytest.raises(StateError, match=r"weight: expected values >= 0"):
        Network.from_layers({"work": (torch.tensor([[0], [1]]), torch.tensor([-1.0]))}, 10)
    net = Network.from_layers({"h": household_cliques(torch.tensor([0, 0, 1, 1, 1])), "r": erdos_renyi(5, 2.0, seed=0)}, 5)
    assert net.edge_index.dtype == torch.int32 and net.layer.dtype == torch.int8
    data = net.to_pyg()
    back = Network.from_pyg(data, layer_names=net.layer_names)
    assert torch.equal(back.edge_index, net.edge_index) and torch.equal(back.layer, net.layer)
    assert torch.equal(net.out_degree(), torch.bincount(net.edge_index[0].long(), minlength=5))
    from torch_geometric.utils import degree

    assert torch.equal(net.in_degree().float(), degree(data.edge_index[1], 5))
