"""Hooks that wrap the simulation loop: progress, HDF5 trajectories, checkpoints.

* :class:`TrajectoryRecorder` streams chosen agent-level fields ``[T, N, ...]`` to a
  chunked, compressed HDF5 dataset, one row per step, so that long runs never hold the
  whole trajectory in memory.
* :class:`Checkpoint` writes state + RNG + step counter + observables so far to HDF5
  every k steps (atomically: write a temporary file, then rename) and, on start,
  resumes from an existing checkpoint to the identical result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lpm.model import ModelError, Run

__all__ = ["ProgressBar", "TrajectoryRecorder", "Checkpoint"]


class ProgressBar:
    """A tqdm bar over steps (shown for long runs on a terminal, or when forced)."""

    def __init__(self, force: bool = False, min_steps: int = 200) -> None:
        self.force = force
        self.min_steps = min_steps
        self.bar = None

    def on_start(self, run: Run) -> None:
        show = self.force or (run.steps >= self.min_steps and sys.stderr.isatty())
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.steps, initial=run.step, desc=run.model.name, unit="step", leave=False)

    def on_step(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_end(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()


class TrajectoryRecorder:
    """Stream agent-level fields to HDF5: dataset per field, shape ``[T, N, ...]``."""

    def __init__(self, path: str | os.PathLike, fields: Sequence[str], every: int = 1, compression: str = "gzip") -> None:
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.path = Path(path)
        self.fields = tuple(fields)
        self.every = every
        self.compression = compression
        self.file = None

    def on_start(self, run: Run) -> None:
        import h5py

        names = set(run.state.field_names())
        for f in self.fields:
            if f not in names:
                raise ModelError(f"TrajectoryRecorder: field {f!r} is not on {type(run.state).__name__}; fields: {sorted(names)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if run.step > 0 and self.path.exists() else "w"
        self.file = h5py.File(self.path, mode)
        g = self.file.require_group("trajectories")
        for f in self.fields:
            v = getattr(run.state, f).detach().cpu().numpy()
            if f in g and mode == "a":
                ds = g[f]
                keep = run.step // self.every
                ds.resize(keep, axis=0)
                continue
            n = max(1, v.shape[0])
            chunk_rows = max(1, min(n, 1 << 20))
            g.create_dataset(f, shape=(0, *v.shape), maxshape=(None, *v.shape), dtype=v.dtype,
                             chunks=(1, chunk_rows, *v.shape[1:]), compression=self.compression)
        g.attrs["every"] = self.every

    def on_step(self, run: Run) -> None:
        if run.step % self.every:
            return
        g = self.file["trajectories"]
        for f in self.fields:
            ds = g[f]
            ds.resize(ds.shape[0] + 1, axis=0)
            ds[-1] = getattr(run.state, f).detach().cpu().numpy()

    def on_end(self, run: Run) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Checkpoint:
    """Save state, RNG streams, step and observables every ``every`` steps; resume on start."""

    def __init__(self, path: str | os.PathLike, every: int = 50, resume: bool = True) -> None:
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.path = Path(path)
        self.every = every
        self.resume = resume

    def on_start(self, run: Run) -> None:
        if run.grad:
            raise ModelError("Checkpoint: checkpoints hold no autograd graph; use grad=False runs")
        if self.resume and self.path.exists():
            load_checkpoint(self.path, run)

    def on_step(self, run: Run) -> None:
        if run.step % self.every == 0 or run.step == run.steps:
            save_checkpoint(self.path, run)

    def on_end(self, run: Run) -> None:
        pass


def _signature(run: Run) -> str:
    return "|".join(s.name for s in run.model.substeps) + "#" + ",".join(run.model.observables)


def save_checkpoint(path: str | os.PathLike, run: Run) -> None:
    """Write ``run`` atomically to ``path`` (HDF5)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["step"] = run.step
        f.attrs["seed"] = run.seed
        f.attrs["signature"] = _signature(run)
        f.attrs["state_type"] = type(run.state).__name__
        s = f.create_group("state")
        for k, v in run.state.flat_tensors().items():
            s.create_dataset(k, data=v.detach().cpu().numpy())
        r = f.create_group("rng")
        for k, v in run.streams.get_state().items():
            r.create_dataset(k, data=v.cpu().numpy())
        o = f.create_group("observables")
        for k, v in run.records.items():
            arr = torch.stack(v).detach().cpu().numpy() if v else np.zeros((0,))
            o.create_dataset(k, data=arr)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, run: Run) -> None:
    """Restore ``run`` (state, streams, step, observables) from ``path``."""
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs["signature"] != _signature(run):
            raise ModelError(f"checkpoint {path}: written by a different model plan ({f.attrs['signature']!r})")
        if int(f.attrs["seed"]) != run.seed:
            raise ModelError(f"checkpoint {path}: seed {int(f.attrs['seed'])} differs from this run's seed {run.seed}")
        flat = {}
        f["state"].visititems(lambda name, obj: flat.__setitem__(name, torch.from_numpy(np.asarray(obj))) if hasattr(obj, "shape") else None)
        run.state = run.state.with_flat_tensors(flat)
        run.streams.set_state({k: torch.from_numpy(np.asarray(f["rng"][k])) for k in f["rng"]})
        run.step = int(f.attrs["step"])
        dev = run.state.device
        run.records = {k: list(torch.from_numpy(np.asarray(f["observables"][k])).to(dev).unbind(0)) if run.step else []
                       for k in f["observables"]}
