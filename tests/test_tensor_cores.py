"""The tensor-core instructions of kernels/mma.cuh as the CUDA-on-CPU shim emulates them
(tests/emulator/mma_shim.h), and the TF32 GEMM core (kernels/gemm_tf32.cuh) built on them.

The instructions run on registers laid out here lane by lane from a NumPy transcription of the
PTX ISA's fragment layouts, against a NumPy model of the arithmetic (products exact, blocks of
products aligned and summed with truncation, as mma_shim.h sets out): bit for bit. The
conversions against exact float64 rounding and hand-picked bit patterns (ties, NaN, Inf,
subnormals, overflow). The Tf32 core through the launchers the GPU uses, against the float64
twin with TF32's error bound, outputs poisoned with NaN, split-K included; bit for bit against
the mma model where the order of the sums is the core's (operands rounded once, as they land in
shared memory); the same with a fragment index planted wrong, or the rounding left out, must
fail. Its SASS: the main loop's HMMA, 128-bit shared loads, and no conversion in it."""
import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops import NumpyOps
from gpu_backprop.ops.autotune import Tuner
from gpu_backprop.ops.cuda import CudaOps

from .emulator.builder import HERE, EmuLoader, planted_kernels
from .reference_formulas import f_prime_from_output

PROBE = "mma_probe.cu"
LDMATRIX = [f"ldmatrix_values<{n}, {t}>" for n in (1, 2, 4) for t in ("false", "true")]
PROBE_NAMES = ["tf32_round_values", "bf16_round_values", "bf16x2_round_values", "bf16_values",
               "mma_values<0>", "mma_values<1>", "mma_values<2>", *LDMATRIX]
twin = NumpyOps()


@pytest.fixture(scope="module")
def probe():
    loader = EmuLoader(HERE, blocks="in_order")
    return lambda name: loader.function(PROBE, name, PROBE_NAMES)


def bits32(x):
    return np.asarray(x, np.float32).view(np.uint32)


def floats(u):
    return np.asarray(u, np.uint32).view(np.float32)


# ---------------------------------------------------------------- conversions (exact rounding in float64)

def round_to(x, mantissa_bits, ties_away):
    """float32 x rounded to a float with ``mantissa_bits`` bits after the point (float's exponent
    range, subnormals on the grid 2^(-126 - mantissa_bits)), in float64; NaN stays NaN."""
    x = np.asarray(x, np.float32).astype(np.float64)
    out = x.copy()
    finite = np.isfinite(x) & (x != 0)
    a = np.abs(x[finite])
    e = np.maximum(np.frexp(a)[1] - 1, -126)
    q = np.ldexp(1.0, e - mantissa_bits)
    n = np.floor(a / q + 0.5) if ties_away else np.rint(a / q)  # rint: ties to even
    r = n * q
    r[r >= 2.0 ** 128] = np.inf
    out[finite] = np.copysign(r, x[finite])
    return out.astype(np.float32)


def edge_floats():
    hand = [0x00000000, 0x80000000, 0x3F800000, 0x3F801000, 0x3F800FFF, 0xBF801000, 0x3F803000, 0x3F808000,
            0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F7FE000, 0x7F7FF000, 0x7F7F7FFF, 0x7F800000, 0xFF800000,
            0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001, 0x00001000, 0x00000FFF, 0x00003000, 0x80001000,
            0x007FF000, 0x00008000, 0x00018000, 0x807FFFFF, 0x00800000, 0x0FFFF000]
    rng = np.random.default_rng(7)
    random = rng.integers(0, 2 ** 32, 2000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([np.array(hand, np.uint32), random])


def run_elementwise(probe, name, out_dtype, *inputs):
    n = inputs[0].size
    out = np.full(n, 0xAB, out_dtype)
    probe(name)((1, 1, 1), (64, 1, 1), [*inputs, out, np.int64(n)])
    return out


def test_tf32_round_is_round_to_nearest_ties_away(probe):
    u = edge_floats()
    y = run_elementwise(probe, "tf32_round_values", np.uint32, floats(u))
    nan = np.isnan(floats(u))
    np.testing.assert_array_equal(y[nan], 0x7FFFFFFF)  # the canonical NaN (assumed; see mma_shim.h)
    np.testing.assert_array_equal(y[~nan], bits32(round_to(floats(u[~nan]), 10, ties_away=True)))
    assert np.all(y & 0x1FFF == np.where(nan, 0x1FFF, 0))  # a tf32: the low 13 bits clear
    expected = {0x3F801000: 0x3F802000,  # 1 + 2^-11: a tie, away from zero (to even would give 1)
                0xBF801000: 0xBF802000, 0x3F800FFF: 0x3F800000, 0x3F803000: 0x3F804000,
                0x7F7FFFFF: 0x7F800000, 0x7F7FE000: 0x7F7FE000, 0x7F7FF000: 0x7F800000,  # overflow: the infinity
                0x7F800000: 0x7F800000, 0xFF800000: 0xFF800000, 0x7F800001: 0x7FFFFFFF,  # not inf: a NaN
                0x00001000: 0x00002000, 0x00000FFF: 0x00000000, 0x00000001: 0x00000000,  # subnormals, no flush
                0x80001000: 0x80002000, 0x007FF000: 0x00800000, 0x80000000: 0x80000000}
    for x, want in expected.items():
        assert y[list(u).index(x)] == want, (hex(x), hex(y[list(u).index(x)]), hex(want))


def test_bf16_round_is_round_to_nearest_even(probe):
    u = edge_floats()
    y = run_elementwise(probe, "bf16_round_values", np.uint16, floats(u))
    nan = np.isnan(floats(u))
    np.testing.assert_array_equal(y[nan], 0x7FFF)
    np.testing.assert_array_equal(y[~nan], (bits32(round_to(floats(u[~nan]), 7, ties_away=False)) >> 16))
    expected = {0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3F808001: 0x3F81,  # ties to even; just past a tie
                0x7F7FFFFF: 0x7F80, 0x7F7F7FFF: 0x7F7F, 0x7F800001: 0x7FFF, 0xFF800000: 0xFF80,
                0x00008000: 0x0000, 0x00018000: 0x0002, 0x00000001: 0x0000, 0x807FFFFF: 0x8080}
    for x, want in expected.items():
        assert y[list(u).index(x)] == want, (hex(x), hex(y[list(u).index(x)]), hex(want))
    # the pair: the first argument (lo) in the low half; and back to float exactly
    lo, hi = floats(u), floats(u[::-1].copy())
    pair = run_elementwise(probe, "bf16x2_round_values", np.uint32, lo, hi)
    np.testing.assert_array_equal(pair & 0xFFFF, y)
    np.testing.assert_array_equal(pair >> 16, y[::-1])
    halves = np.arange(2 ** 16, dtype=np.uint16)
    back = run_elementwise(probe, "bf16_values", np.float32, halves)
    np.testing.assert_array_equal(bits32(back), halves.astype(np.uint32) << 16)


# ---------------------------------------------------------------- the GPU side of mma.cuh

# each probe kernel's instruction in the SASS (a regular expression, the whole opcode)
SASS = {"mma_values<0>": r"HMMA\.1688\.F32\.TF32", "mma_values<1>": r"HMMA\.16816\.F32\.BF16",
        "mma_values<2>": r"HMMA\.16816\.F32", "bf16x2_round_values": r"F2FP\.BF16(\.F32)?\.PACK_AB",
        **{f"ldmatrix_values<{n}, {t}>": rf"LDSM\.16\.M{'T' if t == 'true' else ''}88{'' if n == 1 else f'.{n}'}"
           for n in (1, 2, 4) for t in ("false", "true")}}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_probe_compiles_to_the_tensor_core_instructions(tmp_path, arch):
    """The PTX of every function in mma.cuh (the Tf32 core uses only some) through nvcc: each
    probe kernel holds its instruction (HMMA, LDSM, F2FP), with no local memory."""
    import re
    import shutil
    import subprocess

    from .test_compile import _require
    from .test_sass import tool

    nvcc, cuobjdump = shutil.which("nvcc"), tool("cuobjdump")
    _require(nvcc is not None and cuobjdump is not None, "nvcc and cuobjdump")
    source = tmp_path / "probe.cu"
    source.write_text(f'#include "{HERE / PROBE}"\nstatic void* const instances[] = {{\n'
                      + ",\n".join(f"    (void*)&{name}" for name in PROBE_NAMES) + "\n};\n")
    cubin = tmp_path / "probe.cubin"
    proc = subprocess.run([nvcc, "-std=c++17", "-cubin", f"-arch={arch}", "-Xptxas", "-v",
                           f"-I{HERE.parents[1] / 'kernels'}", "-o", str(cubin), str(source)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bytes stack frame" in proc.stderr and not re.search(r"[1-9]\d* bytes (stack frame|spill)", proc.stderr)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    demangled = subprocess.run(["c++filt"], input="\n".join(f.split("\n", 1)[0].strip() for f in functions),
                               capture_output=True, text=True).stdout.split("\n")
    code = {name.split("(")[0].replace("void ", "").strip(): body for name, body in zip(demangled, functions)}
    for name, opcode in SASS.items():
        assert re.search(rf"\b{opcode}[\s;]", code[name]), (name, opcode)


# ---------------------------------------------------------------- mma: fragment layouts and the arithmetic model

def tf32_layout():
    """(lane, register) -> (row, col) of A (16 x 8), B (8 x 8) and C (16 x 8): PTX ISA m16n8k8 .tf32."""
    lane = np.arange(32)[:, None]
    g, t = lane // 4, lane % 4
    ra, rb = np.arange(4)[None, :], np.arange(2)[None, :]
    a = (g + 8 * (ra % 2), t + 4 * (ra // 2))
    b = (t + 4 * rb, g + 0 * rb)
    return a, b


def half_layout():
    """(lane, element) -> (row, col) for m16n8k16 .bf16/.f16: element i in register i // 2, half i % 2."""
    lane = np.arange(32)[:, None]
    g, t = lane // 4, lane % 4
    ea, eb = np.arange(8)[None, :], np.arange(4)[None, :]
    a = (g + 8 * ((ea // 2) % 2), 2 * t + ea % 2 + 8 * (ea // 4))
    b = (2 * t + eb % 2 + 8 * (eb // 2), g + 0 * eb)
    return a, b


def c_layout():
    lane = np.arange(32)[:, None]
    g, t, r = lane // 4, lane % 4, np.arange(4)[None, :]
    return g + 8 * (r // 2), 2 * t + r % 2


def exponent(x):
    return np.frexp(x)[1] - 1  # floor(log2 |x|) for x != 0


def truncate(x, q):
    return np.trunc(x / q) * q


def fused_block(acc, p):
    """mma_shim.h's fused_block over the last axis of p (float64, exact products) with acc (float32)."""
    acc = np.asarray(acc, np.float64)
    terms = np.concatenate([acc[..., None], p], axis=-1)
    nan = np.isnan(terms).any(-1) | ((terms == np.inf).any(-1) & (terms == -np.inf).any(-1))
    pos, neg = (terms == np.inf).any(-1), (terms == -np.inf).any(-1)
    live = np.isfinite(terms) & (terms != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        emax = np.where(live, exponent(np.where(live, terms, 1.0)), -10 ** 6).max(-1)
        q = np.ldexp(1.0, np.maximum(emax - 23, -149))
        s = np.where(live, truncate(np.where(live, terms, 0.0), q[..., None]), 0.0).sum(-1)
        q2 = np.ldexp(1.0, np.maximum(exponent(np.where(s != 0, s, 1.0)) - 23, -149))
        r = truncate(s, q2)
    r = np.where(np.abs(r) >= 2.0 ** 128, np.copysign(np.inf, r), r)
    negative_zero = (np.signbit(terms) & (terms == 0)).all(-1)
    r = np.where(~live.any(-1), np.where(negative_zero, -0.0, 0.0), r)
    r = np.where(pos, np.inf, np.where(neg, -np.inf, r))
    out = r.astype(np.float32)
    return np.where(nan, floats(0x7FFFFFFF), out)


def mma_model(A, B, C, block):
    """D = A B + C as mma_shim.h models the tensor cores: blocks of ``block`` k in order."""
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    with np.errstate(invalid="ignore"):
        p = A64[:, None, :] * B64.T[None, :, :]  # p[m, n, k], exact
    acc = C.astype(np.float32)
    for k in range(0, A.shape[1], block):
        acc = fused_block(acc, p[..., k:k + block])
    return acc


def tf32_operand(u):
    """The value a .tf32 mma reads from a register: its upper 19 bits."""
    value = floats(u & np.uint32(0xFFFFE000))
    return np.where(np.isnan(floats(u)), np.float32(np.nan), value)


def random_operands(rng, shape, spread):
    """float32 values over 2^-spread .. 2^spread (so the adder's alignment truncates), some zero or negative."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))
    x[rng.random(shape) < 0.05] = 0.0
    return x.astype(np.float32)


def run_mma(probe, kind, regs_a, regs_b, regs_c, in_place=False):
    warps = regs_a.shape[0]
    out = np.full((warps, 32, 4), np.nan, np.float32)
    probe(f"mma_values<{kind}>")((1, 1, 1), (32 * warps, 1, 1),
                                [np.ascontiguousarray(regs_a, np.uint32), np.ascontiguousarray(regs_b, np.uint32),
                                 np.ascontiguousarray(regs_c, np.float32), out, np.int32(in_place)])
    return out


def assert_same_bits(actual, expected):
    np.testing.assert_array_equal(bits32(actual), bits32(expected))


@pytest.mark.parametrize("case", ["integers", "rounded", "raw", "specials"])
def test_mma_m16n8k8_tf32_lane_by_lane(probe, rng, case):
    """Two warps at once, each with its own 16 x 8 x 8 problem; integers sum exactly (the layouts
    alone decide the result), the rest must match the model bit for bit."""
    (ar, ac), (br, bc) = tf32_layout()
    cr, cc = c_layout()
    regs = [], [], []
    expected = []
    for w in range(2):
        if case == "integers":
            A, B = rng.integers(-8, 9, (16, 8)).astype(np.float32), rng.integers(-8, 9, (8, 8)).astype(np.float32)
            C = rng.integers(-64, 65, (16, 8)).astype(np.float32)
        else:
            A, B, C = random_operands(rng, (16, 8), 12), random_operands(rng, (8, 8), 12), random_operands(rng, (16, 8), 20)
        if case == "specials":
            A[3, 5], B[2, 6], A[9, 1], B[1, 1], C[12, 4] = np.nan, np.inf, -np.inf, 0.0, np.inf
        ua = bits32(A) if case == "raw" else run_elementwise(probe, "tf32_round_values", np.uint32, A.ravel()).reshape(A.shape)
        ub = bits32(B) if case == "raw" else run_elementwise(probe, "tf32_round_values", np.uint32, B.ravel()).reshape(B.shape)
        regs[0].append(ua[ar, ac])
        regs[1].append(ub[br, bc])
        regs[2].append(C[cr, cc])
        D = mma_model(tf32_operand(ua), tf32_operand(ub), C, block=4)
        if case == "integers":
            np.testing.assert_array_equal(D, A.astype(np.float64) @ B + C)  # the model is exact here too
        expected.append(D[cr, cc])
    regs = [np.stack(r) for r in regs]
    out = run_mma(probe, 0, *regs)
    assert_same_bits(out, np.stack(expected))
    assert_same_bits(run_mma(probe, 0, *regs, in_place=True), np.stack(expected))  # d and c the same registers


@pytest.mark.parametrize("kind,dtype", [(1, "bf16"), (2, "f16")])
def test_mma_m16n8k16_lane_by_lane(probe, rng, kind, dtype):
    (ar, ac), (br, bc) = half_layout()
    cr, cc = c_layout()
    regs, expected = ([], [], []), []
    for w in range(2):
        if dtype == "bf16":
            A, B = random_operands(rng, (16, 16), 20), random_operands(rng, (16, 8), 20)
            ha = run_elementwise(probe, "bf16_round_values", np.uint16, A.ravel()).reshape(A.shape)
            hb = run_elementwise(probe, "bf16_round_values", np.uint16, B.ravel()).reshape(B.shape)
            value = lambda h: floats(h.astype(np.uint32) << 16)  # noqa: E731
        else:
            ha = random_operands(rng, (16, 16), 6).astype(np.float16).view(np.uint16)
            hb = random_operands(rng, (16, 8), 6).astype(np.float16).view(np.uint16)
            ha[0, 0], hb[3, 2] = 0x0001, 0x03FF  # subnormal halves
            value = lambda h: h.view(np.float16).astype(np.float32)  # noqa: E731
        C = random_operands(rng, (16, 8), 10)
        ea, eb = ha[ar, ac].astype(np.uint32), hb[br, bc].astype(np.uint32)  # (32, 8), (32, 4)
        regs[0].append(ea[:, 0::2] | (ea[:, 1::2] << 16))  # element 2 i low, 2 i + 1 high
        regs[1].append(eb[:, 0::2] | (eb[:, 1::2] << 16))
        regs[2].append(C[cr, cc])
        expected.append(mma_model(value(ha), value(hb), C, block=8)[cr, cc])
    out = run_mma(probe, kind, *[np.stack(r) for r in regs])
    assert_same_bits(out, np.stack(expected))


def test_mma_model_is_within_float_rounding_of_the_exact_sum(rng):
    """The model itself (truncating adder): every result within a few float ulps of sum |terms|."""
    A, B, C = random_operands(rng, (16, 64), 8), random_operands(rng, (64, 8), 8), random_operands(rng, (16, 8), 8)
    A, B = round_to(A, 10, True), round_to(B, 10, True)
    D = mma_model(A, B, C, block=4).astype(np.float64)
    exact = A.astype(np.float64) @ B + C
    terms = np.abs(A.astype(np.float64)) @ np.abs(B) + np.abs(C)
    assert np.all(np.abs(D - exact) <= 2.0 ** -23 * (64 / 4 + 1) * 6 * terms)
    assert not np.array_equal(D, exact.astype(np.float32))  # it does round (toward zero), somewhere


# ---------------------------------------------------------------- ldmatrix

@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_lane_by_lane(probe, rng, n, trans):
    halves = rng.integers(0, 2 ** 16, 4096, dtype=np.uint64).astype(np.uint16)
    words = halves.view(np.uint32)
    rows = rng.permutation(4096 // 8)[:32] * 8  # 32 distinct 16-byte-aligned rows, in any order
    offsets = rows.astype(np.int32)
    offsets[8 * n:] = 3  # lanes past 8 n: their addresses are not read (misaligned, and no trap)
    out = np.zeros(32 * n, np.uint32)
    probe(f"ldmatrix_values<{n}, {'true' if trans else 'false'}>")((1, 1, 1), (32, 1, 1),
                                                                   [words, np.int32(words.size), offsets, out])
    lane = np.arange(32)[:, None, None]
    i, h = np.arange(n)[None, :, None], np.arange(2)[None, None, :]
    row, col = (2 * (lane % 4) + h, lane // 4) if trans else (lane // 4, 2 * (lane % 4) + h)
    element = halves[rows[8 * i + row] + col].astype(np.uint32)  # (lane, matrix, half)
    np.testing.assert_array_equal(out.reshape(32, n), element[..., 0] | (element[..., 1] << 16))


def test_ldmatrix_traps_on_a_misaligned_row(probe, rng):
    words = np.arange(2048, dtype=np.uint32)
    offsets = (np.arange(32) * 8).astype(np.int32)
    offsets[5] += 4  # 8 bytes into a row: a GPU faults
    with pytest.raises(RuntimeError, match="trapped"):
        probe("ldmatrix_values<2, false>")((1, 1, 1), (32, 1, 1), [words, np.int32(2048), offsets,
                                                                  np.zeros(64, np.uint32)])


# ---------------------------------------------------------------- the Tf32 GEMM core through the launchers

class Always(Tuner):
    def __init__(self, path):
        super().__init__(enabled=False)
        self.fixed = path

    def choose(self, key, candidates, trial, default):
        return self.fixed


def tf32_ops(loader):
    return CudaOps(np, scipy.special, loader, tuner=Always("tf32"), precision="tf32")


@pytest.fixture(scope="module")
def tf32(loader_tf32):
    return tf32_ops(loader_tf32)


@pytest.fixture(scope="module")
def loader_tf32():
    return EmuLoader()


def tf32_close(actual, expected, k, terms):
    """Within TF32's bound: operands rounded to 10 mantissa bits (each product off by at most
    (2 2^-11 + 2^-22) |a||b|), products summed by a float adder that may truncate (at most
    6 float ulps of the terms per block of 4 k, and a block per 8 k of padding), then an
    elementwise epilogue (8 ulps of the result). NaN never passes."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    u = 2.0 ** -24
    limit = (2 * 2.0 ** -11 + 2.0 ** -22) * terms + 2 * u * (6 * (k / 4 + 2) * terms + 8 * np.abs(expected)) \
        + 4 * np.finfo(np.float32).tiny
    error = np.abs(actual - expected)
    bad = ~(error <= limit)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(error / limit, nan=np.inf), -1)), expected.shape)
        raise AssertionError(f"{bad.sum()} of {bad.size} elements beyond the TF32 bound; worst at {i}: "
                             f"{actual[i]!r} vs {expected[i]!r} (|error| {error[i]:.3g}, bound {limit[i]:.3g})")


def gemm_terms(A, B):
    return np.abs(np.asarray(A, np.float64)) @ np.abs(np.asarray(B, np.float64))


# (batch, n_in, n_out): 1, 7, 33, 65 and 129 against the 128 x 64 x 16 tile
SHAPES = [(1, 7, 33), (33, 65, 1), (129, 33, 65), (65, 129, 7)]
ACTS = ["sigmoid", "tanh", "relu", "identity"]


def forward_case(rng, shape, act):
    batch, n_in, n_out = shape
    o = rng.standard_normal((batch, n_in)).astype(np.float32)
    W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    expected = twin.forward(o.astype(np.float64), W.astype(np.float64), b.astype(np.float64), act,
                            np.empty((batch, n_out)))
    return (o, W, b), expected, gemm_terms(o, W) + np.abs(b)


@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)))
def test_tf32_forward(tf32, rng, index, shape):
    act = ACTS[index % 4]
    (o, W, b), expected, terms = forward_case(rng, shape, act)
    out = np.full(expected.shape, np.nan, np.float32)
    tf32.forward(o, W, b, act, out)
    assert tf32.gemm_paths() and set(tf32.gemm_paths().values()) == {"tf32"}
    tf32_close(out, expected, shape[1] + 1, terms)


@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)))
def test_tf32_propagate(tf32, rng, index, shape):
    batch, n_in, n_out = shape
    act = ACTS[(index + 1) % 4]
    o = rng.standard_normal((batch, n_in)).astype(np.float32)
    if act != "identity":
        o = twin.forward(o, np.eye(n_in, dtype=np.float32), np.zeros(n_in, np.float32), act, np.empty_like(o))
    W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    delta = rng.standard_normal((batch, n_out)).astype(np.float32)
    out = np.full((batch, n_in), np.nan, np.float32)
    tf32.propagate(delta, W, o, act, out, config="tf32")
    f64 = [a.astype(np.float64) for a in (delta, W, o)]
    expected = twin.propagate(*f64[:2], f64[2], act, np.empty(out.shape))
    tf32_close(out, expected, n_out, gemm_terms(delta, W.T) * np.abs(f_prime_from_output(act, f64[2])))


@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)))
@pytest.mark.parametrize("prologue", [False, True])
def test_tf32_weight_grad(tf32, rng, index, shape, prologue):
    batch, n_in, n_out = shape
    act = ACTS[index % 4]
    o = scipy.special.expit(rng.standard_normal((batch, n_in))).astype(np.float32)
    g = rng.standard_normal((batch, n_out)).astype(np.float32)
    o_next = np.tanh(rng.standard_normal((batch, n_out))).astype(np.float32) if act != "relu" else \
        np.maximum(rng.standard_normal((batch, n_out)), 0).astype(np.float32)
    grad_w, grad_b = np.full((n_in, n_out), np.nan, np.float32), np.full(n_out, np.nan, np.float32)
    kwargs = dict(o_next=o_next, activation=act, delta_out=np.full(g.shape, np.nan, np.float32)) if prologue else {}
    tf32.weight_grad(o, g, grad_w, grad_b, config="tf32", **kwargs)
    f64 = dict(o_next=o_next.astype(np.float64), activation=act, delta_out=np.empty(g.shape)) if prologue else {}
    exp_w, exp_b = twin.weight_grad(o.astype(np.float64), g.astype(np.float64), np.empty(grad_w.shape),
                                    np.empty(n_out), **f64)
    delta = np.abs(f64["delta_out"] if prologue else g.astype(np.float64))
    # with the prologue each delta carries a few float roundings of its own (4 more terms' worth)
    tf32_close(grad_w, exp_w, batch + 4, gemm_terms(o.T, delta) * (1 + 8 * 2.0 ** -24))
    # the bias gradient is summed on the CUDA cores, in float: no TF32 rounding
    limit = 2 * 2.0 ** -24 * (batch + 6) * delta.sum(axis=0) + 4 * np.finfo(np.float32).tiny
    assert np.all(np.abs(grad_b - exp_b) <= limit)
    if prologue:
        d = kwargs["delta_out"].astype(np.float64)
        assert np.all(np.abs(d - f64["delta_out"]) <= 16 * 2.0 ** -24 * np.abs(f64["delta_out"]) + 1e-37)


def test_tf32_forward_is_the_mma_model_bit_for_bit(tf32, rng):
    """identity, zero bias: the output is the mma chain itself, k in order 8 at a time (zero
    padding past K changes nothing), operands rounded by cvt.rna.tf32 first."""
    batch, n_in, n_out = 33, 37, 65
    o, W = random_operands(rng, (batch, n_in), 4), random_operands(rng, (n_in, n_out), 4)
    out = np.full((batch, n_out), np.nan, np.float32)
    tf32.forward(o, W, np.zeros(n_out, np.float32), "identity", out)
    expected = mma_model(round_to(o, 10, True), round_to(W, 10, True), np.zeros((batch, n_out), np.float32), 4)
    np.testing.assert_array_equal(out, expected)


def test_tf32_kernel_traps_on_a_block_it_was_not_written_for(loader_tf32):
    """As the CUDA-core tiles (tests/test_launch_contract.py): 256 threads or a trap."""
    from gpu_backprop.ops.cuda import GEMM_FILES, gemm_name, names_in, threads_of
    from gpu_backprop.ops.launch import make

    kernel = loader_tf32.function(GEMM_FILES["forward"], gemm_name("forward", np.float32, "tf32"),
                                  names_in(GEMM_FILES["forward"]))
    o, W, b = np.ones((3, 4), np.float32), np.ones((4, 5), np.float32), np.zeros(5, np.float32)
    out = np.full((3, 5), np.nan, np.float32)
    params = make("ForwardParams", np.float32, o=o, W=W, b=b, out=out, M=3, N=5, K=4, act=0)
    kernel((1, 1, 1), (threads_of("tf32"), 1, 1), [params])
    np.testing.assert_array_equal(out, 4.0)
    for wrong in (threads_of("tf32") // 2, threads_of("tf32") + 32):
        with pytest.raises(RuntimeError, match="trapped"):
            kernel((1, 1, 1), (wrong, 1, 1), [params])


# ---------------------------------------------------------------- planted faults

A_FRAGMENT = "a[i][r] = float_bits(x[r / 2][2 * i + r % 2]);"
PLANTED = {
    # the A fragment's registers 1 and 2 swapped (row g + 8 at k t taken for row g at k t + 4)
    "a_row": ("gemm_tf32.cuh", A_FRAGMENT, "a[i][r] = float_bits(x[r % 2][2 * i + r / 2]);"),
    # the B fragment's k for register 1 off by 4 (k rows t + 4 read twice)
    "b_k": ("gemm_tf32.cuh", "b[j][r] = float_bits(y[r][j]);", "b[j][r] = float_bits(y[0][j]);"),
    # operands stored in shared memory raw, truncated by the mma instead of rounded (cvt dropped)
    "no_cvt": ("gemm_tf32.cuh", "float stored(float x) { return tf32_rounded(x); }",
               "float stored(float x) { return x; }"),
    # the weight gradient's bias blocks (B rounded after the bias sums read it) leave B raw
    "no_late_round": ("gemm_tile.cuh", "            b.round_own(tiles.B[stage], tid);\n", ""),
}


class Tf32Only(EmuLoader):
    """Builds a GEMM file's tensor-core instantiations only, when a tensor-core kernel is asked for
    (a planted copy compiles in a second); any other file or kernel with all its names."""

    def function(self, file, name, all_names):
        return super().function(file, name, [n for n in all_names if "Tf32" in n] if "Tf32" in name else all_names)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    def make(fault):
        folder = planted_kernels(tmp_path_factory.mktemp(fault) / "kernels", *PLANTED[fault])
        return tf32_ops(Tf32Only(folder))
    return make


@pytest.mark.parametrize("fault", ["a_row", "b_k"])
def test_a_wrong_fragment_index_fails_the_twin_comparison(planted, tf32, rng, fault):
    (o, W, b), expected, terms = forward_case(rng, (33, 65, 65), "identity")
    out = np.full(expected.shape, np.nan, np.float32)
    tf32.forward(o, W, b, "identity", out)
    tf32_close(out, expected, 66, terms)  # unplanted: passes
    out[:] = np.nan
    planted(fault).forward(o, W, b, "identity", out)
    assert not np.isnan(out).any()  # it ran and wrote every output, wrongly
    with pytest.raises(AssertionError, match="beyond the TF32 bound"):
        tf32_close(out, expected, 66, terms)


def test_dropped_rounding_fails_the_bit_for_bit_comparison(planted, rng):
    """Truncated operands stay close to the float64 result (within TF32's bound, often), but not
    bit for bit what cvt.rna.tf32 then the mma give."""
    o, W = random_operands(rng, (33, 37), 4), random_operands(rng, (37, 65), 4)
    out = np.full((33, 65), np.nan, np.float32)
    planted("no_cvt").forward(o, W, np.zeros(65, np.float32), "identity", out)
    expected = mma_model(round_to(o, 10, True), round_to(W, 10, True), np.zeros((33, 65), np.float32), 4)
    assert not np.isnan(out).any()
    assert not np.array_equal(out, expected)


# ---------------------------------------------------------------- the weight gradient bit for bit, split-K

def weight_grad_case(rng, batch, n_in, n_out, prologue):
    o, g = random_operands(rng, (batch, n_in), 4), random_operands(rng, (batch, n_out), 4)
    kwargs = {}
    if prologue:
        o_next = np.tanh(rng.standard_normal((batch, n_out))).astype(np.float32)
        kwargs = dict(o_next=o_next, activation="tanh", delta_out=np.full(g.shape, np.nan, np.float32))
    return o, g, kwargs


@pytest.mark.parametrize("prologue", [False, True])
def test_tf32_weight_grad_is_the_mma_model_bit_for_bit(tf32, rng, prologue):
    """dW = o^T delta, k (the batch) in order 8 at a time, operands rounded by cvt.rna.tf32 first:
    on the bias blocks' tile row (B rounded after the bias sums read it raw) and the others (B
    rounded as it lands), delta given or formed by the prologue (then rounded once, in shared memory)."""
    batch, n_in, n_out = 37, 133, 65  # three tile rows (the first sums the bias), two tile columns
    o, g, kwargs = weight_grad_case(rng, batch, n_in, n_out, prologue)
    grad_w, grad_b = np.full((n_in, n_out), np.nan, np.float32), np.full(n_out, np.nan, np.float32)
    tf32.weight_grad(o, g, grad_w, grad_b, config="tf32", **kwargs)
    delta = kwargs["delta_out"] if prologue else g
    assert not np.isnan(delta).any()
    expected = mma_model(round_to(o.T, 10, True), round_to(delta, 10, True), np.zeros((n_in, n_out), np.float32), 4)
    np.testing.assert_array_equal(grad_w, expected)
    # the bias: summed from the raw tile, in float, batch rows in order
    exact = np.zeros(n_out, np.float32)
    for row in delta:
        exact += row
    np.testing.assert_array_equal(grad_b, exact)


def test_the_late_rounding_left_out_fails_the_bit_for_bit_comparison(planted, rng):
    o, g, _ = weight_grad_case(rng, 37, 133, 65, False)
    grad_w, grad_b = np.full((133, 65), np.nan, np.float32), np.full(65, np.nan, np.float32)
    planted("no_late_round").weight_grad(o, g, grad_w, grad_b, config="tf32")
    expected = mma_model(round_to(o.T, 10, True), round_to(g, 10, True), np.zeros((133, 65), np.float32), 4)
    assert not np.isnan(grad_w).any()
    np.testing.assert_array_equal(grad_w[128:], expected[128:])  # the other tile rows round as B lands
    assert not np.array_equal(grad_w[:128], expected[:128])      # the bias blocks' row: B left raw


@pytest.mark.parametrize("path,prologue", [("tf32/s4", False), ("tf32/s2", True)])
def test_tf32_split_k_weight_grad(tf32, rng, path, prologue):
    """A batch of 4097 in 2 or 4 slices (the last one short, a k tile of one row): partial tiles
    summed in slice order, against the float64 twin with TF32's bound; the bias in float."""
    from gpu_backprop.ops.cuda import split_paths

    batch, n_in, n_out = 4097, 129, 7
    assert path in split_paths(batch, tf32=True)
    o = scipy.special.expit(rng.standard_normal((batch, n_in))).astype(np.float32)
    _, g, kwargs = weight_grad_case(rng, batch, 1, n_out, prologue)
    grad_w, grad_b = np.full((n_in, n_out), np.nan, np.float32), np.full(n_out, np.nan, np.float32)
    tf32.weight_grad(o, g, grad_w, grad_b, config=path, **kwargs)
    assert tf32.gemm_paths()[f"weight_grad{'+prologue' if prologue else ''}|float32|{n_in}x{n_out}x{batch}"] == path
    f64 = dict(kwargs, o_next=kwargs["o_next"].astype(np.float64), delta_out=np.empty(g.shape)) if prologue else {}
    exp_w, exp_b = twin.weight_grad(o.astype(np.float64), g.astype(np.float64), np.empty(grad_w.shape),
                                    np.empty(n_out), **f64)
    delta = np.abs(f64["delta_out"] if prologue else g.astype(np.float64))
    tf32_close(grad_w, exp_w, batch + 4, gemm_terms(o.T, delta) * (1 + 8 * 2.0 ** -24))
    limit = 2 * 2.0 ** -24 * (batch + 6) * delta.sum(axis=0) + 4 * np.finfo(np.float32).tiny
    assert np.all(np.abs(grad_b - exp_b) <= limit)


# ---------------------------------------------------------------- the Tf32 core's machine code

@pytest.fixture(scope="module")
def tf32_sass():
    """{kernel: [(opcode, operands)]} of every Tf32 GEMM kernel (SGD rule family), sm_90, from nvcc
    (tests/cubins.py's cubins)."""
    from gpu_backprop.ops.cuda import GEMM_FILES, names_in

    from .test_sass import gemm_sass

    names = [n for file in dict.fromkeys(GEMM_FILES.values()) for n in names_in(file)
             if "Tf32" in n and not n.endswith(", 1>")]
    return {name: [(op, rest) for _, op, rest in code] for name, code in gemm_sass(names).items()}


def multiply_spans(code):
    """The stretches of a kernel from a barrier to the last HMMA before the next one: the core's
    multiply of a k tile (the main loop's one barrier, or with the late rounding its last)."""
    spans, current = [], []
    for op, rest in code + [("BAR.SYNC", "")]:
        if op.startswith("BAR.SYNC"):
            last = max((i for i, (o, _) in enumerate(current) if o.startswith("HMMA")), default=-1)
            if last >= 0:
                spans.append(current[:last + 1])
            current = []
        else:
            current.append((op, rest))
    return spans


def unspilled_multiply_spans(name, code):
    """:func:`multiply_spans` of a kernel that must use no local memory (LDL, STL: no spill) and
    must have at least one."""
    local = [op for op, _ in code if op.startswith(("LDL", "STL"))]
    assert not local, (name, local[:5])
    spans = multiply_spans(code)
    assert spans, name
    return spans


# the design, per k tile (BK = 16) of a warp: 2 k steps of 4 x 4 mma, 6 ld.shared.v4 each
HMMA_PER_TILE, LDS128_PER_TILE = 32, 12


def test_tf32_main_loop_is_hmma_from_wide_shared_loads_without_conversions(tf32_sass):
    """Every Tf32 GEMM kernel: each k tile's multiply is 32 HMMA.1688.F32.TF32 from 12 LDS.128
    (16 + 8 fragment registers per k step: 2.7 mma per 128-bit load; the old core issued 12 scalar
    LDS and 12 conversions per 4 mma) with no scalar shared load and no conversion in it: no F2F,
    no tf32 rounding (ptxas's cvt.rna.tf32: FSETP |x| < INF, IADD, LOP3 & 0xffffe000). The
    rounding is once per element as the tile lands: (BM + BN) BK / THREADS = 24 a thread a tile."""
    assert len(tf32_sass) == 5, sorted(tf32_sass)  # forward, forward_gather, propagate, weight_grad, backward
    for name, code in tf32_sass.items():
        for span in unspilled_multiply_spans(name, code):
            ops = [op for op, _ in span]
            hmma = sum(op == "HMMA.1688.F32.TF32" for op in ops)
            wide = sum(op.startswith("LDS.128") for op in ops)
            narrow = [op for op in ops if op.startswith("LDS") and not op.startswith("LDS.128")]
            # (backward's output-delta functor, fetched meanwhile: F2F.F64.F32, its loss in double)
            rounding = [(op, rest) for op, rest in span if (op.startswith(("F2F", "FRND")) and op != "F2F.F64.F32")
                        or (op.startswith("LOP3") and "0xffffe000" in rest)]
            assert (hmma, wide) == (HMMA_PER_TILE, LDS128_PER_TILE), (name, hmma, wide)
            assert not narrow and not rounding, (name, narrow[:4], rounding[:4])
    counts = {name: sum(op.startswith("HMMA") for op, _ in code) // HMMA_PER_TILE for name, code in tf32_sass.items()}
    print("multiply copies per kernel:", counts)
