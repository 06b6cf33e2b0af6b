"""Timing plumbing shared by the suites: where peers run, rotation of input sets
past the last-level cache, the ceilings, and the figures stored in extra_info.

Method (see benchmarks/results/METHOD.md): every peer's result is checked
against a float64 NumPy reference before it is timed; inputs are random,
never zeros; the first calls (compilation, handles) are warm-up; GPU work is
synchronised before the clock stops and also timed with CUDA events; input
sets rotate so that together they exceed the L2 (GPU) or the last-level cache
(CPU) and no peer is flattered by a warm cache.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

CPU_CACHE_BYTES = 64 << 20  # more than the last-level cache of the CPUs we run on
ROTATE_CAP_BYTES = {"cpu": 1 << 30, "cuda": 8 << 30}


@dataclass
class Backend:
    """Where a run's peers execute: "cpu" (NumPy, PyTorch CPU) or "cuda" (CuPy, PyTorch CUDA)."""

    kind: str
    xp: Any = np
    l2_bytes: int = CPU_CACHE_BYTES
    name: str = "cpu"

    def sync(self) -> None:
        if self.kind == "cuda":
            self.xp.cuda.get_current_stream().synchronize()

    def asarray(self, array: np.ndarray) -> Any:
        return self.xp.asarray(array)

    def event_median(self, run: Callable[[int], Any], n_sets: int, repeats: int = 30) -> float | None:
        """Median seconds per call from CUDA events around each call (None on the CPU)."""
        if self.kind != "cuda":
            return None
        cuda = self.xp.cuda
        times = []
        for i in range(repeats):
            start, stop = cuda.Event(), cuda.Event()
            start.record()
            run(i % n_sets)
            stop.record()
            stop.synchronize()
            times.append(cuda.get_elapsed_time(start, stop) / 1e3)
        return float(np.median(times))


def make_backend(kind: str) -> Backend:
    if kind == "cpu":
        import platform

        return Backend("cpu", np, CPU_CACHE_BYTES, f"cpu ({platform.processor() or platform.machine()}, "
                                                    f"{os.cpu_count()} cores)")
    from gpu_backprop import get_device

    device = get_device("cuda")
    cupy = device.xp
    props = cupy.cuda.runtime.getDeviceProperties(device.index)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Backend("cuda", cupy, int(props["l2CacheSize"]), name)


def rotation(bytes_per_set: int, backend: Backend) -> int:
    """How many input sets together exceed twice the cache (at least 2, within a memory cap)."""
    wanted = -(-2 * backend.l2_bytes // max(bytes_per_set, 1))
    cap = max(2, ROTATE_CAP_BYTES[backend.kind] // max(bytes_per_set, 1))
    return int(max(2, min(wanted, cap)))


@dataclass
class Ceilings:
    """Measured in the same run: copy bandwidth (bytes read + written) and GEMM rate."""

    copy_gbs: float
    gemm_gflops: float
    how: dict = field(default_factory=dict)


def measure_ceilings(backend: Backend) -> Ceilings:
    if backend.kind == "cuda":
        xp = backend.xp
        n = 1 << 28  # 1 GiB of float32 each way
        src, dst = xp.random.random(n, dtype=np.float32), xp.empty(n, dtype=np.float32)
        copy = _best(lambda: xp.copyto(dst, src), backend, 10)
        size = 4096
        a = xp.random.random((size, size), dtype=np.float32)
        b = xp.random.random((size, size), dtype=np.float32)
        c = xp.empty((size, size), dtype=np.float32)
        gemm = _best(lambda: xp.matmul(a, b, out=c), backend, 10)
        how = {"copy": "cupy.copyto, 2^28 float32, device to device",
               "gemm": "cupy.matmul (cuBLAS SGEMM, TF32 off), 4096^3 float32"}
    else:
        from scipy.linalg import blas

        n = 1 << 26
        src, dst = np.random.default_rng(0).random(n, dtype=np.float32), np.empty(n, dtype=np.float32)
        copy = _best(lambda: np.copyto(dst, src), backend, 5)
        size = 2048
        a = np.asfortranarray(np.random.default_rng(1).random((size, size), dtype=np.float32))
        b = np.asfortranarray(np.random.default_rng(2).random((size, size), dtype=np.float32))
        gemm = _best(lambda: blas.sgemm(1.0, a, b), backend, 3)
        how = {"copy": "np.copyto, 2^26 float32", "gemm": "scipy sgemm (the BLAS of our CPU path), 2048^3 float32"}
    return Ceilings(copy_gbs=2 * n * 4 / copy / 1e9, gemm_gflops=2 * size**3 / gemm / 1e9, how=how)


def _best(fn: Callable[[], Any], backend: Backend, repeats: int) -> float:
    fn()
    backend.sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        backend.sync()
        best = min(best, time.perf_counter() - start)
    return best


def rel_error(actual: Any, expected: np.ndarray) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def check(peer: str, outputs: dict, reference: dict, tol: "float | dict") -> None:
    """Each peer must compute the same function before it is timed (``tol``: one tolerance, or one
    per key)."""
    for key, expected in reference.items():
        err, limit = rel_error(outputs[key], expected), tol[key] if isinstance(tol, dict) else tol
        if not err < limit:
            raise AssertionError(f"{peer}: {key} differs from the float64 reference by {err:.2e} (tol {limit:.0e})")
