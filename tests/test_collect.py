"""``benchmarks.collect``: the runs of one machine become one JSON + Markdown pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.collect import CollectError, collect


def _write(folder: Path, name: str, data: dict, md: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data))
    if md is not None:
        (folder / f"{name}.md").write_text(md)
    return folder / f"{name}.json"


def test_sections_merge_and_replace_by_name(tmp_path: Path) -> None:
    """A later call replaces the section of the same name, keeps the others, and quotes a folder's summary once."""
    run1 = tmp_path / "run1"
    _write(run1, "sir", {"rate": 1.0}, "# SIR\n\n| a |\n")
    _write(run1, "grad", {"ratio": 0.9})
    (run1 / "gpu_check_summary.txt").write_text("[0 s] done")
    out = tmp_path / "results"
    jpath, mpath = collect("box", [run1], out, "a test box")
    blob = json.loads(jpath.read_text())
    assert [s["name"] for s in blob["sections"]] == ["grad", "sir"]
    text = mpath.read_text()
    assert "## SIR" in text and "# SIR" not in text.replace("## SIR", "")
    assert text.count("[0 s] done") == 1
    run2 = tmp_path / "run2"
    collect("box", [_write(run2, "sir", {"rate": 2.0}, "# SIR again\n")], out)
    blob = json.loads(jpath.read_text())
    assert {s["name"]: s["data"] for s in blob["sections"]} == {"grad": {"ratio": 0.9}, "sir": {"rate": 2.0}}
    assert blob["description"] == "a test box" and "[0 s] done" in mpath.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["box.json", "box.md"]
    collect("box", [], out, drop=["grad"])
    assert [s["name"] for s in json.loads(jpath.read_text())["sections"]] == ["sir"]
    with pytest.raises(CollectError, match="no section 'grad'"):
        collect("box", [], out, drop=["grad"])


def test_bad_sources_name_the_problem(tmp_path: Path) -> None:
    """Missing files, empty folders, broken JSON and unsafe machine names are errors naming them."""
    with pytest.raises(CollectError, match="expected an existing .json"):
        collect("box", [tmp_path / "nope.json"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectError, match="found none"):
        collect("box", [tmp_path / "empty"], tmp_path / "r")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CollectError, match="not valid JSON"):
        collect("box", [tmp_path / "bad.json"], tmp_path / "r")
    with pytest.raises(CollectError, match="machine"):
        collect("../x", [tmp_path / "bad.json"], tmp_path / "r")


def test_committed_results_are_one_pair_per_machine() -> None:
    """``benchmarks/results/`` holds NAME.json + NAME.md pairs and nothing else."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    files = sorted(p.name for p in results.iterdir())
    stems = {Path(f).stem for f in files}
    assert files == sorted(f"{s}{ext}" for s in stems for ext in (".json", ".md")), files
