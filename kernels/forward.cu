// Dense forward with the bias and activation in the GEMM epilogue:
//
//   out = f(o W + b)        o: B x K, W: K x N, b: N, out: B x N (row-major)
//
// Tiling: see gemm_tile.cuh (Core: Simt, Warp, Tf32 or Bf16); C rows are the batch (m), columns the
// outputs (n). o, W and out are in the core's Value S (params.cuh): with Bf16 (precision="bf16") o
// and out bf16, W the weights' bf16 copy, the bias and activation in float (the output layer writes
// y_hat in float instead: ForwardParams).
// forward_gather is the first layer of a fit step, gathering its batch as it loads it:
//
//   o[r] = X[order[step * stride + r]]        (batch.cu's gather_batch, fused; as S: X rounded)
//
// The blocks of tile column 0 see every element of their rows once: they write them to
// xb, and the rows' targets Y[...] to yb, for the rest of the step. (Not built for Bf16: its tile in
// flight through registers spills beside 128 accumulators a thread; bf16 runs gather_batch first.)
#include "gemm_tile.cuh"
#include "params.cuh"

template <class Core>
using ForwardTiles = GemmTiles<Core, false, false, true>;  // o m-major, W k-major

template <typename T, class Core, typename LoadO>
__device__ __forceinline__ void forward_tile(ForwardTiles<Core>& tiles, LoadO load_o,
                                             const ForwardParams<T, typename Core::Value>& p) {
    typedef typename Core::Value S;
    const index_t M = p.M, N = p.N, K = p.K;
    const index_t m0 = (index_t)blockIdx.y * Core::BM, n0 = (index_t)blockIdx.x * Core::BN;
    const T* __restrict__ b = p.b;
    const int act = p.act;
    typename Core::Acc acc;
    gemm_mainloop<Core, false, true>(acc, tiles, load_o, Direct<S>{p.W, N}, NoTileHook(), m0, n0, M, N, K);
    tile_epilogue<Core>(acc, tiles, m0, n0, M, N, [&](index_t m, index_t n, T v) {
        const T x = activate(act, v + b[n]);
        if constexpr (sizeof(S) < sizeof(T)) {
            if (p.y_hat) p.y_hat[m * N + n] = act == ACT_LOGITS ? x : value_of<T>(stored_as<S>(x));
            else p.out[m * N + n] = stored_as<S>(x);
        } else {
            p.out[m * N + n] = x;
        }
    });
}

template <typename T, class Core>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS)
    forward(ForwardParams<T, typename Core::Value> p) {
    __shared__ ForwardTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    forward_tile<T, Core>(tiles, Direct<typename Core::Value>{p.o, p.K}, p);
}

// p.o is the gathered batch xb: written here, by the blocks of tile column 0.
template <typename T, class Core>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS)
    forward_gather(ForwardParams<T, typename Core::Value> p, GatherParams<T> g) {
    typedef typename Core::Value S;
    __shared__ ForwardTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    const T* __restrict__ X = g.X;
    const long long* __restrict__ order = g.order;
    S* __restrict__ xb = const_cast<S*>(p.o);
    const index_t first = g.step[0] * g.stride, K = p.K;
    const bool writes_batch = blockIdx.x == 0;
    forward_tile<T, Core>(
        tiles,
        [&](index_t m, index_t k) {
            const S v = stored_as<S>(X[order[first + m] * K + k]);
            if (writes_batch) xb[m * K + k] = v;
            return v;
        },
        p);
    if (writes_batch)
        for (index_t i = threadIdx.x; i < Core::BM * g.n_y; i += blockDim.x) {
            const index_t m = (index_t)blockIdx.y * Core::BM + i / g.n_y, c = i % g.n_y;
            if (m < p.M) g.yb[m * g.n_y + c] = g.Y[order[first + m] * g.n_y + c];
        }
}
