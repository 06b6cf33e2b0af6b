"""Shared by tests/ and benchmarks/: the `gpu` mark skips, with the reason, where no
CUDA device is usable (CuPy's own `gpu` mark does not skip by itself); the seeds of
random test inputs; one temporary tuner cache for the whole run."""
import hashlib
import os
import shutil
import tempfile

import numpy as np
import pytest

from gpu_backprop.device import probe_cuda

FUZZ_ENV, SEED_ENV, CACHE_ENV = "GPU_BACKPROP_FUZZ", "GPU_BACKPROP_SEED", "GPU_BACKPROP_CACHE"
_SEED = pytest.StashKey[int]()
_CACHE = pytest.StashKey[tuple]()


def pytest_addoption(parser):
    group = parser.getgroup("gpu_backprop seeds")
    group.addoption("--fuzz", action="store_true", default=os.environ.get(FUZZ_ENV, "") not in ("", "0"),
                    help=f"fresh random seeds for the `rng` fixture every run (or {FUZZ_ENV}=1); "
                         "default: a fixed seed per test, derived from its node id")
    group.addoption("--rng-seed", type=int, default=int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else None,
                    help=f"this seed for every `rng` fixture (or {SEED_ENV}=N): reruns a failure the report names")


def pytest_configure(config):
    # The tuner's choices of a test or benchmark run (forced paths, stand-in timers, a card busy with
    # other work) must not land in, nor come from, the user's ~/.cache/gpu_backprop: one temporary
    # cache folder per run, for this process and its subprocesses (gpu_backprop.ops.autotune.cache_path).
    config.stash[_CACHE] = (os.environ.get(CACHE_ENV), tempfile.mkdtemp(prefix="gpu_backprop-cache-"))
    os.environ[CACHE_ENV] = config.stash[_CACHE][1]
    try:
        from hypothesis import settings
    except ImportError:
        return
    # Fixed examples by default, like `rng`; fresh ones under --fuzz. No deadline: the time of one
    # example on shared CPUs is not a property of the code, and a timing failure does not reproduce.
    settings.register_profile("gpu_backprop-fixed", derandomize=True, deadline=None)
    settings.register_profile("gpu_backprop-fuzz", derandomize=False, deadline=None, print_blob=True)
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile("gpu_backprop-fuzz" if config.getoption("--fuzz") else "gpu_backprop-fixed")


def pytest_unconfigure(config):
    if _CACHE in config.stash:
        before, tmp = config.stash[_CACHE]
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before
        shutil.rmtree(tmp, ignore_errors=True)


def pytest_report_header(config):
    if config.getoption("--rng-seed") is not None:
        return f"rng: seed {config.getoption('--rng-seed')} for every test"
    return "rng: fresh seeds (fuzz)" if config.getoption("--fuzz") else "rng: a fixed seed per test (--fuzz draws new ones)"


def seed_for(nodeid: str, config) -> int:
    """--rng-seed if given; else fresh under --fuzz; else fixed by the node id (stable across runs and machines)."""
    if config.getoption("--rng-seed") is not None:
        return config.getoption("--rng-seed")
    if config.getoption("--fuzz"):
        return int.from_bytes(os.urandom(4), "little")
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:4], "little")


@pytest.fixture
def rng(request):
    """Random inputs from the seed of this test (see seed_for); a failure's report names the seed."""
    seed = seed_for(request.node.nodeid, request.config)
    request.node.stash[_SEED] = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and _SEED in item.stash:
        seed = item.stash[_SEED]
        report.sections.append(("rng seed", f"rng seed {seed}: rerun with {SEED_ENV}={seed} python -m pytest "
                                            f"'{item.nodeid}'  (or --rng-seed {seed})"))


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
