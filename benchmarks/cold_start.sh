#!/usr/bin/env bash
# Cold start (issue 16): with an empty CuPy kernel cache and an empty tuner cache, one epoch of
# digits on cuda, whole-process wall time (import, data, NVRTC compiles, tuning, the epoch); then
# the same again with both caches warm. One line each on stdout; the runs' output goes to LOG.
# Usage: benchmarks/cold_start.sh LOG
log=${1:?usage: benchmarks/cold_start.sh LOG}
python=${PYTHON:-python3}
cold_cupy=$(mktemp -d) cold_tuner=$(mktemp -d)
for start in cold warm; do
    t0=$(date +%s.%N)
    CUPY_CACHE_DIR="$cold_cupy" GPU_BACKPROP_CACHE="$cold_tuner" timeout 100 \
        $python -m gpu_backprop.cli train --device cuda --epochs 1 --json >> "$log" 2>&1
    rc=$?
    echo "$start start: digits, 1 epoch on cuda, process wall $($python -c "print(round($(date +%s.%N) - $t0, 2))") s (exit $rc)"
done
