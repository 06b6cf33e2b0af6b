// The update of a parameter p from its gradient G summed over the batch, with the state
// the rule keeps (m: velocity or Adam's first moment, v: Adam's second moment):
//
//   WRITE_GRADIENT  p = G
//   weights only:   G += l2 p                       (L2 penalty, scikit-learn's alpha)
//   SGD             p -= step G                      (step = lr / batch)
//   SGD_MOMENTUM    m = momentum m - step G;  p += m
//   SGD_NESTEROV    m = momentum m - step G;  p += momentum m - step G
//   ADAM            g = scale G (the mean: scale = 1 / batch)
//                   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
//                   weights only: p -= decay p      (AdamW: decay = lr * weight_decay)
//                   p -= step_t m / (sqrt(v) + eps),  step_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)
//
// (scikit-learn's SGD, Nesterov and Adam; AdamW with decoupled decay.) The NumPy twin is
// gpu_backprop/ops/reference.py apply_rule.
//
// The GEMM epilogues inline the update once per output of a thread's tile (64 in the large
// tiles), so the rules come in two families, a template argument of the GEMM kernels: SGD_RULES
// (the first four modes: a few FMAs) and ADAM_RULES (a square root and a division more). One
// family for all made every GEMM kernel 3-6x slower to compile (NVRTC: the cold start); a run
// compiles the Adam instantiations only when it trains with Adam. A mode of the other family traps.
#pragma once
#include "params.cuh"

enum UpdateMode { WRITE_GRADIENT = 0, SGD = 1, SGD_MOMENTUM = 2, SGD_NESTEROV = 3, ADAM = 4 };
enum RuleFamily { SGD_RULES = 0, ADAM_RULES = 1 };

template <typename T, int FAMILY = SGD_RULES>
struct Updater {
    UpdateRule<T> r;

    // Adam's bias-corrected step, once per thread, in double from T's beta (as the twin).
    __device__ explicit Updater(const UpdateRule<T>& rule) : r(rule) {
        if (FAMILY == ADAM_RULES && r.mode == ADAM) {
            const double t = (double)*rule.t;
            r.step = (T)((double)rule.step * sqrt(1.0 - pow((double)rule.beta2, t)) /
                         (1.0 - pow((double)rule.beta1, t)));
        }
    }

    // Inlined once per output of the thread's tile: a call would spill the accumulators to local
    // memory (tests/test_sass.py), hence the two families above. Returns p's new value.
    __device__ __forceinline__ T operator()(T* p, T* m, T* v, index_t i, T grad, bool weight) const {
        if ((r.mode == ADAM) != (FAMILY == ADAM_RULES)) __trap();  // launched with the other family
        if (r.mode == WRITE_GRADIENT) {
            p[i] = grad;
            return grad;
        }
        T x = p[i];
        if (weight && r.l2 != T(0)) grad += r.l2 * x;
        if constexpr (FAMILY == SGD_RULES) {
            if (r.mode == SGD) {
                x -= r.step * grad;
            } else {
                const T velocity = r.momentum * m[i] - r.step * grad;
                m[i] = velocity;
                x += r.mode == SGD_MOMENTUM ? velocity : r.momentum * velocity - r.step * grad;
            }
        } else {
            const T g = r.scale * grad;
            const T first = r.beta1 * m[i] + (T(1) - r.beta1) * g;
            const T second = r.beta2 * v[i] + (T(1) - r.beta2) * (g * g);
            m[i] = first;
            v[i] = second;
            if (weight && r.decay != T(0)) x -= r.decay * x;
            x = x - r.step * first / (sqrt(second) + r.eps);
        }
        p[i] = x;
        return x;
    }

    // The update of W's element i (or b's), and with a copy in S (precision="bf16": what the GEMMs
    // read), the copy's element from the new value: the update epilogue's whole write.
    template <typename S>
    __device__ __forceinline__ void operator()(T* p, S* copy, T* m, T* v, index_t i, T grad, bool weight) const {
        const T x = (*this)(p, m, v, i, grad, weight);
        if constexpr (sizeof(S) < sizeof(T))
            if (copy) copy[i] = stored_as<S>(x);
    }
};

// The update of one element by whichever family its rule's mode is in (the elementwise kernels:
// one copy of each, no tile to unroll).
template <typename T>
__device__ __forceinline__ void update_any(const UpdateRule<T>& rule, T* p, T* m, T* v, index_t i, T grad,
                                           bool weight) {
    if (rule.mode == ADAM) {
        const Updater<T, ADAM_RULES> update(rule);
        update(p, m, v, i, grad, weight);
    } else {
        const Updater<T, SGD_RULES> update(rule);
        update(p, m, v, i, grad, weight);
    }
}
