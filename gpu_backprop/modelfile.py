"""The one place that decides whether a model file (its header and arrays) is valid.

A model file is an ``.npz`` with a JSON header in ``config`` and the arrays ``W0, b0, ...``
plus optional ``extra_*`` arrays. :func:`check_config` validates the header and
:func:`check_arrays` every array's shape and dtype against it; :func:`read` applies both
before reading any array data, and ``MLP.save`` applies the same checks before writing,
so ``save`` never writes what ``load`` refuses.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from .files import FileError, read_npz
from .ops import activations as act

FORMAT_VERSION = 1
MAX_HEADER_CHARS = 1 << 20  # a header is a few hundred characters; anything near this is not ours
TASKS = ("classification", "regression")
DTYPES = ("float32", "float64")
PRECISIONS = ("fp32", "tf32", "bf16")


class ModelFileError(FileError):
    """A model file, or a model about to be saved, that ``load`` would refuse."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_config(header: Any, where: str) -> dict[str, Any]:
    """The validated header (a dict); :class:`ModelFileError` naming ``where`` and the key otherwise."""
    def bad(message: str) -> ModelFileError:
        return ModelFileError(f"{where}: {message}")

    if not isinstance(header, dict):
        raise bad(f"config: expected a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT_VERSION:
        raise bad(f"config 'format': expected {FORMAT_VERSION}, got {header.get('format')!r}")
    required = ("sizes", "activation", "output", "loss", "dtype", "seed")
    missing = [k for k in required if k not in header]
    if missing:
        raise bad(f"config: missing {', '.join(map(repr, missing))}")
    sizes = header["sizes"]
    if (not isinstance(sizes, list) or len(sizes) < 2 or not all(_is_int(s) and s >= 1 for s in sizes)):
        raise bad(f"config 'sizes': expected a list of at least two positive integers, got {_short(sizes)}")
    for key, allowed in (("activation", act.HIDDEN), ("output", act.OUTPUT), ("loss", act.LOSSES),
                         ("dtype", DTYPES), ("task", TASKS), ("precision", PRECISIONS)):
        if key in header and header[key] not in allowed:
            raise bad(f"config {key!r}: expected one of {', '.join(allowed)}, got {_short(header[key])}")
    if (header["output"] == "softmax") != (header["loss"] == "cross_entropy"):
        raise bad(f"config: loss {header['loss']!r} with output {header['output']!r} is not a valid pair")
    if header.get("precision") in ("tf32", "bf16") and header["dtype"] != "float32":
        raise bad(f"config: precision {header['precision']!r} needs dtype float32")
    if not _is_int(header["seed"]) or header["seed"] < 0:
        raise bad(f"config 'seed': expected a non-negative integer, got {_short(header['seed'])}")
    classes = header.get("classes")
    if classes is not None:
        if (not isinstance(classes, list) or not all(_is_int(c) or isinstance(c, str) for c in classes)
                or len({(type(c), c) for c in classes}) != len(classes)):
            raise bad(f"config 'classes': expected a list of distinct integers or strings, got {_short(classes)}")
        n_out = sizes[-1]
        if len(classes) != (2 if n_out == 1 else n_out) or header.get("task", "classification") != "classification":
            raise bad(f"config 'classes': {len(classes)} classes for {n_out} output unit(s)")
    return header


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_arrays(config: Mapping[str, Any], arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 where: str) -> None:
    """Every array's shape and dtype (from headers: nothing read) against the validated ``config``."""
    sizes = config["sizes"]
    expected = {}
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        expected[f"W{k}"], expected[f"b{k}"] = (n_in, n_out), (n_out,)
    for name, shape in expected.items():
        if name not in arrays:
            raise ModelFileError(f"{where}: missing array {name!r} (sizes {sizes} need W0..W{len(sizes) - 2}, "
                                 f"b0..b{len(sizes) - 2})")
        got_shape, dtype = arrays[name]
        if dtype.kind != "f":
            raise ModelFileError(f"{where}: array {name!r}: expected floats, got dtype {dtype}")
        if tuple(got_shape) != shape:
            raise ModelFileError(f"{where}: array {name!r}: expected shape {shape} (from sizes {sizes}), "
                                 f"got {tuple(got_shape)}")
    for name, (shape, dtype) in arrays.items():
        if name in expected or name == "config":
            continue
        if not name.startswith("extra_") or not name[len("extra_"):].isidentifier():
            raise ModelFileError(f"{where}: unexpected array {name!r} (expected W<k>, b<k> or extra_<name>)")
        if dtype.hasobject or dtype.kind not in "biufUS":
            raise ModelFileError(f"{where}: extra {name[len('extra_'):]!r}: expected a numeric or string "
                                 f"array, got dtype {dtype}")
    if "extra_x_mean" in arrays and "extra_x_scale" in arrays:  # applied together to inputs by predict
        for name in ("extra_x_mean", "extra_x_scale"):
            shape, dtype = arrays[name]
            if tuple(shape) != (sizes[0],) or dtype.kind != "f":
                raise ModelFileError(f"{where}: extra {name[6:]!r}: expected {sizes[0]} floats (one per input), "
                                     f"got shape {tuple(shape)} of {dtype}")


def check_values(config: Mapping[str, Any], values: Mapping[str, np.ndarray], where: str) -> None:
    """Parameters finite; a standardisation pair finite with a positive scale."""
    for k in range(len(config["sizes"]) - 1):
        for name in (f"W{k}", f"b{k}"):
            if not np.all(np.isfinite(values[name])):
                raise ModelFileError(f"{where}: array {name!r} contains NaN or Inf")
    if "extra_x_mean" in values and "extra_x_scale" in values:
        mean, scale = values["extra_x_mean"], values["extra_x_scale"]
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ModelFileError(f"{where}: extra 'x_mean'/'x_scale': expected finite values and a positive scale")


def header_text(config: Mapping[str, Any]) -> str:
    return json.dumps({"format": FORMAT_VERSION, **config}, allow_nan=False)


def parse_header(text: str, where: str) -> dict[str, Any]:
    if len(text) > MAX_HEADER_CHARS:
        raise ModelFileError(f"{where}: config: {len(text)} characters, expected a header under {MAX_HEADER_CHARS}")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{where}: config: not valid JSON ({_short(str(exc))})") from None
    return check_config(header, where)


def read(path: "str | os.PathLike", max_bytes: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(validated config, arrays) of the model file ``path``: header and every array's
    shape and dtype checked before any parameter is read; never unpickles."""
    text = os.fspath(path)
    where = f"model {text!r}"

    def check_config_entry(headers: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        if "config" not in headers:
            raise ModelFileError(f"{where}: no 'config' entry: not written by MLP.save")
        shape, dtype = headers["config"]
        if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * MAX_HEADER_CHARS:
            raise ModelFileError(f"{where}: 'config': expected a JSON string under {MAX_HEADER_CHARS} characters, "
                                 f"got shape {shape} of {dtype}")

    try:
        raw = read_npz(path, "model", names=["config"], check=check_config_entry)
    except ModelFileError:
        raise
    except FileError as exc:
        raise ModelFileError(str(exc)) from None
    config = parse_header(str(raw["config"][()]), where)
    headers: dict[str, Any] = {}

    def check_all(h: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        check_arrays(config, h, where)
        headers.update(h)

    try:
        arrays = read_npz(path, "model", check=check_all, max_bytes=max_bytes)
    except ModelFileError:
        raise
    except FileError as exc:
        raise ModelFileError(str(exc)) from None
    arrays.pop("config")
    check_values(config, arrays, where)
    return config, arrays


__all__ = ["FORMAT_VERSION", "ModelFileError", "check_config", "check_arrays", "check_values", "read",
           "header_text", "parse_header"]
