"""The CUDA kernels of kernels/*.cu, run on the CPU through the CUDA-on-CPU shim
(tests/emulator), against the NumPy twins, on odd shapes, float32 and float64.

Outputs are poisoned with NaN before each launch, so an element a kernel
fails to write fails the comparison. The launchers under test are the ones
the GPU uses (gpu_backprop.ops.cuda.CudaOps); only the loader differs.
"""
import numpy as np
import pytest
import scipy.special

from gpu_backprop import MLP
from gpu_backprop.ops import Gather, NumpyOps, Output, Propagate, Record, Update
from gpu_backprop.ops.autotune import Tuner
from gpu_backprop.ops.cuda import PATHS, WIDE_CONFIGS, CudaOps, gemm_name, names_in, paths_for
from gpu_backprop.ops.launch import make

from .reference_formulas import f_prime_from_output
from .emulator.builder import EmuLoader

DTYPES = [np.float32, np.float64]
ACTS = ["sigmoid", "tanh", "relu", "identity"]
# (batch, n_in, n_out): 1, 7, 33, 129 and one under/over the tile edges 64 and 128 (and BK 8/16)
SHAPES = [(1, 1, 1), (7, 33, 1), (1, 129, 7), (33, 63, 65), (129, 65, 127), (17, 127, 63), (15, 9, 129)]
# weight gradients also with the batch split (tests/test_split_k.py: long batches, determinism)
SPLITS = ("small/s2", "large/s4", "warp/s2")
twin = NumpyOps()


def config_dtypes(configs, prologue=False):
    """(config, dtype) pairs that exist: the wide tiles run float32 only, and no delta prologue
    (test_wide_tiles_refuse_float64_and_the_prologue checks the refusals)."""
    return [(c, d) for c in configs for d in DTYPES
            if c not in WIDE_CONFIGS or (np.dtype(d) == np.float32 and not prologue)]


@pytest.fixture(scope="module")
def loader():
    return EmuLoader()


class Always(Tuner):
    """A tuner that picks one path for every shape."""

    def __init__(self, path):
        super().__init__(enabled=False)
        self.fixed = path

    def choose(self, key, candidates, trial, default):
        return self.fixed


class ByKind(Tuner):
    """A tuner that picks one path for the propagations and another for every other GEMM."""

    def __init__(self, propagate, other):
        super().__init__(enabled=False)
        self.paths = propagate, other

    def choose(self, key, candidates, trial, default):
        return self.paths[0] if key.startswith("propagate") else self.paths[1]


def fused_ops(loader, path=None):
    """The launchers as on a GPU; autotuning off, or one path forced everywhere."""
    return CudaOps(np, scipy.special, loader, tuner=Always(path) if path else Tuner(enabled=False))


@pytest.fixture(scope="module")
def emu(loader):
    return fused_ops(loader)


def nan(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


def inputs(rng, dtype, batch, n_in, n_out, act):
    o = rng.standard_normal((batch, n_in)).astype(dtype)
    if act != "identity":
        o = twin.forward(o, np.eye(n_in, dtype=dtype), np.zeros(n_in, dtype), act, np.empty_like(o))
    W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(dtype)
    return o, W


def bound(dtype, k=0, terms=0.0, expected=0.0):
    """Per-element rounding bound of a result computed in ``dtype``: a sum of ``k`` terms whose
    absolute values add up to ``terms`` (for a GEMM (|A||B|)_ij: gamma_k = k u per term), then an
    elementwise epilogue (bias, activation, derivative, update) worth a few roundings of the result
    (8 u |expected|). Doubled: the kernel and, for float64, the twin each round once. A floor of a
    few smallest normals for results that underflow."""
    u = np.finfo(dtype).eps / 2
    return 2 * u * ((k + 2) * np.abs(terms) + 8 * np.abs(expected)) + 4 * np.finfo(dtype).tiny


def close(actual, expected, dtype, k=0, terms=0.0):
    """Every element within its own rounding bound (see ``bound``); NaN never passes. Not scaled
    by the size of the output: one element off by more than its rounding fails."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    limit = np.broadcast_to(bound(dtype, k, terms, expected), expected.shape)
    error = np.abs(actual - expected)
    bad = ~(error <= limit)  # NaN compares false
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(error / limit, nan=np.inf), -1)), expected.shape)
        raise AssertionError(f"{bad.sum()} of {bad.size} elements beyond their rounding bound; worst at {i}: "
                             f"{actual[i]!r} vs {expected[i]!r} (|error| {error[i]:.3g}, bound {limit[i]:.3g})")


def gemm_terms(A, B):
    """(|A||B|)_ij in float64: what the rounding of a GEMM's sums is relative to."""
    return np.abs(np.asarray(A, np.float64)) @ np.abs(np.asarray(B, np.float64))


def sgd_terms(before, grad_terms, step, momentum=0.0, vel=None):
    """Sizes of the terms of the update, per element (``grad_terms``: (|o|^T |delta|), the sizes
    summed into G): W' = W - step G; with momentum v' = momentum v - step G, W' = W + v'."""
    vel_terms = step * grad_terms + (momentum * np.abs(vel) if momentum else 0.0)
    return np.abs(before) + vel_terms, vel_terms


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_element_two_percent_off_fails(emu, rng, dtype):
    """The comparison is per element: a 129 x 127 GEMM output right but for one element 2% off (a
    size-scaled norm tolerance let that pass) fails; the same output unplanted passes."""
    o, W = inputs(rng, dtype, 129, 65, 127, "identity")
    out = nan((129, 127), dtype)
    emu.forward(o, W, np.zeros(127, dtype), "identity", out)
    expected, terms = o.astype(np.float64) @ W.astype(np.float64), gemm_terms(o, W)
    close(out, expected, dtype, k=65 + 1, terms=terms)
    i = np.unravel_index(np.argsort(np.abs(expected), axis=None)[expected.size // 2], expected.shape)  # a median one
    out[i] = expected[i] * 1.02
    with pytest.raises(AssertionError, match=r"1 of 16383 elements beyond their rounding bound"):
        close(out, expected, dtype, k=65 + 1, terms=terms)


@pytest.mark.parametrize("config,dtype", config_dtypes(PATHS))
@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)))
def test_forward(emu, rng, config, dtype, index, shape):
    batch, n_in, n_out = shape
    act = ACTS[index % 4]
    o, W = inputs(rng, dtype, batch, n_in, n_out, "identity")
    b = rng.standard_normal(n_out).astype(dtype)
    out = nan((batch, n_out), dtype)
    emu.forward(o, W, b, act, out, config=config)
    close(out, twin.forward(o.astype(np.float64), W.astype(np.float64), b.astype(np.float64), act,
                            np.empty(out.shape)), dtype, k=n_in + 1, terms=gemm_terms(o, W) + np.abs(b))  # f: 1-Lipschitz


def test_forward_softmax(emu, rng):
    o, W = inputs(rng, np.float64, 9, 5, 4, "identity")
    b, out = rng.standard_normal(4), nan((9, 4), np.float64)
    emu.forward(o, W, b, "softmax", out)
    expected = twin.forward(o, W, b, "softmax", np.empty((9, 4)))
    # d s_i = s_i (d z_i - sum_j s_j d z_j): at most 2 s_i max_j |d z_j| (+ exp's own rounding, relative)
    z_terms = (gemm_terms(o, W) + np.abs(b)).max(axis=1, keepdims=True)
    close(out, expected, np.float64, k=5 + 1, terms=2 * expected * z_terms)


@pytest.mark.parametrize("config,dtype", config_dtypes(PATHS))
@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)))
def test_propagate(emu, rng, config, dtype, index, shape):
    batch, n_in, n_out = shape
    act = ACTS[(index + 1) % 4]
    o, W = inputs(rng, dtype, batch, n_in, n_out, act)
    delta = rng.standard_normal((batch, n_out)).astype(dtype)
    out = nan((batch, n_in), dtype)
    emu.propagate(delta, W, o, act, out, config=config)
    f64 = [a.astype(np.float64) for a in (delta, W, o)]
    close(out, twin.propagate(*f64[:2], f64[2], act, np.empty(out.shape)), dtype, k=n_out,
          terms=gemm_terms(delta, W.T) * np.abs(f_prime_from_output(act, f64[2])))


@pytest.mark.parametrize("config,dtype,prologue", [(c, d, p) for p in (False, True)
                                                   for c, d in config_dtypes(PATHS + SPLITS, p)])
@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)))
def test_weight_grad(emu, rng, config, dtype, index, shape, prologue):
    batch, n_in, n_out = shape
    act = ACTS[index % 4]
    o, _ = inputs(rng, dtype, batch, n_in, n_out, "sigmoid")
    g = rng.standard_normal((batch, n_out)).astype(dtype)
    o_next, _ = inputs(rng, dtype, batch, n_out, 1, act)
    grad_w, grad_b = nan((n_in, n_out), dtype), nan(n_out, dtype)
    kwargs = dict(o_next=o_next, activation=act, delta_out=nan(g.shape, dtype)) if prologue else {}
    emu.weight_grad(o, g, grad_w, grad_b, config=config, **kwargs)
    f64 = dict(o_next=o_next.astype(np.float64), activation=act, delta_out=np.empty(g.shape)) if prologue else {}
    exp_w, exp_b = twin.weight_grad(o.astype(np.float64), g.astype(np.float64), np.empty(grad_w.shape),
                                    np.empty(n_out), **f64)
    delta = np.abs(f64["delta_out"] if prologue else g.astype(np.float64))
    # with the prologue, each delta carries a few roundings of its own: 4 more terms' worth
    close(grad_w, exp_w, dtype, k=batch + 4, terms=gemm_terms(o.T, delta))
    close(grad_b, exp_b, dtype, k=batch + 4, terms=delta.sum(axis=0))
    if prologue:
        close(kwargs["delta_out"], f64["delta_out"], dtype)


@pytest.mark.parametrize("config,dtype", config_dtypes(PATHS + SPLITS, prologue=True))  # o_next given
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("shape", [(1, 1, 1), (33, 65, 63), (129, 7, 129)])
def test_sgd_epilogue(emu, rng, config, dtype, momentum, shape):
    batch, n_in, n_out = shape
    o, W = inputs(rng, dtype, batch, n_in, n_out, "relu")
    b = rng.standard_normal(n_out).astype(dtype)
    err = rng.standard_normal((batch, n_out)).astype(dtype)
    o_next, _ = inputs(rng, dtype, batch, n_out, 1, "sigmoid")
    vel_w, vel_b = (rng.standard_normal(W.shape).astype(dtype), rng.standard_normal(n_out).astype(dtype))
    step = 0.3 / batch
    before = [a.astype(np.float64) for a in (W, b, vel_w, vel_b)]
    expected = [a.copy() for a in before]
    twin.sgd_update(o.astype(np.float64), err.astype(np.float64), *expected[:2], step, momentum, *expected[2:],
                    o_next=o_next.astype(np.float64), activation="sigmoid", delta_out=np.empty(err.shape))
    delta_out = nan(err.shape, dtype)
    emu.sgd_update(o, err, W, b, step, momentum, vel_w if momentum else None, vel_b if momentum else None,
                   o_next=o_next, activation="sigmoid", delta_out=delta_out, config=config)
    delta = np.abs(err.astype(np.float64) * f_prime_from_output("sigmoid", o_next))
    w_terms, vw_terms = sgd_terms(before[0], gemm_terms(o.T, delta), step, momentum, before[2])
    b_terms, vb_terms = sgd_terms(before[1], delta.sum(axis=0), step, momentum, before[3])
    close(W, expected[0], dtype, k=batch + 6, terms=w_terms)
    close(b, expected[1], dtype, k=batch + 6, terms=b_terms)
    if momentum:
        close(vel_w, expected[2], dtype, k=batch + 6, terms=vw_terms)
        close(vel_b, expected[3], dtype, k=batch + 6, terms=vb_terms)


@pytest.mark.parametrize("config", WIDE_CONFIGS)
def test_wide_tiles_refuse_float64_and_the_prologue(emu, rng, config):
    """The wide tiles' 128 accumulators a thread leave no registers for float64 or for a delta
    prologue's tile in flight: forced there, the launchers refuse; tuned, they never offer them;
    and the kernel itself traps on a prologue rather than compute without it."""
    o, W = inputs(rng, np.float64, 7, 9, 5, "identity")
    with pytest.raises(TypeError, match=f"config: {config} needs float32 arrays, got float64"):
        emu.forward(o, W, np.zeros(5), "sigmoid", nan((7, 5), np.float64), config=config)
    assert config not in paths_for(np.float64) and config in paths_for(np.float32)
    o, g, o_next = (rng.random(s).astype(np.float32) for s in ((7, 9), (7, 5), (7, 5)))
    prologue = dict(o_next=o_next, activation="sigmoid", delta_out=nan((7, 5), np.float32))
    with pytest.raises(ValueError, match=f"config: {config} runs no delta prologue"):
        emu.weight_grad(o, g, nan((9, 5), np.float32), nan(5, np.float32), config=config, **prologue)
    asked = []
    ops = CudaOps(np, scipy.special, emu.loader, tuner=Recording(asked))
    ops.tune_min_fma = 0
    ops.weight_grad(o, g, nan((9, 5), np.float32), nan(5, np.float32), **prologue)
    assert asked and not set(asked[-1]) & set(WIDE_CONFIGS), asked
    kernel = emu.loader.function("weight_grad.cu", gemm_name("weight_grad", np.float32, config),
                                 names_in("weight_grad.cu"))
    params = make("WeightGradParams", np.float32, o=o, g=g, o_next=o_next, delta_out=nan((7, 5), np.float32),
                  W=nan((9, 5), np.float32), b=nan(5, np.float32), M=9, N=5, K=7, act=1, has_prologue=1)
    with pytest.raises(RuntimeError, match="trapped"):
        kernel((1, 1, 1), (256, 1, 1), [params, make("UpdateRule", np.float32), make("SplitK", np.float32)])


class Recording(Tuner):
    """A tuner that records the candidates it is offered and takes the default."""

    def __init__(self, asked):
        super().__init__(enabled=False)
        self.asked = asked

    def choose(self, key, candidates, trial, default):
        self.asked.append(tuple(candidates))
        return default


def test_a_kernel_without_the_prologue_traps_on_one(emu, rng):
    """backward.cu compiles its weight gradients without the delta prologue: sent one anyway
    (the launchers never do), it traps instead of computing without it."""
    o, g, o_next = (rng.random(s).astype(np.float32) for s in ((7, 9), (7, 5), (7, 5)))
    kernel = emu.loader.function("backward.cu", gemm_name("backward", np.float32, "small"), names_in("backward.cu"))
    u = make("WeightGradParams", np.float32, o=o, g=g, o_next=o_next, delta_out=nan((7, 5), np.float32),
             W=nan((9, 5), np.float32), b=nan(5, np.float32), M=9, N=5, K=7, act=1, has_prologue=1, tiles=1,
             tiles_n=1)
    args = [make("PropagateParams", np.float32), make("OutputParams", np.float32), make("StepRecord", np.float32),
            u, make("WeightGradParams", np.float32), make("UpdateRule", np.float32)]
    with pytest.raises(RuntimeError, match="trapped"):
        kernel((1, 1, 1), (256, 1, 1), args)


def shifted(array, offset):
    """``array`` copied to a buffer ``offset`` elements past a 64-byte boundary: offset 0 takes the
    kernels' 16-byte vector body, any other offset their element-by-element path."""
    base = np.empty(array.size + 16, dtype=array.dtype)
    start = (-(base.ctypes.data // array.itemsize)) % (64 // array.itemsize) + offset
    view = base[start:start + array.size].reshape(array.shape)
    view[...] = array
    assert (view.ctypes.data % 16 == 0) == (offset == 0)
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 33, 255, 257, 9001])  # 9001 > 32 blocks x 256: grid-stride + many partials
@pytest.mark.parametrize("loss,act", [("mse", "sigmoid"), ("mse", "tanh"), ("mse", "identity"),
                                      ("cross_entropy", "softmax")])
@pytest.mark.parametrize("offset", [0, 1])
def test_output_delta_and_loss(emu, rng, dtype, n, loss, act, offset):
    cols = 1 if n < 33 else 33 if n % 33 == 0 else n
    shape = (n // cols, cols)
    y_hat = shifted(rng.random(shape).astype(dtype), offset)
    y = shifted(rng.random(shape).astype(dtype) if loss == "mse" else (rng.random(shape) < 0.3).astype(dtype),
                offset)
    out, loss_out = shifted(nan(shape, dtype), offset), nan(1, dtype)
    emu.output_delta(y_hat, y, act, loss, out, loss_out)
    exp_out, exp_loss = np.empty(shape), np.empty(1)
    twin.output_delta(y_hat.astype(np.float64), y.astype(np.float64), act, loss, exp_out, exp_loss)
    close(out, exp_out, dtype)
    close(loss_out, exp_loss, dtype, k=n, terms=exp_loss)  # n terms, none negative: their sizes add up to the loss
    assert emu._ticket[0] == 0  # the last block resets the ticket for the next launch
    again = nan(1, dtype)
    emu.output_delta(y_hat, y, act, loss, out, again)
    assert again[0] == loss_out[0]  # fixed-order reduction: bit-identical


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (129, 65)])
@pytest.mark.parametrize("offset", [0, 1])
def test_hidden_delta(emu, rng, dtype, act, shape, offset):
    err = shifted(rng.standard_normal(shape).astype(dtype), offset)
    o = shifted(inputs(rng, dtype, shape[0], shape[1], 1, act)[0], offset)
    out = shifted(nan(shape, dtype), offset)
    emu.hidden_delta(err, o, act, out)
    expected = twin.hidden_delta(err.astype(np.float64), o.astype(np.float64), act, np.empty(shape))
    close(out, expected, dtype)
    emu.hidden_delta(err, o, act, err)  # in place, as after a cuBLAS GEMM
    close(err, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("path", [None, "large", "cublas"])
def test_training_steps_match_the_numpy_twin(loader, dtype, momentum, path):
    """Whole steps through the CUDA launchers == the CPU path (weights after 3 epochs of 3 steps)."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((20, 13))
    y = rng.integers(0, 5, 20)
    models, histories = [], []
    for fused in (False, True):
        model = MLP([13, 9, 7, 5], activation="tanh", device="cpu", dtype=dtype, seed=3)
        if fused:
            model.ops = fused_ops(loader, path)
        histories.append(model.fit(X, y, epochs=3, batch_size=7, lr=0.5, momentum=momentum))
        models.append(model.get_params())
    # Two trajectories in the same dtype, apart by their rounding: each step's (sums of <= 16 terms:
    # widths <= 13, batch 7) carried on, and amplified, by the later steps, so this bound is not
    # derived term by term: per element, 9 steps x 16 terms x 4 (the carry) roundings of the sizes
    # the parameter went through (its start, its net change, the layer's largest entry). Measured
    # margin about 500x; one element 2% off still fails.
    start = MLP([13, 9, 7, 5], activation="tanh", device="cpu", dtype=np.float64, seed=3).get_params()
    for key in models[0]:
        size = np.abs(start[key]) + np.abs(models[0][key] - start[key]) + np.abs(models[0][key]).max()
        close(models[1][key], models[0][key].astype(np.float64), dtype, k=9 * 16 * 4, terms=size)
    # the per-step record (kept inside the first backward launch when fused): same losses, same hits
    losses = np.array(histories[0].loss)
    close(np.array(histories[1].loss), losses, dtype, k=9 * 16 * 4, terms=losses)
    assert histories[1].accuracy == histories[0].accuracy


def test_launches_per_step(loader):
    """Fused: per layer 1 forward GEMM and 1 backward launch (propagation of one layer beside the
    update of the one above, backward.cu, the output delta inside the first): 2L. One layer has no
    propagation to carry the output delta: 3."""
    for sizes, expected in (([13, 9, 7, 5], 6), ([13, 9, 5], 4), ([13, 5], 3)):
        model = MLP(sizes, device="cpu", seed=0)
        model.ops = fused_ops(loader)
        X = np.zeros((4, 13), np.float32)
        Y = np.zeros((4, 5), np.float32)
        model.train_step(X, Y, 0.1)  # compile and warm
        before = loader.launches
        model.train_step(X, Y, 0.1)
        layers = len(model.weights)
        launches = loader.launches - before
        print(f"fused kernels: {launches} launches per step for {layers} layers")
        assert launches == expected


def test_launches_per_step_on_the_cublas_path(loader):
    """cuBLAS path: per layer 1 GEMM + 1 elementwise kernel each for forward, propagate and update."""
    model = MLP([13, 9, 7, 5], device="cpu", seed=0)
    model.ops = fused_ops(loader, "cublas")
    calls = []
    real_gemm = loader.gemm
    loader.gemm = lambda *a, **k: calls.append(1) or real_gemm(*a, **k)
    try:
        X, Y = np.zeros((4, 13), np.float32), np.zeros((4, 5), np.float32)
        model.train_step(X, Y, 0.1)
        before, calls[:] = loader.launches, []
        model.train_step(X, Y, 0.1)
    finally:
        loader.gemm = real_gemm
    layers = len(model.weights)
    print(f"cuBLAS path: {len(calls)} GEMMs + {loader.launches - before} kernels per step for {layers} layers")
    assert len(calls) == 3 * layers - 1 and loader.launches - before == 3 * layers


@pytest.mark.parametrize("call,match", [
    (lambda ops, a: ops.forward(a["o"].astype(np.float64), a["W"], a["b"], "sigmoid", a["out"]),
     "W: expected dtype float64, got float32"),
    (lambda ops, a: ops.forward(a["o"], a["W"][:3], a["b"], "sigmoid", a["out"]), r"W: expected shape \(4, 3\)"),
    (lambda ops, a: ops.forward(a["o"], a["W"], a["b"], "sigmoid", a["out"][:, :2]), r"out: expected shape"),
    (lambda ops, a: ops.forward(np.asfortranarray(a["o"]), a["W"], a["b"], "sigmoid", a["out"]),
     "o: expected a C-contiguous array"),
    (lambda ops, a: ops.forward(a["o"], a["W"], a["b"], "swish", a["out"]), "activation: expected one of"),
    (lambda ops, a: ops.forward(a["o"].astype(np.int32), a["W"], a["b"], "sigmoid", a["out"]),
     "o: expected float32 or float64"),
    (lambda ops, a: ops.forward(a["o"].tolist(), a["W"], a["b"], "sigmoid", a["out"]),
     "o: expected a NumPy array in the emulator, got list"),
    (lambda ops, a: ops.weight_grad(a["o"], a["out"], a["W"], a["b"], o_next=a["out"]), "delta_out: required"),
])
def test_launch_arguments_are_checked(emu, call, match):
    a = dict(o=np.ones((5, 4), np.float32), W=np.ones((4, 3), np.float32), b=np.ones(3, np.float32),
             out=np.ones((5, 3), np.float32))
    with pytest.raises((ValueError, TypeError), match=match):
        call(emu, a)


def test_tensor_core_path_selection(loader):
    ops = CudaOps(np, scipy.special, loader, tuner=Tuner(enabled=False), precision="tf32")
    run = lambda path: None  # noqa: E731  (never called: no tuning)
    assert ops.gemm_path("forward", np.float32, 256, 1024, 784, None, run) == "tf32"
    assert ops.gemm_path("forward", np.float64, 256, 1024, 784, None, run) in ("small", "large")  # fp64: no TF32
    for config in ("tf32", "cublas_tf32"):
        with pytest.raises(TypeError, match=f"{config} needs float32"):
            ops.gemm_path("forward", np.float64, 4, 4, 4, config, run)
    with pytest.raises(ValueError, match="precision: expected"):
        CudaOps(np, scipy.special, loader, precision="fp16")
    o, W, b = np.ones((5, 4), np.float32), np.ones((4, 3), np.float32), np.ones(3, np.float32)
    out = nan((5, 3), np.float32)
    ops.forward(o, W, b, "sigmoid", out)  # the tensor-core kernel, its instructions emulated (mma_shim.h)
    assert ops.gemm_paths()["forward|float32|5x3x4"] == "tf32"
    np.testing.assert_allclose(out, scipy.special.expit(np.full((5, 3), 5.0)), rtol=1e-6)  # 4 + 1: exact in TF32


def test_tf32_precision_tunes_between_our_tensor_cores_and_cublas_tf32(loader):
    """precision="tf32": the tuner weighs our tensor-core kernels against cuBLAS in TF32 mode (and
    the cuBLAS path asks for that mode); float64 layers keep the fp32/fp64 candidates."""
    asked = []

    class Record(Tuner):
        def __init__(self):
            super().__init__(enabled=False)

        def choose(self, key, candidates, trial, default):
            asked.append((key, tuple(candidates), default))
            return "cublas_tf32" if "|tf32|" in key else default

    ops = CudaOps(np, scipy.special, loader, tuner=Record(), precision="tf32")
    ops.tune_min_fma = 0  # tune this small shape too
    rng = np.random.default_rng(0)
    o, W, b = rng.random((5, 4)).astype(np.float32), rng.random((4, 3)).astype(np.float32), np.ones(3, np.float32)
    out = nan((5, 3), np.float32)
    before = getattr(loader, "tf32_gemms", 0)
    ops.forward(o, W, b, "identity", out)
    assert asked[-1] == ("forward|tf32|5x3x4", ("tf32", "cublas_tf32"), "tf32")
    assert loader.tf32_gemms == before + 1
    close(out, o.astype(np.float64) @ W + 1, np.float32, k=4 + 1, terms=gemm_terms(o, W) + 1)
    ops.forward(o.astype(np.float64), W.astype(np.float64), b.astype(np.float64), "identity", out.astype(np.float64))
    assert asked[-1][1] == paths_for(np.float64)  # fp64: the tiles that exist in fp64, and cuBLAS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_out", [1, 3, 10])
@pytest.mark.parametrize("batch,step", [(1, 0), (7, 2), (33, 1), (300, 0)])
def test_gather_and_finish_batch(emu, rng, dtype, n_out, batch, step):
    n = 3 * 33 + 301
    X, Y = rng.standard_normal((n, 5)).astype(dtype), rng.random((n, n_out)).astype(dtype)
    Y[::4] = Y[::4].max(axis=1, keepdims=True)  # ties: argmax must take the lowest index, as numpy does
    order = rng.permutation(n).astype(np.int64)
    results = []
    for ops in (twin, emu):
        counter = np.array([step], np.int64)
        xb, yb = nan((batch, 5), dtype), nan((batch, n_out), dtype)
        ops.gather_batch(X, Y, order, counter, 33, xb, yb)
        y_hat = rng.random((batch, n_out)).astype(dtype) if not results else results[0][2]
        losses, correct = nan(4, dtype), np.full(4, -1, np.int64)
        ops.finish_batch(y_hat, yb, np.array([1.5], dtype), losses, correct, counter, True)
        results.append((xb, yb, y_hat, losses, correct, counter))
    (xb, yb, _, losses, correct, counter), emulated = results
    np.testing.assert_array_equal(xb, X[order[step * 33:step * 33 + batch]])
    for expected, actual in zip(results[0][:2] + results[0][3:], emulated[:2] + emulated[3:]):
        np.testing.assert_array_equal(actual, expected)
    assert losses[step] == 1.5 and counter[0] == step + 1 and 0 <= correct[step] <= batch


@pytest.mark.parametrize("n", [1, 7, 257, 9001])
def test_shuffle_keys(emu, n):
    key = 0xDEAD_BEEF_0BAD_F00D ^ n
    results = []
    for ops in (twin, emu):
        keys, step = np.zeros(n, np.uint64), np.array([12], np.int64)
        ops.shuffle_keys(key, keys, step)
        results.append((keys, step))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    assert results[1][1][0] == 0
    order = np.full(n, -1, np.int64)
    emu.shuffle_epoch(order, results[1][1], key)
    assert np.array_equal(np.sort(order), np.arange(n))


def backward_parts(rng, dtype, batch):
    """Independent operands for a propagation (P) and two updates (U, V), widths across the tile edges."""
    r = lambda *shape: rng.standard_normal(shape).astype(dtype)
    sig = lambda *shape: scipy.special.expit(r(*shape)).astype(dtype)
    p = dict(delta=r(batch, 65), W=r(129, 65) / 8, o=sig(batch, 129), out=nan((batch, 129), dtype))
    u = dict(o=sig(batch, 129), delta=r(batch, 130), W=r(129, 130), b=r(130), vel_w=r(129, 130), vel_b=r(130))
    v = dict(o=sig(batch, 130), delta=r(batch, 1), W=r(130, 1), b=r(1), vel_w=r(130, 1), vel_b=r(1))
    return p, u, v


@pytest.mark.parametrize("config", ["tiny", "small", "large"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("parts", ["PU", "UV", "PUV"])
@pytest.mark.parametrize("batch", [1, 65])  # 65: two rows of propagation tiles (64)
def test_backward_launch(loader, rng, config, dtype, momentum, parts, batch):
    """backward.cu: a propagation and up to two updates in one launch == each done by the twin."""
    ops = fused_ops(loader)
    p, u, v = backward_parts(rng, dtype, batch)
    f64 = lambda d: {k: a.astype(np.float64) for k, a in d.items()}
    expected = [f64(d) for d in (p, u, v)]
    step = 0.25 / batch

    def call(target, p, u, v, **kwargs):
        propagate = Propagate(p["delta"], p["W"], p["o"], "sigmoid", p["out"]) if "P" in parts else None
        updates = [Update(d["o"], d["delta"], d["W"], d["b"], step, momentum,
                          d["vel_w"] if momentum else None, d["vel_b"] if momentum else None)
                   for name, d in (("U", u), ("V", v)) if name in parts]
        target.backward(propagate, updates, **kwargs)

    start = [f64(d) for d in (p, u, v)]
    call(twin, *expected)
    before = loader.launches
    call(ops, p, u, v, config=config)
    assert loader.launches - before == 1
    if "P" in parts:
        d, W, o = (start[0][k] for k in ("delta", "W", "o"))
        close(p["out"], expected[0]["out"], dtype, k=65, terms=gemm_terms(d, W.T) * f_prime_from_output("sigmoid", o))
    else:
        assert np.isnan(p["out"]).all()  # no propagation part: its output untouched
    for name, actual, want, initial in (("U", u, expected[1], start[1]), ("V", v, expected[2], start[2])):
        if name not in parts:
            for key in ("W", "b"):
                np.testing.assert_array_equal(actual[key], initial[key].astype(dtype))
            continue
        delta = np.abs(initial["delta"])
        sizes = dict(zip(("W", "vel_w"), sgd_terms(initial["W"], gemm_terms(initial["o"].T, delta), step, momentum,
                                                   initial["vel_w"])))
        sizes.update(zip(("b", "vel_b"), sgd_terms(initial["b"], delta.sum(axis=0), step, momentum, initial["vel_b"])))
        for key in ("W", "b", "vel_w", "vel_b") if momentum else ("W", "b"):
            close(actual[key], want[key], dtype, k=batch + 2, terms=sizes[key])


@pytest.mark.parametrize("config", ["tiny", "small", "large"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss,act", [("mse", "sigmoid"), ("mse", "identity"), ("cross_entropy", "softmax")])
@pytest.mark.parametrize("batch", [1, 65, 130])  # 130: several row tiles, so several loss partials to add
def test_backward_computes_the_output_delta_inside_the_propagation(loader, rng, config, dtype, loss, act, batch):
    ops = fused_ops(loader)
    n_out, n_below = 10, 33
    y_hat = rng.random((batch, n_out)).astype(dtype)
    y = (rng.random((batch, n_out)) < 0.3).astype(dtype) if loss == "cross_entropy" else rng.random(
        (batch, n_out)).astype(dtype)
    W = (rng.standard_normal((n_below, n_out)) / 4).astype(dtype)
    o = scipy.special.expit(rng.standard_normal((batch, n_below))).astype(dtype)
    f64 = lambda a: a.astype(np.float64)  # noqa: E731
    exp_delta, exp_below, exp_loss = np.empty((batch, n_out)), np.empty((batch, n_below)), np.empty(1)
    twin.backward(Propagate(exp_delta, f64(W), f64(o), "tanh", exp_below), [],
                  Output(f64(y_hat), f64(y), act, loss, exp_loss))
    delta, below, loss_out = nan((batch, n_out), dtype), nan((batch, n_below), dtype), nan(1, dtype)
    before = loader.launches
    ops.backward(Propagate(delta, W, o, "tanh", below), [], Output(y_hat, y, act, loss, loss_out), config=config)
    assert loader.launches - before == 1  # no output-delta launch
    close(delta, exp_delta, dtype)
    close(loss_out, exp_loss, dtype, k=batch * n_out, terms=exp_loss)  # terms >= 0: their sizes add up to the loss
    # delta's own rounding (a few u of each) rides into the propagation: 4 more terms' worth
    close(below, exp_below, dtype, k=n_out + 4, terms=gemm_terms(exp_delta, f64(W).T) * f_prime_from_output("tanh", o))
    assert ops._ticket[0] == 0  # the last block reset the ticket
    again = nan(1, dtype)
    ops.backward(Propagate(delta, W, o, "tanh", below), [], Output(y_hat, y, act, loss, again), config=config)
    assert again[0] == loss_out[0]  # fixed-order reduction: bit-identical


@pytest.mark.parametrize("config", ["tiny", "large"])
@pytest.mark.parametrize("n_out", [1, 10])
@pytest.mark.parametrize("batch", [1, 130])
def test_backward_keeps_the_step_record(loader, rng, config, n_out, batch):
    """With a Record, the first backward launch also does finish_batch's work: losses[step] = the
    loss, correct[step] = rows predicted right (ties to the lowest index), step += 1."""
    ops, dtype = fused_ops(loader), np.float32
    y_hat = rng.random((batch, n_out)).astype(dtype)
    y = np.eye(n_out, dtype=dtype)[rng.integers(0, n_out, batch)] if n_out > 1 else (
        rng.random((batch, 1)) > 0.5).astype(dtype)
    y_hat[::3] = y_hat[::3].max(axis=1, keepdims=True)  # ties
    W = rng.standard_normal((33, n_out)).astype(dtype)
    o = rng.random((batch, 33)).astype(dtype)
    results = []
    for target, kwargs in ((twin, {}), (ops, {"config": config})):
        losses, correct, step = nan(5, dtype), np.full(5, -1, np.int64), np.array([2], np.int64)
        loss_out = nan(1, dtype)
        target.backward(Propagate(nan((batch, n_out), dtype), W, o, "sigmoid", nan((batch, 33), dtype)), [],
                        Output(y_hat, y, "sigmoid", "mse", loss_out, Record(losses, correct, step, True)), **kwargs)
        results.append((losses, correct, step, loss_out))
    (losses, correct, step, loss_out), (e_losses, e_correct, e_step, e_loss_out) = results
    assert e_step[0] == step[0] == 3
    assert e_correct[2] == correct[2] and 0 <= e_correct[2] <= batch
    np.testing.assert_array_equal(e_correct[[0, 1, 3, 4]], -1)
    assert e_losses[2] == e_loss_out[0]
    close(e_losses[2:3], losses[2:3].astype(np.float64), dtype, k=batch * n_out, terms=e_losses[2:3])


def test_backward_runs_each_gemm_on_its_tuned_path(loader, rng):
    """When the tuner puts the propagation on cuBLAS, the update still runs on its own tile: no
    grouped launch, same result."""

    ops = CudaOps(np, scipy.special, loader, tuner=ByKind(propagate="cublas", other="small"))
    p, u, _ = backward_parts(rng, np.float64, 9)
    expected_out = twin.propagate(p["delta"], p["W"], p["o"], "sigmoid", np.empty(p["out"].shape))
    W, b, u_start = u["W"].copy(), u["b"].copy(), u["W"].copy()
    twin.sgd_update(u["o"], u["delta"], W, b, 0.1)
    ops.backward(Propagate(p["delta"], p["W"], p["o"], "sigmoid", np.empty_like(p["out"])), [])  # compile
    before = loader.launches
    ops.backward(Propagate(p["delta"], p["W"], p["o"], "sigmoid", p["out"]),
                 [Update(u["o"], u["delta"], u["W"], u["b"], 0.1)])
    close(p["out"], expected_out, np.float64, k=65,
          terms=gemm_terms(p["delta"], p["W"].T) * f_prime_from_output("sigmoid", p["o"]))
    close(u["W"], W, np.float64, k=9 + 2, terms=sgd_terms(u_start, gemm_terms(u["o"].T, u["delta"]), 0.1)[0])
    assert loader.launches - before == 2  # the derivative after the cuBLAS stand-in; the update on its tile
    with pytest.raises(ValueError, match="updates: at most 2 per launch"):
        ops.backward(None, [Update(u["o"], u["delta"], u["W"], u["b"], 0.1)] * 3)


def test_backward_groups_gemms_tuned_to_different_tiles(loader, rng):
    """The tuner may give each GEMM of a launch its own tile: they still run as one launch, on
    the tile of the largest GEMM."""

    ops = CudaOps(np, scipy.special, loader, tuner=ByKind(propagate="tiny", other="large"))
    p, u, _ = backward_parts(rng, np.float64, 9)  # update 129 x 130 x 9 > propagation 9 x 129 x 65
    expected_out = twin.propagate(p["delta"], p["W"], p["o"], "sigmoid", np.empty(p["out"].shape))
    W, b, u_start = u["W"].copy(), u["b"].copy(), u["W"].copy()
    twin.sgd_update(u["o"], u["delta"], W, b, 0.1)
    before = loader.launches
    ops.backward(Propagate(p["delta"], p["W"], p["o"], "sigmoid", p["out"]),
                 [Update(u["o"], u["delta"], u["W"], u["b"], 0.1)])
    assert loader.launches - before == 1
    assert loader.kernels[("backward.cu", "backward<double, Simt<double, 128, 128, 8, 8, 8>>")].launches >= 1
    close(p["out"], expected_out, np.float64, k=65,
          terms=gemm_terms(p["delta"], p["W"].T) * f_prime_from_output("sigmoid", p["o"]))
    close(u["W"], W, np.float64, k=9 + 2, terms=sgd_terms(u_start, gemm_terms(u["o"].T, u["delta"]), 0.1)[0])


@pytest.mark.parametrize("config", ["tiny", "small", "large"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,step", [(1, 0), (65, 1), (130, 2), (37, 3)])  # (37, 3): the short last batch
def test_forward_gathers_its_batch(loader, rng, config, dtype, batch, step):
    """forward_gather: the first layer reads its rows through the epoch's order and writes the
    gathered batch (xb, yb) for the rest of the step, in the same launch."""
    ops = fused_ops(loader)
    n, n_x, n_y, n_out = 3 * 130 + 37, 33, 10, 65
    X, Y = rng.standard_normal((n, n_x)).astype(dtype), rng.random((n, n_y)).astype(dtype)
    W, b = (rng.standard_normal((n_x, n_out)) / 6).astype(dtype), rng.standard_normal(n_out).astype(dtype)
    order, counter = rng.permutation(n).astype(np.int64), np.array([step], np.int64)
    xb, yb, out = nan((batch, n_x), dtype), nan((batch, n_y), dtype), nan((batch, n_out), dtype)
    before = loader.launches
    ops.forward(xb, W, b, "sigmoid", out, Gather(X, Y, order, counter, 130, yb), config=config)
    assert loader.launches - before == 1
    rows = order[step * 130:step * 130 + batch]
    np.testing.assert_array_equal(xb, X[rows])
    np.testing.assert_array_equal(yb, Y[rows])
    expected = twin.forward(X[rows].astype(np.float64), W.astype(np.float64), b.astype(np.float64), "sigmoid",
                            np.empty((batch, n_out)))
    close(out, expected, dtype, k=n_x + 1, terms=gemm_terms(X[rows], W) + np.abs(b))
    assert counter[0] == step  # the counter moves at the end of the step, not here


def test_launches_per_fit_step(loader):
    """A fit step = the 2L kernels of the step, the first forward gathering the batch and the first
    backward keeping the step's record (one graph on CUDA);
    an epoch adds one launch (the shuffle keys; the argsort is the array module's)."""
    model = MLP([13, 9, 7, 5], device="cpu", seed=0)
    model.ops = fused_ops(loader)
    from gpu_backprop.train import Trainer

    trainer = Trainer(model, np.zeros((8, 13)), np.arange(8) % 5, batch_size=4, lr=0.1)
    trainer.epoch()  # compile and warm
    before = loader.launches
    trainer.epoch()
    per_step = (loader.launches - before - 1) / 2
    print(f"fit step, fused, uncaptured: {per_step:.0f} launches for {len(model.weights)} layers")
    assert per_step == 2 * len(model.weights)
