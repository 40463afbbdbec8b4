"""Vectorized random-graph generators returning undirected edge lists ``[2, E]``.

Each undirected contact appears as two directed edges. Every generator takes an explicit
``generator`` (or ``seed``) and is fully vectorized: no Python loop over agents or edges.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm.kernels import compiled_available
from lpm.state import StateError, check_tensor

__all__ = [
    "erdos_renyi",
    "configuration_model",
    "household_cliques",
    "contact_matrix_sbm",
    "symmetrize",
    "make_generator",
]


def make_generator(seed: int | torch.Generator | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator from a seed (or the generator itself)."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def symmetrize(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Drop self-loops and duplicates, then add reverse edges: an undirected simple graph."""
    from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

    ei, _ = remove_self_loops(edge_index.long())
    ei = to_undirected(ei, num_nodes=num_nodes)
    return coalesce(ei, num_nodes=num_nodes)


def erdos_renyi(num_nodes: int, mean_degree: float, seed: int | torch.Generator | None = 0, device: torch.device | str = "cpu") -> Tensor:
    """G(n, m) random graph with ``m = n * mean_degree / 2`` undirected edges (sparse regime)."""
    if num_nodes < 2:
        raise ConfigError(f"num_nodes: expected >= 2, got {num_nodes}")
    if mean_degree < 0 or mean_degree >= num_nodes - 1:
        raise ConfigError(f"mean_degree: expected in [0, {num_nodes - 1}), got {mean_degree}")
    g = make_generator(seed, device)
    m = int(round(num_nodes * mean_degree / 2))
    # oversample slightly so that dropping self-loops/duplicates still leaves about m edges
    extra = int(m * (mean_degree / max(num_nodes, 1)) + 3 * m**0.5 + 10)
    pairs = torch.randint(0, num_nodes, (2, m + extra), generator=g, device=device)
    if pairs.device.type == "cpu" and compiled_available() and m > 1 << 15:
        from lpm.compiled import pair_edges, undirected_from_keys, unique_pair_keys

        # the same graph as the torch code below, bit for bit, in linear time (a bucket sort instead of
        # torch.unique's sort; fused passes): the 1e7-agent graph in seconds instead of minutes
        p = pairs.numpy()
        key = unique_pair_keys(*pair_edges(p[0], p[1], num_nodes), num_nodes)
        pick = torch.randperm(key.shape[0], generator=g, device=device)[:m]
        return torch.from_numpy(undirected_from_keys(key, pick.numpy(), num_nodes))
    lo, hi = torch.minimum(pairs[0], pairs[1]), torch.maximum(pairs[0], pairs[1])
    keep = lo != hi
    key = torch.unique(lo[keep] * num_nodes + hi[keep])
    key = key[torch.randperm(key.numel(), generator=g, device=device)[:m]]
    ei = torch.stack([key // num_nodes, key % num_nodes])
    return torch.cat([ei, ei.flip(0)], 1)


def configuration_model(degrees: Tensor, seed: int | torch.Generator | None = 0) -> Tensor:
    """Erased configuration model: random stub matching, self-loops and multi-edges removed."""
    check_tensor("degrees", degrees, ("N",), (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8), low=0)
    n = degrees.numel()
    g = make_generator(seed, degrees.device)
    deg = degrees.long()
    if int(deg.sum()) % 2:
        # an odd stub count cannot be matched: add one stub to a random agent
        deg = deg.clone()
        deg[int(torch.randint(0, n, (1,), generator=g, device=degrees.device))] += 1
    stubs = torch.repeat_interleave(torch.arange(n, device=degrees.device), deg)
    stubs = stubs[torch.randperm(stubs.numel(), generator=g, device=degrees.device)]
    ei = stubs.view(2, -1) if stubs.numel() else stubs.new_zeros(2, 0)
    return symmetrize(ei, n)


def household_cliques(household: Tensor) -> Tensor:
    """All ordered pairs of distinct agents sharing a household id: ``[2, sum s(s-1)]``."""
    check_tensor("household", household, ("N",), (torch.int32, torch.int64), low=0)
    h = household.long()
    order = torch.argsort(h, stable=True)
    hs = h[order]
    _, size = torch.unique_consecutive(hs, return_counts=True)
    start = size.cumsum(0) - size
    # for each sorted agent: the start and size of its household block
    agent_size = torch.repeat_interleave(size, size)
    agent_start = torch.repeat_interleave(start, size)
    total = int(agent_size.sum())
    src_sorted = torch.repeat_interleave(torch.arange(hs.numel(), device=h.device), agent_size, output_size=total)
    offset = torch.arange(total, device=h.device) - torch.repeat_interleave(agent_size.cumsum(0) - agent_size, agent_size, output_size=total)
    dst_sorted = torch.repeat_interleave(agent_start, agent_size, output_size=total) + offset
    keep = src_sorted != dst_sorted
    return torch.stack([order[src_sorted[keep]], order[dst_sorted[keep]]])


def contact_matrix_sbm(
    group: Tensor,
    contacts: Tensor,
    seed: int | torch.Generator | None = 0,
    *,
    eligible: Tensor | None = None,
) -> Tensor:
    """Stochastic block network whose mean contacts between groups follow ``contacts``.

    ``group [N]`` (e.g. age band codes) and ``contacts [G, G]``: mean daily contacts an
    agent of group g has with agents of group h. The expected number of undirected edges
    between g and h is the reciprocity-corrected ``(n_g C_gh + n_h C_hg) / 2`` (each block
    counted once); the number is Poisson and endpoints are uniform within groups. Only
    ``eligible`` agents (e.g. workers for a work layer) take part.
    """
    check_tensor("group", group, ("N",), (torch.int8, torch.int16, torch.int32, torch.int64), low=0)
    G = contacts.shape[0]
    check_tensor("contacts", contacts, (G, G), (), low=0.0)
    if int(group.max()) >= G:
        raise StateError(f"group: codes must be < {G} (contact matrix size), got max {int(group.max())}")
    device = group.device
    g = make_generator(seed, device)
    n_all = group.numel()
    members = torch.arange(n_all, device=device)
    grp = group.long()
    if eligible is not None:
        check_tensor("eligible", eligible, (n_all,), (torch.bool,))
        members, grp = members[eligible], grp[eligible]
    order = torch.argsort(grp, stable=True)
    members, grp = members[order], grp[order]
    n_g = torch.bincount(grp, minlength=G).double()
    start = n_g.cumsum(0) - n_g
    C = contacts.double().to(device)
    pair_edges = (n_g[:, None] * C + n_g[None, :] * C.T) / 2  # undirected edges between g and h, both orders
    # count each unordered block once: upper triangle incl. diagonal, diagonal halves (pairs within a group)
    triu = torch.triu(torch.ones(G, G, dtype=torch.bool, device=device))
    lam = torch.where(triu, pair_edges, torch.zeros_like(pair_edges))
    lam = lam - torch.diag(torch.diagonal(lam) / 2)
    lam = torch.where((n_g[:, None] > 0) & (n_g[None, :] > 0), lam, torch.zeros_like(lam))
    m = torch.poisson(lam.flatten(), generator=g).long()
    total = int(m.sum())
    if total == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    block = torch.repeat_interleave(torch.arange(G * G, device=device), m, output_size=total)
    bg, bh = block // G, block % G
    u = torch.rand(2, total, generator=g, device=device, dtype=torch.float64)
    a = members[(start[bg] + (u[0] * n_g[bg]).floor().clamp_max(n_g[bg] - 1)).long()]
    b = members[(start[bh] + (u[1] * n_g[bh]).floor().clamp_max(n_g[bh] - 1)).long()]
    keep = a != b
    ei = torch.stack([a[keep], b[keep]])
    return torch.cat([ei, ei.flip(0)], 1)
