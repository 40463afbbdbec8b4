"""Information spread: Maki-Thompson limit, interventions, roles, judgement, gradients."""

import math

import pytest
import torch

from lpm import Fixed, Intervention, Interval, Model, Modulate, Network, Params
from lpm.networks import preferential_attachment
from substeps.information import (
    ArchetypeProfile,
    InfoState,
    Spread,
    initial_information,
    information_observables,
    rule_judgement,
    top_spreaders,
)

from conftest import DEVICE  # one source: the device fixture's value


def _params(q: float, stifle: float = 1.0, prebunk: float = 0.0) -> Params:
    return Params(share_rate=Fixed(q), stifle=Fixed(stifle), prebunk_efficacy=Fixed(prebunk)).to(DEVICE)


def _mt_theta() -> float:
    theta = 0.5
    for _ in range(200):  # fixed point of theta = exp(-2 (1 - theta)), a contraction near 0.2
        theta = math.exp(-2 * (1 - theta))
    return theta


def test_well_mixed_maki_thompson_leaves_about_20_percent_unaware():
    """Final ignorant share vs theta = exp(-2(1-theta)) = 0.2032.

    Tolerance 0.01: at N = 1e5 and q = 0.1 contacts per step, 6 seeds gave 0.2004 +- 0.0016
    (sd); the discrete-time (synchronous) bias is about -0.003. A model with a wrong
    stifling rule (e.g. stopping after any contact: theta ~ 0.5) or no stifling (theta = 0) fails.
    """
    theta = _mt_theta()
    assert theta == pytest.approx(0.2032, abs=1e-4)
    n = 100_000
    model = Model([Spread()], information_observables(), state_type=InfoState)
    res = model.simulate(_params(0.1), *initial_information(n, torch.arange(5), device=DEVICE), 300, seed=1, progress=False)
    assert float(res["spreaders"][-1]) == 0.0  # the rumour has died out
    assert 1 - float(res["reach"][-1]) == pytest.approx(theta, abs=0.01)


def _network_setup(n: int = 20_000):
    net = Network.from_layers({"follow": preferential_attachment(n, 3, seed=1)}, n).to(DEVICE)
    seeds = torch.arange(10, 30)
    return net, seeds


def test_each_intervention_lowers_final_reach():
    n = 20_000
    net, seeds = _network_setup(n)
    T = 80
    label = torch.ones(T)
    label[3:] = 0.4  # fact-check label from step 3: sharing x0.4
    obs = information_observables()

    def reach(mods=(), **kw) -> float:
        st = initial_information(n, seeds, network=net, device=DEVICE, **kw)
        model = Model([*mods, Spread()], obs, state_type=InfoState)
        return float(model.simulate(_params(0.3, 0.5, 0.8), *st, T, seed=3, progress=False)["reach"][-1])

    base = reach()
    fact = reach([Modulate("fact_check", "share_mult", "share_mult_base", [Intervention("label", label)])])
    down = reach([Modulate("downrank", "visibility", "visibility_base", [Intervention("downrank", label)])])
    removed = top_spreaders(net, 0.01)
    remove = reach(removed=removed)
    pre = reach(prebunked=torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5)
    assert base > 0.2
    for name, r in (("fact-check", fact), ("down-rank", down), ("removal", remove), ("prebunk", pre)):
        assert r < 0.9 * base, (name, r, base)
    assert int(removed.sum()) == 200 and int(net.out_degree()[removed].min()) >= int(net.out_degree()[~removed].max())


def test_roles_and_belief():
    n = 20_000
    net, seeds = _network_setup(n)
    role = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    role[seeds] = 1
    st = initial_information(n, seeds, network=net, role=role, device=DEVICE)
    spread = Spread(role_share=(0.5, 1.5, 1.0, 0.2), role_accept=(0.8, 1.0, 0.6, 0.0))
    fin = Model([spread], {}, state_type=InfoState).simulate(_params(0.4, 0.5), *st, 60, seed=2, progress=False).final_state
    verifier = role.to(DEVICE) == 3
    heard = fin.heard.bool()
    assert int((heard & verifier).sum()) > 50  # verifiers hear the story ...
    assert float(fin.spreading[verifier].sum()) == 0 and float(fin.belief[verifier].sum()) == 0  # ... but never spread or believe it
    # belief of reached agents equals their acceptance probability (0.8 bystanders, 0.6 commentators)
    assert torch.allclose(fin.belief[heard & (role.to(DEVICE) == 0)], torch.tensor(0.8, device=DEVICE))
    assert torch.allclose(fin.belief[heard & (role.to(DEVICE) == 2) & ~torch.isin(torch.arange(n, device=DEVICE), seeds.to(DEVICE))],
                          torch.tensor(0.6, device=DEVICE))


def test_rule_judgement_is_congenial_and_archetype_tables_enter_the_state():
    prof = ArchetypeProfile(("left", "right", "right, degree"), torch.tensor([-0.6, 0.6, 0.6]),
                            torch.tensor([30.0, 70.0, 50.0]), torch.tensor([0.0, 0.0, 1.0]))
    j = rule_judgement(prof, torch.tensor([-1.0, 1.0]))
    assert j.convincing.shape == (3, 2) and j.share_propensity.shape == (3,)
    assert j.convincing[0, 0] > j.convincing[0, 1] and j.convincing[1, 1] > j.convincing[1, 0]
    assert j.convincing[1, 1] > j.convincing[2, 1]  # education lowers credulity
    assert j.share_propensity[1] > j.share_propensity[0]  # older archetypes share more
    with pytest.raises(ValueError, match="convincing"):
        type(j)(j.convincing + 1, j.share_propensity, j.stances)


def test_reach_gradient_wrt_sharing_probability_matches_finite_difference():
    """Straight-through gradient vs central differences, common random numbers (same seed).

    Regime: well mixed, q = 0.1, 40 steps (growth phase, reach ~ 0.1). Tolerance 20%: the
    estimator's measured error here is ~2-13%; it is NOT reliable once the story saturates
    (depletion of ignorants), which is documented in substeps/information/spread.py.
    """
    n = 20_000
    st = initial_information(n, torch.arange(20), device=DEVICE)
    model = Model([Spread()], information_observables(), state_type=InfoState)

    def run(q: float, grad: bool, seed: int):
        p = Params(share_rate=Interval(q, 0, 1), stifle=Fixed(0.5), prebunk_efficacy=Fixed(0.0)).to(DEVICE)
        return p, model.simulate(p, *st, 40, seed=seed, grad=grad, progress=False)["reach"][-1]

    grads, fds, h = [], [], 0.03
    for seed in range(4):  # average over 4 seeds: a single path's difference quotient is noisy
        p, r = run(0.1, True, seed)
        (g,) = torch.autograd.grad(r, p.raw_share_rate)
        (dq,) = torch.autograd.grad(p.share_rate, p.raw_share_rate)
        grads.append(float(g) / float(dq))
        fds.append((float(run(0.1 + h, False, seed)[1]) - float(run(0.1 - h, False, seed)[1])) / (2 * h))
    grad, fd = sum(grads) / 4, sum(fds) / 4
    assert fd > 0.5
    print(f"reach gradient: straight-through {grad:.3f}, finite difference {fd:.3f}")
    assert grad == pytest.approx(fd, rel=0.2), (grads, fds)
