// Dense forward with the bias and activation in the GEMM epilogue:
//
//   out = f(o W + b)        o: B x K, W: K x N, b: N, out: B x N (row-major)
//
// Tiling: see gemm_tile.cuh; C rows are the batch (m), columns the outputs (n).
#include "gemm_tile.cuh"

template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void forward(const T* __restrict__ o, const T* __restrict__ W, const T* __restrict__ b,
                        T* __restrict__ out, int act, index_t M, index_t N, index_t K) {
    typedef TileShape<BM, BN, TM, TN> S;
    __shared__ T As[BK][BM + 1];
    __shared__ T Bs[BK][BN + 1];
    const int tid = threadIdx.x, tx = tid % S::COL_STEP, ty = tid / S::COL_STEP;
    const index_t m0 = (index_t)blockIdx.y * BM, n0 = (index_t)blockIdx.x * BN;
    auto load_a = [&](index_t m, index_t k) { return o[m * K + k]; };  // m-major
    auto load_b = [&](index_t k, index_t n) { return W[k * N + n]; };  // k-major
    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    for (index_t k0 = 0; k0 < K; k0 += BK) {
        load_tile<T, BM, BK, false>(As, load_a, m0, k0, M, K, tid, S::THREADS);
        load_tile<T, BN, BK, true>(Bs, [&](index_t n, index_t k) { return load_b(k, n); }, n0, k0, N, K, tid,
                                   S::THREADS);
        __syncthreads();  // sync: tile loaded
        multiply_tile<T, BM, BN, BK, TM, TN>(acc, As, Bs, ty, tx);
        __syncthreads();  // sync: tile consumed
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const index_t m = m0 + ty + i * S::ROW_STEP;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const index_t n = n0 + tx + j * S::COL_STEP;
            if (n < N) out[m * N + n] = activate(act, acc[i][j] + b[n]);
        }
    }
}
