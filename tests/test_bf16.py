"""precision="bf16" on the CPU (gpu_backprop/ops/bf16.py): the rounding bit for bit (exact
expected bits, float64 rounding, the shim's cvt.rn.bf16.f32), training steps against a float64
reference that rounds at the same points, digits against float32, save / load, the command
line, and planted faults that the reference comparison must catch. The CUDA path (the Tf32
kernels launched with bf16 set) on the CUDA-on-CPU shim against the same reference, with
planted faults in the kernels' roundings."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpu_backprop import MLP, data
from gpu_backprop.device import Device
from gpu_backprop.ops import activations as act
from gpu_backprop.ops import blas
from gpu_backprop.ops.bf16 import Bf16Ops, bf16_bits, is_bf16, round_bf16

from .emulator.builder import HERE, KERNELS, EmuLoader, planted_kernels, sources_of
from .reference_formulas import f, f_prime_from_output
from .test_tensor_cores import PROBE, PROBE_NAMES, Tf32Only, bits32, edge_floats, floats, round_to, run_elementwise


# ---------------------------------------------------------------- the rounding

EXPECTED_BITS = {  # float32 bits -> bf16 bits (cvt.rn.bf16.f32)
    0x00000000: 0x0000, 0x80000000: 0x8000, 0x3F800000: 0x3F80,
    0x3F808000: 0x3F80,  # 1 + 2^-8: a tie, to even (down)
    0x3F818000: 0x3F82,  # 1 + 3 * 2^-8: a tie, to even (up)
    0x3F808001: 0x3F81,  # just past a tie: up
    0x3F807FFF: 0x3F80,  # just below a tie: down
    0xBF808000: 0xBF80, 0xBF818000: 0xBF82,  # the same ties, negative
    0x7F7F7FFF: 0x7F7F,  # the largest float that stays finite: just below half an ulp past 0x7F7F
    0x7F7F8000: 0x7F80,  # the smallest that rounds to the infinity (a tie, to even: 0x7F80)
    0x7F7FFFFF: 0x7F80, 0xFF7F8000: 0xFF80, 0xFF7F7FFF: 0xFF7F,  # the largest float: Inf; negative
    0x7F800000: 0x7F80, 0xFF800000: 0xFF80,  # infinities stay
    0x7FC00000: 0x7FFF, 0xFFC00001: 0x7FFF, 0x7F800001: 0x7FFF, 0x7FFFFFFF: 0x7FFF,  # NaN: canonical
    0x00000001: 0x0000, 0x00008000: 0x0000, 0x00008001: 0x0001, 0x00018000: 0x0002,  # subnormals, no flush
    0x807FFFFF: 0x8080,  # the largest negative subnormal rounds up to the smallest normal
    0x007F8000: 0x0080, 0x00400000: 0x0040,
}


def test_round_bf16_exact_bits():
    u = np.array(list(EXPECTED_BITS), np.uint32)
    got = bf16_bits(floats(u))
    want = np.array(list(EXPECTED_BITS.values()), np.uint16)
    bad = [(hex(a), hex(g), hex(w)) for a, g, w in zip(u, got, want) if g != w]
    assert not bad, bad
    y = round_bf16(floats(u))  # the float32 value: the bf16 bits in the upper half, zeros below
    np.testing.assert_array_equal(y.view(np.uint32), want.astype(np.uint32) << 16)
    assert np.all(np.isnan(y) == np.isnan(floats(u)))


def test_round_bf16_is_float64_rounding_to_8_significant_bits():
    """Against the float64 model of test_tensor_cores (round_to: to nearest even, overflow to Inf)
    over the edge cases and random bit patterns; in place and out of place alike; idempotent."""
    u = np.concatenate([edge_floats(), np.random.default_rng(3).integers(0, 2**32, 100_000, np.uint64).astype(np.uint32)])
    x = floats(u)
    nan = np.isnan(x)
    y = round_bf16(x)
    np.testing.assert_array_equal(bits32(y[~nan]), bits32(round_to(x[~nan], 7, ties_away=False)))
    np.testing.assert_array_equal(bits32(y[nan]), 0x7FFF0000)
    inplace = x.copy()
    assert round_bf16(inplace, out=inplace) is inplace
    np.testing.assert_array_equal(bits32(inplace), bits32(y))
    np.testing.assert_array_equal(bits32(round_bf16(y)), bits32(y))
    assert is_bf16(y) and not is_bf16(x)
    with pytest.raises(TypeError, match="x: expected float32"):
        round_bf16(np.ones(3))


@pytest.fixture(scope="module")
def probe():
    loader = EmuLoader(HERE, blocks="in_order")
    return lambda name: loader.function(PROBE, name, PROBE_NAMES)


def test_round_bf16_matches_the_shims_cvt_rn_bf16(probe):
    """kernels/mma.cuh's bf16_round (the shim's cvt_rn_bf16) and round_bf16, bit for bit."""
    u = np.concatenate([np.array(list(EXPECTED_BITS), np.uint32), edge_floats()])
    device = run_elementwise(probe, "bf16_round_values", np.uint16, floats(u))
    np.testing.assert_array_equal(bf16_bits(floats(u)), device)


# ---------------------------------------------------------------- a training step against float64

def r(x):
    """The reference's rounding to bf16 at a storing point (its float64 value as float32 first)."""
    return round_bf16(np.asarray(x, np.float32)).astype(np.float64)


def reference_step(Ws, bs, X, Y, outputs, deltas, activations, loss, lr):
    """One SGD step in float64 with the bf16 rounding points of ops/bf16.py, stage by stage from the
    model's own stored inputs (``outputs`` o[1..L], ``deltas`` at o[1..L]), so that a rounding that
    float32 and float64 place on the two sides of a tie is not carried into the next stage: returns
    each stage's expected o[1..L], deltas, summed gradients, new W, b, and the loss."""
    a = [X] + [np.asarray(o, np.float64) for o in outputs]  # the inputs of each layer, as stored
    d = [np.asarray(x, np.float64) for x in deltas]        # d[k]: the delta at o[k + 1]
    L = len(Ws)
    o_ref = [r(f(name, r(a[k]) @ r(Ws[k]) + bs[k])) for k, name in enumerate(activations)]
    y_hat = a[L]
    d_ref = [None] * L
    if loss == "mse":
        d_ref[L - 1] = r((y_hat - Y) * f_prime_from_output(activations[-1], y_hat))
        total = 0.5 * np.sum((y_hat - Y) ** 2)
    else:
        d_ref[L - 1] = r(y_hat - Y)
        total = -np.sum(Y * np.log(np.maximum(y_hat, np.finfo(np.float32).tiny)))
    for j in range(L - 1):
        d_ref[j] = r((d[j + 1] @ r(Ws[j + 1]).T) * f_prime_from_output(activations[j], a[j + 1]))
    dW = [r(a[k]).T @ d[k] for k in range(L)]
    db = [d[k].sum(axis=0) for k in range(L)]
    step = np.float64(np.float32(lr / X.shape[0]))
    new_W = [W - step * g for W, g in zip(Ws, dW)]
    new_b = [b - step * g for b, g in zip(bs, db)]
    return o_ref, d_ref, dW, db, new_W, new_b, total


def agree(actual, expected, what, rtol=2e-5):
    """Within float32 summation order: each element to rtol of the array's scale; a few elements
    (at most 1%, one at least) may sit one bf16 step away: a value that float32 and float64 sums
    placed on the two sides of a rounding tie."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max()), 1e-30)
    off = np.abs(actual - expected) > rtol * scale + 1e-6 * np.abs(expected)
    allowed = max(1, expected.size // 100)
    assert off.sum() <= allowed, (f"{what}: {off.sum()} of {off.size} elements beyond float32 summation order, "
                                  f"worst {np.abs(actual - expected).max() / scale:.2e} of the scale")
    assert np.all(np.abs(actual - expected)[off] <= 2.0 ** -7 * np.abs(expected)[off] + rtol * scale), \
        f"{what}: an element more than one bf16 step away"


CASES = {"sigmoid-mse": ([23, 19, 13, 5], "sigmoid", "mse"),
         "tanh-cross_entropy": ([23, 19, 13, 5], "tanh", "cross_entropy"),
         "relu-mse": ([23, 17, 6], "relu", "mse")}


def check_steps(case, steps=3, batch=29, lr=1.0, seed=0, structure=True, ops=None):
    """``steps`` SGD steps of a bf16 model, each against the float64 reference (stage by stage, from
    the model's parameters before it and its stored inputs): outputs, deltas, loss, the updated
    parameters; then the gradients of a gradient step (the data-parallel path), its update, and a
    step after it. Raises AssertionError where they differ. ``structure``:
    also that o and delta hold bf16 values only and each weight's copy is its master rounded
    (off for the planted faults: the values alone must catch them). ``ops``: makes the model's
    operations (the CUDA kernels on the shim) in place of the CPU twin's."""
    sizes, activation, loss = CASES[case]
    model = MLP(sizes, activation=activation, loss=loss, device="cpu", seed=seed, precision="bf16")
    if ops is not None:
        model.ops = ops()
    rng = np.random.default_rng(seed + 1)
    X = rng.normal(0, 1.5, (batch, sizes[0])).astype(np.float32)
    Y = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], batch)]
    params = lambda: ([W.astype(np.float64) for W in model.weights], [b.astype(np.float64) for b in model.biases])
    buf = model._batch_buffers(batch)
    for _ in range(steps):
        Ws, bs = params()
        got_loss = float(model.train_step(X, Y, lr)[0])
        ref = reference_step(Ws, bs, X, Y, buf.outputs, buf.deltas, model.activations, loss, lr)
        for k, (o, ref_o) in enumerate(zip(buf.outputs, ref[0])):
            agree(o, ref_o, f"o[{k + 1}]")
            assert is_bf16(o) or not structure, f"o[{k + 1}] not stored as bf16"
        for k, (d, ref_d) in enumerate(zip(buf.deltas, ref[1])):
            agree(d, ref_d, f"the delta at o[{k + 1}]")
            assert is_bf16(d) or not structure, f"the delta at o[{k + 1}] not stored as bf16"
        assert abs(got_loss - ref[6]) <= 1e-5 * abs(ref[6]) + 1e-4, (got_loss, ref[6])
        for k in range(len(Ws)):  # the update itself (new - old), so W's own size does not hide it
            agree(model.weights[k] - Ws[k], ref[4][k] - Ws[k], f"update of W{k}")
            agree(model.biases[k] - bs[k], ref[5][k] - bs[k], f"update of b{k}")
            if structure and hasattr(model.ops, "bf16_weights"):  # (on the GPU: W rounded as it loads)
                copy = model.ops.bf16_weights(model.weights[k])
                np.testing.assert_array_equal(bits32(copy), bits32(round_bf16(model.weights[k])),
                                              err_msg=f"W{k}'s bf16 copy is not its master rounded")
    # the gradients the data-parallel step writes (rule "gradient"), then its update
    Ws, bs = params()
    model.gradient_step(X, Y, lambda buffer: None)
    ref = reference_step(Ws, bs, X, Y, buf.outputs, buf.deltas, model.activations, loss, lr)
    grads = model.gradients()
    for k in range(len(Ws)):
        agree(grads.w[k], ref[2][k], f"dW{k}")
        agree(grads.b[k], ref[3][k], f"db{k}")
    from gpu_backprop.optim import Optimizer

    model.apply_gradients(Optimizer("sgd", lr), lr, batch)
    for k in range(len(Ws)):
        agree(model.weights[k] - Ws[k], ref[4][k] - Ws[k], f"update of W{k} (apply_gradients)")
    # and the step after it reads the refreshed copies
    Ws, bs = params()
    model.train_step(X, Y, lr)
    ref = reference_step(Ws, bs, X, Y, buf.outputs, buf.deltas, model.activations, loss, lr)
    for k, (o, ref_o) in enumerate(zip(buf.outputs, ref[0])):
        agree(o, ref_o, f"o[{k + 1}] after apply_gradients")
    return model


@pytest.mark.parametrize("case", CASES)
def test_steps_match_the_float64_reference_with_the_same_rounding(case):
    check_steps(case)


def test_the_forward_differs_from_float32_as_bf16_does():
    """The rounding is really there: bf16 outputs are off float32's by bf16's step, not by 1e-7."""
    ds = data.digits()
    fp32 = MLP([64, 64, 10], device="cpu", seed=0)
    bf16 = MLP([64, 64, 10], device="cpu", seed=0, precision="bf16")
    a, b = fp32.predict_proba(ds.X_test), bf16.predict_proba(ds.X_test)
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 2.0 ** -12 < rel < 2.0 ** -4, rel
    assert is_bf16(b)


# ---------------------------------------------------------------- planted faults

def _unrounded_propagate(self, delta, W, o, activation, out):
    blas.gemm(delta, self.bf16_weights(W), out, trans_b=True)
    return act.multiply_derivative(self.xp, activation, o, out, self._scratch("propagate", out.shape, out.dtype),
                                   self._second_scratch(activation, "propagate2", out))


def _unrounded_output_delta(self, y_hat, y, activation, loss, out, loss_out):
    return super(Bf16Ops, self)._output_delta(y_hat, y, activation, loss, out, loss_out)


def _unrounded_forward(self, o, W, b, activation, out, gather=None):
    if gather is not None:
        self._gather(*gather[:5], o, gather.yb)
    out[...] = b
    blas.gemm(self._activations(o), self.bf16_weights(W), out, beta=1.0)
    return act.activate(self.xp, self.special, activation, out, out)


def _master_weights_forward(self, o, W, b, activation, out, gather=None):
    if gather is not None:
        self._gather(*gather[:5], o, gather.yb)
    out[...] = b
    blas.gemm(self._activations(o), W, out, beta=1.0)
    act.activate(self.xp, self.special, activation, out, out)
    return round_bf16(out, out=out)


PLANTED = {
    "copy not refreshed after the update": ("_refresh", lambda self, W: None),
    "hidden delta not rounded": ("_propagate", _unrounded_propagate),
    "output delta not rounded": ("_output_delta", _unrounded_output_delta),
    "activations not rounded": ("forward", _unrounded_forward),
    "input X not rounded": ("_activations", lambda self, o: o),
    "forward on the master weights": ("forward", _master_weights_forward),
}


@pytest.mark.parametrize("fault", PLANTED)
def test_planted_faults_fail_the_reference(monkeypatch, fault):
    name, replacement = PLANTED[fault]
    monkeypatch.setattr(Bf16Ops, name, replacement)
    for case in CASES:
        with pytest.raises(AssertionError, match="beyond float32 summation order|bf16 step away"):
            check_steps(case, structure=False)


# ---------------------------------------------------------------- the GPU kernels (precision="bf16" on CUDA), on the shim

Bf16Only = Tf32Only  # precision="bf16" runs the Tf32 kernels with bf16 set


class PlantedIn(Bf16Only):
    """Bf16Only with the files whose sources hold ``planted_file`` from a planted copy of kernels/
    (the others as built for every test)."""

    def __init__(self, folder, planted_file):
        super().__init__()
        self.planted, self.planted_file = Bf16Only(folder), planted_file

    def function(self, file, name, all_names):
        if any(p.name == self.planted_file for p in sources_of(KERNELS / file, [KERNELS])):
            return self.planted.function(file, name, all_names)
        return super().function(file, name, all_names)


def cuda_bf16(loader, tuner=None):
    import scipy.special

    from gpu_backprop.ops.autotune import Tuner
    from gpu_backprop.ops.cuda import CudaOps

    return lambda: CudaOps(np, scipy.special, loader, tuner=tuner or Tuner(enabled=False), precision="bf16")


@pytest.fixture(scope="module")
def bf16_loader():
    return Bf16Only()


@pytest.mark.parametrize("case", CASES)
def test_the_gpu_kernels_match_the_reference_on_the_shim(bf16_loader, case):
    """precision="bf16" through CudaOps on the shim (blocks shuffled): the same stage-by-stage
    comparison as the CPU twin, every GEMM on the bf16 kernels, o and delta holding bf16 values."""
    model = check_steps(case, ops=cuda_bf16(bf16_loader))
    assert set(model.ops.gemm_paths().values()) == {"bf16"}, model.ops.gemm_paths()


def test_the_gpu_weight_gradient_with_its_prologue_and_split_k(bf16_loader, rng):
    """The weight gradient forming delta as it loads (rounded, as the twin's hidden_delta stores
    it: the same bits) and summing the stored delta for db, one launch and in 2 slices, against
    the twin's operations."""
    from gpu_backprop.ops.cuda import split_paths

    batch, n_in, n_out = 200, 37, 19
    X = rng.normal(0, 1.5, (batch, n_in)).astype(np.float32)  # unrounded: rounded as it loads
    err = round_bf16(rng.normal(0, 1, (batch, n_out)).astype(np.float32))
    o_next = round_bf16(np.tanh(rng.normal(0, 1, (batch, n_out))).astype(np.float32))
    twin = Bf16Ops()
    want_d = np.empty_like(err)
    want_w, want_b = twin.weight_grad(X, err, np.empty((n_in, n_out), np.float32), np.empty(n_out, np.float32),
                                      o_next=o_next, activation="tanh", delta_out=want_d)
    ops = cuda_bf16(bf16_loader)()
    assert "bf16/s2" in split_paths(batch, bf16=True)
    for path in ("bf16", "bf16/s2"):
        d = np.full_like(err, np.nan)
        grad_w, grad_b = np.full((n_in, n_out), np.nan, np.float32), np.full(n_out, np.nan, np.float32)
        ops.weight_grad(X, err, grad_w, grad_b, o_next=o_next, activation="tanh", delta_out=d, config=path)
        np.testing.assert_array_equal(bits32(d), bits32(want_d), err_msg=path)
        terms = np.abs(round_bf16(X).astype(np.float64)).T @ np.abs(want_d.astype(np.float64))
        assert np.all(np.abs(grad_w - want_w) <= 2 * 2.0 ** -24 * 6 * (batch / 4 + 2) * terms + 1e-37), path
        assert np.all(np.abs(grad_b - want_b) <= 2 * 2.0 ** -24 * batch * np.abs(want_d).sum(0) + 1e-37), path


def test_the_gpu_paths_and_precision_go_together(bf16_loader):
    import scipy.special

    from gpu_backprop.ops.cuda import CudaOps

    x, W, b = np.ones((3, 4), np.float32), np.ones((4, 5), np.float32), np.zeros(5, np.float32)
    out = np.empty((3, 5), np.float32)
    with pytest.raises(ValueError, match=r"^config: warp with precision='bf16': precision='bf16' runs on the bf16 "):
        cuda_bf16(bf16_loader)().forward(x, W, b, "sigmoid", out, config="warp")
    with pytest.raises(ValueError, match=r"^config: bf16 with precision='fp32'"):
        CudaOps(np, scipy.special, bf16_loader).forward(x, W, b, "sigmoid", out, config="bf16")


def elementwise_deltas(loader, rng, kernel):
    """{precision: the delta} of delta.cu's ``kernel`` through CudaOps in fp32 and in bf16."""
    import scipy.special

    from gpu_backprop.ops.cuda import CudaOps

    a = scipy.special.expit(rng.normal(0, 2, (7, 143))).astype(np.float32)
    b = rng.normal(0, 1, a.shape).astype(np.float32)
    out = {}
    for precision in ("fp32", "bf16"):
        ops = CudaOps(np, scipy.special, loader, precision=precision)
        d = np.full_like(a, np.nan)
        if kernel == "output_delta":
            ops.output_delta(a, b, "sigmoid", "mse", d, np.zeros(1, np.float32))
        else:
            ops.hidden_delta(b, a, "sigmoid", d)
        out[precision] = d
    return out


def check_elementwise(out):
    assert not is_bf16(out["fp32"])
    np.testing.assert_array_equal(bits32(out["bf16"]), bits32(round_bf16(out["fp32"])))


@pytest.mark.parametrize("kernel", ["output_delta", "hidden_delta"])
def test_the_elementwise_deltas_store_bf16(bf16_loader, rng, kernel):
    """delta.cu with bf16 set (precision="bf16"; the output delta of a step whose update reads it
    too, outside backward.cu): the float32 kernel's delta rounded to bf16, bit for bit, on the
    16-byte packs and the tail (1001 elements); float32 precision leaves it unrounded. The
    rounding left out must fail."""
    check_elementwise(elementwise_deltas(bf16_loader, rng, kernel))


def test_the_elementwise_rounding_left_out_fails(tmp_path, rng):
    folder = planted_kernels(tmp_path / "kernels", "delta.cu", "return bf16 ? bf16_rounded(d) : d;", "return d;")
    with pytest.raises(AssertionError, match="not equal"):
        check_elementwise(elementwise_deltas(PlantedIn(folder, "delta.cu"), rng, "output_delta"))


# what the bf16 kernels must round, each left out: (file, line, replacement, the cases that show it)
GPU_PLANTED = {
    "activations not rounded": ("forward.cu", "stored_value<Core>(activate(act, v + b[n]), bf16, act)",
                                "activate(act, v + b[n])", CASES),
    "hidden delta not rounded": ("propagate.cu", "stored_value<Core>(v * derivative(act, o[m * N + n]), bf16)",
                                 "v * derivative(act, o[m * N + n])", CASES),
    "output delta not rounded": ("backward.cu", "            d = stored_value<Core>(d, p.bf16);\n", "", CASES),
    "operands rounded to TF32, not bf16": ("gemm_tile.cuh", "return bf16 ? bf16_rounded(x) : Core::stored(x);",
                                           "return Core::stored(x);", CASES),
    "bf16 not passed to the main loop": ("forward.cu", "NoTileHook(), m0, n0, M, N, K, 0, false, bf16);",
                                         "NoTileHook(), m0, n0, M, N, K, 0, false);", CASES),
    "a softmax's logits rounded": ("gemm_tile.cuh", "return bf16 && act != ACT_LOGITS ? bf16_rounded(x) : x;",
                                   "return bf16 ? bf16_rounded(x) : x;", ["tanh-cross_entropy"]),
}


@pytest.mark.parametrize("fault", GPU_PLANTED)
def test_planted_faults_in_the_gpu_kernels_fail_the_reference(tmp_path, fault):
    file, line, replacement, cases = GPU_PLANTED[fault]
    loader = PlantedIn(planted_kernels(tmp_path / "kernels", file, line, replacement), file)
    for case in cases:
        with pytest.raises(AssertionError, match="beyond float32 summation order|bf16 step away"):
            check_steps(case, structure=False, ops=cuda_bf16(loader))


def test_a_softmax_output_left_unrounded_fails_the_reference(bf16_loader, monkeypatch):
    from gpu_backprop.ops.cuda import CudaOps

    monkeypatch.setattr(CudaOps, "_store_bf16", lambda self, out: None)
    with pytest.raises(AssertionError, match="beyond float32 summation order|bf16 step away"):
        check_steps("tanh-cross_entropy", structure=False, ops=cuda_bf16(bf16_loader))


# ---------------------------------------------------------------- digits, files, the API, the command line

def test_digits_in_bf16_within_half_a_point_of_float32(tmp_path):
    """The README's default settings (64-64-10 sigmoid, mse, lr 2, B=32, 30 epochs, seed 0); then a
    saved bf16 model records its precision and reloads predicting the same labels."""
    ds = data.digits()
    acc = {}
    for precision in ("fp32", "bf16"):
        model = MLP([64, 64, 10], device="cpu", seed=0, precision=precision)
        model.fit(ds.X_train, ds.y_train, epochs=30, batch_size=32, lr=2.0)
        acc[precision] = model.evaluate(ds.X_test, ds.y_test)["accuracy"]
    print(f"digits test accuracy: float32 {acc['fp32']:.4f}, bf16 {acc['bf16']:.4f}")
    assert acc["bf16"] >= 0.95
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.005, acc
    path = model.save(tmp_path / "bf16.npz")
    loaded = MLP.load(path, device="cpu")
    assert loaded.precision == "bf16" and isinstance(loaded.ops, Bf16Ops) and "precision='bf16'" in repr(loaded)
    for W, W2 in zip(model.weights, loaded.weights):  # the float32 masters, saved as they are
        assert W2.dtype == np.float32
        np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(loaded.predict(ds.X_test), model.predict(ds.X_test))
    np.testing.assert_array_equal(loaded.predict_proba(ds.X_test), model.predict_proba(ds.X_test))


def test_a_resumed_bf16_run_ends_with_the_same_weights(tmp_path):
    """A checkpoint holds the float32 masters; the resumed fit makes the bf16 copies from them,
    the copies the uninterrupted run refreshed: the same weights bit for bit."""
    ds = data.digits()
    X, y = ds.X_train[:400], ds.y_train[:400]
    fit = dict(batch_size=32, lr=0.01, optimizer="adam")
    straight = MLP([64, 16, 10], device="cpu", seed=0, precision="bf16")
    straight.fit(X, y, epochs=4, **fit)
    first = MLP([64, 16, 10], device="cpu", seed=0, precision="bf16")
    first.fit(X, y, epochs=2, checkpoint=tmp_path / "c.npz", **fit)
    resumed = MLP([64, 16, 10], device="cpu", seed=0, precision="bf16")
    resumed.fit(X, y, epochs=4, resume_from=tmp_path / "c.npz", **fit)
    for key, value in straight.get_params().items():
        np.testing.assert_array_equal(resumed.get_params()[key], value, err_msg=key)


def test_set_params_and_restores_remake_the_copies():
    model = MLP([6, 5, 3], device="cpu", seed=0, precision="bf16")
    X = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    before = model.predict_proba(X)
    params = model.get_params()
    model.set_params({k: v * 2 for k, v in params.items()})
    assert not np.array_equal(model.predict_proba(X), before)
    model.set_params(params)
    np.testing.assert_array_equal(model.predict_proba(X), before)


def test_precision_bf16_arguments():
    with pytest.raises(ValueError, match="precision: 'bf16' needs dtype float32"):
        MLP([4, 3, 2], device="cpu", dtype="float64", precision="bf16")
    cuda = Device("cuda", 0, np)  # a CUDA device as far as the check can tell: refused before any ops
    with pytest.raises(ValueError, match=r"^precision: 'bf16' on CUDA runs on the fused kernels only, got fused=False$"):
        MLP([4, 3, 2], device=cuda, precision="bf16", fused=False)
    from gpu_backprop.estimators import MLPClassifier

    ds = data.digits()
    score = {}
    for precision in ("fp32", "bf16"):
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=10, learning_rate_init=0.01, device="cpu",
                            precision=precision, random_state=0)
        score[precision] = clf.fit(ds.X_train, ds.y_train).score(ds.X_test, ds.y_test)
    assert clf._model.precision == "bf16" and score["fp32"] > 0.9 and abs(score["bf16"] - score["fp32"]) < 0.02, score


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpu_backprop.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "GPU_BACKPROP_DEVICE": "auto"})


def test_cli_precision_bf16(tmp_path):
    proc = run_cli("train", "--precision", "bf16", "--device", "cpu", "--epochs", "3", "--json",
                   "--save", str(tmp_path / "m.npz"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["precision"] == "bf16" and result["test_accuracy"] > 0.8
    assert MLP.load(tmp_path / "m.npz", device="cpu").precision == "bf16"
    for device in ("cuda", "cuda:1"):
        proc = run_cli("train", "--precision", "bf16", "--device", device, "--unfused", "--epochs", "1")
        lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("gpu_backprop: device")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "--precision: 'bf16' on CUDA runs on the fused kernels only: drop --unfused" in lines[0], lines
