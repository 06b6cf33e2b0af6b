// Shim-only probe (tests/test_math_agrees.py): common.cuh's activation, derivative and
// argmax, elementwise over host arrays, to compare with gpu_backprop/ops/activations.py.
#include "common.cuh"

template <typename T>
__global__ void activation_values(const T* z, T* f, const T* o, T* df, int act, index_t n) {
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
        f[i] = activate(act, z[i]);
        df[i] = derivative(act, o[i]);
    }
}

template <typename T>
__global__ void argmax_rows(const T* y, long long* label, index_t rows, index_t cols) {
    for (index_t r = threadIdx.x; r < rows; r += blockDim.x) label[r] = argmax_row(y + r * cols, cols);
}
