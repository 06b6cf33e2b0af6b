"""Run under mpiexec by tests/test_distributed.py: the same two fits (the second continuing the
first's optimizer state, in the same shared window) through the MPI all-reduce and through
distributed.SharedMemory, the last rank slowed down before its backward and before its share of
the update (so a rank that summed or trained on without waiting for it reads what that rank has
not written yet); then a bf16 model, which SharedMemory leaves to the all-reduce. Each rank's
parameters, optimizer state and losses saved to OUT/<communicator>-rank<r>.npz.
Arguments: OUT OPTIMIZER."""
import sys
import time

import numpy as np

from gpu_backprop import MLP
from gpu_backprop.distributed import MPI, SharedMemory

out, optimizer = sys.argv[1], sys.argv[2]
world = MPI()
shm = SharedMemory(world.comm)
rng = np.random.default_rng(0)
X, y = rng.standard_normal((50, 13)), rng.integers(0, 4, 50)  # batches 16, 16, 16, 2
kwargs = {"momentum": 0.9, "nesterov": True, "alpha": 1e-3} if optimizer == "sgd" else {"weight_decay": 0.01}


def slowed(method):
    def late(*args, **kw):
        time.sleep(0.01)
        return method(*args, **kw)
    return late


def train(comm, dtype="float64", precision="fp32", epochs=(3, 2)):
    model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype=dtype, seed=1,
                precision=precision)
    if comm is shm and comm.rank == comm.size - 1:
        model.gradient_step = slowed(model.gradient_step)
        model.apply_gradients = slowed(model.apply_gradients)
    losses = []
    for n in epochs:
        losses += model.fit(X, y, epochs=n, batch_size=16, lr=0.05, optimizer=optimizer, distributed=comm,
                            validation_data=(X[:11], y[:11]), **kwargs).loss
    state = {k: np.asarray(v) for k, v in model._state.arrays().items()}
    return {"loss": np.array(losses), **model.get_params(), **state}


for name, comm in (("mpi", world), ("shm", shm)):
    np.savez(f"{out}/{name}-rank{comm.rank}.npz", **train(comm))
    if optimizer == "sgd":
        np.savez(f"{out}/{name}-bf16-rank{comm.rank}.npz",
                 **train(comm, dtype="float32", precision="bf16", epochs=(2,)))
shm.close()
