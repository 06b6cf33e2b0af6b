#!/usr/bin/env bash
# The short second call after device_check.sh found something to fix (about 4 minutes, for a
# lease with little time left): install; the cold start; every `gpu` test (4 processes);
# the training-step benchmarks of our graph and fused paths beside cuBLAS + elementwise and
# torch eager (small, typical-B4096, digits); the GEMM sweep. Each part under its own limit.
# Usage: benchmarks/device_recheck.sh OUTDIR
set -uo pipefail
out=${1:?usage: benchmarks/device_recheck.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GPU_BACKPROP_DEVICE=cuda
log="$out/device_check.log" summary="$out/summary.txt"
: > "$summary"
python=${PYTHON:-python3}
status=0
note() { echo "$*" | tee -a "$summary"; }
run() {
    local name=$1 limit=$2; shift 2
    echo "===== $name: $* ($(date +%T))" >> "$log"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then note "PASS $name ($((SECONDS - start)) s)"; else note "FAIL $name (exit $rc, $((SECONDS - start)) s)"; status=1; fi
}
run install 60 $python -m pip install --no-deps --no-build-isolation -e .
note "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
bash benchmarks/cold_start.sh "$log" | tee -a "$summary"
export GPU_BACKPROP_REQUIRE_GPU=1
run gpu-tests 120 $python -m pytest $(grep -l "mark.gpu" tests/test_*.py) -m gpu -q -rs -p no:cacheprovider -n 4
grep -E "passed|failed" "$log" | tail -1 | tee -a "$summary"
run bench-step 60 $python -m pytest benchmarks/test_train_step.py --bench-device cuda --bench-budget 0.1 -q \
    -p no:cacheprovider -k "(digits or small or typical-B4096) and (ours-graph or ours-fused or cupy-unfused or torch-eager)" \
    --benchmark-json="$out/bench_step.json" --benchmark-columns=median,rounds
$python -m benchmarks.report "$out/bench_step.json" --markdown /tmp/bench.md >> "$log" 2>&1
run gemm-sweep 90 $python -m benchmarks.gemm_sweep "$out/gemm_sweep.json"
grep -E "^(core|wgrad|forward)" "$log" >> "$summary"
echo; cat "$summary"; [ -f /tmp/bench.md ] && grep -E "ours-graph|ours-fused" /tmp/bench.md
exit $status
