// The backward pass two GEMMs at a time: one launch runs, side by side,
//
//   part P   the error propagation of a layer k (propagate.cu):
//              delta_k = (delta_{k+1} W_k^T) * f'(o_k)                 reads W_k
//   part U   the weight gradient and SGD update of layer k + 1 (weight_grad.cu):
//              W_{k+1} -= step o_{k+1}^T delta_{k+2}, b likewise          writes W_{k+1}, b_{k+1}
//   part V   the same for a second layer (the last launch updates layers 1 and 0)
//
// No part reads what another writes, so their blocks may run in any order, and
// a network of L layers takes L backward launches instead of 2L - 1
// (gpu_backprop.model.backward_schedule). With from_output, P is the last layer's
// propagation and computes its delta as it loads it (delta.cu's output delta:
// delta_L = (y_hat - y) f'(y_hat), or y_hat - y for cross-entropy): the blocks of
// its first tile column see each element once, write it to p_delta and sum the
// loss (delta.cu's reduce_loss over those blocks), so no output-delta launch is needed;
// with record, they also count the rows predicted right (common.cuh's argmax_row) and the
// last of them keeps the fit loop's step record (finish_batch's work).
// Blocks [0, p_tiles) take P's tiles,
// the next u_tiles U's, the rest V's; each part's tiles go row by row, tiles_n
// to a row; a part with no tiles is absent. All updates share mode, step and momentum.
#include "delta.cu"
#include "propagate.cu"
#include "weight_grad.cu"

template <typename T, class Core>
__global__ void backward(T* __restrict__ p_delta, const T* __restrict__ p_W, const T* __restrict__ p_o,
                         T* __restrict__ p_out, int p_act, index_t p_M, index_t p_N, index_t p_K,
                         index_t p_tiles_n, index_t p_tiles, int from_output, const T* __restrict__ y_hat,
                         const T* __restrict__ y, int out_act, int loss_kind, double* __restrict__ partials,
                         unsigned int* __restrict__ ticket, T* __restrict__ loss_out, int record,
                         T* __restrict__ losses, long long* __restrict__ correct, long long* __restrict__ step_counter,
                         int count, long long* __restrict__ hit_partials,
                         const T* __restrict__ u_o, const T* __restrict__ u_delta, T* __restrict__ u_W,
                         T* __restrict__ u_b, T* __restrict__ u_vel_w, T* __restrict__ u_vel_b, index_t u_M,
                         index_t u_N, index_t u_K, index_t u_tiles_n, index_t u_tiles,
                         const T* __restrict__ v_o, const T* __restrict__ v_delta, T* __restrict__ v_W,
                         T* __restrict__ v_b, T* __restrict__ v_vel_w, T* __restrict__ v_vel_b, index_t v_M,
                         index_t v_N, index_t v_K, index_t v_tiles_n, int mode, T step, T momentum) {
    __shared__ GemmTiles<Core> tiles;
    index_t t = blockIdx.x;  // uniform over the block: every thread takes the same branch
    if (t < p_tiles) {
        const index_t tile_m = t / p_tiles_n, tile_n = t % p_tiles_n;
        const bool writes_delta = from_output && tile_n == 0;
        double loss = 0.0;
        auto load_delta = [&](index_t m, index_t k) {
            const index_t i = m * p_K + k;
            if (!from_output) return p_delta[i];
            T d;
            const double term = output_delta_at(y_hat[i], y[i], d, out_act, loss_kind);
            if (writes_delta) {
                p_delta[i] = d;
                loss += term;
            }
            return d;
        };
        propagate_tile<T, Core>(tiles, tile_m, tile_n, load_delta, p_W, p_o, p_out, p_act, p_M, p_N, p_K);
        if (writes_delta) {
            long long hits = 0;  // rows of this tile predicted right
            if (record && count)
                for (index_t r = threadIdx.x; r < Core::BM; r += blockDim.x) {
                    const index_t m = tile_m * Core::BM + r;
                    if (m < p_M) hits += argmax_row(y_hat + m * p_K, p_K) == argmax_row(y + m * p_K, p_K);
                }
            reduce_loss(loss, hits, partials, hit_partials, ticket, (unsigned int)(p_tiles / p_tiles_n),
                        (unsigned int)tile_m, loss_out, StepRecord<T>{losses, correct, step_counter, record, count});
        }
        return;
    }
    t -= p_tiles;
    if (t < u_tiles) {
        weight_grad_tile<T, Core>(tiles, t / u_tiles_n, t % u_tiles_n, u_o, u_delta, 0, u_delta, u_W, 0, u_W, u_b,
                                  u_vel_w, u_vel_b, mode, step, momentum, u_M, u_N, u_K);
        return;
    }
    t -= u_tiles;
    weight_grad_tile<T, Core>(tiles, t / v_tiles_n, t % v_tiles_n, v_o, v_delta, 0, v_delta, v_W, 0, v_W, v_b,
                              v_vel_w, v_vel_b, mode, step, momentum, v_M, v_N, v_K);
}
