"""MLP: forward, backward and the SGD update, written once against ``device.ops``.

Shapes follow MATH.md: ``o[0] = X`` (B x n_0), ``W[k]`` (n_k x n_{k+1}),
``o[k+1] = f(o[k] W[k] + b[k])``; the loss is the batch mean of the
per-sample loss, so the SGD step is ``W -= lr / B * o^T delta``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import data as data_mod
from . import modelfile
from .device import ENV_VAR, Device, DeviceError, get_device, to_host
from .files import write_atomically
from .ops import Gather, Output, Propagate, Record, Rule, Update
from .ops import activations as act
from .optim import Optimizer, Schedule, Stopping

FORMAT_VERSION = modelfile.FORMAT_VERSION


def backward_schedule(n_layers: int) -> list[tuple[int | None, tuple[int, ...]]]:
    """The backward pass as launches: (layer whose error is propagated or None, layers updated).

    Layer k's propagation reads W[k] and writes delta[k]; its update writes W[k] from
    delta[k+1]. So the propagation of k can share a launch with the update of k+1
    (already propagated past), and the last launch updates layers 1 and 0:
    L launches for L layers instead of 2L - 1, e.g. for 3 layers
    [(2, ()), (1, (2,)), (None, (1, 0))].
    """
    if n_layers == 1:
        return [(None, (0,))]
    return ([(n_layers - 1, ())] + [(k, (k + 1,)) for k in range(n_layers - 2, 0, -1)]
            + [(None, (1, 0))])


@dataclass
class OptimizerState:
    """What the update rule keeps between steps, per layer: velocity or Adam's first moment
    (vel_*), Adam's second moment (sq_*); and Adam's step count ``t``, a (1,) int64 device
    array the step's kernels read (so a CUDA graph replays with the current count)."""

    vel_w: list
    vel_b: list
    sq_w: list
    sq_b: list
    t: Any

    def arrays(self) -> dict[str, Any]:
        """Every array by name (vel_w0, ..., t), for checkpoints."""
        out = {f"{name}{k}": a for name in ("vel_w", "vel_b", "sq_w", "sq_b")
               for k, a in enumerate(getattr(self, name))}
        out["t"] = self.t
        return out


@dataclass
class Gradients:
    """The summed gradients of every layer in one flat buffer (what a data-parallel step sums
    across ranks), layer j's as ``layer[j]`` = [dW_j.ravel(), db_j] with views ``w[j]``, ``b[j]``."""

    flat: Any
    layer: list
    w: list
    b: list


@dataclass
class _Buffers:
    """Everything one step at batch size B writes: allocated once, reused."""

    outputs: list  # o[1..L] (o[1..L-1] in the ops' storage dtype, y_hat = o[L] in the model's)
    deltas: list   # delta[1..L] (delta[k] has the shape of o[k]; the ops' storage dtype)
    loss: Any      # (1,) loss summed over the batch
    plan: list = field(default_factory=list)  # the backward launches' arguments (MLP._backward_plan)
    plan_key: tuple = ()                       # what they were built for (ids, and values)
    plan_held: tuple = ()                      # the objects whose ids plan_key holds: alive, so not reused


class MLP:
    """A fully connected network trained by backpropagation.

    Parameters
    ----------
    sizes: layer widths ``[n_0, ..., n_L]`` (inputs first, outputs last).
    activation: hidden activation: sigmoid, tanh, relu or identity.
    output: output activation; default sigmoid for ``loss="mse"`` (the seed's
        network), softmax for ``loss="cross_entropy"``.
    loss: "mse" (batch mean of 1/2 sum (y - y_hat)^2) or "cross_entropy".
    device: "auto" | "cpu" | "cuda" | "cuda:N" or a Device (default $GPU_BACKPROP_DEVICE, else auto).
    dtype: float32 or float64.
    seed: Glorot initialisation seed; the same seed gives the same weights bit for bit.
    fused: on CUDA, use the fused kernels (True) or the unfused CuPy path.
    precision: "fp32" (exact float32 products), "tf32": on CUDA, float32 GEMMs on the
        tensor cores with TF32 inputs (10-bit mantissa) and float32 sums, relative error
        near 3e-4 (the CPU computes in full float32), or "bf16": mixed precision
        (``gpu_backprop/ops/bf16.py``): float32 master weights, GEMMs on bf16 operands (the
        weights' bf16 copy, refreshed after every update) with float32 sums, activations and
        deltas stored rounded to bf16; needs dtype float32 (and on CUDA the fused kernels: the
        bf16 tensor cores, the activations and deltas stored as bf16 bits, uint16).
    """

    def __init__(self, sizes: Sequence[int], activation: str = "sigmoid", output: str | None = None,
                 loss: str = "mse", device: "str | Device | None" = None, dtype: Any = "float32",
                 seed: int = 0, fused: bool = True, precision: str = "fp32"):
        self._setup(sizes, activation, output, loss, device, dtype, seed, fused, precision)
        check_memory(self.sizes, self.dtype, self.device)  # before the first parameter is allocated
        self.weights, self.biases = self._glorot(self.seed)

    def _setup(self, sizes: Sequence[int], activation: str, output: str | None, loss: str,
               device: "str | Device | None", dtype: Any, seed: int, fused: bool, precision: str) -> None:
        """Everything but the parameters, validated."""
        self.sizes = _check_sizes(sizes)
        self.activation = act.check_activation(activation)
        if output is None:
            output = "softmax" if loss == "cross_entropy" else "sigmoid"
        self.output = act.check_activation(output, act.OUTPUT, what="output")
        self.loss = act.check_loss(loss, self.output)
        self.dtype = _check_dtype(dtype)
        self.seed = _check_seed(seed)
        self.device = resolve_device(device)
        self.fused = bool(fused)
        self.precision = _check_precision(precision, self.dtype, self.device, self.fused)
        self.ops = self.device.ops(fused=self.fused, precision=self.precision)
        self.xp = self.device.xp
        self.task = "classification"
        # The class each output unit stands for (any integers or strings), when known: the CLI
        # sets it from the data's labels and saves it; predict() returns indices into it.
        self.classes_: list | None = None
        self.extra: dict[str, np.ndarray] = {}
        self._state: OptimizerState | None = None
        self._buffers: dict[int, _Buffers] = {}

    # -- parameters -----------------------------------------------------------
    @property
    def activations(self) -> list[str]:
        """Activation of each layer's output, o[1] .. o[L]."""
        return [self.activation] * (len(self.sizes) - 2) + [self.output]

    def _glorot(self, seed: int) -> tuple[list, list]:
        # Drawn in float64 on the host, so every dtype and device starts from the same numbers.
        rng = np.random.default_rng(seed)
        weights, biases = [], []
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            limit = np.sqrt(6.0 / (n_in + n_out))
            weights.append(self.device.asarray(rng.uniform(-limit, limit, (n_in, n_out)), self.dtype))
            biases.append(self.device.asarray(np.zeros(n_out), self.dtype))
        return weights, biases

    def get_params(self) -> dict[str, np.ndarray]:
        """Host copies of the parameters: W0, b0, W1, b1, ..."""
        params = {}
        for k, (W, b) in enumerate(zip(self.weights, self.biases)):
            params[f"W{k}"], params[f"b{k}"] = to_host(W).copy(), to_host(b).copy()
        return params

    def set_params(self, params: dict[str, Any]) -> None:
        for k in range(len(self.weights)):
            for name, current in ((f"W{k}", self.weights[k]), (f"b{k}", self.biases[k])):
                if name not in params:
                    raise ValueError(f"params: missing {name!r}")
                value = np.asarray(to_host(params[name]))
                if value.shape != current.shape:
                    raise ValueError(f"params[{name!r}]: expected shape {current.shape}, got {value.shape}")
                if not np.all(np.isfinite(value)):
                    raise ValueError(f"params[{name!r}]: contains NaN or Inf")
                current[...] = self.device.asarray(value, self.dtype)
        self._state = None
        self.params_written()

    def params_written(self) -> None:
        """The parameters were written in place other than by an update of the ops (set_params,
        a restore after divergence, the best epoch's weights, a broadcast): precision="bf16"
        makes the weights' bf16 copies again from them."""
        written = getattr(self.ops, "params_written", None)
        if written is not None:
            written()

    # -- forward / backward ---------------------------------------------------
    def _batch_buffers(self, batch: int) -> _Buffers:
        buf = self._buffers.get(batch)
        if buf is None:
            xp = self.xp
            stored = self.ops.storage_dtype(self.dtype)  # bf16 bits (uint16) on CUDA with precision="bf16"
            outputs = [xp.empty((batch, n), dtype=stored) for n in self.sizes[1:-1]]
            outputs.append(xp.empty((batch, self.sizes[-1]), dtype=self.dtype))
            deltas = [xp.empty((batch, n), dtype=stored) for n in self.sizes[1:]]
            buf = self._buffers[batch] = _Buffers(outputs, deltas, xp.empty(1, dtype=self.dtype))
        return buf

    def forward(self, X: Any, gather: Gather | None = None) -> list:
        """All layer outputs [X, o1, ..., y_hat] for a device array X (X as the ops store activations:
        ops.as_stored; internal buffers valid until the next call with the same batch size); with
        ``gather``, X is first gathered into (on CUDA inside the first layer's launch; in bf16 just
        before it)."""
        buf = self._batch_buffers(X.shape[0])
        o = [X if gather is not None else self.ops.as_stored(X)]  # (bf16 on CUDA: X rounded once, here)
        for W, b, f, out in zip(self.weights, self.biases, self.activations, buf.outputs):
            o.append(self.ops.forward(o[-1], W, b, f, out, gather if len(o) == 1 else None))
        return o

    def train_step(self, X: Any, Y: Any, lr: float, momentum: float = 0.0, loss_out: Any = None,
                   record: Record | None = None, gather: Gather | None = None,
                   optimizer: Optimizer | None = None) -> Any:
        """One step on the batch (X, Y) (device arrays of this model's dtype): SGD at ``lr`` with
        ``momentum``, or the update ``optimizer`` says (:class:`~gpu_backprop.optim.Optimizer`,
        checked by the caller) at learning rate ``lr``.

        Returns the (1,) device array holding the loss summed over the batch,
        ``loss_out`` when given; reading it is left to the caller, so a GPU
        step never waits for the host. ``record``: the fit loop's step record
        (losses, hits, step counter), kept inside the step's kernels; ``gather``: X and
        Y are first gathered from the epoch's data (both inside the step's kernels on CUDA).
        """
        ops, batch = self.ops, X.shape[0]
        buf = self._batch_buffers(batch)
        o = self.forward(X, gather)
        loss_out = buf.loss if loss_out is None else loss_out
        if optimizer is None:
            optimizer = Optimizer("sgd", lr, momentum)
        state = self.optimizer_state(optimizer.states)
        if optimizer.name != "sgd":
            ops.count_step(state.t)  # Adam's t, read by this step's updates
        # The launches' arguments are the same every step of a fit (fixed buffers): built once per
        # batch size and kept while X, Y and the rest are the same objects (one entry per size).
        # Every object keyed by id is held with the plan, so no new object can reuse its id (a new
        # optimizer state at the freed one's address took the old velocities).
        key = (id(X), id(Y), lr, optimizer, id(loss_out), id(record), id(state))
        if buf.plan_key != key:
            rule = optimizer.rule(batch, lr, state.t)
            buf.plan, buf.plan_key = self._backward_plan(o, Y, rule, state, loss_out, record), key
            buf.plan_held = (X, Y, loss_out, record, state)
        for propagate, updates, output in buf.plan:
            ops.backward(propagate, updates, output)
        return loss_out

    def _backward_plan(self, o: list, Y: Any, rule: Any, state: OptimizerState, loss_out: Any,
                       record: Record | None, weights: list | None = None, biases: list | None = None) -> list:
        """(propagation, updates, output) of each backward launch (``backward_schedule``); the
        first computes delta[L] and the loss from the output. ``weights``, ``biases``: what the
        updates write (the gradient buffers, for rule "gradient"), else the parameters."""
        weights = self.weights if weights is None else weights
        biases = self.biases if biases is None else biases
        delta = [None] + self._batch_buffers(Y.shape[0]).deltas  # delta[k]: the error at o[k]'s pre-activation
        none = [None] * len(self.weights)
        vel_w, vel_b, sq_w, sq_b = (getattr(state, name) or none for name in ("vel_w", "vel_b", "sq_w", "sq_b"))
        output = Output(o[-1], Y, self.output, self.loss, loss_out, record)
        plan = []
        for launch, (k, updated) in enumerate(backward_schedule(len(self.weights))):
            propagate = None if k is None else Propagate(delta[k + 1], self.weights[k], o[k],
                                                         self.activations[k - 1], delta[k])
            updates = [Update(o[j], delta[j + 1], weights[j], biases[j], rule.step, rule.momentum,
                              vel_w[j], vel_b[j], rule, sq_w[j], sq_b[j])
                       for j in updated]
            plan.append((propagate, updates, output if launch == 0 else None))
        return plan

    # -- data-parallel steps (gpu_backprop.distributed) -------------------------
    def gradients(self) -> Gradients:
        """The model's gradient buffers (made once)."""
        grads = getattr(self, "_gradients", None)
        if grads is None:
            grads = self._gradients = self.gradient_views(self.xp.zeros(self.n_parameters, dtype=self.dtype))
        return grads

    @property
    def n_parameters(self) -> int:
        """Weights and biases, every layer's: the length of the flat layout of :meth:`gradients`."""
        return sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    def gradient_views(self, flat: Any) -> Gradients:
        """``flat`` (n_parameters elements) seen as every layer's [dW_j.ravel(), db_j]."""
        sizes = [a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:])]
        starts = np.cumsum([0, *sizes])
        layer = [flat[s:e] for s, e in zip(starts[:-1], starts[1:])]
        w = [part[:a * b].reshape(a, b) for part, a, b in zip(layer, self.sizes[:-1], self.sizes[1:])]
        b = [part[a * n:] for part, a, n in zip(layer, self.sizes[:-1], self.sizes[1:])]
        return Gradients(flat, layer, w, b)

    def plans_dropped(self) -> None:
        """The parameters, state or gradient buffers are other arrays now (a shared-memory fit
        began or ended): the backward launches' arguments are built again."""
        for buf in self._buffers.values():
            buf.plan, buf.plan_key, buf.plan_held = [], (), ()
        self._applied_rule = None

    def gradient_step(self, X: Any, Y: Any, reduce: Any, loss_out: Any = None, record: Record | None = None,
                      gather: Gather | None = None) -> list:
        """Forward and backward on (X, Y), the kernels writing each layer's summed gradient into
        :meth:`gradients` instead of updating; ``reduce(buffer)`` (a non-blocking all-reduce) is
        called on each layer's gradient as soon as the backward launch that writes it is issued,
        so the sums of the upper layers go on while the lower ones are computed. Returns the
        requests; wait for them, then :meth:`apply_gradients`."""
        ops = self.ops
        buf = self._batch_buffers(X.shape[0])
        o = self.forward(X, gather)
        loss_out = buf.loss if loss_out is None else loss_out
        grads = self.gradients()
        key = ("gradient", id(X), id(Y), id(loss_out), id(record))
        if buf.plan_key != key:
            none = OptimizerState([], [], [], [], None)
            plan = self._backward_plan(o, Y, Rule("gradient"), none, loss_out, record, grads.w, grads.b)
            buf.plan, buf.plan_key, buf.plan_held = plan, key, (X, Y, loss_out, record)
        requests = []
        for (propagate, updates, output), (_, updated) in zip(buf.plan, backward_schedule(len(self.weights))):
            ops.backward(propagate, updates, output)
            requests += [reduce(grads.layer[j]) for j in updated]
        return requests

    def apply_gradients(self, optimizer: Optimizer, lr: float, batch: int, span: tuple[int, int] | None = None,
                        sources: Sequence[Any] | None = None) -> None:
        """Every parameter updated by ``optimizer`` from :meth:`gradients` (summed over ``batch``
        rows, all ranks' together). With ``sources`` (flat arrays in the layout of
        :meth:`gradients`: every rank's gradient, in shared memory), from their sum instead, and
        only the elements [lo, hi) of that layout given by ``span`` (the share of the update
        this rank does: :class:`~gpu_backprop.distributed.SharedMemory`)."""
        state = self.optimizer_state(optimizer.states)
        if optimizer.name != "sgd":
            self.ops.count_step(state.t)
        key = (optimizer, lr, batch, id(state))
        cached = getattr(self, "_applied_rule", None)
        if cached is None or cached[0] != key:  # one Rule object per setting: the launches replay by its id
            cached = self._applied_rule = (key, optimizer.rule(batch, lr, state.t), state)
        rule = cached[1]
        if sources is None:
            grads = self.gradients()
            for j in range(len(self.weights)):
                for p, g, m, v, weight in self._parameters(j, state, grads.w[j], grads.b[j]):
                    self.ops.apply_rule(rule, p, g, m, v, weight)
            return
        lo, hi = (0, sources[0].size) if span is None else span
        start = 0
        for j in range(len(self.weights)):
            for p, _, m, v, weight in self._parameters(j, state):
                a, b = max(lo - start, 0), min(hi - start, p.size)
                if a < b:
                    part = [x if x is None else x.reshape(-1)[a:b] for x in (p, m, v)]
                    self.ops.apply_rule_summed(rule, part[0], [s[start + a:start + b] for s in sources], part[1],
                                               part[2], weight)
                start += p.size

    def _parameters(self, j: int, state: OptimizerState, grad_w: Any = None, grad_b: Any = None) -> list:
        """(parameter, gradient, first state, second state, is a weight) of layer j: W_j, then b_j."""
        m, v = (state.vel_w, state.vel_b), (state.sq_w, state.sq_b)
        return [(self.weights[j], grad_w, m[0][j] if m[0] else None, v[0][j] if v[0] else None, True),
                (self.biases[j], grad_b, m[1][j] if m[1] else None, v[1][j] if v[1] else None, False)]

    def optimizer_state(self, states: int = 0) -> OptimizerState:
        """The update rule's state, created (zeros) with at least ``states`` arrays per parameter
        and kept across fits (a second fit continues it) until the parameters are set."""
        xp = self.xp
        state = self._state
        if state is None:
            state = self._state = OptimizerState([], [], [], [], xp.zeros(1, dtype=np.int64))
        for first, second, needed in (("vel_w", "vel_b", 1), ("sq_w", "sq_b", 2)):
            if states >= needed and not getattr(state, first):
                setattr(state, first, [xp.zeros_like(W) for W in self.weights])
                setattr(state, second, [xp.zeros_like(b) for b in self.biases])
        return state

    # -- training and inference ----------------------------------------------
    def fit(self, X: Any, y: Any, epochs: int = 10, batch_size: int = 32, lr: float = 0.1,
            momentum: float = 0.0, shuffle: bool = True, validation_data: tuple | None = None,
            progress: bool = False, seed: int | None = None, graphs: bool | None = None, *,
            optimizer: str = "sgd", nesterov: bool = False, alpha: float = 0.0, beta1: float = 0.9,
            beta2: float = 0.999, epsilon: float = 1e-8, weight_decay: float = 0.0,
            schedule: str = "constant", power_t: float = 0.5, lr_min: float = 0.0,
            early_stopping: bool = False, patience: int = 10, tol: float = 1e-4, monitor: str | None = None,
            restore_best: bool = True,
            checkpoint: "str | os.PathLike | None" = None, resume_from: "str | os.PathLike | None" = None,
            distributed: Any = None, sharded: bool = False):
        """Train with mini-batch gradient descent; returns a :class:`~gpu_backprop.train.History`.

        ``y``: integer class labels (1-D) for classification, or a 2-D array of
        targets (regression, or targets already one-hot). ``graphs``: on CUDA,
        replay each step from a captured CUDA graph (default on; no effect on the CPU).

        ``optimizer``: "sgd" (``momentum``, ``nesterov``), "adam" or "adamw" (``beta1``, ``beta2``,
        ``epsilon``; adamw's ``weight_decay``); ``alpha``: L2 penalty (scikit-learn's). ``schedule``:
        "constant", "invscaling" (``power_t``), "cosine" (to ``lr_min``) or "adaptive" (see
        :mod:`gpu_backprop.optim`). ``early_stopping``: stop once the validation loss (the training
        loss without ``validation_data``; or ``monitor``: "val_loss", "val_accuracy", "loss") has not
        improved by ``tol`` for more than ``patience`` epochs, and keep the best epoch's weights
        (unless ``restore_best`` is False). ``checkpoint``: a file written after every epoch
        (a model file that also holds the optimizer state, the epoch and the RNG state);
        ``resume_from``: such a file, to continue its run to ``epochs`` in all, to the same weights
        as a run never stopped (bit for bit on the CPU). ``distributed``: a communicator of
        :mod:`gpu_backprop.distributed` (e.g. ``distributed.MPI()`` under ``mpiexec``): this
        process trains its share of every batch of ``batch_size`` rows (the global batch);
        ``sharded``: X, y and validation_data are this rank's own rows (a shard per rank: a
        memory-mapped ``.npy`` or a file of its own), each rank shuffling its shard every epoch.
        """
        from .train import fit

        n_rows = int(getattr(X, "shape", (0,))[0]) if getattr(X, "ndim", 0) >= 1 else 0
        dtype = getattr(X, "dtype", None)
        if getattr(X, "ndim", 0) == 2 and dtype is not None and dtype.kind == "f" and dtype.itemsize > self.dtype.itemsize:
            data_mod.check_features(X, self.sizes[0], "X", dtype=self.dtype)  # 1e300 as float32 is Inf
        opt = Optimizer(optimizer, lr, momentum, nesterov, alpha, beta1, beta2, epsilon, weight_decay).check()
        stopping = None
        if early_stopping:
            metric = monitor or ("val_loss" if validation_data is not None else "loss")
            stopping = Stopping(patience, tol, metric, bool(restore_best))
        elif schedule == "adaptive":  # its plateaus, watched but never stopping early
            stopping = Stopping(patience, tol, "loss", False)
        if stopping is not None:
            stopping.check(validation_data is not None)
        if isinstance(batch_size, (int, np.integer)) and batch_size > 0:
            check_memory(self.sizes, self.dtype, self.device, batch=min(int(batch_size), n_rows), rows=n_rows,
                         states=opt.states + 2 * bool(early_stopping), have_params=True)
        # Overflow in a diverging step is detected (non-finite loss) and reported by fit in one
        # error; NumPy's RuntimeWarnings about it would only repeat it on stderr.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            return fit(self, X, y, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                       shuffle=shuffle, validation_data=validation_data, progress=progress, seed=seed,
                       graphs=graphs, optimizer=opt, schedule=Schedule(schedule, power_t, lr_min).check(),
                       stopping=stopping, checkpoint=checkpoint, resume_from=resume_from, distributed=distributed, sharded=sharded)

    def _inputs(self, X: Any, name: str = "X") -> Any:
        X = data_mod.check_features(X, self.sizes[0], name=name, dtype=self.dtype)
        return self.device.asarray(X, self.dtype)

    def _chunks(self, X: Any, chunk: int = 4096):
        for start in range(0, X.shape[0], chunk):
            yield start, self.forward(X[start:start + chunk])[-1]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Network outputs y_hat for X, as a NumPy array."""
        X = self._inputs(X)
        out = np.empty((X.shape[0], self.sizes[-1]), dtype=self.dtype)
        for start, y_hat in self._chunks(X):
            out[start:start + y_hat.shape[0]] = to_host(y_hat)
        return out

    def predict(self, X: Any) -> np.ndarray:
        """Class labels (classification) or outputs (regression)."""
        y_hat = self.predict_proba(X)
        if self.task == "regression":
            return y_hat
        return data_mod.labels_from_outputs(y_hat)

    def evaluate(self, X: Any, y: Any) -> dict[str, float | None]:
        """Mean loss and accuracy (None for regression) over (X, y)."""
        X = self._inputs(X)
        Y, labels = data_mod.targets(y, self.sizes[-1], self.task, self.dtype, n_rows=X.shape[0])
        Y = self.device.asarray(Y, self.dtype)
        total_loss, correct = 0.0, 0
        for start, y_hat in self._chunks(X):
            rows = slice(start, start + y_hat.shape[0])
            buf = self._batch_buffers(y_hat.shape[0])
            self.ops.output_delta(y_hat, Y[rows], self.output, self.loss, buf.deltas[-1], buf.loss)
            total_loss += float(buf.loss[0])
            if labels is not None:
                correct += int(np.sum(data_mod.labels_from_outputs(to_host(y_hat)) == labels[rows]))
        n = X.shape[0]
        return {"loss": total_loss / n, "accuracy": None if labels is None else correct / n}

    # -- persistence ----------------------------------------------------------
    def config(self) -> dict[str, Any]:
        config = {"sizes": self.sizes, "activation": self.activation, "output": self.output,
                  "loss": self.loss, "dtype": self.dtype.name, "seed": self.seed, "task": self.task,
                  "precision": self.precision}
        if self.classes_ is not None:
            config["classes"] = [c.item() if isinstance(c, np.generic) else c for c in self.classes_]
        return config

    def save(self, path: "str | os.PathLike", **extra: Any) -> Path:
        """Write parameters and architecture to ``path`` (.npz) atomically: a temporary
        file in the same folder, renamed over ``path`` only once fully written.

        Refuses (``ValueError`` naming the reason) a path that is not a regular file or
        cannot be written (see :func:`gpu_backprop.files.check_writable`), and anything
        ``load`` would refuse (NaN weights, object arrays in ``extra``). A symlink is
        written through; an existing file keeps its mode. Returns the path written.
        """
        return write_model(self, path, extra)

    @classmethod
    def load(cls, path: "str | os.PathLike", device: "str | Device | None" = None) -> "MLP":
        """Read a model written by :meth:`save`; extra arrays land in ``model.extra``.

        The header and every array's shape and dtype are validated (``gpu_backprop.modelfile``)
        before anything is allocated; nothing is unpickled.
        """
        resolved = resolve_device(device)
        config, arrays = modelfile.read(path, max_bytes=available_bytes(resolved))
        model = cls.__new__(cls)
        model._setup(config["sizes"], config["activation"], config["output"], config["loss"], resolved,
                     config["dtype"], config["seed"], True, config.get("precision", "fp32"))
        check_memory(model.sizes, model.dtype, model.device, have_params=False, draw=False)
        model.task = config.get("task", "classification")
        model.classes_ = config.get("classes")
        model.weights = [model.device.asarray(arrays[f"W{k}"], model.dtype) for k in range(len(model.sizes) - 1)]
        model.biases = [model.device.asarray(arrays[f"b{k}"], model.dtype) for k in range(len(model.sizes) - 1)]
        model.extra = {k[len("extra_"):]: v for k, v in arrays.items() if k.startswith("extra_")}
        return model

    def __repr__(self) -> str:
        sizes = "-".join(map(str, self.sizes))
        precision = "" if self.precision == "fp32" else f", precision={self.precision!r}"
        return (f"MLP({sizes}, activation={self.activation!r}, output={self.output!r}, "
                f"loss={self.loss!r}, device={self.device.name!r}, dtype={self.dtype.name!r}{precision})")


def write_model(model: MLP, path: "str | os.PathLike", extra: dict[str, Any], what: str = "path",
                inputs: Iterable["str | os.PathLike"] = ()) -> Path:
    """``model.save``'s work, with the name of the path's argument (``what``) and the files it
    must not overwrite (``inputs``) for the CLI. Validated by ``gpu_backprop.modelfile`` first."""
    where = f"save {os.fspath(path)!r}"
    config = modelfile.check_config({"format": FORMAT_VERSION, **model.config()}, where)
    arrays: dict[str, np.ndarray] = {}
    for key, value in extra.items():
        try:
            array = np.asarray(to_host(value))
        except Exception as exc:  # e.g. a ragged list: not an array load could read back
            raise ValueError(f"{where}: extra {key!r}: expected an array, got {type(value).__name__} ({exc})") from None
        arrays[f"extra_{key}"] = array
    arrays.update(model.get_params())
    modelfile.check_arrays(config, {k: (v.shape, v.dtype) for k, v in arrays.items()}, where)
    modelfile.check_values(config, arrays, where)
    header = np.array(modelfile.header_text(model.config()))
    return write_atomically(path, lambda fh: np.savez(fh, config=header, **arrays), what, inputs)


# -- memory --------------------------------------------------------------------------------
def available_bytes(device: Device) -> int | None:
    """Memory free for new arrays on ``device`` (None when it cannot be told)."""
    if device.kind == "cuda":
        try:
            with device.xp.cuda.Device(device.index):
                return int(device.xp.cuda.runtime.memGetInfo()[0])
        except Exception:
            return None
    limits = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:  # a container's own limit (cgroup v2) may be far below the machine's
        with open("/sys/fs/cgroup/memory.max") as fh:
            text = fh.read().strip()
        if text != "max":
            with open("/sys/fs/cgroup/memory.current") as fh:
                limits.append(int(text) - int(fh.read().strip()))
    except (OSError, ValueError):
        pass
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return max(min(limits), 0)


def memory_needed(sizes: Sequence[int], dtype: np.dtype, batch: int = 0, rows: int = 0, states: int = 0,
                  have_params: bool = False, draw: bool = True) -> int:
    """Bytes a model of ``sizes`` needs: its parameters (unless ``have_params``), the float64
    Glorot draw of its largest layer (``draw``), and for training on ``rows`` samples in
    batches of ``batch``: the data on the device, a copy of the parameters (kept to restore on
    divergence), ``states`` more copies (the optimizer's state, the best epoch's weights), every
    per-batch buffer and the evaluation's chunks."""
    item = np.dtype(dtype).itemsize
    params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    need = 0 if have_params else params * item
    if draw and not have_params:
        need += max(a * b for a, b in zip(sizes[:-1], sizes[1:])) * 8
    if rows:
        width = sum(sizes[1:])
        need += params * item * (1 + int(states))
        need += rows * (sizes[0] + sizes[-1]) * item                        # X, Y on the device
        need += batch * (sizes[0] + sizes[-1] + 2 * width) * item            # gathered batch, outputs, deltas
        need += min(rows, 4096) * 2 * width * item                          # evaluate's chunks
    return need


def check_memory(sizes: Sequence[int], dtype: np.dtype, device: Device, batch: int = 0, rows: int = 0,
                 states: int = 0, have_params: bool = False, draw: bool = True,
                 what: str = "sizes") -> None:
    """Refuse, before allocating, what would not fit: ``MemoryError`` with the figure and the limit."""
    need = memory_needed(sizes, dtype, batch, rows, states, have_params, draw)
    if need < 64 * 2**20:  # small enough never to be the problem: skip reading the limits
        return
    free = available_bytes(device)
    if free is not None and need > free:
        doing = f"training on {rows} rows in batches of {batch}" if rows else "its parameters"
        raise MemoryError(f"{what}: a {'-'.join(map(str, sizes))} {np.dtype(dtype).name} network needs "
                          f"{_gib(need)} for {doing}, more than the {_gib(free)} available on {device.name}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# -- argument checks --------------------------------------------------------------------------
def resolve_device(spec: "str | Device | None") -> Device:
    """``get_device`` with errors that name where a bad value came from: the argument, or
    the environment variable when the default was taken from it."""
    if spec is not None and not isinstance(spec, (str, Device)):
        raise TypeError(f"device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or a Device, got {spec!r}")
    from_env = spec is None and bool(os.environ.get(ENV_VAR, ""))
    try:
        return get_device(spec)
    except (ValueError, DeviceError) as exc:
        if not from_env:
            raise
        text = str(exc)
        text = text[len("device: "):] if text.startswith("device: ") else text
        raise type(exc)(f"{ENV_VAR} (environment variable) = {os.environ[ENV_VAR]!r}: {text}") from None


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    try:
        out = [int(s) for s in sizes]
    except (TypeError, ValueError):
        raise ValueError(f"sizes: expected a list of layer widths like [64, 32, 10], got {sizes!r}") from None
    if len(out) < 2 or any(s < 1 for s in out) or any(i != s for i, s in zip(out, sizes)):
        raise ValueError(f"sizes: expected at least two positive integer widths, got {list(sizes)!r}")
    return out


def _check_precision(precision: str, dtype: np.dtype, device: Device, fused: bool = True) -> str:
    if precision not in modelfile.PRECISIONS:
        raise ValueError(f"precision: expected 'fp32', 'tf32' or 'bf16', got {precision!r}")
    if precision in ("tf32", "bf16") and dtype != np.float32:
        raise ValueError(f"precision: {precision!r} needs dtype float32, got {dtype.name}")
    if precision == "bf16" and device.kind == "cuda" and not fused:
        raise ValueError("precision: 'bf16' on CUDA runs on the fused kernels only, got fused=False")
    if precision == "tf32" and device.kind != "cuda":
        logging.getLogger("gpu_backprop").info("precision 'tf32' applies on CUDA only: the CPU computes in float32")
    return precision


def _check_dtype(dtype: Any) -> np.dtype:
    # None would mean float64 to np.dtype, and np.dtype(...) == None is True: refuse it first.
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.name not in ("float32", "float64"):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
    return dt
