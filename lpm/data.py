"""Where the datasets shipped with LPM live: the ``lpm_data`` package (the repository's ``data/``).

Installed with the package (wheel, ``pip install .`` or editable), found through
:mod:`importlib.resources`, so no code guesses paths relative to its own file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["data_path"]


def data_path(*parts: str) -> Path:
    """Path of a shipped data file or folder, e.g. ``data_path("opinion", "anes96_train.csv")``."""
    try:
        root = resources.files("lpm_data")
    except ModuleNotFoundError:
        raise FileNotFoundError("package 'lpm_data' (the data/ folder) is not installed; reinstall lpm "
                                "(pip install . or pip install -e .)") from None
    path = Path(str(root.joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(f"data file {'/'.join(parts)!r}: not found under {root}")
    return path
