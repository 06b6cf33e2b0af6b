// Weight-gradient GEMM over the batch, with delta, the bias gradient and the
// SGD step fused in:
//
//   prologue:  delta = err * f'(o_next)   while the tile is loaded (if has_prologue;
//              otherwise g already is delta); written once to delta_out
//   GEMM:      dW = o^T delta             o: K x M (K = batch), delta: K x N
//   bias:      db = sum over the batch of delta   (fixed order: deterministic)
//   epilogue:  apply_update (common.cuh) to W and b:
//              WRITE_GRADIENT: W = dW, b = db;  SGD: W -= step dW (step = lr / B);
//              SGD_MOMENTUM: v = momentum v - step dW, W += v (same for b)
//
// Both operands are k-major (a batch row is contiguous), so tiles load
// coalesced without a transpose. Blocks in the first row of tiles
// (blockIdx.y == 0) see every delta element of their columns exactly once:
// they write delta_out and sum the bias gradient.
#include "gemm_tile.cuh"

template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void weight_grad(const T* __restrict__ o, const T* __restrict__ g, int has_prologue,
                            const T* __restrict__ o_next, T* __restrict__ delta_out, int act,
                            T* __restrict__ W, T* __restrict__ b, T* __restrict__ vel_w,
                            T* __restrict__ vel_b, int mode, T step, T momentum,
                            index_t M, index_t N, index_t K) {
    typedef TileShape<BM, BN, TM, TN> S;
    __shared__ T As[BK][BM + 1];
    __shared__ T Bs[BK][BN + 1];
    const int tid = threadIdx.x, tx = tid % S::COL_STEP, ty = tid / S::COL_STEP;
    const index_t m0 = (index_t)blockIdx.y * BM, n0 = (index_t)blockIdx.x * BN;
    const bool bias_block = blockIdx.y == 0;
    auto load_o = [&](index_t m, index_t k) { return o[k * M + m]; };
    auto load_delta = [&](index_t n, index_t k) {
        const index_t i = k * N + n;
        if (!has_prologue) return g[i];
        const T d = g[i] * derivative(act, o_next[i]);
        if (bias_block) delta_out[i] = d;
        return d;
    };
    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    T bias_acc = T(0);  // thread tid < BN sums column n0 + tid
    for (index_t k0 = 0; k0 < K; k0 += BK) {
        load_tile<T, BM, BK, true>(As, load_o, m0, k0, M, K, tid, S::THREADS);
        load_tile<T, BN, BK, true>(Bs, load_delta, n0, k0, N, K, tid, S::THREADS);
        __syncthreads();  // sync: tile loaded
        if (bias_block && tid < BN)
            for (int kk = 0; kk < BK; ++kk) bias_acc += Bs[kk][tid];
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
            if (n < N) apply_update(mode, W, vel_w, m * N + n, acc[i][j], step, momentum);
        }
    }
    if (bias_block && tid < BN && n0 + tid < N) apply_update(mode, b, vel_b, n0 + tid, bias_acc, step, momentum);
}
