"""ThreadSanitizer over the shared-memory kernels on the CUDA-on-CPU shim: clean as
written, and a planted missing __syncthreads() must be reported."""
import shutil
import subprocess

import pytest

from .emulator.builder import HERE, KERNELS, build

FLAGS = ("-fsanitize=thread", "-g", "-Wno-tsan")


def run_driver(kernels_dir, part=None):
    """The driver built (cached by its sources, as the kernel libraries) and run: every kernel, or
    ``part`` 1 (the float GEMM kernels), 2 (the bf16 ones) or 3 (the elementwise ones)."""
    flags = FLAGS + ((f"-DRACE_PART={part}",) if part else ())
    exe = build(HERE / "race_driver.cpp", [], extra_flags=flags, shared=False, include_dirs=[kernels_dir])
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                          env={"TSAN_OPTIONS": "halt_on_error=0 exitcode=66"})


def test_kernels_run_clean_under_tsan():
    proc = run_driver(KERNELS)
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0 and proc.stdout.startswith("checksum")


@pytest.mark.parametrize("file,marker,part", [
    ("gemm_tile.cuh", "sync: tile t in shared memory, tile t - 1 consumed", 1),
    ("common.cuh", "sync: warp sums written", 3),
    ("bias.cu", "__syncthreads();", 3),
    # the Bf16 core's staged epilogue: the accumulators staged over tiles still read, or read unstaged
    ("gemm_bf16.cuh", "sync: the tiles (or the last half) read by every thread", 2),
    ("gemm_bf16.cuh", "sync: the half staged", 2),
])
def test_missing_syncthreads_is_reported(tmp_path, file, marker, part):
    planted = tmp_path / "kernels"
    shutil.copytree(KERNELS, planted)
    source = (planted / file).read_text()
    assert marker in source
    (planted / file).write_text("\n".join(line for line in source.splitlines() if marker not in line))
    proc = run_driver(planted, part)
    assert "WARNING: ThreadSanitizer: data race" in proc.stderr
    assert proc.returncode == 66
