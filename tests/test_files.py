"""Issue 11: files and input as an adversarial user gives them.

The rule: a user error gets one line on stderr naming the argument (file, column, environment
variable) and what was expected, exit status 2, no traceback, no warning; no file the user had
is replaced or damaged; a trained model is never thrown away. Items are numbered as in the issue.
"""
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import tracemalloc
import warnings

import numpy as np
import pytest

from gpu_backprop import MLP, cli, data, files, model as model_mod, modelfile
from gpu_backprop.files import FileError


@pytest.fixture(autouse=True)
def _cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("GPU_BACKPROP_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)  # a fallback save lands here, never in the checkout


def main(*args, capsys):
    """The CLI in this process: (exit status, stdout, stderr lines); any traceback fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert not caught, [str(w.message) for w in caught]  # no warning spilled
    return status, out, [line for line in err.splitlines() if line]


def fails(*args, capsys, match):
    status, out, err = main(*args, capsys=capsys)
    assert status == 2 and len(err) == 1 and match in err[0], (status, err)
    assert err[0].startswith("gpu-backprop: error: ")
    return err[0]


@pytest.fixture
def d(tmp_path):
    """The issue's d.npz: X 60x3 float, integer y in {0, 1, 2}."""
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, X=rng.random((60, 3)), y=rng.integers(0, 3, 60))
    return path


@pytest.fixture
def m(tmp_path, d, capsys):
    path = tmp_path / "m.npz"
    status, _, err = main("train", "--data", d, "--epochs", "2", "--save", path, "--json", capsys=capsys)
    assert status == 0, err
    return path


def snapshot(folder):
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in folder.iterdir()}


# -- 1. save never replaces what is not a regular file, nor the input -------------------------
def test_save_refuses_device_fifo_socket_directory(tmp_path, d, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    (tmp_path / "dir").mkdir()
    targets = [(fifo, "FIFO"), (sock_path, "socket"), (tmp_path / "dir", "directory")]
    if os.geteuid() == 0:  # a twin of /dev/null of our own: a regression must not replace the real one
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        targets.append((tmp_path / "null", "character device"))
    else:
        targets.append(("/dev/null", "character device"))  # not root: a regression cannot replace it
    model = MLP([3, 4, 3], device="cpu")
    for target, kind in targets:
        before = os.lstat(target).st_mode
        with pytest.raises(FileError, match=f"is a {kind}: expected a regular file"):
            model.save(target)
        fails("train", "--data", d, "--save", target, capsys=capsys, match=f"--save: '{target}' is a {kind}")
        assert os.lstat(target).st_mode == before  # still the device, FIFO, socket, directory
    sock.close()


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_save_refuses_the_input_data(tmp_path, capsys, suffix):
    path = tmp_path / f"v{suffix}"
    if suffix == ".npz":
        np.savez(path, X=np.random.default_rng(0).random((20, 2)), y=np.arange(20) % 2)
    else:
        path.write_text("a,b,t\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)))
    os.link(path, tmp_path / "hard")
    os.symlink(path, tmp_path / "soft")
    before = path.read_bytes()
    for target in (path, tmp_path / "hard", tmp_path / "soft"):
        args = ["train", "--data", path, "--save", target] + (["--label", "t"] if suffix == ".csv" else [])
        fails(*args, capsys=capsys, match="is the input file")
    assert path.read_bytes() == before and (tmp_path / "soft").is_symlink()


def test_save_writes_through_a_symlink_and_keeps_the_mode(tmp_path, monkeypatch):
    target, link = tmp_path / "real.npz", tmp_path / "link.npz"
    target.write_bytes(b"old")
    target.chmod(0o644)
    link.symlink_to(target)
    model = MLP([3, 4, 2], device="cpu", seed=1)
    written = model.save(link)
    assert link.is_symlink() and written == target.resolve()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    np.testing.assert_array_equal(MLP.load(link, device="cpu").get_params()["W0"], model.get_params()["W0"])
    target.chmod(0o640)
    model.save(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    old = os.umask(0o027)
    try:
        model.save(tmp_path / "new.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.npz").stat().st_mode) == 0o640  # the umask's mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npz", "new.npz", "real.npz"]


# -- 2. the save path is checked before training; a save that fails later falls back ----------
@pytest.mark.parametrize("where,match", [
    ("dir", "is a directory"),
    ("missing/m.npz", "folder"),
    ("", "expected a file name"),
    ("new/", "expected a file name, got the folder path"),
    ("d.npz/m.npz", "is not a folder"),
    ("m" * 250 + ".npz", "expected at most 242"),
])
def test_bad_save_path_is_refused_before_training(tmp_path, d, capsys, monkeypatch, where, match):
    (tmp_path / "dir").mkdir()
    monkeypatch.setattr(MLP, "fit", lambda *a, **k: pytest.fail("trained before checking --save"))
    target = f"{tmp_path}/{where}" if where else ""  # a string: Path would drop a trailing slash
    fails("train", "--data", d, "--save", target, capsys=capsys, match=match)


def test_read_only_folder_is_refused_before_training(tmp_path, d, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    # as root every folder is writable: stand in for a read-only one
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(folder) else real_access(p, mode))
    monkeypatch.setattr(MLP, "fit", lambda *a, **k: pytest.fail("trained before checking --save"))
    fails("train", "--data", d, "--save", folder / "m.npz", capsys=capsys, match="is not writable")


def test_failed_save_writes_a_fallback_and_says_where(tmp_path, d, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fit = MLP.fit

    def fit_then_lose_the_folder(self, *args, **kwargs):
        history = fit(self, *args, **kwargs)
        out.rmdir()  # the folder goes away while training
        return history

    monkeypatch.setattr(MLP, "fit", fit_then_lose_the_folder)
    line = fails("train", "--data", d, "--epochs", "2", "--save", out / "m.npz", "--json", capsys=capsys,
                 match="--save: cannot write")
    saved = list(cwd.iterdir())
    assert len(saved) == 1 and f"saved to '{saved[0]}' instead" in line
    assert MLP.load(saved[0], device="cpu").sizes == [3, 64, 3]


def test_fallback_that_also_fails_leaves_nothing(tmp_path, d, capsys, monkeypatch):
    out, cwd, tmp = (tmp_path / n for n in ("out", "cwd", "tmp"))
    for folder in (out, cwd, tmp):
        folder.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real = files.write_atomically

    def write_fails(path, *args, **kwargs):  # every write fails once training is done: disk full
        raise OSError(28, "No space left on device")

    fit = MLP.fit

    def fit_then_fill_the_disk(self, *args, **kwargs):
        history = fit(self, *args, **kwargs)
        monkeypatch.setattr(model_mod, "write_atomically", write_fails)
        return history

    monkeypatch.setattr(MLP, "fit", fit_then_fill_the_disk)
    line = fails("train", "--data", d, "--epochs", "1", "--save", out / "m.npz", "--json", capsys=capsys,
                 match="No space left on device; no fallback file could be written either")
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == [] and list(out.iterdir()) == [], line
    assert real is files.write_atomically


# -- 3. corrupt files are refused in one line -------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "garbage"])
def test_corrupt_model_and_data_files(tmp_path, d, m, capsys, damage):
    for source, args in ((m, ["predict", "--model", "{}", "--data", d]), (d, ["train", "--data", "{}"])):
        raw = source.read_bytes()
        bad = tmp_path / f"bad-{source.name}"
        if damage == "truncate":
            raw = raw[:300]
        elif damage == "empty":
            raw = b""
        elif damage == "flip":  # one bit inside the first array's data: the CRC catches it
            raw = bytearray(raw)
            raw[raw.index(b"NUMPY") + 140] ^= 0x10
            raw = bytes(raw)
        else:
            raw = b"PK\x03\x04" + os.urandom(200)
        bad.write_bytes(raw)
        argv = [str(bad) if a == "{}" else a for a in args]
        fails(*argv, capsys=capsys, match="cannot read")
        assert bad.read_bytes() == raw


# -- 4. a tampered model header is refused before anything is allocated -----------------------
def tamper(path, out, config=None, **arrays):
    with np.load(path) as f:
        contents = {k: f[k] for k in f.files}
    header = json.loads(str(contents.pop("config")))
    if config is not None:
        header = config(header)
    contents.update(arrays)
    text = header if isinstance(header, str) else json.dumps(header)
    np.savez(out, config=np.array(text), **contents)
    return out


@pytest.mark.parametrize("config,arrays,match", [
    (lambda h: {k: v for k, v in h.items() if k != "sizes"}, {}, "config: missing 'sizes'"),
    (lambda h: [1, 2], {}, "config: expected a JSON object, got list"),
    (lambda h: 3, {}, "config: expected a JSON object, got int"),
    (lambda h: "{not json", {}, "config: not valid JSON"),
    (lambda h: {**h, "dtype": "garbage"}, {}, "config 'dtype': expected one of float32, float64"),
    (lambda h: {**h, "sizes": [3, 1000000, 1000000, 3]}, {}, "array 'W0': expected shape (3, 1000000)"),
    (lambda h: {**h, "sizes": [3, 64, True]}, {}, "config 'sizes'"),
    (lambda h: {**h, "activation": ["sigmoid"]}, {}, "config 'activation'"),
    (lambda h: {**h, "seed": -1}, {}, "config 'seed'"),
    (lambda h: {**h, "classes": [0, 1]}, {}, "config 'classes': 2 classes for 3 output unit(s)"),
    (None, {"W0": np.full((3, 64), "a")}, "array 'W0': expected floats"),
    (None, {"W1": np.zeros((64, 2))}, "array 'W1': expected shape (64, 3)"),
    (None, {"extra_x_mean": np.zeros(5)}, "extra 'x_mean': expected 3 floats"),
    (None, {"extra_x_scale": np.zeros(3)}, "positive scale"),
    (None, {"W0": np.full((3, 64), np.nan)}, "array 'W0' contains NaN"),
    (None, {"extra_meta": np.array([None], dtype=object)}, "Python objects"),
])
def test_tampered_model_is_refused(tmp_path, m, capsys, config, arrays, match):
    bad = tamper(m, tmp_path / "t.npz", config, **arrays)
    with pytest.raises(modelfile.ModelFileError, match=re.escape(match)):
        MLP.load(bad, device="cpu")
    fails("predict", "--model", bad, "--data", tmp_path / "d.npz", capsys=capsys, match=match)


def test_huge_sizes_in_a_small_file_allocate_nothing(tmp_path, m):
    """sizes [3, 3000, 3000, 3] in a few-KB file: refused from the headers, no parameter allocated
    (building the model first would take ~100 MB: the float64 draw and the float32 weights)."""
    bad = tamper(m, tmp_path / "t.npz", lambda h: {**h, "sizes": [3, 3000, 3000, 3]})
    tracemalloc.start()
    try:
        with pytest.raises(modelfile.ModelFileError):
            MLP.load(bad, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def test_npz_header_declaring_more_than_the_file_holds(tmp_path):
    """A .npy header in the zip claiming 10**12 rows is refused without allocating them."""
    import zipfile

    bad = tmp_path / "huge.npz"
    with zipfile.ZipFile(bad, "w") as zf, zf.open("X.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (10**12, 3)})
        fh.write(b"\0" * 48)
    with pytest.raises(FileError, match=r"declares shape \(1000000000000, 3\)"):
        data.read_file(bad)


# -- 5. labels are classes, never the size of a layer -----------------------------------------
@pytest.mark.parametrize("labels", [[0, 10**12, 2 * 10**12], [3, 19_000_000, 7], ["cat", "dog", "emu"]])
def test_labels_are_mapped_to_classes(tmp_path, capsys, labels):
    rng = np.random.default_rng(0)
    y = np.array(labels * 20)
    np.savez(tmp_path / "d.npz", X=rng.random((60, 3)), y=y)
    status, out, err = main("train", "--data", tmp_path / "d.npz", "--epochs", "2", "--json",
                            "--save", tmp_path / "m.npz", capsys=capsys)
    assert status == 0, err
    assert json.loads(out)["sizes"] == [3, 64, 3]  # three classes: three output units
    assert MLP.load(tmp_path / "m.npz", device="cpu").classes_ == sorted(labels)
    status, out, err = main("predict", "--model", tmp_path / "m.npz", "--data", tmp_path / "d.npz", "--json",
                            capsys=capsys)
    assert status == 0, err
    result = json.loads(out)
    assert set(result["predictions"]) <= set(labels) and 0 <= result["accuracy"] <= 1


def test_csv_labels_near_1e12(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("a,b,t\n" + "".join(f"{i},{i % 7},{(i % 2) * 10**12 + 5}\n" for i in range(40)))
    status, out, err = main("train", "--data", path, "--label", "t", "--epochs", "1", "--json", capsys=capsys)
    assert status == 0 and json.loads(out)["sizes"] == [2, 64, 2], err


# -- 6. sizes that exhaust memory are refused with the figure and the limit -------------------
def test_sizes_beyond_memory_are_refused(capsys, monkeypatch):
    line = fails("train", "--hidden", "100000000000", capsys=capsys, match="--hidden: a 64-100000000000-10 float32")
    assert "GiB available on cpu" in line
    with pytest.raises(MemoryError, match=r"sizes: a 64-100000000000-10 float32 network needs .* GiB"):
        MLP([64, 10**11, 10], device="cpu")
    monkeypatch.setattr(model_mod, "available_bytes", lambda device: 100 * 2**20)
    with pytest.raises(MemoryError, match=r"needs 153 MiB for its parameters, more than the 100 MiB"):
        MLP([1000, 10000, 10], dtype="float64", device="cpu")  # 80 MB of weights + their float64 draw
    small = MLP([1000, 10, 10], device="cpu")
    monkeypatch.setattr(model_mod, "available_bytes", lambda device: 50 * 2**20)
    with pytest.raises(MemoryError, match=r"for training on 20000 rows"):
        small.fit(np.zeros((20000, 1000)), np.zeros(20000, dtype=int), epochs=1)


# -- 7. fit keeps the last finite weights; save refuses what load refuses ---------------------
def test_divergence_restores_the_last_finite_weights(monkeypatch):
    from gpu_backprop import train

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 4)), rng.integers(0, 3, 40)
    model = MLP([4, 5, 3], device="cpu", seed=0)
    after = []
    epoch = train.Trainer.epoch

    def third_epoch_diverges(self):
        loss, accuracy = epoch(self)
        if len(after) == 2:
            self.model.weights[1][0, 0] = np.nan  # what an overflowing step leaves behind
            return float("nan"), accuracy
        after.append(self.model.get_params())
        return loss, accuracy

    monkeypatch.setattr(train.Trainer, "epoch", third_epoch_diverges)
    with pytest.raises(FloatingPointError, match="diverged in epoch 3.*the weights after epoch 2 are kept"):
        model.fit(X, y, epochs=5, lr=0.5, momentum=0.5)
    for key, value in after[1].items():
        np.testing.assert_array_equal(model.get_params()[key], value)
    assert model._state is None  # the diverged momentum is not carried on


def test_divergence_in_the_first_epoch_keeps_the_initial_weights():
    model = MLP([4, 3, 3], activation="identity", output="identity", device="cpu")
    initial = model.get_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        with pytest.raises(FloatingPointError, match="the initial weights are kept"):
            model.fit(np.full((6, 4), 1e30), np.array([0, 1, 2, 0, 1, 2]), epochs=3, lr=10.0)
    for key, value in initial.items():
        np.testing.assert_array_equal(model.get_params()[key], value)


def test_save_refuses_what_load_refuses(tmp_path):
    model = MLP([3, 4, 2], device="cpu")
    with pytest.raises(ValueError, match="extra 'meta': expected a numeric or string array, got dtype object"):
        model.save(tmp_path / "m.npz", meta=None)
    model.weights[0][0, 0] = np.nan
    with pytest.raises(ValueError, match="array 'W0' contains NaN or Inf"):
        model.save(tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []


def test_cli_keeps_the_epochs_before_a_divergence(tmp_path, d, capsys, monkeypatch):
    from gpu_backprop import train

    epoch, calls = train.Trainer.epoch, []

    def second_epoch_diverges(self):
        calls.append(1)
        loss, accuracy = epoch(self)
        return (float("inf"), accuracy) if len(calls) == 2 else (loss, accuracy)

    monkeypatch.setattr(train.Trainer, "epoch", second_epoch_diverges)
    line = fails("train", "--data", d, "--save", tmp_path / "m.npz", "--json", capsys=capsys,
                 match="diverged in epoch 2")
    assert "saved the model after epoch 1 to" in line
    assert MLP.load(tmp_path / "m.npz", device="cpu").sizes == [3, 64, 3]


# -- 8. nonsense is refused, not silently accepted --------------------------------------------
@pytest.mark.parametrize("args,match", [
    (["train", "--save", ""], "--save: expected a file name"),
    (["train", "--hidden", ""], "argument --hidden: expected comma-separated positive widths"),
    (["train", "--hidden", "3,,4"], "argument --hidden: expected comma-separated positive widths"),
    (["train", "--data", "{d}", "--label", "y"], "label: 'y' applies to .csv files"),
    (["train", "--data", "{one}"], "y: every label is 0: expected at least two classes"),
    (["train", "--label", "y"], "--label: applies to .csv files"),
])
def test_nonsense_is_refused(tmp_path, d, capsys, args, match):
    np.savez(tmp_path / "one.npz", X=np.random.default_rng(0).random((30, 2)), y=np.zeros(30, dtype=int))
    argv = [a.format(d=d, one=tmp_path / "one.npz") for a in args]
    before = snapshot(tmp_path)
    fails(*argv, capsys=capsys, match=match)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("dtype", ["garbage", None, "float16", "U3", object])
def test_model_dtype_garbage(dtype):
    with pytest.raises(TypeError, match="dtype: expected float32 or float64"):
        MLP([4, 3, 2], device="cpu", dtype=dtype)


# -- 9. checks come first and name the right thing --------------------------------------------
def test_validation_labels_are_checked_before_training(monkeypatch):
    from gpu_backprop import train

    monkeypatch.setattr(train.Trainer, "epoch", lambda self: pytest.fail("an epoch ran before the check"))
    rng = np.random.default_rng(0)
    model = MLP([4, 3, 3], device="cpu")
    with pytest.raises(ValueError, match=r"validation_data\[1\]: expected 5 rows"):
        model.fit(rng.random((10, 4)), np.arange(10) % 3, validation_data=(rng.random((5, 4)), np.arange(4) % 3))


@pytest.mark.parametrize("content,args,match", [
    ("a,t\n1,0\n", ["--label", "t"], "has 1 row: expected at least 2"),
    ("a,b,t\n1,2,0\n3,1\n", ["--label", "t"], "line 3: every row must have 3 values (the header's columns), got 2"),
    ("a,b,t\n1,2,0\n3,x,1\n", ["--label", "t"], "line 3, column 'b': non-numeric value 'x'"),
    ("a,b,t\n1,2,0\n3,\xff,1\n".encode("latin-1"), ["--label", "t"], "is not UTF-8 text"),
    ("a,a,t\n1,2,0\n3,4,1\n", ["--label", "a"], "label: 'a' names 2 columns"),
    ("a,b,t\n1,2,0\n3,1e999,1\n", ["--label", "t"], "X: contains NaN or Inf (column 'b', row 1)"),
    ("t\n0\n1\n0\n1\n", ["--label", "t"], "X: no features: expected at least one column"),
])
def test_bad_csv_names_the_line_and_column(tmp_path, capsys, content, args, match):
    path = tmp_path / "d.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    fails("train", "--data", path, *args, capsys=capsys, match=match)


def test_y_shorter_than_X_and_seed(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", X=np.zeros((60, 3)), y=np.arange(50) % 2)
    fails("train", "--data", tmp_path / "s.npz", capsys=capsys, match="y: 50 rows but X has 60")
    fails("train", "--seed", "-1", capsys=capsys, match="argument --seed: expected an integer in [0, 2**32)")
    fails("train", "--seed", str(2**32), capsys=capsys, match="argument --seed")
    with pytest.raises(ValueError, match="seed: expected a non-negative integer"):
        MLP([3, 2], device="cpu", seed=-1)


def test_device_arguments_name_their_source(capsys, monkeypatch):
    with pytest.raises(TypeError, match="device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or a Device, got 5"):
        MLP([3, 2], device=5)
    monkeypatch.setenv("GPU_BACKPROP_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"GPU_BACKPROP_DEVICE \(environment variable\) = 'tpu'"):
        MLP([3, 2])
    fails("train", capsys=capsys, match="GPU_BACKPROP_DEVICE (environment variable) = 'tpu'")
    fails("train", "--device", "tpu", capsys=capsys, match="device: expected")  # the argument, when given


# -- 10. output is what it says: strict JSON, inputs the dtype holds, no warnings --------------
def test_inputs_that_overflow_the_model_dtype_are_refused(tmp_path, m, capsys):
    np.savez(tmp_path / "o.npz", X=np.array([[0.5, 1e300, 0.5]] * 4))
    fails("predict", "--model", m, "--data", tmp_path / "o.npz", "--json", capsys=capsys,
          match="column 1 holds values up to 3")
    (tmp_path / "o.csv").write_text("a,b,c\n0.5,0.5,1e300\n")
    fails("predict", "--model", m, "--data", tmp_path / "o.csv", "--json", capsys=capsys,
          match="column 'c' holds values up to")
    with pytest.raises(ValueError, match=r"X: column 1 holds values up to 1e\+300, beyond the range of float32"):
        MLP([3, 2], device="cpu").fit(np.array([[0.5, 1e300, 0.5]] * 4), np.array([0, 1, 0, 1]))
    raw = MLP.load(m, device="cpu")  # the API, without the CLI's standardisation
    with pytest.raises(ValueError, match=r"X: column 1 holds values up to 1e\+300, beyond the range of float32"):
        raw.predict(np.array([[0.5, 1e300, 0.5]]))


def test_json_output_is_strict(tmp_path, d, m, capsys):
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))

    status, out, _ = main("predict", "--model", m, "--data", d, "--json", capsys=capsys)
    assert status == 0 and strict(out)["n"] == 60
    status, out, _ = main("train", "--data", "regression", "--epochs", "2", "--json", capsys=capsys)
    assert status == 0 and strict(out)["test_accuracy"] is None
    # inputs float32 holds, but outputs it does not: refused, never "Infinity" in the JSON
    big = MLP([3, 2, 1], activation="identity", output="identity", device="cpu")
    big.task = "regression"
    big.set_params({"W0": np.full((3, 2), 1e30), "b0": np.zeros(2), "W1": np.full((2, 1), 1e30), "b1": np.zeros(1)})
    big.save(tmp_path / "big.npz")
    fails("predict", "--model", tmp_path / "big.npz", "--data", d, "--json", capsys=capsys,
          match="the outputs overflow float32")
    # outputs float32 holds (3e19), a loss it does not ((3e19)^2 / 2): refused, and no RuntimeWarning
    big = MLP([3, 1], activation="identity", output="identity", device="cpu")
    big.task = "regression"
    big.set_params({"W0": np.full((3, 1), 1e19), "b0": np.zeros(1)})
    big.save(tmp_path / "big.npz")
    np.savez(tmp_path / "ones.npz", X=np.ones((4, 3)), y=np.zeros((4, 1)))
    fails("predict", "--model", tmp_path / "big.npz", "--data", tmp_path / "ones.npz", "--json", capsys=capsys,
          match="the loss against its targets overflows float32 (outputs up to 3e+19)")


def test_no_runtime_warnings_on_stderr(tmp_path, d, capsys):
    """--lr 1e308 overflows: one line about the divergence, no RuntimeWarning (a subprocess: the real stderr)."""
    proc = subprocess.run([sys.executable, "-m", "gpu_backprop.cli", "train", "--data", str(d), "--lr", "1e308",
                           "--json"], capture_output=True, text=True, env={**os.environ, "GPU_BACKPROP_DEVICE": "cpu"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "diverged" in proc.stderr, proc.stderr
    assert "Warning" not in proc.stderr


# -- 11. every bundled dataset trains with the CLI's defaults ---------------------------------
def test_builtin_datasets_train_with_their_defaults(capsys):
    status, out, err = main("train", "--data", "regression", "--json", capsys=capsys)
    assert status == 0, err
    result = json.loads(out)
    reg = data.regression()
    assert 2 * result["test_loss"] < 0.5 * np.var(reg.y_test)  # loss = 1/2 mean squared error
    status, out, err = main("train", "--data", "xor", "--json", capsys=capsys)
    assert status == 0 and json.loads(out)["test_accuracy"] == 1.0, err
    # digits with its defaults: tests/test_cli.py::test_train_json_on_digits (>= 95%)


# -- the one function that decides whether a path may be written --------------------------------
def test_plot_path_goes_through_the_same_gate(tmp_path, d, capsys, monkeypatch):
    monkeypatch.setattr(MLP, "fit", lambda *a, **k: pytest.fail("trained before checking --plot"))
    (tmp_path / "dir").mkdir()
    fails("train", "--data", d, "--plot", tmp_path / "dir", capsys=capsys, match="--plot: ")
    fails("train", "--data", d, "--plot", d, capsys=capsys, match="--plot: ")
    fails("train", "--data", d, "--plot", tmp_path / "c.png", "--save", tmp_path / "c.png", capsys=capsys,
          match="--plot: ")
    calls = []
    real = files.check_writable
    monkeypatch.setattr(files, "check_writable", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    MLP([3, 2], device="cpu").save(tmp_path / "m.npz")
    assert calls == ["path"]  # MLP.save asks the same function


# -- what already worked, kept: loading never unpickles; kill -9 never leaves a corrupt model --
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def _with_config(path, out, config):
    with np.load(path) as f:
        contents = {k: f[k] for k in f.files}
    contents["config"] = config
    np.savez(out, **contents)
    return out


def test_loading_never_unpickles(tmp_path, m, capsys):
    marker = tmp_path / "unpickled"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(str(marker))
    for name in ("W0", "config", "extra_meta"):
        bad = tamper(m, tmp_path / f"p-{name}.npz", None, **{name: payload}) if name != "config" else \
            _with_config(m, tmp_path / "p-config.npz", payload)
        fails("predict", "--model", bad, "--data", tmp_path / "d.npz", capsys=capsys, match="Python objects")
    np.savez(tmp_path / "pd.npz", X=payload, y=payload)
    fails("train", "--data", tmp_path / "pd.npz", capsys=capsys, match="Python objects")
    assert not marker.exists()


def test_kill_during_save_never_leaves_a_corrupt_model(tmp_path):
    import signal
    import time

    path = tmp_path / "m.npz"
    MLP([64, 256, 10], device="cpu", seed=0).save(path)
    script = ("import sys; from gpu_backprop import MLP\n"
              "models = [MLP([64, 256, 10], device='cpu', seed=s) for s in (1, 2)]\n"
              "print('ready', flush=True)\n"
              "while True:\n    for m in models: m.save(sys.argv[1])\n")
    rng = np.random.default_rng(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                                env={**os.environ, "GPU_BACKPROP_DEVICE": "cpu"})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert MLP.load(path, device="cpu").sizes == [64, 256, 10]  # the old model or the new, whole
