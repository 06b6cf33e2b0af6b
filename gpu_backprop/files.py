"""Files the user gives us: which paths may be written, atomic writes, safe ``.npz`` reading.

The rule (README, "Errors"): no file the user had is replaced or damaged. So every output
path (``MLP.save``, ``--save``, ``--plot``) goes through :func:`check_writable`, and every
write through :func:`write_atomically`; every ``.npz`` is read through :func:`read_npz`,
which never unpickles and never allocates more than an array's declared bytes that the
file actually holds.
"""
from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, BinaryIO

import numpy as np


class FileError(ValueError):
    """A path that may not be written or a file that cannot be read; the message names it."""


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_writable(path: "str | os.PathLike", what: str = "path",
                   inputs: Iterable["str | os.PathLike"] = ()) -> Path:
    """The file to write for ``path``, or :class:`FileError` naming ``what`` and why not.

    Refused: an empty name; anything existing that is not a regular file (directory,
    device, FIFO, socket); a file that is one of ``inputs`` (the data being read); a
    folder that is missing or not writable; a read-only file. A symlink is followed:
    the returned path is its target, so writing replaces the target and keeps the link.
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise FileError(f"{what}: expected a file name, got {text!r}")
    if text.endswith(("/", os.sep)):  # names a folder, which realpath would silently drop
        raise FileError(f"{what}: expected a file name, got the folder path {text!r}")
    target = Path(os.path.realpath(text))
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # nothing there: the folder check says why
        st = None
    except OSError as exc:
        raise FileError(f"{what}: cannot use {text!r}: {exc.strerror or exc}") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise FileError(f"{what}: {text!r} is {_describe(st.st_mode)}: expected a regular file to write")
        for other in inputs:
            if _same_file(target, other):
                raise FileError(f"{what}: {text!r} is the input file {os.fspath(other)!r}: "
                                "expected a different path, the input is never overwritten")
        if not os.access(target, os.W_OK):
            raise FileError(f"{what}: {text!r} is read-only: expected a writable file or a new name")
    folder = target.parent
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileError(f"{what}: folder {str(folder)!r} {state}: expected an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileError(f"{what}: folder {str(folder)!r} is not writable: expected a writable folder")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    if len(f".{target.name}.XXXXXXXX.tmp".encode()) > name_max:  # the temporary file beside it
        raise FileError(f"{what}: file name {target.name[:20]!r}... is {len(target.name.encode())} bytes: "
                        f"expected at most {name_max - 13}")
    return target


def _same_file(a: Path, b: "str | os.PathLike") -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # b missing or unreadable: it is not a file that a write could damage
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: "str | os.PathLike", write: Callable[[BinaryIO], None], what: str = "path",
                     inputs: Iterable["str | os.PathLike"] = ()) -> Path:
    """Call ``write(fh)`` on a temporary file beside the target, then rename it over the target.

    A crash at any moment leaves the old file or nothing, never half a file. The path is
    checked by :func:`check_writable` first; an existing file keeps its mode (and, for root,
    its owner); a new one gets the umask's mode. Returns the path as given, or for a symlink
    the target written.
    """
    target = check_writable(path, what, inputs)
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~_umask())
        if old is not None and hasattr(os, "chown") and os.geteuid() == 0:
            os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target if os.path.islink(path) else Path(path)  # the name given, unless a link's target


# -- reading .npz without trusting it -------------------------------------------------------
def _member_header(fp: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy format version {version}")


def npz_headers(path: "str | os.PathLike", what: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of every array in ``path`` from the headers alone (no data read)."""
    return {name: (shape, dtype) for name, (shape, dtype, _) in _scan(path, what).items()}


def _scan(path: "str | os.PathLike", what: str) -> dict[str, tuple[tuple[int, ...], np.dtype, zipfile.ZipInfo]]:
    text = os.fspath(path)
    p = Path(text)
    if not p.exists():
        raise FileError(f"{what}: cannot read {text!r}: no such file")
    if not p.is_file():
        raise FileError(f"{what}: cannot read {text!r}: not a regular file")
    out = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"unexpected member {info.filename!r}")
                name = info.filename[:-4]
                if name in out:
                    raise ValueError(f"array {name!r} stored twice")
                with zf.open(info) as fp:
                    shape, fortran, dtype = _member_header(fp)
                    header_bytes = fp.tell()
                if dtype.hasobject:  # would need unpickling: never
                    raise ValueError(f"array {name!r} holds Python objects (dtype {dtype}); "
                                     "expected plain numbers or strings")
                if (dtype.kind not in "biufcUS" or dtype.fields is not None or dtype.subdtype is not None
                        or dtype.itemsize == 0):
                    raise ValueError(f"array {name!r} has dtype {dtype}; expected plain numbers or strings")
                if any(s < 0 for s in shape):
                    raise ValueError(f"array {name!r} declares a negative dimension {shape}")
                n_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if header_bytes + n_bytes != info.file_size:
                    raise ValueError(f"array {name!r} declares shape {shape} of {dtype} ({n_bytes} bytes) "
                                     f"but holds {info.file_size - header_bytes} bytes")
                out[name] = (tuple(int(s) for s in shape), dtype, info)
    except FileError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy's header parser raise many kinds on corrupt bytes
        raise FileError(f"{what}: cannot read {text!r} as .npz: {_reason(exc)}") from None
    return out


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def read_npz(path: "str | os.PathLike", what: str, names: Iterable[str] | None = None,
             check: Callable[[dict[str, tuple[tuple[int, ...], np.dtype]]], None] | None = None,
             max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``path`` (all, or those in ``names`` that exist), read safely.

    Headers are read first; ``check(headers)`` may refuse them before any data is read.
    Object arrays (pickles) are refused; an array's declared size must equal what the file
    holds, so nothing larger than the file (or, compressed, than ``max_bytes``) is allocated.
    Truncated, bit-flipped (CRC) or otherwise corrupt files raise :class:`FileError`.
    """
    text = os.fspath(path)
    members = _scan(path, what)
    if check is not None:
        check({name: (shape, dtype) for name, (shape, dtype, _) in members.items()})
    wanted = [n for n in members if names is None or n in set(names)]
    total = sum(members[n][2].file_size for n in wanted)
    if max_bytes is not None and total > max_bytes:
        raise FileError(f"{what}: {text!r} holds {total / 2**30:.1f} GiB of arrays: "
                        f"more than the {max_bytes / 2**30:.1f} GiB of memory available")
    arrays = {}
    try:
        with zipfile.ZipFile(text) as zf:
            for name in wanted:
                shape, dtype, info = members[name]
                with zf.open(info) as fp:
                    _, fortran, _ = _member_header(fp)
                    n_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    raw = fp.read(n_bytes)
                    if len(raw) != n_bytes or fp.read(1):  # the read to EOF also checks the CRC
                        raise ValueError(f"array {name!r} is truncated")
                array = np.frombuffer(raw, dtype=dtype, count=n_bytes // dtype.itemsize)
                arrays[name] = array.reshape(shape, order="F" if fortran else "C").copy()
    except Exception as exc:
        raise FileError(f"{what}: cannot read {text!r} as .npz: {_reason(exc)}") from None
    return arrays
