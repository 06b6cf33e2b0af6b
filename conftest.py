"""Shared by tests/ and benchmarks/: the `gpu` mark skips, with the reason, where no
CUDA device is usable (CuPy's own `gpu` mark does not skip by itself)."""
import os

import pytest

from gpu_backprop.device import probe_cuda


def _gpu_reason() -> str:
    cupy, why_not = probe_cuda(0)
    return "" if cupy is not None else why_not


def pytest_collection_modifyitems(config, items):
    # CuPy's own `gpu` mark does not skip by itself; ours does, with the reason.
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            if reason is None:
                reason = _gpu_reason()
            if reason and os.environ.get("GPU_BACKPROP_REQUIRE_GPU"):
                pytest.exit(f"GPU_BACKPROP_REQUIRE_GPU is set but no GPU is usable: {reason}", returncode=3)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}"))
