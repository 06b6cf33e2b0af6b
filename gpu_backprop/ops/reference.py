"""The math of every fused kernel, written once over an array module.

With NumPy this is the CPU path and the oracle the CUDA kernels are tested
against; with CuPy it is the unfused GPU path (``fused=False``): elementwise
kernels + cuBLAS + ``sum``, the sequence the fused kernels replace.

Every operation writes into buffers the caller owns, so a training step
allocates nothing after its first call (scratch space is cached per shape).
Names follow MATH.md: ``o`` a layer's input (the previous output), ``W``
(n_in x n_out), ``delta`` the error at a layer's pre-activation.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from . import activations as act
from . import blas

# splitmix64's finaliser (Steele et al., 2014), shared with kernels/batch.cu.
MIX_ADD, MIX_MUL1, MIX_MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix64(xp: Any, z: Any) -> Any:
    """splitmix64's finaliser over a uint64 array, in place. A bijection of the
    64-bit integers (an odd multiplier and ``z ^ (z >> s)`` are both invertible),
    so distinct inputs give distinct outputs."""
    u64 = xp.uint64
    z += u64(MIX_ADD)
    z ^= z >> u64(30)
    z *= u64(MIX_MUL1)
    z ^= z >> u64(27)
    z *= u64(MIX_MUL2)
    z ^= z >> u64(31)
    return z


def mixed_key(key: int) -> int:
    """mix64 of one integer in [0, 2^64), in Python integers (a NumPy call per operation
    would cost more than the epoch's whole sort)."""
    key = int(key)
    if not 0 <= key < 2**64:
        raise ValueError(f"key: expected an integer in [0, 2**64), got {key!r}")
    mask = 2**64 - 1
    z = (key + MIX_ADD) & mask
    z = ((z ^ (z >> 30)) * MIX_MUL1) & mask
    z = ((z ^ (z >> 27)) * MIX_MUL2) & mask
    return z ^ (z >> 31)


class Propagate(NamedTuple):
    """Arguments of ``ops.propagate`` for ``ops.backward``."""

    delta: Any
    W: Any
    o: Any
    activation: str
    out: Any


RULE_MODES = ("gradient", "sgd", "momentum", "nesterov", "adam")  # kernels/update.cuh UpdateMode, in order


class Rule(NamedTuple):
    """What a weight update does with the gradient G summed over the batch (kernels/update.cuh,
    twin: :func:`apply_rule`). ``mode``: "gradient" (write G), "sgd", "momentum", "nesterov" or
    "adam"; ``step``: lr / batch for the SGD modes, lr for Adam; ``l2``: G + l2 W on the weights
    (scikit-learn's alpha); ``scale``: Adam's 1 / batch; ``decay``: AdamW's lr * weight_decay on
    the weights; ``t``: Adam's (1,) int64 step count on the device, this step included."""

    mode: str = "sgd"
    step: float = 0.0
    momentum: float = 0.0
    l2: float = 0.0
    scale: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    decay: float = 0.0
    t: Any = None

    @property
    def states(self) -> int:
        """Arrays of state per parameter: 0, 1 (velocity) or 2 (Adam's moments)."""
        return {"momentum": 1, "nesterov": 1, "adam": 2}.get(self.mode, 0)


class Update(NamedTuple):
    """Arguments of ``ops.sgd_update`` (or with ``rule``, of ``ops.update``) for ``ops.backward``:
    an SGD step of ``step`` with ``momentum``, or any other ``rule`` (then step and momentum are
    unused); vel_w, vel_b: velocity or Adam's first moment; sq_w, sq_b: Adam's second."""

    o: Any
    delta: Any
    W: Any
    b: Any
    step: float
    momentum: float = 0.0
    vel_w: Any = None
    vel_b: Any = None
    rule: Rule | None = None
    sq_w: Any = None
    sq_b: Any = None

    @property
    def effective_rule(self) -> Rule:
        if self.rule is not None:
            return self.rule
        return Rule("momentum" if self.momentum else "sgd", self.step, self.momentum)


RULE_CHUNK = 262144  # elements of one chunk of ArrayOps.apply_rule_summed on the host (1 MB in float32)


def apply_rule(xp: Any, rule: Rule, p: Any, grad: Any, m: Any = None, v: Any = None, weight: bool = True) -> None:
    """The twin of kernels/update.cuh: p (and its state m, v) updated in place from the summed
    gradient ``grad``, which it may overwrite. Each coefficient is rounded to p's dtype first,
    as the kernels receive them."""
    dt = p.dtype.type
    if rule.mode == "gradient":
        p[...] = grad
        return
    if weight and rule.l2:
        grad += dt(rule.l2) * p
    if rule.mode == "sgd":
        grad *= dt(rule.step)
        p -= grad
    elif rule.mode in ("momentum", "nesterov"):
        grad *= dt(rule.step)
        m *= dt(rule.momentum)
        m -= grad
        if rule.mode == "momentum":
            p += m
        else:
            p += dt(rule.momentum) * m - grad
    elif rule.mode == "adam":
        # on the device, from the device's count: no host read (a CUDA graph can hold it)
        t = rule.t.astype(np.float64)
        b1, b2 = float(dt(rule.beta1)), float(dt(rule.beta2))
        step_t = (float(dt(rule.step)) * xp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)).astype(p.dtype)
        grad *= dt(rule.scale)
        m *= dt(b1)
        m += (1 - dt(b1)) * grad
        v *= dt(b2)
        v += (1 - dt(b2)) * (grad * grad)
        if weight and rule.decay:
            p -= dt(rule.decay) * p
        p -= step_t * m / (xp.sqrt(v) + dt(rule.eps))
    else:
        raise ValueError(f"rule.mode: expected one of {', '.join(RULE_MODES)}, got {rule.mode!r}")


class Gather(NamedTuple):
    """Where ``ops.forward`` gathers its input o from first (``ops.gather_batch``): o = the rows
    order[step * stride + r] of X, and ``yb`` = the same rows of Y."""

    X: Any
    Y: Any
    order: Any
    step: Any
    stride: int
    yb: Any


class Record(NamedTuple):
    """The fit loop's per-step record (``ops.finish_batch``): losses[step] = the loss,
    correct[step] = rows predicted right (if ``count``), step += 1."""

    losses: Any
    correct: Any
    step: Any
    count: bool


class Output(NamedTuple):
    """The output layer's error for ``ops.backward``: delta = that of ``output_delta``, loss into
    ``loss_out``, and with ``record`` the fit loop's step record of that loss."""

    y_hat: Any
    y: Any
    activation: str
    loss: str
    loss_out: Any
    record: Record | None = None


def check_rule(rule: Rule, vel_w: Any, vel_b: Any, sq_w: Any, sq_b: Any) -> None:
    """A rule's mode is known, its coefficients finite, and the state it keeps is given."""
    if not isinstance(rule, Rule) or rule.mode not in RULE_MODES:
        raise ValueError(f"rule.mode: expected one of {', '.join(RULE_MODES)}, got {getattr(rule, 'mode', rule)!r}")
    for name in ("step", "momentum", "l2", "scale", "beta1", "beta2", "eps", "decay"):
        value = getattr(rule, name)
        if not (isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value)):
            raise ValueError(f"rule.{name}: expected a finite number, got {value!r}")
    needed = [("vel_w", vel_w), ("vel_b", vel_b)][:2 * min(rule.states, 1)] + \
        ([("sq_w", sq_w), ("sq_b", sq_b)] if rule.states == 2 else [])
    for name, array in needed:
        if array is None:
            raise ValueError(f"{name}: required by the {rule.mode} rule")
    if rule.mode == "adam" and (rule.t is None or getattr(rule.t, "shape", None) != (1,)):
        raise ValueError("rule.t: Adam needs its step count, a (1,) int64 array")


def check_backward(propagate: Propagate | None, updates: Sequence[Update], output: Output | None) -> None:
    """What one ``ops.backward`` launch can hold: at most two updates; an output delta needs a
    propagation or an update to start from."""
    if len(updates) > 2:
        raise ValueError(f"updates: at most 2 per launch, got {len(updates)}")
    if output is not None and propagate is None and not updates:
        raise ValueError("output: needs a propagation or an update whose delta it computes")


Operands = Sequence[tuple[str, Any]]


def same_view(a: Any, b: Any) -> bool:
    """a and b are the same elements: same start, shape, strides and dtype (an in-place operand)."""
    from .launch import address

    return a is b or (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
                      and address(a) == address(b))


def check_disjoint(xp: Any, writes: Operands, reads: Operands) -> None:
    """A launch's contract: no array it writes shares memory with another array it writes or
    reads. Its blocks run in any order and at once, so a write can land before another block
    has read what it overwrote (a delta written over the error the other tiles still read gave
    rows of dW off by 78% in a probe). ``writes``, ``reads``: (argument name, array), None
    skipped; an operand updated in place (W, b of an update) is listed once, as a write. Raises
    ValueError naming both arguments."""
    writes = [(n, a) for n, a in writes if a is not None]
    operands = writes + [(n, a) for n, a in reads if a is not None]
    for i, (name, written) in enumerate(writes):
        for other, array in operands[i + 1:]:
            if written.size and array.size and xp.may_share_memory(written, array):
                what = "writes" if any(array is a for _, a in writes) else "reads"
                raise ValueError(f"{name} and {other} overlap in memory: one launch writes {name} and "
                                 f"{what} {other}, and its blocks run in any order; pass separate arrays")


def backward_operands(propagate: Propagate | None, updates: Sequence[Update],
                      output: Output | None) -> tuple[list, list]:
    """(writes, reads) of one ``ops.backward`` call, named as its arguments; the delta the output
    delta computes counts as written (it is, inside the launch, before its part reads it)."""
    writes, reads = [], []
    from_output = None
    if output is not None:
        from_output = propagate.delta if propagate is not None else updates[0].delta
        what = "propagate.delta" if propagate is not None else "updates[0].delta"
        writes += [(what, from_output), ("output.loss_out", output.loss_out)]
        reads += [("output.y_hat", output.y_hat), ("output.y", output.y)]
        if output.record is not None:
            writes += [("output.record.losses", output.record.losses),
                       ("output.record.correct", output.record.correct), ("output.record.step", output.record.step)]
    if propagate is not None:
        writes.append(("propagate.out", propagate.out))
        reads += [("propagate.W", propagate.W), ("propagate.o", propagate.o)]
        if propagate.delta is not from_output:
            reads.append(("propagate.delta", propagate.delta))
    for i, u in enumerate(updates):
        writes += [(f"updates[{i}].{name}", getattr(u, name)) for name in ("W", "b", "vel_w", "vel_b", "sq_w", "sq_b")]
        reads.append((f"updates[{i}].o", u.o))
        if u.delta is not from_output:
            reads.append((f"updates[{i}].delta", u.delta))
    return writes, reads


class ArrayOps:
    """Unfused reference operations over ``xp`` (numpy or cupy)."""

    fused = False

    def __init__(self, xp: Any, special: Any):
        self.xp = xp
        self.special = special
        self._scratch_cache: dict = {}
        self._checked: dict = {}  # backward calls whose operands were checked (see _check_backward)

    def gemm_paths(self) -> dict[str, str]:
        """The path each GEMM shape ran on ("kind|dtype|MxNxK": path); the CPU and unfused paths
        have one way only: empty."""
        return {}

    def storage_dtype(self, dtype: Any) -> np.dtype:
        """The dtype these operations keep a model of ``dtype``'s activations (but the output
        layer's) and deltas in: ``dtype`` itself, but uint16 bf16 bits for precision="bf16" on
        CUDA (ops/cuda.py)."""
        return np.dtype(dtype)

    def as_stored(self, x: Any) -> Any:
        """An input batch as these operations store activations (storage_dtype): ``x`` itself, or
        (precision="bf16" on CUDA) rounded into a buffer of theirs, valid until the next call."""
        return x

    def _check_once(self, objects: tuple, check: Callable[[], None]) -> None:
        """Run ``check`` unless it passed for these very objects: a training step passes the same
        arrays and NamedTuples every time (held here, so their ids are not reused; an array's
        memory and a NamedTuple's members never change), and the checks cost more than a
        small step's arithmetic."""
        ids = tuple(map(id, objects))
        if ids in self._checked:  # the objects held under these ids are alive: they are these objects
            return
        check()
        if len(self._checked) > 256:
            self._checked.clear()
        self._checked[ids] = objects

    def _check_backward(self, propagate: Propagate | None, updates: Sequence[Update],
                        output: Output | None) -> None:
        """check_backward and check_disjoint for one backward call."""
        if (id(propagate), *map(id, updates), id(output)) in self._checked:  # the hot path: inline
            return

        def check() -> None:
            check_backward(propagate, updates, output)
            check_disjoint(self.xp, *backward_operands(propagate, updates, output))
        self._check_once((propagate, *updates, output), check)

    def _scratch(self, tag: str, shape: tuple, dtype: Any, zeroed: bool = False) -> Any:
        """A buffer kept per (tag, shape, dtype); ``zeroed``: zero when first made (for counters
        the kernels leave at zero again)."""
        key = (tag, tuple(shape), dtype)
        buf = self._scratch_cache.get(key)
        if buf is None:
            make = self.xp.zeros if zeroed else self.xp.empty
            buf = self._scratch_cache[key] = make(shape, dtype=dtype)
        return buf

    def _second_scratch(self, activation: str, tag: str, like: Any) -> Any:
        """tanh's derivative, (1-o)(1+o), needs a buffer for its second factor; the others none."""
        return self._scratch(tag, like.shape, like.dtype) if activation == "tanh" else None

    # -- GEMM ---------------------------------------------------------------
    def gemm(self, a: Any, b: Any, out: Any, *, alpha: float = 1.0, beta: float = 0.0,
             trans_a: bool = False, trans_b: bool = False) -> Any:
        """out = alpha * op(a) @ op(b) + beta * out."""
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        if alpha == 1.0 and beta == 0.0:
            return self.xp.matmul(a, b, out=out)
        product = self._scratch("gemm", out.shape, out.dtype)
        self.xp.matmul(a, b, out=product)
        if alpha != 1.0:
            product *= alpha
        if beta == 0.0:
            out[...] = product
        else:
            if beta != 1.0:
                out *= beta
            out += product
        return out

    # -- bf16 ---------------------------------------------------------------
    def matmul_bf16(self, a: Any, b: Any, out: Any, *, trans_a: bool = False, trans_b: bool = False) -> Any:
        """out = op(a) op(b) over bfloat16 operands given as their bits (uint16; op(a) M x K, op(b)
        K x N), into float32 out (M x N): the products of a training step in bf16 storage (a^T b
        the weight gradient o^T delta, a b the forward o W, a b^T the propagation delta W^T).
        Each bf16 widens to float32 exactly (its bits above 16 zero bits); the sum is float32
        (here BLAS's order; on the GPU the tensor cores', ops.cuda)."""
        self._check_matmul_bf16(a, b, out, trans_a, trans_b)
        xp = self.xp
        widen = lambda h: (h.astype(xp.uint32) << xp.uint32(16)).view(xp.float32)  # noqa: E731
        return self.gemm(widen(a), widen(b), out, trans_a=trans_a, trans_b=trans_b)

    def _check_matmul_bf16(self, a: Any, b: Any, out: Any, trans_a: bool, trans_b: bool) -> tuple[int, int, int]:
        """(K, M, N) of matmul_bf16's operands, or an error naming the one that does not fit."""
        for name, array, dtype in (("a", a, np.uint16), ("b", b, np.uint16), ("out", out, np.float32)):
            if getattr(array, "ndim", None) != 2:
                raise ValueError(f"{name}: expected a 2-D array, got {getattr(array, 'shape', type(array).__name__)}")
            if array.dtype != dtype:
                raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name} "
                                f"({'bf16 bits' if dtype == np.uint16 else 'float sums'}), got {array.dtype}")
        M, K = a.shape[::-1] if trans_a else a.shape
        N = b.shape[0] if trans_b else b.shape[1]
        if (b.shape[1] if trans_b else b.shape[0]) != K:
            raise ValueError(f"b: expected op(b) to have {K} rows (op(a)'s columns), got shape {tuple(b.shape)}"
                             f"{' (transposed)' if trans_b else ''}")
        if tuple(out.shape) != (M, N):
            raise ValueError(f"out: expected shape {(M, N)}, got {tuple(out.shape)}")
        check_disjoint(self.xp, [("out", out)], [("a", a), ("b", b)])
        return K, M, N

    # -- forward ------------------------------------------------------------
    def forward(self, o: Any, W: Any, b: Any, activation: str, out: Any, gather: Gather | None = None) -> Any:
        """out = f(o W + b); with ``gather``, o (and gather.yb) are first gathered into."""
        self._check_forward(o, W, b, out, gather)
        if gather is not None:
            self._gather(*gather[:5], o, gather.yb)
        self.gemm(o, W, out)
        out += b
        return act.activate(self.xp, self.special, activation, out, out)

    def _check_forward(self, o: Any, W: Any, b: Any, out: Any, gather: Gather | None) -> None:
        if (id(o), id(W), id(b), id(out), id(gather)) in self._checked:  # the hot path: inline (0.2 us)
            return

        def check() -> None:
            if gather is None:
                check_disjoint(self.xp, [("out", out)], [("o", o), ("W", W), ("b", b)])
            else:
                check_disjoint(self.xp, [("out", out), ("o", o), ("gather.yb", gather.yb)],
                               [("W", W), ("b", b), ("gather.X", gather.X), ("gather.Y", gather.Y),
                                ("gather.order", gather.order), ("gather.step", gather.step)])
        self._check_once((o, W, b, out, gather), check)

    def _check_output_delta(self, y_hat: Any, y: Any, out: Any, loss_out: Any) -> None:
        check_disjoint(self.xp, [("out", out), ("loss_out", loss_out)], [("y_hat", y_hat), ("y", y)])

    def _check_hidden_delta(self, err: Any, o: Any, out: Any) -> None:
        """``out`` may be ``err`` itself (in place: each element read and written by one thread)."""
        check_disjoint(self.xp, [("out", out)], [("o", o)] + ([] if same_view(out, err) else [("err", err)]))

    def _check_propagate(self, delta: Any, W: Any, o: Any, out: Any) -> None:
        check_disjoint(self.xp, [("out", out)], [("delta", delta), ("W", W), ("o", o)])

    def _check_update(self, o: Any, delta: Any, W: Any, b: Any, vel_w: Any, vel_b: Any, o_next: Any,
                      delta_out: Any, names: tuple[str, str] = ("W", "b"), sq_w: Any = None, sq_b: Any = None) -> None:
        """A weight gradient's operands: ``names`` of what it writes (grad_w, grad_b without an update)."""
        check_disjoint(self.xp, [(names[0], W), (names[1], b), ("vel_w", vel_w), ("vel_b", vel_b), ("sq_w", sq_w),
                                 ("sq_b", sq_b), ("delta_out", delta_out)],
                       [("o", o), ("delta", delta), ("o_next", o_next)])

    def _check_gather_disjoint(self, X: Any, Y: Any, order: Any, step: Any, xb: Any, yb: Any) -> None:
        self._check_once((X, Y, order, step, xb, yb), lambda: check_disjoint(
            self.xp, [("xb", xb), ("yb", yb)], [("X", X), ("Y", Y), ("order", order), ("step", step)]))

    # -- deltas -------------------------------------------------------------
    def output_delta(self, y_hat: Any, y: Any, activation: str, loss: str, out: Any,
                     loss_out: Any) -> Any:
        """delta at the output and, in ``loss_out[0]``, the loss summed over the batch.

        mse:           delta = (y_hat - y) * f'(y_hat),  loss = 1/2 sum (y_hat - y)^2
        cross_entropy: delta = y_hat - y (softmax),      loss = -sum y log y_hat
        """
        self._check_output_delta(y_hat, y, out, loss_out)
        return self._output_delta(y_hat, y, activation, loss, out, loss_out)

    def _output_delta(self, y_hat: Any, y: Any, activation: str, loss: str, out: Any, loss_out: Any) -> Any:
        xp = self.xp
        xp.subtract(y_hat, y, out=out)
        scratch = self._scratch("delta", out.shape, out.dtype)
        # The loss sums in float64 (pairwise): a float32 dot over 2^26 terms drifts by ~1e-4.
        if loss == "mse":
            xp.square(out, out=scratch)
            loss_out[0] = 0.5 * scratch.sum(dtype=xp.float64)
            act.multiply_derivative(xp, activation, y_hat, out, scratch, self._second_scratch(activation, "delta2", out))
        else:
            xp.maximum(y_hat, xp.finfo(out.dtype).tiny, out=scratch)
            xp.log(scratch, out=scratch)
            scratch *= y
            loss_out[0] = -scratch.sum(dtype=xp.float64)
        return out

    def hidden_delta(self, err: Any, o: Any, activation: str, out: Any) -> Any:
        """delta = err * f'(o), f' from the saved output; ``out`` may be ``err`` itself (in place)."""
        self._check_hidden_delta(err, o, out)
        if out is err:
            return act.multiply_derivative(self.xp, activation, o, out, self._scratch("delta", out.shape, out.dtype),
                                          self._second_scratch(activation, "delta2", out))
        act.derivative(self.xp, activation, o, out, self._second_scratch(activation, "delta2", out))  # f'(o) into out
        out *= err
        return out

    # -- backward GEMMs -----------------------------------------------------
    def propagate(self, delta: Any, W: Any, o: Any, activation: str, out: Any) -> Any:
        """The error one layer down, times its derivative: out = (delta W^T) * f'(o)."""
        self._check_propagate(delta, W, o, out)
        return self._propagate(delta, W, o, activation, out)

    def _propagate(self, delta: Any, W: Any, o: Any, activation: str, out: Any) -> Any:
        self.gemm(delta, W, out, trans_b=True)
        return act.multiply_derivative(self.xp, activation, o, out, self._scratch("propagate", out.shape, out.dtype),
                                          self._second_scratch(activation, "propagate2", out))

    def _prologue(self, delta: Any, o_next: Any, activation: str, delta_out: Any) -> Any:
        """With ``o_next`` given, ``delta`` holds err and the true delta is err * f'(o_next)."""
        if o_next is None:
            return delta
        if delta_out is None:
            raise ValueError("delta_out: required when o_next is given (the prologue writes delta)")
        return self.hidden_delta(delta, o_next, activation, delta_out)

    def weight_grad(self, o: Any, delta: Any, grad_w: Any, grad_b: Any, *, o_next: Any = None,
                    activation: str = "identity", delta_out: Any = None) -> tuple[Any, Any]:
        """grad_w = o^T delta, grad_b = sum over the batch of delta (sums, not means)."""
        self._check_update(o, delta, grad_w, grad_b, None, None, o_next, delta_out, ("grad_w", "grad_b"))
        delta = self._prologue(delta, o_next, activation, delta_out)
        self.gemm(o, delta, grad_w, trans_a=True)
        delta.sum(axis=0, out=grad_b)
        return grad_w, grad_b

    def sgd_update(self, o: Any, delta: Any, W: Any, b: Any, step: float, momentum: float = 0.0,
                   vel_w: Any = None, vel_b: Any = None, *, o_next: Any = None,
                   activation: str = "identity", delta_out: Any = None) -> None:
        """The SGD step from this layer's gradient, in place; ``step`` = lr / batch size.

        momentum == 0: W -= step * o^T delta,  b -= step * sum(delta)
        momentum  > 0: v = momentum v - step * o^T delta;  W += v  (same for b)
        """
        self.update(o, delta, W, b, Rule("momentum" if momentum else "sgd", step, momentum), vel_w, vel_b,
                    o_next=o_next, activation=activation, delta_out=delta_out)

    def update(self, o: Any, delta: Any, W: Any, b: Any, rule: Rule, vel_w: Any = None, vel_b: Any = None,
               sq_w: Any = None, sq_b: Any = None, *, o_next: Any = None, activation: str = "identity",
               delta_out: Any = None) -> None:
        """W and b updated in place by ``rule`` (:class:`Rule`) from this layer's summed gradient
        (o^T delta, column sums of delta); vel_*: velocity or Adam's first moment, sq_*: Adam's
        second, each where the rule keeps it."""
        self._check_update(o, delta, W, b, vel_w, vel_b, o_next, delta_out, sq_w=sq_w, sq_b=sq_b)
        check_rule(rule, vel_w, vel_b, sq_w, sq_b)
        delta = self._prologue(delta, o_next, activation, delta_out)
        self._update(Update(o, delta, W, b, rule.step, rule.momentum, vel_w, vel_b, rule, sq_w, sq_b))

    def _update(self, u: Update) -> None:
        rule = u.effective_rule
        if rule.mode == "gradient":  # straight into the gradient buffers (a data-parallel step's)
            self.gemm(u.o, u.delta, u.W, trans_a=True)
            u.delta.sum(axis=0, out=u.b)
            return
        if rule.mode in ("sgd", "momentum") and not rule.l2:
            self._sgd_update(u.o, u.delta, u.W, u.b, rule.step, rule.momentum, u.vel_w, u.vel_b)
            return
        grad_w = self._scratch("grad_w", u.W.shape, u.W.dtype)
        grad_b = self._scratch("grad_b", u.b.shape, u.b.dtype)
        self.gemm(u.o, u.delta, grad_w, trans_a=True)
        u.delta.sum(axis=0, out=grad_b)
        apply_rule(self.xp, rule, u.W, grad_w, u.vel_w, u.sq_w, weight=True)
        apply_rule(self.xp, rule, u.b, grad_b, u.vel_b, u.sq_b, weight=False)

    def _sgd_update(self, o: Any, delta: Any, W: Any, b: Any, step: float, momentum: float, vel_w: Any,
                    vel_b: Any) -> None:
        """SGD and momentum without L2: the GEMM's alpha and beta do the update."""
        grad_b = self._scratch("grad_b", b.shape, b.dtype)
        delta.sum(axis=0, out=grad_b)
        if momentum:
            self.gemm(o, delta, vel_w, alpha=-step, beta=momentum, trans_a=True)
            W += vel_w
            vel_b *= momentum
            grad_b *= step
            vel_b -= grad_b
            b += vel_b
        else:
            self.gemm(o, delta, W, alpha=-step, beta=1.0, trans_a=True)
            grad_b *= step
            b -= grad_b

    def backward(self, propagate: Propagate | None, updates: Sequence[Update], output: Output | None = None) -> None:
        """One step of the backward pass: an error propagation and the updates of up to two
        other layers, which share no memory that any of them writes (the model's
        ``backward_schedule`` pairs them), so they may run in any order, or at once: on
        CUDA they are one launch. With ``output``, the delta they start from (the
        propagation's, else the first update's) is first computed as the output delta,
        with the loss (and its step record); on CUDA inside the same launch. Here, one
        after another."""
        self._check_backward(propagate, updates, output)
        if output is not None:
            delta = propagate.delta if propagate is not None else updates[0].delta
            self._output_delta(output.y_hat, output.y, output.activation, output.loss, delta, output.loss_out)
            if output.record is not None:
                self.finish_batch(output.y_hat, output.y, output.loss_out, *output.record)
        if propagate is not None:
            self._propagate(*propagate)
        for update in updates:
            self._update(update)

    def apply_rule(self, rule: Rule, p: Any, grad: Any, m: Any = None, v: Any = None, weight: bool = True) -> None:
        """p (and its state m, v) updated by ``rule`` from a gradient already summed (overwritten):
        the update of a data-parallel step, after the all-reduce (:func:`apply_rule`)."""
        check_rule(rule, m, m, v, v)
        apply_rule(self.xp, rule, p, grad, m, v, weight)

    def apply_rule_summed(self, rule: Rule, p: Any, sources: Sequence[Any], m: Any = None, v: Any = None,
                          weight: bool = True) -> None:
        """p (and m, v, arrays of p's shape) updated by ``rule`` from the sum of ``sources``, taken
        in rank order (every rank's gradient of these elements, in memory the ranks share), which
        are only read: on the host RULE_CHUNK elements at a time, so the sum is a temporary that
        stays in L2 rather than an array of its own (the same arithmetic element by element)."""
        check_rule(rule, m, m, v, v)
        if not sources:
            raise ValueError("sources: expected at least one gradient")
        if self.xp is not np or not all(a is None or a.flags.c_contiguous for a in (p, m, v)):
            grad = sources[0].copy()
            for more in sources[1:]:
                grad += more
            apply_rule(self.xp, rule, p, grad, m, v, weight)
            return
        flat = [a if a is None else a.reshape(-1) for a in (p, m, v)]
        sources = [s.reshape(-1) for s in sources]
        total = self._scratch("rule_sum", (min(RULE_CHUNK, p.size),), p.dtype)
        for lo in range(0, p.size, RULE_CHUNK):
            hi = min(lo + RULE_CHUNK, p.size)
            grad = total[:hi - lo]
            if len(sources) == 1:
                grad[...] = sources[0][lo:hi]
            else:
                np.add(sources[0][lo:hi], sources[1][lo:hi], out=grad)
            for more in sources[2:]:
                grad += more[lo:hi]
            apply_rule(np, rule, flat[0][lo:hi], grad, *(a if a is None else a[lo:hi] for a in flat[1:]),
                       weight=weight)

    # -- the fit loop's bookkeeping (kernels/batch.cu) ----------------------
    def count_step(self, t: Any) -> None:
        """t += 1: Adam's step count, on the device (read by the step's updates)."""
        self.xp.add(t, 1, out=t)

    def shuffle_keys(self, key: int, keys: Any, step: Any) -> None:
        """keys[i] = mix64(i + mix64(key)) (uint64, wrapping); step[0] = 0. The key is mixed
        first so that nearby keys (0, 1, ...) give unrelated orders."""
        xp = self.xp
        xp.add(self._arange(keys.shape[0]).view(xp.uint64), xp.uint64(mixed_key(key)), out=keys)
        mix64(xp, keys)
        step[...] = 0

    def shuffle_epoch(self, order: Any, step: Any, key: int, shuffle: bool = True) -> None:
        """Start an epoch on the device: ``order`` = the permutation of the rows drawn from
        ``key`` (0..n-1 when not ``shuffle``), the step counter = 0.

        The order is argsort(mix64(i + mix64(key))): mix64 is a bijection, so no two keys tie and
        the sort has one answer, the same on every device and array module.
        """
        if not shuffle:
            order[...] = self._arange(order.shape[0])
            step[...] = 0
            return
        keys = self._scratch("keys", order.shape, self.xp.uint64)
        self.shuffle_keys(key, keys, step)
        order[...] = self.xp.argsort(keys, kind="stable")  # unique keys: any sort agrees; radix is fastest

    def gather_batch(self, X: Any, Y: Any, order: Any, step: Any, stride: int, xb: Any, yb: Any) -> None:
        """xb, yb = the rows order[step * stride + r] of X, Y; ``step`` is a (1,) int64 counter
        on the device, so a captured step needs no host work to find its batch."""
        self._check_gather_disjoint(X, Y, order, step, xb, yb)
        self._gather(X, Y, order, step, stride, xb, yb)

    def _gather(self, X: Any, Y: Any, order: Any, step: Any, stride: int, xb: Any, yb: Any) -> None:
        xp, batch = self.xp, xb.shape[0]
        rows = self._scratch("rows", (batch,), xp.int64)
        xp.add(self._arange(batch), step * stride, out=rows)
        index = self._scratch("index", (batch,), xp.int64)
        xp.take(order, rows, out=index)
        xp.take(X, index, axis=0, out=xb)
        xp.take(Y, index, axis=0, out=yb)

    def finish_batch(self, y_hat: Any, yb: Any, loss: Any, losses: Any, correct: Any, step: Any,
                     count: bool) -> None:
        """losses[step] = loss; correct[step] = rows predicted right (if ``count``); step += 1."""
        losses[step] = loss[0]
        if count:
            correct[step] = (self._labels(y_hat) == self._labels(yb)).sum()
        step += 1

    def _labels(self, y: Any) -> Any:
        """argmax per row (ties to the lowest index); one output unit: y > 1/2."""
        return act.predicted_class(self.xp, y)

    def _arange(self, n: int) -> Any:
        key = ("arange", n)
        if key not in self._scratch_cache:
            self._scratch_cache[key] = self.xp.arange(n, dtype=self.xp.int64)
        return self._scratch_cache[key]

    def capturable(self) -> contextlib.AbstractContextManager:
        """Context in which every launch can be captured into a CUDA graph (CudaOps: no cuBLAS);
        on the host nothing to restrict."""
        return contextlib.nullcontext()

    def capture_blocker(self, output: str) -> str:
        """Why a training step on these operations, ending in ``output``, cannot be captured
        into a CUDA graph; "" when it can. A capture cannot allocate, and CuPy's kernels
        allocate their temporaries: every kernel of the unfused path, and the softmax that
        the fused operations run through CuPy after their GEMM."""
        if not self.fused:
            return "the unfused path"
        return "softmax" if output == "softmax" else ""


class NumpyOps(ArrayOps):
    """The CPU path: the reference math with every GEMM through SciPy's BLAS."""

    def __init__(self) -> None:
        import scipy.special

        super().__init__(np, scipy.special)

    def gemm(self, a: Any, b: Any, out: Any, *, alpha: float = 1.0, beta: float = 0.0,
             trans_a: bool = False, trans_b: bool = False) -> Any:
        return blas.gemm(a, b, out, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)

    def gather_batch(self, X: Any, Y: Any, order: Any, step: Any, stride: int, xb: Any, yb: Any) -> None:
        """As ArrayOps.gather_batch; on the host the counter is read directly (no index arithmetic arrays)."""
        self._check_gather_disjoint(X, Y, order, step, xb, yb)
        self._gather(X, Y, order, step, stride, xb, yb)

    def _gather(self, X: Any, Y: Any, order: Any, step: Any, stride: int, xb: Any, yb: Any) -> None:
        first = int(step[0]) * stride
        index = order[first:first + xb.shape[0]]
        self.xp.take(X, index, axis=0, out=xb)
        self.xp.take(Y, index, axis=0, out=yb)

    def finish_batch(self, y_hat: Any, yb: Any, loss: Any, losses: Any, correct: Any, step: Any,
                     count: bool) -> None:
        s = int(step[0])
        losses[s] = loss[0]
        if count:
            correct[s] = np.count_nonzero(self._labels(y_hat) == self._labels(yb))
        step[0] = s + 1

    def forward(self, o: Any, W: Any, b: Any, activation: str, out: Any, gather: Gather | None = None) -> Any:
        """out = f(o W + b) with the bias added by the GEMM (beta = 1): one pass fewer."""
        self._check_forward(o, W, b, out, gather)
        if gather is not None:
            self._gather(*gather[:5], o, gather.yb)
        out[...] = b
        blas.gemm(o, W, out, beta=1.0)
        return act.activate(self.xp, self.special, activation, out, out)
