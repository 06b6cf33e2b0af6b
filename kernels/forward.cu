// Dense forward with the bias and activation in the GEMM epilogue:
//
//   out = f(o W + b)        o: B x K, W: K x N, b: N, out: B x N (row-major)
//
// Tiling: see gemm_tile.cuh (Core: Simt, Warp or Tf32); C rows are the batch (m), columns the outputs (n).
// forward_gather is the first layer of a fit step, gathering its batch as it loads it:
//
//   o[r] = X[order[step * stride + r]]        (batch.cu's gather_batch, fused)
//
// The blocks of tile column 0 see every element of their rows once: they write them to
// xb, and the rows' targets Y[...] to yb, for the rest of the step.
#include "gemm_tile.cuh"
#include "params.cuh"

template <typename T, class Core, typename LoadO>
__device__ __forceinline__ void forward_tile(GemmTiles<Core>& tiles, index_t tile_m, index_t tile_n, LoadO load_o,
                                             const T* __restrict__ W, const T* __restrict__ b, T* __restrict__ out,
                                             int act, index_t M, index_t N, index_t K, bool bf16) {
    const index_t m0 = tile_m * Core::BM, n0 = tile_n * Core::BN;
    typename Core::Acc acc;
    gemm_mainloop<Core, false, true>(acc, tiles, load_o, Direct<T>{W, N},  // o: m-major, W: k-major
                                     NoTileHook(), m0, n0, M, N, K, 0, false, bf16);
    Core::for_each_output(acc, m0, n0, M, N,
                          [&](index_t m, index_t n, T v) { out[m * N + n] = stored_value<Core>(activate(act, v + b[n]), bf16, act); });
}

template <typename T, class Core>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS) forward(ForwardParams<T> p) {
    __shared__ GemmTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    forward_tile<T, Core>(tiles, blockIdx.y, blockIdx.x, Direct<T>{p.o, p.K}, p.W, p.b, p.out, p.act, p.M, p.N, p.K, p.bf16);
}

// p.o is the gathered batch xb: written here, by the blocks of tile column 0.
template <typename T, class Core>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS) forward_gather(ForwardParams<T> p, GatherParams<T> g) {
    __shared__ GemmTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    const T* __restrict__ X = g.X;
    const long long* __restrict__ order = g.order;
    T* __restrict__ xb = const_cast<T*>(p.o);
    const index_t first = g.step[0] * g.stride, K = p.K;
    const bool writes_batch = blockIdx.x == 0;
    forward_tile<T, Core>(
        tiles, blockIdx.y, blockIdx.x,
        [&](index_t m, index_t k) {
            const T v = X[order[first + m] * K + k];
            if (writes_batch) xb[m * K + k] = v;
            return v;
        },
        p.W, p.b, p.out, p.act, p.M, p.N, K, p.bf16);
    if (writes_batch)
        for (index_t i = threadIdx.x; i < Core::BM * g.n_y; i += blockDim.x) {
            const index_t m = (index_t)blockIdx.y * Core::BM + i / g.n_y, c = i % g.n_y;
            if (m < p.M) g.yb[m * g.n_y + c] = g.Y[order[first + m] * g.n_y + c];
        }
}
