"""The ``lpm`` command line: ``lpm list``, ``lpm run NAME ...``, ``lpm calibrate NAME ...``.

Studies are found without the core importing them: each declares itself as an entry point
in the ``lpm.experiments`` group (see pyproject.toml) pointing at an :class:`Experiment`;
:func:`register` adds one in-process (tests, notebooks).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Sequence

__all__ = ["Experiment", "register", "experiments", "main"]


@dataclass(frozen=True)
class Experiment:
    """A runnable study: ``run(argv)`` and optionally ``calibrate(argv)`` return exit codes."""

    name: str
    description: str
    run: Callable[[Sequence[str]], int]
    calibrate: Callable[[Sequence[str]], int] | None = None


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
    usage = ("usage: lpm {list | run NAME [options] | calibrate NAME [options] | fidelity NAME [options]}"
             "  (NAME --help for options)")
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
        return _fidelity(rest)
    if cmd not in ("run", "calibrate"):
        print(f"lpm: unknown command {cmd!r}\n{usage}", file=sys.stderr)
        return 2
    if not rest:
        print(f"lpm {cmd}: missing experiment NAME; known: {', '.join(sorted(exps))}", file=sys.stderr)
        return 2
    name = rest[0]
    if name not in exps:
        print(f"lpm {cmd}: unknown experiment {name!r}; known: {', '.join(sorted(exps))}", file=sys.stderr)
        return 2
    exp = exps[name]
    fn = exp.run if cmd == "run" else exp.calibrate
    if fn is None:
        print(f"lpm calibrate: experiment {name!r} has no calibration", file=sys.stderr)
        return 2
    return int(fn(rest[1:]) or 0)


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
