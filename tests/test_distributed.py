"""Data-parallel training (gpu_backprop.distributed): in one process through the Local
communicator (the kernels' gradient mode and the update after the sum, on the CPU and the shim),
and under ``mpiexec -n 2`` and ``-n 3`` (an uneven split: a rank with no rows in the last batch):
every rank holds the same parameters bit for bit, they equal one process's up to the order of the
sums, the same run twice gives the same bits, and a rank that fails ends every rank."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_backprop import MLP
from gpu_backprop.distributed import DistributedError, Local, from_environment, shares
from gpu_backprop.ops import NumpyOps, Rule, apply_rule

HERE = Path(__file__).parent


def mpiexec():
    """mpiexec from the environment's MPI (the mpich wheel installs it beside python)."""
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install 'gpu_backprop[mpi]')")
    found = Path(sys.executable).with_name("mpiexec")
    found = str(found) if found.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec on PATH or beside python")
    return found


def run_ranks(n, *args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([mpiexec(), "-n", str(n), sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_process(optimizer):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((50, 13)), rng.integers(0, 4, 50)
    model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype="float64", seed=1)
    kwargs = {"momentum": 0.9, "nesterov": True, "alpha": 1e-3} if optimizer == "sgd" else {"weight_decay": 0.01}
    history = model.fit(X, y, epochs=3, batch_size=16, lr=0.05, optimizer=optimizer,
                        validation_data=(X[:11], y[:11]), **kwargs)
    return model.get_params(), history


def test_shares_cover_every_row_once():
    for m in (1, 2, 7, 16, 50):
        for size in (1, 2, 3, 5):
            parts = shares(m, size)
            assert parts[0][0] == 0 and parts[-1][1] == m
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_data_parallel_step_in_one_process_is_the_plain_step(optimizer):
    """Local communicator: gradients written by the kernels, then the update as a pass of its own ==
    the update fused into the GEMM (float64, up to the order of the sums)."""
    params, history = one_process(optimizer)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((50, 13)), rng.integers(0, 4, 50)
    model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype="float64", seed=1)
    kwargs = {"momentum": 0.9, "nesterov": True, "alpha": 1e-3} if optimizer == "sgd" else {"weight_decay": 0.01}
    local = model.fit(X, y, epochs=3, batch_size=16, lr=0.05, optimizer=optimizer, distributed=Local(),
                      validation_data=(X[:11], y[:11]), **kwargs)
    for key, value in params.items():
        np.testing.assert_allclose(model.get_params()[key], value, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(local.loss, history.loss, rtol=1e-12)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ranks_agree_bit_for_bit_and_with_one_process(tmp_path, ranks, optimizer):
    runs = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        out.mkdir()
        proc = run_ranks(ranks, HERE / "mpi" / "fit.py", out, optimizer)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append([dict(np.load(out / f"rank{r}.npz")) for r in range(ranks)])
    first = runs[0][0]
    for run in runs:
        for rank in run:  # every rank, both runs: the same bits
            for key, value in first.items():
                np.testing.assert_array_equal(rank[key], value, err_msg=f"{key}")
    params, history = one_process(optimizer)
    for key, value in params.items():  # one process with the same global batch: up to reassociation
        np.testing.assert_allclose(first[key], value, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(first["loss"], history.loss, rtol=1e-10)
    np.testing.assert_allclose(first["val_loss"], history.val_loss, rtol=1e-10)


SUMMED_RULES = {
    "sgd+l2": Rule("sgd", 0.05, 0.0, 0.3),
    "momentum": Rule("momentum", 0.05, 0.9),
    "nesterov+l2": Rule("nesterov", 0.05, 0.9, 0.3),
    "adamw+l2": Rule("adam", 0.01, 0.0, 0.3, 0.25, 0.8, 0.99, 1e-6, 0.002, np.array([3])),
}


@pytest.mark.parametrize("name", list(SUMMED_RULES))
@pytest.mark.parametrize("n_sources", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 7, 25])
def test_the_rule_of_a_sum_chunk_by_chunk_is_the_rule_of_the_summed_array(monkeypatch, name, n_sources, size):
    """SharedMemory's update (ops.apply_rule_summed: the sources summed in rank order a chunk at a
    time, the rule applied to the chunk) == the rule applied to the whole summed gradient, bit for
    bit, across chunk ends (7 elements a chunk here), weights and biases, and a view with strides
    (whole-array path); the sources are not written. Planted faults caught: a chunk's end one short
    (elements skipped), the first source left out of the sum."""
    from gpu_backprop.ops import reference

    monkeypatch.setattr(reference, "RULE_CHUNK", 7)
    rule, ops, rng = SUMMED_RULES[name], NumpyOps(), np.random.default_rng(size * 10 + n_sources)
    for weight in (True, False):
        for strided in (False, True):
            arrays = [rng.standard_normal(2 * size if strided else size) for _ in range(3 + n_sources)]
            arrays[2] = np.abs(arrays[2]) + 0.5  # Adam's v
            if strided:
                arrays = [a[::2] for a in arrays]
            p, m, v, sources = arrays[0], arrays[1], arrays[2], arrays[3:]
            kept = [a.copy() for a in sources]
            expected = [a.copy() for a in (p, m, v)]
            grad = sources[0].copy()
            for more in sources[1:]:
                grad += more
            apply_rule(np, rule, *expected[:1], grad, *expected[1:], weight=weight)
            ops.apply_rule_summed(rule, p, sources, m, v, weight)
            for got, want in zip((p, m, v), expected):
                np.testing.assert_array_equal(got, want)
            for got, want in zip(sources, kept):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_shared_memory_gives_the_all_reduce_bits(tmp_path, ranks, optimizer):
    """distributed.SharedMemory (one copy of the parameters and state in shared memory, each rank
    summing and updating its share of the elements) == the MPI all-reduce and N updates, bit for
    bit for 2 ranks (to float64 rounding for 3, whose sum order is the MPI library's): parameters, optimizer state and losses of two fits in a row (the second continuing the
    first's state in the same window), every rank, with the last rank slowed before its backward
    and its update (tests/mpi/shared.py); and a bf16 model, left to the all-reduce, the same.
    Planted faults each fail it: either fence of SharedMemory.update left out (a rank sums a
    gradient not yet written, or trains on a share not yet updated); the share's end one element
    short; the sum over this rank's gradient only; the optimizer state left out of the window
    (each rank's copy of the others' shares stale, so the second fit starts from rank 0's)."""
    proc = run_ranks(ranks, HERE / "mpi" / "shared.py", tmp_path, optimizer)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for case in ["", "-bf16"] if optimizer == "sgd" else [""]:
        reference = dict(np.load(tmp_path / f"mpi{case}-rank0.npz"))
        assert reference["loss"].size == 5 - 3 * bool(case) and set(reference) > {"W0", "b1", "vel_w0" if
                                                                                  optimizer == "sgd" else "sq_w1"}
        for r in range(ranks):
            for name in ("mpi", "shm"):
                run = dict(np.load(tmp_path / f"{name}{case}-rank{r}.npz"))
                assert set(run) == set(reference)
                for key, value in reference.items():
                    if ranks == 2 or case or name == "mpi":  # a + b == b + a: any MPI sums 2 ranks as shm does
                        np.testing.assert_array_equal(run[key], value, err_msg=f"{name}{case} rank {r}: {key}")
                    else:  # 3 ranks: shm sums in rank order, MPI in its algorithm's (MPICH's default: the same)
                        np.testing.assert_allclose(run[key], value, rtol=1e-12, atol=1e-15,
                                                   err_msg=f"{name}{case} rank {r}: {key}")


def test_a_divergence_the_ranks_see_at_different_times_stops_them_all(tmp_path):
    """SharedMemory: the one copy of the weights goes non-finite after an epoch's last step, and one
    rank looks later than the other: they agree before any restores, so every rank raises and
    keeps the last finite weights (without the agreement, the first rank's restore makes the other
    see finite weights and train on alone, waiting in a barrier for ever: the timeout fails it)."""
    proc = run_ranks(2, HERE / "mpi" / "cases.py", tmp_path, "diverge-shm", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    for result in results:
        assert str(result.pop("error")).startswith("training diverged in epoch 2")
        assert all(np.isfinite(v).all() for v in result.values())
    for key, value in results[0].items():
        np.testing.assert_array_equal(results[1][key], value)


def test_a_rank_that_fails_ends_every_rank():
    """Rank 1 raises in its second epoch; rank 0 is then waiting in a sum: the command line ends
    both (MPI_Abort), says which rank failed and why, within the timeout (never a hang)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", FAILING_CLI, "train", "--device", "cpu",
                           "--epochs", "4", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "gpu-backprop: error: rank 1 of 2: planted failure in epoch 2" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


FAILING_CLI = """
import sys
from gpu_backprop import cli, train
epoch, calls = train.Trainer.epoch, [0]
def failing(self):
    calls[0] += 1
    if calls[0] == 2 and self.comm.rank == 1:
        raise ValueError("planted failure in epoch 2")
    return epoch(self)
train.Trainer.epoch = failing
sys.exit(cli.main(sys.argv[1:]))
"""

SETUP_FAILS_ON_RANK_1 = """
import os, sys
from gpu_backprop import cli
dataset = cli._dataset
def failing(args):
    if os.environ.get("PMI_RANK") == "1":
        raise FileNotFoundError("--data: 'shard.npz' does not exist")
    return dataset(args)
cli._dataset = failing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_an_error_on_one_rank_before_training_stops_all_with_one_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([mpiexec(), "-n", "3", sys.executable, "-c", SETUP_FAILS_ON_RANK_1, "train", "--device",
                           "cpu", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr == "gpu-backprop: error: rank 1: --data: 'shard.npz' does not exist\n"
    bad = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "gpu_backprop.cli", "train", "--hidden", "0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and bad.stderr.count("gpu-backprop: error:") == 1  # rank 0 alone says it


def test_the_command_line_under_mpiexec_prints_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "gpu_backprop.cli", "train", "--device", "cpu",
                           "--epochs", "2", "--optimizer", "adam", "--lr", "0.01", "--json", "--save",
                           str(tmp_path / "m.npz"), "--checkpoint", str(tmp_path / "c.npz")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    import json

    result = json.loads(lines[0])
    # auto on the CPU, every rank on this machine: the shared-memory communicator
    assert result["ranks"] == 2 and result["distributed"] == "shm" and result["test_accuracy"] > 0.8
    assert (tmp_path / "m.npz").exists() and (tmp_path / "c.npz").exists()


def test_the_json_names_the_all_reduce_where_shared_memory_falls_back(tmp_path):
    """--distributed shm with precision bf16 (weights with copies the update refreshes): the sums go
    through MPI's all-reduce, and the JSON says so."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "gpu_backprop.cli", "train", "--device", "cpu",
                           "--epochs", "1", "--precision", "bf16", "--distributed", "shm", "--json"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["distributed"] == "mpi"


def test_without_mpi4py_the_error_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py fails
    with pytest.raises(DistributedError, match=r"pip install \"gpu_backprop\[mpi\]\""):
        from_environment("mpi")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    from gpu_backprop.cli import main

    assert main(["train", "--device", "cpu", "--epochs", "1"]) == 2
    assert capsys.readouterr().err == ('gpu-backprop: error: --distributed: distributed training needs mpi4py: '
                                       'pip install "gpu_backprop[mpi]" (mpi4py and MPICH from wheels)\n')


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_data_parallel_step_through_the_kernels(optimizer):
    """The CUDA launchers on the shim, Local communicator: the grouped backward launches write the
    gradients (rule "gradient"), then bias.cu's weight_update applies the rule to weights and
    biases (no L2 or decay on the biases) == the CPU's data-parallel step, float64."""
    import scipy.special

    from gpu_backprop.ops.autotune import Tuner
    from gpu_backprop.ops.cuda import CudaOps

    from .emulator.builder import EmuLoader

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((50, 13)), rng.integers(0, 4, 50)
    kwargs = {"momentum": 0.9, "nesterov": True, "alpha": 1e-2} if optimizer == "sgd" else {"weight_decay": 0.05,
                                                                                              "alpha": 1e-2}
    params = []
    for fused in (False, True):
        model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype="float64", seed=1)
        if fused:
            model.ops = CudaOps(np, scipy.special, EmuLoader(), tuner=Tuner(enabled=False))
        model.fit(X, y, epochs=3, batch_size=16, lr=0.05, optimizer=optimizer, distributed=Local(), **kwargs)
        params.append(model.get_params())
    for key, value in params[0].items():
        np.testing.assert_allclose(params[1][key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ranks", [2, 3])
def test_sharded_ranks_read_their_own_rows(tmp_path, ranks):
    """Each rank trains on its own shard (a memory-mapped .npy): the ranks agree bit for bit, and
    with shards laid out as one process's batches (no shuffling) they equal that process's fit;
    the validation metrics are the sums over every rank's own validation rows."""
    proc = run_ranks(ranks, HERE / "mpi" / "fit_shards.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(ranks)]
    for result in results[1:]:
        for key, value in results[0].items():
            np.testing.assert_array_equal(result[key], value)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((48, 13)), rng.integers(0, 4, 48)
    model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype="float64", seed=1)
    history = model.fit(X, y, epochs=3, batch_size=16, lr=0.05, optimizer="adam", shuffle=False)
    for key, value in model.get_params().items():
        np.testing.assert_allclose(results[0][key], value, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(results[0]["loss"], history.loss, rtol=1e-10)
    rows = [np.concatenate([np.arange(16 * s + lo, 16 * s + hi) for s in range(3)])[:4]
            for lo, hi in shares(16, ranks)]
    union = np.concatenate(rows)
    val = list(results[0]["val_loss"])
    assert len(val) == 3  # one per epoch, over all ranks' validation rows
    final = model.evaluate(X[union], y[union])["loss"]
    np.testing.assert_allclose(val[-1], final, rtol=1e-10)


def test_sharded_needs_a_row_per_rank():
    with pytest.raises(ValueError, match="batch_size: expected at least one row per rank"):
        class Two(Local):
            size = 2
        MLP([3, 2], device="cpu").fit(np.ones((4, 3)), np.array([0, 1, 0, 1]), batch_size=1, distributed=Two(),
                                      sharded=True)


def test_shards_of_different_sizes_keep_the_ranks_identical(tmp_path):
    """Shards of 20, 27 rows: the rate of invscaling (rows seen by every rank) and the steps per
    epoch (the smallest shard's) are the same on each rank, so are the parameters, bit for bit."""
    proc = run_ranks(2, HERE / "mpi" / "cases.py", tmp_path, "uneven-shards")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    assert "error" not in ranks[0]
    for key, value in ranks[0].items():
        np.testing.assert_array_equal(ranks[1][key], value)


def test_ranks_given_other_seeds_still_draw_one_order(tmp_path):
    """Seeds 0 and 1 on ranks 0 and 1 train exactly as seed 0 on both: rank 0's generator draws
    every epoch's order (two orders would still give equal ranks, but another fit)."""
    results = {}
    for case in ("other-seeds", "same-seeds"):
        (tmp_path / case).mkdir()
        proc = run_ranks(2, HERE / "mpi" / "cases.py", tmp_path / case, case)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[case] = [dict(np.load(tmp_path / case / f"rank{r}.npz")) for r in range(2)]
    for key, value in results["same-seeds"][0].items():
        for rank in results["other-seeds"]:
            np.testing.assert_array_equal(rank[key], value)


def test_a_checkpoint_one_rank_cannot_read_stops_every_rank(tmp_path):
    """Through the API (no CLI around it): rank 1 cannot read the checkpoint; both ranks stop with
    rank 1's error, within the timeout, instead of rank 0 waiting in the first sum."""
    proc = run_ranks(2, HERE / "mpi" / "cases.py", tmp_path, "resume-missing", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in range(2):
        error = str(np.load(tmp_path / f"rank{r}.npz")["error"])
        assert error.startswith("rank 1: ") and "missing.npz" in error


def test_the_data_parallel_step_replays_its_launches():
    """Every step of a data-parallel fit makes the same launcher calls with the same objects, so
    the CUDA launchers replay them (one recorded entry per call site, however many steps run): a
    rule built anew each step would record 2 L more entries a step, and their checks run again."""
    import scipy.special

    from gpu_backprop.ops.autotune import Tuner
    from gpu_backprop.ops.cuda import CudaOps

    from .emulator.builder import EmuLoader

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 13)), rng.integers(0, 4, 40)
    entries = []
    for epochs in (1, 3):
        model = MLP([13, 8, 4], activation="tanh", loss="cross_entropy", device="cpu", dtype="float64", seed=1)
        model.ops = CudaOps(np, scipy.special, EmuLoader(), tuner=Tuner(enabled=False))
        model.fit(X, y, epochs=epochs, batch_size=8, lr=0.01, optimizer="adam", distributed=Local())
        entries.append(len(model.ops._launches))
    assert entries[0] == entries[1]


def test_a_file_per_rank_from_the_command_line(tmp_path):
    """--data 'part-{rank}.npz' under mpiexec: each rank reads its own file (rank 0's has no 9s);
    the ranks agree on one standardisation and on the union of the classes, and the JSON's test
    accuracy is over every rank's test rows. The saved model knows all ten digits."""
    from gpu_backprop import data

    ds = data.digits(seed=0)
    X = np.concatenate([ds.X_train, ds.X_test]) * 16 + 3  # not standardised, as a user's files are
    y = np.concatenate([ds.y_train, ds.y_test])
    nines = y == 9
    np.savez(tmp_path / "part-0.npz", X=X[~nines][::2], y=y[~nines][::2])
    np.savez(tmp_path / "part-1.npz", X=np.concatenate([X[~nines][1::2], X[nines]]),
             y=np.concatenate([y[~nines][1::2], y[nines]]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "gpu_backprop.cli", "train", "--device", "cpu",
                           "--data", str(tmp_path / "part-{rank}.npz"), "--epochs", "15", "--optimizer", "adam",
                           "--lr", "0.01", "--loss", "cross_entropy", "--json", "--save", str(tmp_path / "m.npz")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout)
    assert result["ranks"] == 2 and result["sizes"][-1] == 10 and result["test_accuracy"] > 0.9
    model = MLP.load(tmp_path / "m.npz")
    assert model.classes_ == list(range(10))
    parts = [data.from_file(tmp_path / f"part-{r}.npz", seed=0) for r in range(2)]  # as each rank read it
    train_rows = np.concatenate([p.X_train * p.scale + p.mean for p in parts])
    np.testing.assert_allclose(model.extra["x_mean"], train_rows.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(model.extra["x_scale"], np.where(train_rows.std(axis=0) > 0, train_rows.std(axis=0), 1),
                               rtol=1e-6)
    scaled = (X - model.extra["x_mean"]) / model.extra["x_scale"]
    assert np.mean(model.predict(scaled) == y) > 0.9
    alone = subprocess.run([sys.executable, "-m", "gpu_backprop.cli", "train", "--device", "cpu", "--data",
                            str(tmp_path / "part-{rank}.npz")], capture_output=True, text=True, timeout=60, env=env)
    assert alone.returncode == 2 and "run it under mpiexec -n N" in alone.stderr
