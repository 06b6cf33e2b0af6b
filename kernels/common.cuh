// Shared by every kernel: activation codes, derivatives from the saved output,
// and a deterministic block sum. Compiles under NVRTC (no host headers) and,
// through tests/emulator/cuda_shim.h, under g++ for the CUDA-on-CPU harness.
#pragma once

typedef long long index_t;  // products of sizes can pass 2^31

// Codes shared with gpu_backprop/ops/activations.py (CODES).
// ACT_LOGITS: the identity, its outputs the logits of a softmax that follows (outside the GEMM,
// row-wise), so a core that stores bf16 leaves them unrounded (the softmax's output is rounded).
enum Activation { ACT_IDENTITY = 0, ACT_SIGMOID = 1, ACT_TANH = 2, ACT_RELU = 3, ACT_LOGITS = 4 };

// f(z); the sigmoid takes exp of -|z| only, so it never overflows.
template <typename T>
__device__ __forceinline__ T activate(int act, T z) {
    switch (act) {
        case ACT_SIGMOID: {
            T e = exp(-fabs(z));
            return z >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
        }
        case ACT_TANH: return tanh(z);
        case ACT_RELU: return z < T(0) ? T(0) : z;  // NaN passes, as numpy.maximum(z, 0)
        default: return z;
    }
}

// f'(z) written from o = f(z): sigmoid o(1-o), tanh 1-o^2, ReLU [o>0], identity 1.
// tanh's as (1-o)(1+o): near |o| = 1, 1 - o*o cancels and keeps o*o's rounding
// (3e-6 relative at o = 0.996 in float32) unless the compiler fuses it into an FMA.
template <typename T>
__device__ __forceinline__ T derivative(int act, T o) {
    switch (act) {
        case ACT_SIGMOID: return o * (T(1) - o);
        case ACT_TANH: return (T(1) - o) * (T(1) + o);
        case ACT_RELU: return o > T(0) ? T(1) : T(0);
        default: return T(1);
    }
}

// The predicted class of a row of n outputs: its argmax as numpy.argmax gives it (ties
// and NaN: the first one wins); with one output unit, y > 1/2 (NaN: 0).
template <typename T>
__device__ __forceinline__ index_t argmax_row(const T* row, index_t n) {
    if (n == 1) return row[0] > T(0.5) ? 1 : 0;
    index_t best = 0;
    for (index_t j = 1; j < n; ++j) {
        const T v = row[j], top = row[best];
        if (v > top || (v != v && top == top)) best = j;
    }
    return best;
}

// A global load that sees another block's writes made before a ticket said they are done:
// from L2 (ld.global.cg), not a possibly stale L1 line; the shim reads memory as it is.
template <typename T>
__device__ __forceinline__ T load_coherent(const T* p) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    return __ldcg(p);
#else
    return *(const volatile T*)p;
#endif
}

// 16 bytes of T, loaded and stored as one vector access (ld/st.global.v4.f32, .v2.f64) by the
// elementwise kernels wherever every pointer they touch is 16-byte aligned.
template <typename T>
struct alignas(16) Pack {
    static const int N = 16 / sizeof(T);
    T v[N];
};

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15ull) == 0; }

// cp.async (sm_80+): BYTES (4, 8 or 16) copied from global to shared memory without passing
// through registers; src_bytes is BYTES or 0 (a zero fill: nothing is read). A copy lands only
// once its thread has waited for its group: cp_async_commit() closes the group of the copies
// issued since the last one, cp_async_wait<N>() waits until at most the N newest groups are in
// flight. Its own copies only: the other threads' copies are seen after a barrier. Before sm_80
// a plain load and store (the wait is then a no-op). The shim (tests/emulator/cuda_shim.h)
// defers each copy to the wait and poisons the destination meanwhile.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, int src_bytes) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if __CUDA_ARCH__ >= 800
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    if (BYTES == 16)  // .cg: through L2 only (the tile is reused from shared memory, not L1)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes)
                     : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem), "n"(BYTES),
                     "r"(src_bytes) : "memory");
#else
    struct alignas(BYTES) Word {
        int w[BYTES / 4];
    };
    Word v = {};
    if (src_bytes) v = *static_cast<const Word*>(gmem);
    *static_cast<Word*>(smem) = v;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// "memory": the compiler must not move this thread's shared-memory reads of the landed copies
// above the wait (the prologue reads its own copies right after it, with no barrier between).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over the block in a fixed order (deterministic); the result is valid in
// thread 0. blockDim.x must be a multiple of 32, at most 1024.
template <typename T>
__device__ T block_sum(T v) {
    __shared__ T warp_sums[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();  // sync: warp sums written
    if (warp == 0) {
        v = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : T(0);
        v = warp_sum(v);
    }
    __syncthreads();  // warp_sums may be reused by the next call
    return v;
}
