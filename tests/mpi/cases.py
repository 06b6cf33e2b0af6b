"""Run under mpiexec by tests/test_distributed.py: one case of a data-parallel fit through the
API; each rank saves its parameters (or the error it stopped with) to OUT/rank<r>.npz.
Arguments: OUT CASE, CASE one of
  uneven-shards   shards of 20 + 7 r rows, invscaling (the rate depends on the rows seen by all)
  other-seeds     every rank given its own seed: the orders still come from rank 0's generator
  same-seeds      every rank given rank 0's seed
  resume-missing  a checkpoint that only rank 0 has: every rank stops, none waits in a sum
"""
import sys
from pathlib import Path

import numpy as np

from gpu_backprop import MLP
from gpu_backprop.distributed import MPI

out, case = Path(sys.argv[1]), sys.argv[2]
comm = MPI()
rng = np.random.default_rng(comm.rank if case == "uneven-shards" else 0)
n = 20 + 7 * comm.rank if case == "uneven-shards" else 40
X, y = rng.standard_normal((n, 13)), rng.integers(0, 4, n)
model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype="float64", seed=1)
kwargs = dict(epochs=3, batch_size=8, lr=0.05, optimizer="adam", distributed=comm)
try:
    if case == "uneven-shards":
        model.fit(X, y, sharded=True, schedule="invscaling", power_t=0.25, **kwargs)
    elif case in ("other-seeds", "same-seeds"):
        model.fit(X, y, seed=comm.rank if case == "other-seeds" else 0, **kwargs)
    else:
        model.fit(X, y, checkpoint=out / "only-rank-0.npz", **{**kwargs, "epochs": 1})  # rank 0 writes it
        path = out / "only-rank-0.npz" if comm.rank == 0 else out / "missing.npz"
        model.fit(X, y, resume_from=path, **kwargs)
    np.savez(out / f"rank{comm.rank}.npz", **model.get_params())
except ValueError as exc:
    np.savez(out / f"rank{comm.rank}.npz", error=np.array(str(exc)))
