"""Check mode: every library substep and every study reads (system and state) and writes only what it declares."""

from __future__ import annotations

import pytest
import torch

from lpm import Fixed, Intervention, Interval, Model, Modulate, Network, Params, Positive, System, substep
from lpm.model import DataflowError
from lpm.networks import erdos_renyi, preferential_attachment
from substeps.epidemic import (Dwell, EpiState, EpiSystem, Progression, Transmission, epi_system, epidemic_model,
                               initial_state, seir, seirm)


def _all_steps(res, model: Model) -> None:
    """Every substep of the plan ran under check mode (its dataflow was recorded)."""
    assert set(res.meta["dataflow"]) >= {s.name for s in model.substeps}


def _checked(model: Model, params: Params, system: System, state, steps: int, seed: int = 0):
    """Run with and without check mode; the results must be identical."""
    res = model.simulate(params, system, state, steps, seed=seed, check=True, progress=False)
    plain = model.simulate(params, system, state, steps, seed=seed, progress=False)
    for k in plain.names:
        assert torch.equal(res[k], plain[k]), k
    _all_steps(res, model)
    return res


def test_check_mode_names_substep_and_undeclared_field(device: str) -> None:
    disease = seir(Dwell.fixed(2), Dwell.fixed(3))
    state = initial_state(disease, 200, 5, device=device)
    system = epi_system(disease, network=Network.from_layers({"r": erdos_renyi(200, 4.0)}, 200), device=device)

    @substep(reads=("stage",), writes=("stage",))
    def peeks_timer(params, system, state, t, rng):
        return state.replace(stage=torch.where(state.timer > 99, state.stage, state.stage))

    @substep(reads=("stage", "timer"), writes=("stage",))
    def sneaks_write(params, system, state, t, rng):
        return state.replace(timer=state.timer.clone())

    @substep(reads=("stage",), writes=("stage",))
    def peeks_network(params, system, state, t, rng):
        return state.replace(stage=state.stage[: system.network.num_nodes])

    params = Params(beta=Positive(0.1)).to(device)
    with pytest.raises(DataflowError, match="substep 'peeks_timer' read field 'timer'"):
        Model([peeks_timer], state_type=EpiState).simulate(params, system, state, 1, check=True)
    with pytest.raises(DataflowError, match="substep 'sneaks_write' wrote field 'timer'"):
        Model([sneaks_write], state_type=EpiState).simulate(params, system, state, 1, check=True)
    # reads of the system are recorded and checked like reads of the state
    with pytest.raises(DataflowError, match="substep 'peeks_network' read field 'network'"):
        Model([peeks_network], state_type=EpiState, system_type=EpiSystem).simulate(params, system, state, 1, check=True)
    # without check mode the wrong declarations go unnoticed
    Model([peeks_timer, sneaks_write, peeks_network], state_type=EpiState).simulate(params, system, state, 1)


def test_library_epidemic_substeps(device: str) -> None:
    n = 1500
    net = Network.from_layers({"a": erdos_renyi(n, 6.0, seed=1), "b": erdos_renyi(n, 3.0, seed=2)}, n)
    disease = seirm(Dwell.gamma(2.0, 1.0), Dwell.gamma(3.0, 1.0), fatality=0.1)
    st = initial_state(disease, n, 20, seed=0, device=device, layer_scale=torch.ones(2, device=device),
                       contact_factor=torch.ones(n, 2, device=device), susceptibility=torch.full((n,), 0.8, device=device))
    system = epi_system(disease, network=net, layer_scale_base=torch.ones(2), device=device)
    sched = torch.ones(30, 2)
    sched[5:, 0] = 0.5
    model = Model([Modulate("npi", "layer_scale", "layer_scale_base", [Intervention("half", sched)]),
                   Transmission(disease, use_layer_scale=True, use_contact_factor=True, use_susceptibility=True),
                   Progression(disease)], epidemic_model(disease).observables, state_type=EpiState, system_type=EpiSystem)
    res = _checked(model, Params(beta=Positive(0.1)).to(device), system, st, 25)
    # the hidden coupling of the two epidemic substeps is now declared and observed
    assert "entered_step" in res.meta["dataflow"]["transmission"]["reads"]
    assert "entered" in res.meta["dataflow"]["progression"]["reads"]
    # the disease's tables and the network are read from the system
    assert {"network", "infectiousness", "dwell_cdf"} <= set(res.meta["dataflow"]["transmission"]["reads"])
    assert {"next_stage", "dwell_cdf"} <= set(res.meta["dataflow"]["progression"]["reads"])
    mixed = epi_system(disease, group=(torch.arange(n) % 3).to(torch.int8), mixing=torch.eye(3) + 0.1, device=device)
    _checked(epidemic_model(disease, network=False), Params(beta=Positive(0.2)).to(device), mixed,
             initial_state(disease, n, 20, seed=0, device=device), 15)


def test_library_opinion_and_information_substeps(device: str) -> None:
    from substeps.information import Spread, initial_information, information_observables
    from substeps.opinion import (Anchoring, BoundedConfidence, Feed, HomophilousRewiring, OpinionState,
                                  PairwiseBoundedConfidence, initial_opinions, polarization_observables)

    n = 800
    net = Network.from_layers({"f": preferential_attachment(n, 3, seed=1, device=device)}, n, coalesce=False)
    x = torch.rand(n, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    sy, st = initial_opinions(x, net, stubbornness=0.05)
    params = Params(confidence=Interval(0.5, 0, 3), convergence=Interval(0.3, 0, 1), unfollow_threshold=Fixed(0.6))
    for steps in ([HomophilousRewiring(rate=0.05, window=50), Feed(3, "similarity"), BoundedConfidence(), Anchoring()],
                  [Feed(3, "diversity"), PairwiseBoundedConfidence(), Anchoring()],
                  [BoundedConfidence(use_exposure=False), PairwiseBoundedConfidence(use_exposure=False)]):
        _checked(Model(steps, polarization_observables(), state_type=OpinionState), params.to(device), sy, st, 6)
    info_system, info = initial_information(n, torch.arange(10, device=device), network=net, device=device)
    p = Params(share_rate=Fixed(0.3), stifle=Fixed(0.3), prebunk_efficacy=Fixed(0.5)).to(device)
    label = Modulate("fact_check", "share_mult", "share_mult_base", [Intervention("label", torch.full((20,), 0.5))])
    _checked(Model([label, Spread()], information_observables()), p, info_system, info, 15)
    _checked(Model([Spread()], information_observables()), p, *initial_information(n, torch.arange(10, device=device), device=device), 10)


def test_study_sir_demo(device: str) -> None:
    from experiments import sir_demo

    model, params, system, state = sir_demo.build(3000, device=device)
    _checked(model, params.to(device), system, state, 60)


def test_study_polarization(device: str) -> None:
    from experiments import polarization

    system, state, _ = polarization.build_population(600, 3, 0, device)
    params = Params(confidence=Interval(0.4, 0, 3), convergence=Interval(0.3, 0, 1), unfollow_threshold=Fixed(0.6),
                    repulsion_threshold=Fixed(1.2), repulsion_strength=Fixed(0.1)).to(device)
    for name in polarization.SCENARIOS:
        _checked(polarization.scenario_model(name, 3, repulsion=True), params, system, state, 4)


def test_study_misinformation(device: str) -> None:
    from experiments import misinformation as mi
    from substeps.information import Spread, initial_information, information_observables

    n, steps = 1000, 12
    net = mi.build_network("small-world", n, 1, device)
    base, state = initial_information(n, torch.arange(10, device=device), network=net, device=device)
    prebunk = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(device) < 0.3
    spread = Spread(role_share=(0.5, 3.0, 1.5, 0.2), role_accept=(1.0, 1.0, 0.7, 0.05), label_belief=0.5)
    params = Params(share_rate=Interval(0.3, 0, 1), stifle=Interval(0.3, 0, 1), prebunk_efficacy=Fixed(0.6)).to(device)
    for name in mi.INTERVENTIONS:
        mods, system = mi.scenario(name, base, net, steps, 4, prebunk)
        _checked(Model([*mods, spread], information_observables()), params, system, state, steps)


@pytest.mark.parametrize("llm", ["rule", "off"])
def test_study_covid_nyc(llm: str, device: str, tmp_path) -> None:
    from experiments import covid_nyc as nyc

    setup = nyc.build(scale=0.002, seed=0, device=device, days=16, boroughs=["SI"], cache_dir=tmp_path, llm=llm,
                      llm_cache=False)
    res = _checked(setup.model, setup.params, setup.system, setup.state, setup.steps)
    flow = res.meta["dataflow"]
    assert "entered" in flow["testing"]["reads"] and "reported" in flow["testing"]["writes"]
    assert {"test_capacity", "test_rate"} <= set(flow["testing"]["reads"])
    assert {"area", "area_schedule"} <= set(flow["area_contacts"]["reads"])
    assert {"age", "p_hosp", "p_death"} <= set(flow["progression"]["reads"])


def test_library_economy_substeps_and_study(device: str) -> None:
    from experiments import economy_nyc as E
    from substeps.economy.coupling import couple, coupled_model
    from substeps.economy.substeps import Fiscal, IllnessAbsence, LabourFlows, PolicyClosure, Spending
    from substeps.epidemic import epi_system, initial_state as epi_initial, sir, stage_counts

    model, params, system, state, dates = E.build(boroughs=("BK", "SI"), agents=1500, start="2020-01-04",
                                                  end="2020-05-30", llm="rule", ubi_month=300.0, device=device)
    res = _checked(model, params, system, state, len(dates))
    assert {"wage", "tax_thresholds", "ubi"} <= set(res.meta["dataflow"]["labour_supply"]["reads"])
    # the economy on the agents of an epidemic: weekly economy substeps, daily transmission
    disease = sir(recovery_rate=0.2)
    n = state.employed.shape[0]
    both_system = couple(system, epi_system(disease, group=torch.zeros(n, dtype=torch.int64, device=device),
                                            mixing=torch.ones(1, 1), device=device))
    both = couple(state, epi_initial(disease, n, 50, seed=0, device=device))
    econ = [PolicyClosure(), IllnessAbsence([disease.code("I")]), LabourFlows(), Fiscal(), Spending()]
    params.add("beta", 0.5)
    _checked(coupled_model(disease, econ, stage_counts(disease)), params, both_system, both, 15)
