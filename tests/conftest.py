import numpy as np
import pytest

# The `rng` fixture (a fixed seed per test; --fuzz for fresh ones) is in the repository's conftest.py.


def rel_error(actual, expected, scale: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, scale) in float64; NaN never passes.

    ``scale``: the size of the terms summed into ``expected`` (e.g. || |A| |B| || for a
    GEMM): float rounding is relative to those terms, not to a result that cancels
    to near zero (a 7-term float32 sum near 0 is off by more than 2e-6 of itself)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    denom = max(np.linalg.norm(expected), scale, np.finfo(np.float64).tiny)
    return float(np.linalg.norm(actual - expected) / denom)


TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def pytest_terminal_summary(terminalreporter):
    """The ptxas resource report of the compile checks and the SASS checks' counts, one line per kernel."""
    import importlib

    reports = [
        ("tests.test_compile", "ptxas report (compiler arch kernel: registers, shared memory, spill/stack bytes)",
         lambda c, arch, k, regs, smem, spill: f"{c:5} {arch} {k:55} {regs:4} regs {smem:6} B smem {spill} B spill"),
        ("tests.test_sass", "sm_90 SASS (kernel: FMAs, 128-bit shared loads, narrower shared loads, FMA share of the three)",
         lambda k, fma, wide, narrow, share: f"{k:62} {fma:5} FMA {wide:4} LDS.128 {narrow:4} LDS {share:6.1%}"),
    ]
    for module, title, line in reports:
        try:
            rows = importlib.import_module(module).REPORT
        except ImportError:
            continue
        if rows:
            terminalreporter.write_line(title)
            for row in (sorted(rows) if module.endswith("sass") else rows):
                terminalreporter.write_line("  " + line(*row))


@pytest.fixture(scope="module")
def gpu():
    """(cupy, fused ops) for `gpu` tests: a fresh ops object, not the one the device caches (which
    every MLP(device="cuda") trains on), so a test cannot change what later tests run."""
    from gpu_backprop import get_device
    from gpu_backprop.ops import make_ops

    device = get_device("cuda")
    return device.xp, make_ops(device, fused=True)


@pytest.hookimpl(trylast=True)  # after -k and -m deselected what will not run
def pytest_collection_modifyitems(config, items):
    """The tests that read the kernel compiles last, and those compiles queued on their worker now,
    to run beside the rest of the suite (tests/cubins.py)."""
    from . import cubins

    jobs = {item: cubins.jobs_of(item) for item in items}
    late = [item for item in items if jobs[item] or item.nodeid.split("::")[0].endswith("test_compile.py")]
    if late and not config.option.collectonly:
        moved = set(late)
        items[:] = [item for item in items if item not in moved] + late
        cubins.start([job for item in late for job in jobs[item]])
