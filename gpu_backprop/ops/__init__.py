"""Fused operations: each one's math as a NumPy twin (reference.py), the CUDA
launchers of the same functions (cuda.py), and the choice between them."""
from __future__ import annotations

from typing import Any

from .reference import ArrayOps, Gather, NumpyOps, Output, Propagate, Record, Rule, Update, apply_rule


def make_ops(device: Any, fused: bool = True, precision: str = "fp32") -> ArrayOps:
    """The operations for ``device``: NumPy twin, fused CUDA kernels (with tensor cores for
    precision="tf32" and "bf16"), or unfused CuPy; on the CPU with precision="bf16", the NumPy
    twin with bf16 roundings (:class:`~gpu_backprop.ops.bf16.Bf16Ops`)."""
    if device.kind == "cpu":
        if precision == "bf16":
            from .bf16 import Bf16Ops

            return Bf16Ops()
        return NumpyOps()
    import cupyx.scipy.special

    if not fused:
        if precision == "bf16":
            raise ValueError("fused: precision='bf16' on CUDA runs on the fused kernels only (fused=True)")
        return ArrayOps(device.xp, cupyx.scipy.special)
    from .cuda import CudaOps, cupy_loader

    return CudaOps(device.xp, cupyx.scipy.special, cupy_loader(device), precision=precision)


__all__ = ["ArrayOps", "Gather", "NumpyOps", "Output", "Propagate", "Record", "Rule", "Update", "apply_rule",
           "make_ops"]
