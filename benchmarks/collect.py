"""One committed summary per machine: ``python -m benchmarks.collect --machine NAME SOURCE...``.

Every benchmark writes its own ``X.json`` (and usually ``X.md``) outside the repository. This
gathers the runs of one machine into the pair ``benchmarks/results/NAME.json`` and
``NAME.md``, which is all ``benchmarks/results/`` holds: one pair per machine, so a reader
finds every number measured on a machine in one place, and logs or half-finished runs never
land in the repository. A SOURCE is a JSON file (its sibling ``.md``, if any, becomes the
section's text) or a folder (each ``*.json`` in it; a ``*summary.txt`` there is quoted once).
Sources named in a later call replace the sections of the same name and keep the others, so
the CPU pair can be refreshed one benchmark at a time; ``--drop NAME`` removes a superseded one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from lpm.errors import LPMError

RESULTS = Path(__file__).resolve().parent / "results"


class CollectError(LPMError):
    """A source that cannot be collected (missing, not JSON, or an unsafe machine name)."""


def _sources(paths: Sequence[Path]) -> list[Path]:
    """The JSON files named, folders expanded to their ``*.json`` in name order."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise CollectError(f"source folder {p}: expected at least one *.json file, found none")
            out += found
        elif p.suffix == ".json" and p.is_file():
            out.append(p)
        else:
            raise CollectError(f"source {p}: expected an existing .json file or a folder of them")
    return out


def _section(path: Path) -> dict[str, Any]:
    """One source as a section: its data, its Markdown (heading levels pushed down one) and notes."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CollectError(f"source {path}: not valid JSON ({e})") from None
    md_file = path.with_suffix(".md")
    text = md_file.read_text() if md_file.is_file() else ""
    # a section's own "# Title" becomes "## Title" under the machine's heading
    text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
    return {"name": path.stem, "source": str(path), "data": data, "markdown": text}


def collect(machine: str, sources: Sequence[str | Path], out: str | Path = RESULTS,
            description: str = "", drop: Sequence[str] = ()) -> tuple[Path, Path]:
    """Merge the sources into ``out/MACHINE.json`` and ``out/MACHINE.md``; return both paths."""
    if not machine or not machine.replace("-", "").replace("_", "").isalnum():
        raise CollectError(f"machine: expected a short name of letters, digits, '-' or '_', got {machine!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{machine}.json", out / f"{machine}.md"
    old: dict[str, Any] = json.loads(jpath.read_text()) if jpath.is_file() else {}
    sections = {s["name"]: s for s in old.get("sections", [])}
    for name in drop:
        if name not in sections:
            raise CollectError(f"drop: no section {name!r} in {jpath}; it has {sorted(sections)}")
        del sections[name]
    notes: dict[str, str] = dict(old.get("notes", {}))
    for p in _sources([Path(s) for s in sources]):
        sections[p.stem] = _section(p)
    for folder in {Path(s) for s in sources if Path(s).is_dir()}:
        for f in sorted(folder.glob("*summary.txt")):
            notes[f.name] = f.read_text().strip()
    blob = {"machine": machine, "description": description or old.get("description", ""),
            "collected_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sections": [sections[k] for k in sorted(sections)], "notes": notes}
    jpath.write_text(json.dumps(blob, indent=1, default=str) + "\n")
    lines = [f"# Benchmark results: {machine}", ""]
    if blob["description"]:
        lines += [blob["description"], ""]
    lines += ["Sections: " + ", ".join(f"`{k}`" for k in sorted(sections)) + f" (collected {blob['collected_utc']}; "
              f"the data of each is in `{jpath.name}`).", ""]
    for name, text in sorted(notes.items()):
        lines += [f"## {name}", "", "```", text, "```", ""]
    for s in blob["sections"]:
        lines += [f"<!-- section {s['name']} from {s['source']} -->"]
        lines += [s["markdown"].strip() if s["markdown"].strip() else f"## {s['name']}\n\n(no Markdown; see the JSON)", ""]
    mpath.write_text("\n".join(lines))
    return jpath, mpath


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: collect the named sources into the machine's pair."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.collect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machine", required=True, help="e.g. cpu (this 2-core box) or h200")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the committed pairs")
    ap.add_argument("--description", default="", help="one paragraph on the machine and when it was measured")
    ap.add_argument("--drop", action="append", default=[], help="remove this section (a superseded benchmark)")
    ap.add_argument("sources", nargs="*", help="JSON files or folders written by the benchmarks")
    a = ap.parse_args(argv)
    for p in collect(a.machine, a.sources, a.out, a.description, a.drop):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
