// The elementwise halves of the cuBLAS path (ops/cuda.py picks it per shape when
// cuBLAS's GEMM beats ours): what our GEMM kernels do in their epilogues.
//
// bias_activation:  out = f(out + b)      in place, after cuBLAS wrote out = o W
// bias_update:      db = sum over the batch of delta (fixed order: deterministic),
//                   then the update rule (update.cuh) on b
// weight_update:    the update rule on a parameter from its gradient, which cuBLAS (or an
//                   all-reduce across ranks) wrote: for the rules cuBLAS's alpha and beta
//                   cannot express (L2, Nesterov, Adam), and data-parallel steps; weight = 0
//                   for a bias (no L2, no decay)
// bf16_copy:        out = x rounded to bf16 (precision="bf16"): a weight's copy the GEMMs read, made
//                   or remade where no update epilogue wrote it; an input X read outside a fit
//
// bias_update runs 32 columns per block (blockDim 32 x 8): each of 8 row slices sums
// every 8th row of its column, then thread row 0 adds the 8 partials in order.
#include "update.cuh"

template <typename T>
__global__ void bias_activation(T* __restrict__ out, const T* __restrict__ b, int act, index_t rows, index_t cols) {
    const index_t n = rows * cols, stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = activate(act, out[i] + b[i % cols]);
}

template <typename T>
__global__ void bias_update(const T* __restrict__ delta, T* __restrict__ b, T* __restrict__ vel_b,
                            T* __restrict__ sq_b, UpdateRule<T> rule, index_t rows, index_t cols) {
    __shared__ T partial[8][33];
    const index_t col = (index_t)blockIdx.x * 32 + threadIdx.x;
    T sum = T(0);
    if (col < cols)
        for (index_t r = threadIdx.y; r < rows; r += 8) sum += delta[r * cols + col];
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        T total = T(0);
        for (int s = 0; s < 8; ++s) total += partial[s][threadIdx.x];
        update_any(rule, b, vel_b, sq_b, col, total, false);
    }
}

template <typename T>
__global__ void weight_update(T* __restrict__ W, T* __restrict__ vel_w, T* __restrict__ sq_w,
                              const T* __restrict__ grad_w, UpdateRule<T> rule, index_t n, int weight) {
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    if (rule.mode == ADAM) {
        const Updater<T, ADAM_RULES> update(rule);
        for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
            update(W, vel_w, sq_w, i, grad_w[i], weight != 0);
    } else {
        const Updater<T, SGD_RULES> update(rule);
        for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
            update(W, vel_w, sq_w, i, grad_w[i], weight != 0);
    }
}

__global__ void bf16_copy(const float* __restrict__ x, bf16_t* __restrict__ out, index_t n) {
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = bf16_round(x[i]);
}
