"""Which bit-widths a forward runs at, and the activation observers.

A quantized forward is an ordinary forward inside ``quantization_scope(QuantConfig(...))``:
the elastic layers (``elastic/``) read the scope and fake-quantize their weights and the
activations their family places a quantizer on; outside a scope nothing is quantized and no
quantization op is traced. Backbones open the scope from their ``quant=`` argument
(``backbone(x, subnet=spec, quant=QuantConfig(4, 4))``), so bit-widths reach every layer
without being threaded through every call signature.

``QuantConfig(weight_bits, activation_bits, ranges)``:

* the bit-widths: Python ints (2..8, or 32 for float) or run-time scalar tensors (a compiled
  step or forward then serves every bit-width with one program);
* ``ranges``: where activation quantizers take their [low, high] from:

  - "batch": the current tensor's min / max (detached): SSQL's training observer;
  - "calibrated": the range stored in the quantizer (non-trainable state, set by
    calibration): evaluation, PTQ and presets, where one image's output must not depend on
    the rest of its batch;
  - "observe": calibration: nothing is quantized, every quantizer widens its stored range to
    include the tensor it sees (``reset_ranges`` first). Run eagerly (``calibrate`` in
    ``eval/ptq.py``): a compiled JAX program would drop the assignments.
  - None (the default): "batch" in a training forward, "calibrated" otherwise (the backbone
    resolves it from ``training``).

Each quantizing layer has a bits policy, ``bits="auto"`` (the scope's bit-width) or a fixed
int (8: the patch embedding, the ResNet stem, the SimSiam projector's weights): a fixed
policy still follows the scope's float setting (bits >= 32 gives float everywhere).
"""
from __future__ import annotations

import contextlib
import numbers
import threading
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from poa_keras.quantization.fake import (ACTIVATION_BITS, FLOAT_BITS, WEIGHT_BITS, batch_range,
                                         check_bits, fake_quant_activation, fake_quant_weight)

RANGE_MODES = ("batch", "calibrated", "observe")
_STATE = threading.local()


@dataclass(frozen=True)
class QuantConfig:
    """The bit-widths of a quantized forward (see the module docstring)."""

    weight_bits: Any = 8
    activation_bits: Any = 8
    ranges: str | None = None

    def __post_init__(self):
        check_bits(self.weight_bits, "weight bit-width", WEIGHT_BITS)
        check_bits(self.activation_bits, "activation bit-width", ACTIVATION_BITS)
        if self.ranges is not None and self.ranges not in RANGE_MODES:
            raise ValueError(f"unknown activation range mode {self.ranges!r}; valid: "
                             f"{RANGE_MODES} or None (batch when training, else calibrated)")

    def resolved(self, training):
        """This config with ``ranges`` decided from ``training`` when it is None."""
        if self.ranges is not None:
            return self
        return QuantConfig(self.weight_bits, self.activation_bits,
                           "batch" if training else "calibrated")

    @classmethod
    def coerce(cls, quant):
        """None, a QuantConfig, a (weight_bits, activation_bits) pair or a "W/A" string
        (e.g. "4/4", "32" for float) -> QuantConfig or None."""
        if quant is None or isinstance(quant, cls):
            return quant
        if isinstance(quant, str):
            return cls(*parse_bits_pair(quant))
        if isinstance(quant, (tuple, list)) and len(quant) == 2:
            return cls(*quant)
        raise TypeError(f"quant must be None, a QuantConfig, a (weight_bits, activation_bits) "
                        f"pair or a 'W/A' string such as '4/4', got {quant!r}")


def parse_bits_pair(text):
    """"W/A" (e.g. "4/4", "2/4") or "32" (float) -> (weight_bits, activation_bits), checked:
    weights 2..8, activations 2..8, or 32 alone for float."""
    text = str(text).strip()
    parts = text.split("/")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = None
    if values is None or len(values) not in (1, 2) or (len(values) == 1
                                                      and values[0] != FLOAT_BITS):
        raise ValueError(f"malformed bit-width pair {text!r}: write W/A with weights in "
                         f"{min(WEIGHT_BITS)}..{max(WEIGHT_BITS)} and activations in "
                         f"{min(ACTIVATION_BITS)}..{max(ACTIVATION_BITS)} (e.g. 4/4, 2/4), "
                         f"or {FLOAT_BITS} for float")
    if len(values) == 1:
        return FLOAT_BITS, FLOAT_BITS
    w, a = values
    check_bits(w, f"weight bit-width in {text!r}", WEIGHT_BITS)
    check_bits(a, f"activation bit-width in {text!r}", ACTIVATION_BITS)
    return w, a


def format_bits_pair(weight_bits, activation_bits):
    """(32, 32) -> "32", (4, 4) -> "4/4"."""
    if int(weight_bits) >= FLOAT_BITS and int(activation_bits) >= FLOAT_BITS:
        return str(FLOAT_BITS)
    return f"{int(weight_bits)}/{int(activation_bits)}"


def current_quant():
    """The QuantConfig of the innermost ``quantization_scope``, or None (float)."""
    return getattr(_STATE, "config", None)


@contextlib.contextmanager
def quantization_scope(quant):
    """Runs the forwards inside at ``quant`` (a QuantConfig or what ``coerce`` takes; None:
    float, also inside an outer scope)."""
    quant = QuantConfig.coerce(quant)
    previous = getattr(_STATE, "config", None)
    _STATE.config = quant
    try:
        yield quant
    finally:
        _STATE.config = previous


def policy_bits(policy, scope_bits):
    """The bit-width a layer with ``policy`` ("auto" or a fixed int) uses in a scope whose
    bit-width is ``scope_bits``: the scope's, or the fixed one unless the scope is float."""
    if policy == "auto":
        return scope_bits
    if isinstance(scope_bits, numbers.Number):
        return FLOAT_BITS if scope_bits >= FLOAT_BITS else policy
    return ops.where(ops.cast(scope_bits, "float32") >= FLOAT_BITS,
                     ops.cast(FLOAT_BITS, "float32"), ops.cast(policy, "float32"))


def check_policy(policy, what):
    if policy == "auto" or policy is None:
        return policy
    return check_bits(policy, what)


def quantize_kernel(kernel, policy, owner=None):
    """``kernel`` fake-quantized per output channel at the scope's weight bit-width under the
    layer's ``policy`` ("auto", a fixed int, or None: never); unchanged outside a scope."""
    quant = current_quant()
    if quant is None or policy is None or quant.ranges == "observe":
        return kernel
    record_use(owner, "weight", kernel)
    return fake_quant_weight(kernel, policy_bits(policy, quant.weight_bits))


def record_use(owner, kind, value):
    """Inside ``recording()``: notes (layer, kind, shape) of what a quantizer saw."""
    log = getattr(_STATE, "records", None)
    if log is not None and owner is not None:
        log.append((owner, kind, tuple(value.shape)))


@contextlib.contextmanager
def recording():
    """Collects (layer, "weight" | "activation", shape) for every quantizer that runs inside
    (used to count bytes and BitOPs from one symbolic forward)."""
    previous = getattr(_STATE, "records", None)
    _STATE.records = []
    try:
        yield _STATE.records
    finally:
        _STATE.records = previous


@keras.saving.register_keras_serializable(package="poa_keras")
class ActivationQuantizer(keras.layers.Layer):
    """Asymmetric per-tensor fake quantization of the tensor it is called on, at the scope's
    activation bit-width (``bits="auto"``) or a fixed one; identity outside a scope.

    Holds ``range`` = [low, high], non-trainable (saved with the weights, so a preset carries
    its calibration). [0, 0] means "not calibrated": ``is_calibrated`` is False, and a
    "calibrated" forward with it leaves the tensor in float (an empty range)."""

    def __init__(self, bits="auto", **kwargs):
        super().__init__(**kwargs)
        self.bits = check_policy(bits, f"{self.name}: activation bits")

    def build(self, input_shape=None):
        self.range = self.add_weight(shape=(2,), initializer="zeros", trainable=False,
                                     name="range")

    def load_own_variables(self, store):
        # A weights file written before quantizers existed has no entry for this layer: the
        # range stays uncalibrated (such presets hold float networks and load unchanged).
        if len(store.keys()) == 0:
            return
        super().load_own_variables(store)

    def reset_range(self):
        """Empties the stored range before an observation pass."""
        self.range.assign(np.array([np.inf, -np.inf], np.float32))

    def set_range(self, low, high):
        low, high = float(low), float(high)
        if not (np.isfinite(low) and np.isfinite(high)) or low > high:
            raise ValueError(f"{self.name}: activation range [{low}, {high}] must be finite "
                             "with low <= high")
        self.range.assign(np.array([low, high], np.float32))

    @property
    def is_calibrated(self):
        low, high = (float(v) for v in ops.convert_to_numpy(self.range))
        return bool(np.isfinite(low) and np.isfinite(high) and high > low)

    def call(self, x):
        quant = current_quant()
        if quant is None or self.bits is None:
            return x
        if quant.ranges == "observe":
            low, high = batch_range(x)
            old = self.range
            self.range.assign(ops.stack([ops.minimum(old[0], ops.cast(low, old.dtype)),
                                         ops.maximum(old[1], ops.cast(high, old.dtype))]))
            return x
        record_use(self, "activation", x)
        if quant.ranges == "calibrated":
            low, high = self.range[0], self.range[1]
        else:   # "batch" (None is resolved by the backbone; outside one, batch)
            low, high = batch_range(x)
        return fake_quant_activation(x, policy_bits(self.bits, quant.activation_bits),
                                     ops.cast(low, x.dtype), ops.cast(high, x.dtype))

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits)
        return config


def activation_quantizers(model):
    """Every ActivationQuantizer inside ``model``."""
    return [layer for layer in model._flatten_layers(include_self=True)
            if isinstance(layer, ActivationQuantizer)]
