"""Datasets, input checks, targets, standardisation and the train/test split.

Nothing here touches the network: the default dataset is scikit-learn's
bundled ``load_digits`` (1797 8x8 images, shipped inside scikit-learn).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .device import to_host
from .files import read_npz


@dataclass
class Dataset:
    """A train/test split, features standardised with the training statistics."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_outputs: int
    task: str = "classification"  # or "regression"
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    classes: list | None = None      # the label each class index stands for (y_train, y_test hold indices)
    columns: list[str] | None = None  # feature names (a CSV's header), for messages


# -- checks --------------------------------------------------------------------
def check_features(X: Any, n_features: int | None = None, name: str = "X", dtype: Any = None,
                   columns: Sequence[str] | None = None) -> Any:
    """X as a 2-D finite float array (host or device); a clear error otherwise.

    With ``dtype`` (the model's), float values beyond its range are refused too, naming the
    column (``columns``: their names, e.g. a CSV header). Non-contiguous input is accepted
    and copied to C order by the device layer.
    """
    if not hasattr(X, "shape") or not hasattr(X, "dtype"):
        X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a numeric array (float, int or bool), got dtype {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (samples x features), got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name}: empty: expected at least one sample, got shape {tuple(X.shape)}")
    if X.shape[1] == 0:
        raise ValueError(f"{name}: no features: expected at least one column, got shape {tuple(X.shape)}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"{name}: expected {n_features} features per sample (the model's input width), "
                         f"got shape {tuple(X.shape)}")
    if X.dtype.kind == "f":
        xp = _xp(X)
        if not bool(xp.isfinite(X).all()):
            row, col = (int(i[0]) for i in xp.nonzero(~xp.isfinite(X)))
            raise ValueError(f"{name}: contains NaN or Inf (column {_column(col, columns)}, row {row})")
        if dtype is not None and X.dtype.itemsize > np.dtype(dtype).itemsize:
            check_range(X, dtype, name, columns)
    return X


def _column(j: int, columns: Sequence[str] | None) -> str:
    return _quote(columns[j]) if columns is not None and j < len(columns) else str(j)


def _quote(text: str, limit: int = 40) -> str:
    """repr of a user's name, cut short: a message stays one readable line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def check_range(X: Any, dtype: Any, name: str = "X", columns: Sequence[str] | None = None) -> None:
    """Refuse finite values that would overflow ``dtype`` (e.g. 1e300 into float32), naming the column."""
    xp = _xp(X)
    limit = float(np.finfo(dtype).max)
    peak = xp.abs(X).max(axis=0)
    over = xp.nonzero(peak > limit)[0]
    if len(over):
        j = int(over[0])
        raise ValueError(f"{name}: column {_column(j, columns)} holds values up to {float(peak[j]):.3g}, "
                         f"beyond the range of {np.dtype(dtype).name} ({limit:.3g})")


def _xp(x: Any) -> Any:
    from .device import get_array_module

    return get_array_module(x)


def targets(y: Any, n_outputs: int, task: str, dtype: Any, n_rows: int,
            name: str = "y") -> tuple[np.ndarray, np.ndarray | None]:
    """(Y, labels): the float target matrix for the loss, and integer labels (or None).

    Classification: ``y`` holds integer labels in [0, n_outputs) (or {0, 1}
    for one output unit), turned into one-hot rows. Regression: ``y`` is the
    (n, n_outputs) target matrix, or a vector when n_outputs == 1.
    """
    y = np.asarray(to_host(y))
    if y.shape[:1] != (n_rows,):
        raise ValueError(f"{name}: expected {n_rows} rows (one per sample of X), got shape {y.shape}")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected numeric labels or targets, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError(f"{name}: contains NaN or Inf")
    if task == "regression":
        Y = y.reshape(n_rows, -1) if y.ndim == 1 else y
        if Y.ndim != 2 or Y.shape[1] != n_outputs:
            raise ValueError(f"{name}: expected targets of shape ({n_rows}, {n_outputs}), got {y.shape}")
        if Y.dtype.kind == "f" and Y.dtype.itemsize > np.dtype(dtype).itemsize:
            check_range(Y, dtype, name)
        return np.ascontiguousarray(Y, dtype=dtype), None
    if y.ndim == 2 and y.shape[1] == n_outputs and n_outputs > 1:  # already one-hot
        return np.ascontiguousarray(y, dtype=dtype), labels_from_outputs(y)
    if y.ndim != 1:
        raise ValueError(f"{name}: expected 1-D integer class labels, got shape {y.shape}")
    if y.dtype.kind == "f" and not np.all(y == np.round(y)):
        raise ValueError(f"{name}: expected integer class labels, got non-integer values")
    labels = y.astype(np.int64)
    n_classes = max(n_outputs, 2)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"{name}: labels must lie in [0, {n_classes}) for {n_outputs} output unit(s), "
                         f"got values in [{labels.min()}, {labels.max()}]")
    return one_hot(labels, n_outputs, dtype), labels


def one_hot(labels: np.ndarray, n_outputs: int, dtype: Any = np.float32) -> np.ndarray:
    """Rows of the identity; with one output unit the label itself (binary target)."""
    if n_outputs == 1:
        return labels.astype(dtype).reshape(-1, 1)
    Y = np.zeros((labels.shape[0], n_outputs), dtype=dtype)
    Y[np.arange(labels.shape[0]), labels] = 1
    return Y


def labels_from_outputs(y_hat: np.ndarray) -> np.ndarray:
    """argmax per row; a single sigmoid unit is thresholded at 0.5 (ops.activations.predicted_class)."""
    from .ops.activations import predicted_class

    return predicted_class(np, y_hat)


def infer_task(y: Any) -> str:
    """Integer-valued 1-D labels are classes; anything else is regression."""
    y = np.asarray(to_host(y))
    if y.ndim == 1 and y.size and (y.dtype.kind in "biuUS" or
                                   (y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
        return "classification"
    return "regression"


# -- preprocessing ------------------------------------------------------------
def standardize(X_train: np.ndarray, *others: np.ndarray) -> tuple:
    """Zero mean, unit variance with the training statistics (constant features left at 0).

    Returns (mean, scale, X_train', *others').
    """
    mean = X_train.mean(axis=0)
    scale = X_train.std(axis=0)
    scale[scale == 0] = 1.0
    return (mean, scale) + tuple((X - mean) / scale for X in (X_train, *others))


def split(X: np.ndarray, y: np.ndarray, test_size: float = 0.2, seed: int = 0,
          stratify: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/test split, stratified by class for classification labels."""
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=test_size, random_state=seed,
                            stratify=y if stratify else None)


def _make(name: str, X: np.ndarray, y: np.ndarray, test_size: float, seed: int,
          columns: list[str] | None = None) -> Dataset:
    """Split and standardise; classification labels (any integers or strings) become class
    indices into ``Dataset.classes``, so a layer is never sized from the largest label."""
    if y.ndim not in (1, 2):
        raise ValueError(f"y: expected a 1-D array of labels or a 2-D array of targets, got shape {y.shape}")
    if len(y) != len(X):
        raise ValueError(f"y: {len(y)} rows but X has {len(X)}: expected one target per row of X")
    if y.dtype.kind not in "biufUS":
        raise TypeError(f"y: expected numeric labels or targets (or string labels), got dtype {y.dtype}")
    if test_size > 0 and len(X) < 2:
        raise ValueError(f"data: {name!r} has {len(X)} row: expected at least 2 (to split into train and test)")
    task = infer_task(y)
    classes = None
    if task == "classification":
        if y.dtype.kind == "S":
            y = y.astype(str)
        values, y, counts = np.unique(y, return_inverse=True, return_counts=True)
        if len(values) < 2:
            raise ValueError(f"y: every label is {values[0].item()!r}: expected at least two classes to learn")
        # plain ints and strs (bools and integral floats as ints): JSON in the model's header
        classes = [str(v) if values.dtype.kind == "U" else int(v) for v in values]
        n_outputs = len(values)
        stratify = counts.min() >= 2 and round(len(y) * test_size) >= n_outputs
    else:
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise ValueError("y: contains NaN or Inf")
        stratify, n_outputs = False, (1 if y.ndim == 1 else y.shape[1])
        if y.ndim == 1:
            y = y.reshape(-1, 1)
    if test_size > 0:
        X_train, X_test, y_train, y_test = split(X, y, test_size, seed, stratify)
    else:
        X_train, X_test, y_train, y_test = X, X, y, y
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is found below, by column
        mean, scale, X_train, X_test = standardize(X_train.astype(np.float64), X_test.astype(np.float64))
    bad = ~(np.isfinite(mean) & np.isfinite(scale) & np.isfinite(X_train).all(axis=0) & np.isfinite(X_test).all(axis=0))
    if bad.any():
        j = int(np.nonzero(bad)[0][0])
        raise ValueError(f"X: column {_column(j, columns)} holds values too large to standardise "
                         f"(|x| up to {np.abs(X[:, j]).max():.3g})")
    return Dataset(name, X_train, y_train, X_test, y_test, n_outputs, task, mean, scale, classes, columns)


# -- datasets -----------------------------------------------------------------
def digits(test_size: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1797 samples, 64 features, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _make("digits", bunch.data, bunch.target.astype(np.int64), test_size, seed)


def xor() -> Dataset:
    """The four XOR points; train and test are the same four."""
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    y = np.array([0, 1, 1, 0], dtype=np.int64)
    return _make("xor", X, y, 0.0, 0)


def regression(n: int = 1000, n_features: int = 8, seed: int = 0, test_size: float = 0.2) -> Dataset:
    """A smooth synthetic target: y = sin(x . a) + 0.5 tanh(x . c), plus a little noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_features))
    a, c = rng.standard_normal(n_features) / np.sqrt(n_features), rng.standard_normal(n_features)
    y = np.sin(X @ a) + 0.5 * np.tanh(X @ c) + 0.05 * rng.standard_normal(n)
    return _make("regression", X, y.reshape(-1, 1), test_size, seed)


BUILTIN = {"digits": digits, "xor": xor, "regression": regression}


def read_file(path: "str | Path", label: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, y) from ``.npz`` (arrays X and, optionally, y) or ``.csv`` with a header row.

    In a CSV, ``label`` names the target column; without it every column is a feature.
    """
    X, y, _ = read_table(path, label)
    return X, y


def read_table(path: "str | Path", label: str | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """(X, y, feature names or None): :func:`read_file` with the CSV header's names."""
    text = str(path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: no such file: {text!r}")
    if not path.is_file():
        raise ValueError(f"data: {text!r} is not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if label is not None:
            raise ValueError(f"label: {label!r} applies to .csv files; {text!r} is .npz: its targets are its array 'y'")
        names = read_npz_names(path)
        if "X" not in names:
            raise ValueError(f"data: {text!r} has no array 'X' (has {', '.join(sorted(names)) or 'none'})")
        arrays = read_npz(path, "data", names=["X", "y"], max_bytes=_host_memory())
        return arrays["X"], arrays.get("y"), None
    if suffix == ".csv":
        return _read_csv(path, label)
    raise ValueError(f"data: expected a .npz or .csv file, got {text!r}")


def read_npz_names(path: Path) -> set[str]:
    from .files import npz_headers

    return set(npz_headers(path, "data"))


def _host_memory() -> int | None:
    from .device import CPU
    from .model import available_bytes

    return available_bytes(CPU)


def _read_csv(path: Path, label: str | None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    text = str(path)
    free = _host_memory()
    size = path.stat().st_size
    if free is not None and size * 16 > free:  # parsing holds ~16 bytes of Python objects per byte of text
        raise MemoryError(f"data: {text!r} is {size / 2**20:.0f} MiB: reading it needs about "
                          f"{size * 16 / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB available")
    rows: list[tuple[int, list[str]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if row:
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError as exc:
        raise ValueError(f"data: {text!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                         f"at offset {exc.start})") from None
    except csv.Error as exc:
        raise ValueError(f"data: {text!r}: not valid CSV ({exc})") from None
    if len(rows) < 2:
        raise ValueError(f"data: {text!r} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0][1]]
    if label is not None and label not in header:
        shown = ", ".join(_quote(h, 20) for h in header[:10]) + (", ..." if len(header) > 10 else "")
        raise ValueError(f"label: column {_quote(label)} not in {text!r} (columns: {shown})")
    if label is not None and header.count(label) > 1:
        raise ValueError(f"label: {_quote(label)} names {header.count(label)} columns of {text!r}: expected one")
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, (line, row) in enumerate(rows[1:]):
        if len(row) != len(header):
            raise ValueError(f"data: {text!r} line {line}: every row must have {len(header)} values "
                             f"(the header's columns), got {len(row)}")
        for j, v in enumerate(row):
            try:
                values[i, j] = float(v)
            except ValueError:
                raise ValueError(f"data: {text!r} line {line}, column {_quote(header[j])}: "
                                 f"non-numeric value {v[:40]!r}") from None
    if label is None:
        return values, None, header
    j = header.index(label)
    return np.delete(values, j, axis=1), values[:, j], header[:j] + header[j + 1:]


def from_file(path: "str | Path", label: str | None = None, test_size: float = 0.2,
              seed: int = 0) -> Dataset:
    """A Dataset from user data (see :func:`read_file`); y is required for training."""
    X, y, columns = read_table(path, label)
    X = check_features(X, columns=columns)
    if y is None:
        raise ValueError(f"data: {str(path)!r} has no targets: give a 'y' array (.npz) or --label COLUMN (.csv)")
    return _make(Path(path).stem, np.asarray(X, dtype=np.float64), np.asarray(y), test_size, seed, columns)
