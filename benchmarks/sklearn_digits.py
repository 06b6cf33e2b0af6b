"""Our MLPClassifier against scikit-learn's own on digits: the same hidden sizes, solver (adam),
learning rate, batch size and epochs; test accuracy and fit time (median of --repeats), one run
of this script, as JSON. On the CPU: `python -m benchmarks.sklearn_digits --device cpu`
(unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for the command, as for every benchmark)."""
from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
from sklearn.neural_network import MLPClassifier as Reference

from gpu_backprop import data
from gpu_backprop.estimators import MLPClassifier


def timed_fit(make, X, y, repeats):
    seconds, model = [], None
    for _ in range(repeats):
        model = make()
        start = time.perf_counter()
        model.fit(X, y)
        seconds.append(time.perf_counter() - start)
    return model, float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    ds = data.digits(seed=0)
    params = dict(hidden_layer_sizes=(64,), activation="logistic", solver="adam", learning_rate_init=0.01,
                  batch_size=32, max_iter=args.epochs, tol=0.0, random_state=0)  # tol 0: every epoch runs
    rows = {}
    for name, make in (("gpu_backprop", lambda: MLPClassifier(device=args.device, **params)),
                       ("scikit-learn", lambda: Reference(**params))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning at max_iter
            model, seconds = timed_fit(make, ds.X_train, ds.y_train, args.repeats)
        rows[name] = {"test_accuracy": float(model.score(ds.X_test, ds.y_test)), "fit_seconds": seconds,
                      "epochs": int(model.n_iter_)}
    rows["speedup"] = rows["scikit-learn"]["fit_seconds"] / rows["gpu_backprop"]["fit_seconds"]
    print(json.dumps({"params": params, "device": args.device, **rows}, indent=1))


if __name__ == "__main__":
    main()
