"""Social-network generators and diagnostics as tensor operations.

Generators return edge lists ``[2, E]`` (source, target). Undirected generators store each
tie as two directed edges (like :mod:`lpm.networks.generators`); the follow-graph generator
returns directed edges ``followed -> follower`` (the follower sees the followed agent's
posts), which is the direction :meth:`lpm.Network.push` moves information.

Diagnostics (degree distribution, clustering, assortativity, friendship paradox) are
vectorized: wedges are enumerated or sampled as index tensors and closed-wedge checks are a
``searchsorted`` into the sorted edge keys; no Python loop over agents or edges.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm.networks.generators import contact_matrix_sbm, make_generator, symmetrize
from lpm.state import check_tensor

__all__ = [
    "preferential_attachment",
    "small_world",
    "homophilous_sbm",
    "follow_graph",
    "degree_distribution",
    "clustering",
    "assortativity",
    "friendship_paradox",
]

_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_n(num_nodes: int, low: int = 2) -> None:
    if not isinstance(num_nodes, int) or num_nodes < low:
        raise ConfigError(f"num_nodes: expected an int >= {low}, got {num_nodes!r}")


def _pa_targets(num_nodes: int, m: int, g: torch.Generator, device: torch.device | str) -> Tensor:
    """Directed preferential-attachment edges ``[2, E]`` (new node -> chosen older node).

    Batagelj-Brandes: the endpoint list ``M`` has ``M[2e] = new node`` and ``M[2e+1] =
    M[r]`` with ``r`` uniform over the endpoints of *earlier nodes'* edges, so an older node
    is chosen with probability proportional to its degree. The copy chains are resolved by
    pointer jumping (O(log chain) vectorized passes) instead of a sequential loop.
    """
    seed_nodes = m + 1
    # seed: a clique on the first m + 1 nodes, so every later node has m candidates
    s = torch.triu_indices(seed_nodes, seed_nodes, 1, device=device)
    e0 = s.shape[1]
    new = torch.arange(seed_nodes, num_nodes, device=device).repeat_interleave(m)
    e_new = new.numel()
    total_edges = e0 + e_new
    src = torch.cat([s[1], new])
    dst = torch.cat([s[0], torch.zeros(e_new, dtype=torch.long, device=device)])
    endpoints = torch.stack([src, dst], 1).reshape(-1)  # M, length 2E; odd slots of new edges unresolved
    # endpoints of edges of nodes before `new`: seed edges + m per earlier new node
    first_edge_of_node = e0 + (new - seed_nodes) * m
    r = (torch.rand(e_new, generator=g, device=device, dtype=torch.float64) * (2 * first_edge_of_node).double()).long()
    ptr = torch.arange(2 * total_edges, device=device)
    odd_new = 2 * torch.arange(e0, total_edges, device=device) + 1
    ptr[odd_new] = r
    resolved = torch.ones(2 * total_edges, dtype=torch.bool, device=device)
    resolved[odd_new] = False
    # pointer jumping: follow copies until every slot points at a resolved slot
    while not bool(resolved[ptr].all()):
        ptr = torch.where(resolved[ptr], ptr, ptr[ptr])
    endpoints = endpoints[ptr]
    return endpoints.view(-1, 2).T.contiguous()


def preferential_attachment(num_nodes: int, m: int, seed: int | torch.Generator | None = 0,
                            device: torch.device | str = "cpu") -> Tensor:
    """Scale-free Barabasi-Albert graph (undirected, ``m`` ties per new node, P(k) ~ k^-3)."""
    _check_n(num_nodes)
    if not isinstance(m, int) or m < 1 or m >= num_nodes:
        raise ConfigError(f"m: expected an int in [1, {num_nodes}), got {m!r}")
    g = make_generator(seed, device)
    return symmetrize(_pa_targets(num_nodes, m, g, device), num_nodes)


def small_world(num_nodes: int, k: int, p: float, seed: int | torch.Generator | None = 0,
                device: torch.device | str = "cpu") -> Tensor:
    """Watts-Strogatz: ring lattice with ``k`` neighbours (k even), each tie rewired w.p. ``p``.

    High clustering (about ``3(k-2)/(4(k-1)) (1-p)^3``) with short paths for small ``p``.
    """
    _check_n(num_nodes, 3)
    if not isinstance(k, int) or k < 2 or k % 2 or k >= num_nodes:
        raise ConfigError(f"k: expected an even int in [2, {num_nodes}), got {k!r}")
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"p: expected a rewiring probability in [0, 1], got {p}")
    g = make_generator(seed, device)
    i = torch.arange(num_nodes, device=device).repeat_interleave(k // 2)
    j = (i + torch.arange(1, k // 2 + 1, device=device).repeat(num_nodes)) % num_nodes
    rewire = torch.rand(i.numel(), generator=g, device=device) < p
    j = torch.where(rewire, torch.randint(0, num_nodes, (i.numel(),), generator=g, device=device), j)
    return symmetrize(torch.stack([i, j]), num_nodes)


def homophilous_sbm(group: Tensor, mean_degree: float, homophily: float,
                    seed: int | torch.Generator | None = 0) -> Tensor:
    """Stochastic block network over agent attributes: a share ``homophily`` of ties in-group.

    ``group [N]`` codes (e.g. party id x education). Each agent has ``mean_degree`` expected
    ties; a fraction ``homophily`` of them go to its own group, the rest to agents drawn in
    proportion to group size (``homophily = 0``: no assortment beyond chance).
    """
    check_tensor("group", group, ("N",), _INT, low=0)
    if not 0.0 <= homophily <= 1.0:
        raise ConfigError(f"homophily: expected in [0, 1], got {homophily}")
    if mean_degree <= 0:
        raise ConfigError(f"mean_degree: expected > 0, got {mean_degree}")
    n_g = torch.bincount(group.long()).double().cpu()  # the small [G, G] table is built on the host
    share = n_g / n_g.sum()
    G = n_g.numel()
    contacts = mean_degree * (homophily * torch.eye(G, dtype=torch.float64) + (1 - homophily) * share[None, :])
    return symmetrize(contact_matrix_sbm(group, contacts.float().to(group.device), seed), group.numel())


def follow_graph(num_nodes: int, m: int, reciprocity: float = 0.3, seed: int | torch.Generator | None = 0,
                 device: torch.device | str = "cpu") -> Tensor:
    """Directed follow graph ``followed -> follower``: heavy-tailed follower counts.

    Each new account follows ``m`` older accounts chosen by preferential attachment
    (follower counts ~ k^-3); each follow is returned (followed back) with probability
    ``reciprocity``. Edge ``j -> i`` means ``i`` sees ``j``'s posts.
    """
    _check_n(num_nodes)
    if not 0.0 <= reciprocity <= 1.0:
        raise ConfigError(f"reciprocity: expected in [0, 1], got {reciprocity}")
    g = make_generator(seed, device)
    follower_followed = _pa_targets(num_nodes, m, g, device)  # new -> older = follower -> followed
    ei = follower_followed.flip(0)
    back = torch.rand(ei.shape[1], generator=g, device=device) < reciprocity
    ei = torch.cat([ei, ei[:, back].flip(0)], 1)
    from torch_geometric.utils import coalesce, remove_self_loops

    ei, _ = remove_self_loops(ei)
    return coalesce(ei, num_nodes=num_nodes)


def degree_distribution(edge_index: Tensor, num_nodes: int, direction: str = "out") -> tuple[Tensor, Tensor]:
    """``(degree [N], counts [k_max + 1])``: degrees (``out``/``in`` edges) and their histogram."""
    check_tensor("edge_index", edge_index, (2, "E"), _INT)
    if direction not in ("out", "in"):
        raise ConfigError(f"direction: expected 'out' or 'in', got {direction!r}")
    row = edge_index[0 if direction == "out" else 1].long()
    deg = torch.bincount(row, minlength=num_nodes)
    return deg, torch.bincount(deg)


def _sorted_keys(edge_index: Tensor, num_nodes: int) -> Tensor:
    return torch.sort(edge_index[0].long() * num_nodes + edge_index[1].long()).values


def _has_edge(keys: Tensor, a: Tensor, b: Tensor, num_nodes: int) -> Tensor:
    q = a * num_nodes + b
    pos = torch.searchsorted(keys, q).clamp_max(max(keys.numel() - 1, 0))
    return keys[pos] == q if keys.numel() else torch.zeros_like(q, dtype=torch.bool)


def clustering(edge_index: Tensor, num_nodes: int, samples: int | None = None,
               seed: int | torch.Generator | None = 0) -> dict[str, float | Tensor]:
    """Clustering of an undirected simple graph: transitivity and mean local coefficient.

    ``samples=None`` enumerates every wedge (exact; cost sum k^2); otherwise ``samples``
    wedges are drawn (unbiased estimates, standard error about 0.5/sqrt(samples)):
    transitivity from wedges drawn in proportion to k(k-1), mean local clustering from a
    uniform node (degree >= 2) and a uniform wedge at it. Exact mode also returns ``local [N]``.
    """
    check_tensor("edge_index", edge_index, (2, "E"), _INT)
    ei = edge_index.long()
    device = ei.device
    order = torch.argsort(ei[0], stable=True)
    src, dst = ei[0, order], ei[1, order]
    deg = torch.bincount(src, minlength=num_nodes)
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=device)
    rowptr[1:] = deg.cumsum(0)
    keys = _sorted_keys(ei, num_nodes)
    wedges_per_node = deg * (deg - 1)
    if samples is None:
        # every ordered pair (e, f) of distinct edges sharing the source
        reps = deg[src]
        total = int(reps.sum())
        e_rep = torch.repeat_interleave(torch.arange(src.numel(), device=device), reps, output_size=total)
        offset = torch.arange(total, device=device) - torch.repeat_interleave(reps.cumsum(0) - reps, reps, output_size=total)
        f = rowptr[src[e_rep]] + offset
        keep = f != e_rep
        center = src[e_rep[keep]]
        closed = _has_edge(keys, dst[e_rep[keep]], dst[f[keep]], num_nodes).double()
        tri2 = torch.zeros(num_nodes, dtype=torch.float64, device=device).index_add(0, center, closed)
        local = torch.where(wedges_per_node > 0, tri2 / wedges_per_node.clamp_min(1).double(), torch.zeros_like(tri2))
        n_ok = int((deg >= 2).sum())
        return {"transitivity": float(tri2.sum() / wedges_per_node.sum().clamp_min(1)),
                "average_local": float(local[deg >= 2].sum() / max(n_ok, 1)),
                "average_local_all": float(local.mean()),
                "local": local}
    g = make_generator(seed, device)
    ok = (deg >= 2).nonzero().squeeze(1)
    if ok.numel() == 0:
        return {"transitivity": 0.0, "average_local": 0.0}

    def wedge_closed(centers: Tensor) -> Tensor:
        k = deg[centers].double()
        a = (torch.rand(centers.numel(), generator=g, device=device, dtype=torch.float64) * k).long()
        b = (torch.rand(centers.numel(), generator=g, device=device, dtype=torch.float64) * (k - 1)).long()
        b = b + (b >= a).long()  # a distinct second neighbour
        return _has_edge(keys, dst[rowptr[centers] + a], dst[rowptr[centers] + b], num_nodes).double()

    w = wedges_per_node.double()
    # inverse-CDF draw of centres in proportion to their wedge counts (multinomial caps at 2^24 categories)
    cdf = w.cumsum(0) / w.sum()
    centers_t = torch.searchsorted(cdf, torch.rand(samples, generator=g, device=device, dtype=torch.float64), right=True).clamp_max(num_nodes - 1)
    centers_l = ok[torch.randint(0, ok.numel(), (samples,), generator=g, device=device)]
    return {"transitivity": float(wedge_closed(centers_t).mean()), "average_local": float(wedge_closed(centers_l).mean())}


def assortativity(edge_index: Tensor, num_nodes: int) -> float:
    """Degree assortativity (Newman's r): Pearson correlation of the degrees at both ends of edges.

    For a directed edge list this is the out-degree(source) / in-degree(target) variant;
    for an undirected graph stored with both directions it is Newman's undirected ``r``.
    """
    check_tensor("edge_index", edge_index, (2, "E"), _INT)
    ei = edge_index.long()
    kout = torch.bincount(ei[0], minlength=num_nodes).double()
    kin = torch.bincount(ei[1], minlength=num_nodes).double()
    a, b = kout[ei[0]], kin[ei[1]]
    a, b = a - a.mean(), b - b.mean()
    den = (a.square().mean() * b.square().mean()).sqrt()
    return float((a * b).mean() / den) if float(den) > 0 else 0.0


def friendship_paradox(edge_index: Tensor, num_nodes: int) -> dict[str, float | Tensor]:
    """Friendship paradox on a graph: agents' own degree vs their friends' mean degree.

    Returns ``mean_degree`` E[k], ``mean_neighbour_degree`` (the degree of a friend reached
    by following a random tie, sum_i k_i knn_i / sum_i k_i, which equals E[k^2]/E[k] on an
    undirected graph), ``k2_over_k`` = E[k^2]/E[k] from the degree sequence,
    ``mean_friends_mean_degree`` (agent average of knn_i over agents with friends),
    ``share_fewer`` (share of agents with friends whose degree is below their friends'
    mean) and ``knn [N]``. ``edge_index`` must list each tie in both directions.
    """
    check_tensor("edge_index", edge_index, (2, "E"), _INT)
    ei = edge_index.long()
    k = torch.bincount(ei[0], minlength=num_nodes).double()
    # mean degree of i's friends: average of k[j] over edges i -> j
    knn_sum = torch.zeros(num_nodes, dtype=torch.float64, device=ei.device).index_add(0, ei[0], k[ei[1]])
    has = k > 0
    knn = torch.where(has, knn_sum / k.clamp_min(1), torch.zeros_like(k))
    n_has = int(has.sum())
    return {
        "mean_degree": float(k.mean()),
        "mean_neighbour_degree": float((k * knn).sum() / k.sum().clamp_min(1)),
        "k2_over_k": float(k.square().mean() / k.mean().clamp_min(1e-300)),
        "mean_friends_mean_degree": float(knn[has].sum() / max(n_has, 1)),
        "share_fewer": float((k[has] < knn[has]).double().sum() / max(n_has, 1)),
        "knn": knn,
    }
