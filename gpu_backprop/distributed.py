"""Data-parallel training over several processes: one model, its batches split across ranks.

Each step's global batch of B rows is cut into N shares (rank r takes rows [r m / N, (r + 1) m / N)
of a batch of m rows); every rank draws the same global order from the seed, computes the
gradient of its share (the weight-gradient kernels write it instead of updating), the gradients
are summed across ranks, layer by layer as the backward pass writes them (non-blocking, so the
sums of the upper layers overlap the backward of the lower ones), and every rank applies the same
update with the global batch's 1/B. So every rank holds the same parameters after every step.

Communicators (ChainerMN's split): :class:`MPI` over mpi4py with NumPy buffers (the CPU; a CuPy
buffer goes through the host), :class:`NCCL` over CuPy's NCCL for CuPy buffers (its id broadcast
over MPI, one GPU per rank by local rank), and :class:`Local`, one process, for tests and the
single-process path. On one machine, the CPU: :class:`SharedMemory`, whose ranks keep one copy of
the parameters in shared memory and each sum and update a share of the elements, in place of the
all-reduce and N updates. :func:`from_environment` picks one for a process started by ``mpiexec``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Sequence

import numpy as np

INSTALL_HINT = 'pip install "gpu_backprop[mpi]" (mpi4py and MPICH from wheels)'


class DistributedError(RuntimeError):
    """The processes cannot work together (no MPI, a rank failed): the message says why."""


def _from_env(names: Sequence[str], default: int) -> int:
    """The first of ``names`` set to an integer in the environment mpiexec gives its ranks
    (MPICH's Hydra, Open MPI, PMIx), else ``default``."""
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def launched_size() -> int:
    """Ranks ``mpiexec`` started; 1 otherwise."""
    return _from_env(("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"), 1)


def launched_rank() -> int:
    """This process's rank among those ``mpiexec`` started (before MPI is initialised); 0 otherwise."""
    return _from_env(("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"), 0)


def local_rank() -> int:
    """This rank's index among the ranks on its machine (its GPU)."""
    return _from_env(("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK"), 0)


def shares(m: int, size: int) -> list[tuple[int, int]]:
    """The rows [lo, hi) of a batch of m rows each of ``size`` ranks takes (sizes differ by at most 1)."""
    return [(r * m // size, (r + 1) * m // size) for r in range(size)]


class Request:
    """A non-blocking sum in flight; ``wait()`` completes it (in place)."""

    def __init__(self, wait: Any = None):
        self._wait = wait

    def wait(self) -> None:
        if self._wait is not None:
            self._wait()
            self._wait = None


class Local:
    """One process: sums over one rank are the arrays themselves."""

    rank, size, name, training = 0, 1, "local", False

    def iallreduce(self, array: Any) -> Request:
        return Request()

    def allreduce(self, array: Any) -> None:
        pass

    def broadcast(self, array: Any, root: int = 0) -> None:
        pass

    def agree(self, error: str | None) -> str | None:
        return error

    def allgather(self, value: Any) -> list:
        return [value]

    def abort(self, code: int = 1) -> None:
        sys.exit(code)

    def __repr__(self) -> str:
        return "Local()"


class MPI:
    """mpi4py's COMM_WORLD (or ``comm``); sums of NumPy buffers in place. A CuPy buffer is copied
    to the host and back (no CUDA-aware MPI assumed: use :class:`NCCL` on GPUs)."""

    name, training = "mpi", False

    def __init__(self, comm: Any = None):
        try:
            from mpi4py import MPI as mpi
        except ImportError:
            raise DistributedError(f"distributed training needs mpi4py: {INSTALL_HINT}") from None
        self.mpi = mpi
        self.comm = comm if comm is not None else mpi.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def _host(self, array: Any) -> tuple[np.ndarray, Any]:
        if isinstance(array, np.ndarray):
            return array, None
        host = array.get()
        return host, lambda: array.set(host)

    def iallreduce(self, array: Any) -> Request:
        host, back = self._host(array)
        request = self.comm.Iallreduce(self.mpi.IN_PLACE, host, op=self.mpi.SUM)

        def wait() -> None:
            request.Wait()
            if back is not None:
                back()
        return Request(wait)

    def allreduce(self, array: Any) -> None:
        self.iallreduce(array).wait()

    def broadcast(self, array: Any, root: int = 0) -> None:
        host, back = self._host(array)
        self.comm.Bcast(host, root=root)
        if back is not None:
            back()

    def allgather(self, value: Any) -> list:
        """Every rank's ``value`` (a small picklable object), in rank order, on every rank."""
        return self.comm.allgather(value)

    def agree(self, error: str | None) -> str | None:
        """Every rank's error (or None) gathered: the lowest rank's error, on every rank, so all
        stop together (and only one says why)."""
        errors = self.comm.allgather(error)
        return next((f"rank {r}: {e}" if self.size > 1 else e for r, e in enumerate(errors) if e), None)

    def abort(self, code: int = 1) -> None:
        """End every rank now (mpiexec kills the others): a failure on one rank never leaves the
        others waiting in a sum."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def __repr__(self) -> str:
        return f"MPI(rank {self.rank} of {self.size})"


class NCCL(MPI):
    """NCCL all-reduce of CuPy buffers on this rank's GPU, on a side stream ordered by events
    with the training stream; its unique id broadcast from rank 0 over MPI; ``broadcast`` and
    ``agree`` go over MPI (through the host)."""

    name = "nccl"

    def __init__(self, comm: Any = None):
        super().__init__(comm)
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError:
            raise DistributedError("NCCL: CuPy's NCCL bindings are not available (install CuPy for your CUDA; "
                                   "or use the MPI communicator)") from None
        self.nccl = nccl
        # this rank's GPU, by its rank on the machine: current from here on, for NCCL and the model
        cupy.cuda.Device(local_rank() % cupy.cuda.runtime.getDeviceCount()).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def iallreduce(self, array: Any) -> Request:
        """Enqueue the sum of ``array`` on a stream of its own, after what the current stream has
        issued (the kernels that wrote it): the backward of the layers below runs meanwhile.
        ``wait()`` makes the current stream wait for the sum (the host does not)."""
        import cupy

        if isinstance(array, np.ndarray):
            return super().iallreduce(array)
        dtype = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32, np.dtype(np.float64): self.nccl.NCCL_FLOAT64,
                 np.dtype(np.int64): self.nccl.NCCL_INT64}[np.dtype(array.dtype)]
        stream = cupy.cuda.get_current_stream()
        if getattr(self, "_side", None) is None:
            self._side = cupy.cuda.Stream(non_blocking=True)
        self._side.wait_event(stream.record())
        self.nccl_comm.allReduce(array.data.ptr, array.data.ptr, array.size, dtype, self.nccl.NCCL_SUM,
                                 self._side.ptr)
        done = self._side.record()
        return Request(lambda: stream.wait_event(done))

    def __repr__(self) -> str:
        return f"NCCL(rank {self.rank} of {self.size})"


class SharedMemory(MPI):
    """The ranks of one machine, the CPU (ChainerMN's intra-node communicators, DeepSpeed's shm
    all-reduce): during a fit the parameters, the optimizer's state and every rank's gradient
    live in one MPI-3 shared-memory window that every rank maps. Each step, every rank's
    backward writes its gradient into its own part of the window; after a barrier, rank r sums
    the ranks' gradients (in rank order) over its 1/N of the elements and updates those
    elements of the one copy of the parameters; after a second barrier every rank trains on.
    No gradient is copied or sent, the update is done once in all (each rank's share) rather
    than once per rank, and the ranks' parameters are the same memory.

    Sums and updates are those of :class:`MPI` element by element (two ranks: the same bits;
    more: the sum's order may differ from MPI's). Ranks on more than one machine, a model on
    CUDA or in bf16: the all-reduce of :class:`MPI` (what :meth:`shares` says).

    It holds a communicator of the machine's ranks and, after a fit, the window: make one and
    reuse it for every fit, and :meth:`close` it (or use it as a context manager) when done
    (collective); MPI allows about a thousand communicators at a time."""

    name = "shm"

    def __init__(self, comm: Any = None):
        super().__init__(comm)
        node = self.comm.Split_type(self.mpi.COMM_TYPE_SHARED)
        together = node.Get_size() == self.size
        if not together:
            node.Free()
            raise DistributedError(f"shm: the {self.size} ranks are on more than one machine (use --distributed mpi)")
        self.node = node
        self._win: Any = None
        self._win_bytes = 0
        self._shared: Any = None  # the model whose arrays are in the window now

    def shares(self, model: Any) -> bool:
        """Whether ``model``'s fit can keep its arrays in shared memory: NumPy arrays, float32 or
        float64 (not precision="bf16", whose weights have copies the update refreshes)."""
        return model.xp is np and model.precision != "bf16"

    def _window(self, itemsize: int, elements: int) -> np.ndarray:
        """The window's memory, at least ``elements`` of ``itemsize`` bytes (kept between fits;
        allocated again, collectively, when a larger one is needed)."""
        nbytes = itemsize * elements
        if self._win is None or self._win_bytes < nbytes:
            if self._win is not None:
                self._win.Unlock_all()
                self._win.Free()
            mpi = self.mpi
            self._win = mpi.Win.Allocate_shared(nbytes if self.node.Get_rank() == 0 else 0, 1, comm=self.node)
            if self._win.Get_attr(mpi.WIN_MODEL) != mpi.WIN_UNIFIED:  # the fence below assumes one copy
                raise DistributedError("shm: this MPI's shared windows are not of the unified memory model "
                                       "(use --distributed mpi)")
            self._win.Lock_all(mpi.MODE_NOCHECK)  # passive target for the whole life: Sync orders the stores
            self._win_bytes = nbytes
        memory, _ = self._win.Shared_query(0)
        return np.frombuffer(memory, dtype=np.uint8, count=self._win_bytes)

    def fence(self) -> None:
        """Every rank's stores to the window before this point are seen by every rank after it."""
        self._win.Sync()
        self.node.Barrier()
        self._win.Sync()

    @contextlib.contextmanager
    def share(self, model: Any):
        """For the ``with`` block (a fit's epochs): ``model``'s parameters and optimizer state (as
        every rank holds them, identical) moved into the window, its gradient buffers made this
        rank's part of it; at the end, private copies of what the window then holds (for the
        model to keep after the fit, on every rank). Collective."""
        n, dtype, state = model.n_parameters, model.dtype, model._state
        stride = -(-n // 16) * 16  # 64-byte aligned sections in float32
        lists = [name for name in ("vel", "sq") if state is not None and getattr(state, f"{name}_w")]
        sections = 1 + len(lists) + self.size
        flat = self._window(dtype.itemsize, sections * stride).view(dtype)
        view = lambda k: flat[k * stride:k * stride + n]
        # this rank's elements: a 1/N share, its ends on 64-byte lines (no line written by two ranks)
        ends = [0, *(min(n, -(-lo // 16) * 16) for lo, _ in shares(n, self.size)[1:]), n]
        lo, hi = ends[self.rank], ends[self.rank + 1]
        params = model.gradient_views(view(0))
        moved = [(params, model.weights, model.biases)]
        for k, name in enumerate(lists, start=1):
            moved.append((model.gradient_views(view(k)), getattr(state, f"{name}_w"), getattr(state, f"{name}_b")))
        for views, weights, biases in moved:  # this rank's share of every array
            private = np.concatenate([a.reshape(-1) for pair in zip(weights, biases) for a in pair])
            views.flat[lo:hi] = private[lo:hi]
        self.fence()
        for views, weights, biases in moved:
            weights[:], biases[:] = views.w, views.b
        self._grads = [view(1 + len(lists) + r) for r in range(self.size)]
        model._gradients = model.gradient_views(self._grads[self.rank])
        self._span, self._shared = (lo, hi), model
        model.plans_dropped()
        try:
            yield
        finally:
            # Every store to the window before here is this rank's own or came before the last
            # step's fence (a restore writes every element, the same values on every rank).
            for _, weights, biases in moved:
                weights[:] = [a.copy() for a in weights]
                biases[:] = [a.copy() for a in biases]
            model._gradients, self._shared = None, None
            model.plans_dropped()

    def update(self, model: Any, optimizer: Any, lr: float, batch: int) -> None:
        """A step's sum and update (see the class), after every rank's backward wrote its
        gradient into the window."""
        if self._shared is not model:
            raise DistributedError("shm: update outside share(model)")
        self.fence()  # every gradient written; no rank reads the parameters any more this step
        model.apply_gradients(optimizer, lr, batch, span=self._span, sources=self._grads)
        self.fence()  # every share updated before any rank's next forward

    def close(self) -> None:
        """The window and the machine's communicator freed (collective)."""
        if self._win is not None:
            self._win.Unlock_all()
            self._win.Free()
            self._win = None
        if self.node is not None:
            self.node.Free()
            self.node = None

    def __enter__(self) -> "SharedMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedMemory(rank {self.rank} of {self.size})"


def from_environment(kind: str = "auto", device_kind: str = "cpu") -> Any:
    """The communicator for this process: ``kind`` "none" -> :class:`Local`; "mpi", "shm", "nccl";
    "auto": :class:`Local` unless mpiexec started more than one rank, then NCCL on CUDA, and on
    the CPU :class:`SharedMemory` when every rank is on this machine, else MPI."""
    if kind not in ("auto", "none", "mpi", "shm", "nccl"):
        raise ValueError(f"distributed: expected auto, none, mpi, shm or nccl, got {kind!r}")
    if kind == "none" or (kind == "auto" and launched_size() <= 1):
        return Local()
    if kind == "auto":
        if device_kind == "cuda":
            return NCCL()
        mpi = MPI()
        try:
            return SharedMemory(mpi.comm)
        except DistributedError:  # the ranks span machines (every rank finds so: one split)
            return mpi
    return {"nccl": NCCL, "shm": SharedMemory, "mpi": MPI}[kind]()


def check_communicator(comm: Any) -> Any:
    for name in ("rank", "size", "iallreduce", "allreduce", "broadcast", "agree", "allgather"):
        if not hasattr(comm, name):
            raise TypeError(f"distributed: expected a communicator (gpu_backprop.distributed.MPI, NCCL or Local), "
                            f"got {type(comm).__name__}")
    return comm


def sum_metrics(comm: Any, values: Sequence[float]) -> list[float]:
    """Scalars summed over the ranks (float64, one small all-reduce)."""
    array = np.asarray(values, dtype=np.float64)
    comm.allreduce(array)
    return array.tolist()


def shard_dataset(ds: Any, comm: Any) -> Any:
    """Every rank's Dataset (``gpu_backprop.data``, each read from its own file and standardised
    with its own statistics) made one: the features standardised with the statistics of every
    rank's training rows together, the labels indexed into the union of every rank's classes
    (sorted), so every rank trains the same model on the same encoding. Collective."""
    from dataclasses import replace

    tasks = comm.allgather((ds.task, ds.n_outputs if ds.task == "regression" else None, ds.X_train.shape[1]))
    if len(set(tasks)) > 1:
        raise ValueError(f"data: the ranks' files disagree (task, regression outputs, features by rank: {tasks})")
    classes, y_train, y_test, n_outputs = ds.classes, ds.y_train, ds.y_test, ds.n_outputs
    if ds.task == "classification":
        every = comm.allgather(list(ds.classes))
        kinds = {type(c) for rank in every for c in rank}
        if len(kinds) > 1:
            raise ValueError("data: the ranks' labels mix strings and numbers")
        classes = sorted(set().union(*every))
        index = np.array([classes.index(c) for c in ds.classes], dtype=np.int64)
        y_train, y_test, n_outputs = index[ds.y_train], index[ds.y_test], len(classes)
    raw_train = ds.X_train * ds.scale + ds.mean  # back to the file's values
    raw_test = ds.X_test * ds.scale + ds.mean
    sums = np.concatenate([[len(raw_train)], raw_train.sum(axis=0), (raw_train ** 2).sum(axis=0)])
    comm.allreduce(sums)
    n, d = sums[0], raw_train.shape[1]
    mean = sums[1:1 + d] / n
    var = sums[1 + d:] / n - mean ** 2
    scale = np.sqrt(np.maximum(var, 0.0))
    scale[var <= 1e-12 * np.maximum(mean ** 2, 1.0)] = 1.0  # constant everywhere (up to the sums' rounding)
    return replace(ds, X_train=(raw_train - mean) / scale, X_test=(raw_test - mean) / scale, y_train=y_train,
                   y_test=y_test, n_outputs=n_outputs, classes=classes, mean=mean, scale=scale)
