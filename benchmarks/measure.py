"""Run one benchmark: check the peer against the reference, warm up, time, record
(under --benchmark-disable: the check only)."""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import numpy as np

from .harness import Backend, Ceilings, check


def to_host(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        return value.get()
    return np.asarray(value)


def run_benchmark(benchmark: Any, *, backend: Backend, ceilings: Ceilings | None, peer: str, group: str, size: str,
                  fn: Callable[[Any], Any], sets: list, sync: Callable[[], None], reference: dict,
                  outputs: Callable[[Any], dict] | None = None, work: tuple[int, int] = (0, 0),
                  budget: float = 0.5, tol: float = 1e-4, use_events: bool = True, precision: str = "fp32") -> None:
    """``fn(set)`` runs one call; ``outputs(result)`` gives host arrays to check (default: the result dict);
    ``precision``: of the peer's products (fp32, tf32, bf16), recorded with its figures."""
    benchmark.group = f"{group} {size}"
    # under --benchmark-disable pedantic() runs the call once, untimed (and the fixture counts as used)
    result = benchmark.pedantic(fn, args=(sets[0],)) if benchmark.disabled else fn(sets[0])
    sync()
    got = {k: to_host(v) for k, v in (outputs(result) if outputs else result).items()}
    check(peer, {k: np.asarray(v).reshape(np.shape(reference[k])) for k, v in got.items()}, reference, tol)
    if benchmark.disabled:  # --benchmark-disable: the benchmark is a test, run once and checked above; nothing timed
        return

    counter = itertools.count(1)
    n_sets = len(sets)

    def call() -> None:
        fn(sets[next(counter) % n_sets])
        sync()

    estimate = float("inf")
    for _ in range(3):  # warm-up: compilation, handles, allocator pools
        start = time.perf_counter()
        call()
        estimate = min(estimate, time.perf_counter() - start)
    rounds = int(min(200, max(5, budget / max(estimate, 1e-6))))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    device_time = backend.event_median(lambda i: fn(sets[i]), n_sets) if use_events else None
    seconds = device_time if device_time is not None else float(benchmark.stats.stats.median)
    bytes_moved, flops = work
    info = {"peer": peer, "op": group, "size": size, "device": backend.name, "dtype": "float32", "precision": precision,
            "time_s": seconds, "timer": "cuda events (median)" if device_time is not None else "host clock (median)",
            "input_sets": n_sets, "bytes": bytes_moved, "flops": flops,
            "copy_ceiling_gbs": ceilings.copy_gbs, "gemm_ceiling_gflops": ceilings.gemm_gflops}
    if bytes_moved:
        info["gbs"] = bytes_moved / seconds / 1e9
        info["pct_copy_ceiling"] = 100 * info["gbs"] / ceilings.copy_gbs
    if flops:
        info["gflops"] = flops / seconds / 1e9
        info["pct_gemm_ceiling"] = 100 * info["gflops"] / ceilings.gemm_gflops
    benchmark.extra_info.update(info)
