"""Checkpoints, trajectories and inputs that cannot silently give the wrong run (issue 19)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lpm import Checkpoint, Network, Params, Positive, StateError, TrajectoryRecorder
from lpm.errors import CheckpointError, ConfigError, ParamError
from lpm.networks import erdos_renyi
from lpm.recording import _content_hash
from substeps.epidemic import Dwell, epi_system, epidemic_model, initial_state, seir

REPO = Path(__file__).resolve().parents[1]


def small(n: int = 800, beta: float = 0.05):
    disease = seir(Dwell.gamma(3.0, 1.0), Dwell.geometric(0.2))
    # coalesce=False: no torch_geometric import, which dominates the killed subprocess's start-up
    net = Network.from_layers({"community": erdos_renyi(n, 8.0, seed=1)}, n, coalesce=False)
    state = initial_state(disease, n, 10, seed=0)
    return epidemic_model(disease), Params(beta=Positive(beta)), epi_system(disease, network=net), state


def finished_checkpoint(tmp_path: Path, steps: int = 30, **kw) -> Path:
    model, params, system, state = small(**kw)
    ck = tmp_path / "run.h5"
    model.simulate(params, system, state, steps, seed=3, hooks=[Checkpoint(ck, every=10)], progress=False)
    return ck


# ----------------------------------------------------------------- checkpoints resume only their own run
def test_resume_with_other_parameter_value_is_refused_naming_it(tmp_path: Path) -> None:
    ck = finished_checkpoint(tmp_path)
    model, params, system, state = small(beta=0.5)
    with pytest.raises(CheckpointError, match=r"parameter raw_beta: saved \[.*\], now \["):
        model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=10)], progress=False)


def test_resume_with_other_steps_is_refused(tmp_path: Path) -> None:
    ck = finished_checkpoint(tmp_path)
    model, params, system, state = small()
    with pytest.raises(CheckpointError, match="steps: saved 30, now 40"):
        model.simulate(params, system, state, 40, seed=3, hooks=[Checkpoint(ck, every=10)], progress=False)


def test_resume_with_other_population_size_is_refused(tmp_path: Path) -> None:
    ck = finished_checkpoint(tmp_path)
    model, params, system, state = small(n=500)
    with pytest.raises(CheckpointError, match=r"different run; cannot resume: state field carrier: saved shape/dtype \[\[800\], 'float32'\], now \[\[500\]"):
        model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=10)], progress=False)


def test_overwritten_checkpoint_bytes_are_detected(tmp_path: Path) -> None:
    ck = finished_checkpoint(tmp_path)
    with h5py.File(ck, "r+") as f:
        f["observables/incidence"][3] = 1e5
    model, params, system, state = small()
    with pytest.raises(CheckpointError, match="does not match its SHA-256 checksum"):
        model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=10)], progress=False)


def test_restored_state_is_validated_like_fresh_state(tmp_path: Path) -> None:
    """A well-formed file (checksum recomputed) with NaN in the saved state is refused, naming the field."""
    ck = finished_checkpoint(tmp_path)
    with h5py.File(ck, "r+") as f:
        f["state/carrier"][5] = np.nan
        f.attrs["sha256"] = _content_hash(f)
    model, params, system, state = small()
    with pytest.raises(CheckpointError, match="restored state is invalid: carrier: expected finite values"):
        model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=10)], progress=False)


def test_not_an_hdf5_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    ck = tmp_path / "run.h5"
    ck.write_bytes(b"\x80\x04not hdf5")
    model, params, system, state = small()
    with pytest.raises(CheckpointError, match=f"checkpoint {ck}: cannot be opened as HDF5"):
        model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=10)], progress=False)


def test_matching_resume_still_equals_uninterrupted(tmp_path: Path) -> None:
    model, params, system, state = small()
    full = model.simulate(params, system, state, 30, seed=3, progress=False)
    ck = tmp_path / "run.h5"

    class Stop(Exception):
        pass

    class StopAt:
        def on_start(self, run): pass
        def on_step(self, run):
            if run.step == 17:
                raise Stop
        def on_end(self, run): pass

    with pytest.raises(Stop):
        model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=10), StopAt()], progress=False)
    res = model.simulate(params, system, state, 30, seed=3, hooks=[Checkpoint(ck, every=10)], progress=False)
    assert res.meta["resumed_from"] == 10 and torch.equal(res["incidence"], full["incidence"])


# ----------------------------------------------------------------- trajectories survive a kill
KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_reliability_state import small
    from lpm import Checkpoint, TrajectoryRecorder
    torch.set_num_threads(1)
    model, params, system, state = small()

    class Slow:
        def on_start(self, run): pass
        def on_step(self, run):
            if run.step >= 25:
                print("READY", flush=True)
                time.sleep(60)
        def on_end(self, run): pass

    hooks = [TrajectoryRecorder({traj!r}, ["stage"], flush_every=10), Checkpoint({ck!r}, every=10), Slow()]
    model.simulate(params, system, state, 40, seed=3, hooks=hooks, progress=False)
""")


def test_trajectory_file_is_readable_after_sigkill_and_resume_completes_it(tmp_path: Path) -> None:
    """SIGKILL mid-run: the file is readable and holds whole chunks; resuming (either hook order) completes it exactly."""
    traj, ck = tmp_path / "traj.h5", tmp_path / "ck.h5"
    code = KILLED_RUN.format(tests=str(REPO / "tests"), traj=str(traj), ck=str(ck))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == b"READY"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with h5py.File(traj, "r") as f:  # readable after the kill, and says how much it holds
        assert int(f.attrs["steps"]) == 20 and f["trajectories/stage"].shape == (20, 800)
    model, params, system, state = small()
    full = model.simulate(params, system, state, 40, seed=3, progress=False,
                          hooks=[TrajectoryRecorder(tmp_path / "ref.h5", ["stage"])])
    for recorder_first in (True, False):  # the order that used to truncate the first steps, and the other
        t2, c2 = tmp_path / f"traj{recorder_first}.h5", tmp_path / f"ck{recorder_first}.h5"
        t2.write_bytes(traj.read_bytes())
        c2.write_bytes(ck.read_bytes())
        rec, cp = TrajectoryRecorder(t2, ["stage"], flush_every=10), Checkpoint(c2, every=10)
        res = model.simulate(params, system, state, 40, seed=3, progress=False,
                             hooks=[rec, cp] if recorder_first else [cp, rec])
        assert res.meta["resumed_from"] == 20
        with h5py.File(t2, "r") as f, h5py.File(tmp_path / "ref.h5", "r") as g:
            assert f["trajectories/stage"].shape == (40, 800) and int(f.attrs["steps"]) == 40
            assert np.array_equal(f["trajectories/stage"][:], g["trajectories/stage"][:])
        assert torch.equal(res["incidence"], full["incidence"])


class _Stop(Exception):
    pass


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_start(self, run): pass

    def on_step(self, run):
        if run.step == self.step:
            raise _Stop

    def on_end(self, run): pass


def test_trajectory_of_another_run_is_never_appended_to(tmp_path: Path) -> None:
    model, params, system, state = small()
    for seed in (3, 4):
        with pytest.raises(_Stop):
            model.simulate(params, system, state, 30, seed=seed, progress=False,
                           hooks=[TrajectoryRecorder(tmp_path / f"traj{seed}.h5", ["stage"], flush_every=5),
                                  Checkpoint(tmp_path / f"ck{seed}.h5", every=10), _StopAt(15)])
    with pytest.raises(CheckpointError, match=r"trajectory file .*traj4.h5: written by a different run.*seed: saved 4, now 3"):
        model.simulate(params, system, state, 30, seed=3, progress=False,
                       hooks=[TrajectoryRecorder(tmp_path / "traj4.h5", ["stage"]), Checkpoint(tmp_path / "ck3.h5")])


# ----------------------------------------------------------------- inputs checked at entry
def test_nan_parameter_is_an_error_naming_it() -> None:
    model, params, system, state = small()
    with torch.no_grad():
        params.raw_beta.fill_(float("nan"))
    with pytest.raises(ParamError, match="parameter raw_beta: 1 of 1 values are NaN"):
        model.simulate(params, system, state, 5, progress=False)


def test_unsorted_edges_or_bad_rowptr_are_errors() -> None:
    model, params, system, state = small()
    net = system.network
    perm = torch.randperm(net.num_edges, generator=torch.Generator().manual_seed(0))
    shuffled = Network(net.edge_index[:, perm], net.weight[perm], net.layer[perm], net.rowptr, net.num_nodes,
                       net.layer_names)
    with pytest.raises(StateError, match="expected edges sorted by source"):
        model.simulate(params, system.replace(network=shuffled), state, 2, progress=False)
    rowptr = net.rowptr.clone()
    rowptr[100] += 1
    bad = Network(net.edge_index, net.weight, net.layer, rowptr, net.num_nodes, net.layer_names)
    with pytest.raises(StateError, match=r"rowptr: inconsistent with edge_index \(rowptr\[100\]"):
        model.simulate(params, system.replace(network=bad), state, 2, progress=False)


def test_fit_stops_when_a_parameter_becomes_nan_naming_it() -> None:
    import calibration as cal
    from test_calibration import AREAS, OBS, build, synthetic_frame

    model, params, system, state = build(N=300, init=5)
    frame, dates = synthetic_frame(model, params, system, state, 10, seeds=(1,))
    data = cal.align(frame, dates, areas=AREAS)
    params.raw_beta.register_hook(lambda g: g * float("nan"))
    prob = cal.Problem(model, system, state, None, OBS, data, cal.Loss("poisson"))
    with pytest.raises(ParamError, match=r"parameter raw_beta: .*NaN.*after fit iteration 1"):
        cal.fit(prob, params, torch.optim.Adam(params.parameters(), lr=0.05), 3, max_grad_norm=None)


def test_fit_on_a_window_without_data_is_an_error() -> None:
    import calibration as cal
    import pandas as pd
    from lpm.errors import DataError
    from test_calibration import AREAS, OBS, build, synthetic_frame

    model, params, system, state = build(N=300, init=5)
    frame, dates = synthetic_frame(model, params, system, state, 10, seeds=(1,))
    later = pd.date_range("2030-01-01", periods=10)
    with pytest.warns(cal.DataWarning):
        data = cal.align(frame, later, areas=AREAS)
    with pytest.raises(DataError, match=r"2030-01-01\.\.2030-01-10: 0 date\(s\) with data"):
        cal.fit(cal.Problem(model, system, state, None, OBS, data, cal.Loss("poisson")), params,
                torch.optim.Adam(params.parameters()), 1)


def test_fit_resume_with_another_problem_is_refused(tmp_path: Path) -> None:
    import calibration as cal
    from test_calibration import AREAS, OBS, build, synthetic_frame

    model, params, system, state = build(N=300, init=5)
    frame, dates = synthetic_frame(model, params, system, state, 10, seeds=(1,))
    data = cal.align(frame, dates, areas=AREAS)
    ck = tmp_path / "state.pt"
    prob = cal.Problem(model, system, state, None, OBS, data, cal.Loss("poisson"))

    def run(steps: int, scale: float) -> cal.FitResult:
        hook = cal.Checkpoint(ck, fingerprint={"scale": scale, "train_end": "2020-05-15"})
        return cal.fit(prob, params, torch.optim.Adam(params.parameters(), lr=0.05), steps, hooks=[hook])

    run(1, 0.002)
    with pytest.raises(CheckpointError, match="scale: saved 0.002, now 0.01"):
        run(2, 0.01)
    res = run(2, 0.002)
    assert res.iterations == 2


@pytest.mark.parametrize("make", [lambda: Dwell.geometric(float("nan")), lambda: Dwell.geometric(-0.2),
                                  lambda: Dwell.gamma(float("nan"), 1.0), lambda: Dwell.gamma(3.0, -1.0),
                                  lambda: Dwell.fixed(-2), lambda: Dwell.fixed(float("nan")),
                                  lambda: Params(beta=Positive(-0.1)), lambda: Params(beta=Positive(float("nan")))])
def test_negative_or_nan_rates_are_errors(make) -> None:
    with pytest.raises((ConfigError, ParamError)):
        make()


def test_saturated_parameter_outside_its_domain_is_named() -> None:
    model, params, system, state = small()
    with torch.no_grad():
        params.raw_beta.fill_(-1e4)  # softplus underflows to exactly 0: outside (0, inf)
    params.check_domains()  # closed bounds: 0 is the edge, still allowed ...
    with torch.no_grad():
        params.raw_beta.fill_(float("inf"))
    with pytest.raises(ParamError, match="raw_beta"):  # ... a non-finite raw value is not
        model.simulate(params, system, state, 2, progress=False)
