"""Device selection without a GPU: CuPy absent, CuPy present with no usable device."""
import logging
import sys
import types

import numpy as np
import pytest

from gpu_backprop import device as device_mod
from gpu_backprop.device import Device, DeviceError, get_array_module, get_device, to_device, to_host
from gpu_backprop.ops import ArrayOps, NumpyOps


class CUDARuntimeError(RuntimeError):
    """Shaped like cupy_backends.cuda.api.runtime.CUDARuntimeError."""


def fake_cupy(count_error=None, count=0, old_is_available_raises=False):
    cupy = types.ModuleType("cupy")
    runtime = types.SimpleNamespace()

    def get_device_count():
        if count_error:
            raise CUDARuntimeError(count_error)
        return count

    runtime.getDeviceCount = get_device_count
    cupy.cuda = types.SimpleNamespace(runtime=runtime)

    def is_available():
        if old_is_available_raises:
            raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return False

    cupy.is_available = is_available
    return cupy


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.delenv(device_mod.ENV_VAR, raising=False)


def test_auto_without_cupy_picks_cpu_and_says_why(no_cupy, caplog):
    device_mod._announced.clear()
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        dev = get_device("auto")
        get_device("auto")
    assert dev.kind == "cpu" and dev.xp is np
    assert dev.reason == "CuPy not installed"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["device auto: cpu (CuPy not installed)"]  # once, in one line


def test_explicit_cuda_without_cupy_names_cause_and_fix(no_cupy):
    with pytest.raises(DeviceError) as info:
        get_device("cuda")
    message = str(info.value)
    assert "CuPy not installed" in message and 'pip install "gpu_backprop[cuda13]"' in message


@pytest.mark.parametrize("fake,reason", [
    (fake_cupy("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"),
     "no CUDA device: cudaErrorInsufficientDriver"),
    (fake_cupy("cudaErrorNoDevice: no CUDA-capable device is detected"), "no CUDA device: cudaErrorNoDevice"),
    (fake_cupy(count=0, old_is_available_raises=True), "no CUDA device: 0 devices visible"),
])
def test_cupy_present_without_gpu(monkeypatch, fake, reason):
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delenv(device_mod.ENV_VAR, raising=False)
    dev = get_device()
    assert dev.kind == "cpu" and dev.reason == reason
    with pytest.raises(DeviceError, match=reason):
        get_device("cuda:0")


def test_cupy_failing_to_import(monkeypatch):
    import importlib

    real = importlib.import_module

    def broken(name, *args):
        if name == "cupy":
            raise OSError("libcudart.so.13: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(device_mod.importlib, "import_module", broken)
    dev = get_device("auto")
    assert dev.kind == "cpu" and dev.reason.startswith("CuPy failed to import: OSError")


def test_device_index_out_of_range(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(count=1))
    with pytest.raises(DeviceError, match="no CUDA device 3: 1 device"):
        get_device("cuda:3")


def test_environment_variable_sets_the_default(no_cupy, monkeypatch):
    monkeypatch.setenv(device_mod.ENV_VAR, "cpu")
    assert get_device().reason == "requested"
    monkeypatch.setenv(device_mod.ENV_VAR, "cuda")
    with pytest.raises(DeviceError):
        get_device()
    monkeypatch.setenv(device_mod.ENV_VAR, "quantum")
    with pytest.raises(ValueError, match="device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        get_device()


def test_cpu_transfers_do_not_copy_contiguous_arrays():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert to_device(x, get_device("cpu"), np.float32) is x
    assert to_host(x) is x
    strided = np.arange(12.0).reshape(3, 4)[:, ::2]
    moved = to_device(strided, get_device("cpu"), np.float64)
    assert moved.flags.c_contiguous and np.array_equal(moved, strided)
    assert get_array_module(x) is np


def test_torch_tensor_comes_in_through_dlpack_without_copy():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    moved = to_device(t, get_device("cpu"), np.float32)
    assert np.shares_memory(moved, t.numpy())
    assert np.array_equal(to_host(t), t.numpy())


class FusedStandIn(ArrayOps):
    """Operations that say they are fused, as the CUDA launchers do (no GPU needed to ask)."""

    fused = True


@pytest.mark.parametrize("ops,output,why_not", [
    (FusedStandIn(np, None), "sigmoid", ""),
    (FusedStandIn(np, None), "identity", ""),
    (FusedStandIn(np, None), "softmax", "softmax"),  # CuPy's softmax allocates: no capture
    (ArrayOps(np, None), "sigmoid", "the unfused path"),  # so do all of CuPy's kernels
    (ArrayOps(np, None), "softmax", "the unfused path"),
])
def test_which_training_steps_a_device_captures(ops, output, why_not):
    cuda = Device("cuda", 0, np, "stand-in")
    capture, reason = cuda.step_capture(ops, output)
    assert reason == why_not
    assert capture == (None if why_not else cuda.capture)
    assert get_device("cpu").step_capture(ops, output) == (None, "")  # no graphs, nothing to decline


def test_fit_asks_the_device_and_says_why_not_when_graphs_were_asked_for(caplog):
    from gpu_backprop.train import _graph_capture

    cuda = Device("cuda", 0, np, "stand-in")

    def model(device, ops, output="sigmoid"):
        return types.SimpleNamespace(device=device, ops=ops, output=output)

    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        assert _graph_capture(model(cuda, FusedStandIn(np, None)), None) == cuda.capture
        assert _graph_capture(model(cuda, FusedStandIn(np, None)), False) is None
        assert _graph_capture(model(cuda, FusedStandIn(np, None), "softmax"), None) is None
        assert _graph_capture(model(get_device("cpu"), NumpyOps()), True) is None
        assert caplog.records == []  # not asked for, or nothing to decline
        assert _graph_capture(model(cuda, FusedStandIn(np, None), "softmax"), True) is None
        assert _graph_capture(model(cuda, ArrayOps(np, None)), True) is None
    assert [r.getMessage() for r in caplog.records] == ["CUDA graphs: not for softmax; plain steps",
                                                        "CUDA graphs: not for the unfused path; plain steps"]
