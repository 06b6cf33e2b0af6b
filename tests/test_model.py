"""MLP training, determinism, persistence and input errors on the CPU."""
import os

import numpy as np
import pytest

from gpu_backprop import MLP, data


@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)


def test_digits_reaches_95_percent(digits):
    model = MLP([64, 64, 10], device="cpu", seed=0)
    history = model.fit(digits.X_train, digits.y_train, epochs=30, batch_size=32, lr=2.0,
                        validation_data=(digits.X_test, digits.y_test))
    metrics = model.evaluate(digits.X_test, digits.y_test)
    assert metrics["accuracy"] >= 0.95
    assert history.loss[-1] < history.loss[0]
    assert history.val_accuracy[-1] == metrics["accuracy"]
    assert history.epochs == 30 and len(history.seconds) == 30


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_weights_bit_for_bit(digits, dtype):
    runs = []
    for _ in range(2):
        model = MLP([64, 32, 10], device="cpu", dtype=dtype, seed=7)
        model.fit(digits.X_train[:300], digits.y_train[:300], epochs=2, batch_size=17, lr=1.0, momentum=0.5)
        runs.append(model.get_params())
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key])
    other = MLP([64, 32, 10], device="cpu", dtype=dtype, seed=8).get_params()
    assert not np.array_equal(other["W0"], MLP([64, 32, 10], device="cpu", dtype=dtype, seed=7).get_params()["W0"])


def test_glorot_limits():
    model = MLP([100, 50, 10], device="cpu", dtype="float64", seed=1)
    for W, (n_in, n_out) in zip(model.weights, [(100, 50), (50, 10)]):
        limit = np.sqrt(6 / (n_in + n_out))
        assert np.abs(W).max() <= limit and np.abs(W).max() > 0.9 * limit
    assert all(np.all(b == 0) for b in model.biases)


def test_momentum_and_cross_entropy_train(digits):
    model = MLP([64, 32, 10], activation="relu", loss="cross_entropy", device="cpu", seed=0)
    model.fit(digits.X_train, digits.y_train, epochs=10, batch_size=64, lr=0.1, momentum=0.9)
    assert model.evaluate(digits.X_test, digits.y_test)["accuracy"] >= 0.93
    proba = model.predict_proba(digits.X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_xor_and_regression():
    ds = data.xor()
    model = MLP([2, 4, 2], device="cpu", seed=0)
    model.fit(ds.X_train, ds.y_train, epochs=400, batch_size=4, lr=4.0)
    assert list(model.predict(ds.X_test)) == [0, 1, 1, 0]
    reg = data.regression(n=400, seed=0)
    model = MLP([8, 32, 1], activation="tanh", output="identity", device="cpu", seed=0)
    model.fit(reg.X_train, reg.y_train, epochs=30, batch_size=16, lr=0.05)
    assert model.task == "regression"
    pred = model.predict(reg.X_test)
    assert pred.shape == (len(reg.X_test), 1)
    assert np.mean((pred - reg.y_test) ** 2) < 0.5 * np.var(reg.y_test)
    assert model.evaluate(reg.X_test, reg.y_test)["accuracy"] is None


def test_last_short_batch_and_batch_one(digits):
    X, y = digits.X_train[:10], digits.y_train[:10]
    for batch_size in (1, 3, 10, 64):
        model = MLP([64, 5, 10], device="cpu", seed=0)
        history = model.fit(X, y, epochs=1, batch_size=batch_size, lr=0.5)
        assert np.isfinite(history.loss[0])


def test_save_load_round_trip(tmp_path, digits):
    model = MLP([64, 16, 10], activation="tanh", device="cpu", dtype="float64", seed=3)
    model.fit(digits.X_train[:200], digits.y_train[:200], epochs=1, lr=0.5)
    path = model.save(tmp_path / "m.npz", x_mean=np.arange(3.0))
    loaded = MLP.load(path, device="cpu")
    assert loaded.config() == model.config()
    for key, value in model.get_params().items():
        np.testing.assert_array_equal(loaded.get_params()[key], value)
    np.testing.assert_array_equal(loaded.predict_proba(digits.X_test), model.predict_proba(digits.X_test))
    np.testing.assert_array_equal(loaded.extra["x_mean"], np.arange(3.0))
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    model = MLP([4, 3, 2], device="cpu")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    MLP([4, 3, 2], device="cpu", seed=1).save(path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError):
        MLP([4, 3, 2], device="cpu", seed=2).save(path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_load_rejects_foreign_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="no 'config'"):
        MLP.load(tmp_path / "x.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        MLP.load(tmp_path / "junk.npz")


# -- bad inputs: each error names the argument and what was expected -----------------------
@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    return MLP([4, 3, 3], device="cpu"), rng.standard_normal((6, 4)), np.array([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("mutate,error,match", [
    (lambda X, y: (X[:, :3], y), ValueError, r"X: expected 4 features"),
    (lambda X, y: (X, y[:5]), ValueError, r"y: expected 6 rows"),
    (lambda X, y: (np.where(X > 1, np.nan, X), y), ValueError, r"X: contains NaN or Inf"),
    (lambda X, y: (np.where(X > 1, np.inf, X), y), ValueError, r"X: contains NaN or Inf"),
    (lambda X, y: (X, np.array([0, 1, 2, 0, 1, np.nan])), ValueError, r"y: contains NaN or Inf"),
    (lambda X, y: (X, np.array([0, 1, 2, 0, 1, 3])), ValueError, r"y: labels must lie in \[0, 3\)"),
    (lambda X, y: (X, np.array([0, 1, 2, 0, 1, -1])), ValueError, r"y: labels must lie"),
    (lambda X, y: (X.astype(complex), y), TypeError, r"X: expected a numeric array"),
    (lambda X, y: (X.astype(str), y), TypeError, r"X: expected a numeric array"),
    (lambda X, y: (X[:0], y[:0]), ValueError, r"X: empty"),
    (lambda X, y: (X[0], y), ValueError, r"X: expected a 2-D array"),
])
def test_bad_inputs(small, mutate, error, match):
    model, X, y = small
    X, y = mutate(X, y)
    with pytest.raises(error, match=match):
        model.fit(X, y, epochs=1)


def test_non_contiguous_input_is_handled(small):
    model, X, y = small
    wide = np.repeat(X, 2, axis=1)[:, ::2]  # a strided view
    assert not wide.flags.c_contiguous
    model.fit(wide, y, epochs=1, batch_size=2)
    np.testing.assert_array_equal(model.predict_proba(wide), model.predict_proba(np.ascontiguousarray(wide)))


@pytest.mark.parametrize("kwargs,match", [
    ({"activation": "swish"}, "activation: expected one of"),
    ({"loss": "hinge"}, "loss: expected one of"),
    ({"output": "softmax"}, "loss: 'mse' with output 'softmax'"),
    ({"dtype": "float16"}, "dtype: expected float32 or float64"),
    ({"dtype": "int32"}, "dtype: expected float32 or float64"),
    ({"device": "tpu"}, "device: expected"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MLP([4, 3, 2], **kwargs)


@pytest.mark.parametrize("sizes", [[4], [4, 0, 2], [4, -1], "abc", [4, 2.5]])
def test_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes: expected"):
        MLP(sizes)


@pytest.mark.parametrize("kwargs,match", [
    ({"epochs": 0}, "epochs: expected a positive integer"),
    ({"batch_size": 0}, "batch_size: expected a positive integer"),
    ({"lr": -1.0}, "lr: expected a positive"),
    ({"lr": float("nan")}, "lr: expected a positive"),
    ({"momentum": 1.0}, r"momentum: expected a number in \[0, 1\)"),
])
def test_bad_hyperparameters(small, kwargs, match):
    model, X, y = small
    with pytest.raises(ValueError, match=match):
        model.fit(X, y, **kwargs)


def test_divergence_is_reported(small):
    model, X, y = small
    X = X * 1e30
    model2 = MLP([4, 3, 3], activation="identity", output="identity", device="cpu")
    with pytest.raises(FloatingPointError, match="diverged"):
        with np.errstate(all="ignore"):
            model2.fit(X, y, epochs=3, lr=10.0)


def test_precision_argument(tmp_path, caplog):
    with pytest.raises(ValueError, match="precision: expected 'fp32', 'tf32' or 'bf16'"):
        MLP([4, 3, 2], precision="fp16")
    with pytest.raises(ValueError, match="precision: 'tf32' needs dtype float32"):
        MLP([4, 3, 2], dtype="float64", precision="tf32")
    import logging

    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        model = MLP([4, 3, 2], device="cpu", precision="tf32")
    assert any("applies on CUDA only" in r.getMessage() for r in caplog.records)
    assert MLP.load(model.save(tmp_path / "m.npz"), device="cpu").precision == "tf32"


@pytest.mark.parametrize("n_layers", range(1, 7))
def test_backward_schedule_respects_every_dependency(n_layers):
    """Simulate the schedule: every update sees its delta ready and its W not yet read by a
    later propagation; within a launch nothing one part writes is touched by another;
    L launches, each layer updated once and each hidden error propagated once."""
    from gpu_backprop.model import backward_schedule

    schedule = backward_schedule(n_layers)
    ready = {n_layers}  # delta[L] from the output delta
    updated, propagated = set(), set()
    for k, layers in schedule:
        assert len(layers) <= 2
        parts = []  # (reads, writes) of each part of this launch
        if k is not None:
            assert 1 <= k < n_layers and k + 1 in ready and k not in updated  # W[k] still the old one
            parts.append(({("delta", k + 1), ("W", k), ("o", k)}, {("delta", k)}))
        for j in layers:
            assert j + 1 in ready and j not in updated and (j == 0 or j in propagated)
            parts.append(({("o", j), ("delta", j + 1)}, {("W", j), ("b", j)}))
        for i, (_, writes) in enumerate(parts):
            for m, (reads, other_writes) in enumerate(parts):
                if m != i:
                    assert not writes & (reads | other_writes)
        if k is not None:
            propagated.add(k)
            ready.add(k)
        updated.update(layers)
    assert updated == set(range(n_layers)) and propagated == set(range(1, n_layers))
    assert len(schedule) == n_layers


def test_backward_plan_is_reused_for_the_same_buffers_and_rebuilt_for_new_ones(rng):
    """train_step keeps its launches' arguments while X, Y, lr, momentum, ... are the same objects,
    and rebuilds them for new ones: steps on fresh arrays equal steps on one reused buffer."""
    X1, X2 = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    Y1, Y2 = rng.random((6, 3)), rng.random((6, 3))
    fresh = MLP([5, 4, 3], device="cpu", dtype="float64", seed=1)
    for X, Y in ((X1, Y1), (X2, Y2), (X1, Y2)):
        fresh.train_step(X.copy(), Y.copy(), 0.5, momentum=0.9)
    reused = MLP([5, 4, 3], device="cpu", dtype="float64", seed=1)
    xb, yb = np.empty((6, 5)), np.empty((6, 3))
    plans = []
    for X, Y in ((X1, Y1), (X2, Y2), (X1, Y2)):
        xb[...], yb[...] = X, Y
        reused.train_step(xb, yb, 0.5, momentum=0.9)
        plans.append(reused._buffers[6].plan)
    assert plans[0] is plans[1] is plans[2]
    for key, value in fresh.get_params().items():
        np.testing.assert_array_equal(reused.get_params()[key], value)
    reused.set_params(reused.get_params())  # resets the velocity: a new plan with the new buffers
    reused.train_step(xb, yb, 0.5, momentum=0.9)
    assert reused._buffers[6].plan is not plans[0]
    assert reused._buffers[6].plan[0][1] == [] and reused._buffers[6].plan[-1][1][0].vel_w is reused._state.vel_w[1]


def test_set_params_resets_the_velocity_the_next_step_reads(rng):
    """After set_params the optimizer state starts from zeros: each first step after it is the step of
    a fresh model from those parameters, however often it is repeated (a new state object at a freed
    one's address once reused the old plan, and with it the old velocity)."""
    X, Y = rng.standard_normal((6, 5)), rng.random((6, 3))
    model = MLP([5, 4, 3], device="cpu", dtype="float64", seed=1)
    for _ in range(20):
        params = model.get_params()
        model.set_params(params)
        model.train_step(X, Y, 0.5, momentum=0.9)
        fresh = MLP([5, 4, 3], device="cpu", dtype="float64", seed=1)
        fresh.set_params(params)
        fresh.train_step(X.copy(), Y.copy(), 0.5, momentum=0.9)
        for key, value in fresh.get_params().items():
            np.testing.assert_array_equal(model.get_params()[key], value, err_msg=key)
