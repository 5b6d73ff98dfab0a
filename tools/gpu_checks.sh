#!/usr/bin/env bash
# The GPU verification of one session in ONE device call (a GPU is lent for minutes, and each
# machine start costs one or two of them):
#
#   tools/gpu_checks.sh all [--dry-run]
#
# runs, in this order, each stage under its own time limit inside one global budget
# (GPU_BUDGET_S, default 480 s, so that the device call with timeout_s=540 leaves room for the
# tarball and a margin):
#
#   build        make build with every core (AUTO compiles the CUDA kernels against the host's
#                torch); tools/check_cuda_build.py: every op has a CUDA kernel
#   tests        the CUDA cases only: every device-parametrized case on cuda plus
#                tests/test_cuda.py (pytest -k cuda, no -x: one failure hides nothing)
#   memcheck     compute-sanitizer memcheck on a small, fast subset of the op tests
#   racecheck    the same under racecheck, only when the later stages keep their time
#   bench-key    bench/run.py on the issue-3 target ops (em_step, resample+gather,
#                adaptive_resample), short repeats, no torch.compile
#   e2e          bench/e2e.py: the 1000-step loop, fused eager vs pure PyTorch vs the CUDA
#                graph replay (CapturedSMC), N = 4096, no torch.compile
#   bench-rest   bench/run.py on the other ops, if time is left
#
# Every log lands under logs/; at exit (also after a failure, a timeout or a signal) they and
# bench/results go to $OUT/gpu-checks.tgz, and $OUT/summary.txt gets one line per stage:
#   stage=NAME rc=N seconds=S result=ok|FAIL|TIMEOUT|skipped [passed=P failed=F errors=E
#   skipped=K] [note=...]
# then one `failed: TEST-ID` line per failed or erroring test (junit XML in logs/).
#
# --dry-run runs the same script on a machine without a GPU in a minute or two (CI runs it after
# `make test`): the build is the CPU one, the tests stage collects and skips the CUDA cases, the
# sanitizer stages run their pytest selection without the sanitizer, the benchmarks run tiny
# CPU cases on a copy of bench/ (bench/results stays as it is).
#
# The single stages stay available: tools/gpu_checks.sh build|tests|sanitize|bench-ops|e2e.
#
# The GPU host is offline: pip runs with PIP_NO_INDEX=1 here, so a missing optional package
# (diffusers, ruff) only warns and its tests skip. To carry one, download its wheels here into
# wheels/ (git-ignored by .git/info/exclude or a carry path: `pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d wheels NAME`),
# name wheels in the device tool's carry list; this script then installs from it
# (PIP_FIND_LINKS=wheels) and from nowhere else.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
dry=0
[ "${2:-}" = "--dry-run" ] && dry=1
case "$mode" in
all | build | tests | sanitize | bench-ops | e2e) ;;
*)
  echo "usage: tools/gpu_checks.sh all|build|tests|sanitize|bench-ops|e2e [--dry-run]" >&2
  exit 2
  ;;
esac

out=${OUT:-/tmp/pathsmc-gpu}
budget=${GPU_BUDGET_S:-$([ $dry -eq 1 ] && echo 1500 || echo 480)}
build_cap=240  # 16 cores on the GPU host; a fresh CPU build on 2 cores takes longer
[ $dry -eq 1 ] && build_cap=900
host_python=${PYTHON:-python3}
py=.venv/bin/python
logs=logs
mkdir -p "$out" "$logs"
rm -f "$logs"/*.log "$logs"/*.xml "$logs"/stages.tsv
: >"$logs/stages.tsv"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -d wheels ]; then export PIP_FIND_LINKS=$PWD/wheels; else unset PIP_FIND_LINKS; fi
cores=$(nproc)
export CMAKE_BUILD_PARALLEL_LEVEL=$cores MAX_JOBS=$cores
dev=cuda
[ $dry -eq 1 ] && dev=cpu
scratch=$(mktemp -d)

finish() {  # always: the summary, then one tarball of the logs and bench results
  local rc=$?
  trap - EXIT INT TERM
  {
    echo "# tools/gpu_checks.sh $mode$([ $dry -eq 1 ] && echo ' --dry-run'), $(date -u +%FT%TZ)," \
      "device: ${device_name:-unknown}, total ${SECONDS} s of budget $budget s"
    python3 tools/gpu_summary.py "$logs" ||
      sed 's/^/stage=/' "$logs/stages.tsv"  # no Python: the raw stage table
  } >"$out/summary.txt"
  cp "$out/summary.txt" "$logs/summary.txt"
  tar czf "$out/gpu-checks.tgz" "$logs" bench/results 2>/dev/null
  rm -rf "$scratch"
  cat "$out/summary.txt"
  echo "results: $out/gpu-checks.tgz, $out/summary.txt"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

failed=0
# stage NAME CAP RESERVE CMD...: run CMD under `timeout`, for at most CAP seconds and never into
# the RESERVE seconds kept for the stages after it; log to logs/NAME.log, record the result.
stage() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((budget - SECONDS - reserve))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped (only $left s left of the budget)"
    printf '%s\t%s\t%s\t%s\n' "$name" - 0 "skipped" >>"$logs/stages.tsv"
    return 0
  fi
  echo "== $name (limit $limit s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$? result=ok
  [ $rc -ne 0 ] && result=FAIL && failed=1
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && result=TIMEOUT
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$result" >>"$logs/stages.tsv"
  echo "   $result rc=$rc in $((SECONDS - t0)) s; tail:"
  tail -n 12 "$logs/$name.log" | sed 's/^/   | /'
  return $rc
}

skip() {  # skip NAME WHY
  echo "== $1: skipped ($2)"
  printf '%s\t%s\t%s\t%s\n' "$1" - 0 "skipped:$2" >>"$logs/stages.tsv"
}

# pytest with what a first look at a failure needs: the failed ids (-rfE), short tracebacks,
# junit XML (read by the summary), a per-test limit where pytest-timeout is installed.
pytest_args() {  # pytest_args NAME
  local a=(-q -p no:cacheprovider -rfE --tb=short --junitxml="$logs/$1.xml")
  $py -c "import pytest_timeout" 2>/dev/null && a+=(--timeout=120)
  printf '%s\n' "${a[@]}"
}

# ---- stages ----

do_build() {  # RESERVE
  local check=($py tools/check_cuda_build.py)  # every op has a CUDA kernel
  [ $dry -eq 1 ] && check=($py -c "import pathsmc; print(pathsmc.build_info())")
  stage build $build_cap "$1" bash -c 'make build PYTHON="$1" && "${@:2}"' _ "$host_python" "${check[@]}"
}

do_tests() {  # RESERVE
  mapfile -t args < <(pytest_args tests)
  stage tests 210 "$1" $py -m pytest "${args[@]}" -k cuda tests
}

# A small, fast subset: every op's CUDA kernels once, the segmented (long-row) paths included.
SAN_FILES=(tests/test_step.py tests/test_weights.py tests/test_resample.py tests/test_exchange.py
           tests/test_cuda.py)
# (one line: pytest's -k parser rejects a newline inside the expression)
SAN_TESTS=(formula_by_hand noncontiguous edge_uniforms all_dead_row adaptive_resample_1d
           normalize_dead replica_swap_zero by_hand nan_rejects long_rows_split
           kernel_logpdf_cpu_and_cuda residual_other_sizes)
SAN_K="cuda and ($(printf '%s or ' "${SAN_TESTS[@]}" | sed 's/ or $//'))"

do_sanitize() {  # TOOL CAP RESERVE
  local tool=$1 cap=$2 reserve=$3 san=()
  mapfile -t args < <(pytest_args "$tool")
  if [ $dry -eq 0 ]; then
    if ! command -v compute-sanitizer >/dev/null; then
      skip "$tool" "no compute-sanitizer"
      return
    fi
    san=(compute-sanitizer --tool "$tool" --error-exitcode 3)
  fi
  stage "$tool" "$cap" "$reserve" "${san[@]}" $py -m pytest "${args[@]}" -k "$SAN_K" \
    "${SAN_FILES[@]}"
}

KEY_OPS="em_step K=1,resample+gather,adaptive_resample"
REST_OPS="em_step K=0,kernel_logpdf,normalize,resample,mala_accept,replica_swap"

do_bench_ops() {  # NAME OPS CAP RESERVE
  local extra=(--device cuda --repeats 5 --max-seconds 2)
  [ $dry -eq 1 ] && extra=(--device cpu --quick --repeats 3 --max-seconds 1
                           --out-dir "$scratch/results")
  stage "$1" "$3" "$4" $py bench/run.py --no-compile --only "$2" "${extra[@]}"
}

do_e2e() {  # RESERVE
  if [ $dry -eq 1 ]; then  # a copy of bench/: its results land in the scratch folder
    cp -r bench "$scratch/bench"
    stage e2e 60 "$1" $py "$scratch/bench/e2e.py" --device cpu --particles 256 --runs 1 \
      --steps 20 --repeats 1 --modes reward,temper --no-compile
  else
    stage e2e 90 "$1" $py bench/e2e.py --device cuda --particles 4096 --runs 1 --steps 1000 \
      --repeats 3 --modes reward,temper --no-compile
  fi
}

if [ $dry -eq 1 ]; then
  device_name="cpu (dry run)"
else
  device_name=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null | head -n 1)
  device_name=${device_name:-"no nvidia-smi"}
fi
echo "gpu_checks: $mode on $device_name, $cores cores, budget $budget s, out $out"

# The reserves keep time for the later stages of `all`: tests 90, memcheck 40, bench-key 30,
# e2e 45 seconds at least.
case "$mode" in
all)
  if do_build 205; then
    do_tests 115
    do_sanitize memcheck 60 75
    do_sanitize racecheck 45 120
    do_bench_ops bench-key "$KEY_OPS" 45 45
    do_e2e 0
    do_bench_ops bench-rest "$REST_OPS" 60 0
  else
    skip tests "build failed"
  fi
  ;;
build) do_build 0 ;;
tests) do_build 0 && do_tests 0 ;;
sanitize) do_build 0 && do_sanitize memcheck 300 0 &&
  do_sanitize racecheck 300 0 ;;
bench-ops) do_build 0 && do_bench_ops bench-ops "$KEY_OPS,$REST_OPS" 500 0 ;;
e2e) do_build 0 && do_e2e 0 ;;
esac
exit $failed
