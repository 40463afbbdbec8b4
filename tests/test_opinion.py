"""Opinion dynamics: conservation/consensus, clusters vs confidence, gradients, feeds, rewiring, ANES."""


import pandas as pd
import pytest
import torch

from lpm import Interval, Model, Network, Params
from lpm.networks import erdos_renyi, preferential_attachment
from substeps.opinion import (
    Anchoring,
    BoundedConfidence,
    Feed,
    HomophilousRewiring,
    OpinionState,
    PairwiseBoundedConfidence,
    anes_population,
    bimodality,
    cluster_count,
    esteban_ray,
    load_anes96,
    neighbour_correlation,
    initial_opinions,
    segment_topk,
    variance,
)

from conftest import DEVICE  # one source: the device fixture's value


def _params(eps: float, mu: float = 0.5, **extra) -> Params:
    return Params(confidence=Interval(eps, 0, 3), convergence=Interval(mu, 0, 1), **extra).to(DEVICE)


def test_averaging_conserves_degree_weighted_mean_and_reaches_it():
    n = 400
    net = Network.from_layers({"follow": preferential_attachment(n, 2, seed=3)}, n).to(DEVICE)
    k = net.in_degree().double()
    # opinions correlated with degree, so the degree-weighted and plain means differ
    x0 = (torch.log(k) / torch.log(k).max() * 2 - 1).to(DEVICE)
    target = float((k * x0).sum() / k.sum())
    assert abs(target - float(x0.mean())) > 0.1
    model = Model([BoundedConfidence(use_exposure=False)],
                  {"wmean": lambda y, s: (k * s.opinion[:, 0]).sum() / k.sum(), "spread": lambda y, s: s.opinion.max() - s.opinion.min()},
                  state_type=OpinionState)
    # confidence 2.5 > max distance 2: every exposed pair interacts (plain DeGroot averaging)
    res = model.simulate(_params(2.5), *initial_opinions(x0, net), 400, progress=False)
    assert torch.allclose(res["wmean"], torch.full_like(res["wmean"], target), atol=1e-12, rtol=0)
    assert float(res["spread"][-1]) < 1e-9
    assert float(res.final_state.opinion.mean()) == pytest.approx(target, abs=1e-9)


def test_gated_averaging_also_conserves_degree_weighted_mean():
    n = 500
    net = Network.from_layers({"follow": erdos_renyi(n, 8, seed=1)}, n).to(DEVICE)
    k = net.in_degree().double()
    x0 = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 2 - 1
    model = Model([BoundedConfidence(use_exposure=False)], {"w": lambda y, s: (k * s.opinion[:, 0]).sum()}, state_type=OpinionState)
    res = model.simulate(_params(0.3), *initial_opinions(x0, net), 30, progress=False)
    assert torch.allclose(res["w"], (k * x0).sum().expand(30), atol=1e-10, rtol=0)
    assert float(variance(res.final_state.opinion)) > 0.05  # bounded confidence: no consensus at eps = 0.3


def test_wider_confidence_gives_fewer_clusters():
    n = 1000
    net = Network.from_layers({"follow": erdos_renyi(n, 60, seed=1)}, n).to(DEVICE)
    x0 = (torch.rand(n, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(DEVICE)
    counts = []
    for eps in (0.1, 0.2, 0.4):
        model = Model([BoundedConfidence(use_exposure=False, normalize="confidence")],
                      {"c": lambda y, s: cluster_count(s.opinion, 0.02, 0.01)}, state_type=OpinionState)
        counts.append(int(model.simulate(_params(eps, 0.99), *initial_opinions(x0, net), 40, progress=False)["c"][-1]))
    assert counts[0] > counts[1] > counts[2] >= 1, counts
    # Hegselmann-Krause rule of thumb: about 1/(2 eps) clusters
    assert 3 <= counts[0] <= 8 and counts[2] <= 2, counts


def test_variance_gradient_wrt_confidence_matches_finite_difference():
    """Straight-through sigmoid gate (tau = 0.02) vs central differences (h = 0.02), same network and start.

    Tolerance 20%: measured bias of the estimator is about +3% after 1 step and +10% after
    3 steps (it grows with the horizon: +50% after 8 steps; see substeps/opinion/dynamics.py).
    """
    n = 5000
    net = Network.from_layers({"follow": erdos_renyi(n, 10, seed=1)}, n).to(DEVICE)
    x0 = (torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(DEVICE)
    system, state = initial_opinions(x0, net)
    model = Model([BoundedConfidence(use_exposure=False, tau=0.02)], {"v": lambda y, s: variance(s.opinion)}, state_type=OpinionState)

    def run(eps: float, grad: bool):
        p = _params(eps)
        v = model.simulate(p, system, state, 3, grad=grad, progress=False)["v"][-1]
        return p, v

    p, v = run(0.3, True)
    (g,) = torch.autograd.grad(v, p.raw_confidence)
    (de,) = torch.autograd.grad(p.confidence, p.raw_confidence)
    grad = float(g) / float(de)
    h = 0.02
    fd = (float(run(0.3 + h, False)[1]) - float(run(0.3 - h, False)[1])) / (2 * h)
    assert fd < 0  # wider confidence, more averaging, less variance
    assert grad == pytest.approx(fd, rel=0.2)


def test_pairwise_conserves_mean_and_anchoring_holds_stubborn_agents():
    n = 2000
    net = Network.from_layers({"follow": erdos_renyi(n, 10, seed=2)}, n).to(DEVICE)
    x0 = (torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(DEVICE)
    model = Model([PairwiseBoundedConfidence(use_exposure=False, rate=0.3)], {"m": lambda y, s: s.opinion.mean(), "v": lambda y, s: variance(s.opinion)},
                  state_type=OpinionState)
    res = model.simulate(_params(0.5, 0.3), *initial_opinions(x0, net), 30, progress=False)
    assert torch.allclose(res["m"], x0.mean().expand(30), atol=1e-12)
    assert float(res["v"][-1]) < 0.8 * float(variance(x0))
    stub = (torch.arange(n, device=DEVICE) % 2 == 0).double()
    model = Model([BoundedConfidence(use_exposure=False), Anchoring()], {}, state_type=OpinionState)
    fin = model.simulate(_params(2.5), *initial_opinions(x0, net, stubbornness=stub), 20, progress=False).final_state
    assert torch.equal(fin.opinion[stub.bool(), 0], x0[stub.bool()])
    assert not torch.equal(fin.opinion[~stub.bool(), 0], x0[~stub.bool()])


def test_segment_topk_matches_groupby_rank():
    g = torch.Generator().manual_seed(5)
    seg = torch.randint(0, 40, (2000,), generator=g)
    score = torch.rand(2000, generator=g, dtype=torch.float64)
    mask = segment_topk(seg.to(DEVICE), score.to(DEVICE), 3, 40).cpu()
    ref = pd.DataFrame({"s": seg.numpy(), "v": score.numpy()}).groupby("s")["v"].rank(ascending=False) <= 3
    assert mask.numpy().tolist() == ref.to_list()


def test_similarity_feed_and_rewiring_build_echo_chambers():
    n = 3000
    net = Network.from_layers({"follow": erdos_renyi(n, 20, seed=3)}, n).to(DEVICE)
    x0 = (torch.rand(n, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(DEVICE)
    sy, st = initial_opinions(x0, net)
    p = _params(0.3, unfollow_threshold=Interval(0.5, 0, 2))
    feed = Feed(5, "similarity", post_rate=1.0)
    fed = feed(p, sy, st, 0, torch.Generator(device=DEVICE).manual_seed(0))
    # each agent sees at most 5 posts, and those are its closest followees
    shown = fed.exposure.bool()
    assert int(torch.bincount(net.edge_index[1][shown].long(), minlength=n).max()) <= 5
    d = (x0[net.edge_index[0].long()] - x0[net.edge_index[1].long()]).abs()
    assert float(d[shown].mean()) < 0.5 * float(d[~shown].mean())
    rew = HomophilousRewiring(rate=0.5, window=20)
    model = Model([rew], {"corr": lambda y, s: neighbour_correlation(s.opinion, s.network)}, state_type=OpinionState)
    res = model.simulate(p, sy, st, 5, progress=False)
    out = res.final_state.network
    out.validate()
    assert torch.all(out.edge_index[0][1:] >= out.edge_index[0][:-1])  # CSR order kept
    assert float(neighbour_correlation(x0, net)) < 0.1 < 0.5 < float(res["corr"][-1])


def test_metrics_known_values():
    two = torch.cat([-torch.ones(500), torch.ones(500)]).double()
    assert float(bimodality(two)) == pytest.approx(1.0, abs=0.01)
    u = torch.linspace(-1, 1, 100001).double()
    assert float(bimodality(u)) == pytest.approx(5 / 9, abs=1e-3)
    # two equal masses at the extreme bin centres: ER = 2 * 0.5^(1+a) * 0.5 * distance
    a, bins = 1.6, 20
    two_c = torch.cat([torch.full((500,), -1 + 1 / bins), torch.full((500,), 1 - 1 / bins)]).double()
    assert float(esteban_ray(two_c, bins, a)) == pytest.approx(2 * 0.5 ** (1 + a) * 0.5 * (2 - 2 / bins), rel=1e-6)
    assert int(cluster_count(two)) == 2 and int(cluster_count(u)) == 1


def test_anes_population_reproduces_survey_distributions():
    df = load_anes96()
    pop = anes_population(200_000, seed=0, jitter=False, device=DEVICE)
    pid_share = torch.bincount(pop.pid.long().cpu(), minlength=7).double() / 200_000
    survey = torch.tensor(df["PID"].value_counts(normalize=True).sort_index().to_numpy())
    assert torch.allclose(pid_share, survey, atol=0.005)
    lr = (pop.opinion.cpu() * 3 + 4).round().long()
    lr_share = torch.bincount(lr, minlength=8)[1:].double() / 200_000
    survey_lr = torch.tensor(df["selfLR"].value_counts(normalize=True).sort_index().to_numpy())
    assert torch.allclose(lr_share, survey_lr, atol=0.005)
    # strong Republicans sit to the right of strong Democrats, as in the survey
    assert float(pop.ideology[12:14].mean()) > 0.3 > -0.1 > float(pop.ideology[0:2].mean())
    jit = anes_population(1000, seed=0, jitter=True)
    assert float(jit.opinion.min()) >= -1 and float(jit.opinion.max()) <= 1 and jit.opinion.unique().numel() > 900
