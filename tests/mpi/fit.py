"""Run under mpiexec by tests/test_distributed.py: one data-parallel fit, each rank's parameters
saved to OUT/rank<r>.npz. Arguments: OUT OPTIMIZER."""
import sys

import numpy as np

from gpu_backprop import MLP
from gpu_backprop.distributed import MPI

out, optimizer = sys.argv[1], sys.argv[2]
comm = MPI()
rng = np.random.default_rng(0)
X, y = rng.standard_normal((50, 13)), rng.integers(0, 4, 50)  # batches 16, 16, 16, 2
model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype="float64", seed=1)
kwargs = {"momentum": 0.9, "nesterov": True, "alpha": 1e-3} if optimizer == "sgd" else {"weight_decay": 0.01}
history = model.fit(X, y, epochs=3, batch_size=16, lr=0.05, optimizer=optimizer, distributed=comm,
                    validation_data=(X[:11], y[:11]), **kwargs)
np.savez(f"{out}/rank{comm.rank}.npz", loss=np.array(history.loss), val_loss=np.array(history.val_loss),
         **model.get_params())
