"""Each activation, its derivative from the saved output and the predicted class are written
once in CUDA (kernels/common.cuh) and once in NumPy (gpu_backprop/ops/activations.py); here
the two are run side by side at the edge values where they could part: 0, -0, ±1, |o| near 1,
NaN, ±Inf, subnormals, huge inputs, ties. Derivatives and classes must agree bit for bit
(the same formulas, no FMA on either side); activations to a few ulps (the sigmoid is computed
by exp in CUDA and by tanh in NumPy), with NaN and infinities in the same places."""
import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops import NumpyOps, activations

from .emulator.builder import HERE, EmuLoader

ACTS = list(activations.CODES)


def edge_values(dtype):
    info = np.finfo(dtype)
    near_one = [1 - info.eps, 1 - 2 * info.eps, 0.996, 0.9999, 1 + info.eps]
    values = [0.0, -0.0, 0.5, 1.0, -1.0, *near_one, *(-v for v in near_one), info.tiny, -info.tiny,
              info.tiny * info.eps, -info.tiny * info.eps, info.max, -info.max, 40.0, -40.0, 100.0, -100.0,
              800.0, -800.0, 1e-8, np.nan, -np.nan, np.inf, -np.inf]
    return np.array(values, dtype=dtype)


@pytest.fixture(scope="module")
def loader():
    return EmuLoader(HERE, blocks="in_order")


def cuda_values(loader, dtype, act, z, o):
    ctype = "float" if dtype == np.float32 else "double"
    names = [f"activation_values<{t}>" for t in ("float", "double")] + [f"argmax_rows<{t}>" for t in ("float", "double")]
    kernel = loader.function("math_probe.cu", f"activation_values<{ctype}>", names)
    f, df = np.full_like(z, 7.0), np.full_like(o, 7.0)
    kernel((1, 1, 1), (64, 1, 1), [z, f, o, df, np.int32(activations.CODES[act]), np.int64(z.size)])
    return f, df


def ulps_apart(a, b, dtype):
    info = np.finfo(dtype)
    scale = np.maximum(np.maximum(np.abs(a), np.abs(b)), info.tiny).astype(np.float64)
    return np.abs(a.astype(np.float64) - b.astype(np.float64)) / (scale * info.eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS)
def test_derivatives_agree_bit_for_bit(loader, dtype, act):
    o = edge_values(dtype)
    _, df = cuda_values(loader, dtype, act, o, o)
    with np.errstate(all="ignore"):  # max * (1 - max) overflows on both sides alike
        expected = activations.derivative(np, act, o, np.empty_like(o), np.empty_like(o))
    np.testing.assert_array_equal(df.view(np.uint8), expected.view(np.uint8), err_msg=f"{act}: {o} -> {df} vs {expected}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS)
def test_activations_agree(loader, dtype, act):
    z = edge_values(dtype)
    with np.errstate(all="ignore"):
        f, _ = cuda_values(loader, dtype, act, z, z)
        expected = activations.activate(np, scipy.special, act, z, np.empty_like(z))
    np.testing.assert_array_equal(np.isnan(f), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(f) * np.sign(f), np.isinf(expected) * np.sign(expected))
    finite = np.isfinite(expected)
    apart = ulps_apart(f[finite], expected[finite], dtype)
    # the sigmoid's tail: e^z/(1+e^z) keeps values NumPy's 1/2 tanh(z/2) + 1/2 rounds to 0
    absolute = np.abs(f[finite].astype(np.float64) - expected[finite]) <= (np.finfo(dtype).eps if act == "sigmoid" else 0)
    assert np.all((apart <= 4) | absolute), (z[finite], f[finite], expected[finite])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_predicted_classes_agree(loader, dtype):
    nan, inf = np.nan, np.inf
    rows = [[0.1, 0.7, 0.2], [0.5, 0.5, 0.1], [nan, 0.9, 0.1], [0.9, nan, 0.1], [0.1, 0.2, nan],
            [nan, nan, 0.3], [-inf, -inf, -inf], [inf, inf, 0.0], [-0.0, 0.0, -1.0], [0.3, 0.3, 0.3]]
    y = np.array(rows, dtype=dtype)
    single = np.array([[0.5], [0.50001], [nan], [inf], [-inf], [0.4999]], dtype=dtype)
    ctype = "float" if dtype == np.float32 else "double"
    names = [f"activation_values<{t}>" for t in ("float", "double")] + [f"argmax_rows<{t}>" for t in ("float", "double")]
    kernel = loader.function("math_probe.cu", f"argmax_rows<{ctype}>", names)
    for outputs in (y, single):
        labels = np.full(outputs.shape[0], -1, np.int64)
        kernel((1, 1, 1), (32, 1, 1), [outputs, labels, np.int64(outputs.shape[0]), np.int64(outputs.shape[1])])
        np.testing.assert_array_equal(labels, NumpyOps()._labels(outputs).astype(np.int64))
