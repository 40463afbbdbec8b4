"""Benchmark suite: ``python -m benchmarks.run [--quick] [--device cpu|cuda] [--sizes 1e5 1e6 ...] [--out DIR]``.

First, the shared workload peers are compared on (case ``sir``): stochastic SIR on an
Erdős–Rényi graph (mean degree 10, beta 0.03, recovery 0.1 a day, 1% seeded, 50 days),
the engine's compiled forward, torch forward and differentiable paths next to the three
reference kernels, all on the same graph in the same process, with ratios and the
equal-work check (every attack rate in ``ATTACK_RANGE``). Then, as before, it measures agent-days per second (forward and differentiable), bytes retained per agent-day
by autograd, peak memory and bytes per agent and per edge, for the network SEIR over N,
the layered city network at the largest N, the NYC model, the other domains and the
archetype (LLM) layer, plus three reference SIR kernels on the same graphs (see
:mod:`benchmarks.reference`) for ratios that do not drift with machine load. Each (case, N)
runs in its own process (:mod:`benchmarks.cases`). Writes ``NAME.json`` and ``NAME.md``
(machine info included) under ``--out``, by default outside the repository
(``$TMPDIR/lpm-bench``); the committed summaries live in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

TARGETS = {
    "forward_1e6": 4.5e7, "forward_1e7": 4.5e7, "grad_1e6": 2e7, "forward_vs_numba": 1.0,
    # 2e7 / 4.5e7: the differentiable target as a ratio to the fused loop, which holds whatever the load
    "grad_vs_numba": 0.45, "bytes_per_agent_day": 40.0,
    "layered_1e7_bytes": 12 * 2**30,
}
DEFAULT_OUT = Path(tempfile.gettempdir()) / "lpm-bench"
REF_NAMES = ("numba_csr", "numpy_frontier", "torch_scatter")
REPO = Path(__file__).resolve().parent.parent


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """Cores, versions, threads, device name and load, for the record."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": threads or torch.get_num_threads(), "device": device,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def run_case(case: str, n: int, a: argparse.Namespace, days: int, repeats: int, timeout: float, **extra: Any) -> dict[str, Any]:
    """Run one case in a fresh process; its JSON record (or why it has none)."""
    cmd = [sys.executable, "-m", "benchmarks.cases", case, "--n", str(n), "--days", str(days), "--repeats", str(repeats),
           "--device", a.device, "--threads", str(a.threads), "--grad-max-n", str(a.grad_max_n),
           "--torch-max-n", str(a.torch_max_n), "--numpy-max-n", str(a.numpy_max_n), "--scatter-max-n", str(a.scatter_max_n),
           "--clock", a.clock]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"case": case, "n": n, "skipped": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"case": case, "n": n, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    rec = json.loads(lines[-1])
    rec["wall_s"] = wall
    return rec


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if unit == "GiB":
        return f"{x / 2**30:.2f}"
    if abs(x) >= 1e4 or (0 < abs(x) < 1e-2):
        return f"{x:.3g}"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def summarize_sir(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the shared-workload table: one per (engine or reference kernel, N), with ratios to each reference."""
    rows = []
    for r in records:
        if r.get("case") != "sir" or "engine" not in r:
            continue
        refs = {k: v for k, v in r.get("reference", {}).items() if "agent_days_per_s" in v}
        for name, v in [*r["engine"].items(), *refs.items()]:
            row = {"n": r["n"], "days": r["days"], "engine": name, "agent_days_per_s": v["agent_days_per_s"],
                   "peak_rss": v.get("peak_rss_bytes"), "attack_rate": v.get("attack_rate"),
                   "equal_work": r.get("equal_work", {}).get("ok")}
            for k, ref in refs.items():
                row[f"x_{k}"] = v["agent_days_per_s"] / ref["agent_days_per_s"]
            rows.append(row)
    return rows


def sir_checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue-13 targets on the shared workload."""
    by = {(r["engine"], r["n"]): r for r in rows}
    checks: dict[str, Any] = {}
    for key, engine, n, target in [("forward_1e6", "lpm_forward", 10**6, TARGETS["forward_1e6"]),
                                   ("forward_1e7", "lpm_forward", 10**7, TARGETS["forward_1e7"]),
                                   ("grad_1e6", "lpm_differentiable", 10**6, TARGETS["grad_1e6"])]:
        r = by.get((engine, n))
        if r:
            checks[key] = {"value": r["agent_days_per_s"], "target": target, "met": r["agent_days_per_s"] >= target}
    for n in sorted({r["n"] for r in rows}):
        r = by.get(("lpm_forward", n))
        if r and r.get("x_numba_csr") is not None:
            checks[f"forward_vs_numba_{n:.0e}"] = {"value": r["x_numba_csr"], "target": TARGETS["forward_vs_numba"],
                                                   "met": r["x_numba_csr"] >= TARGETS["forward_vs_numba"]}
        g = by.get(("lpm_differentiable", n))
        if g and g.get("x_numba_csr") is not None:
            checks[f"grad_vs_numba_{n:.0e}"] = {"value": g["x_numba_csr"], "target": TARGETS["grad_vs_numba"],
                                                "met": g["x_numba_csr"] >= TARGETS["grad_vs_numba"]}
        if r and r.get("equal_work") is not None:
            checks[f"equal_work_{n:.0e}"] = {"value": r["attack_rate"], "target": "all in range", "met": bool(r["equal_work"])}
    return checks


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of the shared-workload and SEIR scaling tables and the target checks."""
    sir_rows = summarize_sir(records)
    rows = []
    for r in records:
        if r.get("case") not in ("seir", "layered") or "seir" not in r:
            continue
        s = r["seir"]
        row: dict[str, Any] = {
            "case": r["case"], "n": r["n"], "days": r["days"], "forward": s.get("forward_agent_days_per_s"),
            "grad": s.get("grad_agent_days_per_s"), "bytes_per_agent_day": s.get("retained_bytes_per_agent_day"),
            "peak_rss": r.get("peak_rss_bytes"), "peak_device": r.get("peak_device_bytes"),
            "state_bytes_per_agent": s.get("state_bytes_per_agent"), "bytes_per_edge": s.get("bytes_per_edge"),
            "edges": s.get("edges"), "build_s": r.get("build_s"),
        }
        if "sir" in r:
            row["sir_forward"] = r["sir"].get("forward_agent_days_per_s")
            for k, v in r.get("reference", {}).items():
                if "agent_days_per_s" in v:
                    row[f"ref_{k}"] = v["agent_days_per_s"]
                    row[f"ratio_{k}"] = row["sir_forward"] / v["agent_days_per_s"]
        rows.append(row)
    checks: dict[str, Any] = sir_checks(sir_rows)
    by = {(r["case"], r["n"]): r for r in rows}
    r = by.get(("seir", 10**6))
    if r and r.get("bytes_per_agent_day") is not None:
        checks["bytes_per_agent_day_1e6"] = {"value": r["bytes_per_agent_day"], "target": TARGETS["bytes_per_agent_day"],
                                             "met": r["bytes_per_agent_day"] <= TARGETS["bytes_per_agent_day"]}
    r = by.get(("layered", 10**7))
    if r and r.get("peak_rss"):
        checks["layered_1e7_peak_rss"] = {"value": r["peak_rss"], "target": TARGETS["layered_1e7_bytes"],
                                          "met": r["peak_rss"] <= TARGETS["layered_1e7_bytes"]}
    return {"sir_rows": sir_rows, "rows": rows, "checks": checks}


def markdown(info: dict[str, Any], summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The results as a Markdown report."""
    out = ["# LPM benchmark results", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    if summary.get("sir_rows"):
        out += ["## Shared workload: SIR on Erdős–Rényi (degree 10, beta 0.03, recovery 0.1/day, 1% seeded, 50 days)", "",
                f"Agent-days per {'CPU ' if info.get('clock') == 'cpu' else ''}second "
                f"({'the process CPU time of one thread: the time it waited for a core on a shared machine excluded' if info.get('clock') == 'cpu' else 'wall clock'}); "
                "`x REF` = this row's speed / the reference kernel's, same graph, same process. "
                "Peak RSS is the high-water mark of that phase alone (graph build excluded). "
                "`lpm_forward`: the engine's forward pass as it runs by default (compiled kernels when numba is there); "
                "`lpm_forward_torch`: the same model with the compiled kernels off (the torch reference path); "
                "`lpm_differentiable`: `simulate(grad=True)` + backward of total incidence.", "",
                "| engine | N | agent-days/s | x numba CSR | x numpy frontier | x torch scatter | peak RSS GiB | attack rate | equal work |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in summary["sir_rows"]:
            out.append("| " + " | ".join([
                r["engine"], f"{r['n']:.0e}", _fmt(r["agent_days_per_s"]), _fmt(r.get("x_numba_csr")),
                _fmt(r.get("x_numpy_frontier")), _fmt(r.get("x_torch_scatter")), _fmt(r.get("peak_rss"), "GiB"),
                "-" if r.get("attack_rate") is None else f"{r['attack_rate']:.4f}",
                {True: "ok", False: "NO", None: "-"}[r.get("equal_work")]]) + " |")
        out.append("")
        for r in records:
            if r.get("case") == "sir" and "engine" in r:
                out.append(f"- N={r['n']:.0e}: state {_fmt(r.get('state_bytes_per_agent'))} B/agent, network "
                           f"{_fmt(r.get('bytes_per_edge'))} B/edge + {_fmt(r.get('network_bytes_per_agent'))} B/agent "
                           f"(CSR pointer), {r.get('edges')} edges; graph build {_fmt(r.get('build_s'))} s, "
                           f"peak RSS {_fmt(r.get('build_peak_rss_bytes'), 'GiB')} GiB")
        out.append("")
    out += ["## Network SEIR scaling (agent-days per second; ratios: engine SIR twin / reference kernel, same graph, same run)", "",
            "| case | N | days | forward | differentiable | bytes/agent-day retained | peak RSS GiB | state B/agent | B/edge | "
            "engine SIR | x torch scatter | x numpy frontier | x numba CSR |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        out.append("| " + " | ".join([
            r["case"], f"{r['n']:.0e}", str(r["days"]), _fmt(r.get("forward")), _fmt(r.get("grad")),
            _fmt(r.get("bytes_per_agent_day")), _fmt(r.get("peak_rss"), "GiB"), _fmt(r.get("state_bytes_per_agent")),
            _fmt(r.get("bytes_per_edge")), _fmt(r.get("sir_forward")), _fmt(r.get("ratio_torch_scatter")),
            _fmt(r.get("ratio_numpy_frontier")), _fmt(r.get("ratio_numba_csr"))]) + " |")
    out += ["", "Reference kernels (agent-days/s): " + "; ".join(
        f"N={r['n']:.0e}: " + ", ".join(f"{k[4:]} {_fmt(v)}" for k, v in r.items() if k.startswith("ref_"))
        for r in summary["rows"] if any(k.startswith("ref_") for k in r)), ""]
    out += ["## Targets (issue 13; SEIR memory targets from issue 6)", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for k, c in summary["checks"].items():
        val = _fmt(c["value"], "GiB") if "rss" in k else (f"{c['value']:.4f}" if "equal" in k else _fmt(c["value"]))
        goal = _fmt(c["target"], "GiB") if "rss" in k else _fmt(c["target"])
        out.append(f"| {k} | {val} | {goal} | {'yes' if c['met'] else 'no'} |")
    out += ["", "## Other cases", ""]
    for r in records:
        if (r.get("case") in ("seir", "layered") and "seir" in r) or (r.get("case") == "sir" and "engine" in r):
            continue
        keep = {k: v for k, v in r.items() if k not in ("traceback", "stderr", "forward_times", "grad_times")}
        out.append(f"- `{json.dumps(keep, default=str)}`")
    for r in records:
        if "error" in r:
            out.append(f"- ERROR {r.get('case')} N={r.get('n')}: {r['error']}")
    return "\n".join(out) + "\n"


def parse_size(s: str) -> int:
    """``1e6`` or ``1000000`` as an int."""
    return int(float(s))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and write results.json / results.md."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short runs, time budget")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", nargs="+", type=parse_size, default=None)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default outside the repository)")
    ap.add_argument("--days", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cases", nargs="+", default=["sir", "seir", "layered", "nyc", "opinion", "information", "llm"])
    ap.add_argument("--sir-days", type=int, default=None, help="days of the shared SIR workload (default 50)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (skip what does not fit)")
    ap.add_argument("--nyc-scale", type=float, default=None)
    ap.add_argument("--nyc-days", type=int, default=None)
    ap.add_argument("--grad-max-n", type=parse_size, default=10**6)
    ap.add_argument("--layered-n", type=parse_size, default=None)
    ap.add_argument("--torch-max-n", type=parse_size, default=10**6, help="largest N for the engine's torch forward (sir case)")
    ap.add_argument("--numpy-max-n", type=parse_size, default=10**7, help="largest N for the NumPy frontier reference")
    ap.add_argument("--scatter-max-n", type=parse_size, default=10**7, help="largest N for the torch scatter reference")
    ap.add_argument("--name", default="results")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="timer: cpu = the process's CPU seconds (auto: with --threads 1 on CPU), wall = elapsed")
    a = ap.parse_args(argv)
    if a.clock == "auto":
        # one thread on a shared machine: CPU seconds are the kernels' cost, wall seconds add the waits for a core
        a.clock = "cpu" if a.threads == 1 and a.device == "cpu" else "wall"
    sizes = a.sizes or ([10**4, 10**5] if a.quick else [10**5, 10**6, 10**7])
    days = a.days or (20 if a.quick else 100)
    repeats = a.repeats or (2 if a.quick else 3)
    budget = a.budget or (240.0 if a.quick else 3 * 3600.0)
    nyc_scale = a.nyc_scale if a.nyc_scale is not None else (0.005 if a.quick else 1.0)
    layered_n = a.layered_n or max(sizes)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(a.device, a.threads)
    info["clock"] = a.clock
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    last_wall: dict[str, tuple[int, float]] = {}

    def write() -> dict[str, Any]:
        # rewritten after every case, so a run cut short by an outer timeout still leaves its results
        summary = summarize(records)
        llm = {r["n"]: r.get("step_s") for r in records if r.get("case") == "llm" and "step_s" in r}
        if len(llm) >= 2:
            lo, hi = min(llm), max(llm)
            summary["llm_step_ratio"] = {"n_small": lo, "n_large": hi, "ratio": llm[hi] / llm[lo]}
        doc = {"machine": info, "summary": summary, "records": records, "wall_s": time.perf_counter() - start}
        (out / f"{a.name}.json").write_text(json.dumps(doc, indent=2, default=str))
        (out / f"{a.name}.md").write_text(markdown(info, summary, records))
        return summary

    def remaining() -> float:
        return budget - (time.perf_counter() - start)

    def go(case: str, n: int, d: int, reps: int, **extra: Any) -> None:
        left = remaining()
        prev = last_wall.get(case)
        # work grows about linearly in N: skip a size whose predicted wall time does not fit
        # (the archetype layer's cost is fixed set-up, not N: no prediction for it)
        predicted = prev[1] * n / prev[0] if prev and case != "llm" else 0.0
        if left <= 5 or predicted > left:
            records.append({"case": case, "n": n, "skipped": f"time budget: {left:.0f} s left, predicted {predicted:.0f} s"})
            print(f"[bench] {case} N={n:,}: skipped (budget)", flush=True)
            return
        print(f"[bench] {case} N={n:,} days={d} ...", flush=True)
        rec = run_case(case, n, a, d, reps, left, **extra)
        records.append(rec)
        write()
        if "wall_s" in rec:
            last_wall[case] = (n, rec["wall_s"])
        print(f"[bench]   -> {json.dumps({k: v for k, v in rec.items() if k in ('wall_s', 'skipped', 'error')})}", flush=True)

    from benchmarks.cases import SIR_DAYS

    sir_days = a.sir_days or (min(SIR_DAYS, days) if a.quick else SIR_DAYS)
    for n in sizes:
        if "sir" in a.cases:
            go("sir", n, sir_days, 1 if n >= 10**7 else repeats)
    if "layered" in a.cases:
        go("layered", layered_n, days, 1 if layered_n >= 10**7 else repeats)
    for n in sizes:
        if "seir" in a.cases:
            go("seir", n, days, 1 if n >= 10**7 else repeats)
    if "nyc" in a.cases:
        go("nyc", 0, a.nyc_days or (10 if a.quick else 30), 1, scale=nyc_scale)
    for case in ("opinion", "information"):
        if case in a.cases:
            for n in sizes:
                if n <= 10**6:
                    go(case, n, days, repeats)
    if "llm" in a.cases:
        for n in ([min(sizes), max(sizes)] if a.quick else [10**5, 10**7]):
            go("llm", n, days, max(3, repeats))
    summary = write()
    print(markdown(info, summary, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
