// The warpgroup tensor-core instructions of sm_90a in the CUDA-on-CPU shim (included by
// cuda_shim.h after mma_shim.h); the kernels call them through kernels/wgmma.cuh, which sets out
// the descriptors, the shared-memory layouts and the D fragment.
//
//   wgmma.fence.sync.aligned                                   wgmma_fence
//   wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16        wgmma_bf16<N>
//   wgmma.commit_group.sync.aligned                            wgmma_commit_group
//   wgmma.wait_group.sync.aligned N                            wgmma_wait_group
//   cvta.to.shared (the dynamic shared window only)            shared_address
//
// Asynchrony, as the PTX ISA allows it to show: an mma reads its operands at the issue and
// writes D when its thread waits for its group, not before. Meanwhile
//   * D holds NaN (a read of the accumulators before the wait shows);
//   * the shared memory it read must not change: at the wait every element is read again and a
//     change traps (a buffer refilled while an mma on it is in flight: a missing or too weak
//     wait_group, or no barrier between one warpgroup's wait and another's refill);
//   * an mma issued with no wgmma_fence since the thread last waited traps (stricter than the
//     ISA, which asks for the fence only where the registers were touched: every kernel here
//     fences each batch, as CUTLASS does).
// Operands are read at the issue, so a tile read before the barrier that publishes it reads
// another thread's copies not yet landed (poison, NaN). Arithmetic: mma_shim.h's model, each
// output's 16 products of one instruction in two fused blocks of 8 (an assumption for Hopper as
// for the A100). Not modelled: the async proxy (fence_proxy_async is a no-op here), descriptors
// that differ across the warpgroup (each thread uses its own), swizzles other than 128 bytes.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <vector>

namespace emu {
inline std::uint32_t shared_address(const void* p) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < dynamic_shared_window || c >= dynamic_shared_window + sizeof dynamic_shared_window) {
        std::fprintf(stderr, "emu: a shared address of memory outside the dynamic shared window\n");
        __trap();
        return 0;
    }
    return std::uint32_t(c - dynamic_shared_window);
}

// The byte offset in the shared window of element (i, k) of a 128-byte-swizzled operand:
// i along m (A) or n (B), k < 16; MN_MAJOR as the instruction's transpose flag (wgmma.cuh).
struct Descriptor {
    std::uint32_t start, lbo, sbo;
    explicit Descriptor(std::uint64_t d)
        : start(std::uint32_t(d & 0x3fff) << 4), lbo(std::uint32_t((d >> 16) & 0x3fff) << 4),
          sbo(std::uint32_t((d >> 32) & 0x3fff) << 4) {
        if ((d >> 62) != 1 || ((d >> 49) & 7) != 0) {
            std::fprintf(stderr, "emu: a wgmma descriptor other than 128-byte swizzle, base offset 0\n");
            __trap();
        }
    }
    std::uint32_t offset(int i, int k, bool mn_major) const {
        const std::uint32_t a = mn_major
            ? start + (i / 64) * lbo + (i % 64) / 8 * 16 + (i % 8) * 2 + (k / 8) * sbo + (k % 8) * 128
            : start + (i / 8) * sbo + (i % 8) * 128 + (k / 8) * 16 + (k % 8) * 2;
        return a ^ (((a >> 7) & 7) << 4);  // chunk (bits 4-6) ^ row of the 1024-byte atom (bits 7-9)
    }
};

struct WgmmaAccumulator {
    float* d;
    int n, pending;
    float value[128];
};

struct WgmmaOp {
    int n;
    bool scale_d;
    float* d;
    // this thread's operands as read at the issue: A(row 16 w + g + 8 h, k), B(k, column c) for
    // its n / 4 columns, with their shared offsets (read again at the wait)
    std::vector<std::uint16_t> a, b;
    std::vector<std::uint32_t> a_at, b_at;
};

struct WgmmaState {
    bool fenced = false;
    std::vector<WgmmaOp> open;
    std::deque<std::vector<WgmmaOp>> committed;
    std::vector<WgmmaAccumulator> accumulators;  // D registers of mma in flight, by d
};
inline thread_local WgmmaState wgmma_state;

inline std::uint16_t shared_bf16(std::uint32_t at) {
    if (at + 2 > sizeof dynamic_shared_window) {
        std::fprintf(stderr, "emu: a wgmma operand past the dynamic shared window\n");
        __trap();
        return 0;
    }
    std::uint16_t h;
    std::memcpy(&h, dynamic_shared_window + at, 2);
    return h;
}

// The thread's place in its warpgroup: (warp w < 4, g, t).
inline void warpgroup_place(int& w, int& g, int& t) {
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if ((blockDim.x * blockDim.y * blockDim.z) % 128 != 0) {
        std::fprintf(stderr, "emu: wgmma in a block that is not whole warpgroups\n");
        __trap();
    }
    w = linear % 128 / 32;
    g = linear % 32 / 4;
    t = linear % 4;
}

inline void wgmma_fence() { wgmma_state.fenced = true; }

template <int N>
__attribute__((noinline)) void wgmma_bf16(float (&d)[N / 2], std::uint64_t desc_a, std::uint64_t desc_b, int scale_d,
                                          int trans_a, int trans_b) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N a multiple of 8 up to 256");
    WgmmaState& s = wgmma_state;
    if (!s.fenced) {
        std::fprintf(stderr, "emu: wgmma.mma_async with no wgmma.fence since the thread's last wait\n");
        __trap();
    }
    int w, g, t;
    warpgroup_place(w, g, t);
    const Descriptor da(desc_a), db(desc_b);
    WgmmaOp op{N, scale_d != 0, d, {}, {}, {}, {}};
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 16; ++k) op.a_at.push_back(da.offset(16 * w + g + 8 * h, k, trans_a));
    for (int j = 0; j < N / 8; ++j)
        for (int c = 0; c < 2; ++c)
            for (int k = 0; k < 16; ++k) op.b_at.push_back(db.offset(8 * j + 2 * t + c, k, trans_b));
    for (std::uint32_t at : op.a_at) op.a.push_back(shared_bf16(at));
    for (std::uint32_t at : op.b_at) op.b.push_back(shared_bf16(at));
    bool held = false;
    for (WgmmaAccumulator& acc : s.accumulators)
        if (acc.d == d) {
            ++acc.pending;
            held = true;
        }
    if (!held) {
        WgmmaAccumulator acc{d, N / 2, 1, {}};
        std::memcpy(acc.value, d, sizeof(float) * (N / 2));
        s.accumulators.push_back(acc);
        for (int r = 0; r < N / 2; ++r) d[r] = float_of(canonical_nan);
    }
    s.open.push_back(std::move(op));
}

inline void wgmma_commit_group() {
    wgmma_state.committed.push_back(std::move(wgmma_state.open));
    wgmma_state.open.clear();
}

// The mma completes: its operands checked unchanged, D = (scale_d ? D : 0) + A B.
inline void wgmma_complete(WgmmaState& s, const WgmmaOp& op) {
    for (std::size_t i = 0; i < op.a_at.size(); ++i)
        if (shared_bf16(op.a_at[i]) != op.a[i]) goto changed;
    for (std::size_t i = 0; i < op.b_at.size(); ++i)
        if (shared_bf16(op.b_at[i]) != op.b[i]) goto changed;
    for (std::size_t i = 0; i < s.accumulators.size(); ++i) {
        WgmmaAccumulator& acc = s.accumulators[i];
        if (acc.d != op.d) continue;
        for (int r = 0; r < op.n / 2; ++r) {
            const int h = (r / 2) % 2, column = 2 * (r / 4) + r % 2;  // op.b's column index
            double p[16];
            for (int k = 0; k < 16; ++k)
                p[k] = double(bf16_to_float(op.a[16 * h + k])) * double(bf16_to_float(op.b[16 * column + k]));
            acc.value[r] = accumulate<16, half_block>(op.scale_d ? acc.value[r] : 0.0f, p);
        }
        if (--acc.pending == 0) {
            std::memcpy(acc.d, acc.value, sizeof(float) * acc.n);
            s.accumulators.erase(s.accumulators.begin() + i);
        }
        return;
    }
    return;
changed:
    std::fprintf(stderr, "emu: shared memory read by a wgmma in flight changed before its wait_group\n");
    __trap();
}

inline void wgmma_wait_group(int n) {
    WgmmaState& s = wgmma_state;
    while (s.committed.size() > std::size_t(n)) {
        for (const WgmmaOp& op : s.committed.front()) wgmma_complete(s, op);
        s.committed.pop_front();
    }
    s.fenced = false;
}

// A block that exits with mma in flight or uncommitted: on a GPU its D is lost (undefined).
inline void wgmma_block_exit() {
    WgmmaState& s = wgmma_state;
    if (!s.open.empty() || !s.committed.empty()) {
        std::fprintf(stderr, "emu: a thread exited with wgmma not waited for\n");
        __trap();
    }
    s = WgmmaState{};
}
}  // namespace emu
