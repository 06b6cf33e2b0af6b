"""The whole training step (forward, backward, SGD update) of the seed's network:
sigmoid hidden and output layers, MSE loss, float32, one mini-batch; and PyTorch's bf16
mixed precision of the same step (autocast, float32 master weights: issue 13's targets)."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_backprop import MLP

from .conftest import CPU_SKIPPED_SIZES
from .harness import rotation
from .measure import run_benchmark, to_host
from .peers import (BF16_STEP_PEERS, BF16_STEP_TOL, LR, OURS_BF16_STEP_PEERS, STEP_UPDATE_TOL, PRECISION, SIZES, STEP_PEERS,
                    peer_reason, torch_autocast, torch_device, torch_or_skip, torch_sync)


def plain_step(params: dict, X, Y, sigmoid, lr: float = LR) -> dict:
    """Textbook backprop with temporaries (MATH.md), for NumPy, CuPy and PyTorch arrays."""
    weights, biases = params["W"], params["b"]
    o = [X]
    for W, b in zip(weights, biases):
        o.append(sigmoid(o[-1] @ W + b))
    step = lr / X.shape[0]
    delta = (o[-1] - Y) * o[-1] * (1 - o[-1])
    for k in reversed(range(len(weights))):
        grad_w, grad_b = o[k].T @ delta, delta.sum(0)
        if k > 0:
            delta_below = (delta @ weights[k].T) * o[k] * (1 - o[k])
        weights[k] -= step * grad_w
        biases[k] -= step * grad_b
        if k > 0:
            delta = delta_below
    return params


def initial(size: str, rng: np.random.Generator) -> tuple[list, list, np.ndarray, np.ndarray]:
    widths, batch = SIZES[size]
    model = MLP(widths, device="cpu", dtype="float64", seed=0)
    weights, biases = list(model.weights), [rng.standard_normal(b.shape) * 0.1 for b in model.biases]
    X = rng.standard_normal((batch, widths[0]))
    Y = np.eye(widths[-1])[rng.integers(0, widths[-1], batch)]
    return weights, biases, X, Y


def step_flops(widths: list, batch: int) -> int:
    """GEMM FLOPs of one step: 2BP forward, 4BP backward, less the first layer's
    error propagation, which nobody computes (2 B n0 n1)."""
    params = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return 6 * batch * params - 2 * batch * widths[0] * widths[1]


def torch_autograd(torch, tensor, weights, biases, lr, bf16=False):
    """PyTorch as its users write it: nn.Sequential, autograd, optim.SGD, from our weights
    (``bf16``: the forward and the loss under torch.autocast(bfloat16), backward and step outside
    it, as torch.autocast's documentation has it; the parameters stay float32).
    Returns (step(x, y), params(_) -> host arrays named like ours)."""
    layers = []
    for W, b in zip(weights, biases):
        linear = torch.nn.Linear(*W.shape).to(tensor(b).device)
        with torch.no_grad():
            linear.weight.copy_(tensor(W.T))
            linear.bias.copy_(tensor(b))
        layers += [linear, torch.nn.Sigmoid()]
    net = torch.nn.Sequential(*layers)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch_autocast(torch, bf16):
            loss = 0.5 * ((net(x) - y) ** 2).sum() / x.shape[0]  # batch mean of 1/2 sum (y - y_hat)^2
        loss.backward()
        optimizer.step()
        return net

    def params(_):
        return {f"W{k}": to_host(m.weight.T) for k, m in enumerate(linears)} | \
               {f"b{k}": to_host(m.bias) for k, m in enumerate(linears)}

    return step, params


def numpy_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def autocast_bf16(torch, step):
    """``step`` with torch.autocast(bfloat16) inside: every GEMM on bf16 operands (float32 sums),
    the rest in float32, the master weights float32 (torch.compile traces the autocast region)."""
    def bf16_step(params, X, Y, sigmoid, lr=LR):
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as written out: what torch.compile traces
            return step(params, X, Y, sigmoid, lr)

    return bf16_step


def update_check(weights: list, biases: list, reference: dict, outputs):
    """(reference, outputs) of the step's update, parameters after less before, in place of the
    parameters (peers.BF16_STEP_TOL says why): the reference from the float64 start, the peer's
    from the float32 start it was given."""
    start = {f"W{k}": w for k, w in enumerate(weights)} | {f"b{k}": b for k, b in enumerate(biases)}
    given = {k: v.astype(np.float32).astype(np.float64) for k, v in start.items()}

    def updates(result):
        return {k: np.asarray(to_host(v), dtype=np.float64) - given[k] for k, v in outputs(result).items()}

    return {k: v - start[k] for k, v in reference.items()}, updates


@pytest.mark.parametrize("peer", STEP_PEERS)
@pytest.mark.parametrize("size", list(SIZES))
def test_train_step(benchmark, backend, ceilings, budget, size, peer):
    reason = peer_reason(peer if peer != "torch-autograd" else "torch-eager", backend, size)
    precision = PRECISION.get(peer, "fp32")
    if reason:
        pytest.skip(reason)
    if backend.kind == "cpu" and size in CPU_SKIPPED_SIZES:
        pytest.skip(f"{size} takes seconds per step on the CPU: GPU runs only")
    weights, biases, X, Y = initial(size, np.random.default_rng(0))
    with np.errstate(over="ignore"):
        ref = plain_step({"W": [w.copy() for w in weights], "b": [b.copy() for b in biases]}, X, Y, numpy_sigmoid)
    reference = {f"W{k}": w for k, w in enumerate(ref["W"])} | {f"b{k}": b for k, b in enumerate(ref["b"])}
    widths, batch = SIZES[size]
    flops = step_flops(widths, batch)
    n_sets = 1 if benchmark.disabled else rotation(4 * batch * (widths[0] + widths[-1]), backend)
    batches = [(X.astype(np.float32), Y.astype(np.float32)) for _ in range(n_sets)]

    if peer.startswith("torch"):
        torch = torch_or_skip(backend)
        device = torch_device(backend)
        tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)  # noqa: E731
        sets = [(tensor(x), tensor(y)) for x, y in batches]
        sync = torch_sync(torch, backend)
        if peer in ("torch-autograd", "torch-autograd-bf16"):
            torch_step, outputs = torch_autograd(torch, tensor, weights, biases, LR, bf16=precision == "bf16")

            def fn(s):
                return torch_step(*s)
        else:  # torch-eager, torch-compile; torch-autocast-bf16, torch-compile-bf16: the same under autocast
            state = {"W": [tensor(w) for w in weights], "b": [tensor(b) for b in biases]}
            step = autocast_bf16(torch, plain_step) if precision == "bf16" else plain_step
            if peer in ("torch-compile", "torch-compile-bf16"):
                step = torch.compile(step)

            def fn(s):
                with torch.no_grad():
                    return step(state, s[0], s[1], torch.sigmoid)

            def outputs(_):
                return {f"W{k}": to_host(w) for k, w in enumerate(state["W"])} | \
                       {f"b{k}": to_host(b) for k, b in enumerate(state["b"])}
    elif peer == "numpy":
        sets, sync = batches, backend.sync
        state = {"W": [w.astype(np.float32) for w in weights], "b": [b.astype(np.float32) for b in biases]}

        def fn(s):
            with np.errstate(over="ignore"):
                return plain_step(state, s[0], s[1], numpy_sigmoid)

        def outputs(_):
            return {f"W{k}": w for k, w in enumerate(state["W"])} | {f"b{k}": b for k, b in enumerate(state["b"])}
    else:  # gpu_backprop: ours-numpy, cupy-unfused (fused=False), ours-fused, ours-graph (captured), ours-tf32, ours-bf16
        device = "cpu" if peer == "ours-numpy" else "cuda"
        model = MLP(widths, device=device, dtype="float32", seed=0, fused=peer != "cupy-unfused", precision=precision)
        model.set_params({f"W{k}": w for k, w in enumerate(weights)} | {f"b{k}": b for k, b in enumerate(biases)})
        sets = [(model.device.asarray(x), model.device.asarray(y)) for x, y in batches]
        sync = backend.sync
        if peer == "ours-graph":  # the batch copied into fixed buffers, then the captured step replayed
            from gpu_backprop.train import StepRunner

            stream = model.device.stream()
            xb, yb = backend.xp.empty_like(sets[0][0]), backend.xp.empty_like(sets[0][1])
            runner = StepRunner(lambda batch: lambda: model.train_step(xb, yb, LR), model.device.capture)
            sync = stream.synchronize

            def fn(s):
                with stream:
                    xb[...] = s[0]
                    yb[...] = s[1]
                    runner(xb.shape[0])
                return model
        else:
            def fn(s):
                return model.train_step(s[0], s[1], LR)

        def outputs(_):
            return model.get_params()

    if peer in BF16_STEP_PEERS + OURS_BF16_STEP_PEERS:  # the update itself is checked, within bf16's rounding
        reference, outputs = update_check(weights, biases, reference, outputs)
        tol = BF16_STEP_TOL
    else:  # the parameters, and the update itself (which the parameters' tolerance cannot see)
        params_tol = 5e-3 if peer == "ours-tf32" else 1e-4
        update_reference, updates = update_check(weights, biases, reference, outputs)
        tol = {k: params_tol for k in reference} | {f"d{k}": STEP_UPDATE_TOL for k in update_reference}
        reference = reference | {f"d{k}": v for k, v in update_reference.items()}
        outputs = (lambda result, params=outputs: params(result)
                   | {f"d{k}": v for k, v in updates(result).items()})
    run_benchmark(benchmark, backend=backend, ceilings=ceilings, peer=peer, group="train_step", size=size,
                  fn=fn, sets=sets, sync=sync, reference=reference, outputs=outputs, work=(0, flops),
                  budget=budget, tol=tol, precision=precision,
                  use_events=False)  # whole steps: host clock, launch costs included


DIGITS_PEERS = ("ours-numpy", "cupy-unfused", "ours-fused", "ours-graph", "torch-autograd", "torch-eager")


@pytest.mark.parametrize("peer", DIGITS_PEERS)
def test_digits_epoch(benchmark, backend, ceilings, budget, peer):
    """The main job's epoch: digits, 64-64-10 sigmoid, MSE, B=32 (45 steps, the last one short)."""
    reason = peer_reason(peer if peer != "torch-autograd" else "torch-eager", backend, "small")
    if reason:
        pytest.skip(reason)
    from gpu_backprop import data
    from gpu_backprop.train import batch_slices

    ds = data.digits(seed=0)
    widths, lr = [64, 64, 10], 2.0
    X, Y = ds.X_train, np.eye(10)[ds.y_train]
    slices = batch_slices(len(X), 32)
    model = MLP(widths, device="cpu", dtype="float64", seed=0)
    weights, biases = list(model.weights), list(model.biases)
    state64 = {"W": [w.copy() for w in weights], "b": [b.copy() for b in biases]}
    for rows in slices:
        plain_step(state64, X[rows], Y[rows], numpy_sigmoid, lr)
    reference = {f"W{k}": w for k, w in enumerate(state64["W"])} | {f"b{k}": b for k, b in enumerate(state64["b"])}

    if peer.startswith("torch"):
        torch = torch_or_skip(backend)
        device = torch_device(backend)
        tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)  # noqa: E731
        batches = [(tensor(X[r]), tensor(Y[r])) for r in slices]
        sync = torch_sync(torch, backend)
        if peer == "torch-autograd":
            torch_step, params = torch_autograd(torch, tensor, weights, biases, lr)

            def epoch(_):
                for x, y in batches:
                    torch_step(x, y)
                return params(None)
        else:
            state = {"W": [tensor(w) for w in weights], "b": [tensor(b) for b in biases]}

            def epoch(_):
                with torch.no_grad():
                    for x, y in batches:
                        plain_step(state, x, y, torch.sigmoid, lr)
                return {f"W{k}": to_host(w) for k, w in enumerate(state["W"])} | \
                       {f"b{k}": to_host(b) for k, b in enumerate(state["b"])}
        outputs = None  # epoch() returns the host arrays itself
    else:  # as fit runs it: gather, step and bookkeeping on the device, one graph per step for ours-graph
        from gpu_backprop.train import Trainer

        device = "cpu" if peer == "ours-numpy" else "cuda"
        model = MLP(widths, device=device, dtype="float32", seed=0, fused=peer != "cupy-unfused")
        trainer = Trainer(model, X, ds.y_train, batch_size=32, lr=lr, shuffle=False, graphs=peer == "ours-graph")
        stream = model.device.stream()
        sync = stream.synchronize if device == "cuda" else backend.sync

        def epoch(_):
            with stream:
                trainer.epoch()
            return model

        outputs = lambda m: m.get_params()  # noqa: E731
    # the first epoch (from the initial weights) is checked, the following ones timed as training goes on
    run_benchmark(benchmark, backend=backend, ceilings=ceilings, peer=peer, group="digits_epoch", size="64-64-10 B=32",
                  fn=epoch, sets=[None], sync=sync, reference=reference, outputs=outputs,
                  work=(0, sum(step_flops(widths, r.stop - r.start) for r in slices)), budget=budget, tol=1e-3,
                  use_events=False)
