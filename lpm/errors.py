"""Errors of the library: one base class, so that the command line can tell them from bugs.

Every error the library raises on purpose (bad input, bad data, a backend that cannot
answer, a checkpoint that does not match) derives from :class:`LPMError`. The ``lpm``
command prints these as one line (``lpm: error: ...``) and exits with status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["LPMError", "ConfigError", "DataError", "OutputError", "CheckpointError"]


class LPMError(Exception):
    """Base of every error the library raises on purpose (the message says what to change)."""


class ConfigError(LPMError, ValueError):
    """An argument or setting is invalid (the message names it and the expected value)."""


class DataError(LPMError, ValueError):
    """An input data file or frame is unusable (the message names the file, column or row)."""


class OutputError(LPMError, OSError):
    """An output location cannot be written, or would mix files of two runs."""


class CheckpointError(LPMError, ValueError):
    """A checkpoint, cache or trajectory file does not match the run, or is damaged."""
