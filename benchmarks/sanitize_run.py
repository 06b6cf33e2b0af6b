"""A small run of every fused kernel for compute-sanitizer (memcheck, racecheck):
odd shapes, both dtypes, every tile configuration (configs_for), momentum, the delta prologue,
the grouped backward launch (with and without the output delta inside), split-K
weight gradients (partials, tickets and the last slice's sum), and the update rules of
kernels/update.cuh (Nesterov, L2, Adam/AdamW with the step count on the device) fused and
on the cuBLAS path (bias.cu weight_update).
CuPy's memory pool is switched off so each array is its own cudaMalloc and an
out-of-bounds access cannot land silently inside a neighbour's allocation."""
import numpy as np


def main() -> None:
    import cupy

    cupy.cuda.set_allocator(None)
    from gpu_backprop import MLP, data, get_device
    from gpu_backprop.ops import Output, Propagate, Update
    from gpu_backprop.ops.cuda import WIDE_CONFIGS, configs_for

    ds = data.digits(seed=0)
    for dtype in ("float32", "float64"):
        for activation, loss in (("sigmoid", "mse"), ("tanh", "cross_entropy"), ("relu", "mse")):
            model = MLP([64, 33, 17, 10], activation=activation, loss=loss, device="cuda", dtype=dtype, seed=0)
            model.fit(ds.X_train[:130], ds.y_train[:130], epochs=1, batch_size=33, lr=0.5, momentum=0.9)
            model.evaluate(ds.X_test[:65], ds.y_test[:65])
            model.fit(ds.X_train[:130], ds.y_train[:130], epochs=1, batch_size=33, lr=0.01, optimizer="adamw",
                      alpha=1e-4, weight_decay=0.01)
            model.fit(ds.X_train[:130], ds.y_train[:130], epochs=1, batch_size=33, lr=0.1, momentum=0.9,
                      nesterov=True)
    device = get_device("cuda")
    ops, xp = device.ops(fused=True), device.xp
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for config in configs_for(dtype):
            batch, n_in, n_out = 129, 65, 127
            o = xp.asarray(rng.random((batch, n_in)), dtype=dtype)
            err = xp.asarray(rng.standard_normal((batch, n_out)), dtype=dtype)
            o_next = xp.asarray(rng.random((batch, n_out)), dtype=dtype)
            grad_w, grad_b = xp.empty((n_in, n_out), dtype), xp.empty(n_out, dtype)
            delta = xp.empty((batch, n_out), dtype)
            prologue = {} if config in WIDE_CONFIGS else dict(o_next=o_next, activation="sigmoid", delta_out=delta)
            ops.weight_grad(o, err, grad_w, grad_b, config=config, **prologue)  # the wide tiles: no prologue
            below = xp.empty((batch, n_in), dtype)
            ops.propagate(delta, grad_w, o, "tanh", below, config=config)
            ops.forward(o, grad_w, grad_b, "relu", xp.empty((batch, n_out), dtype), config=config)
            ops.hidden_delta(err, o_next, "sigmoid", delta)
            # backward.cu: a propagation beside two updates in one grid
            W2, b2 = xp.asarray(rng.standard_normal((n_in, n_out)), dtype=dtype), xp.zeros(n_out, dtype)
            ops.backward(Propagate(err, grad_w, o, "sigmoid", below),
                         [Update(o, delta, W2, b2, 0.01, 0.9, xp.zeros_like(W2), xp.zeros_like(b2)),
                          Update(o_next, err, xp.zeros((n_out, n_out), dtype), xp.zeros(n_out, dtype), 0.01, 0.9,
                                 xp.zeros((n_out, n_out), dtype), xp.zeros(n_out, dtype))], config=config)
            # ... and the first backward launch, with the output delta and the loss computed inside it
            ops.backward(Propagate(xp.empty((batch, n_out), dtype), grad_w, o, "sigmoid", below), [],
                         Output(o_next, err, "sigmoid", "mse", xp.empty(1, dtype)), config=config)
        for split in ("small/s2", "large/s4", "warp/s8"):  # 301 batch rows: slices of unequal length
            o = xp.asarray(rng.random((301, 65)), dtype=dtype)
            err = xp.asarray(rng.standard_normal((301, 127)), dtype=dtype)
            W, b = xp.zeros((65, 127), dtype), xp.zeros(127, dtype)
            ops.sgd_update(o, err, W, b, 0.01, 0.9, xp.zeros_like(W), xp.zeros_like(b),
                           o_next=xp.asarray(rng.random((301, 127)), dtype=dtype), activation="sigmoid",
                           delta_out=xp.empty((301, 127), dtype), config=split)
        from gpu_backprop.ops import Rule

        t = xp.ones(1, dtype=np.int64)
        o = xp.asarray(rng.random((301, 65)), dtype=dtype)
        err = xp.asarray(rng.standard_normal((301, 127)), dtype=dtype)
        for config in ("small", "warp/s4", "cublas"):  # Adam in the epilogue, split, and as a pass of its own
            W, b = xp.zeros((65, 127), dtype), xp.zeros(127, dtype)
            state = [xp.zeros_like(W), xp.zeros_like(b), xp.ones_like(W), xp.ones_like(b)]
            ops.update(o, err, W, b, Rule("adam", 1e-3, 0.0, 1e-4, 1 / 301, 0.9, 0.999, 1e-8, 1e-5, t), *state,
                       config=config)
    xp.cuda.runtime.deviceSynchronize()
    print("sanitize_run: ok")


if __name__ == "__main__":
    main()
