// The tensor-core instructions of the CUDA-on-CPU shim (included by cuda_shim.h).
#pragma once
