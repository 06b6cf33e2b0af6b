"""The fit loop: data on the device once, shuffled mini-batches, history, progress."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from . import data as data_mod
from .device import to_host
from .ops import Gather, Record


@dataclass
class History:
    """Per-epoch metrics; ``accuracy`` entries are None for regression."""

    loss: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

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
    """

    def __init__(self, model: Any, X: Any, y: Any, batch_size: int = 32, lr: float = 0.1, momentum: float = 0.0,
                 shuffle: bool = True, seed: int | None = None, graphs: bool | None = None,
                 capture: Capture | None = None):
        _check_hyper(1, batch_size, lr, momentum)
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

        def make(batch: int) -> Callable[[], None]:
            xb = xp.empty((batch, self.X.shape[1]), dtype=model.dtype)
            yb = xp.empty((batch, self.Y.shape[1]), dtype=model.dtype)
            buffers = model._batch_buffers(batch)
            count = self.labels is not None

            record = Record(self.losses, self.correct, self.counter, count)
            gather = Gather(self.X, self.Y, self.order, self.counter, batch_size, yb)

            def step() -> None:
                model.train_step(xb, yb, lr, momentum, loss_out=buffers.loss, record=record, gather=gather)
            return step

        timer = None
        if capture is None:  # the device's capture: its replay timed against the plain step on the card
            capture = _graph_capture(model, graphs)
            timer = capture and model.device.time_step
        self.steps = StepRunner(make, capture, model.ops.capturable, timer)

    def epoch(self) -> tuple[float, float | None]:
        """One pass over the data; (mean loss, accuracy or None)."""
        key = int(self.rng.integers(0, 2**63))
        self.model.ops.shuffle_epoch(self.order, self.counter, key, self.shuffle)
        for rows in self.slices:
            self.steps(rows.stop - rows.start)
        # One device-to-host transfer each per epoch: the steps never wait for the host.
        loss = float(to_host(self.losses).astype(np.float64).sum()) / self.n
        accuracy = None if self.labels is None else int(to_host(self.correct).sum()) / self.n
        return loss, accuracy


def fit(model: Any, X: Any, y: Any, epochs: int = 10, batch_size: int = 32, lr: float = 0.1,
        momentum: float = 0.0, shuffle: bool = True, validation_data: tuple | None = None,
        progress: bool = False, seed: int | None = None, graphs: bool | None = None,
        capture: Capture | None = None) -> History:
    """Mini-batch SGD on ``model`` (see :meth:`gpu_backprop.MLP.fit` and :class:`Trainer`).

    On CUDA the steps replay captured graphs (``graphs``, default on);
    ``capture`` replaces the device's graph capture (tests use it on the CPU).
    """
    _check_hyper(epochs, batch_size, lr, momentum)
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ValueError("validation_data: expected a pair (X_val, y_val)")
        data_mod.check_features(validation_data[0], model.sizes[0], name="validation_data[0]")
    trainer = Trainer(model, X, y, batch_size, lr, momentum, shuffle, seed, graphs, capture)
    if validation_data is not None:  # checked now, not after the first epoch, under its own name
        data_mod.targets(validation_data[1], model.sizes[-1], model.task, model.dtype,
                         n_rows=len(validation_data[0]), name="validation_data[1]")
    history = History()
    # The last parameters known finite, restored if an epoch diverges (in place: captured
    # graphs keep the arrays' addresses).
    kept = [p.copy() for p in (*model.weights, *model.biases)]

    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), disable=not progress, unit="epoch", leave=True, dynamic_ncols=True)
    # the training stream waits for the copies above and is waited for by what follows fit
    with model.device.stream():
        for epoch in bar:
            start = time.perf_counter()
            loss, accuracy = trainer.epoch()
            history.seconds.append(time.perf_counter() - start)
            params, xp = (*model.weights, *model.biases), model.xp
            if not (math.isfinite(loss) and bool(xp.stack([xp.isfinite(p).all() for p in params]).all())):
                for p, good in zip(params, kept):
                    p[...] = good
                model._velocity = None
                kept_from = f"the weights after epoch {epoch} are kept" if epoch else "the initial weights are kept"
                error = FloatingPointError(f"training diverged in epoch {epoch + 1}: loss is {loss}; "
                                           f"try a smaller lr (now {lr}); {kept_from}")
                error.epochs_kept = epoch  # the epochs whose weights the model now holds
                raise error
            for p, good in zip(params, kept):
                good[...] = p
            history.loss.append(loss)
            history.accuracy.append(accuracy)
            postfix = {"loss": f"{loss:.4f}"}
            if accuracy is not None:
                postfix["acc"] = f"{accuracy:.3f}"
            if validation_data is not None:
                metrics = model.evaluate(*validation_data)
                history.val_loss.append(metrics["loss"])
                history.val_accuracy.append(metrics["accuracy"])
                if metrics["accuracy"] is not None:
                    postfix["val_acc"] = f"{metrics['accuracy']:.3f}"
            bar.set_postfix(postfix)
    model.last_steps = trainer.steps  # graph bookkeeping of this fit, for inspection
    return history


def _graph_capture(model: Any, graphs: bool | None) -> Capture | None:
    """The device's capture when graphs are wanted and the device can capture the model's
    step (:meth:`~gpu_backprop.device.Device.step_capture` decides)."""
    if graphs is False:
        return None
    capture, why_not = model.device.step_capture(model.ops, model.output)
    if why_not and graphs:  # asked for explicitly: say why not
        log.info("CUDA graphs: not for %s; plain steps", why_not)
    return capture
