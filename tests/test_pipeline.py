"""The cp.async pipeline of the GEMM main loop (kernels/gemm_tile.cuh) on the CUDA-on-CPU shim.

The shim runs cp.async as the PTX ISA defines it: a copy lands when its thread waits for its
group (cp.async.wait_group), and until then the destination holds poison (NaN). So the probe
below pins the instruction's semantics, and a main loop that waits too little, leaves a copy out
of its group, or refills a stage still being read, computes with NaN and fails against the
float64 twin, on every core and both float types."""
import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops import NumpyOps
from gpu_backprop.ops.cuda import WIDE_CONFIGS, CudaOps, configs_for

from .emulator.builder import HERE, KERNELS, EmuLoader, planted_kernels
from .test_emulated_kernels import Always, close, gemm_terms, inputs, nan

twin = NumpyOps()
PROBE = ["async_groups", "misaligned_copy"]


@pytest.fixture(scope="module")
def probe():
    return EmuLoader(HERE, blocks="in_order")


def test_copies_land_at_the_wait_of_their_group(probe):
    threads = 64
    src = np.arange(1, 3 * threads + 1, dtype=np.float32)
    src4 = np.arange(4 * threads, dtype=np.float32) + 1000
    seen, wide = nan(9 * threads, np.float32), nan(4 * threads, np.float32)
    probe.function("async_probe.cu", "async_groups", PROBE)((1, 1, 1), (threads, 1, 1), [src, src4, seen, wide])
    seen = seen.reshape(threads, 3, 3)  # [thread, after wait<2>, <1>, <0>; group]
    words = src.reshape(threads, 3).copy()
    words[:, 2] = 0  # group 2: a zero fill
    assert np.array_equal(seen[:, 0, 0], words[:, 0])  # wait<2>: the oldest group landed...
    assert np.isnan(seen[:, 0, 1:]).all()               # ...the two newest still poisoned
    assert np.array_equal(seen[:, 1, :2], words[:, :2]) and np.isnan(seen[:, 1, 2]).all()
    assert np.array_equal(seen[:, 2], words)            # wait<0>: all, the zero fill too
    # a 16-byte copy, read by another thread after its owner waited and a barrier
    assert np.array_equal(wide.reshape(threads, 4), np.roll(src4.reshape(threads, 4), -1, axis=0))


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_a_misaligned_16_byte_copy_traps(probe, offset):
    src, out = np.zeros(8, np.float32), nan(1, np.float32)
    kernel = probe.function("async_probe.cu", "misaligned_copy", PROBE)
    kernel((1, 1, 1), (32, 1, 1), [src, np.int32(0), out])
    assert out[0] == 0
    with pytest.raises(RuntimeError, match="trapped"):
        kernel((1, 1, 1), (32, 1, 1), [src, np.int32(offset), out])


def run_layer(loader, config, dtype, rng, batch=37, n_in=70, n_out=19):
    """A forward, a propagation and a weight gradient with delta given (both operands by cp.async)
    on ``config``, each against the float64 twin; every output NaN-poisoned first."""
    ops = CudaOps(np, scipy.special, loader, tuner=Always(config))
    o, W = inputs(rng, dtype, batch, n_in, n_out, "sigmoid")
    b = rng.standard_normal(n_out).astype(dtype)
    out = ops.forward(o, W, b, "sigmoid", nan((batch, n_out), dtype), config=config)
    expected = twin.forward(o.astype(np.float64), W.astype(np.float64), b.astype(np.float64), "sigmoid",
                            np.empty((batch, n_out)))
    close(out, expected, dtype, n_in, gemm_terms(o, W) + np.abs(b))
    delta = rng.standard_normal((batch, n_out)).astype(dtype)
    below = ops.propagate(delta, W, o, "sigmoid", nan((batch, n_in), dtype), config=config)
    expected = twin.propagate(delta.astype(np.float64), W.astype(np.float64), o.astype(np.float64), "sigmoid",
                              np.empty((batch, n_in)))
    close(below, expected, dtype, n_out, gemm_terms(delta, W.T))
    grad_w, grad_b = nan((n_in, n_out), dtype), nan(n_out, dtype)
    ops.weight_grad(o, delta, grad_w, grad_b, config=config)
    exp_w, exp_b = twin.weight_grad(o.astype(np.float64), delta.astype(np.float64), np.empty((n_in, n_out)),
                                    np.empty(n_out))
    close(grad_w, exp_w, dtype, batch, gemm_terms(o.T, delta))
    close(grad_b, exp_b, dtype, batch, np.abs(delta).sum(0))
    if config in WIDE_CONFIGS:
        return
    # the delta prologue: err and o_next copied, delta formed in shared memory (float32) or in registers
    o_next, _ = inputs(rng, dtype, batch, n_out, 1, "tanh")
    grad_w, grad_b, delta_out = nan((n_in, n_out), dtype), nan(n_out, dtype), nan((batch, n_out), dtype)
    ops.weight_grad(o, delta, grad_w, grad_b, o_next=o_next, activation="tanh", delta_out=delta_out, config=config)
    f64 = dict(o_next=o_next.astype(np.float64), activation="tanh", delta_out=np.empty((batch, n_out)))
    exp_w, exp_b = twin.weight_grad(o.astype(np.float64), delta.astype(np.float64), np.empty((n_in, n_out)),
                                    np.empty(n_out), **f64)
    close(delta_out, f64["delta_out"], dtype)
    formed = np.abs(f64["delta_out"])
    close(grad_w, exp_w, dtype, batch + 4, gemm_terms(o.T, formed))
    close(grad_b, exp_b, dtype, batch + 4, formed.sum(0))


@pytest.mark.parametrize("config,dtype", [(c, d) for d in (np.float32, np.float64) for c in configs_for(d)])
def test_every_core_pipelines_against_the_twin(rng, config, dtype):
    run_layer(EmuLoader(), config, dtype, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_views_take_the_element_copies(rng, dtype):
    """Operands whose rows are not 16-byte aligned (a view one element into a buffer, and widths
    that are not a multiple of a vector) are copied element by element on the warp core."""
    loader, config = EmuLoader(), "warp"
    ops = CudaOps(np, scipy.special, loader, tuner=Always(config))
    batch, n_in, n_out = 33, 64, 20
    o_buf = np.empty(batch * n_in + 1, dtype)
    o = o_buf[1:].reshape(batch, n_in)  # C-contiguous, 4 or 8 bytes off a 16-byte boundary
    o[...], _ = inputs(rng, dtype, batch, n_in, n_out, "sigmoid")
    delta = rng.standard_normal((batch, n_out)).astype(dtype)
    grad_w, grad_b = nan((n_in, n_out), dtype), nan(n_out, dtype)
    ops.weight_grad(o, delta, grad_w, grad_b, config=config)
    exp_w, _ = twin.weight_grad(o.astype(np.float64), delta.astype(np.float64), np.empty((n_in, n_out)),
                                np.empty(n_out))
    close(grad_w, exp_w, dtype, batch, gemm_terms(o.T, delta))


# Planted faults in the main loop: each must fail the twin comparison (NaN from a copy read
# before it landed, or a trap), on a two-stage Simt core and on the multistage warp core.
PLANTED = {
    "wait one group too few": ("gemm_tile.cuh", "cp_async_wait<S - 2>();", "cp_async_wait<S - 1>();"),
    "copies left out of the tile's group": ("gemm_tile.cuh", "        cp_async_commit();\n        const bool more",
                                            "        const bool more"),
    "refill the stage being read": ("gemm_tile.cuh", "const int ahead_stage = stage == 0 ? S - 1 : stage - 1;",
                                    "const int ahead_stage = stage;"),
    "wide copies of misaligned rows": ("gemm_tile.cuh", "wide_ok(aligned16(o.p) && o.ld % Copy::VEC == 0)",
                                       "wide_ok(true)"),
    "prologue before its copies land": ("gemm_tile.cuh",
                                        "cp_async_wait<S - 2>();  // this thread's copies of tile t + 1",
                                        "// (planted: no wait)"),
    "prologue on the tile being multiplied": ("gemm_tile.cuh",
                                              "b.transform(tiles.B[next_stage], aux(next_stage), n0, k_begin + (t + 1)",
                                              "b.transform(tiles.B[stage], aux(stage), n0, k_begin + (t + 1)"),
}


@pytest.mark.parametrize("config", ["large", "warp"])
@pytest.mark.parametrize("fault", list(PLANTED))
def test_planted_pipeline_faults_fail(tmp_path, rng, fault, config):
    if fault == "wide copies of misaligned rows" and config == "large":
        pytest.skip("Simt's odd PAD keeps every copy element-wise")
    file, line, replacement = PLANTED[fault]
    loader = EmuLoader(planted_kernels(tmp_path / "kernels", file, line, replacement))
    with pytest.raises((AssertionError, RuntimeError)) as failure:
        run_layer(loader, config, np.float32, rng, n_in=70, n_out=19)
    assert "g++ failed" not in str(failure.value)  # the fault ran (and failed), not the build


def test_a_functor_operand_stored_into_the_stage_being_read_fails(tmp_path, rng):
    """float64 keeps the register (functor) prologue: its tile stored over the one being multiplied
    must fail as the cp.async faults do (float32 runs no functor operand in run_layer)."""
    loader = EmuLoader(planted_kernels(tmp_path / "kernels", "gemm_tile.cuh", "b.store(tiles.B[next_stage], tid);",
                                      "b.store(tiles.B[stage], tid);"))
    with pytest.raises(AssertionError):
        run_layer(loader, "warp", np.float64, rng, n_in=70, n_out=19)


def test_the_waits_tell_the_compiler_about_memory():
    """The shim cannot show compiler reordering: a shared load hoisted above cp.async.wait_group
    (the prologue reads its own copies right after its wait, with no barrier) would only fail on a
    GPU. So the asm of the wait, the commit and the copy must keep their "memory" clobber."""
    source = (KERNELS / "common.cuh").read_text()
    for instruction in ("cp.async.wait_group", "cp.async.commit_group", "cp.async.cg.shared.global",
                        "cp.async.ca.shared.global"):
        start = source.index(instruction)
        statement = source[source.rindex("asm volatile", 0, start):source.index(");", start)]
        assert '"memory"' in statement, instruction

