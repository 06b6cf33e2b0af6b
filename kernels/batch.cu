// The fit loop's bookkeeping on the device, so that a captured step (gather,
// forward, backward, update, bookkeeping) is one graph launch and the host
// touches nothing until the epoch ends. `step` is a device counter.
//
// shuffle_keys:  keys[i] = mix64(i + key), step = 0   (once per epoch; `key` is already
//                mixed by the host; argsort(keys) is the epoch's order: mix64 is a
//                bijection, so keys never tie)
// gather_batch:  xb[r] = X[order[step * stride + r]], yb[r] = Y[same row]    (r < batch; xb in S:
//                the activations' type, bf16 for precision="bf16" (mma.cuh stored_as))
// finish_batch:  losses[step] = loss[0];
//                correct[step] = #rows whose argmax(y_hat) == argmax(yb)     (if count;
//                                one output unit: y_hat > 1/2 against yb > 1/2)
//                step += 1
// Ties in argmax go to the lowest index, as numpy.argmax. finish_batch runs as
// one block (blockDim.x a multiple of 32) and sums in a fixed order.
#include "common.cuh"
#include "mma.cuh"

// splitmix64's finaliser; the same constants as gpu_backprop/ops/reference.py's mix64.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__global__ void shuffle_keys(unsigned long long* __restrict__ keys, long long* __restrict__ step,
                             unsigned long long key, index_t n) {
    const index_t grid_stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += grid_stride)
        keys[i] = mix64((unsigned long long)i + key);
    if (blockIdx.x == 0 && threadIdx.x == 0) step[0] = 0;
}

template <typename T, typename S = T>
__global__ void gather_batch(const T* __restrict__ X, const T* __restrict__ Y, const long long* __restrict__ order,
                             const long long* __restrict__ step, S* __restrict__ xb, T* __restrict__ yb,
                             index_t batch, index_t stride, index_t n_x, index_t n_y) {
    const index_t first = step[0] * stride, width = n_x + n_y, total = batch * width;
    const index_t grid_stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += grid_stride) {
        const index_t r = i / width, c = i % width, row = order[first + r];
        if (c < n_x)
            xb[r * n_x + c] = stored_as<S>(X[row * n_x + c]);
        else
            yb[r * n_y + (c - n_x)] = Y[row * n_y + (c - n_x)];
    }
}

template <typename T>
__global__ void finish_batch(const T* __restrict__ y_hat, const T* __restrict__ yb, const T* __restrict__ loss,
                             T* __restrict__ losses, long long* __restrict__ correct, long long* step, int count,
                             index_t batch, index_t n_out) {
    const long long s = step[0];  // read by every thread before thread 0 advances it below
    long long hits = 0;
    if (count)
        for (index_t r = threadIdx.x; r < batch; r += blockDim.x)
            hits += argmax_row(y_hat + r * n_out, n_out) == argmax_row(yb + r * n_out, n_out);
    hits = block_sum(hits);
    if (threadIdx.x == 0) {
        losses[s] = loss[0];
        if (count) correct[s] = hits;
        step[0] = s + 1;
    }
}
