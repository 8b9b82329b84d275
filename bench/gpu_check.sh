#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine, the GPU tests and the benchmarks, with results on disk.
#
#   bash bench/gpu_check.sh                 # quick: fits one 10-minute call of the lent GPU machine
#   bash bench/gpu_check.sh --only kernels  # one stage (tests, kernels, layer, e2e; comma list)
#   bash bench/gpu_check.sh --only calibrate  # every candidate tile, dense config and cuBLAS timed
#                                             # with CUDA graphs (bench/gpu_calibrate.py; not in the default)
#   bash bench/gpu_check.sh --full          # the full matrices, no time limits (several calls' worth)
#   KERNELS_ARGS="--shapes 70b-gateup --ms 1,4096" bash bench/gpu_check.sh --only kernels
#
# Steps: install the wheels in .whl/ if any (bench/prepare_wheels.sh made them) into /tmp/site;
# refuse to go on without CUDA; run the GPU tests with TRITON_INTERPRET=0 (compiled kernels: quick,
# the kernel test files; --full, all of tests/; GPU_TESTS overrides the pytest arguments); run
# bench_kernels, bench_layer and bench_e2e (each row flushed as measured, so a stage stopped at
# its time limit keeps what it measured); draw the charts; write summary.md and print it last.
# Results go to $RESULTS, else $OUT (the lent machine's folder that comes back), else
# bench/results/gpu-<gpu>-<date>/: gpu_check.log, kernels.csv, layer.csv, e2e.csv,
# speedup_<op>.png, summary.md (at most 8 files: what one call of the lent machine brings back).
# Exit status: 0, or 1 when the GPU tests failed, 2 when the wheels would not install, 3 without CUDA,
# 4 when a benchmark result did not match its float64 reference (bench_kernels exits 1 on it too).
set -uo pipefail
cd "$(dirname "$0")/.."

full=0
only="tests,kernels,layer,e2e"
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=1 ;;
    --quick) full=0 ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
want() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

PY=${PYTHON:-python3}
gpu=$("$PY" -c 'import sys
try:
    import torch
except ImportError as e:
    sys.exit("gpu_check: %s cannot import torch (%s); set PYTHON to the python that has it" % (sys.executable, e))
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch %s sees no CUDA device: this script runs on a GPU machine" % torch.__version__)
print(torch.cuda.get_device_name(0).replace(" ", "-"))') || exit 3
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: FAILED to install the wheels in .whl/" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # qlk from this checkout, installed or not
export PYTHONUNBUFFERED=1

RES=${RESULTS:-${OUT:-bench/results/gpu-$gpu-$(date +%Y%m%d-%H%M)}}
mkdir -p "$RES"
exec > >(tee -a "$RES/gpu_check.log") 2>&1
echo "gpu_check: $gpu -> $RES (full=$full, stages=$only)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || true
"$PY" - <<'EOF'
import sys; sys.path.insert(0, "bench")
import json, common
print("gpu_check env:", json.dumps(common.capture_env()))
EOF

if [ $full = 1 ]; then
  quick=""; t_tests=0; t_kernels=0; t_layer=0; t_e2e=0; t_calibrate=0
else
  # seconds per stage (timeout's hard stop; T_TESTS, T_KERNELS, T_LAYER, T_E2E override);
  # the scripts' own --budget-s (QUICK) stops earlier
  quick="--quick"; t_tests=${T_TESTS:-240}; t_kernels=${T_KERNELS:-150}; t_layer=${T_LAYER:-80}; t_e2e=${T_E2E:-80}
  t_calibrate=${T_CALIBRATE:-300}
fi
stages=()
stage() {  # stage NAME SECONDS CMD...: run with a hard time limit, record how it ended
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS rc
  echo; echo "=== gpu_check: $name: $*"
  if [ "$secs" -gt 0 ]; then timeout -k 10 "$secs" "$@"; else "$@"; fi
  rc=$?
  local how="ok"
  case $rc in 0) ;; 124|137) how="stopped at its ${secs}s limit (partial results kept)" ;; *) how="exit $rc" ;; esac
  stages+=("| $name | $how | $((SECONDS - t0)) s |")
  return $rc
}

tests_rc=0
if want tests; then
  # compiled kernels, never the interpreter (tests/conftest.py keeps an explicit value;
  # tests/test_gpu_env.py fails if the kernels would still be interpreted)
  export TRITON_INTERPRET=0
  if [ -n "${GPU_TESTS:-}" ]; then
    gpu_tests=$GPU_TESTS
  elif [ $full = 1 ]; then
    gpu_tests="tests"
  else  # quick: the kernel tests (every path, every format; bf16 on CUDA), the interpreter guard first
    gpu_tests="tests/test_gpu_env.py tests/test_kernel_paths.py tests/test_kernels.py tests/test_qalora_kernel.py tests/test_tile_fallback.py"
  fi
  # compiling is most of the GPU tests' time (~430 tests took > 190 s on 12 workers, 2026-12-04):
  # spread them over the CPUs with pytest-xdist where it is installed (the lent GPU image has it)
  if [ -z "${GPU_TESTS:-}" ] && "$PY" -c "import xdist" 2>/dev/null; then
    gpu_tests="-n $(( $(nproc) > 2 ? $(nproc) - 2 : 1 )) -p no:benchmark --tb=line -rfE $gpu_tests"
  fi
  # shellcheck disable=SC2086
  stage "tests (TRITON_INTERPRET=0: $gpu_tests)" "$t_tests" "$PY" -m pytest -q -p no:cacheprovider $gpu_tests
  tests_rc=$?
fi
# shellcheck disable=SC2086
want kernels && stage kernels "$t_kernels" "$PY" bench/bench_kernels.py $quick --out "$RES/kernels.csv" ${KERNELS_ARGS:-}
# shellcheck disable=SC2086
want layer && stage layer "$t_layer" "$PY" bench/bench_layer.py $quick --out "$RES/layer.csv" ${LAYER_ARGS:-}
# shellcheck disable=SC2086
want e2e && stage e2e "$t_e2e" "$PY" bench/bench_e2e.py $quick --out "$RES/e2e.csv" ${E2E_ARGS:-}
# shellcheck disable=SC2086
want calibrate && stage calibrate "$t_calibrate" "$PY" bench/gpu_calibrate.py --jobs $(( $(nproc) > 2 ? $(nproc) - 2 : 1 )) \
  --budget-s $(( t_calibrate > 0 ? t_calibrate - 30 : 1000000000 )) $([ $full = 1 ] && echo --full) \
  --out "$RES/calibrate.csv" ${CALIBRATE_ARGS:-}

csvs=()
for f in kernels layer e2e; do [ -s "$RES/$f.csv" ] && csvs+=("$RES/$f.csv"); done
{
  echo "# qlk gpu-check: $gpu, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "| stage | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${stages[@]}"
  echo
} > "$RES/summary.md"
if [ ${#csvs[@]} -gt 0 ]; then
  timeout 60 "$PY" bench/plot.py "${csvs[@]}" --outdir "$RES" --summary "$RES/summary.body.md" \
    && cat "$RES/summary.body.md" >> "$RES/summary.md"
  rm -f "$RES/summary.body.md"
else
  echo "no benchmark rows were written" >> "$RES/summary.md"
fi
echo; echo "=== gpu_check: summary ($RES/summary.md)"
cat "$RES/summary.md"
if [ $tests_rc != 0 ]; then
  echo "gpu_check: GPU tests FAILED (exit $tests_rc)"
  exit 1
fi
if grep -q ',wrong: ' "$RES"/*.csv 2>/dev/null; then
  echo "gpu_check: a benchmark result did not match its float64 reference (status 'wrong' in $RES/*.csv)"
  exit 4
fi
