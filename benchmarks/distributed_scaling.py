"""Data-parallel scaling on this machine (issue 15's target): samples per second of MLP.fit on
784-1024-1024-10 at a global batch of 512, 1 rank against N ranks under mpiexec, one BLAS thread
per rank, synthetic data (8192 rows), median epoch of 3 after a warm-up epoch; N ranks with the
MPI all-reduce and with the shared-memory communicator (distributed.SharedMemory); one run of
this script, as JSON. `python -m benchmarks.distributed_scaling [N [ROUNDS]]` (unset OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE for the command, as for every benchmark)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RANK = """
import json, sys, time
import numpy as np
from gpu_backprop import MLP
from gpu_backprop.distributed import from_environment
comm = from_environment(sys.argv[1], "cpu")
rng = np.random.default_rng(0)
X = rng.random((8192, 784), dtype=np.float32)
y = rng.integers(0, 10, 8192)
model = MLP([784, 1024, 1024, 10], activation="relu", loss="cross_entropy", device="cpu", seed=0)
dist = comm if comm.size > 1 else None
model.fit(X, y, epochs=1, batch_size=512, lr=0.01, momentum=0.9, distributed=dist)  # warm-up
h = model.fit(X, y, epochs=3, batch_size=512, lr=0.01, momentum=0.9, distributed=dist)
if comm.rank == 0:
    print(json.dumps({"ranks": comm.size, "samples_per_second": len(X) / float(np.median(h.seconds)),
                      "epoch_seconds": h.seconds}))
"""


def run(ranks: int, kind: str = "none") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    rank = [sys.executable, "-c", RANK, kind]
    cmd = rank if ranks == 1 else [mpiexec, "-n", str(ranks), *rank]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "communicator": kind}


def main() -> None:
    """Rounds of 1 rank, N ranks with the MPI all-reduce and N ranks with the shared-memory
    communicator, one after another (the machine's speed drifts between minutes: each round's
    ratios come from runs seconds apart); the median of the rounds' ratios."""
    ranks = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    report: dict = {"machine": f"{os.cpu_count()} cores", "ranks": ranks, "rounds": []}
    for _ in range(rounds):
        one = run(1)
        this = {"one_rank": one}
        for kind in ("mpi", "shm"):
            many = this[f"{ranks}_ranks_{kind}"] = run(ranks, kind)
            this[f"speedup_{kind}"] = many["samples_per_second"] / one["samples_per_second"]
        report["rounds"].append(this)
    for kind in ("mpi", "shm"):
        report[f"speedup_{kind}_median"] = statistics.median(r[f"speedup_{kind}"] for r in report["rounds"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
