// CUDA-on-CPU shim: compile kernels/*.cu with g++ (C++20) and run them on threads.
//
// Every CUDA thread of a block is a fiber (x86-64: a stack of its own, switched by a few
// instructions, all of a block's fibers on one OS thread; under ThreadSanitizer or elsewhere
// a std::thread, so TSan sees the block's threads); __syncthreads() is a barrier over the
// block, at which a fiber gives way to the next until all have arrived; warp shuffles go
// through a per-warp exchange buffer between two arrivals at a per-warp barrier (so all 32
// lanes must take part, as on the GPU). A fiber runs until it waits: between two barriers
// the threads of a block run one after another, the order in which a missing barrier is
// surest to show (a thread reads what the next has not written yet). One launch runs its blocks one after another on the same
// threads, so __shared__ storage (a function-local static here) is per block, as
// in CUDA; the blocks it runs, and their order, come from a Schedule. Several
// copies of the same library (each with its own statics: its own "SM") can run one
// grid at once, taking blocks from a shared queue in a shuffled order, so an
// inter-block race or an order assumption shows (tests/emulator/builder.py).
// threadIdx/blockIdx/blockDim/gridDim are thread_local (a fiber's, saved and restored as it switches).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
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
// Dynamic shared memory (kernels/wgmma.cuh defines the macro for the GPU): the library's one
// window, filled with poison (all bits set) as each block starts; shared_address() (wgmma_shim.h)
// gives offsets into it. The window (the shared state space) is 1024-byte aligned; the block's
// dynamic memory starts dynamic_shared_skew bytes in, 16-byte aligned and no more, as the language
// promises, so a kernel that needs 1024-byte atoms must align them itself.
#define DYNAMIC_SHARED(T, name) \
    T* const name = reinterpret_cast<T*>(emu::dynamic_shared_window + emu::dynamic_shared_skew)

using std::exp;
using std::fabs;
using std::log;
using std::tanh;

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

// CUDA's 8-byte vector of two floats (an aligned 8-byte access on the GPU).
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__) && !defined(EMU_OS_THREADS)
#define EMU_FIBERS 1
#include <sys/mman.h>
#endif

namespace emu {
inline constexpr std::size_t dynamic_shared_max = 227 * 1024;  // an H100's most a block
inline constexpr std::size_t dynamic_shared_skew = 16 * 37;
alignas(1024) static unsigned char dynamic_shared_window[dynamic_shared_skew + dynamic_shared_max];  // per library copy

#if EMU_FIBERS
inline void yield();

// The fibers of one block share an OS thread: a plain counter and phase, and a wait that
// gives way until the last arrival moves the phase on.
struct Barrier {
    explicit Barrier(std::ptrdiff_t n) : expected(n) {}
    void arrive_and_wait() {
        const unsigned int mine = phase;
        if (++arrived == expected) {
            arrived = 0;
            ++phase;
            return;
        }
        while (phase == mine) yield();
    }
    std::ptrdiff_t expected, arrived = 0;
    unsigned int phase = 0;
};
#else
using Barrier = std::barrier<>;
#endif

struct Warp {
    Barrier barrier;
    alignas(8) unsigned char slot[32][8];
    alignas(16) unsigned char exchange[32][64];  // per-lane fragments of warp-wide instructions (mma_shim.h)
    explicit Warp(std::ptrdiff_t lanes) : barrier(lanes) {}
};

inline thread_local Barrier* block_barrier = nullptr;
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

#include "mma_shim.h"    // the tensor-core instructions (mma.sync, ldmatrix, cvt)
#include "wgmma_shim.h"  // the warpgroup ones of sm_90a (wgmma)

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

#if EMU_FIBERS
namespace emu {
// Fibers: each CUDA thread of a block a stack of its own (guarded below by an unmapped page, so an
// overflow faults), entered and left by switch_context, which saves the callee-saved registers
// and the SSE/x87 control words on the stack it leaves and restores them from the one it enters.
struct Fiber {
    void* sp = nullptr;
    unsigned char* stack = nullptr;
    unsigned int index = 0;
    bool done = false;
    // the thread_local state of the CUDA thread this fiber is, while another fiber runs
    dim3 thread, block, block_dim, grid_dim;
    Barrier* block_barrier = nullptr;
    Warp* warp = nullptr;
    int lane = 0;
    AsyncCopies copies;
    WgmmaState wgmma;
};

struct Scheduler {
    std::vector<Fiber> fibers;
    std::size_t current = 0;
    void* main_sp = nullptr;
    const std::function<void(unsigned int)>* body = nullptr;
};
inline thread_local Scheduler* scheduler = nullptr;

inline constexpr std::size_t fiber_stack = 256 * 1024, guard_page = 4096;

// switch_context(&save, load): the current stack pointer saved to *save, then the stack at
// load entered (where an earlier switch_context left it, or as a new fiber's frame: see start).
__attribute__((naked, noinline)) static void switch_context(void** /*save*/, void* /*load*/) {
    asm volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "subq $16, %rsp\n\tstmxcsr 8(%rsp)\n\tfnstcw (%rsp)\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "ldmxcsr 8(%rsp)\n\tfldcw (%rsp)\n\taddq $16, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}

[[noreturn]] inline void fiber_main(Fiber* fiber);

// A new fiber's first switch "returns" here with its Fiber* in rbx.
__attribute__((naked, noinline)) static void fiber_trampoline() {
    asm volatile("movq %rbx, %rdi\n\tandq $-16, %rsp\n\tcall *%rbp\n\tud2");
}

inline void save(Fiber& f) {
    f.thread = threadIdx; f.block = blockIdx; f.block_dim = blockDim; f.grid_dim = gridDim;
    f.block_barrier = block_barrier; f.warp = warp; f.lane = lane;
    std::swap(f.copies, async_copies);
    std::swap(f.wgmma, wgmma_state);
}
inline void load(Fiber& f) {
    threadIdx = f.thread; blockIdx = f.block; blockDim = f.block_dim; gridDim = f.grid_dim;
    block_barrier = f.block_barrier; warp = f.warp; lane = f.lane;
    std::swap(f.copies, async_copies);
    std::swap(f.wgmma, wgmma_state);
}

// The next fiber after the current one that has not finished (the current one if none).
inline std::size_t next_fiber(const Scheduler& s) {
    std::size_t next = s.current;
    do next = (next + 1) % s.fibers.size();
    while (s.fibers[next].done && next != s.current);
    return next;
}

// The current fiber waits: the next one runs (a fiber alone at a barrier would wait for ever:
// a kernel whose threads do not all arrive; on a GPU a hang, here a trap).
__attribute__((noinline)) inline void yield() {
    Scheduler& s = *scheduler;
    const std::size_t next = next_fiber(s);
    if (next == s.current) {
        trapped.store(true);
        std::fprintf(stderr, "emu: a barrier that no other thread of the block can reach\n");
        std::abort();
    }
    Fiber& me = s.fibers[s.current];
    save(me);
    s.current = next;
    load(s.fibers[next]);
    switch_context(&me.sp, s.fibers[next].sp);
}

[[noreturn]] inline void fiber_main(Fiber* fiber) {
    (*scheduler->body)(fiber->index);
    Scheduler& s = *scheduler;
    Fiber& me = s.fibers[s.current];
    me.done = true;
    save(me);
    const std::size_t next = next_fiber(s);
    if (next == s.current) {  // the last: back to run_fibers
        switch_context(&me.sp, s.main_sp);
    } else {
        s.current = next;
        load(s.fibers[next]);
        switch_context(&me.sp, s.fibers[next].sp);
    }
    __builtin_unreachable();
}

// Stacks kept between launches, one pool for the process (fiber_stacks.cpp, linked by builder.py).
extern "C" __attribute__((visibility("default"))) unsigned char* emu_take_stack(std::size_t bytes, std::size_t guard);
extern "C" __attribute__((visibility("default"))) void emu_give_stack(unsigned char* stack);
inline unsigned char* take_stack() { return emu_take_stack(fiber_stack, guard_page); }
inline void give_stack(unsigned char* stack) { emu_give_stack(stack); }

// body(t) for t in [0, n), each on a fiber of its own, here; returns when all have returned.
inline void run_fibers(unsigned int n, const std::function<void(unsigned int)>& body) {
    Scheduler s;
    s.body = &body;
    s.fibers.resize(n);
    unsigned int mxcsr;
    unsigned short fpucw;
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
    for (unsigned int i = 0; i < n; ++i) {
        Fiber& f = s.fibers[i];
        f.index = i;
        f.stack = take_stack();
        // The frame switch_context pops: control words, r15, r14, r13, r12, rbx (the Fiber*),
        // rbp (fiber_main), then the return address (the trampoline).
        auto* top = reinterpret_cast<std::uint64_t*>(f.stack + fiber_stack) - 16;
        std::uint64_t* frame = top;
        std::memset(frame, 0, 16);
        std::memcpy(frame, &fpucw, sizeof fpucw);
        std::memcpy(reinterpret_cast<unsigned char*>(frame) + 8, &mxcsr, sizeof mxcsr);
        frame[2] = frame[3] = frame[4] = frame[5] = 0;                       // r15 r14 r13 r12
        frame[6] = reinterpret_cast<std::uint64_t>(&f);                       // rbx
        frame[7] = reinterpret_cast<std::uint64_t>(&fiber_main);              // rbp
        frame[8] = reinterpret_cast<std::uint64_t>(&fiber_trampoline);       // return address
        f.sp = frame;
    }
    Scheduler* outer = scheduler;
    scheduler = &s;
    AsyncCopies outside;
    WgmmaState outside_wgmma;
    std::swap(outside, async_copies);
    std::swap(outside_wgmma, wgmma_state);
    s.current = 0;
    load(s.fibers[0]);
    switch_context(&s.main_sp, s.fibers[0].sp);
    std::swap(outside, async_copies);
    std::swap(outside_wgmma, wgmma_state);
    scheduler = outer;
    for (Fiber& f : s.fibers) give_stack(f.stack);
}
}  // namespace emu
#endif

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
    Barrier barrier(threads);
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned int w = 0; w < n_warps; ++w)
        warps.emplace_back(new Warp(w + 1 < n_warps ? 32 : threads - 32 * w));
    unsigned int claimed = 0;  // the block taken by thread 0, read by all after a barrier
    const std::function<void(unsigned int)> thread_body = [&](unsigned int t) {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockDim = block;
            gridDim = grid;
            block_barrier = &barrier;
            warp = warps[t / 32].get();
            lane = t % 32;
            for (;;) {
                if (t == 0) {
                    claimed = std::atomic_ref<unsigned int>(*schedule.next).fetch_add(1);
                    std::memset(dynamic_shared_window, 0xff, sizeof dynamic_shared_window);
                }
                barrier.arrive_and_wait();  // every thread sees the claim (read before the next one)
                const unsigned int i = claimed;
                if (i >= schedule.n) break;
                const unsigned int linear = schedule.order ? schedule.order[i] : i;
                blockIdx = {linear % grid.x, (linear / grid.x) % grid.y, linear / (grid.x * grid.y)};
                kernel(args...);
                land_all();
                wgmma_block_exit();
                barrier.arrive_and_wait();  // the whole block is done before the next starts
            }
    };
#if EMU_FIBERS
    run_fibers(threads, thread_body);
#else
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) pool.emplace_back(thread_body, t);
    for (auto& th : pool) th.join();
#endif
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

