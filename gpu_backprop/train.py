"""The fit loop: data on the device once, shuffled mini-batches, history, progress."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from . import checkpoint as checkpoint_mod
from . import data as data_mod
from .device import to_host
from .files import check_writable
from .ops import Gather, Record
from .optim import MIN_ADAPTIVE_LR, Optimizer, Schedule, Stopping


@dataclass
class History:
    """Per-epoch metrics; ``accuracy`` entries are None for regression."""

    loss: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    lr: list = field(default_factory=list)         # the learning rate of each epoch
    best_epoch: int | None = None                  # early stopping: the epoch (1-based) whose weights are kept
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        return len(self.loss)

    def as_dict(self) -> dict[str, list]:
        return asdict(self)


log = logging.getLogger("gpu_backprop")
Capture = Callable[[Callable[[], Any]], "Callable[[], None] | None"]


class StepRunner:
    """Runs the steps of one fit, each batch size on its own course: the first step runs
    plainly (it allocates every buffer, compiles and tunes every kernel, cuBLAS among the
    GEMM paths); the second runs in the ops' capturable mode (our kernels only: CuPy refuses
    cuBLAS inside a capture), is captured into a CUDA graph, and every later step of that
    size replays it. With ``time`` (the device's step timer), the third step is a timed
    replay and the fourth a timed plain step, and the faster of the two runs every step
    after: a replay saves the launches' host cost, the plain step keeps cuBLAS where the
    tuner found it faster, which wins on large layers.

    ``make(batch)`` builds the step for a batch size: a closure over fixed buffers only (a
    graph bakes in addresses), called with no arguments. The short last batch of an epoch
    gets a graph of its own. ``capture(fn)`` returns a replay function, or None where there
    are no graphs (the CPU, ``graphs=False``); a capture that fails falls back to plain
    steps for that size, with one log line.
    """

    def __init__(self, make: Callable[[int], Callable[[], None]], capture: Capture | None,
                 capturable: Callable[[], Any] = contextlib.nullcontext,
                 time: Callable[[Callable[[], Any]], float] | None = None):
        self.make, self.capture, self.capturable, self.time = make, capture, capturable, time
        self.steps: dict[int, Callable[[], None]] = {}
        self.replays: dict[int, Callable[[], None] | None] = {}
        self.calls: dict[int, int] = {}
        self.timings: dict[int, dict[str, float]] = {}  # batch: seconds of one replay and one plain step
        self.captured = self.replayed = 0

    def invalidate(self) -> None:
        """The steps' scalars changed (a new learning rate): every captured graph is captured
        again at its next call (its third and fourth calls timed again); plain steps rebuild
        their launches by themselves."""
        for batch, replay in self.replays.items():
            if replay is not None:
                self.replays[batch] = None
                self.calls[batch] = 1

    def __call__(self, batch: int) -> None:
        calls = self.calls[batch] = self.calls.get(batch, 0) + 1
        replay = self.replays.get(batch)
        if replay is not None:
            if self.time is not None and calls == 4:
                self._choose(batch)
                return
            if self.time is not None and calls == 3:
                self.timings[batch] = {"replay": self.time(replay)}
            else:
                replay()
            self.replayed += 1
            return
        if batch not in self.steps:
            self.steps[batch] = self.make(batch)
        step = self.steps[batch]
        if calls != 2 or self.capture is None:
            step()
            return
        with self.capturable():
            step()  # compiles and tunes what the capturable mode runs: nothing may do so inside a capture
            try:
                self.replays[batch] = self.capture(step)
                self.captured += self.replays[batch] is not None
            except Exception as exc:  # e.g. an operation that cannot be captured: run plainly
                log.info("CUDA graph capture failed at batch size %d (%s: %s); plain steps",
                         batch, type(exc).__name__, exc)
                self.replays[batch] = None

    def _choose(self, batch: int) -> None:
        """Run the fourth step plainly, timed, and keep the faster of replay and plain step."""
        timing = self.timings[batch]
        timing["plain"] = self.time(self.steps[batch])
        if timing["plain"] < timing["replay"]:
            self.replays[batch] = None
        log.info("batch size %d: %s steps (replay %.0f us, plain %.0f us)", batch,
                 "plain" if self.replays[batch] is None else "graph", timing["replay"] * 1e6, timing["plain"] * 1e6)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches over n samples; the last one is shorter when B does not divide n."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _check_hyper(epochs: int, batch_size: int, lr: float, momentum: float) -> None:
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")


class Trainer:
    """Epochs of mini-batch SGD with everything on the device.

    The data moves to the device once. Each epoch the device draws the order of
    the rows from a seeded 64-bit key (``ops.shuffle_epoch``: the same order on
    every device) and resets the step counter; each step then gathers its batch
    by that counter, trains, and records its loss and hits in device arrays
    (``ops.gather_batch`` and ``ops.finish_batch``; on CUDA inside the first forward
    and the first backward launch), so on CUDA a whole step is one
    graph replay, and the host sends one integer and reads two small arrays per epoch.

    With a communicator ``comm`` (gpu_backprop.distributed), a data-parallel step: each global
    batch's share of this rank (``distributed.shares``) is gathered through a per-rank order
    (``local_order``, taken from the global order once per epoch), the step writes gradients,
    which are summed across ranks layer by layer, then every rank applies the same update with
    the global batch size. No graphs there (an MPI call cannot be captured).
    """

    def __init__(self, model: Any, X: Any, y: Any, batch_size: int = 32, lr: float = 0.1, momentum: float = 0.0,
                 shuffle: bool = True, seed: int | None = None, graphs: bool | None = None,
                 capture: Capture | None = None, optimizer: Optimizer | None = None, comm: Any = None,
                 sharded: bool = False):
        _check_hyper(1, batch_size, lr, momentum)
        self.optimizer = optimizer if optimizer is not None else Optimizer("sgd", lr, momentum)
        self.lr = self.optimizer.lr
        X = data_mod.check_features(X, model.sizes[0], name="X")
        model.task = data_mod.infer_task(y) if np.ndim(to_host(y)) == 1 else "regression"
        Y, self.labels = data_mod.targets(y, model.sizes[-1], model.task, model.dtype, n_rows=X.shape[0])
        self.model, self.n, self.batch_size, self.shuffle = model, X.shape[0], batch_size, shuffle
        self.rng = np.random.default_rng(model.seed if seed is None else seed)
        device, xp = model.device, model.xp
        self.X, self.Y = device.asarray(X, model.dtype), device.asarray(Y, model.dtype)
        self.slices = batch_slices(self.n, batch_size)
        self.order = xp.empty(self.n, dtype=np.int64)
        self.counter = xp.zeros(1, dtype=np.int64)
        self.losses = xp.zeros(len(self.slices), dtype=model.dtype)
        self.correct = xp.zeros(len(self.slices), dtype=np.int64)
        self.comm, self.sharded = comm, bool(sharded) and comm is not None
        self.shared = False
        self.rows_per_epoch = self.n
        if comm is not None:
            self._distribute(model, batch_size)
            return

        def make(batch: int) -> Callable[[], None]:
            xb = xp.empty((batch, self.X.shape[1]), dtype=model.ops.storage_dtype(model.dtype))
            yb = xp.empty((batch, self.Y.shape[1]), dtype=model.dtype)
            buffers = model._batch_buffers(batch)
            count = self.labels is not None

            record = Record(self.losses, self.correct, self.counter, count)
            gather = Gather(self.X, self.Y, self.order, self.counter, batch_size, yb)

            def step() -> None:
                model.train_step(xb, yb, self.lr, loss_out=buffers.loss, record=record, gather=gather,
                                 optimizer=self.optimizer)
            return step

        timer = None
        if capture is None:  # the device's capture: its replay timed against the plain step on the card
            capture = _graph_capture(model, graphs)
            timer = capture and model.device.time_step
        self.steps = StepRunner(make, capture, model.ops.capturable, timer)

    def _distribute(self, model: Any, batch_size: int) -> None:
        """The data-parallel steps (see the class). Each step s has this rank's rows (a slice of
        its local order, from s * stride) and the global batch's size; the local order is the
        global order's rows of this rank's shares, or with ``sharded`` (X is this rank's shard)
        its own shard shuffled, ``batch_size`` / N rows a step, as many steps as the smallest
        shard gives (the rest of a larger shard waits for a later epoch's order)."""
        from .distributed import shares

        xp, comm = model.xp, self.comm
        # the parameters in shared memory while fit's epochs run (fit enters comm.share)
        self.shared = hasattr(comm, "share") and comm.shares(model)
        # every rank draws the epochs' orders from rank 0's generator, whatever seed it was given
        self.rng.bit_generator.state = comm.allgather(self.rng.bit_generator.state)[0]
        if not self.sharded:
            rows = comm.allgather(self.n)
            if len(set(rows)) > 1:
                raise ValueError(f"X: every rank must pass the same rows (got {rows} rows by rank); for a "
                                 "shard per rank, use sharded=True")
        if self.sharded:
            lo, hi = shares(batch_size, comm.size)[comm.rank]
            if hi == lo:
                raise ValueError(f"batch_size: expected at least one row per rank ({comm.size}), got {batch_size}")
            local = [rows.stop - rows.start for rows in batch_slices(self.n, hi - lo)]
            counts = comm.allgather(local)
            steps = min(len(c) for c in counts)
            self.steps_plan = [(local[s], sum(c[s] for c in counts)) for s in range(steps)]
            stride, self.local_order = hi - lo, self.order
        else:
            parts = [shares(rows.stop - rows.start, comm.size)[comm.rank] for rows in self.slices]
            self.steps_plan = [(hi - lo, rows.stop - rows.start) for rows, (lo, hi) in zip(self.slices, parts)]
            stride = max(size for size, _ in self.steps_plan)
            positions = np.concatenate([np.arange(rows.start + lo, rows.start + hi)
                                        for rows, (lo, hi) in zip(self.slices, parts)] or [np.zeros(0, np.int64)])
            # where each local row sits in the local order: step s's rows from s * stride on
            where = np.concatenate([s * stride + np.arange(size) for s, (size, _) in enumerate(self.steps_plan)]
                                   or [np.zeros(0, np.int64)])
            assert where.size == 0 or where.max() < self.n
            self.positions = xp.asarray(positions.astype(np.int64))
            self.where = xp.asarray(where.astype(np.int64))
            self.local_order = xp.zeros(self.n, dtype=np.int64)
        self.rows_per_epoch = sum(batch for _, batch in self.steps_plan)
        if len(self.steps_plan) > len(self.slices):
            self.losses = xp.zeros(len(self.steps_plan), dtype=model.dtype)
            self.correct = xp.zeros(len(self.steps_plan), dtype=np.int64)
        count = self.labels is not None
        record = Record(self.losses, self.correct, self.counter, count)

        def make(key: tuple[int, int]) -> Callable[[], None]:  # (this rank's rows, the global batch's)
            local, batch = key
            xb = xp.empty((local, self.X.shape[1]), dtype=model.ops.storage_dtype(model.dtype))
            yb = xp.empty((local, self.Y.shape[1]), dtype=model.dtype)
            buffers = model._batch_buffers(local)
            gather = Gather(self.X, self.Y, self.local_order, self.counter, stride, yb)

            def step() -> None:
                if self.shared:  # gradients into shared memory; each rank sums and updates its share
                    model.gradient_step(xb, yb, _unreduced, loss_out=buffers.loss, record=record, gather=gather)
                    comm.update(model, self.optimizer, self.lr, batch)
                    return
                requests = model.gradient_step(xb, yb, comm.iallreduce, loss_out=buffers.loss, record=record,
                                               gather=gather)
                for request in requests:
                    request.wait()
                model.apply_gradients(self.optimizer, self.lr, batch)
            return step

        self.steps = StepRunner(make, None)

    def _empty_step(self, s: int, batch: int) -> None:
        """A step in which this rank has no rows (a last batch of fewer rows than ranks): no
        gradient of its own, but its part in the sums and the same update as the others."""
        model = self.model
        grads = model.gradients()
        grads.flat[...] = 0
        self.losses[s] = 0
        self.correct[s] = 0
        self.counter[...] += 1
        if self.shared:
            self.comm.update(model, self.optimizer, self.lr, batch)
            return
        for layer in reversed(grads.layer):
            self.comm.iallreduce(layer).wait()
        model.apply_gradients(self.optimizer, self.lr, batch)

    def set_lr(self, lr: float) -> None:
        """This epoch's learning rate (a schedule's); graphs captured at another are captured again."""
        if lr != self.lr:
            self.lr = lr
            self.steps.invalidate()

    def epoch(self) -> tuple[float, float | None]:
        """One pass over the data; (mean loss, accuracy or None)."""
        key = int(self.rng.integers(0, 2**63))
        self.model.ops.shuffle_epoch(self.order, self.counter, key, self.shuffle)
        if self.comm is None:
            for rows in self.slices:
                self.steps(rows.stop - rows.start)
        else:
            if not self.sharded:
                self.local_order[self.where] = self.model.xp.take(self.order, self.positions)
            for s, (local, batch) in enumerate(self.steps_plan):
                if local == 0:
                    self._empty_step(s, batch)
                else:
                    self.steps((local, batch))
        # One device-to-host transfer each per epoch: the steps never wait for the host.
        loss = float(to_host(self.losses).astype(np.float64).sum())
        correct = None if self.labels is None else int(to_host(self.correct).sum())
        if self.comm is not None:  # the ranks' sums, summed
            from .distributed import sum_metrics

            loss, correct = sum_metrics(self.comm, [loss, correct or 0])
        accuracy = None if self.labels is None else int(correct) / self.rows_per_epoch
        return loss / self.rows_per_epoch, accuracy


def fit(model: Any, X: Any, y: Any, epochs: int = 10, batch_size: int = 32, lr: float = 0.1,
        momentum: float = 0.0, shuffle: bool = True, validation_data: tuple | None = None,
        progress: bool = False, seed: int | None = None, graphs: bool | None = None,
        capture: Capture | None = None, optimizer: Optimizer | None = None, schedule: Schedule | None = None,
        stopping: Stopping | None = None, checkpoint: Any = None, resume_from: Any = None,
        distributed: Any = None, sharded: bool = False) -> History:
    """Mini-batch training of ``model`` (see :meth:`gpu_backprop.MLP.fit` and :class:`Trainer`).

    On CUDA the steps replay captured graphs (``graphs``, default on);
    ``capture`` replaces the device's graph capture (tests use it on the CPU).
    ``optimizer`` (default SGD at ``lr`` with ``momentum``), ``schedule``, ``stopping``: see
    :mod:`gpu_backprop.optim`; ``checkpoint``, ``resume_from``: see :mod:`gpu_backprop.checkpoint`.
    """
    _check_hyper(epochs, batch_size, lr, momentum)
    optimizer = (optimizer if optimizer is not None else Optimizer("sgd", lr, momentum)).check()
    schedule = (schedule if schedule is not None else Schedule()).check()
    if stopping is not None:
        stopping.check(validation_data is not None)
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ValueError("validation_data: expected a pair (X_val, y_val)")
        data_mod.check_features(validation_data[0], model.sizes[0], name="validation_data[0]")
    comm = None
    if distributed is not None:
        from .distributed import check_communicator

        comm = check_communicator(distributed)
    lead = comm is None or comm.rank == 0  # the rank that speaks and writes
    if checkpoint is not None and lead:
        check_writable(checkpoint, "checkpoint")  # before any epoch: no run trained for a file it cannot write
    trainer = Trainer(model, X, y, batch_size, optimizer.lr, optimizer.momentum, shuffle, seed, graphs, capture,
                      optimizer, comm, sharded)
    if validation_data is not None:  # checked now, not after the first epoch, under its own name
        data_mod.targets(validation_data[1], model.sizes[-1], model.task, model.dtype,
                         n_rows=len(validation_data[0]), name="validation_data[1]")
    history = History()
    # What a resumed run must have in common with the run it continues, to end where it would have.
    # (Not the seed: the checkpoint's RNG state draws the orders from there on.)
    settings = {"batch_size": int(batch_size), "shuffle": bool(shuffle), "n_rows": trainer.rows_per_epoch,
                "optimizer": asdict(optimizer),
                "schedule": asdict(schedule), "stopping": None if stopping is None else asdict(stopping),
                "epochs": int(epochs) if schedule.name == "cosine" else None,  # cosine's rates depend on the total
                "ranks": 1 if comm is None else comm.size, "sharded": trainer.sharded}
    model.optimizer_state(optimizer.states)  # fresh, or continued from an earlier fit
    lr_now, samples_seen, best_score, plateau, best, done, stopped = optimizer.lr, 0, -math.inf, 0, None, 0, False
    if resume_from is not None:
        state, best = _on_every_rank(comm, lambda: checkpoint_mod.read(resume_from, model, settings))
        trainer.rng.bit_generator.state = state["rng"]
        lr_now, samples_seen, plateau, done, stopped = (state["lr"], state["samples_seen"], state["plateau"],
                                                        state["epochs"], state["stopped"])
        best_score = -math.inf if state["best_score"] is None else state["best_score"]
        history = History(**state["history"])
    if comm is not None:  # every rank starts from rank 0's parameters and optimizer state
        models = comm.allgather((model.sizes, model.dtype.name, optimizer.states, model.precision, trainer.shared))
        if len(set(map(str, models))) > 1:
            raise ValueError(f"distributed: the ranks' models differ (sizes, dtype, optimizer states, precision, "
                             f"shared memory by rank: {models}); every rank must build the same network")
        for array in (*model.weights, *model.biases, *model._state.arrays().values()):
            comm.broadcast(array)
    model.params_written()  # whatever wrote them before (a broadcast, the caller): bf16 copies made again
    if stopping is not None and stopping.restore_best and best is None:
        best = [p.copy() for p in (*model.weights, *model.biases)]
    # The last parameters known finite, restored if an epoch diverges (in place: captured
    # graphs keep the arrays' addresses).
    kept = [p.copy() for p in (*model.weights, *model.biases)]

    from tqdm.auto import tqdm

    bar = tqdm(range(done, epochs), disable=not (progress and lead), unit="epoch", leave=True, dynamic_ncols=True,
               initial=done, total=epochs)
    # the training stream waits for the copies above and is waited for by what follows fit
    with model.device.stream(), (comm.share(model) if trainer.shared else contextlib.nullcontext()):
        for epoch in bar:
            if stopped:
                break
            lr_now = schedule.lr(optimizer.lr, lr_now, epoch, epochs, samples_seen)
            trainer.set_lr(lr_now)
            start = time.perf_counter()
            loss, accuracy = trainer.epoch()
            samples_seen += trainer.rows_per_epoch  # every rank's rows: the same on every rank
            history.seconds.append(time.perf_counter() - start)
            params, xp = (*model.weights, *model.biases), model.xp
            finite = math.isfinite(loss) and bool(xp.stack([xp.isfinite(p).all() for p in params]).all())
            if comm is not None:  # every rank has read the parameters (shared: one copy) before any restores
                finite = all(comm.allgather(finite))
            if not finite:
                for p, good in zip(params, kept):
                    p[...] = good
                model._state = None
                model.params_written()
                kept_from = f"the weights after epoch {epoch} are kept" if epoch else "the initial weights are kept"
                error = FloatingPointError(f"training diverged in epoch {epoch + 1}: loss is {loss}; "
                                           f"try a smaller lr (now {lr_now}); {kept_from}")
                error.epochs_kept = epoch  # the epochs whose weights the model now holds
                raise error
            for p, good in zip(params, kept):
                good[...] = p
            history.loss.append(loss)
            history.accuracy.append(accuracy)
            history.lr.append(lr_now)
            metrics = {"loss": loss}
            postfix = {"loss": f"{loss:.4f}"}
            if accuracy is not None:
                postfix["acc"] = f"{accuracy:.3f}"
            if validation_data is not None:
                val = _evaluate(model, validation_data, comm, trainer.sharded)
                metrics.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
                history.val_loss.append(val["loss"])
                history.val_accuracy.append(val["accuracy"])
                if val["accuracy"] is not None:
                    postfix["val_acc"] = f"{val['accuracy']:.3f}"
            if stopping is not None:  # scikit-learn's rule: no improvement by tol for more than patience epochs
                score = stopping.score(metrics)
                plateau = plateau + 1 if score < best_score + stopping.tol else 0
                if score > best_score:
                    best_score, history.best_epoch = score, epoch + 1
                    if best is not None:
                        for p, b in zip(params, best):
                            b[...] = p
                if plateau > stopping.patience:
                    if schedule.name == "adaptive" and lr_now > MIN_ADAPTIVE_LR:
                        lr_now, plateau = lr_now / 5, 0
                    else:
                        stopped = history.stopped_early = True
            if checkpoint is not None:
                fit_state = {"epochs": epoch + 1, "rng": trainer.rng.bit_generator.state, "lr": lr_now,
                             "samples_seen": samples_seen, "plateau": plateau, "stopped": stopped,
                             "best_score": None if best_score == -math.inf else best_score,
                             "history": history.as_dict(), "settings": settings}
                _on_every_rank(comm, lambda: lead and checkpoint_mod.write(checkpoint, model, fit_state, best))
            bar.set_postfix(postfix)
    if best is not None and history.best_epoch is not None and history.best_epoch != history.epochs:
        for p, b in zip((*model.weights, *model.biases), best):
            p[...] = b
        model.params_written()
    model.last_steps = trainer.steps  # graph bookkeeping of this fit, for inspection
    return history


def _unreduced(buffer: Any) -> Any:
    """A data-parallel step's per-layer reduce when the sums happen after the backward
    (:class:`~gpu_backprop.distributed.SharedMemory`): nothing to do now."""
    from .distributed import Request

    return Request()


def _on_every_rank(comm: Any, work: Callable[[], Any]) -> Any:
    """``work()``, and with ``comm`` the ranks agree on whether it failed anywhere: a rank whose
    work failed (a checkpoint it cannot read or write) stops every rank with its error, rather
    than leaving the others waiting in the next sum."""
    if comm is None:
        return work()
    error, result = None, None
    try:
        result = work()
    except (OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    error = comm.agree(error)
    if error is not None:
        raise ValueError(error)
    return result


def _evaluate(model: Any, validation_data: tuple, comm: Any, sharded: bool = False) -> dict:
    """model.evaluate on the validation data; with ``comm``, each rank evaluates its share of
    the rows (``sharded``: all of its own rows) and the sums are added across ranks (the same
    result on every rank)."""
    if comm is None:
        return model.evaluate(*validation_data)
    from .distributed import shares, sum_metrics

    X_val, y_val = validation_data
    n = len(X_val)
    lo, hi = (0, n) if sharded else shares(n, comm.size)[comm.rank]
    loss_sum = correct = 0.0
    if hi > lo:
        mine = model.evaluate(X_val[lo:hi], np.asarray(to_host(y_val))[lo:hi])
        loss_sum = mine["loss"] * (hi - lo)
        correct = 0.0 if mine["accuracy"] is None else round(mine["accuracy"] * (hi - lo))
    loss_sum, correct, n = sum_metrics(comm, [loss_sum, correct, hi - lo])
    return {"loss": loss_sum / n, "accuracy": None if model.task == "regression" else correct / n}


def _graph_capture(model: Any, graphs: bool | None) -> Capture | None:
    """The device's capture when graphs are wanted and the device can capture the model's
    step (:meth:`~gpu_backprop.device.Device.step_capture` decides)."""
    if graphs is False:
        return None
    capture, why_not = model.device.step_capture(model.ops, model.output)
    if why_not and graphs:  # asked for explicitly: say why not
        log.info("CUDA graphs: not for %s; plain steps", why_not)
    return capture
