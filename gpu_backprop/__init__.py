"""gpu_backprop: backpropagation for fully connected networks, fused CUDA kernels on a
GPU (CuPy RawKernels) and the same math in NumPy on the CPU."""
from .device import Device, DeviceError, get_array_module, get_device, to_device, to_host
from .model import MLP
from .train import History

__version__ = "0.1.0"
load = MLP.load

__all__ = ["MLP", "History", "Device", "DeviceError", "get_device", "get_array_module",
           "to_device", "to_host", "load", "__version__"]
