// The sigmoid-derivative-times-error step, one pass over memory.
//
// output_delta (MSE):  delta = (y_hat - y) * f'(y_hat),  loss = 1/2 sum (y_hat - y)^2
// output_delta (CE):   delta = y_hat - y,                 loss = -sum y log(y_hat)
// hidden_delta:        delta = err * f'(o)
//
// f' is taken from the saved output (common.cuh). The loss is reduced in the
// same launch without float atomics: each block writes a partial sum, the last
// block to finish (an integer ticket) adds the partials in index order, so the
// result does not depend on scheduling. The loss accumulates in double: a float
// sum over 2^26 terms would drift by ~1e-4 relative. Launch with a fixed grid (the launcher
// caps it) and blockDim.x a multiple of 32.
#include "common.cuh"

enum Loss { LOSS_MSE = 0, LOSS_CROSS_ENTROPY = 1 };

template <typename T>
__global__ void output_delta(const T* __restrict__ y_hat, const T* __restrict__ y, T* __restrict__ delta,
                             int act, int loss_kind, index_t n, double* __restrict__ partials,
                             unsigned int* __restrict__ ticket, T* __restrict__ loss_out) {
    __shared__ bool is_last;
    double loss = 0.0;
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T yh = y_hat[i], target = y[i];
        const T diff = yh - target;
        if (loss_kind == LOSS_MSE) {
            loss += 0.5 * (double)diff * (double)diff;
            delta[i] = diff * derivative(act, yh);
        } else {
            // y log(y_hat) with 0 log 0 = 0; y_hat clamped away from 0 so log stays finite.
            const T tiny = sizeof(T) == 4 ? T(1.17549435e-38) : T(2.2250738585072014e-308);
            if (target != T(0)) loss -= (double)(target * log(yh > tiny ? yh : tiny));
            delta[i] = diff;
        }
    }
    loss = block_sum(loss);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = loss;
        __threadfence();  // the partial is visible before the ticket is taken
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    double total = 0.0;
    const volatile double* p = partials;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x) total += p[b];
    total = block_sum(total);
    if (threadIdx.x == 0) {
        loss_out[0] = (T)total;
        *ticket = 0;  // ready for the next launch
    }
}

// err and delta may be the same array (in place after a cuBLAS GEMM): no __restrict__ on them.
template <typename T>
__global__ void hidden_delta(const T* err, const T* __restrict__ o, T* delta, int act, index_t n) {
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        delta[i] = err[i] * derivative(act, o[i]);
}
