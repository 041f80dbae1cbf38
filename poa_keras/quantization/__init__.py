"""Quantization: fake quantization for quantization-aware training and PTQ (SSQL), and Keras'
post-training int8 ``model.quantize`` for deployment.

Fake quantization (imports nothing above keras; the elastic layers apply it):

* ``fake.py``: the quantizers (symmetric per-channel weights, asymmetric per-tensor
  activations, straight-through estimator), pure functions on tensors;
* ``observer.py``: ``QuantConfig`` (the bit-widths of a forward), ``quantization_scope``, the
  ``ActivationQuantizer`` layer with its calibrated range;
* ``sampler.py``: ``BitSampler``, the host-side draw of a step's bit-widths.

Keras int8 (below):

* ``QUANTIZE_MODES``: the modes poa_keras checks end to end (export, presets): "int8".
* ``check_mode(mode)``: the mode checked against QUANTIZE_MODES (a clear error otherwise).
* ``quantize(model, mode)``: ``model.quantize(mode)`` with the mode checked and Keras' notes
  about layers without int8 kernels (norms, convolutions) silenced.
* ``quantization_mode(model)``: the mode a model was quantized with, or None.
* ``FrozenGCQuantize``: a mixin whose ``quantize`` runs Keras' with the garbage collector's
  existing objects frozen. Keras calls ``gc.collect()`` for every kernel it replaces; with
  TensorFlow, JAX and torch all imported each collection walks millions of objects (~0.5 s), so
  the demo ViT took 8 s to quantize and 0.03 s with the objects frozen. Backbones and
  ``ImageClassifier`` use it, so a plain ``model.quantize("int8")`` is fast.
"""
from __future__ import annotations

import contextlib
import gc
import warnings

QUANTIZE_MODES = ("int8",)


@contextlib.contextmanager
def _frozen_gc():
    """Objects that exist now are not scanned by the collections inside."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class FrozenGCQuantize:
    """Mixin for keras.Model subclasses: ``quantize`` with ``gc.freeze()`` around Keras'."""

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        with _frozen_gc():
            return super().quantize(mode, config=config, filters=filters, **kwargs)


def quantization_mode(model):
    """The mode (e.g. "int8") ``model`` was quantized with, or None for float weights."""
    modes = {getattr(layer, "quantization_mode", None) for layer in model._flatten_layers()}
    modes.discard(None)
    if len(modes) > 1:
        raise ValueError(f"{model.name} mixes quantization modes {sorted(modes)}")
    return modes.pop() if modes else None


def check_mode(mode, allow_none=False, what="quantization mode"):
    """``mode`` if it is one of QUANTIZE_MODES (or None, with ``allow_none``: float32), else a
    ValueError naming the valid ones (``what``: the argument's name in the message)."""
    if mode in QUANTIZE_MODES or (allow_none and mode is None):
        return mode
    valid = ", ".join(repr(m) for m in QUANTIZE_MODES)
    raise ValueError(f"unknown {what} {mode!r}; valid: "
                     + (f"None (float32) or {valid}" if allow_none else valid))


def quantize(model, mode):
    """``model.quantize(mode)`` in place, quietly; ``mode`` one of QUANTIZE_MODES."""
    check_mode(mode)
    with warnings.catch_warnings():
        # Keras names every layer without int8 kernels (norms, convolutions): expected.
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method.*")
        with _frozen_gc():   # also for models without the mixin
            model.quantize(mode)


from poa_keras.quantization.fake import (FLOAT_BITS, fake_quant_activation,  # noqa: E402
                                         fake_quant_weight)
from poa_keras.quantization.observer import (ActivationQuantizer, QuantConfig,  # noqa: E402
                                             activation_quantizers, current_quant,
                                             format_bits_pair, parse_bits_pair,
                                             quantization_scope)
from poa_keras.quantization.sampler import BitSampler  # noqa: E402

__all__ = ["ActivationQuantizer", "BitSampler", "FLOAT_BITS", "FrozenGCQuantize",
           "QUANTIZE_MODES", "QuantConfig", "activation_quantizers", "check_mode",
           "current_quant", "fake_quant_activation", "fake_quant_weight", "format_bits_pair",
           "parse_bits_pair", "quantization_mode", "quantization_scope", "quantize"]
