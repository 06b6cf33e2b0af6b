// The backward pass two GEMMs at a time: one launch runs, side by side,
//
//   part P   the error propagation of a layer k (propagate.cu):
//              delta_k = (delta_{k+1} W_k^T) * f'(o_k)                 reads W_k (Bf16: its bf16 copy)
//   part U   the weight gradient and SGD update of layer k + 1 (weight_grad.cu):
//              W_{k+1} -= step o_{k+1}^T delta_{k+2}, b likewise          writes W_{k+1}, b_{k+1} (and
//                                                                         Bf16: W_{k+1}'s copy)
//   part V   the same for a second layer (the last launch updates layers 1 and 0)
//
// No part reads what another writes, so their blocks may run in any order, and
// a network of L layers takes L backward launches instead of 2L - 1
// (gpu_backprop.model.backward_schedule). With out.on, P is the last layer's
// propagation and computes its delta as it loads it (delta.cu's output delta:
// delta_L = (y_hat - y) f'(y_hat), or y_hat - y for cross-entropy): the blocks of
// its first tile column see each element once, write it to p.delta and sum the
// loss (delta.cu's reduce_loss over those blocks), so no output-delta launch is needed;
// with record, they also count the rows predicted right (common.cuh's argmax_row) and the
// last of them keeps the fit loop's step record (finish_batch's work).
// Blocks [0, p.tiles) take P's tiles, the next u.tiles U's, the rest V's; each part's
// tiles go row by row, tiles_n to a row; a part with no tiles is absent (params.cuh).
// All updates share one UpdateRule, of the rule family FAMILY (update.cuh).
// The parts keep their tiles in one block of shared memory (BackwardTiles: a ROW_TILES core keeps
// the propagation's m-major operands in tiles of their own shape).
#include "delta.cu"
#include "propagate.cu"
#include "weight_grad.cu"

template <class Core>
union BackwardTiles {
    PropagateTiles<Core> propagate;
    GemmTiles<Core> weight_grad;
};

template <typename T, class Core, int FAMILY = SGD_RULES>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS)
    backward(PropagateParams<T, typename Core::Value> p, OutputParams<T> out, StepRecord<T> record,
             WeightGradParams<T, typename Core::Value> u, WeightGradParams<T, typename Core::Value> v,
             UpdateRule<T> rule) {
    typedef typename Core::Value S;
    __shared__ BackwardTiles<Core> tiles;
    if (!launched_as_core<Core>()) return;
    index_t t = blockIdx.x;  // uniform over the block: every thread takes the same branch
    if (t < p.tiles) {
        const index_t tile_m = t / p.tiles_n, tile_n = t % p.tiles_n;
        const bool writes_delta = out.on && tile_n == 0;
        const T* __restrict__ y_hat = out.y_hat;
        const T* __restrict__ y = out.y;
        S* __restrict__ delta = const_cast<S*>(p.delta);  // written here only when computed from the output
        const index_t K = p.K;
        double loss = 0.0;
        auto load_output_delta = [&](index_t m, index_t k) {
            const index_t i = m * K + k;
            T d;
            const double term = output_delta_at(y_hat[i], y[i], d, out.act, out.loss);
            const S stored = stored_as<S>(d);
            if (writes_delta) {
                delta[i] = stored;
                loss += term;
            }
            return stored;
        };
        if (out.on)
            propagate_tile<T, Core>(tiles.propagate, tile_m, tile_n, load_output_delta, p);
        else
            propagate_tile<T, Core>(tiles.propagate, tile_m, tile_n, Direct<S>{delta, K}, p);
        if (writes_delta) {
            long long hits = 0;  // rows of this tile predicted right
            if (record.on && record.count)
                for (index_t r = threadIdx.x; r < Core::BM; r += blockDim.x) {
                    const index_t m = tile_m * Core::BM + r;
                    if (m < p.M) hits += argmax_row(y_hat + m * K, K) == argmax_row(y + m * K, K);
                }
            reduce_loss(loss, hits, out.partials, out.hit_partials, out.ticket, (unsigned int)(p.tiles / p.tiles_n),
                        (unsigned int)tile_m, out.loss_out, record);
        }
        return;
    }
    t -= p.tiles;
    // one weight-gradient tile in the code for U and V (their parameters selected, not the code:
    // the code twice doubled this kernel's compile time)
    const bool in_u = t < u.tiles;
    const WeightGradParams<T, S> part = in_u ? u : v;
    if (!in_u) t -= u.tiles;
    weight_grad_tile<T, Core, FAMILY>(tiles.weight_grad, t / part.tiles_n, t % part.tiles_n, part, rule);
}
