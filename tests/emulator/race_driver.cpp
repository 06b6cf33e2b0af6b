// ThreadSanitizer driver: runs every shared-memory kernel once on odd shapes
// under the CUDA-on-CPU shim. Built with -fsanitize=thread by tests/test_races.py;
// a missing __syncthreads() shows up as a data race on the __shared__ tiles.
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

int main() {
    const index_t B = 37, M = 70, N = 19;  // batch, width below, width above: none a tile multiple
    auto o = filled(B * M, 1.0f), err = filled(B * N, 0.5f), o_next = filled(B * N, 1.0f);
    auto W = filled(M * N, 0.1f), b = filled(N, 0.1f), vel_w = filled(M * N, 0.0f), vel_b = filled(N, 0.0f);
    std::vector<float> delta(B * N), below(B * M), out(B * N), loss(1);
    std::vector<double> partials(8);
    std::vector<unsigned int> ticket(1, 0);
    const dim3 block{256, 1, 1};

    using Small = Simt<float, 64, 64, 16, 4, 4>;
    emu::launch(&forward<float, Small>, dim3{tiles(N, 64), tiles(B, 64), 1}, block,
                ForwardParams<float>{o.data(), W.data(), b.data(), out.data(), B, N, M, (int)ACT_SIGMOID});
    std::vector<float> out_warp(B * N);  // the warp-tiled core: fragments read as 16-byte vectors
    emu::launch(&forward<float, Warp<float, 128, 128, 8, 64, 32, 2, 2, 4, 4>>, dim3{1, 1, 1}, block,
                ForwardParams<float>{o.data(), W.data(), b.data(), out_warp.data(), B, N, M, (int)ACT_SIGMOID});
    std::vector<float> out_tf32(B * N);  // the tensor-core core: mma.sync through the warp's exchange buffer
    emu::launch(&forward<float, Tf32>, dim3{tiles(N, 64), tiles(B, 64), 1}, block,
                ForwardParams<float>{o.data(), W.data(), b.data(), out_tf32.data(), B, N, M, (int)ACT_SIGMOID});
    emu::launch(&output_delta<float>, dim3{3, 1, 1}, block, out.data(), o_next.data(), delta.data(), (int)ACT_SIGMOID,
                (int)LOSS_MSE, B * N, partials.data(), ticket.data(), loss.data(), 0);
    emu::launch(&propagate<float, Small>, dim3{tiles(M, 64), tiles(B, 64), 1}, block,
                PropagateParams<float>{delta.data(), W.data(), o.data(), below.data(), B, M, N, (int)ACT_TANH, 0, 0});
    emu::launch(&weight_grad<float, Small>, dim3{tiles(N, 64), tiles(M, 64), 1}, block,
                WeightGradParams<float>{o.data(), err.data(), o_next.data(), delta.data(), W.data(), b.data(),
                                        vel_w.data(), vel_b.data(), nullptr, nullptr, M, N, B, (int)ACT_SIGMOID, 1, 0,
                                        0},
                UpdateRule<float>{nullptr, (int)SGD_MOMENTUM, 0.01f, 0.9f}, SplitK<float>{});
    // the same gradient in 3 split-K slices of 16 batch rows, added by the last slice of each tile
    std::vector<float> W_split = W, b_split = b, partials_w(3 * M * N), partials_b(3 * N);
    std::vector<unsigned int> split_tickets(tiles(M, 64) * tiles(N, 64), 0);
    emu::launch(&weight_grad<float, Small>, dim3{tiles(N, 64), tiles(M, 64), 3}, block,
                WeightGradParams<float>{o.data(), err.data(), o_next.data(), delta.data(), W_split.data(),
                                        b_split.data(), nullptr, nullptr, nullptr, nullptr, M, N, B, (int)ACT_SIGMOID, 1,
                                        0, 0},
                UpdateRule<float>{nullptr, (int)SGD, 0.01f, 0.0f},
                SplitK<float>{partials_w.data(), partials_b.data(), split_tickets.data(), 16, 3});
    // Adam in the split-K epilogue: moments and the step count read by the last slice of each tile
    std::vector<float> W_adam = W, b_adam = b, m_w(M * N), v_w(M * N), m_b(N), v_b(N);
    std::vector<long long> adam_t(1, 1);
    emu::launch(&weight_grad<float, Small>, dim3{tiles(N, 64), tiles(M, 64), 3}, block,
                WeightGradParams<float>{o.data(), delta.data(), nullptr, nullptr, W_adam.data(), b_adam.data(),
                                        m_w.data(), m_b.data(), v_w.data(), v_b.data(), M, N, B, 0, 0, 0, 0},
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
                                        nullptr, nullptr, nullptr, M, N, B, 0, 0, u_tiles_n, u_tiles},
                WeightGradParams<float>{o.data(), err.data(), nullptr, nullptr, W_v.data(), b_v.data(), nullptr,
                                        nullptr, nullptr, nullptr, M, N, B, 0, 0, u_tiles_n, u_tiles},
                UpdateRule<float>{nullptr, (int)SGD, 0.01f, 0.0f});
    emu::launch(&bias_update<float>, dim3{tiles(N, 32), 1, 1}, dim3{32, 8, 1}, delta.data(), b.data(),
                vel_b.data(), nullptr, UpdateRule<float>{nullptr, (int)SGD_MOMENTUM, 0.01f, 0.9f}, B, N);
    emu::launch(&weight_update<float>, dim3{3, 1, 1}, block, W_adam.data(), m_w.data(), v_w.data(), W.data(),
                UpdateRule<float>{adam_t.data(), (int)ADAM, 0.001f, 0.0f, 0.0f, 1.0f / B, 0.9f, 0.999f, 1e-8f, 0.0f},
                M * N, 1);
    emu::launch(&bias_activation<float>, dim3{2, 1, 1}, block, out.data(), b.data(), (int)ACT_TANH, B, N);
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
    std::printf("checksum %.6f\n", checksum);
    return 0;
}
