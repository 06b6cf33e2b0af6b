// The tensor-core core of gemm_tile.cuh (its interface: zero, multiply, for_each_output;
// THREADS, BM, BN, BK, PAD, STAGES, MIN_BLOCKS; ROUNDS). Included by gemm_tile.cuh.
#pragma once
#include "common.cuh"
#include "mma.cuh"

// Tensor cores: float operands rounded to TF32 (10-bit mantissa), products summed in float; on
// the GPU the PTX, in the CUDA-on-CPU shim its emulation (mma.cuh).
// Fragment layouts of mma.sync.m16n8k8 .tf32 (PTX ISA), lane = 4 g + t:
//   A (16 x 8, row):  a[r] = A(g + 8 (r % 2), t + 4 (r / 2))
//   B (8 x 8, col):   b[r] = B(t + 4 r, g)
//   C (16 x 8):       c[r] = C(g + 8 (r / 2), 2 t + r % 2)
//
// Block 128 x 64, 4 warps (2 along m, 2 along n) of 64 x 32: a warp's k step of 8 is MI x NI =
// 4 x 4 = 16 mma from 16 A and 8 B registers, read as 6 ld.shared.v4 (4 for A, 2 for B).
//
// Rounded once: ROUNDS asks the main loop (gemm_tile.cuh) to store every operand element in
// shared memory as stored(x) = cvt.rna.tf32(x), by the thread that copied it, once it has
// landed; multiply passes the bits to the mma as they are (no cvt in the loop: the mma reads
// the top 19 bits of a .tf32 register, so the low 13 must already be the rounding's zeros).
//
// Which rows a lane reads (the permutation that makes 128-bit loads possible): the mma does not
// care which rows of the block tile are its rows g and g + 8, so a warp's 64 rows are dealt out
// so that each lane's 8 rows of a k row (4 m tiles x rows g, g + 8) are 8 adjacent floats:
//   row g + 8 h of m tile i  = warp row 8 prow(g) + 2 i + h     (two 16-byte loads a k row)
//   column g of n tile j     = warp column 4 pcol(g) + j        (one 16-byte load a k row)
// and the epilogue maps the accumulators back the same way (for_each_output).
//
// Banks: a 128-bit shared load is served a quarter warp (8 lanes: g in {2 q, 2 q + 1}, t = 0..3)
// per pass; it is conflict-free when those 8 lanes' 16-byte words start on distinct multiples of
// 4 banks. PAD 4 makes a k row of A 132 words and of B 68: both 4 (mod 32), so lane t starts 4 t
// banks along (t = 0..3: 0..12 + 3 words), and the lane pair g = 2 q, 2 q + 1 is put 16 banks
// apart by the permutations (A: 8 prow(g) = 0, 16 | 8, 24 | ...; B: 4 pcol(g) = 0, 16 | 4, 20 |
// ...): 8 distinct 4-bank words a pass, 4 passes a load (the minimum for 512 bytes). The
// cp.async 16-byte copies of k-major rows land conflict-free too (consecutive threads,
// consecutive words); the transposing element copies of an m-major operand land 2-way.
struct Tf32 {
    static const int BM = 128, BN = 64, BK = 16, PAD = 4, STAGES = 3, MIN_BLOCKS = 2;
    static const int THREADS = 128, WARP_M = 64, WARP_N = 32;  // 4 warps: 2 along m, 2 along n
    static const int MI = WARP_M / 16, NI = WARP_N / 8;         // mma tiles per warp: 4 x 4
    static const bool ROUNDS = true;                            // operands rounded as they land
    static const bool ROW_TILES = false;                        // every tile k-major (TileOf)
    static const bool STAGED = false;                           // the epilogue from registers (tile_epilogue)
    static_assert(THREADS == 32 * (BM / WARP_M) * (BN / WARP_N), "one warp per warp tile");
    static_assert(MI == 4 && NI == 4, "a lane's rows and columns of a k row are 2 and 1 16-byte vectors");
    static_assert((BM + PAD) % 32 == 4 && (BN + PAD) % 32 == 4, "the bank argument above");
    typedef float Value;
    struct Acc {
        float v[MI][NI][4];
    };

    // The value an operand element is stored as in shared memory: its TF32 rounding.
    static __device__ __forceinline__ float stored(float x) { return tf32_rounded(x); }

    // Lane g's block of 8 warp rows, and of 4 warp columns (the permutations above).
    static __device__ __forceinline__ int prow(int g) { return (g & 4) | ((g & 1) << 1) | ((g >> 1) & 1); }
    static __device__ __forceinline__ int pcol(int g) { return ((g & 1) << 2) | (g >> 1); }
    static __device__ __forceinline__ int warp_m() { return (threadIdx.x / 32 / (BN / WARP_N)) * WARP_M; }
    static __device__ __forceinline__ int warp_n() { return (threadIdx.x / 32 % (BN / WARP_N)) * WARP_N; }

    static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) acc.v[i][j][r] = 0.0f;
    }

    // 4 floats of shared memory (16-byte aligned) as one vector load.
    static __device__ __forceinline__ Pack<float> vec4(const float* p) {
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
        if (reinterpret_cast<unsigned long long>(p) % 16) __trap();  // a GPU faults on a misaligned vector
#endif
        return *reinterpret_cast<const Pack<float>*>(p);
    }

    static __device__ __forceinline__ void multiply(Acc& acc, const float (&As)[BK][BM + PAD],
                                                    const float (&Bs)[BK][BN + PAD]) {
        const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
        const int am = warp_m() + 8 * prow(g), bn = warp_n() + 4 * pcol(g);
#pragma unroll
        for (int k0 = 0; k0 < BK; k0 += 8) {
            float x[2][8], y[2][4];  // x[h][2 i + hh] = A(row g + 8 hh of m tile i, k0 + t + 4 h); y[h][j] likewise
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const Pack<float> lo = vec4(&As[k0 + t + 4 * h][am]), hi = vec4(&As[k0 + t + 4 * h][am + 4]);
                const Pack<float> b = vec4(&Bs[k0 + t + 4 * h][bn]);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    x[h][e] = lo.v[e];
                    x[h][4 + e] = hi.v[e];
                    y[h][e] = b.v[e];
                }
            }
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int r = 0; r < 4; ++r) a[i][r] = float_bits(x[r / 2][2 * i + r % 2]);
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int r = 0; r < 2; ++r) b[j][r] = float_bits(y[r][j]);
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_m16n8k8_tf32(acc.v[i][j], a[i], b[j], acc.v[i][j]);
        }
    }

    template <typename Epilogue>
    static __device__ __forceinline__ void for_each_output(const Acc& acc, index_t m0, index_t n0, index_t M,
                                                           index_t N, Epilogue epilogue) {
        const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
        const int am = warp_m() + 8 * prow(g), wn = warp_n();
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const index_t m = m0 + am + 2 * i + r / 2;
                    const index_t n = n0 + wn + 4 * pcol(2 * t + r % 2) + j;
                    if (m < M && n < N) epilogue(m, n, acc.v[i][j][r]);
                }
    }
};

