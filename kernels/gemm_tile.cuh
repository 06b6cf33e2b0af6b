// The tiled GEMM shared by forward.cu, weight_grad.cu and propagate.cu:
//
//   acc = sum_k A(m, k) * B(k, n)   for the block's BM x BN tile of C
//
// Tiles of A and B go through shared memory BK deep, the next pair fetched into
// registers while the current one is multiplied; elements outside M x N x K
// load as zero, so no size needs to be a multiple of a tile. The
// operands are read through functors load_a(m, k), load_b(n, k) (a prologue
// can transform elements while the tile is loaded); on_tile(Bs) sees each B
// tile once it is in shared memory (the bias-gradient sums use it). A_KROWS
// says A is stored k-major (element (m, k) at k*M + m: consecutive m are
// adjacent), otherwise m-major (at m*K + k); likewise B_KROWS for B (k-major:
// (k, n) at k*N + n). The load order follows the layout so global reads coalesce.
//
// Two cores do the arithmetic, with the same interface (a kernel is written once,
// templated on its core):
//   Simt<T, BM, BN, BK, TM, TN>  CUDA cores, float or double. Each thread owns TM x TN
//       outputs at rows ty + i*(BM/TM), columns tx + j*(BN/TN): strided, so a warp
//       reads consecutive shared-memory words and writes C coalesced.
//   Tf32  tensor cores (sm_80+), float in, float accumulate, TF32 products:
//       mma.sync m16n8k8; 64 x 64 x 16 tiles, 8 warps of 32 x 16 outputs each.
//       Built only by NVRTC/nvcc (the CPU harness checks the Simt core).
#pragma once
#include "common.cuh"

// One operand's BK x ROWS tile in flight: each thread fetches its share into
// registers (all its global reads issued back to back, out-of-range elements as
// zero), then stores them to shared memory. KROWS (k-major storage): consecutive
// threads take consecutive rows; else consecutive k. Either way global reads coalesce.
template <typename T, int ROWS, int BK, int PAD, bool KROWS, int THREADS>
struct TileFetch {
    static const int PER_THREAD = (BK * ROWS + THREADS - 1) / THREADS;
    static const bool EVEN = BK * ROWS % THREADS == 0;  // every thread's every slot in the tile
    T v[PER_THREAD];

    static __device__ __forceinline__ int k_of(int i) { return KROWS ? i / ROWS : i % BK; }
    static __device__ __forceinline__ int row_of(int i) { return KROWS ? i % ROWS : i / BK; }

    template <typename Load>
    __device__ __forceinline__ void fetch(Load load, index_t r0, index_t k0, index_t R, index_t K, int tid) {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = tid + j * THREADS;
            const index_t r = r0 + row_of(i), k = k0 + k_of(i);
            v[j] = ((EVEN || i < BK * ROWS) && r < R && k < K) ? load(r, k) : T(0);
        }
    }

    __device__ __forceinline__ void store(T (&tile)[BK][ROWS + PAD], int tid) const {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = tid + j * THREADS;
            if (EVEN || i < BK * ROWS) tile[k_of(i)][row_of(i)] = v[j];
        }
    }
};

// The main loop both cores share: store the fetched tiles, fetch the next ones
// (their global reads in flight during this tile's arithmetic), hook, multiply,
// repeat over k in [k_begin, K) (a split-K slice takes part of K). Every element is
// loaded exactly once (a prologue's side effect too).
template <class Core, bool A_KROWS, bool B_KROWS, typename T, typename Acc, typename LoadA, typename LoadB,
          typename OnTile>
__device__ __forceinline__ void gemm_mainloop(Acc& acc, T (&As)[Core::BK][Core::BM + Core::PAD],
                                              T (&Bs)[Core::BK][Core::BN + Core::PAD], LoadA load_a,
                                              LoadB load_b, OnTile on_tile, index_t m0, index_t n0, index_t M,
                                              index_t N, index_t K, index_t k_begin = 0) {
    const int tid = threadIdx.x;
    TileFetch<T, Core::BM, Core::BK, Core::PAD, A_KROWS, Core::THREADS> a;
    TileFetch<T, Core::BN, Core::BK, Core::PAD, B_KROWS, Core::THREADS> b;
    Core::zero(acc);
    a.fetch(load_a, m0, k_begin, M, K, tid);
    b.fetch(load_b, n0, k_begin, N, K, tid);
    for (index_t k0 = k_begin; k0 < K; k0 += Core::BK) {
        a.store(As, tid);
        b.store(Bs, tid);
        __syncthreads();  // sync: tile loaded
        if (k0 + Core::BK < K) {
            a.fetch(load_a, m0, k0 + Core::BK, M, K, tid);
            b.fetch(load_b, n0, k0 + Core::BK, N, K, tid);
        }
        on_tile(Bs);
        Core::multiply(acc, As, Bs);
        __syncthreads();  // sync: tile consumed
    }
}

template <typename T, int BM_, int BN_, int BK_, int TM, int TN>
struct Simt {
    static const int BM = BM_, BN = BN_, BK = BK_, PAD = 1;
    static const int THREADS = (BM / TM) * (BN / TN);  // the launchers' block (ops/cuda.py threads_of)
    static const int ROW_STEP = BM / TM;  // rows of one thread are ROW_STEP apart
    static const int COL_STEP = BN / TN;
    static_assert(BM % TM == 0 && BN % TN == 0, "a thread's outputs must tile the block tile");
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps, at most 1024 threads");
    static_assert(BN <= THREADS, "weight_grad sums one bias column per thread");
    typedef T Value;
    struct Acc {
        T v[TM][TN];
    };

    static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc.v[i][j] = T(0);
    }

    // One BK-deep step of the product from the tiles in shared memory.
    static __device__ __forceinline__ void multiply(Acc& acc, const T (&As)[BK][BM + PAD],
                                                    const T (&Bs)[BK][BN + PAD]) {
        const int tx = threadIdx.x % COL_STEP, ty = threadIdx.x / COL_STEP;
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            T a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + i * ROW_STEP];
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + j * COL_STEP];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc.v[i][j] += a[i] * b[j];
        }
    }

    // epilogue(m, n, value) for each of this thread's outputs inside M x N.
    template <typename Epilogue>
    static __device__ __forceinline__ void for_each_output(const Acc& acc, index_t m0, index_t n0, index_t M,
                                                           index_t N, Epilogue epilogue) {
        const int tx = threadIdx.x % COL_STEP, ty = threadIdx.x / COL_STEP;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const index_t m = m0 + ty + i * ROW_STEP;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const index_t n = n0 + tx + j * COL_STEP;
                if (m < M && n < N) epilogue(m, n, acc.v[i][j]);
            }
        }
    }
};

// Warp tiles (siboehm's SGEMM kernel 10, CUTLASS's SIMT warp level): warp w owns a WM x WN
// sub-tile of the block's BM x BN, cut into WMITER x WNITER pieces; in each piece a lane owns
// TM consecutive rows and TN consecutive columns, so its fragments are contiguous in shared
// memory and read as 16-byte vectors (ld.shared.v4.f32: TM/4 + TN/4 loads per TM x TN FMAs for
// float, where Simt reads TM + TN scalars strided). PAD keeps every tile row 16-byte aligned
// (GemmTiles is 16-byte aligned); the fetch's scalar stores are conflict-free with it (row
// stride BM + 4 words: 8 k-rows x 4 m land on 32 banks).
template <typename T, int BM_, int BN_, int BK_, int WM, int WN, int WMITER, int WNITER, int TM, int TN>
struct Warp {
    static const int BM = BM_, BN = BN_, BK = BK_, PAD = 16 / sizeof(T);
    static const int THREADS = (BM / WM) * (BN / WN) * 32;  // the launchers' block (ops/cuda.py threads_of)
    static const int WSUBM = WM / WMITER, WSUBN = WN / WNITER;  // one piece of a warp's sub-tile
    static const int LANES_N = WSUBN / TN, LANES_M = WSUBM / TM;
    static const int VEC = 16 / sizeof(T);                      // elements of one 16-byte shared load
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % WMITER == 0 && WN % WNITER == 0, "warp tiling");
    static_assert(LANES_M * LANES_N == 32, "a piece is TM x TN per lane over the 32 lanes");
    static_assert(TM % VEC == 0 && TN % VEC == 0, "fragments read as whole 16-byte vectors");
    static_assert(THREADS <= 1024 && BN <= THREADS, "at most 1024 threads; one bias column per thread");
    static_assert((BM + PAD) * sizeof(T) % 16 == 0 && (BN + PAD) * sizeof(T) % 16 == 0 &&
                      WSUBM * sizeof(T) % 16 == 0 && WSUBN * sizeof(T) % 16 == 0,
                  "every fragment starts 16-byte aligned");
    typedef T Value;
    struct Acc {
        T v[WMITER * TM][WNITER * TN];
    };

    // The first row and column of this lane's fragments in the block tile.
    static __device__ __forceinline__ int row0() {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        return (warp / (BN / WN)) * WM + (lane / LANES_N) * TM;
    }
    static __device__ __forceinline__ int col0() {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        return (warp % (BN / WN)) * WN + (lane % LANES_N) * TN;
    }

    static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < WMITER * TM; ++i)
#pragma unroll
            for (int j = 0; j < WNITER * TN; ++j) acc.v[i][j] = T(0);
    }

    // COUNT consecutive elements of shared memory (16-byte aligned) into registers, a vector at a time.
    template <int COUNT>
    static __device__ __forceinline__ void load_vectors(T* dst, const T* src) {
#pragma unroll
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
        if (reinterpret_cast<unsigned long long>(src) % 16) __trap();  // a GPU faults on a misaligned vector
#endif
        for (int p = 0; p < COUNT / VEC; ++p) {
            const Pack<T> v = reinterpret_cast<const Pack<T>*>(src)[p];
#pragma unroll
            for (int e = 0; e < VEC; ++e) dst[p * VEC + e] = v.v[e];
        }
    }

    static __device__ __forceinline__ void multiply(Acc& acc, const T (&As)[BK][BM + PAD],
                                                    const T (&Bs)[BK][BN + PAD]) {
        const int m0 = row0(), n0 = col0();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            T a[WMITER * TM], b[WNITER * TN];
#pragma unroll
            for (int i = 0; i < WMITER; ++i) load_vectors<TM>(a + i * TM, &As[kk][m0 + i * WSUBM]);
#pragma unroll
            for (int j = 0; j < WNITER; ++j) load_vectors<TN>(b + j * TN, &Bs[kk][n0 + j * WSUBN]);
#pragma unroll
            for (int i = 0; i < WMITER * TM; ++i)
#pragma unroll
                for (int j = 0; j < WNITER * TN; ++j) acc.v[i][j] += a[i] * b[j];
        }
    }

    template <typename Epilogue>
    static __device__ __forceinline__ void for_each_output(const Acc& acc, index_t m0, index_t n0, index_t M,
                                                           index_t N, Epilogue epilogue) {
        const int r0 = row0(), c0 = col0();
#pragma unroll
        for (int i = 0; i < WMITER * TM; ++i) {
            const index_t m = m0 + r0 + (i / TM) * WSUBM + i % TM;
#pragma unroll
            for (int j = 0; j < WNITER * TN; ++j) {
                const index_t n = n0 + c0 + (j / TN) * WSUBN + j % TN;
                if (m < M && n < N) epilogue(m, n, acc.v[i][j]);
            }
        }
    }
};

#include "gemm_tf32.cuh"

// The two shared-memory tiles of one block, declared by each kernel (`__shared__ GemmTiles<Core> tiles;`)
// and handed to the tile functions, so kernels that run several GEMMs share one pair.
template <class Core>
struct GemmTiles {
    alignas(16) typename Core::Value A[Core::BK][Core::BM + Core::PAD];  // 16-byte aligned: Warp reads vectors
    alignas(16) typename Core::Value B[Core::BK][Core::BN + Core::PAD];
};

struct NoTileHook {
    template <typename Tile>
    __device__ __forceinline__ void operator()(const Tile&) const {}
};
