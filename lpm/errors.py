"""Errors of the library: one base class, so that the command line can tell them from bugs.

Every error the library raises on purpose (bad input, bad data, a backend that cannot
answer, a checkpoint that does not match) derives from :class:`LPMError`: a bad argument or
setting is a :class:`ConfigError`, an unusable data file a :class:`DataError`, a parameter
out of its domain a :class:`ParamError`, and a state or system tensor of the wrong shape,
dtype or range a :class:`~lpm.state.StateError`. The ``lpm``
command prints these as one line (``lpm: error: ...``) and exits with status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["LPMError", "ConfigError", "DataError", "ParamError", "OutputError", "CheckpointError"]


class LPMError(Exception):
    """Base of every error the library raises on purpose (the message says what to change)."""


class ConfigError(LPMError, ValueError):
    """An argument or setting is invalid (the message names it and the expected value)."""


class DataError(LPMError, ValueError):
    """An input data file or frame is unusable (the message names the file, column or row)."""


class ParamError(LPMError, ValueError):
    """A parameter is undefined, not fittable, non-finite or outside its domain (the message names it)."""


class OutputError(LPMError, OSError):
    """An output location cannot be written, or would mix files of two runs."""


class CheckpointError(LPMError, ValueError):
    """A checkpoint, cache or trajectory file does not match the run, or is damaged."""
