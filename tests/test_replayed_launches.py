"""A launcher's later calls with the same arguments re-issue the launches its first call
recorded (gpu_backprop.ops.cuda.replayed): on the CUDA-on-CPU shim, the replays must give what
fresh calls give (the twin), re-read their arrays, rebuild for other scalars, and leave out the
tuner's trials. (The first H100 run measured the checks and structs rebuilt at every call at
3-4x the host time of a launch before them.)"""
import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops import NumpyOps
from gpu_backprop.ops.autotune import Tuner
from gpu_backprop.ops.cuda import CudaOps

from .emulator.builder import EmuLoader
from .test_emulated_kernels import Always, close

twin = NumpyOps()


@pytest.fixture(scope="module")
def loader():
    return EmuLoader()


def arrays(rng, batch=9, n_in=13, n_out=7, dtype=np.float32):
    return {"o": rng.random((batch, n_in)).astype(dtype), "err": rng.standard_normal((batch, n_out)).astype(dtype),
            "o_next": rng.random((batch, n_out)).astype(dtype),
            "W": rng.standard_normal((n_in, n_out)).astype(dtype), "b": rng.standard_normal(n_out).astype(dtype)}


@pytest.mark.parametrize("path", ["small", "large/s2", "cublas"])
def test_replayed_updates_read_the_arrays_as_they_are_and_rebuild_for_another_step(loader, path):
    """Three momentum updates in place: the first recorded, the second replayed on new values
    written into the same arrays, the third with another step size (a scalar: a new key).
    Planted faults: a scalar keyed by identity or left out of the key (the third replays the
    old step size); a CuPy operation of the cuBLAS path (W += vel_w) not issued through
    _issue (its replay skips it)."""
    ops = CudaOps(np, scipy.special, loader, tuner=Always(path))
    rng = np.random.default_rng(0)
    a = arrays(rng)
    vel_w, vel_b = np.zeros_like(a["W"]), np.zeros_like(a["b"])
    delta = np.empty_like(a["err"])
    W, b, tw_W, tw_b = a["W"].copy(), a["b"].copy(), a["W"].copy(), a["b"].copy()
    tw_vw, tw_vb, tw_delta = np.zeros_like(vel_w), np.zeros_like(vel_b), np.empty_like(delta)
    o, err, o_next = a["o"], a["err"], a["o_next"]
    launches = []
    for step in (0.1, 0.1, 0.05):
        before = loader.launches
        ops.sgd_update(o, err, W, b, step, 0.9, vel_w, vel_b, o_next=o_next, activation="sigmoid", delta_out=delta)
        launches.append(loader.launches - before)
        twin.sgd_update(o, err, tw_W, tw_b, step, 0.9, tw_vw, tw_vb, o_next=o_next, activation="sigmoid",
                        delta_out=tw_delta)
        close(W, tw_W, np.float32, k=9 * 3 + 8, terms=np.abs(tw_W) + 1)
        close(b, tw_b, np.float32, k=9 * 3 + 8, terms=np.abs(tw_b) + 1)
        err[...] = rng.standard_normal(err.shape)  # new values, same arrays: the replay must read them
        o[...] = rng.random(o.shape)
    assert launches[0] == launches[1] == launches[2] > 0
    assert len(ops._launches) == 2  # the two step sizes


def test_the_tuners_trials_are_not_replayed(loader, tmp_path):
    """The first call tunes (every candidate runs once, timed); its replays run the chosen path
    alone. Planted fault: the trials recorded with the call (each replay runs every candidate)."""
    timed = []

    def timer(fn):
        fn()
        timed.append(1)
        return float(len(timed))  # the first candidate is the fastest

    ops = CudaOps(np, scipy.special, loader, tuner=Tuner("emu", timer, enabled=True, path=tmp_path / "a.json"))
    ops.tune_min_fma = 0  # tune this small shape too
    rng = np.random.default_rng(1)
    a = arrays(rng)
    out = np.empty((9, 7), np.float32)
    ops.forward(a["o"], a["W"], a["b"], "tanh", out)
    assert len(timed) > 1
    before = loader.launches
    ops.forward(a["o"], a["W"], a["b"], "tanh", out)
    assert loader.launches - before == 1  # our GEMM (or, on cuBLAS, the bias kernel after it)
    close(out, np.tanh(a["o"].astype(np.float64) @ a["W"] + a["b"]), np.float32, k=13 + 4,
          terms=np.abs(a["o"]) @ np.abs(a["W"]) + np.abs(a["b"]))


def test_a_launcher_inside_another_is_recorded_by_the_outer_one(loader):
    """forward on the cuBLAS path gathers the batch through gather_batch (itself a launcher):
    the outer replay re-issues the gather too, on the counter's new value."""
    from gpu_backprop.ops import Gather

    ops = CudaOps(np, scipy.special, loader, tuner=Always("cublas"))
    rng = np.random.default_rng(2)
    X, Y = rng.random((20, 13)).astype(np.float32), rng.random((20, 3)).astype(np.float32)
    order, step = rng.permutation(20).astype(np.int64), np.zeros(1, np.int64)
    xb, yb = np.empty((5, 13), np.float32), np.empty((5, 3), np.float32)
    W, b, out = rng.standard_normal((13, 7)).astype(np.float32), np.zeros(7, np.float32), np.empty((5, 7), np.float32)
    gather = Gather(X, Y, order, step, 5, yb)
    for i in range(3):
        step[0] = i
        ops.forward(xb, W, b, "identity", out, gather=gather)
        rows = order[5 * i:5 * i + 5]
        np.testing.assert_array_equal(xb, X[rows])
        np.testing.assert_array_equal(yb, Y[rows])
        close(out, X[rows].astype(np.float64) @ W, np.float32, k=17, terms=np.abs(X[rows]) @ np.abs(W))


def test_other_arrays_are_another_call(loader):
    """Arrays are keyed by identity: the same shapes in other arrays are another call, which
    writes its own output. Planted fault: arrays left out of the key (the replay writes the
    first call's output again, the second stays poisoned)."""
    ops = CudaOps(np, scipy.special, loader, tuner=Always("small"))
    rng = np.random.default_rng(3)
    a = arrays(rng)
    outs = [np.full((9, 7), np.nan, np.float32) for _ in range(2)]
    for out in outs:
        ops.forward(a["o"], a["W"], a["b"], "identity", out)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert len(ops._launches) == 2


def test_the_tuners_trials_run_the_prologue_into_scratch(loader):
    """Each path's trial does the work the call does, delta's prologue included (the H100 sweep:
    our prologue path runs a k step 2.5x slower than the core, a cost trials without it never saw),
    and writes only scratch: W, b and delta_out stay as they were. Planted faults: the trial without
    the prologue (as before); the cuBLAS trial writing the caller's delta_out."""
    rng = np.random.default_rng(4)
    a = arrays(rng, batch=130, n_in=13, n_out=7)  # 130 rows: split in two offered too
    expected = a["err"].astype(np.float64) * a["o_next"] * (1 - a["o_next"].astype(np.float64))
    checked = []

    class Trying(Tuner):
        def __init__(self):
            super().__init__(enabled=False)

        def choose(self, key, candidates, trial, default):
            for path in candidates:
                scratch = ops._scratch("tune_delta", a["err"].shape, np.dtype(np.float32))
                scratch[...] = np.nan
                trial(path)
                close(scratch, expected, np.float32, k=4, terms=np.abs(expected))
                checked.append(path)
            return default

    ops = CudaOps(np, scipy.special, loader, tuner=Trying())
    ops.tune_min_fma = 0
    W, b, delta_out = a["W"].copy(), a["b"].copy(), np.full_like(a["err"], np.nan)
    # choose() runs inside the call, before the chosen launch: check W, b, delta_out after the trials
    real_choose = Trying.choose

    def choose_then_check(self, *args, **kwargs):
        result = real_choose(self, *args, **kwargs)
        np.testing.assert_array_equal(W, a["W"])
        np.testing.assert_array_equal(b, a["b"])
        assert np.isnan(delta_out).all()
        return result

    ops.tuner.choose = choose_then_check.__get__(ops.tuner)
    ops.sgd_update(a["o"], a["err"], W, b, 0.1, o_next=a["o_next"], activation="sigmoid", delta_out=delta_out)
    assert "cublas" in checked and "small/s2" in checked and "warp" in checked
    close(delta_out, expected, np.float32, k=4, terms=np.abs(expected))
