// The tiled GEMM main loop shared by forward.cu, weight_grad.cu and propagate.cu:
//
//   acc[i][j] = sum_k A(m, k) * B(k, n)   for the block's BM x BN tile of C
//
// Each of the THREADS = (BM/TM)*(BN/TN) threads owns TM x TN outputs, at rows
// ty + i*(BM/TM) and columns tx + j*(BN/TN): strided, so a warp reads
// consecutive shared-memory words (no bank conflicts) and writes C coalesced.
// Tiles of A and B go through shared memory BK deep; elements outside
// M x N x K load as zero, so no size needs to be a multiple of a tile.
//
// The operands are read through functors load_a(m, k), load_b(n, k) (a prologue
// can transform elements while the tile is loaded); on_tile(Bs) sees each B tile
// once it is in shared memory (the bias-gradient sums use it). A_KROWS says A is stored
// k-major (element (m, k) at k*M + m: consecutive m are adjacent), otherwise
// m-major (at m*K + k); likewise B_KROWS for B (k-major: (k, n) at k*N + n).
// The load order follows the layout so that global reads coalesce.
#pragma once
#include "common.cuh"

template <int BM, int BN, int TM, int TN>
struct TileShape {
    static const int THREADS = (BM / TM) * (BN / TN);
    static const int ROW_STEP = BM / TM;  // rows of one thread are ROW_STEP apart
    static const int COL_STEP = BN / TN;
};

template <typename T, int BM, int BK, bool KROWS, typename Load>
__device__ __forceinline__ void load_tile(T (&tile)[BK][BM + 1], Load load, index_t m0, index_t k0,
                                          index_t M, index_t K, int tid, int threads) {
    for (int i = tid; i < BK * BM; i += threads) {
        // k-major storage: consecutive threads take consecutive m; else consecutive k.
        const int kk = KROWS ? i / BM : i % BK;
        const int mm = KROWS ? i % BM : i / BK;
        const index_t m = m0 + mm, k = k0 + kk;
        tile[kk][mm] = (m < M && k < K) ? load(m, k) : T(0);
    }
}

// One BK-deep step of the product from the tiles in shared memory.
template <typename T, int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void multiply_tile(T (&acc)[TM][TN], const T (&As)[BK][BM + 1],
                                              const T (&Bs)[BK][BN + 1], int ty, int tx) {
    typedef TileShape<BM, BN, TM, TN> S;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        T a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + i * S::ROW_STEP];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + j * S::COL_STEP];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
}

// acc = the block's tile of C = A B, over all of K.
template <typename T, int BM, int BN, int BK, int TM, int TN, bool A_KROWS, bool B_KROWS, typename LoadA,
          typename LoadB, typename OnTile>
__device__ __forceinline__ void gemm_mainloop(T (&acc)[TM][TN], T (&As)[BK][BM + 1], T (&Bs)[BK][BN + 1],
                                              LoadA load_a, LoadB load_b, OnTile on_tile, index_t m0,
                                              index_t n0, index_t M, index_t N, index_t K) {
    typedef TileShape<BM, BN, TM, TN> S;
    const int tid = threadIdx.x, tx = tid % S::COL_STEP, ty = tid / S::COL_STEP;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    for (index_t k0 = 0; k0 < K; k0 += BK) {
        load_tile<T, BM, BK, A_KROWS>(As, load_a, m0, k0, M, K, tid, S::THREADS);
        load_tile<T, BN, BK, B_KROWS>(Bs, load_b, n0, k0, N, K, tid, S::THREADS);
        __syncthreads();  // sync: tile loaded
        on_tile(Bs);
        multiply_tile<T, BM, BN, BK, TM, TN>(acc, As, Bs, ty, tx);
        __syncthreads();  // sync: tile consumed
    }
}

// epilogue(m, n, value) for each of this thread's outputs inside M x N.
template <int BM, int BN, int TM, int TN, typename T, typename Epilogue>
__device__ __forceinline__ void for_each_output(const T (&acc)[TM][TN], index_t m0, index_t n0, index_t M,
                                                index_t N, Epilogue epilogue) {
    typedef TileShape<BM, BN, TM, TN> S;
    const int tx = threadIdx.x % S::COL_STEP, ty = threadIdx.x / S::COL_STEP;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const index_t m = m0 + ty + i * S::ROW_STEP;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const index_t n = n0 + tx + j * S::COL_STEP;
            if (m < M && n < N) epilogue(m, n, acc[i][j]);
        }
    }
}

struct NoTileHook {
    template <typename Tile>
    __device__ __forceinline__ void operator()(const Tile&) const {}
};
