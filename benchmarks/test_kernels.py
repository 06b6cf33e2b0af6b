"""Each fused kernel against its peers: sigmoid delta (output and hidden forms),
weight-gradient GEMM (delta prologue + bias gradient, with and without the SGD
epilogue), the GEMM core alone, and error propagation with the derivative epilogue.
The GEMM core also against the tensor-core peers (TF32, BF16: issue 13's targets)."""
import contextlib
import functools

import numpy as np
import pytest

from gpu_backprop import get_device
from gpu_backprop.ops import NumpyOps

from .conftest import CPU_SKIPPED_SIZES
from .harness import rotation
from .measure import run_benchmark
from .peers import (KERNEL_TOL, OPS, PEERS, PRECISION, SPLIT_OPS, TENSOR_GEMM_OPS, TENSOR_GEMM_PEERS, PeerUnavailable,
                    cupy_tf32, ours, peer_reason, torch_bf16_mm, torch_device, torch_or_skip, torch_sync)

CASES = [(op, size) for op in OPS for size in OPS[op].sizes]


@functools.lru_cache(maxsize=1)  # the peers of one case run one after another: generate once
def host_case(op: str, size: str) -> tuple[dict, dict]:
    """Random float64 inputs (seeded) and the float64 reference outputs of one case."""
    host = OPS[op].inputs(np.random.default_rng(0), size)
    return host, OPS[op].reference(host)


@pytest.mark.parametrize("peer", [p for p in PEERS if p != "torch-compile"])
@pytest.mark.parametrize("op,size", CASES)
def test_kernel(benchmark, backend, ceilings, budget, op, size, peer):
    reason = peer_reason(peer, backend, size)
    if reason:
        pytest.skip(reason)
    if peer == "ours-splitk" and op not in SPLIT_OPS:
        pytest.skip(f"split-K applies to the GEMMs over the batch ({', '.join(SPLIT_OPS)})")
    if peer in TENSOR_GEMM_PEERS and op not in TENSOR_GEMM_OPS:
        pytest.skip(f"the tensor-core peers run the GEMM core only ({', '.join(TENSOR_GEMM_OPS)})")
    if backend.kind == "cpu" and size in CPU_SKIPPED_SIZES:
        pytest.skip(f"{size} takes seconds per call on the CPU: GPU runs only")
    spec = OPS[op]
    host, reference = host_case(op, size)
    work = spec.work(size, 4)
    n_sets = 1 if benchmark.disabled else rotation(work[0], backend)  # disabled: one checked call, no rotation
    precision = PRECISION.get(peer, "fp32")
    outputs = None  # the result dict itself is checked
    if peer == "ours-bf16":  # bf16 bits (uint16), rounded once, untimed, as torch-bf16's operands
        from gpu_backprop.ops.bf16 import bf16_bits

        convert = lambda a: backend.asarray(bf16_bits(a.astype(np.float32)))  # noqa: E731
        sync = backend.sync
    elif peer.startswith("torch"):
        torch = torch_or_skip(backend, tf32=precision == "tf32")
        device = torch_device(backend)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # bf16: the operands rounded once, untimed
        convert = lambda a: torch.from_numpy(a.astype(np.float32)).to(device).to(dtype)  # noqa: E731
        sync = torch_sync(torch, backend)
    else:
        convert = lambda a: backend.asarray(a.astype(np.float32))  # noqa: E731
        sync = backend.sync
    # distinct buffers (same values) so that the sets together exceed the cache
    sets = [{k: convert(v) if isinstance(v, np.ndarray) else v for k, v in host.items()} for _ in range(n_sets)]
    if peer == "ours-numpy":
        fn = ours(NumpyOps(), np, op)
    elif peer in ("ours-fused", "ours-tf32"):  # our kernels themselves: no autotuned switch to cuBLAS here
        import cupyx.scipy.special

        from gpu_backprop.ops.autotune import Tuner
        from gpu_backprop.ops.cuda import CudaOps, cupy_loader

        # ours-tf32: precision="tf32", the TF32 tensor-core core (path "tf32", never "cublas_tf32")
        ops = CudaOps(backend.xp, cupyx.scipy.special, cupy_loader(get_device("cuda")), tuner=Tuner(enabled=False),
                      precision=precision)
        fn = ours(ops, backend.xp, op)
    elif peer == "ours-bf16":  # grad_w = o^T delta on the bf16 core alone (CudaOps.matmul_bf16)
        import cupyx.scipy.special

        from gpu_backprop.ops.cuda import CudaOps, cupy_loader

        ops = CudaOps(backend.xp, cupyx.scipy.special, cupy_loader(get_device("cuda")), precision="bf16")
        grad_w = {}

        def fn(s):
            shape = (s["o"].shape[1], s["delta"].shape[1])
            out = grad_w.setdefault(shape, backend.xp.empty(shape, dtype=np.float32))
            return {"grad_w": ops.matmul_bf16(s["o"], s["delta"], out, trans_a=True)}
    elif peer == "torch-bf16":  # grad_w = o^T delta: bf16 operands, float32 sums and result
        mm, _ = torch_bf16_mm(torch)

        def fn(s):
            return {"grad_w": mm(s["o"].T, s["delta"])}

        outputs = lambda result: {"grad_w": result["grad_w"].float()}  # noqa: E731  (NumPy has no bf16)
    elif peer in ("ours-splitk", "ours-warp"):  # tuned on the card among some of our paths (never cuBLAS)
        import cupyx.scipy.special

        from gpu_backprop.ops.autotune import Tuner, device_key
        from gpu_backprop.ops.cuda import CudaOps, cupy_loader, split_of

        def wanted(path: str) -> bool:  # split-K slices of any tile, or the warp cores (split or not)
            return split_of(path)[1] > 1 if peer == "ours-splitk" else path.startswith("warp")

        class Only(Tuner):
            def choose(self, key, candidates, trial, default):
                chosen = [c for c in candidates if wanted(c)]
                return super().choose(key, chosen, trial, default) if chosen else default

        loader = cupy_loader(get_device("cuda"))
        ops = CudaOps(backend.xp, cupyx.scipy.special, loader,
                      tuner=Only(f"{device_key(loader)}|{peer}-only", loader.time, enabled=True))
        ops.tune_min_fma = 0  # every shape tuned among them, however small
        fn = ours(ops, backend.xp, op)
    else:  # the plain expression: numpy, cupy-unfused, torch-eager; cublas-tf32 and torch-tf32 in TF32
        fn = spec.plain
    with contextlib.ExitStack() as stack:
        if peer == "cublas-tf32":  # CuPy's GEMMs in cuBLAS's TF32 compute type for this benchmark only
            try:
                stack.enter_context(cupy_tf32(backend.xp))
            except PeerUnavailable as exc:
                pytest.skip(str(exc))
        run_benchmark(benchmark, backend=backend, ceilings=ceilings, peer=peer, group=op, size=size, fn=fn,
                      sets=sets, sync=sync, reference=reference, outputs=outputs, work=work, budget=budget,
                      tol=KERNEL_TOL[precision], precision=precision)
