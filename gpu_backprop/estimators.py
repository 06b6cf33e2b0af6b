"""scikit-learn estimators over :class:`~gpu_backprop.model.MLP`: ``MLPClassifier`` and
``MLPRegressor``, with scikit-learn's conventions (the constructor only stores its parameters,
validation in ``fit``, ``fit`` returns the estimator, fitted attributes end in ``_``) and its
names where the meaning is the same. Solvers "adam" (the default, as scikit-learn's), "adamw" and
"sgd" (momentum, Nesterov), with the L2 penalty ``alpha``, the learning-rate schedules, early
stopping on a validation split and the training-loss plateau stop as scikit-learn has them; on
CUDA the update runs in the weight-gradient GEMM's epilogue. The fitted parameters are kept as
NumPy arrays (``coefs_``, ``intercepts_``), so a fitted estimator pickles and unpickles on a
machine without a GPU.

Differences from scikit-learn: the schedules apply to every solver (scikit-learn's to "sgd"
only); "cosine" is added; a regressor's ``validation_scores_`` are R^2 weighted by each
output's variance (scikit-learn's multi-output default averages them uniformly).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .model import MLP

ACTIVATIONS = {"logistic": "sigmoid", "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "identity": "identity"}


SOLVERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "invscaling", "adaptive", "cosine")


class _BaseMLP(BaseEstimator):
    _loss = "mse"
    _output = "identity"
    _losses: tuple = ("mse",)

    def __init__(self, hidden_layer_sizes: tuple = (100,), activation: str = "relu", solver: str = "adam",
                 alpha: float = 0.0001, batch_size: int | str = "auto", learning_rate: str = "constant",
                 learning_rate_init: float = 0.001, power_t: float = 0.5, max_iter: int = 200, shuffle: bool = True,
                 random_state: Any = None, tol: float = 1e-4, verbose: bool = False, warm_start: bool = False,
                 momentum: float = 0.9, nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, n_iter_no_change: int = 10, weight_decay: float = 0.01,
                 device: str = "auto", dtype: str = "float32", precision: str = "fp32", loss: str | None = None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.weight_decay = weight_decay
        self.device = device
        self.dtype = dtype
        self.precision = precision
        self.loss = loss

    # -- validation at the boundary --------------------------------------------
    def _hidden(self) -> list[int]:
        sizes = self.hidden_layer_sizes
        sizes = [sizes] if isinstance(sizes, (int, np.integer)) else list(sizes)
        if not all(isinstance(s, (int, np.integer)) and s > 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes: expected positive integers, got {self.hidden_layer_sizes!r}")
        return [int(s) for s in sizes]

    def _check_params(self, n_samples: int) -> tuple[str, int]:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.learning_rate not in SCHEDULES:
            raise ValueError(f"learning_rate: expected one of {', '.join(SCHEDULES)}, got {self.learning_rate!r}")
        if self.loss is not None and self.loss not in self._losses:
            raise ValueError(f"loss: expected one of {', '.join(self._losses)}, got {self.loss!r}")
        if self.batch_size == "auto":
            batch = min(200, n_samples)
        elif isinstance(self.batch_size, (int, np.integer)) and not isinstance(self.batch_size, bool) \
                and self.batch_size > 0:
            batch = min(int(self.batch_size), n_samples)
        else:
            raise ValueError(f"batch_size: expected 'auto' or a positive integer, got {self.batch_size!r}")
        for name in ("max_iter", "n_iter_no_change"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.early_stopping and not (isinstance(self.validation_fraction, (int, float))
                                        and 0 < self.validation_fraction < 1):
            raise ValueError(f"validation_fraction: expected a number in (0, 1), got {self.validation_fraction!r}")
        return ACTIVATIONS[self.activation], batch

    # -- training ------------------------------------------------------------------
    def _fit_kwargs(self) -> dict:
        """MLP.fit's optimizer, schedule and stopping arguments (validated there, by those names)."""
        sgd = self.solver == "sgd"
        return dict(lr=self.learning_rate_init, optimizer=self.solver, momentum=self.momentum if sgd else 0.0,
                    nesterov=bool(sgd and self.momentum and self.nesterovs_momentum), alpha=self.alpha,
                    beta1=self.beta_1, beta2=self.beta_2, epsilon=self.epsilon,
                    weight_decay=self.weight_decay if self.solver == "adamw" else 0.0,
                    schedule=self.learning_rate, power_t=self.power_t, patience=int(self.n_iter_no_change),
                    tol=self.tol, shuffle=bool(self.shuffle))

    def _split(self, X: np.ndarray, targets: np.ndarray, seed: int) -> tuple:
        """scikit-learn's early-stopping split: validation_fraction of the rows (stratified for a
        classifier), the rest to train on."""
        stratify = targets if isinstance(self, ClassifierMixin) else None
        return train_test_split(X, targets, test_size=self.validation_fraction, random_state=seed, stratify=stratify)

    def _train(self, X: np.ndarray, targets: np.ndarray, n_out: int, epochs: int | None = None,
               incremental: bool = False) -> None:
        activation, batch = self._check_params(X.shape[0])
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(0, 2**31 - 1))
        sizes = [X.shape[1], *self._hidden(), n_out]
        model = getattr(self, "_model", None)
        if model is None or not (incremental or self.warm_start) or model.sizes != sizes:
            model = MLP(sizes, activation=activation, output=self._output, loss=self.loss or self._loss,
                        device=self.device, dtype=self.dtype, seed=seed, precision=self.precision)
            self.loss_curve_, self.t_, self._seed = [], 0, seed
            self.best_loss_ = np.inf
            self.validation_scores_ = [] if self.early_stopping else None
            self.best_validation_score_ = -np.inf if self.early_stopping else None
        validation = None
        if self.early_stopping and not incremental:
            X, X_val, targets, y_val = self._split(X, targets, seed)
            validation = (X_val, y_val)
            batch = min(batch, len(X))
        kwargs = self._fit_kwargs()
        if not incremental:  # partial_fit runs one epoch, never stops
            kwargs.update(early_stopping=True, monitor=self._monitor(validation), restore_best=validation is not None)
        history = model.fit(X, targets, epochs=epochs or int(self.max_iter), batch_size=batch, seed=seed,
                            validation_data=validation, progress=bool(self.verbose), **kwargs)
        params = model.get_params()
        self.coefs_ = [params[f"W{k}"] for k in range(len(model.weights))]
        self.intercepts_ = [params[f"b{k}"] for k in range(len(model.biases))]
        self.loss_curve_ = self.loss_curve_ + list(history.loss)
        self.loss_ = self.loss_curve_[-1]
        self.t_ += len(X) * history.epochs
        if validation is not None:
            scores = self._scores(history, validation[1])
            self.validation_scores_ = self.validation_scores_ + scores
            self.best_validation_score_ = max(self.validation_scores_)
            self.best_loss_ = None
        else:
            self.best_loss_ = min(self.loss_curve_)
        self.n_iter_ = len(self.loss_curve_)
        self.n_layers_ = len(self.coefs_) + 1
        self.n_outputs_ = n_out
        self.out_activation_ = self._output
        self._model = model

    def _monitor(self, validation: tuple | None) -> str:
        return "loss" if validation is None else "val_loss"

    def _scores(self, history: Any, y_val: np.ndarray) -> list:
        return list(history.val_accuracy)

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
            model = MLP(sizes, activation=ACTIVATIONS[self.activation], output=self._output,
                        loss=self.loss or self._loss, device=self.device, dtype=self.dtype)
            model.set_params({**{f"W{k}": W for k, W in enumerate(self.coefs_)},
                              **{f"b{k}": b for k, b in enumerate(self.intercepts_)}})
            self._model = model


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multi-layer perceptron classifier: softmax outputs, cross-entropy loss, any labels
    (strings, large or sparse integers: ``classes_`` maps the outputs back to them)."""

    _loss = "cross_entropy"
    _output = "softmax"
    _losses = ("cross_entropy", "mse")

    def fit(self, X: Any, y: Any) -> "MLPClassifier":
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], reset=not self._warm())
        check_classification_targets(y)
        classes, index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"y: expected at least 2 classes, got 1 class ({classes[0]!r})")
        if self._warm() and not np.array_equal(classes, self.classes_):
            raise ValueError(f"y: warm_start needs the classes of the first fit {self.classes_.tolist()!r}, "
                             f"got {classes.tolist()!r}")
        self.classes_ = classes
        self._train(X, index.astype(np.int64), len(self.classes_))
        return self

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> "MLPClassifier":
        """One epoch over (X, y), continuing the fitted network; the first call needs ``classes``
        (every label that will ever be seen)."""
        first = not hasattr(self, "classes_")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], reset=first)
        check_classification_targets(y)
        if first:
            if classes is None:
                raise ValueError("classes: required on the first call to partial_fit (every label to be seen)")
            self.classes_ = np.unique(np.asarray(classes))
            if len(self.classes_) < 2:
                raise ValueError(f"classes: expected at least 2 classes, got {self.classes_.tolist()!r}")
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)), self.classes_):
            raise ValueError(f"classes: expected the classes of the first call {self.classes_.tolist()!r}")
        unseen = np.setdiff1d(y, self.classes_)
        if unseen.size:
            raise ValueError(f"y: labels {unseen.tolist()[:5]!r} are not in classes {self.classes_.tolist()!r}")
        self._train(X, np.searchsorted(self.classes_, y).astype(np.int64), len(self.classes_), epochs=1,
                    incremental=True)
        return self

    def _warm(self) -> bool:
        return bool(self.warm_start) and hasattr(self, "classes_")

    def _monitor(self, validation: tuple | None) -> str:
        return "loss" if validation is None else "val_accuracy"

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
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X: Any, y: Any) -> "MLPRegressor":
        """One epoch over (X, y), continuing the fitted network."""
        return self._fit(X, y, incremental=True)

    def _fit(self, X: Any, y: Any, incremental: bool) -> "MLPRegressor":
        warm = (incremental or self.warm_start) and hasattr(self, "coefs_")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], multi_output=True, y_numeric=True,
                             reset=not warm)
        targets = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        if warm and targets.shape[1] != self.n_outputs_:
            raise ValueError(f"y: expected {self.n_outputs_} target columns as before, got {targets.shape[1]}")
        self._y_1d = y.ndim == 1
        self._train(X, targets, targets.shape[1], epochs=1 if incremental else None, incremental=incremental)
        return self

    def _scores(self, history: Any, y_val: np.ndarray) -> list:
        """R^2 on the validation split from its loss (1/2 the mean squared error summed over outputs)."""
        total = float(((y_val - y_val.mean(axis=0)) ** 2).sum())
        n = len(y_val)
        return [1.0 - 2.0 * n * loss / total if total > 0 else 0.0 for loss in history.val_loss]

    def predict(self, X: Any) -> np.ndarray:
        out = self._outputs(X)
        return out[:, 0] if self._y_1d else out
