// Warpgroup tensor-core instructions of sm_90a (Hopper), one device function each: on the GPU
// the PTX itself (compiled only for sm_90a: NVRTC --gpu-architecture=sm_90a, gpu_backprop/ops/cuda.py
// SM90A_FILES), in the CUDA-on-CPU shim their emulation (tests/emulator/wgmma_shim.h). A warpgroup
// is 4 consecutive warps (threads 128 w .. 128 w + 127); wgmma_* must be called by all 128 of its
// threads together, with the same descriptors (PTX .sync.aligned).
//
// wgmma.mma_async m64nNk16 .f32.bf16.bf16: D (64 x N, float, registers) += A (64 x 16) B (16 x N),
// A and B read from shared memory through 64-bit matrix descriptors, asynchronously: the
// instruction returns at once, its group is closed by wgmma_commit_group() and complete (its
// shared-memory reads done, D written) after wgmma_wait_group<n>() leaves at most n groups
// in flight. Until then D must not be read or written and the shared memory read must not change.
// wgmma_fence() must come between a thread's register accesses (the zeroed or read D) and the
// mma that follows. The shared memory is read through the async proxy: generic writes to it
// (cp.async, st.shared) are made visible by fence_proxy_async() before the barrier that
// publishes them.
//
// D fragment (PTX ISA "Register Fragments and Shared Memory Matrix Layouts", wgmma .m64nNk16):
// thread 32 w + 4 g + t of the warpgroup (warp w < 4) holds d[r], r < N / 2, the element
//   row 16 w + g + 8 ((r / 2) % 2), column 8 (r / 4) + 2 t + r % 2.
//
// Matrix descriptor (PTX ISA "Matrix Descriptor Format"): bits 0-13 the start address >> 4,
// 16-29 the leading-dimension byte offset (LBO) >> 4, 32-45 the stride-dimension byte offset
// (SBO) >> 4, 49-51 the base offset (0: the swizzle atoms 1024-byte aligned), 62-63 the
// swizzle: 1 = 128-byte. With the 128-byte swizzle a matrix is made of atoms of 8 rows of
// 128 bytes (1024 bytes) in which the 16-byte chunk c of row r is stored at chunk c ^ r
// (address bits 4-6 xor bits 7-9). Canonical layouts, in 16-byte chunks of 8 bf16
// (CUTLASS cute/atom/mma_traits_sm90_gmma.hpp, make_gmma_desc):
//   K-major  (rows m or n, k contiguous): ((8 rows, r / 8), 2 chunks of k) : ((128 B, SBO), 16 B);
//            the k16 step kk of a 64-k atom starts 32 kk bytes in (LBO unused);
//   MN-major (m or n contiguous, rows k): ((8 chunks, atoms of 64 along m or n), (8 k, k / 8))
//            : ((16 B, LBO), (128 B, SBO)); the instruction's "transpose" flag set.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// The block's dynamic shared memory (the launch's shared_mem bytes). Declared 16-byte aligned, all
// that is promised, so that the compiler keeps a kernel's own realignment to 1024 bytes.
#define DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

// The shared-memory address (the state space's own, 32-bit) of a generic pointer into it.
__device__ __forceinline__ unsigned shared_address(const void* p) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    return (unsigned)__cvta_generic_to_shared(p);
#else
    return emu::shared_address(p);
#endif
}

// A descriptor of a 128-byte-swizzled matrix at shared address `start` (see the header).
__device__ __forceinline__ unsigned long long wgmma_descriptor(unsigned start, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((start & 0x3ffff) >> 4) | (unsigned long long)((lbo & 0x3ffff) >> 4) << 16 |
           (unsigned long long)((sbo & 0x3ffff) >> 4) << 32 | 1ull << 62;
}

__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
    emu::wgmma_fence();
#endif
}

__device__ __forceinline__ void wgmma_commit_group() {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
    emu::wgmma_commit_group();
#endif
}

// At most N groups of this thread's wgmma still in flight. The accumulators are named so that
// the compiler neither reads them early nor keeps a copy across the wait (CUTLASS
// warpgroup_fence_operand does the same).
template <int N, int R>
__device__ __forceinline__ void wgmma_wait_group(float (&d)[R]) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#pragma unroll
    for (int r = 0; r < R; ++r) asm volatile("" : "+f"(d[r])::"memory");
#else
    emu::wgmma_wait_group(N);
#endif
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 (N = 128 or 256): d (+)= A B (scale_d 0: d = A B).
// TRANS_A, TRANS_B: 0 for a K-major operand, 1 for an M- (N-) major one.
template <int N, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_bf16(float (&d)[N / 2], unsigned long long desc_a, unsigned long long desc_b,
                                           int scale_d) {
    static_assert(N == 128 || N == 256, "the shapes instantiated here: m64n128k16, m64n256k16");
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    if constexpr (N == 128) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
            "%64, %65, p, 1, 1, %67, %68;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
              "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
              "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
              "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
              "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
            "%128, %129, p, 1, 1, %131, %132;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
              "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
              "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
              "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
              "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
              "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
              "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
              "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
              "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
              "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
              "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
              "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
              "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
            : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
    }
#else
    emu::wgmma_bf16<N>(d, desc_a, desc_b, scale_d, TRANS_A, TRANS_B);
#endif
}
