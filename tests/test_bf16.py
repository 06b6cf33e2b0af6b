"""precision="bf16" on the CPU (gpu_backprop/ops/bf16.py): the rounding bit for bit (exact
expected bits, float64 rounding, the shim's cvt.rn.bf16.f32), training steps against a float64
reference that rounds at the same points, digits against float32, save / load, the command
line, and planted faults that the reference comparison must catch. The CUDA path (the GEMM
kernels on the Bf16 core, activations and deltas stored as bf16 bits) on the CUDA-on-CPU shim
against the same reference, with planted faults in the kernels' roundings and storage."""
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
from gpu_backprop.ops.bf16 import Bf16Ops, bf16_bits, bf16_values, is_bf16, round_bf16

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
# more than a 64-row half of a 128 x 128 tile in each GEMM's rows at batch WIDE_BATCH (the Bf16 core's
# staged epilogue, a half at a time) and more than one tile of it in the forward's and propagation's
WIDE = {"wide-sigmoid-mse": ([133, 70, 9], "sigmoid", "mse")}
WIDE_BATCH = 150


def check_steps(case, steps=3, batch=29, lr=1.0, seed=0, structure=True, ops=None):
    """``steps`` SGD steps of a bf16 model, each against the float64 reference (stage by stage, from
    the model's parameters before it and its stored inputs): outputs, deltas, loss, the updated
    parameters; then the gradients of a gradient step (the data-parallel path), its update, and a
    step after it. Raises AssertionError where they differ. ``structure``:
    also that o and delta hold bf16 values only and each weight's copy is its master rounded
    (off for the planted faults: the values alone must catch them). ``ops``: makes the model's
    operations (the CUDA kernels on the shim) in place of the CPU twin's."""
    sizes, activation, loss = {**CASES, **WIDE}[case]
    model = MLP(sizes, activation=activation, loss=loss, device="cpu", seed=seed, precision="bf16")
    if ops is not None:
        model.ops = ops()
    rng = np.random.default_rng(seed + 1)
    X = rng.normal(0, 1.5, (batch, sizes[0])).astype(np.float32)
    Y = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], batch)]
    params = lambda: ([W.astype(np.float64) for W in model.weights], [b.astype(np.float64) for b in model.biases])
    buf = model._batch_buffers(batch)
    stored = lambda: ([bf16_values(o) for o in buf.outputs], [bf16_values(d) for d in buf.deltas])  # noqa: E731
    for _ in range(steps):
        Ws, bs = params()
        got_loss = float(model.train_step(X, Y, lr)[0])
        outputs, deltas = stored()
        ref = reference_step(Ws, bs, X, Y, outputs, deltas, model.activations, loss, lr)
        for k, (o, ref_o) in enumerate(zip(outputs, ref[0])):
            agree(o, ref_o, f"o[{k + 1}]")
            assert is_bf16(o) or not structure, f"o[{k + 1}] not stored as bf16"
        for k, (d, ref_d) in enumerate(zip(deltas, ref[1])):
            agree(d, ref_d, f"the delta at o[{k + 1}]")
            assert is_bf16(d) or not structure, f"the delta at o[{k + 1}] not stored as bf16"
        assert abs(got_loss - ref[6]) <= 1e-5 * abs(ref[6]) + 1e-4, (got_loss, ref[6])
        for k in range(len(Ws)):  # the update itself (new - old), so W's own size does not hide it
            agree(model.weights[k] - Ws[k], ref[4][k] - Ws[k], f"update of W{k}")
            agree(model.biases[k] - bs[k], ref[5][k] - bs[k], f"update of b{k}")
            if structure:
                copy = bf16_values(model.ops.bf16_weights(model.weights[k]))
                np.testing.assert_array_equal(bits32(copy), bits32(round_bf16(model.weights[k])),
                                              err_msg=f"W{k}'s bf16 copy is not its master rounded")
    # the gradients the data-parallel step writes (rule "gradient"), then its update
    Ws, bs = params()
    model.gradient_step(X, Y, lambda buffer: None)
    ref = reference_step(Ws, bs, X, Y, *stored(), model.activations, loss, lr)
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
    outputs, deltas = stored()
    ref = reference_step(Ws, bs, X, Y, outputs, deltas, model.activations, loss, lr)
    for k, (o, ref_o) in enumerate(zip(outputs, ref[0])):
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

class Bf16Only(EmuLoader):
    """Builds a GEMM file's bf16 training instantiations only (on Bf16<128>) when one is asked for (a
    planted copy compiles in seconds); any other file or kernel with all its names."""

    def function(self, file, name, all_names):
        return super().function(file, name, [n for n in all_names if "Bf16<128>" in n] if "Bf16<128>" in name
                                else all_names)


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


@pytest.mark.parametrize("case", [*CASES, *WIDE])
def test_the_gpu_kernels_match_the_reference_on_the_shim(bf16_loader, case):
    """precision="bf16" through CudaOps on the shim (blocks shuffled): the same stage-by-stage
    comparison as the CPU twin, every GEMM on the Bf16 core, the hidden activations and every delta
    stored as bf16 bits (uint16), y_hat in float32, each weight's copy its master rounded."""
    batch = WIDE_BATCH if case in WIDE else 29
    model = check_steps(case, batch=batch, ops=cuda_bf16(bf16_loader))
    assert set(model.ops.gemm_paths().values()) == {"bf16"}, model.ops.gemm_paths()
    buf = model._batch_buffers(batch)
    assert [o.dtype for o in buf.outputs] == [np.uint16] * (len(model.weights) - 1) + [np.float32]
    assert {d.dtype for d in buf.deltas} == {np.dtype(np.uint16)}
    assert {name for _, name in bf16_loader.kernels if "<" in name and "Bf16" not in name} <= \
        {"weight_update<float>"}  # (apply_gradients' update) no GEMM off the Bf16 core


def test_a_gathered_step_is_the_step_on_its_rows(bf16_loader, rng):
    """The fit loop's step (gather_batch into a bf16 xb, then the forward on it): xb is the rows
    rounded to bf16, yb the rows' targets, and the step's parameters are those of the same step
    on the rows passed directly, bit for bit."""
    from gpu_backprop.ops import Gather

    sizes, batch = [23, 19, 5], 29
    X = rng.normal(0, 1.5, (100, sizes[0])).astype(np.float32)
    Y = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], 100)]
    order, step = rng.permutation(100).astype(np.int64), np.array([2], np.int64)
    rows = order[2 * batch:3 * batch]
    models = []
    for gathered in (True, False):
        model = MLP(sizes, activation="tanh", device="cpu", seed=0, precision="bf16")
        model.ops = cuda_bf16(bf16_loader)()
        if gathered:
            xb, yb = np.full((batch, sizes[0]), 0xFFFF, np.uint16), np.full((batch, sizes[-1]), np.nan, np.float32)
            model.train_step(xb, yb, 1.0, gather=Gather(X, Y, order, step, batch, yb))
            np.testing.assert_array_equal(xb, bf16_bits(X[rows]))
            np.testing.assert_array_equal(yb, Y[rows])
        else:
            model.train_step(X[rows], Y[rows], 1.0)
        models.append(model.get_params())
    for key, value in models[0].items():
        np.testing.assert_array_equal(value, models[1][key], err_msg=key)


def stored_case(rng, batch, n):
    """A bf16 delta and a tanh output, as bits (uint16) and as their float32 values."""
    err = bf16_bits(rng.normal(0, 1, (batch, n)).astype(np.float32))
    o_next = bf16_bits(np.tanh(rng.normal(0, 1, (batch, n))).astype(np.float32))
    return err, o_next


def test_the_gpu_weight_gradient_with_its_prologue_and_split_k(bf16_loader, rng):
    """The weight gradient with o_next given: delta formed first (the Bf16 core runs no prologue),
    rounded as the twin's hidden_delta stores it (the same bits), then the product and db from the
    stored delta, one launch and in 2 slices, against the twin's operations; X unrounded (rounded
    as it is read)."""
    from gpu_backprop.ops.cuda import split_paths

    batch, n_in, n_out = 200, 37, 19
    X = rng.normal(0, 1.5, (batch, n_in)).astype(np.float32)
    err, o_next = stored_case(rng, batch, n_out)
    twin = Bf16Ops()
    want_d = np.empty((batch, n_out), np.float32)
    want_w, want_b = twin.weight_grad(X, bf16_values(err), np.empty((n_in, n_out), np.float32),
                                      np.empty(n_out, np.float32), o_next=bf16_values(o_next), activation="tanh",
                                      delta_out=want_d)
    ops = cuda_bf16(bf16_loader)()
    assert "bf16/s2" in split_paths(batch, bf16=True)
    for path in ("bf16", "bf16/s2"):
        d = np.full(err.shape, 0xFFFF, np.uint16)
        grad_w, grad_b = np.full((n_in, n_out), np.nan, np.float32), np.full(n_out, np.nan, np.float32)
        ops.weight_grad(X, err, grad_w, grad_b, o_next=o_next, activation="tanh", delta_out=d, config=path)
        np.testing.assert_array_equal(d, bf16_bits(want_d), err_msg=path)
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


def test_the_bf16_arguments_name_what_they_expected(bf16_loader):
    """Stored activations and deltas are bf16 bits; a float32 input is taken (rounded), other
    types are refused naming the argument; a softmax writes float32."""
    ops = cuda_bf16(bf16_loader)()
    W, b = np.ones((4, 5), np.float32), np.zeros(5, np.float32)
    o16, h16, d16 = (np.zeros(s, np.uint16) for s in ((3, 4), (3, 5), (3, 5)))
    with pytest.raises(TypeError, match=r"^o: expected dtype uint16, got float64$"):
        ops.forward(np.ones((3, 4)), W, b, "sigmoid", h16)
    with pytest.raises(TypeError, match=r"^out: expected dtype float32, got uint16$"):
        ops.forward(o16, W, b, "softmax", h16)
    with pytest.raises(TypeError, match=r"^delta: expected dtype uint16, got float32$"):
        ops.propagate(np.zeros((3, 5), np.float32), W, o16, "sigmoid", np.zeros((3, 4), np.uint16))
    with pytest.raises(TypeError, match=r"^out: expected dtype uint16, got float32$"):
        ops.output_delta(np.zeros((3, 5), np.float32), np.zeros((3, 5), np.float32), "sigmoid", "mse",
                         np.zeros((3, 5), np.float32), np.zeros(1, np.float32))
    with pytest.raises(TypeError, match=r"^err: expected dtype uint16, got float32$"):
        ops.hidden_delta(np.zeros((3, 5), np.float32), h16, "sigmoid", d16)
    ops.forward(o16, W, b, "sigmoid", h16)  # and the right ones run
    ops.forward(np.ones((3, 4), np.float32), W, b, "softmax", np.zeros((3, 5), np.float32))


def test_a_float_input_is_rounded_as_it_is_read(bf16_loader, rng):
    """A float32 o (the input X outside a fit) gives what its bf16 bits give, bit for bit, in the
    forward and the weight gradient."""
    ops = cuda_bf16(bf16_loader)()
    X = rng.normal(0, 1, (37, 23)).astype(np.float32)
    W, b = rng.normal(0, 0.3, (23, 11)).astype(np.float32), rng.normal(0, 0.1, 11).astype(np.float32)
    delta = bf16_bits(rng.normal(0, 1, (37, 11)).astype(np.float32))
    got = []
    for o in (X, bf16_bits(X)):
        out = np.full((37, 11), 0xFFFF, np.uint16)
        grad_w, grad_b = np.full((23, 11), np.nan, np.float32), np.full(11, np.nan, np.float32)
        ops.forward(o, W, b, "tanh", out)
        ops.weight_grad(o, delta, grad_w, grad_b)
        got.append((out, grad_w, grad_b))
    for a, b_ in zip(*got):
        np.testing.assert_array_equal(a, b_)


def copy_launches(ops):
    kernel = ops.loader.kernels.get(("bias.cu", "bf16_copy"))
    return 0 if kernel is None else kernel.launches


def test_the_weights_copies_are_made_once_and_kept_in_place(bf16_loader, rng):
    """A weight's bf16 copy is made on its first read, outside the launches a replay repeats: a
    second identical forward launches the GEMM alone (no rounding of W again: the update epilogue
    keeps the copy). set_params rounds every copy again in place: the same array (a captured
    graph keeps reading it), the new master's bits."""
    model = MLP([23, 11, 5], device="cpu", seed=0, precision="bf16")
    model.ops = ops = cuda_bf16(bf16_loader)()
    o = bf16_bits(rng.normal(0, 1, (37, 23)).astype(np.float32))
    out = np.empty((37, 11), np.uint16)
    before = copy_launches(ops)  # (the loader's other tests' launches)
    ops.forward(o, model.weights[0], model.biases[0], "tanh", out)
    made = copy_launches(ops)
    assert made == before + 1
    copy = ops.bf16_weights(model.weights[0])
    ops.forward(o, model.weights[0], model.biases[0], "tanh", out)
    assert copy_launches(ops) == made and ops.bf16_weights(model.weights[0]) is copy
    model.set_params({k: v * 3 for k, v in model.get_params().items()})
    assert ops.bf16_weights(model.weights[0]) is copy
    np.testing.assert_array_equal(copy, bf16_bits(model.weights[0]))


def test_apply_rule_keeps_a_weights_copy_current_from_its_first_call(bf16_loader, rng):
    """A data-parallel update (apply_rule) of a weight no forward has read yet: its first call makes
    the copy, and it and every replay of it round the copy again from the updated W."""
    from gpu_backprop.ops import Rule

    ops = cuda_bf16(bf16_loader)()
    W, grad = rng.normal(0, 1, (19, 7)).astype(np.float32), rng.normal(0, 1, (19, 7)).astype(np.float32)
    for _ in range(3):  # the first call recorded, the next two replayed
        ops.apply_rule(Rule("sgd", 0.1), W, grad)
        np.testing.assert_array_equal(ops.bf16_weights(W), bf16_bits(W))


def check_set_params_reaches_the_forward(model, X):
    """set_params changes what the model predicts, and setting the old parameters back gives its
    predictions back, bit for bit (the weights' bf16 copies remade from the masters each time)."""
    before = model.predict_proba(X)
    params = model.get_params()
    model.set_params({k: v * 2 for k, v in params.items()})
    assert not np.array_equal(model.predict_proba(X), before)
    model.set_params(params)
    np.testing.assert_array_equal(model.predict_proba(X), before)


def test_set_params_on_the_gpu_path_reaches_the_forward(bf16_loader, rng):
    model = MLP([6, 5, 3], device="cpu", seed=0, precision="bf16")
    model.ops = cuda_bf16(bf16_loader)()
    check_set_params_reaches_the_forward(model, rng.normal(size=(4, 6)).astype(np.float32))


def elementwise_deltas(loader, rng, kernel):
    """{precision: the delta as float32 values} of delta.cu's ``kernel`` through CudaOps in fp32 and
    in bf16, from the same values (bf16 ones; the bf16 path's arrays their bits)."""
    import scipy.special

    from gpu_backprop.ops.cuda import CudaOps

    a = round_bf16(scipy.special.expit(rng.normal(0, 2, (7, 143))).astype(np.float32))
    b = round_bf16(rng.normal(0, 1, a.shape).astype(np.float32))
    out = {}
    for precision in ("fp32", "bf16"):
        ops = CudaOps(np, scipy.special, loader, precision=precision)
        stored = (lambda x: x) if precision == "fp32" else bf16_bits
        d = np.full(a.shape, np.nan, np.float32) if precision == "fp32" else np.full(a.shape, 0xFFFF, np.uint16)
        if kernel == "output_delta":
            ops.output_delta(a, b, "sigmoid", "mse", d, np.zeros(1, np.float32))
        else:
            ops.hidden_delta(stored(b), stored(a), "sigmoid", d)
        out[precision] = d
    return out


def check_elementwise(out):
    assert out["bf16"].dtype == np.uint16 and not is_bf16(out["fp32"])
    np.testing.assert_array_equal(out["bf16"], bf16_bits(out["fp32"]))


@pytest.mark.parametrize("kernel", ["output_delta", "hidden_delta"])
def test_the_elementwise_deltas_store_bf16(bf16_loader, rng, kernel):
    """delta.cu storing bf16 (the output delta of a step whose update reads it too, outside
    backward.cu; a delta formed before a weight gradient): the float32 kernel's delta rounded to
    bf16, bit for bit, on the 16-byte packs and the tail (1001 elements)."""
    check_elementwise(elementwise_deltas(bf16_loader, rng, kernel))


@pytest.mark.parametrize("kernel, line", [
    ("output_delta", "delta[p * N + j] = stored_as<S>(d.v[j]);"),
    ("hidden_delta", "return stored_as<S>(value_of<T>(err) * derivative(act, value_of<T>(o)));"),
])
def test_the_elementwise_conversion_left_out_fails(tmp_path, rng, kernel, line):
    """The delta assigned to its bf16 bits as a number (a conversion, not the rounding) fails."""
    folder = planted_kernels(tmp_path / "kernels", "delta.cu", line,
                             line.replace("stored_as<S>(", "S(").replace("value_of<T>(", "T("))
    with pytest.raises(AssertionError, match="not equal"):
        check_elementwise(elementwise_deltas(PlantedIn(folder, "delta.cu"), rng, kernel))


# what the bf16 kernels must convert, round and write, each left out: (file, line, replacement, the
# cases that show it)
GPU_PLANTED = {
    "activations cast, not rounded": ("forward.cu", "else p.out[m * N + n] = stored_as<S>(x);",
                                      "else p.out[m * N + n] = S(x);", CASES),
    "y_hat not rounded": ("forward.cu", "act == ACT_LOGITS ? x : value_of<T>(stored_as<S>(x));",
                          "x;", ["sigmoid-mse", "relu-mse"]),
    "a softmax's logits rounded": ("forward.cu", "act == ACT_LOGITS ? x : value_of<T>(stored_as<S>(x));",
                                   "value_of<T>(stored_as<S>(x));", ["tanh-cross_entropy"]),
    "o read as its bits": ("propagate.cu", "derivative(act, value_of<T>(o[m * N + n]))",  # (ReLU's o > 0 holds
                           "derivative(act, T(o[m * N + n]))", ["sigmoid-mse", "tanh-cross_entropy"]),  # for bits)
    "hidden delta cast": ("propagate.cu", "out[m * N + n] = stored_as<S>(", "out[m * N + n] = S(", CASES),
    "output delta cast": ("backward.cu", "const S stored = stored_as<S>(d);", "const S stored = S(d);", CASES),
    "db summed from the bits": ("weight_grad.cu", "bias_acc += value_of<T>(tile[kk][tid]);",
                                "bias_acc += T(tile[kk][tid]);", CASES),
    "copy not written by the update": ("update.cuh", "if (copy) copy[i] = stored_as<S>(x);", ";", CASES),
    "output delta tile transposed": ("gemm_tile.cuh", "if constexpr (ROW_MAJOR) return tile[row_of(i)][k_of(i)];",
                                     "if constexpr (ROW_MAJOR) return tile[k_of(i)][row_of(i)];", CASES),
    "staged pairs swapped": ("gemm_bf16.cuh", "make_float2(acc.v[i][j][2 * h], acc.v[i][j][2 * h + 1])",
                             "make_float2(acc.v[i][j][2 * h + 1], acc.v[i][j][2 * h])", ["sigmoid-mse"]),
    "second half staged over the first": ("gemm_bf16.cuh", "const index_t m = m0 + half * WARP_M + r, n = n0 + c;",
                                          "const index_t m = m0 + r, n = n0 + c;", WIDE),
}


@pytest.mark.parametrize("fault", GPU_PLANTED)
def test_planted_faults_in_the_gpu_kernels_fail_the_reference(tmp_path, fault):
    file, line, replacement, cases = GPU_PLANTED[fault]
    loader = PlantedIn(planted_kernels(tmp_path / "kernels", file, line, replacement), file)
    for case in cases:  # (a fault may leave garbage the float64 reference overflows on)
        with pytest.raises(AssertionError, match="beyond float32 summation order|bf16 step away"), \
                np.errstate(over="ignore", invalid="ignore"):
            check_steps(case, steps=2, batch=WIDE_BATCH if case in WIDE else 29, structure=False,
                        ops=cuda_bf16(loader))  # (a stale copy shows in the second step)


def test_a_softmax_output_left_unrounded_fails_the_reference(bf16_loader, monkeypatch):
    from gpu_backprop.ops.cuda import CudaOps

    monkeypatch.setattr(CudaOps, "_store_bf16", lambda self, out: None)
    with pytest.raises(AssertionError, match="beyond float32 summation order|bf16 step away"):
        check_steps("tanh-cross_entropy", steps=1, structure=False, ops=cuda_bf16(bf16_loader))


def test_a_copy_left_stale_by_apply_rule_fails_the_reference(bf16_loader, monkeypatch):
    """apply_gradients' update (after the all-reduce, outside the epilogues) must round the copy."""
    from gpu_backprop.ops.cuda import CudaOps

    monkeypatch.setattr(CudaOps, "_refresh_copy", lambda self, W: None)
    with pytest.raises(AssertionError, match="beyond float32 summation order|bf16 step away"):
        check_steps("sigmoid-mse", steps=1, structure=False, ops=cuda_bf16(bf16_loader))


# ---------------------------------------------------------------- the bf16 training kernels' machine code

@pytest.fixture(scope="module")
def bf16_training_sass():
    """{kernel: [(opcode, operands)]} of every GEMM kernel on Bf16<128> (both rule families), sm_90,
    from nvcc (tests/cubins.py's cubins)."""
    from gpu_backprop.ops.cuda import GEMM_FILES, names_in

    from .test_sass import gemm_sass

    names = [n for file in dict.fromkeys(GEMM_FILES.values()) for n in names_in(file) if "Bf16<128>" in n]
    code = gemm_sass(names)
    assert len(code) == len(names), sorted(code)
    return {name: [(op, rest) for _, op, rest in body] for name, body in code.items()}


# each kernel's k tiles: the (A, B) tiles' layouts as ldmatrix reads them, (.trans loads, plain loads):
# k-major tiles by LDSM.16.MT88.4, m-major ones by LDSM.16.M88.4, 4 of each operand a warp's k tile
LDSM_OF = {"forward": [(4, 4)], "propagate": [(0, 8)], "weight_grad": [(8, 0)], "backward": [(0, 8), (8, 0)]}


def test_bf16_training_kernels_multiply_from_ldmatrix_and_never_spill(bf16_training_sass):
    """Every bf16 training kernel: no local memory (LDL, STL: 195-253 registers a thread, no spill),
    and each k tile's multiply is 32 HMMA.16816.F32.BF16 from 8 LDSM.x4 in its operands' layouts, no
    other shared load but the weight gradient's bias sums (16-bit: LDS.U16, one column of BK = 16),
    no conversion (F2F) but backward's output delta, fetched meanwhile (F2F(P).BF16.F32, at most one
    an element of its 16 a thread, its delta stored as bf16; F2F.F64.F32, its loss in double). A B
    fragment loaded by two ldmatrix.x2, or a float tile converted in the loop, fails it."""
    from .test_tensor_cores import unspilled_multiply_spans

    for name, code in bf16_training_sass.items():
        kernel = name.replace("void ", "").split("<")[0]
        for span in unspilled_multiply_spans(name, code):
            ops = [op for op, _ in span]
            hmma = sum(op == "HMMA.16816.F32.BF16" for op in ops)
            ldsm = (sum(op == "LDSM.16.MT88.4" for op in ops), sum(op == "LDSM.16.M88.4" for op in ops))
            shared = [op for op in ops if op.startswith("LDS") and not op.startswith("LDSM")]
            functor = [op for op in ops if op in ("F2F.BF16.F32", "F2FP.BF16.F32.PACK_AB")] if kernel == "backward" else []
            converts = [op for op in ops if op.startswith("F2F") and op != "F2F.F64.F32" and op not in functor]
            assert hmma == 32 and ldsm in LDSM_OF[kernel], (name, hmma, ldsm)
            assert not converts and len(functor) <= 16, (name, converts[:4], len(functor))
            assert all(op == "LDS.U16" for op in shared) and len(shared) <= 16, (name, shared[:4])


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
    check_set_params_reaches_the_forward(model, np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32))


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
