"""Finite differences in float64 against the training step, every activation x loss."""
import numpy as np
import pytest

from gpu_backprop import MLP
from gpu_backprop.ops import activations as act

from .reference_formulas import loss as loss_sum

# (sizes, batch): batch 1, width 1 (input, hidden and output), several layers
SHAPES = [([3, 4, 2], 5), ([1, 1, 1], 1), ([4, 1, 3], 1), ([2, 5, 3, 2], 7), ([6, 2], 3)]
CASES = [(a, "mse", out) for a in act.HIDDEN for out in ("sigmoid", "identity")] + \
        [(a, "cross_entropy", "softmax") for a in act.HIDDEN]
# softmax over a single unit is constant (zero gradient): those pairs are left out
PARAMS = [(*case, sizes, batch) for case in CASES for sizes, batch in SHAPES
          if not (case[2] == "softmax" and sizes[-1] == 1)]


def mean_loss(model, X, Y):
    return loss_sum(model.loss, model.forward(X)[-1], Y) / X.shape[0]


@pytest.mark.parametrize("activation,loss,output,sizes,batch", PARAMS)
def test_gradient_matches_finite_differences(rng, activation, loss, output, sizes, batch):
    model = MLP(sizes, activation=activation, output=output, loss=loss, device="cpu", dtype="float64",
                seed=int(rng.integers(1 << 30)))
    for b in model.biases:  # nonzero biases, so their gradient is exercised away from 0
        b[...] = rng.standard_normal(b.shape) * 0.3
    X = rng.standard_normal((batch, sizes[0]))
    if loss == "cross_entropy":
        Y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], batch)]
    else:
        Y = rng.random((batch, sizes[-1]))
    start = model.get_params()
    lr = 1e-3
    model.train_step(X.copy(), Y.copy(), lr)  # W -= lr * dL/dW for the batch-mean loss
    analytic = {k: (start[k] - v) / lr for k, v in model.get_params().items()}
    eps = 1e-6
    for name, value in start.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            for sign in (1, -1):
                params = {k: v.copy() for k, v in start.items()}
                params[name][idx] += sign * eps
                model.set_params(params)
                numeric[idx] += sign * mean_loss(model, X, Y) / (2 * eps)
        scale = max(np.abs(numeric).max(), 1e-6)
        assert np.abs(analytic[name] - numeric).max() / scale < 1e-5, name
