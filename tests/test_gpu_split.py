"""Split-K weight gradients on a real GPU (tests/test_split_k.py runs them on the shim):
against the float64 twin, and the same bits on every launch. Skipped, with the reason, where no
CUDA device is usable."""
import numpy as np
import pytest

from gpu_backprop.ops import NumpyOps

pytestmark = pytest.mark.gpu
twin = NumpyOps()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", ["small/s2", "small/s8", "large/s4", "large/s8"])
@pytest.mark.parametrize("shape", [(4097, 129, 65), (1000, 1024, 10), (513, 1, 1)])
def test_split_weight_grad_on_the_card(gpu, path, shape, dtype):
    cp, ops = gpu
    batch, n_in, n_out = shape
    rng = np.random.default_rng(0)
    o, err, o_next = rng.random((batch, n_in)), rng.standard_normal((batch, n_out)), rng.random((batch, n_out))
    exp_w, exp_b = twin.weight_grad(o, err, np.empty((n_in, n_out)), np.empty(n_out), o_next=o_next,
                                    activation="sigmoid", delta_out=np.empty((batch, n_out)))
    grads = []
    for _ in range(3):
        grad_w, grad_b = cp.full((n_in, n_out), np.nan, dtype), cp.full(n_out, np.nan, dtype)
        delta = cp.full((batch, n_out), np.nan, dtype)
        ops.weight_grad(cp.asarray(o, dtype), cp.asarray(err, dtype), grad_w, grad_b, o_next=cp.asarray(o_next, dtype),
                        activation="sigmoid", delta_out=delta, config=path)
        grads.append((cp.asnumpy(grad_w), cp.asnumpy(grad_b), cp.asnumpy(delta)))
    # per element: k terms of sizes (|o|^T |delta|) (delta >= 0 bounded by |err| / 4)
    u = np.finfo(dtype).eps / 2
    terms = np.abs(o).T @ (np.abs(err) * o_next * (1 - o_next))
    assert np.all(np.abs(grads[0][0] - exp_w) <= 2 * u * (batch + 4) * terms + 1e-30)
    assert np.all(np.abs(grads[0][1] - exp_b) <= 2 * u * (batch + 4) * np.abs(err).sum(axis=0) + 1e-30)
    assert np.all(np.isfinite(grads[0][2]))  # every delta element written once
    for w, b, d in grads[1:]:  # deterministic: whichever slice finishes last
        np.testing.assert_array_equal(w, grads[0][0])
        np.testing.assert_array_equal(b, grads[0][1])


def test_the_paths_of_a_fit_are_reported_on_the_card():
    """What `gpu-backprop train --json` prints as gemm_paths: each GEMM shape of the step and its path."""
    from gpu_backprop import MLP, data
    from gpu_backprop.ops.cuda import CONFIGS, split_of

    ds = data.digits()
    model = MLP([64, 64, 10], device="cuda", seed=0)
    model.fit(ds.X_train, ds.y_train, epochs=1, batch_size=32)
    paths = model.ops.gemm_paths()
    assert {key.split("|")[0] for key in paths} == {"forward", "propagate", "weight_grad"}
    assert all(split_of(path)[0] in (*CONFIGS, "cublas") for path in paths.values()), paths
