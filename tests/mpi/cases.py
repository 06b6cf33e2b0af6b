"""Run under mpiexec by tests/test_distributed.py: one case of a data-parallel fit through the
API; each rank saves its parameters (or the error it stopped with) to OUT/rank<r>.npz.
Arguments: OUT CASE, CASE one of
  uneven-shards   shards of 20 + 7 r rows, invscaling (the rate depends on the rows seen by all)
  other-seeds     every rank given its own seed: the orders still come from rank 0's generator
  same-seeds      every rank given rank 0's seed
  resume-missing  a checkpoint that only rank 0 has: every rank stops, none waits in a sum
  diverge-shm     SharedMemory; the weights go non-finite in epoch 2's last step (its loss still
                  finite) and the last rank is slower to look: every rank stops with the error and
                  keeps the weights of epoch 2, none trains on alone
"""
import sys
import time
from pathlib import Path

import numpy as np

from gpu_backprop import MLP
from gpu_backprop import train as train_mod
from gpu_backprop.distributed import MPI, SharedMemory

out, case = Path(sys.argv[1]), sys.argv[2]
comm = SharedMemory() if case.endswith("-shm") else MPI()
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
    elif case == "diverge-shm":
        epoch, calls = train_mod.Trainer.epoch, [0]

        def diverging(self):
            result = epoch(self)
            calls[0] += 1
            if calls[0] == 2:
                if comm.rank == 0:
                    self.model.weights[0][0, 0] = np.inf  # what an overflowing last update leaves
                comm.comm.Barrier()
                if comm.rank == comm.size - 1:
                    time.sleep(0.3)
            return result
        train_mod.Trainer.epoch = diverging
        try:
            model.fit(X, y, **{**kwargs, "epochs": 4, "optimizer": "sgd"})
        except FloatingPointError as exc:
            np.savez(out / f"rank{comm.rank}.npz", error=np.array(str(exc)), **model.get_params())
            sys.exit(0)
    else:
        model.fit(X, y, checkpoint=out / "only-rank-0.npz", **{**kwargs, "epochs": 1})  # rank 0 writes it
        path = out / "only-rank-0.npz" if comm.rank == 0 else out / "missing.npz"
        model.fit(X, y, resume_from=path, **kwargs)
    np.savez(out / f"rank{comm.rank}.npz", **model.get_params())
except ValueError as exc:
    np.savez(out / f"rank{comm.rank}.npz", error=np.array(str(exc)))
