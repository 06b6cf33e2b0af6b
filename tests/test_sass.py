"""Static checks on the sm_90 machine code (SASS, from nvcc's cubin through cuobjdump) where
speed depends on the shape of the code and no GPU is at hand to time it:

- the warp-tiled core reads its fragments from shared memory as 16-byte vectors (LDS.128), at
  least (WMITER TM + WNITER TN) / VEC per k step of each GEMM in a kernel;
- no GEMM kernel touches local memory (LDL/STL: spills or stack arrays);
- the FMA share of each kernel's FMA and shared-load instructions is printed, and for the
  warp-tiled cores held to 98% of the design's: per k step a lane's WMITER TM x WNITER TN FMAs
  against (WMITER TM + WNITER TN) / VEC vector loads: 64 / (64 + 4) = 94% in float and
  64 / (64 + 8) = 89% in double for "warp", 128 / (128 + 6) = 96% for the wide tiles (the Simt
  cores: 64 / (64 + 16) at best, printed beside);
- every GEMM kernel moves its Direct operands' tiles by cp.async (LDGSTS, committed with
  LDGDEPBAR and waited with DEPBAR), and on the warp cores the k-major ones (W in the forward;
  o and delta in the weight gradient) as 16-byte copies (LDGSTS.E.BYPASS.128: cp.async.cg 16).
"""
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_backprop.ops.cuda import CONFIGS, GEMM_FILES, configs_for, gemm_name

from . import cubins
from .test_compile import _require, demangle

REPORT: list = []  # (kernel, FMAs, 128-bit shared loads, other shared loads, FMA share) for the summary


def tool(name: str) -> str | None:
    """A CUDA binary utility from PATH or from the nvidia-cuda-* wheels of the test extra."""
    found = shutil.which(name)
    if found:
        return found
    for base in map(Path, sys.path):
        for candidate in base.glob(f"nvidia/cu*/bin/{name}"):
            return str(candidate)
    return None


def disassemble(cubin: Path, keep) -> dict:
    """{demangled kernel: [(predicate, opcode, operands)]} of the kernels of ``cubin`` whose name
    ``keep`` accepts, without the instructions under @!PT (never executed: ptxas pads cp.async
    with them)."""
    return {name: list(code) for name, code in _disassembled(cubin, cubin.stat().st_mtime_ns).items() if keep(name)}


@functools.cache  # a cubin is read by several modules' checks: disassembled once (by path and time)
def _disassembled(cubin: Path, mtime: int) -> dict:
    cuobjdump, nvdisasm = tool("cuobjdump"), tool("nvdisasm")
    _require(cuobjdump is not None and nvdisasm is not None, "cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump "
                                                            "nvidia-cuda-nvdisasm)")
    env = {"PATH": f"{Path(nvdisasm).parent}:/usr/bin:/bin", "NVDISASM_PATH": nvdisasm}
    dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    assert dump.returncode == 0, dump.stderr
    code = {}
    for section in re.split(r"\n\s*Function : ", dump.stdout)[1:]:
        symbol, body = section.split("\n", 1)
        code[demangle(symbol.strip())] = [(pred, op, rest) for pred, op, rest in re.findall(
            r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", body, re.M)
            if pred != "@!PT"]
    return code


def gemm_sass(names) -> dict:
    """:func:`disassemble` of the sm_90 cubins of tests/cubins.py (every name expression of each GEMM
    file), the kernels ``names`` lists only."""
    _require(shutil.which("nvcc") is not None, "nvcc")
    wanted = {name.replace(" ", "") for name in names}
    # demangled names spell out a defaulted rule family (weight_grad<float, Simt<...>, 0>)
    spelled = lambda name: re.sub(r",0>$", ">", name.replace(" ", ""))
    code = {}
    for file in dict.fromkeys(GEMM_FILES.values()):
        result = cubins.nvcc_cubin(file, "sm_90")
        assert result.returncode == 0, result.report[-3000:]
        code.update(disassemble(result.cubin, lambda name: spelled(name) in wanted))
    return code


@pytest.fixture(scope="module")
def sass():
    """{kernel name: [opcodes]} of every GEMM kernel instantiation (the tuner's configs), sm_90."""
    names = [gemm_name(k, dt, c) for k, f in GEMM_FILES.items() for dt in (np.float32, np.float64)
             for c in configs_for(dt)]
    return {name: [op for _, op, _ in code] for name, code in gemm_sass(names).items()}


def counts(opcodes: list) -> tuple[int, int, int]:
    fma = sum(op.startswith(("FFMA", "DFMA")) for op in opcodes)
    wide = sum(op.startswith("LDS.128") for op in opcodes)
    narrow = sum(op.startswith("LDS") and not op.startswith(("LDS.128", "LDS.U8")) for op in opcodes)
    return fma, wide, narrow


def test_every_gemm_kernel_was_disassembled(sass):
    expected = len(GEMM_FILES) * sum(len(configs_for(dt)) for dt in (np.float32, np.float64))
    assert len(sass) == expected, sorted(sass)


WARP_CASES = [(c, dt) for c in CONFIGS if CONFIGS[c][4].startswith("Warp<")
              for dt in (np.float32, np.float64) if c in configs_for(dt)]


def kernel_on(sass, kernel, config, dtype):
    """The SASS of ``kernel`` on ``config`` (its first instantiation: the SGD rule family)."""
    core = CONFIGS[config][4].format(T="double" if dtype == np.float64 else "float")
    return next(n for n in sass if n.startswith(f"{kernel}<") and core.replace(" ", "") in n.replace(" ", ""))


@pytest.mark.parametrize("config,dtype", WARP_CASES)
@pytest.mark.parametrize("kernel", list(GEMM_FILES))
def test_warp_core_reads_shared_memory_as_vectors(sass, kernel, config, dtype):
    name = kernel_on(sass, kernel, config, dtype)
    bm, bn, bk, threads, core = CONFIGS[config]
    wm, wn, wmiter, wniter, tm, tn = list(map(int, re.findall(r"\d+", core.split(",", 4)[4])))[:6]
    vec = 16 // np.dtype(dtype).itemsize
    fma, wide, narrow = counts(sass[name])
    share = fma / (fma + wide + narrow)
    REPORT.append((name, fma, wide, narrow, share))
    loads_per_k = (wmiter * tm + wniter * tn) // vec
    design = wmiter * tm * wniter * tn / (wmiter * tm * wniter * tn + loads_per_k)
    assert wide >= bk * loads_per_k, (name, wide)
    assert share >= 0.98 * design, (name, share, design)


# The operands each kernel reads as Direct (gemm_tile.cuh), and whether one of them is k-major
# (rows contiguous: 16-byte copies on the warp cores). forward_gather reads its rows through the
# epoch's order into registers; backward's propagation part may compute its delta as it loads.
DIRECT = {"forward": True, "forward_gather": True, "propagate": False, "weight_grad": True, "backward": True}


@pytest.mark.parametrize("kernel", list(GEMM_FILES))
def test_gemm_kernels_copy_tiles_with_cp_async(sass, kernel):
    for name, opcodes in sass.items():
        if not name.startswith(f"{kernel}<"):
            continue
        ops = set(opcodes)
        copies = sorted(op for op in ops if op.startswith(("LDGSTS", "LDGDEPBAR", "DEPBAR")))
        assert any(op.startswith("LDGSTS") for op in ops) and "LDGDEPBAR" in ops and "DEPBAR.LE" in ops, (name,
                                                                                                       copies)
        if "Warp<" in name and DIRECT[kernel]:
            assert "LDGSTS.E.BYPASS.128" in ops, (name, sorted(o for o in ops if o.startswith("LDGSTS")))


def test_no_gemm_kernel_touches_local_memory(sass):
    for name, opcodes in sass.items():
        local = [op for op in opcodes if op.startswith(("LDL", "STL"))]
        assert not local, (name, local[:5])
        if "Warp<" not in name:
            fma, wide, narrow = counts(opcodes)
            REPORT.append((name, fma, wide, narrow, fma / max(1, fma + wide + narrow)))
