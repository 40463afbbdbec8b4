"""Partitioned runs and data-parallel gradients over torch.distributed (gloo, spawned local processes).

The default suite spawns 4 processes once (``suite`` fixture) and checks, on process groups of
1, 2 and 4 ranks: bit-identical observables of a network SEIR (and equal to ``Model.simulate``),
a sum-over-agents field, the data-parallel calibration gradient, and per-rank checkpoints.
The NYC model is the slow test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from benchmarks.distributed import checkpoint_worker, equivalence_worker, seir_case, suite_worker  # noqa: F401
from lpm import Intervention, Model, Modulate, Network
from lpm.distributed import (Comm, DistributedError, Partition, PartitionedRun, _edge_index, _slice_state, localize,
                             make_shard, spawn)
from lpm.kernels import GlobalKey, counter_uniform, stream_key
from lpm.state import System, tensor_field
from lpm.substep import substep

WORLDS = (1, 2, 4)
START = "fork" if sys.platform.startswith("linux") else "spawn"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict:
    ck = tmp_path_factory.mktemp("ck")
    spec = {
        "seir": {"case": "seir", "n": 1500, "steps": 25, "worlds": WORLDS, "reference": True, "check": True},
        "tally": {"case": "tally", "n": 800, "steps": 12, "worlds": WORLDS, "sums": ("tally",), "reference": True},
        "grad": {"n": 250, "steps": 8, "worlds": WORLDS, "seeds": [0, 1, 2, 3]},
        "checkpoint": {"n": 600, "steps": 14, "stop": 8, "dir": str(ck)},
    }
    # fork: the children start from this process's imports (spawn would import torch 4 times on 2 cores)
    return spawn(suite_worker, 4, spec, start_method=START)[0]


def _equal(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_seir_observables_bit_identical_on_1_2_4_ranks(suite: dict) -> None:
    out = suite["seir"]
    for w in WORLDS:
        assert _equal(out[1]["obs"], out[w]["obs"]) == [], w
    # and equal to the ordinary single-process run (torch path and compiled kernels)
    assert _equal(out[1]["obs"], out["reference"]) == []
    if "reference_compiled" in out:
        assert _equal(out[1]["obs"], out["reference_compiled"]) == []
    print("suite seconds per part (rank 0):", suite["seconds"])
    assert float(out[1]["obs"]["incidence"].sum()) > 50  # an epidemic happened: the check is not vacuous
    # the 2- and 4-rank runs really exchanged halos over a cut graph
    for w in (2, 4):
        assert out[w]["meta"]["halo_bytes"] > 0 and out[w]["meta"]["ghosts"] > 0
        assert 0.3 < out[w]["cut"][1] < 0.9
    assert out[1]["meta"]["halo_bytes"] == 0


def test_sum_over_agents_field_is_all_reduced(suite: dict) -> None:
    out = suite["tally"]
    for w in WORLDS:
        assert "error" not in out[w], out[w]
        assert _equal(out[1]["obs"], out[w]["obs"]) == [], w
    assert _equal(out[1]["obs"], out["reference"]) == []
    # the tally counts every agent once (ghost rows are not counted)
    assert torch.all(out[4]["obs"]["tally"].sum(1) == 800)


def test_undeclared_sum_field_is_a_clear_error(suite: dict) -> None:
    out = suite["tally_undeclared"]
    assert "error" not in out[1]  # one rank cannot tell
    for w in (2, 4):
        msg = out[w]["error"]
        assert msg.startswith("DistributedError") and "'tally'" in msg and "sums=" in msg


def test_draws_sized_by_a_ranks_agents_are_a_clear_error(suite: dict) -> None:
    out = suite["frontier"]
    assert "error" not in out[1]
    for w in (2, 4):
        msg = out[w]["error"]
        assert msg.startswith("DistributedError") and "'frontier_draw'" in msg and "rand draw of size" in msg, msg


def test_data_parallel_gradient_identical_for_1_2_4_ranks(suite: dict) -> None:
    out = suite["grad"]
    g1 = out[1]["grad"]
    assert torch.isfinite(g1).all() and g1.abs().sum() > 0
    for w in WORLDS:
        assert torch.equal(out[w]["grad"], g1), w
        assert torch.equal(out[w]["loss"], out[1]["loss"])
    # the single-process fit (one graph, one backward) differs only by the order of float additions
    assert torch.equal(out["single"]["loss"], out[1]["loss"])
    torch.testing.assert_close(out["single"]["grad"], g1, rtol=1e-5, atol=1e-7)


def test_checkpoints_resume_identically_and_refuse_another_rank_count(suite: dict) -> None:
    out = suite["checkpoint"]
    assert out["stopped_at"] == 8 and out["resumed_from"] == 5  # saved every 5 steps
    assert _equal(out["full"], out["resumed"]) == []
    msg = out["rank_change_error"]
    assert msg is not None and msg.startswith("DistributedError") and "written by [4] rank(s), resumed with 2" in msg
    # another system (one edge weight, held by rank 3 only): rank 0 stops too, naming the rank that found it
    msg = out["system_change_error"]
    assert msg is not None and msg.startswith("DistributedError: rank 3: checkpoint") and "different system" in msg, msg


# ----------------------------------------------------------------------------- in-process (one rank)


def test_partitions_sizes_and_edge_cut() -> None:
    p = Partition.blocks(10, 4)
    assert p.sizes() == [3, 2, 3, 2]
    assert torch.equal(p.owner, torch.sort(p.owner).values)  # contiguous
    area = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    q = Partition.by_group(area, 2)
    assert sorted(q.sizes()) == [5, 5] and all(len(set(q.owner[area == a].tolist())) == 1 for a in range(4))
    ei = torch.tensor([[0, 4, 6, 9], [1, 0, 7, 3]])
    cut, share = q.edge_cut(ei)
    assert cut == sum(int(q.owner[s] != q.owner[d]) for s, d in ei.t().tolist()) and share == cut / 4
    with pytest.raises(DistributedError, match="world"):
        Partition.blocks(3, 4)
    with pytest.raises(DistributedError, match="owner"):
        Partition(torch.tensor([0, 2]), 2)


def test_global_key_draws_as_the_whole_population() -> None:
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([3, 7, 8, 20])
    key = stream_key(g, 4)
    local = counter_uniform(GlobalKey(key, ids), torch.arange(4))
    assert torch.equal(local, counter_uniform(key, ids))
    assert not torch.equal(local, counter_uniform(key, torch.arange(4)))


def test_localize_slices_agent_tensors_held_by_substeps() -> None:
    n = 6
    elig = torch.tensor([True, False, True, True, False, True])
    sub = Modulate("v", "susceptibility", "susceptibility_base",
                   [Intervention("v", torch.ones(5, 1) * 0.5, eligible=elig)])
    rows = torch.tensor([1, 2, 5])
    loc = localize(sub, rows, n)
    assert loc is not sub and torch.equal(loc.interventions[0].eligible, elig[rows])
    assert sub.interventions[0].eligible is elig  # the original is untouched
    assert localize(sub, torch.arange(n), 7) is sub  # nothing of length 7: no copy


def test_shard_rows_and_remapped_edges() -> None:
    model, params, system, state = seir_case(300)
    shard, lut = make_shard(system, state, Partition.blocks(300, 1), Comm())
    assert shard.num_ghosts == 0 and shard.ids.numel() == 300
    run = PartitionedRun(model, params, system, state, Partition.blocks(300, 1))
    assert torch.equal(run.system.network.edge_index, system.network.edge_index)
    assert torch.equal(run.system.network.rowptr, system.network.rowptr)


@dataclass(frozen=True)
class _RowsSystem(System):
    """A system with agent, edge and replicated axes (one of which happens to have N entries)."""

    area: Tensor = tensor_field(("N",), torch.int8)
    factor: Tensor = tensor_field(("N", "L"), torch.float32)
    band: Tensor = tensor_field(("B",), torch.float32)
    rate: Tensor = tensor_field(("C+1",), torch.float32)
    network: Network = tensor_field((), None)


def test_system_is_sliced_like_the_state_only_on_agent_and_edge_axes() -> None:
    n = 5
    ei = torch.tensor([[0, 0, 1, 2, 3, 4, 4], [1, 3, 4, 3, 0, 2, 3]])
    net = Network.from_layers({"a": (ei, torch.arange(7, dtype=torch.float32))}, n, coalesce=False)
    sys_ = _RowsSystem(area=torch.arange(n, dtype=torch.int8), factor=torch.arange(10.0).reshape(n, 2),
                       band=torch.arange(5.0), rate=torch.arange(4.0), network=net)
    owned = torch.tensor([False, False, True, True, False])
    keep = owned[net.edge_index[1]].nonzero().squeeze(1)  # edges ending in agents 2, 3
    rows = torch.tensor([0, 2, 3, 4])  # owned 2, 3 and the sources 0 and 4 of their in-edges
    lut = torch.full((n,), -1, dtype=torch.int64)
    lut[rows] = torch.arange(4)
    out = _slice_state(sys_, rows, n, keep, lut)
    assert torch.equal(out.area, sys_.area[rows]) and torch.equal(out.factor, sys_.factor[rows])
    assert out.band is sys_.band and out.rate is sys_.rate  # "B" (here of size N) and "C+1" replicate
    src, dst = net.edge_index[:, keep]
    assert torch.equal(out.network.edge_index, torch.stack([lut[src], lut[dst]]))
    assert torch.equal(out.network.weight, net.weight[keep]) and out.network.num_nodes == 4
    # kept edges 0->3, 2->3, 4->2, 4->3: local sources 0, 1, 3, 3
    assert torch.equal(out.network.rowptr, torch.tensor([0, 1, 2, 2, 4]))
    assert _edge_index(System(), out) is out.network.edge_index and _edge_index(System(), System()) is None


def test_generator_draws_that_cannot_be_keyed_are_refused() -> None:
    model, params, system, state = seir_case(200)

    @substep(reads=("timer",), writes=("timer",))
    def jitter(params, system, state, t, rng):
        return state.replace(timer=state.timer + torch.randint(0, 2, state.timer.shape, generator=rng).to(state.timer.dtype))

    bad = Model([*model.substeps, jitter], model.observables, state_type=type(state), system_type=type(system))
    run = PartitionedRun(bad, params, system, state, Partition.blocks(200, 1))
    with pytest.raises(DistributedError, match="substep 'jitter' draws with randint"):
        run.simulate(3)


def test_unknown_sum_field_and_wrong_partition_are_errors() -> None:
    model, params, system, state = seir_case(200)
    with pytest.raises(DistributedError, match="sums: field 'nope'"):
        PartitionedRun(model, params, system, state, Partition.blocks(200, 1), sums=("nope",))
    with pytest.raises(DistributedError, match="sums: field 'layer_scale_base' is a field of the system"):
        PartitionedRun(model, params, system, state, Partition.blocks(200, 1), sums=("layer_scale_base",))
    with pytest.raises(DistributedError, match="owner covers 100 agents"):
        PartitionedRun(model, params, system, state, Partition.blocks(100, 1))
    with pytest.raises(DistributedError, match="made for 2 ranks"):
        PartitionedRun(model, params, system, state, Partition.blocks(200, 2))


# ----------------------------------------------------------------------------- NYC (slow)


@pytest.mark.slow
def test_nyc_observables_bit_identical_on_1_2_4_ranks(tmp_path) -> None:
    from experiments.covid_nyc import build

    cache = str(tmp_path / "cache")
    build(scale=0.002, days=2, llm="rule", llm_cache=False, cache_dir=cache)  # the population, built once
    spec = {"case": "nyc", "scale": 0.002, "days": 20, "steps": 20, "cache_dir": cache, "worlds": WORLDS,
            "partition": "area", "reference": True}
    out = spawn(equivalence_worker, 4, {**spec, "compiled": True}, start_method=START)[0]
    for w in WORLDS:
        assert "error" not in out[w], out[w]
        assert _equal(out[1]["obs"], out[w]["obs"]) == [], w
    assert _equal(out[1]["obs"], out["reference"]) == []
    assert float(out[1]["obs"]["infections"].sum()) > 50 and float(out[1]["obs"]["cases"].sum()) > 0


def test_cli_ranks_option_is_checked(capsys: pytest.CaptureFixture) -> None:
    from lpm.cli import experiments, main

    assert experiments()["covid-nyc"].run_ranks is not None
    assert main(["run", "sir-demo", "--ranks", "2"]) == 2
    assert "cannot run partitioned over ranks" in capsys.readouterr().err
    assert main(["run", "covid-nyc", "--ranks", "0"]) == 2
    assert "--ranks: expected an integer > 0, got 0" in capsys.readouterr().err
    # the fitted replay (the default without --ranks) is single-process: asked for with --ranks, a clear error
    assert main(["run", "covid-nyc", "--ranks", "2", "--params", "fitted"]) == 2
    assert "--params fitted: the calibrated replay runs in one process" in capsys.readouterr().err


def test_cli_ranks_refuses_a_non_empty_out_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--out follows lpm.outputs.OutputDir: an earlier run's files are kept unless --overwrite (no process starts)."""
    from lpm.cli import main

    (tmp_path / "daily.csv").write_text("an earlier run\n")
    assert main(["run", "covid-nyc", "--ranks", "2", "--out", str(tmp_path)]) == 2
    assert "not empty (daily.csv)" in capsys.readouterr().err
    assert (tmp_path / "daily.csv").read_text() == "an earlier run\n"


@pytest.mark.slow
def test_cli_ranks_and_torchrun_write_the_same_nyc_run(tmp_path) -> None:
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    common = ["--scale", "0.002", "--days", "8", "--cache-dir", str(tmp_path / "cache")]
    one = subprocess.run([sys.executable, "-m", "lpm.cli", "run", "covid-nyc", "--ranks", "1", *common, "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "lpm.cli", "run", "covid-nyc", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a = (tmp_path / "one" / "daily.csv").read_text()
    assert a == (tmp_path / "two" / "daily.csv").read_text() and len(a.splitlines()) == 9
    assert '"ranks": 2' in (tmp_path / "two" / "summary.json").read_text()


def test_partition_by_group_rejects_bad_codes_naming_the_field() -> None:
    from lpm.distributed import DistributedError, Partition

    for bad, msg in ((torch.tensor([0.0, 1.0, float("nan")]), "group: expected a 1-D integer tensor"),
                     (torch.tensor([[0, 1]]), "group: expected a 1-D integer tensor"),
                     (torch.tensor([0, -1, 1]), "group: expected codes >= 0")):
        with pytest.raises(DistributedError, match=msg):
            Partition.by_group(bad, 2)
    with pytest.raises(DistributedError, match="world: expected >= 1"):
        Partition.by_group(torch.tensor([0, 1]), 0)
    assert Partition.by_group(torch.tensor([0, 0, 1, 2], dtype=torch.int8), 2).sizes() == [2, 2]
