"""The per-shape path choice: timed once, cached on disk, off with GPU_BACKPROP_AUTOTUNE=0."""
import json
import logging
import types

import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops import cuda
from gpu_backprop.ops.autotune import Tuner, device_key

TIMES = {"small": 3.0, "large": 2.0, "cublas": 1.0}


def fake_timer(record):
    def timer(fn):
        fn()
        return TIMES[record[-1]]
    return timer


def test_fastest_candidate_is_chosen_and_cached(tmp_path):
    record = []
    tuner = Tuner("H100", fake_timer(record), enabled=True, path=tmp_path / "a.json")
    choice = tuner.choose("forward|float32|256x1024x784", list(TIMES), record.append, default="small")
    assert choice == "cublas" and record == list(TIMES)
    assert json.loads((tmp_path / "a.json").read_text()) == {"H100": {"forward|float32|256x1024x784": "cublas"}}
    again = Tuner("H100", fake_timer(record), enabled=True, path=tmp_path / "a.json")
    record.clear()
    assert again.choose("forward|float32|256x1024x784", list(TIMES), record.append, default="small") == "cublas"
    assert record == []  # from the cache: nothing timed
    other_card = Tuner("H200", fake_timer(record), enabled=True, path=tmp_path / "a.json")
    other_card.choose("forward|float32|256x1024x784", list(TIMES), record.append, default="small")
    assert record == list(TIMES)  # another device tunes for itself
    assert set(json.loads((tmp_path / "a.json").read_text())) == {"H100", "H200"}


def test_environment_turns_tuning_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_BACKPROP_AUTOTUNE", "0")
    record = []
    tuner = Tuner("H100", fake_timer(record), path=tmp_path / "a.json")
    assert tuner.choose("k", list(TIMES), record.append, default="large") == "large"
    assert record == [] and not (tmp_path / "a.json").exists()


def test_unwritable_cache_is_only_logged(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    record = []
    tuner = Tuner("H100", fake_timer(record), enabled=True, path=blocker / "sub" / "a.json")
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        assert tuner.choose("k", list(TIMES), record.append, default="small") == "cublas"
    assert any("cache not written" in r.getMessage() for r in caplog.records)


def test_corrupt_cache_is_ignored(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{not json")
    record = []
    assert Tuner("H100", fake_timer(record), enabled=True, path=path).choose(
        "k", list(TIMES), record.append, default="small") == "cublas"
    assert json.loads(path.read_text()) == {"H100": {"k": "cublas"}}


def test_a_candidate_that_fails_is_skipped(tmp_path, caplog):
    record = []

    def trial(candidate):
        record.append(candidate)
        if candidate == "cublas":
            raise AttributeError("module has no attribute 'setMathMode'")

    tuner = Tuner("H100", fake_timer(record), enabled=True, path=tmp_path / "a.json")
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        assert tuner.choose("k", list(TIMES), trial, default="small") == "large"
    assert "cublas failed (AttributeError" in caplog.text
    assert json.loads((tmp_path / "a.json").read_text()) == {"H100": {"k": "large"}}

    def broken(candidate):
        raise RuntimeError("no kernel")

    assert Tuner("H100", fake_timer(record), enabled=True, path=tmp_path / "b.json").choose(
        "k", list(TIMES), broken, default="small") == "small"


def fake_cupy(version="14.0.0", driver=13000, runtime=12090):
    """What device_key reads of CuPy: its version and the CUDA driver and runtime versions."""
    runtime_api = types.SimpleNamespace(driverGetVersion=lambda: driver, runtimeGetVersion=lambda: runtime)
    return types.SimpleNamespace(__name__="cupy", __version__=version, cuda=types.SimpleNamespace(runtime=runtime_api))


def loader(name="NVIDIA H100 80GB HBM3", xp=None, record=None):
    return types.SimpleNamespace(name=name, xp=xp or fake_cupy(), time=fake_timer(record or []), sm_count=132)


@pytest.fixture
def kernel_copy(tmp_path, monkeypatch):
    """A copy of the kernel sources that the key is computed from (and a test may edit)."""
    copy = tmp_path / "kernels"
    copy.mkdir()
    for source in cuda.kernels_dir().iterdir():
        if source.name.endswith((".cu", ".cuh")):
            (copy / source.name).write_text(source.read_text())
    monkeypatch.setattr(cuda, "kernels_dir", lambda: copy)
    return copy


def test_a_kernel_change_gives_another_key_and_the_stale_choice_is_measured_again(kernel_copy, tmp_path):
    before = device_key(loader())
    assert before == device_key(loader())  # the same sources: the same key, from one process to the next
    # a header only reaches NVRTC inlined into the .cu files: the key must see it too
    header = kernel_copy / "gemm_tile.cuh"
    header.write_text(header.read_text() + "\n// any edit\n")
    after = device_key(loader())
    assert after != before
    path = tmp_path / "a.json"
    path.write_text(json.dumps({before: {"k": "small"}}))
    record = []
    assert Tuner(before, fake_timer(record), enabled=True, path=path).choose(
        "k", list(TIMES), record.append, default="large") == "small" and record == []
    assert Tuner(after, fake_timer(record), enabled=True, path=path).choose(
        "k", list(TIMES), record.append, default="large") == "cublas" and record == list(TIMES)
    assert json.loads(path.read_text()) == {before: {"k": "small"}, after: {"k": "cublas"}}


def test_the_key_names_the_card_and_the_software(kernel_copy):
    key = device_key(loader())
    assert key.startswith("NVIDIA H100 80GB HBM3 | cupy 14.0.0, driver 13000, runtime 12090 | kernels ")
    others = [loader(name="NVIDIA H200"), loader(xp=fake_cupy(version="13.6.0")),
              loader(xp=fake_cupy(driver=12080)), loader(xp=fake_cupy(runtime=13000))]
    assert len({key, *map(device_key, others)}) == 1 + len(others)
    assert device_key(loader(name="emulator", xp=np)) == f"emulator | numpy {np.__version__} | kernels {key[-16:]}"


def test_the_launchers_tune_under_the_device_key(kernel_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_BACKPROP_CACHE", str(tmp_path))
    monkeypatch.delenv("GPU_BACKPROP_AUTOTUNE", raising=False)
    stub = loader(xp=np)
    ops = cuda.CudaOps(np, scipy.special, stub)
    assert ops.tuner.enabled and ops.tuner.device_name == device_key(stub) and ops.tuner.timer is stub.time
    assert ops.tuner.path == tmp_path / "autotune.json"


@pytest.mark.parametrize("content", [
    {"H100": [1, 2]},                        # an entry that is not a table
    {"H100": "cublas"},
    {"H100": None},
    {"H100": {"k": [1, 2], "j": "large"}},   # choices that are not names (the good one stays)
    {"H100": {"k": 3}},
    [1, 2],                                  # a file that is not a table of entries
    "H100",
])
def test_corrupt_entries_are_ignored_with_one_log_line(tmp_path, caplog, content):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(content))
    record = []
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        tuner = Tuner("H100", fake_timer(record), enabled=True, path=path)
    assert len(caplog.records) == 1 and "ignored" in caplog.text and str(path) in caplog.text
    kept = {"j": "large"} if "j" in str(content) else {}
    assert tuner.choices == kept
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        assert tuner.choose("k", list(TIMES), record.append, default="small") == "cublas"
    assert record == list(TIMES)
    assert "not written" not in caplog.text and "ignored" not in caplog.text  # saved, and said once
    saved = json.loads(path.read_text())
    assert saved["H100"] == {**kept, "k": "cublas"}


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b""])
def test_a_file_that_is_not_json_is_ignored_with_one_log_line(tmp_path, caplog, raw):
    path = tmp_path / "a.json"
    path.write_bytes(raw)
    record = []
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        tuner = Tuner("H100", fake_timer(record), enabled=True, path=path)
    assert len(caplog.records) == 1 and "ignored" in caplog.text and tuner.choices == {}
    assert tuner.choose("k", list(TIMES), record.append, default="small") == "cublas"
    assert json.loads(path.read_text()) == {"H100": {"k": "cublas"}}


def test_another_devices_corrupt_entry_is_left_alone(tmp_path, caplog):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"H200": [1, 2], "H100": {"j": "large"}}))
    record = []
    with caplog.at_level(logging.INFO, logger="gpu_backprop"):
        tuner = Tuner("H100", fake_timer(record), enabled=True, path=path)
        tuner.choose("k", list(TIMES), record.append, default="small")
    assert "ignored" not in caplog.text  # not ours to judge: its own tuner says so
    assert json.loads(path.read_text()) == {"H200": [1, 2], "H100": {"j": "large", "k": "cublas"}}


def test_the_capturable_mode_keeps_cublas_out_under_a_key_of_its_own(tmp_path):
    """CuPy refuses cuBLAS calls inside a CUDA-graph capture: in ``capturable()`` the tuner
    chooses among our kernels only, and keeps that choice beside the free one. Planted faults:
    cuBLAS left among the candidates; the same key for both (each mode would re-tune the other's)."""
    tried = []

    def timer(fn):
        fn()
        return {"cublas": 1.0, "cublas_tf32": 1.0, "large": 2.0}.get(tried[-1], 3.0)

    tuner = Tuner("H100", timer, enabled=True, path=tmp_path / "a.json")
    stub = loader(xp=np)
    args = ("weight_grad", np.float32, 64, 64, 4096, None, tried.append)
    ops = cuda.CudaOps(np, scipy.special, stub, tuner=tuner)
    ops.tune_min_fma = 0  # tune this small shape too
    assert ops.gemm_path(*args) == "cublas" and "cublas" in tried
    tried.clear()
    with ops.capturable():
        assert ops.gemm_path(*args) == "large"
    assert tried and "cublas" not in tried
    tried.clear()
    assert ops.gemm_path(*args) == "cublas" and tried == []  # both choices kept: nothing timed again
    tf32 = cuda.CudaOps(np, scipy.special, stub, tuner=tuner, precision="tf32")
    tf32.tune_min_fma = 0
    with tf32.capturable():
        assert tf32.gemm_path(*args) == "tf32"
    # our tensor cores, whole or split-K, are the capturable TF32 paths: timed, cuBLAS's TF32 mode not
    assert tried == ["tf32", *cuda.split_paths(4096, tf32=True)]
    assert json.loads((tmp_path / "a.json").read_text())["H100"] == {
        "weight_grad|float32|64x64x4096": "cublas", "weight_grad|float32|64x64x4096|graph": "large",
        "weight_grad|tf32|64x64x4096|graph": "tf32"}


def test_cublas_tf32_sets_the_math_mode_by_its_value_and_restores_it(monkeypatch):
    """CuPy 14's cublas module has no CUBLAS_TF32_TENSOR_OP_MATH (the first H100 run failed on
    it): the loader sets cublas_api.h's value, 3, for the call only. Planted fault: the
    attribute read from CuPy (AttributeError here, as on the card)."""
    import sys

    modes, calls = [0], []
    lib = types.SimpleNamespace(CUBLAS_TENSOR_OP_MATH=1, getMathMode=lambda h: modes[-1],
                                setMathMode=lambda h, m: modes.append(m))
    fake = types.SimpleNamespace(gemm=lambda *a, **k: calls.append((a[:2], modes[-1])) or "out")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cublas=fake))
    monkeypatch.setitem(sys.modules, "cupy.cublas", fake)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", types.SimpleNamespace(cublas=lib))
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.cublas", lib)
    monkeypatch.setitem(sys.modules, "cupy_backends", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda", types.SimpleNamespace(libs=sys.modules["cupy_backends.cuda.libs"]))
    runtime = types.SimpleNamespace(getDeviceProperties=lambda i: {"multiProcessorCount": 132, "name": b"H100",
                                                                      "major": 9, "minor": 0})
    xp = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, device=types.SimpleNamespace(
        get_cublas_handle=lambda: 7)))
    gemm = cuda.CupyLoader(xp, 0).gemm
    assert gemm(1, 2, None, trans_a=True, tf32=True) == "out"
    assert calls == [(("T", "N"), 3)] and modes == [0, 3, 0]
    gemm(1, 2, None)
    assert calls[-1] == (("N", "N"), 0)


def test_small_gemms_run_untuned_on_the_default_tile(tmp_path):
    """Below TUNE_MIN_FMA multiply-adds the tuner is offered the default tile alone and times
    nothing (a cold start would compile every tile for GEMMs of microseconds); at it, every
    path. Planted fault: the threshold removed."""
    ran = []
    ops = cuda.CudaOps(np, scipy.special, loader(xp=np),
                       tuner=Tuner("H100", fake_timer(ran), enabled=True, path=tmp_path / "a.json"))
    small = cuda.TUNE_MIN_FMA // (64 * 64) - 1
    assert ops.gemm_path("forward", np.float32, small, 64, 64, None, ran.append) == ops.gemm_config(small, 64)
    assert ran == [] and not (tmp_path / "a.json").exists()
    ops.gemm_path("forward", np.float32, small + 1, 64, 64, None, ran.append)
    assert set(ran) == set(cuda.PATHS)  # every path tried (those fake_timer lacks are skipped)


def test_the_loader_compiles_each_kernel_alone(kernel_copy):
    """A cold start compiles only the instantiations it launches (the first H100 run: 84 s before
    the first digits epoch with whole files compiled). Planted fault: a module per file again."""
    built = []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            built.append(tuple(name_expressions))

        def get_function(self, name):
            return name

    runtime = types.SimpleNamespace(getDeviceProperties=lambda i: {"multiProcessorCount": 132, "name": b"H100",
                                                                      "major": 9, "minor": 0})
    xp = types.SimpleNamespace(RawModule=RawModule, cuda=types.SimpleNamespace(runtime=runtime))
    cupy_loader = cuda.CupyLoader(xp, 0)
    names = cuda.names_in("forward.cu")
    assert cupy_loader.function("forward.cu", names[0], names) == names[0]
    assert cupy_loader.function("forward.cu", names[0], names) == names[0]  # compiled once
    cupy_loader.function("forward.cu", names[3], names)
    assert built == [(names[0],), (names[3],)]
    with pytest.raises(ValueError, match="not a kernel of forward.cu"):
        cupy_loader.function("forward.cu", "forward<half, X>", names)
