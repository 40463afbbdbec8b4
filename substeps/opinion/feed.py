"""Feeds and homophilous rewiring on a follow graph, vectorized over edges.

**Feed** (a vectorized recommender): every agent sees the top-``k`` posts among its
followees, ranked by a score per edge ``j -> i``. The top-k per target is a segmented
top-k: one sort of an int64 key ``target * 2^21 + (2^21 - 1 - quantized score)`` groups the
edges by target with the best first; the rank inside each target's segment is the
position minus the segment's start (cumulative in-degree).

**Rewiring** (unfollow distant, follow similar): a random share of edges is examined;
those whose source lies farther than ``unfollow_threshold`` from the follower are dropped
and replaced by a follow of an agent at a nearby rank of the opinion order (first opinion
dimension): ``rank(i) + offset`` with ``offset`` uniform in ``[-window, window] \\ {0}``.
The graph is coalesced and rebuilt (:meth:`lpm.Network.build` sorts it, so the CSR stays valid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpm.errors import ConfigError
from lpm import Network, Params, Substep
from substeps.opinion.state import OpinionState, OpinionSystem

__all__ = ["Feed", "segment_topk", "HomophilousRewiring", "RANKINGS"]

RANKINGS = ("recency", "popularity", "similarity", "diversity", "random")
_SCORE_BITS = 21


def segment_topk(segment: Tensor, score: Tensor, k: int, num_segments: int) -> Tensor:
    """Mask ``[E]`` of the ``k`` highest-scoring entries of each segment (ties: arbitrary)."""
    if score.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=score.device)
    s = score.detach().double()
    lo, hi = s.min(), s.max()
    span = (hi - lo).clamp_min(1e-12)
    q = ((s - lo) / span * (2**_SCORE_BITS - 1)).round().long()
    key = segment.long() * (2**_SCORE_BITS) + (2**_SCORE_BITS - 1 - q)
    order = torch.argsort(key)
    seg_sorted = segment.long()[order]
    counts = torch.bincount(segment.long(), minlength=num_segments)
    start = counts.cumsum(0) - counts
    rank = torch.arange(order.numel(), device=score.device) - start[seg_sorted]
    mask = torch.zeros(order.numel(), dtype=torch.bool, device=score.device)
    mask[order] = rank < k
    return mask


class Feed(Substep):
    """Each agent posts with probability ``post_rate``; each follower sees its top-``k`` followees' posts.

    ``ranking``: ``recency`` (latest post first), ``popularity`` (most-followed first),
    ``similarity`` (closest opinion first), ``diversity`` (farthest first), ``random``.
    A small random jitter (``noise``) breaks ties. Writes ``exposure [E]`` (1 = shown) and
    ``last_post``. Only posts of agents who ever posted can be shown.
    """

    def __init__(self, k: int, ranking: str = "recency", *, post_rate: float = 0.5, noise: float = 1e-3,
                 name: str = "feed") -> None:
        if ranking not in RANKINGS:
            raise ConfigError(f"ranking: expected one of {RANKINGS}, got {ranking!r}")
        if k < 1:
            raise ConfigError(f"k: expected >= 1 posts per feed, got {k}")
        if not 0 < post_rate <= 1:
            raise ConfigError(f"post_rate: expected in (0, 1], got {post_rate}")
        self.name = name
        self.k = int(k)
        self.ranking = ranking
        self.post_rate = float(post_rate)
        self.noise = float(noise)
        self.reads = ("opinion", "network", "last_post")
        self.writes = ("exposure", "last_post")

    def __call__(self, params: Params, system: OpinionSystem, state: OpinionState, t: int, rng: torch.Generator) -> OpinionState:
        net = state.network
        x = state.opinion.detach()
        n = x.shape[0]
        posted = torch.rand(n, generator=rng, device=x.device) < self.post_rate
        last = torch.where(posted, torch.full_like(state.last_post, t), state.last_post)
        src, dst = net.edge_index[0].long(), net.edge_index[1].long()
        uniform = torch.rand(src.numel(), generator=rng, device=x.device, dtype=torch.float64)
        jitter = self.noise * uniform
        if self.ranking == "recency":
            score = last[src].double()
        elif self.ranking == "popularity":
            score = torch.log1p(net.out_degree().double())[src]
        elif self.ranking in ("similarity", "diversity"):
            d = (x[src] - x[dst]).double().square().sum(1).sqrt()
            score = -d if self.ranking == "similarity" else d
        else:
            score, jitter = uniform, torch.zeros_like(uniform)
        score = score + jitter
        has_post = last[src] >= 0
        # posts never written sink just below every real post (keeps the score quantization fine)
        floor = score[has_post].min() - 1 if bool(has_post.any()) else score.new_zeros(())
        shown = segment_topk(dst, torch.where(has_post, score, floor), self.k, n) & has_post
        return state.replace(exposure=shown.to(state.opinion.dtype), last_post=last)


class HomophilousRewiring(Substep):
    """Unfollow followees beyond ``unfollow_threshold``; follow a similar agent instead."""

    def __init__(self, rate: float = 0.05, window: int = 50, name: str = "rewiring") -> None:
        if not 0 < rate <= 1:
            raise ConfigError(f"rate: expected a share of edges in (0, 1], got {rate}")
        if window < 1:
            raise ConfigError(f"window: expected >= 1 rank, got {window}")
        self.name = name
        self.rate = float(rate)
        self.window = int(window)
        self.reads = ("opinion", "network")
        self.writes = ("network", "exposure")
        self.params = ("unfollow_threshold",)

    def __call__(self, params: Params, system: OpinionSystem, state: OpinionState, t: int, rng: torch.Generator) -> OpinionState:
        net = state.network
        x = state.opinion.detach()
        n = x.shape[0]
        src, dst = net.edge_index[0].long(), net.edge_index[1].long()
        e = src.numel()
        look = torch.rand(e, generator=rng, device=x.device) < self.rate
        d = (x[src] - x[dst]).square().sum(1).sqrt()
        drop = look & (d > params.unfollow_threshold.detach())
        idx = drop.nonzero().squeeze(1)
        order = torch.argsort(x[:, 0])
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=x.device)
        off = torch.randint(1, self.window + 1, (idx.numel(),), generator=rng, device=x.device)
        sign = torch.where(torch.rand(idx.numel(), generator=rng, device=x.device) < 0.5, -1, 1)
        new_rank = (rank[dst[idx]] + sign * off).clamp(0, n - 1)
        new_src = order[new_rank]
        ok = new_src != dst[idx]  # at the ends of the order the clamp can land on oneself: keep the old tie
        src = src.clone()
        src[idx[ok]] = new_src[ok]
        from torch_geometric.utils import coalesce

        attr = torch.stack([net.weight.float(), net.layer.float()], 1)
        ei, attr = coalesce(torch.stack([src, dst]), attr, num_nodes=n, reduce="max")
        rebuilt = Network.build(ei, attr[:, 0].to(net.weight.dtype), attr[:, 1].to(torch.int8), n, net.layer_names)
        # the old exposures index the old edge list; until the next feed every post is visible
        shown = torch.ones(rebuilt.num_edges, dtype=state.opinion.dtype, device=x.device)
        return state.replace(network=rebuilt, exposure=shown)
