// The bf16 GEMM core alone, the three products of a training step in bf16 storage:
//
//   out = op(a) op(b)    op(a): M x K, op(b): K x N (bf16, row-major storage), out: M x N (float)
//
//   A_KROWS  B_KROWS
//   true     true      a: K x M, b: K x N    out = a^T b   the weight gradient (o^T delta)
//   false    true      a: M x K, b: K x N    out = a b     the forward (o W)
//   false    false     a: M x K, b: N x K    out = a b^T   the propagation (delta W^T)
//
// with float sums on the tensor cores (gemm_bf16.cuh Bf16<BN>, each tile kept in shared memory as
// its operand is stored): what the bf16 training path's GEMMs are to be built on, and what the
// benchmarks set against cuBLAS BF16. Tiling: gemm_tile.cuh.
#include "gemm_tile.cuh"
#include "params.cuh"

template <class Core, bool A_KROWS, bool B_KROWS>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS) matmul(MatmulParams<float> p) {
    __shared__ GemmTiles<Core, false, A_KROWS, B_KROWS> tiles;
    if (!launched_as_core<Core>()) return;
    typedef typename Core::Value T;
    const index_t m0 = (index_t)blockIdx.y * Core::BM, n0 = (index_t)blockIdx.x * Core::BN;
    const index_t M = p.M, N = p.N, K = p.K;
    float* __restrict__ out = p.out;
    typename Core::Acc acc;
    gemm_mainloop<Core, A_KROWS, B_KROWS>(acc, tiles, Direct<T>{p.a, A_KROWS ? M : K}, Direct<T>{p.b, B_KROWS ? N : K},
                                          NoTileHook(), m0, n0, M, N, K);
    Core::for_each_output(acc, m0, n0, M, N, [&](index_t m, index_t n, float v) { out[m * N + n] = v; });
}
