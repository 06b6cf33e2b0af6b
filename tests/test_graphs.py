"""The bookkeeping of captured training steps, on the CPU: a stand-in capture that, as a CUDA
graph does, records the launches a step issues (on the ops object) without running them, and
whose replay runs exactly those launches again, with the arguments of the capture, on the
buffers as they are then. Host code of the step does not run at a replay, so a step that needs
it (a host-side value that changes from step to step) gives other numbers than plain steps."""
import inspect
import logging
import types

import numpy as np
import pytest

from gpu_backprop import MLP
from gpu_backprop.device import CPU, Device
from gpu_backprop.ops import ArrayOps
from gpu_backprop.train import StepRunner, Trainer, _graph_capture, fit


class GraphStandIn:
    """``capture(fn)`` for the CPU: while ``fn`` runs, every public method of ``target`` (the ops
    object: each call a kernel launch) is recorded, not run, and returns its ``out`` argument, as a
    launch inside a capture returns its output buffer unwritten. The replay re-issues the recorded
    calls in order, nothing else. (The CPU ops' methods that launch nothing anywhere but in bf16 on
    CUDA, PURE, run as they are.)"""

    PURE = ("storage_dtype", "as_stored")

    def __init__(self, target):
        self.target, self.graphs = target, []

    def __call__(self, fn):
        target, launches = self.target, []
        methods = [name for name, _ in inspect.getmembers(type(target), inspect.isfunction)
                   if not name.startswith("_") and name not in self.PURE]
        assert not set(methods) & set(vars(target)), "instance attributes would shadow the recorder"

        def recorder(name):
            signature = inspect.signature(getattr(target, name))

            def record(*args, **kwargs):
                launches.append((name, args, kwargs))
                return signature.bind(*args, **kwargs).arguments.get("out")
            return record

        for name in methods:
            setattr(target, name, recorder(name))
        try:
            fn()
        finally:
            for name in methods:
                delattr(target, name)
        assert launches, "the step issued no launch on the ops object"
        self.graphs.append(launches)

        def replay():
            for name, args, kwargs in launches:
                getattr(target, name)(*args, **kwargs)
        return replay


def data(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)), rng.integers(0, 3, n)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_replayed_steps_equal_plain_steps(momentum):
    X, y = data()
    params, histories = [], []
    for captured in (False, True):
        model = MLP([6, 5, 3], device="cpu", seed=1)
        capture = GraphStandIn(model.ops) if captured else None
        histories.append(fit(model, X, y, epochs=3, batch_size=7, lr=0.5, momentum=momentum, capture=capture))
        params.append(model.get_params())
        steps = model.last_steps
    for key in params[0]:
        np.testing.assert_array_equal(params[0][key], params[1][key])
    assert histories[1].loss == histories[0].loss and histories[1].accuracy == histories[0].accuracy
    # 20 samples in batches of 7: sizes 7, 7, 6; the short last batch has a graph of its own
    assert sorted(steps.replays) == [6, 7] and steps.captured == 2
    assert steps.replayed == 3 * 3 - 4  # every step after the second of each size is a replay
    # a step is its layers' forward and backward launches (2 layers), nothing on the host in between
    assert [[name for name, *_ in graph] for graph in capture.graphs] == [["forward", "forward", "backward", "backward"]] * 2


def test_a_step_that_needs_its_host_code_differs_when_replayed(monkeypatch):
    """The stand-in has teeth: a step that gathers its batch on the host (reading the device's
    counter there, as a CUDA graph never would) replays the captured batch's rows again, so the
    weights differ from plain steps, as they would on a GPU."""
    X, y = data(21)  # batches of 7 only: the capture's host gather (third batch) reads 7 rows
    plain = MLP([6, 5, 3], device="cpu", seed=1)
    fit(plain, X, y, epochs=3, batch_size=7, lr=0.5, capture=GraphStandIn(plain.ops))
    train_step = MLP.train_step

    def host_gather(self, xb, yb, lr, momentum=0.0, loss_out=None, record=None, gather=None, optimizer=None):
        rows = gather.order[int(gather.step[0]) * gather.stride:][:xb.shape[0]]  # host code: not in a graph
        xb[...], gather.yb[...] = gather.X[rows], gather.Y[rows]
        return train_step(self, xb, gather.yb, lr, momentum, loss_out, record, optimizer=optimizer)

    monkeypatch.setattr(MLP, "train_step", host_gather)
    results = []
    for capture in (None, GraphStandIn):
        model = MLP([6, 5, 3], device="cpu", seed=1)
        fit(model, X, y, epochs=3, batch_size=7, lr=0.5, capture=capture and capture(model.ops))
        results.append(model.get_params())
    for key, value in plain.get_params().items():
        np.testing.assert_array_equal(results[0][key], value)  # run plainly, the host gather is the same step
    assert any(not np.array_equal(results[1][key], value) for key, value in plain.get_params().items())


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
    built, host, ran = [], [], []
    buffer = np.zeros(1)

    class Launcher:  # an "ops" object with one launch, which reads a buffer when it runs
        def launch(self, batch, buf):
            ran.append((batch, buf[0]))

    launcher = Launcher()

    def make(batch):
        built.append(batch)

        def step():
            host.append(batch)
            launcher.launch(batch, buffer)
        return step

    runner = StepRunner(make, GraphStandIn(launcher))
    for value, batch in enumerate((7, 7, 7, 6, 7, 6)):
        buffer[0] = value
        runner(batch)
    assert built == [7, 6] and runner.captured == 2 and runner.replayed == 2
    assert host == [7, 7, 7, 6, 6, 6]  # plainly, at the step before the capture and at the capture; never at a replay
    assert ran == list(zip((7, 7, 7, 6, 7, 6), range(6)))  # each launch once per step, reading the buffer then


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


@pytest.mark.parametrize("faster", ["graph", "plain"])
def test_the_faster_of_replay_and_plain_step_runs_every_later_step(faster):
    """With a step timer (the card's), the third step is a timed replay, the fourth a timed
    plain step, and the faster runs from then on. Planted fault: the comparison reversed."""
    host, timed, modes = [], [], []

    class Launcher:
        def launch(self):
            pass

    launcher = Launcher()

    def make(batch):
        def step():
            host.append(batch)
            launcher.launch()
        return step

    def time(fn):
        kind = "plain" if fn is runner.steps[7] else "replay"
        timed.append(kind)
        fn()
        return {"graph": {"replay": 1.0, "plain": 2.0}, "plain": {"replay": 2.0, "plain": 1.0}}[faster][kind]

    class Mode:
        def __enter__(self):
            modes.append(len(host))

        def __exit__(self, *exc):
            pass

    runner = StepRunner(make, GraphStandIn(launcher), capturable=Mode, time=time)
    for _ in range(6):
        runner(7)
    assert timed == ["replay", "plain"] and runner.timings[7] == {"replay": 1.0 if faster == "graph" else 2.0,
                                                                  "plain": 2.0 if faster == "graph" else 1.0}
    assert modes == [1]  # the capturable mode wraps the second step and the capture, nothing else
    # plain steps: the first, the second, the capture's run of the host code, the timed fourth, and then ...
    assert len(host) == (4 if faster == "graph" else 6)
    assert runner.replayed == (3 if faster == "graph" else 1) and (runner.replays[7] is None) == (faster == "plain")


def test_the_capture_runs_in_the_capturable_mode_after_a_step_in_it():
    """Nothing may compile or tune inside a capture: the step before it runs in the same mode.
    Planted fault: capturing outside the mode (the tuner would choose cuBLAS inside the capture)."""
    events = []

    class Ops:
        mode = False

        def capturable(self):
            ops = self

            class Mode:
                def __enter__(self):
                    ops.mode = True

                def __exit__(self, *exc):
                    ops.mode = False
            return Mode()

        def launch(self):
            events.append(("launch", self.mode))

    ops = Ops()

    def capture(fn):
        events.append(("capture", ops.mode))
        return lambda: events.append(("replay", ops.mode))

    runner = StepRunner(lambda batch: ops.launch, capture, capturable=ops.capturable)
    for _ in range(3):
        runner(5)
    assert events == [("launch", False), ("launch", True), ("capture", True), ("replay", False)]
