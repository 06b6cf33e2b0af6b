"""Every kernel source compiled for sm_80 and sm_90: by nvcc to cubins (with ptxas's -v report), by
NVRTC for compute_80 and compute_90 to PTX (its front end and NVVM, the part of a CuPy compile nvcc
does not run; ptxas, most of a compile's time, runs once per arch, in nvcc's compile); the sm_90a
file (wgmma) NVRTC compiles to a cubin, as the library does on the card.

Each result is kept in a cache folder beside the emulator's (GPU_BACKPROP_EMU_CACHE), keyed by the
compiler's identity (nvcc --version, or libnvrtc's path and version), the arguments and the source
text, as ccache keys an object file: an unchanged kernel file is compiled once per machine, not at
every run. A failed compile is not kept.

The compiles the collected tests read run on two nvcc worker threads (processes) and one NVRTC
thread (one NVRTC compile at a time), queued when collection ends: pytest runs one test at a time,
so the second core would sit idle while the compiles ran one after another in the tests that need
them; here they run beside the rest of the suite, and tests/conftest.py moves the tests that read
them (test_compile, test_sass, the SASS checks of the tensor-core tests) to the end. test_compile
asserts each compile's result and ptxas report; the SASS checks disassemble nvcc's sm_90 cubins,
built with every name expression of the file instantiated (the exact text NVRTC gets)."""
from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

from gpu_backprop.ops.cuda import KERNEL_FILES, SM90A_FILES, kernel_source, names_in

from . import nvrtc
from .emulator.builder import CACHE

ARCHS = ("sm_80", "sm_90")  # and sm_90a for SM90A_FILES (wgmma), which compile for it alone
# The longest first, so that the last to finish is short; nvcc sm_90 of the GEMM files before the
# rest (the SASS checks read them).
BY_COST = ("backward.cu", "weight_grad.cu", "forward.cu", "propagate.cu")
COMPILES = CACHE / "compiles"
FORMAT = "1"  # of what a cache folder holds: a change of the layout below misses the old ones


class Nvcc(NamedTuple):
    returncode: int
    report: str   # nvcc's stderr: the ptxas -v report, or the errors
    cubin: Path


class Nvrtc(NamedTuple):
    lowered: dict  # {name expression: lowered name}
    report: str    # ptxas's -v report of a cubin (sm_90a); "" for PTX
    ptx: str       # the PTX (compute_80, compute_90); "" for a cubin


_pools: dict = {}  # two workers for nvcc's compiles (processes), one for NVRTC's (in this process)
_jobs: dict = {}


def instantiating(file: str) -> str:
    """The text NVRTC gets for ``file``, plus references that instantiate every name expression
    (so nvcc emits the same kernels)."""
    return kernel_source(file) + "\nstatic void* const instances[] = {\n" + \
        ",\n".join(f"    (void*)&{name}" for name in names_in(file)) + "\n};\n"


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def cached(key: str, compile_into, outputs: tuple[str, ...]) -> Path | None:
    """The cache folder of ``key``, holding the files ``outputs``, made by ``compile_into(folder)``
    (True: it succeeded) if absent; None when the compile failed (nothing kept). Written in a
    temporary folder, then renamed: a half-written result is never read (one a temp cleaner
    thinned is made again)."""
    folder = COMPILES / key
    if all((folder / name).is_file() for name in outputs):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    COMPILES.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=COMPILES, prefix=".tmp-"))
    try:
        if not compile_into(tmp):
            return None
        try:
            os.rename(tmp, folder)
        except OSError:  # another run kept the same result first
            if not folder.is_dir():
                raise
        return folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def nvcc_identity(nvcc: str) -> str:
    return nvcc + subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout


@functools.cache
def nvrtc_identity(path: str) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    ctypes.CDLL(path).nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    digest = hashlib.sha256()  # the library's bytes: a patch release shares the version, every venv a copy
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return f"libnvrtc {major.value}.{minor.value} {digest.hexdigest()}"


def _nvcc(file: str, arch: str) -> Nvcc | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    text, args = instantiating(file), ["-std=c++17", "-cubin", f"-arch={arch}", "-Xptxas", "-v"]
    failed = []

    def compile_into(folder: Path) -> bool:
        source = folder / f"{arch}-{file}"
        source.write_text(text)
        proc = subprocess.run([nvcc, *args, "-o", str(folder / "out.cubin"), str(source)], capture_output=True,
                              text=True)
        (folder / "report.txt").write_text(proc.stderr)
        if proc.returncode:
            failed.append(Nvcc(proc.returncode, proc.stderr, folder / "out.cubin"))
        return not proc.returncode

    folder = cached(cache_key(FORMAT, nvcc_identity(nvcc), *args, text), compile_into, ("report.txt", "out.cubin"))
    return failed[0] if folder is None else Nvcc(0, (folder / "report.txt").read_text(), folder / "out.cubin")


def _nvrtc(file: str, arch: str) -> Nvrtc | None:
    library = nvrtc.find_library()
    if library is None:
        return None
    source, names = kernel_source(file), names_in(file)
    target = arch.replace("sm_", "compute_") if arch in ARCHS else arch

    def compile_into(folder: Path) -> bool:  # an error raises
        if arch in ARCHS:
            lowered, ptx = nvrtc.compile_ptx(source, names, target)
            result = Nvrtc(lowered, "", ptx)
        else:
            result = Nvrtc(*nvrtc.compile_cubin(source, names, target), "")
        (folder / "result.json").write_text(json.dumps(result._asdict()))
        return True

    mode = "PTX" if arch in ARCHS else "CUBIN"
    folder = cached(cache_key(FORMAT, nvrtc_identity(library), mode, *nvrtc.OPTIONS[mode], target, *names, source),
                    compile_into, ("result.json",))
    return Nvrtc(**json.loads((folder / "result.json").read_text()))


def jobs_of(item) -> list[tuple[str, str, str]]:
    """The compiles (compiler, file, arch) a collected test reads."""
    file = item.nodeid.split("::")[0]
    params = getattr(getattr(item, "callspec", None), "params", {})
    if file.endswith("test_compile.py") and "file" in params:
        return [("nvcc" if item.originalname.startswith("test_nvcc") else "nvrtc", params["file"], params["arch"])]
    if file.endswith("test_sass.py") or {"tf32_sass", "bf16_training_sass"} & set(getattr(item, "fixturenames", ())):
        from gpu_backprop.ops.cuda import GEMM_FILES

        return [("nvcc", f, "sm_90") for f in dict.fromkeys(GEMM_FILES.values())]
    if "sm90a_sass" in getattr(item, "fixturenames", ()):
        return [("nvcc", f, "sm_90a") for f in SM90A_FILES]
    if "bf16_sass" in getattr(item, "fixturenames", ()):
        from gpu_backprop.ops.cuda import MATMUL_FILE

        return [("nvcc", MATMUL_FILE, "sm_90")]
    return []


def _yield_to_the_tests() -> None:
    """A compile worker at the lowest priority (its nvcc processes too): the tests, one after another
    on the main thread, are the suite's longest chain, so they keep a core while the compiles take
    what is left (the other core, and this one while a test waits)."""
    if sys.platform.startswith("linux"):  # a thread's own nice value, inherited by the processes it starts
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def start(jobs) -> None:
    """Queue ``jobs`` ((compiler, file, arch)) on their workers, the longest first (nvcc sm_90 of the
    GEMM files, which the SASS checks read, before the rest)."""
    if not _pools:
        for compiler, workers in (("nvcc", 2), ("nvrtc", 1)):
            pool = _pools[compiler] = concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix=compiler, initializer=_yield_to_the_tests)
            atexit.register(pool.shutdown, wait=False, cancel_futures=True)
    files = [f for f in BY_COST if f in KERNEL_FILES] + [f for f in KERNEL_FILES if f not in BY_COST]
    order = [("nvcc", f, "sm_90") for f in files] + \
        [(c, f, a) for f in files for c, a in (("nvrtc", "sm_90"), ("nvrtc", "sm_80"), ("nvcc", "sm_80"))] + \
        [(c, f, "sm_90a") for f in SM90A_FILES for c in ("nvcc", "nvrtc")]
    for job in sorted(set(jobs) - set(_jobs), key=order.index):
        compiler, file, arch = job
        _jobs[job] = _pools[compiler].submit(_nvcc if compiler == "nvcc" else _nvrtc, file, arch)


def nvcc_cubin(file: str, arch: str) -> Nvcc | None:
    """nvcc's result for ``file`` on ``arch`` (None without nvcc)."""
    start([("nvcc", file, arch)])
    return _jobs["nvcc", file, arch].result()


def nvrtc_compile(file: str, arch: str) -> Nvrtc | None:
    """NVRTC's result for ``file`` on ``arch`` (None without libnvrtc; a compile error raises)."""
    start([("nvrtc", file, arch)])
    return _jobs["nvrtc", file, arch].result()
