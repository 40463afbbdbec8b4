"""The ``lpm`` command line: ``lpm list``, ``lpm run NAME ...``, ``lpm calibrate NAME ...``.

Studies are found without the core importing them: each declares itself as an entry point
in the ``lpm.experiments`` group (see pyproject.toml) pointing at an :class:`Experiment`;
:func:`register` adds one in-process (tests, notebooks).

One error path: a library error (:class:`~lpm.errors.LPMError`) raised by a study prints
``lpm: error: MESSAGE`` on one line and exits with status 2, like argparse's own argument
errors; any other exception is a bug and keeps its traceback. The argument types below
(:func:`positive_int`, :func:`positive_float`, :func:`probability`, :func:`date_arg`,
:func:`device_arg`) let a study refuse bad values before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Sequence

from lpm.errors import LPMError

__all__ = ["Experiment", "register", "experiments", "main", "COMMANDS", "positive_int", "positive_float",
           "probability", "date_arg", "device_arg", "add_output_args"]


@dataclass(frozen=True)
class Experiment:
    """A runnable study: ``run(argv)`` and optionally ``calibrate(argv)`` return exit codes."""

    name: str
    description: str
    run: Callable[[Sequence[str]], int]
    calibrate: Callable[[Sequence[str]], int] | None = None
    #: ``run_ranks(argv, ranks)``: the run partitioned over ranks (``lpm run NAME --ranks N``, or under torchrun)
    run_ranks: Callable[[Sequence[str], int], int] | None = None


#: subcommand -> attribute of :class:`Experiment` that implements it (add a command by adding a field and a row)
COMMANDS: dict[str, str] = {"run": "run", "calibrate": "calibrate"}


_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add an experiment to the in-process registry (entry points need no registration)."""
    _REGISTRY[experiment.name] = experiment
    return experiment


def experiments() -> dict[str, Experiment]:
    """All experiments: installed entry points plus in-process registrations."""
    found: dict[str, Experiment] = {}
    for ep in entry_points(group="lpm.experiments"):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken study must not hide the others; report it by name
            print(f"lpm: could not load experiment {ep.name!r} ({ep.value}): {exc}", file=sys.stderr)
            continue
        found[ep.name] = obj
    found.update(_REGISTRY)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lpm`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: lpm {list | " + " | ".join(f"{c} NAME [options]" for c in (*COMMANDS, "fidelity"))
             + "}  (NAME --help for options)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    exps = experiments()
    if cmd == "list":
        for name, e in sorted(exps.items()):
            kinds = "run" + (", calibrate" if e.calibrate else "")
            print(f"{name:<20} {e.description}  [{kinds}]")
        return 0
    if cmd == "fidelity":
        try:
            return _fidelity(rest)
        except LPMError as exc:
            print(f"lpm: error: {exc}", file=sys.stderr)
            return 2
    if cmd not in COMMANDS:
        print(f"lpm: unknown command {cmd!r}\n{usage}", file=sys.stderr)
        return 2
    if not rest:
        print(f"lpm {cmd}: missing experiment NAME; known: {', '.join(sorted(exps))}", file=sys.stderr)
        return 2
    name = rest[0]
    if name not in exps:
        print(f"lpm {cmd}: unknown experiment {name!r}; known: {', '.join(sorted(exps))}", file=sys.stderr)
        return 2
    fn = getattr(exps[name], COMMANDS[cmd], None)
    try:
        ranks, rest = _ranks_arg(rest) if cmd == "run" else (None, rest)
    except argparse.ArgumentTypeError as exc:
        print(f"lpm run: --ranks: {exc}", file=sys.stderr)
        return 2
    if ranks is not None:
        if exps[name].run_ranks is None:
            print(f"lpm run: experiment {name!r} cannot run partitioned over ranks (no --ranks support)", file=sys.stderr)
            return 2
        fn = lambda argv: exps[name].run_ranks(argv, ranks)  # noqa: E731
    if fn is None:
        print(f"lpm {cmd}: experiment {name!r} has no {cmd!r} command", file=sys.stderr)
        return 2
    try:
        return int(fn(rest[1:]) or 0)
    except LPMError as exc:
        # a library error is the user's to fix: one line, not a traceback
        print(f"lpm: error: {exc}", file=sys.stderr)
        return 2


def _ranks_arg(rest: list[str]) -> tuple[int | None, list[str]]:
    """``--ranks N`` taken out of ``rest`` (``lpm run NAME --ranks N``); under torchrun, ``WORLD_SIZE`` when not given."""
    import os

    if "--ranks" not in rest and not any(a.startswith("--ranks=") for a in rest):
        world = os.environ.get("WORLD_SIZE")
        return (int(world) if world and "RANK" in os.environ else None), rest
    out, ranks, i = [], None, 0
    while i < len(rest):
        a = rest[i]
        if a == "--ranks" or a.startswith("--ranks="):
            text = a.split("=", 1)[1] if "=" in a else (rest[i + 1] if i + 1 < len(rest) else "")
            i += 1 if "=" in a else 2
            ranks = positive_int(text)
            continue
        out.append(a)
        i += 1
    return ranks, out


# ----------------------------------------------------------------------------- argument types


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str) -> Any:
    """Parse ``text`` as ``kind`` and check it with ``ok``; an argparse error saying what was ``expected``."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    return _number(text, int, lambda v: v > 0, "an integer > 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a finite number > 0")


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(text, float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def date_arg(text: str) -> str:
    """argparse type: a calendar date ``YYYY-MM-DD`` (returned normalised, as text)."""
    import datetime

    try:
        return datetime.date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def device_arg(text: str) -> str:
    """argparse type: a torch device this build can use (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:0, got {text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available (torch {torch.__version__}, "
                                             f"built with CUDA {torch.version.cuda}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda[:N] or mps, got {text!r}")
    return text


def add_output_args(ap: argparse.ArgumentParser, default: str) -> None:
    """``--out DIR``, ``--overwrite`` and ``--resume`` with the meanings of :class:`lpm.outputs.OutputDir`."""
    ap.add_argument("--out", default=default, help="output directory (must be empty or absent, unless --overwrite "
                                                   "or --resume)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the outputs of an earlier run in --out (default: refuse a non-empty --out)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from the checkpoint in --out (the arguments must match)")


def _fidelity(argv: list[str]) -> int:
    """``lpm fidelity NAME [options]``: a survey-fidelity benchmark from the ``lpm.fidelity`` entry points."""
    found = {ep.name: ep for ep in entry_points(group="lpm.fidelity")}
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: lpm fidelity NAME [options]  (NAME --help for options); known: {', '.join(sorted(found))}")
        return 0 if argv else 2
    if argv[0] not in found:
        print(f"lpm fidelity: unknown benchmark {argv[0]!r}; known: {', '.join(sorted(found))}", file=sys.stderr)
        return 2
    return int(found[argv[0]].load()(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
