"""The CLI finds the studies; README's commands and CI's command agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lpm.cli import Experiment, experiments, main, register

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_opens_with_install_run_and_test_commands() -> None:
    cmds = readme_commands()
    assert "pip install torch==2.13.0" in cmds[0] and "lpm run covid-nyc" in cmds[0]
    assert "pip install torch==2.13.0" in cmds[1] and "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci, "CI must call exactly README's test command"


def test_cli_lists_and_runs_registered_studies(tmp_path, capsys) -> None:
    found = experiments()
    assert {"covid-nyc", "sir-demo", "polarization", "misinformation"} <= set(found)
    assert found["covid-nyc"].calibrate is not None
    assert main(["list"]) == 0
    assert "covid-nyc" in capsys.readouterr().out
    assert main(["run", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert main(["calibrate", "sir-demo"]) == 2
    calls: list[list[str]] = []
    register(Experiment("echo-test", "records its argv", lambda argv: calls.append(list(argv)) or 0))
    assert main(["run", "echo-test", "--x", "1"]) == 0 and calls == [["--x", "1"]]


def test_sir_demo_writes_its_outputs(tmp_path) -> None:
    out = tmp_path / "demo"
    assert main(["run", "sir-demo", "--agents", "3000", "--days", "30", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["agents"] == 3000 and 0 < summary["attack_rate"] <= 1
    assert (out / "daily.csv").exists() and (out / "epidemic.png").exists() and (out / "results.h5").exists()
