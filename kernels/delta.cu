// The sigmoid-derivative-times-error step, one pass over memory.
//
// output_delta (MSE):  delta = (y_hat - y) * f'(y_hat),  loss = 1/2 sum (y_hat - y)^2
// output_delta (CE):   delta = y_hat - y,                 loss = -sum y log(y_hat)
// hidden_delta:        delta = err * f'(o)
// (in T; delta stored in S: T, or bf16_t for precision="bf16", rounded (mma.cuh stored_as), as are
// hidden_delta's err and o)
//
// f' is taken from the saved output (common.cuh). The loss is reduced in the
// same launch without float atomics: each block writes a partial sum, the last
// block to finish (an integer ticket) adds the partials in index order, so the
// result does not depend on scheduling. The loss accumulates in double: a float
// sum over 2^26 terms would drift by ~1e-4 relative. Launch with a fixed grid (the launcher
// caps it) and blockDim.x a multiple of 32. Where every array is 16-byte aligned the body
// moves 16-byte packs (4 floats, 2 doubles, 8 bf16) per access (output_delta in bf16: packs of
// y_hat and y, delta element by element); the tail, and unaligned views, go element by element.
#pragma once
#include "mma.cuh"
#include "params.cuh"

enum Loss { LOSS_MSE = 0, LOSS_CROSS_ENTROPY = 1 };

// delta of one element; returns its loss term.
template <typename T>
__device__ __forceinline__ double output_delta_at(T yh, T target, T& delta, int act, int loss_kind) {
    const T diff = yh - target;
    if (loss_kind == LOSS_MSE) {
        delta = diff * derivative(act, yh);
        const T square = diff * diff;  // in T, as the twin: a float32 overflow shows as Inf, as on the CPU
        return 0.5 * (double)square;
    }
    // -y log(y_hat), y_hat clamped away from 0 so log stays finite (0 log tiny = 0). Written as
    // the twin computes it: the clamp lets NaN through (as numpy.maximum), and a target of 0
    // times a NaN or infinite log is NaN, so a diverged run shows a NaN loss on every device.
    const T tiny = sizeof(T) == 4 ? T(1.17549435e-38) : T(2.2250738585072014e-308);
    delta = diff;
    return -(double)(target * log(yh < tiny ? tiny : yh));
}

// The loss summed over `parts` blocks without float atomics: each block's sum goes to
// partials[part] (its hits to hit_partials[part]); the last block to take a ticket adds
// the partials in index order, writes loss_out and the record, and resets the ticket.
// Every thread of each of the `parts` blocks must call it.
template <typename T>
__device__ void reduce_loss(double loss, long long hits, double* __restrict__ partials,
                            long long* __restrict__ hit_partials, unsigned int* __restrict__ ticket,
                            unsigned int parts, unsigned int part, T* __restrict__ loss_out, StepRecord<T> record) {
    __shared__ bool is_last;
    loss = block_sum(loss);
    if (record.on) hits = block_sum(hits);
    if (threadIdx.x == 0) {
        partials[part] = loss;
        if (record.on) hit_partials[part] = hits;
        __threadfence();  // the partials are visible before the ticket is taken
        is_last = atomicAdd(ticket, 1u) == parts - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    double total = 0.0;
    long long total_hits = 0;
    const volatile double* p = partials;
    const volatile long long* h = hit_partials;
    for (unsigned int b = threadIdx.x; b < parts; b += blockDim.x) {
        total += p[b];
        if (record.on) total_hits += h[b];
    }
    total = block_sum(total);
    if (record.on) total_hits = block_sum(total_hits);
    if (threadIdx.x == 0) {
        loss_out[0] = (T)total;
        if (record.on) {
            const long long s = record.step[0];
            record.losses[s] = (T)total;
            if (record.count) record.correct[s] = total_hits;
            record.step[0] = s + 1;
        }
        *ticket = 0;  // ready for the next launch
    }
}

template <typename T, typename S = T>
__global__ void output_delta(const T* __restrict__ y_hat, const T* __restrict__ y, S* __restrict__ delta,
                             int act, int loss_kind, index_t n, double* __restrict__ partials,
                             unsigned int* __restrict__ ticket, T* __restrict__ loss_out) {
    double loss = 0.0;
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    const index_t first = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    index_t done = 0;
    if (aligned16(y_hat) && aligned16(y) && aligned16(delta)) {
        const int N = Pack<T>::N;
        for (index_t p = first; p < n / N; p += stride) {
            const Pack<T> yh = ((const Pack<T>*)y_hat)[p], target = ((const Pack<T>*)y)[p];
            Pack<T> d;
#pragma unroll
            for (int j = 0; j < N; ++j) loss += output_delta_at(yh.v[j], target.v[j], d.v[j], act, loss_kind);
            if constexpr (sizeof(S) == sizeof(T)) {
                ((Pack<T>*)delta)[p] = d;
            } else {
#pragma unroll
                for (int j = 0; j < N; ++j) delta[p * N + j] = stored_as<S>(d.v[j]);
            }
        }
        done = n / N * N;
    }
    for (index_t i = done + first; i < n; i += stride) {
        T d;
        loss += output_delta_at(y_hat[i], y[i], d, act, loss_kind);
        delta[i] = stored_as<S>(d);
    }
    reduce_loss(loss, 0ll, partials, (long long*)nullptr, ticket, gridDim.x, blockIdx.x, loss_out,
                StepRecord<T>{nullptr, nullptr, nullptr, 0, 0});
}

// One element of hidden_delta: err * f'(o) in T, stored as S.
template <typename T, typename S = T>
__device__ __forceinline__ S hidden_delta_at(S err, S o, int act) {
    return stored_as<S>(value_of<T>(err) * derivative(act, value_of<T>(o)));
}

// err and delta may be the same array (in place after a cuBLAS GEMM): no __restrict__ on them.
template <typename T, typename S = T>
__global__ void hidden_delta(const S* err, const S* __restrict__ o, S* delta, int act, index_t n) {
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    const index_t first = (index_t)blockIdx.x * blockDim.x + threadIdx.x;
    index_t done = 0;
    if (aligned16(err) && aligned16(o) && aligned16(delta)) {
        const int N = Pack<S>::N;
        for (index_t p = first; p < n / N; p += stride) {
            const Pack<S> e = ((const Pack<S>*)err)[p], x = ((const Pack<S>*)o)[p];
            Pack<S> d;
#pragma unroll
            for (int j = 0; j < N; ++j) d.v[j] = hidden_delta_at<T>(e.v[j], x.v[j], act);
            ((Pack<S>*)delta)[p] = d;
        }
        done = n / N * N;
    }
    for (index_t i = done + first; i < n; i += stride) delta[i] = hidden_delta_at<T>(err[i], o[i], act);
}
