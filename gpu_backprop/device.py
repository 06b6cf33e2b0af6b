"""The one place that decides where arrays live: NumPy on the CPU or CuPy on a GPU.

Everything else receives a :class:`Device` and uses ``device.xp`` (the array
module) and ``device.ops`` (the operations for that array module); nothing
outside this module asks whether a GPU exists.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import numpy as np

ENV_VAR = "GPU_BACKPROP_DEVICE"
INSTALL_HINT = 'pip install "gpu_backprop[cuda13]" (or [cuda12] for a CUDA 12 driver)'

log = logging.getLogger("gpu_backprop")
_announced: set[str] = set()


class DeviceError(RuntimeError):
    """A requested device cannot be used; the message names the cause and the fix."""


@dataclass(frozen=True)
class Device:
    """Where arrays live and which operations run on them.

    ``kind`` is "cpu" or "cuda"; ``xp`` is numpy or cupy; ``reason`` says why
    this device was chosen (shown by ``gpu-backprop info``).
    """

    kind: str
    index: int | None
    xp: ModuleType
    reason: str = ""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def __str__(self) -> str:
        return self.name

    def ops(self, fused: bool = True, precision: str = "fp32"):
        """The operations for this device: the NumPy twin on the CPU, the fused
        CUDA kernels on a GPU (or the unfused CuPy path when ``fused=False``)."""
        key = ("ops", bool(fused), precision)
        if key not in self._cache:
            from .ops import make_ops

            self._cache[key] = make_ops(self, fused=bool(fused), precision=precision)
        return self._cache[key]

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` on this device as a C-contiguous array (no copy when it already is one).

        CuPy and PyTorch tensors come in through DLPack without a copy when
        they already live on this device.
        """
        return to_device(x, self, dtype)

    def synchronize(self) -> None:
        if self.kind == "cuda":
            self.xp.cuda.get_current_stream().synchronize()

    def stream(self) -> "TrainingStream | contextlib.nullcontext":
        """Context in which training runs: on CUDA a non-blocking stream of our own
        (graphs cannot be captured on the default stream), kept in order with the work
        issued before and after it (see :class:`TrainingStream`); nothing on the CPU."""
        if self.kind != "cuda":
            return contextlib.nullcontext()
        if "stream" not in self._cache:
            with self.xp.cuda.Device(self.index):
                self._cache["stream"] = TrainingStream(self.xp, self.xp.cuda.Stream(non_blocking=True), self.index)
        return self._cache["stream"]

    def step_capture(self, ops: Any, output: str) -> tuple[Callable | None, str]:
        """How a training step on ``ops`` whose net ends in ``output`` is captured into a CUDA
        graph: (:meth:`capture`, "") where it can be, else (None, why not); why not is ""
        on the CPU, which has no graphs to decline."""
        if self.kind != "cuda":
            return None, ""
        why_not = ops.capture_blocker(output)
        return (None, why_not) if why_not else (self.capture, "")

    def time_step(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn`` takes to run, from issue to completion: CUDA events around it on the
        current stream (the host waits for the end), or the host clock on the CPU."""
        if self.kind != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        cuda = self.xp.cuda
        start, stop = cuda.Event(), cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return cuda.get_elapsed_time(start, stop) / 1e3

    def capture(self, fn: Callable[[], Any]) -> Callable[[], None] | None:
        """Record the kernels ``fn`` launches into a CUDA graph (nothing runs now) and
        return a function that replays them; None on the CPU, where there are no graphs.

        Must be called inside :meth:`stream`; every buffer ``fn`` touches must
        outlive the graph, which bakes in their addresses.
        """
        if self.kind != "cuda":
            return None
        stream = self.stream().raw  # inside stream() already: ordered, and no waits inside a capture
        with stream:
            stream.begin_capture()
            try:
                fn()
            finally:
                graph = stream.end_capture()
        return lambda: graph.launch(stream)


class TrainingStream:
    """The training stream (a non-blocking CuPy stream, ``raw``) as a reusable context that
    keeps the order of the work around it.

    A non-blocking stream does not synchronise with the legacy default stream, where the
    copies before training run (X, Y, the weights, the fit's buffers: CuPy's host-to-device
    copies are asynchronous); so entering records an event on the stream that is current
    and makes ours wait on it, and leaving makes that stream wait on ours, so what is read
    afterwards (predict, evaluate, get_params) sees every update. Both waits are on the
    device; the host does not block.
    """

    def __init__(self, xp: ModuleType, raw: Any, index: int):
        self.xp, self.raw, self.index = xp, raw, index
        self._local = threading.local()  # CuPy's current stream is per thread: so is what we restore

    def _state(self) -> Any:
        local = self._local
        if not hasattr(local, "outer"):
            # Two events per thread, recorded again at each entry and exit: a wait binds to the
            # work an event held when the wait was issued, so re-recording one is safe.
            with self.xp.cuda.Device(self.index):  # an event is recorded on streams of its own device
                local.outer, local.events = [], (self.xp.cuda.Event(disable_timing=True),
                                                 self.xp.cuda.Event(disable_timing=True))
        return local

    def __enter__(self) -> "TrainingStream":
        state = self._state()
        outer = self.xp.cuda.get_current_stream()
        if outer.ptr != self.raw.ptr:  # entered again from inside: already in order
            self.raw.wait_event(outer.record(state.events[0]))
        self.raw.__enter__()
        state.outer.append(outer)
        return self

    def __exit__(self, *exc: Any) -> None:
        state = self._state()
        self.raw.__exit__(*exc)
        outer = state.outer.pop()
        if outer.ptr != self.raw.ptr:
            outer.wait_event(self.raw.record(state.events[1]))

    def synchronize(self) -> None:
        """Block the host until the work queued on the stream is done."""
        self.raw.synchronize()


CPU = Device("cpu", None, np, "requested")


def _cuda_error_name(exc: BaseException) -> str:
    """'cudaErrorInsufficientDriver' out of CuPy's 'cudaErrorX: long text'."""
    text = str(exc).strip() or type(exc).__name__
    return text.split(":", 1)[0].strip() if text.startswith("cuda") else text


def probe_cuda(index: int = 0) -> tuple[ModuleType | None, str]:
    """(cupy, "") when CUDA device ``index`` is usable, else (None, why not).

    ``import cupy`` succeeds on a machine without a GPU; what fails is the
    first runtime call (``cudaErrorInsufficientDriver``, ``cudaErrorNoDevice``)
    or, in older CuPy, ``is_available()`` itself. Every one of those is caught.
    """
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return None, "CuPy not installed"
    except Exception as exc:  # a broken CuPy install (missing CUDA libraries)
        return None, f"CuPy failed to import: {type(exc).__name__}: {exc}"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return None, f"no CUDA device: {_cuda_error_name(exc)}"
    if count == 0:
        return None, "no CUDA device: 0 devices visible"
    if not 0 <= index < count:
        return None, f"no CUDA device {index}: {count} device(s) visible"
    try:
        with cupy.cuda.Device(index):
            cupy.zeros(1, dtype=np.float32).sum().item()
    except Exception as exc:
        return None, f"CUDA device {index} unusable: {_cuda_error_name(exc)}"
    return cupy, ""


def _parse(spec: str) -> tuple[str, int | None]:
    spec = spec.strip().lower()
    if spec in ("auto", "cpu"):
        return spec, None
    if spec in ("cuda", "gpu"):
        return "cuda", 0
    if spec.startswith("cuda:"):
        tail = spec[5:]
        if tail.isdigit():
            return "cuda", int(tail)
    raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


def get_device(spec: "str | Device | None" = None) -> Device:
    """Resolve ``"auto" | "cpu" | "cuda" | "cuda:N"`` (default: $GPU_BACKPROP_DEVICE, else auto).

    ``auto`` takes CUDA device 0 when CuPy imports and the device answers, and
    the CPU otherwise; it says once, in one log line, which and why. An
    explicit ``cuda`` that cannot be used raises :class:`DeviceError`.
    """
    if isinstance(spec, Device):
        return spec
    if spec is None:
        spec = os.environ.get(ENV_VAR, "") or "auto"
    kind, index = _parse(spec)
    if kind == "cpu":
        return CPU
    cupy, why_not = probe_cuda(index or 0)
    if kind == "cuda":
        if cupy is None:
            raise DeviceError(f"device 'cuda:{index}' unavailable: {why_not}; "
                              f"to train on a GPU: {INSTALL_HINT} on a machine with an NVIDIA GPU, "
                              f"or use device='cpu'")
        return _cuda_device(cupy, index, "requested")
    if cupy is None:
        device = Device("cpu", None, np, why_not)
    else:
        device = _cuda_device(cupy, 0, f"CuPy found {_gpu_name(cupy, 0)}")
    _announce(f"device auto: {device.name} ({device.reason})")
    return device


_cuda_devices: dict = {}


def _cuda_device(cupy: ModuleType, index: int, reason: str) -> Device:
    """One Device per GPU and reason, so its compiled kernels, stream and tuning are shared."""
    key = (index, reason)
    if key not in _cuda_devices:
        _cuda_devices[key] = Device("cuda", index, cupy, reason)
    return _cuda_devices[key]


def _announce(message: str) -> None:
    if message not in _announced:
        _announced.add(message)
        log.info(message)


def _gpu_name(cupy: ModuleType, index: int) -> str:
    try:
        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return f"CUDA device {index}"


def describe(device: Device) -> dict[str, Any]:
    """Facts for ``gpu-backprop info``: versions, device, GPU name and memory."""
    info: dict[str, Any] = {"device": device.name, "reason": device.reason, "numpy": np.__version__}
    if device.kind == "cuda":
        cupy = device.xp
        props = cupy.cuda.runtime.getDeviceProperties(device.index)
        info.update(
            cupy=cupy.__version__,
            gpu=_gpu_name(cupy, device.index),
            gpu_memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
            compute_capability=f"{props['major']}.{props['minor']}",
            cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
        )
    return info


def get_array_module(*arrays: Any) -> ModuleType:
    """numpy or cupy, whichever the arrays belong to (CuPy's own rule)."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            return importlib.import_module("cupy")
    return np


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def to_device(x: Any, device: Device, dtype: Any = None) -> Any:
    """Array ``x`` on ``device``, C-contiguous, of ``dtype`` (copies only when needed)."""
    xp = device.xp
    if device.kind == "cuda":
        on_gpu = get_array_module(x) is not np or (_is_torch(x) and x.is_cuda)
        arr = xp.from_dlpack(x) if on_gpu and not isinstance(x, xp.ndarray) else x
        with xp.cuda.Device(device.index):
            arr = xp.asarray(arr, dtype=dtype)
            return xp.ascontiguousarray(arr)
    if _is_torch(x):
        x = np.from_dlpack(x.detach().cpu()) if x.requires_grad else np.from_dlpack(x.cpu())
    else:
        x = to_host(x)
    return np.ascontiguousarray(x, dtype=dtype)


def to_host(x: Any) -> np.ndarray:
    """A NumPy array with the contents of ``x`` (a copy only when ``x`` is on a GPU)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
