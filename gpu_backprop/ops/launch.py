"""The GEMM kernels' parameter structs (kernels/params.cuh), field for field.

Each struct is a NumPy structured dtype laid out as the C++ compiler lays out the
struct (``align=True``: natural alignment, padding as C); one record of it is passed
by value, as CuPy passes a structured NumPy argument (the CUDA-on-CPU shim does the
same). Pointers are device addresses as unsigned 64-bit integers (0: absent). A test
compiles params.cuh and compares every field's offset and size with these dtypes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

PTR, INDEX, INT, DOUBLE = np.uint64, np.int64, np.int32, np.float64
T = "T"  # the kernel's float type

# name: [(field, type)], in the order of kernels/params.cuh
STRUCTS: dict[str, list[tuple[str, Any]]] = {
    "ForwardParams": [("o", PTR), ("W", PTR), ("b", PTR), ("out", PTR), ("y_hat", PTR), ("M", INDEX), ("N", INDEX),
                      ("K", INDEX), ("act", INT)],
    "GatherParams": [("X", PTR), ("Y", PTR), ("order", PTR), ("step", PTR), ("yb", PTR), ("stride", INDEX),
                     ("n_y", INDEX)],
    "PropagateParams": [("delta", PTR), ("W", PTR), ("o", PTR), ("out", PTR), ("M", INDEX), ("N", INDEX),
                        ("K", INDEX), ("act", INT), ("tiles_n", INDEX), ("tiles", INDEX)],
    "MatmulParams": [("a", PTR), ("b", PTR), ("out", PTR), ("M", INDEX), ("N", INDEX), ("K", INDEX)],
    "WeightGradParams": [("o", PTR), ("g", PTR), ("o_next", PTR), ("delta_out", PTR), ("W", PTR), ("b", PTR),
                         ("W_copy", PTR), ("vel_w", PTR), ("vel_b", PTR), ("sq_w", PTR), ("sq_b", PTR), ("M", INDEX),
                         ("N", INDEX), ("K", INDEX), ("act", INT), ("has_prologue", INT), ("tiles_n", INDEX),
                         ("tiles", INDEX)],
    "SplitK": [("partials", PTR), ("bias_partials", PTR), ("tickets", PTR), ("slice_k", INDEX), ("splits", INT)],
    "UpdateRule": [("t", PTR), ("mode", INT), ("step", T), ("momentum", T), ("l2", T), ("scale", T), ("beta1", T),
                   ("beta2", T), ("eps", T), ("decay", T)],
    "OutputParams": [("y_hat", PTR), ("y", PTR), ("loss_out", PTR), ("partials", PTR), ("hit_partials", PTR),
                     ("ticket", PTR), ("on", INT), ("act", INT), ("loss", INT)],
    "StepRecord": [("losses", PTR), ("correct", PTR), ("step", PTR), ("on", INT), ("count", INT)],
}
_DTYPES: dict = {}


def struct_dtype(name: str, dtype: Any) -> np.dtype:
    """The NumPy layout of ``name<T>`` for the float type ``dtype``."""
    key = (name, np.dtype(dtype))
    if key not in _DTYPES:
        fields = STRUCTS[name]
        _DTYPES[key] = np.dtype({"names": [f for f, _ in fields],
                                 "formats": [dtype if t == T else t for _, t in fields]}, align=True)
    return _DTYPES[key]


def address(array: Any) -> int:
    """The device (or, for NumPy arrays in the shim, host) address of an array's first element; 0 for None."""
    if array is None:
        return 0
    if isinstance(array, np.ndarray):
        return int(array.ctypes.data)
    return int(array.data.ptr)


def _layout(name: str, dtype: Any) -> tuple[np.dtype, tuple[str, ...], frozenset, tuple[bool, ...]]:
    key = (name, "layout", np.dtype(dtype))
    if key not in _DTYPES:
        dt = struct_dtype(name, dtype)
        _DTYPES[key] = (dt, dt.names, frozenset(dt.names), tuple(t is PTR for _, t in STRUCTS[name]))
    return _DTYPES[key]


def make(name: str, dtype: Any, **values: Any) -> np.ndarray:
    """One record of ``name<T>`` (a (1,) structured array, passed by value); arrays become their
    addresses, fields not given are 0 (absent pointers, no tiles). A field the struct lacks raises."""
    dt, names, known, pointer = _layout(name, dtype)
    if not known.issuperset(values):
        raise KeyError(f"{name} has no field {sorted(set(values) - known)[0]!r}")
    row = tuple(address(values.get(f)) if p else values.get(f, 0) for f, p in zip(names, pointer))
    return np.array([row], dtype=dt)
