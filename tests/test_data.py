"""Datasets, user files, standardisation and the stratified split."""
import numpy as np
import pytest

from gpu_backprop import data


def test_digits_split_is_stratified_and_standardised():
    ds = data.digits(test_size=0.2, seed=0)
    assert ds.X_train.shape[1] == 64 and ds.n_outputs == 10 and len(ds.X_train) + len(ds.X_test) == 1797
    train_share = np.bincount(ds.y_train) / len(ds.y_train)
    test_share = np.bincount(ds.y_test) / len(ds.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    assert np.abs(ds.X_train.mean(axis=0)).max() < 1e-9
    std = ds.X_train.std(axis=0)
    assert np.all((np.abs(std - 1) < 1e-9) | (std == 0))  # constant pixels stay 0


def test_one_hot_and_labels():
    Y = data.one_hot(np.array([2, 0, 1]), 3)
    assert Y.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    assert data.labels_from_outputs(Y).tolist() == [2, 0, 1]
    assert data.labels_from_outputs(np.array([[0.2], [0.7]])).tolist() == [0, 1]


def test_npz_and_csv_files(tmp_path):
    X = np.arange(12.0).reshape(6, 2)
    y = np.array([0, 1, 0, 1, 0, 1])
    np.savez(tmp_path / "d.npz", X=X, y=y)
    X2, y2 = data.read_file(tmp_path / "d.npz")
    assert np.array_equal(X2, X) and np.array_equal(y2, y)
    (tmp_path / "d.csv").write_text("a,target,b\n" + "\n".join(f"{r[0]},{t},{r[1]}" for r, t in zip(X, y)) + "\n")
    X3, y3 = data.read_file(tmp_path / "d.csv", label="target")
    assert np.array_equal(X3, X) and np.array_equal(y3, y)
    ds = data.from_file(tmp_path / "d.csv", label="target", test_size=0.5)
    assert ds.task == "classification" and ds.n_outputs == 2


@pytest.mark.parametrize("content,label,match", [
    ("a,b\n1,2\n", "c", "label: column 'c' not in"),
    ("a,b\n1,x\n", "b", "non-numeric value"),
    ("a,b\n", "b", "header row and at least one data row"),
    ("a,b\n1,2,3\n", "b", "every row must have 2 values"),
])
def test_bad_csv(tmp_path, content, label, match):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(ValueError, match=match):
        data.read_file(tmp_path / "bad.csv", label=label)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data: no such file"):
        data.read_file(tmp_path / "missing.npz")
    np.savez(tmp_path / "noX.npz", Z=np.zeros(3))
    with pytest.raises(ValueError, match="has no array 'X'"):
        data.read_file(tmp_path / "noX.npz")
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(ValueError, match="expected a .npz or .csv file"):
        data.read_file(tmp_path / "d.txt")
    np.savez(tmp_path / "noy.npz", X=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="has no targets"):
        data.from_file(tmp_path / "noy.npz")


def test_regression_and_xor():
    reg = data.regression(n=100, n_features=3)
    assert reg.task == "regression" and reg.y_train.shape[1] == 1 and reg.n_outputs == 1
    xor = data.xor()
    assert xor.n_outputs == 2 and len(xor.X_train) == 4
