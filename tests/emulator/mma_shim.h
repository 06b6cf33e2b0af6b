// The tensor-core instructions of the CUDA-on-CPU shim (included by cuda_shim.h), with the
// semantics of the PTX ISA ("Warp Level Matrix Multiply-Accumulate Instructions"); the kernels
// call them through kernels/mma.cuh, which on a GPU issues the PTX itself.
//
//   cvt.rna.tf32.f32                 cvt_rna_tf32
//   cvt.rn.bf16.f32, .bf16x2.f32     cvt_rn_bf16, cvt_rn_bf16x2
//   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32     mma_m16n8k8_tf32
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32    mma_m16n8k16<Bf16>
//   mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32      mma_m16n8k16<F16>
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16   ldmatrix_m8n8<N, TRANS>
//
// Fragment layouts (PTX ISA 9.7.14.5.7/8, "Matrix Fragments for mma.m16n8k8 / m16n8k16"),
// lane = 4 g + t (groupID g = lane >> 2, threadID_in_group t = lane % 4):
//   m16n8k8 .tf32:  a[r] = A(g + 8 (r % 2), t + 4 (r / 2))           r < 4, one tf32 per register
//                   b[r] = B(t + 4 r, g)                              r < 2
//   m16n8k16 .bf16/.f16 (two 16-bit elements per register, element 2i in the low half):
//                   element i < 8 of a: A(g + 8 ((i / 2) % 2), 2 t + i % 2 + 8 (i / 4))
//                   element i < 4 of b: B(2 t + i % 2 + 8 (i / 2), g)
//   C and D (.f32, both shapes): c[r] = C(g + 8 (r / 2), 2 t + r % 2)
//
// Warp-wide instructions (.sync.aligned: every lane of the warp executes them together) are
// emulated as __shfl_down_sync is: each lane writes its operands to its row of the warp's
// exchange buffer, all arrive at the warp's barrier, each lane computes its own results from
// every lane's operands, and all arrive again before anyone may overwrite its row.
//
// Arithmetic of mma (not documented by NVIDIA beyond "products exact, accumulation in f32";
// this model follows the measurements of Fasi, Higham, Mikaitis and Pranesh, "Numerical
// behavior of NVIDIA tensor cores", PeerJ Comput. Sci. 7:e330, 2021, on the A100):
//   * each product of two tf32 / bf16 / f16 operands is exact (11 x 11 or 8 x 8 significant
//     bits fit a float's 24; computed here in double, where range is no issue either);
//   * the k products of one output are summed in blocks of BLOCK consecutive k (4 for tf32,
//     8 for bf16 / f16: our reading of that paper, an assumption), in k order, each block
//     together with the running accumulator (c for the first block) in one fused step: every
//     term is aligned to the largest exponent among them and the bits below that exponent's
//     float ulp (2^(emax - 23), not below 2^-149: subnormals are kept) are truncated, the
//     aligned terms are added exactly, and the sum is truncated (rounded toward zero) to a
//     float. An exact sum above the float range becomes an infinity (assumed);
//   * NaN in, or inf - inf, or 0 * inf: the canonical NaN 0x7fffffff; an infinite term with no
//     opposite one: that infinity. A block whose terms are all zero gives -0 only if they all
//     are -0 (IEEE), an exact cancellation +0.
//   The register of a .tf32 operand is read as its upper 19 bits (the low 13 ignored: a raw
//   float passed to the mma is truncated), so cvt.rna.tf32.f32 is what rounds to nearest.
// The tests (tests/test_tensor_cores.py) compare against a NumPy transcription of this model
// bit for bit, and the GEMMs against float64 with bounds that hold whatever the order of the
// sums and whether they round to nearest or toward zero.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace emu {
inline std::uint32_t bits_of(float x) { return std::bit_cast<std::uint32_t>(x); }
inline float float_of(std::uint32_t u) { return std::bit_cast<float>(u); }
inline constexpr std::uint32_t canonical_nan = 0x7fffffffu;

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits; the result is a
// float bit pattern with its low 13 bits zero. Subnormals round on the same grid (no flush);
// a value past the largest tf32 rounds to the infinity; infinities stay, NaN is canonical.
inline std::uint32_t cvt_rna_tf32(float x) {
    const std::uint32_t u = bits_of(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? canonical_nan : u;
    return (u + 0x1000u) & 0xffffe000u;  // half an ulp of the magnitude, then truncate: ties away
}

// cvt.rn.bf16.f32 (__float2bfloat16_rn): round to nearest, ties to even, to 7 mantissa bits;
// no flush of subnormals, overflow to the infinity, NaN canonical (0x7fff).
inline std::uint16_t cvt_rn_bf16(float x) {
    const std::uint32_t u = bits_of(x);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return 0x7fff;
    return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// cvt.rn.bf16x2.f32 d, hi, lo: the value converted from the first source in the upper half.
inline std::uint32_t cvt_rn_bf16x2(float hi, float lo) {
    return (std::uint32_t(cvt_rn_bf16(hi)) << 16) | cvt_rn_bf16(lo);
}

inline float bf16_to_float(std::uint16_t h) { return float_of(std::uint32_t(h) << 16); }

// An IEEE binary16 as a float (exact): subnormals, infinities and NaN (payload kept).
inline float f16_to_float(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return float_of(sign | 0x7f800000u | (m << 13));
    if (e == 0) return float_of(sign | bits_of(std::ldexp(float(m), -24)));
    return float_of(sign | ((e + 112) << 23) | (m << 13));
}

// The operand of a .tf32 mma held in a 32-bit register: its upper 19 bits.
inline float tf32_operand(std::uint32_t u) {
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return float_of(canonical_nan);
    return float_of(u & 0xffffe000u);
}

struct Bf16 {
    static float value(std::uint16_t h) { return bf16_to_float(h); }
};
struct F16 {
    static float value(std::uint16_t h) { return f16_to_float(h); }
};

// x truncated toward zero to a multiple of q (a power of two): exact in double for |x / q| < 2^53.
inline double truncate_to(double x, double q) { return std::trunc(x / q) * q; }

// One fused step of the tensor core's adder: acc + p[0] + ... + p[n-1] (see the header).
inline float fused_block(float acc, const double* p, int n) {
    bool nan = std::isnan(acc), pos_inf = acc == INFINITY, neg_inf = acc == -INFINITY;
    bool all_negative_zero = acc == 0 && std::signbit(acc);
    int emax = INT32_MIN;
    auto exponent = [](double x) {
        int e;
        std::frexp(x, &e);
        return e - 1;  // floor(log2 |x|)
    };
    if (acc != 0 && std::isfinite(acc)) emax = exponent(acc);
    for (int i = 0; i < n; ++i) {
        nan |= std::isnan(p[i]);
        pos_inf |= p[i] == INFINITY;
        neg_inf |= p[i] == -INFINITY;
        all_negative_zero &= p[i] == 0 && std::signbit(p[i]);
        if (p[i] != 0 && std::isfinite(p[i])) emax = std::max(emax, exponent(p[i]));
    }
    if (nan || (pos_inf && neg_inf)) return float_of(canonical_nan);
    if (pos_inf) return INFINITY;
    if (neg_inf) return -INFINITY;
    if (emax == INT32_MIN) return all_negative_zero ? -0.0f : 0.0f;
    const double q = std::ldexp(1.0, std::max(emax - 23, -149));
    double sum = truncate_to(double(acc), q);
    for (int i = 0; i < n; ++i) sum += truncate_to(p[i], q);  // multiples of q below 2^28 q: exact
    if (sum == 0) return 0.0f;
    const double r = truncate_to(sum, std::ldexp(1.0, std::max(exponent(sum) - 23, -149)));
    if (std::fabs(r) >= 0x1p128) return r > 0 ? INFINITY : -INFINITY;
    return float(r);  // exact: r has at most 24 significant bits in the float range
}

// acc + sum_k p[k] over K products, BLOCK at a time.
template <int K, int BLOCK>
inline float accumulate(float acc, const double (&p)[K]) {
    static_assert(K % BLOCK == 0, "whole blocks");
    for (int k = 0; k < K; k += BLOCK) acc = fused_block(acc, p + k, BLOCK);
    return acc;
}

inline constexpr int tf32_block = 4, half_block = 8;

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, c (d may be c).
__attribute__((noinline)) inline void mma_m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                                                        const std::uint32_t (&b)[2], const float (&c)[4]) {
    Warp& w = *warp;
    std::uint32_t* mine = reinterpret_cast<std::uint32_t*>(w.exchange[lane]);
    std::memcpy(mine, a, sizeof a);
    std::memcpy(mine + 4, b, sizeof b);
    w.barrier.arrive_and_wait();
    auto word = [&](int l, int r) {
        std::uint32_t u;
        std::memcpy(&u, w.exchange[l] + 4 * r, 4);
        return u;
    };
    const int g = lane / 4, t = lane % 4;
    float out[4];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
        double p[8];
        for (int k = 0; k < 8; ++k) {
            const float x = tf32_operand(word(4 * (row % 8) + k % 4, row / 8 + 2 * (k / 4)));  // A(row, k)
            const float y = tf32_operand(word(4 * col + k % 4, 4 + k / 4));                    // B(k, col)
            p[k] = double(x) * double(y);
        }
        out[r] = accumulate<8, tf32_block>(c[r], p);
    }
    w.barrier.arrive_and_wait();
    std::memcpy(d, out, sizeof out);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 d, a, b, c (d may be c).
template <class Type>
__attribute__((noinline)) void mma_m16n8k16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2],
                                            const float (&c)[4]) {
    Warp& w = *warp;
    std::uint32_t* mine = reinterpret_cast<std::uint32_t*>(w.exchange[lane]);
    std::memcpy(mine, a, sizeof a);
    std::memcpy(mine + 4, b, sizeof b);
    w.barrier.arrive_and_wait();
    auto half = [&](int l, int r, int h) {  // element h (0: the low half) of register r of lane l
        std::uint16_t u;
        std::memcpy(&u, w.exchange[l] + 4 * r + 2 * h, 2);  // little-endian: the low half first
        return Type::value(u);
    };
    const int g = lane / 4, t = lane % 4;
    float out[4];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
        double p[16];
        for (int k = 0; k < 16; ++k) {
            const float x = half(4 * (row % 8) + (k % 8) / 2, row / 8 + 2 * (k / 8), k % 2);  // A(row, k)
            const float y = half(4 * col + (k % 8) / 2, 4 + k / 8, k % 2);                    // B(k, col)
            p[k] = double(x) * double(y);
        }
        out[r] = accumulate<16, half_block>(c[r], p);
    }
    w.barrier.arrive_and_wait();
    std::memcpy(d, out, sizeof out);
}

// ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16 d, [row]: N 8 x 8 matrices of 16-bit elements;
// lane 8 i + j gives the address of row j of matrix i (lanes from 8 N on: ignored, as on sm_80+),
// each row 16 contiguous bytes, 16-byte aligned (else a GPU faults: here the kernel traps).
// Lane l receives in d[i] the elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i,
// the first in the low half; with .trans the elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
template <int N, bool TRANS>
__attribute__((noinline)) void ldmatrix_m8n8(std::uint32_t (&d)[N], const void* row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    Warp& w = *warp;
    std::memcpy(w.exchange[lane], &row, sizeof row);
    w.barrier.arrive_and_wait();
    auto address = [&](int l) {
        const unsigned char* p;
        std::memcpy(&p, w.exchange[l], sizeof p);
        return p;
    };
    bool misaligned = false;
    std::uint32_t out[N];
    for (int i = 0; i < N; ++i) {
        std::uint16_t e[2];
        for (int h = 0; h < 2; ++h) {
            const int r = TRANS ? 2 * (lane % 4) + h : lane / 4, col = TRANS ? lane / 4 : 2 * (lane % 4) + h;
            const unsigned char* p = address(8 * i + r);
            misaligned |= reinterpret_cast<std::uintptr_t>(p) % 16 != 0;
            std::memcpy(&e[h], p + 2 * col, 2);
        }
        out[i] = e[0] | (std::uint32_t(e[1]) << 16);
    }
    w.barrier.arrive_and_wait();
    if (misaligned) __trap();
    std::memcpy(d, out, sizeof out);
}
}  // namespace emu
