#!/usr/bin/env bash
# Unpack revision REV of this repository into .base/ (ignored by git), so that
# benchmarks/device_check.sh times that revision and this tree on the same GPU in
# one call: name .base in the device call's carry. Remove .base to skip it.
# Usage: benchmarks/prepare_baseline.sh REV
set -euo pipefail
rev=${1:?usage: benchmarks/prepare_baseline.sh REV}
cd "$(dirname "$0")/.."
rm -rf .base
mkdir .base
git archive "$rev" | tar -x -C .base
git rev-parse --short "$rev" > .base/REVISION
echo "baseline $(cat .base/REVISION) in .base/ ($(du -sh .base | cut -f1)); carry it: [\".base\"]"
