#!/usr/bin/env bash
# The GPU verification of one session, in four device calls: tools/gpu_checks.sh STAGE,
# e.g. the device tool's run with command "OUT=$OUT bash tools/gpu_checks.sh build".
#
#   build     build on the GPU host (make build: AUTO compiles the CUDA kernels against its own
#             torch), print the build info, run the whole test suite on CPU and CUDA
#   sanitize  compute-sanitizer memcheck and racecheck on the CUDA cases of the op tests
#   bench-ops      bench/run.py on the GPU (every op vs eager and torch.compile, % of copy
#                  bandwidth; split it with --only if it outgrows one call)
#   bench-drivers  bench/e2e.py (1000-step steering loops, with CUDA-graph replays),
#                  bench/pt.py (round trips per second), bench/waste_free.py (annealed SMC)
#
# Each stage fits one device call (10 minutes) and re-runs `make build` (a no-op on a warm
# machine). The GPU hosts are offline: the venv reuses their Python's torch and packages; if
# one the build or the tests need is missing there (make says which), download its wheel
# here into an ignored folder (pip download -d wheels NAME), carry that folder and
# `pip install --no-index --find-links wheels NAME` on the host before the stage. Logs and the bench results come back as one tarball per stage under $OUT; unpack
# it over the checkout (tar xzf .../bench-results.tgz) and commit bench/results/.
set -uo pipefail
stage=${1:?usage: tools/gpu_checks.sh build|sanitize|bench-ops|bench-drivers}
out=${OUT:-/tmp/pathsmc-gpu}
mkdir -p "$out" logs
py=.venv/bin/python
status=0

step() {  # step NAME CMD...: run, log to logs/NAME.log, remember a failure, go on
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"logs/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s; tail:"
  tail -n 15 "logs/$name.log" | sed 's/^/   | /'
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step build make build
$py -c "import pathsmc, torch; print(pathsmc.build_info(), torch.__version__, torch.cuda.get_device_name())"

case "$stage" in
build)
  step tests $py -m pytest -q -x -p no:cacheprovider tests
  ;;
sanitize)
  cases=(tests/test_step.py tests/test_step_rows.py tests/test_weights.py tests/test_resample.py
         tests/test_exchange.py)
  for tool in memcheck racecheck; do
    step "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      $py -m pytest -q -x -p no:cacheprovider -k cuda "${cases[@]}"
  done
  ;;
bench-ops)
  step bench-ops $py bench/run.py --device cuda
  ;;
bench-drivers)
  step bench-e2e $py bench/e2e.py --device cuda --particles 4096 --runs 1 --steps 1000 \
    --repeats 3 --modes reward,temper
  step bench-pt $py bench/pt.py --device cuda --chains 32 512 8192
  step bench-waste-free $py bench/waste_free.py --device cuda --particles 1024 8192
  ;;
*)
  echo "unknown stage $stage" >&2
  exit 2
  ;;
esac

tar czf "$out/$stage-results.tgz" logs bench/results 2>/dev/null
echo "stage $stage: $([ $status -eq 0 ] && echo OK || echo FAILED) -> $out/$stage-results.tgz"
exit $status
