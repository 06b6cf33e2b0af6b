// The fiber stacks of every emulated kernel library in the process (cuda_shim.h run_fibers), in one
// pool: a launch takes a stack for each thread of its block and gives them back when it returns.
// One library of its own, linked by every kernel library (builder.py), so that the pool is shared:
// kept in each library instead, the stacks of every library ever launched stay mapped, two memory
// maps each (the guard page and the stack), and a test session that loads a few hundred libraries
// runs into the kernel's limit on maps (vm.max_map_count, 65530 by default).
#include <sys/mman.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace {
std::mutex pool_lock;
std::vector<unsigned char*> pool;
std::size_t pool_bytes = 0, pool_guard = 0;  // the one shape of the pool's stacks
}  // namespace

// A stack of `bytes` above a PROT_NONE guard page of `guard` bytes (an overflow faults): its
// lowest usable byte.
extern "C" __attribute__((visibility("default"))) unsigned char* emu_take_stack(std::size_t bytes, std::size_t guard) {
    {
        std::lock_guard<std::mutex> hold(pool_lock);
        if (pool_bytes == 0) pool_bytes = bytes, pool_guard = guard;
        if (bytes != pool_bytes || guard != pool_guard) {
            std::fprintf(stderr, "emu: fiber stacks of %zu + %zu bytes asked of a pool of %zu + %zu\n", bytes, guard,
                         pool_bytes, pool_guard);
            std::abort();
        }
        if (!pool.empty()) {
            unsigned char* stack = pool.back();
            pool.pop_back();
            return stack;
        }
    }
    void* base = mmap(nullptr, guard + bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base, guard, PROT_NONE) != 0) {
        std::perror("emu: a fiber stack");
        std::abort();
    }
    return static_cast<unsigned char*>(base) + guard;
}

extern "C" __attribute__((visibility("default"))) void emu_give_stack(unsigned char* stack) {
    std::lock_guard<std::mutex> hold(pool_lock);
    pool.push_back(stack);
}
