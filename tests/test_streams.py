"""The order of the work around the training stream.

Without a GPU: a stand-in for CuPy's streams and events (``FakeCuda``) keeps, per stream,
the work queued on it, the events recorded and the event waits, and answers whether one
piece of work is ordered before another as CUDA would order them: in one stream, in
issue order; across streams, only through an event recorded on the first and waited on
by the second (the training stream is non-blocking: nothing orders it against the
legacy default stream implicitly). A ``Device`` built on it runs the real fit loop on
NumPy arrays, with every copy and fill logged as work on the stream current at the time.

On a GPU (``gpu`` mark): a large X copied and trained on at once, a large result
read at once after the stream is left.
"""
from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest

from gpu_backprop import MLP
from gpu_backprop.device import Device, get_device
from gpu_backprop.ops import NumpyOps
from gpu_backprop.train import fit


class Work:
    def __init__(self, name: str, stream: "FakeStream", index: int):
        self.name, self.stream, self.index = name, stream, index

    def __repr__(self) -> str:
        return f"<{self.name} on {self.stream.name} #{self.index}>"


class FakeEvent:
    def __init__(self, disable_timing: bool = False, **_: object):
        self.at: tuple | None = None  # (stream, number of its items before the record)

    def record(self, stream: "FakeStream") -> None:  # TrainingStream always names the stream
        stream.items.append(("record", self))
        self.at = (stream, len(stream.items) - 1)


class FakeStream:
    """A stream's queue: items are ('work', Work), ('record', event), ('wait', (stream, position))."""

    def __init__(self, cuda: "FakeCuda", name: str, ptr: int, non_blocking: bool = False):
        self.cuda, self.name, self.ptr, self.non_blocking = cuda, name, ptr, non_blocking
        self.items: list = []
        self.captured: list | None = None  # the work of a capture in progress

    def enqueue(self, name: str) -> Work:
        if self.captured is not None:  # captured into the graph, not run now
            self.captured.append(name)
            return Work(name, self, -1)
        work = Work(name, self, len(self.items))
        self.items.append(("work", work))
        self.cuda.log.append(work)
        return work

    def record(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event or FakeEvent()
        event.record(self)
        return event

    def wait_event(self, event: FakeEvent) -> None:
        if self.captured is not None:
            raise RuntimeError("cudaErrorStreamCaptureIsolation: a wait on outside work inside a capture")
        self.items.append(("wait", event.at))  # the event's state now: a later record does not change it

    def synchronize(self) -> None:
        pass  # a host wait is not credited as ordering: the tests ask for device-side order

    def __enter__(self) -> "FakeStream":
        self.cuda.stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.cuda.stack.pop() is self

    def begin_capture(self) -> None:
        self.captured = []

    def end_capture(self) -> types.SimpleNamespace:
        names, self.captured = self.captured, None
        return types.SimpleNamespace(launch=lambda stream: stream.enqueue("replay of " + "+".join(names)))


class FakeCuda:
    """What Device and TrainingStream use of ``cupy.cuda``; ``log`` lists all work in issue order."""

    def __init__(self):
        self.null = FakeStream(self, "null", 0)
        self.stack = [self.null]
        self.log: list[Work] = []
        self.Event = FakeEvent
        self.streams = 0

    def get_current_stream(self) -> FakeStream:
        return self.stack[-1]

    def Stream(self, non_blocking: bool = False) -> FakeStream:  # noqa: N802 (CuPy's name)
        self.streams += 1
        return FakeStream(self, f"stream{self.streams}", 0x1000 * self.streams, non_blocking)

    def Device(self, index: int) -> contextlib.nullcontext:  # noqa: N802
        return contextlib.nullcontext()

    def work(self, name: str) -> Work:
        return self.stack[-1].enqueue(name)

    @staticmethod
    def ordered(a: Work, b: Work) -> bool:
        """Whether ``a`` completes before ``b`` starts, by stream order and event waits alone."""
        if a.stream is b.stream:
            return a.index < b.index
        reach = {b.stream: b.index}  # per stream: how many of its first items b waits for
        todo = [b.stream]
        while todo:
            stream = todo.pop()
            for kind, arg in stream.items[:reach[stream]]:
                if kind == "wait" and arg is not None:
                    source, position = arg
                    if position > reach.get(source, -1):
                        reach[source] = position
                        todo.append(source)
        return reach.get(a.stream, -1) > a.index


def fake_cupy(cuda: FakeCuda) -> types.ModuleType:
    """NumPy with ``cuda``; the functions that copy or fill on a GPU log that work on the current stream."""
    xp = types.ModuleType("fakecupy")
    xp.__getattr__ = lambda name: getattr(np, name)  # module __getattr__: the rest is NumPy's
    xp.cuda = cuda
    xp.ndarray = np.ndarray

    def logged(name, fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            cuda.work(f"{name} {getattr(out, 'shape', '')}")
            return out
        return call

    xp.asarray = logged("copy", lambda a, dtype=None: np.array(a, dtype=dtype))  # a host-to-device copy
    for name in ("zeros", "zeros_like", "ones", "full", "full_like", "arange"):
        setattr(xp, name, logged(name, getattr(np, name)))
    return xp


@pytest.fixture
def gpu_stand_in():
    cuda = FakeCuda()
    device = Device("cuda", 0, fake_cupy(cuda), "stand-in")
    device._cache[("ops", True, "fp32")] = NumpyOps()  # the twin's math on the stand-in's arrays
    return device, cuda


def test_the_training_stream_waits_for_the_work_before_it_and_is_waited_for_after(gpu_stand_in):
    device, cuda = gpu_stand_in
    copy = cuda.work("copy X")
    with device.stream() as stream:
        assert cuda.get_current_stream() is stream.raw and stream.raw.non_blocking
        step = cuda.work("step")
    assert cuda.get_current_stream() is cuda.null
    read = cuda.work("read W")
    assert cuda.ordered(copy, step) and cuda.ordered(step, read)
    assert not cuda.ordered(step, copy)  # the stand-in can say no
    with device.stream():  # every entry, not only the first
        again = cuda.work("step")
    assert cuda.ordered(read, again)


def test_entering_from_inside_and_from_another_stream(gpu_stand_in):
    device, cuda = gpu_stand_in
    side = cuda.Stream(non_blocking=True)
    with device.stream() as stream:
        first = cuda.work("step")
        with device.stream():  # from inside: no wait on itself, and the right stream restored
            second = cuda.work("step")
        assert cuda.get_current_stream() is stream.raw
        with side:
            copy = cuda.work("copy on a side stream")
            with device.stream():
                third = cuda.work("step")
            assert cuda.get_current_stream() is side
            read = cuda.work("read on the side stream")
    assert cuda.get_current_stream() is cuda.null
    assert all(item[0] != "wait" or item[1][0] is not stream.raw for item in stream.raw.items)
    assert cuda.ordered(first, second) and cuda.ordered(copy, third) and cuda.ordered(third, read)


def test_replays_of_a_captured_step_are_ordered_after_the_copies(gpu_stand_in):
    device, cuda = gpu_stand_in
    copy = cuda.work("copy X")
    with device.stream():
        replay = device.capture(lambda: cuda.work("kernel"))  # captured: nothing runs
        assert [w.name for w in cuda.log] == ["copy X"]
        replay()
    assert [w.name for w in cuda.log] == ["copy X", "replay of kernel"]
    assert cuda.ordered(copy, cuda.log[-1])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fit_orders_every_copy_before_the_steps_and_the_steps_before_what_follows(gpu_stand_in, monkeypatch,
                                                                                    momentum):
    device, cuda = gpu_stand_in
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
    model = MLP([6, 5, 3], device=device, seed=1)
    train_step = model.train_step

    def logged_step(*args, **kwargs):
        cuda.work("step")
        return train_step(*args, **kwargs)

    monkeypatch.setattr(model, "train_step", logged_step)
    model.fit(X, y, epochs=2, batch_size=16, lr=0.5, momentum=momentum, graphs=False)
    read = cuda.work("read W")  # what get_params / predict would copy back
    steps = [w for w in cuda.log if w.name == "step"]
    first = cuda.log.index(steps[0])
    before = cuda.log[:first]
    assert len(steps) == 2 * 3 and all(s.stream.non_blocking for s in steps)
    # what the steps read: X and Y, the weights, the fit's counters and buffers
    assert {w.name.split()[0] for w in before} >= {"copy", "zeros"} and len(before) >= 4
    unordered = [(w, s) for w in before for s in steps if not cuda.ordered(w, s)]
    assert unordered == []
    assert all(cuda.ordered(s, read) for s in steps)
    # the stand-in would have seen the race: those copies ran on the default stream
    assert all(w.stream is cuda.null for w in before)


# -- on a GPU -------------------------------------------------------------------------------

def _cpu_reference(X, y, sizes, batch):
    model = MLP(sizes, device="cpu", seed=3)
    model.fit(X, y, epochs=1, batch_size=batch, lr=0.5, shuffle=True, seed=4)
    return model.get_params()


@pytest.mark.gpu
def test_a_large_x_trained_on_at_once_is_read_after_its_copy_lands():
    """CuPy copies a host array through a pinned buffer, asynchronously on the current (default)
    stream; a 256 MB X takes milliseconds to land, the first gather starts within microseconds
    of entering the training stream. The block X lands in held NaN just before (the memory
    pool hands the freed block back for the same size), so a read before the copy lands
    shows as a diverged fit or parameters off the CPU's."""
    device = get_device("cuda")
    xp = device.xp
    n, d, batch, sizes = 65536, 1024, 4096, [1024, 8, 3]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 3, n)
    expected = _cpu_reference(X, y, sizes, batch)
    warm = MLP(sizes, device="cuda", seed=3)  # compile and tune first: the race is in the copy, not in NVRTC
    warm.fit(X[: 2 * batch], y[: 2 * batch], epochs=1, batch_size=batch, lr=0.5, seed=4)
    device.synchronize()
    for attempt in range(4):
        poison = xp.full((n, d), np.nan, dtype=np.float32)  # the block X will be copied into
        del poison
        model = MLP(sizes, device="cuda", seed=3)
        fit(model, X, y, epochs=1, batch_size=batch, lr=0.5, shuffle=True, seed=4)  # raises if it read NaN
        got = model.get_params()
        for key, value in expected.items():
            scale = np.abs(value).max() + 1e-30
            assert np.abs(got[key] - value).max() / scale < 1e-4, (attempt, key)


@pytest.mark.gpu
def test_a_result_of_the_training_stream_is_read_after_it_is_written():
    """Leaving the training stream makes the default stream wait for it: a large product
    written on the training stream and copied back at once on the default stream is complete."""
    device = get_device("cuda")
    xp = device.xp
    a = xp.asarray(np.random.default_rng(1).standard_normal((4096, 4096)).astype(np.float32))
    out = xp.zeros((4096, 4096), dtype=np.float32)
    xp.matmul(a, a, out=out)  # warm cuBLAS
    device.synchronize()
    expected = out.get()
    for attempt in range(4):
        out.fill(0)
        device.synchronize()
        with device.stream():
            for _ in range(8):  # tens of milliseconds of work queued on the training stream
                xp.matmul(a, a, out=out)
        got = out.get()  # on the default stream, at once
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3, err_msg=f"attempt {attempt}")
