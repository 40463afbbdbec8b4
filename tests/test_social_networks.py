"""Social-network generators and diagnostics: analytic identities and cross-checks."""


import pytest
import torch

from lpm.networks import (
    assortativity,
    clustering,
    degree_distribution,
    follow_graph,
    friendship_paradox,
    homophilous_sbm,
    preferential_attachment,
    small_world,
)

from conftest import DEVICE  # one source: the device fixture's value


def _simple_undirected(ei: torch.Tensor, n: int) -> None:
    keys = set(map(tuple, ei.T.tolist()))
    assert all((b, a) in keys for a, b in keys), "every tie must be stored in both directions"
    assert not any(a == b for a, b in keys), "no self-loops"
    assert len(keys) == ei.shape[1], "no duplicate edges"
    assert int(ei.max()) < n


@pytest.mark.parametrize("gen", ["pa", "ws", "sbm"])
def test_mean_neighbour_degree_is_k2_over_k(gen):
    n = 3000
    if gen == "pa":
        ei = preferential_attachment(n, 3, seed=1, device=DEVICE)
    elif gen == "ws":
        ei = small_world(n, 8, 0.2, seed=1, device=DEVICE)
    else:
        group = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        ei = homophilous_sbm(group, 8.0, 0.8, seed=1)
    _simple_undirected(ei.cpu(), n)
    fp = friendship_paradox(ei, n)
    # independent computation from the degree sequence alone
    k = torch.bincount(ei[0].cpu(), minlength=n).double()
    assert fp["mean_neighbour_degree"] == pytest.approx(float((k * k).mean() / k.mean()), rel=1e-12)
    # friends have more friends on average (strictly, since degrees vary)
    assert fp["mean_neighbour_degree"] > fp["mean_degree"]


def test_preferential_attachment_is_heavy_tailed_and_paradox_strong():
    n, m = 20000, 3
    ei = preferential_attachment(n, m, seed=2, device=DEVICE)
    deg, counts = degree_distribution(ei, n)
    assert int(deg.min()) >= 1
    # mean degree ~ 2m (a few duplicate picks are erased)
    assert 2 * m * 0.95 < float(deg.double().mean()) <= 2 * m + 0.01
    # BA: P(k >= K) ~ (m/K)^2 -> far more hubs than an ER graph of the same mean degree
    assert int((deg >= 60).sum()) > 0.5 * n * (m / 60) ** 2
    fp = friendship_paradox(ei, n)
    assert fp["share_fewer"] > 0.8


def test_small_world_clustering_matches_formula_and_networkx():
    n, k, p = 4000, 10, 0.0
    ei = small_world(n, k, p, seed=3, device=DEVICE)
    c = clustering(ei, n)
    # ring lattice: C = 3(k-2) / (4(k-1)) exactly
    assert c["transitivity"] == pytest.approx(3 * (k - 2) / (4 * (k - 1)), rel=1e-9)
    ei = small_world(n, k, 0.1, seed=3, device=DEVICE)
    c = clustering(ei, n)
    nx = pytest.importorskip("networkx")
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(ei.cpu().T.tolist())
    assert c["transitivity"] == pytest.approx(nx.transitivity(g), rel=1e-9)
    assert c["average_local_all"] == pytest.approx(nx.average_clustering(g), rel=1e-9)
    sampled = clustering(ei, n, samples=200_000, seed=1)
    assert sampled["transitivity"] == pytest.approx(nx.transitivity(g), abs=0.01)
    assert assortativity(ei, n) == pytest.approx(nx.degree_assortativity_coefficient(g), abs=1e-9)


def test_star_is_disassortative_and_homophily_assorts():
    n = 50
    hub = torch.zeros(n - 1, dtype=torch.long)
    leaves = torch.arange(1, n)
    star = torch.cat([torch.stack([hub, leaves]), torch.stack([leaves, hub])], 1)
    assert assortativity(star, n) == pytest.approx(-1.0, abs=1e-12)
    n = 6000
    group = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for h, lo, hi in ((0.0, 0.15, 0.35), (0.9, 0.85, 0.97)):
        ei = homophilous_sbm(group, 10.0, h, seed=2)
        same = float((group[ei[0]] == group[ei[1]]).double().mean())
        # expected in-group share: h + (1 - h) * sum share^2 (~0.25 for 4 equal groups)
        assert lo < same < hi, (h, same)


def test_follow_graph_is_directed_with_reciprocity():
    n = 5000
    ei = follow_graph(n, 5, reciprocity=0.3, seed=4, device=DEVICE).cpu()
    keys = set(map(tuple, ei.T.tolist()))
    recip = sum((b, a) in keys for a, b in keys) / len(keys)
    # a share r of follows is returned: reciprocal edges = 2r/(1+r) of all edges
    assert recip == pytest.approx(2 * 0.3 / 1.3, abs=0.03)
    indeg, _ = degree_distribution(ei, n, "in")
    outdeg, _ = degree_distribution(ei, n, "out")
    # every account follows m = 5 others (fewer only after erased duplicate picks) ...
    assert float(indeg[6:].double().median()) >= 5
    # ... while follower counts are heavy-tailed
    assert int(outdeg.max()) > 20 * 5
