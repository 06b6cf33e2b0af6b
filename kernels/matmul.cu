// The bf16 GEMM core alone, the product of a weight gradient in bf16 storage:
//
//   out = a_t^T b        a_t: K x M, b: K x N (bf16, row-major: both k-major), out: M x N (float)
//
// with float sums on the tensor cores (gemm_bf16.cuh Bf16<BN>): what the bf16 training path's
// GEMMs are built on, and what the benchmarks set against cuBLAS BF16. Tiling: gemm_tile.cuh;
// C rows are a_t's columns (m), C columns b's (n), k the batch.
#include "gemm_tile.cuh"
#include "params.cuh"

template <class Core>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS) matmul_tn(MatmulParams<float> p) {
    __shared__ GemmTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    typedef typename Core::Value T;
    const index_t m0 = (index_t)blockIdx.y * Core::BM, n0 = (index_t)blockIdx.x * Core::BN;
    const index_t M = p.M, N = p.N;
    float* __restrict__ out = p.out;
    typename Core::Acc acc;
    gemm_mainloop<Core, true, true>(acc, tiles, Direct<T>{p.a_t, M}, Direct<T>{p.b, N}, NoTileHook(), m0, n0, M, N,
                                    p.K);
    Core::for_each_output(acc, m0, n0, M, N, [&](index_t m, index_t n, float v) { out[m * N + n] = v; });
}
