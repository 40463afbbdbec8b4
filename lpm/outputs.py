"""Output directories that fail before the work, never mix two runs, and write each file atomically.

A run declares the files it may write; :class:`OutputDir` checks, before anything is
computed, that the directory can be created and written, that none of those names is a
directory or otherwise in the way, and that the directory holds no earlier run (unless
``overwrite``, which deletes the earlier run's files of those names first, or ``resume``).
Files are written into a hidden staging directory inside ``path`` and moved into place
with :func:`os.replace` by :meth:`OutputDir.commit`: a reader never sees half a file, and
a run that fails leaves no new partial outputs behind.

    od = OutputDir("out/run", ["results.h5", "summary.json"], overwrite=args.overwrite)
    (od.staging / "summary.json").write_text(...)
    od.commit()
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lpm.errors import OutputError

__all__ = ["OutputDir", "atomic_write"]

_STAGING_PREFIX = ".staging-"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; cannot write a file there")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class OutputDir:
    """An output directory checked up front; files staged and moved into place atomically."""

    def __init__(self, path: str | os.PathLike, files: Sequence[str], *, overwrite: bool = False,
                 resume: bool = False, keep: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.files = tuple(files)
        self.keep = frozenset(keep)  # files a resumed run reads (checkpoints): never staged or deleted
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--out {self.path}: exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"--out {self.path}: cannot create the directory ({exc.strerror or exc})") from None
        for name in (*self.files, *self.keep):
            p = self.path / name
            if p.is_dir() or (p.exists() and not p.is_file()):
                raise OutputError(f"--out {self.path}: {name!r} exists and is not a regular file; "
                                  f"remove it or choose another --out")
        earlier = sorted(e.name for e in self.path.iterdir() if not e.name.startswith(_STAGING_PREFIX))
        if earlier and not (overwrite or resume):
            shown = ", ".join(earlier[:5]) + (", ..." if len(earlier) > 5 else "")
            raise OutputError(f"--out {self.path}: not empty ({shown}); pass --overwrite to replace an earlier run's "
                              f"outputs, --resume to continue it, or choose another directory")
        if overwrite and not resume:
            for name in (*self.files, *self.keep):
                (self.path / name).unlink(missing_ok=True)
        for old in self.path.glob(_STAGING_PREFIX + "*"):  # a killed run's staging area
            shutil.rmtree(old, ignore_errors=True)
        try:
            self.staging = Path(tempfile.mkdtemp(dir=self.path, prefix=_STAGING_PREFIX))
            probe = self.staging / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"--out {self.path}: not writable ({exc.strerror or exc})") from None

    def __truediv__(self, name: str) -> Path:
        return self.staging / name

    def final(self, name: str) -> Path:
        """Where ``name`` ends up after :meth:`commit` (for files written in place, e.g. checkpoints)."""
        return self.path / name

    def commit(self) -> list[Path]:
        """Move every staged file into place (one atomic rename each) and remove the staging area."""
        staged = sorted(self.staging.iterdir())
        undeclared = [p.name for p in staged if p.name not in self.files]
        if undeclared:  # checked before anything moves: --overwrite must know every file a run writes
            raise OutputError(f"{self.path}: the run wrote {undeclared}, which it did not declare (declared: "
                              f"{list(self.files)})")
        moved = []
        for p in staged:
            dest = self.path / p.name
            os.replace(p, dest)
            moved.append(dest)
        shutil.rmtree(self.staging, ignore_errors=True)
        return moved

    def abort(self) -> None:
        """Drop staged files (after a failure)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
