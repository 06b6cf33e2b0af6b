"""NVRTC through ctypes, as cupy.RawModule uses it: compiles the kernel sources
with their name expressions on a machine without a GPU (the library comes from
the nvidia-cuda-nvrtc wheel or a CUDA toolkit)."""
from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
from typing import Sequence


OPTIONS = {"CUBIN": ("-std=c++17", "--ptxas-options=-v"), "PTX": ("-std=c++17",)}  # before the target's


def find_library() -> str | None:
    roots = site.getsitepackages() + [site.getusersitepackages(), os.environ.get("CUDA_HOME", "/usr/local/cuda")]
    patterns = ["nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*", "lib64/libnvrtc.so*"]
    for root in roots:
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if "builtins" not in path and "alt" not in path:
                    return path
    return None


def compile_cubin(source: str, names: Sequence[str], arch: str, options: Sequence[str] = ()) -> tuple[dict, str]:
    """({name expression: lowered name}, log) of a compile to a cubin for ``arch`` (sm_XX), ptxas's
    -v report in the log; raises RuntimeError with the log on failure."""
    lowered, log, cubin = _compile(source, names, arch, options, "CUBIN")
    if not cubin:
        raise RuntimeError("NVRTC produced an empty cubin")
    return lowered, log


def compile_ptx(source: str, names: Sequence[str], arch: str, options: Sequence[str] = ()) -> tuple[dict, str]:
    """({name expression: lowered name}, PTX) of a compile for the virtual architecture ``arch``
    (compute_XX): NVRTC's front end and NVVM, no ptxas; raises RuntimeError with the log on failure."""
    lowered, log, ptx = _compile(source, names, arch, options, "PTX")
    return lowered, ptx.rstrip(b"\0").decode()


def _compile(source: str, names: Sequence[str], arch: str, options: Sequence[str], output: str):
    path = find_library()
    if path is None:
        raise FileNotFoundError("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    check = _checker(lib)
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None))
    try:
        for name in names:
            check(lib.nvrtcAddNameExpression(prog, name.encode()))
        opts = [*(o.encode() for o in OPTIONS[output]), f"--gpu-architecture={arch}".encode(),
                *(o.encode() for o in options)]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetProgramLog(prog, buf))
        log = buf.value.decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"NVRTC failed ({arch}):\n{log}")
        lowered = {}
        for name in names:
            out = ctypes.c_char_p()
            check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)))
            lowered[name] = out.value.decode()
        check(getattr(lib, f"nvrtcGet{output}Size")(prog, ctypes.byref(size)))
        code = ctypes.create_string_buffer(size.value)
        if size.value:
            check(getattr(lib, f"nvrtcGet{output}")(prog, code))
        return lowered, log, code.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _checker(lib):
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(status: int) -> None:
        if status != 0:
            raise RuntimeError(f"NVRTC error {status}: {lib.nvrtcGetErrorString(status).decode()}")
    return check


if __name__ == "__main__":  # python -m tests.nvrtc FILE.cu: print the resource report
    from gpu_backprop.ops.cuda import kernel_source, names_in

    for file in sys.argv[1:]:
        print(compile_cubin(kernel_source(file), names_in(file), "sm_90")[1])
