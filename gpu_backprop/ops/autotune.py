"""Per-shape choice of GEMM path: our fused kernels (two tile sizes) or cuBLAS with
our elementwise kernels around it. Each (device, operation, dtype, shape) is timed
once, at its first call, and the winner is cached on disk.

``GPU_BACKPROP_AUTOTUNE=0`` turns tuning off (the fused kernels with the default
tile choice are used); ``GPU_BACKPROP_CACHE`` moves the cache folder.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("gpu_backprop")


def cache_path() -> Path:
    root = os.environ.get("GPU_BACKPROP_CACHE") or Path.home() / ".cache" / "gpu_backprop"
    return Path(root) / "autotune.json"


class Tuner:
    """Chooses among candidates by timing ``trial(candidate)`` with ``timer``."""

    def __init__(self, device_name: str = "", timer: Callable[[Callable[[], None]], float] | None = None,
                 enabled: bool | None = None, path: Path | None = None):
        if enabled is None:
            enabled = os.environ.get("GPU_BACKPROP_AUTOTUNE", "1") != "0"
        self.enabled = enabled and timer is not None
        self.device_name, self.timer = device_name, timer
        self.path = path or cache_path()
        self.choices: dict[str, str] = self._load().get(device_name, {}) if self.enabled else {}

    def choose(self, key: str, candidates: Sequence[str], trial: Callable[[str], None], default: str) -> str:
        """The cached or newly measured fastest candidate; ``default`` when tuning is off."""
        if not self.enabled:
            return default
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

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        """Merge into the cache file atomically; a cache that cannot be written is only logged."""
        try:
            data = self._load()
            data[self.device_name] = {**data.get(self.device_name, {}), **self.choices}
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
