// Shim-only probe of block scheduling (tests/test_emulator_schedule.py): each block
// records when it started and how many blocks were running at once.
#include <algorithm>
#include <chrono>

// A template, as the real kernels are: its __shared__ static is a vague-linkage symbol that
// the dynamic linker would merge across library copies without -fno-gnu-unique.
template <typename T>
__global__ void record_blocks(T* ticket, unsigned int* started, unsigned int* running,
                              unsigned int* most_running) {
    __shared__ T mine;  // per block: a block that saw another's would fail the check below
    if (threadIdx.x == 0) {
        mine = blockIdx.x;
        const unsigned int now = std::atomic_ref<unsigned int>(*running).fetch_add(1) + 1;
        std::atomic_ref<unsigned int> most(*most_running);
        unsigned int seen = most.load();
        while (now > seen && !most.compare_exchange_weak(seen, now)) {
        }
        started[atomicAdd(ticket, 1u)] = blockIdx.x;
    }
    __syncthreads();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // long enough for another block to start
    if (mine != blockIdx.x) started[0] = 0xffffffffu;           // __shared__ storage leaked between blocks
    __syncthreads();
    if (threadIdx.x == 0) std::atomic_ref<unsigned int>(*running).fetch_sub(1);
}

// Every thread counts itself: a launch of wide blocks, a fiber stack per thread
// (test_fiber_stacks_are_shared_by_every_library).
template <typename T>
__global__ void count_threads(T* seen) {
    atomicAdd(seen, T(1));
}
