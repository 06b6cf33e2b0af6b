"""Datasets, input checks, targets, standardisation and the train/test split.

Nothing here touches the network: the default dataset is scikit-learn's
bundled ``load_digits`` (1797 8x8 images, shipped inside scikit-learn).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .device import to_host


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


# -- checks --------------------------------------------------------------------
def check_features(X: Any, n_features: int | None = None, name: str = "X") -> Any:
    """X as a 2-D finite float array (host or device); a clear error otherwise.

    Non-contiguous input is accepted and copied to C order by the device layer.
    """
    if not hasattr(X, "shape") or not hasattr(X, "dtype"):
        X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a numeric array (float, int or bool), got dtype {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (samples x features), got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name}: empty: expected at least one sample, got shape {tuple(X.shape)}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"{name}: expected {n_features} features per sample (the model's input width), "
                         f"got shape {tuple(X.shape)}")
    if X.dtype.kind == "f" and not bool(_xp(X).isfinite(X).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return X


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
    """argmax per row; a single sigmoid unit is thresholded at 0.5."""
    if y_hat.shape[1] == 1:
        return (y_hat[:, 0] > 0.5).astype(np.int64)
    return np.argmax(y_hat, axis=1)


def infer_task(y: Any) -> str:
    """Integer-valued 1-D labels are classes; anything else is regression."""
    y = np.asarray(to_host(y))
    if y.ndim == 1 and y.size and (y.dtype.kind in "biu" or
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


def _make(name: str, X: np.ndarray, y: np.ndarray, test_size: float, seed: int) -> Dataset:
    task = infer_task(y)
    if task == "classification":
        y = y.astype(np.int64)
        if y.min() < 0:
            raise ValueError(f"y: class labels must be >= 0, got {y.min()}")
        counts = np.bincount(y)
        n_outputs = max(len(counts), 2)
        stratify = counts.min() >= 2 and round(len(y) * test_size) >= n_outputs
    else:
        stratify, n_outputs = False, (1 if y.ndim == 1 else y.shape[1])
    if test_size > 0:
        X_train, X_test, y_train, y_test = split(X, y, test_size, seed, stratify)
    else:
        X_train, X_test, y_train, y_test = X, X, y, y
    mean, scale, X_train, X_test = standardize(X_train.astype(np.float64), X_test.astype(np.float64))
    return Dataset(name, X_train, y_train, X_test, y_test, n_outputs, task, mean, scale)


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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: no such file: {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                if "X" not in f.files:
                    raise ValueError(f"data: {str(path)!r} has no array 'X' (has {', '.join(f.files) or 'none'})")
                return f["X"], (f["y"] if "y" in f.files else None)
        except (OSError, ValueError) as exc:
            if str(exc).startswith("data:"):
                raise
            raise ValueError(f"data: cannot read {str(path)!r} as .npz: {exc}") from None
    if suffix == ".csv":
        return _read_csv(path, label)
    raise ValueError(f"data: expected a .npz or .csv file, got {str(path)!r}")


def _read_csv(path: Path, label: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        raise ValueError(f"data: {str(path)!r} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if label is not None and label not in header:
        raise ValueError(f"label: column {label!r} not in {str(path)!r} (columns: {', '.join(header)})")
    try:
        values = np.array([[float(v) for v in row] for row in rows[1:] if row], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"data: {str(path)!r}: non-numeric value ({exc})") from None
    if values.ndim != 2 or values.shape[1] != len(header):
        raise ValueError(f"data: {str(path)!r}: every row must have {len(header)} values")
    if label is None:
        return values, None
    j = header.index(label)
    return np.delete(values, j, axis=1), values[:, j]


def from_file(path: "str | Path", label: str | None = None, test_size: float = 0.2,
              seed: int = 0) -> Dataset:
    """A Dataset from user data (see :func:`read_file`); y is required for training."""
    X, y = read_file(path, label)
    X = check_features(X)
    if y is None:
        raise ValueError(f"data: {str(path)!r} has no targets: give a 'y' array (.npz) or --label COLUMN (.csv)")
    return _make(Path(path).stem, np.asarray(X, dtype=np.float64), np.asarray(y), test_size, seed)
