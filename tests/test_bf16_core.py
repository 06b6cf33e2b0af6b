"""The bf16 tensor-core GEMM core (kernels/gemm_bf16.cuh Bf16<BN>) through its kernel alone
(kernels/matmul.cu: out = op(a) op(b) as a^T b, a b and a b^T, the products of a training step in
bf16 storage; both tiles) on the CUDA-on-CPU shim, blocks in shuffled order, outputs poisoned
with NaN:

- against float64 with the bound of float sums (the bf16 products are exact), on shapes of one
  row, one column and no tile multiple, leading dimensions that rule out the 16-byte copies,
  and k tiles enough to wrap the ring of stages;
- bit for bit against the mma model (tests/test_tensor_cores.py: blocks of 8 products, k in
  order), which is what the core's order of sums is;
- the NumPy twin (ArrayOps.matmul_bf16) within the same bound of both;
- a fragment index, a transposition or an epilogue row planted wrong: each must fail the bound;
- the SASS of its main loop: 32 HMMA.16816.F32.BF16 from 8 LDSM.16.M(T)88.4 a k tile, nothing
  else reading shared memory, no local memory."""
import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops import NumpyOps
from gpu_backprop.ops.bf16 import bf16_bits
from gpu_backprop.ops.cuda import BF16_TILES, MATMUL_FILE, SM90_TILES, CudaOps, matmul_kernel, names_in

from .emulator.builder import EmuLoader, planted_kernels
from .test_tensor_cores import bits32, mma_model, random_operands

U = 2.0 ** -24
TINY = np.finfo(np.float32).tiny


def widen(h):
    """bf16 bits -> their float32 values (exact)."""
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)


LAYOUTS = {"tn": (True, False), "nn": (False, False), "nt": (False, True)}  # ops.cuda MATMUL_LAYOUTS


def case(rng, K, M, N, layout="tn", spread=4):
    """(a, b, A, B): the stored bf16 bits of out = op(a) op(b) for ``layout`` (a: K x M for tn,
    else M x K; b: N x K for nt, else K x N) and the operands as matrices, A = op(a) (M x K),
    B = op(b) (K x N)."""
    trans_a, trans_b = LAYOUTS[layout]
    A = bf16_bits(random_operands(rng, (M, K), spread))
    B = bf16_bits(random_operands(rng, (K, N), spread))
    a = np.ascontiguousarray(A.T) if trans_a else A
    b = np.ascontiguousarray(B.T) if trans_b else B
    return a, b, A, B


def bf16_close(actual, A, B):
    """Within the bound of float sums of exact products (A M x K, B K x N, bf16 bits), in any
    order and rounded either to nearest or toward zero (the tensor cores truncate): 6 float ulps
    of the terms per block of 8 k, two blocks of padding. NaN never passes."""
    A, B = widen(A).astype(np.float64), widen(B).astype(np.float64)
    expected, terms = A @ B, np.abs(A) @ np.abs(B)
    K = A.shape[1]
    limit = 2 * U * 6 * (K / 8 + 2) * terms + 4 * TINY
    error = np.abs(np.asarray(actual, np.float64) - expected)
    bad = ~(error <= limit)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(error / limit, nan=np.inf), -1)), expected.shape)
        raise AssertionError(f"{bad.sum()} of {bad.size} elements beyond the bf16 core's bound; worst at {i}: "
                             f"{actual[i]!r} vs {expected[i]!r} (|error| {error[i]:.3g}, bound {limit[i]:.3g})")


@pytest.fixture(scope="module")
def ops():
    return CudaOps(np, scipy.special, EmuLoader())


def run(ops, a, b, layout="tn", tile="128x128"):
    trans_a, trans_b = LAYOUTS[layout]
    M, N = a.shape[1] if trans_a else a.shape[0], b.shape[0] if trans_b else b.shape[1]
    out = np.full((M, N), np.nan, np.float32)
    ops.matmul_bf16(a, b, out, trans_a=trans_a, trans_b=trans_b, tile=tile)
    return out


# (K, M, N) against the 128 x 128 x 16 tile and its 4 stages: one row and one column, odd sizes
# (rows not 16-byte multiples: element copies), aligned ones (16-byte cp.async with a ragged
# edge), 7 k tiles (the ring wraps)
SHAPES = [(1, 1, 1), (1, 130, 7), (37, 133, 65), (97, 256, 136), (64, 129, 1), (200, 8, 264)]


@pytest.mark.parametrize("tile", BF16_TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_core_against_float64(ops, rng, shape, layout, tile):
    a, b, A, B = case(rng, *shape, layout)
    out = run(ops, a, b, layout, tile)
    bf16_close(out, A, B)
    # the twin, in float32 through BLAS: the same bound, so within twice of each other
    twin = np.full(out.shape, np.nan, np.float32)
    trans_a, trans_b = LAYOUTS[layout]
    NumpyOps().matmul_bf16(a, b, twin, trans_a=trans_a, trans_b=trans_b)
    bf16_close(twin, A, B)


@pytest.mark.parametrize("tile", BF16_TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(97, 133, 265), (96, 136, 264)], ids=["element-copies", "wide-copies"])
def test_bf16_core_is_the_mma_model_bit_for_bit(ops, rng, layout, tile, shape):
    """Each output is one chain of mma over k in order, 16 at a time (two blocks of 8 products
    each), from zero: zero padding past K changes nothing. Odd sizes (every copy an element's)
    and multiples of 8 (the 16-byte copies, both layouts)."""
    a, b, A, B = case(rng, *shape, layout, spread=12)
    out = run(ops, a, b, layout, tile)
    expected = mma_model(widen(A), widen(B), np.zeros(out.shape, np.float32), 8)
    np.testing.assert_array_equal(bits32(out), bits32(expected))


@pytest.mark.parametrize("tile", BF16_TILES)
def test_bf16_core_traps_on_a_block_it_was_not_written_for(ops, tile):
    from gpu_backprop.ops.launch import make

    kernel = ops.loader.function(MATMUL_FILE, matmul_kernel(tile, True, False), names_in(MATMUL_FILE))
    threads = BF16_TILES[tile][1]
    a_t, b = bf16_bits(np.ones((4, 3), np.float32)), bf16_bits(np.ones((4, 5), np.float32))
    out = np.full((3, 5), np.nan, np.float32)
    params = make("MatmulParams", np.float32, a=a_t, b=b, out=out, M=3, N=5, K=4)
    kernel((1, 1, 1), (threads, 1, 1), [params])
    np.testing.assert_array_equal(out, 4.0)
    for wrong in (threads // 2, threads + 32):
        with pytest.raises(RuntimeError, match="trapped"):
            kernel((1, 1, 1), (wrong, 1, 1), [params])


@pytest.mark.parametrize("which", ["numpy", "cuda"])
def test_bf16_matmul_names_the_argument_that_does_not_fit(ops, which):
    target = NumpyOps() if which == "numpy" else ops
    a_t, b, out = np.zeros((4, 3), np.uint16), np.zeros((4, 5), np.uint16), np.zeros((3, 5), np.float32)
    with pytest.raises(TypeError, match=r"^a: expected dtype uint16 \(bf16 bits\), got float32$"):
        target.matmul_bf16(a_t.astype(np.float32), b, out, trans_a=True)
    with pytest.raises(TypeError, match=r"^out: expected dtype float32"):
        target.matmul_bf16(a_t, b, out.astype(np.float64), trans_a=True)
    with pytest.raises(ValueError, match=r"^b: expected op\(b\) to have 4 rows \(op\(a\)'s columns\), got shape \(5, 5\)$"):
        target.matmul_bf16(a_t, np.zeros((5, 5), np.uint16), out, trans_a=True)
    with pytest.raises(ValueError, match=r"^out: expected shape \(3, 5\), got \(5, 3\)$"):
        target.matmul_bf16(a_t, b, np.zeros((5, 3), np.float32), trans_a=True)
    with pytest.raises(ValueError, match=r"^b: expected a 2-D array"):
        target.matmul_bf16(a_t, b.ravel(), out, trans_a=True)
    if which == "cuda":
        with pytest.raises(ValueError, match=r"^tile: expected one of 128x128, 128x256, wgmma/128x128, wgmma/128x256, got '64x64'$"):
            target.matmul_bf16(a_t, b, out, trans_a=True, tile="64x64")
        with pytest.raises(ValueError, match=r"^b: expected a C-contiguous array"):
            target.matmul_bf16(a_t, np.zeros((5, 4), np.uint16).T, out, trans_a=True)
        with pytest.raises(ValueError, match=r"^trans_a, trans_b: both transposed is not one of"):
            target.matmul_bf16(a_t, np.zeros((5, 4), np.uint16), out, trans_a=True, trans_b=True)
    else:  # the twin computes every layout
        target.matmul_bf16(a_t, np.ones((5, 4), np.uint16), out, trans_a=True, trans_b=True)


# ---------------------------------------------------------------- planted faults

A_LOAD = "ldmatrix_m8n8<4, true>(a[i], &As[k0 + j8 + 8 * (q / 2)][am + 16 * i + 8 * (q % 2)]);"
A_ROWS_LOAD = "ldmatrix_m8n8<4, false>(a[i], &As[am + 16 * i + j8 + 8 * (q % 2)][k0 + 8 * (q / 2)]);"
B_ROWS_LOAD = "ldmatrix_m8n8<4, false>(pair, &Bs[bn + 8 * j + j8 + 8 * (q / 2)][k0 + 8 * (q % 2)]);"
# fault: (file, line, replacement, the layout that runs it)
PLANTED = {
    # the A fragment's registers 1 and 2 swapped: rows g + 8 at k 2t read for rows g at k 2t + 8
    "a_matrix": ("gemm_bf16.cuh", A_LOAD,
                 "ldmatrix_m8n8<4, true>(a[i], &As[k0 + j8 + 8 * (q % 2)][am + 16 * i + 8 * (q / 2)]);", "tn"),
    # A read untransposed: lane 4 g + t gets row (k) g, columns (m) 2t, 2t + 1
    "a_untransposed": ("gemm_bf16.cuh", A_LOAD,
                       "ldmatrix_m8n8<4, false>(a[i], &As[k0 + j8 + 8 * (q / 2)][am + 16 * i + 8 * (q % 2)]);", "tn"),
    # the second n tile of a pair given the first one's k 8-15 half
    "b_pair": ("gemm_bf16.cuh", "b[j + 1][0] = pair[2];", "b[j + 1][0] = pair[1];", "tn"),
    # the epilogue's two columns of a lane swapped (every output still written once)
    "epilogue_column": ("gemm_bf16.cuh", "const index_t n = n0 + wn + 8 * j + 2 * t + r % 2;",
                        "const index_t n = n0 + wn + 8 * j + 2 * t + (r + 1) % 2;", "tn"),
    # an m-major A tile's registers 1 and 2 swapped
    "a_rows_matrix": ("gemm_bf16.cuh", A_ROWS_LOAD,
                      "ldmatrix_m8n8<4, false>(a[i], &As[am + 16 * i + j8 + 8 * (q / 2)][k0 + 8 * (q % 2)]);", "nn"),
    # an n-major B tile read transposed
    "b_rows_transposed": ("gemm_bf16.cuh", B_ROWS_LOAD,
                          "ldmatrix_m8n8<4, true>(pair, &Bs[bn + 8 * j + j8 + 8 * (q / 2)][k0 + 8 * (q % 2)]);", "nt"),
    # an m-major tile's 16-byte copies one vector along k short of where they land
    "row_copy_k": ("gemm_tile.cuh", "cp_async<16>(&tile[rr][kk], p + r * ld + k, 16);",
                   "cp_async<16>(&tile[rr][kk ^ 8], p + r * ld + k, 16);", "nn"),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    def make(fault):
        folder = planted_kernels(tmp_path_factory.mktemp(fault) / "kernels", *PLANTED[fault][:3])
        return CudaOps(np, scipy.special, EmuLoader(folder))
    return make


@pytest.mark.parametrize("fault", list(PLANTED))
def test_a_planted_fault_fails_the_bound(ops, planted, rng, fault):
    layout = PLANTED[fault][3]
    a, b, A, B = case(rng, 48, 136, 72, layout)  # (rows of 16-byte multiples: the wide copies run)
    bf16_close(run(ops, a, b, layout), A, B)  # unplanted: passes
    out = run(planted(fault), a, b, layout)  # (the 128 x 128 tile: the core's code is the same for both)
    assert not np.isnan(out).any()  # it ran and wrote every output, wrongly
    with pytest.raises(AssertionError, match="beyond the bf16 core's bound"):
        bf16_close(out, A, B)


# ---------------------------------------------------------------- machine code

@pytest.fixture(scope="module")
def bf16_sass():
    """{kernel: [(opcode, operands)]} of matmul<Bf16<BN>, ...> for every tile and layout, sm_90,
    from nvcc (tests/cubins.py's cubin)."""
    from . import cubins
    from .test_sass import disassemble

    result = cubins.nvcc_cubin(MATMUL_FILE, "sm_90")
    assert result.returncode == 0, result.report[-3000:]
    code = disassemble(result.cubin, lambda name: name.startswith("void matmul<") or name.startswith("matmul<"))
    assert len(code) == len(names_in(MATMUL_FILE)), sorted(code)
    return {name: [(op, rest) for _, op, rest in body] for name, body in code.items()}


@pytest.mark.parametrize("tile", BF16_TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_main_loop_is_hmma_from_ldmatrix(bf16_sass, tile, layout):
    """Each k tile (BK 16) of a warp's 64 x 64: 4 x 8 mma from 4 + 4 ldmatrix.x4 (.trans for a
    k-major tile, plain for an m-major one), with no other shared load and no conversion (F2F,
    F2FP) between the barrier and the last HMMA; no local memory. (The next tile's 16-bit element
    copies, at the edges, are issued there: LDG.U16, PRMT, STS.)"""
    from .test_tensor_cores import multiply_spans

    trans_a, trans_b = LAYOUTS[layout]
    name = matmul_kernel(tile, trans_a, trans_b)
    code = next(body for n, body in bf16_sass.items() if n.replace(" ", "").replace("void", "") == name.replace(" ", ""))
    assert not [op for op, _ in code if op.startswith(("LDL", "STL"))]
    spans = multiply_spans(code)
    assert spans
    transposed = 4 * (trans_a + (not trans_b))  # the k-major tiles' loads
    for span in spans:
        ops = [op for op, _ in span]
        hmma = sum(op == "HMMA.16816.F32.BF16" for op in ops)
        ldsm = (sum(op == "LDSM.16.MT88.4" for op in ops), sum(op == "LDSM.16.M88.4" for op in ops))
        other = [op for op in ops if op.startswith(("LDS", "F2F")) and not op.startswith("LDSM")]
        assert (hmma, ldsm) == (32, (transposed, 8 - transposed)), (hmma, ldsm)
        assert not other, other[:4]


def test_bf16_core_tunes_between_its_tiles(rng):
    """tile=None: the tuner chooses among BF16_TILES (and SM90_TILES on sm90a) for a shape of at least TUNE_MIN_FMA
    multiply-adds (its trials run each tile), below it the default runs untuned."""
    from gpu_backprop.ops.autotune import Tuner

    class Chooser(Tuner):
        def __init__(self):
            super().__init__(enabled=False)
            self.asked = []

        def choose(self, key, candidates, trial, default):
            self.asked.append((key, candidates, default))
            for tile in candidates:
                trial(tile)
            return candidates[-1]

    tuner = Chooser()
    ops = CudaOps(np, scipy.special, EmuLoader(), tuner=tuner)
    a, b, A, B = case(rng, 37, 133, 265, "nn")
    ops.tune_min_fma = 0
    bf16_close(run(ops, a, b, "nn", tile=None), A, B)
    # (the emulator has sm90a: the wgmma kernels are candidates, and 128x256 chosen: last)
    assert tuner.asked == [("matmul_bf16|NN|133x265x37", (*BF16_TILES, *SM90_TILES), "128x128")]
    ops.tune_min_fma = 1 << 40
    tuner.asked.clear()
    a, b, A, B = case(rng, 36, 133, 265)  # another shape (a call with the same arrays replays)
    bf16_close(run(ops, a, b, tile=None), A, B)
    assert tuner.asked == [("matmul_bf16|TN|133x265x36", ("128x128",), "128x128")]
