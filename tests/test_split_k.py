"""Split-K weight gradients (kernels/weight_grad.cu, ops/cuda.py ``large/s4``...) on the CUDA-on-CPU
shim, against the float64 twin: the batch cut into slices that run as separate blocks, shuffled
and several at once; the last slice of each tile adds the partials in slice order and applies
the update. Per-element rounding bounds, NaN-poisoned outputs, bit-identical repeats. (The
short-batch shapes and the SGD and momentum epilogues run with splits in test_emulated_kernels.)"""
import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops import NumpyOps
from gpu_backprop.ops.autotune import Tuner
from gpu_backprop.ops.cuda import CudaOps, split_of, split_paths

from .emulator.builder import EmuLoader, planted_kernels
from .test_emulated_kernels import Always, close, gemm_terms, inputs, nan


class ByKind(Tuner):
    """One path per kind of GEMM: propagate, weight_grad, forward."""

    def __init__(self, propagate, weight_grad, forward):
        super().__init__(enabled=False)
        self.paths = {"propagate": propagate, "weight_grad": weight_grad, "forward": forward}

    def choose(self, key, candidates, trial, default):
        path = self.paths[key.split("|")[0]]
        assert path in candidates, (key, path, candidates)
        return path

twin = NumpyOps()
DTYPES = [np.float32, np.float64]
# (batch, n_in, n_out): one slice only, slices shorter than a tile's k step, a batch of 4097
SHAPES = [(1, 7, 3), (33, 63, 65), (129, 129, 1), (257, 65, 130), (4097, 33, 17)]
SPLITS = ["small/s2", "small/s8", "large/s4"]


@pytest.fixture(scope="module")
def loader():
    return EmuLoader(seed=0)


def ops_on(loader, path):
    return CudaOps(np, scipy.special, loader, tuner=Always(path))


@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", SPLITS)
def test_split_weight_grad(loader, rng, path, shape, dtype, prologue):
    batch, n_in, n_out = shape
    o, _ = inputs(rng, dtype, batch, n_in, n_out, "sigmoid")
    g = rng.standard_normal((batch, n_out)).astype(dtype)
    o_next, _ = inputs(rng, dtype, batch, n_out, 1, "tanh")
    grad_w, grad_b = nan((n_in, n_out), dtype), nan(n_out, dtype)
    kwargs = dict(o_next=o_next, activation="tanh", delta_out=nan(g.shape, dtype)) if prologue else {}
    ops_on(loader, path).weight_grad(o, g, grad_w, grad_b, config=path, **kwargs)
    f64 = dict(o_next=o_next.astype(np.float64), activation="tanh", delta_out=np.empty(g.shape)) if prologue else {}
    exp_w, exp_b = twin.weight_grad(o.astype(np.float64), g.astype(np.float64), np.empty(grad_w.shape),
                                    np.empty(n_out), **f64)
    delta = np.abs(f64["delta_out"] if prologue else g.astype(np.float64))
    close(grad_w, exp_w, dtype, k=batch + 4, terms=gemm_terms(o.T, delta))
    close(grad_b, exp_b, dtype, k=batch + 4, terms=delta.sum(axis=0))
    if prologue:  # every delta element written (by the tile-row-0 block of its slice)
        close(kwargs["delta_out"], f64["delta_out"], dtype)


def split_gradient(loader, path, seed=1):
    rng = np.random.default_rng(seed)
    o, g = rng.standard_normal((1000, 70)).astype(np.float32), rng.standard_normal((1000, 40)).astype(np.float32)
    grad_w, grad_b = nan((70, 40), np.float32), nan(40, np.float32)
    ops_on(loader, path).weight_grad(o, g, grad_w, grad_b, config=path)
    return grad_w, grad_b


@pytest.mark.parametrize("path", SPLITS)
def test_split_bits_do_not_depend_on_which_slice_finishes_last(loader, path):
    first = split_gradient(loader, path)
    for _ in range(3):  # a new shuffled order each launch, three blocks at once
        for a, b in zip(first, split_gradient(loader, path)):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.fixture(scope="module")
def last_slice_by_index(tmp_path_factory):
    """weight_grad.cu with a planted race: the slice of the highest index adds the partials without
    waiting for the ticket (right only if every other slice has finished)."""
    return planted_kernels(tmp_path_factory.mktemp("kernels"), "weight_grad.cu",
                           "if (!last_to_arrive(split.tickets + tile, (unsigned int)split.splits)) return;",
                           "if (slice != split.splits - 1) return;")


def test_planted_early_sum_passes_in_order_and_fails_shuffled(last_slice_by_index):
    expected = split_gradient(EmuLoader(blocks="in_order"), "small/s4")
    in_order = split_gradient(EmuLoader(last_slice_by_index, blocks="in_order"), "small/s4")
    for a, b in zip(in_order, expected):
        np.testing.assert_array_equal(a, b)
    planted = EmuLoader(last_slice_by_index, seed=0)
    wrong = [split_gradient(planted, "small/s4", seed) for seed in range(3)]
    right = [split_gradient(EmuLoader(blocks="in_order"), "small/s4", seed) for seed in range(3)]
    assert any(not np.array_equal(w[0], r[0]) for w, r in zip(wrong, right))


def test_the_tuner_offers_splits_only_where_each_slice_has_rows(loader):
    seen = {}

    class Recording(Tuner):
        def __init__(self):
            super().__init__(enabled=False)

        def choose(self, key, candidates, trial, default):
            seen[key] = candidates
            return default

    ops = CudaOps(np, scipy.special, loader, tuner=Recording())
    ops.tune_min_fma = 0  # tune these small shapes too
    for batch in (100, 4096):
        o, g = np.ones((batch, 3)), np.ones((batch, 2))
        ops.weight_grad(o, g, np.empty((3, 2)), np.empty(2))
    assert not any("/s" in c for c in seen["weight_grad|float64|3x2x100"])
    assert {"small/s8", "large/s8", "large/s2"} <= set(seen["weight_grad|float64|3x2x4096"])
    assert split_paths(4096) and all(split_of(p)[1] * 64 <= 4096 for p in split_paths(4096))
    with pytest.raises(ValueError, match="config: expected one of"):
        ops.propagate(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)), "tanh", np.empty((2, 2)), config="large/s2")


def test_the_paths_each_gemm_ran_on_are_reported(loader):
    """What `gpu-backprop train --json` prints as gemm_paths: every GEMM shape of a step and its path."""
    from gpu_backprop import MLP

    model = MLP([13, 9, 5], device="cpu", seed=0)
    model.ops = CudaOps(np, scipy.special, loader, tuner=ByKind("large", "large/s2", "large"))
    model.ops.tune_min_fma = 0  # small shapes offered every path too
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((300, 13)), rng.integers(0, 5, 300), epochs=1, batch_size=300, lr=0.1)
    paths = model.ops.gemm_paths()
    assert paths == {"forward|float32|300x9x13": "large", "forward|float32|300x5x9": "large",
                     "propagate|float32|300x9x5": "large", "weight_grad|float32|9x5x300": "large/s2",
                     "weight_grad|float32|13x9x300": "large/s2"}
    assert NumpyOps().gemm_paths() == {}
