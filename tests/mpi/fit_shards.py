"""Run under mpiexec by tests/test_distributed.py: a sharded data-parallel fit, each rank reading
only its own rows from memory-mapped .npy files (rank r's shard: rows 16 s + [lo_r, hi_r) of
every 16-row batch, so that without shuffling the ranks' steps together are one process's steps).
Arguments: OUT. Saves OUT/rank<r>.npz."""
import sys

import numpy as np

from gpu_backprop import MLP
from gpu_backprop.distributed import MPI, shares

out = sys.argv[1]
comm = MPI()
rng = np.random.default_rng(0)
X, y = rng.standard_normal((48, 13)), rng.integers(0, 4, 48)
lo, hi = shares(16, comm.size)[comm.rank]
rows = np.concatenate([np.arange(16 * s + lo, 16 * s + hi) for s in range(3)])
np.save(f"{out}/X{comm.rank}.npy", X[rows])
X_shard = np.load(f"{out}/X{comm.rank}.npy", mmap_mode="r")  # this rank's rows only
model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype="float64", seed=1)
history = model.fit(X_shard, y[rows], epochs=3, batch_size=16, lr=0.05, optimizer="adam", shuffle=False,
                    distributed=comm, sharded=True, validation_data=(X[rows][:4], y[rows][:4]))
np.savez(f"{out}/rank{comm.rank}.npz", loss=np.array(history.loss), val_loss=np.array(history.val_loss),
         **model.get_params())
