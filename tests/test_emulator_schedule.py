"""The CUDA-on-CPU shim schedules blocks as a GPU may: in a seeded shuffled order and
several at once, each with its own __shared__ storage, so a kernel that depends on
block order or on one block finishing before another fails on the CPU."""
from pathlib import Path

import numpy as np
import pytest
import scipy.special

from gpu_backprop.ops import NumpyOps
from gpu_backprop.ops.autotune import Tuner
from gpu_backprop.ops.cuda import CudaOps

from .emulator.builder import HERE, EmuLoader, planted_kernels


def run_probe(loader, n_blocks):
    kernel = loader.function("schedule_probe.cu", "record_blocks<unsigned int>", ["record_blocks<unsigned int>"])
    ticket, running, most = (np.zeros(1, np.uint32) for _ in range(3))
    started = np.zeros(n_blocks, np.uint32)
    kernel((n_blocks, 1, 1), (64, 1, 1), [ticket, started, running, most])
    return started, int(most[0])


def test_shuffled_blocks_run_out_of_order_and_at_once():
    started, most = run_probe(EmuLoader(HERE, blocks="shuffled", slots=3, seed=1), 48)
    assert sorted(started.tolist()) == list(range(48))  # every block once, own __shared__ storage
    assert started.tolist() != list(range(48))
    assert most > 1  # several blocks in flight together


def test_in_order_blocks_run_one_at_a_time():
    started, most = run_probe(EmuLoader(HERE, blocks="in_order"), 16)
    assert started.tolist() == list(range(16)) and most == 1


def test_default_schedule_is_shuffled(monkeypatch):
    monkeypatch.delenv("GPU_BACKPROP_EMU_BLOCKS", raising=False)
    assert EmuLoader().blocks == "shuffled" and EmuLoader().slots > 1


def test_same_seed_same_order():
    a, b = (EmuLoader(HERE, seed=7) for _ in range(2))
    assert np.array_equal(a.schedule(100), b.schedule(100))
    assert not np.array_equal(a.schedule(100), EmuLoader(HERE, seed=8).schedule(100))


@pytest.fixture(scope="module")
def last_block_by_index(tmp_path_factory):
    """delta.cu with a planted order assumption: the block of the highest index, rather than
    the last to take a ticket, sums the loss partials (right only if it finishes last)."""
    return planted_kernels(tmp_path_factory.mktemp("kernels"), "delta.cu",
                           "is_last = atomicAdd(ticket, 1u) == parts - 1;",
                           "atomicAdd(ticket, 1u); is_last = part == parts - 1;")


def output_losses(loader):
    ops = CudaOps(np, scipy.special, loader, tuner=Tuner(enabled=False))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(3):
        y_hat, y = rng.random((9001, 1)), rng.random((9001, 1))  # 32 blocks (the grid cap)
        loss = np.full(1, np.nan)
        ops.output_delta(y_hat, y, "sigmoid", "mse", np.empty_like(y), loss)
        expected = np.empty(1)
        NumpyOps().output_delta(y_hat, y, "sigmoid", "mse", np.empty_like(y), expected)
        losses.append((loss[0], expected[0]))
    return losses


def test_order_assumption_passes_in_order(last_block_by_index):
    """What the shim could not see before it shuffled: the planted kernel is right in index order."""
    for loss, expected in output_losses(EmuLoader(last_block_by_index, blocks="in_order")):
        assert loss == pytest.approx(expected, rel=1e-12)


def test_order_assumption_fails_shuffled(last_block_by_index):
    results = output_losses(EmuLoader(last_block_by_index, blocks="shuffled", seed=0))
    assert any(not loss == pytest.approx(expected, rel=1e-12) for loss, expected in results)


def memory_maps() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_fiber_stacks_are_shared_by_every_library():
    """Distinct kernel libraries (and the copies of each) take their fiber stacks from one pool:
    a pool per library keeps two maps (stack and guard page) per thread of the widest block each
    library ever ran, and a session of a few hundred libraries exhausts vm.max_map_count."""
    def launch(variant):
        loader = EmuLoader(HERE, extra_flags=[f"-DEMU_STACKS_VARIANT={variant}"], slots=3, seed=variant)
        kernel = loader.function("schedule_probe.cu", "count_threads<unsigned int>", ["count_threads<unsigned int>"])
        seen = np.zeros(1, np.uint32)
        kernel((6, 1, 1), (1024, 1, 1), [seen])
        assert seen[0] == 6 * 1024

    launch(0)  # the pool now holds 1024 to 3072 stacks (each copy running takes 1024)
    before = memory_maps()
    for variant in range(1, 4):  # three more libraries, three copies each: 9 x 1024 stacks taken
        launch(variant)
    grown = memory_maps() - before
    # shared: at most 2048 new stacks (4096 maps) and the libraries' own segments; a pool per
    # library copy: 9 x 1024 new stacks, 18432 maps
    assert grown < 5120, f"{grown} memory maps for three libraries (2 per fiber stack: a pool per library?)"
