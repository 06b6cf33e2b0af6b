// Launch parameters of the GEMM kernels: one struct per part of a launch, passed by
// value. gpu_backprop/ops/launch.py declares the same fields in the same order (a test
// compiles these structs and compares every field's offset with the NumPy layout), so
// a reordered or retyped field fails a test instead of binding the wrong value. A part
// that a launch does not run has no tiles and null pointers.
//
// T is the arithmetic's type (float, double: the parameters, the bias, the loss); S the type the
// activations, deltas and GEMM operands are stored in (the kernel's core's Value): T, or for
// precision="bf16" bf16_t (mma.cuh stored_as), with the weights read from their bf16 copy. A
// pointer is 8 bytes whichever its type, so the layouts do not depend on S.
#pragma once
#include "common.cuh"
#include "mma.cuh"

// out = f(o W + b)                      o: M x K, W: K x N, b: N, out: M x N
// With S narrower than T, the output layer writes y_hat (in T, out null): rounded to S's values as
// the activations are, but a softmax's logits (act ACT_LOGITS) exact, for the softmax that follows.
template <typename T, typename S = T>
struct ForwardParams {
    const S* o;
    const S* W;       // S narrower than T: the weights' copy in S
    const T* b;
    S* out;
    T* y_hat;
    index_t M, N, K;  // batch, outputs, inputs
    int act;
};

// forward_gather's input rows: o[r] = X[order[step * stride + r]] (written to o as loaded, in S),
// yb[r] = Y[the same row]
template <typename T>
struct GatherParams {
    const T* X;
    const T* Y;
    const long long* order;
    const long long* step;
    T* yb;
    index_t stride, n_y;
};

// out = (delta W^T) * f'(o)             delta: M x K, W: N x K, o and out: M x N
template <typename T, typename S = T>
struct PropagateParams {
    const S* delta;
    const S* W;       // as ForwardParams' W
    const S* o;
    S* out;
    index_t M, N, K;  // batch, inputs (the width below), outputs
    int act;
    index_t tiles_n, tiles;  // backward.cu: tiles in a row of the output, in all (0: absent)
};

// out = op(a) op(b) on bf16 operands (matmul.cu): op(a) M x K (a: K x M, k-major, or M x K),
// op(b) K x N (b: K x N, k-major, or N x K); a and b bf16 bits, out M x N in T
template <typename T>
struct MatmulParams {
    const bf16_t* a;
    const bf16_t* b;
    T* out;
    index_t M, N, K;
};

// W, b <- update(o^T delta, column sums of delta)   o: K x M, g: K x N
// with has_prologue: delta = g * f'(o_next), written once to delta_out; else delta = g
// vel_w, vel_b: the update's first state (momentum's velocity, Adam's first moment);
// sq_w, sq_b: its second (Adam's second moment); null where the rule keeps none.
// W_copy: W's copy in S (S narrower than T: what the GEMMs read), written from each updated
// element; null where there is none
template <typename T, typename S = T>
struct WeightGradParams {
    const S* o;
    const S* g;
    const S* o_next;
    S* delta_out;
    T* W;
    T* b;
    S* W_copy;
    T* vel_w;
    T* vel_b;
    T* sq_w;
    T* sq_b;
    index_t M, N, K;  // inputs, outputs, batch
    int act, has_prologue;
    index_t tiles_n, tiles;
};

// Split-K of the weight gradient (weight_grad.cu): slice z of `splits` sums k in
// [z slice_k, (z + 1) slice_k) into partials[z] (M x N) and bias_partials[z] (N); the last
// slice of a tile to finish, by tickets[tile] (zero between launches), adds the slices in
// order and applies the update. splits <= 1: no split, no workspace.
template <typename T>
struct SplitK {
    T* partials;
    T* bias_partials;
    unsigned int* tickets;
    index_t slice_k;
    int splits;
};

// What the weight-gradient epilogue does with the summed gradient G (update.cuh Updater):
// mode (UpdateMode); step: lr / batch for the SGD modes, lr for Adam; l2: G + l2 W on the
// weights (scikit-learn's alpha); scale: Adam's 1 / batch (the mean gradient); decay:
// AdamW's lr * weight_decay; t: Adam's step count, this step included (device memory, so
// a captured graph replays with the count of the day).
template <typename T>
struct UpdateRule {
    const long long* t;
    int mode;
    T step, momentum, l2, scale, beta1, beta2, eps, decay;
};

// backward.cu's output delta, computed as the propagation loads it (on = 0: delta is read):
// delta = output delta of (y_hat, y) (delta.cu), stored in S, loss summed over the first tile column.
template <typename T>
struct OutputParams {
    const T* y_hat;
    const T* y;
    T* loss_out;
    double* partials;
    long long* hit_partials;
    unsigned int* ticket;
    int on, act, loss;
};

// The fit loop's per-step record, kept by whichever kernel finishes the loss:
// losses[step] = loss, correct[step] = hits (if count), step += 1.
template <typename T>
struct StepRecord {
    T* losses;
    long long* correct;
    long long* step;
    int on, count;
};

// Whether this block is the last of `count` to take `ticket` (every thread of each of the
// `count` blocks calls it); the last one resets the ticket for the next launch, and sees
// every global write the others made before their call.
__device__ __forceinline__ bool last_to_arrive(unsigned int* ticket, unsigned int count) {
    __shared__ bool is_last;
    __threadfence();  // this thread's writes are visible before its block takes the ticket
    __syncthreads();
    if (threadIdx.x == 0) {
        is_last = atomicAdd(ticket, 1u) == count - 1;
        if (is_last) *ticket = 0u;
    }
    __syncthreads();
    if (is_last) __threadfence();
    return is_last;
}

// The block every GEMM kernel is written for is its core's THREADS threads in x; the
// launchers derive the same number from the same tile (gpu_backprop/ops/cuda.py threads_of).
// Any other block traps rather than computing part of a tile. (Not __launch_bounds__: with
// it ptxas spilled the tiny tile's backward to reach 80 registers on sm_90.)
template <class Core>
__device__ __forceinline__ bool launched_as_core() {
    if (blockDim.x == Core::THREADS && blockDim.y == 1 && blockDim.z == 1) return true;
    __trap();
    return false;
}
