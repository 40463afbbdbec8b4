"""Model assembly checks, determinism, checkpoint/resume, HDF5 trajectories, results."""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np
import pytest
import torch

from lpm.errors import ConfigError, ParamError
from lpm import (Checkpoint, Intervention, Model, ModelError, Modulate, Network, Observable, Params, Positive, State,
                 StateError, System, TrajectoryRecorder, substep, tensor_field)
from lpm.networks import erdos_renyi
from substeps.epidemic import Dwell, EpiState, EpiSystem, Transmission, epi_system, epidemic_model, initial_state, seir


def small_model(device: str, n: int = 3000):
    disease = seir(Dwell.gamma(3.0, 1.0), Dwell.geometric(0.2))
    net = Network.from_layers({"community": erdos_renyi(n, 8.0, seed=1)}, n)
    system = epi_system(disease, network=net, device=device)
    state = initial_state(disease, n, 10, seed=0, device=device)
    return epidemic_model(disease), Params(beta=Positive(0.08)).to(device), system, state


def test_plan_lists_substeps_and_observables() -> None:
    model, _, _, _ = small_model("cpu", 100)
    plan = model.plan()
    assert "progression" in plan and "transmission: reads stage" in plan and "params: beta" in plan
    assert "observables: incidence" in plan
    assert "[from the system: infectiousness, dwell_cdf, network]" in plan  # where each read comes from


def test_unknown_read_is_a_build_error_naming_field_and_substep() -> None:
    @substep(reads=("stage", "vaccinated"), writes=("stage",))
    def vaccinate(params, system, state, t, rng):
        return state

    with pytest.raises(ModelError, match="substep 'vaccinate' reads field 'vaccinated', which neither EpiSystem "
                                         r"\(system\) or EpiState \(state\) provides"):
        Model([vaccinate], state_type=EpiState, system_type=EpiSystem)
    with pytest.raises(ModelError, match="duplicated"):
        Model([vaccinate, vaccinate])


def test_writing_a_system_field_is_a_build_error_naming_both() -> None:
    @substep(reads=("stage",), writes=("network",))
    def rewire(params, system, state, t, rng):
        return state

    with pytest.raises(ModelError, match="substep 'rewire' writes field 'network', which is a field of the system "
                                         "EpiSystem .* not of the state EpiState"):
        Model([rewire], state_type=EpiState, system_type=EpiSystem)

    @dataclass(frozen=True)
    class Clash(System):
        stage: torch.Tensor = tensor_field(("N",), torch.int8)

    with pytest.raises(ModelError, match=r"field\(s\) \['stage'\] are on both the system Clash and the state EpiState"):
        Model([rewire], state_type=EpiState, system_type=Clash)


def test_reading_a_missing_optional_field_or_param_fails_at_run() -> None:
    disease = seir(Dwell.fixed(2), Dwell.fixed(3))
    state = initial_state(disease, 50, 2)
    system = epi_system(disease)  # no network
    model = Model([Transmission(disease)], state_type=EpiState, system_type=EpiSystem)
    with pytest.raises(ModelError, match="substep 'transmission' reads field 'network', which is None in this system"):
        model.simulate(Params(beta=Positive(0.1)), system, state, 2)
    net = Network.from_layers({"r": erdos_renyi(50, 4.0)}, 50)
    with pytest.raises(ParamError, match="substep 'transmission': needs parameter 'beta'"):
        model.simulate(Params(gamma=Positive(0.1)), system.replace(network=net), state, 2)
    with pytest.raises(ModelError, match="system: expected a System"):
        model.simulate(Params(beta=Positive(0.1)), state, state, 2)


def test_bad_state_inputs_are_named(device: str) -> None:
    model, params, system, state = small_model(device, 200)
    with pytest.raises(StateError, match="timer: dimension N should be 200"):
        model.simulate(params, system, state.replace(timer=torch.zeros(201, dtype=torch.int16, device=device)), 1)
    bad = state.carrier.clone()
    bad[3] = float("nan")
    with pytest.raises(StateError, match="carrier: expected finite values"):
        model.simulate(params, system, state.replace(carrier=bad), 1)
    with pytest.raises(StateError, match="num_nodes: expected N = 200 agents, network has 150"):
        net = Network.from_layers({"r": erdos_renyi(150, 4.0)}, 150).to(device)
        model.simulate(params, system.replace(network=net), state, 1)
    with pytest.raises(ModelError, match="steps: expected a non-negative int"):
        model.simulate(params, system, state, -3)


def test_same_seed_bit_identical_different_seed_differs(device: str) -> None:
    model, params, system, state = small_model(device)
    a = model.simulate(params, system, state, 40, seed=7)
    b = model.simulate(params, system, state, 40, seed=7)
    c = model.simulate(params, system, state, 40, seed=8)
    for k in a.names:
        assert torch.equal(a[k], b[k])
    assert torch.equal(a.final_state.stage, b.final_state.stage)
    assert not torch.equal(a["incidence"], c["incidence"])


def test_checkpoint_resume_equals_uninterrupted(tmp_path, device: str) -> None:
    model, params, system, state = small_model(device)
    full = model.simulate(params, system, state, 30, seed=3)
    ck = tmp_path / "run.h5"

    class Interrupt(Exception):
        pass

    class StopAt:
        def on_start(self, run): pass
        def on_step(self, run):
            if run.step == 12:
                raise Interrupt

        def on_end(self, run): pass

    with pytest.raises(Interrupt):
        model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=5), StopAt()])
    with h5py.File(ck) as f:
        assert int(f.attrs["step"]) == 10
    resumed = model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=5)])
    assert resumed.meta["resumed_from"] == 10
    for k in full.names:
        assert torch.equal(full[k], resumed[k]), k
    assert torch.equal(full.final_state.timer, resumed.final_state.timer)
    with pytest.raises(ModelError, match="seed 3 differs"):
        model.simulate(params, system, state, 30, seed=4, hooks=[Checkpoint(ck, every=5)])
    # the system is not checkpointed, only fingerprinted: resuming against another one fails clearly
    other = system.replace(network=Network.from_layers({"community": erdos_renyi(3000, 8.0, seed=2)}, 3000).to(device))
    with pytest.raises(ModelError, match="system content differs"):
        model.simulate(params, other, state, 30, seed=3, hooks=[Checkpoint(ck, every=5)])


def test_trajectories_stream_to_hdf5(tmp_path, device: str) -> None:
    model, params, system, state = small_model(device, 500)
    path = tmp_path / "traj.h5"
    res = model.simulate(params, system, state, 12, seed=1, hooks=[TrajectoryRecorder(path, ["stage", "carrier"], every=2)])
    with h5py.File(path) as f:
        ds = f["trajectories/stage"]
        assert ds.shape == (6, 500) and ds.compression == "gzip" and ds.chunks is not None
        assert np.array_equal(ds[-1], res.final_state.stage.cpu().numpy())
        # S + E + I + R counts from the trajectory equal the observables
        assert int((ds[-1] == 0).sum()) == int(res["S"][-1])
    with pytest.raises(ModelError, match="field 'stages_typo' is not on EpiState"):
        model.simulate(params, system, state, 2, hooks=[TrajectoryRecorder(tmp_path / "x.h5", ["stages_typo"])])


def test_results_tables_plot_and_hdf5(tmp_path, device: str) -> None:
    model, params, system, state = small_model(device, 400)
    res = model.simulate(params, system, state, 10, seed=0)
    df = res.to_pandas(start_date="2020-03-01")
    assert list(df.columns) == ["date", "step", "time", "observable", "group", "value"]
    assert len(df) == 10 * len(res.names)
    assert str(df["date"].min().date()) == "2020-03-01"
    s = df[df.observable == "S"].value.to_numpy() + df[df.observable == "E"].value.to_numpy() + \
        df[df.observable == "I"].value.to_numpy() + df[df.observable == "R"].value.to_numpy()
    assert np.all(s == 400)
    ax = res.plot(["I"])
    assert ax.get_lines()
    res.to_hdf5(str(tmp_path / "r.h5"), mode="w")
    back = type(res).from_hdf5(str(tmp_path / "r.h5"))
    assert torch.equal(back["incidence"], res["incidence"].cpu())


def test_modulate_applies_schedule_on_its_dates(device: str) -> None:
    @dataclass(frozen=True)
    class Env(State):
        scale: torch.Tensor = tensor_field(("L",), torch.float32)
        scale_base: torch.Tensor = tensor_field(("L",), torch.float32)
        who: torch.Tensor = tensor_field(("N",), torch.float32)
        who_base: torch.Tensor = tensor_field(("N",), torch.float32)

    sched = torch.ones(6, 2)
    sched[2:4, 1] = 0.25
    elig = torch.tensor([True, False, True], device=device)
    model = Model([
        Modulate("closure", "scale", "scale_base", [Intervention("close", sched.to(device))]),
        Modulate("isolate", "who", "who_base", [Intervention("iso", torch.tensor([1.0, 0.5, 0.5], device=device), eligible=elig)]),
    ], {"scale1": Observable(lambda y, s: s.scale[1]), "who": Observable(lambda y, s: s.who.sum())}, state_type=Env)
    st = Env(torch.ones(2, device=device), torch.ones(2, device=device), torch.ones(3, device=device), torch.ones(3, device=device))
    res = model.simulate(Params(), System(), st, 6)
    assert res["scale1"].tolist() == [1.0, 1.0, 0.25, 0.25, 1.0, 1.0]
    assert res["who"].tolist() == [3.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # no compounding across steps
    with pytest.raises(StateError, match="schedule: expected values >= 0"):
        Intervention("bad", torch.tensor([-1.0]))


def test_interventions_named_by_system_fields_equal_tensor_ones_and_plans_insert_by_name(device: str) -> None:
    """Schedule, group and eligibility held by the system (moved with it) give the same run as tensors held by the substep."""
    @dataclass(frozen=True)
    class Env(State):
        sus: torch.Tensor = tensor_field(("N",), torch.float32)

    @dataclass(frozen=True)
    class Sys(System):
        sus_base: torch.Tensor = tensor_field(("N",), torch.float32)
        vacc: torch.Tensor = tensor_field(("T", "G"), torch.float32)
        band: torch.Tensor = tensor_field(("N",), torch.int8)
        elig: torch.Tensor = tensor_field(("N",), torch.bool)

    g = torch.Generator().manual_seed(0)
    sy = Sys(torch.rand(7, generator=g), torch.rand(5, 3, generator=g), torch.tensor([0, 1, 2, 2, 1, 0, 1], dtype=torch.int8),
             torch.tensor([True, True, False, True, False, True, True])).to(device)
    named = Intervention("v", "vacc", eligible="elig", group="band")
    held = Intervention("v", sy.vacc.cpu(), eligible=sy.elig.cpu(), group=sy.band.cpu())  # on the CPU: followed lazily
    obs = {"sus": Observable(lambda y, s: s.sus.clone())}
    runs = []
    for iv in (named, held):
        model = Model([Modulate("vaccination", "sus", "sus_base", [iv])], obs, state_type=Env, system_type=Sys)
        runs.append(model.simulate(Params(), sy, Env(torch.ones(7, device=device)), 6)["sus"])
    torch.testing.assert_close(runs[0], runs[1])
    want = sy.sus_base.cpu() * torch.where(sy.elig.cpu(), sy.vacc.cpu()[4][sy.band.cpu().long()], torch.ones(7))
    torch.testing.assert_close(runs[0][5].cpu(), want)  # step 5 holds the schedule's last row
    assert Modulate("vaccination", "sus", "sus_base", [named]).reads == ("sus_base", "vacc", "elig", "band")
    with pytest.raises(ConfigError, match="schedule must be"):
        Intervention("bad", torch.ones(2, 2, 2))
    # a plan grows by name, not by list position
    first = Model([Modulate("a", "sus", "sus_base", [named]), Modulate("c", "sus", "sus", [])], obs, state_type=Env,
                  system_type=Sys)
    grown = first.inserted("a", Modulate("b", "sus", "sus", [named]), name="grown")
    assert [s.name for s in grown.substeps] == ["a", "b", "c"] and grown.name == "grown"
    with pytest.raises(ModelError, match=r"no substep named 'x'; the plan is \['a', 'c'\]"):
        first.inserted("x", Modulate("b", "sus", "sus", []))
