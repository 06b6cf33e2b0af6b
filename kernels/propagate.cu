// Error propagation with the derivative of the layer below in the epilogue:
//
//   delta_below = (delta W^T) * f'(o)     delta: B x K, W: N x K, o: B x N
//
// K is this layer's output width, N the width below; f' comes from the saved
// output o (common.cuh), so a hidden delta never needs a pass of its own.
// cuBLASLt and CUTLASS ship dReLU/dGELU epilogues only; this covers sigmoid,
// tanh, ReLU and identity. Both operands are m-/n-major (K contiguous).
// propagate_tile computes one BM x BN tile, reading delta through load_delta (Direct, or a functor (m, k));
// backward.cu runs it beside a weight update, or computing the output delta as it loads.
#pragma once
#include "gemm_tile.cuh"
#include "params.cuh"

template <typename T, class Core, typename LoadDelta>
__device__ __forceinline__ void propagate_tile(GemmTiles<Core>& tiles, index_t tile_m, index_t tile_n,
                                               LoadDelta load_delta, const T* __restrict__ W,
                                               const T* __restrict__ o, T* __restrict__ out, int act, index_t M,
                                               index_t N, index_t K, bool bf16) {
    const index_t m0 = tile_m * Core::BM, n0 = tile_n * Core::BN;
    typename Core::Acc acc;
    gemm_mainloop<Core, false, false>(acc, tiles, load_delta, Direct<T>{W, K},  // B(k, n) = W[n][k]
                                      NoTileHook(), m0, n0, M, N, K, 0, false, bf16);
    Core::for_each_output(acc, m0, n0, M, N, [&](index_t m, index_t n, T v) {
        out[m * N + n] = stored_value<Core>(v * derivative(act, o[m * N + n]), bf16);
    });
}

template <typename T, class Core>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS) propagate(PropagateParams<T> p) {
    __shared__ GemmTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    propagate_tile<T, Core>(tiles, blockIdx.y, blockIdx.x, Direct<T>{p.delta, p.K}, p.W, p.o, p.out, p.act, p.M, p.N,
                            p.K, p.bf16);
}
