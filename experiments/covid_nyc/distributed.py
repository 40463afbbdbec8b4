"""The NYC COVID-19 model partitioned over ranks: ``lpm run covid-nyc --ranks 4 [--params prior --scale 0.002 --days 30]``.

Partitioned runs use the prior (uncalibrated) parameters, also when ``--params`` is omitted:
``lpm run covid-nyc`` without ``--ranks`` defaults to the fitted replay, which runs in one
process; ``--ranks N --params fitted`` is an error that says so.

Without a launcher it spawns ``--ranks`` local gloo processes; under ``torchrun`` (or Slurm
``srun`` with ``MASTER_ADDR``/``MASTER_PORT``) every process joins the launcher's group (NCCL
on GPUs). Agents are split by borough (``--partition area``) or in contiguous blocks; the
per-borough case window that feeds the weekly archetype decisions is all-reduced, so every
rank asks the same K archetype questions with the same inputs. Rank 0 writes ``daily.csv``
(observables per borough and day, identical for any number of ranks) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

from lpm.cli import date_arg, positive_float, positive_int
from lpm.distributed import Comm, DistributedError, Partition, PartitionedRun, init_from_env, spawn
from lpm.outputs import OutputDir

__all__ = ["run_ranks"]

OUTPUT_FILES = ("daily.csv", "summary.json")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lpm run covid-nyc --ranks N",
                                 description="NYC COVID-19 (prior parameters) partitioned over N processes")
    ap.add_argument("--params", choices=("prior", "fitted"), default="prior",
                    help="prior (the only choice here): partitioned runs use the uncalibrated model; the fitted replay "
                         "(the default of `lpm run covid-nyc` without --ranks) runs in one process")
    ap.add_argument("--scale", type=positive_float, default=0.002, help="agents per resident (1.0 = 8.3 million)")
    ap.add_argument("--days", type=positive_int, default=30)
    ap.add_argument("--start", type=date_arg, default="2020-03-01")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--partition", choices=("area", "blocks"), default="area",
                    help="area: whole boroughs per rank; blocks: contiguous agent ids")
    ap.add_argument("--cache-dir", default=None, help="population cache (default ~/.cache/lpm or $LPM_CACHE_DIR)")
    ap.add_argument("--out", default="out/covid_nyc_ranks", help="output directory (rank 0 writes; must be empty or "
                                                                 "absent, unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the outputs of an earlier run in --out (default: refuse a non-empty --out)")
    return ap


def _output_dir(opts: dict[str, Any]) -> OutputDir:
    """``--out`` checked up front (lpm.outputs.OutputDir): files are staged and moved into place at the end."""
    return OutputDir(opts["out"], OUTPUT_FILES, overwrite=opts["overwrite"])


def _rank_main(comm: Comm, opts: dict[str, Any]) -> dict[str, Any]:
    """One rank: build the model (from the population cache), run its shard, rank 0 writes the outputs."""
    import pandas as pd
    import torch

    from experiments.covid_nyc import build

    torch.set_num_threads(1)
    od = _output_dir(opts) if comm.rank == 0 else None
    setup = build(scale=opts["scale"], seed=opts["seed"], start=opts["start"], days=opts["days"], llm="rule",
                  llm_cache=False, cache_dir=opts["cache_dir"])
    n = int(setup.state.stage.numel())
    part = (Partition.by_group(setup.system.area, comm.world) if opts["partition"] == "area"
            else Partition.blocks(n, comm.world))
    run = PartitionedRun(setup.model, setup.params, setup.system, setup.state, part, comm, sums=("recent_cases",))
    res = run.simulate(setup.steps, seed=opts["seed"])
    meta = comm.all_gather_object(res.meta)
    cut, share = part.edge_cut(setup.system.network.edge_index)
    if od is not None:
        cols: dict[str, Any] = {"date": [d.date() for d in setup.dates]}
        for k, v in res.observables.items():
            labels = res.labels.get(k)
            if v.dim() == 2 and labels is not None and len(labels) == len(setup.areas):
                for j, a in enumerate(labels):
                    cols[f"{k}:{a}"] = v[:, j].tolist()
            elif v.dim() == 1:
                cols[k] = v.tolist()
        pd.DataFrame(cols).to_csv(od / "daily.csv", index=False)
        summary = {"ranks": comm.world, "params": "prior", "agents": n, "edges": int(setup.system.network.num_edges), "partition": opts["partition"],
                   "edge_cut": cut, "edge_cut_share": share, "agents_per_rank": part.sizes(),
                   "ghosts_per_rank": [m["ghosts"] for m in meta],
                   "halo_bytes_per_step": sum(m["halo_bytes"] for m in meta) / max(setup.steps, 1),
                   "wall_seconds": max(m["wall_seconds"] for m in meta),
                   "comm_seconds_max": max(m["comm_seconds"] for m in meta),
                   "infections": float(res["infections"].sum()), "cases": float(res["cases"].sum())}
        (od / "summary.json").write_text(json.dumps(summary, indent=2))
        od.commit()
        print(json.dumps(summary, indent=2))
    return {"rank": comm.rank}


def run_ranks(argv: Sequence[str], ranks: int) -> int:
    """CLI: ``lpm run covid-nyc --ranks N``: spawn N local gloo processes, or join torchrun's group."""
    a = _parser().parse_args(list(argv))
    if a.params != "prior":
        raise DistributedError("--params fitted: the calibrated replay runs in one process (lpm run covid-nyc without "
                               "--ranks); a partitioned run uses the prior model: pass --params prior or omit --params")
    opts = {"scale": a.scale, "seed": a.seed, "start": a.start, "days": a.days, "partition": a.partition,
            "cache_dir": a.cache_dir, "out": a.out, "overwrite": a.overwrite}
    env = os.environ
    launched = "RANK" in env and "WORLD_SIZE" in env
    slurm = not launched and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
    if launched or slurm:
        world = int(env["WORLD_SIZE"] if launched else env["SLURM_NTASKS"])
        if ranks != world:
            raise DistributedError(f"--ranks {ranks}: the launcher started {world} processes (WORLD_SIZE); "
                                   "omit --ranks under torchrun, or give the number of Slurm tasks")
        _rank_main(init_from_env(), opts)
        return 0
    from experiments.covid_nyc import build

    _output_dir(opts).abort()  # a bad --out fails here, before the population is built and processes start
    # the population is built once here; the ranks load it from the cache
    build(scale=a.scale, seed=a.seed, start=a.start, days=1, llm="off", cache_dir=a.cache_dir)
    spawn(_rank_main, ranks, opts)
    return 0
