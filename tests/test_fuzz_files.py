"""Property-based fuzzing of the files a user hands the CLI (issue 11).

Valid CSV and .npz data files and a valid model file are mutated (truncation, bit flips,
overwritten and inserted bytes, arrays of the wrong dtype or shape, .npy headers declaring
huge shapes, tampered JSON headers, pickled arrays, broken CSV fields) and given to
``gpu-backprop train`` / ``predict``. The rule holds for every one: success (and strict JSON
on stdout), or exit 2 with one line on stderr that names the file or the argument; never a
traceback, never a warning, never a changed or new file beside the inputs.

A few dozen examples per test by default (CI stays fast); set GPU_BACKPROP_FUZZ_EXAMPLES to
run more, with --fuzz for fresh ones: GPU_BACKPROP_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_files.py --fuzz.
"""
import functools
import io
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpu_backprop import MLP, cli  # noqa: E402

EXAMPLES = int(os.environ.get("GPU_BACKPROP_FUZZ_EXAMPLES", "25"))
# Fixed or fresh examples as the project's Hypothesis profile says (conftest.py: fixed by default,
# fresh under --fuzz); only the count is ours.
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=1)
def valid_files() -> dict:
    """Valid inputs: data.npz, data.csv (label column 't') and model.npz trained on data.npz."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-base-"))
    rng = np.random.default_rng(0)
    X, y = rng.random((24, 3)), np.arange(24) % 3
    np.savez(folder / "data.npz", X=X, y=y)
    (folder / "data.csv").write_text("a,b,c,t\n" + "".join(f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{t}\n"
                                                          for r, t in zip(X, y)))
    model = MLP([3, 4, 3], device="cpu", seed=0)
    model.fit(X, y, epochs=1)
    model.classes_ = [0, 1, 2]
    model.save(folder / "model.npz", x_mean=X.mean(axis=0), x_scale=X.std(axis=0))
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    shutil.rmtree(folder)
    return files


def run_cli(folder: Path, args: list[str], names: tuple[str, ...]) -> None:
    """Run the CLI in this process on the files in ``folder``; assert the rule."""
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out, err = io.StringIO(), io.StringIO()
    import contextlib

    cwd = os.getcwd()
    os.chdir(folder)  # a fallback save would land here, and count as a file that appeared
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            status = cli.main(args + ["--device", "cpu", "--json"])  # an uncaught exception fails the test
    finally:
        os.chdir(cwd)
    assert not caught, [str(w.message) for w in caught]
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    saved = {n for n in after if n.startswith("out")}
    assert {n: b for n, b in after.items() if n not in saved} == before, "an input file changed or appeared"
    lines = [line for line in err.getvalue().splitlines() if line]
    if status == 0:
        json.loads(out.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
        assert not lines, lines
        return
    assert status == 2, (status, lines)
    assert len(lines) == 1 and lines[0].startswith("gpu-backprop: error: ") and len(lines[0]) < 1000, lines
    assert out.getvalue() == ""
    message = lines[0]
    assert any(name in message for name in names) or any(
        tag in message for tag in ("X:", "y:", "label:", "data:", "model", "training diverged")), message


# -- mutations ------------------------------------------------------------------------------
def byte_mutation():
    return st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
        st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    )


def apply_bytes(raw: bytes, mutations) -> bytes:
    raw = bytearray(raw)
    for m in mutations:
        at = min(int(m[1] * len(raw)), max(len(raw) - 1, 0))
        if m[0] == "truncate":
            del raw[at:]
        elif m[0] == "flip" and raw:
            raw[at] ^= 1 << m[2]
        elif m[0] == "overwrite":
            raw[at:at + len(m[2])] = m[2]
        elif m[0] == "insert":
            raw[at:at] = m[2]
        elif m[0] == "delete":
            del raw[at:at + m[2]]
    return bytes(raw)


def weird_array():
    """Arrays of every kind a tampered file could hold."""
    shapes = st.sampled_from([(), (0,), (24,), (24, 3), (3, 24), (24, 1), (1, 3), (24, 3, 1), (0, 3), (2, 2)])
    kinds = st.sampled_from(["float64", "float32", "float16", "int8", "uint64", "int64", "bool", "complex128",
                             "U3", "S2", "object", "huge", "nan", "big", "datetime64[s]", "fortran"])
    return st.tuples(kinds, shapes)


def make_array(kind: str, shape) -> np.ndarray:
    rng = np.random.default_rng(len(shape))
    if kind == "object":
        return np.array([None, {"a": 1}], dtype=object)  # np.savez pickles this: must be refused
    if kind == "U3":
        return np.full(shape, "abc")
    if kind == "S2":
        return np.full(shape, b"xy")
    if kind == "nan":
        return np.full(shape, np.nan)
    if kind == "big":
        return np.full(shape, 1e300)
    if kind == "huge":
        return np.full(shape, 10**12, dtype=np.int64)
    if kind == "fortran":
        return np.asfortranarray(rng.random(shape))
    if kind == "datetime64[s]":
        return np.zeros(shape, dtype="datetime64[s]")
    return (rng.random(shape) * 3).astype(kind)


def huge_member(name: str, shape) -> tuple[str, bytes]:
    """A .npy whose header declares ``shape`` but holds a few bytes."""
    fh = io.BytesIO()
    np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return name + ".npy", fh.getvalue() + b"\0" * 64


def rewrite_npz(raw: bytes, replace: dict, extra_members: list) -> bytes:
    """The .npz ``raw`` with arrays replaced (name -> array or None to drop) and raw members added."""
    with np.load(io.BytesIO(raw)) as f:
        arrays = {k: f[k] for k in f.files}
    for name, value in replace.items():
        if value is None:
            arrays.pop(name, None)
        else:
            arrays[name] = value
    out = io.BytesIO()
    np.savez(out, **arrays)
    if extra_members:
        with zipfile.ZipFile(out, "a") as zf:
            for member, payload in extra_members:
                zf.writestr(member, payload)
    return out.getvalue()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)
header_keys = st.sampled_from(["format", "sizes", "activation", "output", "loss", "dtype", "seed", "task",
                               "precision", "classes"])


@st.composite
def npz_mutation(draw, names):
    replace = {}
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(names))
        replace[name] = None if draw(st.booleans()) and draw(st.booleans()) else make_array(*draw(weird_array()))
    members = []
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(names))
        replace[name] = None
        members.append(huge_member(name, draw(st.sampled_from([(10**12, 3), (2**62,), (3, 10**9), (-1, 3)]))))
    return replace, members


@st.composite
def header_mutation(draw):
    edits = draw(st.lists(st.tuples(header_keys, st.one_of(st.just("<delete>"), json_values)), max_size=3))
    whole = draw(st.sampled_from([None, None, None, "[]", "3", "{", "\"x\"", "{" * 100000, "[" * 3000 + "]" * 3000]))
    return edits, whole


def edit_header(raw: bytes, edits, whole) -> bytes:
    with np.load(io.BytesIO(raw)) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays["config"]))
    for key, value in edits:
        if value == "<delete>":
            header.pop(key, None)
        else:
            header[key] = value
    arrays["config"] = np.array(whole if whole is not None else json.dumps(header))
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


@st.composite
def csv_mutation(draw):
    cell = st.one_of(st.sampled_from(["", "x", "nan", "inf", "-inf", "1e999", "1e300", "1e-320", " 7 ", "1_0",
                                      "0x10", "\x00", "\"", "a,b", "10" * 200, "9" * 5000]),
                     st.text(max_size=6), st.floats().map(repr), st.integers(-10**15, 10**15).map(str))
    return draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 5), cell), max_size=4)), \
        draw(st.lists(st.sampled_from(["drop_field", "add_field", "blank_line", "dup_header", "bom", "crlf",
                                       "only_header", "one_row"]), max_size=2))


def edit_csv(raw: bytes, cells, structural) -> bytes:
    lines = raw.decode().splitlines()
    for row, col, value in cells:
        i = row % len(lines)
        fields = lines[i].split(",")
        fields[col % len(fields)] = value
        lines[i] = ",".join(fields)
    for op in structural:
        if op == "drop_field":
            lines[-1] = lines[-1].rsplit(",", 1)[0]
        elif op == "add_field":
            lines[-1] += ",1"
        elif op == "blank_line":
            lines.insert(2, "")
        elif op == "dup_header":
            lines[0] = lines[0].replace("a", "t")
        elif op == "only_header":
            lines = lines[:1]
        elif op == "one_row":
            lines = lines[:2]
    text = "\n".join(lines) + "\n"
    if "crlf" in structural:
        text = text.replace("\n", "\r\n")
    return (b"\xef\xbb\xbf" if "bom" in structural else b"") + text.encode("utf-8", "surrogatepass")


def in_folder(files: dict, args: list[str], names: tuple[str, ...]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        for name, raw in files.items():
            (folder / name).write_bytes(raw)
        run_cli(folder, [a.format(dir=folder) for a in args], names)
    finally:
        shutil.rmtree(folder)


# -- the properties -------------------------------------------------------------------------------
TRAIN = ["train", "--epochs", "1", "--hidden", "4"]


@FUZZ
@given(mutations=st.lists(byte_mutation(), min_size=1, max_size=3), save=st.booleans())
def test_fuzz_npz_data_bytes(mutations, save):
    base = valid_files()
    raw = apply_bytes(base["data.npz"], mutations)
    args = TRAIN + ["--data", "{dir}/d.npz"] + (["--save", "{dir}/out.npz"] if save else [])
    in_folder({"d.npz": raw}, args, ("d.npz",))


@FUZZ
@given(mutation=npz_mutation(["X", "y"]), command=st.sampled_from(["train", "predict"]))
def test_fuzz_npz_data_arrays(mutation, command):
    base = valid_files()
    raw = rewrite_npz(base["data.npz"], *mutation)
    if command == "train":
        args = TRAIN + ["--data", "{dir}/d.npz", "--save", "{dir}/out.npz"]
    else:
        args = ["predict", "--model", "{dir}/model.npz", "--data", "{dir}/d.npz"]
    in_folder({"d.npz": raw, "model.npz": base["model.npz"]}, args, ("d.npz",))


@FUZZ
@given(mutation=csv_mutation(), mutations=st.lists(byte_mutation(), max_size=2),
       command=st.sampled_from(["train", "predict"]))
def test_fuzz_csv_data(mutation, mutations, command):
    base = valid_files()
    raw = apply_bytes(edit_csv(base["data.csv"], *mutation), mutations)
    if command == "train":
        args = TRAIN + ["--data", "{dir}/d.csv", "--label", "t", "--save", "{dir}/out.npz"]
    else:
        args = ["predict", "--model", "{dir}/model.npz", "--data", "{dir}/d.csv", "--label", "t"]
    in_folder({"d.csv": raw, "model.npz": base["model.npz"]}, args, ("d.csv",))


@FUZZ
@given(mutations=st.lists(byte_mutation(), min_size=1, max_size=3))
def test_fuzz_model_bytes(mutations):
    base = valid_files()
    raw = apply_bytes(base["model.npz"], mutations)
    args = ["predict", "--model", "{dir}/m.npz", "--data", "{dir}/data.npz"]
    in_folder({"m.npz": raw, "data.npz": base["data.npz"]}, args, ("m.npz",))


@FUZZ
@given(header=header_mutation(), mutation=npz_mutation(["W0", "b0", "W1", "b1", "extra_x_mean", "extra_x_scale"]))
def test_fuzz_model_header_and_arrays(header, mutation):
    base = valid_files()
    raw = rewrite_npz(edit_header(base["model.npz"], *header), *mutation)
    args = ["predict", "--model", "{dir}/m.npz", "--data", "{dir}/data.npz"]
    in_folder({"m.npz": raw, "data.npz": base["data.npz"]}, args, ("m.npz",))


# -- output paths: whatever --save names, nothing the user had is replaced or damaged ----------
def make_tree(folder: Path) -> dict:
    """Every kind of thing a --save path can land on; returns name -> what it is."""
    base = valid_files()
    (folder / "in.npz").write_bytes(base["data.npz"])
    (folder / "old.npz").write_bytes(b"an older model")
    (folder / "dir").mkdir()
    (folder / "dir" / "inner.npz").write_bytes(b"inner")
    os.mkfifo(folder / "fifo")
    os.symlink(folder / "in.npz", folder / "link-in")
    os.symlink(folder / "old.npz", folder / "link-old")
    os.symlink(folder / "dir", folder / "link-dir")
    os.symlink(folder / "missing" / "x.npz", folder / "dangling-deep")
    os.symlink(folder / "new-target.npz", folder / "dangling")
    os.link(folder / "in.npz", folder / "hard-in")
    return kinds(folder)


def kinds(folder: Path) -> dict:
    import stat as st_

    out = {}
    for p in sorted(folder.rglob("*")):
        mode = os.lstat(p).st_mode
        kind = ("link:" + os.readlink(p)) if st_.S_ISLNK(mode) else "dir" if st_.S_ISDIR(mode) else \
            "fifo" if st_.S_ISFIFO(mode) else "file"
        out[str(p.relative_to(folder))] = kind
    return out


path_names = st.sampled_from(["in.npz", "old.npz", "dir", "dir/inner.npz", "dir/new.npz", "fifo", "link-in",
                              "link-old", "link-dir", "link-dir/inner.npz", "dangling", "dangling-deep",
                              "hard-in", "new.npz", "missing/new.npz", "in.npz/x", "", ".", "..", "dir/",
                              "./in.npz", "dir/../in.npz", "link-dir/../in.npz", "old.npz/"])


@FUZZ
@given(name=path_names, relative=st.booleans())
def test_fuzz_save_paths(name, relative):
    folder = Path(tempfile.mkdtemp(prefix="fuzz-paths-"))
    try:
        before = make_tree(folder)
        contents = {p: (folder / p).read_bytes() for p, kind in before.items() if kind == "file"}
        target = name if relative else (f"{folder}/{name}" if name else "")
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            out, err = io.StringIO(), io.StringIO()
            import contextlib

            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = cli.main(["train", "--data", str(folder / "in.npz"), "--epochs", "1", "--hidden", "4",
                                   "--device", "cpu", "--json", "--save", target])
        finally:
            os.chdir(cwd)
        lines = [line for line in err.getvalue().splitlines() if line]
        assert status in (0, 2) and (status == 0) == (not lines) and len(lines) <= 1, (status, lines)
        assert (folder / "in.npz").read_bytes() == contents["in.npz"], target  # the input, by any name
        after = kinds(folder)
        for path, kind in before.items():  # nothing changed kind: links stay links, the FIFO a FIFO
            assert after.get(path) == kind, (target, path, kind, after.get(path))
        written = None
        if status == 0:
            written = str(Path(os.path.realpath(folder / target)).relative_to(folder.resolve()))
            assert MLP.load(folder / written, device="cpu").sizes == [3, 4, 3]
        for path, kind in after.items():  # only the file written is new or different
            if kind == "file" and path != written:
                assert (folder / path).read_bytes() == contents.get(path), (target, path)
    finally:
        shutil.rmtree(folder)
