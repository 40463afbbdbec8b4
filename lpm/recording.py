"""Hooks that wrap the simulation loop: progress, HDF5 trajectories, checkpoints.

* :class:`TrajectoryRecorder` streams chosen agent-level fields ``[T, N, ...]`` to a
  chunked, compressed HDF5 dataset, so that long runs never hold the whole trajectory in
  memory. Rows are buffered ``flush_every`` steps and appended with the file opened only
  for that write, so a killed run leaves a readable file that lacks at most the last
  chunk (``attrs["steps"]`` says how many steps it holds).
* :class:`Checkpoint` writes state + RNG + step counter + observables so far to HDF5
  every k steps (atomically: write a temporary file, then rename) and, on start,
  resumes from an existing checkpoint to the identical result.

Both files carry the run's *fingerprint* (:func:`run_fingerprint`: model plan and substep
data, parameter values, initial state shapes and content, steps, seed, code version) and
checkpoints a SHA-256 of their content. Resuming with anything different, or from a file
whose bytes changed, raises :class:`~lpm.errors.CheckpointError` naming the difference;
restored state is validated like fresh state (shapes, dtypes, finite values).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lpm.errors import CheckpointError
from lpm.model import ModelError, Run

__all__ = ["ProgressBar", "TrajectoryRecorder", "Checkpoint", "ResumeError", "run_fingerprint", "fingerprint_diff"]


class ResumeError(CheckpointError, ModelError):
    """A checkpoint or trajectory file does not belong to this run, or is damaged (names the file and the difference)."""


_SMALL = 16  # parameters with at most this many values are stored as values (named in differences), others hashed


def _tensor_digest(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    a = np.ascontiguousarray(t.detach().cpu().numpy())
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())


def _substep_data_hash(model: Any) -> str:
    """Hash of the tensors substeps hold (schedules, tables): a changed covariate is a different model."""
    h = hashlib.sha256()
    for s in model.substeps:
        for k, v in sorted(vars(s).items()):
            items = v if isinstance(v, (list, tuple)) else [v]
            for j, item in enumerate(items):
                if isinstance(item, torch.Tensor):
                    _tensor_digest(h, f"{s.name}.{k}[{j}]", item)
                elif hasattr(item, "__dict__") and not isinstance(item, type):
                    for kk, vv in sorted(vars(item).items()):
                        if isinstance(vv, torch.Tensor):
                            _tensor_digest(h, f"{s.name}.{k}[{j}].{kk}", vv)
    return h.hexdigest()[:16]


def run_fingerprint(run: Run) -> dict[str, Any]:
    """What produced a run, computed once per run from its *initial* state (JSON-ready).

    Keys: ``plan``, ``substep_data``, ``params`` (small tensors by value, others by hash),
    ``state_shapes``, ``state`` (content hash), ``system_shapes``, ``system`` (content hash: the
    system is never checkpointed, so resuming against a different one must fail here),
    ``steps``, ``seed``, ``code_version``.
    """
    cached = run.__dict__.get("_fingerprint")
    if cached is not None:
        return cached
    from lpm import __version__

    params: dict[str, Any] = {}
    for name, t in [*run.params.named_parameters(), *run.params.named_buffers()]:
        v = t.detach().cpu()
        if v.numel() <= _SMALL:
            params[name] = [float(x) for x in v.double().flatten().tolist()]
        else:
            h = hashlib.sha256()
            _tensor_digest(h, name, v)
            params[name] = "sha256:" + h.hexdigest()[:16]
    fp = {"plan": run.model.plan(), "substep_data": _substep_data_hash(run.model), "params": params}
    for key, struct in (("state", run.state), ("system", run.system)):
        flat = struct.flat_tensors()
        h = hashlib.sha256()
        for k in sorted(flat):
            _tensor_digest(h, k, flat[k])
        fp[f"{key}_shapes"] = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sorted(flat.items())}
        fp[key] = h.hexdigest()[:16]
    fp.update({"steps": int(run.steps), "seed": int(run.seed), "code_version": __version__})
    run.__dict__["_fingerprint"] = fp
    return fp


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    out = []
    order = ["steps", "seed", "params", "state_shapes", "system_shapes", "code_version", "plan", "substep_data", "state",
             "system"]
    for key in sorted(set(saved) | set(current), key=lambda k: (order.index(k) if k in order else len(order), k)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "params" and isinstance(a, dict) and isinstance(b, dict):
            for n in sorted(set(a) | set(b)):
                if a.get(n) != b.get(n):
                    out.append(f"parameter {n}: saved {a.get(n)}, now {b.get(n)}")
        elif key in ("state_shapes", "system_shapes") and isinstance(a, dict) and isinstance(b, dict):
            for n in sorted(set(a) | set(b)):
                if a.get(n) != b.get(n):
                    out.append(f"{key.split('_')[0]} field {n}: saved shape/dtype {a.get(n)}, now {b.get(n)}")
        elif key == "plan":
            out.append("model plan differs (substeps or observables)")
        elif key == "state":
            out.append("initial state content differs (seeding or initial values)")
        elif key == "system":
            out.append("system content differs (network, agent attributes, schedules or tables)")
        elif key == "substep_data":
            out.append("substep data differ (schedules, tables or covariates)")
        else:
            out.append(f"{key}: saved {a!r}, now {b!r}")
    return out


def _check_fingerprint(path: Path, what: str, saved_json: str, run: Run) -> None:
    try:
        saved = json.loads(saved_json)
    except (TypeError, json.JSONDecodeError):
        raise ResumeError(f"{what} {path}: has no readable fingerprint; it was not written by this version "
                              f"(move it away to start afresh)") from None
    diff = fingerprint_diff(saved, run_fingerprint(run))
    if diff:
        raise ResumeError(f"{what} {path}: written by a different run; cannot resume: " + "; ".join(diff[:6])
                              + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
                              + " (use another path, or delete the file to start afresh)")


def _open_h5(path: Path, mode: str, what: str) -> Any:
    import h5py

    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise ResumeError(f"{what} {path}: cannot be opened as HDF5 ({exc}); the file is damaged or not a "
                              f"{what} (killed during a write?); delete it to start afresh") from None


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
    """Stream agent-level fields to HDF5: dataset per field, shape ``[T, N, ...]`` (one row per ``every`` steps).

    The file is opened only to append the rows of the last ``flush_every`` steps and closed
    (flushed) right after, so a kill loses at most the rows buffered since the last chunk
    and the file stays readable; ``attrs["steps"]`` is the number of steps it covers.
    Chunks end on multiples of ``flush_every``: give a :class:`Checkpoint` an ``every``
    that is a multiple of it, so that a resumed run finds every earlier row on disk. The
    recorder starts writing at the first step it sees, so with a :class:`Checkpoint` the
    hook order does not matter: a resumed run keeps the rows of steps before its start
    (trimming any written after the checkpoint) and appends the rest. An existing file
    from a different run (fingerprint) is an error, never appended to; a fresh run
    (step 0) replaces it.
    """

    def __init__(self, path: str | os.PathLike, fields: Sequence[str], every: int = 1, compression: str = "gzip",
                 flush_every: int = 10) -> None:
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        if flush_every < 1:
            raise ValueError(f"flush_every: expected >= 1, got {flush_every}")
        self.path = Path(path)
        self.fields = tuple(fields)
        self.every = every
        self.flush_every = flush_every
        self.compression = compression
        self.buffer: list[tuple[int, dict[str, np.ndarray]]] = []
        self.started = False
        self.file = None  # kept for compatibility: the file is open only while a chunk is written

    def on_start(self, run: Run) -> None:
        names = set(run.state.field_names())
        for f in self.fields:
            if f not in names:
                raise ModelError(f"TrajectoryRecorder: field {f!r} is not on {type(run.state).__name__}; fields: {sorted(names)}")
        run_fingerprint(run)  # from the initial state, whichever hook restores a checkpoint later
        self.buffer, self.started = [], False

    def _begin(self, run: Run, first_step: int) -> None:
        """Create the file (fresh run) or trim an existing one to ``first_step`` (resumed run)."""
        fp = json.dumps(run_fingerprint(run), sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if first_step > 0 and self.path.exists():
            with _open_h5(self.path, "a", "trajectory file") as f:
                _check_fingerprint(self.path, "trajectory file", f.attrs.get("fingerprint"), run)
                have = int(f.attrs.get("steps", 0))
                if have < first_step:
                    raise ResumeError(f"trajectory file {self.path}: holds {have} steps but the run resumes at "
                                          f"step {first_step}; steps {have}..{first_step - 1} would be missing "
                                          f"(delete the file, or resume from an earlier checkpoint)")
                keep = first_step // self.every
                for name in self.fields:
                    f["trajectories"][name].resize(keep, axis=0)
                f.attrs["steps"] = first_step
        else:
            if first_step > 0:
                raise ResumeError(f"trajectory file {self.path}: missing, but the run resumes at step {first_step}; "
                                      f"steps 0..{first_step - 1} would be missing (start afresh without the "
                                      f"checkpoint, or restore the file)")
            tmp = self.path.with_name(self.path.name + ".tmp")
            with _open_h5(tmp, "w", "trajectory file") as f:
                g = f.create_group("trajectories")
                for name in self.fields:
                    v = getattr(run.state, name).detach().cpu().numpy()
                    n = max(1, v.shape[0]) if v.ndim else 1
                    chunk = (1, max(1, min(n, 1 << 20)), *v.shape[1:]) if v.ndim else (1,)
                    g.create_dataset(name, shape=(0, *v.shape), maxshape=(None, *v.shape), dtype=v.dtype,
                                     chunks=chunk, compression=self.compression)
                g.attrs["every"] = self.every
                f.attrs["every"] = self.every
                f.attrs["steps"] = 0
                f.attrs["fingerprint"] = fp
            os.replace(tmp, self.path)
        self.started = True

    def _flush(self, upto: int, force: bool = False) -> None:
        if not self.buffer and not force:
            return
        with _open_h5(self.path, "a", "trajectory file") as f:
            g = f["trajectories"]
            for name in self.fields if self.buffer else ():
                ds = g[name]
                rows = np.stack([r[name] for _, r in self.buffer])
                n0 = ds.shape[0]
                ds.resize(n0 + len(rows), axis=0)
                ds[n0:] = rows
            f.attrs["steps"] = upto  # written last: a reader trusts rows up to here
        self.buffer = []

    def on_step(self, run: Run) -> None:
        if not self.started:
            self._begin(run, run.step - 1)
        if run.step % self.every == 0:
            self.buffer.append((run.step, {f: getattr(run.state, f).detach().cpu().numpy() for f in self.fields}))
        # flush on step numbers (not on buffer size) so chunks line up with checkpoints every k * flush_every steps
        if run.step % self.flush_every == 0 or run.step == run.steps:
            self._flush(run.step, force=True)

    def on_end(self, run: Run) -> None:
        if self.started:
            self._flush(run.step, force=True)


class Checkpoint:
    """Save state, RNG streams, step and observables every ``every`` steps; resume on start.

    The file records the run's fingerprint and a SHA-256 of its content: resuming a
    different run (other parameters, steps, seed, population, code version) or a file
    whose bytes changed is an error that names the difference, never a silent replay.
    """

    def __init__(self, path: str | os.PathLike, every: int = 50, resume: bool = True) -> None:
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.path = Path(path)
        self.every = every
        self.resume = resume

    def on_start(self, run: Run) -> None:
        if run.grad:
            raise ModelError("Checkpoint: checkpoints hold no autograd graph; use grad=False runs")
        run_fingerprint(run)  # before anything is restored
        if self.resume and self.path.exists():
            load_checkpoint(self.path, run)

    def on_step(self, run: Run) -> None:
        if run.step % self.every == 0 or run.step == run.steps:
            save_checkpoint(self.path, run)

    def on_end(self, run: Run) -> None:
        pass


def _signature(run: Run) -> str:
    return "|".join(s.name for s in run.model.substeps) + "#" + ",".join(run.model.observables)


def _content_hash(f: Any) -> str:
    """SHA-256 over every dataset (name, dtype, shape, bytes) and the fingerprint/step attributes."""
    h = hashlib.sha256()
    names: list[str] = []
    f.visit(lambda n: names.append(n) if hasattr(f[n], "shape") else None)
    for n in sorted(names):
        a = np.ascontiguousarray(np.asarray(f[n][()]))
        h.update(f"{n}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    for k in ("step", "seed", "signature", "state_type", "fingerprint"):
        h.update(f"{k}={f.attrs.get(k)!s}|".encode())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, run: Run) -> None:
    """Write ``run`` atomically to ``path`` (HDF5) with its fingerprint and content checksum."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["step"] = run.step
        f.attrs["seed"] = run.seed
        f.attrs["signature"] = _signature(run)
        f.attrs["state_type"] = type(run.state).__name__
        f.attrs["fingerprint"] = json.dumps(run_fingerprint(run), sort_keys=True)
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
        f.attrs["sha256"] = _content_hash(f)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, run: Run) -> None:
    """Restore ``run`` (state, streams, step, observables) from ``path``, after checking it belongs to this run."""
    path = Path(path)
    with _open_h5(path, "r", "checkpoint") as f:
        if "sha256" not in f.attrs or "fingerprint" not in f.attrs:
            raise ResumeError(f"checkpoint {path}: has no fingerprint or checksum (written by an older version); "
                                  f"delete it to start afresh")
        if _content_hash(f) != f.attrs["sha256"]:
            raise ResumeError(f"checkpoint {path}: content does not match its SHA-256 checksum (the file was "
                                  f"changed or damaged); delete it to start afresh")
        if f.attrs["signature"] != _signature(run):
            raise ResumeError(f"checkpoint {path}: written by a different model plan ({f.attrs['signature']!r})")
        if int(f.attrs["seed"]) != run.seed:
            raise ResumeError(f"checkpoint {path}: seed {int(f.attrs['seed'])} differs from this run's seed {run.seed}")
        _check_fingerprint(path, "checkpoint", f.attrs["fingerprint"], run)
        step = int(f.attrs["step"])
        if not 0 <= step <= run.steps:
            raise ResumeError(f"checkpoint {path}: step {step} outside 0..{run.steps}")
        current = run.state.flat_tensors()
        flat = {}
        f["state"].visititems(lambda name, obj: flat.__setitem__(name, torch.from_numpy(np.asarray(obj))) if hasattr(obj, "shape") else None)
        if set(current) - set(flat):
            raise ResumeError(f"checkpoint {path}: state fields {sorted(set(current) - set(flat))} are missing")
        restored = run.state.with_flat_tensors(flat).flat_tensors()
        if set(flat) != set(restored):  # a saved field this state type cannot hold
            raise ResumeError(f"checkpoint {path}: state fields {sorted(set(flat) - set(restored))} are not on "
                                  f"{type(run.state).__name__}")
        for k, v in flat.items():
            if k not in current:
                continue
            if tuple(v.shape) != tuple(current[k].shape) or v.dtype != current[k].dtype:
                raise ResumeError(f"checkpoint {path}: state field {k} has shape {tuple(v.shape)} {v.dtype}, this "
                                      f"run {tuple(current[k].shape)} {current[k].dtype}")
        state = run.state.with_flat_tensors(flat)
        try:
            run.model.check(run.params, run.system, state)  # restored state is validated like fresh state
        except ValueError as exc:
            raise ResumeError(f"checkpoint {path}: restored state is invalid: {exc}") from None
        records = {k: list(torch.from_numpy(np.asarray(f["observables"][k])).to(state.device).unbind(0)) if step else []
                   for k in f["observables"]}
        if set(records) != set(run.model.observables) or any(len(v) != step for v in records.values()):
            raise ResumeError(f"checkpoint {path}: observables do not match {step} steps of this model")
        run.state = state
        run.streams.set_state({k: torch.from_numpy(np.asarray(f["rng"][k])) for k in f["rng"]})
        run.step = step
        run.records = records
