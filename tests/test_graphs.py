"""The bookkeeping of captured training steps, on the CPU: a stand-in capture whose
replay re-runs the recorded step on the same buffers, as a CUDA graph does."""
import logging
import types

import numpy as np
import pytest

from gpu_backprop import MLP
from gpu_backprop.device import CPU, Device
from gpu_backprop.ops import ArrayOps
from gpu_backprop.train import StepRunner, Trainer, _graph_capture, fit


def replay_capture(fn):
    """A graph stand-in: nothing runs at capture; a replay runs the same launches on the same buffers."""
    return fn


def data(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)), rng.integers(0, 3, n)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_replayed_steps_equal_plain_steps(momentum):
    X, y = data()
    params = []
    for capture in (None, replay_capture):
        model = MLP([6, 5, 3], device="cpu", seed=1)
        fit(model, X, y, epochs=3, batch_size=7, lr=0.5, momentum=momentum, capture=capture)
        params.append(model.get_params())
        steps = model.last_steps
    for key in params[0]:
        np.testing.assert_array_equal(params[0][key], params[1][key])
    # 20 samples in batches of 7: sizes 7, 7, 6; the short last batch has a graph of its own
    assert sorted(steps.replays) == [6, 7] and steps.captured == 2
    assert steps.replayed == 3 * 3 - 2  # every step after the first of each size is a replay


def test_failed_capture_falls_back_to_plain_steps(caplog):
    X, y = data()

    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    plain = MLP([6, 5, 3], device="cpu", seed=1)
    plain.fit(X, y, epochs=2, batch_size=7, lr=0.5)
    model = MLP([6, 5, 3], device="cpu", seed=1)
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        fit(model, X, y, epochs=2, batch_size=7, lr=0.5, capture=broken)
    assert model.last_steps.captured == 0 and model.last_steps.replayed == 0
    assert any("capture failed at batch size 7" in r.getMessage() for r in caplog.records)
    for key, value in plain.get_params().items():
        np.testing.assert_array_equal(model.get_params()[key], value)


def test_each_batch_size_is_built_once_and_replayed():
    built, ran = [], []

    def make(batch):
        built.append(batch)
        return lambda: ran.append(batch)

    runner = StepRunner(make, replay_capture)
    for batch in (7, 7, 7, 6, 7, 6):
        runner(batch)
    assert built == [7, 6] and ran == [7, 7, 7, 6, 7, 6]
    assert runner.captured == 2 and runner.replayed == 4


def test_epoch_bookkeeping_on_the_device_arrays():
    X, y = data()
    model = MLP([6, 5, 3], device="cpu", seed=1)
    trainer = Trainer(model, X, y, batch_size=7, lr=0.5, shuffle=False)
    before = model.get_params()
    loss, accuracy = trainer.epoch()
    assert trainer.counter[0] == 3  # one count per batch: 7, 7, 6
    # the recorded per-batch losses are those of the forward passes before each update
    model.set_params(before)
    expected = []
    for rows in (slice(0, 7), slice(7, 14), slice(14, 20)):
        metrics = model.evaluate(X[rows], y[rows])
        expected.append(metrics["loss"] * (rows.stop - rows.start))
        model.train_step(model.device.asarray(X[rows], model.dtype),
                         model.device.asarray(np.eye(3)[y[rows]], model.dtype), 0.5)
    np.testing.assert_allclose(trainer.losses, expected, rtol=1e-5)
    assert abs(loss - sum(expected) / 20) < 1e-6 and 0 <= accuracy <= 1


def test_when_graphs_are_used():
    def fake(kind="cuda", fused=True, output="sigmoid"):
        device = Device(kind, 0, np) if kind == "cuda" else CPU  # the device and ops decide (Device.step_capture)
        ops = ArrayOps(np, None)
        ops.fused = fused
        return types.SimpleNamespace(device=device, ops=ops, output=output)

    assert _graph_capture(fake(), None) is not None  # the default on CUDA
    assert _graph_capture(fake(), True) is not None
    assert _graph_capture(fake(), False) is None
    assert _graph_capture(fake(kind="cpu"), True) is None
    assert _graph_capture(fake(fused=False), None) is None  # CuPy's unfused kernels allocate
    assert _graph_capture(fake(output="softmax"), None) is None
