"""Data-only tensor files: HDF5 datasets + JSON metadata + a SHA-256 of the content.

For caches and intermediate products. Reading never runs code (no pickle): a file planted
at a cache path, a truncated file or changed bytes are refused with
:class:`~lpm.errors.CheckpointError` naming the file. Writes are atomic (temporary file,
then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from lpm.errors import CheckpointError

__all__ = ["save_tensors", "load_tensors"]


def _digest(arrays: Mapping[str, np.ndarray], meta_json: str) -> str:
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"|{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` (names may contain ``/``) and JSON-ready ``meta`` atomically to ``path``."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    meta_json = json.dumps(dict(meta), sort_keys=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for k, a in arrays.items():
                f.create_dataset(k, data=a)
            f.attrs["meta"] = meta_json
            f.attrs["sha256"] = _digest(arrays, meta_json)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: str | os.PathLike, expect: Mapping[str, Any] | None = None,
                 what: str = "cache file") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`; check its checksum and that ``meta`` matches ``expect``."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{what} {path}: refused: not a data-only HDF5 tensor file ({exc}); delete it to "
                              f"rebuild") from None
    with f:
        if "meta" not in f.attrs or "sha256" not in f.attrs:
            raise CheckpointError(f"{what} {path}: refused: no metadata or checksum; delete it to rebuild")
        meta_json = str(f.attrs["meta"])
        arrays: dict[str, np.ndarray] = {}
        f.visititems(lambda name, obj: arrays.__setitem__(name, np.asarray(obj[()])) if hasattr(obj, "shape") else None)
        if _digest(arrays, meta_json) != f.attrs["sha256"]:
            raise CheckpointError(f"{what} {path}: refused: content does not match its SHA-256 checksum (changed or "
                                  f"damaged); delete it to rebuild")
    meta = json.loads(meta_json)
    for k, v in (expect or {}).items():
        if meta.get(k) != v:
            raise CheckpointError(f"{what} {path}: {k} is {meta.get(k)!r}, expected {v!r}; delete it to rebuild")
    return {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}, meta
