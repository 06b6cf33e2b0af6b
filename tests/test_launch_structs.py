"""The parameter structs of the GEMM kernels (kernels/params.cuh) and their NumPy twins
(gpu_backprop/ops/launch.py) have the same layout: every field at the same offset with the
same size, and the same total size, for float and double. A field reordered, retyped or
renamed on one side fails here, before it could bind a wrong value on a GPU."""
import subprocess

import numpy as np
import pytest

from gpu_backprop.ops.launch import STRUCTS, make, struct_dtype

from .emulator.builder import CXX, HERE, KERNELS

CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# precision="bf16": float arithmetic, activations and deltas stored as bf16 (params.cuh's S)
BF16 = "float, unsigned short"
STORING = ("ForwardParams", "PropagateParams", "WeightGradParams")  # the structs templated on S too


@pytest.fixture(scope="module")
def compiled_layout(tmp_path_factory):
    """{(struct, ctype): (sizeof, {field: (offsetof, sizeof)})} as g++ lays out params.cuh."""
    lines = [f'#include "{HERE / "cuda_shim.h"}"', f'#include "{KERNELS / "params.cuh"}"', "#include <cstdio>",
             "#include <cstddef>", "int main() {"]
    for name, fields in STRUCTS.items():
        for ctype in [*CTYPES.values(), *([BF16] if name in STORING else [])]:
            key = ctype.replace(", ", "_").replace(" ", "_")
            s = f"{name}_{key}"  # an alias: offsetof is a macro (no commas)
            lines.append(f"    typedef {name}<{ctype}> {s};")
            lines.append(f'    std::printf("{name} {key} - %zu 0\\n", sizeof({s}));')
            for field, _ in fields:
                lines.append(f'    std::printf("{name} {key} {field} %zu %zu\\n", offsetof({s}, {field}), '
                             f"sizeof((({s}*)nullptr)->{field}));")
    lines.append("}")
    tmp = tmp_path_factory.mktemp("layout")
    (tmp / "layout.cpp").write_text("\n".join(lines) + "\n")
    build = subprocess.run([CXX, "-std=c++20", "-w", "-pthread", str(tmp / "layout.cpp"), "-o", str(tmp / "layout")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    layout: dict = {}
    for line in subprocess.run([str(tmp / "layout")], capture_output=True, text=True, check=True).stdout.splitlines():
        name, ctype, field, offset, size = line.split()
        entry = layout.setdefault((name, ctype), [0, {}])
        if field == "-":
            entry[0] = int(offset)
        else:
            entry[1][field] = (int(offset), int(size))
    return layout


@pytest.mark.parametrize("name,dtype", [(name, dt) for name in STRUCTS for dt in (np.float32, np.float64)]
                         + [(name, "bf16") for name in STORING])
def test_numpy_layout_is_the_compilers(compiled_layout, name, dtype):
    """(bf16: the float struct's NumPy layout against <float, unsigned short>: the same, pointers being
    pointers, so the launchers make one struct for both storages.)"""
    dt = struct_dtype(name, np.float32 if dtype == "bf16" else dtype)
    size, fields = compiled_layout[(name, "float_unsigned_short" if dtype == "bf16" else CTYPES[np.dtype(dtype)])]
    assert dt.itemsize == size
    assert list(fields) == list(dt.names)
    for field in dt.names:
        assert (dt.fields[field][1], dt.fields[field][0].itemsize) == fields[field], field


def test_make_fills_fields_and_refuses_unknown_ones():
    a = np.zeros(3)
    record = make("ForwardParams", np.float64, o=a, M=3, act=2)
    assert record["o"][0] == a.ctypes.data and record["W"][0] == 0 and record["M"][0] == 3 and record["act"][0] == 2
    with pytest.raises(KeyError, match="ForwardParams has no field 'tiles'"):
        make("ForwardParams", np.float64, tiles=1)
