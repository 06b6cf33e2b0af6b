// ThreadSanitizer driver: runs every shared-memory kernel once on odd shapes
// under the CUDA-on-CPU shim. Built with -fsanitize=thread by tests/test_races.py;
// a missing __syncthreads() shows up as a data race on the __shared__ tiles.
// Three parts: the float GEMM kernels (Simt, Warp, Tf32), the bf16 ones (Bf16<128>) and the
// elementwise ones (delta.cu, bias.cu); -DRACE_PART=1, 2 or 3 builds that part alone (a planted
// fault in one part's code needs only that part, and a part compiles in a fraction of the time),
// none all three.
#include <cstdio>
#include <vector>

#include "cuda_shim.h"
#include "backward.cu"
#include "bias.cu"
#include "delta.cu"
#include "forward.cu"
#include "propagate.cu"
#include "weight_grad.cu"

static std::vector<float> filled(std::size_t n, float scale) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = scale * float((i * 2654435761u) % 1000) / 1000.0f;
    return v;
}

static unsigned int tiles(index_t n, int t) { return (unsigned int)((n + t - 1) / t); }

static std::vector<bf16_t> bf16_of(const std::vector<float>& x) {  // precision="bf16"'s storage
    std::vector<bf16_t> v(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) v[i] = bf16_round(x[i]);
    return v;
}

static const index_t B = 37, M = 70, N = 19;  // batch, width below, width above: none a tile multiple

// the inputs both parts read
struct Inputs {
    std::vector<float> o = filled(B * M, 1.0f), err = filled(B * N, 0.5f), o_next = filled(B * N, 1.0f);
    std::vector<float> W = filled(M * N, 0.1f), b = filled(N, 0.1f), out = filled(B * N, 1.0f);
};

// The float GEMM kernels; returns a checksum of what they wrote.
static double float_kernels(Inputs& in) {
    auto &o = in.o, &err = in.err, &o_next = in.o_next, &W = in.W, &b = in.b, &out = in.out;
    auto vel_w = filled(M * N, 0.0f), vel_b = filled(N, 0.0f), delta = filled(B * N, 0.25f);
    std::vector<float> below(B * M), loss(1);
    std::vector<double> partials(8);
    std::vector<unsigned int> ticket(1, 0);
    const dim3 block{256, 1, 1};

    using Small = Simt<float, 64, 64, 16, 4, 4>;
    emu::launch(&forward<float, Small>, dim3{tiles(N, 64), tiles(B, 64), 1}, block,
                ForwardParams<float>{o.data(), W.data(), b.data(), out.data(), nullptr, B, N, M, (int)ACT_SIGMOID});
    std::vector<float> out_warp(B * N);  // the warp-tiled core: fragments read as 16-byte vectors
    emu::launch(&forward<float, Warp<float, 128, 128, 8, 64, 32, 2, 2, 4, 4>>, dim3{1, 1, 1}, block,
                ForwardParams<float>{o.data(), W.data(), b.data(), out_warp.data(), nullptr, B, N, M,
                                     (int)ACT_SIGMOID});
    std::vector<float> out_tf32(B * N);  // the tensor-core core: mma.sync through the warp's exchange buffer
    emu::launch(&forward<float, Tf32>, dim3{tiles(N, 64), tiles(B, 128), 1}, dim3{Tf32::THREADS, 1, 1},
                ForwardParams<float>{o.data(), W.data(), b.data(), out_tf32.data(), nullptr, B, N, M,
                                     (int)ACT_SIGMOID});
    emu::launch(&propagate<float, Small>, dim3{tiles(M, 64), tiles(B, 64), 1}, block,
                PropagateParams<float>{delta.data(), W.data(), o.data(), below.data(), B, M, N, (int)ACT_TANH, 0, 0});
    emu::launch(&weight_grad<float, Small>, dim3{tiles(N, 64), tiles(M, 64), 1}, block,
                WeightGradParams<float>{o.data(), err.data(), o_next.data(), delta.data(), W.data(), b.data(),
                                        nullptr, vel_w.data(), vel_b.data(), nullptr, nullptr, M, N, B,
                                        (int)ACT_SIGMOID, 1, 0, 0},
                UpdateRule<float>{nullptr, (int)SGD_MOMENTUM, 0.01f, 0.9f}, SplitK<float>{});
    // the same gradient in 3 split-K slices of 16 batch rows, added by the last slice of each tile
    std::vector<float> W_split = W, b_split = b, partials_w(3 * M * N), partials_b(3 * N);
    std::vector<unsigned int> split_tickets(tiles(M, 64) * tiles(N, 64), 0);
    emu::launch(&weight_grad<float, Small>, dim3{tiles(N, 64), tiles(M, 64), 3}, block,
                WeightGradParams<float>{o.data(), err.data(), o_next.data(), delta.data(), W_split.data(),
                                        b_split.data(), nullptr, nullptr, nullptr, nullptr, nullptr, M, N, B,
                                        (int)ACT_SIGMOID, 1, 0, 0},
                UpdateRule<float>{nullptr, (int)SGD, 0.01f, 0.0f},
                SplitK<float>{partials_w.data(), partials_b.data(), split_tickets.data(), 16, 3});
    // Adam in the split-K epilogue: moments and the step count read by the last slice of each tile
    std::vector<float> W_adam = W, b_adam = b, m_w(M * N), v_w(M * N), m_b(N), v_b(N);
    std::vector<long long> adam_t(1, 1);
    emu::launch(&weight_grad<float, Small, ADAM_RULES>, dim3{tiles(N, 64), tiles(M, 64), 3}, block,
                WeightGradParams<float>{o.data(), delta.data(), nullptr, nullptr, W_adam.data(), b_adam.data(),
                                        nullptr, m_w.data(), m_b.data(), v_w.data(), v_b.data(), M, N, B, 0, 0, 0, 0},
                UpdateRule<float>{adam_t.data(), (int)ADAM, 0.001f, 0.0f, 1e-4f, 1.0f / B, 0.9f, 0.999f, 1e-8f,
                                  1e-5f},
                SplitK<float>{partials_w.data(), partials_b.data(), split_tickets.data(), 16, 3});
    // backward.cu: blocks of a propagation (with the output delta) and of two updates (plain SGD: no
    // shared velocity) in one grid
    std::vector<float> below2(B * M), W_u = W, b_u = b, W_v = W, b_v = b, losses(4);
    std::vector<long long> correct(4), step(1, 0), hit_partials(8);
    const index_t p_tiles_n = tiles(M, 64), p_tiles = p_tiles_n * tiles(B, 64);
    const index_t u_tiles_n = tiles(N, 64), u_tiles = u_tiles_n * tiles(M, 64);
    emu::launch(&backward<float, Small>, dim3{(unsigned int)(p_tiles + 2 * u_tiles), 1, 1}, block,
                PropagateParams<float>{delta.data(), W.data(), o.data(), below2.data(), B, M, N, (int)ACT_TANH,
                                       p_tiles_n, p_tiles},
                // P computes the output delta (and the loss) as it loads it ...
                OutputParams<float>{out.data(), o_next.data(), loss.data(), partials.data(), hit_partials.data(),
                                    ticket.data(), 1, (int)ACT_SIGMOID, (int)LOSS_MSE},
                StepRecord<float>{losses.data(), correct.data(), step.data(), 1, 1},  // ... and the step record
                WeightGradParams<float>{o.data(), err.data(), nullptr, nullptr, W_u.data(), b_u.data(), nullptr,
                                        nullptr, nullptr, nullptr, nullptr, M, N, B, 0, 0, u_tiles_n, u_tiles},
                WeightGradParams<float>{o.data(), err.data(), nullptr, nullptr, W_v.data(), b_v.data(), nullptr,
                                        nullptr, nullptr, nullptr, nullptr, M, N, B, 0, 0, u_tiles_n, u_tiles},
                UpdateRule<float>{nullptr, (int)SGD, 0.01f, 0.0f});
    double checksum = loss[0];
    for (float x : W) checksum += x;
    for (float x : below) checksum += x;
    for (float x : below2) checksum += x;
    for (float x : W_u) checksum += x;
    for (float x : W_v) checksum += x;
    for (float x : W_adam) checksum += x;
    for (float x : W_split) checksum += x;
    for (float x : out_warp) checksum += x;
    for (float x : out_tf32) checksum += x;
    return checksum;
}

// The elementwise kernels with shared memory (block sums, bias sums); returns a checksum.
static double elementwise_kernels(Inputs& in) {
    auto &o_next = in.o_next, &W = in.W, &b = in.b, &out = in.out;
    auto vel_b = filled(N, 0.0f), W_adam = W, m_w = filled(M * N, 0.0f), v_w = filled(M * N, 0.0f);
    std::vector<float> delta(B * N), loss(1);
    std::vector<double> partials(8);
    std::vector<unsigned int> ticket(1, 0);
    std::vector<long long> adam_t(1, 1);
    const dim3 block{256, 1, 1};
    emu::launch(&output_delta<float>, dim3{3, 1, 1}, block, out.data(), o_next.data(), delta.data(), (int)ACT_SIGMOID,
                (int)LOSS_MSE, B * N, partials.data(), ticket.data(), loss.data());
    emu::launch(&bias_update<float>, dim3{tiles(N, 32), 1, 1}, dim3{32, 8, 1}, delta.data(), b.data(),
                vel_b.data(), nullptr, UpdateRule<float>{nullptr, (int)SGD_MOMENTUM, 0.01f, 0.9f}, B, N);
    emu::launch(&weight_update<float>, dim3{3, 1, 1}, block, W_adam.data(), m_w.data(), v_w.data(), W.data(),
                UpdateRule<float>{adam_t.data(), (int)ADAM, 0.001f, 0.0f, 0.0f, 1.0f / B, 0.9f, 0.999f, 1e-8f, 0.0f},
                M * N, 1);
    std::vector<float> activated = out;
    emu::launch(&bias_activation<float>, dim3{2, 1, 1}, block, activated.data(), b.data(), (int)ACT_TANH, B, N);
    double checksum = loss[0];
    for (float x : delta) checksum += x;
    for (float x : b) checksum += x;
    for (float x : W_adam) checksum += x;
    for (float x : activated) checksum += x;
    return checksum;
}

// precision="bf16" on the Bf16 core: bf16 activations, deltas and weight copies; the staged epilogue
// (the accumulators through the tiles' shared memory) in every kernel. Returns a checksum.
static double bf16_kernels(Inputs& in) {
    auto &o = in.o, &err = in.err, &o_next = in.o_next, &W = in.W, &b = in.b, &out = in.out;
    std::vector<float> loss(1), partials_w(3 * M * N), partials_b(3 * N), losses(4);
    std::vector<double> partials(8);
    std::vector<long long> correct(4), step(1, 0), hit_partials(8);
    std::vector<unsigned int> ticket(1, 0), split_tickets(tiles(M, 128) * tiles(N, 128), 0);
    using Bf = Bf16<128>;
    const dim3 bf_block{Bf::THREADS, 1, 1};
    auto o16 = bf16_of(o), err16 = bf16_of(err), W16 = bf16_of(W);
    std::vector<bf16_t> out16(B * N), below16(B * M), below16b(B * M), delta16(B * N);
    std::vector<float> W_bf = W, b_bf = b, W_bf_split = W, b_bf_split = b, y_hat16(B * N), W_bf_b = W, b_bf_b = b;
    std::vector<bf16_t> W_copy(M * N), W_copy_split(M * N), W_copy_b(M * N);
    emu::launch(&forward<float, Bf>, dim3{tiles(N, 128), tiles(B, 128), 1}, bf_block,
                ForwardParams<float, bf16_t>{o16.data(), W16.data(), b.data(), out16.data(), nullptr, B, N, M,
                                             (int)ACT_SIGMOID});
    emu::launch(&forward<float, Bf>, dim3{tiles(N, 128), tiles(B, 128), 1}, bf_block,  // the output layer: y_hat
                ForwardParams<float, bf16_t>{o16.data(), W16.data(), b.data(), nullptr, y_hat16.data(), B, N, M,
                                             (int)ACT_LOGITS});
    emu::launch(&propagate<float, Bf>, dim3{tiles(M, 128), tiles(B, 128), 1}, bf_block,
                PropagateParams<float, bf16_t>{err16.data(), W16.data(), o16.data(), below16.data(), B, M, N,
                                               (int)ACT_TANH, 0, 0});
    emu::launch(&weight_grad<float, Bf>, dim3{tiles(N, 128), tiles(M, 128), 1}, bf_block,
                WeightGradParams<float, bf16_t>{o16.data(), err16.data(), nullptr, nullptr, W_bf.data(), b_bf.data(),
                                                W_copy.data(), nullptr, nullptr, nullptr, nullptr, M, N, B, 0, 0, 0, 0},
                UpdateRule<float>{nullptr, (int)SGD, 0.01f, 0.0f}, SplitK<float>{});
    emu::launch(&weight_grad<float, Bf>, dim3{tiles(N, 128), tiles(M, 128), 3}, bf_block,
                WeightGradParams<float, bf16_t>{o16.data(), err16.data(), nullptr, nullptr, W_bf_split.data(),
                                                b_bf_split.data(), W_copy_split.data(), nullptr, nullptr, nullptr,
                                                nullptr, M, N, B, 0, 0, 0, 0},
                UpdateRule<float>{nullptr, (int)SGD, 0.01f, 0.0f},
                SplitK<float>{partials_w.data(), partials_b.data(), split_tickets.data(), 16, 3});
    const index_t bp_tiles_n = tiles(M, 128), bp_tiles = bp_tiles_n * tiles(B, 128);
    const index_t bu_tiles_n = tiles(N, 128), bu_tiles = bu_tiles_n * tiles(M, 128);
    emu::launch(&backward<float, Bf>, dim3{(unsigned int)(bp_tiles + bu_tiles), 1, 1}, bf_block,
                PropagateParams<float, bf16_t>{delta16.data(), W16.data(), o16.data(), below16b.data(), B, M, N,
                                               (int)ACT_TANH, bp_tiles_n, bp_tiles},
                OutputParams<float>{out.data(), o_next.data(), loss.data(), partials.data(), hit_partials.data(),
                                    ticket.data(), 1, (int)ACT_SIGMOID, (int)LOSS_MSE},
                StepRecord<float>{losses.data(), correct.data(), step.data(), 1, 1},
                WeightGradParams<float, bf16_t>{o16.data(), err16.data(), nullptr, nullptr, W_bf_b.data(),
                                                b_bf_b.data(), W_copy_b.data(), nullptr, nullptr, nullptr, nullptr, M,
                                                N, B, 0, 0, bu_tiles_n, bu_tiles},
                WeightGradParams<float, bf16_t>{}, UpdateRule<float>{nullptr, (int)SGD, 0.01f, 0.0f});
    double checksum = loss[0];
    for (float x : y_hat16) checksum += x;
    for (float x : W_bf) checksum += x;
    for (float x : W_bf_split) checksum += x;
    for (float x : W_bf_b) checksum += x;
    for (bf16_t x : below16) checksum += bf16_to_float(x);
    for (bf16_t x : below16b) checksum += bf16_to_float(x);
    for (bf16_t x : out16) checksum += bf16_to_float(x);
    return checksum;
}

int main() {
    Inputs in;
    double checksum = 0.0;
#if !defined(RACE_PART) || RACE_PART == 1
    checksum += float_kernels(in);
#endif
#if !defined(RACE_PART) || RACE_PART == 2
    checksum += bf16_kernels(in);
#endif
#if !defined(RACE_PART) || RACE_PART == 3
    checksum += elementwise_kernels(in);
#endif
    if (emu::trapped.exchange(false)) {  // a kernel launched with a block other than its core's, or worse
        std::printf("a kernel trapped\n");
        return 1;
    }
    std::printf("checksum %.6f\n", checksum);
    return 0;
}
