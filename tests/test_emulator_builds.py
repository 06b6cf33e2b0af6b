"""The shim's library cache (tests/emulator/builder.py): keyed by what is compiled, not where it lies."""
import shutil

from .emulator.builder import KERNELS, build


def test_a_build_is_keyed_by_its_sources_not_their_folder(tmp_path):
    """The same kernel sources in two folders (a clone elsewhere, a planted copy) give one library;
    a changed included header gives another. (Planted: the folder in the key fails the first, a key
    of the kernel file's own text alone the second.)"""
    copies = [tmp_path / "a", tmp_path / "b"]
    for copy in copies:
        shutil.copytree(KERNELS, copy)
    first, second = (build(copy / "batch.cu", ["shuffle_keys"], include_dirs=[copy]) for copy in copies)
    assert first == second and first.exists()
    header = copies[1] / "common.cuh"
    header.write_text(header.read_text() + "\n// changed\n")
    assert build(copies[1] / "batch.cu", ["shuffle_keys"], include_dirs=[copies[1]]) != first
