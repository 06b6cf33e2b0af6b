"""Per-shape choice of GEMM path: our fused kernels (two tile sizes) or cuBLAS with
our elementwise kernels around it. Each (device, operation, dtype, shape) is timed
once, at its first call, and the winner is cached on disk.

The cache holds one table of choices per :func:`device_key`: the card's name, the
CuPy, driver and runtime versions and a hash of the kernel sources, so a choice is
reused only for the code and the card it was measured on. ``GPU_BACKPROP_AUTOTUNE=0``
turns tuning off (the fused kernels with the default tile choice are used);
``GPU_BACKPROP_CACHE`` moves the cache folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("gpu_backprop")


def cache_path() -> Path:
    root = os.environ.get("GPU_BACKPROP_CACHE") or Path.home() / ".cache" / "gpu_backprop"
    return Path(root) / "autotune.json"


def kernels_hash() -> str:
    """16 hex digits of SHA-256 over what NVRTC compiles: every kernel file with its
    #includes inlined, and the instantiations asked of it (they carry the tile shapes)."""
    from .cuda import KERNEL_FILES, SM90A_FILES, kernel_source, names_in  # cuda.py imports this module

    digest = hashlib.sha256()
    for file in (*KERNEL_FILES, *SM90A_FILES):
        for part in (file, kernel_source(file), *names_in(file)):
            digest.update(part.encode())
            digest.update(b"\0")  # so that no two different sequences of parts hash alike
    return digest.hexdigest()[:16]


def software(xp: Any) -> str:
    """The versions a timing depends on besides the card: CuPy, the CUDA driver and runtime
    (an array module without CUDA, the emulator's NumPy, gives its own name and version)."""
    cuda = getattr(xp, "cuda", None)
    if cuda is None:
        return f"{getattr(xp, '__name__', type(xp).__name__)} {getattr(xp, '__version__', '?')}"
    runtime = cuda.runtime
    return f"cupy {xp.__version__}, driver {runtime.driverGetVersion()}, runtime {runtime.runtimeGetVersion()}"


def device_key(loader: Any) -> str:
    """The cache key of a kernel loader's choices: its device name, software and kernels."""
    return f"{loader.name} | {software(getattr(loader, 'xp', None))} | kernels {kernels_hash()}"


class Tuner:
    """Chooses among candidates by timing ``trial(candidate)`` with ``timer``.

    ``device_name`` keys this tuner's table in the cache file (:func:`device_key` on a GPU).
    """

    def __init__(self, device_name: str = "", timer: Callable[[Callable[[], None]], float] | None = None,
                 enabled: bool | None = None, path: Path | None = None):
        if enabled is None:
            enabled = os.environ.get("GPU_BACKPROP_AUTOTUNE", "1") != "0"
        self.enabled = enabled and timer is not None
        self.device_name, self.timer = device_name, timer
        self.path = path or cache_path()
        self.choices: dict[str, str] = self._entry(self._read(quiet=False), quiet=False) if self.enabled else {}

    @classmethod
    def for_loader(cls, loader: Any) -> "Tuner":
        """The tuner of a kernel loader: its timer, its choices under :func:`device_key`."""
        return cls(device_key(loader), loader.time)

    def choose(self, key: str, candidates: Sequence[str], trial: Callable[[str], None], default: str) -> str:
        """The cached or newly measured fastest candidate; ``default`` when tuning is off."""
        if not self.enabled:
            return default
        if len(candidates) == 1:  # nothing to choose: nothing timed, nothing cached
            return candidates[0]
        choice = self.choices.get(key)
        if choice in candidates:
            return choice
        times = {}
        for candidate in candidates:
            try:
                times[candidate] = self.timer(lambda c=candidate: trial(c))
            except Exception as exc:  # e.g. a cuBLAS mode this CuPy lacks: not a choice here
                log.info("autotune %s: %s failed (%s: %s); not a candidate", key, candidate,
                         type(exc).__name__, exc)
        if not times:
            return default  # nothing ran: the call itself will report why
        choice = min(times, key=times.get)
        self.choices[key] = choice
        log.info("autotune %s: %s (%s)", key, choice,
                 ", ".join(f"{c} {t * 1e6:.0f} us" for c, t in times.items()))
        self._save()
        return choice

    def _read(self, quiet: bool) -> dict:
        """The cache file's table of tables; {} when absent or unreadable (one log line
        unless ``quiet``: a cache is only ever a hint, so nothing in it may raise)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
            why = f"unreadable ({type(exc).__name__}: {exc})"
        else:
            if isinstance(data, dict):
                return data
            why = f"a JSON {type(data).__name__}, not an object"
        if not quiet:
            log.info("autotune cache %s is %s; ignored, choices are measured again", self.path, why)
        return {}

    def _entry(self, data: dict, quiet: bool) -> dict[str, str]:
        """This device's choices in ``data``, without what is not a name -> name table."""
        entry = data.get(self.device_name, {})
        if not isinstance(entry, dict):
            bad, entry = f"is a JSON {type(entry).__name__}, not an object", {}
        else:
            good = {k: v for k, v in entry.items() if isinstance(v, str)}
            bad, entry = (f"has {len(entry) - len(good)} choice(s) that are not names"
                          if len(good) != len(entry) else ""), good
        if bad and not quiet:
            log.info("autotune cache %s: the entry for %r %s; ignored, measured again", self.path,
                     self.device_name, bad)
        return entry

    def _save(self) -> None:
        """Merge into the cache file atomically; a cache that cannot be written is only logged."""
        try:
            data = self._read(quiet=True)  # what was wrong in it was said when it was loaded
            data[self.device_name] = {**self._entry(data, quiet=True), **self.choices}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".autotune.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.info("autotune cache not written (%s): %s", self.path, exc)
