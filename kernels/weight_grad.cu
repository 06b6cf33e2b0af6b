// Weight-gradient GEMM over the batch, with delta, the bias gradient and the
// SGD step fused in:
//
//   prologue:  delta = err * f'(o_next)   as the tile is loaded (if has_prologue; otherwise
//              g already is delta): in shared memory on each thread's own copies of err and
//              o_next (gemm_tile.cuh Transformed), or through registers where their stages do
//              not fit (double); written once to delta_out
//   GEMM:      dW = o^T delta             o: K x M (K = batch), delta: K x N
//   bias:      db = sum over the batch of delta   (fixed order: deterministic)
//   epilogue:  the update rule (update.cuh) on W and b: write dW and db, or an SGD,
//              momentum, Nesterov or Adam step (with its state), L2 on the weights; with a
//              W_copy (precision="bf16"), W's bf16 copy rewritten from the updated W
//
// o, delta (and err, o_next) are in the core's Value S (params.cuh; Bf16: bf16); db sums the
// stored delta in T, and W, b and the state are T. The Bf16 core runs no prologue (prologue_room:
// its 128 accumulators a thread leave no room), so its launcher forms delta first (delta.cu).
//
// Both operands are k-major (a batch row is contiguous), so tiles load
// coalesced without a transpose. Blocks in the first row of tiles
// (tile_m == 0) see every delta element of their columns exactly once:
// they write delta_out and sum the bias gradient. weight_grad_tile computes
// one BM x BN tile; backward.cu runs it beside an error propagation.
//
// Split-K (params.cuh SplitK): the batch is cut into slices, one block per tile and
// slice (blockIdx.z), so a layer of few tiles and a large batch fills the GPU. Each
// slice writes its partial tile (and bias sums) to a workspace; the last slice of the
// tile to finish adds them in slice order, so the bits do not depend on which finishes
// last, and runs the epilogue. A delta element is still written once: by the tile_m == 0
// block of the slice that holds its batch row.
#pragma once
#include "gemm_tile.cuh"
#include "update.cuh"

// PROLOGUE: compiled with the delta prologue (the weight_grad kernel; backward.cu runs none).
template <typename T, class Core, int FAMILY = SGD_RULES, bool PROLOGUE = false, class Tiles>
__device__ __forceinline__ void weight_grad_tile(Tiles& tiles, index_t tile_m, index_t tile_n,
                                                 const WeightGradParams<T, typename Core::Value>& p,
                                                 const UpdateRule<T>& rule, const SplitK<T>& split = SplitK<T>{},
                                                 index_t slice = 0) {
    typedef typename Core::Value S;
    const S* __restrict__ o = p.o;
    const S* __restrict__ g = p.g;
    const S* __restrict__ o_next = p.o_next;
    S* __restrict__ delta_out = p.delta_out;
    S* __restrict__ W_copy = p.W_copy;
    const bool has_prologue = p.has_prologue;
    const int act = p.act;
    const index_t M = p.M, N = p.N, K = p.K;
    const int BK = Core::BK, BN = Core::BN;
    const int tid = threadIdx.x;
    const index_t m0 = tile_m * Core::BM, n0 = tile_n * BN;
    const bool bias_block = tile_m == 0;
    // the prologue, once per element a block loads: delta = err * f'(o_next), written by the bias blocks
    auto delta_of = [&](S err, S out_next, index_t n, index_t k) {
        const S d = stored_as<S>(value_of<T>(err) * derivative(act, value_of<T>(out_next)));
        if (bias_block) delta_out[k * N + n] = d;
        return d;
    };
    T bias_acc = T(0);  // thread tid < BN sums column n0 + tid
    // (reads B's stage as loaded: a core that rounds its operands rounds this one after the hook,
    // in the bias blocks: gemm_mainloop's raw_b_hook)
    auto sum_bias = [&](const S (&tile)[Core::BK][Core::BN + Core::PAD]) {
        if (bias_block && tid < BN)
            for (int kk = 0; kk < BK; ++kk) bias_acc += value_of<T>(tile[kk][tid]);
    };
    const bool is_split = split.splits > 1;
    const index_t k_begin = is_split ? slice * split.slice_k : 0;
    const index_t k_end = is_split && k_begin + split.slice_k < K ? k_begin + split.slice_k : K;
    typename Core::Acc acc;
    if (!has_prologue) {  // delta given: both operands by cp.async
        gemm_mainloop<Core, true, true>(acc, tiles, Direct<S>{o, M}, Direct<S>{g, N}, sum_bias, m0, n0, M, N, k_end,
                                        k_begin, bias_block);
    } else if constexpr (PROLOGUE && Tiles::AUX) {  // err and o_next by cp.async, delta formed in shared memory
        gemm_mainloop<Core, true, true>(acc, tiles, Direct<S>{o, M}, transformed(g, o_next, N, delta_of), sum_bias,
                                        m0, n0, M, N, k_end, k_begin, bias_block);
    } else if constexpr (PROLOGUE && prologue_room<Core>::value) {  // no room for aux tiles: through registers
        auto load_delta = [&](index_t n, index_t k) { return delta_of(g[k * N + n], o_next[k * N + n], n, k); };
        gemm_mainloop<Core, true, true>(acc, tiles, Direct<S>{o, M}, load_delta, sum_bias, m0, n0, M, N, k_end,
                                        k_begin, bias_block);
    } else {
        return __trap();  // a prologue this kernel was not compiled for: the launchers never send one
    }
    const bool owns_bias = bias_block && tid < BN && n0 + tid < N;
    const Updater<T, FAMILY> update(rule);
    if (is_split) {
        T* __restrict__ partial = split.partials + slice * M * N;
        tile_epilogue<Core>(acc, tiles, m0, n0, M, N, [&](index_t m, index_t n, T v) { partial[m * N + n] = v; });
        if (owns_bias) split.bias_partials[slice * N + n0 + tid] = bias_acc;
        const index_t tile = tile_m * ((N + BN - 1) / BN) + tile_n;
        if (!last_to_arrive(split.tickets + tile, (unsigned int)split.splits)) return;
        const T* partials = split.partials;  // other blocks' writes: read from L2 (load_coherent)
        tile_epilogue<Core>(acc, tiles, m0, n0, M, N, [&](index_t m, index_t n, T) {
            T v = load_coherent(partials + m * N + n);
#pragma unroll 1  // one loop per output: unrolled, the sums of 64 outputs were 20k instructions
            for (int s = 1; s < split.splits; ++s) v += load_coherent(partials + s * M * N + m * N + n);
            update(p.W, W_copy, p.vel_w, p.sq_w, m * N + n, v, true);
        });
        if (owns_bias) {
            T v = load_coherent(split.bias_partials + n0 + tid);
#pragma unroll 1
            for (int s = 1; s < split.splits; ++s) v += load_coherent(split.bias_partials + s * N + n0 + tid);
            update(p.b, p.vel_b, p.sq_b, n0 + tid, v, false);
        }
        return;
    }
    tile_epilogue<Core>(acc, tiles, m0, n0, M, N, [&](index_t m, index_t n, T v) {
        update(p.W, W_copy, p.vel_w, p.sq_w, m * N + n, v, true);
    });
    if (owns_bias) update(p.b, p.vel_b, p.sq_b, n0 + tid, bias_acc, false);
}

// FAMILY: the update rules compiled into the epilogue (update.cuh); SGD_RULES by default.
// The prologue's err and o_next tiles go through shared memory where their stages fit (float);
// else (double) through registers. The wide tiles run no prologue (prologue_room).
template <typename T, class Core, int FAMILY = SGD_RULES>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS)
    weight_grad(WeightGradParams<T, typename Core::Value> p, UpdateRule<T> rule, SplitK<T> split) {
    __shared__ GemmTiles<Core, GemmTiles<Core, true>::FITS && prologue_room<Core>::value> tiles;
    if (!launched_as_core<Core>()) return;
    weight_grad_tile<T, Core, FAMILY, true>(tiles, blockIdx.y, blockIdx.x, p, rule, split, blockIdx.z);
}
