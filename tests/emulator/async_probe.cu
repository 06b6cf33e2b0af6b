// Shim-only probe (tests/test_pipeline.py): what a thread reads of its cp.async copies before and
// after it waits. Thread t issues three groups of one 4-byte copy each (src[3t + g] into shared
// word 3t + g; group 2 a zero fill), then reads all three words after each of
// cp_async_wait<2>, <1>, <0> into seen[9t + 3w + g]. A 16-byte copy (group of its own) of
// src4[t] and a barrier follow; every thread then reads its neighbour's vector into wide[t].
#include "common.cuh"

struct alignas(16) float4_words {
    float w[4];
};

__global__ void async_groups(const float* src, const float4_words* src4, float* seen, float4_words* wide) {
    __shared__ float words[3 * 64];
    __shared__ float4_words vectors[64];
    const int t = threadIdx.x;
    for (int g = 0; g < 3; ++g) {
        cp_async<4>(&words[3 * t + g], &src[3 * t + g], g == 2 ? 0 : 4);
        cp_async_commit();
    }
    cp_async_wait<2>();
    for (int g = 0; g < 3; ++g) seen[9 * t + g] = words[3 * t + g];
    cp_async_wait<1>();
    for (int g = 0; g < 3; ++g) seen[9 * t + 3 + g] = words[3 * t + g];
    cp_async_wait<0>();
    for (int g = 0; g < 3; ++g) seen[9 * t + 6 + g] = words[3 * t + g];
    cp_async<16>(&vectors[t], &src4[t], 16);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    wide[t] = vectors[(t + 1) % blockDim.x];
}

// A 16-byte copy from src + offset floats: misaligned unless offset is a multiple of 4 (traps).
__global__ void misaligned_copy(const float* src, int offset, float* out) {
    __shared__ float4_words vector;
    if (threadIdx.x == 0) cp_async<16>(&vector, src + offset, 16);
    cp_async_commit();
    cp_async_wait<0>();
    if (threadIdx.x == 0) out[0] = vector.w[0];
}
