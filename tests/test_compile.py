"""Every kernel source compiles for sm_80 and sm_90, with nvcc (to cubins, no register spills in
ptxas's report) and with NVRTC, what cupy.RawModule uses (to PTX for compute_80 and compute_90, every
name expression lowered to an entry; ptxas runs in nvcc's compile). The
ptxas report is printed (-s). The compiles run on tests/cubins.py's workers, beside the rest of the
suite."""
import concurrent.futures
import os
import re
import shutil
import subprocess
import threading

import pytest

from gpu_backprop.ops.cuda import KERNEL_FILES, SM90A_FILES, kernel_source, names_in

from . import cubins, nvrtc

ARCHS = ["sm_80", "sm_90"]
REPORT: list = []  # (compiler, arch, kernel, registers, smem, spill bytes) printed at the end of the run


def _require(found: bool, what: str) -> None:
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI")
        pytest.skip(f"{what} not found")


def check_report(report: str, names, compiler: str, arch: str) -> None:
    entries = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(entries) == len(names), report
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    usage = re.findall(r"Used (\d+) registers([^\n]*)", report)
    for entry, frame, (registers, rest) in zip(entries, frames, usage):
        smem = re.search(r"(\d+) bytes smem", rest)
        REPORT.append((compiler, arch, demangle(entry), int(registers), int(smem.group(1)) if smem else 0,
                       sum(map(int, frame))))
    assert frames and all(f == ("0", "0", "0") for f in frames), f"local memory or spills:\n{report}"


def demangle(symbol: str) -> str:
    """_Z7forwardIf4SimtIfLi64ELi64ELi16ELi4ELi4EEEv... -> forward<float, Simt<float, 64, 64, 16, 4, 4> >"""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return symbol
    name = subprocess.run([cxxfilt, symbol], capture_output=True, text=True).stdout.strip()
    return re.sub(r"\(.*\)$", "", name).replace("void ", "")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", KERNEL_FILES)
def test_nvcc_compiles(file, arch):
    _require(shutil.which("nvcc") is not None, "nvcc")
    result = cubins.nvcc_cubin(file, arch)  # the exact text NVRTC gets, every name expression instantiated
    print(result.report)
    assert result.returncode == 0, result.report
    check_report(result.report, names_in(file), "nvcc", arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", KERNEL_FILES)
def test_nvrtc_compiles_name_expressions(file, arch):
    _require(nvrtc.find_library() is not None, "libnvrtc (pip install nvidia-cuda-nvrtc)")
    names = names_in(file)
    lowered, _, ptx = cubins.nvrtc_compile(file, arch)
    assert set(lowered) == set(names) and all(v.startswith("_Z") for v in lowered.values())
    assert f".target {arch}" in ptx
    assert sorted(entry_points(ptx)) == sorted(lowered.values()), ptx[-3000:]


def entry_points(ptx: str) -> list[str]:
    """The kernels a PTX module defines."""
    return re.findall(r"^\.(?:visible|weak) \.entry (\w+)\(", ptx, re.M)


# The wgmma kernels: sm_90a alone (the "a" features are not forward-compatible, and an sm_80 or
# plain sm_90 target has no wgmma). ptxas must not serialize the wgmma (its "Potential Performance
# Loss" warning: accumulators it cannot keep in registers across the asynchronous mma).
@pytest.mark.parametrize("arch", ["sm_90a"])
@pytest.mark.parametrize("file", SM90A_FILES)
def test_nvcc_compiles_sm90a(file, arch):
    _require(shutil.which("nvcc") is not None, "nvcc")
    result = cubins.nvcc_cubin(file, arch)
    print(result.report)
    assert result.returncode == 0, result.report
    assert "Potential Performance Loss" not in result.report, result.report
    check_report(result.report, names_in(file), "nvcc", arch)


@pytest.mark.parametrize("arch", ["sm_90a"])
@pytest.mark.parametrize("file", SM90A_FILES)
def test_nvrtc_compiles_sm90a(file, arch):
    """As gpu_backprop.ops.cuda.sm90a_cubin compiles it on the card (extern "C" kernels: no name
    mangling, the cubin's symbols are the names)."""
    _require(nvrtc.find_library() is not None, "libnvrtc (pip install nvidia-cuda-nvrtc)")
    lowered, log, _ = cubins.nvrtc_compile(file, arch)
    print(log)
    assert lowered == {name: name for name in names_in(file)}
    assert "Potential Performance Loss" not in log, log
    check_report(log, names_in(file), "nvrtc", arch)


def test_a_kept_compile_is_keyed_by_the_source_the_target_and_the_compiler(tmp_path, monkeypatch):
    """tests/cubins.py's cache: a compile runs again when its source text, its target or the compiler
    changes, never for the same three; a failed compile is not kept. (Planted: the source text left
    out of the key, or a failure kept, fails it.)"""
    _require(shutil.which("nvcc") is not None and nvrtc.find_library() is not None, "nvcc and libnvrtc")
    concurrent.futures.wait(list(cubins._jobs.values()))  # no queued compile reads what this test patches
    monkeypatch.setattr(cubins, "COMPILES", tmp_path)
    texts = {"k.cu": "template <typename T> __global__ void k(T* x) { x[0] = T(1); }\n"}
    monkeypatch.setattr(cubins, "instantiating", lambda file: texts[file] + "template __global__ void k<float>(float*);\n")
    monkeypatch.setattr(cubins, "kernel_source", lambda file: texts[file])
    monkeypatch.setattr(cubins, "names_in", lambda file: ["k<float>"])
    compiles = []  # this thread's (a compile worker of the session may be running meanwhile)
    here = threading.get_ident()
    run, ptx = subprocess.run, nvrtc.compile_ptx

    def counted(what, call):
        def wrapper(*args, **kwargs):
            if threading.get_ident() == here and (what == "nvrtc" or "-cubin" in args[0]):
                compiles.append(what)
            return call(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(subprocess, "run", counted("nvcc", run))
    monkeypatch.setattr(nvrtc, "compile_ptx", counted("nvrtc", ptx))

    def both(arch):
        return cubins._nvcc("k.cu", arch), cubins._nvrtc("k.cu", arch)

    first = both("sm_80")
    assert first[0].returncode == 0 and "Compiling entry function" in first[0].report and len(compiles) == 2
    again = both("sm_80")
    assert again == first and again[0].cubin.stat().st_size > 0 and len(compiles) == 2
    both("sm_90")
    assert len(compiles) == 4
    texts["k.cu"] = texts["k.cu"].replace("T(1)", "T(2)")
    both("sm_80")
    assert len(compiles) == 6
    monkeypatch.setattr(cubins, "nvcc_identity", lambda nvcc: "another nvcc")
    monkeypatch.setattr(cubins, "nvrtc_identity", lambda path: "another libnvrtc")
    both("sm_80")
    assert len(compiles) == 8
    texts["k.cu"] = "__global__ void k() { undeclared(); }\n"
    assert cubins._nvcc("k.cu", "sm_80").returncode != 0 and cubins._nvcc("k.cu", "sm_80").returncode != 0
    assert len(compiles) == 10
    assert not list(tmp_path.glob(".tmp-*"))  # no half-written result left behind


def test_nvrtc_reports_errors():
    _require(nvrtc.find_library() is not None, "libnvrtc")
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        nvrtc.compile_cubin("__global__ void k() { undeclared(); }", [], "sm_90")


def test_sources_inline_their_headers():
    for file in (*KERNEL_FILES, *SM90A_FILES):
        text = kernel_source(file)
        assert '#include "' not in text and "enum Activation" in text
        assert text.count("enum Activation") == 1  # each header once
