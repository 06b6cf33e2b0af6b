#!/usr/bin/env bash
# Everything gpu_backprop checks on a real GPU, in one run of under 6 minutes, on an
# H100/H200 machine without network access (CuPy 14, NumPy, SciPy, scikit-learn,
# pytest, pytest-benchmark and PyTorch preinstalled):
#   1. install the package (nothing fetched), record the card and versions;
#   2. every `gpu` test under tests/ (fused kernels vs the NumPy twins, fused vs unfused vs CPU training,
#      the launch contract, NaN propagation, stream ordering);
#   3. compute-sanitizer memcheck and racecheck over a small run of every kernel;
#   4. digits trained on the GPU and on the CPU: accuracies must match; and in bf16 on the GPU, within
#      half a point of float32 (issue 13's target);
#   5. every GEMM path forced in turn against cuBLAS (benchmarks/gemm_sweep.py -> gemm_sweep.json), with
#      cuBLAS TF32 and BF16 (CuPy, PyTorch), our TF32 core's ratio to cuBLAS TF32 and our bf16 core's
#      (matmul.cu) to cuBLAS BF16 in the summary;
#   6. the GPU benchmark suite -> bench_step.json, bench_kernels.json, bench_compile.json,
#      bench.png (chart; the table is printed); the training step first, torch.compile (minutes of
#      compilation) last, each part with its own time limit so one overrun loses only itself. The
#      tensor-core peers (issue 13) come along: the GEMM core against cublas-tf32, torch-tf32 and
#      torch-bf16 in bench_kernels, our bf16 step (ours-bf16) and PyTorch's bf16 autocast steps
#      (eager, autograd) in bench_step,
#      torch-compile-bf16 beside torch-compile in bench_compile.
# Before and after on one machine: with an older revision unpacked in .base/
# (benchmarks/prepare_baseline.sh REV, carried), its training-step and digits benchmarks run
# first, before this tree is installed, with a tuner cache of their own -> bench_baseline.json,
# and the summary lists base -> now for every figure both runs have (bench.png is then left
# out: `python -m benchmarks.report` remakes it from the JSON).
# Usage: benchmarks/device_check.sh OUTDIR   (at most 8 files are written there)
set -uo pipefail
out=${1:?usage: benchmarks/device_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GPU_BACKPROP_DEVICE=cuda
log="$out/device_check.log"
summary="$out/summary.txt"
: > "$summary"
status=0
python=${PYTHON:-python3}

note() { echo "$*" | tee -a "$summary"; }
section() { echo; echo "===== $* ($(date +%T))" | tee -a "$log"; }
run() {  # run NAME TIMEOUT CMD...: output to the log, PASS/FAIL to the summary
    local name=$1 limit=$2; shift 2
    section "$name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then note "PASS $name ($((SECONDS - start)) s)"; else note "FAIL $name (exit $rc, $((SECONDS - start)) s)"; status=1; fi
    return $rc
}

section "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv; $python --version;
  $python -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"; } >> "$log" 2>&1
if [ -d .base/gpu_backprop ]; then  # before this tree is installed: nothing of it can shadow the old one
    base_cache=$(mktemp -d)
    run "baseline-$(cat .base/REVISION 2> /dev/null)" 150 env -C .base GPU_BACKPROP_CACHE="$base_cache" PYTHONPATH=. \
        $python -m pytest benchmarks/test_train_step.py --bench-device cuda --bench-budget 0.15 -q -p no:cacheprovider \
        -k "(digits or small or typical-B4096) and (ours-graph or ours-fused or ours-tf32)" \
        --benchmark-json="$(cd "$out" && pwd)/bench_baseline.json" --benchmark-columns=median,rounds
fi
run install 120 $python -m pip install --no-deps --no-build-isolation -e . || { cat "$summary"; exit 1; }
$python -m gpu_backprop.cli info >> "$log" 2>&1
note "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
# Without a usable GPU every later step would skip and look green: stop here instead.
run cuda-usable 60 $python -c "from gpu_backprop import get_device; print(get_device('cuda'))" || { cat "$summary"; exit 1; }
export GPU_BACKPROP_REQUIRE_GPU=1  # the gpu tests fail instead of skipping

bash benchmarks/cold_start.sh "$log" | tee -a "$summary"

# every test marked `gpu`, in whichever file it lives (test_gpu.py, test_gpu_contract.py, test_streams.py, ...);
# only those files are collected: the others may import what this machine lacks (hypothesis)
gpu_files=$(grep -l "mark.gpu" tests/test_*.py)
run gpu-tests 180 $python -m pytest $gpu_files -m gpu -q -rs -p no:cacheprovider

if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
        run "sanitizer-$tool" 90 compute-sanitizer --tool "$tool" --error-exitcode 9 $python benchmarks/sanitize_run.py
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Device not supported" "$log" | tail -1 | tee -a "$summary"
    done
else
    note "FAIL compute-sanitizer not on PATH"; status=1
fi

section "digits: GPU vs CPU"
for device in cuda cpu; do
    timeout 120 $python -m gpu_backprop.cli train --device "$device" --json > "$out/digits_$device.json" 2>> "$log"
done
# issue 13's bf16 target: digits in bf16 on the card within 0.5 point of float32 on the card
timeout 120 $python -m gpu_backprop.cli train --device cuda --precision bf16 --json > "$out/digits_cuda_bf16.json" 2>> "$log"
if $python - "$out" >> "$log" 2>&1 <<'PY'
import json, sys
cuda, cpu = (json.load(open(f"{sys.argv[1]}/digits_{d}.json")) for d in ("cuda", "cpu"))
print(f"digits test accuracy: cuda {cuda['test_accuracy']:.4f} ({cuda['seconds_per_epoch']*1e3:.1f} ms/epoch), "
      f"cpu {cpu['test_accuracy']:.4f} ({cpu['seconds_per_epoch']*1e3:.1f} ms/epoch)")
assert cuda["device"].startswith("cuda") and cuda["fused"], cuda
assert cuda["test_accuracy"] >= 0.95 and abs(cuda["test_accuracy"] - cpu["test_accuracy"]) <= 0.01
PY
then note "PASS digits: $(tail -1 "$log")"; else note "FAIL digits: see log"; status=1; fi
if $python - "$out" >> "$log" 2>&1 <<'PY'
import json, sys
fp32, bf16 = (json.load(open(f"{sys.argv[1]}/digits_{d}.json")) for d in ("cuda", "cuda_bf16"))
print(f"digits bf16 on the card: test accuracy {bf16['test_accuracy']:.4f} against float32's {fp32['test_accuracy']:.4f} "
      f"({bf16['seconds_per_epoch']*1e3:.1f} ms/epoch; target: within 0.005)")
assert bf16["precision"] == "bf16" and abs(bf16["test_accuracy"] - fp32["test_accuracy"]) <= 0.005
PY
then note "PASS digits-bf16: $(tail -1 "$log")"; else note "FAIL digits-bf16: $(tail -1 "$log")"; status=1; fi
$python -c "import json,sys; print(json.dumps({d: json.load(open(f'$out/digits_{d}.json')) for d in ('cuda','cpu','cuda_bf16')}, indent=1))" \
    > "$out/digits.json" 2>> "$log" && rm -f "$out/digits_cuda.json" "$out/digits_cpu.json" "$out/digits_cuda_bf16.json"

bench() {  # bench NAME LIMIT FILE -k EXPR
    run "bench-$1" "$2" $python -m pytest "benchmarks/$3" --bench-device cuda --bench-budget 0.15 -q -p no:cacheprovider \
        -k "$4" --benchmark-json="$out/bench_$1.json" --benchmark-columns=median,rounds
}
run gemm-sweep 120 $python -m benchmarks.gemm_sweep "$out/gemm_sweep.json"
grep -E "^(core|wgrad|forward)" "$log" | tee -a "$summary" > /dev/null
bench step 130 test_train_step.py "not torch-compile"  # also excludes torch-compile-bf16: -k matches substrings
bench kernels 120 test_kernels.py "not large or weight_grad"
bench compile 150 test_train_step.py "torch-compile"  # and torch-compile-bf16 (80 s before it; fp32 alone: 33 s)
results=$(ls "$out"/bench_step.json "$out"/bench_kernels.json "$out"/bench_compile.json 2> /dev/null)
if [ -n "$results" ]; then
    png=(--png "$out/bench.png")
    [ -f "$out/bench_baseline.json" ] && png=()
    $python -m benchmarks.report $results "${png[@]}" --markdown /tmp/bench.md >> "$log" 2>&1
fi
if [ -f "$out/bench_baseline.json" ] && [ -f "$out/bench_step.json" ]; then
    $python -m benchmarks.report --compare "$out/bench_baseline.json" "$out/bench_step.json" 2>> "$log" \
        | sed 's/^/base -> now: /' | tee -a "$summary"
fi
echo; cat "$summary"
[ -f /tmp/bench.md ] && cat /tmp/bench.md
exit $status
