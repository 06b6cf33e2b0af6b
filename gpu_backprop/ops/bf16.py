"""precision="bf16" on the CPU: bfloat16 mixed precision emulated in NumPy.

The semantics the GPU kernels are to implement (issue 13, item 3), so that this twin
reproduces them up to float32 summation order:

- the parameters the update rule updates (saved in the model file) are float32 *master*
  weights and biases; each weight matrix has a bf16 copy, refreshed after every update of it
  (on the GPU by the update epilogue), that the forward and propagation GEMMs read;
- every GEMM takes bf16 operands (activations, the input X, deltas, the weights' copy) and
  sums in float32; the bias, the activation and the derivatives are applied in float32;
- the activations ``o`` are stored rounded to bf16 after each layer's activation, each delta
  after it is formed (the output delta; the propagation's epilogue ``(delta W^T) f'(o)``);
  the weight gradient ``o^T delta`` reads those, ``db`` sums the stored delta in float32;
- the loss, ``db`` and the update run in float32 (the loss sums in float64).

The bf16 values are kept in float32 arrays whose low 16 bits are zero (exactly the values
the device's bf16 buffers hold), so the GEMMs are SciPy's sgemm over them.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np

from . import activations as act
from . import blas
from .reference import Gather, NumpyOps, Update

BF16_NAN = 0x7FFF0000  # cvt.rn.bf16.f32's canonical NaN (0x7fff), as a float32's bits


def round_bf16(x: Any, out: Any = None) -> np.ndarray:
    """float32 ``x`` rounded to bfloat16, as float32 values (low 16 bits zero): round to
    nearest, ties to even, on the bit pattern (add 0x7FFF plus the lowest kept bit, clear the
    low 16 bits), as ``cvt.rn.bf16.f32`` (kernels/mma.cuh ``bf16_round``) does: subnormals
    kept (no flush), values from halfway past the largest bf16 on to the infinity, NaN the
    canonical NaN 0x7FFF. ``out`` may be ``x`` (in place)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}")
    if out is None:
        out = np.empty_like(x)
    elif out.dtype != np.float32 or out.shape != x.shape:
        raise ValueError(f"out: expected a float32 array of shape {x.shape}, got {out.dtype} {out.shape}")
    u = x.view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)  # before out (maybe x) is written
    half = u >> np.uint32(16)
    half &= np.uint32(1)
    half += np.uint32(0x7FFF)
    r = out.view(np.uint32)
    np.add(u, half, out=r)  # no carry out of 32 bits: |x| <= Inf plus 0x8000 stays below 2^32
    r &= np.uint32(0xFFFF0000)
    if nan.any():
        r[nan] = BF16_NAN
    return out


def round_bf16_in_place(xp: Any, x: Any) -> Any:
    """:func:`round_bf16` of a float32 array of any array module (CuPy on the GPU), in place:
    the same bits, in the module's elementwise operations."""
    u = x.view(xp.uint32)
    rounded = (u + ((u >> xp.uint32(16)) & xp.uint32(1)) + xp.uint32(0x7FFF)) & xp.uint32(0xFFFF0000)
    u[...] = xp.where((u & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000), xp.uint32(BF16_NAN), rounded)
    return x


def bf16_bits(x: Any) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float32 ``x`` rounded as :func:`round_bf16`."""
    return (round_bf16(x).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def bf16_values(bits: Any) -> Any:
    """bf16 bit patterns (uint16, as the CUDA path stores activations and deltas) as the float32
    values they are, exactly; a float32 array as it is (the CPU twin's storage of the same values)."""
    if bits.dtype == np.float32:
        return bits
    if bits.dtype != np.uint16:
        raise TypeError(f"bits: expected uint16 bf16 bits or float32, got {bits.dtype}")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class WeightCopies:
    """The weights' bf16 copies that the GEMMs read, one per weight array, held weakly (a model's
    arrays going away drop theirs): made from the master when first asked for (``make(W)``),
    rewritten in place from it (``write(W, copy)``) after an update outside the kernels' epilogues
    and when the parameters were written (so a captured CUDA graph that reads a copy stays valid).
    Keyed by the array object: another view of the same memory has a copy of its own, which updates
    through W do not refresh (the model passes its weight arrays themselves)."""

    def __init__(self, make: Callable[[Any], Any], write: Callable[[Any, Any], None]):
        self._make, self._write = make, write
        self._copies: dict[int, tuple[Any, Any]] = {}

    def get(self, W: Any) -> Any:
        """W's copy, made when there is none."""
        copy = self.find(W)
        if copy is None:
            copy = self._make(W)
            key = id(W)
            self._copies[key] = (weakref.ref(W, lambda _, key=key: self._copies.pop(key, None)), copy)
        return copy

    def find(self, W: Any) -> Any:
        """W's copy, or None."""
        entry = self._copies.get(id(W))
        return entry[1] if entry is not None and entry[0]() is W else None

    def refresh(self, W: Any) -> None:
        """W's copy (if it has one) written again from W."""
        copy = self.find(W)
        if copy is not None:
            self._write(W, copy)

    def refresh_all(self) -> None:
        for ref, copy in list(self._copies.values()):
            W = ref()
            if W is not None:
                self._write(W, copy)


class Bf16Ops(NumpyOps):
    """The CPU path with precision="bf16": NumpyOps with the roundings of the module's
    docstring, the weights' bf16 copies kept in a :class:`WeightCopies` (made when first read,
    refreshed after each update and by :meth:`params_written`). The activations and deltas are
    float32 arrays holding bf16 values (where the CUDA path stores their bits as uint16)."""

    precision = "bf16"

    def __init__(self) -> None:
        super().__init__()
        self._copies = WeightCopies(round_bf16, lambda W, copy: round_bf16(W, out=copy))

    # -- the weights' bf16 copies ---------------------------------------------------
    def bf16_weights(self, W: np.ndarray) -> np.ndarray:
        """The bf16 copy of W that the GEMMs read (made from W when there is none)."""
        return self._copies.get(W)

    def _refresh(self, W: np.ndarray) -> None:
        """After W was updated: its copy rounded again from it (the update epilogue's work)."""
        self._copies.refresh(W)

    def params_written(self) -> None:
        """Parameters were written other than by these ops' updates (set_params, a restore):
        every copy is rounded again from its master."""
        self._copies.refresh_all()

    def _activations(self, o: np.ndarray) -> np.ndarray:
        """o as a GEMM operand: rounded to bf16 (the stored activations already are, so this only
        changes the input X, which comes in as float32)."""
        return round_bf16(o, out=self._scratch("bf16_o", o.shape, np.float32))

    # -- forward -------------------------------------------------------------------
    def forward(self, o: Any, W: Any, b: Any, activation: str, out: Any, gather: Gather | None = None) -> Any:
        """out = bf16(f(bf16(o) bf16(W) + b)): the product summed in float32, bias and activation
        in float32, the activation stored rounded."""
        self._check_forward(o, W, b, out, gather)
        if gather is not None:
            self._gather(*gather[:5], o, gather.yb)
        out[...] = b
        blas.gemm(self._activations(o), self.bf16_weights(W), out, beta=1.0)
        act.activate(self.xp, self.special, activation, out, out)
        return round_bf16(out, out=out)

    # -- deltas --------------------------------------------------------------------
    def _output_delta(self, y_hat: Any, y: Any, activation: str, loss: str, out: Any, loss_out: Any) -> Any:
        """The output delta from the stored (bf16) y_hat in float32, stored rounded; the loss
        from the same y_hat, summed in float64."""
        super()._output_delta(y_hat, y, activation, loss, out, loss_out)
        return round_bf16(out, out=out)

    def hidden_delta(self, err: Any, o: Any, activation: str, out: Any) -> Any:
        """delta = err * f'(o) in float32, stored rounded."""
        super().hidden_delta(err, o, activation, out)
        return round_bf16(out, out=out)

    def _propagate(self, delta: Any, W: Any, o: Any, activation: str, out: Any) -> Any:
        """out = bf16((delta bf16(W)^T) * f'(o)): the stored delta and the weights' copy, summed in
        float32; the derivative's product in float32, the delta stored rounded."""
        blas.gemm(delta, self.bf16_weights(W), out, trans_b=True)
        act.multiply_derivative(self.xp, activation, o, out, self._scratch("propagate", out.shape, out.dtype),
                                self._second_scratch(activation, "propagate2", out))
        return round_bf16(out, out=out)

    # -- weight gradients and updates ------------------------------------------------
    def weight_grad(self, o: Any, delta: Any, grad_w: Any, grad_b: Any, *, o_next: Any = None,
                    activation: str = "identity", delta_out: Any = None) -> tuple[Any, Any]:
        """grad_w = bf16(o)^T delta (float32 sums), grad_b = the column sums of delta (float32)."""
        self._check_update(o, delta, grad_w, grad_b, None, None, o_next, delta_out, ("grad_w", "grad_b"))
        return super().weight_grad(self._activations(o), delta, grad_w, grad_b, o_next=o_next,
                                   activation=activation, delta_out=delta_out)

    def _update(self, u: Update) -> None:
        """The update of the float32 master W, b from bf16(o)^T delta and the column sums of
        delta, then W's bf16 copy refreshed."""
        super()._update(u._replace(o=self._activations(u.o)))
        self._refresh(u.W)

    def apply_rule(self, rule: Any, p: Any, grad: Any, m: Any = None, v: Any = None, weight: bool = True) -> None:
        """A data-parallel step's update (after the all-reduce) of a master parameter, then its
        bf16 copy refreshed (biases have none)."""
        super().apply_rule(rule, p, grad, m, v, weight)
        self._refresh(p)


def is_bf16(*arrays: np.ndarray) -> bool:
    """Every float32 array holds bf16 values only (the low 16 bits of every element zero)."""
    return all(not np.any(np.asarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF)) for a in arrays)
