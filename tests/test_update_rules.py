"""The update rules beyond plain SGD (kernels/update.cuh: L2, Nesterov, Adam, AdamW) fused into
the weight-gradient GEMM's epilogue, on the CUDA-on-CPU shim against the NumPy twin
(``ops.apply_rule``), and the twin against scikit-learn's own optimizers."""
import numpy as np
import pytest
import scipy.special
from sklearn.neural_network._stochastic_optimizers import AdamOptimizer, SGDOptimizer

from gpu_backprop import MLP
from gpu_backprop.ops import NumpyOps, Rule, Update
from gpu_backprop.ops.autotune import Tuner
from gpu_backprop.ops.cuda import PATHS, CudaOps

from .emulator.builder import EmuLoader, planted_kernels
from .test_emulated_kernels import SPLITS, Always, close, config_dtypes, fused_ops, gemm_terms, inputs

twin = NumpyOps()
DTYPES = [np.float32, np.float64]


def rules(t):
    """One rule of each kind, with L2 where the rule takes it (batch-independent coefficients)."""
    return {
        "sgd+l2": Rule("sgd", 0.05, 0.0, 0.3),
        "momentum+l2": Rule("momentum", 0.05, 0.9, 0.3),
        "nesterov": Rule("nesterov", 0.05, 0.9),
        "adam": Rule("adam", 0.01, 0.0, 0.0, 0.25, 0.9, 0.999, 1e-8, 0.0, t),
        "adamw+l2": Rule("adam", 0.01, 0.0, 0.3, 0.25, 0.8, 0.99, 1e-6, 0.002, t),
    }


def operands(rng, dtype, batch, n_in, n_out):
    """o, delta, W, b and the rule's state (v kept away from zero: Adam's m / sqrt(v) is then smooth
    in the gradient, so the kernel's rounding of G moves the update by about as much)."""
    o, W = inputs(rng, dtype, batch, n_in, n_out, "relu")
    delta = rng.standard_normal((batch, n_out)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    state = [rng.standard_normal(W.shape).astype(dtype), rng.standard_normal(n_out).astype(dtype),
             (0.5 + rng.random(W.shape)).astype(dtype), (0.5 + rng.random(n_out)).astype(dtype)]
    return o, delta, W, b, state


def update_terms(rule, t, before, state, grad_terms, weight):
    """Per element, the sizes the rule's result is made of (``grad_terms``: |o|^T|delta|, the sizes
    summed into G): what its rounding is relative to (tests/test_emulated_kernels.py bound)."""
    l2 = rule.l2 if weight else 0.0
    g_terms = grad_terms + l2 * np.abs(before)
    if rule.mode == "sgd":
        return [np.abs(before) + rule.step * g_terms]
    if rule.mode in ("momentum", "nesterov"):
        vel = rule.momentum * np.abs(state[0]) + rule.step * g_terms
        return [np.abs(before) + 2 * vel, vel]
    m = rule.beta1 * np.abs(state[0]) + (1 - rule.beta1) * rule.scale * g_terms
    v = rule.beta2 * np.abs(state[1]) + (1 - rule.beta2) * (rule.scale * g_terms) ** 2
    step_t = rule.step * np.sqrt(1 - rule.beta2 ** t) / (1 - rule.beta1 ** t)
    # m / sqrt(v): its rounding and its change with G's, over v's floor beta2 v (v >= 0.5 here)
    return [np.abs(before) * (1 + rule.decay) + 4 * step_t * m / np.sqrt(rule.beta2 * np.abs(state[1])), m, v]


def check_rule(ops, rng, dtype, shape, name, config):
    batch, n_in, n_out = shape
    t = np.array([3], dtype=np.int64)
    rule = rules(t)[name]
    o, delta, W, b, state = operands(rng, dtype, batch, n_in, n_out)
    vel_w, vel_b = (state[0], state[1]) if rule.states else (None, None)
    sq_w, sq_b = (state[2], state[3]) if rule.states == 2 else (None, None)
    before = {k: None if a is None else a.astype(np.float64) for k, a in
              dict(W=W, b=b, vel_w=vel_w, vel_b=vel_b, sq_w=sq_w, sq_b=sq_b).items()}
    expected = {k: None if a is None else a.copy() for k, a in before.items()}
    twin.update(o.astype(np.float64), delta.astype(np.float64), expected["W"], expected["b"], rule._replace(t=t),
                expected["vel_w"], expected["vel_b"], expected["sq_w"], expected["sq_b"])
    ops.update(o, delta, W, b, rule, vel_w, vel_b, sq_w, sq_b, config=config)
    grads = {"W": gemm_terms(o.T, delta), "b": np.abs(delta.astype(np.float64)).sum(axis=0)}
    for p, weight in (("W", True), ("b", False)):
        states = [before[f"vel_{p.lower()}"], before[f"sq_{p.lower()}"]]
        terms = update_terms(rule, 3, before[p], states, grads[p], weight)
        actual = {"W": [W, vel_w, sq_w], "b": [b, vel_b, sq_b]}[p]
        wanted = [expected[p], expected[f"vel_{p.lower()}"], expected[f"sq_{p.lower()}"]]
        for a, e, size in zip(actual, wanted, terms):
            close(a, e, dtype, k=batch + 8, terms=size)


@pytest.fixture(scope="module")
def loader():
    return EmuLoader()


@pytest.mark.parametrize("config,dtype", config_dtypes(PATHS + SPLITS))
@pytest.mark.parametrize("name", list(rules(None)))
@pytest.mark.parametrize("shape", [(1, 1, 1), (33, 65, 63), (129, 7, 129)])
def test_rule_in_the_epilogue(loader, rng, config, dtype, name, shape):
    """Every rule on every tile, split and cuBLAS (then bias.cu's weight_update) == the twin, per element."""
    check_rule(fused_ops(loader), rng, dtype, shape, name, config)


@pytest.mark.parametrize("line,replacement,name", [
    # Adam's second moment with beta1
    ("const T second = r.beta2 * v[i] + (T(1) - r.beta2) * (g * g);",
     "const T second = r.beta1 * v[i] + (T(1) - r.beta1) * (g * g);", "adam"),
    # no bias correction of the first moment
    ("(1.0 - pow((double)rule.beta1, t)));", "1.0);", "adam"),
    # L2 on the biases too
    ("if (weight && r.l2 != T(0)) grad += r.l2 * x;", "if (r.l2 != T(0)) grad += r.l2 * x;", "sgd+l2"),
    # Nesterov's look-ahead dropped: plain momentum
    ("x += r.mode == SGD_MOMENTUM ? velocity : r.momentum * velocity - r.step * grad;", "x += velocity;",
     "nesterov"),
    # AdamW's decay dropped
    ("if (weight && r.decay != T(0)) x -= r.decay * x;", "", "adamw+l2"),
])
@pytest.mark.parametrize("config", ["small", "large/s4", "cublas"])
def test_a_planted_fault_in_a_rule_fails(tmp_path_factory, rng, line, replacement, name, config):
    planted = planted_kernels(tmp_path_factory.mktemp("kernels"), "update.cuh", line, replacement)
    ops = CudaOps(np, scipy.special, EmuLoader(planted), tuner=Always(config))
    with pytest.raises(AssertionError, match="beyond their rounding bound"):
        check_rule(ops, rng, np.float64, (33, 65, 63), name, config)


def test_rule_runs_in_the_grouped_backward_launch(loader, rng):
    """Two Adam updates in one backward.cu launch (the last launch of every step) == the twin."""
    t = np.array([2], dtype=np.int64)
    rule = rules(t)["adamw+l2"]
    ops = CudaOps(np, scipy.special, loader, tuner=Tuner(enabled=False))
    parts = []
    for n_in, n_out in ((17, 9), (9, 5)):
        o, delta, W, b, state = operands(rng, np.float64, 13, n_in, n_out)
        parts.append((o, delta, W, b, *state))
    expected = [[a.copy() for a in part] for part in parts]
    for e in expected:
        twin.backward(None, [Update(*e[:4], rule.step, 0.0, e[4], e[5], rule, e[6], e[7])])
    launches = loader.launches
    ops.backward(None, [Update(*p[:4], rule.step, 0.0, p[4], p[5], rule, p[6], p[7]) for p in parts])
    assert loader.launches - launches == 1  # both updates in one launch
    for part, want in zip(parts, expected):
        for a, e in zip(part[2:], want[2:]):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


def test_state_the_rule_needs_is_required(loader):
    o, delta = np.ones((3, 2)), np.ones((3, 4))
    W, b = np.zeros((2, 4)), np.zeros(4)
    for ops in (twin, fused_ops(loader)):
        with pytest.raises(ValueError, match="vel_w: required by the nesterov rule"):
            ops.update(o, delta, W, b, Rule("nesterov", 0.1, 0.9))
        with pytest.raises(ValueError, match="rule.t: Adam needs its step count"):
            ops.update(o, delta, W, b, Rule("adam", 0.1), np.zeros_like(W), np.zeros_like(b), np.zeros_like(W),
                       np.zeros_like(b))
        with pytest.raises(ValueError, match="rule.mode: expected one of"):
            ops.update(o, delta, W, b, Rule("adagrad", 0.1))


# -- the twin against scikit-learn's optimizers (an independent implementation) ------------------
@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam"])
def test_twin_matches_scikit_learns_optimizers(rng, kind):
    """Three steps of the twin (summed gradients, step = lr / batch) == scikit-learn's SGDOptimizer /
    AdamOptimizer on the mean gradient plus alpha W / batch (its MLP's L2 term), float64."""
    batch, lr, alpha = 8, 0.05, 0.3
    o, delta, W, b, _ = operands(rng, np.float64, batch, 6, 4)
    params = [W.copy(), b.copy()]
    if kind == "adam":
        sk = AdamOptimizer(params, learning_rate_init=lr)
    else:
        sk = SGDOptimizer(params, learning_rate_init=lr, momentum=0.0 if kind == "sgd" else 0.9,
                          nesterov=kind == "nesterov")
    t = np.zeros(1, dtype=np.int64)
    mode = {"sgd": "sgd", "momentum": "momentum", "nesterov": "nesterov", "adam": "adam"}[kind]
    rule = Rule(mode, lr if kind == "adam" else lr / batch, 0.0 if kind == "sgd" else 0.9, alpha, 1 / batch,
                t=t if kind == "adam" else None)
    state = [np.zeros_like(W), np.zeros_like(b), np.zeros_like(W), np.zeros_like(b)]
    ours = [W.copy(), b.copy()]
    for step in range(3):
        delta_k = delta * (step + 1)  # a different gradient each step
        grads = [(o.T @ delta_k + alpha * params[0]) / batch, delta_k.sum(axis=0) / batch]
        sk.update_params(params, grads)
        t += 1
        twin.update(o, delta_k, ours[0], ours[1], rule, *(state if kind != "sgd" else [None] * 4))
    np.testing.assert_allclose(ours[0], params[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours[1], params[1], rtol=1e-12, atol=1e-15)


def test_twins_adamw_is_decoupled_decay_before_adams_step(rng):
    """AdamW written out by hand (Loshchilov and Hutter, the decay times lr, weights only)."""
    batch, lr, wd = 5, 0.01, 0.1
    o, delta, W, b, _ = operands(rng, np.float64, batch, 3, 2)
    t = np.array([1], dtype=np.int64)
    state = [np.zeros_like(W), np.zeros_like(b), np.zeros_like(W), np.zeros_like(b)]
    Wt, bt = W.copy(), b.copy()
    twin.update(o, delta, Wt, bt, Rule("adam", lr, 0.0, 0.0, 1 / batch, 0.9, 0.999, 1e-8, lr * wd, t), *state)
    for p, g, after, weight in ((W, o.T @ delta / batch, Wt, True), (b, delta.sum(axis=0) / batch, bt, False)):
        m, v = 0.1 * g, 0.001 * g * g
        step_t = lr * np.sqrt(1 - 0.999) / (1 - 0.9)
        want = p * (1 - lr * wd if weight else 1) - step_t * m / (np.sqrt(v) + 1e-8)
        np.testing.assert_allclose(after, want, rtol=1e-13)


# -- whole fits: the fused rules on the shim == the CPU --------------------------------------------
@pytest.mark.parametrize("optimizer,kwargs", [("adam", {"alpha": 0.01}), ("adamw", {"weight_decay": 0.05}),
                                              ("sgd", {"momentum": 0.9, "nesterov": True, "alpha": 0.1})])
@pytest.mark.parametrize("path", [None, "warp/s2", "cublas"])
def test_training_with_a_rule_matches_the_cpu(loader, optimizer, kwargs, path):
    """3 epochs of 3 steps through the CUDA launchers (Adam's count t on the 'device', counted by the
    step) == the CPU path, float64; same losses per epoch."""
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((20, 13)), rng.integers(0, 5, 20)
    params, losses = [], []
    for fused in (False, True):
        model = MLP([13, 9, 7, 5], activation="tanh", device="cpu", dtype=np.float64, seed=3)
        if fused:
            model.ops = fused_ops(loader, path)
        history = model.fit(X, y, epochs=3, batch_size=7, lr=0.05, optimizer=optimizer, **kwargs)
        params.append(model.get_params())
        losses.append(history.loss)
        if optimizer != "sgd":
            assert int(model._state.t[0]) == 9
    for key in params[0]:
        np.testing.assert_allclose(params[1][key], params[0][key], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-10)


def test_a_resumed_run_through_the_kernels_equals_the_uninterrupted_one(loader, tmp_path):
    """The CUDA launchers (shim), Adam with a schedule: 2 epochs with a checkpoint, then resumed to 4
    in a new model == 4 epochs in one go, bit for bit (the kernels' sums have a fixed order)."""
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((40, 13)), rng.integers(0, 5, 40)
    fit = dict(batch_size=9, lr=0.01, optimizer="adamw", weight_decay=0.01, alpha=1e-3, schedule="invscaling")
    runs = []
    for epochs, kwargs in ((4, {}), (2, {"checkpoint": tmp_path / "c.npz"}), (4, {"resume_from": tmp_path / "c.npz"})):
        model = MLP([13, 9, 5], activation="relu", loss="cross_entropy", device="cpu", dtype=np.float32,
                    seed=3 if not kwargs.get("resume_from") else 8)
        model.ops = fused_ops(loader, "warp/s2")
        model.fit(X, y, epochs=epochs, **fit, **kwargs)
        runs.append(model)
    for key, value in runs[0].get_params().items():
        np.testing.assert_array_equal(runs[2].get_params()[key], value)
    assert int(runs[2]._state.t[0]) == int(runs[0]._state.t[0]) == 4 * 5


@pytest.mark.parametrize("config", ["small", "cublas"])
def test_adam_launched_with_the_sgd_family_traps(loader, rng, monkeypatch, config):
    """The GEMM kernels carry one rule family each (kernels/update.cuh): an Adam rule sent to an
    instantiation without Adam's rules traps rather than running an SGD step (the elementwise
    kernels of the cuBLAS path pick the family themselves, so they still run it right)."""
    import gpu_backprop.ops.cuda as cuda

    monkeypatch.setattr(cuda, "family_of", lambda fields: 0)
    ops = fused_ops(loader)
    if config == "small":
        with pytest.raises(RuntimeError, match="trapped"):
            check_rule(ops, rng, np.float64, (33, 65, 63), "adam", config)
    else:
        check_rule(ops, rng, np.float64, (33, 65, 63), "adam", config)
