"""Every kernel source compiled once per test session, by nvcc and by NVRTC for sm_80 and sm_90,
on two worker threads (nvcc's, NVRTC's): the compiles the collected tests read are queued when
collection ends.

pytest runs one test at a time, so on CI's two cores the second sits idle while the compiles
(most of the suite's CPU time) would run one after another in the tests that need them; here they
run beside the rest of the suite, and tests/conftest.py moves the tests that read them (test_compile,
test_sass, the Tf32 SASS checks of test_tensor_cores) to the end. The checks themselves are
unchanged: test_compile asserts each compile's result and ptxas report; test_sass and
test_tensor_cores disassemble nvcc's sm_90 cubins, built with every name expression of the file
instantiated (the exact text NVRTC gets)."""
from __future__ import annotations

import atexit
import concurrent.futures
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from gpu_backprop.ops.cuda import KERNEL_FILES, SM90A_FILES, kernel_source, names_in

from . import nvrtc

ARCHS = ("sm_80", "sm_90")  # and sm_90a for SM90A_FILES (wgmma), which compile for it alone
# The longest first, so that the last to finish is short; nvcc sm_90 of the GEMM files before the
# rest (the SASS checks read them).
BY_COST = ("backward.cu", "weight_grad.cu", "forward.cu", "propagate.cu")


class Nvcc(NamedTuple):
    returncode: int
    report: str   # nvcc's stderr: the ptxas -v report, or the errors
    cubin: Path


class Nvrtc(NamedTuple):
    lowered: dict  # {name expression: lowered name}
    log: str


_pools: dict = {}  # a worker for nvcc's compiles, one for NVRTC's (one NVRTC compile at a time)
_jobs: dict = {}
_folder: Path | None = None


def instantiating(file: str) -> str:
    """The text NVRTC gets for ``file``, plus references that instantiate every name expression
    (so nvcc emits the same kernels)."""
    return kernel_source(file) + "\nstatic void* const instances[] = {\n" + \
        ",\n".join(f"    (void*)&{name}" for name in names_in(file)) + "\n};\n"


def _nvcc(file: str, arch: str) -> Nvcc | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    source = _folder / f"{arch}-{file}"
    source.write_text(instantiating(file))
    cubin = _folder / f"{arch}-{file}.cubin"
    proc = subprocess.run([nvcc, "-std=c++17", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", str(cubin),
                           str(source)], capture_output=True, text=True)
    return Nvcc(proc.returncode, proc.stderr, cubin)


def _nvrtc(file: str, arch: str) -> Nvrtc | None:
    if nvrtc.find_library() is None:
        return None
    return Nvrtc(*nvrtc.compile_cubin(kernel_source(file), names_in(file), arch))  # raises on an error


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


def start(jobs) -> None:
    """Queue ``jobs`` ((compiler, file, arch)) on their workers, the longest first (nvcc sm_90 of the
    GEMM files, which the SASS checks read, before the rest)."""
    global _folder
    if not _pools:
        _folder = Path(tempfile.mkdtemp(prefix="gpu_backprop-cubins-"))
        atexit.register(shutil.rmtree, _folder, True)
        # beside the other tests they share the cores with them; once those are done (the
        # compiles take longer), both cores compile
        for compiler in ("nvcc", "nvrtc"):
            pool = _pools[compiler] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=compiler)
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


def nvrtc_cubin(file: str, arch: str) -> Nvrtc | None:
    """NVRTC's result for ``file`` on ``arch`` (None without libnvrtc; a compile error raises)."""
    start([("nvrtc", file, arch)])
    return _jobs["nvrtc", file, arch].result()
