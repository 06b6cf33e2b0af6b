"""The bf16 GEMM on Hopper's warpgroup tensor cores (kernels/matmul_sm90.cu: 128x128 and 128x256
tiles, wgmma with 128-byte swizzled shared-memory descriptors, sm_90a) on the CUDA-on-CPU shim (tests/emulator/wgmma_shim.h:
operands read at the issue, D written at the wait, a buffer changed under an mma in flight traps),
blocks in shuffled order, outputs poisoned with NaN:

- against float64 with the bf16 core's bound, all three layouts, on shapes of one row, one column,
  no tile multiple, rows that rule out the 16-byte copies, and k tiles enough to wrap the ring;
- bit for bit against the mma model (blocks of 8 products, k in order: the model the shim
  assumes for Hopper, as for the A100);
- a swizzle, a descriptor, a transposition flag, an epilogue row or a step of the pipeline
  (a wait, a barrier, a fence) planted wrong: each must fail the bound or trap;
- the tuner's candidates on an sm_90a loader and on others; the SASS of each kernel: four
  HGMMA.64xBNx16.F32.BF16 a k tile with the layout's transpose flags, one wait for all but the
  newest group, no local memory.
A GPU test (tests/test_gpu.py style, cc 9.0 only) runs the same comparison on the card."""
import re

import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops.cuda import (BF16_TILES, SM90_SHARED_MAX, SM90_TILE, SM90_TILES, SM90A_FILE, CudaOps,
                                   matmul_kernel, names_in)

from .emulator.builder import EmuLoader, planted_kernels
from .test_bf16_core import LAYOUTS, bf16_close, case, widen
from .test_tensor_cores import bits32, mma_model


@pytest.fixture(scope="module")
def ops():
    return CudaOps(np, scipy.special, EmuLoader())


def run(ops, a, b, layout, tile=SM90_TILE):
    trans_a, trans_b = LAYOUTS[layout]
    M, N = a.shape[1] if trans_a else a.shape[0], b.shape[0] if trans_b else b.shape[1]
    out = np.full((M, N), np.nan, np.float32)
    ops.matmul_bf16(a, b, out, trans_a=trans_a, trans_b=trans_b, tile=tile)
    return out


# (K, M, N) against the 128 x 128 x 64 tile and its 4 stages: one of each, odd sizes (element
# copies), multiples of 8 with a ragged edge (16-byte cp.async), 5 k tiles (the ring wraps), two
# blocks each way
SHAPES = [(1, 1, 1), (1, 130, 7), (37, 133, 65), (97, 256, 136), (64, 129, 1), (300, 8, 264), (320, 136, 200)]


@pytest.mark.parametrize("tile", SM90_TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_wgmma_core_against_float64(ops, rng, shape, layout, tile):
    a, b, A, B = case(rng, *shape, layout)
    bf16_close(run(ops, a, b, layout, tile), A, B)


@pytest.mark.parametrize("tile", SM90_TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(97, 133, 265), (200, 136, 264)], ids=["element-copies", "wide-copies"])
def test_wgmma_core_is_the_mma_model_bit_for_bit(ops, rng, layout, shape, tile):
    """Each output one chain over k in order, 16 at a time from zero (zeros past K add nothing):
    the same sums as the mma.sync core's, so the same bits."""
    a, b, A, B = case(rng, *shape, layout, spread=12)
    out = run(ops, a, b, layout, tile)
    expected = mma_model(widen(A), widen(B), np.zeros(out.shape, np.float32), 8)
    np.testing.assert_array_equal(bits32(out), bits32(expected))
    np.testing.assert_array_equal(bits32(out), bits32(run(ops, a, b, layout, "128x128")))


@pytest.mark.parametrize("tile", SM90_TILES)
def test_wgmma_kernel_traps_on_a_block_it_was_not_written_for(ops, tile):
    from gpu_backprop.ops.bf16 import bf16_bits
    from gpu_backprop.ops.launch import make

    kernel = ops.loader.function(SM90A_FILE, matmul_kernel(tile, True, False), names_in(SM90A_FILE))
    a_t, b = bf16_bits(np.ones((4, 3), np.float32)), bf16_bits(np.ones((4, 5), np.float32))
    out = np.full((3, 5), np.nan, np.float32)
    params = make("MatmulParams", np.float32, a=a_t, b=b, out=out, M=3, N=5, K=4)
    _, threads, shared = SM90_TILES[tile]
    kernel((1, 1, 1), (threads, 1, 1), [params], shared_mem=shared)
    np.testing.assert_array_equal(out, 4.0)
    for wrong in (128, threads + 128):
        with pytest.raises(RuntimeError, match="trapped"):
            kernel((1, 1, 1), (wrong, 1, 1), [params], shared_mem=shared)


class Recording:
    """A tuner that records the candidates it is offered and takes the first."""

    def __init__(self):
        self.offered = []

    def choose(self, key, candidates, trial, default):
        self.offered.append((key, tuple(candidates)))
        return candidates[0]


@pytest.mark.parametrize("sm90a", [True, False])
def test_the_tuner_is_offered_wgmma_on_sm90a_alone(sm90a):
    loader = EmuLoader()
    loader.sm90a = sm90a
    tuner = Recording()
    ops = CudaOps(np, scipy.special, loader, tuner=tuner)
    ops.tune_min_fma = 1  # every shape tuned
    a, b = np.zeros((8, 8), np.uint16), np.zeros((8, 8), np.uint16)
    ops.matmul_bf16(a, b, np.zeros((8, 8), np.float32))
    expected = (*BF16_TILES, *SM90_TILES) if sm90a else tuple(BF16_TILES)
    assert tuner.offered == [("matmul_bf16|NN|8x8x8", expected)]
    if not sm90a:
        with pytest.raises(ValueError, match=r"^tile: expected one of 128x128, 128x256, got 'wgmma/128x128'$"):
            ops.matmul_bf16(a, b, np.zeros((8, 8), np.float32), tile=SM90_TILE)


class FakeCupy:
    """The part of CuPy CupyLoader reads as it starts: a device's properties."""

    def __init__(self, major, minor):
        props = {"multiProcessorCount": 132, "name": b"fake", "major": major, "minor": minor}
        self.cuda = type("cuda", (), {"runtime": type("runtime", (), {
            "getDeviceProperties": staticmethod(lambda index: props)})})


@pytest.mark.parametrize("cc, sm90a", [((9, 0), True), ((8, 0), False), ((8, 9), False), ((10, 0), False),
                                       ((12, 0), False)])
def test_only_compute_capability_9_0_runs_the_sm90a_cubin(cc, sm90a):
    from gpu_backprop.ops.cuda import CupyLoader

    assert CupyLoader(FakeCupy(*cc), 0).sm90a is sm90a


# ---------------------------------------------------------------- planted faults

CU = "matmul_sm90.cu"
# fault: (line, replacement, the layout that runs it)
PLANTED = {
    # K-major tiles stored unswizzled (the descriptors still say 128-byte swizzle)
    "k_major_swizzle": ("return (r / 8) * 1024 + row * 128 + ((chunk ^ row) << 4);",
                        "return (r / 8) * 1024 + row * 128 + (chunk << 4);", "nt"),
    # MN-major tiles' 8-k atoms in the wrong order along m (n)
    "mn_major_atoms": ("return (8 * (r / 64) + k / 8) * 1024 + row * 128 + ((chunk ^ row) << 4);",
                       "return (r / 64 + 2 * (k / 8)) * 1024 + row * 128 + ((chunk ^ row) << 4);", "tn"),
    # a K-major operand's k16 steps 16 bytes apart (half a step)
    "k_step": (": wgmma_descriptor(a0 + 32 * kk, 16, 1024);", ": wgmma_descriptor(a0 + 16 * kk, 16, 1024);", "nt"),
    # an MN-major B's second 64 columns read from the first atom's k rows
    "mn_lbo": ("const unsigned long long db = B_KROWS ? wgmma_descriptor(b0 + 2 * kk * 1024, 8 * 1024, 1024)",
               "const unsigned long long db = B_KROWS ? wgmma_descriptor(b0 + 2 * kk * 1024, 1024, 1024)", "nn"),
    # B's transpose flag dropped (an N-major tile read as K-major)
    "b_transpose": ("wgmma_bf16<BN, A_KROWS, B_KROWS>(acc, da, db, 1);",
                    "wgmma_bf16<BN, A_KROWS, false>(acc, da, db, 1);", "nn"),
    # the epilogue's rows g and g + 8 swapped for the odd registers
    "epilogue_row": ("const index_t m = m0 + 64 * wg + 16 * w + g + 8 * ((r / 2) % 2)",
                     "const index_t m = m0 + 64 * wg + 16 * w + g + 8 * (r % 2)", "tn"),
    # the wait too weak: tile kt - 2's mma may still read the buffer tile kt + 2 refills
    "wgmma_wait": ("wgmma_wait_group<1>(acc);  // tile kt - 1's", "wgmma_wait_group<2>(acc);  // tile kt - 1's", "tn"),
    # no barrier: a warpgroup's mma reads the other threads' copies before they land
    "barrier": ("__syncthreads();  // sync: tile kt in every", "// sync: tile kt in every", "nn"),
    # the copy wait one group short: tile kt still in flight as its mma read it
    "copy_wait": ("cp_async_wait<1>();  // tile kt landed", "cp_async_wait<2>();  // tile kt landed", "nt"),
    # no fence between the zeroed (and the waited-for) accumulators and the next mma
    "fence": ("        wgmma_fence();\n", "\n", "tn"),
    # the epilogue reads the accumulators with the last tile's mma in flight
    "last_wait": ("    wgmma_wait_group<0>(acc);\n", "\n", "nn"),
    # the atoms taken where dynamic shared memory starts, 16-byte aligned only (the shim's window
    # starts 16 * 37 bytes past a 1024-byte boundary): the stores' swizzle is not the addresses'
    "realign": ("shared + ((1024 - (shared_address(shared) & 1023)) & 1023);", "shared;", "nt"),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    def make(fault):
        folder = planted_kernels(tmp_path_factory.mktemp(fault) / "kernels", CU, *PLANTED[fault][:2])
        return CudaOps(np, scipy.special, EmuLoader(folder))
    return make


@pytest.mark.parametrize("fault", list(PLANTED))
def test_a_planted_fault_fails_the_bound_or_traps(ops, planted, rng, fault):
    layout = PLANTED[fault][2]
    a, b, A, B = case(rng, 320, 136, 200, layout)  # 5 k tiles, two blocks each way, 16-byte copies
    bf16_close(run(ops, a, b, layout), A, B)  # unplanted: passes
    with pytest.raises((AssertionError, RuntimeError), match="beyond the bf16 core's bound|trapped"):
        bf16_close(run(planted(fault), a, b, layout), A, B)


# ---------------------------------------------------------------- SASS

@pytest.fixture(scope="module")
def sm90a_sass():
    """{kernel: [(predicate, opcode, operands)]} of matmul_sm90.cu's kernels, from nvcc for sm_90a
    (tests/cubins.py)."""
    from . import cubins
    from .test_sass import disassemble

    result = cubins.nvcc_cubin(SM90A_FILE, "sm_90a")
    if result is None:
        pytest.skip("nvcc not found")
    assert result.returncode == 0, result.report[-3000:]
    return disassemble(result.cubin, lambda name: name.startswith("matmul_sm90_"))


@pytest.mark.parametrize("tile", SM90_TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sm90a_main_loop_is_four_hgmma_a_k_tile(sm90a_sass, layout, tile):
    """One k tile's multiply: WARPGROUP.ARRIVE (wgmma.fence), then 4 HGMMA.64xBNx16.F32.BF16 on the
    same accumulators (R24..), descriptors from uniform registers, A transposed for tn, B for tn and
    nn, the last closing group gsb0, then WARPGROUP.DEPBAR.LE gsb0, 0x1 (wait_group 1) in the loop;
    no local memory."""
    code = sm90a_sass[matmul_kernel(tile, *LAYOUTS[layout])]
    bn = SM90_TILES[tile][0][1]
    assert not [op for _, op, _ in code if op.startswith(("LDL", "STL"))]
    hgmma = [op + rest for _, op, rest in code if op.startswith("HGMMA")]  # (the opcode's shape: in rest)
    assert len(hgmma) == 4, hgmma
    flags = {"tn": ".tnspA.tnspB", "nn": ".tnspB", "nt": ""}[layout]
    for i, text in enumerate(hgmma):
        shape = re.match(rf"HGMMA\.64x{bn}x16\.F32\.BF16 (R\d+), gdesc\[(UR\d+)\](\S*), (R\d+)", text)
        assert shape, text
        assert shape[3] == flags + "," or shape[3] == flags, text
        assert shape[1] == shape[4] == hgmma_accumulators(hgmma[0]), text  # one chain of accumulators
        assert text.rstrip().endswith("gsb0") == (i == 3), text
    waits = [rest.strip() for _, op, rest in code if op == "WARPGROUP.DEPBAR.LE"]
    assert waits[0] == "gsb0, 0x1" and "gsb0, 0x0" in waits, waits
    assert sum(op == "WARPGROUP.ARRIVE" for _, op, _ in code) == 1
    # fence.proxy.async (the shim does not model the async proxy: only this sees it missing)
    assert sum(op.startswith("FENCE.VIEW.ASYNC.S") for _, op, _ in code) == 1, [op for _, op, _ in code if "FENCE" in op]


def hgmma_accumulators(text: str) -> str:
    return re.match(r"HGMMA\S* (R\d+),", text)[1]


# ---------------------------------------------------------------- on the card

@pytest.mark.gpu
@pytest.mark.parametrize("tile", SM90_TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_wgmma_core_on_the_card(gpu, rng, layout, tile):
    """On an sm_90a card (else skipped with the reason): the cubin NVRTC builds there, outputs
    poisoned, against float64 with the same bound on odd and large shapes; beside the mma.sync
    core (the shim says they agree bit for bit; printed here, not asserted: Hopper's order of
    sums inside a wgmma is not documented)."""
    xp, ops = gpu
    if not getattr(ops.loader, "sm90a", False):
        pytest.skip(f"wgmma: compute capability 9.0 only (this card: {ops.loader.name})")
    trans_a, trans_b = LAYOUTS[layout]
    for shape in [(1, 1, 1), (37, 133, 65), (320, 136, 200), (1000, 1030, 520), (4096, 512, 768)]:
        a, b, A, B = case(rng, *shape, layout)
        outs = []
        for each in (tile, "128x128"):
            out = xp.full((A.shape[0], B.shape[1]), np.nan, np.float32)
            ops.matmul_bf16(xp.asarray(a), xp.asarray(b), out, trans_a=trans_a, trans_b=trans_b, tile=each)
            outs.append(out.get())
            bf16_close(outs[-1], A, B)
        print(tile, layout, shape, "bit-identical to mma.sync:", bool((bits32(outs[0]) == bits32(outs[1])).all()))


# ---------------------------------------------------------------- the loader's sm_90a path

def nvrtc_binding():
    """CuPy's NVRTC binding (cupy_backends.cuda.libs.nvrtc: the calls sm90a_cubin makes), over
    libnvrtc through ctypes: the library's compile path runs with real NVRTC on a machine without CuPy."""
    import ctypes
    import types

    from . import nvrtc

    path = nvrtc.find_library()
    if path is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(path)

    class NVRTCError(RuntimeError):
        pass

    def check(status):
        if status != 0:
            raise NVRTCError(status)

    def create(source, name, headers, include_names):
        program = ctypes.c_void_p()
        check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None))
        return program.value

    def compile_program(program, options):
        opts = [o.encode() for o in options]
        check(lib.nvrtcCompileProgram(ctypes.c_void_p(program), len(opts), (ctypes.c_char_p * len(opts))(*opts)))

    def read(size_of, get, program):
        size = ctypes.c_size_t()
        check(size_of(ctypes.c_void_p(program), ctypes.byref(size)))
        buffer = ctypes.create_string_buffer(size.value)
        check(get(ctypes.c_void_p(program), buffer))
        return buffer.raw[:size.value]

    def version():
        major, minor = ctypes.c_int(), ctypes.c_int()
        check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        return major.value, minor.value

    return types.SimpleNamespace(
        NVRTCError=NVRTCError, createProgram=create, compileProgram=compile_program, getVersion=version,
        getCUBIN=lambda p: read(lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN, p),
        getProgramLog=lambda p: read(lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog, p).decode(errors="replace"),
        destroyProgram=lambda p: lib.nvrtcDestroyProgram(ctypes.byref(ctypes.c_void_p(p))))


def test_the_loader_builds_an_sm90a_cubin_once_and_loads_it(monkeypatch, tmp_path):
    """CupyLoader on a cc 9.0 card: matmul_sm90.cu compiled by NVRTC for sm_90a (real NVRTC, the
    ELF cubin checked: its machine and the kernels' symbols), cached on disk (a second loader
    compiles nothing), loaded by RawModule(path=...), each kernel allowed SM90_BLOCK's dynamic
    shared memory. Planted faults it catches: an sm_90 target (no wgmma: NVRTC fails, the log
    raised), a cache that does not key on the source."""
    import sys
    import types

    from gpu_backprop.ops import cuda

    binding = nvrtc_binding()
    compiles = []
    real_compile = binding.compileProgram
    binding.compileProgram = lambda program, options: (compiles.append(options), real_compile(program, options))
    monkeypatch.setitem(sys.modules, "cupy_backends", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", types.SimpleNamespace(nvrtc=binding))
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", binding)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    loaded = []

    class Kernel:
        max_dynamic_shared_size_bytes = 0

    class RawModule:
        def __init__(self, path):
            loaded.append(path)

        def get_function(self, name):
            cubin = open(loaded[-1], "rb").read()
            assert cubin[:4] == b"\x7fELF" and int.from_bytes(cubin[18:20], "little") == 190  # EM_CUDA
            assert name.encode() + b"\0" in cubin
            return Kernel()

    runtime = types.SimpleNamespace(getDeviceProperties=lambda i: {"multiProcessorCount": 132, "name": b"H100",
                                                                      "major": 9, "minor": 0})
    xp = types.SimpleNamespace(RawModule=RawModule, cuda=types.SimpleNamespace(runtime=runtime))
    names = names_in(SM90A_FILE)
    for name in names:
        kernel = cuda.CupyLoader(xp, 0).function(SM90A_FILE, name, names)
        assert kernel.max_dynamic_shared_size_bytes == SM90_SHARED_MAX
    assert compiles == [("-std=c++17", "--gpu-architecture=sm_90a")]  # once: the cubin on disk after
    assert len(set(loaded)) == 1 and loaded[0].startswith(str(tmp_path))
    # the same source for sm_90 (no wgmma there): the error names the file and carries the log
    original = cuda.kernel_source
    monkeypatch.setattr(cuda, "kernel_source", lambda file, *rest: "// changed\n" + original(file, *rest))
    real = binding.compileProgram
    binding.compileProgram = lambda program, options: real(program, (options[0], "--gpu-architecture=sm_90"))
    with pytest.raises(RuntimeError, match=r"(?s)NVRTC failed on matmul_sm90.cu \(sm_90a\):\n.*wgmma"):
        cuda.CupyLoader(xp, 0).function(SM90A_FILE, names[0], names)

