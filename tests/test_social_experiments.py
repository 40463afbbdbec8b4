"""Both social experiments run end to end through the CLI with tiny arguments."""

import json

import h5py

from lpm.cli import main

from conftest import DEVICE  # one source: the device fixture's value


def test_polarization_cli(tmp_path):
    out = tmp_path / "pol"
    rc = main(["run", "polarization", "--agents", "4000", "--steps", "6", "--device", DEVICE, "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert (out / "polarization_metrics.png").stat().st_size > 0 and (out / "opinion_distribution.png").stat().st_size > 0
    with h5py.File(out / "results.h5") as f:
        assert set(f) == {"chronological", "echo", "diverse"} and f["echo/variance"].shape == (6,)
    sc = s["scenarios"]
    # similarity feeds + rewiring make exposures far more homophilous than a chronological feed,
    # and cross-cutting feeds weaken that again
    assert sc["echo"]["final"]["exposure_corr"] > sc["diverse"]["final"]["exposure_corr"] > sc["chronological"]["final"]["exposure_corr"]
    assert sc["echo"]["final"]["neighbour_corr"] > sc["chronological"]["final"]["neighbour_corr"] + 0.1
    assert abs(sum(s["initial_lr_distribution"]) - 1) < 1e-9
    assert s["friendship_paradox"]["share_fewer"] > 0.5


def test_misinformation_cli(tmp_path):
    out = tmp_path / "mis"
    rc = main(["run", "misinformation", "--agents", "6000", "--steps", "30", "--device", DEVICE, "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert (out / "reach.png").stat().st_size > 0
    with h5py.File(out / "results.h5") as f:
        assert f["scale-free/none/reach"].shape == (30,)
    for kind, net in s["networks"].items():
        sc = net["scenarios"]
        assert sc["all"]["final_reach"] < sc["none"]["final_reach"], kind
        # measured (6000 agents, seed 0): -38% scale-free, -22% small-world
        assert sc["fact_check"]["final_reach"] < 0.9 * sc["none"]["final_reach"], kind
    # the small-world network is the high-clustering one
    assert s["networks"]["small-world"]["clustering"]["transitivity"] > 10 * s["networks"]["scale-free"]["clustering"]["transitivity"]


def test_misinformation_seeds_option_is_renamed_spreaders(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["run", "misinformation", "--agents", "500", "--seeds", "5", "--out", str(tmp_path / "m")])
    assert "renamed --spreaders" in capsys.readouterr().err
