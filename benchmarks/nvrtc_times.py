"""NVRTC compile time of each GEMM kernel instantiation, on the machine at hand (no GPU needed).

The cold start (issue 12, item 7) is mostly NVRTC: a fit compiles each kernel instantiation its
layers run, and the tuner compiles every candidate tile of a tuned shape. This times one
instantiation per module, as ops.cuda.CupyLoader compiles them (sm_90), for the kernels digits'
first epoch needs (the "small" tile: every digits GEMM is under TUNE_MIN_FMA, so it is untuned)
and for each tile a tuned layer offers. Usage: python -m benchmarks.nvrtc_times [OUT.json]
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from gpu_backprop.ops.cuda import GEMM_FILES, configs_for, gemm_name, kernel_source
from tests import nvrtc

# what digits' first epoch compiles: the fit step's kernels on its default tile
DIGITS = [("forward_gather", "small"), ("forward", "small"), ("backward", "small")]


def compile_seconds(kernel: str, config: str, arch: str = "sm_90") -> float:
    name = gemm_name(kernel, np.float32, config)
    start = time.perf_counter()
    nvrtc.compile_cubin(kernel_source(GEMM_FILES[kernel]), [name], arch)
    return time.perf_counter() - start


def main(out: str | None = None) -> None:
    rows = []
    cases = DIGITS + [(k, c) for k in ("forward", "propagate", "weight_grad", "backward")
                      for c in configs_for(np.float32)]
    for kernel, config in dict.fromkeys(cases):
        seconds = compile_seconds(kernel, config)
        rows.append({"kernel": kernel, "config": config, "seconds": seconds})
        print(f"{kernel:<15} {config:<12} {seconds:6.2f} s", flush=True)
    digits = sum(r["seconds"] for r in rows if (r["kernel"], r["config"]) in DIGITS)
    print(f"digits' first epoch compiles {len(DIGITS)} instantiations: {digits:.2f} s of NVRTC")
    if out:
        with open(out, "w") as f:
            json.dump({"rows": rows, "digits_seconds": digits}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
