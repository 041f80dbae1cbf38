"""Fake quantization with a straight-through estimator (SSQL, REFERENCE.md §5).

The quantizers round values onto a b-bit grid and back to float, so a float network computes
what its b-bit deployment would, while the gradient passes the rounding unchanged:

* ``fake_quant_weight(kernel, bits)``: symmetric, per OUTPUT channel (the last axis of a Keras
  Dense (in, out) or Conv2D (k, k, in, out) kernel)::

      s = max(|min_c|, |max_c|) / ((2^b - 1) / 2)
      q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),   w_hat = q s

  so the largest weight of a channel may be clipped (b = 2, w = [1.5, -1.5, 0.2]: s = 1,
  q = [1, -2, 0]).
* ``fake_quant_activation(x, bits, low, high)``: asymmetric, per tensor, with a zero point::

      s = (high - low) / (2^b - 1),   zp = -round(low / s)
      q = clamp(round(x / s) + zp, 0, 2^b - 1),   x_hat = (q - zp) s

Rounding is half-to-even (``keras.ops.round``, as ``torch.round``). The straight-through
estimator replaces the derivative of round by 1; the clamp keeps its own derivative, so the
gradient is 1 inside the clamp range and 0 outside.

``bits`` may be a Python int or a scalar tensor (a run-time value of a compiled step: one
program serves every bit-width, DESIGN contract 6). ``bits >= 32`` means float: the input is
returned unchanged (with its gradient), so a run-time value also switches quantization off.

The reference's two quirks (REFERENCE.md §5 "(flag)"), decided:

* The weight observer is not detached in the reference: the gradient also flows through the
  scale (through the largest |w| of each channel). Kept (``detach_scale=False`` is the
  default), since that is what SSQL trained with; ``detach_scale=True`` gives the plain STE.
  The activation observer sees ``x.detach()`` in the reference and here.
* The reference returns the WHOLE tensor unquantized when any channel's scale is zero. Here
  only that channel is left as it is (a weight channel whose scale is zero is all zeros, so
  that is exact), and an activation whose range is empty (high == low: a constant tensor) is
  returned unchanged. One dead channel no longer switches off a layer's quantization.
"""
from __future__ import annotations

import numbers

from keras import ops

FLOAT_BITS = 32
WEIGHT_BITS = tuple(range(2, 9))        # what a weight quantizer accepts (and 32: float)
ACTIVATION_BITS = tuple(range(2, 9))    # likewise for activations (SSQL samples 4..8)


def check_bits(bits, what="bit-width", valid=WEIGHT_BITS, allow_float=True):
    """A Python bit-width checked against ``valid`` (or 32 for float, with ``allow_float``);
    tensors pass through (their values are drawn and checked on the host, ``BitSampler``)."""
    allowed = f"{min(valid)}..{max(valid)}" + (f" or {FLOAT_BITS} (float)" if allow_float
                                               else "")
    if isinstance(bits, numbers.Number) and not isinstance(bits, bool):
        if bits != int(bits) or (int(bits) not in valid
                                 and not (allow_float and int(bits) == FLOAT_BITS)):
            raise ValueError(f"{what} {bits!r} is not supported; valid: {allowed}")
        return int(bits)
    if isinstance(bits, (str, bool)) or bits is None:
        raise ValueError(f"{what} {bits!r} is not supported; valid: {allowed}")
    return bits


def round_ste(x):
    """round(x) (half to even) forward; identity gradient."""
    return x + ops.stop_gradient(ops.round(x) - x)


def clamped_round_ste(x, low, high):
    """clamp(round(x), low, high) forward; gradient 1 where round(x) lies in [low, high]
    (bounds included, as torch.clamp's), 0 elsewhere. Written out rather than as
    ``clip(round_ste(x))``: the derivative of a clip AT its bound differs between backends
    (JAX splits it, 0.5), and a value that rounds onto the bound is inside the range."""
    rounded = ops.round(x)
    inside = ops.logical_and(rounded >= low, rounded <= high)
    clipped = ops.stop_gradient(ops.clip(rounded, low, high))
    return ops.where(inside, x + ops.stop_gradient(rounded - x), clipped)


def _levels(bits, dtype):
    return ops.power(ops.cast(2.0, dtype), ops.cast(bits, dtype))


def _is_float(bits):
    return isinstance(bits, numbers.Number) and bits >= FLOAT_BITS


def weight_scale(kernel, bits, detach_scale=False):
    """Per-output-channel scale of ``fake_quant_weight`` (shape: the last axis of kernel)."""
    axes = tuple(range(len(kernel.shape) - 1))
    bound = ops.max(ops.abs(kernel), axis=axes)
    if detach_scale:
        bound = ops.stop_gradient(bound)
    return bound / ((_levels(bits, kernel.dtype) - 1.0) / 2.0)


def fake_quant_weight(kernel, bits, detach_scale=False):
    """Symmetric per-output-channel fake quantization of ``kernel`` (..., out) at ``bits``
    (2..8, or a run-time scalar tensor; >= 32: unchanged). See the module docstring."""
    bits = check_bits(bits, "weight bit-width")
    if _is_float(bits):
        return kernel
    kernel = ops.convert_to_tensor(kernel)   # a Variable (an unsliced kernel) -> its value
    levels = _levels(bits, kernel.dtype)
    scale = weight_scale(kernel, bits, detach_scale)
    nonzero = scale > 0
    safe = ops.where(nonzero, scale, ops.ones_like(scale))
    scaled = kernel / safe
    # The largest |w| of a channel lands exactly on a rounding tie, +-(2^b - 1) / 2, and a
    # division that is off by one ulp (XLA's vectorised CPU division is) would round it the
    # other way: -max must give -2^(b-1), as in exact arithmetic. Pinned, gradient kept.
    bound = ops.max(ops.abs(kernel), axis=tuple(range(len(kernel.shape) - 1)))
    tie = ops.sign(kernel) * ((levels - 1.0) / 2.0)
    scaled = ops.where(ops.abs(kernel) == bound, scaled + ops.stop_gradient(tie - scaled), scaled)
    q = clamped_round_ste(scaled, -levels / 2.0, levels / 2.0 - 1.0)
    out = ops.where(nonzero, q * safe, kernel)
    if isinstance(bits, numbers.Number):
        return out
    return ops.where(ops.cast(bits, kernel.dtype) >= FLOAT_BITS, kernel, out)


def activation_scale_zero_point(low, high, bits, dtype="float32"):
    """(scale, zero point) of ``fake_quant_activation`` for the range [low, high]."""
    low = ops.cast(low, dtype)
    high = ops.cast(high, dtype)
    scale = (high - low) / (_levels(bits, dtype) - 1.0)
    safe = ops.where(scale > 0, scale, ops.ones_like(scale))
    return scale, -ops.round(low / safe)


def check_range(low, high):
    """A range given as numbers must have low <= high (a clear error otherwise)."""
    if isinstance(low, numbers.Number) and isinstance(high, numbers.Number) and low > high:
        raise ValueError(f"activation range [{low}, {high}]: the low end exceeds the high end "
                         "(a range is [min, max] with min <= max)")


def fake_quant_activation(x, bits, low, high):
    """Asymmetric per-tensor fake quantization of ``x`` onto the b-bit grid of [low, high]
    (numbers or scalar tensors, not differentiated: the observer's range). An empty range
    (high == low) returns x unchanged; ``bits >= 32`` too."""
    bits = check_bits(bits, "activation bit-width", ACTIVATION_BITS)
    check_range(low, high)
    if _is_float(bits):
        return x
    low = ops.stop_gradient(ops.cast(low, x.dtype))
    high = ops.stop_gradient(ops.cast(high, x.dtype))
    levels = _levels(bits, x.dtype)
    scale, zero_point = activation_scale_zero_point(low, high, bits, x.dtype)
    nonempty = scale > 0
    safe = ops.where(nonempty, scale, ops.ones_like(scale))
    q = clamped_round_ste(x / safe + zero_point, 0.0, levels - 1.0)
    out = (q - zero_point) * safe
    keep = ops.logical_not(nonempty)
    if not isinstance(bits, numbers.Number):
        keep = ops.logical_or(keep, ops.cast(bits, x.dtype) >= FLOAT_BITS)
    return ops.where(keep, x, out)


def batch_range(x):
    """(min, max) of x over every element, detached: the current batch's min/max observer."""
    x = ops.stop_gradient(x)
    return ops.min(x), ops.max(x)
