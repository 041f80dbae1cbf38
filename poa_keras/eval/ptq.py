"""Post-training quantization (PTQ) evaluation of a frozen backbone (SSQL's protocol).

    calibrate(model, x_train)                            # min/max of every activation quantizer
    feats = ptq_features(model, x_val, bits=(4, 4))      # features of the 4/4 fake-quantized net
    ptq_knn_eval(model, x_train, y_train, x_val, y_val, bits=["32", "8/8", "4/4"])
    ptq_linear_probe(model, x_train, y_train, x_val, y_val, bits="4/4")

The protocol (REFERENCE.md §5 "Evaluation"):

1. **Calibration** (``calibrate``): every activation quantizer's range is reset, then FLOAT
   forwards of the first ``num_images`` (SSQL: 100 for ImageNet) TRAIN images widen it to the
   min / max of the tensor it sees, over all of them. Weights need no calibration (their
   scale is the per-channel max |w|, computed in the forward). The ranges do not depend on
   the bit-width (a b-bit grid is laid over the same [min, max]), so ONE calibration serves
   every bit pair. The forwards run through ``backbones/compiled.py``'s
   ``calibration_forward`` (on JAX a jitted stateless call that returns the new ranges, which
   are written back; eager on TensorFlow and PyTorch, without autograd on PyTorch).
2. **Quantized features** (``ptq_features``): the calibrated model at (weight bits, activation
   bits), weights per output channel, activations per tensor with the stored ranges ("calibrated"
   mode: one image's output does not depend on the rest of its batch), through ONE compiled
   program per model and subnet for every bit pair (``compiled_forward(quantized=True)``).
3. **Classifiers in float** on the quantized features: k-NN (``ptq_knn_eval``) and the
   linear probe TRAINED on the quantized features (``ptq_linear_probe``, reusing
   ``eval.linear.train_linear_classifier``).

The ranges are state of the model (saved with its weights) and shared by every subnet of an
elastic teacher: a calibration holds for the subnet it ran (``calibrate(teacher, x,
subnet=spec)``); evaluating another subnet of the same teacher asks for its own calibration.
An extracted subnet (``teacher.extract(spec)``) starts uncalibrated ([0, 0]).

A quantizer whose calibration tensor was constant (min == max: an empty range, e.g. a ReLU
output that is zero on every calibration image) cannot lay a grid over it: it leaves its
tensor in float. That is warned about (naming the quantizers), not an error. A quantizer the
forward runs that was never calibrated is an error naming it.
"""
from __future__ import annotations

import numbers
import warnings
import weakref
from typing import NamedTuple

import numpy as np
from keras import ops

from poa_keras.backbones.compiled import calibration_forward, compiled_forward
from poa_keras.eval.features import (FROM_PRESET, extract_features, input_preprocessing,
                                     to_backbone_input)
from poa_keras.eval.knn import knn_classify
from poa_keras.eval.linear import DEFAULT_LEARNING_RATES, train_linear_classifier
from poa_keras.quantization import quantization_mode
from poa_keras.quantization.cost import quant_cost
from poa_keras.quantization.observer import (QuantConfig, activation_quantizers,
                                             format_bits_pair, parse_bits_pair)
from poa_keras.validation import check_int

#: The bit pairs of SSQL's PTQ table (FP, 8w8f, 5w5f, 4w4f, 3w3f, 2w4f).
SSQL_BITS = ("32", "8/8", "5/5", "4/4", "3/3", "2/4")
DEFAULT_CALIBRATION_IMAGES = 100

# model -> Calibration of its last ``calibrate`` (which subnet, which quantizers it observed)
_CALIBRATIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Calibration(NamedTuple):
    """What ``calibrate`` did: the subnet, the number of images, and the range of every
    activation quantizer the forward ran ({path: (low, high)}); ``constant`` lists those whose
    range came out empty (they run in float)."""

    subnet: object
    num_images: int
    ranges: dict
    constant: tuple


# ----- bit pairs ---------------------------------------------------------------------------

def parse_bits(bits):
    """One bit pair -> (weight_bits, activation_bits): a "W/A" string ("4/4", "32"), a
    (w, a) pair of ints or a ``QuantConfig`` with int widths; checked (2..8, or 32 alone)."""
    if isinstance(bits, QuantConfig):
        bits = (bits.weight_bits, bits.activation_bits)
    if isinstance(bits, str) or (isinstance(bits, numbers.Integral)
                                 and not isinstance(bits, bool)):
        return parse_bits_pair(str(bits))
    if isinstance(bits, (tuple, list)) and len(bits) == 2:
        w, a = bits
        if all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in (w, a)):
            return parse_bits_pair(f"{int(w)}/{int(a)}")
    raise ValueError(f"bit pair {bits!r} is not understood: give 'W/A' (e.g. '4/4', '2/4'), "
                     f"'32' (float) or a (weight_bits, activation_bits) pair; weights and "
                     f"activations in 2..8")


def parse_bits_list(bits):
    """Bit pairs as a list -> [(w, a), ...] (order kept, duplicates once). Takes a list of what
    ``parse_bits`` takes, or one string of pairs separated by commas ("32,8/8,4/4")."""
    if isinstance(bits, str):
        items = [b.strip() for b in bits.split(",")]
        if any(not b for b in items):
            raise ValueError(f"bits={bits!r} has an empty entry; write e.g. '32,8/8,4/4'")
    elif isinstance(bits, (tuple, list)) and len(bits) == 2 and all(
            isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in bits):
        items = [tuple(bits)]   # one (w, a) pair
    else:
        try:
            items = list(bits)
        except TypeError:
            raise ValueError(f"bits={bits!r} must be a list of bit pairs such as "
                             f"{list(SSQL_BITS)}") from None
    if not items:
        raise ValueError(f"bits is empty; give at least one pair, e.g. {list(SSQL_BITS)}")
    return list(dict.fromkeys(parse_bits(b) for b in items))


# ----- calibration -------------------------------------------------------------------------

def check_float_model(model, what="PTQ"):
    """A clear error for a model whose weights Keras already quantized (int8): fake
    quantization needs the float weights."""
    mode = quantization_mode(model)
    if mode is not None:
        raise ValueError(f"{model.name} is already quantized ({mode}): {what} needs the float "
                         "model (calibrate and fake-quantize it, then quantize a copy for "
                         "deployment)")


def _check_images(model, images, what, minimum=1):
    if images is None:
        raise ValueError(f"{what}: no images given; calibration needs images (SSQL: the first "
                         f"{DEFAULT_CALIBRATION_IMAGES} train images)")
    images = images if isinstance(images, np.ndarray) else np.asarray(images)
    channels = int(getattr(model, "in_channels", 3))
    gray = images.dtype == np.uint8 and channels == 3   # uint8 gray is repeated to RGB
    if images.ndim != 4 or images.shape[-1] not in ((channels, 1) if gray else (channels,)):
        raise ValueError(f"{what} must have shape (num_images, height, width, {channels}), got "
                         f"shape {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise TypeError(f"{what} must be uint8 (0..255) or float (already normalised), got "
                        f"dtype {images.dtype}")
    if images.shape[0] < minimum:
        raise ValueError(f"{what}: {images.shape[0]} images, fewer than the {minimum} asked for "
                         "(give more images or a smaller num_images)")
    return images


def calibrate(model, images, subnet=None, batch_size=32, num_images=DEFAULT_CALIBRATION_IMAGES,
              pixel_normalization=FROM_PRESET, warn=True):
    """Min/max calibration of every activation quantizer of ``model`` (``subnet``: which
    sub-network of an elastic teacher runs) on the first ``num_images`` of ``images``.

    Args:
      model: a float backbone with activation quantizers (an elastic teacher or an extracted
        subnet); not one Keras already quantized (int8).
      images: (N, H, W, C) uint8 (through the model's preprocessing) or float (preprocessed),
        N >= num_images: the TRAIN images, of which the first num_images are used (SSQL).
      subnet: None (the whole network), a spec, a tuple or a size name.
      batch_size: images per forward (the last batch is filled up with repeats of its own
        images, which leaves every min / max unchanged and keeps one batch shape).
      num_images: how many images (SSQL: 100 for ImageNet).
      pixel_normalization: for uint8 images, as ``extract_features``.
      warn: warn about quantizers whose range came out empty (they run in float).

    Returns:
      a ``Calibration``. The ranges are written into the model's quantizers; those the forward
      does not run are left uncalibrated ([0, 0]).

    Raises:
      ValueError: an int8 model, no quantizers, missing / too few / misshaped images, or
        non-finite (NaN, inf) activations at a quantizer (named).
    """
    check_float_model(model, "calibration")
    num_images = check_int(num_images, "num_images", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    images = _check_images(model, images, "calibration images", minimum=num_images)
    spec = model.resolve_subnet(subnet)
    quantizers = activation_quantizers(model)
    if not quantizers:
        raise ValueError(f"{model.name} has no activation quantizers to calibrate")
    observe = calibration_forward(model, spec)
    preprocessing = input_preprocessing(model, pixel_normalization)
    channels = getattr(model, "in_channels", 3)
    for quantizer in quantizers:
        quantizer.reset_range()
    _CALIBRATIONS.pop(model, None)
    images = images[:num_images]
    step = min(batch_size, num_images)
    for start in range(0, num_images, step):
        batch = images[start:start + step]
        if batch.shape[0] < step:
            batch = batch[np.arange(step) % batch.shape[0]]
        batch = to_backbone_input(batch, channels, preprocessing)
        observe(ops.convert_to_tensor(batch))
    # which quantizers this subnet runs: from the records of one forward (not from the values,
    # which NaN activations can leave anywhere, [inf, -inf] included)
    run = set(quant_cost(model, spec, tuple(batch.shape[1:3])).activation_quantizers)
    ranges, constant, broken = {}, [], []
    for quantizer in quantizers:
        low, high = (float(v) for v in ops.convert_to_numpy(quantizer.range.value))
        if quantizer.path not in run:
            quantizer.set_range(0.0, 0.0)
            continue
        if not (np.isfinite(low) and np.isfinite(high) and low <= high):
            broken.append(f"{quantizer.path} [{low}, {high}]")
            quantizer.set_range(0.0, 0.0)
            continue
        ranges[quantizer.path] = (low, high)
        if high <= low:
            constant.append(quantizer.path)
    if broken:
        raise ValueError(f"{model.name}: the float forward gave non-finite activations (NaN or "
                         f"inf) on the calibration images at {len(broken)} quantizer(s): "
                         f"{', '.join(broken)}; check the weights and the images")
    result = Calibration(spec, num_images, ranges, tuple(constant))
    _CALIBRATIONS[model] = result
    if constant and warn:
        warnings.warn(_constant_message(model, constant, num_images), stacklevel=2)
    return result


def _constant_message(model, paths, num_images=None):
    seen = f" on the {num_images} calibration images" if num_images else ""
    return (f"{model.name}: {len(paths)} activation quantizer(s) saw a constant tensor{seen} "
            f"(an empty range) and run in float: {', '.join(paths)}")


def check_calibrated(model, subnet=None, image_size=None, warn=True):
    """Raises ValueError naming the activation quantizers that the forward of ``subnet`` runs
    but that hold no calibrated range (or a calibration of another subnet); warns about those
    whose calibrated range is empty (constant tensors: they run in float)."""
    spec = model.resolve_subnet(subnet)
    used = quant_cost(model, spec, image_size).activation_quantizers
    known = _CALIBRATIONS.get(model)
    if known is not None and known.subnet != spec:
        raise ValueError(f"{model.name} was calibrated for subnet {known.subnet}, not {spec}: "
                         f"call calibrate(model, train_images, subnet={spec!r}) first")
    by_path = {q.path: q for q in activation_quantizers(model)}
    missing, constant = [], []
    for path in used:
        low, high = (float(v) for v in ops.convert_to_numpy(by_path[path].range.value))
        finite = np.isfinite(low) and np.isfinite(high)
        if known is not None and path in known.ranges and finite:
            if high <= low:
                constant.append(path)
        elif not finite or (low == 0.0 and high == 0.0) or high < low:
            missing.append(path)
        elif high == low:
            constant.append(path)
    if missing:
        raise ValueError(f"{model.name}: {len(missing)} activation quantizer(s) are not "
                         f"calibrated: {', '.join(missing)}; call calibrate(model, "
                         "train_images" + ("" if spec is None else f", subnet={spec!r}")
                         + ") first")
    if constant and warn and known is None:   # calibrate warned already
        warnings.warn(_constant_message(model, constant), stacklevel=3)
    return constant


# ----- quantized features ------------------------------------------------------------------

class _QuantizedSource:
    """Stands in for the backbone in ``extract_features``: its compiled forward is the
    quantized one at fixed bits (the program takes them as run-time values)."""

    def __init__(self, model, spec, weight_bits, activation_bits):
        self._model = model
        self._spec = spec
        self._bits = (weight_bits, activation_bits)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def compiled_forward(self, subnet=None, training=False):
        forward = compiled_forward(self._model, self._spec, quantized=True)
        w, a = self._bits
        return lambda images: forward(images, w, a)


def ptq_features(model, images, bits, subnet=None, batch_size=64, normalize=True,
                 pixel_normalization=FROM_PRESET, image_size=None):
    """CLS (pooled) features of the calibrated ``model`` fake-quantized at ``bits``.

    Args:
      model: a calibrated float backbone (``calibrate`` it first, for this subnet).
      images: as ``extract_features`` (uint8 through the model's preprocessing, or float).
      bits: "W/A" ("4/4", "2/4"), "32" (float), a (w, a) pair or a QuantConfig with ints.
      subnet: which sub-network (None: the whole network).
      batch_size, normalize, pixel_normalization: as ``extract_features``.
      image_size: the (H, W) the model sees, for finding which quantizers run (default: the
        model's ``image_size``).

    Returns:
      (N, D) float32 numpy. Every bit pair runs the same compiled program
      (``compiled_forward(model, subnet, quantized=True)``).
    """
    check_float_model(model)
    w, a = parse_bits(bits)
    spec = model.resolve_subnet(subnet)
    check_calibrated(model, spec, image_size)
    return extract_features(_QuantizedSource(model, spec, w, a), images, subnet=spec,
                            batch_size=batch_size, normalize=normalize,
                            pixel_normalization=pixel_normalization)


def _labels_and_classes(train_labels, val_labels, num_classes):
    train_y, val_y = np.asarray(train_labels), np.asarray(val_labels)
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    return train_y, val_y, check_int(num_classes, "num_classes", minimum=1)


def _prepare_ptq(model, train_images, train_labels, val_labels, bits, subnet, num_classes,
                 calibrate_first, num_calibration_images, batch_size, pixel_normalization):
    """What the PTQ evaluations share: checks, the bit pairs, the subnet, the labels, and (with
    ``calibrate_first``) one calibration on the first TRAIN images for every pair."""
    check_float_model(model)
    pairs = parse_bits_list(bits)
    labels = _labels_and_classes(train_labels, val_labels, num_classes)
    spec = model.resolve_subnet(subnet)
    if calibrate_first:
        calibrate(model, train_images, subnet=spec, num_images=num_calibration_images,
                  batch_size=min(batch_size, num_calibration_images),
                  pixel_normalization=pixel_normalization)
    return pairs, spec, labels


def ptq_knn_eval(model, train_images, train_labels, val_images, val_labels, bits=SSQL_BITS,
                 subnet=None, num_classes=None, ks=(20,), temperature=0.07, batch_size=64,
                 calibrate_first=True, num_calibration_images=DEFAULT_CALIBRATION_IMAGES,
                 knn_batch_size=None, pixel_normalization=FROM_PRESET):
    """Weighted k-NN (``knn_classify``) of the PTQ features at every pair of ``bits``.

    With ``calibrate_first`` (default) the model is first calibrated on the first
    ``num_calibration_images`` TRAIN images (SSQL), once for all pairs; otherwise its stored
    ranges are used (an error names the uncalibrated quantizers).

    Returns:
      {"W/A": knn_classify result} for every pair, e.g. result["4/4"][20]["top1"].
    """
    pairs, spec, (train_y, val_y, num_classes) = _prepare_ptq(
        model, train_images, train_labels, val_labels, bits, subnet, num_classes,
        calibrate_first, num_calibration_images, batch_size, pixel_normalization)
    kwargs = dict(subnet=spec, batch_size=batch_size, normalize=True,
                  pixel_normalization=pixel_normalization)
    results = {}
    for pair in pairs:
        bank = ptq_features(model, train_images, pair, **kwargs)
        queries = ptq_features(model, val_images, pair, **kwargs)
        results[format_bits_pair(*pair)] = knn_classify(
            bank, train_y, queries, val_y, num_classes, ks=ks, temperature=temperature,
            batch_size=knn_batch_size)
    return results


def ptq_linear_probe(model, train_images, train_labels, val_images, val_labels, bits="8/8",
                     subnet=None, num_classes=None, learning_rates=DEFAULT_LEARNING_RATES,
                     epochs=10, batch_size=256, feature_batch_size=64, calibrate_first=True,
                     num_calibration_images=DEFAULT_CALIBRATION_IMAGES,
                     pixel_normalization=FROM_PRESET, momentum=0.9, weight_decay=0.0, seed=0,
                     verbose=0):
    """Linear probe of the PTQ features (SSQL's protocol: the frozen backbone quantized at
    ``bits``, a float linear classifier TRAINED on its quantized CLS / pooled features and
    scored on the quantized validation features). The classifier grid is
    ``eval.linear.train_linear_classifier``'s; calibration as ``ptq_knn_eval``.

    Returns:
      {"W/A": train_linear_classifier result} for every pair of ``bits`` (one pair or a list).
    """
    pairs, spec, (train_y, val_y, num_classes) = _prepare_ptq(
        model, train_images, train_labels, val_labels, bits, subnet, num_classes,
        calibrate_first, num_calibration_images, feature_batch_size, pixel_normalization)
    kwargs = dict(subnet=spec, batch_size=feature_batch_size, normalize=False,
                  pixel_normalization=pixel_normalization)
    results = {}
    for pair in pairs:
        train = ptq_features(model, train_images, pair, **kwargs)
        val = ptq_features(model, val_images, pair, **kwargs)
        result = train_linear_classifier(train, train_y, val, val_y, num_classes,
                                         learning_rates=learning_rates, epochs=epochs,
                                         batch_size=batch_size, momentum=momentum,
                                         weight_decay=weight_decay, seed=seed, verbose=verbose)
        result.update(subnet=spec, bits=format_bits_pair(*pair))
        results[format_bits_pair(*pair)] = result
    return results


__all__ = ["Calibration", "DEFAULT_CALIBRATION_IMAGES", "SSQL_BITS", "calibrate",
           "check_calibrated", "check_float_model", "parse_bits", "parse_bits_list",
           "ptq_features", "ptq_knn_eval", "ptq_linear_probe"]
