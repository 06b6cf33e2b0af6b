"""Every GEMM path of ours, forced one at a time, against cuBLAS on the shapes where the
tuner decides (issue 12): the core alone at 4096^3 (grad_w = o^T delta), the weight gradient
with the delta prologue and the SGD epilogue at B=4096, 1024x1024 (every tile and every
split-K slice count), the same with delta given, AdamW fused into the epilogue against separate
passes (cuBLAS + our rule kernel, PyTorch eager), and the forward GEMM with bias and sigmoid at the same size.

Each path: one checked call against a float64 reference computed on the card (relative
Frobenius error printed), then 3 rounds of 10 calls timed with CUDA events; the median of
all 30 and the spread of the three round medians (a difference smaller than that is noise).
    python -m benchmarks.gemm_sweep [OUT.json]     (GPU only)
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable

import numpy as np


def timed(xp: Any, fn: Callable[[], Any], rounds: int = 3, calls: int = 10) -> tuple[float, float]:
    """(median seconds of all calls, max - min of the round medians)."""
    fn()
    xp.cuda.runtime.deviceSynchronize()
    medians, times = [], []
    for _ in range(rounds):
        events = [(xp.cuda.Event(), xp.cuda.Event()) for _ in range(calls)]
        for start, stop in events:
            start.record()
            fn()
            stop.record()
        events[-1][1].synchronize()
        these = [xp.cuda.get_elapsed_time(a, b) / 1e3 for a, b in events]
        medians.append(float(np.median(these)))
        times += these
    return float(np.median(times)), max(medians) - min(medians)


def rel_err(xp: Any, got: Any, ref: Any) -> float:
    got = got.astype(xp.float64)
    return float(xp.linalg.norm(got - ref) / xp.linalg.norm(ref))


def main(out_path: str | None = None) -> None:
    import cupy as xp

    from gpu_backprop import get_device
    from gpu_backprop.ops.autotune import Tuner
    from gpu_backprop.ops.cuda import CONFIGS, WIDE_CONFIGS, CudaOps, cupy_loader, split_paths

    import cupyx.scipy.special

    loader = cupy_loader(get_device("cuda"))
    ops = {p: CudaOps(xp, cupyx.scipy.special, loader, tuner=Tuner(enabled=False), precision=p)
           for p in ("fp32", "tf32")}
    rng = np.random.default_rng(0)
    rows: list[dict] = []

    def record(case: str, path: str, flops: float, err: float, fn: Callable[[], Any]) -> None:
        median, spread = timed(xp, fn)
        rows.append({"case": case, "path": path, "seconds": median, "spread": spread,
                     "tflops": flops / median / 1e12, "rel_err": err})
        print(f"{case:<38} {path:<12} {median * 1e6:9.1f} us  +-{spread * 1e6:6.1f}  "
              f"{flops / median / 1e12:6.1f} TFLOP/s  err {err:.1e}", flush=True)

    # 1. the core: grad_w = o^T delta at 4096^3, against cuBLAS SGEMM (and TF32)
    n = 4096
    o = xp.asarray(rng.random((n, n), dtype=np.float32))
    delta = xp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    ref = o.T.astype(xp.float64) @ delta.astype(xp.float64)
    grad_w, grad_b = xp.empty((n, n), xp.float32), xp.empty(n, xp.float32)
    flops = 2.0 * n ** 3
    for precision, paths in (("fp32", (*CONFIGS, "cublas")), ("tf32", ("tf32", "cublas_tf32"))):
        for path in paths:
            grad_w.fill(np.nan)
            run = lambda: ops[precision].weight_grad(o, delta, grad_w, grad_b, config=path)  # noqa: E731
            run()
            record("core 4096^3", path, flops, rel_err(xp, grad_w, ref), run)
    for split in split_paths(n):
        grad_w.fill(np.nan)
        run = lambda: ops["fp32"].weight_grad(o, delta, grad_w, grad_b, config=split)  # noqa: E731
        run()
        record("core 4096^3", split, flops, rel_err(xp, grad_w, ref), run)
    cublas = lambda: xp.matmul(o.T, delta, out=grad_w)  # noqa: E731
    record("core 4096^3", "cupy.matmul", flops, rel_err(xp, cublas() , ref), cublas)

    # 2. the weight gradient with the delta prologue and the SGD epilogue, B=4096, 1024x1024
    batch, n_in, n_out, step = 4096, 1024, 1024, 0.01
    o = xp.asarray(rng.random((batch, n_in), dtype=np.float32))
    err = xp.asarray(rng.standard_normal((batch, n_out), dtype=np.float32))
    o_next = xp.asarray(rng.random((batch, n_out), dtype=np.float32))
    W0 = xp.asarray(rng.standard_normal((n_in, n_out), dtype=np.float32))
    b0 = xp.asarray(rng.standard_normal(n_out, dtype=np.float32))
    d64 = err.astype(xp.float64) * o_next * (1 - o_next.astype(xp.float64))
    ref = -step * (o.T.astype(xp.float64) @ d64)
    W, b, delta_out = W0.copy(), b0.copy(), xp.empty((batch, n_out), xp.float32)
    flops = 2.0 * batch * n_in * n_out
    prologue_configs = [c for c in CONFIGS if c not in WIDE_CONFIGS]  # the wide tiles run no prologue
    for path in (*prologue_configs, *split_paths(batch), "cublas"):
        W[...] = W0
        run = lambda: ops["fp32"].sgd_update(o, err, W, b, step, o_next=o_next, activation="sigmoid",  # noqa: E731
                                             delta_out=delta_out, config=path)
        run()
        record("wgrad+sgd B4096 1024^2", path, flops, rel_err(xp, W.astype(xp.float64) - W0, ref), run)

    # 2b. the same with delta given (no prologue), as the training step's grouped backward runs it:
    # against 2, it splits the prologue's cost from the grid's
    d32 = d64.astype(np.float32)
    ref = -step * (o.T.astype(xp.float64) @ d32.astype(xp.float64))
    for path in (*CONFIGS, *split_paths(batch), "cublas"):
        W[...] = W0
        run = lambda: ops["fp32"].sgd_update(o, d32, W, b, step, config=path)  # noqa: E731
        run()
        record("wgrad+sgd B4096 1024^2 (delta given)", path, flops, rel_err(xp, W.astype(xp.float64) - W0, ref), run)

    # 2c. Adam (AdamW with L2) at B=4096 and B=32, delta given: fused into our epilogue on each path,
    # against the cuBLAS path, which writes dW and runs the rule as a pass of its own (bias.cu
    # weight_update), and PyTorch eager (mm, then torch.optim.AdamW's step). The ratio fused /
    # separate is what the fusion saves: NOTES.md "Adam in the epilogue" predicts it.
    from gpu_backprop.ops import Rule

    for rows_b in (batch, 32):
        o_b, d_b = o[:rows_b], d32[:rows_b]
        t = xp.zeros(1, dtype=xp.int64)
        rule = Rule("adam", 1e-3, 0.0, 1e-4, 1.0 / rows_b, 0.9, 0.999, 1e-8, 1e-3 * 0.01, t)
        state = [xp.zeros_like(W0), xp.zeros_like(b0), xp.zeros_like(W0), xp.zeros_like(b0)]
        flops_b = 2.0 * rows_b * n_in * n_out
        for path in (*CONFIGS, *split_paths(rows_b), "cublas"):
            W[...] = W0
            run = lambda: (ops["fp32"].count_step(t), ops["fp32"].update(o_b, d_b, W, b, rule, *state,  # noqa: E731
                                                                          config=path))
            run()
            record(f"wgrad+adamw B{rows_b} 1024^2", path, flops_b, 0.0, run)
        try:
            import torch
        except ImportError:
            continue
        to, td = torch.as_tensor(o_b, device="cuda"), torch.as_tensor(d_b, device="cuda")
        tw = torch.nn.Parameter(torch.as_tensor(W0, device="cuda").clone())
        tb = torch.nn.Parameter(torch.as_tensor(b0, device="cuda").clone())
        adamw = torch.optim.AdamW([tw, tb], lr=1e-3, weight_decay=0.01)

        def torch_step() -> None:
            tw.grad = torch.mm(to.T, td) / rows_b + 1e-4 / rows_b * tw.detach()
            tb.grad = td.sum(0) / rows_b
            adamw.step()
        torch_step()
        record(f"wgrad+adamw B{rows_b} 1024^2", "torch eager", flops_b, 0.0, torch_step)

    # 3. forward out = sigmoid(o W + b), B=4096, 1024x1024
    o = xp.asarray(rng.random((batch, n_in), dtype=np.float32))
    W = xp.asarray(rng.standard_normal((n_in, n_out), dtype=np.float32) / 32)
    b = xp.asarray(rng.standard_normal(n_out, dtype=np.float32))
    ref = 1 / (1 + xp.exp(-(o.astype(xp.float64) @ W + b)))
    out = xp.empty((batch, n_out), xp.float32)
    for path in (*CONFIGS, "cublas"):
        out.fill(np.nan)
        run = lambda: ops["fp32"].forward(o, W, b, "sigmoid", out, config=path)  # noqa: E731
        run()
        record("forward B4096 1024^2", path, flops, rel_err(xp, out, ref), run)

    card = xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"card: {card}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"card": card, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
