// Tensor-core instructions (sm_80+), one device function each: on the GPU (nvcc, NVRTC) the PTX
// instruction itself, in the CUDA-on-CPU shim its emulation (tests/emulator/mma_shim.h, which
// also sets out the fragment layouts and the arithmetic assumed). Warp-wide functions (mma_*,
// ldmatrix_m8n8) must be called by all 32 lanes of a warp together, with the same arguments'
// shapes (PTX .sync.aligned).
//
// Fragment layouts (PTX ISA), lane = 4 g + t:
//   mma_m16n8k8_tf32   a[r] = A(g + 8 (r % 2), t + 4 (r / 2)), b[r] = B(t + 4 r, g)
//   mma_m16n8k16_*     two 16-bit elements per register, element 2 i in the low half:
//                      element i of a = A(g + 8 ((i / 2) % 2), 2 t + i % 2 + 8 (i / 4)),
//                      element i of b = B(2 t + i % 2 + 8 (i / 2), g)
//   C and D            c[r] = C(g + 8 (r / 2), 2 t + r % 2)
#pragma once

// cvt.rna.tf32.f32: x rounded to TF32 (10-bit mantissa, to nearest, ties away from zero), as a
// 32-bit register holding a float whose low 13 bits are zero.
__device__ __forceinline__ unsigned tf32_round(float x) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    unsigned y;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(y) : "f"(x));
    return y;
#else
    return emu::cvt_rna_tf32(x);
#endif
}

// tf32_round's result as the float it is (stored in shared memory, read back by float_bits).
__device__ __forceinline__ float tf32_rounded(float x) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    return __uint_as_float(tf32_round(x));
#else
    return emu::float_of(emu::cvt_rna_tf32(x));
#endif
}

// A float's bits, unchanged (a .tf32 operand register of a value rounded before).
__device__ __forceinline__ unsigned float_bits(float x) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    return __float_as_uint(x);
#else
    return emu::bits_of(x);
#endif
}

// cvt.rn.bf16.f32 (__float2bfloat16_rn): x rounded to bfloat16 (to nearest, ties to even), its bits.
// Before sm_80 (no such cvt) the same rounding on the bit pattern: the elementwise kernels that
// round with precision="bf16" (delta.cu) are compiled for every GPU.
__device__ __forceinline__ unsigned short bf16_round(float x) {
#if (defined(__CUDACC__) || defined(__CUDACC_RTC__)) && __CUDA_ARCH__ >= 800
    unsigned short y;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(y) : "f"(x));
    return y;
#elif defined(__CUDACC__) || defined(__CUDACC_RTC__)
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return 0x7fff;  // NaN: canonical
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#else
    return emu::cvt_rn_bf16(x);
#endif
}

// cvt.rn.bf16x2.f32: lo and hi rounded to bfloat16 and packed, lo in the low half (the layout of
// the mma operands: the element of the lower index in the low half).
__device__ __forceinline__ unsigned bf16x2_round(float lo, float hi) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    unsigned y;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(y) : "f"(hi), "f"(lo));  // the first source: upper half
    return y;
#else
    return emu::cvt_rn_bf16x2(hi, lo);
#endif
}

// bf16_round's result as the float it is (low 16 bits zero): a bf16 value held in float storage.
__device__ __forceinline__ float bf16_rounded(float x) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    return __uint_as_float(unsigned(bf16_round(x)) << 16);
#else
    return emu::bf16_to_float(emu::cvt_rn_bf16(x));
#endif
}

// A bfloat16's value (exact).
__device__ __forceinline__ float bf16_to_float(unsigned short h) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    return __uint_as_float(unsigned(h) << 16);
#else
    return emu::bf16_to_float(h);
#endif
}

// A bfloat16 as stored in memory: its 16 bits (NumPy and CuPy have no bfloat16 dtype; the arrays
// are uint16). Values are made by bf16_round, read by bf16_to_float.
typedef unsigned short bf16_t;

// A value as stored in memory, S (a core's Value: the activations and deltas of a step, its GEMMs'
// operands): float and double as computed; bf16_t (precision="bf16") rounded to nearest even.
template <typename S, typename T>
__device__ __forceinline__ S stored_as(T x) {
    if constexpr (sizeof(S) == 2) return bf16_round(x);
    else return S(x);
}

// A stored value read back as T for the arithmetic (exact).
template <typename T, typename S>
__device__ __forceinline__ T value_of(S s) {
    if constexpr (sizeof(S) == 2) return T(bf16_to_float(s));
    else return T(s);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: D (16 x 8) = A (16 x 8) B (8 x 8) + C.
// d may be c.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                 const float (&c)[4]) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    emu::mma_m16n8k8_tf32(d, a, b, c);
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D (16 x 8) = A (16 x 16) B (16 x 8) + C.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                  const float (&c)[4]) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    emu::mma_m16n8k16<emu::Bf16>(d, a, b, c);
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: as mma_m16n8k16_bf16 with IEEE halves.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                 const float (&c)[4]) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    emu::mma_m16n8k16<emu::F16>(d, a, b, c);
#endif
}

// ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16: N (1, 2, 4) 8 x 8 matrices of 16-bit elements
// from shared memory; lane 8 i + j passes the address of row j of matrix i (16 contiguous bytes,
// 16-byte aligned; lanes from 8 N on pass any address). Lane l receives in d[i] the elements
// (l / 4, 2 (l % 4) + h) of matrix i, h = 0 in the low half; with TRANS (2 (l % 4) + h, l / 4).
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix_m8n8(unsigned (&d)[N], const void* row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
    const unsigned p = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (N == 1 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(d[0]) : "r"(p));
    else if constexpr (N == 1)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(d[0]) : "r"(p));
    else if constexpr (N == 2 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(d[0]), "=r"(d[1]) : "r"(p));
    else if constexpr (N == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                     : "=r"(d[0]), "=r"(d[1])
                     : "r"(p));
    else if constexpr (!TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                     : "r"(p));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                     : "r"(p));
#else
    emu::ldmatrix_m8n8<N, TRANS>(d, row);
#endif
}
