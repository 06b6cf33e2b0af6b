// Shim-only probe (tests/test_tensor_cores.py): the tensor-core instructions of kernels/mma.cuh
// on registers the test lays out lane by lane, to compare with a NumPy transcription of the
// PTX fragment layouts. Elementwise conversions over host arrays; the warp-wide instructions
// with one set of registers per lane of every warp of the block (several warps at once).
#include "common.cuh"
#include "mma.cuh"

__global__ void tf32_round_values(const float* x, unsigned* y, index_t n) {
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) y[i] = tf32_round(x[i]);
}

__global__ void bf16_round_values(const float* x, unsigned short* y, index_t n) {
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) y[i] = bf16_round(x[i]);
}

__global__ void bf16x2_round_values(const float* lo, const float* hi, unsigned* y, index_t n) {
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) y[i] = bf16x2_round(lo[i], hi[i]);
}

__global__ void bf16_values(const unsigned short* h, float* y, index_t n) {
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) y[i] = bf16_to_float(h[i]);
}

// Thread i of the block: a = regs_a[4 i ...], b = regs_b[2 i ...], c = regs_c[4 i ...]; d to out[4 i ...].
// KIND 0: m16n8k8 tf32, 1: m16n8k16 bf16, 2: m16n8k16 f16. in_place: d is c's registers.
template <int KIND>
__global__ void mma_values(const unsigned* regs_a, const unsigned* regs_b, const float* regs_c, float* out,
                           int in_place) {
    const int i = threadIdx.x;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int r = 0; r < 4; ++r) a[r] = regs_a[4 * i + r], c[r] = regs_c[4 * i + r], d[r] = -1.0f;
    for (int r = 0; r < 2; ++r) b[r] = regs_b[2 * i + r];
    float(&dst)[4] = in_place ? c : d;
    if (KIND == 0) mma_m16n8k8_tf32(dst, a, b, c);
    if (KIND == 1) mma_m16n8k16_bf16(dst, a, b, c);
    if (KIND == 2) mma_m16n8k16_f16(dst, a, b, c);
    for (int r = 0; r < 4; ++r) out[4 * i + r] = dst[r];
}

// The block copies `words` 32-bit words of src to shared memory; thread i then passes the
// address of 16-bit element offsets[i] of it to ldmatrix and writes its registers to out[N i ...].
template <int N, bool TRANS>
__global__ void ldmatrix_values(const unsigned* src, int words, const int* offsets, unsigned* out) {
    struct alignas(16) Buffer {
        unsigned v[2048];
    };
    __shared__ Buffer buffer;
    for (int j = threadIdx.x; j < words; j += blockDim.x) buffer.v[j] = src[j];
    __syncthreads();
    unsigned d[N];
    ldmatrix_m8n8<N, TRANS>(d, reinterpret_cast<const unsigned short*>(buffer.v) + offsets[threadIdx.x]);
    for (int r = 0; r < N; ++r) out[N * threadIdx.x + r] = d[r];
}
