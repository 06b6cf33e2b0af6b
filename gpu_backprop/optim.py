"""Optimizers, learning-rate schedules and early stopping for the fit loop.

An :class:`Optimizer` says how each step turns the summed gradient into an update; it
becomes the kernels' :class:`~gpu_backprop.ops.Rule` (kernels/update.cuh: on CUDA the update
runs in the weight-gradient GEMM's epilogue). Names and meanings follow scikit-learn's
``MLPClassifier``: ``alpha`` is its L2 penalty, ``nesterov`` its ``nesterovs_momentum``, Adam
its ``beta_1``, ``beta_2``, ``epsilon``; "adamw" adds decoupled weight decay (Loshchilov and
Hutter), applied to the weights, not the biases, as ``alpha`` is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .ops import Rule

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "invscaling", "adaptive", "cosine")
MIN_ADAPTIVE_LR = 1e-6  # "adaptive" stops dividing (and fit stops) below this, as scikit-learn


def _number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf and low == 0:
            expected = "a positive finite number" if low_open else "a non-negative finite number"
        else:
            expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Optimizer:
    """How a step updates the parameters; ``check()`` validates, naming the argument.

    sgd: W -= lr/B (G + alpha W), with ``momentum`` (Nesterov's with ``nesterov``);
    adam / adamw: scikit-learn's Adam on the mean gradient (G + alpha W) / B, with
    bias correction; adamw also W -= lr weight_decay W each step.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    alpha: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def check(self) -> "Optimizer":
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        _number("lr", self.lr, 0.0, low_open=True)
        _number("momentum", self.momentum, 0.0, 1.0)
        _number("alpha", self.alpha, 0.0)
        _number("beta1", self.beta1, 0.0, 1.0)
        _number("beta2", self.beta2, 0.0, 1.0)
        _number("epsilon", self.eps, 0.0, low_open=True)
        _number("weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov: expected True or False, got {self.nesterov!r}")
        if self.nesterov and (self.name != "sgd" or not self.momentum):
            raise ValueError("nesterov: applies to optimizer 'sgd' with a momentum > 0")
        if self.weight_decay and self.name != "adamw":
            raise ValueError(f"weight_decay: applies to optimizer 'adamw' (for L2 with {self.name!r}, use alpha)")
        return self

    @property
    def states(self) -> int:
        """Arrays of state per parameter: Adam's two moments, SGD's velocity, or none."""
        return 2 if self.name != "sgd" else int(bool(self.momentum))

    def rule(self, batch: int, lr: float, t: Any = None) -> Rule:
        """The kernels' rule for a step on ``batch`` rows at learning rate ``lr`` (this epoch's)."""
        if self.name == "sgd":
            mode = "nesterov" if self.nesterov else "momentum" if self.momentum else "sgd"
            return Rule(mode, lr / batch, self.momentum, self.alpha)
        decay = lr * self.weight_decay if self.name == "adamw" else 0.0
        return Rule("adam", lr, 0.0, self.alpha, 1.0 / batch, self.beta1, self.beta2, self.eps, decay, t)


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each epoch: "constant"; "invscaling": lr / (samples seen + 1)^power_t
    (scikit-learn's, after each epoch); "cosine": from lr down to ``lr_min`` over the epochs;
    "adaptive": divided by 5 each time the monitored metric stops improving (see :class:`Stopping`),
    down to 1e-6, then training stops (scikit-learn's)."""

    name: str = "constant"
    power_t: float = 0.5
    lr_min: float = 0.0

    def check(self) -> "Schedule":
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {self.name!r}")
        _number("power_t", self.power_t, 0.0)
        _number("lr_min", self.lr_min, 0.0)
        return self

    def lr(self, lr0: float, lr_now: float, epoch: int, epochs: int, samples_seen: int) -> float:
        """The rate for epoch ``epoch`` (0-based) of ``epochs``; ``lr_now``: the rate so far."""
        if self.name == "invscaling":
            return lr0 / (samples_seen + 1) ** self.power_t
        if self.name == "cosine":
            return self.lr_min + (lr0 - self.lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
        return lr_now  # constant; adaptive changes on a plateau only


@dataclass(frozen=True)
class Stopping:
    """Stop when ``metric`` has not improved by ``tol`` for more than ``patience`` epochs in a row
    (scikit-learn's n_iter_no_change); ``restore_best``: end with the weights of the best epoch.
    metric: "val_loss" (lower is better), "val_accuracy" (higher), "loss" (the training loss)."""

    patience: int = 10
    tol: float = 1e-4
    metric: str = "val_loss"
    restore_best: bool = True

    def check(self, has_validation: bool) -> "Stopping":
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience: expected a positive integer, got {self.patience!r}")
        _number("tol", self.tol, 0.0)
        if self.metric not in ("val_loss", "val_accuracy", "loss"):
            raise ValueError(f"early stopping metric: expected val_loss, val_accuracy or loss, got {self.metric!r}")
        if self.metric.startswith("val_") and not has_validation:
            raise ValueError(f"early_stopping: monitoring {self.metric} needs validation_data")
        return self

    def score(self, metrics: dict) -> float:
        """The monitored metric as a score to maximise."""
        value = metrics[self.metric]
        if value is None:
            raise ValueError(f"early stopping metric: {self.metric} is not measured for regression; use val_loss")
        return value if self.metric == "val_accuracy" else -value
