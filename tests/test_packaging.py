"""The kernels ship inside the wheel and are found from a non-editable install."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpu_backprop.ops.cuda import KERNEL_FILES, SM90A_FILES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             ".benchmarks", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # pyproject.toml is read without a deprecation (e.g. the project.license table form)
    assert "SetuptoolsDeprecationWarning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return next((tmp / "dist").glob("gpu_backprop-*.whl"))


def test_wheel_contains_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for file in (*KERNEL_FILES, *SM90A_FILES, "common.cuh", "gemm_tile.cuh", "wgmma.cuh"):
        assert f"gpu_backprop/kernels/{file}" in names
    assert not any(n.startswith("tests/") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata.splitlines()  # the SPDX form (PEP 639)


def test_installed_wheel_finds_kernel_sources(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                           str(site), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    code = ("import gpu_backprop, sys; from gpu_backprop.ops.cuda import kernel_source, KERNEL_FILES;"
            "assert gpu_backprop.__file__.startswith(sys.argv[1]), gpu_backprop.__file__;"
            "print(sum(len(kernel_source(f)) for f in KERNEL_FILES))")
    run = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) > 5000
