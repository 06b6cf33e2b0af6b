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
// (tile_m == 0) see every delta element of their columns exactly once:
// they write delta_out and sum the bias gradient. weight_grad_tile computes
// one BM x BN tile; backward.cu runs it beside an error propagation.
#pragma once
#include "gemm_tile.cuh"
#include "params.cuh"

template <typename T, class Core>
__device__ __forceinline__ void weight_grad_tile(GemmTiles<Core>& tiles, index_t tile_m, index_t tile_n,
                                                 const WeightGradParams<T>& p, const UpdateRule<T>& rule) {
    const T* __restrict__ o = p.o;
    const T* __restrict__ g = p.g;
    const T* __restrict__ o_next = p.o_next;
    T* __restrict__ delta_out = p.delta_out;
    const int has_prologue = p.has_prologue, act = p.act, mode = rule.mode;
    const T step = rule.step, momentum = rule.momentum;
    const index_t M = p.M, N = p.N, K = p.K;
    const int BK = Core::BK, BN = Core::BN;
    const int tid = threadIdx.x;
    const index_t m0 = tile_m * Core::BM, n0 = tile_n * BN;
    const bool bias_block = tile_m == 0;
    auto load_delta = [&](index_t n, index_t k) {
        const index_t i = k * N + n;
        if (!has_prologue) return g[i];
        const T d = g[i] * derivative(act, o_next[i]);
        if (bias_block) delta_out[i] = d;
        return d;
    };
    T bias_acc = T(0);  // thread tid < BN sums column n0 + tid
    auto sum_bias = [&](const T (&tile)[Core::BK][Core::BN + Core::PAD]) {
        if (bias_block && tid < BN)
            for (int kk = 0; kk < BK; ++kk) bias_acc += tile[kk][tid];
    };
    typename Core::Acc acc;
    gemm_mainloop<Core, true, true>(
        acc, tiles.A, tiles.B, [&](index_t m, index_t k) { return o[k * M + m]; }, load_delta, sum_bias, m0, n0,
        M, N, K);
    Core::for_each_output(acc, m0, n0, M, N, [&](index_t m, index_t n, T v) {
        apply_update(mode, p.W, p.vel_w, m * N + n, v, step, momentum);
    });
    if (bias_block && tid < BN && n0 + tid < N) apply_update(mode, p.b, p.vel_b, n0 + tid, bias_acc, step, momentum);
}

template <typename T, class Core>
__global__ void weight_grad(WeightGradParams<T> p, UpdateRule<T> rule) {
    __shared__ GemmTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    weight_grad_tile<T, Core>(tiles, blockIdx.y, blockIdx.x, p, rule);
}
