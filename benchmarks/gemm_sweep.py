"""Every GEMM path of ours, forced one at a time, against cuBLAS on the shapes where the
tuner decides (issue 12): the core alone at 4096^3 (grad_w = o^T delta), with the tensor-core
peers of issue 13 (cuBLAS TF32 through CuPy and PyTorch, cuBLAS BF16 through PyTorch) and our
TF32 core's ratio to the fastest cuBLAS TF32 (target >= 0.80), our bf16 core alone (matmul.cu, both
tiles, and on an sm_90a card the wgmma kernels, matmul_sm90.cu; the fastest one's ratio to cuBLAS
BF16, target >= 0.80) and precision="bf16"'s weight gradient
(weight_grad.cu on Bf16<128>, bf16 bits in: its row only), the weight gradient
with the delta prologue and the SGD epilogue at B=4096, 1024x1024 (every tile and every
split-K slice count), the same with delta given, AdamW fused into the epilogue against separate
passes (cuBLAS + our rule kernel, PyTorch eager), and the forward GEMM with bias and sigmoid at the same size.

Each path: one checked call against a float64 reference computed on the card (relative
Frobenius error printed), then 3 rounds of 10 calls timed with CUDA events; the median of
all 30 and the spread of the three round medians (a difference smaller than that is noise).
A peer that cannot run here (no PyTorch, a CuPy without the TF32 compute type) prints why and is
left out; one that fails prints its error, the others still run, and the exit status is 1.
    python -m benchmarks.gemm_sweep [OUT.json]     (GPU only)
"""
from __future__ import annotations

import contextlib
import itertools
import json
import sys
from typing import Any, Callable, Iterator

import numpy as np

from .peers import PeerUnavailable


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


# the least relative error a GEMM core 4096^3 of o (uniform) and delta (normal) shows in TF32 or
# bf16: a tenth of what rounding the operands gives (TF32 2.8e-4, bf16 2.3e-3; float32 itself ~1e-6)
ROUNDING_FLOOR = {"tf32": 3e-5, "bf16": 2e-4}


def tensor_core_peers(xp: Any, o: Any, delta: Any, grad_w: Any) -> dict[str, tuple[str, Any, Callable[[], Any]]]:
    """{path: (precision, mode, fn)}: cuBLAS on the tensor cores computing o^T delta, as others call it,
    ``fn`` to be run and timed inside the context manager ``mode``. cublas-tf32: cupy.matmul with
    cuBLAS's TF32 compute type (cublasGemmEx with CUBLAS_COMPUTE_32F_FAST_TF32: peers.cupy_tf32);
    torch-tf32: torch.mm with torch.backends.cuda.matmul.allow_tf32; torch-bf16: torch.mm on bf16
    copies of the operands (made once, untimed), float32 sums and result (peers.torch_bf16_mm).
    The PyTorch peers only where PyTorch imports."""
    from .peers import cupy_tf32, torch_bf16_mm

    peers = {"cublas-tf32": ("tf32", cupy_tf32(xp), lambda: xp.matmul(o.T, delta, out=grad_w))}
    try:
        import torch
    except ImportError as exc:
        print(f"core 4096^3            torch-tf32, torch-bf16: skipped ({exc})", flush=True)
        return peers
    if not torch.cuda.is_available():
        print("core 4096^3            torch-tf32, torch-bf16: skipped (PyTorch has no CUDA device)", flush=True)
        return peers

    @contextlib.contextmanager
    def allow_tf32() -> Iterator[None]:
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False  # bf16 products summed in float32
    to, td = torch.as_tensor(o, device="cuda"), torch.as_tensor(delta, device="cuda")
    tw = torch.as_tensor(grad_w, device="cuda")  # grad_w's memory: torch.mm writes into it
    bo, bd = to.to(torch.bfloat16), td.to(torch.bfloat16)
    mm, _ = torch_bf16_mm(torch)
    peers["torch-tf32"] = ("tf32", allow_tf32(), lambda: torch.mm(to.T, td, out=tw))
    peers["torch-bf16"] = ("bf16", contextlib.nullcontext(), lambda: mm(bo.T, bd))
    return peers


def main(out_path: str | None = None) -> int:
    import cupy as xp

    from gpu_backprop import get_device
    from gpu_backprop.ops.autotune import Tuner
    from gpu_backprop.ops.cuda import BF16_TILES, CONFIGS, SM90_TILES, WIDE_CONFIGS, CudaOps, cupy_loader, split_paths

    import cupyx.scipy.special

    loader = cupy_loader(get_device("cuda"))
    ops = {p: CudaOps(xp, cupyx.scipy.special, loader, tuner=Tuner(enabled=False), precision=p)
           for p in ("fp32", "tf32", "bf16")}
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    failed: list[str] = []

    def record(case: str, path: str, flops: float, err: float, fn: Callable[[], Any], precision: str = "fp32") -> None:
        median, spread = timed(xp, fn)
        rows.append({"case": case, "path": path, "seconds": median, "spread": spread,
                     "tflops": flops / median / 1e12, "rel_err": err, "precision": precision})
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

    # 1b. cuBLAS on the tensor cores (issue 13): TF32 (float32 in and out), BF16 (bf16 in, float32 sums)
    try:
        peers = tensor_core_peers(xp, o, delta, grad_w)
    except Exception as exc:  # noqa: BLE001  (PyTorch's setup failed: the rest of the sweep still runs)
        print(f"core 4096^3            tensor-core peers: FAILED {type(exc).__name__}: {exc}", flush=True)
        failed.append("tensor-core peers")
        peers = {}
    for path, (precision, mode, fn) in peers.items():
        try:
            with mode:
                grad_w.fill(np.nan)
                got = fn()
                got = got if isinstance(got, xp.ndarray) else xp.asarray(got.float())  # a torch tensor
                err = rel_err(xp, got, ref)
                record("core 4096^3", path, flops, err, fn, precision)
            if err < ROUNDING_FLOOR[precision]:  # as exact as float32: the switch to the tensor cores did not take
                print(f"core 4096^3            {path}: FAILED err {err:.1e} is below {precision}'s rounding "
                      f"(>= {ROUNDING_FLOOR[precision]:.0e}): not on the {precision} tensor cores", flush=True)
                failed.append(path)
        except PeerUnavailable as exc:
            print(f"core 4096^3            {path}: skipped ({exc})", flush=True)
        except Exception as exc:  # noqa: BLE001  (a peer's failure loses its own row only)
            print(f"core 4096^3            {path}: FAILED {type(exc).__name__}: {exc}", flush=True)
            failed.append(path)
    # 1c. ours in bf16: the bf16 core alone (matmul.cu: bf16 tiles, ldmatrix, mma m16n8k16) on bf16
    # copies of o and delta (made once, untimed), and precision="bf16"'s weight gradient on the same
    # bits (weight_grad.cu on Bf16<128>: db summed from its delta tiles as they land, dW written by its
    # epilogue)
    from gpu_backprop.ops.bf16 import round_bf16_in_place

    bits = lambda x: (round_bf16_in_place(xp, x.copy()).view(xp.uint32) >> 16).astype(xp.uint16)  # noqa: E731
    o_bits, delta_bits = bits(o), bits(delta)
    # (on an sm_90a card also the wgmma kernels, matmul_sm90.cu: SM90_TILES)
    bf16_tiles = (*BF16_TILES, *SM90_TILES) if getattr(ops["bf16"].loader, "sm90a", False) else tuple(BF16_TILES)
    bf16_runs = [(f"bf16-core/{tile}", lambda tile=tile: ops["bf16"].matmul_bf16(o_bits, delta_bits, grad_w,
                                                                                 trans_a=True, tile=tile))
                 for tile in bf16_tiles]
    bf16_runs.append(("bf16", lambda: ops["bf16"].weight_grad(o_bits, delta_bits, grad_w, grad_b, config="bf16")))
    for path, run in bf16_runs:
        try:
            grad_w.fill(np.nan)
            run()
            record("core 4096^3", path, flops, rel_err(xp, grad_w, ref), run, "bf16")
        except Exception as exc:  # noqa: BLE001  (its failure loses its own row only)
            print(f"core 4096^3            {path}: FAILED {type(exc).__name__}: {exc}", flush=True)
            failed.append(path)
    # the forward's and the propagation's layouts (o delta, o delta^T) on the default tile: m-major tiles
    for (layout, trans_b), tile in itertools.product((("nn", False), ("nt", True)), ("128x128", *bf16_tiles[2:])):
        path = f"bf16-core-{layout}/{tile}"
        try:
            ref_layout = o.astype(xp.float64) @ (delta.T if trans_b else delta).astype(xp.float64)
            run = lambda trans_b=trans_b, tile=tile: ops["bf16"].matmul_bf16(o_bits, delta_bits, grad_w,  # noqa: E731
                                                                             trans_b=trans_b, tile=tile)
            grad_w.fill(np.nan)
            run()
            record("core 4096^3", path, flops, rel_err(xp, grad_w, ref_layout), run, "bf16")
            del ref_layout
        except Exception as exc:  # noqa: BLE001
            print(f"core 4096^3            {path}: FAILED {type(exc).__name__}: {exc}", flush=True)
            failed.append(path)
    core = {r["path"]: r for r in rows if r["case"] == "core 4096^3"}
    # every route to cuBLAS TF32 that ran (ours' cublas_tf32: the handle's TF32 math mode), with TF32's error
    cublas_tf32 = [core[p] for p in ("cublas_tf32", "cublas-tf32", "torch-tf32")
                   if p in core and core[p]["rel_err"] >= ROUNDING_FLOOR["tf32"]]
    ratios = {}
    if "tf32" in core and cublas_tf32:
        best = max(cublas_tf32, key=lambda r: r["tflops"])
        ratios["tf32_vs_cublas_tf32"] = core["tf32"]["tflops"] / best["tflops"]
        print(f"core 4096^3            tf32 / fastest cuBLAS TF32 ({best['path']}, {best['tflops']:.1f} TFLOP/s): "
              f"{ratios['tf32_vs_cublas_tf32']:.2f} (target >= 0.80)", flush=True)
    bf16_cores = [core[p] for p in core if p.startswith("bf16-core/")]  # (the weight gradient's layout, a^T b)
    if bf16_cores and "torch-bf16" in core:
        best = max(bf16_cores, key=lambda r: r["tflops"])
        ratios["bf16_core_vs_cublas_bf16"] = best["tflops"] / core["torch-bf16"]["tflops"]
        print(f"core 4096^3            {best['path']} / cuBLAS BF16 (torch-bf16, {core['torch-bf16']['tflops']:.1f} "
              f"TFLOP/s): {ratios['bf16_core_vs_cublas_bf16']:.2f} (target >= 0.80)", flush=True)

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
            json.dump({"card": card, "rows": rows, "ratios": ratios, "failed": failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
