"""Each NumPy twin against its textbook formula (float64), in place against out of place."""
import warnings

import numpy as np
import pytest

from gpu_backprop.ops import NumpyOps
from gpu_backprop.ops import activations as act
from gpu_backprop.ops.blas import gemm

from .conftest import TOL, rel_error
from .reference_formulas import f, f_prime_from_output, loss

SHAPES = [(1, 1, 1), (1, 7, 3), (7, 1, 5), (33, 17, 1), (64, 129, 10)]  # (batch, n_in, n_out)
DTYPES = [np.float32, np.float64]
ops = NumpyOps()


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.25, 1.0), (0.5, 0.9)])
def test_gemm_alpha_beta_in_place(rng, dtype, trans_a, trans_b, alpha, beta):
    m, n, k = 5, 3, 7
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    out = rng.standard_normal((m, n)).astype(dtype)
    before = out.astype(np.float64)
    expected = alpha * ((a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)) + beta * before
    result = gemm(a, b, out, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)
    assert result is out
    assert rel_error(out, expected) < 10 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", act.OUTPUT)
@pytest.mark.parametrize("batch,n_in,n_out", SHAPES)
def test_forward(rng, dtype, activation, batch, n_in, n_out):
    o = rng.standard_normal((batch, n_in)).astype(dtype)
    W = rng.standard_normal((n_in, n_out)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    out = poisoned((batch, n_out), dtype)
    ops.forward(o, W, b, activation, out)
    expected = f(activation, o.astype(np.float64) @ W + b)
    assert rel_error(out, expected) < 10 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_stable_for_large_inputs(dtype):
    z = np.array([[-1e4, -800.0, -90.0, 0.0, 90.0, 800.0, 1e4]], dtype=dtype)
    out = np.empty_like(z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        act.activate(np, __import__("scipy.special").special, "sigmoid", z, out)
    assert np.all(np.isfinite(out)) and out[0, 0] == 0.0 and out[0, -1] == 1.0 and out[0, 3] == 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", act.HIDDEN)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 65)])
def test_output_delta_mse(rng, dtype, activation, shape):
    y_hat = f(activation, rng.standard_normal(shape)).astype(dtype)
    y = rng.random(shape).astype(dtype)
    out, loss_out = poisoned(shape, dtype), poisoned(1, dtype)
    ops.output_delta(y_hat, y, activation, "mse", out, loss_out)
    expected = (y_hat.astype(np.float64) - y) * f_prime_from_output(activation, y_hat)
    assert rel_error(out, expected) < 10 * TOL[np.dtype(dtype)] or np.abs(out - expected).max() < 1e-6
    assert rel_error(loss_out[0], loss("mse", y_hat, y)) < 10 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_delta_cross_entropy(rng, dtype):
    y_hat = f("softmax", rng.standard_normal((9, 4))).astype(dtype)
    y = np.eye(4)[rng.integers(0, 4, 9)].astype(dtype)
    out, loss_out = poisoned(y.shape, dtype), poisoned(1, dtype)
    ops.output_delta(y_hat, y, "softmax", "cross_entropy", out, loss_out)
    assert rel_error(out, y_hat.astype(np.float64) - y) < 10 * TOL[np.dtype(dtype)]
    assert rel_error(loss_out[0], loss("cross_entropy", y_hat, y)) < 10 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", act.HIDDEN)
def test_hidden_delta_in_place_equals_out_of_place(rng, dtype, activation):
    err = rng.standard_normal((7, 5)).astype(dtype)
    o = f(activation, rng.standard_normal((7, 5))).astype(dtype)
    out = poisoned(err.shape, dtype)
    ops.hidden_delta(err, o, activation, out)
    expected = err.astype(np.float64) * f_prime_from_output(activation, o)
    assert rel_error(out, expected) < 10 * TOL[np.dtype(dtype)]
    in_place = err.copy()
    ops.hidden_delta(in_place, o, activation, in_place)
    np.testing.assert_array_equal(in_place, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", act.HIDDEN)
@pytest.mark.parametrize("batch,n_in,n_out", SHAPES)
def test_propagate(rng, dtype, activation, batch, n_in, n_out):
    delta = rng.standard_normal((batch, n_out)).astype(dtype)
    W = rng.standard_normal((n_in, n_out)).astype(dtype)
    o = f(activation, rng.standard_normal((batch, n_in))).astype(dtype)
    out = poisoned((batch, n_in), dtype)
    ops.propagate(delta, W, o, activation, out)
    expected = (delta.astype(np.float64) @ W.T) * f_prime_from_output(activation, o)
    assert rel_error(out, expected) < 10 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,n_in,n_out", SHAPES)
@pytest.mark.parametrize("prologue", [False, True])
def test_weight_grad(rng, dtype, batch, n_in, n_out, prologue):
    o = rng.random((batch, n_in)).astype(dtype)
    g = rng.standard_normal((batch, n_out)).astype(dtype)
    o_next = f("sigmoid", rng.standard_normal((batch, n_out))).astype(dtype)
    grad_w, grad_b = poisoned((n_in, n_out), dtype), poisoned(n_out, dtype)
    delta_out = poisoned((batch, n_out), dtype) if prologue else None
    ops.weight_grad(o, g, grad_w, grad_b, o_next=o_next if prologue else None, activation="sigmoid",
                    delta_out=delta_out)
    delta = g.astype(np.float64) * (f_prime_from_output("sigmoid", o_next) if prologue else 1.0)
    assert rel_error(grad_w, o.T.astype(np.float64) @ delta) < 10 * TOL[np.dtype(dtype)]
    assert rel_error(grad_b, delta.sum(axis=0)) < 10 * TOL[np.dtype(dtype)]
    if prologue:
        assert rel_error(delta_out, delta) < 10 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_update_equals_gradient_then_step(rng, dtype, momentum):
    batch, n_in, n_out = 33, 17, 5
    o = rng.random((batch, n_in)).astype(dtype)
    delta = rng.standard_normal((batch, n_out)).astype(dtype)
    W, b = rng.standard_normal((n_in, n_out)).astype(dtype), rng.standard_normal(n_out).astype(dtype)
    vel_w, vel_b = rng.standard_normal(W.shape).astype(dtype), rng.standard_normal(b.shape).astype(dtype)
    step = 0.1 / batch
    grad_w, grad_b = o.T.astype(np.float64) @ delta, delta.astype(np.float64).sum(axis=0)
    if momentum:
        v_w, v_b = momentum * vel_w - step * grad_w, momentum * vel_b - step * grad_b
        expected_w, expected_b = W + v_w, b + v_b
    else:
        expected_w, expected_b = W - step * grad_w, b - step * grad_b
    ops.sgd_update(o, delta, W, b, step, momentum, vel_w, vel_b)
    assert rel_error(W, expected_w) < 10 * TOL[np.dtype(dtype)]
    assert rel_error(b, expected_b) < 10 * TOL[np.dtype(dtype)]
    if momentum:
        assert rel_error(vel_w, v_w) < 10 * TOL[np.dtype(dtype)]


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="activation: expected one of"):
        act.check_activation("swish")
    with pytest.raises(ValueError, match="loss: expected one of"):
        act.check_loss("hinge", "sigmoid")
    with pytest.raises(ValueError, match="softmax"):
        act.check_loss("mse", "softmax")


def splitmix64_finaliser(z: int) -> int:
    """splitmix64's finaliser on one Python integer, written from its published form."""
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("key", [0, 1, 2**63 - 1, 0x1234_5678_9ABC_DEF0])
def test_shuffle_keys_are_splitmix64(key):
    n = 37
    keys, step = np.full(n, 7, np.uint64), np.array([5], np.int64)
    ops.shuffle_keys(key, keys, step)
    assert keys.tolist() == [splitmix64_finaliser((i + splitmix64_finaliser(key)) % 2**64) for i in range(n)]
    assert step[0] == 0


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1437, 10_001])
def test_shuffle_epoch_is_a_permutation(rng, n):
    order, step = np.full(n, -1, np.int64), np.array([9], np.int64)
    key = int(rng.integers(0, 2**63))
    ops.shuffle_epoch(order, step, key)
    assert np.array_equal(np.sort(order), np.arange(n)) and step[0] == 0
    again = np.full(n, -1, np.int64)
    ops.shuffle_epoch(again, step, key)
    assert np.array_equal(again, order)  # a key gives one order
    ops.shuffle_epoch(again, step, key, shuffle=False)
    assert np.array_equal(again, np.arange(n))


def test_shuffle_epoch_spreads_rows_uniformly():
    """Over 4000 keys every row lands in every one of 8 slots about equally often
    (a chi-square bound at p ~ 1e-6), and consecutive keys give unrelated orders."""
    n, draws = 8, 4000
    counts = np.zeros((n, n))
    order, step = np.empty(n, np.int64), np.zeros(1, np.int64)
    previous = None
    same_as_previous = 0
    for key in range(draws):
        ops.shuffle_epoch(order, step, key)
        counts[order, np.arange(n)] += 1
        if previous is not None:
            same_as_previous += np.count_nonzero(order == previous)
        previous = order.copy()
    expected = draws / n
    chi2 = ((counts - expected) ** 2 / expected).sum()  # 49 degrees of freedom
    assert chi2 < 110, counts
    assert abs(same_as_previous / ((draws - 1) * n) - 1 / n) < 0.02


@pytest.mark.parametrize("key", [0, 1, 12345, 2**63 - 1, 2**64 - 1])
def test_mixed_key_is_mix64_of_the_key(key):
    from gpu_backprop.ops.reference import mix64, mixed_key

    assert mixed_key(key) == int(mix64(np, np.array([key], dtype=np.uint64))[0]) == splitmix64_finaliser(key)
    with pytest.raises(ValueError, match="key: expected an integer"):
        mixed_key(-1)
