// Dense forward with the bias and activation in the GEMM epilogue:
//
//   out = f(o W + b)        o: B x K, W: K x N, b: N, out: B x N (row-major)
//
// Tiling: see gemm_tile.cuh (Core: Simt or Tf32); C rows are the batch (m), columns the outputs (n).
#include "gemm_tile.cuh"

template <typename T, class Core>
__global__ void forward(const T* __restrict__ o, const T* __restrict__ W, const T* __restrict__ b,
                        T* __restrict__ out, int act, index_t M, index_t N, index_t K) {
    __shared__ T As[Core::BK][Core::BM + Core::PAD];
    __shared__ T Bs[Core::BK][Core::BN + Core::PAD];
    const index_t m0 = (index_t)blockIdx.y * Core::BM, n0 = (index_t)blockIdx.x * Core::BN;
    typename Core::Acc acc;
    gemm_mainloop<Core, false, true>(
        acc, As, Bs, [&](index_t m, index_t k) { return o[m * K + k]; },  // m-major
        [&](index_t n, index_t k) { return W[k * N + n]; },              // k-major
        NoTileHook(), m0, n0, M, N, K);
    Core::for_each_output(acc, m0, n0, M, N,
                          [&](index_t m, index_t n, T v) { out[m * N + n] = activate(act, v + b[n]); });
}
