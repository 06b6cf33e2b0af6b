"""Launchers of the fused CUDA kernels in kernels/*.cu, behind the ArrayOps interface.

A *loader* supplies the compiled kernels: :func:`cupy_loader` compiles them
with NVRTC through ``cupy.RawModule`` (once per process, cached on disk by
CuPy); the test suite's CUDA-on-CPU harness supplies the same kernels built
with g++ and run on threads, so everything below (argument checks, tile
choice, grid sizes, argument order) is exercised without a GPU.

Every launch is preceded by a check of each argument's type, device,
contiguity, dtype and shape, with an error naming the argument.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import activations as act
from .autotune import Tuner
from .bf16 import WeightCopies
from .launch import make
from .reference import RULE_MODES, ArrayOps, Gather, Output, Propagate, Rule, Update, check_disjoint, check_rule, mixed_key

BLOCK = 256  # threads per block of the elementwise kernels (any multiple of 32 up to 1024)
# Tiles of the CUDA-core GEMMs (gemm_tile.cuh): name: (BM, BN, BK, threads, the core with {T} for the
# float type). Simt: each thread TM x TN outputs strided across the tile, two stages; "tiny": 2 x 2
# outputs per thread and a deep K step, for the latency-bound layers of small nets. Warp (CUTLASS's
# SM80 SIMT list): 8 warps, each lane's fragments contiguous and read from shared memory as 16-byte
# vectors, tiles by cp.async up to 4 (128 x 128) or 3 (128 x 256) stages deep; one block an SM
# (2 would cap a thread at 128 registers: the weight gradient and backward spill). CUTLASS's
# 256 x 128 is left out: its weight gradient spills at 255 registers.
CONFIGS = {"tiny": (32, 32, 32, 256, "Simt<{T}, 32, 32, 32, 2, 2>"),
           "small": (64, 64, 16, 256, "Simt<{T}, 64, 64, 16, 4, 4>"),
           "large": (128, 128, 8, 256, "Simt<{T}, 128, 128, 8, 8, 8>"),
           "warp": (128, 128, 8, 256, "Warp<{T}, 128, 128, 8, 64, 32, 2, 2, 4, 4, 4, 1>"),
           "warp128x256": (128, 256, 8, 256, "Warp<{T}, 128, 256, 8, 64, 64, 2, 2, 8, 4, 3, 1>")}
# The wide tiles: 128 accumulators a thread, so float32 only (in float64 they would take the whole
# register file) and no delta prologue in the weight gradient (its tile in flight would spill).
WIDE_CONFIGS = ("warp128x256",)
# The tensor-core configs: name: (core, (BM, BN), BK (a split-K slice is a multiple of it), threads).
# "tf32" (precision="tf32"): gemm_tf32.cuh Tf32, float32 in and out, 4 warps of 64 x 32. "bf16"
# (precision="bf16"): gemm_bf16.cuh Bf16<128>, the activations, deltas and the weights' copy stored as
# bf16 (uint16 arrays), float32 master weights, bias, loss and update; 4 warps of 64 x 64.
TENSOR_CORES = {"tf32": ("Tf32", (128, 64), 16, 128), "bf16": ("Bf16<128>", (128, 128), 16, 128)}
# fp32/fp64 GEMM paths: our fused kernels with either tile, or cuBLAS with our elementwise kernels
PATHS = (*CONFIGS, "cublas")
# precision="tf32" paths (float32): our tensor-core kernels, or cuBLAS in its TF32 math mode
TF32_PATHS = ("tf32", "cublas_tf32")
# Split-K weight gradients ("large/s4": the large tile, the batch cut in 4 slices), tuned among
# PATHS where every slice keeps at least MIN_SLICE batch rows; no new kernel to compile.
SPLIT_CONFIGS, SPLITS, MIN_SLICE = ("small", "large", "warp"), (2, 4, 8), 64
SPLIT_PATHS = tuple(f"{c}/s{s}" for c in SPLIT_CONFIGS for s in SPLITS)
# the same for the tensor-core weight gradient (precision="tf32"): "tf32/s4"
TF32_SPLIT_PATHS = tuple(f"tf32/s{s}" for s in SPLITS)
# precision="bf16" on the GPU: the GEMM kernels on the Bf16 core (TENSOR_CORES), split-K likewise; no
# cuBLAS path (it reads no bf16 copy of ours, and its results would need a rounding pass)
BF16_PATHS = ("bf16",)
BF16_SPLIT_PATHS = tuple(f"bf16/s{s}" for s in SPLITS)
STORED = {"bf16": np.dtype(np.uint16)}  # precision: the dtype of the activations and deltas, if not the model's
# (kernel, config) not built: bf16 gathers its batch with gather_batch before the first forward (the
# gather's tile in flight through registers spills beside Bf16's 128 accumulators a thread)
UNFUSED = {("forward_gather", "bf16")}
# GEMMs of fewer multiply-adds than this run on the default tile, untuned: they take a few
# microseconds whichever path (launch-bound, and hidden by graphs), and tuning them would
# compile every tile (NVRTC, seconds each) before a small net's first epoch.
TUNE_MIN_FMA = 1 << 24
PRECISIONS = ("fp32", "tf32", "bf16")
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
LOSS_CODES = {"mse": 0, "cross_entropy": 1}
WRITE_GRADIENT, SGD, SGD_MOMENTUM, SGD_NESTEROV, ADAM = range(len(RULE_MODES))  # kernels/update.cuh UpdateMode
GEMM_FILES = {"forward": "forward.cu", "forward_gather": "forward.cu", "propagate": "propagate.cu",
              "weight_grad": "weight_grad.cu", "backward": "backward.cu"}
ELEMENTWISE_FILES = {"delta.cu": ("output_delta", "hidden_delta"),
                     "bias.cu": ("bias_activation", "bias_update", "weight_update", "bf16_copy"),
                     "batch.cu": ("gather_batch", "finish_batch", "shuffle_keys")}
# The bf16 GEMM core alone (gemm_bf16.cuh Bf16<BN>): CudaOps.matmul_bf16, on a tile of
# BF16_TILES: name: ((BM, BN), threads); 128 x 128 the default (2 blocks an SM), 128 x 256 a
# quarter less L2 traffic a FLOP (1 block an SM), tuned between on the GPU
MATMUL_FILE = "matmul.cu"
BF16_TILES = {"128x128": ((128, 128), 128), "128x256": ((128, 256), 256)}
# (trans_a, trans_b) of the products built: a^T b (the weight gradient), a b (the forward), a b^T
# (the propagation)
MATMUL_LAYOUTS = ((True, False), (False, False), (False, True))


# The same products on Hopper's warpgroup tensor cores (matmul_sm90.cu, wgmma): compiled by
# NVRTC for sm_90a alone (CuPy's RawModule cannot target it) and loaded as a cubin; a tile of
# matmul_bf16 where the loader's sm90a is true (compute capability 9.0; the emulator).
SM90A_FILE = "matmul_sm90.cu"
SM90A_FILES = (SM90A_FILE,)
# name: ((BM, BN), threads, dynamic shared bytes: 4 stages of both k tiles of 64, + 1 KB to align)
SM90_TILES = {f"wgmma/128x{bn}": ((128, bn), 256, 4 * (128 + bn) * 64 * 2 + 1024) for bn in (128, 256)}
SM90_TILE = "wgmma/128x128"
SM90_SHARED_MAX = max(shared for _, _, shared in SM90_TILES.values())  # each kernel allowed this much


def matmul_kernel(tile: str, trans_a: bool, trans_b: bool) -> str:
    """The kernel of matmul.cu on a tile of BF16_TILES (or of matmul_sm90.cu on one of SM90_TILES) for
    out = op(a) op(b)."""
    if tile in SM90_TILES:
        return f"matmul_sm90_{SM90_TILES[tile][0][1]}_{'t' if trans_a else 'n'}{'t' if trans_b else 'n'}"
    flag = lambda on: "true" if on else "false"  # noqa: E731
    return f"matmul<Bf16<{BF16_TILES[tile][0][1]}>, {flag(trans_a)}, {flag(not trans_b)}>"



UNTYPED = ("shuffle_keys", "bf16_copy")  # kernels that are not templated on the float type
STORING = ("output_delta", "hidden_delta", "gather_batch")  # elementwise kernels that store activations
# or deltas: also instantiated for bf16 storage (STORED)
ACT_LOGITS = 4  # common.cuh Activation: a softmax's logits (the identity, left unrounded in bf16)
RULE_KERNELS = ("weight_grad", "backward")  # GEMM kernels with an update epilogue: one instance per rule family
CUBLAS_TF32_TENSOR_OP_MATH = 3  # cublasMath_t in cublas_api.h; CuPy 14's cublas module does not export it


def configs_for(dtype: Any) -> tuple[str, ...]:
    """The tile configs compiled, tuned and run for ``dtype``."""
    return tuple(c for c in CONFIGS if np.dtype(dtype) == np.float32 or c not in WIDE_CONFIGS)


def paths_for(dtype: Any) -> tuple[str, ...]:
    """The fp32/fp64 GEMM paths for ``dtype``: its tiles and cuBLAS."""
    return (*configs_for(dtype), "cublas")


def gemm_name(kernel: str, dtype: Any, config: str, family: int = 0) -> str:
    """The instantiation of a GEMM kernel on ``config``; ``family`` 1: with Adam's update rules in
    its epilogue (kernels/update.cuh ADAM_RULES; weight_grad and backward only)."""
    config = split_of(config)[0]
    ctype = CTYPES[np.dtype(dtype)]
    core = TENSOR_CORES[config][0] if config in TENSOR_CORES else CONFIGS[config][4].format(T=ctype)
    return f"{kernel}<{ctype}, {core}{', 1' if family else ''}>"


def family_of(fields: dict | None) -> int:
    """The rule family (kernels/update.cuh) of an UpdateRule's fields: 1 for Adam, else 0."""
    return int(fields is not None and fields["mode"] == ADAM)


def split_of(path: str) -> tuple[str, int]:
    """(tile config, slices) of a path: "large/s4" -> ("large", 4); "small" -> ("small", 1)."""
    config, _, splits = path.partition("/s")
    return config, int(splits) if splits else 1


def split_paths(K: int, tf32: bool = False, bf16: bool = False) -> tuple[str, ...]:
    """The split-K candidates for a weight gradient over a batch of K rows (``tf32``, ``bf16``: on
    that tensor-core core)."""
    paths = BF16_SPLIT_PATHS if bf16 else TF32_SPLIT_PATHS if tf32 else SPLIT_PATHS
    return tuple(p for p in paths if K >= split_of(p)[1] * MIN_SLICE)


def tile_of(config: str) -> tuple[int, int]:
    config = split_of(config)[0]
    return TENSOR_CORES[config][1] if config in TENSOR_CORES else CONFIGS[config][:2]


def threads_of(config: str) -> int:
    """The block of a GEMM kernel on ``config``: its core's THREADS, which the kernels check (any
    other block traps; a test launches each config with this number)."""
    config = split_of(config)[0]
    return TENSOR_CORES[config][3] if config in TENSOR_CORES else CONFIGS[config][3]


def names_in(file: str) -> list[str]:
    """Every instantiation of a file's kernels (NVRTC name expressions)."""
    if file == MATMUL_FILE:
        return [matmul_kernel(tile, *layout) for layout in MATMUL_LAYOUTS for tile in BF16_TILES]
    if file == SM90A_FILE:
        return [matmul_kernel(tile, *layout) for tile in SM90_TILES for layout in MATMUL_LAYOUTS]
    if file in ELEMENTWISE_FILES:
        kernels = ELEMENTWISE_FILES[file]
        return ([elementwise_name(k, t) for k in kernels if k not in UNTYPED for t in CTYPES]
                + [elementwise_name(k, np.float32, "bf16") for k in kernels if k in STORING]
                + [k for k in kernels if k in UNTYPED])
    kernels = [k for k, f in GEMM_FILES.items() if f == file]
    return [name for k in kernels for family in ((0, 1) if k in RULE_KERNELS else (0,))
            for name in [gemm_name(k, dt, c, family) for dt in CTYPES for c in configs_for(dt)]
            + [gemm_name(k, np.float32, core, family) for core in TENSOR_CORES if (k, core) not in UNFUSED]]


def elementwise_name(kernel: str, dtype: Any, precision: str = "fp32") -> str:
    """The instantiation of an elementwise kernel templated on the float type (and, for STORING, on
    the type a precision stores deltas in: ``<float, unsigned short>`` for bf16)."""
    ctype = CTYPES[np.dtype(dtype)]
    return f"{kernel}<{ctype}, unsigned short>" if kernel in STORING and precision in STORED else f"{kernel}<{ctype}>"


KERNEL_FILES = ("delta.cu", "bias.cu", "batch.cu", *dict.fromkeys(GEMM_FILES.values()), MATMUL_FILE)
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.M)


def kernels_dir() -> Any:
    """The CUDA sources: package data of an install, or kernels/ of a source checkout."""
    try:
        return resources.files("gpu_backprop.kernels")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "kernels"


def kernel_source(file: str, _seen: set | None = None) -> str:
    """A kernel file with its quoted #includes inlined (read from the installed
    package), so NVRTC needs no include path and CuPy's cache key sees headers."""
    seen = set() if _seen is None else _seen
    text = kernels_dir().joinpath(file).read_text()

    def inline(match: re.Match) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return kernel_source(name, seen)

    return _INCLUDE.sub(inline, text.replace("#pragma once", ""))


_BY_VALUE = (int, float, str, bool, type(None), np.generic)


def _call_key(name: str, graph_safe: bool, args: tuple, kwargs: dict) -> tuple[tuple, list]:
    """(key, held): a launcher call's arguments, scalars by value and everything else (arrays,
    NamedTuples of arrays) by identity; lists and tuples element by element. ``held`` keeps the
    objects alive with the cache entry, so their ids cannot be reused by others meanwhile."""
    key: list = [name, graph_safe]
    held: list = []

    def add(value: Any) -> None:
        if isinstance(value, _BY_VALUE):
            key.append((type(value), value))
        elif type(value) in (list, tuple):
            key.append("(")
            for v in value:
                add(v)
            key.append(")")
        else:
            key.append(id(value))
            held.append(value)

    for value in args:
        add(value)
    for name_, value in sorted(kwargs.items()):
        key.append(name_)
        add(value)
    return tuple(key), held


def replayed(method: Callable) -> Callable:
    """A launcher whose first call with given arguments records the launches it issues (through
    ``_issue``) and whose later calls with the same arguments re-issue exactly those: the checks,
    structs, tile and path choices of a training step are paid once, not at every step (they
    cost a step on a small net more than its kernels). A launcher called inside another's first
    call just runs, recorded by the outer one."""
    @functools.wraps(method)
    def call(self: "CudaOps", *args: Any, **kwargs: Any) -> Any:
        if self._recording is not None:
            return method(self, *args, **kwargs)
        key, held = _call_key(method.__name__, self._graph_safe, args, kwargs)
        seen = self._launches.get(key)
        if seen is not None:
            for launch in seen[1]:
                launch()
            return seen[2]
        self._recording = []
        try:
            result = method(self, *args, **kwargs)
            launches = self._recording
        finally:
            self._recording = None
        if len(self._launches) >= 256:
            self._launches.clear()
        self._launches[key] = (held, launches, result)
        return result
    return call


def rule_fields(rule: Rule, dtype: np.dtype) -> dict:
    """A rule as the fields of params.cuh's UpdateRule<T>: coefficients in T, the mode's code,
    Adam's count (a device array) or null."""
    typed = np.dtype(dtype).type
    return dict(t=rule.t if rule.mode == "adam" else None, mode=RULE_MODES.index(rule.mode),
                **{name: typed(getattr(rule, name))
                   for name in ("step", "momentum", "l2", "scale", "beta1", "beta2", "eps", "decay")})


def _or(*arrays: Any, unread: Any) -> list:
    """Pointer arguments a rule does not read, as ``unread`` (a raw kernel takes no None)."""
    return [unread if a is None else a for a in arrays]


@dataclass
class _Gemm:
    """One checked GEMM of the backward pass, ready to run on any path."""

    kind: str                       # "propagate" or "weight_grad": the tuner's key and our kernel
    dtype: np.dtype
    shape: tuple[int, int, int]     # M, N (the output tile grid) and K
    params: dict                    # its struct's fields (PropagateParams / WeightGradParams), tiles aside
    run: Callable[[str], None]      # run on a path
    trial: Callable[[str], None]    # what the tuner times (writes no parameter)
    rule: dict | None = None        # a weight update's UpdateRule fields (params.cuh)
    groupable: bool = True          # False: a prologue (backward.cu runs none)
    prologue: bool = False          # a weight gradient that forms delta as it loads (not on WIDE_CONFIGS)

    def part(self, tile: tuple[int, int]) -> dict:
        """Its struct for backward.cu, with the tile grid of ``tile``."""
        tiles_n = -(-self.shape[1] // tile[1])
        return {**self.params, "tiles_n": tiles_n, "tiles": tiles_n * -(-self.shape[0] // tile[0])}


class CupyLoader:
    """Kernels compiled by NVRTC through cupy.RawModule, one module per file."""

    def __init__(self, cupy: Any, device_index: int):
        self.xp = cupy
        self.device_index = device_index
        props = cupy.cuda.runtime.getDeviceProperties(device_index)
        self.sm_count = int(props["multiProcessorCount"])
        self._modules: dict = {}
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.sm90a = (int(props["major"]), int(props["minor"])) == (9, 0)  # wgmma: SM90A_FILES run

    def gemm(self, a: Any, b: Any, out: Any, *, alpha: float = 1.0, beta: float = 0.0,
             trans_a: bool = False, trans_b: bool = False, tf32: bool = False) -> Any:
        """out = alpha op(a) op(b) + beta out through cuBLAS (row-major arrays, no copies);
        ``tf32``: float32 products on the tensor cores (the handle's TF32 math mode, for this call only)."""
        from cupy import cublas

        ops = ("T" if trans_a else "N", "T" if trans_b else "N")
        if not tf32:
            return cublas.gemm(*ops, a, b, out=out, alpha=alpha, beta=beta)
        from cupy_backends.cuda.libs import cublas as lib

        handle = self.xp.cuda.device.get_cublas_handle()
        mode = lib.getMathMode(handle)
        lib.setMathMode(handle, CUBLAS_TF32_TENSOR_OP_MATH)
        try:
            return cublas.gemm(*ops, a, b, out=out, alpha=alpha, beta=beta)
        finally:
            lib.setMathMode(handle, mode)

    def time(self, fn: Any, repeats: int = 5) -> float:
        """Median seconds of ``fn`` by CUDA events, after one warm-up call."""
        cuda = self.xp.cuda
        fn()
        times = []
        for _ in range(repeats):
            start, stop = cuda.Event(), cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cuda.get_elapsed_time(start, stop) / 1e3)
        return float(np.median(times))

    def function(self, file: str, name: str, all_names: Sequence[str]) -> Any:
        """The kernel ``name`` of ``file``, compiled alone: a run compiles only the instantiations
        it launches (each costs NVRTC about a second; a file holds up to 18), cached on disk by CuPy."""
        module = self._modules.get((file, name))
        if module is None:
            if name not in all_names:
                raise ValueError(f"{name}: not a kernel of {file}")
            if file in SM90A_FILES:
                module = self._modules[(file, name)] = self.xp.RawModule(path=str(sm90a_cubin(file)))
                kernel = module.get_function(name)
                kernel.max_dynamic_shared_size_bytes = SM90_SHARED_MAX
                return kernel
            module = self._modules[(file, name)] = self.xp.RawModule(
                code=kernel_source(file), options=("-std=c++17",), name_expressions=[name])
        return module.get_function(name)

    def check_device(self, name: str, array: Any) -> None:
        if not isinstance(array, self.xp.ndarray):
            raise TypeError(f"{name}: expected a CuPy array on cuda:{self.device_index}, "
                            f"got {type(array).__module__}.{type(array).__name__}")
        if array.device.id != self.device_index:
            raise ValueError(f"{name}: expected an array on cuda:{self.device_index}, got one on cuda:{array.device.id}")


def sm90a_cubin(file: str) -> Path:
    """``file`` compiled by NVRTC (CuPy's binding) for sm_90a, its cubin cached on disk by a hash of
    the source and NVRTC's version (beside CuPy's own kernel cache)."""
    from cupy_backends.cuda.libs import nvrtc

    source = kernel_source(file)
    options = ("-std=c++17", "--gpu-architecture=sm_90a")
    digest = hashlib.sha256("\0".join([source, *options, repr(nvrtc.getVersion())]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")
    path = cache / f"gpu_backprop-{Path(file).stem}-sm_90a-{digest}.cubin"
    if path.exists():
        return path
    program = nvrtc.createProgram(source, file, (), ())
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC failed on {file} (sm_90a):\n{nvrtc.getProgramLog(program)}") from error
        cubin = nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(cubin)
    os.replace(partial, path)  # atomic: another process never loads half a cubin
    return path


def cupy_loader(device: Any) -> CupyLoader:
    return CupyLoader(device.xp, device.index)


class CudaOps(ArrayOps):
    """The fused kernels: per layer 1 forward GEMM and 1 backward launch (backward.cu runs the
    error propagation of one layer beside the update of the layer above; the first computes the
    output delta and the loss as it loads them).

    One object serves one stream at a time: its loss ticket, split-K tickets and workspaces
    are shared by its launches, which must not be in flight on two streams at once (fit and
    the rest of the library run on the device's training stream)."""

    fused = True
    tune_min_fma = TUNE_MIN_FMA

    def __init__(self, xp: Any, special: Any, loader: Any, tuner: Tuner | None = None, precision: str = "fp32"):
        super().__init__(xp, special)
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.stored = STORED.get(precision)  # the activations' and deltas' dtype where not the model's
        self.loader = loader
        self.tuner = tuner if tuner is not None else Tuner.for_loader(loader)
        self.max_blocks = 8 * int(loader.sm_count)  # grid cap of the elementwise kernels
        self._ticket = xp.zeros(1, dtype=np.uint32)
        # launcher calls seen (replayed): their arguments' key -> (the arguments, held; the
        # launches issued; the result); and the launches of the call being recorded
        self._launches: dict = {}
        self._recording: list | None = None
        self._chosen: dict = {}  # gemm_paths()
        self._graph_safe = False  # capturable(): our kernels only
        # precision="bf16": each weight's bf16 copy, written by the update epilogues (W_copy)
        self._copies = WeightCopies(self._new_copy, lambda W, copy: self._bf16_copy(W, copy))

    @contextlib.contextmanager
    def capturable(self) -> Iterator[None]:
        """Within: every GEMM runs on our kernels, never cuBLAS, whose calls CuPy refuses inside
        a CUDA-graph capture; the tuner chooses among them under keys of their own ("...|graph"),
        so a shape's free choice and its capturable one are both kept."""
        outer, self._graph_safe = self._graph_safe, True
        try:
            yield
        finally:
            self._graph_safe = outer

    # -- plumbing -------------------------------------------------------------
    def _kernel(self, file: str, name: str) -> Any:
        return self.loader.function(file, name, names_in(file))

    def _issue(self, launch: Callable[[], Any]) -> None:
        """Run one launch now (a kernel, a cuBLAS call, a CuPy operation); inside a launcher's
        first call, also record it for the replays (see :func:`replayed`)."""
        if self._recording is not None:
            self._recording.append(launch)
        launch()

    def _launch(self, file: str, name: str, grid: tuple, block: tuple, args: list, shared_mem: int = 0) -> None:
        kernel = self._kernel(file, name)
        if shared_mem:
            self._issue(lambda: kernel(grid, block, args, shared_mem=shared_mem))
        else:
            self._issue(lambda: kernel(grid, block, args))

    def _unrecorded(self, trial: Callable[[str], None]) -> Callable[[str], None]:
        """The tuner's trials, run but never recorded: a replay runs the chosen path only."""
        def run(path: str) -> None:
            recording, self._recording = self._recording, None
            try:
                trial(path)
            finally:
                self._recording = recording
        return run

    def _check(self, name: str, array: Any, shape: tuple, dtype: Any) -> None:
        self.loader.check_device(name, array)
        if array.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {array.dtype}")
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(array.shape)}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array (use xp.ascontiguousarray)")

    def _dtype_of(self, name: str, array: Any) -> np.dtype:
        self.loader.check_device(name, array)
        dtype = np.dtype(array.dtype)
        if dtype not in CTYPES:
            raise TypeError(f"{name}: expected float32 or float64, got {dtype}")
        return dtype

    def _model_dtype(self, name: str, array: Any) -> np.dtype:
        """The model's dtype, from an activation or delta: its own dtype, but float32 where these
        operations store them in another (precision="bf16": uint16 bits; the launcher's checks take
        or refuse the array itself)."""
        if self.stored is None:
            return self._dtype_of(name, array)
        self.loader.check_device(name, array)
        return np.dtype(np.float32)

    def storage_dtype(self, dtype: Any) -> np.dtype:
        return self.stored if self.stored is not None else np.dtype(dtype)

    def as_stored(self, x: Any) -> Any:
        if self.stored is None or getattr(x, "dtype", None) == self.stored:
            return x
        return self._operand("X", x, x.shape, np.float32)

    def _check_stored(self, name: str, array: Any, shape: tuple, dtype: Any) -> None:
        """An activation or delta of a ``dtype`` model as these operations store it (storage_dtype)."""
        self._check(name, array, shape, self.storage_dtype(dtype))

    def _operand(self, name: str, o: Any, shape: tuple, dtype: Any) -> Any:
        """An activation a GEMM reads: as stored, or (precision="bf16") a ``dtype`` array, such as the
        input X, rounded to bf16 first into a buffer of its own (bias.cu bf16_copy): the twin's
        rounding of whatever it multiplies."""
        if self.stored is not None and getattr(o, "dtype", None) == dtype:
            self._check(name, o, shape, dtype)
            rounded = self._scratch(f"rounded {name}", shape, self.stored)
            self._bf16_copy(o, rounded)
            return rounded
        self._check_stored(name, o, shape, dtype)
        return o

    # -- precision="bf16": the weights' copies ---------------------------------
    def bf16_weights(self, W: Any) -> Any:
        """The bf16 copy (uint16 bits) of W that the GEMMs read: made from W when there is none,
        rewritten by each update epilogue (WeightGradParams.W_copy) and by :meth:`params_written`."""
        return self._copies.get(W)

    def _new_copy(self, W: Any) -> Any:
        """A new copy of W, rounded now: launched here, never recorded (a replay would repeat it)."""
        self._check("W", W, W.shape, np.float32)
        copy = self.xp.empty(W.shape, dtype=np.uint16)
        recording, self._recording = self._recording, None
        try:
            self._bf16_copy(W, copy)
        finally:
            self._recording = recording
        return copy

    def _bf16_copy(self, x: Any, out: Any) -> None:
        self._launch("bias.cu", "bf16_copy", self._grid_1d(x.size), (BLOCK, 1, 1), [x, out, np.int64(x.size)])

    def _refresh_copy(self, W: Any) -> None:
        """W's copy rounded again from W after an update outside the GEMM epilogues (apply_rule), as a
        recorded launch, so every replay repeats it (a copy W has none of yet is made first, unrecorded)."""
        self._bf16_copy(W, self._copies.get(W))

    def params_written(self) -> None:
        """Parameters were written other than by these operations' updates (set_params, a restore):
        every weight's bf16 copy is rounded again from it, in place (captured steps read it there)."""
        self._copies.refresh_all()

    def _weights_read(self, W: Any) -> Any:
        """What a GEMM reads of W: W, or with precision="bf16" its copy."""
        return W if self.stored is None else self.bf16_weights(W)

    def gemm_config(self, M: int, N: int) -> str:
        """The large tile when it still gives every SM a block, else the small one."""
        bm, bn = CONFIGS["large"][:2]
        return "large" if -(-M // bm) * -(-N // bn) >= self.loader.sm_count else "small"

    def gemm_path(self, kind: str, dtype: Any, M: int, N: int, K: int, config: str | None,
                  trial: Any, prologue: bool = False) -> str:
        """``config`` when given, else the tuned (or default) path for this shape: among our
        tiles and cuBLAS, or for precision="tf32" (float32) among our tensor-core kernels and
        cuBLAS's TF32 mode. ``prologue``: a weight gradient forming delta as it loads (tuned
        apart, and never on the wide tiles)."""
        kind = f"{kind}+prologue" if prologue else kind
        path = self._gemm_path(kind, dtype, M, N, K, config, self._unrecorded(trial))
        self._chosen[f"{kind}|{np.dtype(dtype).name}|{M}x{N}x{K}{'|graph' if self._graph_safe else ''}"] = path
        return path

    def gemm_paths(self) -> dict[str, str]:
        """The path each GEMM shape ran on ("kind|dtype|MxNxK": a tile, a split like large/s4, or
        cublas): what the tuner chose, or the config forced."""
        return dict(self._chosen)

    def _gemm_path(self, kind: str, dtype: Any, M: int, N: int, K: int, config: str | None, trial: Any) -> str:
        weight_grad, prologue = kind.startswith("weight_grad"), kind.endswith("+prologue")
        splits = split_paths(K) if weight_grad else ()
        if config is not None:
            all_paths = (*PATHS, *TF32_PATHS, *BF16_PATHS)
            all_splits = SPLIT_PATHS + TF32_SPLIT_PATHS + BF16_SPLIT_PATHS
            if config not in all_paths and not (weight_grad and config in all_splits):
                raise ValueError(f"config: expected one of {', '.join(all_paths)}"
                                 f"{' or a split like large/s4' if weight_grad else ''}, got {config!r}")
            if (split_of(config)[0] == "bf16") != (self.precision == "bf16"):
                raise ValueError(f"config: {config} with precision={self.precision!r}: precision='bf16' runs on "
                                 f"the bf16 kernels only ({', '.join(BF16_PATHS + BF16_SPLIT_PATHS)}), and they "
                                 f"on it only")
            if (split_of(config)[0] in TF32_PATHS + BF16_PATHS or config in WIDE_CONFIGS) \
                    and np.dtype(dtype) != np.float32:
                raise TypeError(f"config: {config} needs float32 arrays, got {np.dtype(dtype).name}")
            if prologue and config in WIDE_CONFIGS:
                raise ValueError(f"config: {config} runs no delta prologue (o_next given); "
                                 f"expected one of {', '.join(p for p in PATHS if p not in WIDE_CONFIGS)}")
            return config
        graph = "|graph" if self._graph_safe else ""
        small = M * N * K < self.tune_min_fma  # one candidate: the default, nothing timed
        if self.precision == "bf16":
            if np.dtype(dtype) != np.float32:
                raise TypeError(f"precision='bf16' needs float32 arrays, got {np.dtype(dtype).name}")
            bf16_splits = split_paths(K, bf16=True) if weight_grad else ()
            paths = ("bf16",) if small else ("bf16", *bf16_splits)
            return self.tuner.choose(f"{kind}|bf16|{M}x{N}x{K}{graph}", paths, trial, default="bf16")
        if self.precision == "tf32" and np.dtype(dtype) == np.float32:
            tf32_splits = split_paths(K, tf32=True) if weight_grad else ()
            paths = ("tf32",) if small else tuple(p for p in TF32_PATHS + tf32_splits
                                                  if not (graph and p.startswith("cublas")))
            return self.tuner.choose(f"{kind}|tf32|{M}x{N}x{K}{graph}", paths, trial, default="tf32")
        key = f"{kind}|{np.dtype(dtype).name}|{M}x{N}x{K}{graph}"
        default = self.gemm_config(M, N)
        paths = (default,) if small else tuple(p for p in paths_for(dtype) + splits
                                               if not (graph and p.startswith("cublas"))
                                               and not (prologue and p in WIDE_CONFIGS))
        return self.tuner.choose(key, paths, trial, default=default)

    def _cublas(self, path: str, a: Any, b: Any, out: Any, **kwargs: Any) -> None:
        self._issue(lambda: self.loader.gemm(a, b, out, tf32=path == "cublas_tf32", **kwargs))

    def _gemm(self, kernel: str, dtype: Any, M: int, N: int, config: str, args: list, slices: int = 1,
              family: int = 0) -> None:
        bm, bn = tile_of(config)
        grid = (-(-N // bn), -(-M // bm), slices)
        self._launch(GEMM_FILES[kernel], gemm_name(kernel, dtype, config, family), grid, (threads_of(config), 1, 1),
                     args)

    def _grid_1d(self, n: int) -> tuple[int, int, int]:
        return (max(1, min(-(-n // BLOCK), self.max_blocks)), 1, 1)

    # -- forward --------------------------------------------------------------
    @replayed
    def forward(self, o: Any, W: Any, b: Any, activation: str, out: Any, gather: Gather | None = None,
                config: str | None = None) -> Any:
        """out = f(o W + b): our GEMM with bias and activation in its epilogue, or, where the
        tuner found it faster for this shape, cuBLAS then one bias-activation kernel. With
        ``gather``, o is first gathered (ArrayOps.forward): inside our GEMM as it loads o.

        precision="bf16": o as stored (uint16 bits; a float32 o, such as the input X, is rounded
        first), W's bf16 copy read; ``out`` uint16 (a hidden layer's activations) or float32 (the
        output layer's y_hat: bf16 values, but a softmax's logits exact until the softmax, whose
        output is rounded)."""
        dtype = self._model_dtype("o", o)
        batch, n_in = o.shape if getattr(o, "ndim", None) == 2 else (-1, -1)
        n_out = W.shape[1] if W.ndim == 2 else -1
        self._check("W", W, (n_in, n_out), dtype)
        self._check("b", b, (n_out,), dtype)
        y_hat = self.stored is not None and getattr(out, "dtype", None) == dtype
        # (a softmax's output is y_hat: CuPy's softmax runs in float)
        self._check("out", out, (batch, n_out), dtype if y_hat or activation == "softmax" else self.storage_dtype(dtype))
        elementwise = "identity" if activation == "softmax" else act.check_activation(activation, act.HIDDEN)
        # bf16: a softmax's logits stay unrounded (common.cuh ACT_LOGITS); its output is rounded
        code = np.int32(ACT_LOGITS if activation == "softmax" and self.precision == "bf16" else act.CODES[elementwise])
        if gather is not None:
            self._check_gather(gather.X, gather.Y, gather.order, gather.step, o, gather.yb)
        self._check_forward(o, W, b, out, gather)
        o = self._operand("o", o, (batch, n_in), dtype) if gather is None else o
        params = make("ForwardParams", dtype, o=o, W=self._weights_read(W), b=b, out=None if y_hat else out,
                      y_hat=out if y_hat else None, M=batch, N=n_out, K=n_in, act=code)

        def run(path: str) -> None:
            if path.startswith("cublas"):
                self._cublas(path, o, W, out)
                self._launch("bias.cu", f"bias_activation<{CTYPES[dtype]}>", self._grid_1d(out.size), (BLOCK, 1, 1),
                             [out, b, code, np.int64(batch), np.int64(n_out)])
            else:
                self._gemm("forward", dtype, batch, n_out, path, [params])

        path = self.gemm_path("forward", dtype, batch, n_out, n_in, config, run)
        if gather is not None and not path.startswith("cublas") and ("forward_gather", path) not in UNFUSED:
            g = gather
            self._gemm("forward_gather", dtype, batch, n_out, path, [params, make(
                "GatherParams", dtype, X=g.X, Y=g.Y, order=g.order, step=g.step, yb=g.yb, stride=g.stride,
                n_y=g.yb.shape[1])])
        else:
            if gather is not None:
                self.gather_batch(*gather[:5], o, gather.yb)
            run(path)
        if activation == "softmax":  # a row-wise reduction: CuPy's kernels, after the GEMM
            self._issue(lambda: act.activate(self.xp, self.special, "softmax", out, out))
            self._store_bf16(out)
        return out

    def _store_bf16(self, out: Any) -> None:
        """precision="bf16": a softmax's output (CuPy's kernels, never in a captured step:
        capture_blocker) rounded to bf16 as our kernels store theirs; else nothing."""
        if self.precision == "bf16":
            from .bf16 import round_bf16_in_place

            self._issue(lambda: round_bf16_in_place(self.xp, out))

    # -- the bf16 core -------------------------------------------------------
    @replayed
    def matmul_bf16(self, a: Any, b: Any, out: Any, *, trans_a: bool = False, trans_b: bool = False,
                    tile: str | None = None) -> Any:
        """out = op(a) op(b) on the bf16 tensor cores (matmul.cu): a and b bf16 bits as uint16, out
        float32, float sums (ArrayOps.matmul_bf16); the layouts of MATMUL_LAYOUTS (not both
        transposed). ``tile``: one of BF16_TILES, or of SM90_TILES where the loader has sm90a; else the
        tuned one of those for this shape (the default below TUNE_MIN_FMA)."""
        K, M, N = self._check_matmul_bf16(a, b, out, trans_a, trans_b)
        if (trans_a, trans_b) not in MATMUL_LAYOUTS:
            raise ValueError("trans_a, trans_b: both transposed is not one of the bf16 kernels' layouts "
                             "(a^T b, a b, a b^T): pass b^T's bits as b")
        self._check("a", a, a.shape, np.uint16)
        self._check("b", b, b.shape, np.uint16)
        self._check("out", out, (M, N), np.float32)
        tiles = (*BF16_TILES, *SM90_TILES) if getattr(self.loader, "sm90a", False) else tuple(BF16_TILES)
        if tile is not None and tile not in tiles:
            raise ValueError(f"tile: expected one of {', '.join(tiles)}, got {tile!r}")
        params = make("MatmulParams", np.float32, a=a, b=b, out=out, M=M, N=N, K=K)

        def run(tile: str) -> None:
            if tile in SM90_TILES:
                ((bm, bn), threads, shared), file = SM90_TILES[tile], SM90A_FILE
            else:
                ((bm, bn), threads), shared, file = BF16_TILES[tile], 0, MATMUL_FILE
            self._launch(file, matmul_kernel(tile, trans_a, trans_b), (-(-N // bn), -(-M // bm), 1),
                         (threads, 1, 1), [params], shared)

        if tile is None:
            tiles = ("128x128",) if M * N * K < self.tune_min_fma else tiles
            layout = f"{'T' if trans_a else 'N'}{'T' if trans_b else 'N'}"
            tile = self.tuner.choose(f"matmul_bf16|{layout}|{M}x{N}x{K}", tiles, self._unrecorded(run),
                                     default="128x128")
        run(tile)
        return out

    # -- deltas ---------------------------------------------------------------
    @replayed
    def output_delta(self, y_hat: Any, y: Any, activation: str, loss: str, out: Any, loss_out: Any) -> Any:
        codes = self._output_codes(y_hat, y, activation, loss, out, loss_out)
        self._check_output_delta(y_hat, y, out, loss_out)
        dtype, n = np.dtype(y_hat.dtype), int(y_hat.size)
        partials = self._scratch("partials", (self.max_blocks,), np.float64)
        self._launch("delta.cu", elementwise_name("output_delta", dtype, self.precision),
                     self._grid_1d(n), (BLOCK, 1, 1),
                     [y_hat, y, out, *codes, np.int64(n), partials, self._ticket, loss_out])
        return out

    def _output_codes(self, y_hat: Any, y: Any, activation: str, loss: str, out: Any,
                      loss_out: Any) -> tuple[np.int32, np.int32]:
        """Checks of an output delta's arguments; (activation code, loss code) for the kernels."""
        dtype = self._dtype_of("y_hat", y_hat)
        self._check("y", y, y_hat.shape, dtype)
        self._check_stored("out", out, y_hat.shape, dtype)
        self._check("y_hat", y_hat, y_hat.shape, dtype)
        self._check("loss_out", loss_out, (1,), dtype)
        if loss not in LOSS_CODES:
            raise ValueError(f"loss: expected one of {', '.join(LOSS_CODES)}, got {loss!r}")
        code = 0 if loss == "cross_entropy" else act.CODES[act.check_activation(activation, act.HIDDEN)]
        return np.int32(code), np.int32(LOSS_CODES[loss])

    @replayed
    def hidden_delta(self, err: Any, o: Any, activation: str, out: Any) -> Any:
        """out = err * f'(o); precision="bf16": all three as stored (uint16), the product in float32."""
        dtype = self._model_dtype("err", err)
        for name, array in (("err", err), ("o", o), ("out", out)):
            self._check_stored(name, array, err.shape, dtype)
        self._check_hidden_delta(err, o, out)
        return self._hidden_delta(err, o, out, np.int32(act.CODES[act.check_activation(activation)]))

    def _hidden_delta(self, err: Any, o: Any, out: Any, code: np.int32) -> Any:
        n = int(err.size)
        dtype = np.float32 if self.stored is not None else err.dtype
        self._launch("delta.cu", elementwise_name("hidden_delta", dtype, self.precision),
                     self._grid_1d(n), (BLOCK, 1, 1), [err, o, out, code, np.int64(n)])
        return out

    # -- the fit loop's bookkeeping --------------------------------------------
    def shuffle_keys(self, key: int, keys: Any, step: Any) -> None:
        n = keys.shape[0] if keys.ndim == 1 else -1
        self._check("keys", keys, (n,), np.uint64)
        self._check("step", step, (1,), np.int64)
        check_disjoint(self.xp, [("keys", keys), ("step", step)], [])
        self._launch("batch.cu", "shuffle_keys", self._grid_1d(n), (BLOCK, 1, 1),
                     [keys, step, np.uint64(mixed_key(key)), np.int64(n)])

    def _check_gather(self, X: Any, Y: Any, order: Any, step: Any, xb: Any, yb: Any) -> None:
        dtype = self._dtype_of("X", X)
        n, n_x = X.shape
        batch, n_y = xb.shape[0], Y.shape[1] if Y.ndim == 2 else -1
        self._check("X", X, (n, n_x), dtype)
        self._check("Y", Y, (n, n_y), dtype)
        self._check("order", order, (n,), np.int64)
        self._check("step", step, (1,), np.int64)
        self._check_stored("xb", xb, (batch, n_x), dtype)
        self._check("yb", yb, (batch, n_y), dtype)
        self._check_gather_disjoint(X, Y, order, step, xb, yb)

    @replayed
    def gather_batch(self, X: Any, Y: Any, order: Any, step: Any, stride: int, xb: Any, yb: Any) -> None:
        self._check_gather(X, Y, order, step, xb, yb)
        dtype = np.dtype(X.dtype)
        batch, n_x, n_y = xb.shape[0], X.shape[1], Y.shape[1]
        self._launch(
            "batch.cu", elementwise_name("gather_batch", dtype, self.precision), self._grid_1d(batch * (n_x + n_y)),
            (BLOCK, 1, 1),
            [X, Y, order, step, xb, yb, np.int64(batch), np.int64(stride), np.int64(n_x), np.int64(n_y)])

    def _check_record(self, loss: Any, losses: Any, correct: Any, step: Any, count: bool) -> None:
        dtype = self._dtype_of("loss", loss)
        self._check("loss", loss, (1,), dtype)
        self._check("losses", losses, losses.shape, dtype)
        self._check("correct", correct, losses.shape, np.int64)
        self._check("step", step, (1,), np.int64)

    @replayed
    def finish_batch(self, y_hat: Any, yb: Any, loss: Any, losses: Any, correct: Any, step: Any,
                     count: bool) -> None:
        dtype = self._dtype_of("y_hat", y_hat)
        self._check("yb", yb, y_hat.shape, dtype)
        self._check_record(loss, losses, correct, step, count)
        check_disjoint(self.xp, [("losses", losses), ("correct", correct), ("step", step)],
                       [("y_hat", y_hat), ("yb", yb), ("loss", loss)])
        batch, n_out = y_hat.shape
        self._launch(
            "batch.cu", f"finish_batch<{CTYPES[dtype]}>", (1, 1, 1), (BLOCK, 1, 1),
            [y_hat, yb, loss, losses, correct, step, np.int32(bool(count)), np.int64(batch), np.int64(n_out)])

    # -- backward GEMMs -------------------------------------------------------
    @replayed
    def propagate(self, delta: Any, W: Any, o: Any, activation: str, out: Any, config: str | None = None) -> Any:
        """out = (delta W^T) * f'(o): the derivative in our GEMM's epilogue (or cuBLAS, then
        the derivative in place, where tuned faster)."""
        self._check_propagate(delta, W, o, out)
        self._run([self._propagate_gemm(delta, W, o, activation, out)], config)
        return out

    def _propagate_gemm(self, delta: Any, W: Any, o: Any, activation: str, out: Any) -> _Gemm:
        """(precision="bf16": delta, o and out as stored, uint16; W's bf16 copy read.)"""
        dtype = self._model_dtype("delta", delta)
        batch, n_out = delta.shape if getattr(delta, "ndim", None) == 2 else (-1, -1)
        n_in = W.shape[0]
        self._check_stored("delta", delta, (batch, n_out), dtype)
        self._check("W", W, (n_in, n_out), dtype)
        self._check_stored("o", o, (batch, n_in), dtype)
        self._check_stored("out", out, (batch, n_in), dtype)
        code = np.int32(act.CODES[act.check_activation(activation)])
        params = dict(delta=delta, W=self._weights_read(W), o=o, out=out, M=batch, N=n_in, K=n_out, act=code)

        def run(path: str) -> None:
            if path.startswith("cublas"):
                self._cublas(path, delta, W, out, trans_b=True)
                self._hidden_delta(out, o, out, code)  # in place: err * f'(o)
            else:
                self._gemm("propagate", dtype, batch, n_in, path, [make("PropagateParams", dtype, **params)])

        return _Gemm("propagate", dtype, (batch, n_in, n_out), params, run, run)

    def _weight_grad_gemm(self, o: Any, g: Any, W: Any, b: Any, rule: Rule, vel_w: Any = None, vel_b: Any = None,
                          sq_w: Any = None, sq_b: Any = None, o_next: Any = None, activation: str = "identity",
                          delta_out: Any = None, o_name: str = "o") -> _Gemm:
        """(precision="bf16": o as stored, or float32 rounded first; delta, o_next and delta_out as
        stored; the update epilogue rewrites W's bf16 copy.)"""
        mode = RULE_MODES.index(rule.mode)
        dtype = self._model_dtype("o", o)
        batch, n_in = o.shape if getattr(o, "ndim", None) == 2 else (-1, -1)
        n_out = g.shape[1] if getattr(g, "ndim", None) == 2 else -1
        self._check_stored("delta", g, (batch, n_out), dtype)
        self._check("W" if mode else "grad_w", W, (n_in, n_out), dtype)
        self._check("b" if mode else "grad_b", b, (n_out,), dtype)
        prologue = o_next is not None
        if prologue:
            if delta_out is None:
                raise ValueError("delta_out: required when o_next is given (the prologue writes delta)")
            self._check_stored("o_next", o_next, (batch, n_out), dtype)
            self._check_stored("delta_out", delta_out, (batch, n_out), dtype)
        states = [("vel_w", vel_w, (n_in, n_out)), ("vel_b", vel_b, (n_out,)),
                  ("sq_w", sq_w, (n_in, n_out)), ("sq_b", sq_b, (n_out,))][:2 * rule.states]
        for name, array, shape in states:
            self._check(name, array, shape, dtype)
        vel_w, vel_b, sq_w, sq_b = [a for _, a, _ in states] + [None] * (4 - len(states))  # unread ones: null
        if mode == ADAM:
            self._check("rule.t", rule.t, (1,), np.int64)
        fields = rule_fields(rule, dtype)
        code = np.int32(act.CODES[act.check_activation(activation)])
        ctype = CTYPES[dtype]
        o = self._operand(o_name, o, (batch, n_in), dtype)
        params = dict(o=o, g=g, o_next=o_next if prologue else None, delta_out=delta_out if prologue else None,
                      W=W, b=b, W_copy=self.bf16_weights(W) if mode and self.stored is not None else None,
                      vel_w=vel_w, vel_b=vel_b, sq_w=sq_w, sq_b=sq_b, M=n_in, N=n_out, K=batch, act=code,
                      has_prologue=int(prologue))

        def launch(path: str, params: dict, fields: dict) -> None:
            rule_struct = make("UpdateRule", dtype, **fields)
            if not path.startswith("cublas"):
                if params["has_prologue"] and split_of(path)[0] == "bf16":  # the Bf16 core runs no prologue:
                    self._hidden_delta(g, params["o_next"], params["delta_out"], code)  # delta formed first
                    params = dict(params, g=params["delta_out"], o_next=None, delta_out=None, has_prologue=0)
                split, slices = self._split_k(path, dtype, n_in, n_out, batch)
                self._gemm("weight_grad", dtype, n_in, n_out, path,
                           [make("WeightGradParams", dtype, **params), rule_struct, split], slices, family_of(fields))
                return
            W, b = params["W"], params["b"]
            delta = self._hidden_delta(g, params["o_next"], params["delta_out"], code) if params["has_prologue"] else g
            mode, step, momentum = fields["mode"], fields["step"], fields["momentum"]
            plain = fields["l2"] == 0 and mode in (WRITE_GRADIENT, SGD, SGD_MOMENTUM)  # cuBLAS's alpha, beta do it
            if plain and mode == SGD_MOMENTUM:
                vel_w = params["vel_w"]
                self._cublas(path, o, delta, vel_w, alpha=-step, beta=momentum, trans_a=True)
                self._issue(lambda: W.__iadd__(vel_w))
            elif plain and mode == SGD:
                self._cublas(path, o, delta, W, alpha=-step, beta=1.0, trans_a=True)
            elif plain:
                self._cublas(path, o, delta, W, trans_a=True)
            else:  # dW to scratch, then the rule elementwise
                grad_w = self._scratch("grad_w", (n_in, n_out), dtype)
                self._cublas(path, o, delta, grad_w, trans_a=True)
                self._launch("bias.cu", f"weight_update<{ctype}>", self._grid_1d(n_in * n_out), (BLOCK, 1, 1),
                             [W, *_or(params["vel_w"], params["sq_w"], unread=W), grad_w, rule_struct,
                              np.int64(n_in * n_out), np.int32(1)])
            self._launch("bias.cu", f"bias_update<{ctype}>", (-(-n_out // 32), 1, 1), (32, 8, 1),
                         [delta, b, *_or(params["vel_b"], params["sq_b"], unread=b), rule_struct, np.int64(batch),
                          np.int64(n_out)])

        def trial(path: str) -> None:
            # the same GEMM and prologue (its cost differs most between paths: ours forms delta as it
            # loads, cuBLAS's needs a pass of its own), results to scratch: W, b and delta_out untouched
            scratch = dict(params, W=self._scratch("tune_w", (n_in, n_out), dtype),
                           b=self._scratch("tune_b", (n_out,), dtype), W_copy=None, vel_w=None, vel_b=None, sq_w=None,
                           sq_b=None, delta_out=self._scratch("tune_delta", (batch, n_out), self.storage_dtype(dtype))
                           if prologue else None)
            launch(path, scratch, dict(fields, mode=WRITE_GRADIENT, t=None))

        return _Gemm("weight_grad", dtype, (n_in, n_out, batch), params, lambda path: launch(path, params, fields),
                     trial, fields, groupable=not prologue, prologue=prologue)

    def _split_k(self, path: str, dtype: Any, M: int, N: int, K: int) -> tuple[np.ndarray, int]:
        """The SplitK struct of a weight gradient on ``path`` and its number of slices: each a
        multiple of BK batch rows; workspace and tickets kept per shape (tickets zeroed once,
        reset by the kernel)."""
        config, splits = split_of(path)
        if splits <= 1 or K == 0:
            return make("SplitK", dtype), 1
        bk = TENSOR_CORES[config][2] if config in TENSOR_CORES else CONFIGS[config][2]
        slice_k = -(-(-(-K // splits)) // bk) * bk
        slices = -(-K // slice_k)
        bm, bn = tile_of(config)
        tiles = -(-M // bm) * -(-N // bn)
        tickets = self._scratch(f"tickets/{config}", (tiles,), np.uint32, zeroed=True)
        return make("SplitK", dtype, partials=self._scratch("split_w", (slices, M, N), dtype),
                    bias_partials=self._scratch("split_b", (slices, N), dtype), tickets=tickets, slice_k=slice_k,
                    splits=slices), slices

    def _groups(self, gemms: Sequence[_Gemm], paths: Sequence[str], output: Output | None) -> bool:
        """Whether ``gemms`` (and the output delta) run as one backward.cu launch: more than one
        part to run, none tuned to cuBLAS, at most one propagation (listed first) and two
        updates, no prologue, one update rule."""
        props = [g for g in gemms if g.kind == "propagate"]
        updates = [g for g in gemms if g.kind == "weight_grad"]
        rules = {make("UpdateRule", u.dtype, **u.rule).tobytes() for u in updates}
        return ((len(gemms) > 1 or (output is not None and bool(props)))
                and not any(p.startswith("cublas") or split_of(p)[1] > 1 for p in paths)
                and len(props) <= 1 and len(updates) <= 2 and (not props or gemms[0] is props[0])
                and all(g.groupable for g in gemms) and len(rules) <= 1)

    def _run(self, gemms: Sequence[_Gemm], config: str | None, output: Output | None = None) -> list:
        """Run GEMMs that touch disjoint memory: in one backward.cu launch where ``_groups`` says
        so (on the tile tuned for the largest of them: a launch saved outweighs a tile choice),
        with the output delta computed inside the propagation when ``output`` is given; else
        the output delta kernel, then the GEMMs one after another. Returns what it ran, as
        calls that run the same launches again (on the same arrays)."""
        paths = [self.gemm_path(g.kind, g.dtype, *g.shape, config, g.trial, prologue=g.prologue) for g in gemms]
        grouped = self._groups(gemms, paths, output)
        launches: list = []
        # Inside the group only the propagation computes the output delta as it loads it: an
        # update that reads the same delta needs it written first, by a launch of its own.
        fused_output = (grouped and gemms[0].kind == "propagate"
                        and not any(g.params["g"] is gemms[0].params["delta"] for g in gemms[1:]))
        if output is not None and not fused_output:
            params = gemms[0].params
            delta = params["delta"] if gemms[0].kind == "propagate" else params["g"]
            out = output
            launches.append(lambda: self.output_delta(out.y_hat, out.y, out.activation, out.loss, delta,
                                                      out.loss_out))
            if output.record is not None:
                launches.append(lambda: self.finish_batch(out.y_hat, out.y, out.loss_out, *out.record))
            output = None
        if grouped:
            path = max(zip(gemms, paths), key=lambda gp: int(np.prod(gp[0].shape)))[1]
            launches.append(self._backward_launch(gemms, path, output))
        else:
            launches += [lambda gemm=gemm, path=path: gemm.run(path) for gemm, path in zip(gemms, paths)]
        for launch in launches:
            launch()
        return launches

    def _backward_launch(self, gemms: Sequence[_Gemm], path: str, output: Output | None) -> Callable[[], None]:
        """One backward.cu launch on ``path``'s tile, ready to run: its parts as structs
        (params.cuh), an absent part with no tiles and null pointers."""
        dtype = gemms[0].dtype
        tile = tile_of(path)
        prop = gemms[0] if gemms[0].kind == "propagate" else None
        u, v = ([g for g in gemms if g.kind == "weight_grad"] + [None, None])[:2]
        p_part = prop.part(tile) if prop else {}
        out = {}
        record = {}
        if output is not None:
            act_code, loss_code = self._output_codes(output.y_hat, output.y, output.activation, output.loss,
                                                     p_part["delta"], output.loss_out)
            parts = max(self.max_blocks, p_part["tiles"] // p_part["tiles_n"])  # loss partials: 1 per row tile
            out = dict(on=1, y_hat=output.y_hat, y=output.y, act=act_code, loss=loss_code,
                       loss_out=output.loss_out, partials=self._scratch("partials", (parts,), np.float64),
                       hit_partials=self._scratch("hit_partials", (parts,), np.int64), ticket=self._ticket)
            if output.record is not None:
                r = output.record
                self._check_record(output.loss_out, r.losses, r.correct, r.step, r.count)
                record = dict(on=1, losses=r.losses, correct=r.correct, step=r.step, count=int(bool(r.count)))
        args = [make("PropagateParams", dtype, **p_part), make("OutputParams", dtype, **out),
                make("StepRecord", dtype, **record),
                make("WeightGradParams", dtype, **(u.part(tile) if u else {})),
                make("WeightGradParams", dtype, **(v.part(tile) if v else {})),
                make("UpdateRule", dtype, **(u.rule if u else {"mode": SGD}))]
        n_blocks = sum(g.part(tile)["tiles"] for g in gemms)
        kernel = self._kernel("backward.cu", gemm_name("backward", dtype, path, family_of(u.rule if u else None)))
        return lambda: self._issue(lambda: kernel((n_blocks, 1, 1), (threads_of(path), 1, 1), args))

    @replayed
    def backward(self, propagate: Propagate | None, updates: Sequence[Update], output: Output | None = None,
                 config: str | None = None) -> None:
        """An error propagation and up to two weight updates of other layers, the output delta
        first when ``output`` is given (see ArrayOps.backward): one launch of backward.cu when
        the tuner put none of them on cuBLAS, else each on its own path. Raises before any
        launch if what one part writes overlaps what another reads or writes."""
        self._check_backward(propagate, updates, output)
        gemms = [self._propagate_gemm(*propagate)] if propagate is not None else []
        for i, u in enumerate(updates):
            rule = u.effective_rule
            check_rule(rule, u.vel_w, u.vel_b, u.sq_w, u.sq_b)
            gemms.append(self._weight_grad_gemm(u.o, u.delta, u.W, u.b, rule, u.vel_w, u.vel_b, u.sq_w, u.sq_b,
                                                o_name=f"updates[{i}].o"))
        self._run(gemms, config, output)

    @replayed
    def weight_grad(self, o: Any, delta: Any, grad_w: Any, grad_b: Any, *, o_next: Any = None,
                    activation: str = "identity", delta_out: Any = None,
                    config: str | None = None) -> tuple[Any, Any]:
        """grad_w = o^T delta, grad_b = column sums of delta, in one launch
        (with ``o_next``: delta = err * f'(o_next) computed in the prologue)."""
        self._check_update(o, delta, grad_w, grad_b, None, None, o_next, delta_out, ("grad_w", "grad_b"))
        self._run([self._weight_grad_gemm(o, delta, grad_w, grad_b, Rule("gradient"), o_next=o_next,
                                          activation=activation, delta_out=delta_out)], config)
        return grad_w, grad_b

    @replayed
    def apply_rule(self, rule: Rule, p: Any, grad: Any, m: Any = None, v: Any = None, weight: bool = True) -> None:
        """p (and its state m, v) updated by ``rule`` from a gradient already summed (bias.cu
        weight_update): the update of a data-parallel step, after the all-reduce."""
        dtype = self._dtype_of("p", p)
        for name, array in (("grad", grad), ("m", m), ("v", v))[:1 + rule.states]:
            self._check(name, array, p.shape, dtype)
        self._check("p", p, p.shape, dtype)
        check_rule(rule, m, m, v, v)
        if rule.mode == "adam":
            self._check("rule.t", rule.t, (1,), np.int64)
        fields = rule_fields(rule, dtype)
        self._launch("bias.cu", f"weight_update<{CTYPES[dtype]}>", self._grid_1d(p.size), (BLOCK, 1, 1),
                     [p, *_or(m if rule.states else None, v if rule.states == 2 else None, unread=p), grad,
                      make("UpdateRule", dtype, **fields), np.int64(p.size), np.int32(bool(weight))])
        if weight and self.stored is not None:
            self._refresh_copy(p)

    @replayed
    def count_step(self, t: Any) -> None:
        """t += 1 (a CuPy elementwise launch, captured with the step)."""
        self._check("t", t, (1,), np.int64)
        self._issue(lambda: self.xp.add(t, 1, out=t))

    @replayed
    def sgd_update(self, o: Any, delta: Any, W: Any, b: Any, step: float, momentum: float = 0.0,
                   vel_w: Any = None, vel_b: Any = None, *, o_next: Any = None,
                   activation: str = "identity", delta_out: Any = None, config: str | None = None) -> None:
        """The SGD step applied to W and b in the weight-gradient GEMM's epilogue (on the cuBLAS
        path: cuBLAS with alpha = -step, beta = 1 into W, then one bias kernel)."""
        self.update(o, delta, W, b, Rule("momentum" if momentum else "sgd", step, momentum), vel_w, vel_b,
                    o_next=o_next, activation=activation, delta_out=delta_out, config=config)

    @replayed
    def update(self, o: Any, delta: Any, W: Any, b: Any, rule: Rule, vel_w: Any = None, vel_b: Any = None,
               sq_w: Any = None, sq_b: Any = None, *, o_next: Any = None, activation: str = "identity",
               delta_out: Any = None, config: str | None = None) -> None:
        """``rule`` (SGD, momentum, Nesterov, L2, Adam, AdamW) applied to W and b in the weight-gradient
        GEMM's epilogue: the gradient never goes to memory (on the cuBLAS path: cuBLAS, then the
        rule elementwise)."""
        self._check_update(o, delta, W, b, vel_w, vel_b, o_next, delta_out, sq_w=sq_w, sq_b=sq_b)
        check_rule(rule, vel_w, vel_b, sq_w, sq_b)
        self._run([self._weight_grad_gemm(o, delta, W, b, rule, vel_w, vel_b, sq_w, sq_b, o_next, activation,
                                          delta_out)], config)
