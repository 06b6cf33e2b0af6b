"""The operations under test and every implementation of each (the peers).

"plain" code is the straightforward expression with temporaries, written once
and run by three peers: NumPy (``numpy``), CuPy (``cupy-unfused``: elementwise
kernels + cuBLAS + ``sum``) and PyTorch (``torch-eager``; ``torch-compile``
compiles the same function). ``ours-numpy`` is gpu_backprop's CPU path (the
NumPy twins), ``ours-fused`` its CUDA kernels (the default tile, one launch per tile), and
``ours-splitk`` the weight-gradient kernels with the batch split in slices (split-K), the
tile and slice count tuned on the card among our kernels only, and ``ours-warp`` the cp.async
pipelined warp-tiled cores (128x128, 128x256, and their split-K slices), tuned among those.

Tensor-core peers (issue 13), each compared only with implementations in its own precision:
``ours-tf32`` (our TF32 core, precision="tf32"), ``cublas-tf32`` (CuPy's matmul with cuBLAS's
TF32 compute type), ``torch-tf32`` (torch.mm with TF32 allowed) and ``torch-bf16`` (torch.mm
on bfloat16 operands, float32 sums and result) for the GEMM core; for the training step
``torch-autocast-bf16`` (the torch-eager step under torch.autocast(bfloat16)),
``torch-autograd-bf16`` (torch-autograd's nn.Sequential step, forward and loss under autocast)
and ``torch-compile-bf16`` (torch.compile of the torch-autocast-bf16 step), float32 master
weights throughout. They run on a CUDA GPU only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pytest


# name: (layer widths, batch). Kernel groups use the widest hidden layer of the net.
SIZES = {
    "small": ([64, 128, 10], 64),
    "typical-B256": ([784, 1024, 1024, 10], 256),
    "typical-B4096": ([784, 1024, 1024, 10], 4096),
    "large": ([4096, 4096, 4096, 10], 4096),
}
DELTA_SIZES = {**SIZES, "2^26": ([1024, 1024, 10], 1 << 16)}  # 2^26 elements: the bandwidth target
GEMM_CORE_SIZES = {"4096^3": ([4096, 4096, 10], 4096)}
COMPILE_SIZES = {"small", "typical-B4096"}  # torch.compile compiles for minutes: the target sizes only

CPU_PEERS = ("numpy", "ours-numpy")
GPU_PEERS = ("cupy-unfused", "ours-fused", "ours-splitk", "ours-warp")
SPLIT_OPS = ("weight_grad", "weight_grad_sgd", "gemm_core")  # the GEMMs over the batch: where split-K applies
TORCH_PEERS = ("torch-eager", "torch-compile")
# tensor-core peers (issue 13's targets): the GEMM core at 4096^3 and the bf16 training step
# (ours-bf16: the bf16 core alone, matmul.cu, on bf16 copies of the operands made untimed)
TENSOR_GEMM_PEERS = ("ours-tf32", "cublas-tf32", "torch-tf32", "ours-bf16", "torch-bf16")
TENSOR_GEMM_OPS = ("gemm_core",)
BF16_STEP_PEERS = ("torch-autocast-bf16", "torch-autograd-bf16", "torch-compile-bf16")
PEERS = CPU_PEERS + GPU_PEERS + TORCH_PEERS + TENSOR_GEMM_PEERS
# ours in bf16 (precision="bf16": float32 master weights, bf16 GEMM operands and stored values)
OURS_BF16_STEP_PEERS = ("ours-bf16",)
STEP_PEERS = CPU_PEERS + ("cupy-unfused", "ours-fused", "ours-graph", "ours-tf32", "torch-autograd") + TORCH_PEERS \
    + OURS_BF16_STEP_PEERS + BF16_STEP_PEERS
# the precision of a peer's products (recorded with each figure; "fp32" when not listed)
PRECISION = {"ours-tf32": "tf32", "cublas-tf32": "tf32", "torch-tf32": "tf32", "torch-bf16": "bf16",
             **{peer: "bf16" for peer in BF16_STEP_PEERS + OURS_BF16_STEP_PEERS}}
# relative Frobenius error allowed in a kernel's outputs against the float64 reference, by the
# precision of its products (only the GEMM core runs in TF32 and BF16). TF32 keeps 10 of float32's
# 23 fraction bits: a 1024^3 product of rounded operands is off by 2.9e-4 (rounded to nearest),
# 7.7e-4 (the low 13 bits dropped, as from raw float32 bits); bf16 keeps 7: 2.3e-3 with a float32
# result, 2.9e-3 with a bf16 one (NumPy emulation of the roundings). ~6x margin each.
KERNEL_TOL = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 2e-2}
# a bf16 training step is checked on its update (parameters after - before), not on the parameters:
# one SGD step moves W0 of 784-1024-1024-10 by 6.5e-5 of itself at B=256, so an error of 1e-2 in
# that update changes W0 by 6.5e-7 relative, and even a 10% wrong update would pass the float32
# peers' parameter tolerance (1e-4). bf16's roundings put the updates 1e-3..6e-3 off at small and
# typical-B256 (NumPy emulations of autocast's: GEMM operands and products in bf16, and our bf16
# twin, precision="bf16" on the CPU); 3e-2 leaves 5x, and a wrong scale, sign or term (>= 1e-1) fails.
BF16_STEP_TOL = 3e-2
# The float32 and TF32 steps' updates, beside their parameters: the update of W0 is 6.5e-5 of W0,
# so storing the float32 result rounds it by up to 2^-24 / 6.5e-5 ~ 1e-3 (RMS ~3e-4); TF32's
# products add ~1e-3. 1e-2 leaves 10x over TF32 and fails a 10% wrong update.
STEP_UPDATE_TOL = 1e-2
LR = 0.05


def layer(size: str, table: dict = SIZES) -> tuple[int, int, int]:
    """(batch, n_in, n_out) of the widest hidden layer of a net size."""
    widths, batch = table[size]
    return batch, widths[-3], widths[-2]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# -- plain expressions (numpy, cupy and torch arrays alike) ---------------------------
def plain_delta_hidden(s):
    return {"delta": s["err"] * s["o"] * (1 - s["o"])}


def plain_delta_output(s):
    diff = s["y_hat"] - s["y"]
    return {"delta": diff * s["y_hat"] * (1 - s["y_hat"]), "loss": 0.5 * (diff * diff).sum()}


def plain_weight_grad(s):
    delta = s["err"] * s["o_next"] * (1 - s["o_next"])
    return {"grad_w": s["o"].T @ delta, "grad_b": delta.sum(0), "delta": delta}


def plain_weight_grad_sgd(s):
    delta = s["err"] * s["o_next"] * (1 - s["o_next"])
    s["W"] -= s["step"] * (s["o"].T @ delta)
    s["b"] -= s["step"] * delta.sum(0)
    return {"W": s["W"], "b": s["b"], "delta": delta}


def plain_gemm_core(s):
    return {"grad_w": s["o"].T @ s["delta"]}


def plain_propagate(s):
    return {"err": (s["delta"] @ s["W"].T) * s["o"] * (1 - s["o"])}


# -- ours -------------------------------------------------------------------------
def ours(ops: Any, xp: Any, op: str) -> Callable[[dict], dict]:
    """gpu_backprop's operation for ``op``, writing into buffers made once per set shape."""
    buffers: dict = {}

    def buf(name: str, shape: tuple, dtype: Any) -> Any:
        if name not in buffers:
            buffers[name] = xp.empty(shape, dtype=dtype)
        return buffers[name]

    def run(s: dict) -> dict:
        if op == "delta_hidden":
            return {"delta": ops.hidden_delta(s["err"], s["o"], "sigmoid", buf("delta", s["err"].shape, s["err"].dtype))}
        if op == "delta_output":
            delta, loss = buf("delta", s["y"].shape, s["y"].dtype), buf("loss", (1,), s["y"].dtype)
            ops.output_delta(s["y_hat"], s["y"], "sigmoid", "mse", delta, loss)
            return {"delta": delta, "loss": loss}
        if op in ("weight_grad", "weight_grad_sgd"):
            batch, n_in = s["o"].shape
            n_out = s["err"].shape[1]
            delta = buf("delta", (batch, n_out), s["o"].dtype)
            if op == "weight_grad":
                grad_w, grad_b = buf("grad_w", (n_in, n_out), s["o"].dtype), buf("grad_b", (n_out,), s["o"].dtype)
                ops.weight_grad(s["o"], s["err"], grad_w, grad_b, o_next=s["o_next"], activation="sigmoid",
                                delta_out=delta)
                return {"grad_w": grad_w, "grad_b": grad_b, "delta": delta}
            ops.sgd_update(s["o"], s["err"], s["W"], s["b"], s["step"], o_next=s["o_next"], activation="sigmoid",
                           delta_out=delta)
            return {"W": s["W"], "b": s["b"], "delta": delta}
        if op == "gemm_core":
            n_in, n_out = s["o"].shape[1], s["delta"].shape[1]
            grad_w, grad_b = buf("grad_w", (n_in, n_out), s["o"].dtype), buf("grad_b", (n_out,), s["o"].dtype)
            ops.weight_grad(s["o"], s["delta"], grad_w, grad_b)
            return {"grad_w": grad_w}
        if op == "propagate":
            out = buf("err", s["o"].shape, s["o"].dtype)
            return {"err": ops.propagate(s["delta"], s["W"], s["o"], "sigmoid", out)}
        raise KeyError(op)

    return run


@dataclass
class Op:
    """One kernel-level operation: inputs, float64 reference, work counted."""

    name: str
    plain: Callable[[dict], dict]
    sizes: dict

    def inputs(self, rng: np.random.Generator, size: str) -> dict:
        batch, n_in, n_out = layer(size, self.sizes)
        normal = lambda *shape: rng.standard_normal(shape)  # noqa: E731
        if self.name == "delta_hidden":
            return {"err": normal(batch, n_in), "o": sigmoid(normal(batch, n_in))}
        if self.name == "delta_output":
            return {"y_hat": sigmoid(normal(batch, n_in)), "y": rng.random((batch, n_in))}
        if self.name in ("weight_grad", "weight_grad_sgd"):
            s = {"o": sigmoid(normal(batch, n_in)), "err": normal(batch, n_out), "o_next": sigmoid(normal(batch, n_out))}
            if self.name == "weight_grad_sgd":
                s.update(W=normal(n_in, n_out) / np.sqrt(n_in), b=normal(n_out), step=LR / batch)
            return s
        if self.name == "gemm_core":
            return {"o": normal(batch, n_in), "delta": normal(batch, n_out)}
        if self.name == "propagate":
            return {"delta": normal(batch, n_out), "W": normal(n_in, n_out) / np.sqrt(n_out),
                    "o": sigmoid(normal(batch, n_in))}
        raise KeyError(self.name)

    def reference(self, inputs: dict) -> dict:
        s = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
        out = self.plain(s)
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    def work(self, size: str, itemsize: int) -> tuple[int, int]:
        """(bytes that must move: each input read once, each output written once; FLOPs)."""
        batch, n_in, n_out = layer(size, self.sizes)
        if self.name in ("delta_hidden", "delta_output"):
            return 3 * batch * n_in * itemsize, 0
        if self.name == "weight_grad":
            elems = batch * n_in + 2 * batch * n_out + batch * n_out + n_in * n_out + n_out
            return elems * itemsize, 2 * batch * n_in * n_out
        if self.name == "weight_grad_sgd":
            elems = batch * n_in + 2 * batch * n_out + batch * n_out + 2 * (n_in * n_out + n_out)
            return elems * itemsize, 2 * batch * n_in * n_out
        if self.name == "gemm_core":
            return (batch * n_in + batch * n_out + n_in * n_out) * itemsize, 2 * batch * n_in * n_out
        if self.name == "propagate":
            return (batch * n_out + n_in * n_out + 2 * batch * n_in) * itemsize, 2 * batch * n_in * n_out
        raise KeyError(self.name)


OPS = {
    "delta_hidden": Op("delta_hidden", plain_delta_hidden, DELTA_SIZES),
    "delta_output": Op("delta_output", plain_delta_output, DELTA_SIZES),
    "weight_grad": Op("weight_grad", plain_weight_grad, SIZES),
    "weight_grad_sgd": Op("weight_grad_sgd", plain_weight_grad_sgd, SIZES),
    "gemm_core": Op("gemm_core", plain_gemm_core, GEMM_CORE_SIZES),
    "propagate": Op("propagate", plain_propagate, SIZES),
}


# -- PyTorch ------------------------------------------------------------------------
def torch_or_skip(backend: Any, tf32: bool = False) -> Any:
    """PyTorch, set for this peer: float32 products in float32 (``tf32``: on TF32 tensor cores),
    bf16 products summed in float32 (no reduced-precision split-K reductions)."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    if backend.kind == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("PyTorch has no CUDA device")
        # fp32 means fp32: no TF32 on either side, unless this is a TF32 peer
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = False
        # bf16 means bf16 operands, float32 sums, as our bf16 GEMMs (issue 13) sum them
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    return torch


def torch_autocast(torch: Any, on: bool) -> Any:
    """torch.autocast to bfloat16 on CUDA (float32 tensors stay float32: the master weights), or nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def torch_bf16_mm(torch: Any) -> tuple[Callable[[Any, Any], Any], str]:
    """(mm, result dtype): bf16 operands, float32 sums and result, through
    ``torch.mm(a, b, out_dtype=torch.float32)``; PyTorch without ``out_dtype``: plain torch.mm,
    whose result is bf16 (float32 sums all the same)."""
    a = torch.ones((16, 16), dtype=torch.bfloat16, device="cuda")
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return torch.mm, "bfloat16"
    return (lambda x, y: torch.mm(x, y, out_dtype=torch.float32)), "float32"


class PeerUnavailable(RuntimeError):
    """A peer that cannot run with the libraries of this machine (the reason in the message)."""


@contextlib.contextmanager
def cupy_tf32(xp: Any) -> Iterator[None]:
    """CuPy's float32 GEMMs on TF32 tensor cores (cublasGemmEx with CUBLAS_COMPUTE_32F_FAST_TF32)
    while inside, then as before. CUPY_TF32=1 is CuPy's documented switch, but CuPy reads it once,
    at the first float32 GEMM of the process (cupy/_core/_routines_linalg.pyx get_compute_type),
    so a running process sets the compute type it caches, with the same module's set_compute_type."""
    import importlib

    try:
        linalg = importlib.import_module(f"{xp.__name__}._core._routines_linalg")
    except ImportError as exc:
        raise PeerUnavailable(f"this CuPy cannot set its GEMM compute type to TF32: {exc}") from exc
    missing = [name for name in ("get_compute_type", "set_compute_type", "COMPUTE_TYPE_TF32")
               if not hasattr(linalg, name)]
    if missing:
        raise PeerUnavailable(f"this CuPy cannot set its GEMM compute type to TF32: no {', '.join(missing)}")
    before = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, before)


def torch_device(backend: Any) -> str:
    return "cuda" if backend.kind == "cuda" else "cpu"


def torch_sync(torch: Any, backend: Any) -> Callable[[], None]:
    return torch.cuda.synchronize if backend.kind == "cuda" else (lambda: None)


def peer_reason(peer: str, backend: Any, size: str) -> str | None:
    """Why ``peer`` does not run in this session (None when it does)."""
    if peer in CPU_PEERS and backend.kind != "cpu":
        return f"{peer} is a CPU peer: run with --bench-device cpu"
    if peer in (*GPU_PEERS, "ours-graph", "ours-tf32", "cublas-tf32", *OURS_BF16_STEP_PEERS) and backend.kind != "cuda":
        return f"{peer} needs a CUDA GPU (none usable here)"
    if peer in ("torch-tf32", "torch-bf16", *BF16_STEP_PEERS) and backend.kind != "cuda":
        return f"{peer} is a tensor-core peer ({PRECISION[peer]}): CUDA only (none usable here)"
    if peer == "torch-compile" and backend.kind != "cuda":
        return "torch.compile peer runs on CUDA only (CPU inductor compile time would dominate the suite)"
    if peer in ("torch-compile", "torch-compile-bf16") and size not in COMPILE_SIZES:
        return f"torch.compile peer limited to {sorted(COMPILE_SIZES)} (minutes of compilation per shape)"
    return None
