// Error propagation with the derivative of the layer below in the epilogue:
//
//   delta_below = (delta W^T) * f'(o)     delta: B x K, W: N x K, o: B x N
//
// K is this layer's output width, N the width below; f' comes from the saved
// output o (common.cuh), so a hidden delta never needs a pass of its own.
// cuBLASLt and CUTLASS ship dReLU/dGELU epilogues only; this covers sigmoid,
// tanh, ReLU and identity. Both operands are m-/n-major (K contiguous). delta, W, o and out are in
// the core's Value S (params.cuh: with Bf16, bf16 and W the weights' bf16 copy); f' and the
// product in float.
// propagate_tile computes one BM x BN tile, reading delta through load_delta (Direct, or a functor (m, k));
// backward.cu runs it beside a weight update, or computing the output delta as it loads.
#pragma once
#include "gemm_tile.cuh"
#include "params.cuh"

template <class Core>
using PropagateTiles = GemmTiles<Core, false, false, false>;  // delta m-major, W n-major

template <typename T, class Core, typename LoadDelta>
__device__ __forceinline__ void propagate_tile(PropagateTiles<Core>& tiles, index_t tile_m, index_t tile_n,
                                               LoadDelta load_delta,
                                               const PropagateParams<T, typename Core::Value>& p) {
    typedef typename Core::Value S;
    const index_t M = p.M, N = p.N, K = p.K;
    const index_t m0 = tile_m * Core::BM, n0 = tile_n * Core::BN;
    const S* __restrict__ o = p.o;
    S* __restrict__ out = p.out;
    const int act = p.act;
    typename Core::Acc acc;
    gemm_mainloop<Core, false, false>(acc, tiles, load_delta, Direct<S>{p.W, K},  // B(k, n) = W[n][k]
                                      NoTileHook(), m0, n0, M, N, K);
    tile_epilogue<Core>(acc, tiles, m0, n0, M, N, [&](index_t m, index_t n, T v) {
        out[m * N + n] = stored_as<S>(v * derivative(act, value_of<T>(o[m * N + n])));
    });
}

template <typename T, class Core>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS)
    propagate(PropagateParams<T, typename Core::Value> p) {
    __shared__ PropagateTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    propagate_tile<T, Core>(tiles, blockIdx.y, blockIdx.x, Direct<typename Core::Value>{p.delta, p.K}, p);
}
