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


def test_early_stopping_keeps_the_best_validation_epoch():
    """scikit-learn's early stopping: validation_fraction held out (stratified), stopped after
    n_iter_no_change epochs without improvement, and the estimator ends with the weights of the
    best validation score (not the last epoch's)."""
    from sklearn.model_selection import train_test_split

    X, y, _, _ = digits_split()
    clf = MLPClassifier(hidden_layer_sizes=(16,), solver="sgd", learning_rate_init=0.3, early_stopping=True,
                        n_iter_no_change=3, tol=0.0, max_iter=300, random_state=0, device="cpu").fit(X, y)
    assert clf.n_iter_ < 300 and len(clf.validation_scores_) == clf.n_iter_ == len(clf.loss_curve_)
    assert clf.best_validation_score_ == max(clf.validation_scores_) and clf.best_loss_ is None
    _, X_val, _, y_val = train_test_split(X, y, test_size=0.1, random_state=clf._seed, stratify=y)
    assert clf.score(X_val, y_val) == pytest.approx(clf.best_validation_score_)
    assert int(np.argmax(clf.validation_scores_)) < clf.n_iter_ - 1  # so the last epoch's weights would differ


@pytest.mark.parametrize("early_stopping", [False, True])
def test_a_plateau_stops_the_fit_where_scikit_learns_does(early_stopping):
    """tol=10: no epoch improves enough; scikit-learn's own MLPClassifier stops after the same
    number of epochs (n_iter_no_change + 2: the first epoch sets the best)."""
    import warnings

    from sklearn.neural_network import MLPClassifier as Reference

    X, y, _, _ = digits_split()
    params = dict(hidden_layer_sizes=(8,), tol=10.0, n_iter_no_change=2, max_iter=100, random_state=0,
                  early_stopping=early_stopping)
    clf = MLPClassifier(device="cpu", **params).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = Reference(**params).fit(X, y)
    assert clf.n_iter_ == reference.n_iter_ == 4
    assert (clf.best_loss_ is None) == (reference.best_loss_ is None) == early_stopping


def test_partial_fit_continues_one_epoch_at_a_time():
    X, y, X_test, y_test = digits_split()
    labels = np.array(["d%d" % v for v in y])
    clf = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=0.01, random_state=0, device="cpu")
    with pytest.raises(ValueError, match="classes: required on the first call"):
        clf.partial_fit(X, labels)
    for epoch in range(8):
        clf.partial_fit(X, labels, classes=np.unique(labels) if epoch == 0 else None)
    assert clf.n_iter_ == 8 and clf.loss_curve_[-1] < 0.5 * clf.loss_curve_[0]
    assert clf.score(X_test, np.array(["d%d" % v for v in y_test])) > 0.9
    with pytest.raises(ValueError, match=r"y: labels \['x'\] are not in classes"):
        clf.partial_fit(X[:3], np.array(["d0", "d1", "x"]))
    reg = MLPRegressor(hidden_layer_sizes=(8,), random_state=0, device="cpu")
    for _ in range(3):
        reg.partial_fit(X, y.astype(float))
    assert reg.n_iter_ == 3


def test_warm_start_continues_the_fitted_network():
    X, y, _, _ = digits_split()
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, tol=0.0, warm_start=True, random_state=0,
                        device="cpu")
    first = clf.fit(X, y).loss_curve_[-1]
    clf.fit(X, y)
    assert clf.n_iter_ == 10 and clf.loss_curve_[-1] < first
    cold = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, tol=0.0, random_state=0, device="cpu").fit(X, y)
    cold.fit(X, y)
    assert cold.n_iter_ == 5  # without warm_start, a new network each fit


@pytest.mark.parametrize("solver,kwargs", [("adam", {}), ("adamw", {"weight_decay": 0.01}),
                                           ("sgd", {"learning_rate_init": 0.05, "nesterovs_momentum": True}),
                                           ("sgd", {"learning_rate_init": 0.05, "learning_rate": "invscaling",
                                                    "power_t": 0.1})])
def test_every_solver_learns_digits(solver, kwargs):
    X, y, X_test, y_test = digits_split()
    clf = MLPClassifier(hidden_layer_sizes=(32,), solver=solver, max_iter=60, random_state=0, device="cpu",
                        **{"learning_rate_init": 0.005, **kwargs}).fit(X, y)
    assert clf.score(X_test, y_test) > 0.9


def test_dataframe_columns_become_feature_names_in_():
    pd = pytest.importorskip("pandas")
    X, y, X_test, _ = digits_split()
    columns = [f"pixel{i}" for i in range(X.shape[1])]
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0, device="cpu")
    clf.fit(pd.DataFrame(X, columns=columns), y)
    assert list(clf.feature_names_in_) == columns and clf.n_features_in_ == 64
    with pytest.raises(ValueError, match="feature names"):
        clf.predict(pd.DataFrame(X_test, columns=columns[::-1]))
