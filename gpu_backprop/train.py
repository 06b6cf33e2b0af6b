"""The fit loop: data on the device once, shuffled mini-batches, history, progress."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from . import data as data_mod
from .device import to_host


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


class StepRunner:
    """Training steps for one fit: the first step at each batch size runs plainly
    (it allocates every buffer and compiles every kernel); a copy of that step is
    then captured into a CUDA graph and every later step of that size replays it.

    The graph bakes in addresses, so the caller must pass the same input buffers
    for a batch size every time (checked); the last, shorter batch of an epoch
    gets a graph of its own. ``capture(fn)`` returns a replay function or None
    (no graphs: the CPU, or ``graphs=False``); a capture that fails falls back to
    plain steps for that size, with one log line.
    """

    def __init__(self, model: Any, lr: float, momentum: float,
                 capture: Callable[[Callable[[], Any]], Callable[[], None] | None] | None):
        self.model, self.lr, self.momentum, self.capture = model, lr, momentum, capture
        self.replays: dict[int, Callable[[], None] | None] = {}
        self.inputs: dict[int, tuple] = {}
        self.captured = self.replayed = 0

    def __call__(self, xb: Any, yb: Any) -> Any:
        """One step on (xb, yb); returns the (1,) buffer holding the batch's summed loss."""
        batch = xb.shape[0]
        loss = self.model._batch_buffers(batch).loss
        if batch in self.replays:
            if self.inputs[batch][0] is not xb or self.inputs[batch][1] is not yb:
                raise ValueError(f"StepRunner: batch size {batch} came in new buffers; "
                                 "a captured step reads the buffers it was captured with")
            replay = self.replays[batch]
            if replay is not None:
                replay()
                self.replayed += 1
                return loss
        self.model.train_step(xb, yb, self.lr, self.momentum, loss_out=loss)
        if batch not in self.replays and self.capture is not None:
            self.inputs[batch] = (xb, yb)
            try:
                self.replays[batch] = self.capture(
                    lambda: self.model.train_step(xb, yb, self.lr, self.momentum, loss_out=loss))
                self.captured += self.replays[batch] is not None
            except Exception as exc:  # e.g. an operation that cannot be captured: run plainly
                log.info("CUDA graph capture failed at batch size %d (%s: %s); plain steps",
                         batch, type(exc).__name__, exc)
                self.replays[batch] = None
        return loss


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches over n samples; the last one is shorter when B does not divide n."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def count_correct(xp: Any, y_hat: Any, labels: Any) -> Any:
    """Number of rows whose predicted class equals ``labels`` (a device scalar)."""
    predicted = y_hat[:, 0] > 0.5 if y_hat.shape[1] == 1 else xp.argmax(y_hat, axis=1)
    return (predicted == labels).sum()


def _check_hyper(epochs: int, batch_size: int, lr: float, momentum: float) -> None:
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")


def fit(model: Any, X: Any, y: Any, epochs: int = 10, batch_size: int = 32, lr: float = 0.1,
        momentum: float = 0.0, shuffle: bool = True, validation_data: tuple | None = None,
        progress: bool = False, seed: int | None = None, graphs: bool | None = None,
        capture: Callable | None = None) -> History:
    """Mini-batch SGD on ``model``; see :meth:`gpu_backprop.MLP.fit`.

    The data moves to the device once. Each batch is gathered with ``take``
    into fixed buffers, so steps after the first allocate nothing; losses
    stay on the device until the end of the epoch. On CUDA the steps replay a
    captured graph (``graphs``, default on; see :class:`StepRunner`);
    ``capture`` replaces the device's graph capture (tests use it on the CPU).
    """
    _check_hyper(epochs, batch_size, lr, momentum)
    X = data_mod.check_features(X, model.sizes[0], name="X")
    model.task = data_mod.infer_task(y) if np.ndim(to_host(y)) == 1 else "regression"
    Y, labels = data_mod.targets(y, model.sizes[-1], model.task, model.dtype, n_rows=X.shape[0])
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ValueError("validation_data: expected a pair (X_val, y_val)")
        data_mod.check_features(validation_data[0], model.sizes[0], name="validation_data[0]")
    device, xp = model.device, model.xp
    X_dev, Y_dev = device.asarray(X, model.dtype), device.asarray(Y, model.dtype)
    n = X.shape[0]
    slices = batch_slices(n, batch_size)
    rng = np.random.default_rng(model.seed if seed is None else seed)
    batch_x = {s.stop - s.start: xp.empty((s.stop - s.start, X.shape[1]), model.dtype) for s in slices}
    batch_y = {s.stop - s.start: xp.empty((s.stop - s.start, Y.shape[1]), model.dtype) for s in slices}
    losses = xp.empty(len(slices), dtype=model.dtype)
    labels_dev = None if labels is None else device.asarray(labels)
    correct = xp.zeros(len(slices), dtype=np.int64)
    history = History()
    runner = StepRunner(model, lr, momentum, capture or _graph_capture(model, graphs))

    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), disable=not progress, unit="epoch", leave=True, dynamic_ncols=True)
    with device.stream():  # batch copies and (captured) steps in one stream, in order
        for epoch in bar:
            start = time.perf_counter()
            order = rng.permutation(n) if shuffle else np.arange(n)
            order_dev = device.asarray(order.astype(np.int64))
            for i, rows in enumerate(slices):
                idx = order_dev[rows]
                xb, yb = batch_x[idx.shape[0]], batch_y[idx.shape[0]]
                xp.take(X_dev, idx, axis=0, out=xb)
                xp.take(Y_dev, idx, axis=0, out=yb)
                losses[i:i + 1] = runner(xb, yb)
                if labels_dev is not None:  # accuracy of this batch's forward pass, before its update
                    y_hat = model._batch_buffers(idx.shape[0]).outputs[-1]
                    correct[i] = count_correct(xp, y_hat, labels_dev[idx])
            # One device-to-host transfer per epoch: the step never waits for the host.
            loss = float(to_host(losses).astype(np.float64).sum()) / n
            accuracy = None if labels is None else int(to_host(correct).sum()) / n
            history.seconds.append(time.perf_counter() - start)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged in epoch {epoch + 1}: loss is {loss}; "
                                         f"try a smaller lr (now {lr})")
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
    model.last_steps = runner  # graph bookkeeping of this fit, for inspection
    return history


def _graph_capture(model: Any, graphs: bool | None) -> Callable | None:
    """The device's capture when graphs are wanted and the step can be captured."""
    if graphs is False or model.device.kind != "cuda":
        return None
    if not model.ops.fused or model.output == "softmax":
        # the unfused path and softmax use CuPy kernels that allocate temporaries,
        # which a graph capture does not allow
        if graphs:
            log.info("CUDA graphs: not for %s; plain steps", "softmax" if model.ops.fused else "the unfused path")
        return None
    return model.device.capture
