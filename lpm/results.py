"""Results of a run: named observables ``[T, ...]`` with tidy tables and plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lpm.state import State

__all__ = ["Results"]


@dataclass
class Results:
    """Observables of a run keyed by name, each ``[T]`` or ``[T, G]`` (``G`` labelled).

    A batched run (:meth:`lpm.Model.replicate`) holds ``[T, R]`` or ``[T, R, G]`` and sets
    ``meta["replicates"] = R``.
    """

    observables: dict[str, Tensor]
    labels: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    dt: float = 1.0
    start_step: int = 0
    final_state: State | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.observables:
            raise KeyError(f"observable {name!r}: unknown; recorded: {sorted(self.observables)}")
        return self.observables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.observables

    @property
    def names(self) -> tuple[str, ...]:
        """Observable names."""
        return tuple(self.observables)

    @property
    def num_steps(self) -> int:
        """Number of recorded steps T."""
        return next(iter(self.observables.values())).shape[0] if self.observables else 0

    @property
    def time(self) -> Tensor:
        """Model time at the end of each recorded step ``[T]`` (in the model's unit)."""
        steps = torch.arange(self.start_step + 1, self.start_step + self.num_steps + 1, dtype=torch.float64)
        return steps * self.dt

    def detach(self) -> "Results":
        """A copy with observables detached and moved to CPU."""
        return Results({k: v.detach().cpu() for k, v in self.observables.items()}, dict(self.labels),
                       self.dt, self.start_step, self.final_state, dict(self.meta))

    def to_pandas(self, start_date: str | pd.Timestamp | None = None, names: Sequence[str] | None = None) -> pd.DataFrame:
        """Tidy table: one row per step, observable and group (``date`` when given a start)."""
        frames = []
        time = self.time.numpy()
        for name in names or self.names:
            v = self[name].detach().cpu().double().numpy()
            v2 = v.reshape(v.shape[0], -1)
            labels = self.labels.get(name) or (tuple(str(i) for i in range(v2.shape[1])) if v.ndim > 1 else ("all",))
            R = self.meta.get("replicates")
            if R:
                # a batched run: observables are [T, R, ...]; groups become "r/label"
                inner = self.labels.get(name) or (tuple(str(i) for i in range(v2.shape[1] // R)) if v.ndim > 2 else ("all",))
                labels = tuple(f"{r}/{g}" for r in range(R) for g in inner)
            T, G = v2.shape
            frames.append(pd.DataFrame({
                "step": np.repeat(np.arange(self.start_step + 1, self.start_step + T + 1), G),
                "time": np.repeat(time, G),
                "observable": name,
                "group": np.tile(np.asarray(labels, dtype=object), T),
                "value": v2.reshape(-1),
            }))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "time", "observable", "group", "value"])
        if start_date is not None:
            df.insert(0, "date", pd.Timestamp(start_date) + pd.to_timedelta(df["time"] - self.dt, unit="D"))
        return df

    def to_wide(self, name: str) -> pd.DataFrame:
        """One observable as a wide table: rows are steps, columns are groups."""
        v = self[name].detach().cpu().double().numpy()
        v2 = v.reshape(v.shape[0], -1)
        labels = self.labels.get(name) or ([name] if v.ndim == 1 else [str(i) for i in range(v2.shape[1])])
        return pd.DataFrame(v2, index=pd.Index(self.time.numpy(), name="time"), columns=list(labels))

    def plot(self, names: Sequence[str] | None = None, ax: Any = None, **kwargs: Any) -> Any:
        """Line plot of observables against time; returns the matplotlib axes."""
        import matplotlib

        if ax is None:
            matplotlib.use(matplotlib.get_backend() if matplotlib.get_backend() else "Agg")
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(8, 4.5))
        t = self.time.numpy()
        for name in names or self.names:
            wide = self.to_wide(name)
            for col in wide.columns:
                label = name if wide.shape[1] == 1 else f"{name}[{col}]"
                ax.plot(t, wide[col].to_numpy(), label=label, **kwargs)
        ax.set_xlabel(f"time (steps of {self.dt:g})")
        ax.legend(loc="best", fontsize="small")
        return ax

    def to_hdf5(self, path: str, group: str = "observables", mode: str = "a") -> None:
        """Write observables (and labels as attributes) to an HDF5 group."""
        import h5py

        with h5py.File(path, mode) as f:
            if group in f:
                del f[group]
            g = f.create_group(group)
            g.attrs["dt"] = self.dt
            g.attrs["start_step"] = self.start_step
            for name, value in self.observables.items():
                ds = g.create_dataset(name, data=value.detach().cpu().numpy(), compression="gzip")
                if self.labels.get(name):
                    ds.attrs["labels"] = list(self.labels[name])

    @staticmethod
    def from_hdf5(path: str, group: str = "observables") -> "Results":
        """Read observables written by :meth:`to_hdf5`."""
        import h5py

        with h5py.File(path, "r") as f:
            g = f[group]
            obs = {k: torch.from_numpy(np.asarray(g[k])) for k in g}
            labels = {k: tuple(str(x) for x in g[k].attrs["labels"]) if "labels" in g[k].attrs else None for k in g}
            return Results(obs, labels, float(g.attrs["dt"]), int(g.attrs["start_step"]))

    def summary(self) -> pd.DataFrame:
        """Per observable: total, peak value and peak time (first group axis summed)."""
        rows = []
        for name in self.names:
            v = self[name].detach().cpu().double()
            s = v.reshape(v.shape[0], -1).sum(1)
            k = int(torch.argmax(s))
            rows.append({"observable": name, "total": float(s.sum()), "peak": float(s[k]), "peak_time": float(self.time[k])})
        return pd.DataFrame(rows)
