#!/usr/bin/env bash
# One prepared check for a GPU machine (torch with CUDA installed, no network), under 8 minutes:
#   1. install the package without dependencies (falls back to PYTHONPATH=repo root),
#   2. the test suite on the device (LPM_TEST_DEVICE),
#   3. the scaling benchmark on the device up to N = 1e7 (more where it fits),
#   4. the NYC model at scale 1.0 when experiments.covid_nyc is present.
# Usage: benchmarks/gpu_check.sh [OUTDIR] [--device cuda|cpu] [--quick]
# OUTDIR defaults to $OUT, else $TMPDIR/lpm-gpu-check (never the repository). Logs and JSON land in OUTDIR;
# commit them as one pair with: python -m benchmarks.collect --machine h200 OUTDIR
# --device cpu --quick is a fast smoke run of every stage (the test suite runs it).
# GPU_CHECK_SKIP="tests nyc" leaves stages out (names: install tests bench nyc).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
QUICK=0
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) OUTDIR="$1"; shift ;;
  esac
done
OUTDIR="${OUTDIR:-${OUT:-${TMPDIR:-/tmp}/lpm-gpu-check}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"
SUMMARY="$OUTDIR/gpu_check_summary.txt"
: > "$SUMMARY"
T0=$(date +%s)
note() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$SUMMARY"; }
START=$(date +%s)
skip() { case " ${GPU_CHECK_SKIP:-} " in *" $1 "*) note "$1: skipped (GPU_CHECK_SKIP)"; return 0 ;; esac; return 1; }

note "gpu_check: device=$DEVICE quick=$QUICK out=$OUTDIR python=$PY"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda available", torch.cuda.is_available(),
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine(), "cpus", os.cpu_count())
EOF

# 1. install (entry points for the CLI); PYTHONPATH above already makes the packages importable
if skip install; then :
elif [ "$QUICK" = 1 ]; then
  note "install: skipped in --quick (PYTHONPATH=$REPO)"
elif "$PY" -c "import importlib.metadata as m; m.distribution('lpm')" >/dev/null 2>&1; then
  note "install: lpm already installed"
else
  if timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUTDIR/install.log" 2>&1; then
    note "install: ok"
  else
    note "install: failed (see install.log); using PYTHONPATH=$REPO"
  fi
fi

# 2. tests on the device; --quick only collects them (the smoke test must stay fast and not recurse)
if [ "$QUICK" = 1 ]; then
  TEST_ARGS=(--collect-only)
  TEST_LIMIT=120
else
  TEST_ARGS=(--timeout=60 -p no:cacheprovider)
  "$PY" -c "import pytest_timeout" >/dev/null 2>&1 || TEST_ARGS=(-p no:cacheprovider)
  TEST_LIMIT=120
fi
skip tests || { LPM_TEST_DEVICE="$DEVICE" LPM_GPU_CHECK=1 timeout "$TEST_LIMIT" "$PY" -m pytest tests "${TEST_ARGS[@]}" \
  --ignore=tests/test_benchmarks.py > "$OUTDIR/pytest.log" 2>&1
note "pytest (LPM_TEST_DEVICE=$DEVICE): exit $? ; $(grep -v '^\s*$' "$OUTDIR/pytest.log" | tail -n 1)"; }

# 3. scaling benchmark
if [ "$QUICK" = 1 ]; then
  BENCH_ARGS=(--quick --sizes 2000 --days 3 --repeats 1 --budget 150 --cases seir)
  BENCH_LIMIT=200  # a loaded 2-core runner needs ~2 minutes for this smoke run
else
  BENCH_ARGS=(--sizes 1e5 1e6 1e7 --days 50 --repeats 2 --budget 180 --grad-max-n 1e7 --layered-n 1e7
              --numpy-max-n 1e6 --cases sir seir layered llm)
  BENCH_LIMIT=200
fi
skip bench || { timeout "$BENCH_LIMIT" "$PY" -m benchmarks.run --device "$DEVICE" --out "$OUTDIR" --name scaling "${BENCH_ARGS[@]}" \
  > "$OUTDIR/bench.log" 2>&1
note "benchmark: exit $? ; results in $OUTDIR/scaling.json and scaling.md"; }

# 4. NYC model at scale 1.0 (skipped with a message when the experiment is absent)
if [ "$QUICK" = 1 ]; then NYC_ARGS=(--nyc-scale 0.001 --nyc-days 2 --repeats 1 --budget 60); NYC_LIMIT=90
else NYC_ARGS=(--nyc-scale 1.0 --nyc-days 30 --repeats 1 --budget 140 --grad-max-n 0); NYC_LIMIT=150; fi
skip nyc || { timeout "$NYC_LIMIT" "$PY" -m benchmarks.run --device "$DEVICE" --out "$OUTDIR" --name nyc --cases nyc "${NYC_ARGS[@]}" \
  >> "$OUTDIR/bench.log" 2>&1
note "nyc: exit $? ; results in $OUTDIR/nyc.json"; }

note "gpu_check: done in $(( $(date +%s) - START )) s; summary for the repository: python -m benchmarks.collect --machine NAME $OUTDIR"
