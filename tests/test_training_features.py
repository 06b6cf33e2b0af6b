"""The fit loop's optimizers, learning-rate schedules, early stopping and checkpoints, on the CPU:
each checked against its definition, and resumed runs against runs never stopped, bit for bit."""
import math

import numpy as np
import pytest

from gpu_backprop import MLP
from gpu_backprop.data import digits
from gpu_backprop.train import Trainer


@pytest.fixture(scope="module")
def data():
    ds = digits(seed=0)
    return ds.X_train[:300], ds.y_train[:300], ds.X_test[:100], ds.y_test[:100]


def model():
    return MLP([64, 16, 10], activation="tanh", loss="cross_entropy", device="cpu", seed=2)


@pytest.mark.parametrize("optimizer,kwargs", [("sgd", {"momentum": 0.9, "nesterov": True, "alpha": 1e-3}),
                                              ("adam", {"alpha": 1e-4}), ("adamw", {"weight_decay": 0.01})])
def test_each_optimizer_learns_digits(data, optimizer, kwargs):
    X, y, X_val, y_val = data
    net = model()
    lr = 0.05 if optimizer == "sgd" else 0.01
    history = net.fit(X, y, epochs=15, batch_size=32, lr=lr, optimizer=optimizer, **kwargs)
    assert history.loss[-1] < 0.3 * history.loss[0]
    assert net.evaluate(X_val, y_val)["accuracy"] > 0.85


def test_schedules_follow_their_definitions(data):
    X, y, _, _ = data
    n, lr = len(X), 0.05
    h = model().fit(X, y, epochs=4, lr=lr, schedule="invscaling", power_t=0.5)
    assert h.lr == [lr / (e * n + 1) ** 0.5 for e in range(4)]  # scikit-learn's: samples seen before the epoch
    h = model().fit(X, y, epochs=4, lr=lr, schedule="cosine", lr_min=0.01)
    assert h.lr == pytest.approx([0.01 + 0.04 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    h = model().fit(X, y, epochs=3, lr=lr)
    assert h.lr == [lr] * 3


def test_adaptive_divides_the_rate_by_five_on_a_plateau(data):
    """tol=10 makes every epoch a plateau: after patience + 1 of them the rate is divided by 5."""
    X, y, _, _ = data
    h = model().fit(X, y, epochs=7, lr=0.05, schedule="adaptive", patience=2, tol=10.0)
    assert h.lr == pytest.approx([0.05] * 4 + [0.01] * 3)
    assert not h.stopped_early


def test_early_stopping_keeps_the_best_epoch(data):
    """Stopped once the validation loss stopped improving; the model ends with the best epoch's
    weights (its validation loss is the minimum seen), not the last epoch's."""
    X, y, X_val, y_val = data
    net = model()
    h = net.fit(X, y, epochs=200, lr=0.2, optimizer="sgd", momentum=0.9, validation_data=(X_val, y_val),
                early_stopping=True, patience=3, tol=0.0)
    assert h.stopped_early and h.epochs < 200
    assert h.best_epoch == int(np.argmin(h.val_loss)) + 1 < h.epochs
    assert net.evaluate(X_val, y_val)["loss"] == pytest.approx(min(h.val_loss), rel=1e-6)
    with pytest.raises(ValueError, match="early_stopping: monitoring val_loss needs validation_data"):
        model().fit(X, y, early_stopping=True, monitor="val_loss")


CASES = [
    dict(optimizer="sgd", momentum=0.9),
    dict(optimizer="adam", alpha=1e-3, schedule="cosine"),
    dict(optimizer="adamw", weight_decay=0.01, schedule="adaptive", patience=1, tol=10.0),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(data, tmp_path, kwargs, monkeypatch):
    """Interrupted in epoch 4 (a KeyboardInterrupt), resumed from the checkpoint written after epoch 3:
    the same weights, bit for bit, the same history, and the same optimizer state."""
    X, y, X_val, y_val = data
    fit = dict(epochs=6, batch_size=37, lr=0.02, validation_data=(X_val, y_val), **kwargs)
    whole = model()
    expected = whole.fit(X, y, checkpoint=tmp_path / "whole.npz", **fit)

    epoch = Trainer.epoch
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return epoch(self)

    monkeypatch.setattr(Trainer, "epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model().fit(X, y, checkpoint=tmp_path / "ckpt.npz", **fit)
    monkeypatch.setattr(Trainer, "epoch", epoch)
    resumed = MLP([64, 16, 10], activation="tanh", loss="cross_entropy", device="cpu", seed=99)  # other weights
    history = resumed.fit(X, y, resume_from=tmp_path / "ckpt.npz", checkpoint=tmp_path / "ckpt.npz", **fit)
    for key, value in whole.get_params().items():
        np.testing.assert_array_equal(resumed.get_params()[key], value)
    for name, value in whole._state.arrays().items():
        np.testing.assert_array_equal(resumed._state.arrays()[name], value)
    assert history.loss == expected.loss and history.val_loss == expected.val_loss and history.lr == expected.lr
    # the checkpoint is a model file: it loads and predicts as the model does
    np.testing.assert_array_equal(MLP.load(tmp_path / "ckpt.npz").predict(X_val), whole.predict(X_val))


def test_resume_refuses_a_run_with_other_settings(data, tmp_path):
    X, y, _, _ = data
    model().fit(X, y, epochs=2, batch_size=32, lr=0.1, checkpoint=tmp_path / "c.npz")
    with pytest.raises(ValueError, match=r"resume_from .*c.npz.*written by a fit with batch_size=32, this one has 16"):
        model().fit(X, y, epochs=4, batch_size=16, lr=0.1, resume_from=tmp_path / "c.npz")
    with pytest.raises(ValueError, match="written for sizes=.*this model has"):
        MLP([64, 8, 10], loss="cross_entropy", device="cpu").fit(X, y, epochs=4, batch_size=32, lr=0.1,
                                                                 resume_from=tmp_path / "c.npz")
    model().save(tmp_path / "plain.npz")
    with pytest.raises(ValueError, match="a model file but not a checkpoint"):
        model().fit(X, y, epochs=4, batch_size=32, lr=0.1, resume_from=tmp_path / "plain.npz")


def test_a_finished_checkpoint_resumes_to_nothing_more(data, tmp_path):
    X, y, _, _ = data
    a = model()
    a.fit(X, y, epochs=3, lr=0.1, checkpoint=tmp_path / "c.npz")
    b = model()
    h = b.fit(X, y, epochs=3, lr=0.1, resume_from=tmp_path / "c.npz")
    assert h.epochs == 3
    for key, value in a.get_params().items():
        np.testing.assert_array_equal(b.get_params()[key], value)


def test_bad_optimizer_arguments_are_named(data):
    X, y, _, _ = data
    for kwargs, match in [({"optimizer": "rmsprop"}, "optimizer: expected one of sgd, adam, adamw"),
                          ({"nesterov": True}, "nesterov: applies to optimizer 'sgd' with a momentum"),
                          ({"weight_decay": 0.1}, "weight_decay: applies to optimizer 'adamw'"),
                          ({"optimizer": "adam", "beta2": 1.0}, r"beta2: expected a number in \[0, 1\)"),
                          ({"schedule": "step"}, "schedule: expected one of constant"),
                          ({"early_stopping": True, "patience": 0}, "patience: expected a positive integer")]:
        with pytest.raises(ValueError, match=match):
            model().fit(X, y, **kwargs)
