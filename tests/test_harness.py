"""The test run's own plumbing (conftest.py at the repository root): seeds that reproduce, a
fuzz mode that draws new ones, the seed in a failure's report, and a tuner cache of the run's own."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpu_backprop.ops.autotune import cache_path

ROOT = Path(__file__).resolve().parents[1]
INNER = '''
def test_a(rng):
    assert False, f"draw {rng.integers(1 << 62)}"

def test_b(rng):
    assert False, f"draw {rng.integers(1 << 62)}"
'''


def run_inner(tmp_path, *args, **env):
    """Two failing tests that print their first draw, under a copy of the root conftest.py."""
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    environ = {k: v for k, v in os.environ.items() if k not in ("GPU_BACKPROP_FUZZ", "GPU_BACKPROP_SEED")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=tmp_path,
                          capture_output=True, text=True, env={**environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = {}
    for name, body in re.findall(r"_{3,} (test_\w) _{3,}\n(.*?)(?=\n_{3,} test_|\n=+ short test summary)",
                                 proc.stdout, re.S):
        draw = re.search(r"AssertionError: draw (\d+)", body)
        seed = re.search(rf"rng seed (\d+): rerun with GPU_BACKPROP_SEED=\1 python -m pytest 'test_inner.py::{name}'",
                         body)
        assert draw and seed, body  # every failure's report names its seed
        found[name] = int(seed[1]), int(draw[1])
    assert set(found) == {"test_a", "test_b"}, proc.stdout
    return found


def test_fixed_seeds_by_default_and_a_reported_seed_reproduces(tmp_path):
    first, second = run_inner(tmp_path), run_inner(tmp_path)
    assert first == second  # the same seeds and draws on every run
    assert first["test_a"][0] != first["test_b"][0]  # each test its own seed
    seed, draw = first["test_a"]
    assert draw == np.random.default_rng(seed).integers(1 << 62)
    # the seed a report names, passed back, gives that draw again, also under --fuzz
    assert run_inner(tmp_path, "--fuzz", GPU_BACKPROP_SEED=str(seed))["test_b"] == (seed, draw)
    assert run_inner(tmp_path, "--rng-seed", str(seed))["test_b"] == (seed, draw)


def test_fuzz_draws_new_seeds(tmp_path):
    fixed = run_inner(tmp_path)
    runs = [run_inner(tmp_path, GPU_BACKPROP_FUZZ="1"), run_inner(tmp_path, "--fuzz")]
    seeds = {run[name][0] for run in [fixed, *runs] for name in run}
    assert len(seeds) == 6  # no seed repeats (a chance of ~1e-9 per pair)


def test_the_tuner_cache_is_a_temporary_folder_of_this_run():
    """The user's ~/.cache/gpu_backprop is never read or written by tests or benchmarks."""
    folder = cache_path().parent
    assert folder.name.startswith("gpu_backprop-cache-") and folder.is_dir(), folder
    assert Path.home() / ".cache" not in folder.parents


def test_hypothesis_examples_are_fixed_by_default(pytestconfig):
    from hypothesis import settings

    assert settings.default.derandomize is not pytestconfig.getoption("--fuzz")
    assert settings.default.deadline is None
