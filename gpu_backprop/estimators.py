"""scikit-learn estimators over :class:`~gpu_backprop.model.MLP`: ``MLPClassifier`` and
``MLPRegressor``, with scikit-learn's conventions (the constructor only stores its parameters,
validation in ``fit``, ``fit`` returns the estimator, fitted attributes end in ``_``) and its
names where the meaning is the same. Training is mini-batch SGD with momentum (``solver="sgd"``,
the one solver so far), on the device ``device`` chooses; the fitted parameters are kept as
NumPy arrays (``coefs_``, ``intercepts_``), so a fitted estimator pickles and unpickles on a
machine without a GPU.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .model import MLP

ACTIVATIONS = {"logistic": "sigmoid", "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "identity": "identity"}


class _BaseMLP(BaseEstimator):
    _loss = "mse"
    _output = "identity"

    def __init__(self, hidden_layer_sizes: tuple = (100,), activation: str = "relu", solver: str = "sgd",
                 batch_size: int | str = "auto", learning_rate_init: float = 0.01, max_iter: int = 200,
                 shuffle: bool = True, random_state: Any = None, momentum: float = 0.9,
                 device: str = "auto", dtype: str = "float32"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.momentum = momentum
        self.device = device
        self.dtype = dtype

    # -- validation at the boundary --------------------------------------------
    def _hidden(self) -> list[int]:
        sizes = self.hidden_layer_sizes
        sizes = [sizes] if isinstance(sizes, (int, np.integer)) else list(sizes)
        if not all(isinstance(s, (int, np.integer)) and s > 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes: expected positive integers, got {self.hidden_layer_sizes!r}")
        return [int(s) for s in sizes]

    def _check_params(self, n_samples: int) -> tuple[str, int]:
        if self.solver != "sgd":
            raise ValueError(f"solver: expected 'sgd' (the one solver so far), got {self.solver!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.batch_size == "auto":
            batch = min(200, n_samples)
        elif isinstance(self.batch_size, (int, np.integer)) and self.batch_size > 0:
            batch = min(int(self.batch_size), n_samples)
        else:
            raise ValueError(f"batch_size: expected 'auto' or a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter > 0):
            raise ValueError(f"max_iter: expected a positive integer, got {self.max_iter!r}")
        return ACTIVATIONS[self.activation], batch

    # -- training ------------------------------------------------------------------
    def _train(self, X: np.ndarray, targets: np.ndarray, n_out: int) -> None:
        activation, batch = self._check_params(X.shape[0])
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        model = MLP([X.shape[1], *self._hidden(), n_out], activation=activation, output=self._output,
                    loss=self._loss, device=self.device, dtype=self.dtype, seed=seed)
        history = model.fit(X, targets, epochs=int(self.max_iter), batch_size=batch,
                            lr=float(self.learning_rate_init), momentum=float(self.momentum),
                            shuffle=bool(self.shuffle), seed=seed)
        params = model.get_params()
        self.coefs_ = [params[f"W{k}"] for k in range(len(model.weights))]
        self.intercepts_ = [params[f"b{k}"] for k in range(len(model.biases))]
        self.loss_curve_ = list(history.loss)
        self.loss_ = self.loss_curve_[-1]
        self.n_iter_ = history.epochs
        self.n_layers_ = len(self.coefs_) + 1
        self.n_outputs_ = n_out
        self._model = model

    def _outputs(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coefs_")
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return np.asarray(self._model.predict_proba(X), dtype=np.float64)

    # -- pickling: host arrays only ---------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_model", None)  # holds device arrays and kernel modules: rebuilt from coefs_
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "coefs_" in state:
            sizes = [self.coefs_[0].shape[0], *(W.shape[1] for W in self.coefs_)]
            model = MLP(sizes, activation=ACTIVATIONS[self.activation], output=self._output, loss=self._loss,
                        device=self.device, dtype=self.dtype)
            model.set_params({**{f"W{k}": W for k, W in enumerate(self.coefs_)},
                              **{f"b{k}": b for k, b in enumerate(self.intercepts_)}})
            self._model = model


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multi-layer perceptron classifier: softmax outputs, cross-entropy loss, any labels
    (strings, large or sparse integers: ``classes_`` maps the outputs back to them)."""

    _loss = "cross_entropy"
    _output = "softmax"

    def fit(self, X: Any, y: Any) -> "MLPClassifier":
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y: expected at least 2 classes, got 1 class ({self.classes_[0]!r})")
        self._train(X, index.astype(np.int64), len(self.classes_))
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probability of each class (columns in the order of ``classes_``)."""
        return self._outputs(X)

    def predict(self, X: Any) -> np.ndarray:
        outputs = self._outputs(X)  # first: it says when the estimator is not fitted
        return self.classes_[np.argmax(outputs, axis=1)]


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multi-layer perceptron regressor: identity outputs, squared-error loss, one target
    or several (y of shape (n, k))."""

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def fit(self, X: Any, y: Any) -> "MLPRegressor":
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], multi_output=True, y_numeric=True)
        self._y_1d = y.ndim == 1
        targets = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        self._train(X, targets, targets.shape[1])
        return self

    def predict(self, X: Any) -> np.ndarray:
        out = self._outputs(X)
        return out[:, 0] if self._y_1d else out
