"""CUDA C++ sources of gpu_backprop's RawKernels (shipped in the wheel as package data)."""
