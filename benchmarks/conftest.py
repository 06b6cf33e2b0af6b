"""Options and session fixtures of the benchmark suite (run: pytest benchmarks/)."""
from __future__ import annotations

import pytest

from .harness import make_backend, measure_ceilings

CPU_SKIPPED_SIZES = {"large", "4096^3"}  # seconds per call on two cores: GPU runs only


def pytest_addoption(parser):
    group = parser.getgroup("gpu_backprop benchmarks")
    group.addoption("--bench-device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where the peers run: cuda (CuPy, PyTorch CUDA) or cpu (NumPy, PyTorch CPU); "
                         "auto takes cuda when a GPU is usable")
    group.addoption("--bench-budget", type=float, default=0.5,
                    help="seconds of timed rounds per benchmark (at least 5 rounds)")


@pytest.fixture(scope="session")
def backend(request):
    kind = request.config.getoption("--bench-device")
    if kind == "auto":
        from gpu_backprop.device import probe_cuda

        kind = "cuda" if probe_cuda(0)[0] is not None else "cpu"
    if kind == "cuda":
        from gpu_backprop.device import probe_cuda

        cupy, why_not = probe_cuda(0)
        if cupy is None:
            pytest.skip(f"--bench-device cuda: {why_not}")
    return make_backend(kind)


@pytest.fixture(scope="session")
def ceilings(request, backend):
    """Copy and GEMM ceilings of this machine; None under --benchmark-disable (nothing is timed)."""
    if request.config.getoption("benchmark_disable"):
        return None
    return measure_ceilings(backend)


@pytest.fixture
def budget(request):
    return request.config.getoption("--bench-budget")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Speed-up of each implementation over every other one in the same group (same run)."""
    by_group: dict = {}
    for bench in output_json["benchmarks"]:
        by_group.setdefault(bench["group"], []).append(bench)
    for members in by_group.values():
        for bench in members:
            mine = bench["extra_info"].get("time_s")
            bench["extra_info"]["speedup_vs"] = {
                other["extra_info"]["peer"]: other["extra_info"]["time_s"] / mine
                for other in members if other is not bench and mine and other["extra_info"].get("time_s")}
