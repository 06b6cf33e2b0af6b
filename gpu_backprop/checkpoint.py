"""Checkpoints of a fit: a model file (``MLP.load`` and ``gpu-backprop predict`` read it) that
also holds what the fit needs to continue exactly where it was: the optimizer's state (velocity,
Adam's moments and step count), the best epoch's weights for early stopping, and, as JSON, the
epochs done, the RNG state that draws each epoch's order, the learning rate, the plateau count
and the history so far. Written atomically after every epoch, so an interrupted run loses at
most the epoch in progress and never the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import modelfile

VERSION = 1
STATE = "fit_state"  # the JSON's extra array
OPT, BEST = "opt_", "best_"  # prefixes of the optimizer state's and the best weights' extra arrays


def write(path: "str | os.PathLike", model: Any, state: dict[str, Any], best: list | None,
          what: str = "checkpoint") -> Path:
    """Write ``model`` with the fit ``state`` (JSON-able), its optimizer state and ``best``
    (host copies of the best epoch's parameters, W0, b0, ... order, or None)."""
    from .device import to_host
    from .model import write_model

    extra: dict[str, Any] = {STATE: np.array(json.dumps({"version": VERSION, **state}))}
    if model._state is not None:
        extra.update({OPT + name: to_host(a) for name, a in model._state.arrays().items()})
    if best is not None:
        n = len(model.weights)
        for k in range(n):
            extra[f"{BEST}W{k}"], extra[f"{BEST}b{k}"] = to_host(best[k]), to_host(best[n + k])
    return write_model(model, path, extra, what)


def read(path: "str | os.PathLike", model: Any, settings: dict[str, Any],
         what: str = "resume_from") -> tuple[dict[str, Any], list | None]:
    """Load a checkpoint into ``model`` (parameters and optimizer state, in place) after checking
    that it was written by a fit of this architecture with these ``settings`` (the run can only
    continue as it was); returns (the fit state, the best weights or None)."""
    from .model import available_bytes

    where = f"{what} {os.fspath(path)!r}"
    config, arrays = modelfile.read(path, max_bytes=available_bytes(model.device))
    if "extra_" + STATE not in arrays:
        raise ValueError(f"{where}: a model file but not a checkpoint (no fit state): fit(checkpoint=...) writes them")
    try:
        state = json.loads(str(arrays["extra_" + STATE]))
    except ValueError:
        raise ValueError(f"{where}: its fit state is not valid JSON") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError(f"{where}: expected a checkpoint of version {VERSION}")
    mine = {"sizes": model.sizes, "activation": model.activation, "output": model.output, "loss": model.loss,
            "dtype": model.dtype.name}
    theirs = {key: config.get(key) for key in mine}
    for key, value in mine.items():
        if theirs[key] != value:
            raise ValueError(f"{where}: written for {key}={theirs[key]!r}, this model has {value!r}")
    for key, value in settings.items():
        if state.get("settings", {}).get(key) != value:
            raise ValueError(f"{where}: written by a fit with {key}={state.get('settings', {}).get(key)!r}, "
                             f"this one has {value!r}: a resumed run continues with the settings it had")
    model.set_params({name: arrays[name] for name in arrays if not name.startswith("extra_")})
    opt = {name[len("extra_" + OPT):]: a for name, a in arrays.items() if name.startswith("extra_" + OPT)}
    if opt:
        states = 2 if "sq_w0" in opt else 1 if "vel_w0" in opt else 0
        target = model.optimizer_state(states)
        for name, current in target.arrays().items():
            if name not in opt or opt[name].shape != tuple(current.shape):
                raise ValueError(f"{where}: optimizer state {name!r} missing or of the wrong shape")
            current[...] = model.device.asarray(opt[name], current.dtype)
    n = len(model.weights)
    best = None
    if f"extra_{BEST}W0" in arrays:
        best = [model.device.asarray(arrays[f"extra_{BEST}W{k}"], model.dtype) for k in range(n)] + \
               [model.device.asarray(arrays[f"extra_{BEST}b{k}"], model.dtype) for k in range(n)]
    return state, best
