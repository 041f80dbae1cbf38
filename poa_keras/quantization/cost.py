"""Size and compute of a (sub-)network at a bit-width pair: bytes and BitOPs.

    cost = quant_cost(teacher, subnet=spec)          # or quant_cost(teacher.extract(spec))
    cost.bytes(4, 4), cost.bitops(4, 4)              # at 4-bit weights and activations
    cost.layers                                      # the quantized conv / linear layers

One forward of a single image inside ``recording()`` (``observer.py``; symbolic on JAX,
``jax.eval_shape``, eager elsewhere) finds which layers quantize a kernel, that kernel's shape
and the layer's output shape, and which activation quantizers run; the rules below turn them
into numbers for any (weight_bits, activation_bits):

* **bytes** = sum over the kernels a weight quantizer touches of elements x b_w / 8 (rounded
  up to whole bytes per kernel), + 4 bytes (float32) for every other parameter: biases, norms,
  tokens, position embeddings, BatchNorm statistics, layers that never quantize. b_w is the
  scope's weight bit-width for a layer with the "auto" policy and its fixed width for a fixed
  one (8: the patch embedding, the ResNet stem), and 32 (4 bytes) when the pair is float. Not
  counted: the activation quantizers' calibrated ranges (calibration state, two numbers per
  quantizer; ``Backbone.count_params`` leaves them out too) and the per-channel weight scales
  (derived from the kernel; a deployed integer model stores one float per output channel).
  So bytes at "32" = 4 x params, and bytes at w = quantized elements x w / 8 + other
  parameters x 4.
* **BitOPs** (the common definition, per image) = sum over the QUANTIZED conv / linear layers
  of MACs x b_w x b_a, where MACs = output positions x kernel elements and b_a is the
  bit-width of the layer's input: its own input quantizer's where it has one (the ViT / Swin
  dense layers, the patch embedding and merging), else the width its weight policy implies
  ("auto": the scope's activation width, since a ResNet conv reads the previous quantizer's
  output; fixed 8: 8, the stem reads 8-bit image data). A float pair gives MACs x 32 x 32 of
  the same layers. Work outside those layers (attention's q.k and attn.v products, norms,
  softmax, pooling, element-wise ops, layers that never quantize) is not counted: it is in
  the FLOPs (``Backbone.subnet_flops``), not in the BitOPs.

Imports nothing above keras (backbones are used through their call only: ``subnet=`` when one
is given, ``quant=`` when the call takes it, else a ``quantization_scope`` around it).
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass

import keras
import numpy as np

from poa_keras.quantization.fake import FLOAT_BITS
from poa_keras.quantization.observer import (ActivationQuantizer, QuantConfig,
                                             activation_quantizers, policy_bits,
                                             quantization_scope, recording)

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {key: QuantCost}


@dataclass(frozen=True)
class QuantizedLayer:
    """One conv / linear layer whose kernel a weight quantizer touches.

    name: the layer's path; kernel_shape: the kernel it uses (sliced, for a subnet of an
    elastic teacher); output_shape: its output for one image, (1, ..., out); macs: multiply-adds
    per image (output positions x kernel elements); weight_policy / activation_policy: "auto"
    or a fixed bit-width (see the module docstring)."""

    name: str
    kernel_shape: tuple
    output_shape: tuple
    macs: int
    weight_policy: object
    activation_policy: object

    @property
    def weights(self):
        return int(np.prod(self.kernel_shape))

    def bits(self, weight_bits, activation_bits):
        """(b_w, b_a) of this layer in a forward at (weight_bits, activation_bits)."""
        return (int(policy_bits(self.weight_policy, int(weight_bits))),
                int(policy_bits(self.activation_policy, int(activation_bits))))


@dataclass(frozen=True)
class QuantCost:
    """What ``quant_cost`` found; ``bytes`` and ``bitops`` apply the module's rules."""

    params: int
    layers: tuple
    activation_quantizers: tuple    # paths of the activation quantizers the forward runs
    image_size: tuple

    @property
    def quantized_params(self):
        """Elements of the kernels a weight quantizer touches (each layer once)."""
        return sum(layer.weights for layer in self._unique_layers())

    @property
    def float_params(self):
        return self.params - self.quantized_params

    @property
    def macs(self):
        """Multiply-adds per image of the quantized layers."""
        return sum(layer.macs for layer in self.layers)

    def _unique_layers(self):
        seen = {}
        for layer in self.layers:   # a layer called twice stores its kernel once
            seen.setdefault(layer.name, layer)
        return list(seen.values())

    def bytes(self, weight_bits, activation_bits=FLOAT_BITS):
        """Bytes of the weights at ``weight_bits`` (activations do not change the size; the
        argument is accepted so that a pair can be passed as is)."""
        total = 4 * self.float_params
        for layer in self._unique_layers():
            b_w, _ = layer.bits(weight_bits, activation_bits)
            total += math.ceil(layer.weights * b_w / 8)
        return int(total)

    def bitops(self, weight_bits, activation_bits):
        """BitOPs per image at (weight_bits, activation_bits)."""
        total = 0
        for layer in self.layers:
            b_w, b_a = layer.bits(weight_bits, activation_bits)
            total += layer.macs * b_w * b_a
        return int(total)


def quant_cost(model, subnet=None, image_size=None):
    """The quantized layers, parameters and activation quantizers of ``model`` (the subnet
    ``subnet`` of an elastic teacher, or the whole model) on images of ``image_size`` (H, W)
    (default: ``model.image_size``), from one forward of one image; cached per model, subnet
    and image size (the architecture decides it, not the weights).

    Raises ValueError when the model has no layer that quantizes (nothing to count) or no
    image size is known."""
    spec = model.resolve_subnet(subnet) if hasattr(model, "resolve_subnet") else subnet
    if image_size is None:
        size = getattr(model, "image_size", None)
        if size is None:
            raise ValueError(f"{model.name}: give image_size=(height, width); the model records "
                             "none")
        image_size = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    image_size = tuple(int(s) for s in image_size)
    cache = _CACHE.setdefault(model, {})
    key = (spec, image_size)
    if key not in cache:
        cache[key] = _measure(model, spec, image_size)
    return cache[key]


def _policy(layer, *names):
    for name in names:
        if hasattr(layer, name):
            return getattr(layer, name)
    return "auto"   # a layer that quantizes without naming its policy follows the scope


def _measure(model, spec, image_size):
    in_channels = int(getattr(model, "in_channels", 3))
    shape = (1,) + image_size + (in_channels,)
    records, outputs = _traced_forward(model, spec, shape)
    weight_calls, quantizers = {}, []
    for owner, kind, value_shape in records:
        if kind == "weight":
            weight_calls.setdefault(id(owner), (owner, []))[1].append(value_shape)
        elif kind == "activation" and owner not in quantizers:
            quantizers.append(owner)
    if not weight_calls:
        raise ValueError(f"{model.name} has no layer that quantizes its weights: there is "
                         "nothing to count at a bit-width")
    layers = []
    for owner, kernels in weight_calls.values():
        name = getattr(owner, "path", owner.name)
        outs = outputs.get(id(owner), [])
        if len(outs) != len(kernels):
            raise RuntimeError(f"{name}: {len(kernels)} quantized kernels but {len(outs)} "
                               "outputs recorded; cannot pair them to count MACs")
        input_quantizer = getattr(owner, "input_quantizer", None)
        weight_policy = _policy(owner, "weight_bits", "bits")
        activation_policy = (input_quantizer.bits if input_quantizer is not None
                             else weight_policy)
        for kernel, out in zip(kernels, outs):
            if out[-1] != kernel[-1]:
                raise RuntimeError(f"{name}: output channels {out[-1]} differ from the "
                                   f"kernel's {kernel[-1]} (kernel {kernel}, output {out})")
            # the forward ran ONE image, so every leading axis (tokens, windows folded into
            # the batch axis by a windowed attention) counts output positions
            positions = int(np.prod(out[:-1]))
            layers.append(QuantizedLayer(name, tuple(kernel), tuple(out),
                                         positions * int(np.prod(kernel)), weight_policy,
                                         activation_policy))
    return QuantCost(params=_params(model, spec), layers=tuple(layers),
                     activation_quantizers=tuple(getattr(q, "path", q.name)
                                                 for q in quantizers),
                     image_size=image_size)


def _params(model, spec):
    if spec is not None and hasattr(model, "subnet_params"):
        return int(model.subnet_params(spec))
    skip = {id(q.range) for q in activation_quantizers(model)}
    return int(sum(int(np.prod(v.shape)) for v in model.weights if id(v) not in skip))


def _traced_forward(model, spec, shape):
    """(records of ``recording()``, {id(layer): [output shapes]}) of one forward at 8/8.

    Every sub-layer's ``call`` is wrapped on the instance for the duration, to note the shape
    of what it returns (the quantizer records give kernel and input shapes; a conv's MACs need
    its output positions)."""
    layers = [layer for layer in model._flatten_layers(include_self=False)
              if not isinstance(layer, ActivationQuantizer)]
    outputs, saved = {}, []
    for layer in layers:
        saved.append((layer, layer.__dict__.get("call")))
        layer.call = _noting(layer.call, outputs.setdefault(id(layer), []))
    quant = QuantConfig(8, 8, ranges="calibrated")
    kwargs = {"training": False}
    if spec is not None:
        kwargs["subnet"] = spec
    takes_quant = "quant" in inspect.signature(model.call).parameters

    def run(images):
        if takes_quant:
            return model(images, quant=quant, **kwargs)
        with quantization_scope(quant):
            return model(images, **kwargs)

    try:
        with recording() as records:
            backend = keras.backend.backend()
            if backend == "jax":   # shapes only: nothing is compiled or computed
                import jax
                jax.eval_shape(run, jax.ShapeDtypeStruct(shape, "float32"))
            elif backend == "torch":
                import torch
                with torch.no_grad():
                    run(np.zeros(shape, np.float32))
            else:
                run(np.zeros(shape, np.float32))
    finally:
        for layer, previous in saved:
            if previous is None:
                del layer.call
            else:
                layer.call = previous
    return list(records), {k: v for k, v in outputs.items() if v}


def _noting(call, shapes):
    def noted(*args, **kwargs):
        out = call(*args, **kwargs)
        if hasattr(out, "shape"):
            shapes.append(tuple(int(s) if s is not None else 1 for s in out.shape))
        return out
    return noted


__all__ = ["QuantCost", "QuantizedLayer", "quant_cost"]
