"""Builds kernels/*.cu against cuda_shim.h into shared libraries and calls them
through ctypes with the call shape of a CuPy RawKernel: ``kernel(grid, block, args)``.

Libraries are cached by a hash of the sources, the shim, the instantiated
names and the compiler flags (not the folder they are in), so an unchanged kernel
is compiled once per machine.

Block scheduling (``EmuLoader(blocks=...)``, default from ``GPU_BACKPROP_EMU_BLOCKS``):
"shuffled" (the default) runs the blocks of each grid in a seeded random order, up to
``slots`` of them at once on real threads, each slot a separate copy of the library
with its own ``__shared__`` statics (an SM of its own); "in_order" runs them one after
another in index order. On a GPU blocks run in any order and at once, so a kernel
whose result depends on either has an inter-block race: shuffled scheduling shows it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "kernels"
SHIM = HERE / "cuda_shim.h"
CXX = os.environ.get("CXX", "g++")
# -fno-gnu-unique and hidden visibility: each loaded copy of a library keeps its own statics
# (__shared__ storage); the dynamic linker would otherwise merge them across copies.
FLAGS = ("-std=c++20", "-O1", "-fPIC", "-pthread", "-w", "-fno-gnu-unique", "-fvisibility=hidden")
CACHE = Path(os.environ.get("GPU_BACKPROP_EMU_CACHE", Path(tempfile.gettempdir()) / "gpu_backprop_emulator"))
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"', re.M)


def sources_of(path: Path, include_dirs: Sequence[Path], seen: set | None = None) -> list[Path]:
    """The file and every quoted #include it pulls in, recursively (as the compiler finds them)."""
    seen = set() if seen is None else seen
    out = [path]
    for name in _INCLUDE.findall(path.read_text()):
        candidates = [Path(d) / name for d in (path.parent, *include_dirs)]
        dep = next((c.resolve() for c in candidates if c.exists()), None)
        if dep is None:
            raise FileNotFoundError(f"{path.name}: #include \"{name}\" not found in {[str(d) for d in include_dirs]}")
        if dep not in seen:
            seen.add(dep)
            out += sources_of(dep, include_dirs, seen)
    return out


def wrapper_source(cu_file: Path, names: Sequence[str], shim: Path = SHIM) -> str:
    lines = [f'#include "{shim}"', f'#include "{cu_file}"',
             'extern "C" __attribute__((visibility("default"))) int emu_take_trap() '
             '{ return emu::trapped.exchange(false); }']
    for i, name in enumerate(names):
        lines.append(
            f'extern "C" __attribute__((visibility("default"))) void emu_launch_{i}(const unsigned* g, '
            f"const unsigned* b, void** args, const unsigned* order, unsigned n, unsigned* next) "
            f"{{ emu::launch_packed(&{name}, dim3{{g[0], g[1], g[2]}}, dim3{{b[0], b[1], b[2]}}, "
            f"emu::Schedule{{order, n, next}}, args); }}")
    return "\n".join(lines) + "\n"


@functools.cache
def cxx_identity() -> str:
    """The compiler and its version: a g++ (or libtsan) upgrade builds anew."""
    return CXX + subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout


def fiber_stacks() -> Path:
    """fiber_stacks.cpp as a library (cached by its hash): the process's one pool of fiber stacks,
    linked by every library and executable :func:`build` makes (by absolute path, so the dynamic
    linker loads it once however many kernel libraries, and copies of them, are loaded)."""
    source = HERE / "fiber_stacks.cpp"
    digest = hashlib.sha256("\n".join([source.read_text(), cxx_identity(), *FLAGS]).encode()).hexdigest()[:16]
    target = CACHE / f"fiber_stacks-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            built = Path(tmp) / "out.so"
            proc = subprocess.run([CXX, "-shared", *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"g++ failed on {source.name}:\n{proc.stderr[-4000:]}")
            os.replace(built, target)  # atomic, as build()
    return target


def precompiled_shim() -> Path:
    """A copy of cuda_shim.h with g++'s precompiled form of it beside (cuda_shim.h.gch), cached by the
    hash of the shim's sources and the flags: parsing the shim is most of a small build's time. g++
    takes the .gch only where a build's flags allow (not under a -D the shim reads, nor a sanitizer);
    elsewhere it parses the copy, which is the shim's own text."""
    texts = [p.read_text() for p in sources_of(SHIM, [HERE])]
    digest = hashlib.sha256("\n".join([*texts, cxx_identity(), *FLAGS]).encode()).hexdigest()[:16]
    header = CACHE / f"shim-{digest}" / SHIM.name
    pch = header.with_name(header.name + ".gch")
    if not pch.exists():
        header.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=header.parent) as tmp:
            copy, built = Path(tmp) / header.name, Path(tmp) / pch.name
            copy.write_text(texts[0])
            os.replace(copy, header)  # the same text whoever writes it
            proc = subprocess.run([CXX, *FLAGS, f"-I{HERE}", "-x", "c++-header", str(header), "-o", str(built)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"g++ failed on {SHIM.name}:\n{proc.stderr[-4000:]}")
            os.replace(built, pch)  # atomic, as build()
    return header


def build(cu_file: Path, names: Sequence[str], extra_flags: Sequence[str] = (), output: Path | None = None,
          shared: bool = True, include_dirs: Sequence[Path] = (KERNELS,)) -> Path:
    """Compile ``cu_file`` with the shim (a library exporting emu_launch_i for each
    name, or with ``shared=False`` an executable of a file with its own main)."""
    cu_file = Path(cu_file).resolve()
    include_dirs = [Path(d).resolve() for d in (*include_dirs, HERE)]
    source = wrapper_source(cu_file, names, precompiled_shim()) if shared else cu_file.read_text()
    stacks = fiber_stacks()
    digest = hashlib.sha256()
    # the shim with the headers it includes (mma_shim.h), then the kernel's own sources
    shim = [p.read_text() for p in sources_of(SHIM, [HERE])]
    # by content: the kernel file's name, not its folder, so that a clone elsewhere, or a planted copy
    # in a fresh temporary folder, reuses what the same sources built
    # (g++ searches the kernel's folder before the include folders: so does the key)
    for part in [source.replace(str(cu_file), cu_file.name), cxx_identity(), *FLAGS, *extra_flags, str(stacks),
                 *shim] + [p.read_text() for p in sources_of(cu_file, [cu_file.parent, *include_dirs])]:
        digest.update(part.encode() + b"\0")
    suffix = ".so" if shared else ".exe"
    target = output or CACHE / f"{cu_file.stem}-{digest.hexdigest()[:16]}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "wrapper.cpp"
        src.write_text(source)
        built = Path(tmp) / f"out{suffix}"
        cmd = [CXX, *FLAGS, *extra_flags, f"-I{cu_file.parent}", *(f"-I{d}" for d in include_dirs),
               "-x", "c++", str(src), "-x", "none", str(stacks), "-o", str(built)]
        if shared:
            cmd.insert(1, "-shared")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed on {cu_file.name}:\n{proc.stderr[-4000:]}")
        os.replace(built, target)  # atomic: a half-written library is never cached
    return target


def planted_kernels(folder: Path, file: str, line: str, replacement: str) -> Path:
    """A copy of kernels/ in ``folder`` with ``line`` of ``file`` replaced: a planted fault."""
    shutil.copytree(KERNELS, folder, dirs_exist_ok=True)
    source = (folder / file).read_text()
    if line not in source:
        raise ValueError(f"{file}: {line!r} not found (the planted fault no longer applies)")
    (folder / file).write_text(source.replace(line, replacement))
    return Path(folder)


class EmuKernel:
    """One instantiated kernel, called like cupy.RawKernel: ``k(grid, block, args)``.

    ``fns``: the kernel's entry point in each loaded copy of its library; a launch runs
    on ``len(fns)`` copies at once, taking blocks in the order ``schedule(n_blocks)`` gives."""

    def __init__(self, fns: Sequence[Any], name: str, schedule: Any, traps: Sequence[Any] = ()):
        self._fns, self.name, self._schedule, self._traps = list(fns), name, schedule, list(traps)
        self.launches = 0

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], shared_mem: int = 0) -> None:
        keep, pointers = [], (ctypes.c_void_p * len(args))()
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray) and arg.dtype.names is not None:  # a struct, by value (as CuPy)
                if arg.size != 1:
                    raise ValueError(f"{self.name}: argument {i}: a struct argument holds one record")
                holder = np.ascontiguousarray(arg)
                keep.append(holder)
                pointers[i] = holder.ctypes.data
            elif isinstance(arg, np.ndarray):
                if not arg.flags.c_contiguous:
                    raise ValueError(f"{self.name}: argument {i} is not C-contiguous")
                holder = ctypes.c_void_p(arg.ctypes.data)
                keep.append(holder)
                pointers[i] = ctypes.addressof(holder)
            elif isinstance(arg, np.generic):
                holder = np.array(arg)
                keep.append(holder)
                pointers[i] = holder.ctypes.data
            else:
                raise TypeError(f"{self.name}: argument {i} must be an ndarray or a NumPy scalar "
                                f"(as CuPy requires), got {type(arg).__name__}")
        dims = [(tuple(d) + (1, 1))[:3] for d in (grid, block)]
        g, b = ((ctypes.c_uint * 3)(*d) for d in dims)
        n_blocks = int(np.prod(dims[0]))
        order = self._schedule(n_blocks)  # None: in index order
        order_ptr = None if order is None else order.ctypes.data_as(ctypes.POINTER(ctypes.c_uint))
        next_block = np.zeros(1, dtype=np.uint32)  # the queue's head, shared by the copies
        call = (g, b, pointers, order_ptr, ctypes.c_uint(n_blocks), next_block.ctypes.data_as(ctypes.c_void_p))
        self.launches += 1
        fns = self._fns[:max(1, min(len(self._fns), n_blocks))] if order is not None else self._fns[:1]
        if len(fns) == 1:
            fns[0](*call)
        else:  # ctypes releases the GIL during each call: the copies run the grid together
            workers = [threading.Thread(target=fn, args=call) for fn in fns[1:]]
            for w in workers:
                w.start()
            fns[0](*call)
            for w in workers:
                w.join()
        if any([take() for take in self._traps]):  # every copy's flag read (and cleared)
            raise RuntimeError(f"{self.name}: the kernel trapped (__trap) with block {tuple(block)}")


def _copies(path: Path, n: int) -> list[Path]:
    """``path`` and n - 1 copies of it under other names: dlopen maps each file once, so
    only distinct files give distinct statics."""
    out = [path]
    for k in range(1, n):
        copy = path.with_name(f"{path.stem}.slot{k}{path.suffix}")
        if not copy.exists():
            tmp = copy.with_name(f".{copy.name}.{os.getpid()}.{threading.get_ident()}")
            shutil.copyfile(path, tmp)
            os.replace(tmp, copy)
        out.append(copy)
    return out


class EmuLoader:
    """Stands in for the CuPy loader of gpu_backprop.ops.cuda: NumPy arrays, kernels on threads."""

    xp = np
    sm_count = 4  # small, so the launchers' grid caps are exercised
    sm90a = True  # wgmma_shim.h emulates sm_90a's warpgroup instructions: matmul_sm90.cu runs
    name = "emulator"

    def __init__(self, kernels_dir: Path = KERNELS, extra_flags: Sequence[str] = (), blocks: str | None = None,
                 slots: int | None = None, seed: int = 0, per_name: bool | None = None):
        self.kernels_dir = Path(kernels_dir)
        # A library per kernel, or one per file with every name (compiled once, then cached). A
        # planted copy of kernels/ is built once and runs a few of its kernels: by default, just those.
        self.per_name = self.kernels_dir.resolve() not in (KERNELS, HERE) if per_name is None else per_name
        self.extra_flags = tuple(extra_flags)
        self.blocks = blocks or os.environ.get("GPU_BACKPROP_EMU_BLOCKS", "shuffled")
        if self.blocks not in ("shuffled", "in_order"):
            raise ValueError(f"blocks: expected 'shuffled' or 'in_order', got {self.blocks!r}")
        self.slots = 1 if self.blocks == "in_order" else int(slots or os.environ.get("GPU_BACKPROP_EMU_SLOTS", 3))
        self.seed = seed
        self._order_rng = np.random.default_rng(seed)
        self._libs: dict = {}
        self.kernels: dict[str, EmuKernel] = {}
        self.tf32_gemms = 0  # cuBLAS stand-in calls that asked for TF32

    def schedule(self, n_blocks: int) -> np.ndarray | None:
        """The order of a launch's blocks: a fresh seeded permutation, or None (index order)."""
        if self.blocks == "in_order":
            return None
        return self._order_rng.permutation(n_blocks).astype(np.uint32)

    def function(self, file: str, name: str, all_names: Sequence[str]) -> EmuKernel:
        key = (file, name)
        if key not in self.kernels:
            # Tensor-core instantiations too: mma_shim.h emulates their instructions.
            names = list(all_names)
            if name not in names:
                raise ValueError(f"{name}: not among the names instantiated from {file}")
            if self.per_name:
                names = [name]
            lib_key = (file, tuple(names))
            if lib_key not in self._libs:
                # the project's kernels/ after kernels_dir: probes in tests/emulator include common.cuh
                path = build(self.kernels_dir / file, names, self.extra_flags,
                             include_dirs=list(dict.fromkeys([self.kernels_dir, KERNELS])))
                self._libs[lib_key] = [ctypes.CDLL(str(p)) for p in _copies(path, self.slots)]
            fns = []
            for lib in self._libs[lib_key]:
                fn = getattr(lib, f"emu_launch_{names.index(name)}")
                fn.restype = None
                fns.append(fn)
            traps = [lib.emu_take_trap for lib in self._libs[lib_key]]
            self.kernels[key] = EmuKernel(fns, name, self.schedule, traps)
        return self.kernels[key]

    def gemm(self, a: Any, b: Any, out: Any, tf32: bool = False, **kwargs: Any) -> Any:
        """The cuBLAS stand-in: the CPU path's BLAS GEMM, same signature as CupyLoader.gemm
        (``tf32`` is recorded, not emulated: the products stay float32)."""
        from gpu_backprop.ops.blas import gemm

        self.tf32_gemms += bool(tf32)
        return gemm(a, b, out, **kwargs)

    def time(self, fn: Any, repeats: int = 3) -> float:
        import time

        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    def check_device(self, name: str, array: Any) -> None:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{name}: expected a NumPy array in the emulator, got {type(array).__name__}")

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels.values())
