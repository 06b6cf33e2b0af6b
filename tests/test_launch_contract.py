"""What one launch may be given, enforced before it runs (gpu_backprop.ops.reference.check_disjoint,
the same check in the launchers and the twin), and the kernels' agreement with the twin on
non-finite values, on the CUDA-on-CPU shim.

A launch's blocks run in any order and at once, so an array it writes must share no memory
with another it reads or writes: the tests below show the race such an alias causes on the
shim (its blocks run shuffled, several at once), then that every launcher refuses it, naming
both arguments."""
import numpy as np
import pytest
import scipy.special

from gpu_backprop import MLP
from gpu_backprop.ops import NumpyOps, Output, Propagate, Update
from gpu_backprop.ops import cuda as cuda_ops
from gpu_backprop.ops import reference
from gpu_backprop.ops.autotune import Tuner
from gpu_backprop.ops.cuda import CudaOps
from gpu_backprop.train import Trainer

from .test_emulated_kernels import Always

from .emulator.builder import EmuLoader

twin = NumpyOps()


@pytest.fixture(scope="module")
def loader():
    return EmuLoader(seed=0)


@pytest.fixture
def emu(loader):
    return CudaOps(np, scipy.special, loader, tuner=Tuner(enabled=False))


def alias_case(rng, n_in=129, n_out=300, batch=33):
    """weight_grad with a prologue over 3 x 5 tiles of 64: each column's tile-row-0 block writes delta."""
    o = rng.standard_normal((batch, n_in))
    err = rng.standard_normal((batch, n_out))
    o_next = scipy.special.expit(rng.standard_normal((batch, n_out)))
    return o, err, o_next, np.empty((n_in, n_out)), np.empty(n_out)


def test_an_aliased_delta_out_races_on_the_shim(emu, rng, monkeypatch):
    """The hazard the check closes: delta written over the error other blocks still read. With the
    check switched off, rows of dW beyond the first tile row come out wrong (the twin, in order,
    would give the right answer)."""
    o, err, o_next, grad_w, grad_b = alias_case(rng)
    expected_w, expected_b = twin.weight_grad(o, err.copy(), np.empty_like(grad_w), np.empty_like(grad_b),
                                              o_next=o_next, activation="sigmoid", delta_out=np.empty_like(err))
    monkeypatch.setattr(reference, "check_disjoint", lambda *args: None)  # the launchers check through it
    emu.weight_grad(o, err, grad_w, grad_b, o_next=o_next, activation="sigmoid", delta_out=err, config="small")
    assert np.allclose(grad_w[:64], expected_w[:64])  # the tile row that writes delta reads err first
    assert not np.allclose(grad_w[64:], expected_w[64:])


@pytest.mark.parametrize("ops", ["fused", "twin"])
def test_weight_grad_refuses_delta_out_over_its_error(emu, rng, ops):
    o, err, o_next, grad_w, grad_b = alias_case(rng)
    target = emu if ops == "fused" else twin
    with pytest.raises(ValueError, match=r"^delta_out and delta overlap in memory"):
        target.weight_grad(o, err, grad_w, grad_b, o_next=o_next, activation="sigmoid", delta_out=err)
    with pytest.raises(ValueError, match=r"^delta_out and delta overlap in memory"):
        target.sgd_update(o, err, grad_w, grad_b, 0.1, o_next=o_next, activation="sigmoid",
                          delta_out=err[:, :])  # another view of the same memory


def overlapping_pair(shape, shift=1):
    """Two C-contiguous arrays of ``shape`` over one buffer, ``shift`` elements apart."""
    size = int(np.prod(shape))
    buf = np.zeros(size + shift)
    return buf[:size].reshape(shape), buf[shift:].reshape(shape)


@pytest.mark.parametrize("ops", ["fused", "twin"])
def test_every_launcher_refuses_overlapping_operands(emu, rng, ops):
    target = emu if ops == "fused" else twin
    B, n = 5, 7
    W, b = rng.standard_normal((n, n)), rng.standard_normal(n)
    o = rng.standard_normal((B, n))
    cases = {
        "out and o": lambda: target.forward(o, W, b, "tanh", o),
        "out and W": lambda: target.forward(np.ones((n, n)), W, b, "tanh", W),
        "out and delta": lambda: target.propagate((pair := overlapping_pair((B, n)))[0], W, o, "tanh", pair[1]),
        "out and err": lambda: target.hidden_delta((pair := overlapping_pair((B, n)))[0], o, "tanh", pair[1]),
        "out and y_hat": lambda: target.output_delta(o, o.copy(), "sigmoid", "mse", o, np.zeros(1)),
        "W and delta": lambda: target.sgd_update(o, W[:B], W, b, 0.1),
        "b and vel_b": lambda: target.sgd_update(o, o.copy(), W, b, 0.1, 0.9, np.zeros_like(W), b),
        "xb and X": lambda: target.gather_batch(o, o.copy(), np.arange(B), np.zeros(1, np.int64), B,
                                                o[:, :], np.zeros((B, n))),
    }
    for names, call in cases.items():
        with pytest.raises(ValueError, match=f"^{names} overlap in memory"):
            call()


@pytest.mark.parametrize("ops", ["fused", "twin"])
def test_backward_refuses_a_part_that_writes_what_another_reads(emu, rng, ops):
    """The grouped launch: an update of the very layer whose W the propagation reads, and an
    output delta written over the propagation's output."""
    target = emu if ops == "fused" else twin
    B, n = 6, 5
    W, b = rng.standard_normal((n, n)), rng.standard_normal(n)
    o, delta, out = rng.standard_normal((B, n)), rng.standard_normal((B, n)), np.empty((B, n))
    with pytest.raises(ValueError, match=r"^updates\[0\]\.W and propagate\.W overlap"):
        target.backward(Propagate(delta, W, o, "tanh", out), [Update(o, delta, W, b, 0.1)])
    y_hat, y = scipy.special.expit(rng.standard_normal((B, n))), rng.random((B, n))
    with pytest.raises(ValueError, match=r"^propagate\.delta and propagate\.out overlap"):
        target.backward(Propagate(out, W, o, "tanh", out), [], Output(y_hat, y, "sigmoid", "mse", np.zeros(1)))


@pytest.mark.parametrize("seed", range(4))
def test_an_update_of_the_output_delta_waits_for_it(loader, seed):
    """backward(propagation, update, output) where the update reads the output's delta: inside
    one grid only the propagation computes that delta as it loads it, while the update's blocks
    would read it from memory at the same time (a review found W2 all NaN from a NaN-filled delta
    on the shuffled shim). The output delta runs first, as in the twin."""
    rng = np.random.default_rng(seed)
    B, n_in, n_out = 64, 40, 30
    o, W, o2 = rng.random((B, n_in)), rng.standard_normal((n_in, n_out)), rng.random((B, n_in))
    y_hat, y = rng.random((B, n_out)), rng.random((B, n_out))
    W2, b2 = rng.standard_normal((n_in, n_out)), rng.standard_normal(n_out)
    results = []
    for ops in (twin, CudaOps(np, scipy.special, EmuLoader(seed=seed), tuner=Always("small"))):
        d, out, loss = np.full((B, n_out), np.nan), np.full((B, n_in), np.nan), np.zeros(1)
        w, b = W2.copy(), b2.copy()
        ops.backward(Propagate(d, W, o, "sigmoid", out), [Update(o2, d, w, b, 0.01)],
                     Output(y_hat, y, "sigmoid", "mse", loss))
        results.append((d, out, w, b, loss))
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-14)


def test_in_place_elementwise_is_allowed(emu, rng):
    """hidden_delta in place (out is err): each element is read and written by one thread."""
    err, o = rng.standard_normal((9, 33)), np.tanh(rng.standard_normal((9, 33)))
    expected = twin.hidden_delta(err.copy(), o, "tanh", np.empty_like(err))
    emu.hidden_delta(err, o, "tanh", err)
    np.testing.assert_allclose(err, expected, rtol=1e-14)


def test_adjacent_arrays_pass_and_one_shared_element_fails():
    a, b = overlapping_pair((3, 4), shift=12)  # back to back in one buffer
    reference.check_disjoint(np, [("a", a)], [("b", b)])
    a, b = overlapping_pair((3, 4), shift=11)  # the last element of a is the first of b
    with pytest.raises(ValueError, match="^a and b overlap"):
        reference.check_disjoint(np, [("a", a)], [("b", b)])
    with pytest.raises(ValueError, match="^b and a overlap in memory: one launch writes b and writes a"):
        reference.check_disjoint(np, [("b", b), ("a", a)], [])


# -- the block a GEMM kernel runs with -------------------------------------------------------
@pytest.mark.parametrize("config", list(cuda_ops.CONFIGS))
def test_gemm_kernels_trap_on_a_block_their_core_was_not_written_for(loader, config):
    """The launchers derive the block from the tile (threads_of); a kernel launched with any
    other block traps (a launch error on a GPU, an exception here) instead of computing part
    of each tile."""
    from gpu_backprop.ops.cuda import GEMM_FILES, gemm_name, names_in, threads_of
    from gpu_backprop.ops.launch import make

    dtype = np.float64 if config in cuda_ops.configs_for(np.float64) else np.float32  # the wide tiles: float32
    kernel = loader.function(GEMM_FILES["forward"], gemm_name("forward", dtype, config),
                             names_in(GEMM_FILES["forward"]))
    o, W, b = np.ones((3, 4), dtype), np.ones((4, 5), dtype), np.zeros(5, dtype)
    out = np.full((3, 5), np.nan, dtype)
    params = make("ForwardParams", dtype, o=o, W=W, b=b, out=out, M=3, N=5, K=4, act=0)
    kernel((1, 1, 1), (threads_of(config), 1, 1), [params])
    np.testing.assert_array_equal(out, 4.0)
    for wrong in (threads_of(config) // 2, threads_of(config) + 32):
        with pytest.raises(RuntimeError, match="trapped"):
            kernel((1, 1, 1), (wrong, 1, 1), [params])


# -- NaN and Inf as the twin has them ----------------------------------------------------------
def same_non_finite(actual, expected):
    """NaN where the twin has NaN, the same infinities, finite elsewhere."""
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
def test_forward_keeps_nan_and_inf_where_the_twin_does(emu, activation):
    o = np.array([[np.nan, 0.0], [np.inf, 0.0], [-np.inf, 0.0], [1.0, 2.0]])
    W, b = np.eye(2), np.zeros(2)
    out = np.empty((4, 2))
    emu.forward(o, W, b, activation, out, config="small")
    same_non_finite(out, twin.forward(o, W, b, activation, np.empty((4, 2))))


@pytest.mark.parametrize("loss,activation", [("mse", "sigmoid"), ("cross_entropy", "identity")])
def test_output_loss_is_nan_where_the_twin_is(emu, loss, activation):
    """The probe of the issue: a NaN output under cross-entropy gave a finite loss (the clamp)."""
    y = np.array([[1.0, 0.0], [0.0, 1.0]])
    for bad in ([[np.nan, 0.5], [0.25, 0.75]], [[0.5, np.nan], [0.25, 0.75]], [[0.5, np.inf], [0.25, 0.75]]):
        y_hat = np.array(bad)  # where the target is 1, and where it is 0 (0 log NaN is NaN, as in the twin)
        for name, fn in (("fused", emu.output_delta), ("twin", twin.output_delta)):
            loss_out = np.zeros(1)
            with np.errstate(invalid="ignore"):
                fn(y_hat, y, activation, loss, np.empty_like(y), loss_out)
            assert np.isnan(loss_out[0]) or (loss == "mse" and np.isinf(loss_out[0])), (name, bad)


def test_a_float32_loss_that_overflows_is_inf_as_in_the_twin(emu):
    """The squared error is formed in the array's type, as the twin forms it: a float32 difference
    of 2e19 squares to Inf on both (the kernel once squared in double and gave 2e38)."""
    y_hat, y = np.array([[2e19, 0.0]], np.float32), np.zeros((1, 2), np.float32)
    for fn in (emu.output_delta, twin.output_delta):
        loss_out = np.zeros(1, np.float32)
        with np.errstate(over="ignore"):
            fn(y_hat, y, "identity", "mse", np.empty_like(y), loss_out)
        assert np.isposinf(loss_out[0])


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
def test_divergence_is_caught_through_the_fused_path(loader, activation, loss):
    """A NaN weight (what a diverged step leaves) must give a NaN epoch loss on the fused kernels
    as on the CPU (ReLU turned NaN into 0 and the cross-entropy clamp NaN into a finite loss, so
    the loss the fit loop watches stayed finite), and stop fit."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
    for ops in ("fused", "twin"):
        model = MLP([6, 8, 3], activation=activation, loss=loss, device="cpu", seed=0)
        if ops == "fused":
            model.ops = CudaOps(np, scipy.special, loader, tuner=Tuner(enabled=False))
        model.weights[0][0, 0] = np.nan
        epoch_loss, _ = Trainer(model, X, y, batch_size=8, lr=0.1).epoch()
        assert np.isnan(epoch_loss), ops
        with pytest.raises(FloatingPointError, match="diverged"):
            model.fit(X, y, epochs=2, batch_size=8, lr=0.1)
