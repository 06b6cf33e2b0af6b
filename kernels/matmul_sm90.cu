// The bf16 GEMM of matmul.cu on Hopper's warpgroup tensor cores (sm_90a only: wgmma.cuh):
//
//   out = op(a) op(b)    op(a): M x K, op(b): K x N (bf16 bits, row-major storage), out: M x N (float)
//
//   kernel                 a          b          out
//   matmul_sm90_BN_tn      K x M      K x N      a^T b   the weight gradient (o^T delta)
//   matmul_sm90_BN_nn      M x K      K x N      a b     the forward (o W)
//   matmul_sm90_BN_nt      M x K      N x K      a b^T   the propagation (delta W^T)
//
// Block 128 x BN (BN 128 or 256), k tiles of 64, 256 threads: two warpgroups, each 64 rows of the
// block by all BN columns, four wgmma m64nBNk16 a k tile (BN / 2 float accumulators a thread). Each operand's
// tile is kept in shared memory as it is stored (its contiguous dimension along the 128-byte
// swizzle rows), so no layout needs a transposing copy: an operand with rows along k (a of tn,
// b of tn and nn) is MN-major, the others K-major. A stage is both tiles (16 KB of A, 2 BN 64
// bytes of B), in atoms of 1024 bytes:
//   K-major   tile[r][k]: atom r / 8, row r % 8, chunk k / 8;      SBO 1024 (LBO unused)
//   MN-major  tile[k][r]: atom 8 (r / 64) + k / 8, row k % 8, chunk (r % 64) / 8;
//             SBO 1024 (the next 8 k), LBO 8192 (the next 64 rows of m or n)
// with the chunk stored at chunk ^ row (wgmma.cuh).
//
// Pipeline of STAGES = 4 buffers (129 KB with BN 128, 193 KB with 256: one block an SM), tile
// kt + 2 loaded (cp.async) while tile kt's wgmma run and tile kt - 1's may still be in flight: at the
// top of step kt every thread has waited for its wgmma of tile kt - 2 (wait_group 1 at the end of
// step kt - 1), so after the barrier the buffer
// tile kt - 2 used is free for tile kt + 2.
//
// Edges: a 16-byte chunk wholly inside the operand, with rows 16-byte aligned, is one cp.async;
// any other (a ragged edge, rows not a multiple of 8 elements, K = 1) is read element by element
// with zeros past the edge and stored by the thread itself. Zeros past K add nothing.
#include "common.cuh"
#include "params.cuh"
#include "wgmma.cuh"

template <int BN_>
struct Sm90Tile {
    static const int BM = 128, BN = BN_, BK = 64, STAGES = 4, THREADS = 256;
    static const int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;  // each operand's tile of a stage
    static const int SHARED_BYTES = STAGES * (A_BYTES + B_BYTES) + 1024;  // + room to align the atoms
    static_assert(BN == 128 || BN == 256, "wgmma.cuh instantiates m64n128k16 and m64n256k16");
};

// The shared-memory byte offset, within an operand tile, of the 16-byte chunk holding elements
// (r, k .. k + 7) (K-major: r = m or n, k % 8 == 0) or (k, r .. r + 7) (MN-major, r % 8 == 0).
template <bool MN_MAJOR>
__device__ __forceinline__ unsigned chunk_offset(int r, int k) {
    if (MN_MAJOR) {
        const int row = k % 8, chunk = (r % 64) / 8;
        return (8 * (r / 64) + k / 8) * 1024 + row * 128 + ((chunk ^ row) << 4);
    }
    const int row = r % 8, chunk = k / 8;
    return (r / 8) * 1024 + row * 128 + ((chunk ^ row) << 4);
}

// One operand's tile of rows r0 .. r0 + ROWS - 1 (m or n), k0 .. k0 + 63 into `tile` (8 ROWS chunks,
// ROWS / 32 a thread). The operand is stored rows x cols with leading dimension `ld`: K x R when
// MN_MAJOR (rows along k), else R x K.
template <bool MN_MAJOR, int ROWS>
__device__ __forceinline__ void load_tile(unsigned char* tile, const unsigned short* __restrict__ src, index_t ld,
                                          index_t R, index_t K, index_t r0, index_t k0, bool rows16) {
#pragma unroll
    for (int i = 0; i < ROWS / 32; ++i) {
        const int c = threadIdx.x + 256 * i;
        // the chunk's element (r, k) in the tile and its 8 elements' run along the stored rows
        const int r = MN_MAJOR ? (c % (ROWS / 8)) * 8 : c / 8, k = MN_MAJOR ? c / (ROWS / 8) : (c % 8) * 8;
        const index_t row = MN_MAJOR ? k0 + k : r0 + r, col = MN_MAJOR ? r0 + r : k0 + k;
        const index_t rows = MN_MAJOR ? K : R, cols = MN_MAJOR ? R : K;
        unsigned char* dst = tile + chunk_offset<MN_MAJOR>(r, k);
        if (rows16 && row < rows && col + 8 <= cols) {
            cp_async<16>(dst, src + row * ld + col, 16);
        } else {
            Pack<unsigned short> v;  // (no pointer is formed past the operand's end)
#pragma unroll
            for (int e = 0; e < 8; ++e) v.v[e] = row < rows && col + e < cols ? src[row * ld + col + e] : 0;
            *reinterpret_cast<Pack<unsigned short>*>(dst) = v;
        }
    }
}

template <int BN, bool A_KROWS, bool B_KROWS>
__device__ __forceinline__ void matmul_sm90(const MatmulParams<float>& p) {
    typedef Sm90Tile<BN> T;
    DYNAMIC_SHARED(unsigned char, shared);
    if (!launched_as_core<T>()) return;
    // the atoms 1024-byte aligned in the shared state space (the 128-byte swizzle is of addresses;
    // dynamic shared memory is promised 16-byte alignment only)
    unsigned char* const base = shared + ((1024 - (shared_address(shared) & 1023)) & 1023);
    const index_t M = p.M, N = p.N, K = p.K;
    const index_t m0 = (index_t)blockIdx.y * T::BM, n0 = (index_t)blockIdx.x * T::BN;
    const index_t lda = A_KROWS ? M : K, ldb = B_KROWS ? N : K;
    const bool a16 = lda % 8 == 0 && aligned16(p.a), b16 = ldb % 8 == 0 && aligned16(p.b);
    const int kt_count = (int)((K + T::BK - 1) / T::BK);
    auto a_tile = [&](int s) { return base + s * (T::A_BYTES + T::B_BYTES); };
    auto b_tile = [&](int s) { return base + s * (T::A_BYTES + T::B_BYTES) + T::A_BYTES; };
    auto load = [&](int kt) {
        if (kt < kt_count) {
            const int s = kt % T::STAGES;
            load_tile<A_KROWS, T::BM>(a_tile(s), p.a, lda, M, K, m0, (index_t)kt * T::BK, a16);
            load_tile<B_KROWS, T::BN>(b_tile(s), p.b, ldb, N, K, n0, (index_t)kt * T::BK, b16);
        }
        cp_async_commit();  // a group every step, empty or not: the wait below counts them
    };
    const int wg = threadIdx.x / 128;  // this warpgroup's rows: 64 wg .. 64 wg + 63 of the block
    float acc[BN / 2];
#pragma unroll
    for (int r = 0; r < BN / 2; ++r) acc[r] = 0.0f;

    load(0);
    load(1);
    for (int kt = 0; kt < kt_count; ++kt) {
        cp_async_wait<1>();  // tile kt landed (tile kt + 1 may be in flight)
        fence_proxy_async();
        __syncthreads();  // sync: tile kt in every thread's view; every wgmma of tile kt - 2 done
        load(kt + 2);
        const int s = kt % T::STAGES;
        const unsigned a0 = shared_address(a_tile(s)) + wg * 8 * 1024;  // 8 atoms (K-major) or the m atom wg
        const unsigned b0 = shared_address(b_tile(s));
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < T::BK / 16; ++kk) {
            // k 16 kk .. 16 kk + 15: MN-major two 8-k atoms on (2 kk, 2 kk + 1), K-major 32 bytes on
            const unsigned long long da = A_KROWS ? wgmma_descriptor(a0 + 2 * kk * 1024, 8 * 1024, 1024)
                                                  : wgmma_descriptor(a0 + 32 * kk, 16, 1024);
            const unsigned long long db = B_KROWS ? wgmma_descriptor(b0 + 2 * kk * 1024, 8 * 1024, 1024)
                                                  : wgmma_descriptor(b0 + 32 * kk, 16, 1024);
            wgmma_bf16<BN, A_KROWS, B_KROWS>(acc, da, db, 1);
        }
        wgmma_commit_group();
        wgmma_wait_group<1>(acc);  // tile kt - 1's done: its buffer is free after the next barrier
    }
    wgmma_wait_group<0>(acc);

    const int lane = threadIdx.x % 32, w = threadIdx.x / 32 % 4, g = lane / 4, t = lane % 4;
    float* __restrict__ out = p.out;
#pragma unroll
    for (int r = 0; r < BN / 2; ++r) {
        const index_t m = m0 + 64 * wg + 16 * w + g + 8 * ((r / 2) % 2), n = n0 + 8 * (r / 4) + 2 * t + r % 2;
        if (m < M && n < N) out[m * N + n] = acc[r];
    }
}

extern "C" __global__ void __launch_bounds__(256, 1) matmul_sm90_128_tn(MatmulParams<float> p) {
    matmul_sm90<128, true, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) matmul_sm90_128_nn(MatmulParams<float> p) {
    matmul_sm90<128, false, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) matmul_sm90_128_nt(MatmulParams<float> p) {
    matmul_sm90<128, false, false>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) matmul_sm90_256_tn(MatmulParams<float> p) {
    matmul_sm90<256, true, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) matmul_sm90_256_nn(MatmulParams<float> p) {
    matmul_sm90<256, false, true>(p);
}
extern "C" __global__ void __launch_bounds__(256, 1) matmul_sm90_256_nt(MatmulParams<float> p) {
    matmul_sm90<256, false, false>(p);
}
