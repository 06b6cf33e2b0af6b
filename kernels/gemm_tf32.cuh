// The tensor-core core of gemm_tile.cuh (its interface: zero, multiply, for_each_output;
// THREADS, BM, BN, BK, PAD). Included by gemm_tile.cuh.
#pragma once
#include "common.cuh"
#include "mma.cuh"

// Tensor cores: float operands rounded to TF32 (10-bit mantissa), products summed in float; on
// the GPU the PTX, in the CUDA-on-CPU shim its emulation (mma.cuh).
// Fragment layouts of mma.sync.m16n8k8 .tf32 (PTX ISA), lane = 4 g + t:
//   A (16 x 8, row):  a[r] = A(g + 8 (r % 2), t + 4 (r / 2))
//   B (8 x 8, col):   b[r] = B(t + 4 r, g)
//   C (16 x 8):       c[r] = C(g + 8 (r / 2), 2 t + r % 2)
struct Tf32 {
    static const int BM = 64, BN = 64, BK = 16, PAD = 8, STAGES = 4, MIN_BLOCKS = 1;  // PAD 8: fragment loads on 32 banks
    static const int THREADS = 256, WARP_M = 32, WARP_N = 16;  // 8 warps: 2 along m, 4 along n
    static const int MI = WARP_M / 16, NI = WARP_N / 8;        // mma tiles per warp
    static_assert(THREADS == 32 * (BM / WARP_M) * (BN / WARP_N), "one warp per warp tile");
    typedef float Value;
    struct Acc {
        float v[MI][NI][4];
    };

    static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) acc.v[i][j][r] = 0.0f;
    }

    static __device__ __forceinline__ void multiply(Acc& acc, const float (&As)[BK][BM + PAD],
                                                    const float (&Bs)[BK][BN + PAD]) {
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
        const int wm = (warp / 4) * WARP_M, wn = (warp % 4) * WARP_N;
#pragma unroll
        for (int k0 = 0; k0 < BK; k0 += 8) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int r = 0; r < 4; ++r) a[i][r] = tf32_round(As[k0 + t + 4 * (r / 2)][wm + 16 * i + g + 8 * (r % 2)]);
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int r = 0; r < 2; ++r) b[j][r] = tf32_round(Bs[k0 + t + 4 * r][wn + 8 * j + g]);
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_m16n8k8_tf32(acc.v[i][j], a[i], b[j], acc.v[i][j]);
        }
    }

    template <typename Epilogue>
    static __device__ __forceinline__ void for_each_output(const Acc& acc, index_t m0, index_t n0, index_t M,
                                                           index_t N, Epilogue epilogue) {
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
        const int wm = (warp / 4) * WARP_M, wn = (warp % 4) * WARP_N;
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const index_t m = m0 + wm + 16 * i + g + 8 * (r / 2);
                    const index_t n = n0 + wn + 8 * j + 2 * t + r % 2;
                    if (m < M && n < N) epilogue(m, n, acc.v[i][j][r]);
                }
    }
};
