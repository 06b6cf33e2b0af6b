// The bf16 tensor-core core of gemm_tile.cuh (its interface: zero, multiply, for_each_output;
// THREADS, BM, BN, BK, PAD, STAGES, MIN_BLOCKS; ROUNDS, ROW_TILES; STAGED: also
// for_each_output_staged, STAGING_BYTES). Included by gemm_tile.cuh.
#pragma once
#include "common.cuh"
#include "mma.cuh"

// Tensor cores on bf16 operands, float accumulation: acc += A B with A, B held in shared
// memory as bf16 (half the bytes of Tf32's float tiles), fragments read by ldmatrix.
//
// Fragment layouts of mma.sync.m16n8k16 .bf16 (PTX ISA), lane = 4 g + t, two elements a
// register, the lower k in the low half:
//   A (16 x 16, row):  a[r] = A(g + 8 (r % 2), 2 t + 8 (r / 2) + {0, 1})
//   B (16 x 8, col):   b[r] = B(2 t + 8 r + {0, 1}, g)
//   C (16 x 8):        c[r] = C(g + 8 (r / 2), 2 t + r % 2)
// A tile is kept in shared memory as its operand is stored (ROW_TILES; gemm_tile.cuh TileOf):
// k-major, tile[k][row] (a_t of the weight gradient, W of the forward), or m-major, tile[row][k]
// (o of the forward, delta and W of the propagation). An 8 x 8 block of a k-major tile, rows k,
// read by ldmatrix .trans, or of an m-major one, rows m (n), read by plain ldmatrix, gives lane
// 4 g + t the elements (k 2 t, 2 t + 1; row g): exactly one register of the A fragment (rows =
// m) or of B (rows = n). So a warp's fragments for a k step of 16 are ldmatrix.x4 loads, no
// conversion:
//   A, m tile i: matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15)
//                = a[0], a[1], a[2], a[3]
//   B, n tiles j, j + 1: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
//                = b[j][0], b[j][1], b[j + 1][0], b[j + 1][1]
// ldmatrix takes the address of each 8 x 8 matrix's row j from lane 8 q + j (matrix q).
//
// Block 128 x BN, warps of 64 x 64 (2 along m, BN / 64 along n): a warp's k step of 16 is MI x NI
// = 4 x 8 = 32 mma from 4 + 4 ldmatrix.x4 (16 A and 16 B registers): 128 bytes of shared memory
// a warp per mma. Banks: PAD 8 makes a k row 136 (264) halves = 68 (132) words, 4 (mod 32), so
// the 8 rows of one matrix (one ldmatrix phase, 16 bytes each) start 4 banks apart; an m row is
// 24 halves = 12 words, and 8 of them start at banks 0, 12, 24, 4, 16, 28, 8, 20: both
// conflict-free; rows stay 16-byte aligned (ldmatrix, cp.async 16). BK 16:
//   Bf16<128>  4 warps, 2 blocks an SM (192-203 registers a thread);
//   Bf16<256>  8 warps, 1 block an SM: a quarter less from L2 a FLOP.
// An m-major tile is a third padding (16 k + 8), so fewer stages fit the 46 KB (GemmTiles):
//   stages        a^T b   a b   a b^T
//   Bf16<128>       4      4      3
//   Bf16<256>       3      3      2
template <int BN_ = 128>
struct Bf16 {
    static const int BM = 128, BN = BN_, BK = 16, PAD = 8;
    static const int STAGES = BN == 128 ? 4 : 3, MIN_BLOCKS = BN == 128 ? 2 : 1;
    static const int WARP_M = 64, WARP_N = 64, THREADS = 32 * (BM / WARP_M) * (BN / WARP_N);
    static const int MI = WARP_M / 16, NI = WARP_N / 8;         // mma tiles per warp: 4 x 8
    static const bool ROUNDS = false;                           // operands are bf16 already
    static const bool ROW_TILES = true;                         // m-major operands kept m-major
    static const bool STAGED = true;                            // the epilogue through shared memory
    // for_each_output_staged's half tile: WARP_M rows of BN floats, a row STAGE_LD words apart
    static const int STAGE_LD = BN + 8, STAGING_BYTES = WARP_M * STAGE_LD * 4;
    static_assert(THREADS == 32 * (BM / WARP_M) * (BN / WARP_N), "one warp per warp tile");
    static_assert(NI % 2 == 0 && BK % 16 == 0, "B fragments two n tiles a load; whole k steps");
    static_assert((BM + PAD) % 64 == 8 && (BN + PAD) % 64 == 8, "the bank argument above: k-major rows");
    static_assert((BK + PAD) / 2 % 8 == 4, "the bank argument above: m-major rows on distinct 4-bank groups");
    static_assert(STAGE_LD % 32 == 8, "the staging's 8-byte stores conflict-free (for_each_output_staged)");
    typedef bf16_t Value;
    struct Acc {
        float v[MI][NI][4];
    };

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

    // As: tile[k][m] (AR == BK) or tile[m][k]; Bs likewise (gemm_tile.cuh TileOf).
    template <int AR, int AC, int BR, int BC>
    static __device__ __forceinline__ void multiply(Acc& acc, const bf16_t (&As)[AR][AC], const bf16_t (&Bs)[BR][BC]) {
        constexpr bool A_KMAJOR = AR == BK, B_KMAJOR = BR == BK;
        static_assert(A_KMAJOR ? AC == BM + PAD : AR == BM && AC == BK + PAD, "A: tile[k][m] or tile[m][k]");
        static_assert(B_KMAJOR ? BC == BN + PAD : BR == BN && BC == BK + PAD, "B: tile[k][n] or tile[n][k]");
        const int lane = threadIdx.x % 32, q = lane / 8, j8 = lane % 8;
        const int am = warp_m(), bn = warp_n();
#pragma unroll
        for (int k0 = 0; k0 < BK; k0 += 16) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {  // matrix q: k 8 (q / 2), m 8 (q % 2) of m tile i
                if constexpr (A_KMAJOR)
                    ldmatrix_m8n8<4, true>(a[i], &As[k0 + j8 + 8 * (q / 2)][am + 16 * i + 8 * (q % 2)]);
                else
                    ldmatrix_m8n8<4, false>(a[i], &As[am + 16 * i + j8 + 8 * (q % 2)][k0 + 8 * (q / 2)]);
            }
#pragma unroll
            for (int j = 0; j < NI; j += 2) {  // matrix q: k 8 (q % 2), n 8 (q / 2) of n tiles j, j + 1
                unsigned pair[4];
                if constexpr (B_KMAJOR)
                    ldmatrix_m8n8<4, true>(pair, &Bs[k0 + j8 + 8 * (q % 2)][bn + 8 * j + 8 * (q / 2)]);
                else
                    ldmatrix_m8n8<4, false>(pair, &Bs[bn + 8 * j + j8 + 8 * (q / 2)][k0 + 8 * (q % 2)]);
                b[j][0] = pair[0];
                b[j][1] = pair[1];
                b[j + 1][0] = pair[2];
                b[j + 1][1] = pair[3];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_m16n8k16_bf16(acc.v[i][j], a[i], b[j], acc.v[i][j]);
        }
    }

    template <typename Epilogue>
    static __device__ __forceinline__ void for_each_output(const Acc& acc, index_t m0, index_t n0, index_t M,
                                                           index_t N, Epilogue epilogue) {
        const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
        const int wm = warp_m(), wn = warp_n();
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

    // The epilogue through shared memory (gemm_tile.cuh tile_epilogue), a half of the block tile at a
    // time (WARP_M rows: STAGING_BYTES): the warps of that half store their accumulators as float2
    // (lane 4 g + t: row g (+ 8), columns 2 t, 2 t + 1; a row STAGE_LD = 8 (mod 32) words apart, so the
    // 16 lanes of a phase write 32 distinct banks), then every thread runs epilogue over the half in
    // row order: consecutive threads on consecutive columns (coalesced stores, conflict-free reads),
    // 8 outputs an iteration so their loads overlap, the epilogue's code 8 times over instead of 128.
    template <typename Epilogue>
    static __device__ __forceinline__ void for_each_output_staged(const Acc& acc, float* stage, index_t m0,
                                                                  index_t n0, index_t M, index_t N,
                                                                  Epilogue epilogue) {
        const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
        const int wm = warp_m(), wn = warp_n();
#pragma unroll 1
        for (int half = 0; half < BM / WARP_M; ++half) {
            __syncthreads();  // sync: the tiles (or the last half) read by every thread
            if (wm == half * WARP_M) {
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < NI; ++j)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            float2* slot = reinterpret_cast<float2*>(&stage[(16 * i + g + 8 * h) * STAGE_LD + wn + 8 * j + 2 * t]);
                            *slot = make_float2(acc.v[i][j][2 * h], acc.v[i][j][2 * h + 1]);
                        }
            }
            __syncthreads();  // sync: the half staged
#pragma unroll 8
            for (int e = threadIdx.x; e < WARP_M * BN; e += THREADS) {
                const int r = e / BN, c = e % BN;
                const index_t m = m0 + half * WARP_M + r, n = n0 + c;
                if (m < M && n < N) epilogue(m, n, stage[r * STAGE_LD + c]);
            }
        }
    }
};
