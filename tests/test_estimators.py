"""The scikit-learn estimators (gpu_backprop.estimators) under scikit-learn's own estimator
checks, and in its tools: Pipeline, GridSearchCV, cross_val_score, clone, pickle."""
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from gpu_backprop import data
from gpu_backprop.estimators import MLPClassifier, MLPRegressor

# float64 on the CPU: the checks compare predictions of subsets and permutations of rows to 1e-7
CHECKED = [MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.1, max_iter=100, random_state=0,
                         device="cpu", dtype="float64"),
           MLPRegressor(hidden_layer_sizes=(16,), activation="tanh", learning_rate_init=0.01, max_iter=200,
                        random_state=0, device="cpu", dtype="float64")]


@parametrize_with_checks(CHECKED)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def digits_split():
    ds = data.digits(seed=0)
    return ds.X_train, ds.y_train, ds.X_test, ds.y_test


def test_in_a_pipeline_with_grid_search_and_cross_validation():
    X, y, X_test, y_test = digits_split()
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), max_iter=100, random_state=0,
                                                         device="cpu"))
    search = GridSearchCV(pipe, {"mlpclassifier__learning_rate_init": [0.01, 0.1]}, cv=2).fit(X, y)
    assert search.best_params_["mlpclassifier__learning_rate_init"] in (0.01, 0.1)
    assert search.score(X_test, y_test) > 0.9
    scores = cross_val_score(clone(pipe), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.85


def test_any_labels_map_through_classes_and_a_pickle_predicts_the_same():
    """String labels and large sparse integers; the pickle holds host arrays only (the device
    model is rebuilt on load). Planted faults: predict returning output indices, not classes_;
    __getstate__ keeping the model (its ops hold modules, which do not pickle)."""
    X, y, X_test, y_test = digits_split()
    for labels in (np.array([f"digit {d}" for d in range(10)]), np.arange(10) * 1_000_003 + 7):
        clf = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=0.1, max_iter=15, random_state=0,
                            device="cpu").fit(X, labels[y])
        np.testing.assert_array_equal(clf.classes_, np.sort(labels))
        predicted = clf.predict(X_test)
        assert set(predicted) <= set(labels) and np.mean(predicted == labels[y_test]) > 0.9
        again = pickle.loads(pickle.dumps(clf))
        np.testing.assert_array_equal(again.predict(X_test), predicted)
        np.testing.assert_allclose(again.predict_proba(X_test), clf.predict_proba(X_test))
        assert len(clf.loss_curve_) == clf.n_iter_ == 15 and clf.loss_curve_[-1] < clf.loss_curve_[0]


def test_regressor_one_and_several_targets():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 5))
    Y = np.stack([X @ rng.standard_normal(5), np.sin(X[:, 0])], axis=1)
    for y in (Y[:, 0], Y):
        reg = MLPRegressor(hidden_layer_sizes=(32,), activation="tanh", learning_rate_init=0.01, max_iter=100,
                           random_state=0, device="cpu").fit(X, y)
        assert reg.predict(X).shape == y.shape and reg.score(X, y) > 0.9


@pytest.mark.parametrize("params,match", [
    ({"solver": "lbfgs"}, "solver: expected one of adam, adamw, sgd"),
    ({"learning_rate": "optimal"}, "learning_rate: expected one of constant, invscaling"),
    ({"alpha": -1.0}, "alpha: expected a non-negative finite number"),
    ({"solver": "sgd", "momentum": 1.5}, r"momentum: expected a number in \[0, 1\)"),
    ({"beta_1": 1.0}, r"beta1: expected a number in \[0, 1\)"),
    ({"n_iter_no_change": 0}, "n_iter_no_change: expected a positive integer"),
    ({"early_stopping": True, "validation_fraction": 1.0}, r"validation_fraction: expected a number in \(0, 1\)"),
    ({"loss": "hinge"}, "loss: expected one of cross_entropy, mse"),
    ({"activation": "softplus"}, "activation: expected one of"),
    ({"hidden_layer_sizes": (16, 0)}, "hidden_layer_sizes: expected positive integers"),
    ({"batch_size": 0}, "batch_size: expected 'auto' or a positive integer"),
    ({"max_iter": 0}, "max_iter: expected a positive integer"),
])
def test_bad_parameters_are_named_in_fit(params, match):
    X, y, _, _ = digits_split()
    clf = MLPClassifier(device="cpu", **params)  # the constructor only stores them
    with pytest.raises(ValueError, match=match):
        clf.fit(X[:50], y[:50])
