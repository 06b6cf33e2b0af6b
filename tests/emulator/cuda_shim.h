// CUDA-on-CPU shim: compile kernels/*.cu with g++ (C++20) and run them on threads.
//
// Every CUDA thread of a block is a std::thread; __syncthreads() is a
// std::barrier over the block; warp shuffles go through a per-warp exchange
// buffer between two arrivals at a per-warp barrier (so all 32 lanes must take
// part, as on the GPU). One launch runs its blocks one after another on the same
// threads, so __shared__ storage (a function-local static here) is per block, as
// in CUDA; the blocks it runs, and their order, come from a Schedule. Several
// copies of the same library (each with its own statics: its own "SM") can run one
// grid at once, taking blocks from a shared queue in a shuffled order, so an
// inter-block race or an order assumption shows (tests/emulator/builder.py).
// threadIdx/blockIdx/blockDim/gridDim are thread_local.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
// Dynamic shared memory cannot be "extern static": kernels that need it use this macro.
#define DYNAMIC_SHARED(T, name) static T name[emu_dynamic_shared_max / sizeof(T)]

using std::exp;
using std::fabs;
using std::log;
using std::tanh;

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace emu {
inline constexpr std::size_t dynamic_shared_max = 48 * 1024;

struct Warp {
    std::barrier<> barrier;
    alignas(8) unsigned char slot[32][8];
    alignas(16) unsigned char exchange[32][64];  // per-lane fragments of warp-wide instructions (mma_shim.h)
    explicit Warp(std::ptrdiff_t lanes) : barrier(lanes) {}
};

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local int lane = 0;
}  // namespace emu

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline constexpr std::size_t emu_dynamic_shared_max = emu::dynamic_shared_max;

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
// A GPU aborts the launch; here the kernel returns (the caller checks) and the launcher
// raises (builder.py reads emu_take_trap after every launch).
namespace emu {
inline std::atomic<bool> trapped{false};
}
inline void __trap() { emu::trapped.store(true); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __shfl_down_sync(unsigned int /*mask*/, T value, int delta) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    emu::Warp& w = *emu::warp;
    std::memcpy(w.slot[emu::lane], &value, sizeof(T));
    w.barrier.arrive_and_wait();
    T result = value;
    if (emu::lane + delta < 32) std::memcpy(&result, w.slot[emu::lane + delta], sizeof(T));
    w.barrier.arrive_and_wait();
    return result;
}

// cp.async as the PTX ISA defines it: a copy that lands when its thread waits for its group,
// not before. Here the bytes are read at the issue and written at the wait; meanwhile the
// destination holds poison (all bits set: NaN), so a read before the wait (a missing or too
// weak cp_async_wait, a copy left out of its group, another thread's copy read without a
// barrier) sees NaN and fails a comparison, where hardware would often have the data by then.
namespace emu {
struct PendingCopy {
    void* dst;
    int bytes;
    unsigned char data[16];
};
struct AsyncCopies {
    std::vector<PendingCopy> open;                  // issued since the last commit
    std::deque<std::vector<PendingCopy>> committed;  // groups, oldest first
};
inline thread_local AsyncCopies async_copies;
inline void land(std::vector<PendingCopy>& group) {
    for (const PendingCopy& c : group) std::memcpy(c.dst, c.data, c.bytes);
    group.clear();
}
// A block's copies still in flight when it exits land then (a GPU completes them too).
inline void land_all() {
    for (auto& group : async_copies.committed) land(group);
    async_copies.committed.clear();
    land(async_copies.open);
}
}  // namespace emu

template <int BYTES>
inline void cp_async(void* smem, const void* gmem, int src_bytes) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const bool misaligned = reinterpret_cast<std::uintptr_t>(smem) % BYTES ||
                            (src_bytes && reinterpret_cast<std::uintptr_t>(gmem) % BYTES);
    if (misaligned || (src_bytes != 0 && src_bytes != BYTES)) {  // a GPU faults on a misaligned copy
        __trap();
        return;
    }
    emu::PendingCopy copy{smem, BYTES, {}};
    if (src_bytes) std::memcpy(copy.data, gmem, BYTES);  // else a zero fill
    std::memset(smem, 0xff, BYTES);
    emu::async_copies.open.push_back(copy);
}

inline void cp_async_commit() {
    emu::async_copies.committed.push_back(std::move(emu::async_copies.open));
    emu::async_copies.open.clear();
}

template <int N>
inline void cp_async_wait() {
    auto& groups = emu::async_copies.committed;
    while (groups.size() > N) {
        emu::land(groups.front());
        groups.pop_front();
    }
}

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
    return std::atomic_ref<unsigned int>(*address).fetch_add(value);
}

namespace emu {
// The blocks one launch runs: order[next++] while next < n (linear indices, x fastest).
// `next` is shared by every copy of the library running the same grid.
struct Schedule {
    const unsigned int* order;  // nullptr: 0, 1, 2, ... in turn
    unsigned int n;
    unsigned int* next;
};

// Run kernel<<<grid, block>>>(args...) over the blocks the schedule hands out, one at a time.
template <typename... Params, typename... Args>
void run_blocks(void (*kernel)(Params...), dim3 grid, dim3 block, Schedule schedule, Args... args) {
    const unsigned int threads = block.x * block.y * block.z;
    const unsigned int n_warps = (threads + 31) / 32;
    std::barrier<> barrier(threads);
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned int w = 0; w < n_warps; ++w)
        warps.emplace_back(new Warp(w + 1 < n_warps ? 32 : threads - 32 * w));
    unsigned int claimed = 0;  // the block taken by thread 0, read by all after a barrier
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockDim = block;
            gridDim = grid;
            block_barrier = &barrier;
            warp = warps[t / 32].get();
            lane = t % 32;
            for (;;) {
                if (t == 0) claimed = std::atomic_ref<unsigned int>(*schedule.next).fetch_add(1);
                barrier.arrive_and_wait();  // every thread sees the claim (read before the next one)
                const unsigned int i = claimed;
                if (i >= schedule.n) break;
                const unsigned int linear = schedule.order ? schedule.order[i] : i;
                blockIdx = {linear % grid.x, (linear / grid.x) % grid.y, linear / (grid.x * grid.y)};
                kernel(args...);
                land_all();
                barrier.arrive_and_wait();  // the whole block is done before the next starts
            }
        });
    }
    for (auto& th : pool) th.join();
}

// Run kernel<<<grid, block>>>(args...) here, blocks in index order.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
    unsigned int next = 0;
    run_blocks(kernel, grid, block, Schedule{nullptr, grid.x * grid.y * grid.z, &next}, args...);
}

// cudaLaunchKernel's calling convention: args[i] points at the i-th argument.
template <typename... Params, std::size_t... I>
void launch_packed(void (*kernel)(Params...), dim3 grid, dim3 block, Schedule schedule, void** args,
                   std::index_sequence<I...>) {
    run_blocks(kernel, grid, block, schedule,
               *static_cast<std::remove_cv_t<std::remove_reference_t<Params>>*>(args[I])...);
}

template <typename... Params>
void launch_packed(void (*kernel)(Params...), dim3 grid, dim3 block, Schedule schedule, void** args) {
    launch_packed(kernel, grid, block, schedule, args, std::index_sequence_for<Params...>{});
}
}  // namespace emu

#include "mma_shim.h"  // the tensor-core instructions (mma.sync, ldmatrix, cvt)
