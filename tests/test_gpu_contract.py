"""The launch contract and non-finite values on a real GPU (tests/test_launch_contract.py runs
the same on the CUDA-on-CPU shim). Skipped, with the reason, where no CUDA device is usable."""
import numpy as np
import pytest

from gpu_backprop import MLP
from gpu_backprop.ops import NumpyOps, Propagate, Update
from gpu_backprop.train import Trainer

pytestmark = pytest.mark.gpu
twin = NumpyOps()


def test_cupy_arrays_that_overlap_are_refused(gpu):
    cp, ops = gpu
    rng = np.random.default_rng(0)
    o, err = cp.asarray(rng.standard_normal((33, 129))), cp.asarray(rng.standard_normal((33, 300)))
    o_next = cp.asarray(rng.random((33, 300)))
    with pytest.raises(ValueError, match=r"^delta_out and delta overlap in memory"):
        ops.weight_grad(o, err, cp.empty((129, 300)), cp.empty(300), o_next=o_next, activation="sigmoid",
                        delta_out=err)
    W, b = cp.asarray(rng.standard_normal((5, 5))), cp.zeros(5)
    x, d = cp.asarray(rng.standard_normal((6, 5))), cp.asarray(rng.standard_normal((6, 5)))
    with pytest.raises(ValueError, match=r"^updates\[0\]\.W and propagate\.W overlap"):
        ops.backward(Propagate(d, W, x, "tanh", cp.empty((6, 5))), [Update(x, d, W, b, 0.1)])
    buf = cp.zeros(31)
    with pytest.raises(ValueError, match="^out and err overlap"):
        ops.hidden_delta(buf[:30].reshape(5, 6), cp.ones((5, 6)), "tanh", buf[1:].reshape(5, 6))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
def test_forward_keeps_nan_and_inf_on_the_card(gpu, activation):
    cp, ops = gpu
    o = np.array([[np.nan, 0.0], [np.inf, 0.0], [-np.inf, 0.0], [1.0, 2.0]])
    out = cp.empty((4, 2))
    ops.forward(cp.asarray(o), cp.eye(2), cp.zeros(2), activation, out, config="small")
    expected = twin.forward(o, np.eye(2), np.zeros(2), activation, np.empty((4, 2)))
    got = cp.asnumpy(out)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(got) * np.sign(got), np.isinf(expected) * np.sign(expected))


def test_cross_entropy_loss_of_a_nan_output_is_nan_on_the_card(gpu):
    cp, ops = gpu
    loss = cp.zeros(1)
    ops.output_delta(cp.asarray([[np.nan, 0.5], [0.25, 0.75]]), cp.asarray([[1.0, 0.0], [0.0, 1.0]]), "identity",
                     "cross_entropy", cp.empty((2, 2)), loss)
    assert np.isnan(float(loss[0]))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
def test_a_nan_weight_gives_a_nan_epoch_loss_on_the_card(activation, loss):
    """Through the fused (and, for mse, captured) step: the loss the fit loop watches is NaN."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 6)), rng.integers(0, 3, 64)
    model = MLP([6, 8, 3], activation=activation, loss=loss, device="cuda", seed=0)
    model.weights[0][0, 0] = np.nan
    trainer = Trainer(model, X, y, batch_size=8, lr=0.1)
    with model.device.stream():
        epoch_loss, _ = trainer.epoch()
    assert np.isnan(epoch_loss)
    with pytest.raises(FloatingPointError, match="diverged"):
        model.fit(X, y, epochs=2, batch_size=8, lr=0.1)
