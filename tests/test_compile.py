"""Every kernel source compiles for sm_80 and sm_90, with nvcc and with NVRTC (what
cupy.RawModule uses), with no register spills. The ptxas report is printed (-s). The compiles
run on tests/cubins.py's worker, beside the rest of the suite."""
import os
import re
import shutil
import subprocess

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
    lowered, log = cubins.nvrtc_cubin(file, arch)
    print(log)
    assert set(lowered) == set(names) and all(v.startswith("_Z") for v in lowered.values())
    check_report(log, names, "nvrtc", arch)


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
    lowered, log = cubins.nvrtc_cubin(file, arch)
    print(log)
    assert lowered == {name: name for name in names_in(file)}
    assert "Potential Performance Loss" not in log, log
    check_report(log, names_in(file), "nvrtc", arch)


def test_nvrtc_reports_errors():
    _require(nvrtc.find_library() is not None, "libnvrtc")
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        nvrtc.compile_cubin("__global__ void k() { undeclared(); }", [], "sm_90")


def test_sources_inline_their_headers():
    for file in (*KERNEL_FILES, *SM90A_FILES):
        text = kernel_source(file)
        assert '#include "' not in text and "enum Activation" in text
        assert text.count("enum Activation") == 1  # each header once
